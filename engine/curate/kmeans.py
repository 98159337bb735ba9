"""Spherical k-means fitted on a sample, every row assigned by streaming.

Embeddings are read in row chunks (a zarr array or anything row-sliceable), so memory does
not grow with N beyond a few bytes per row (the assignment and the similarity to it) and the
fit sample, kept in the store's 2-byte dtype (1.5 GB for 4,000 centroids x 256 points x 768).

The fit: AFK-MC² seeding (Bachem et al. 2016, a Markov-chain approximation of k-means++ that
FAISS also offers), then Lloyd iterations coarse to fine: on a random quarter of the sample
until no assignment changes (FAISS stops when the objective stops changing), then
``refine_iterations`` on all of it. An emptied cluster takes half of a big one, as FAISS's
``split_clusters`` does. On `python -m bench curate` (1M x 768 into 1,000) the seeding costs half
a second and lifts the objective by 1% over FAISS's default random start on the same sample.

The nearest-centroid search is the backend: torch matmuls (float16 on a GPU, bfloat16 on a CPU
with native bf16 dot products, else float32), or a FAISS flat index (CPU or all GPUs). A
low-precision matmul only ranks the centroids; the similarity to the chosen one is recomputed in
float32, so distances (and with them SemDeDup's keep order) are exact.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from engine.curate.bf16 import cpu_has_native_bf16

PAPER_IMAGES_PER_CLUSTER = 10_000  # paper §3.1: 50,000 clusters for ~500M images
# Rows read per chunk: 16,384 x 768 float16 is 24 MB, under glibc's largest mmap threshold
# (32 MB), so each chunk's memory comes back from the heap instead of fresh pages whose faults
# cost more than the conversion on a loaded machine.
DEFAULT_CHUNK_ROWS = 16_384
COARSE_FRACTION = 4  # the coarse iterations see one point in four of the sample
AFK_MC2_CHAIN = 50  # Markov chain length per seed (the paper's and FAISS's default)
BACKENDS = ("torch", "faiss", "faiss-gpu")
_TILE_ROWS = 8192  # rows per matmul: bounds the (rows, K) similarity tile


def default_k(n: int) -> int:
    """K that scales with N like the paper's (N / 10,000), at least 1 and at most N."""
    return max(1, min(n, round(n / PAPER_IMAGES_PER_CLUSTER)))


def pick_backend(backend: str = "auto") -> str:
    """"faiss-gpu" when FAISS sees a GPU; "torch" when torch does (a GPU node with faiss-cpu or
    none), the CPU has native bf16, or FAISS is not installed; else "faiss" (its float32 search
    beats torch's by ~15%)."""
    if backend != "auto":
        if backend not in BACKENDS:
            raise ValueError(f"unknown k-means backend {backend!r}: {', '.join(BACKENDS)} or auto")
        return backend
    import torch

    try:
        import faiss
    except ImportError:  # a GPU node may come without FAISS: torch alone does the job
        return "torch"
    if hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0:
        return "faiss-gpu"
    return "torch" if torch.cuda.is_available() or cpu_has_native_bf16() else "faiss"


@dataclass(frozen=True)
class Clustering:
    centroids: np.ndarray  # (K, D) float32, unit norm
    assignment: np.ndarray  # (N,) int32: nearest centroid per row
    similarity: np.ndarray  # (N,) float32: cosine similarity to that centroid
    iterations: int = 0  # Lloyd iterations the fit ran (coarse and refining)


