"""SemDeDup inside one cluster (Abbas et al. 2023, facebookresearch/SemDeDup).

Members are sorted by cosine distance to their centroid, closest first. Member ``j`` is a
duplicate when its largest cosine similarity to any *earlier* member exceeds ``1 - eps``.
Earlier members count whether or not they were themselves duplicates: the reference takes the
column maximum of the upper-triangular similarity matrix over all earlier rows, so the rule is
not transitive, and we follow it as written.

The similarity matrix is computed in square blocks, upper triangle only, so a cluster of any
size needs ``block**2`` floats of scratch, never ``n**2``.
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


def semdedup_keep_mask(embeddings: np.ndarray, eps: float, *, block: int = DEFAULT_BLOCK) -> DedupResult:
    """Apply the SemDeDup rule to unit-norm ``embeddings`` already sorted closest-first."""
    n = len(embeddings)
    best = np.full(n, -np.inf, np.float32)
    best_at = np.full(n, -1, np.int64)
    # Diagonal blocks keep only i < j: mask the upper triangle, diagonal included. The top-left
    # corner of this mask serves every smaller diagonal block too.
    upper = ~np.tri(min(block, n), k=-1, dtype=bool)
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
    keep = ~(best > 1.0 - eps)
    return DedupResult(keep=keep, nearest_earlier=best_at, max_similarity=best)
