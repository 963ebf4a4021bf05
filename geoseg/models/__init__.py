"""Models: the card (``card.py``, torch-free), the architectures and their registry.

Nothing is imported here on purpose: ``geoseg.io`` reads model cards in Ray read workers, and
importing the registry (hence torch, ~350 MiB and ~0.8 s per worker) there would be wasted.
"""
