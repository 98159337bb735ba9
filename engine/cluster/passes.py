"""The passes on a Ray cluster: the same checks, output and summary as on one node, with the
per-image work leased to actors (engine/cluster/driver.py).

    caption   pass 2 over --shards (run, meta) or over pass 1's selection (run --curate)
    curate    pass 1: embedding on the actors, each publishing its shards' parts of the store;
              the driver adopts them, then clusters, de-duplicates and selects once, here
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from engine.cluster.driver import ClusterResult, lease_shards
from engine.core.config import RunConfig
from engine.core.errors import ConfigError
from engine.core.runtime import RunSummary
from engine.io.manifest import Manifest, write_json_atomic
from engine.io.readers import expand_shards, shard_kind, shard_name


def caption(cfg: RunConfig, *, selected: bool = False) -> tuple[RunSummary, ClusterResult]:
    """Pass 2 on the cluster; ``selected``: over pass 1's selection (run --curate)."""
    from engine.core.pipeline import build_stages, resolved
    from engine.io.writers import DatasetWriter

    paths = expand_shards(cfg.input.shards)
    if not paths:
        raise ConfigError("no input shards: pass --shards (tar, parquet or image folders)")
    for path in paths:
        shard_kind(path)
    build_stages(resolved(cfg))  # the same checks as one node's run (models found, options), before any work
    out = Path(cfg.runtime.out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(out / "manifest.json")
    DatasetWriter(out, manifest).settle([shard_name(p) for p in paths])
    skipped = [shard_name(p) for p in paths if shard_name(p) in manifest.finished]
    todo = [p for p in paths if shard_name(p) not in manifest.finished]
    result = lease_shards(cfg, "caption-selected" if selected else "caption", todo,
                          lambda shard, marker: manifest.record({shard: marker}))
    rejects_by_stage: Counter = Counter()
    for shard in result.committed:
        rejects_by_stage.update(_reject_stages(out / "rejects" / f"{shard}.parquet"))
    summary = RunSummary(
        shards_done=sorted(result.committed), shards_skipped=skipped,
        written=sum(m.get("written", 0) for m in result.committed.values()),
        rejected=sum(m.get("rejected", 0) for m in result.committed.values()),
        rejects_by_stage=dict(rejects_by_stage), wall_s=result.wall_s, interrupted=False, stages=result.stages,
    )
    write_json_atomic(out / "metrics.json", {
        "wall_s": round(summary.wall_s, 3), "images_per_s": round(summary.images_per_s, 2),
        "written": summary.written, "rejected": summary.rejected, "rejects_by_stage": summary.rejects_by_stage,
        "device": "ray", "stages": summary.stages, "cluster": result.figures(), "config": cfg.to_dict(),
    })
    return summary, result


def curate(cfg: RunConfig) -> tuple[dict[str, Any] | None, ClusterResult]:
    """Pass 1 on the cluster; the report is None when a shard failed (the global step needs
    every shard: a rerun retries the failed ones and then selects)."""
    from engine.core.pipeline import resolved
    from engine.curate.pass1 import open_store, select_from_store

    paths, store = open_store(resolved(cfg))
    todo = [p for p in paths if shard_name(p) not in store.finished]
    result = lease_shards(cfg, "curate", todo, lambda shard, marker: store.adopt({shard: marker}))
    write_json_atomic(store.root / "metrics.json", {"cluster": result.figures(), "stages": result.stages})
    if result.failed:
        return None, result
    return select_from_store(store, cfg, embed_s=result.wall_s), result


def format_cluster(result: ClusterResult) -> str:
    figures = result.figures()
    lines = [f"ray: {len(result.actors)} worker actors started on {len(figures['nodes'])} nodes, "
             f"{result.retries} retries, {len(result.failed)} failed shards"]
    for node, counts in figures["nodes"].items():
        lines.append(f"  node {node}: {counts['actors']} actors, {counts['shards']} shards, {counts['samples']} images, "
                     f"{counts['images_per_s'] or 0:.1f} images/s")
    for actor in figures["actors"]:
        rate = actor["images_per_busy_s"]
        lines.append(f"  actor {actor['actor']} ({actor['node'] or 'never started'}, pid {actor['pid']}): "
                     f"{actor['shards']} shards, {actor['samples']} images, "
                     f"{f'{rate:.1f} images/s busy' if rate else '-'}, {actor['state']}"
                     + (f" ({actor['reason']})" if actor.get("reason") else ""))
    for shard, reason in sorted(result.failed.items()):
        lines.append(f"  FAILED {shard}: {reason}")
    for late in result.late:
        lines.append(f"  late: {late}")
    if result.failed:
        lines.append("failed shards are not in the output; a rerun with the same --out retries them")
    return "\n".join(lines)


def _reject_stages(path: Path) -> Counter:
    import pyarrow.parquet as pq

    return Counter(pq.read_table(path, columns=["stage"]).column("stage").to_pylist())
