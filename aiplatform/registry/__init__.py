"""Model registry: versions, aliases (with history), lineage and artifacts."""

from aiplatform.registry.registry import ModelRegistry, ModelVersion

__all__ = ["ModelRegistry", "ModelVersion"]
