"""`aiplatform serve`: serve the recommendation API with Ray Serve, write its Serve config for a
cluster, or remove one application from a cluster."""

import sys
from pathlib import Path
from typing import Optional

import typer

from aiplatform.cli.common import HomeOpt, console, err, fail
from aiplatform.core.errors import AIPlatformError, UserInputError
from aiplatform.core.settings import Settings
from aiplatform.core.storage import Layout

serve_app = typer.Typer(help="Serve the recommendation API with Ray Serve, or write its Serve config.")


@serve_app.callback(invoke_without_command=True)
def serve(
    ctx: typer.Context,
    home: Optional[str] = HomeOpt,
    port: Optional[int] = typer.Option(None, help="HTTP port (default 8000)."),
    alias: str = typer.Option("champion", help="Serve the version this alias points at."),
    version: Optional[int] = typer.Option(None, min=1, help="Serve this version instead of the alias."),
    name: str = typer.Option("aiplatform", help="Serve application name (one per route prefix)."),
    route_prefix: str = typer.Option("/", help="URL prefix of the application, e.g. /shop."),
    auth: str = typer.Option("keys", help="'keys': every route needs an API key of its role (aiplatform keys "
                                          "create); 'off': open to whoever reaches the port."),
    tls_cert: Optional[str] = typer.Option(None, "--tls-cert", help="PEM certificate (chain): serve HTTPS "
                                           "(with --tls-key; or AIPLATFORM_TLS_CERTFILE)."),
    tls_key: Optional[str] = typer.Option(None, "--tls-key", help="PEM private key of --tls-cert, unencrypted "
                                          "(or AIPLATFORM_TLS_KEYFILE)."),
) -> None:
    """Serve the champion model over HTTP until Ctrl-C (on $RAY_ADDRESS's cluster, or a local Ray).

    With [bold]--tls-cert[/] and [bold]--tls-key[/] it serves HTTPS only (through Serve's Python proxy).

    Routes need an API key ([bold]Authorization: Bearer KEY[/]): create one with [bold]aiplatform keys
    create NAME --role reader[/] (reader: recommendations; writer: events; admin: models and
    experiments). On a shared cluster only this application is removed when it stops.
    """
    if ctx.invoked_subcommand is not None:
        return
    from aiplatform import quickstart as qs
    from aiplatform.core.runtime import ensure_ray
    from aiplatform.core.tls import tls_files
    from aiplatform.serving import app as serving

    settings = None
    try:
        settings = Settings.load(home=home, http_port=port, tls_certfile=tls_cert, tls_keyfile=tls_key)
        tls = tls_files(settings.tls_certfile, settings.tls_keyfile)
        layout = Layout.open(settings.home)
        ensure_ray(settings)
        url = serving.start(serving.build_app(layout, settings.model_name, alias, settings=settings,
                                              version=version, auth=auth),
                            settings.http_host, settings.http_port, name=name, route_prefix=route_prefix, tls=tls)
        console.print(f"serving application '{name}' at {url} (OpenAPI: {url}/docs)")
        if auth == "off":
            err.print(f"[yellow]warning:[/] auth off: anyone who reaches {settings.http_host}:{settings.http_port} "
                      "may read recommendations, write events and move aliases", highlight=False)
        qs.wait_until_interrupted(console)
    except AIPlatformError as exc:
        raise fail(exc)
    finally:
        qs.shutdown(joined=bool(settings and settings.ray_address), app_name=name)


