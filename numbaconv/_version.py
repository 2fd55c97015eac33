"""numbaconv's version, in a leaf module: the package exports it, and the per-machine tuning
keys its wisdom files on it without importing the package's front door."""

__version__ = "0.1.0"
