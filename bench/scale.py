"""The real Ray driver at paper scale (``--shards 50000 --gpus 1000``) on a simulated cluster with a
virtual clock (engine/cluster/simulator.py: no Ray process, no image): driver cost per commit, GPU
idle share and tail, against the same run without copies of stragglers and against its own cost at
1,000 finished shards.

The driver (engine/cluster/driver.py) leases, retries, commits and records exactly as on Ray,
into a real output folder (markers published no-replace, the manifest appended; put ``--out`` on
a tmpfs to leave the disk's fsync out). Shard work is log-normal around ``--shard-seconds`` with
``--stragglers`` of the shards 2-4x slower; ``--death-rate`` of the shards kill their actor
half-way. The run is done with the default leasing, then again with
``--no-ray-copy-stragglers`` (the leasing before stragglers were copied) unless ``--one``.
Printed per run:

- the driver's CPU time per shard; per commit (its whole loop, and recording the commit in the
  manifest; medians over 1,000 commits) at 1,000 finished shards and at the last shards before
  the tail (their ratio says whether the cost per commit stays flat); the commits/s that CPU time sustains; the driver
  process's peak memory growth per 1,000 shards (the simulator's records included);
- the share of GPU time idle between shards (while shards wait to be leased) and at the tail
  (after the last one is leased), the tail's length, and the GPU time spent on work that did not
  stand (a dead actor's, a copy that lost);
- a rerun's start-up over N markers: settle against the markers, skip what is done, the totals.
"""

from __future__ import annotations

import argparse
import bisect
import resource
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

WINDOW = 1000  # commits over which the cost per commit is measured


@dataclass
class ScaleRun:
    leasing: str
    shards: int
    committed: int
    failed: int
    retries: int
    copies: int
    driver_cpu_s: float
    loop_cpu_ms: tuple[float, float]  # driver CPU per commit (median): commits 1,000..2,000, the last 1,000 before the tail
    late_at: int  # finished shards at the end of that last window
    record_ms: tuple[float, float]  # of it, recording the commit (the manifest append), over the same windows
    memory_mb_per_1000: float
    wall_s: float  # virtual
    ideal_s: float  # every shard's work spread evenly over the actors
    idle_between: float
    idle_tail: float
    idle: float
    tail_s: float
    wasted: float  # share of busy GPU time whose work did not stand
    rerun_start_s: float
    rerun_todo: int


def _cfg(copy_stragglers: bool, max_attempts: int):
    from engine.core.config import ClusterConfig, RunConfig

    return replace(RunConfig(), cluster=ClusterConfig(ray="simulated", ray_copy_stragglers=copy_stragglers,
                                                      ray_max_attempts=max_attempts))


def rerun_start(out: Path, paths: list[Path]) -> tuple[float, int]:
    """What a rerun does before leasing anything (engine/core/driver.py): settle the sink
    against the markers, skip the finished shards, sum the output's totals."""
    from engine.core.figures import OutputTotals
    from engine.core.pipeline import PASS2
    from engine.io.readers import shard_name

    start = time.perf_counter()
    sink = PASS2.open_sink(_cfg(True, 3), out)
    sink.settle([shard_name(p) for p in paths])
    todo = [p for p in paths if shard_name(p) not in sink.finished]
    OutputTotals.of(sink.manifest)
    return time.perf_counter() - start, len(todo)


