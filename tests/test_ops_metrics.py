"""--metrics-port: a real Prometheus scrapes a live run on the tiny models; its HTTP API shows
the counters rising while a shard is held back, the stall alarm on the held shard, and, after
the run, final values equal to metrics.json and to the output's rows. The Grafana dashboard's
queries name only metrics the endpoint serves."""

import json
import os
import re
import socket
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_server import free_port, prometheus_scraping, wait_for

from engine.io.demo_data import write_demo_shards
from engine.io.manifest import read_manifest
from engine.ops.prometheus import Endpoint

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "docs" / "grafana" / "densefusion.json"


def release_when_read(fifo: Path) -> threading.Thread:
    """Let the run's reader through the held-back shard: open it for writing and close it (the
    reader then finds an unreadable, empty shard: committed with 0 samples and its error)."""
    def release():
        with open(fifo, "wb"):
            pass

    thread = threading.Thread(target=release, daemon=True)
    thread.start()
    return thread


def rows(folder: Path) -> int:
    return sum(pq.ParquetFile(p).metadata.num_rows for p in folder.glob("*.parquet"))


def last(metric: str, by: str = "") -> str:
    """The metric's last scraped value: a range function, since the finished run's series are
    marked stale once its endpoint is gone."""
    grouping = f" by ({by})" if by else ""
    return f"sum{grouping}(last_over_time({metric}[10m]))"


@pytest.mark.slow  # starts a Prometheus server
def test_prometheus_scrapes_a_live_run_and_ends_on_metrics_json(tmp_path, tiny_cache):
    shards = write_demo_shards(tmp_path / "in", n_shards=3)
    held = shards[-1]  # read last: the run holds here with two shards committed
    data = held.read_bytes()
    held.unlink()
    os.mkfifo(held)
    out, port, events = tmp_path / "out", free_port(), tmp_path / "events.jsonl"
    cmd = [sys.executable, str(ROOT / "densefusion_local.py"), "run", "--shards", *map(str, shards),
           "--out", str(out), "--models", "tiny", "--cache-dir", str(tiny_cache), "--no-progress",
           "--metrics-port", str(port), "--metrics-final-scrape-s", "60", "--stall-seconds", "2",
           "--log-format", "json", "--log-file", str(events)]
    with prometheus_scraping(f"127.0.0.1:{port}", tmp_path / "prometheus") as prom:
        run = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            alive = lambda: run.poll() is None  # noqa: E731
            wait_for(lambda: prom.value("densefusion_run_shards_done") == 2, 600, "two shards committed", alive)
            manifest = read_manifest(out)
            assert prom.value("densefusion_run_shards") == 3
            assert prom.value("sum(densefusion_images_written_total)") == sum(m["written"] for m in manifest.values())
            # nothing finishes while the reader waits on the held shard: the alarm names it
            stalled = wait_for(lambda: prom.query("densefusion_stalled"), 60, "the stall alarm", alive)
            assert [s["metric"]["stage"] for s in stalled] == ["source"]
            assert prom.value("densefusion_seconds_since_last_sample") >= 2
            release_when_read(held).join(timeout=60)
            output, _ = run.communicate(timeout=600)
        finally:
            run.kill()
            held.unlink()
            held.write_bytes(data)
        assert run.returncode == 0, output
        metrics = json.loads((out / "metrics.json").read_text())

        # the counters rose while the run went on and never fell
        written = prom.query("densefusion_images_written_total[10m]")[0]["values"]
        series = [float(v) for _, v in written]
        assert series == sorted(series) and series[0] < series[-1]

        # the final values: metrics.json, and the rows of the output
        assert prom.value(last("densefusion_images_written_total")) == metrics["written"] == rows(out / "shards")
        assert prom.value(last("densefusion_images_rejected_total")) == metrics["rejected"] == rows(out / "rejects")
        assert prom.by("stage", last("densefusion_images_rejected_total", "stage")) == metrics["rejects_by_stage"]
        assert prom.value(last("densefusion_run_shards_done")) == metrics["shards"] == 3
        assert prom.value(last("densefusion_shards_committed_total")) == 3
        stages = {s["stage"]: s for s in metrics["stages"]}
        assert prom.by("stage", last("densefusion_stage_images_total", "stage")) == {
            name: s["items"] for name, s in stages.items()}
        assert prom.by("stage", last("densefusion_stage_failed_batches_total", "stage")) == {
            name: s["failed_batches"] for name, s in stages.items()}
        assert prom.by("stage", last("densefusion_expert_cache_misses_total", "stage")) == {
            name: c["cache_misses"] for name, c in metrics["expert_cache"].items()}
        assert prom.value(last("densefusion_caption_output_tokens_total")) == stages["caption"]["caption_output_tokens"] > 0
        assert prom.value(last("densefusion_caption_prompt_tokens_total")) == stages["caption"]["caption_prompt_tokens"]
        busy = prom.by("stage", last("densefusion_stage_busy_seconds_total", "stage"))
        assert all(abs(busy[name] - s["busy_s"]) < 0.01 for name, s in stages.items())

    logged = [json.loads(line) for line in events.read_text().splitlines()]
    committed = [e for e in logged if e["event"] == "shard_committed"]
    assert sorted(e["shard"] for e in committed) == sorted(metrics_shards(out))
    assert len({e["run_id"] for e in logged}) == 1 and all(e["node"] for e in logged)
    # the held shard's stall names the reader; on a busy machine a slow batch or commit may have
    # raised the 2 s alarm before, naming where the oldest item was then
    stalls = [e["stage"] for e in logged if e["event"] == "stalled"]
    assert stalls[-1] == "source" and set(stalls[:-1]) <= {*stages, "writer", "source"}
    assert len([e for e in logged if e["event"] == "stall_ended"]) == len(stalls)  # the last: the held shard commits
    assert [e["problems"] != [] for e in committed] == [False, False, True]  # the released shard: empty


