"""SemDeDup against a plain NumPy transcription of the reference rule (facebookresearch/SemDeDup)."""

import numpy as np
import pytest

from engine.curate.kmeans import cluster
from engine.curate.selection import select
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


@pytest.mark.parametrize("block", [3, 64, 4096])
def test_blocked_mask_equals_reference_on_planted_clusters(block):
    rng = np.random.default_rng(1)
    dim = 32
    clusters = [planted_cluster(unit(rng.standard_normal(dim)), size, rng, dim=dim)
                for size in (700, 300, 150, 40, 1)]
    total_dups = 0
    for x in clusters:
        expected = reference_duplicates(x, EPS)
        result = semdedup_keep_mask(x, EPS, block=block)
        np.testing.assert_array_equal(~result.keep, expected)
        dup = np.flatnonzero(~result.keep)
        # the named earlier member really is above the threshold and earlier
        assert np.all(result.nearest_earlier[dup] < dup)
        sims = np.einsum("ij,ij->i", x[dup], x[result.nearest_earlier[dup]])
        assert np.all(sims > 1 - EPS)
        total_dups += len(dup)
    assert 0 < total_dups < sum(map(len, clusters))


def test_select_keeps_reference_survivors_top_n(tmp_path):
    rng = np.random.default_rng(2)
    dim = 32
    centers = unit(rng.standard_normal((6, dim)))
    sizes = (1500, 800, 500, 400, 300, 100)  # several thousand points, the biggest > one block
    x = np.concatenate([planted_cluster(c, s, rng, dim=dim) for c, s in zip(centers, sizes)])
    x = x[rng.permutation(len(x))].astype(np.float16)
    clustering = cluster(x, 6, niter=10, points_per_centroid=200, chunk_rows=512)
    top_n = 20
    sel = select(x, clustering, eps=EPS, top_n=top_n, scratch=tmp_path / "scratch",
                 block=256, chunk_rows=512)
    assert not (tmp_path / "scratch").exists()
    assert np.bincount(clustering.assignment).max() > 256
    expected_kept = np.zeros(len(x), bool)
    expected_dup = np.zeros(len(x), bool)
    for c in range(6):
        members = np.flatnonzero(clustering.assignment == c)
        ordered = members[np.argsort(-clustering.similarity[members], kind="stable")]
        dups = reference_duplicates(x[ordered].astype(np.float32), EPS)
        expected_dup[ordered[dups]] = True
        expected_kept[ordered[~dups][:top_n]] = True
    np.testing.assert_array_equal(sel.duplicate_of >= 0, expected_dup)
    np.testing.assert_array_equal(sel.kept, expected_kept)
    assert expected_dup.sum() > 0
    assert sel.kept.sum() == 6 * top_n
    assert np.all(np.bincount(sel.cluster[sel.kept], minlength=6) <= top_n)


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
