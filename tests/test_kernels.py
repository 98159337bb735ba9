"""The Triton kernels, run by Triton's interpreter on CPU tensors (the same kernel code a GPU runs)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

CHECK = """
import numpy as np, torch
from kernels.earlier_max import earlier_max
rng = np.random.default_rng(0)
for n, d in ((1, 8), (70, 40), (150, 64)):
    x = rng.normal(size=(n, d)).astype(np.float32)
    x[5 % n] = x[2 % n] * 1.0  # an exact duplicate pair
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    best, at = earlier_max(torch.from_numpy(x), block_i=32, block_j=32, block_k=16)
    sims = x @ x.T
    sims[np.tril_indices(n)] = -np.inf  # keep i < j only
    want = sims.max(axis=0)
    assert np.isneginf(best[0].item()) and at[0].item() == -1
    assert np.allclose(best.numpy()[1:], want[1:], atol=1e-4), (n, d)
    assert (sims[at.numpy()[1:], np.arange(1, n)] >= want[1:] - 1e-4).all()
print("ok")
"""


def test_earlier_max_kernel_matches_numpy_under_the_triton_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}  # must be set before triton is imported
    result = subprocess.run([sys.executable, "-c", CHECK], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "ok"
