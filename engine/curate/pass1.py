"""Pass 1 end to end: shards → embeddings (resumable per shard) → clusters → selection.

    OUT/curate/embeddings.zarr, index.parquet   the store (store.py)
    OUT/curate/selection.parquet                one row per embedded sample, kept or why not
    OUT/curate/report.json                      counts and the cluster-size histogram

Embedding is the per-image part and commits shard by shard; the global step (k-means,
SemDeDup, selection) runs once all shards are in, and is redone only if the store changed
since the last report (its row count is recorded there).
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from engine.core.config import RunConfig
from engine.core.driver import Executor, Pass, run_pass
from engine.core.figures import RunSummary
from engine.core.stage import Stage
from engine.curate.kmeans import Clustering, assign, default_k, fit_centroids
from engine.curate.selection import Selected, Selection, report, select, selection_table
from engine.curate.store import EmbeddingStore
from engine.io.manifest import write_json_atomic, write_parquet_atomic
from engine.stages import decode, embed, probe
from engine.stages.embed import EMBED_VIEW, embedder_model
from engine.stages.probe import ResolutionFilter
from models.errors import ConfigError

CURATE_DIR = "curate"


def curate_dir(cfg: RunConfig) -> Path:
    return PASS1.root(cfg)


def open_store(cfg: RunConfig, root: Path, *, worker: bool = False) -> EmbeddingStore:
    """The driver's store, or a worker's (engine/core/driver.py ``Pass``): it publishes its
    shards' parts and leaves the array and the manifest to the driver, which checked the model."""
    if worker:
        return EmbeddingStore(root, adopt=False)
    store = EmbeddingStore(root)
    # Embeddings of two models do not mix: a resumed store must keep the model it started with.
    _, identity = embedder_model(cfg)
    if store.manifest.setdefault("embed_model", identity) != identity:
        raise ConfigError(f"{root} holds embeddings of {store.manifest.properties['embed_model']}, not {identity}: "
                          f"use the same model to resume, or another --out")
    return store


def curate_stages(cfg: RunConfig) -> list[Stage]:
    """Pass 1's per-image stages: header probe, one decode at the embedder's view, embed."""
    return [probe.build(cfg), decode.build(cfg, (EMBED_VIEW,)), embed.build(cfg)]


PASS1 = Pass("curate", CURATE_DIR, open_store, curate_stages, ("embeddings.zarr", "index.parts"))


def run_curate(cfg: RunConfig, executor: Executor | None = None,
               select_rows: Callable[..., Selected] | None = None) -> tuple[RunSummary, dict[str, Any] | None]:
    """Run pass 1 into OUT/curate (in process, or on ``executor``): the embedding run's summary,
    and the report (None when a shard is left, interrupted or failed: the global step needs every
    shard). ``select_rows``: see :func:`select_from_store`."""
    summary = run_pass(cfg, PASS1, executor)
    if summary.shards_left:
        return summary, None
    return summary, select_from_store(EmbeddingStore(summary.root), cfg, embed_s=summary.wall_s,
                                      select_rows=select_rows or select_here)


def select_here(rows, centroids: np.ndarray, cfg: RunConfig, root: Path) -> Selected:
    """The step after the fit on this node: every row assigned, SemDeDup and top N per cluster."""
    assignment, similarity = assign(rows, centroids)
    selection = select(rows, Clustering(centroids, assignment, similarity), eps=cfg.curate.curate_eps,
                       top_n=cfg.curate.curate_top_n, keep=cfg.curate.curate_keep, scratch=root / "by_cluster.scratch")
    return Selected(selection, similarity)


def select_from_store(store: EmbeddingStore, cfg: RunConfig, *, embed_s: float = 0.0,
                      select_rows: Callable[..., Selected] = select_here) -> dict[str, Any]:
    """The global step; skipped when report.json already describes the store as it is.
    ``select_rows``: the step after the k-means fit, :func:`select_here` or partitioned by
    cluster on a Ray cluster (engine/cluster/curate_partitioned.py)."""
    import json

    report_path = store.root / "report.json"
    settings = {k: v for k, v in dataclasses.asdict(cfg.curate).items() if k != "curate"}
    if report_path.exists():
        previous = json.loads(report_path.read_text())
        if previous.get("rows") == store.rows and previous.get("settings") == settings:
            return previous
    index = store.consolidate()
    n_in = sum(entry["samples"] for _, entry in store.manifest.entries())
    rejects = store.rejects()
    rejected_by_stage = Counter(rejects.column("stage").to_pylist())
    n_filtered = rejected_by_stage.get(ResolutionFilter.name, 0)
    start = time.perf_counter()
    if store.rows:
        rows = store.embeddings()
        k = min(cfg.curate.curate_clusters or default_k(store.rows), store.rows)
        # the fit, on a seeded sample, always here: a partitioned step uses the same centroids
        centroids, iterations = fit_centroids(rows, k, niter=cfg.curate.kmeans_iterations,
                                              refine_iterations=cfg.curate.kmeans_refine_iterations,
                                              points_per_centroid=cfg.curate.kmeans_points_per_centroid)
        selected = select_rows(rows, centroids, cfg, store.root)
        selection = selected.selection
        write_parquet_atomic(selection_table(index, selection), store.root / "selection.parquet")
        result = report(selection, n_in=n_in, n_after_filter=n_in - n_filtered,
                        n_embedded=store.rows, eps=cfg.curate.curate_eps, k=k)
        # how well k-means fitted: mean cosine similarity of every row to its centroid
        result.update(kmeans_objective=round(float(selected.similarity.mean()), 6),
                      kmeans_iterations=iterations, **selected.figures)
    else:
        nothing = Selection.empty(cfg.curate.curate_top_n, cfg.curate.curate_keep)
        write_parquet_atomic(selection_table(index, nothing), store.root / "selection.parquet")
        result = report(nothing, n_in=n_in, n_after_filter=n_in - n_filtered, n_embedded=0,
                        eps=cfg.curate.curate_eps, k=0)
    result.update(rejected_by_stage=dict(rejected_by_stage), rows=store.rows, settings=settings, embed_s=round(embed_s, 3),
                  select_s=round(time.perf_counter() - start, 3))
    write_json_atomic(report_path, result)
    return result


def format_report(result: dict[str, Any], out: Path) -> str:
    partitioned = result.get("partitioned")
    return (
        f"curate: {result['n_in']} in, {result['n_after_resolution_filter']} after the resolution "
        f"filter, {result['n_embedded']} embedded, {result['n_after_dedup']} after SemDeDup "
        f"(eps {result['eps']}, keep {result['keep']}), {result['n_selected']} selected "
        f"(top {result['top_n']} of {result['clusters']} clusters)\n"
        + (f"partitioned by cluster: {partitioned['ranges']} ranges assigned in {partitioned['assign_s']:.1f}s, "
           f"{partitioned['partitions']} partitions de-duplicated and selected in {partitioned['dedup_select_s']:.1f}s, "
           f"tasks by node {partitioned['tasks_by_node']}\n" if partitioned else "")
        + f"curation: {out}/{CURATE_DIR}/selection.parquet  report: {out}/{CURATE_DIR}/report.json"
    )
