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

``--partitioned`` measures instead the step as ``curate --ray`` runs it, partitioned by cluster
(engine/curate/partitioned.py): the fit here, then every assign and select task in a fresh process
of its own, one at a time (its time, CPU and peak memory), and the gather; plus one assignment
probe against ``--to-k`` random centroids. From these per-row and per-cluster costs it prints
the time per stage and the memory per node EXTRAPOLATED to ``--to-n`` x ``--dim`` into ``--to-k``
clusters on ``--to-workers`` workers with this machine's CPU (a model, not a measurement):

    python -m bench curate --partitioned --n 200000 --k 20    # N/K = 10,000 rows a cluster, the paper's
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


# --- partitioned by cluster, and its extrapolation --------------------------------------------

ASSIGN_BYTES_PER_ROW = 48  # an assign task: assignment 4, similarity 4, stable argsort 8, rows table 16, destination 8, sort 8
SELECT_BYTES_PER_ROW = 64  # a select task: rows table 16, verdicts 29, select()'s per-row arrays (~20 more in keep order)
GATHER_BYTES_PER_ROW = 25  # the driver's Selection: cluster 4, similarity 4, distance 4, rank 4, duplicate_of 8, kept 1
SEARCH_TILE_ROWS = 8192  # kmeans._TILE_ROWS: a (rows, K) similarity tile in 2-byte floats


def _measured(fn, args: tuple):
    """``fn(*args)`` in this (fresh) process, timed after the imports every task makes: (answer,
    its figures)."""
    _baseline()
    wall, cpu = _clock()
    answer = fn(*args)
    return answer, {"task": fn.__name__, "s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
                    "peak_rss_gb": peak_rss_gb()}


def peak_rss_gb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, a spawned child's own)."""
    with open("/proc/self/status") as status:
        kb = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    return kb / 2**20


def _baseline() -> int:
    """What a task process holds before any work (the imports)."""
    import torch  # noqa: F401
    import zarr  # noqa: F401

    import engine.curate.partitioned  # noqa: F401

    return 0


def _probe_assign(rows: int, k: int, dim: int) -> float:
    """CPU seconds (all threads) to assign ``rows`` random rows to ``k`` random centroids: the
    nearest-centroid search at the target K, as in every Lloyd iteration and the assignment."""
    from engine.curate.kmeans import assign

    rng = np.random.default_rng(1)
    x = rng.standard_normal((rows, dim), dtype=np.float32)
    centroids = rng.standard_normal((k, dim), dtype=np.float32)
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)
    assign(x[:64], centroids)  # warm the matmul kernels
    start = time.process_time()
    assign(x, centroids)
    return time.process_time() - start


