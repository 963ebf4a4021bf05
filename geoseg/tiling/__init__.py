"""Tiling and blending: pure functions and value objects on arrays and windows (no I/O, no Ray)."""
