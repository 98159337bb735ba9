"""SemDeDup inside one cluster (Abbas et al. 2023, facebookresearch/SemDeDup).

Members are sorted by cosine distance to their centroid, farthest first by default (the
reference's ``keep_hard``: the farthest member of a duplicate group survives; ``easy`` is the
reverse order). Member ``j`` is a duplicate when its largest cosine similarity to any *earlier*
member exceeds ``1 - eps``. Earlier members count whether or not they were themselves
duplicates: the reference takes the column maximum of the upper-triangular similarity matrix
over all earlier rows, so the rule is not transitive (the order changes the counts too), and we
follow it as written.

On a CPU with native bf16 (bf16.py) the similarities are screened with bfloat16 matmuls over
the lower triangle in strips of 256 rows (half the float32 work, at ~1.6x the speed), and every
member whose bf16 best could lie above ``1 - eps`` (within ``BF16_DOT_ERROR``) is settled in
float32 on the few earlier members that could be its best: verdicts and named duplicates are the
float32 ones. Other CPUs compute float32 in square blocks, upper triangle only (``block**2``
floats of scratch, never ``n**2``). On a GPU the fused Triton kernel (kernels/earlier_max.py)
keeps each tile in registers and needs O(n) memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np

from engine.curate.bf16 import BF16_DOT_ERROR, cpu_has_native_bf16

DEFAULT_BLOCK = 2048


@dataclass(frozen=True)
class DedupResult:
    keep: np.ndarray  # bool (n,): True for members that are not duplicates
    nearest_earlier: np.ndarray  # int64 (n,): for a duplicate, its most similar earlier member


BACKENDS = ("numpy", "bf16", "triton")


def semdedup_keep_mask(embeddings: np.ndarray, eps: float, *, block: int = DEFAULT_BLOCK,
                       backend: str = "numpy", device: str = "cpu") -> DedupResult:
    """Apply the SemDeDup rule to unit-norm ``embeddings`` already in keep order (selection.py).

    ``backend``: "numpy" (float32 blocks, CPU), "bf16" (bf16 screen settled in float32, CPU) or
    "triton" (fused kernel on ``device``).
    """
    threshold = 1.0 - eps
    if backend == "triton":
        best, best_at = _earlier_max_triton(embeddings, device)
    elif backend == "numpy":
        best, best_at = _earlier_max_blocked(embeddings, block)
    elif backend == "bf16":
        best, best_at = _earlier_max_bf16(embeddings, threshold)
    else:
        raise ValueError(f"unknown SemDeDup backend {backend!r}: {', '.join(BACKENDS)}")
    return DedupResult(keep=~(best > threshold), nearest_earlier=best_at)


def default_backend() -> tuple[str, str]:
    """(backend, device): the Triton kernel when torch sees a GPU and Triton imports; else bf16
    on a CPU with native bf16; else float32 NumPy."""
    try:
        import torch
    except ImportError:
        return "numpy", "cpu"
    if torch.cuda.is_available():
        try:
            import triton  # noqa: F401
        except ImportError:
            pass
        else:
            return "triton", "cuda"
    return ("bf16", "cpu") if cpu_has_native_bf16() else ("numpy", "cpu")


def _earlier_max_triton(embeddings: np.ndarray, device: str) -> tuple[np.ndarray, np.ndarray]:
    import torch

    from kernels.earlier_max import earlier_max

    if len(embeddings) == 0:
        return np.zeros(0, np.float32), np.zeros(0, np.int64)
    x = torch.from_numpy(np.ascontiguousarray(embeddings)).to(device).float()
    best, best_at = earlier_max(x)
    return best.cpu().numpy(), best_at.cpu().numpy()


@cache
def _upper_minus_inf(size: int) -> np.ndarray:
    """(size, size) float32: 0 strictly below the diagonal, -inf elsewhere (read-only, shared)."""
    mask = np.where(np.tri(size, k=-1, dtype=bool), np.float32(0), np.float32(-np.inf))
    mask.flags.writeable = False
    return mask


def _earlier_max_blocked(embeddings: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    n = len(embeddings)
    best = np.full(n, -np.inf, np.float32)
    best_at = np.full(n, -1, np.int64)
    # Diagonal blocks keep only i < j: -inf on the upper triangle, diagonal included, is added
    # (a plain vector add; a masked copy takes 3x longer). Its top-left corner serves every
    # smaller diagonal block too.
    upper = _upper_minus_inf(block)
    for j0 in range(0, n, block):
        j1 = min(n, j0 + block)
        later = np.asarray(embeddings[j0:j1], np.float32)
        for i0 in range(0, j1, block):
            i1 = min(j1, i0 + block)
            earlier = later if i0 == j0 else np.asarray(embeddings[i0:i1], np.float32)
            sims = later @ earlier.T  # (j, i): rows reduce along contiguous memory
            if i0 == j0:
                sims += upper[: j1 - j0, : j1 - j0]
            arg = sims.argmax(axis=1)
            top = sims[np.arange(j1 - j0), arg]
            better = top > best[j0:j1]
            best[j0:j1][better] = top[better]
            best_at[j0:j1][better] = arg[better] + i0
    return best, best_at


BF16_STRIP = 256  # rows per bf16 strip: against ~1,000 earlier rows, ~2x a float32 syrk's speed


def _earlier_max_bf16(embeddings: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(best, best_at) like :func:`_earlier_max_blocked`, exact (float32) wherever ``best`` could
    exceed ``threshold``; elsewhere ``best`` is the bf16 estimate, at most ``threshold``.

    Rows are zero-padded to whole strips, so every cluster's matmuls take the same few shapes:
    oneDNN compiles a kernel per new shape (~1.5 ms), which a cluster size each would pay.
    Only the matmul runs in torch: its reductions over bf16 took longer than the matmul's half.
    """
    import torch

    x = np.ascontiguousarray(embeddings, np.float32)
    n = len(x)
    best = np.full(n, -np.inf, np.float32)
    best_at = np.full(n, -1, np.int64)
    low = torch.zeros((-(-n // BF16_STRIP) * BF16_STRIP, x.shape[1]), dtype=torch.bfloat16)
    low[:n] = torch.from_numpy(x)
    upper = _upper_minus_inf(BF16_STRIP)
    for j0 in range(0, n, BF16_STRIP):
        j1 = j0 + BF16_STRIP
        sims = (low[j0:j1] @ low[:j1].T).float().numpy()  # (rows, earlier); columns >= the row masked
        sims[:, j0:] += upper
        sims = sims[:min(j1, n) - j0]  # the padding's rows
        at = sims.argmax(axis=1)
        approx = sims[np.arange(len(sims)), at]
        best[j0:j1], best_at[j0:j1] = approx, at
        rows = np.flatnonzero(approx > threshold - BF16_DOT_ERROR)
        if rows.size:
            # The true best is within twice the error of the bf16 best: settle those pairs in float32.
            r, i = np.nonzero(sims[rows] >= (approx[rows] - 2 * BF16_DOT_ERROR)[:, None])
            exact = np.einsum("ij,ij->i", x[rows[r] + j0], x[i])
            segments = np.flatnonzero(np.r_[True, r[1:] != r[:-1]])  # r is sorted, no row is without a pair
            top = np.maximum.reduceat(exact, segments)
            # ties: the earliest member, as argmax picks it (i ascends within a row)
            first = np.minimum.reduceat(np.where(exact == top[r], i, n), segments)
            best[rows + j0], best_at[rows + j0] = top, first
    best_at[:1] = -1  # the first member has no earlier one (its row is all -inf)
    return best, best_at
