"""Sample-quality metrics: feature extractors, streaming statistics, Frechet distances. They know nothing of models."""
