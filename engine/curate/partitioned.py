"""The step after the k-means fit, partitioned by cluster: many workers assign ranges of store
rows, the rows are shuffled by cluster through the output storage, and each partition of
clusters is de-duplicated and selected on its own. Plain Python (no Ray import): the tasks run
wherever ``run_all`` sends them (engine/cluster/curate_partitioned.py: Ray tasks), or here.

    OUT/curate/partitioned/centroids.npy            the fit (made on the driver, seeded)
    OUT/curate/partitioned/ranges/<lo>.rows.npy     store rows [lo, hi) assigned, sorted by cluster
                                                    (stable): row, cluster, similarity
    OUT/curate/partitioned/ranges/<lo>.vectors.f16  their float16 embeddings in that order (raw)
    OUT/curate/partitioned/selected/<p>.npy         partition p's verdicts per row

A partition is a run of consecutive clusters, so each range holds a partition's rows as one
slice (its offsets are the assign task's answer) and a partition reads only its slices. The
folder is removed once the driver has gathered the verdicts (and at the start of the next try).

Equal to :func:`engine.curate.pass1.select_here` key for key: ranges are whole chunks of
``chunk_rows``, so every row is assigned in the same matmul block as on one node (the nearest
centroid and its similarity do not depend on the thread count, measured); inside a partition a
cluster's rows come in store row order (ranges in order, each sorted stably), which is the
order :func:`engine.curate.selection.select` sees them in on one node, so keep-order ties and
SemDeDup's order are the same; and each partition runs that same ``select``. The equality needs
the same nearest-centroid backend (kmeans.py ``pick_backend``) on the workers as on one node: a
GPU's float16 ranking and a CPU's bfloat16 one can differ on near ties.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.curate.kmeans import DEFAULT_CHUNK_ROWS, Clustering, assign
from engine.curate.selection import Selected, Selection, select, write_grouped

WORK_DIR = "partitioned"
RANGES_PER_WORKER = 4  # several tasks per worker: a slow or retried one holds up less of the step
PARTITIONS_PER_WORKER = 4
PARTITION_BYTES = 256 << 20  # embeddings per partition at most (when there are enough clusters)
ROW_DTYPE = np.dtype([("row", "<i8"), ("cluster", "<i4"), ("similarity", "<f4")])
VERDICT_DTYPE = np.dtype([("row", "<i8"), ("cluster", "<i4"), ("similarity", "<f4"), ("rank", "<i4"),
                          ("duplicate_of", "<i8"), ("kept", "?")])

# ``run_all(fn, calls)``: fn(*args) for every args in calls, anywhere, the answers in order
RunAll = Callable[[Callable[..., Any], list[tuple]], list[Any]]


@dataclass(frozen=True)
class Plan:
    ranges: list[tuple[int, int]]  # store rows [lo, hi) per assign task, whole chunks but the last
    bounds: np.ndarray  # (P + 1,) int64: partition p holds clusters [bounds[p], bounds[p + 1])

    @property
    def partitions(self) -> int:
        return len(self.bounds) - 1


def plan(n: int, k: int, dim: int, workers: int, *, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Plan:
    """About RANGES_PER_WORKER ranges of whole chunks per worker; partitions of equal cluster
    counts, PARTITIONS_PER_WORKER per worker or more when a partition's rows would exceed
    PARTITION_BYTES on average, never more than k."""
    chunks = -(-n // chunk_rows)
    step = -(-chunks // (RANGES_PER_WORKER * max(1, workers))) * chunk_rows
    ranges = [(lo, min(n, lo + step)) for lo in range(0, n, step)]
    partitions = max(1, min(k, max(PARTITIONS_PER_WORKER * max(1, workers), -(-n * dim * 2 // PARTITION_BYTES))))
    return Plan(ranges, np.array([p * k // partitions for p in range(partitions + 1)], np.int64))


def select_partitioned(store_root: Path, rows, centroids: np.ndarray, *, eps: float, top_n: int, keep: str,
                       workers: int, run_all: RunAll, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Selected:
    """Assign, shuffle by cluster, de-duplicate and select with ``run_all``'s workers; gather
    the verdicts here. ``rows``: the store's committed rows (what the workers read by path)."""
    n, dim = rows.shape
    work = store_root / WORK_DIR
    shutil.rmtree(work, ignore_errors=True)  # a killed try's leftovers
    (work / "ranges").mkdir(parents=True)
    (work / "selected").mkdir()
    np.save(work / "centroids.npy", np.ascontiguousarray(centroids, np.float32))
    layout = plan(n, len(centroids), dim, workers, chunk_rows=chunk_rows)
    started = time.perf_counter()
    offsets = run_all(assign_range, [(str(store_root), n, lo, hi, layout.bounds, chunk_rows) for lo, hi in layout.ranges])
    assigned = time.perf_counter()
    run_all(select_partition, [
        (str(store_root), p, layout.bounds, [(lo, hi, int(at[p]), int(at[p + 1]))
                                             for (lo, hi), at in zip(layout.ranges, offsets) if at[p + 1] > at[p]],
         dim, eps, top_n, keep)
        for p in range(layout.partitions)])
    selected = time.perf_counter()
    result = gather(work, n, layout.partitions, top_n=top_n, keep=keep)
    shutil.rmtree(work)
    return Selected(result.selection, result.similarity, {"partitioned": {
        "ranges": len(layout.ranges), "partitions": layout.partitions, "workers": workers,
        "assign_s": round(assigned - started, 3), "dedup_select_s": round(selected - assigned, 3),
        "gather_s": round(time.perf_counter() - selected, 3)}})


