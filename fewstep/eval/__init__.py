"""Sample-quality evaluation helpers."""
