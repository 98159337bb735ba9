"""The driver of a Ray run: lists the shards, leases them to worker actors a few at a time, and
records what they commit. It is the one process that writes ``manifest.json`` (or adopts
embeddings into the store); workers only publish files and markers on shared storage.

Faults, and what the driver does about them:

* an actor dies (its process killed, its node lost, its pipeline broken): the shards it held
  (``--ray-shards-in-flight``, so its pipeline never drains between shards) go back to the front
  of the queue, and a replacement actor is started (it waits for resources if its node is gone).
  A shard that was alone on the actor is charged an attempt; shards that were beside others are
  not (which one broke it is unknown) and are each retried alone, where failures are charged.
  After ``--ray-max-attempts`` charged attempts a shard is recorded as failed; the run finishes
  the other shards and exits non-zero.
* an actor holding shards commits nothing for ``--ray-lease-timeout``: the same, except the
  slow actor is not killed (it may be unreachable); it gets no more shards until every lease
  given up on has answered, and if it wakes up and commits, its files and marker are refused
  by the no-replace commit (engine/io/commit.py).
* the driver dies: actors die with it (Ray ties them to their owner); a rerun skips every
  marked shard and redoes the rest.

Leasing is done here, not by Ray: actors are created with ``max_restarts=0`` and calls with no
retries, and ``ray.util.ActorPool`` is not used (it drops the work of an actor that died).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.cluster.faults import ENV as FAULTS_ENV
from engine.cluster.faults import parse as parse_faults
from engine.core.config import ClusterConfig, RunConfig
from engine.core.errors import ConfigError
from engine.io.readers import shard_name
from engine.ops import events

PROJECT_ROOT = Path(__file__).resolve().parents[2]
_NO_WORKER_TIMEOUT_S = 300.0  # no live actor for this long (all nodes gone): the remaining shards fail
_LATE_GRACE_S = 15.0  # how long a finished run waits for leases it gave up on (only when there are some)
_MAX_START_FAILURES = 3  # actors failing to start this many times in a row: give up starting more


@dataclass
class Lease:
    """One shard given to one actor: the pending call's reference, and whether the shard runs
    alone on its actor (it was in flight beside another when an actor failed)."""

    ref: Any
    path: Path
    attempt: int
    alone: bool


@dataclass
class ActorRecord:
    index: int
    handle: Any
    state: str = "starting"  # starting, ready, lost (lease timed out; waiting for its late answers), dead
    node: str = ""
    pid: int = 0
    shards: int = 0
    samples: int = 0
    busy_s: float = 0.0
    reason: str = ""
    leases: list[Lease] = field(default_factory=list)  # in flight, in the order given
    busy_since: float = 0.0  # when its first lease of the current busy spell was given
    progress_at: float = 0.0  # its last commit, or the start of its busy spell

    def takes(self, alone: bool, depth: int) -> bool:
        """Whether it can take a shard now: a shard to run alone needs an empty actor, and an actor
        running such a shard takes nothing beside it."""
        if self.state != "ready":
            return False
        if alone or not self.leases:
            return not self.leases
        return len(self.leases) < depth and not any(lease.alone for lease in self.leases)

    def figures(self) -> dict[str, Any]:
        return {"actor": self.index, "node": self.node, "pid": self.pid, "state": self.state, "shards": self.shards,
                "samples": self.samples, "busy_s": round(self.busy_s, 3),
                "images_per_busy_s": round(self.samples / self.busy_s, 2) if self.busy_s else None,
                **({"reason": self.reason} if self.reason else {})}


@dataclass
class ClusterResult:
    """What one leasing round did: committed markers, failed shards, and the figures."""

    committed: dict[str, dict[str, Any]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # shard → why its last attempt failed
    retries: int = 0
    late: list[str] = field(default_factory=list)  # results of leases given up on
    actors: list[ActorRecord] = field(default_factory=list)
    stages: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0

    def figures(self) -> dict[str, Any]:
        nodes: dict[str, Counter] = {}
        for actor in self.actors:
            if actor.node:
                nodes.setdefault(actor.node, Counter()).update(samples=actor.samples, shards=actor.shards,
                                                               actors=1)
        return {
            "wall_s": round(self.wall_s, 3), "retries": self.retries,
            "failed_shards": dict(sorted(self.failed.items())), "late_results": self.late,
            "nodes": {node: {**counts, "images_per_s": round(counts["samples"] / self.wall_s, 2) if self.wall_s else None}
                      for node, counts in sorted(nodes.items())},
            "actors": [a.figures() for a in self.actors],
        }


def pick_actor(actors: list[ActorRecord], *, alone: bool, depth: int, waiting: int) -> ActorRecord | None:
    """The actor to give the next of ``waiting`` shards: the one holding the fewest, among those
    that :meth:`ActorRecord.takes` it. A shard to run alone waits for an empty actor, and nothing
    overtakes it. A second shard goes to a busy actor only while more shards wait than there are
    live actors (ready or starting): the run's last shards go to whichever actor empties first,
    so none holds two while another idles (a caption shard can take an hour)."""
    live = sum(actor.state in ("ready", "starting") for actor in actors)
    takers = [actor for actor in actors if actor.takes(alone, depth if waiting > live else 1)]
    return min(takers, key=lambda actor: len(actor.leases), default=None)


def connect(cluster: ClusterConfig) -> None:
    """``auto``: $RAY_ADDRESS, else a new local cluster."""
    import ray

    address = os.environ.get("RAY_ADDRESS") if cluster.ray == "auto" else cluster.ray
    ray.init(address=address or None, logging_level="WARNING")


def disconnect() -> None:
    import ray

    ray.shutdown()


def actor_count(cluster: ClusterConfig) -> int:
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


def actor_environment() -> dict[str, str]:
    """The engine's code at the driver's path on every node (shared storage or the same install),
    and the test-only fault switch when it is set."""
    env = {"PYTHONPATH": os.pathsep.join(filter(None, (str(PROJECT_ROOT), os.environ.get("PYTHONPATH"))))}
    if os.environ.get(FAULTS_ENV):
        try:
            parse_faults(os.environ[FAULTS_ENV])
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        env[FAULTS_ENV] = os.environ[FAULTS_ENV]
    return env


def lease_shards(cfg: RunConfig, kind: str, paths: list[Path],
                 on_commit: Callable[[str, dict[str, Any]], None]) -> ClusterResult:
    """Run the ``kind`` pass (engine/cluster/worker.py) over ``paths`` on the connected cluster."""
    import ray

    from engine.cluster.actor import remote_actor

    cluster = cfg.cluster
    depth = cluster.ray_shards_in_flight
    actor_cls = remote_actor(cluster, actor_environment())
    result = ClusterResult()
    start = time.perf_counter()
    queue: deque[Path] = deque(paths)
    tries: Counter = Counter()  # attempts made (each attempt's number is in its marker)
    charged: Counter = Counter()  # attempts that count against --ray-max-attempts
    alone: set[Path] = set()  # shards that were in flight beside another when an actor failed
    starting: dict[Any, ActorRecord] = {}
    busy: dict[Any, ActorRecord] = {}
    given_up: dict[Any, tuple[ActorRecord, Lease]] = {}
    start_failures = 0
    last_worker = time.monotonic()

    def start_actor() -> None:
        record = ActorRecord(len(result.actors), actor_cls.remote(cfg, kind))
        result.actors.append(record)
        starting[record.handle.ready.remote()] = record

    def lease_next() -> bool:
        """Give the next shard to :func:`pick_actor`'s choice; False when no actor can take it."""
        path = queue[0]
        record = pick_actor(result.actors, alone=path in alone, depth=depth, waiting=len(queue))
        if record is None:
            return False
        queue.popleft()
        tries[path] += 1
        now = time.monotonic()
        if not record.leases:
            record.busy_since = record.progress_at = now
        lease = Lease(record.handle.process.remote(str(path), tries[path]), path, tries[path], path in alone)
        record.leases.append(lease)
        busy[lease.ref] = record
        return True

    def end_busy_spell(record: ActorRecord) -> None:
        record.busy_s += time.monotonic() - record.busy_since

    def actor_failed(record: ActorRecord, state: str, reason: str, why: str) -> None:
        """Its shards go back to the front of the queue. Alone on it, the shard is charged an
        attempt; beside others, none is (which of them broke the actor is unknown) and each is
        retried alone, where a failure is charged: a shard that always kills its actor costs its
        neighbours one retry, never their attempts."""
        finished, _ = ray.wait([lease.ref for lease in record.leases], num_returns=len(record.leases), timeout=0)
        for ref in finished:  # committed before the actor failed: not a victim
            with contextlib.suppress(ray.exceptions.RayError):
                committed(record, ref, ray.get(ref))
        leases, record.leases = record.leases, []
        if leases:
            end_busy_spell(record)
        for lease in leases:
            del busy[lease.ref]
            if state == "lost":
                given_up[lease.ref] = (record, lease)
        for lease in reversed(leases):  # front of the queue, in the order they were given
            shard_failed(lease.path, why, charge=len(leases) == 1)
        if len(leases) > 1:
            alone.update(lease.path for lease in leases)
        retire(record, state, reason)

    def retire(record: ActorRecord, state: str, reason: str) -> None:
        record.state, record.reason = state, reason
        events.emit("actor_retired", actor=record.index, actor_node=record.node, state=state, reason=reason)
        if state == "dead":
            ray.kill(record.handle, no_restart=True)
        if start_failures < _MAX_START_FAILURES and queue:
            start_actor()

    def late_result(record: ActorRecord, lease: Lease) -> None:
        """``lease``, given up on and already taken out of ``given_up``, has answered."""
        try:
            late = ray.get(lease.ref)["marker"]
        except ray.exceptions.RayError as exc:
            result.late.append(f"{shard_name(lease.path)} attempt {lease.attempt} on {record.node}: {_reason(exc)}")
            record.state = "dead"
            return
        result.late.append(f"{shard_name(lease.path)} attempt {lease.attempt} on {record.node}: finished late; "
                           f"the marker of attempt {late.get('attempt')} stands")
        if record.state == "lost" and all(other is not record for other, _ in given_up.values()):
            record.state, record.reason = "ready", ""  # slow, not broken: it takes shards again

    def shard_failed(path: Path, reason: str, charge: bool) -> None:
        result.retries += 1
        charged[path] += charge
        if charged[path] >= cluster.ray_max_attempts:
            result.failed[shard_name(path)] = f"{reason} (attempt {charged[path]} of {cluster.ray_max_attempts})"
            events.emit("shard_failed", shard=shard_name(path), reason=reason, attempt=tries[path], given_up=True)
        else:
            events.emit("shard_failed", shard=shard_name(path), reason=reason, attempt=tries[path], given_up=False,
                        charged=bool(charge))
            queue.appendleft(path)  # retried before new work, so a failing shard is decided early

    def committed(record: ActorRecord, ref: Any, done_shard: dict[str, Any]) -> None:
        lease = next(lease for lease in record.leases if lease.ref == ref)
        record.leases.remove(lease)
        del busy[ref]
        record.progress_at = time.monotonic()
        if not record.leases:
            end_busy_spell(record)
        record.shards += 1
        record.samples += done_shard["marker"].get("samples", 0)
        result.committed[shard_name(lease.path)] = done_shard["marker"]
        on_commit(shard_name(lease.path), done_shard["marker"])

    for _ in range(actor_count(cluster)):
        start_actor()
    try:
        while queue or busy:
            while queue and lease_next():
                pass
            if any(r.state == "ready" for r in result.actors):
                last_worker = time.monotonic()
            elif time.monotonic() - last_worker > _NO_WORKER_TIMEOUT_S or (not starting and queue):
                for path in queue:
                    result.failed[shard_name(path)] = "no worker actor could be started to run it"
                queue.clear()
                break
            done, _ = ray.wait([*starting, *busy, *given_up], num_returns=1, timeout=0.5)
            for ref in done:
                if ref in starting:
                    record = starting.pop(ref)
                    try:
                        info = ray.get(ref)
                    except ray.exceptions.RayError as exc:
                        start_failures += 1
                        retire(record, "dead", f"could not start: {_reason(exc)}")
                        continue
                    start_failures = 0
                    record.node, record.pid, record.state = info["node"], info["pid"], "ready"
                elif ref in busy:
                    record = busy[ref]
                    try:
                        committed(record, ref, ray.get(ref))
                    except ray.exceptions.RayError as exc:
                        actor_failed(record, "dead", _reason(exc),
                                     f"worker actor {record.index} on {record.node or '?'} died: {_reason(exc)}")
                else:
                    late_result(*given_up.pop(ref))
            if cluster.ray_lease_timeout:
                now = time.monotonic()
                for record in result.actors:
                    if record.leases and now - record.progress_at > cluster.ray_lease_timeout:
                        actor_failed(record, "lost", "lease timed out",
                                     f"worker actor {record.index} on {record.node} committed nothing for "
                                     f"--ray-lease-timeout {cluster.ray_lease_timeout:g}s")
        # A worker given up on may only have been slow: a short wait lets it report (its commit
        # was refused if the shard was committed meanwhile) before it is stopped.
        deadline = time.monotonic() + _LATE_GRACE_S
        while given_up and time.monotonic() < deadline:
            done, _ = ray.wait(list(given_up), num_returns=1, timeout=0.5)
            for ref in done:
                late_result(*given_up.pop(ref))
        result.stages = _stage_figures([r for r in result.actors if r.state == "ready"])
    finally:
        for record in result.actors:
            ray.kill(record.handle, no_restart=True)
        result.wall_s = time.perf_counter() - start
    return result


def _stage_figures(actors: list[ActorRecord]) -> list[dict[str, Any]]:
    """Per-stage figures summed over the actors still alive at the end."""
    import ray

    totals: dict[str, dict[str, Any]] = {}
    try:
        per_actor = ray.get([a.handle.figures.remote() for a in actors], timeout=30)
    except ray.exceptions.RayError:
        return []
    for figures in per_actor:
        for stage in figures:
            total = totals.setdefault(stage["stage"], {"stage": stage["stage"], "description": stage["description"],
                                                       "items": 0, "batches": 0, "busy_s": 0.0})
            total["items"] += stage["items"]
            total["batches"] += stage["batches"]
            total["busy_s"] += stage["busy_s"]
    for total in totals.values():
        total["busy_s"] = round(total["busy_s"], 3)
        total["items_per_busy_s"] = round(total["items"] / total["busy_s"], 2) if total["busy_s"] else None
        total["busy_share"] = None
    return list(totals.values())


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]
