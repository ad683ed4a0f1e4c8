"""The storage root, its layout, and the one way every layer reads and writes it.

The root is a local folder or an object-store URI (``s3://bucket/prefix``, ``gs://…``,
``abfs://container@account.dfs.core.windows.net/…``). Every component asks ``Layout`` where
its files live and uses the helpers below to touch them, so a stage never knows (or cares)
whether it runs on a laptop or on a KubeRay pod whose node shares nothing with the head.

Why pyarrow's filesystems: Ray Data, Ray Train and Parquet already go through them, they read
credentials the standard way (the AWS/GCP/Azure environment variables, profiles and instance
roles), and S3-compatible servers work through ``AWS_ENDPOINT_URL``. Lance and LanceDB have
their own object-store client; ``storage_options`` hands them the same endpoint and region.

Endpoints other than the clouds' own, from the same environment for both clients:

* S3: ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``), ``AWS_REGION``.
* GCS: ``STORAGE_EMULATOR_HOST`` (the google-cloud clients' emulator variable, e.g.
  ``http://127.0.0.1:9023``): anonymous requests to that server.
* Azure: ``AZURE_STORAGE_USE_EMULATOR=true`` with ``AZURITE_BLOB_STORAGE_URL`` (default
  ``http://127.0.0.1:10000``; account ``devstoreaccount1`` and Azurite's published key unless
  ``AZURE_STORAGE_ACCOUNT_NAME`` / ``AZURE_STORAGE_ACCOUNT_KEY`` say otherwise), or
  ``AZURE_STORAGE_ENDPOINT`` for any other blob endpoint (``https://ACCOUNT.blob.core.chinacloudapi.cn``,
  or path-style ``http://host:port/ACCOUNT``). These are the variables Lance's client reads too.

An ``abfs://`` root is kept as ``abfss://`` by ``Layout.at``: Lance knows ``az://`` and ``abfss://``
only, and for both clients the endpoint, not the scheme, decides on TLS.

Atomicity: a local write goes to a temporary file renamed into place; an object-store PUT is
atomic by itself. Readers therefore see the old content or the new, never half of it.
"""

import hashlib
import json
import os
import shutil
import socket
import tempfile
import threading
import uuid
from dataclasses import dataclass
from datetime import timedelta
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


AZURE_SCHEMES = ("abfs", "abfss", "az")
# Azurite's account and key: published by Microsoft for the emulator, the same on every install
# (https://learn.microsoft.com/azure/storage/common/storage-use-azurite#well-known-storage-account-and-key).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
# check_root's probe of a GCS root gives up after this long (the client's own default retries
# a refused connection for minutes).
GCS_PROBE_RETRY = timedelta(seconds=3)


def _gcs_emulator() -> str | None:
    """``STORAGE_EMULATOR_HOST`` as a URL (the Go and C++ clients also accept a bare host:port)."""
    host = os.environ.get("STORAGE_EMULATOR_HOST", "").strip().rstrip("/")
    if not host:
        return None
    return host if "://" in host else f"http://{host}"


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class _Azure:
    """Where an Azure root lives: the account, its key (None: the default credential chain)
    and the blob endpoint (None: ``https://ACCOUNT.blob.core.windows.net``)."""
    account: str
    key: str | None
    endpoint: str | None
    emulator: bool


def _azure(netloc: str, scheme: str = "abfs") -> _Azure:
    emulator = _truthy("AZURE_STORAGE_USE_EMULATOR")
    account = os.environ.get("AZURE_STORAGE_ACCOUNT_NAME") or (AZURITE_ACCOUNT if emulator else None)
    if "@" in netloc:  # abfs://container@account.dfs.core.windows.net/path
        account = netloc.split("@", 1)[1].split(".", 1)[0]
    if not account:
        raise ConfigError(f"{scheme}://{netloc}: no storage account: use "
                          "abfs://container@ACCOUNT.dfs.core.windows.net/prefix or set AZURE_STORAGE_ACCOUNT_NAME")
    key = os.environ.get("AZURE_STORAGE_ACCOUNT_KEY") or (AZURITE_KEY if emulator else None)
    if emulator:  # what Lance's client (object_store) does with the same variables
        base = (os.environ.get("AZURITE_BLOB_STORAGE_URL") or "http://127.0.0.1:10000").rstrip("/")
        return _Azure(account, key, f"{base}/{account}", True)
    endpoint = (os.environ.get("AZURE_STORAGE_ENDPOINT") or "").rstrip("/") or None
    return _Azure(account, key, endpoint, False)


