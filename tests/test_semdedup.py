"""SemDeDup against a plain NumPy transcription of the reference rule (facebookresearch/SemDeDup)."""

import numpy as np
import pytest

from engine.curate.kmeans import cluster
from engine.curate.selection import keep_order, select
from engine.curate.semdedup import semdedup_keep_mask

EPS = 0.4


def reference_duplicates(x: np.ndarray, eps: float) -> np.ndarray:
    """The reference: full similarity matrix, zero diagonal, upper triangle, column max > 1 - eps."""
    sims = x.astype(np.float64) @ x.T.astype(np.float64)
    np.fill_diagonal(sims, 0.0)
    column_max = np.triu(sims, k=1).max(axis=0)
    return column_max > 1 - eps


def unit(v):
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def with_similarity(base: np.ndarray, cos: float, rng) -> np.ndarray:
    """A unit vector whose cosine similarity to unit ``base`` is exactly ``cos``."""
    noise = rng.standard_normal(base.shape)
    orth = unit(noise - (noise @ base) * base)
    return cos * base + np.sqrt(1 - cos**2) * orth


def planted_cluster(center, size, rng, *, spread=0.35, dim=32):
    """Random members around ``center``, plus planted near-duplicates above and below 1 - eps."""
    members = [unit(center + spread * rng.standard_normal(dim)) for _ in range(max(1, size // 2))]
    planted = []
    for base in members[: size // 4]:
        planted.append(with_similarity(base, 1 - EPS + 0.05, rng))  # a duplicate of its base
        planted.append(with_similarity(base, 1 - EPS - 0.05, rng))  # not one (of its base)
    x = np.array(members + planted, np.float32)[:size]
    return x[np.argsort(-(x @ center), kind="stable")]  # closest to the centroid first


def test_non_transitive_rule_is_followed():
    # a, b, c on a circle, 45.6 degrees apart: a~b and b~c are above 1 - eps, a~c is not.
    theta = np.arccos(0.7)
    x = np.array([[np.cos(t * theta), np.sin(t * theta), 0.0] for t in range(3)], np.float32)
    assert x[0] @ x[2] < 1 - EPS < x[0] @ x[1]
    result = semdedup_keep_mask(x, EPS, block=2)
    # c is a duplicate of b although b itself was dropped: the reference rule, as written.
    assert result.keep.tolist() == [True, False, False]
    assert result.nearest_earlier.tolist() == [-1, 0, 1]
    np.testing.assert_array_equal(~result.keep, reference_duplicates(x, EPS))


@pytest.mark.parametrize(("backend", "block"), [("numpy", 3), ("numpy", 64), ("numpy", 4096), ("bf16", None)])
def test_mask_equals_reference_on_planted_clusters(backend, block):
    rng = np.random.default_rng(1)
    dim = 32
    clusters = [planted_cluster(unit(rng.standard_normal(dim)), size, rng, dim=dim)
                for size in (700, 300, 257, 150, 40, 1)]
    total_dups = 0
    for x in clusters:
        expected = reference_duplicates(x, EPS)
        result = semdedup_keep_mask(x, EPS, backend=backend, **({"block": block} if block else {}))
        np.testing.assert_array_equal(~result.keep, expected)
        dup = np.flatnonzero(~result.keep)
        # the named earlier member really is above the threshold and earlier
        assert np.all(result.nearest_earlier[dup] < dup)
        sims = np.einsum("ij,ij->i", x[dup], x[result.nearest_earlier[dup]])
        assert np.all(sims > 1 - EPS)
        total_dups += len(dup)
    assert 0 < total_dups < sum(map(len, clusters))


@pytest.mark.parametrize("backend", ["numpy", "bf16"])
def test_pairs_inside_bf16_error_of_the_threshold_get_the_float32_verdict(backend):
    # bf16 cannot tell 1 - eps +- 1e-4 apart (its dot products are off by up to BF16_DOT_ERROR):
    # the screen must leave these to float32, which can.
    rng = np.random.default_rng(3)
    dim = 64
    bases = [unit(rng.standard_normal(dim)) for _ in range(40)]
    x = []
    for base in bases:
        x += [base, with_similarity(base, 1 - EPS + 1e-4, rng), with_similarity(base, 1 - EPS - 1e-4, rng)]
    x = np.array(x, np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    expected = reference_duplicates(x, EPS)
    result = semdedup_keep_mask(x, EPS, backend=backend)
    np.testing.assert_array_equal(~result.keep, expected)
    assert 30 < expected.sum() < 80  # the +1e-4 copies (and some -1e-4 ones close to another copy)
    dup = np.flatnonzero(expected)
    sims = x @ x.T
    np.testing.assert_array_equal(result.nearest_earlier[dup],
                                  [np.argmax(np.where(np.arange(len(x)) < j, sims[j], -np.inf)) for j in dup])


def reference_cluster_verdict(x: np.ndarray, distance: np.ndarray, eps: float, which_to_keep: str,
                              top_n: int) -> tuple[np.ndarray, np.ndarray]:
    """A port of the reference for one cluster: (removed as duplicates, kept after top N), by row.

    ``rank_within_cluster`` sorts the members by cosine distance to the centroid with
    ``sorted(..., reverse=keep_hard)`` (keep_hard=True: farthest first); ``which_to_keep: easy``
    reverses that list. Then the triu/column-max rule on the sorted members, and the paper's top
    N: the survivors closest to the centroid (the easy order).
    """
    hard = [i for i, _ in sorted(enumerate(distance.tolist()), key=lambda item: item[1], reverse=True)]
    order = np.array(hard if which_to_keep == "hard" else hard[::-1], np.int64)
    removed = np.zeros(len(x), bool)
    removed[order] = reference_duplicates(x[order], eps)
    closest_first = np.array(hard[::-1], np.int64)
    kept = np.zeros(len(x), bool)
    kept[closest_first[~removed[closest_first]][:top_n]] = True
    return removed, kept


def chain_where_order_matters() -> tuple[np.ndarray, np.ndarray]:
    """Three members a, b, c with a~b, b~c above 1 - eps, a~c below; b is the closest to the
    centroid, c the farthest. Farthest first (c, a, b): c and a survive, b goes. Closest first
    (b, a, c): b survives, a and c go. One survivor vs two."""
    theta = np.arccos(0.7)
    centroid = np.array([0.0, 0.0, 1.0])
    x = unit(np.array([[np.cos(t * theta), np.sin(t * theta), height] for t, height in ((0, 0.9), (1, 1.0), (2, 0.8))]))
    x = x.astype(np.float32)
    return x, (1.0 - x @ centroid).astype(np.float32)


@pytest.mark.parametrize("keep", ["hard", "easy"])
def test_keep_order_follows_the_reference_where_it_changes_the_outcome(keep):
    x, distance = chain_where_order_matters()
    order = keep_order(distance, keep)
    result = semdedup_keep_mask(x[order], EPS)
    removed = np.zeros(3, bool)
    removed[order] = ~result.keep
    expected, _ = reference_cluster_verdict(x, distance, EPS, keep, top_n=20)
    np.testing.assert_array_equal(removed, expected)
    # the hand-worked verdict: hard keeps the farthest (c) and a; easy keeps only b
    assert removed.tolist() == ([False, True, False] if keep == "hard" else [True, False, True])


def test_select_keeps_reference_survivors_top_n(tmp_path):
    rng = np.random.default_rng(2)
    dim = 32
    centers = unit(rng.standard_normal((6, dim)))
    sizes = (1500, 800, 500, 400, 300, 100)  # several thousand points, the biggest > one block
    x = np.concatenate([planted_cluster(c, s, rng, dim=dim) for c, s in zip(centers, sizes)])
    x = x[rng.permutation(len(x))].astype(np.float16)
    clustering = cluster(x, 6, niter=10, points_per_centroid=200, chunk_rows=512)
    assert np.bincount(clustering.assignment).max() > 256
    top_n = 20
    verdicts = {}
    for keep in ("hard", "easy"):
        sel = select(x, clustering, eps=EPS, top_n=top_n, keep=keep, scratch=tmp_path / "scratch",
                     block=256, chunk_rows=512)
        assert not (tmp_path / "scratch").exists()
        expected_kept = np.zeros(len(x), bool)
        expected_dup = np.zeros(len(x), bool)
        for c in range(6):
            members = np.flatnonzero(clustering.assignment == c)
            removed, kept = reference_cluster_verdict(x[members].astype(np.float32), 1.0 - clustering.similarity[members],
                                                      EPS, keep, top_n)
            expected_dup[members[removed]] = True
            expected_kept[members[kept]] = True
        np.testing.assert_array_equal(sel.duplicate_of >= 0, expected_dup)
        np.testing.assert_array_equal(sel.kept, expected_kept)
        assert sel.keep == keep
        assert expected_dup.sum() > 0
        assert sel.kept.sum() == 6 * top_n
        # the named earlier duplicate comes before in keep order: farther from the centroid for hard
        dup = np.flatnonzero(sel.duplicate_of >= 0)
        earlier, later = sel.distance[sel.duplicate_of[dup]], sel.distance[dup]
        assert np.all(earlier >= later) if keep == "hard" else np.all(earlier <= later)
        verdicts[keep] = sel
    # on this data the order changes who survives, and how many
    assert not np.array_equal(verdicts["hard"].duplicate_of >= 0, verdicts["easy"].duplicate_of >= 0)
    assert (verdicts["hard"].duplicate_of >= 0).sum() != (verdicts["easy"].duplicate_of >= 0).sum()


TRITON_CHECK = """
import numpy as np
from engine.curate.semdedup import semdedup_keep_mask
from tests.test_semdedup import EPS, planted_cluster, reference_duplicates, unit
rng = np.random.default_rng(4)
x = planted_cluster(unit(rng.standard_normal(16)), 150, rng, dim=16)
result = semdedup_keep_mask(x, EPS, backend="triton", device="cpu")
assert np.array_equal(~result.keep, reference_duplicates(x, EPS)) and (~result.keep).any()
print("ok")
"""


def test_triton_backend_equals_reference_under_the_interpreter():
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1"}  # must be set before triton is imported
    done = subprocess.run([sys.executable, "-c", TRITON_CHECK], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "ok"
