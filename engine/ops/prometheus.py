"""``--metrics-port``: the driver serves its live figures to Prometheus (``prometheus_client``).

Every family is read at scrape time from the passes this process ran or runs
(:class:`engine.ops.watch.RunWatch`, which reads the runtime's own counters) and from NVML; nothing
is counted twice. Names follow Prometheus conventions: ``densefusion_`` prefix, counters end in
``_total``, base units (seconds, bytes, ratios 0-1), labels ``pass``, ``stage``, ``reason``,
``gpu``, ``node``. Every family is served from the first scrape on, empty until it has values
(the Grafana dashboard's queries are checked against this list: tests/test_ops_metrics.py).

After a run, :meth:`Endpoint.final_scrape` keeps the process serving until one scrape has read the
final figures (``--metrics-final-scrape-s``), so a short run's last values reach Prometheus.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from typing import Any

from engine.io.commit import node_name
from engine.ops import events
from engine.ops.cluster_watch import ClusterWatch
from engine.ops.watch import RunWatch
from models.errors import ConfigError

# name: (type, labels besides node, help); which stage figures feed which family: STAGE_COUNTERS, STAGE_GAUGES
FAMILIES: dict[str, tuple[str, tuple[str, ...], str]] = {
    "densefusion_run_info": ("gauge", ("run_id", "pass"), "1 per pass of this process; labels: run_id, pass, node"),
    "densefusion_run_shards": ("gauge", ("pass",), "shards this pass covers (committed before it started included)"),
    "densefusion_run_shards_done": ("gauge", ("pass",), "shards of this pass committed, before it started or by it"),
    "densefusion_shards_committed": ("counter", ("pass",), "shards committed by this process"),
    "densefusion_images_written": ("counter", ("pass",), "samples written to the dataset by this process"),
    "densefusion_images_rejected": ("counter", ("pass", "stage", "reason"),
                                    "samples rejected by this process, by stage and reason"),
    "densefusion_stage_images": ("counter", ("pass", "stage"), "samples each stage processed (its input)"),
    "densefusion_stage_batches": ("counter", ("pass", "stage"), "batches each stage processed"),
    "densefusion_stage_failed_batches": ("counter", ("pass", "stage"),
                                         "batches that raised in a stage (their samples are rejected)"),
    "densefusion_stage_busy_seconds": ("counter", ("pass", "stage"),
                                       "seconds each stage spent in process(); rate() is its busy share"),
    "densefusion_stage_busy_ratio": ("gauge", ("pass", "stage"),
                                     "share of this pass's wall time each stage spent in process()"),
    "densefusion_stage_queue_depth": ("gauge", ("pass", "stage"),
                                      "batches waiting in each stage's input queue (writer: stage=\"writer\")"),
    "densefusion_images_per_second": ("gauge", ("pass",), "samples finished per second over this pass so far"),
    "densefusion_eta_seconds": ("gauge", ("pass",), "time left for this pass at its rate so far (absent until known)"),
    "densefusion_seconds_since_last_sample": ("gauge", ("pass",), "seconds since a sample last reached the writer"),
    "densefusion_stalled": ("gauge", ("pass", "stage", "replica"),
                            "1 while no sample finished for --stall-seconds: the "
                            "stage and replica that hold the oldest item"),
    "densefusion_expert_cache_hits": ("counter", ("pass", "stage"), "expert outputs served from the cache, by stage"),
    "densefusion_expert_cache_misses": ("counter", ("pass", "stage"),
                                        "expert outputs computed (not in the cache), by stage"),
    "densefusion_caption_images": ("counter", ("pass", "stage"), "images the caption engine captioned"),
    "densefusion_caption_prompt_tokens": ("counter", ("pass", "stage"), "prompt tokens sent to the caption engine"),
    "densefusion_caption_output_tokens": ("counter", ("pass", "stage"), "tokens the caption engine generated"),
    "densefusion_caption_prefix_cache_hit_ratio": ("gauge", ("pass", "stage"),
                                                   "share of prompt tokens served from the prefix cache "
                                                   "(backends that report it: SGLang)"),
    "densefusion_engine_errors": ("counter", ("pass", "stage"), "requests a caption engine gave up on, by stage"),
    "densefusion_engine_retries": ("counter", ("pass", "stage"), "requests a caption engine retried, by stage"),
    "densefusion_gpu_utilization_ratio": ("gauge", ("gpu",), "GPU utilisation (NVML), 0-1"),
    "densefusion_gpu_memory_used_bytes": ("gauge", ("gpu",), "GPU memory in use (NVML)"),
}
# a stage's metrics() key → the counter it feeds (by stage)
STAGE_COUNTERS = {
    "cache_hits": "densefusion_expert_cache_hits", "cache_misses": "densefusion_expert_cache_misses",
    "caption_images": "densefusion_caption_images", "caption_prompt_tokens": "densefusion_caption_prompt_tokens",
    "caption_output_tokens": "densefusion_caption_output_tokens",
    "api_errors": "densefusion_engine_errors", "api_retries": "densefusion_engine_retries",
}
STAGE_GAUGES = {"prefix_cache_hit_rate": "densefusion_caption_prefix_cache_hit_ratio"}


class Endpoint:
    """The process's metrics server; every pass run in the process is followed (by its name)."""

    def __init__(self, port: int):
        from prometheus_client import CollectorRegistry, start_http_server

        registry = CollectorRegistry(auto_describe=False)
        registry.register(self)
        try:
            self.server, self.thread = start_http_server(port, registry=registry)
        except OSError as exc:
            raise ConfigError(f"--metrics-port {port}: cannot serve metrics there ({exc.strerror}); "
                              f"pick a free port") from None
        self.port = port
        self.node = node_name()
        self.watches: dict[str, RunWatch | ClusterWatch] = {}
        self.scrapes = 0
        self._scraped = threading.Condition()

    def follow(self, watch: RunWatch | ClusterWatch) -> None:
        self.watches[watch.pass_name] = watch

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def final_scrape(self, timeout_s: float) -> None:
        """Wait until a scrape that starts now has been served (the run's figures are final),
        at most ``timeout_s``."""
        with self._scraped:
            seen = self.scrapes
            self._scraped.wait_for(lambda: self.scrapes >= seen + 1, timeout=timeout_s)

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        kinds = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily}
        families = {name: kinds[kind](name, help_text, labels=[*labels, "node"])
                    for name, (kind, labels, help_text) in FAMILIES.items()}
        for watch in list(self.watches.values()):
            if isinstance(watch, ClusterWatch):
                self._add_cluster_pass(families, watch)
            else:
                self._add_pass(families, watch)
        for gpu, (util, used) in _gpus().items():
            families["densefusion_gpu_utilization_ratio"].add_metric([gpu, self.node], util)
            families["densefusion_gpu_memory_used_bytes"].add_metric([gpu, self.node], used)
        yield from families.values()
        with self._scraped:
            self.scrapes += 1
            self._scraped.notify_all()

    def _add_pass(self, families: dict[str, Any], watch: RunWatch) -> None:
        p, node = watch.pass_name, self.node

        def put(name: str, value: float, *labels: str) -> None:
            families[name].add_metric([p, *labels, node], value)

        families["densefusion_run_info"].add_metric([events.RUN_ID, p, node], 1)
        put("densefusion_run_shards", watch.shards_total)
        put("densefusion_run_shards_done", watch.shards_before + watch.shards_committed)
        put("densefusion_shards_committed", watch.shards_committed)
        put("densefusion_images_written", watch.sink.written)
        for (stage, reason), n in sorted(watch.rejected.items()):
            put("densefusion_images_rejected", n, stage, reason)
        put("densefusion_images_per_second", watch.images_per_s)
        eta = watch.eta_s
        if eta is not None and math.isfinite(eta):
            put("densefusion_eta_seconds", eta)
        put("densefusion_seconds_since_last_sample", watch.seconds_since_last_sample)
        if watch.stall is not None:
            put("densefusion_stalled", 1, watch.stall.stage, watch.stall.replica)
        for stage in watch.stage_figures():
            name = stage["stage"]
            put("densefusion_stage_images", stage["items"], name)
            put("densefusion_stage_batches", stage["batches"], name)
            put("densefusion_stage_failed_batches", stage["failed_batches"], name)
            put("densefusion_stage_busy_seconds", stage["busy_s"], name)
            put("densefusion_stage_busy_ratio", stage["busy_share"], name)
            put("densefusion_stage_queue_depth", stage["queue_depth"], name)
            for key, value in stage["extra"].items():
                family = STAGE_COUNTERS.get(key) or STAGE_GAUGES.get(key)
                if family:
                    put(family, value, name)
        if watch.pipeline.queues:
            put("densefusion_stage_queue_depth", watch.pipeline.queues[-1].qsize(), "writer")

    def _add_cluster_pass(self, families: dict[str, Any], watch: ClusterWatch) -> None:
        """A pass on Ray: the actors' commits by the node that made them; the run's own series
        on the driver's node."""
        p = watch.pass_name
        shards, written, rejected = watch.snapshot()
        families["densefusion_run_info"].add_metric([events.RUN_ID, p, self.node], 1)
        families["densefusion_run_shards"].add_metric([p, self.node], watch.shards_total)
        families["densefusion_run_shards_done"].add_metric([p, self.node], watch.shards_before + sum(shards.values()))
        for node, n in sorted(shards.items()):
            families["densefusion_shards_committed"].add_metric([p, node], n)
            families["densefusion_images_written"].add_metric([p, node], written[node])
        for (node, stage), n in sorted(rejected.items()):
            families["densefusion_images_rejected"].add_metric([p, stage, "", node], n)
        elapsed = time.monotonic() - watch.started
        processed = sum(written.values()) + sum(rejected.values())
        families["densefusion_images_per_second"].add_metric([p, self.node], processed / elapsed if elapsed else 0.0)
        eta = watch.eta_s
        if eta is not None:
            families["densefusion_eta_seconds"].add_metric([p, self.node], eta)


