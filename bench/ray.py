"""``python -m bench ray``: what running on Ray costs, on the same shards as a local run.

Writes ``--shards`` shards of ``--images`` photo-like JPEGs each, runs ``run`` on them locally
(one process), then on a loopback two-node Ray cluster started for the purpose (or on
``--address``), with the same stages and options. Printed per mode: wall time of the whole
command (model loading and, for Ray, connecting and starting actors included), images/s over
that wall time, and for Ray the per-actor images/s while busy; then Ray's wall time ÷ the local
one (the overhead of Ray mode as a ratio). On one machine both nodes share its cores, so this
measures overhead, not the speed-up of more nodes.
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


def measure(*, shards: int, images: int, stages: tuple[str, ...], address: str = "", workdir: Path) -> dict:
    from engine.cluster.loopback import ENV, LoopbackCluster

    paths = write_shards(workdir / "in", shards, images)
    base = [sys.executable, str(ROOT / "densefusion_local.py"), "run", "--shards", *map(str, paths), "--no-progress",
            "--stages", *stages, "--models", "tiny", "--cache-dir", str(workdir / "cache"), "--decode-threads", "1"]
    env = {**os.environ, **ENV, "PYTHONPATH": str(ROOT)}
    local_wall, local = timed_run([*base, "--out", str(workdir / "local")], env)
    cluster = None
    if not address:
        cluster = LoopbackCluster(Path(tempfile.mkdtemp(prefix="dfbench", dir="/tmp")), ROOT).start()
        address = cluster.address
    try:
        ray_wall, on_ray = timed_run([*base, "--out", str(workdir / "ray"), "--ray", address], env)
    finally:
        if cluster is not None:
            cluster.stop()
            shutil.rmtree(cluster.root, ignore_errors=True)
    n = local["written"] + local["rejected"]
    return {"images": n, "local_wall_s": local_wall, "ray_wall_s": ray_wall,
            "local_images_per_s": n / local_wall, "ray_images_per_s": n / ray_wall,
            "ray_over_local": ray_wall / local_wall, "cluster": on_ray["invocations"][-1]["cluster"],
            "same_counts": (local["written"], local["rejected"]) == (on_ray["written"], on_ray["rejected"])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench ray", description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=6, help="shards to write and run")
    parser.add_argument("--images", type=int, default=40, help="images per shard")
    parser.add_argument("--stages", nargs="+", default=["decode"], help="pass-2 stages to run (tiny models)")
    parser.add_argument("--address", default="", help="an existing cluster's address (default: a loopback 2-node one)")
    parser.add_argument("--workdir", default="", help="folder for the shards and outputs (default: a temporary one)")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-ray-"))
    workdir.mkdir(parents=True, exist_ok=True)
    figures = measure(shards=args.shards, images=args.images, stages=tuple(args.stages), address=args.address,
                      workdir=workdir)
    print(f"{figures['images']} images in {args.shards} shards, stages: {' '.join(args.stages)}")
    ray_label = f"Ray ({len(figures['cluster']['nodes'])} nodes)"
    print(f"  {'local (one process)':<20} {figures['local_wall_s']:7.1f} s  {figures['local_images_per_s']:7.1f} images/s")
    print(f"  {ray_label:<20} {figures['ray_wall_s']:7.1f} s  {figures['ray_images_per_s']:7.1f} images/s")
    for actor in figures["cluster"]["actors"]:
        if actor["shards"]:
            print(f"    actor {actor['actor']} on {actor['node']}: {actor['shards']} shards, "
                  f"{actor['images_per_busy_s']} images/s busy")
    print(f"Ray mode / local, wall time: {figures['ray_over_local']:.2f}x "
          f"(connecting, starting actors and loading models in each included)")
    print(f"same written/rejected counts: {figures['same_counts']}")
    return 0