@serve_app.command("build")
def serve_build(
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the YAML here (default: standard output)."),
    home: Optional[str] = typer.Option(None, "--home", help="Storage root to bake in; left out, the "
                                       "cluster's $AIPLATFORM_HOME is used when the app is built."),
    model_name: str = typer.Option("two_tower", help="Registered model to serve."),
    alias: str = typer.Option("champion", help="Alias whose version is served."),
    version: Optional[int] = typer.Option(None, min=1, help="Serve this version instead of the alias."),
    online_store: Optional[str] = typer.Option(None, help="redis://host:port/db or sqlite:///node/local/path; "
                                               "left out, the cluster's $AIPLATFORM_ONLINE_STORE."),
    name: str = typer.Option("aiplatform", help="Serve application name."),
    host: str = typer.Option("0.0.0.0", help="HTTP host of Serve's proxies."),  # nosec B104  # a cluster config: proxies listen on the pod's interfaces, behind API keys
    port: int = typer.Option(8000, help="HTTP port of Serve's proxies."),
    runtime_env_json: Optional[str] = typer.Option(None, help="The application's runtime_env, as JSON."),
    auth: str = typer.Option("keys", help="'keys': API keys with roles (aiplatform keys create, or "
                                          "AIPLATFORM_API_KEYS on the cluster); 'off': open."),
    tls_cert: Optional[str] = typer.Option(None, "--tls-cert", help="HTTPS: the certificate's path on the "
                                           "cluster's nodes (with --tls-key; the cluster must run Serve's "
                                           "Python proxy, not RAY_SERVE_ENABLE_HA_PROXY)."),
    tls_key: Optional[str] = typer.Option(None, "--tls-key", help="HTTPS: the key's path on the cluster's nodes."),
) -> None:
    """Write the Serve config for `serve deploy FILE` or a KubeRay RayService's serveConfigV2.

    It lists the application (import path, arguments, runtime_env) and its deployments with
    their autoscaling and resources, ready to tune per environment.
    """
    import json

    from pydantic import ValidationError

    from aiplatform.core.tls import tls_files
    from aiplatform.serving.config import AppArgs, dump_config, serve_config

    try:
        runtime_env = json.loads(runtime_env_json) if runtime_env_json else {}
        if not isinstance(runtime_env, dict):
            raise UserInputError("--runtime-env-json must be a JSON object, e.g. '{\"env_vars\": {\"A\": \"1\"}}'")
        args = AppArgs(home=Layout.at(home).root if home else None, model_name=model_name, alias=alias,
                       version=version, online_store=online_store, auth=auth)
        tls = tls_files(tls_cert, tls_key, check=False)  # paths on the cluster: not readable here
        text = dump_config(serve_config(args, name=name, host=host, port=port, runtime_env=runtime_env, tls=tls))
    except json.JSONDecodeError as exc:
        raise fail(UserInputError(f"--runtime-env-json is not valid JSON: {exc}"))
    except ValidationError as exc:
        raise fail(UserInputError(f"invalid serve config: {exc}"))
    except AIPlatformError as exc:
        raise fail(exc)
    if out is None:
        sys.stdout.write(text)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        console.print(f"wrote {out}: deploy it with [bold]serve deploy {out}[/]", highlight=False)


@serve_app.command("delete")
def serve_delete(name: str = typer.Option("aiplatform", help="Serve application to remove.")) -> None:
    """Remove one Serve application from the cluster in $RAY_ADDRESS (others keep running).

    Ray's `serve shutdown` removes every application; this removes just one."""
    import ray

    from aiplatform.core.runtime import ensure_ray
    from aiplatform.serving import app as serving

    settings = Settings.load()
    if not settings.ray_address:
        raise fail(UserInputError("set RAY_ADDRESS to the cluster whose application to remove "
                                   "(e.g. RAY_ADDRESS=127.0.0.1:6379)"))
    try:
        ensure_ray(settings)
        from ray import serve

        known = set(serve.status().applications)
        if name not in known:
            raise UserInputError(f"no Serve application {name!r} on {settings.ray_address} "
                                 f"(applications: {', '.join(sorted(known)) or 'none'})")
        serving.stop(name)
        console.print(f"removed Serve application '{name}'")
    except AIPlatformError as exc:
        raise fail(exc)
    finally:
        ray.shutdown()