def run_partitioned(path: Path, args) -> dict:
    """The fit, the partitioned step with each task in its own process, the gather, the probe."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import zarr

    from engine.curate.kmeans import fit_centroids
    from engine.curate.partitioned import select_partitioned
    from engine.curate.store import CommittedRows

    array = zarr.open_array(path, mode="r")
    rows = CommittedRows(array, array.shape[0])
    tasks: list[dict] = []

    def run_all(fn, calls: list[tuple]) -> list:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(1, mp_context=context, max_tasks_per_child=1) as pool:
            done = list(pool.map(_measured, [fn] * len(calls), calls))
        for args_, (answer, figures) in zip(calls, done):  # the rows each task held
            figures["rows"] = args_[3] - args_[2] if fn.__name__ == "assign_range" else answer
        tasks.extend(figures for _, figures in done)
        return [answer for answer, _ in done]

    t0 = _clock()
    centroids, iterations = fit_centroids(rows, args.k, niter=args.niter, refine_iterations=args.refine_iterations,
                                          points_per_centroid=args.points_per_centroid)
    t1 = _clock()
    selected = select_partitioned(path.parent, rows, centroids, eps=args.eps, top_n=args.top_n, keep=args.keep,
                                  workers=args.workers, run_all=run_all)
    run_all(_baseline, [()])
    probe = run_all(_probe_assign, [(args.probe_rows, args.to_k, array.shape[1])])[0]
    sizes = np.bincount(selected.selection.cluster, minlength=args.k)
    return {"n": array.shape[0], "dim": array.shape[1], "k": args.k, "fit_s": t1[0] - t0[0], "iterations": iterations,
            "fit_sample": min(array.shape[0], args.k * args.points_per_centroid),
            "driver_peak_rss_gb": peak_rss_gb(),
            "figures": selected.figures["partitioned"], "tasks": tasks, "probe_cpu_s": probe,
            "max_cluster": int(sizes.max()), "selected": int(selected.selection.kept.sum()),
            "duplicates": int((selected.selection.duplicate_of >= 0).sum())}


def extrapolate(m: dict, *, to_n: int, to_k: int, workers: int, points_per_centroid: int, niter: int,
                refine_iterations: int, probe_rows: int) -> list[str]:
    """Lines of the model: time per stage and memory per node at (to_n, m["dim"], to_k) on
    ``workers`` workers, from the CPU seconds measured in ``m`` (:func:`run_partitioned`): one
    core of this machine per worker, as Ray reserves one by default (--ray-cpus-per-actor)."""
    from engine.curate.partitioned import PARTITION_BYTES, plan
    from engine.curate.selection import READ_BATCH_BYTES

    n, k, dim = m["n"], m["k"], m["dim"]
    gb = 2**30
    cpu = {name: sum(t["cpu_s"] for t in m["tasks"] if t["task"] == name) for name in ("assign_range", "select_partition")}
    baseline_gb = next(t["peak_rss_gb"] for t in m["tasks"] if t["task"] == "_baseline")
    # a nearest-centroid search per row at the target K (the probe); the assign tasks' other work
    # per row (read, sort, shuffle write) is what they measured less their own search (linear in K)
    search_row = m["probe_cpu_s"] / probe_rows
    rest_row = max(0.0, cpu["assign_range"] / n - search_row * k / to_k)
    # the fit: a search per sample row and Lloyd iteration (coarse ones on a quarter of the sample)
    to_sample = to_k * points_per_centroid
    searched = to_sample * ((niter - refine_iterations) / 4 + refine_iterations) if 0 < refine_iterations < niter \
        else to_sample * niter
    # SemDeDup compares pairs inside a cluster: per row, linear in the mean cluster size
    select_row = cpu["select_partition"] / n * max(1.0, (to_n / to_k) / (n / k))
    layout = plan(to_n, to_k, dim, workers)
    range_rows = layout.ranges[0][1] - layout.ranges[0][0]
    partition_rows = -(-to_n // layout.partitions)
    biggest = m["max_cluster"] / (n / k) * (to_n / to_k)  # the same skew as measured

    def assign_gb(rows: int, clusters: int) -> float:  # centroids in float32 and bf16, a search tile, a chunk
        return baseline_gb + (clusters * dim * 6 + min(SEARCH_TILE_ROWS, rows) * clusters * 2 + 16384 * dim * 6
                              + ASSIGN_BYTES_PER_ROW * rows) / gb

    def select_gb(rows: int, cluster_rows: float) -> float:  # a read batch (float16 + float32), a cluster's SemDeDup
        return baseline_gb + (SELECT_BYTES_PER_ROW * rows + max(READ_BATCH_BYTES / (2 * dim), cluster_rows) * dim * 6
                              + cluster_rows * dim * 6 + 256 * cluster_rows * 4) / gb

    # what the model misses at the measured size (allocator slack, temporaries), added as measured
    missed = {"assign_range": max(t["peak_rss_gb"] - assign_gb(t["rows"], k) for t in m["tasks"] if t["task"] == "assign_range"),
              "select_partition": max(t["peak_rss_gb"] - select_gb(t["rows"], m["max_cluster"])
                                      for t in m["tasks"] if t["task"] == "select_partition")}
    missed = {name: max(0.0, gb_) for name, gb_ in missed.items()}
    probe_gb = next(t["peak_rss_gb"] for t in m["tasks"] if t["task"] == "_probe_assign")
    probe_model = assign_gb(probe_rows, to_k) - ASSIGN_BYTES_PER_ROW * probe_rows / gb  # no sort, no shuffle
    fit_gb = (to_sample * dim * 2 * 1.25 + SEARCH_TILE_ROWS * to_k * 2 + to_k * dim * 12) / gb
    hours = 3600
    return [
        f"EXTRAPOLATED (a model from the CPU seconds measured above, one core of this machine per worker and on the "
        f"driver; not a measurement): {to_n:,} x {dim} into {to_k:,} clusters on {workers:,} workers",
        f"  fit (driver):           {searched * search_row / hours:9.2f} h   {to_sample:,} sample rows, at most {niter} "
        f"iterations: {searched:,.0f} row searches at {search_row * 1e3:.2f} ms; memory {fit_gb:6.1f} GB "
        f"(sample, its coarse quarter, a {SEARCH_TILE_ROWS} x {to_k:,} tile, centroids)",
        f"  assign (workers):       {to_n * (search_row + rest_row) / workers / hours:9.2f} h   "
        f"{len(layout.ranges):,} ranges of {range_rows:,} rows; {search_row * 1e3:.2f} ms/row search + "
        f"{rest_row * 1e6:.1f} us/row read+shuffle; memory per worker "
        f"{assign_gb(range_rows, to_k) + missed['assign_range']:.2f} GB "
        f"(+{missed['assign_range']:.2f} the model missed when measured; at K={to_k:,} it said {probe_model:.2f} GB "
        f"for the probe, which took {probe_gb:.2f})",
        f"  dedup+select (workers): {to_n * select_row / workers / hours:9.2f} h   "
        f"{layout.partitions:,} partitions of ~{partition_rows:,} rows (<= {PARTITION_BYTES >> 20} MB of embeddings "
        f"when there are enough clusters), biggest cluster ~{biggest:,.0f}; {select_row * 1e6:.1f} us/row at "
        f"{to_n / to_k:,.0f} rows a cluster; memory per worker "
        f"{select_gb(partition_rows, biggest) + missed['select_partition']:.2f} GB "
        f"(+{missed['select_partition']:.2f} the model missed when measured)",
        f"  gather (driver):        {m['figures']['gather_s'] / n * to_n / hours:9.2f} h   "
        f"memory {GATHER_BYTES_PER_ROW * to_n / gb:6.1f} GB for the verdicts (selection.parquet's index columns come on top)",
        f"  shuffle on the output storage: {to_n * (dim * 2 + 16) / 2**40:.2f} TiB written once and read once",
    ]


def _child(side: str, path: Path, args) -> dict:
    cmd = [sys.executable, "-m", "bench", "curate", "--worker", side, "--data", str(path),
           "--k", str(args.k), "--niter", str(args.niter), "--eps", str(args.eps),
           "--top-n", str(args.top_n), "--points-per-centroid", str(args.points_per_centroid), "--keep", args.keep,
           "--refine-iterations", str(args.refine_iterations), "--workers", str(args.workers),
           "--to-k", str(args.to_k), "--probe-rows", str(args.probe_rows)]
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
    parser.add_argument("--partitioned", action="store_true",
                        help="measure the step partitioned by cluster (curate --ray) task by task, and print its "
                             "extrapolation to --to-n/--to-k/--to-workers (instead of ours vs the reference)")
    parser.add_argument("--workers", type=int, default=2,
                        help="--partitioned: workers the tasks are planned for (default: %(default)s)")
    parser.add_argument("--to-n", type=int, default=500_000_000,
                        help="--partitioned: rows to extrapolate to (default: %(default)s, DenseFusion-500M)")
    parser.add_argument("--to-k", type=int, default=50_000,
                        help="--partitioned: clusters to extrapolate to (default: %(default)s, the paper's)")
    parser.add_argument("--to-workers", type=int, default=1000,
                        help="--partitioned: workers to extrapolate to (default: %(default)s)")
    parser.add_argument("--probe-rows", type=int, default=4096,
                        help="--partitioned: rows assigned against --to-k centroids to measure the matmul per row "
                             "(default: %(default)s)")
    parser.add_argument("--workdir", default=None,
                        help="folder for the synthetic zarr and scratch files, created if missing (default: a temp folder)")
    parser.add_argument("--worker", choices=("ours", "reference", "partitioned"), help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        result = {"ours": run_ours, "reference": run_reference, "partitioned": run_partitioned}[args.worker](
            Path(args.data), args)
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
        if args.partitioned:
            return _print_partitioned(_child("partitioned", path, args), args)
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


def _print_partitioned(m: dict, args) -> int:
    figures = m["figures"]
    print(f"measured: fit {m['fit_s']:.1f}s on {m['fit_sample']:,} rows ({m['iterations']} iterations), "
          f"{figures['ranges']} ranges assigned in {figures['assign_s']:.1f}s, {figures['partitions']} partitions "
          f"de-duplicated and selected in {figures['dedup_select_s']:.1f}s, gathered in {figures['gather_s']:.2f}s "
          f"(task times include each task's process start); driver peak RSS {m['driver_peak_rss_gb']:.2f} GB; "
          f"{m['duplicates']:,} duplicates, {m['selected']:,} selected; biggest cluster {m['max_cluster']:,} rows")
    for task in m["tasks"]:
        print(f"  {task['task']:<17} {task['s']:7.2f}s  CPU {task['cpu_s']:7.2f}s  peak RSS {task['peak_rss_gb']:.2f} GB")
    print(f"  assignment probe: {args.probe_rows:,} rows against {args.to_k:,} centroids in {m['probe_cpu_s']:.2f} CPU s")
    for line in extrapolate(m, to_n=args.to_n, to_k=args.to_k, workers=args.to_workers,
                            points_per_centroid=args.points_per_centroid, niter=args.niter,
                            refine_iterations=args.refine_iterations, probe_rows=args.probe_rows):
        print(line)
    return 0