def simulate(*, shards: int, gpus: int, out: Path, copy_stragglers: bool, shard_seconds: float,
             stragglers: float, death_rate: float, seed: int = 0) -> ScaleRun:
    from engine.cluster.driver import lease_shards
    from engine.cluster.simulator import SimulatedCluster, WorkTimes
    from engine.core.pipeline import PASS2
    from engine.io.readers import shard_name

    cfg = _cfg(copy_stragglers, 3)
    paths = [Path(f"/shared/laion/{i:05d}.tar") for i in range(shards)]
    sink = PASS2.open_sink(cfg, out)
    sink.settle([shard_name(p) for p in paths])
    cluster = SimulatedCluster(gpus, out, times=WorkTimes(shard_seconds, straggler_share=stragglers),
                               death_rate=death_rate, seed=seed)
    commit_cpu: list[float] = []  # the driver's CPU time so far, at each commit
    record_cpu: list[float] = []  # recording each commit
    commit_at: list[float] = []  # virtual time of each commit

    def on_commit(shard: str, marker: dict) -> None:
        before = time.process_time()
        sink.adopt({shard: marker})
        record_cpu.append(time.process_time() - before)
        commit_cpu.append(time.process_time() - cluster.own_cpu_s)
        commit_at.append(cluster.now())

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cpu_before = time.process_time()
    result = lease_shards(cfg, paths, on_commit, cluster)
    driver_cpu = time.process_time() - cpu_before - cluster.own_cpu_s
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    usage = cluster.usage(result.wall_s)
    work = sum(ref.work[1] - ref.work[0] for ref in cluster.calls if ref.stood)
    # the tail (after the last shard was leased) is left out: fewer commits, the same loop
    steady = bisect.bisect_right(commit_at, result.wall_s - usage.tail_s)
    early = (WINDOW, 2 * WINDOW) if steady >= 3 * WINDOW else (0, steady // 2)
    late = (max(early[1], steady - WINDOW), steady)

    # medians: a shared machine's hiccups (and the collector's passes) land on a few commits
    def per_commit(window: tuple[int, int]) -> float:
        first, last = window
        return 1000 * statistics.median(b - a for a, b in zip(commit_cpu[first:last - 1], commit_cpu[first + 1:last]))

    def recording(window: tuple[int, int]) -> float:
        return 1000 * statistics.median(record_cpu[window[0]:window[1]])

    rerun_s, todo = rerun_start(out, paths)
    return ScaleRun(
        leasing="copy stragglers" if copy_stragglers else "no copies (before)", shards=shards,
        committed=len(result.committed), failed=len(result.failed), retries=result.retries, copies=result.copies,
        driver_cpu_s=driver_cpu, loop_cpu_ms=(per_commit(early), per_commit(late)), late_at=late[1],
        record_ms=(recording(early), recording(late)),
        memory_mb_per_1000=(rss_after - rss_before) / 1024 / shards * 1000, wall_s=result.wall_s,
        ideal_s=work / gpus + cluster.startup_s, idle_between=usage.idle_between, idle_tail=usage.idle_tail,
        idle=usage.idle, tail_s=usage.tail_s,
        wasted=usage.wasted_s / (usage.busy_steady_s + usage.busy_tail_s or 1), rerun_start_s=rerun_s,
        rerun_todo=todo)


def format_run(run: ScaleRun) -> str:
    (early, late), (record_early, record_late) = run.loop_cpu_ms, run.record_ms
    return "\n".join([
        f"leasing: {run.leasing}",
        f"  shards {run.committed:,} committed, {run.failed} failed, {run.retries} retries, "
        f"{run.copies} straggler copies",
        f"  driver CPU: {run.driver_cpu_s:.1f} s in all, {1000 * run.driver_cpu_s / run.shards:.2f} ms per shard; "
        f"per commit {early:.2f} ms at 1,000 finished, {late:.2f} ms at {run.late_at:,} ({late / early:.2f}x), "
        f"of which recording it {record_early:.2f} ms and {record_late:.2f} ms; "
        f"sustains {1000 / late:,.0f} commits/s",
        f"  driver memory: +{run.memory_mb_per_1000:.1f} MB per 1,000 shards (peak RSS growth)",
        f"  run: {run.wall_s / 3600:.2f} h virtual, ideal {run.ideal_s / 3600:.2f} h "
        f"({run.wall_s / run.ideal_s:.3f}x); tail {run.tail_s:.0f} s after the last shard was leased",
        f"  GPU idle: {100 * run.idle_between:.2f}% between shards, {100 * run.idle_tail:.1f}% during the tail, "
        f"{100 * run.idle:.2f}% overall; {100 * run.wasted:.2f}% of busy GPU time on work that did not stand",
        f"  rerun start-up over {run.committed:,} markers: {run.rerun_start_s:.2f} s, {run.rerun_todo} shards left",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench scale", description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=50_000, help="shards in the simulated run")
    parser.add_argument("--gpus", type=int, default=1000, help="simulated worker actors, one per GPU")
    parser.add_argument("--shard-seconds", type=float, default=600.0, help="median work time of a shard")
    parser.add_argument("--stragglers", type=float, default=0.01, help="share of shards 2-4x slower")
    parser.add_argument("--death-rate", type=float, default=0.001, help="share of shards whose actor dies")
    parser.add_argument("--one", action="store_true", help="only the default leasing (no comparison run)")
    parser.add_argument("--out", default="", help="output folder (default: a temporary one, on /dev/shm if there)")
    args = parser.parse_args(argv)
    base = Path(args.out) if args.out else Path(tempfile.mkdtemp(
        prefix="bench-scale-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    print(f"{args.shards:,} shards on {args.gpus:,} simulated GPUs, shard work {args.shard_seconds:g} s median, "
          f"{100 * args.stragglers:g}% stragglers, {100 * args.death_rate:g}% actor deaths; output under {base}")
    try:
        for copy in (True,) if args.one else (True, False):
            out = base / ("copies" if copy else "no-copies")
            out.mkdir(parents=True, exist_ok=True)
            print(format_run(simulate(shards=args.shards, gpus=args.gpus, out=out, copy_stragglers=copy,
                                      shard_seconds=args.shard_seconds, stragglers=args.stragglers,
                                      death_rate=args.death_rate)), flush=True)
    finally:
        if not args.out:
            shutil.rmtree(base, ignore_errors=True)
    return 0
