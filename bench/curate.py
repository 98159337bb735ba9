"""Pass 1's k-means + SemDeDup + top-N selection on synthetic embeddings (time, peak memory,
k-means objective, kept rows), against an in-memory float32 reference (FAISS, NumPy).

    python -m bench curate                          # 1,000,000 x 768 into 1,000 clusters
    python -m bench curate --n 4000000 --k 4000 --no-reference

Both sides run in their own child process (so each peak-memory figure is its own) on the same
float16 zarr array, and fit k-means on the same number of points per centroid
(``--points-per-centroid``, FAISS's default 256), so the two k-means objectives (mean cosine
similarity of every row to its centroid, higher is better) are comparable:

* ours: the engine's code (engine/curate): k-means seeded by AFK-MC² and fitted coarse to fine on
  a sample, assignment streamed from zarr in chunks, SemDeDup per cluster from a scratch file
  grouped by cluster; on a CPU with native bf16 the matmuls run in bf16 with float32 settling
  (assignments within bf16's error, distances and SemDeDup verdicts exact);
* reference: the straightforward version, everything in memory as float32: loaded from the same
  store (timed, as ours), FAISS's k-means (its defaults: random start, stop when the objective
  stops changing) on its own subsample of the same size, assign all, full NumPy similarity matrix
  per cluster sorted in the keep order (facebookresearch/SemDeDup's ``rank_within_cluster``),
  upper-triangle column max, then the top N survivors closest to the centroid.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from engine.core.config import CurateConfig


def fill_embeddings(array, k: int, seed: int = 0, chunk: int = 65536) -> None:
    """Fill ``array`` (rows x dim, a zarr array or a NumPy one) with unit vectors around ``k``
    random centres, ~10% of them planted near-duplicates, chunk by chunk."""
    n, dim = array.shape
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((k, dim)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        x = centers[rng.integers(0, k, m)] + rng.standard_normal((m, dim), dtype=np.float32) / np.sqrt(dim)
        copies = rng.random(m) < 0.1
        sources = rng.integers(0, m, copies.sum())
        x[copies] = x[sources] + 0.3 * rng.standard_normal((copies.sum(), dim), dtype=np.float32) / np.sqrt(dim)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        array[start:start + m] = x.astype(np.float16)


def _clock() -> tuple[float, float]:
    """(wall, CPU) seconds: on a shared machine CPU seconds (all threads) move less with the load."""
    return time.perf_counter(), time.process_time()


def _spans(t0, t1, t2) -> dict:
    spans = {}
    for i, unit in ((0, "s"), (1, "cpu_s")):
        spans |= {f"kmeans_{unit}": t1[i] - t0[i], f"dedup_select_{unit}": t2[i] - t1[i], f"total_{unit}": t2[i] - t0[i]}
    return spans


def run_ours(path: Path, args) -> dict:
    import zarr

    from engine.curate.kmeans import cluster
    from engine.curate.selection import select

    rows = zarr.open_array(path, mode="r")
    t0 = _clock()
    clustering = cluster(rows, args.k, niter=args.niter, refine_iterations=args.refine_iterations,
                         points_per_centroid=args.points_per_centroid)
    t1 = _clock()
    sel = select(rows, clustering, eps=args.eps, top_n=args.top_n, keep=args.keep, scratch=path.parent / "scratch.bin")
    t2 = _clock()
    return {**_spans(t0, t1, t2), "objective": float(clustering.similarity.mean()),
            "duplicates": int((sel.duplicate_of >= 0).sum()), "selected": int(sel.kept.sum())}


def run_reference(path: Path, args) -> dict:
    import faiss
    import zarr

    t0 = _clock()  # from the same store as ours: loading it is part of the reference's work
    x = zarr.open_array(path, mode="r")[:].astype(np.float32)
    load_s = time.perf_counter() - t0[0]
    n, dim = x.shape
    kmeans = faiss.Kmeans(dim, args.k, niter=args.niter, spherical=True, seed=0, verbose=False,
                          max_points_per_centroid=args.points_per_centroid)
    kmeans.train(x)  # FAISS subsamples to points_per_centroid per centroid itself
    sims, ids = kmeans.index.search(x, 1)
    t1 = _clock()
    assignment, distance = ids[:, 0], 1.0 - sims[:, 0]
    duplicates, selected = 0, 0
    for c in range(args.k):
        members = np.flatnonzero(assignment == c)
        members = members[np.argsort(-distance[members], kind="stable")]  # keep_hard: farthest first
        if args.keep == "easy":
            members = members[::-1]
        block = x[members]
        matrix = block @ block.T
        np.fill_diagonal(matrix, 0.0)
        dup = np.triu(matrix, k=1).max(axis=0, initial=0.0) > 1 - args.eps
        duplicates += int(dup.sum())
        selected += min(args.top_n, int((~dup).sum()))
    t2 = _clock()
    return {**_spans(t0, t1, t2), "load_s": load_s, "objective": float(1.0 - distance.mean()), "duplicates": duplicates,
            "selected": selected}


def _child(side: str, path: Path, args) -> dict:
    cmd = [sys.executable, "-m", "bench", "curate", "--worker", side, "--data", str(path),
           "--k", str(args.k), "--niter", str(args.niter), "--eps", str(args.eps),
           "--top-n", str(args.top_n), "--points-per-centroid", str(args.points_per_centroid), "--keep", args.keep,
           "--refine-iterations", str(args.refine_iterations)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{side} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def times(reference: float, ours: float) -> str:
    """"N.NNx faster" or "N.NNx slower": how ours compares with the reference."""
    return f"{reference / ours:.2f}x faster" if reference >= ours else f"{ours / reference:.2f}x slower"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="python -m bench curate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000, help="rows of synthetic embeddings (default: %(default)s)")
    parser.add_argument("--dim", type=int, default=768, help="embedding width (default: %(default)s, EVA02-L-14's)")
    parser.add_argument("--k", type=int, default=1000, help="planted and fitted clusters (default: %(default)s)")
    parser.add_argument("--niter", type=int, default=20, help="k-means iterations, both sides (default: %(default)s)")
    parser.add_argument("--eps", type=float, default=0.4, help="SemDeDup epsilon (default: %(default)s)")
    parser.add_argument("--top-n", type=int, default=20, help="survivors kept per cluster (default: %(default)s)")
    parser.add_argument("--points-per-centroid", type=int, default=256,
                        help="k-means fit sample per centroid, both sides (default: %(default)s, FAISS's)")
    parser.add_argument("--refine-iterations", type=int, default=CurateConfig().kmeans_refine_iterations,
                        help="ours: the last k-means iterations on the whole fit sample, the others on a quarter "
                             "of it (default: %(default)s, the engine's; 0: all on the whole sample, like the reference)")
    parser.add_argument("--keep", choices=("hard", "easy"), default="hard",
                        help="SemDeDup keep order, both sides (default: %(default)s, the reference's)")
    parser.add_argument("--no-reference", action="store_true", help="only our side (large N)")
    parser.add_argument("--workdir", default=None,
                        help="folder for the synthetic zarr and scratch files, created if missing (default: a temp folder)")
    parser.add_argument("--worker", choices=("ours", "reference"), help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        result = (run_ours if args.worker == "ours" else run_reference)(Path(args.data), args)
        result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(json.dumps(result))
        return 0

    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        path = Path(tmp) / "embeddings.zarr"
        t = time.perf_counter()
        import zarr

        fill_embeddings(zarr.create_array(path, shape=(args.n, args.dim), chunks=(16384, args.dim), dtype="float16",
                                          compressors=None), args.k)
        os.sync()  # its writeback would otherwise land on whichever side runs first
        print(f"synthetic: {args.n:,} x {args.dim} float16 into {args.k:,} clusters "
              f"(made in {time.perf_counter() - t:.1f}s), eps={args.eps}, keep {args.keep}, top {args.top_n}, "
              f"k-means fit on {args.points_per_centroid} points per centroid, {args.niter} iterations")
        sides = ["ours"] + ([] if args.no_reference else ["reference"])
        results = {side: _child(side, path, args) for side in sides}
    print(f"machine: {os.cpu_count()} CPUs, load average {load:.1f} before, {os.getloadavg()[0]:.1f} after")
    for side, r in results.items():
        load = f" (load {r['load_s']:.1f}s)" if "load_s" in r else ""
        print(f"{side:<10} k-means {r['kmeans_s']:7.1f}s{load}  dedup+select {r['dedup_select_s']:7.1f}s  "
              f"total {r['total_s']:7.1f}s  (CPU {r['kmeans_cpu_s']:.1f} + {r['dedup_select_cpu_s']:.1f} s)  "
              f"peak RSS {r['peak_rss_gb']:.2f} GB  "
              f"k-means objective (mean cos to centroid) {r['objective']:.4f}  duplicates {r['duplicates']:,}  "
              f"selected {r['selected']:,}")
    if "reference" in results:
        ours, ref = results["ours"], results["reference"]
        print(f"ours is {times(ref['total_s'], ours['total_s'])} in total, "
              f"{times(ref['total_s'] - ref['load_s'], ours['total_s'])} without the reference's load "
              f"(k-means {times(ref['kmeans_s'], ours['kmeans_s'])}, "
              f"dedup+select {times(ref['dedup_select_s'], ours['dedup_select_s'])}); in CPU seconds "
              f"{times(ref['total_cpu_s'], ours['total_cpu_s'])} (k-means {times(ref['kmeans_cpu_s'], ours['kmeans_cpu_s'])}, "
              f"dedup+select {times(ref['dedup_select_cpu_s'], ours['dedup_select_cpu_s'])}); "
              f"peak memory {ours['peak_rss_gb'] / ref['peak_rss_gb']:.2f} of the reference's, "
              f"objective {100 * (ours['objective'] / ref['objective'] - 1):+.2f}% vs the reference's")
    return 0