def _azure_endpoint_kwargs(az: _Azure) -> dict[str, str]:
    """pyarrow's form of a blob endpoint: an authority that either follows the account name
    (``.blob.core.chinacloudapi.cn``) or holds it in the path (``127.0.0.1:10000``, Azurite)."""
    if not az.endpoint:
        return {}
    parsed = urlparse(az.endpoint)
    scheme = parsed.scheme or "https"
    if parsed.path.strip("/"):  # path-style: http://host:port/ACCOUNT
        if parsed.path.strip("/") != az.account:
            raise ConfigError(f"the Azure endpoint {az.endpoint} names account {parsed.path.strip('/')!r}, "
                              f"the storage root account {az.account!r}")
        blob = dfs = parsed.netloc
    elif parsed.netloc.startswith(f"{az.account}."):  # https://ACCOUNT.blob.<cloud suffix>
        blob = parsed.netloc[len(az.account):]
        dfs = blob.replace(".blob.", ".dfs.", 1)
    else:
        raise ConfigError(f"AZURE_STORAGE_ENDPOINT={az.endpoint}: use https://{az.account}.blob.<domain> "
                          f"or a path-style http(s)://host:port/{az.account}")
    return {"blob_storage_authority": blob, "dfs_storage_authority": dfs,
            "blob_storage_scheme": scheme, "dfs_storage_scheme": scheme}


@lru_cache(maxsize=32)
def _object_filesystem(scheme: str, netloc: str, env_key: tuple, probe: bool = False) -> pafs.FileSystem:
    """One filesystem per bucket/container and environment (cached: creating one costs a
    credential lookup). ``probe``: the one check_root uses, which gives up sooner."""
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
        gcs: dict[str, Any] = {"retry_time_limit": GCS_PROBE_RETRY} if probe else {}
        emulator = _gcs_emulator()
        if emulator:  # an emulator takes no credentials
            parsed = urlparse(emulator)
            gcs.update(endpoint_override=parsed.netloc, scheme=parsed.scheme or "http", anonymous=True)
        return pafs.GcsFileSystem(**gcs)
    if scheme in AZURE_SCHEMES:
        az = _azure(netloc, scheme)
        kwargs = _azure_endpoint_kwargs(az)
        if az.key:
            kwargs["account_key"] = az.key
        return pafs.AzureFileSystem(account_name=az.account, **kwargs)
    raise ConfigError(f"unsupported storage scheme {scheme!r}: use a local path, s3://, gs:// or abfs://")


def _env_key() -> tuple:
    names = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION",
             "AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AZURE_STORAGE_ACCOUNT_NAME", "AZURE_STORAGE_ACCOUNT_KEY",
             "AZURE_STORAGE_USE_EMULATOR", "AZURITE_BLOB_STORAGE_URL", "AZURE_STORAGE_ENDPOINT",
             "GOOGLE_APPLICATION_CREDENTIALS", "STORAGE_EMULATOR_HOST")
    return tuple(os.environ.get(n) for n in names)


def _filesystem(path: str, probe: bool = False) -> tuple[pafs.FileSystem, str]:
    path = str(path)
    if path.startswith("file://"):
        path = path[len("file://"):]
    if not is_uri(path):
        return pafs.LocalFileSystem(), str(Path(path).expanduser().resolve())
    parsed = urlparse(path)
    scheme = parsed.scheme.lower()
    fs = _object_filesystem(scheme, parsed.netloc, _env_key(), probe)
    container = parsed.netloc.split("@", 1)[0]
    return fs, f"{container}{parsed.path}".rstrip("/")


