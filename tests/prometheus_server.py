"""A real Prometheus server for tests: Debian's ``prometheus`` binary (``.ci/run`` installs it),
started directly on a free port with a temporary config and database, scraping one target every
second; never a system service. Queries go through its HTTP API."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

SCRAPE_INTERVAL_S = 1


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Prometheus:
    def __init__(self, address: str):
        self.address = address

    def query(self, promql: str) -> list[dict[str, Any]]:
        """The result of an instant query: [{'metric': labels, 'value': [t, 'v']}] (or 'values'
        for a range vector)."""
        url = f"http://{self.address}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]["result"]

    def value(self, promql: str) -> float | None:
        """The one value of a query that gives one series, None when it gives none."""
        result = self.query(promql)
        assert len(result) <= 1, result
        return float(result[0]["value"][1]) if result else None

    def by(self, label: str, promql: str) -> dict[str, float]:
        return {r["metric"][label]: float(r["value"][1]) for r in self.query(promql)}


def wait_for(check: Callable[[], Any], timeout_s: float, what: str, alive: Callable[[], bool] = lambda: True) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        assert alive(), f"the run ended before {what}"
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


@contextmanager
def prometheus_scraping(target: str, folder: Path) -> Iterator[Prometheus]:
    binary = shutil.which("prometheus")
    assert binary, "the prometheus binary is missing: apt-get install prometheus (.ci/run installs it)"
    folder.mkdir(parents=True)
    config = folder / "prometheus.yml"
    config.write_text(f"global:\n  scrape_interval: {SCRAPE_INTERVAL_S}s\n  scrape_timeout: {SCRAPE_INTERVAL_S}s\n"
                      f"scrape_configs:\n  - job_name: densefusion\n    static_configs:\n"
                      f"      - targets: ['{target}']\n")
    address = f"127.0.0.1:{free_port()}"
    log = open(folder / "prometheus.log", "wb")  # noqa: SIM115 - closed below
    server = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={folder / 'data'}",
                               f"--web.listen-address={address}", "--log.level=warn"],
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        def ready() -> bool:
            try:
                with urllib.request.urlopen(f"http://{address}/-/ready", timeout=2) as response:
                    return response.status == 200
            except OSError:
                return False

        wait_for(ready, 60, "Prometheus to be ready", alive=lambda: server.poll() is None)
        yield Prometheus(address)
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
