"""Curation's step after the k-means fit on the Ray cluster, partitioned by cluster
(engine/curate/partitioned.py): assign and select tasks, each with a worker's resources.

Ray tasks, not the shard actors: a task is a pure function of files on shared storage that
publishes its output atomically with the same bytes on every try, so Ray's own retries
(``max_retries``, --ray-max-attempts tries in all; a node lost or a worker killed) are safe
here. An exception inside a task is no fault of the node: it fails the step at once, and a rerun
with the same --out redoes the step from the fit.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from engine.cluster.actor import actor_count, actor_environment
from engine.core.config import RunConfig
from engine.curate.partitioned import select_partitioned
from engine.curate.selection import Selected


def select_on_ray(rows, centroids: np.ndarray, cfg: RunConfig, root: Path) -> Selected:
    """:func:`engine.curate.pass1.select_here`'s twin: the same verdicts, from tasks spread over
    the cluster, as many at a time as there would be worker actors."""
    import ray

    cluster = cfg.cluster
    task = ray.remote(_on_node).options(
        num_gpus=cluster.ray_gpus_per_actor, num_cpus=cluster.ray_cpus_per_actor,
        max_retries=cluster.ray_max_attempts - 1, retry_exceptions=False,
        runtime_env={"env_vars": actor_environment()})
    nodes: Counter = Counter()

    def run_all(fn, calls: list[tuple]) -> list[Any]:
        try:
            done = ray.get([task.remote(fn, args) for args in calls])
        except ray.exceptions.RayError as exc:
            first_line = (str(exc).strip().splitlines() or [""])[0][:300]
            raise RuntimeError(f"curation partitioned by cluster: a {fn.__name__} task failed ({type(exc).__name__}: "
                               f"{first_line}); rerun with the same --out to redo the step after the fit") from exc
        answers = []
        for node, answer in done:
            nodes[node] += 1
            answers.append(answer)
        return answers

    started = time.perf_counter()
    selected = select_partitioned(root, rows, centroids, eps=cfg.curate.curate_eps, top_n=cfg.curate.curate_top_n,
                                  keep=cfg.curate.curate_keep, workers=actor_count(cluster), run_all=run_all)
    selected.figures["partitioned"].update(tasks_by_node=dict(sorted(nodes.items())),
                                           wall_s=round(time.perf_counter() - started, 3))
    return selected


def _on_node(fn, args: tuple) -> tuple[str, Any]:
    """``fn(*args)`` and the node it ran on."""
    import ray

    return ray.util.get_node_ip_address(), fn(*args)
