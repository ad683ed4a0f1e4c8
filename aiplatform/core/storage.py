"""The storage root, its layout, and the one way every layer reads and writes it.

The root is a local folder or an object-store URI (``s3://bucket/prefix``, ``gs://…``,
``abfs://container@account.dfs.core.windows.net/…``). Every component asks ``Layout`` where
its files live and uses the helpers below to touch them, so a stage never knows (or cares)
whether it runs on a laptop or on a KubeRay pod whose node shares nothing with the head.

Why pyarrow's filesystems: Ray Data, Ray Train and Parquet already go through them, they read
credentials the standard way (the AWS/GCP/Azure environment variables, profiles and instance
roles), and S3-compatible servers work through ``AWS_ENDPOINT_URL``. Lance and LanceDB have
their own object-store client; ``storage_options`` hands them the same endpoint and region.

Atomicity: a local write goes to a temporary file renamed into place; an object-store PUT is
atomic by itself. Readers therefore see the old content or the new, never half of it.
"""

import hashlib
import json
import os
import shutil
import tempfile
import threading
import uuid
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs as pafs

from aiplatform.core.errors import ConfigError

OBJECT_STORE_SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "az")


def is_uri(path: str) -> bool:
    """True for an object-store URI (anything with a scheme except ``file://``)."""
    return "://" in str(path) and not str(path).startswith("file://")


def _scheme(uri: str) -> str:
    return urlparse(uri).scheme.lower()


def _s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _s3_region() -> str | None:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None


@lru_cache(maxsize=32)
def _object_filesystem(scheme: str, netloc: str, env_key: tuple) -> pafs.FileSystem:
    """One filesystem per bucket/container and environment (cached: creating one costs a
    credential lookup)."""
    if scheme == "s3":
        endpoint = _s3_endpoint()
        kwargs: dict[str, Any] = {
            "connect_timeout": 10,
            "request_timeout": 60,
            "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=4),
        }
        if endpoint:
            parsed = urlparse(endpoint)
            kwargs["endpoint_override"] = endpoint
            kwargs["scheme"] = parsed.scheme or "https"
            kwargs["region"] = _s3_region() or "us-east-1"
        elif _s3_region():
            kwargs["region"] = _s3_region()
        return pafs.S3FileSystem(**kwargs)
    if scheme in ("gs", "gcs"):
        return pafs.GcsFileSystem()
    if scheme in ("abfs", "abfss", "az"):
        account = os.environ.get("AZURE_STORAGE_ACCOUNT_NAME")
        if "@" in netloc:  # abfs://container@account.dfs.core.windows.net/path
            account = netloc.split("@", 1)[1].split(".", 1)[0]
        if not account:
            raise ConfigError(f"{scheme}://{netloc}: no storage account: use "
                              "abfs://container@ACCOUNT.dfs.core.windows.net/prefix or set AZURE_STORAGE_ACCOUNT_NAME")
        key = os.environ.get("AZURE_STORAGE_ACCOUNT_KEY")
        return pafs.AzureFileSystem(account_name=account, account_key=key) if key else \
            pafs.AzureFileSystem(account_name=account)
    raise ConfigError(f"unsupported storage scheme {scheme!r}: use a local path, s3://, gs:// or abfs://")


def _env_key() -> tuple:
    names = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION",
             "AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AZURE_STORAGE_ACCOUNT_NAME", "AZURE_STORAGE_ACCOUNT_KEY",
             "GOOGLE_APPLICATION_CREDENTIALS")
    return tuple(os.environ.get(n) for n in names)


