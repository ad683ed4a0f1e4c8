"""aiplatform: features, training, registry, retrieval and serving on one Ray cluster."""

__version__ = "0.1.0"
