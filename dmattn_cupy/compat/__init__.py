"""Compatibility layers for code written against other libraries (``flash_dmattn``: 1.x)."""
