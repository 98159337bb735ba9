"""Curation partitioned by cluster (engine/curate/partitioned.py), its tasks run in this process:
the verdicts equal one node's for every row, ties and duplicates included. The same on the
loopback Ray cluster: tests/test_cluster.py."""

from __future__ import annotations

import numpy as np
import zarr

from engine.curate.kmeans import Clustering, assign, fit_centroids
from engine.curate.partitioned import WORK_DIR, plan, select_partitioned
from engine.curate.selection import select
from engine.curate.store import CommittedRows

CHUNK = 256


def here(fn, calls):
    return [fn(*args) for args in calls]


def planted(n: int, k: int, dim: int, seed: int) -> np.ndarray:
    """Unit float16 rows around k centres; a fifth are near copies of others and a few exact
    copies (equal distances to the centroid: keep-order ties), spread over the whole store."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, dim)).astype(np.float32)
    x = centres[rng.integers(0, k, n)] + 0.6 * rng.standard_normal((n, dim)).astype(np.float32)
    near = rng.random(n) < 0.2
    x[near] = x[rng.integers(0, n, near.sum())] + 0.02 * rng.standard_normal((near.sum(), dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x = x.astype(np.float16)
    copies = rng.choice(n, 40, replace=False)
    x[copies[20:]] = x[copies[:20]]
    return x


def test_partitioned_verdicts_equal_one_node_for_every_row(tmp_path):
    n, k, dim = 3000, 12, 32
    array = zarr.create_array(tmp_path / "embeddings.zarr", shape=(n, dim), chunks=(CHUNK, dim), dtype="float16")
    array[:] = planted(n, k, dim, seed=3)
    rows = CommittedRows(zarr.open_array(tmp_path / "embeddings.zarr", mode="r"), n)
    centroids, _ = fit_centroids(rows, k, niter=8, points_per_centroid=100, chunk_rows=CHUNK)
    assignment, similarity = assign(rows, centroids, chunk_rows=CHUNK)
    one_node = select(rows, Clustering(centroids, assignment, similarity), eps=0.1, top_n=15, keep="hard",
                      scratch=tmp_path / "scratch", chunk_rows=CHUNK)

    layout = plan(n, k, dim, workers=2, chunk_rows=CHUNK)
    assert len(layout.ranges) > 1 and layout.partitions > 1  # rows shuffled between several of each
    assert all(lo % CHUNK == 0 for lo, _ in layout.ranges)
    got = select_partitioned(tmp_path, rows, centroids, eps=0.1, top_n=15, keep="hard", workers=2, run_all=here,
                             chunk_rows=CHUNK)

    assert (one_node.duplicate_of >= 0).sum() > 20 and one_node.beyond_top_n().sum() > 20  # both steps decide
    np.testing.assert_array_equal(got.similarity, similarity)
    for field in ("cluster", "distance", "rank", "duplicate_of", "kept"):
        np.testing.assert_array_equal(getattr(got.selection, field), getattr(one_node, field), err_msg=field)
    figures = got.figures["partitioned"]
    assert (figures["ranges"], figures["partitions"]) == (len(layout.ranges), layout.partitions)
    assert not (tmp_path / WORK_DIR).exists()
