"""Spherical k-means with FAISS, fitted on a sample, assigning every row by streaming.

Embeddings are read in row chunks (a zarr array or anything row-sliceable), so memory does
not grow with N beyond a few bytes per row (the assignment and the similarity to it).
Backends: FAISS on the GPU when it sees one (faiss-gpu); plain torch matmuls on a GPU node
whose FAISS is the CPU build; FAISS on the CPU otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PAPER_IMAGES_PER_CLUSTER = 10_000  # paper §3.1: 50,000 clusters for ~500M images
DEFAULT_CHUNK_ROWS = 65_536


def default_k(n: int) -> int:
    """K that scales with N like the paper's (N / 10,000), at least 1 and at most N."""
    return max(1, min(n, round(n / PAPER_IMAGES_PER_CLUSTER)))


def pick_backend(backend: str = "auto") -> str:
    """"faiss-gpu" when FAISS sees a GPU, else "torch" when torch does (a GPU node with
    faiss-cpu), else "faiss" (CPU)."""
    if backend != "auto":
        if backend not in BACKENDS:
            raise ValueError(f"unknown k-means backend {backend!r}: {', '.join(BACKENDS)} or auto")
        return backend
    import faiss

    if hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0:
        return "faiss-gpu"
    try:
        import torch
    except ImportError:
        return "faiss"
    return "torch" if torch.cuda.is_available() else "faiss"


BACKENDS = ("faiss", "faiss-gpu", "torch")


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
                  backend: str = "auto", chunk_rows: int = DEFAULT_CHUNK_ROWS) -> np.ndarray:
    """Spherical k-means on a sample of ``k * points_per_centroid`` rows; unit-norm centroids."""
    n, dim = rows.shape
    k = max(1, min(k, n))
    sample = sample_rows(rows, k * points_per_centroid, seed=seed, chunk_rows=chunk_rows)
    backend = pick_backend(backend)
    if backend == "torch":
        centroids = _torch_fit(sample, k, niter=niter, seed=seed)
    else:
        import faiss

        kmeans = faiss.Kmeans(
            dim, k, niter=niter, spherical=True, seed=seed, verbose=False, gpu=backend == "faiss-gpu",
            max_points_per_centroid=max(points_per_centroid, 1) + 1,  # we sampled already
            min_points_per_centroid=1,
        )
        kmeans.train(sample)
        centroids = kmeans.centroids.astype(np.float32)
    return centroids / np.linalg.norm(centroids, axis=1, keepdims=True).clip(1e-12)


def assign(rows, centroids: np.ndarray, *, backend: str = "auto",
           chunk_rows: int = DEFAULT_CHUNK_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid by inner product (= cosine for unit vectors), streamed in chunks."""
    backend = pick_backend(backend)
    if backend == "torch":
        search = _torch_searcher(centroids)
    else:
        import faiss

        index = faiss.IndexFlatIP(centroids.shape[1])
        if backend == "faiss-gpu":
            index = faiss.index_cpu_to_all_gpus(index)
        index.add(centroids)

        def search(block):
            sims, ids = index.search(block, 1)
            return ids[:, 0], sims[:, 0]

    n = rows.shape[0]
    assignment = np.empty(n, np.int32)
    similarity = np.empty(n, np.float32)
    for start, block in iter_chunks(rows, chunk_rows):
        assignment[start:start + len(block)], similarity[start:start + len(block)] = search(block)
    return assignment, similarity


# --- torch backend: a GPU node whose FAISS is the CPU build ------------------------------

_TORCH_ROWS = 8192  # rows per matmul: bounds the (rows, K) similarity tile


def _torch_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _nearest(x, c):
    """(ids, sims) of the nearest centroid for each row of ``x``, tile by tile."""
    import torch

    ids, sims = [], []
    for start in range(0, len(x), _TORCH_ROWS):
        tile = x[start:start + _TORCH_ROWS] @ c.T
        best, at = tile.max(dim=1)
        ids.append(at)
        sims.append(best.float())
    return torch.cat(ids), torch.cat(sims)


def _torch_fit(sample: np.ndarray, k: int, *, niter: int, seed: int) -> np.ndarray:
    """Lloyd iterations on the unit sphere; empty clusters restart from random points."""
    import torch

    device = _torch_device()
    dtype = torch.float16 if device == "cuda" else torch.float32  # tensor cores on a GPU
    generator = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(sample).to(device)
    n = len(x)
    c = x[torch.randperm(n, generator=generator)[:k].to(device)].clone()
    xd = x.to(dtype)
    for _ in range(niter):
        ids, _ = _nearest(xd, c.to(dtype))
        sums = torch.zeros_like(c).index_add_(0, ids, x)
        counts = torch.bincount(ids, minlength=k)
        empty = (counts == 0).nonzero().flatten()
        if len(empty):
            sums[empty] = x[torch.randint(0, n, (len(empty),), generator=generator).to(device)]
        c = sums / sums.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return c.float().cpu().numpy()


def _torch_searcher(centroids: np.ndarray):
    import torch

    device = _torch_device()
    dtype = torch.float16 if device == "cuda" else torch.float32
    c = torch.from_numpy(centroids).to(device, dtype)

    def search(block: np.ndarray):
        ids, sims = _nearest(torch.from_numpy(block).to(device, dtype), c)
        return ids.cpu().numpy().astype(np.int32), sims.cpu().numpy()

    return search


def cluster(rows, k: int, *, niter: int = 20, points_per_centroid: int = 64, seed: int = 0,
            backend: str = "auto", chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Clustering:
    backend = pick_backend(backend)
    centroids = fit_centroids(rows, k, niter=niter, points_per_centroid=points_per_centroid,
                              seed=seed, backend=backend, chunk_rows=chunk_rows)
    assignment, similarity = assign(rows, centroids, backend=backend, chunk_rows=chunk_rows)
    return Clustering(centroids, assignment, similarity)
