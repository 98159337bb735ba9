"""Spherical k-means: both backends recover planted clusters, streaming from zarr in chunks; the
seeding, the early stop and the split of emptied clusters do what they say."""

import numpy as np
import pytest
import torch
import zarr

from engine.curate.kmeans import afk_mc2_seeds, assign, cluster, default_k, lloyd, searcher


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


def test_streamed_assignment_ranks_within_the_search_precision_and_similarity_is_exact(planted):
    array, _, k = planted
    x = array[:].astype(np.float32)
    rng = np.random.default_rng(1)
    centroids = x[rng.choice(len(x), k, replace=False)]
    scores = x @ centroids.T
    for backend in ("faiss", "torch"):
        ids, sims = assign(array, centroids, backend=backend, chunk_rows=333)
        # the similarity is float32 whatever ranked the centroids
        np.testing.assert_allclose(sims, np.einsum("ij,ij->i", x, centroids[ids]), atol=1e-5)
        if searcher(backend).dtype == torch.float32:
            np.testing.assert_array_equal(ids, scores.argmax(axis=1))
            continue
        # bfloat16 ranks with an error of at most 2**-8 per dot product of unit vectors: the chosen
        # centroid is the best unless the best two are closer than that, and never worse by more
        top2 = np.sort(scores, axis=1)[:, -2:]
        clear = top2[:, 1] - top2[:, 0] > 2 * 2**-8
        np.testing.assert_array_equal(ids[clear], scores.argmax(axis=1)[clear])
        assert np.all(scores.max(axis=1) - sims <= 2 * 2**-8 + 1e-6)
        assert clear.mean() > 0.9


def test_lloyd_stops_once_no_assignment_changes(planted):
    array, truth, k = planted
    x = torch.from_numpy(array[:].astype(np.float32))
    search = searcher("faiss")
    start = torch.stack([x[torch.from_numpy(truth == c)][:5].mean(0) for c in range(k)])
    start = start / start.norm(dim=1, keepdim=True)
    centroids, ran = lloyd(x, start, iterations=50, search=search, generator=torch.Generator().manual_seed(0))
    assert 1 <= ran < 50
    again, ran_again = lloyd(x, centroids.clone(), iterations=50, search=search, generator=torch.Generator())
    assert ran_again == 1  # one pass finds nothing to move
    torch.testing.assert_close(again, centroids)


def test_an_emptied_cluster_takes_half_of_a_big_one(planted):
    array, truth, k = planted
    x = torch.from_numpy(array[:].astype(np.float32))
    search = searcher("faiss")
    centers = torch.stack([x[torch.from_numpy(truth == c)].mean(0) for c in range(k)])
    centers = centers / centers.norm(dim=1, keepdim=True)
    start = torch.cat([centers[:1], centers[:1], centers[1:]])  # two seeds on one spot: one stays empty
    centroids, _ = lloyd(x, start, iterations=20, search=search, generator=torch.Generator().manual_seed(0))
    search.load(centroids)
    ids = search.nearest(x)[0].numpy()
    assert np.bincount(ids, minlength=k + 1).min() > 0
    # every planted cluster still has a centroid of its own
    assert {int(np.bincount(truth[ids == c]).argmax()) for c in range(k + 1)} == set(range(k))


def test_afk_mc2_seeds_one_per_planted_cluster():
    # tight clusters: D²-sampling then lands in a cluster without a seed almost surely
    rng = np.random.default_rng(5)
    k, dim, n = 8, 48, 4000
    centers = rng.standard_normal((k, dim)).astype(np.float32)
    truth = rng.integers(0, k, n)
    x = centers[truth] / np.linalg.norm(centers[truth], axis=1, keepdims=True)
    x = torch.from_numpy((x + 0.03 * rng.standard_normal((n, dim)) / np.sqrt(dim)).astype(np.float32))
    x = x / x.norm(dim=1, keepdim=True)
    for seed in range(3):
        seeds = afk_mc2_seeds(x, k, search=searcher("faiss"), generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(seeds.norm(dim=1), torch.ones(k))
        rows = (x @ seeds.T).argmax(dim=0).numpy()  # each seed is one of the rows
        torch.testing.assert_close(x[rows], seeds)
        assert sorted(truth[rows]) == list(range(k))
    # a uniform draw of k rows almost never does (8! / 8**8 = 0.2%)
    uniform = rng.choice(n, (20, k))
    assert all(len(set(truth[draw])) < k for draw in uniform)


def test_without_faiss_the_torch_search_does_the_job(monkeypatch, planted):
    import sys

    from engine.curate.kmeans import pick_backend

    monkeypatch.setitem(sys.modules, "faiss", None)  # a GPU node with no FAISS installed
    assert pick_backend() == "torch"
    array, truth, k = planted
    result = cluster(array, k, niter=10, points_per_centroid=200, chunk_rows=700)
    assert len(np.unique(result.assignment)) == k