def _gpus() -> dict[str, tuple[float, float]]:
    """gpu index → (utilisation 0-1, memory used in bytes), from NVML; empty without one."""
    from models.caption.figures import gpu_figures

    figures = gpu_figures()
    found = {}
    for key, used_gib in figures.items():
        if key.endswith("_memory_used_gib"):
            gpu = key.removeprefix("gpu").removesuffix("_memory_used_gib")
            found[gpu] = (figures.get(f"gpu{gpu}_util_percent", 0.0) / 100, used_gib * 2**30)
    return found


_endpoint: Endpoint | None = None


def endpoint(port: int) -> Endpoint | None:
    """The process's endpoint on ``port`` (started on first use; None when ``port`` is 0). One per
    process: a second pass (curate, then caption) is served by the same one."""
    global _endpoint
    if not port:
        return None
    if _endpoint is None:
        _endpoint = Endpoint(port)
    elif _endpoint.port != port:
        raise ConfigError(f"--metrics-port {port}: this process already serves metrics on {_endpoint.port}")
    return _endpoint


def wait_for_final_scrape(port: int, timeout_s: float) -> None:
    """After a pass: let Prometheus read its final figures before the process may exit."""
    served = endpoint(port)
    if served is not None and timeout_s:
        start = time.monotonic()
        served.final_scrape(timeout_s)
        events.emit("final_scrape", waited_s=round(time.monotonic() - start, 2))
