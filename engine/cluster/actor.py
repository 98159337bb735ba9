"""The worker actors, and the cluster of them as the leasing code sees it.

:class:`Cluster` is what engine/cluster/driver.py asks of a cluster: start worker actors, give
one a shard, wait for answers, stop them. Leasing goes through it alone, so the one leasing code
runs on Ray (:class:`RayCluster`) and on the virtual clock of engine/cluster/simulator.py
(``python -m bench scale`` and its test: a thousand actors and 50,000 shards without a Ray
process). A call's answer is a reference (Ray's ``ObjectRef``, or the simulator's);
:meth:`Cluster.get` raises :class:`WorkFailed` when the actor behind it died or could not start,
whatever the cluster's own exception for it.

On Ray, each actor is an :class:`EngineActor` around a :class:`engine.cluster.worker.ShardWorker`:
one per GPU, never restarted by Ray. ``max_restarts=0`` and ``max_task_retries=0``: when an
actor dies, its call fails and the driver decides what happens to the shard (another actor,
with an attempt count). Ray's own retries would redo a shard without counting, forever under
preemption.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any, Protocol

from engine.cluster.faults import ENV as FAULTS_ENV
from engine.cluster.faults import parse as parse_faults
from engine.core.config import ClusterConfig, RunConfig
from engine.core.driver import Pass, Reader
from engine.io.remote import store_environment
from models.errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parents[2]


class WorkFailed(Exception):
    """The actor that was to answer a call died, or could not start; the message says why."""


class Cluster(Protocol):
    def actor_count(self) -> int:
        """How many worker actors the run starts."""

    def start(self) -> Any:
        """Start one worker actor; returns its handle at once (it loads its models meanwhile)."""

    def ready(self, handle: Any) -> Any:
        """A reference answered with ``{"node", "pid"}`` once the actor's models are loaded."""

    def process(self, handle: Any, path: str, attempt: int) -> Any:
        """A reference answered with the shard's done marker (``{"shard", "marker", "attempt"}``)."""

    def wait(self, refs: list[Any], *, num_returns: int, timeout: float) -> list[Any]:
        """Up to ``num_returns`` of ``refs`` that are answered, waiting at most ``timeout`` s for one."""

    def get(self, ref: Any) -> Any:
        """An answered reference's value; :class:`WorkFailed` when its actor died."""

    def kill(self, handle: Any) -> None:
        """Stop an actor (never restarted)."""

    def now(self) -> float:
        """Seconds on the cluster's clock (monotonic; the simulator's is virtual)."""

    def stage_figures(self, handles: list[Any]) -> list[list[dict[str, Any]]]:
        """Each live actor's per-stage figures ([] when they cannot be had)."""


class EngineActor:
    """A worker actor: ``spec`` (engine/core/driver.py) over the shards it is given, read by ``reader``."""

    def __init__(self, cfg: RunConfig, spec: Pass, reader: Reader):
        from engine.cluster.worker import build_worker

        self.worker = build_worker(cfg, spec, reader)
        self.worker.sink.node = self.node = self._node()

    def ready(self) -> dict[str, Any]:
        """Returns once the models are loaded: where this actor runs."""
        self.worker.ready()
        return {"node": self.node, "pid": os.getpid()}

    @staticmethod
    def _node() -> str:
        """The host and the node's address (nodes on one host differ only by it)."""
        import ray

        return f"{socket.gethostname()}/{ray.util.get_node_ip_address()}"

    def process(self, path: str, attempt: int) -> dict[str, Any]:
        return self.worker.process(path, attempt)

    def figures(self) -> list[dict[str, Any]]:
        return self.worker.figures()


def remote_actor(cluster: ClusterConfig, env: dict[str, str]):
    """The actor class with its resources and the environment its process needs."""
    import ray

    return ray.remote(EngineActor).options(
        num_gpus=cluster.ray_gpus_per_actor, num_cpus=cluster.ray_cpus_per_actor,
        max_restarts=0, max_task_retries=0, runtime_env={"env_vars": env},
        # a thread per shard in flight (each waits on its own commit), and one for figures()
        max_concurrency=cluster.ray_shards_in_flight + 1,
    )


def actor_environment() -> dict[str, str]:
    """The engine's code at the driver's path on every node (shared storage or the same install),
    the object store's settings (engine/io/remote.py), and the test-only fault switch when it is set."""
    env = {"PYTHONPATH": os.pathsep.join(filter(None, (str(PROJECT_ROOT), os.environ.get("PYTHONPATH")))),
           **store_environment()}
    if os.environ.get(FAULTS_ENV):
        try:
            parse_faults(os.environ[FAULTS_ENV])
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        env[FAULTS_ENV] = os.environ[FAULTS_ENV]
    return env


def actor_count(cluster: ClusterConfig) -> int:
    """Worker actors a run starts: --ray-actors, else the cluster's GPUs over --ray-gpus-per-actor."""
    import ray

    if cluster.ray_actors:
        return cluster.ray_actors
    gpus = ray.cluster_resources().get("GPU", 0)
    count = int(gpus // cluster.ray_gpus_per_actor)
    if count < 1:
        raise ConfigError(f"the Ray cluster has {gpus:g} GPUs, fewer than --ray-gpus-per-actor "
                          f"{cluster.ray_gpus_per_actor:g}: add GPU nodes, or run CPU-only workers with "
                          f"--ray-gpus-per-actor 0 --ray-actors N")
    return count


class RayCluster:
    """The connected Ray cluster: one :class:`EngineActor` per actor, each running ``spec``."""

    def __init__(self, cfg: RunConfig, spec: Pass, reader: Reader):
        self.cfg, self.spec, self.reader = cfg, spec, reader
        self.actor_cls = remote_actor(cfg.cluster, actor_environment())

    def actor_count(self) -> int:
        return actor_count(self.cfg.cluster)

    def start(self) -> Any:
        return self.actor_cls.remote(self.cfg, self.spec, self.reader)

    def ready(self, handle: Any) -> Any:
        return handle.ready.remote()

    def process(self, handle: Any, path: str, attempt: int) -> Any:
        return handle.process.remote(path, attempt)

    def wait(self, refs: list[Any], *, num_returns: int, timeout: float) -> list[Any]:
        import ray

        done, _ = ray.wait(refs, num_returns=num_returns, timeout=timeout)
        return done

    def get(self, ref: Any) -> Any:
        import ray

        try:
            return ray.get(ref)
        except ray.exceptions.RayError as exc:
            raise WorkFailed(_reason(exc)) from exc

    def kill(self, handle: Any) -> None:
        import ray

        ray.kill(handle, no_restart=True)

    def now(self) -> float:
        return time.monotonic()

    def stage_figures(self, handles: list[Any]) -> list[list[dict[str, Any]]]:
        import ray

        try:
            return ray.get([handle.figures.remote() for handle in handles], timeout=30)
        except ray.exceptions.RayError:
            return []


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]
