"""Fused "largest similarity to any earlier row" for SemDeDup on the GPU (Triton).

For unit-norm rows ``x`` in SemDeDup's keep order (engine/curate/selection.py), SemDeDup
needs, for every j, ``max_{i<j} x_i · x_j`` and the i that attains it. Blocked matmuls would write each
similarity tile to GPU memory and read it back for the reduction; this kernel keeps the tile
in registers: one program per block of columns walks the earlier rows tile by tile, so
memory traffic is just the embeddings and the answer is O(n) memory for any cluster size.

Runs on CUDA tensors; with ``TRITON_INTERPRET=1`` the same kernel runs on CPU tensors (slowly),
which is how the tests check it against NumPy on machines without a GPU.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _earlier_max_kernel(x_ptr, best_ptr, arg_ptr, n, d, stride,
                        BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    cols = pid * BLOCK_J + tl.arange(0, BLOCK_J)
    best = tl.full((BLOCK_J,), float("-inf"), tl.float32)
    best_at = tl.full((BLOCK_J,), -1, tl.int32)
    last_row = tl.minimum((pid + 1) * BLOCK_J, n)  # rows at or past the block's last column can't be earlier
    for i0 in range(0, last_row, BLOCK_I):
        rows = i0 + tl.arange(0, BLOCK_I)
        sims = tl.zeros((BLOCK_I, BLOCK_J), tl.float32)
        for k0 in range(0, d, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(x_ptr + rows[:, None] * stride + ks[None, :],
                        mask=(rows[:, None] < n) & (ks[None, :] < d), other=0.0)
            b = tl.load(x_ptr + cols[None, :] * stride + ks[:, None],
                        mask=(cols[None, :] < n) & (ks[:, None] < d), other=0.0)
            sims += tl.dot(a, b)
        earlier = rows[:, None] < cols[None, :]
        sims = tl.where(earlier, sims, float("-inf"))
        tile_best = tl.max(sims, axis=0)
        tile_at = tl.argmax(sims, axis=0).to(tl.int32) + i0
        better = tile_best > best
        best = tl.where(better, tile_best, best)
        best_at = tl.where(better, tile_at, best_at)
    tl.store(best_ptr + cols, best, mask=cols < n)
    tl.store(arg_ptr + cols, best_at, mask=cols < n)


def earlier_max(x, *, block_i: int = 64, block_j: int = 64, block_k: int = 32):
    """``(best, best_at)`` for a contiguous float32 (n, d) torch tensor: best[j] = max_{i<j} x_i·x_j."""
    import torch

    n, d = x.shape
    x = x.contiguous().float()
    best = torch.empty(n, dtype=torch.float32, device=x.device)
    best_at = torch.empty(n, dtype=torch.int32, device=x.device)
    grid = (triton.cdiv(n, block_j),)
    _earlier_max_kernel[grid](x, best, best_at, n, d, x.stride(0),
                              BLOCK_I=block_i, BLOCK_J=block_j, BLOCK_K=block_k)
    return best, best_at.long()
