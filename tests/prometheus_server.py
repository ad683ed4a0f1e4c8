"""A real Prometheus server for tests (Debian's ``prometheus`` package): started on 127.0.0.1 on a
free port in a temp dir, scraping the given targets every few seconds, stopped by its own pid."""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import yaml

from tests.servers import answers_http, find_binary, free_port, serve_process

SCRAPE_CONFIG = Path(__file__).resolve().parents[1] / "cluster" / "observability" / "prometheus-scrape.yml"
INSTALL_HINT = ("prometheus is not installed: `sudo apt-get install -y prometheus` (Debian/Ubuntu; `make test` "
                "installs it), or set PROMETHEUS to its path")


def find_prometheus() -> str | None:
    return find_binary("PROMETHEUS", "prometheus")


SCRAPE_S = "5s"


@contextmanager
def prometheus_server(workdir: str | Path, targets: list[str], timeout_s: float = 60.0) -> Iterator[str]:
    """Run Prometheus scraping ``targets`` (host:port, path /metrics) with the project's scrape
    config (cluster/observability/prometheus-scrape.yml: Ray's ``ray_aiplatform_*`` become
    ``aiplatform_*``) and yield its base URL."""
    binary = find_prometheus()
    if binary is None:
        raise RuntimeError(INSTALL_HINT)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "prometheus.yml"
    # The project's own scrape config (cluster/observability), pointed at ``targets``, every
    # SCRAPE_S. Not every second: that also caps each scrape at 1 s, and late in a test session
    # Ray's page is ~9 MB (Ray Data's histograms per dataset) and took 2.4 s on a loaded 2-core
    # machine, so every scrape timed out and no series ever appeared.
    shipped = yaml.safe_load(SCRAPE_CONFIG.read_text())
    for job in shipped["scrape_configs"]:
        job["scrape_interval"] = job["scrape_timeout"] = SCRAPE_S
        job["static_configs"] = [{"targets": list(targets)}]
    config.write_text(yaml.safe_dump({"global": {"scrape_interval": SCRAPE_S, "scrape_timeout": SCRAPE_S,
                                                 "evaluation_interval": SCRAPE_S},
                                      "scrape_configs": shipped["scrape_configs"]}))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}", "--web.enable-lifecycle"]
    with serve_process(argv, workdir, lambda: answers_http(f"{url}/-/ready", 200), "prometheus",
                       timeout_s, hint=INSTALL_HINT):
        yield url


def series(url: str, metric: str) -> list[dict[str, str]]:
    """The label sets of ``metric``'s series that Prometheus has scraped so far."""
    r = httpx.get(f"{url}/api/v1/series", params={"match[]": metric}, timeout=10)
    r.raise_for_status()
    return r.json()["data"]