def open_rows(store_root: Path, n: int):
    """The store's first ``n`` rows, read-only, from any node."""
    import zarr

    from engine.curate.store import CommittedRows

    return CommittedRows(zarr.open_array(store_root / "embeddings.zarr", mode="r"), n)


class RowRange:
    """Rows [lo, hi) of a row-sliceable array, itself row-sliceable from 0."""

    def __init__(self, rows, lo: int, hi: int):
        self.rows, self.lo, self.hi = rows, lo, hi

    @property
    def shape(self) -> tuple[int, int]:
        return (self.hi - self.lo, self.rows.shape[1])

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, _ = rows.indices(self.hi - self.lo)
        return np.asarray(self.rows[self.lo + start:self.lo + stop])


def assign_range(store_root: str, n: int, lo: int, hi: int, bounds: np.ndarray, chunk_rows: int) -> np.ndarray:
    """One assign task: store rows [lo, hi) assigned to their nearest centroids and published
    sorted by cluster (stable); returns where each partition's rows start in them (P + 1)."""
    work = Path(store_root) / WORK_DIR
    rows = RowRange(open_rows(Path(store_root), n), lo, hi)
    assignment, similarity = assign(rows, np.load(work / "centroids.npy"), chunk_rows=chunk_rows)
    by_cluster = np.argsort(assignment, kind="stable")
    table = np.empty(hi - lo, ROW_DTYPE)
    table["row"], table["cluster"], table["similarity"] = lo + by_cluster, assignment[by_cluster], similarity[by_cluster]
    vectors_path, rows_path = _range_files(work, lo)
    vectors_tmp = _temporary(vectors_path)
    write_grouped(rows, assignment, by_cluster, vectors_tmp, chunk_rows)
    os.replace(vectors_tmp, vectors_path)  # a retried task rewrites the same bytes
    _save_atomic(rows_path, table)
    return np.searchsorted(table["cluster"], bounds)


