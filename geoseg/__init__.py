"""geoseg: seam-free, memory-bounded semantic segmentation of large georeferenced imagery on Ray."""

__version__ = "0.1.0"
