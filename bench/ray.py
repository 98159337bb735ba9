"""What running on Ray costs: wall time and images/s on a loopback two-node cluster, against a
local run of the same shards.

Writes ``--shards`` shards of ``--images`` photo-like JPEGs each, runs ``run`` on them locally
(one process), then on a loopback two-node Ray cluster started for the purpose (or on
``--address``), with the same stages and options: once with one shard in flight per actor and
once with the default ``--ray-shards-in-flight``. Printed per mode: wall time of the whole
command (model loading and, for Ray, connecting and starting actors included), images/s over
that wall time, and for Ray the per-actor images/s while busy; then Ray's wall time ÷ the local
one (the overhead of Ray mode as a ratio), and what holding more shards per actor gains. On one
machine both nodes share its cores, so this measures overhead, not the speed-up of more nodes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write_shards(folder: Path, shards: int, images: int) -> list[Path]:
    import random

    from engine.io.demo_data import DemoMember, _jpeg, shapes_image, write_tar

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    paths = []
    for s in range(shards):
        members = [DemoMember(f"{s:03d}{i:05d}", _jpeg(shapes_image(rng, 800, 600)), "jpg", "shapes on a table", {})
                   for i in range(images)]
        paths.append(folder / f"bench-{s:05d}.tar")
        write_tar(paths[-1], members)
    return paths


def timed_run(cmd: list[str], env: dict[str, str]) -> tuple[float, dict]:
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    out = Path(cmd[cmd.index("--out") + 1])
    return wall, json.loads((out / "metrics.json").read_text())


def measure(*, shards: int, images: int, stages: tuple[str, ...], address: str = "", actors: int = 0,
            workdir: Path) -> dict:
    from engine.cluster.loopback import ENV, LoopbackCluster
    from engine.core.config import ClusterConfig

    paths = write_shards(workdir / "in", shards, images)
    env = {**os.environ, **ENV, "PYTHONPATH": str(ROOT)}

    def run(name: str, shard_paths: list[Path], *extra: str) -> tuple[float, dict]:
        return timed_run([sys.executable, str(ROOT / "densefusion_local.py"), "run",
                          "--shards", *map(str, shard_paths), "--out", str(workdir / name), "--no-progress",
                          "--stages", *stages, "--models", "tiny", "--cache-dir", str(workdir / "cache"),
                          "--decode-threads", "1",
                          "--expert-cache", "off",  # every mode computes its experts: none reads another's
                          *extra], env)

    run("warm-up", paths[:1])  # untimed: it builds the tiny models into the cache, which no mode should pay for
    local_wall, local = run("local", paths)
    cluster = None
    if not address:
        cluster = LoopbackCluster(Path(tempfile.mkdtemp(prefix="dfbench", dir="/tmp")), ROOT).start()
        address = cluster.address
    runs = []
    try:
        for in_flight in sorted({1, ClusterConfig().ray_shards_in_flight}):
            wall, on_ray = run(f"ray-{in_flight}", paths, "--ray", address, "--ray-shards-in-flight", str(in_flight),
                               "--ray-actors", str(actors))
            figures = on_ray["invocations"][-1]["cluster"]
            worked = [a for a in figures["actors"] if a["shards"]]
            runs.append({"in_flight": in_flight, "wall_s": wall, "actors": worked, "nodes": len(figures["nodes"]),
                         "busy_images_per_s": sum(a["samples"] for a in worked) / sum(a["busy_s"] for a in worked),
                         "same_counts": (local["written"], local["rejected"]) == (on_ray["written"], on_ray["rejected"])})
    finally:
        if cluster is not None:
            cluster.stop()
            shutil.rmtree(cluster.root, ignore_errors=True)
    return {"images": local["written"] + local["rejected"], "local_wall_s": local_wall, "ray": runs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench ray", description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=6, help="shards to write and run")
    parser.add_argument("--images", type=int, default=40, help="images per shard")
    parser.add_argument("--stages", nargs="+", default=["decode"], help="pass-2 stages to run (tiny models)")
    parser.add_argument("--address", default="", help="an existing cluster's address (default: a loopback 2-node one)")
    parser.add_argument("--actors", type=int, default=0,
                        help="worker actors on Ray (default: one per GPU slot; 1 measures one actor without its "
                             "neighbour competing for the same cores)")
    parser.add_argument("--workdir", default="", help="folder for the shards and outputs (default: a temporary one)")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-ray-"))
    workdir.mkdir(parents=True, exist_ok=True)
    figures = measure(shards=args.shards, images=args.images, stages=tuple(args.stages), address=args.address,
                      actors=args.actors, workdir=workdir)
    n = figures["images"]
    print(f"{n} images in {args.shards} shards, stages: {' '.join(args.stages)}")
    print(f"  {'local (one process)':<34} {figures['local_wall_s']:7.1f} s  {n / figures['local_wall_s']:7.1f} images/s")
    for run in figures["ray"]:
        label = f"Ray ({run['nodes']} node(s)), {run['in_flight']} shard(s) in flight"
        print(f"  {label:<34} {run['wall_s']:7.1f} s  {n / run['wall_s']:7.1f} images/s  "
              f"({run['busy_images_per_s']:.1f} images/s per busy actor)")
        for actor in run["actors"]:
            print(f"    actor {actor['actor']} on {actor['node']}: {actor['shards']} shards, "
                  f"{actor['images_per_busy_s']} images/s busy")
    for run in figures["ray"]:
        print(f"Ray mode ({run['in_flight']} in flight) / local, wall time: {run['wall_s'] / figures['local_wall_s']:.2f}x "
              f"(connecting, starting actors and loading models in each included); same written/rejected counts: "
              f"{run['same_counts']}")
    if len(figures["ray"]) == 2:
        one, more = figures["ray"]
        print(f"{more['in_flight']} shards in flight vs 1: {more['busy_images_per_s'] / one['busy_images_per_s']:.2f}x "
              f"the images/s per busy actor, {one['wall_s'] / more['wall_s']:.2f}x the wall-time speed")
    return 0
