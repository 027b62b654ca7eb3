"""The package version, in a module of its own so that any layer can record it without importing
the public API (which sits above every layer)."""

__version__ = "0.1.0"
