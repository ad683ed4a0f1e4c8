"""The Serve application's one typed argument, and the Serve config file built from it.

Ray Serve deploys an application from an import path and its arguments: ``serve run
aiplatform.serving.app:app home=…`` locally, ``serve deploy serve.yaml`` on a cluster, and a
KubeRay RayService's ``serveConfigV2``. ``AppArgs`` is that argument (Serve validates the
``args:`` of a config into it), and ``serve_config`` writes the config those three read, with
every deployment's autoscaling and resources spelled out so they can be tuned per environment
without touching code (``aiplatform serve build``; cluster/render.py embeds it in the RayService).

What an argument leaves out is read, when the application is built, from the environment of
the process that builds it (``AIPLATFORM_HOME``, ``AIPLATFORM_ONLINE_STORE``, …): on KubeRay
that is the pod's environment, so one config serves every overlay.
"""

from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from aiplatform.core.settings import Settings
from aiplatform.core.tls import TlsFiles

APP_IMPORT_PATH = "aiplatform.serving.app:app"
DEFAULT_APP_NAME = "aiplatform"


class AppArgs(BaseModel):
    """Arguments of the Serve application builder (``aiplatform.serving.app:app``)."""

    model_config = ConfigDict(extra="forbid")

    home: str | None = Field(None, description="Storage root (path or s3://, gs://, abfs:// URI); "
                                               "default $AIPLATFORM_HOME, else ./.aiplatform")
    model_name: str = Field("two_tower", description="Registered model to serve")
    alias: str = Field("champion", description="Alias whose version is served")
    version: int | None = Field(None, ge=1, description="Serve this version instead of the alias")
    follow_alias: bool = Field(True, description="Switch in place when the alias moves (aiplatform models "
                                                 "promote / rollback); ignored when a version is pinned")
    alias_poll_s: float = Field(2.0, gt=0, le=3600, description="How often each replica reads the alias "
                                                               "and the active experiment")
    experiments: bool = Field(True, description="Route users to the variants of the model's active experiment "
                                                "(aiplatform experiments start / canary)")
    auth: Literal["keys", "off"] = Field("keys", description="'keys': API keys with roles (aiplatform keys "
                                                            "create); 'off': every route open to whoever "
                                                            "reaches the port")
    online_store: str | None = Field(None, description="'sqlite' (under a local root), sqlite:///path or "
                                                       "redis://host:port/db; default $AIPLATFORM_ONLINE_STORE")
    features_module: str | None = Field(None, description="Module declaring the feature definitions; "
                                                          "default $AIPLATFORM_FEATURES_MODULE")
    feature_service: str | None = Field(None, description="Feature service the recommender reads; "
                                                          "default $AIPLATFORM_FEATURE_SERVICE")

    def settings(self) -> Settings:
        """Settings of the serving process: these arguments over the environment's."""
        return Settings.load(home=self.home, online_store=self.online_store,
                             features_module=self.features_module, feature_service=self.feature_service,
                             model_name=self.model_name)

    def as_config_args(self) -> dict[str, Any]:
        """The arguments as a config's ``args:`` (unset ones left to the environment; the
        rollout knobs only when they differ from their defaults)."""
        args = self.model_dump(exclude_none=True)
        for knob in ("follow_alias", "alias_poll_s", "experiments"):
            if args.get(knob) == type(self).model_fields[knob].default:
                args.pop(knob)
        return args


def deployment_options(experiments: bool = True) -> list[dict[str, Any]]:
    """Every deployment of the application, with the options its code declares (name,
    autoscaling, max_ongoing_requests, resources), ready to be tuned in the config: the ingress,
    and with ``experiments`` the shadow's (``serving.shadow``)."""
    from ray.serve.deployment import deployment_to_schema

    from aiplatform.serving.app import RecommendationAPI
    from aiplatform.serving.shadow import ShadowScorer

    out = []
    for deployment in (RecommendationAPI, ShadowScorer) if experiments else (RecommendationAPI,):
        schema = deployment_to_schema(deployment).model_dump(exclude_unset=True)
        keep = ("name", "max_ongoing_requests", "autoscaling_config", "ray_actor_options",
                "max_queued_requests", "backpressure_config", "graceful_shutdown_timeout_s", "health_check_period_s",
                "health_check_timeout_s", "num_replicas")
        out.append({k: schema[k] for k in keep if k in schema and schema[k] is not None})
    return out


def serve_config(args: AppArgs, *, name: str = DEFAULT_APP_NAME, route_prefix: str = "/",
                 host: str = "0.0.0.0", port: int = 8000,  # nosec B104  # a cluster config: proxies listen on the pod's interfaces
                 runtime_env: dict[str, Any] | None = None, tls: TlsFiles | None = None) -> dict[str, Any]:
    """A Serve config (Serve's ``ServeDeploySchema``, validated) for ``serve deploy`` and a
    RayService's ``serveConfigV2``. With ``tls`` (paths on the cluster's nodes) Serve's proxies
    answer HTTPS; the cluster must then run the Python proxy, not the HAProxy ingress."""
    from ray.serve.schema import ServeDeploySchema

    from aiplatform.serving.app import REQUEST_TIMEOUT_S

    config = {
        "proxy_location": "EveryNode",
        "http_options": {"host": host, "port": int(port), "request_timeout_s": REQUEST_TIMEOUT_S,
                         **(tls.http_options() if tls else {})},
        "applications": [{
            "name": name,
            "route_prefix": route_prefix,
            "import_path": APP_IMPORT_PATH,
            "args": args.as_config_args(),
            "runtime_env": dict(runtime_env or {}),
            "deployments": deployment_options(args.experiments is not False),
        }],
    }
    ServeDeploySchema.model_validate(config)  # the same check `serve deploy` makes
    return config


def dump_config(config: dict[str, Any]) -> str:
    header = ("# Serve config of aiplatform, written by `aiplatform serve build`.\n"
              "# Deploy with `serve deploy FILE`; cluster/render.py embeds it in the RayService.\n")
    return header + yaml.safe_dump(config, sort_keys=False, default_flow_style=False, width=100)


__all__ = ["APP_IMPORT_PATH", "DEFAULT_APP_NAME", "AppArgs", "deployment_options", "dump_config", "serve_config"]
