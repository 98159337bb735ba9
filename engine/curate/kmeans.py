"""Spherical k-means with FAISS, fitted on a sample, assigning every row by streaming.

Embeddings are read in row chunks (a zarr array or anything row-sliceable), so memory does
not grow with N beyond a few bytes per row (the assignment and the similarity to it).
FAISS runs on the GPU when it sees one (faiss-gpu), on the CPU otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PAPER_IMAGES_PER_CLUSTER = 10_000  # paper §3.1: 50,000 clusters for ~500M images
DEFAULT_CHUNK_ROWS = 65_536


def default_k(n: int) -> int:
    """K that scales with N like the paper's (N / 10,000), at least 1 and at most N."""
    return max(1, min(n, round(n / PAPER_IMAGES_PER_CLUSTER)))


def use_gpu() -> bool:
    import faiss

    return hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0


@dataclass(frozen=True)
class Clustering:
    centroids: np.ndarray  # (K, D) float32, unit norm
    assignment: np.ndarray  # (N,) int32: nearest centroid per row
    similarity: np.ndarray  # (N,) float32: cosine similarity to that centroid


def iter_chunks(rows, chunk_rows: int = DEFAULT_CHUNK_ROWS):
    """(start, float32 block) over a row-sliceable array, one chunk in memory at a time."""
    n = rows.shape[0]
    for start in range(0, n, chunk_rows):
        yield start, np.asarray(rows[start:min(n, start + chunk_rows)], dtype=np.float32)


def sample_rows(rows, size: int, *, seed: int, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> np.ndarray:
    """A uniform random sample of ``size`` rows (float32), gathered chunk by chunk."""
    n = rows.shape[0]
    picked = np.sort(np.random.default_rng(seed).choice(n, size=min(size, n), replace=False))
    sample = np.empty((len(picked), rows.shape[1]), np.float32)  # filled in place: no 2x peak
    filled = 0
    for start in range(0, n, chunk_rows):
        stop = min(n, start + chunk_rows)
        lo, hi = np.searchsorted(picked, (start, stop))
        if hi > lo:
            sample[filled:filled + hi - lo] = np.asarray(rows[start:stop])[picked[lo:hi] - start]
            filled += hi - lo
    return sample


def fit_centroids(rows, k: int, *, niter: int = 20, points_per_centroid: int = 64, seed: int = 0,
                  gpu: bool | None = None, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> np.ndarray:
    """Spherical k-means on a sample of ``k * points_per_centroid`` rows; unit-norm centroids."""
    import faiss

    n, dim = rows.shape
    k = max(1, min(k, n))
    sample = sample_rows(rows, k * points_per_centroid, seed=seed, chunk_rows=chunk_rows)
    kmeans = faiss.Kmeans(
        dim, k, niter=niter, spherical=True, seed=seed, verbose=False,
        gpu=use_gpu() if gpu is None else gpu,
        max_points_per_centroid=max(points_per_centroid, 1) + 1,  # we sampled already
        min_points_per_centroid=1,
    )
    kmeans.train(sample)
    centroids = kmeans.centroids.astype(np.float32)
    return centroids / np.linalg.norm(centroids, axis=1, keepdims=True).clip(1e-12)


def assign(rows, centroids: np.ndarray, *, gpu: bool | None = None,
           chunk_rows: int = DEFAULT_CHUNK_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid by inner product (= cosine for unit vectors), streamed in chunks."""
    import faiss

    index = faiss.IndexFlatIP(centroids.shape[1])
    if use_gpu() if gpu is None else gpu:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(centroids)
    n = rows.shape[0]
    assignment = np.empty(n, np.int32)
    similarity = np.empty(n, np.float32)
    for start, block in iter_chunks(rows, chunk_rows):
        sims, ids = index.search(block, 1)
        assignment[start:start + len(block)] = ids[:, 0]
        similarity[start:start + len(block)] = sims[:, 0]
    return assignment, similarity


def cluster(rows, k: int, *, niter: int = 20, points_per_centroid: int = 64, seed: int = 0,
            gpu: bool | None = None, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Clustering:
    centroids = fit_centroids(rows, k, niter=niter, points_per_centroid=points_per_centroid,
                              seed=seed, gpu=gpu, chunk_rows=chunk_rows)
    assignment, similarity = assign(rows, centroids, gpu=gpu, chunk_rows=chunk_rows)
    return Clustering(centroids, assignment, similarity)
