"""SemDeDup in every cluster, then the top N survivors closest to each centroid.

Embeddings stream from the store twice: once to assign clusters (kmeans.py), once to write
them into a scratch file grouped by cluster (one positioned write per cluster per chunk).
Clusters are then read back one by one, so memory holds one cluster (or one read batch) and a
few bytes per row, never the whole array; the scratch file lives in the page cache or on disk.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine.curate.kmeans import DEFAULT_CHUNK_ROWS, Clustering, as_float32
from engine.curate.semdedup import DEFAULT_BLOCK, default_backend, semdedup_keep_mask

READ_BATCH_BYTES = 32 << 20  # small clusters are read from the scratch file together


@dataclass(frozen=True)
class Selection:
    """Per row of the store, in row order."""

    cluster: np.ndarray  # int32
    distance: np.ndarray  # float32: cosine distance to the centroid
    rank: np.ndarray  # int32: position in the cluster, closest first
    duplicate_of: np.ndarray  # int64: row of the earlier member (keep order) it duplicates, -1 if none
    kept: np.ndarray  # bool: selected for pass 2
    top_n: int
    keep: str = "hard"  # the SemDeDup keep order (keep_order)

    @property
    def n(self) -> int:
        return len(self.cluster)

    @classmethod
    def empty(cls, top_n: int, keep: str = "hard") -> Selection:
        nothing = np.zeros(0, np.int64)
        return cls(nothing.astype(np.int32), nothing.astype(np.float32), nothing.astype(np.int32),
                   nothing, nothing.astype(bool), top_n, keep)

    def beyond_top_n(self) -> np.ndarray:
        return ~self.kept & (self.duplicate_of < 0)


@dataclass(frozen=True)
class Selected:
    """What the step after the k-means fit returns, on one node (pass1.py) or partitioned by
    cluster on a Ray cluster (partitioned.py)."""

    selection: Selection
    similarity: np.ndarray  # float32 (N,): cosine similarity of each row to its centroid
    figures: dict[str, Any] = field(default_factory=dict)  # how a partitioned step ran, for report.json


KEEP_ORDERS = ("hard", "easy")


def keep_order(distance: np.ndarray, keep: str) -> np.ndarray:
    """The order SemDeDup walks a cluster in, as the reference's ``rank_within_cluster`` sorts it.

    "hard": cosine distance to the centroid descending, ties in row order (Python's stable
    ``sorted(reverse=True)``), so the farthest member of a duplicate group survives; "easy": that
    order reversed (the reference's ``which_to_keep: easy``).
    """
    if keep not in KEEP_ORDERS:
        raise ValueError(f"unknown SemDeDup keep order {keep!r}: hard or easy")
    hard = np.argsort(-distance, kind="stable")
    return hard if keep == "hard" else hard[::-1]


def select(rows, clustering: Clustering, *, eps: float = 0.4, top_n: int = 20, keep: str = "hard",
           scratch: Path, block: int = DEFAULT_BLOCK, chunk_rows: int = DEFAULT_CHUNK_ROWS,
           backend: tuple[str, str] | None = None) -> Selection:
    """``keep``: see :func:`keep_order`. ``backend``: (name, device) for
    :func:`semdedup_keep_mask`; default: GPU kernel if any."""
    backend_name, device = backend or default_backend()
    n, dim = rows.shape
    k = len(clustering.centroids)
    # Rows grouped by cluster (stable: row order inside a cluster), then in keep order per cluster.
    by_cluster = np.argsort(clustering.assignment, kind="stable")
    sizes = np.bincount(clustering.assignment, minlength=k)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    write_grouped(rows, clustering.assignment, by_cluster, scratch, chunk_rows)

    distance = 1.0 - clustering.similarity
    rank = np.empty(n, np.int32)
    duplicate_of = np.full(n, -1, np.int64)
    kept = np.zeros(n, bool)
    # The scratch file holds each cluster in row order (written a chunk at a time); SemDeDup walks
    # it in keep order: ``in_keep_order[p]`` is the scratch row at keep-order position ``p``.
    in_keep_order = np.arange(n)
    for c in np.flatnonzero(sizes > 1):
        lo, hi = starts[c], starts[c + 1]
        in_keep_order[lo:hi] = lo + keep_order(distance[by_cluster[lo:hi]], keep)
    ordered_rows = by_cluster[in_keep_order]
    row_bytes = dim * 2
    # Buffers reused for every batch: fresh pages cost more than the copies. A batch is reordered
    # and converted to float32 in one call, not a cluster at a time: torch's conversion threads and
    # OpenBLAS's take turns, and each turn cost ~0.6 ms.
    batch_rows = max(READ_BATCH_BYTES // row_bytes, int(sizes.max(initial=0)))
    batch_buffer = np.empty((batch_rows, dim), np.float16)
    vectors_buffer = np.empty((batch_rows, dim), np.float32)
    fd = os.open(scratch, os.O_RDONLY)
    try:
        for first, last in _read_batches(sizes, row_bytes):
            lo, hi = starts[first], starts[last]
            batch = batch_buffer[:hi - lo]
            if os.preadv(fd, [memoryview(batch).cast("B")], int(lo) * row_bytes) != batch.nbytes:
                raise OSError(f"{scratch} is shorter than written")
            vectors = as_float32(batch[in_keep_order[lo:hi] - lo], vectors_buffer[:hi - lo])
            for c in range(first, last):
                ordered = ordered_rows[starts[c]:starts[c + 1]]
                if not len(ordered):
                    continue
                result = semdedup_keep_mask(vectors[starts[c] - lo:starts[c + 1] - lo], eps, block=block,
                                            backend=backend_name, device=device)
                closest_first = ordered if keep == "easy" else ordered[::-1]
                rank[closest_first] = np.arange(len(ordered))
                dup = ~result.keep
                duplicate_of[ordered[dup]] = ordered[result.nearest_earlier[dup]]
                survivors = ordered[result.keep]
                # the paper's top N: the survivors closest to the centroid, whatever the keep order
                kept[(survivors if keep == "easy" else survivors[::-1])[:top_n]] = True
    finally:
        os.close(fd)
        scratch.unlink(missing_ok=True)
    return Selection(cluster=clustering.assignment, distance=distance, rank=rank,
                     duplicate_of=duplicate_of, kept=kept, top_n=top_n, keep=keep)


def write_grouped(rows, assignment, by_cluster, scratch: Path, chunk_rows: int) -> None:
    """Copy rows into ``scratch`` (raw float16) in cluster order: one pwrite per (chunk, cluster).
    Also the shuffle of a partitioned curation (partitioned.py)."""
    n, dim = rows.shape
    destination = np.empty(n, np.int64)
    destination[by_cluster] = np.arange(n)
    row_bytes = dim * 2
    fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, n * row_bytes)
        for start in range(0, n, chunk_rows):
            block = np.asarray(rows[start:min(n, start + chunk_rows)], dtype=np.float16)
            order = np.argsort(assignment[start:start + len(block)], kind="stable")
            block = np.ascontiguousarray(block[order])
            dest = destination[start:start + len(block)][order]
            # Within a chunk a cluster's rows are consecutive in the scratch file too.
            breaks = np.flatnonzero(np.diff(dest) != 1) + 1
            for lo, hi in zip(np.concatenate([[0], breaks]), np.concatenate([breaks, [len(block)]])):
                os.pwrite(fd, block[lo:hi].data, int(dest[lo]) * row_bytes)
    finally:
        os.close(fd)


def _read_batches(sizes: np.ndarray, row_bytes: int):
    """Consecutive cluster ranges [first, last) of about READ_BATCH_BYTES (one cluster at least)."""
    first, total = 0, 0
    for c, size in enumerate(sizes):
        if total and (total + size) * row_bytes > READ_BATCH_BYTES:
            yield first, c
            first, total = c, 0
        total += int(size)
    if first < len(sizes):
        yield first, len(sizes)


def reasons(selection: Selection, keys: np.ndarray) -> list[str]:
    """Why each row was dropped ("" for kept rows), naming the earlier duplicate's key."""
    out = [""] * selection.n
    for row in np.flatnonzero(selection.duplicate_of >= 0):
        out[row] = f"duplicate of {keys[selection.duplicate_of[row]]}"
    for row in np.flatnonzero(selection.beyond_top_n()):
        out[row] = f"beyond top {selection.top_n} of cluster {selection.cluster[row]}"
    return out


def selection_table(index, selection: Selection):
    """``selection.parquet``: the index's identity columns plus the curation verdict per row."""
    import pyarrow as pa

    rows = index.column("row").to_numpy()
    if not np.array_equal(rows, np.arange(len(rows))) or len(rows) != selection.n:
        raise ValueError("index rows do not match the embedding store; rerun curate")
    keys = index.column("key").to_numpy(zero_copy_only=False)
    return pa.table({
        "key": index.column("key"),
        "shard": index.column("shard"),
        "path": index.column("path"),
        "member": index.column("member"),
        "offset": index.column("offset"),
        "size": index.column("size"),
        "cluster": pa.array(selection.cluster, pa.int32()),
        "distance": pa.array(selection.distance, pa.float32()),
        "rank": pa.array(selection.rank, pa.int32()),
        "kept": pa.array(selection.kept),
        "reason": pa.array(reasons(selection, keys), pa.string()),
    })


def report(selection: Selection, *, n_in: int, n_after_filter: int, n_embedded: int, eps: float,
           k: int) -> dict[str, Any]:
    sizes = np.bincount(selection.cluster, minlength=k)
    edges = [0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000]
    edges = [e for e in edges if e <= max(1, sizes.max(initial=0))] + [int(sizes.max(initial=0)) + 1]
    counts, _ = np.histogram(sizes, bins=edges)
    n_dups = int((selection.duplicate_of >= 0).sum())
    return {
        "n_in": n_in,
        "n_after_resolution_filter": n_after_filter,
        "n_embedded": n_embedded,  # after the filter, less images that failed to decode
        "n_after_dedup": n_embedded - n_dups,
        "n_selected": int(selection.kept.sum()),
        "duplicate_rate": round(n_dups / n_embedded, 6) if n_embedded else 0.0,
        "eps": eps,
        "keep": selection.keep,
        "top_n": selection.top_n,
        "clusters": k,
        "empty_clusters": int((sizes == 0).sum()),
        "cluster_size_histogram": [
            {"min": int(lo), "max": int(hi) - 1, "clusters": int(c)}
            for lo, hi, c in zip(edges[:-1], edges[1:], counts)
        ],
    }
