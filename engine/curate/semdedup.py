"""SemDeDup inside one cluster (Abbas et al. 2023, facebookresearch/SemDeDup).

Members are sorted by cosine distance to their centroid, farthest first by default (the
reference's ``keep_hard``: the farthest member of a duplicate group survives; ``easy`` is the
reverse order). Member ``j`` is a duplicate when its largest cosine similarity to any *earlier*
member exceeds ``1 - eps``. Earlier members count whether or not they were themselves
duplicates: the reference takes the column maximum of the upper-triangular similarity matrix
over all earlier rows, so the rule is not transitive (the order changes the counts too), and we
follow it as written.

On the CPU the similarity matrix is computed in square blocks, upper triangle only, so a
cluster of any size needs ``block**2`` floats of scratch, never ``n**2``. On a GPU the fused
Triton kernel (kernels/earlier_max.py) keeps each tile in registers and needs O(n) memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_BLOCK = 2048


@dataclass(frozen=True)
class DedupResult:
    keep: np.ndarray  # bool (n,): True for members that are not duplicates
    nearest_earlier: np.ndarray  # int64 (n,): most similar earlier member, -1 for the first
    max_similarity: np.ndarray  # float32 (n,): its cosine similarity (-inf for the first)


def semdedup_keep_mask(embeddings: np.ndarray, eps: float, *, block: int = DEFAULT_BLOCK,
                       backend: str = "numpy", device: str = "cpu") -> DedupResult:
    """Apply the SemDeDup rule to unit-norm ``embeddings`` already in keep order (selection.py).

    ``backend``: "numpy" (blocked, CPU) or "triton" (fused kernel on ``device``).
    """
    if backend == "triton":
        best, best_at = _earlier_max_triton(embeddings, device)
    elif backend == "numpy":
        best, best_at = _earlier_max_blocked(embeddings, block)
    else:
        raise ValueError(f"unknown SemDeDup backend {backend!r}: numpy or triton")
    keep = ~(best > 1.0 - eps)
    return DedupResult(keep=keep, nearest_earlier=best_at, max_similarity=best)


def default_backend() -> tuple[str, str]:
    """(backend, device): the Triton kernel when torch sees a GPU and Triton imports."""
    try:
        import torch
        import triton  # noqa: F401
    except ImportError:
        return "numpy", "cpu"
    return ("triton", "cuda") if torch.cuda.is_available() else ("numpy", "cpu")


def _earlier_max_triton(embeddings: np.ndarray, device: str) -> tuple[np.ndarray, np.ndarray]:
    import torch

    from kernels.earlier_max import earlier_max

    if len(embeddings) == 0:
        return np.zeros(0, np.float32), np.zeros(0, np.int64)
    x = torch.from_numpy(np.ascontiguousarray(embeddings)).to(device).float()
    best, best_at = earlier_max(x)
    return best.cpu().numpy(), best_at.cpu().numpy()


def _earlier_max_blocked(embeddings: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    n = len(embeddings)
    best = np.full(n, -np.inf, np.float32)
    best_at = np.full(n, -1, np.int64)
    # Diagonal blocks keep only i < j: mask the upper triangle, diagonal included. The top-left
    # corner of this mask serves every smaller diagonal block too.
    upper = ~np.tri(max(1, min(block, n)), k=-1, dtype=bool)
    for j0 in range(0, n, block):
        j1 = min(n, j0 + block)
        later = np.asarray(embeddings[j0:j1], np.float32)
        for i0 in range(0, j1, block):
            i1 = min(j1, i0 + block)
            earlier = later if i0 == j0 else np.asarray(embeddings[i0:i1], np.float32)
            sims = later @ earlier.T  # (j, i): rows reduce along contiguous memory
            if i0 == j0:
                np.copyto(sims, -np.inf, where=upper[: j1 - j0, : j1 - j0])
            arg = sims.argmax(axis=1)
            top = sims[np.arange(j1 - j0), arg]
            better = top > best[j0:j1]
            best[j0:j1][better] = top[better]
            best_at[j0:j1][better] = arg[better] + i0
    return best, best_at