def filesystem_for(path: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it, for a local path or an object-store URI."""
    return _filesystem(path)


def storage_options(path: str) -> dict[str, str]:
    """Options for Lance / LanceDB on the same object store as pyarrow (empty when local).

    Credentials stay in the environment, where their object-store client reads them too; only
    what it would not infer the same way (an endpoint, plain HTTP, an emulator) is passed."""
    if not is_uri(path):
        return {}
    scheme = _scheme(str(path))
    if scheme in ("gs", "gcs"):
        emulator = _gcs_emulator()
        if not emulator:
            return {}
        # object_store takes a GCS endpoint only from a service-account key's gcs_base_url;
        # disable_oauth makes it send no token (an emulator checks none).
        key = {"gcs_base_url": emulator, "disable_oauth": True,
               "client_email": "", "private_key": "", "private_key_id": ""}
        options = {"google_service_account_key": json.dumps(key)}
        if emulator.startswith("http://"):
            options["allow_http"] = "true"
        return options
    if scheme in AZURE_SCHEMES:
        az = _azure(urlparse(str(path)).netloc, scheme)
        # Always say whether it is the emulator: Lance reads the AZURE_* variables once per
        # process, and an option given here overrides what it read.
        options = {"azure_storage_account_name": az.account,
                   "azure_storage_use_emulator": "true" if az.emulator else "false"}
        # (the emulator's URL is AZURITE_BLOB_STORAGE_URL, which object_store reads itself)
        if not az.emulator and az.endpoint:
            options["azure_storage_endpoint"] = az.endpoint
            if az.endpoint.startswith("http://"):
                options["allow_http"] = "true"
        return options
    if scheme != "s3":
        return {}
    options = {}
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
    if fs.type_name == "gcs":
        # Arrow's GCS listing of one level returns only the folders that have a marker object
        # (gcsfs.cc: ListObjects with includeTrailingDelimiter, no prefixes), and a file written
        # by path creates none: derive the sub-folders from the objects under the folder.
        names = set()
        for info in fs.get_file_info(pafs.FileSelector(p, allow_not_found=True, recursive=True)):
            rel = info.path[len(p) + 1:]
            if "/" in rel:
                names.add(rel.split("/", 1)[0])
            elif info.type == pafs.FileType.Directory and rel:
                names.add(rel)
        return sorted(names)
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
    if fs.type_name == "gcs":
        # Arrow's GCS delete_dir ends by deleting the folder's marker object, and fails (404)
        # when there is none, as for a folder made by writing files into it.
        fs.delete_dir_contents(p, missing_dir_ok=True)
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
    fs, path = _filesystem(root, probe=True)
    bucket = path.split("/", 1)[0]
    endpoint, endpoint_setting = _endpoint(scheme, urlparse(root).netloc)
    where = f" at {endpoint}" if endpoint else ""
    noun = "container" if scheme in AZURE_SCHEMES else "bucket"
    hint = _missing_credentials(scheme)
    refused = _unreachable(endpoint) if endpoint else None
    if refused:  # said at once (the clients would retry a refused connection for seconds)
        raise ConfigError(f"storage root {root}: cannot reach the object store{where} ({refused}); "
                          f"check {endpoint_setting} / the network, or that the server is running")
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
                              f"check {endpoint_setting} / the network, or that the server is running") from exc
        hint = _missing_credentials(scheme)
        if hint:
            raise ConfigError(f"storage root {root}: no credentials for {scheme}://{bucket}: {hint}") from exc
        raise ConfigError(f"storage root {root}: cannot open {noun} {bucket!r}{where}: {_short(text)}") from exc
    if info.type == pafs.FileType.NotFound:
        raise ConfigError(f"storage root {root}: {noun} {bucket!r} does not exist{where}; create it first "
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
        raise ConfigError(f"storage root {root}: cannot write to {noun} {bucket!r}{where} "
                          f"({_short(str(exc))}); grant write access to this prefix") from exc


def _endpoint(scheme: str, netloc: str) -> tuple[str | None, str]:
    """The endpoint a root's requests go to when it is not the cloud's own (None then), and
    the setting that names it (for a message)."""
    if scheme == "s3":
        return _s3_endpoint(), "AWS_ENDPOINT_URL"
    if scheme in ("gs", "gcs"):
        return _gcs_emulator(), "STORAGE_EMULATOR_HOST"
    if scheme in AZURE_SCHEMES:
        az = _azure(netloc, scheme)
        setting = "AZURITE_BLOB_STORAGE_URL" if az.emulator else "AZURE_STORAGE_ENDPOINT"
        return az.endpoint, setting
    return None, "the endpoint"


def _unreachable(endpoint: str, timeout_s: float = 3.0) -> str | None:
    """Why ``endpoint`` certainly cannot be reached: its host is unknown or refuses the
    connection (None otherwise, and when a proxy is configured: the clients would use it)."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy",
                                        "ALL_PROXY", "all_proxy")):
        return None
    parsed = urlparse(endpoint)
    if not parsed.hostname:
        return None
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout_s):
            return None
    except (ConnectionRefusedError, socket.gaierror) as exc:
        return f"no connection to {parsed.hostname}:{port}: {exc.strerror or exc}"
    except OSError:  # a timeout or another failure: the client's own retries decide
        return None


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "…"


@dataclass(frozen=True)
class Layout:
    root: str

    @classmethod
    def at(cls, home: str) -> "Layout":
        root = str(home).rstrip("/") if is_uri(home) else str(Path(home).expanduser().resolve())
        if root.lower().startswith("abfs://"):  # Lance opens abfss:// and az:// only (see the module doc)
            root = "abfss://" + root[len("abfs://"):]
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

    @property
    def experiments(self) -> str:
        return self._join("experiments")

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
    _fsync_dir(target.parent)


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable: until its folder is synced, a power cut can lose the new name."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_json(path: str, obj: Any) -> None:
    """``write_json`` for a path that may be local or in an object store."""
    write_json(path, obj)
