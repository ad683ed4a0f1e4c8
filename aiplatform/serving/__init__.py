"""HTTP serving on Ray Serve: the FastAPI ingress, its deployments and the request schemas.

``build_app``/``start``/``stop`` are imported lazily so that ``aiplatform.serving.schemas``
(the API contract) can be used without importing Ray Serve.
"""

from typing import Any

__all__ = ["build_app", "start", "stop"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from aiplatform.serving import app

        return getattr(app, name)
    raise AttributeError(f"module 'aiplatform.serving' has no attribute {name!r}")