def filesystem_for(path: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it, for a local path or an object-store URI."""
    path = str(path)
    if path.startswith("file://"):
        path = path[len("file://"):]
    if not is_uri(path):
        return pafs.LocalFileSystem(), str(Path(path).expanduser().resolve())
    parsed = urlparse(path)
    scheme = parsed.scheme.lower()
    fs = _object_filesystem(scheme, parsed.netloc, _env_key())
    container = parsed.netloc.split("@", 1)[0]
    return fs, f"{container}{parsed.path}".rstrip("/")


def storage_options(path: str) -> dict[str, str]:
    """Options for Lance / LanceDB on the same object store as pyarrow (empty when local).

    Credentials stay in the environment, where their object-store client reads them too; only
    what it would not infer the same way (an S3-compatible endpoint, plain HTTP) is passed."""
    if not is_uri(path) or _scheme(str(path)) != "s3":
        return {}
    options: dict[str, str] = {}
    endpoint = _s3_endpoint()
    if endpoint:
        options["aws_endpoint"] = endpoint
        if endpoint.startswith("http://"):
            options["allow_http"] = "true"
        options["aws_region"] = _s3_region() or "us-east-1"
    elif _s3_region():
        options["aws_region"] = _s3_region()
    return options


def join(root: str, *parts: str) -> str:
    return "/".join([str(root).rstrip("/"), *parts])


# ---- small-file helpers: the same calls for a folder and a bucket ---------------------------
def exists(path: str) -> bool:
    fs, p = filesystem_for(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def is_dir(path: str) -> bool:
    fs, p = filesystem_for(path)
    return fs.get_file_info(p).type == pafs.FileType.Directory


def mtime(path: str) -> float | None:
    """Last modification time (seconds since the epoch), or None if missing."""
    fs, p = filesystem_for(path)
    info = fs.get_file_info(p)
    if info.type == pafs.FileType.NotFound or info.mtime is None:
        return None
    return info.mtime.timestamp()


def read_bytes(path: str) -> bytes | None:
    """The file's content, or None when it does not exist."""
    fs, p = filesystem_for(path)
    try:
        with fs.open_input_stream(p) as f:
            return f.read()
    except FileNotFoundError:
        return None
    except OSError as exc:  # some object stores report a missing key as a generic error
        if fs.get_file_info(p).type == pafs.FileType.NotFound:
            return None
        raise exc


def write_bytes(path: str, data: bytes) -> None:
    """Write so that readers see the old content or the new, never half of it."""
    if is_uri(path):
        fs, p = filesystem_for(path)
        with fs.open_output_stream(p) as f:  # one PUT: atomic on every object store
            f.write(data)
        return
    atomic_write_bytes(path, data)


def read_json(path: str, default: Any = None) -> Any:
    data = read_bytes(path)
    return default if data is None else json.loads(data)


def write_json(path: str, obj: Any) -> None:
    write_bytes(path, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def list_files(folder: str, suffix: str = "", prefix: str = "") -> list[str]:
    """Files directly in ``folder`` whose names start with ``prefix`` and end with ``suffix``,
    sorted, as paths or URIs in the folder's own form (empty if the folder is missing)."""
    fs, p = filesystem_for(folder)
    infos = fs.get_file_info(pafs.FileSelector(p, allow_not_found=True, recursive=False))
    names = sorted(i.base_name for i in infos if i.type == pafs.FileType.File
                   and i.base_name.startswith(prefix) and i.base_name.endswith(suffix))
    base = str(folder).rstrip("/") if is_uri(folder) else p
    return [f"{base}/{n}" for n in names]


def list_dirs(folder: str) -> list[str]:
    """Names of the sub-folders directly in ``folder`` (empty if it is missing)."""
    fs, p = filesystem_for(folder)
    infos = fs.get_file_info(pafs.FileSelector(p, allow_not_found=True, recursive=False))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)


def delete_file(path: str) -> None:
    fs, p = filesystem_for(path)
    try:
        fs.delete_file(p)
    except FileNotFoundError:
        pass


def delete_dir(path: str) -> None:
    """Remove a folder (a prefix, on an object store) and everything in it; missing is fine."""
    fs, p = filesystem_for(path)
    if fs.get_file_info(p).type == pafs.FileType.NotFound:
        return
    fs.delete_dir(p)


def make_dirs(path: str) -> None:
    if not is_uri(path):
        Path(path).mkdir(parents=True, exist_ok=True)


def upload_dir(local_dir: str, dest: str) -> None:
    """Copy a local folder's files to ``dest`` (a path or URI)."""
    fs, p = filesystem_for(dest)
    if not is_uri(dest):
        shutil.copytree(local_dir, p, dirs_exist_ok=True)
        return
    pafs.copy_files(str(Path(local_dir).resolve()), p, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)


_CACHE_LOCK = threading.Lock()


def local_copy(path: str) -> str:
    """A node-local folder holding the files at ``path``: the path itself when it is local, a
    cached download when it is in an object store.

    Only for immutable folders (a registered model version's artifact): the cache is keyed by
    the URI and filled once per node, by a rename, so concurrent replicas never see half of it."""
    if not is_uri(path):
        return str(Path(path).expanduser().resolve())
    cache = Path(os.environ.get("AIPLATFORM_CACHE_DIR") or Path(tempfile.gettempdir()) / "aiplatform-cache")
    target = cache / hashlib.sha256(str(path).rstrip("/").encode()).hexdigest()[:24]
    if target.is_dir():
        return str(target)
    cache.mkdir(parents=True, exist_ok=True)
    fs, p = filesystem_for(path)
    if fs.get_file_info(p).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"{path}: no such folder in the object store")
    staged = Path(tempfile.mkdtemp(dir=cache, prefix=f".{target.name}."))
    try:
        pafs.copy_files(p, str(staged), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        with _CACHE_LOCK:
            try:
                os.rename(staged, target)
            except OSError:  # another process filled it first: theirs is identical
                pass
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return str(target)


# ---- the root -------------------------------------------------------------------------------
def _missing_credentials(scheme: str) -> str | None:
    """What to set when no credential source is configured in the environment (None when one is,
    or when the platform may supply one itself, as an instance role does)."""
    if scheme == "s3":
        configured = any(os.environ.get(v) for v in (
            "AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE",
            "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI"))
        shared = Path(os.environ.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials")).expanduser().exists()
        if not configured and not shared:
            return ("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or run with an IAM "
                    "role / IRSA service account)")
    return None


def check_root(root: str) -> None:
    """Fail early, and clearly, when the storage root cannot be used: an unreachable endpoint,
    a missing bucket, or missing/insufficient credentials. Proves write access with one small
    object written and deleted. Local roots are created. Raises ``ConfigError`` (exit 2)."""
    if not is_uri(root):
        try:
            Path(root).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"storage root {root}: cannot create it ({exc.strerror}); "
                              "pick a writable folder with --home or AIPLATFORM_HOME") from exc
        return
    _check_object_root(str(root).rstrip("/"), _env_key())


@lru_cache(maxsize=8)
def _check_object_root(root: str, env_key: tuple) -> None:
    """Checked once per root and environment (a success is cached; a changed endpoint or
    credential is checked again)."""
    scheme = _scheme(root)
    if scheme not in OBJECT_STORE_SCHEMES:
        raise ConfigError(f"storage root {root}: unsupported scheme {scheme!r}; use a local path, "
                          "s3://bucket/prefix, gs://bucket/prefix or abfs://container@account.dfs.core.windows.net/prefix")
    fs, path = filesystem_for(root)
    bucket = path.split("/", 1)[0]
    endpoint = _s3_endpoint() if scheme == "s3" else None
    where = f" at {endpoint}" if endpoint else ""
    hint = _missing_credentials(scheme)
    if hint and os.environ.get("AWS_EC2_METADATA_DISABLED", "").lower() == "true":
        # No credential source at all (and no instance role to ask): some S3-compatible servers
        # would even accept anonymous writes, so say it now rather than after a partial run.
        raise ConfigError(f"storage root {root}: no credentials for {scheme}://{bucket}: {hint}")
    try:
        info = fs.get_file_info(bucket)
    except OSError as exc:
        text = str(exc)
        if "NETWORK_CONNECTION" in text or "Could not connect" in text or "curlCode" in text:
            raise ConfigError(f"storage root {root}: cannot reach the object store{where} ({_short(text)}); "
                              "check AWS_ENDPOINT_URL / the network, or that the server is running") from exc
        hint = _missing_credentials(scheme)
        if hint:
            raise ConfigError(f"storage root {root}: no credentials for {scheme}://{bucket}: {hint}") from exc
        raise ConfigError(f"storage root {root}: cannot open bucket {bucket!r}{where}: {_short(text)}") from exc
    if info.type == pafs.FileType.NotFound:
        raise ConfigError(f"storage root {root}: bucket {bucket!r} does not exist{where}; create it first "
                          "(cluster/terraform creates one) or fix AIPLATFORM_HOME")
    probe = f"{path}/.aiplatform-probe-{uuid.uuid4().hex}"
    try:
        with fs.open_output_stream(probe) as f:
            f.write(b"ok")
        fs.delete_file(probe)
    except OSError as exc:
        hint = _missing_credentials(scheme)
        if hint:
            raise ConfigError(f"storage root {root}: no credentials to write to {scheme}://{bucket}: {hint}") from exc
        raise ConfigError(f"storage root {root}: cannot write to bucket {bucket!r}{where} "
                          f"({_short(str(exc))}); grant write access to this prefix") from exc


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "…"


@dataclass(frozen=True)
class Layout:
    root: str

    @classmethod
    def at(cls, home: str) -> "Layout":
        root = str(home).rstrip("/") if is_uri(home) else str(Path(home).expanduser().resolve())
        return cls(root)

    @classmethod
    def open(cls, home: str) -> "Layout":
        """The layout of ``home``, checked first (``check_root``): what entrypoints use so that
        a bad root fails before any work starts."""
        layout = cls.at(home)
        check_root(layout.root)
        layout.ensure()
        return layout

    @property
    def is_remote(self) -> bool:
        return is_uri(self.root)

    def _join(self, *parts: str) -> str:
        return join(self.root, *parts)

    @property
    def lake(self) -> str:
        return self._join("lake")

    def lake_table(self, name: str) -> str:
        return self._join("lake", name)

    @property
    def features(self) -> str:
        return self._join("features")

    def feature_table(self, view: str) -> str:
        return self._join("features", f"{view}.lance")

    @property
    def online_sqlite(self) -> str:
        return self._join("online.sqlite")

    @property
    def registry(self) -> str:
        return self._join("registry")

    def model_dir(self, name: str, version: int) -> str:
        return self._join("models", name, str(version))

    @property
    def runs(self) -> str:
        return self._join("runs")

    @property
    def vectors(self) -> str:
        return self._join("vectors")

    @property
    def eventlog(self) -> str:
        return self._join("eventlog")

    def ensure(self) -> None:
        if not is_uri(self.root):
            for sub in ("lake", "features", "registry", "models", "runs", "vectors", "eventlog"):
                Path(self._join(sub)).mkdir(parents=True, exist_ok=True)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write a local file so readers see the old content or the new, never half of it."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str, obj: Any) -> None:
    """``write_json`` for a path that may be local or in an object store."""
    write_json(path, obj)