def as_float32(block: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``block`` as float32, into ``out`` when given. The store is float16, and NumPy converts
    it at ~4 ns a value where torch's vectorised copy on one thread takes a tenth of that. One
    thread: torch's OpenMP workers, left spinning between calls, slow the BLAS and FAISS calls
    around them (measured: a 1000-row conversion next to a matmul took 100x longer on 2 threads).
    """
    if block.dtype == np.float32 and out is None:
        return block
    import torch

    out = np.empty(block.shape, np.float32) if out is None else out
    with one_torch_thread():
        torch.from_numpy(out).copy_(torch.from_numpy(np.ascontiguousarray(block)))
    return out


@contextmanager
def one_torch_thread():
    """torch's CPU ops on one thread meanwhile (see :func:`as_float32` for why)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def sample_rows(rows, size: int, *, seed: int, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> np.ndarray:
    """A uniform random sample of ``size`` rows (in row order, the store's dtype: a float16 sample
    is half the memory), gathered chunk by chunk."""
    n = rows.shape[0]
    picked = np.sort(np.random.default_rng(seed).choice(n, size=min(size, n), replace=False))
    sample = np.empty((len(picked), rows.shape[1]), rows.dtype)  # filled in place: no 2x peak
    filled = 0
    for start in range(0, n, chunk_rows):
        stop = min(n, start + chunk_rows)
        lo, hi = np.searchsorted(picked, (start, stop))
        if hi > lo:
            sample[filled:filled + hi - lo] = np.asarray(rows[start:stop])[picked[lo:hi] - start]
            filled += hi - lo
    return sample


# --- nearest-centroid search: the backends ------------------------------------------------


class TorchSearch:
    """Nearest centroid by torch matmuls in ``dtype``, similarity to it in float32."""

    def __init__(self, device: str):
        import torch

        self.device = device
        if device == "cuda":
            self.dtype = torch.float16  # tensor cores
        else:
            self.dtype = torch.bfloat16 if cpu_has_native_bf16() else torch.float32

    def load(self, centroids) -> None:
        import torch

        self.exact = centroids.to(self.device, torch.float32)
        self.low = self.exact.to(self.dtype)

    def nearest(self, block, *, similarity: bool = False):
        """(ids, float32 similarities or None) for the rows of ``block`` (on ``self.device``)."""
        import torch

        ids, sims = [], []
        for _, tile in _tiles(block):
            exact = tile.float() if similarity else None
            low = exact.to(self.dtype) if exact is not None else tile.to(self.dtype)  # fp32->bf16 is the cheap cast
            at = (low @ self.low.T).max(dim=1).indices  # max, not argmax: one pass, and 3x faster on CPU
            ids.append(at)
            if similarity:
                sims.append((exact * self.exact[at]).sum(dim=1))
        return torch.cat(ids), (torch.cat(sims) if similarity else None)


class FaissSearch:
    """Nearest centroid by a FAISS flat inner-product index, on the CPU or on every GPU."""

    def __init__(self, gpu: bool):
        import torch

        self.device, self.dtype, self.gpu = "cpu", torch.float32, gpu

    def load(self, centroids) -> None:
        import faiss

        index = faiss.IndexFlatIP(centroids.shape[1])
        if self.gpu:
            index = faiss.index_cpu_to_all_gpus(index)
        index.add(np.ascontiguousarray(centroids.cpu().numpy(), np.float32))
        self.index = index

    def nearest(self, block, *, similarity: bool = False):
        import torch

        found = [self.index.search(as_float32(tile.numpy()), 1) for _, tile in _tiles(block)]  # bounded float32 copies
        ids = torch.from_numpy(np.concatenate([at[:, 0] for _, at in found]))
        return ids, (torch.from_numpy(np.concatenate([sims[:, 0] for sims, _ in found])) if similarity else None)


def searcher(backend: str) -> TorchSearch | FaissSearch:
    backend = pick_backend(backend)
    if backend == "torch":
        import torch

        return TorchSearch("cuda" if torch.cuda.is_available() else "cpu")
    return FaissSearch(gpu=backend == "faiss-gpu")


# --- the fit --------------------------------------------------------------------------------


def fit_centroids(rows, k: int, *, niter: int = 20, refine_iterations: int = 1, points_per_centroid: int = 256,
                  seed: int = 0, backend: str = "auto",
                  chunk_rows: int = DEFAULT_CHUNK_ROWS) -> tuple[np.ndarray, int]:
    """(unit-norm centroids, Lloyd iterations run): k-means on a sample of
    ``k * points_per_centroid`` rows.

    At most ``niter`` iterations: up to ``niter - refine_iterations`` on a random quarter of the
    sample, then ``refine_iterations`` on all of it (all on the whole sample when a quarter would
    hold fewer than k points, or ``refine_iterations`` is 0).
    """
    import torch

    n = rows.shape[0]
    k = max(1, min(k, n))
    search = searcher(backend)
    # Kept 2 bytes a value: the search's dtype when it is one (cast once), else the store's.
    sample = torch.from_numpy(sample_rows(rows, k * points_per_centroid, seed=seed, chunk_rows=chunk_rows))
    keep_as = search.dtype if search.dtype.itemsize == 2 else sample.dtype
    generator = torch.Generator().manual_seed(seed)
    coarse_size = len(sample) // COARSE_FRACTION
    if 0 < refine_iterations < niter and coarse_size >= k:
        picked = torch.randperm(len(sample), generator=generator)[:coarse_size].sort().values
        coarse = sample[picked].to(search.device, keep_as)
        stages = [(coarse, niter - refine_iterations), (sample.to(search.device), refine_iterations)]
    else:
        coarse = sample.to(search.device, keep_as)
        stages = [(coarse, niter)]
    centroids = afk_mc2_seeds(coarse, k, search=search, generator=generator)
    ran = 0
    for x, iterations in stages:
        centroids, done = lloyd(x, centroids, iterations=iterations, search=search, generator=generator)
        ran += done
    return centroids.cpu().numpy(), ran


def _tiles(x):
    for start in range(0, len(x), _TILE_ROWS):
        yield start, x[start:start + _TILE_ROWS]


def _unit(c):
    return c / c.norm(dim=1, keepdim=True).clamp_min(1e-12)


def lloyd(x, centroids, *, iterations: int, search, generator):
    """(centroids, iterations run): spherical Lloyd iterations on ``x`` from ``centroids``
    (float32, unit), stopping early once no assignment changes."""
    import torch

    previous = None
    for done in range(iterations):
        search.load(centroids)
        ids = search.nearest(x)[0].to(x.device)
        if previous is not None and torch.equal(ids, previous):
            return centroids, done
        previous = ids
        sums = torch.zeros_like(centroids)
        for start, tile in _tiles(x):
            sums.index_add_(0, ids[start:start + len(tile)], tile.float())
        centroids = split_empty(_unit(sums), torch.bincount(ids, minlength=len(centroids)), generator)
    return centroids, iterations


SPLIT_EPS = 1 / 1024  # FAISS's relative perturbation when an empty cluster takes half of another


def split_empty(centroids, counts, generator):
    """Each empty cluster takes a copy of a big one (chosen with probability ~ its size - 1), and
    the two copies are pushed apart, so the next assignment divides that cluster between them."""
    import torch

    empty = (counts == 0).nonzero().flatten().tolist()
    if not empty:
        return centroids
    counts = counts.double().cpu()
    sign = torch.ones(centroids.shape[1], device=centroids.device)
    sign[1::2] = -1
    for e in empty:
        weights = (counts - 1).clamp_min(0)
        j = int(torch.multinomial(weights if weights.sum() > 0 else (counts > 0).double(), 1, generator=generator))
        centroids[e] = centroids[j] * (1 + SPLIT_EPS * sign)
        centroids[j] = centroids[j] * (1 - SPLIT_EPS * sign)
        counts[e] = counts[j] / 2
        counts[j] -= counts[e]
    return _unit(centroids)


def afk_mc2_seeds(x, k: int, *, search, generator, chain: int = AFK_MC2_CHAIN, block: int = 64):
    """k seeds (float32, unit) from the rows of ``x`` by AFK-MC²: each seed is the end of a
    Metropolis-Hastings chain that approximates k-means++'s D²-sampling, with proposals drawn
    from q(x) = D²(x, first seed) / 2 sum + 1 / 2n.

    Every chain's proposals are drawn up front, so their distances to the seeds chosen before a
    block of ``block`` chains are one matmul; only those to seeds chosen inside the block are not.
    """
    import torch

    n = len(x)

    def sq_dist(points, seeds):  # (P, S) squared distances of unit vectors: 2 - 2 cos
        return (2 - 2 * (points.to(search.dtype) @ seeds.to(x.device, search.dtype).T).float()).clamp_min(0)

    first = int(torch.randint(n, (1,), generator=generator))
    if k == 1:
        return _unit(x[first:first + 1].float())
    to_first = torch.cat([sq_dist(tile, x[first:first + 1]) for _, tile in _tiles(x)])[:, 0].cpu().double()
    q = 0.5 * to_first / to_first.sum().clamp_min(1e-12) + 0.5 / n
    proposals = torch.multinomial(q, (k - 1) * chain, replacement=True, generator=generator).view(k - 1, chain)
    uniform = torch.rand(k - 1, chain, generator=generator).tolist()
    chosen = [first]
    for b0 in range(0, k - 1, block):
        b1 = min(k - 1, b0 + block)
        candidates = x[proposals[b0:b1].flatten().to(x.device)]
        seeds = x[torch.tensor(chosen, device=x.device)]
        before = sq_dist(candidates, seeds).min(dim=1).values.view(b1 - b0, chain).cpu()
        for i in range(b0, b1):
            d2 = before[i - b0]
            if i > b0:  # seeds chosen earlier in this block
                inside = x[torch.tensor(chosen[-(i - b0):], device=x.device)]
                d2 = torch.minimum(d2, sq_dist(candidates[(i - b0) * chain:(i - b0 + 1) * chain], inside).min(dim=1).values.cpu())
            # accept y over the current x with probability min(1, (d2(y)/q(y)) / (d2(x)/q(x)))
            ratio = (d2.double() / q[proposals[i]]).tolist()
            current = 0
            for j in range(1, chain):
                if ratio[j] > uniform[i][j] * ratio[current]:
                    current = j
            chosen.append(int(proposals[i, current]))
    return _unit(x[torch.tensor(chosen, device=x.device)].float())


# --- assignment -----------------------------------------------------------------------------


def assign(rows, centroids: np.ndarray, *, backend: str = "auto",
           chunk_rows: int = DEFAULT_CHUNK_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid by inner product (= cosine for unit vectors) and the float32 similarity
    to it, streamed in chunks."""
    import torch

    search = searcher(backend)
    search.load(torch.from_numpy(np.ascontiguousarray(centroids, np.float32)))
    n = rows.shape[0]
    assignment = np.empty(n, np.int32)
    similarity = np.empty(n, np.float32)
    for start in range(0, n, chunk_rows):
        block = torch.from_numpy(np.asarray(rows[start:min(n, start + chunk_rows)])).to(search.device)
        ids, sims = search.nearest(block, similarity=True)
        assignment[start:start + len(block)] = ids.cpu().numpy()
        similarity[start:start + len(block)] = sims.cpu().numpy()
    return assignment, similarity


def cluster(rows, k: int, *, niter: int = 20, refine_iterations: int = 1, points_per_centroid: int = 256,
            seed: int = 0, backend: str = "auto", chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Clustering:
    centroids, iterations = fit_centroids(rows, k, niter=niter, refine_iterations=refine_iterations,
                                          points_per_centroid=points_per_centroid, seed=seed, backend=backend,
                                          chunk_rows=chunk_rows)
    assignment, similarity = assign(rows, centroids, backend=backend, chunk_rows=chunk_rows)
    return Clustering(centroids, assignment, similarity, iterations)
