"""Ray execution layer: the only package that knows Ray."""
