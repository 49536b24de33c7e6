"""The package's version (one home: setup.py reads it, the user cache is stamped with it)."""
__version__ = "0.1.0"
