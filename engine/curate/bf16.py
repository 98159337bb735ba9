"""bfloat16 matmuls on the CPU: where they pay, and how far their dot products can be off.

k-means ranks centroids and SemDeDup screens pairs with bf16 matmuls, then settle in float32
whatever the bound below leaves open, so their results are the float32 ones.
"""

from __future__ import annotations

from functools import cache

# |bf16 dot - exact dot| for vectors of norm <= 1.001: each input rounded to 8 significant bits
# (relative error u = 2**-8, so a product is off by at most 2u), the float32 sum (768 terms:
# ~5e-5), the result rounded to bf16 (u): 3u + 5e-5 = 0.0118, and the bound carries margin.
BF16_DOT_ERROR = 2**-6


@cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX): there a bf16 matmul
    runs ~1.6x faster than a float32 one; elsewhere torch would emulate it, slower."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
