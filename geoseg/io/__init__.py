"""I/O: the only package that opens paths and URIs."""
