"""What the cluster driver asks of a cluster: start worker actors, give one a shard, wait for
answers, stop them. engine/cluster/driver.py leases through :class:`Executor` alone, so the one
leasing code runs on Ray (:class:`RayExecutor`) and on the virtual clock of
engine/cluster/simulator.py (``python -m bench scale`` and its test: a thousand actors and
50,000 shards without a Ray process).

A call's answer is a reference (Ray's ``ObjectRef``, or the simulator's); :meth:`Executor.get`
raises :class:`WorkFailed` when the actor behind it died or could not start, whatever the
executor's own exception for it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Protocol

from engine.cluster.faults import ENV as FAULTS_ENV
from engine.cluster.faults import parse as parse_faults
from engine.core.config import ClusterConfig, RunConfig
from engine.core.errors import ConfigError
from engine.io.remote import store_environment

PROJECT_ROOT = Path(__file__).resolve().parents[2]


class WorkFailed(Exception):
    """The actor that was to answer a call died, or could not start; the message says why."""


class Executor(Protocol):
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
        """Seconds on the executor's clock (monotonic; the simulator's is virtual)."""

    def stage_figures(self, handles: list[Any]) -> list[list[dict[str, Any]]]:
        """Each live actor's per-stage figures ([] when they cannot be had)."""


def connect(cluster: ClusterConfig) -> None:
    """``auto``: $RAY_ADDRESS, else a new local cluster."""
    import ray

    address = os.environ.get("RAY_ADDRESS") if cluster.ray == "auto" else cluster.ray
    ray.init(address=address or None, logging_level="WARNING")


def disconnect() -> None:
    import ray

    ray.shutdown()


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


class RayExecutor:
    """The connected Ray cluster: one ``EngineActor`` (engine/cluster/actor.py) per actor."""

    def __init__(self, cfg: RunConfig, kind: str):
        from engine.cluster.actor import remote_actor

        self.cfg, self.kind = cfg, kind
        self.actor_cls = remote_actor(cfg.cluster, actor_environment())

    def actor_count(self) -> int:
        return actor_count(self.cfg.cluster)

    def start(self) -> Any:
        return self.actor_cls.remote(self.cfg, self.kind)

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
