"""prunekit's version, in a module of its own so that any module can record it (save_pruned's manifest) without
importing the package's public face."""
__version__ = "0.1.0"
