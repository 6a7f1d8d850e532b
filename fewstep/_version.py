"""The package version, on the ground floor so that every layer can record it without importing ``fewstep``."""

__version__ = "0.1.0"