class Slices:
    """Row-sliceable concatenation of row slices of several arrays (a partition's rows, range by range)."""

    def __init__(self, parts: list[np.ndarray]):
        self.parts = parts
        self.starts = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.starts[-1]), self.parts[0].shape[1])

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, _ = rows.indices(int(self.starts[-1]))
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        pieces = []
        for i in range(first, len(self.parts)):
            if self.starts[i] >= stop:
                break
            pieces.append(self.parts[i][max(0, start - self.starts[i]):stop - self.starts[i]])
        return np.concatenate(pieces) if pieces else np.empty((0, self.shape[1]), self.parts[0].dtype)


def select_partition(store_root: str, p: int, bounds: np.ndarray, pieces: list[tuple[int, int, int, int]],
                     dim: int, eps: float, top_n: int, keep: str) -> int:
    """One select task: partition ``p``'s rows (slices [a, b) of the ranges starting at ``lo``),
    SemDeDup and top N per cluster by :func:`engine.curate.selection.select`; publishes the
    verdicts and returns how many rows they cover."""
    work = Path(store_root) / WORK_DIR
    c0, c1 = int(bounds[p]), int(bounds[p + 1])
    tables, vectors = [np.empty(0, ROW_DTYPE)], []
    for lo, hi, a, b in pieces:
        vectors_path, rows_path = _range_files(work, lo)
        tables.append(np.load(rows_path, mmap_mode="r")[a:b])
        vectors.append(np.memmap(vectors_path, np.float16, mode="r", shape=(hi - lo, dim))[a:b])
    table = np.concatenate(tables)
    verdicts = np.empty(len(table), VERDICT_DTYPE)
    verdicts["row"], verdicts["cluster"], verdicts["similarity"] = table["row"], table["cluster"], table["similarity"]
    if len(table):
        clustering = Clustering(np.load(work / "centroids.npy", mmap_mode="r")[c0:c1], table["cluster"] - c0,
                                table["similarity"])
        with tempfile.TemporaryDirectory(prefix="densefusion-partition-") as scratch:  # the node's own disk
            selection = select(Slices(vectors), clustering, eps=eps, top_n=top_n, keep=keep,
                               scratch=Path(scratch) / "by_cluster.scratch")
        duplicate = selection.duplicate_of >= 0
        verdicts["rank"], verdicts["kept"] = selection.rank, selection.kept
        verdicts["duplicate_of"] = -1
        verdicts["duplicate_of"][duplicate] = table["row"][selection.duplicate_of[duplicate]]
    _save_atomic(work / "selected" / f"{p}.npy", verdicts)
    return len(table)


def gather(work: Path, n: int, partitions: int, *, top_n: int, keep: str) -> Selected:
    """Every partition's verdicts, back in store row order."""
    cluster, similarity = np.empty(n, np.int32), np.empty(n, np.float32)
    rank, duplicate_of, kept = np.empty(n, np.int32), np.empty(n, np.int64), np.empty(n, bool)
    covered = 0
    for p in range(partitions):
        verdicts = np.load(work / "selected" / f"{p}.npy")
        at = verdicts["row"]
        cluster[at], similarity[at], rank[at] = verdicts["cluster"], verdicts["similarity"], verdicts["rank"]
        duplicate_of[at], kept[at] = verdicts["duplicate_of"], verdicts["kept"]
        covered += len(verdicts)
    if covered != n:
        raise RuntimeError(f"the partitions cover {covered} of {n} rows; rerun curate")
    return Selected(Selection(cluster=cluster, distance=1.0 - similarity, rank=rank, duplicate_of=duplicate_of,
                              kept=kept, top_n=top_n, keep=keep), similarity)


def _range_files(work: Path, lo: int) -> tuple[Path, Path]:
    return work / "ranges" / f"{lo:012d}.vectors.f16", work / "ranges" / f"{lo:012d}.rows.npy"


def _temporary(path: Path) -> Path:
    return path.with_name(f"{path.name}.{os.getpid()}.tmp")


def _save_atomic(path: Path, array: np.ndarray) -> None:
    tmp = _temporary(path)
    with open(tmp, "wb") as handle:
        np.save(handle, array)
    os.replace(tmp, path)
