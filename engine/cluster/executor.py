"""The driver's executor on a Ray cluster (engine/core/driver.py ``Executor``): the same checks,
output and summary as on one node, with the shards left leased to worker actors
(engine/cluster/driver.py), each running the pass as engine/core/driver.py's ``open_worker``
assembles it. This process records what they commit (the manifest, or the embeddings adopted
into the store); the actors publish files and markers on shared storage.

    caption   pass 2 over --shards (run, meta) or over pass 1's selection (run --curate)
    curate    pass 1: embedding on the actors, each publishing its shards' parts of the store;
              the driver adopts them and fits k-means; assignment, SemDeDup and top-N run as
              Ray tasks partitioned by cluster (curate_partitioned.py)
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from engine.cluster.actor import RayCluster
from engine.cluster.driver import ClusterResult, lease_shards
from engine.core.config import ClusterConfig, RunConfig
from engine.core.driver import Work
from engine.core.figures import RunSummary
from engine.ops import prometheus
from engine.ops.cluster_watch import ClusterWatch


def connect(cluster: ClusterConfig) -> None:
    """``auto``: $RAY_ADDRESS, else a new local cluster."""
    import ray

    address = os.environ.get("RAY_ADDRESS") if cluster.ray == "auto" else cluster.ray
    ray.init(address=address or None, logging_level="WARNING")


def disconnect() -> None:
    import ray

    ray.shutdown()


class RayExecutor:
    """The connected cluster's worker actors run one pass's shards; ``result`` is its leasing
    (failed shards, actors, nodes: the cluster summary). The actors settle ``auto`` options (the
    device) on their own nodes."""

    def __init__(self) -> None:
        self.result = ClusterResult()

    def device(self, cfg: RunConfig) -> str:
        return "ray"

    def figures(self) -> dict[str, Any]:
        return {"cluster": self.result.figures()}

    def describe(self) -> str:
        return format_cluster(self.result)

    def run(self, work: Work) -> RunSummary:
        if work.source is not None:
            raise ValueError("a Ray run reads its shards on the actors: a source of items runs in process only")
        sink, summary = work.sink, work.summary
        watch = ClusterWatch(work.spec.name, shards_total=summary.shards_total, shards_before=len(summary.shards_skipped))
        served = prometheus.endpoint(work.cfg.ops.metrics_port)
        if served is not None:
            served.follow(watch)

        def on_commit(shard: str, marker: dict[str, Any]) -> None:
            sink.adopt({shard: marker})
            watch.committed(shard, marker)

        try:
            self.result = result = lease_shards(work.cfg, work.todo, on_commit,
                                                RayCluster(work.given, work.spec, work.reader))
        finally:
            watch.running = False
        if result.copies:  # copies still running at the end were stopped half-way: their temporaries go
            sink.remove_temporaries()
        return dataclasses.replace(
            summary, shards_done=sorted(result.committed), written=result.counts["written"],
            rejected=result.counts["rejected"], rejects_by_stage=dict(result.by_stage), wall_s=result.wall_s,
            stages=result.stages)


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
