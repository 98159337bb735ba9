"""The passes on a Ray cluster: the same checks, output and summary as on one node, with the
per-image work leased to actors (engine/cluster/driver.py).

    caption   pass 2 over --shards (run, meta) or over pass 1's selection (run --curate)
    curate    pass 1: embedding on the actors, each publishing its shards' parts of the store;
              the driver adopts them and fits k-means; assignment, SemDeDup and top-N run as
              Ray tasks partitioned by cluster (curate_partitioned.py)
"""

from __future__ import annotations

from typing import Any

from engine.cluster.driver import ClusterResult, lease_shards
from engine.core.config import RunConfig
from engine.core.driver import Pass
from engine.core.errors import ConfigError
from engine.core.figures import MetricsFile, OutputTotals, RunSummary
from engine.io.object_output import output_root
from engine.io.readers import expand_shards, expected_samples, shard_name
from engine.ops import events, prometheus
from engine.ops.cluster_watch import ClusterWatch


def run_pass_on_ray(cfg: RunConfig, spec: Pass, kind: str) -> tuple[RunSummary, ClusterResult]:
    """``spec`` (engine/core/driver.py) with its per-image work on the actors (``kind``: see
    engine/cluster/worker.py). Checked as on one node before any work; the actors settle
    ``auto`` options (the device) on their own nodes."""
    checked = spec.resolve(cfg)
    events.configure(cfg.ops.log_format, cfg.ops.log_file)
    served = prometheus.endpoint(cfg.ops.metrics_port)  # a port in use is refused here, before any work
    paths = expand_shards(cfg.input.shards)
    if not paths:
        raise ConfigError("no input shards: pass --shards (tar, parquet or image folders)")
    for path in paths:
        expected_samples(path)  # refuses what is no shard
    spec.build_stages(checked)  # their checks (models found, options); models load on the actors
    root = output_root(cfg.runtime.out, spec.folder)
    sink = spec.open_sink(checked, root)
    sink.settle([shard_name(p) for p in paths])
    skipped = [shard_name(p) for p in paths if shard_name(p) in sink.finished]
    metrics = MetricsFile(root / "metrics.json")
    metrics.start(spec.name, cfg.to_dict(), OutputTotals.of(sink.manifest))
    watch = ClusterWatch(spec.name, shards_total=len(paths), shards_before=len(skipped))
    if served is not None:
        served.follow(watch)

    def on_commit(shard: str, marker: dict[str, Any]) -> None:
        sink.adopt({shard: marker})
        watch.committed(shard, marker)

    try:
        result = lease_shards(cfg, kind, [p for p in paths if shard_name(p) not in sink.finished], on_commit)
    finally:
        watch.running = False
    if result.copies:  # copies still running at the end were stopped half-way: their temporaries go
        sink.remove_temporaries()
    summary = RunSummary(
        shards_done=sorted(result.committed), shards_skipped=skipped,
        written=result.counts["written"], rejected=result.counts["rejected"],
        rejects_by_stage=dict(result.by_stage), wall_s=result.wall_s, interrupted=False, stages=result.stages,
        root=root, outputs=spec.outputs, shards_total=len(paths), totals=OutputTotals.of(sink.manifest),
    )
    metrics.invocations[-1]["cluster"] = result.figures()
    metrics.finish(summary, "ray")
    prometheus.wait_for_final_scrape(cfg.ops.metrics_port, cfg.ops.metrics_final_scrape_s)
    return summary, result


def caption(cfg: RunConfig, *, selected: bool = False) -> tuple[RunSummary, ClusterResult]:
    """Pass 2 on the cluster; ``selected``: over pass 1's selection (run --curate)."""
    from engine.core.pipeline import PASS2

    return run_pass_on_ray(cfg, PASS2, "caption-selected" if selected else "caption")


def curate(cfg: RunConfig) -> tuple[RunSummary, ClusterResult, dict[str, Any] | None]:
    """Pass 1 on the cluster, then the k-means fit here and the rest partitioned by cluster on
    the cluster (curate_partitioned.py); the report is None when a shard failed (the global step
    needs every shard: a rerun retries the failed ones, then selects)."""
    from engine.cluster.curate_partitioned import select_on_ray
    from engine.curate.pass1 import PASS1, select_from_store
    from engine.curate.store import EmbeddingStore

    summary, result = run_pass_on_ray(cfg, PASS1, "curate")
    if result.failed:
        return summary, result, None
    return summary, result, select_from_store(EmbeddingStore(summary.root), cfg, embed_s=summary.wall_s,
                                              select_rows=select_on_ray)


def format_cluster(result: ClusterResult) -> str:
    figures = result.figures()
    lines = [f"ray: {_count(len(result.actors), 'worker actor')} started on {_count(len(figures['nodes']), 'node')}, "
             f"{_count(result.retries, 'retry', 'retries')}, {_count(len(result.failed), 'failed shard')}"
             + (f", {_count(result.copies, 'straggler copy', 'straggler copies')} at the tail "
                f"({result.copies_first} committed first)" if result.copies else "")]
    for node, counts in figures["nodes"].items():
        lines.append(f"  node {node}: {_count(counts['actors'], 'actor')}, {_count(counts['shards'], 'shard')}, "
                     f"{_count(counts['samples'], 'image')}, {counts['images_per_s'] or 0:.1f} images/s")
    for actor in figures["actors"]:
        rate = actor["images_per_busy_s"]
        lines.append(f"  actor {actor['actor']} ({actor['node'] or 'never started'}, pid {actor['pid']}): "
                     f"{_count(actor['shards'], 'shard')}, {_count(actor['samples'], 'image')}, "
                     f"{f'{rate:.1f} images/s busy' if rate else '-'}, {actor['state']}"
                     + (f" ({actor['reason']})" if actor.get("reason") else ""))
    for shard, reason in sorted(result.failed.items()):
        lines.append(f"  FAILED {shard}: {reason}")
    for late in result.late:
        lines.append(f"  late: {late}")
    if result.failed:
        lines.append("failed shards are not in the output; a rerun with the same --out retries them")
    return "\n".join(lines)


def _count(n: int, noun: str, plural: str = "") -> str:
    return f"{n} {noun if n == 1 else plural or noun + 's'}"