def metrics_shards(out: Path) -> list[str]:
    return list(read_manifest(out))


def served_names(port: int) -> set[str]:
    """The sample names the endpoint serves (a counter ``x`` serves ``x_total``)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    names = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name + ("_total" if family.type == "counter" else ""))
    return names


def dashboard_metric_names() -> set[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    names = set()
    for panel in dashboard["panels"]:
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            names.update(re.findall(r"\bdensefusion_[a-z_]+\b", target["expr"]))
    return names


def test_the_dashboard_queries_only_metrics_the_endpoint_serves():
    port = free_port()
    endpoint = Endpoint(port)
    try:
        served = served_names(port)
    finally:
        endpoint.close()
    used = dashboard_metric_names()
    assert used and used <= served, f"the dashboard queries metrics the endpoint does not serve: {used - served}"
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 36 and dashboard["uid"] and dashboard["title"]
    for panel in dashboard["panels"]:
        assert {"id", "type", "title", "gridPos", "datasource", "targets"} <= set(panel)
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}


def test_a_metrics_port_in_use_or_a_log_file_without_json_exits_2_before_any_work(tmp_path):
    shards = write_demo_shards(tmp_path / "in", n_shards=1)
    base = [sys.executable, str(ROOT / "densefusion_local.py"), "run", "--shards", str(shards[0]), "--models", "tiny",
            "--no-progress"]
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = subprocess.run([*base, "--out", str(tmp_path / "a"), "--metrics-port", str(port)],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert busy.returncode == 2 and f"--metrics-port {port}" in busy.stderr and "free port" in busy.stderr
    assert not (tmp_path / "a" / "metrics.json").exists()
    no_json = subprocess.run([*base, "--out", str(tmp_path / "b"), "--log-file", str(tmp_path / "events.jsonl")],
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert no_json.returncode == 2 and "--log-format json" in no_json.stderr
    assert not (tmp_path / "events.jsonl").exists()


def test_gpu_series_are_nvmls_figures_in_base_units(monkeypatch):
    import models.caption.figures

    monkeypatch.setattr(models.caption.figures, "gpu_figures", lambda: {
        "gpu0_memory_used_gib": 1.5, "gpu0_util_percent": 50.0, "gpu1_memory_used_gib": 0.25, "gpu1_util_percent": 0.0})
    port = free_port()
    endpoint = Endpoint(port)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            families = {f.name: f for f in text_string_to_metric_families(response.read().decode())}
    finally:
        endpoint.close()
    util = {s.labels["gpu"]: s.value for s in families["densefusion_gpu_utilization_ratio"].samples}
    memory = {s.labels["gpu"]: s.value for s in families["densefusion_gpu_memory_used_bytes"].samples}
    assert util == {"0": 0.5, "1": 0.0} and memory == {"0": 1.5 * 2**30, "1": 0.25 * 2**30}
    assert {s.labels["node"] for s in families["densefusion_gpu_memory_used_bytes"].samples} == {endpoint.node}
