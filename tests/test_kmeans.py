"""Spherical k-means: both backends recover planted clusters, streaming from zarr in chunks."""

import numpy as np
import pytest
import torch
import zarr

from engine.curate.kmeans import assign, cluster, default_k, sample_rows


def test_default_k_scales_like_the_paper():
    assert default_k(500_000_000) == 50_000
    assert default_k(25_000) == 2
    assert default_k(30) == 1
    assert default_k(1) == 1


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    rng = np.random.default_rng(0)
    k, dim, n = 8, 48, 6000
    centers = rng.standard_normal((k, dim)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    truth = rng.integers(0, k, n)
    x = centers[truth] + 0.6 * rng.standard_normal((n, dim)).astype(np.float32) / np.sqrt(dim)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    array = zarr.create_array(tmp_path_factory.mktemp("z") / "e.zarr", shape=x.shape, chunks=(500, dim),
                              dtype="float16")
    array[:] = x.astype(np.float16)
    return array, truth, k


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_backends_recover_planted_clusters(planted, backend):
    torch.set_num_threads(1)
    array, truth, k = planted
    # twice the planted K: random starts then never have to merge two planted clusters
    result = cluster(array, 2 * k, niter=15, points_per_centroid=200, backend=backend, chunk_rows=700)
    assert result.centroids.shape == (2 * k, array.shape[1])
    np.testing.assert_allclose(np.linalg.norm(result.centroids, axis=1), 1.0, atol=1e-5)
    # each found cluster lies (almost) inside one planted cluster, and every planted one is found
    found = [truth[result.assignment == c] for c in range(2 * k)]
    purity = sum(np.bincount(f).max(initial=0) for f in found) / len(truth)
    assert purity > 0.98
    assert {int(np.bincount(f).argmax()) for f in found if len(f)} == set(range(k))
    x = array[:].astype(np.float32)
    np.testing.assert_allclose(result.similarity, np.einsum("ij,ij->i", x, result.centroids[result.assignment]),
                               atol=1e-4)


def test_streamed_assignment_equals_in_memory_argmax(planted):
    array, _, k = planted
    x = array[:].astype(np.float32)
    rng = np.random.default_rng(1)
    centroids = x[rng.choice(len(x), k, replace=False)]
    for backend in ("faiss", "torch"):
        ids, sims = assign(array, centroids, backend=backend, chunk_rows=333)
        scores = x @ centroids.T
        np.testing.assert_array_equal(ids, scores.argmax(axis=1))
        np.testing.assert_allclose(sims, scores.max(axis=1), atol=1e-4)


def test_sample_rows_is_uniform_without_repeats(planted):
    array, _, _ = planted
    sample = sample_rows(array, 1000, seed=3, chunk_rows=512)
    assert sample.shape == (1000, array.shape[1])
    assert len(np.unique(sample, axis=0)) == 1000
