"""Settings from the environment (and an optional YAML file), with defaults for a laptop.

Embedded by default, distributed by configuration: with nothing set, everything runs on one
machine under ``./.aiplatform``; ``RAY_ADDRESS`` and ``AIPLATFORM_HOME=s3://...`` move the
same code onto a cluster.
"""

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError

from aiplatform.core.errors import ConfigError


def seconds_from_env(name: str, default: float, hint: str = "") -> float:
    """A duration in seconds from the environment variable ``name`` (``default`` when unset or
    empty); ``ConfigError`` naming the variable for anything but a finite number >= 0."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value >= 0 or value == float("inf"):
        raise ConfigError(f"{name}={raw!r}: expected a number of seconds >= 0 (default {default:g}{hint})")
    return value


def default_actor() -> str:
    """Who made a change (an alias move, an experiment revision): ``$AIPLATFORM_ACTOR`` (a CI
    job names itself), else user@host."""
    import getpass
    import socket

    named = os.environ.get("AIPLATFORM_ACTOR", "").strip()
    if named:
        return named
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no login name in some containers
        user = f"uid{os.getuid()}" if hasattr(os, "getuid") else "unknown"
    return f"{user}@{socket.gethostname()}"


class Settings(BaseModel):
    home: str = Field(".aiplatform", description="Storage root: a local path or s3:// / gs:// URI")
    ray_address: str | None = Field(None, description="Ray cluster address; None starts a local one")
    num_cpus: int = Field(4, ge=1, description="Logical CPUs for a local Ray instance")
    object_store_memory: int = Field(1 << 30, ge=75 << 20, description="Bytes for a local object store")
    online_store: str = Field("sqlite", description="'sqlite' (file under home) or a redis:// URL")
    http_host: str = "127.0.0.1"
    http_port: int = Field(8000, ge=1, le=65535)
    serve_ingress: Literal["haproxy", "proxy"] = Field(
        "haproxy", description="HTTP ingress of a Ray this process starts: Serve's HAProxy ingress or its "
                               "Python proxy (a cluster you join keeps the ingress it was started with)")
    tls_certfile: str | None = Field(None, description="PEM certificate (chain) for HTTPS; with tls_keyfile, "
                                                       "Serve's proxy answers HTTPS only")
    tls_keyfile: str | None = Field(None, description="PEM private key (unencrypted) of tls_certfile")
    model_name: str = "two_tower"
    features_module: str = Field("apps.shop.features",
                                 description="Python module declaring VIEWS, SERVICES, ON_DEMAND")
    feature_service: str = Field("recommender_user", description="Feature service the recommender reads")
    log_format: Literal["json", "text"] = Field(
        "json", description="Serving replicas' log lines: one JSON object per line (request_id, trace_id, "
                            "span_id, ...) or Serve's text format")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = Field(
        "INFO", description="Level of the serving replicas' log lines (aiplatform's and Serve's)")

    def ingress(self) -> str:
        """The ingress a Ray started here gets: HTTPS needs Serve's Python proxy (its HAProxy
        ingress serves plain HTTP in Ray 2.60)."""
        return "proxy" if (self.tls_certfile or self.tls_keyfile) else self.serve_ingress

    @classmethod
    def load(cls, **overrides: Any) -> "Settings":
        """Merge, lowest first: defaults, YAML at $AIPLATFORM_CONFIG, environment, overrides."""
        values: dict[str, Any] = {}
        cfg = os.environ.get("AIPLATFORM_CONFIG")
        if cfg:
            try:
                values.update(yaml.safe_load(Path(cfg).read_text()) or {})
            except (OSError, yaml.YAMLError) as exc:
                raise ConfigError(f"cannot read AIPLATFORM_CONFIG={cfg}: {exc}") from exc
        env_map = {
            "AIPLATFORM_HOME": "home",
            "RAY_ADDRESS": "ray_address",
            "AIPLATFORM_NUM_CPUS": "num_cpus",
            "AIPLATFORM_OBJECT_STORE_MEMORY": "object_store_memory",
            "AIPLATFORM_ONLINE_STORE": "online_store",
            "AIPLATFORM_HTTP_HOST": "http_host",
            "AIPLATFORM_HTTP_PORT": "http_port",
            "AIPLATFORM_SERVE_INGRESS": "serve_ingress",
            "AIPLATFORM_TLS_CERTFILE": "tls_certfile",
            "AIPLATFORM_TLS_KEYFILE": "tls_keyfile",
            "AIPLATFORM_FEATURES_MODULE": "features_module",
            "AIPLATFORM_FEATURE_SERVICE": "feature_service",
            "AIPLATFORM_LOG_FORMAT": "log_format",
            "AIPLATFORM_LOG_LEVEL": "log_level",
        }
        for env, key in env_map.items():
            if os.environ.get(env):
                values[key] = os.environ[env]
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**values)
        except ValidationError as exc:
            raise ConfigError(f"invalid settings: {exc}") from exc
