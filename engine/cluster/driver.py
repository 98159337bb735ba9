"""The leasing of a Ray run: the shards left, leased to worker actors a few at a time, and what
they commit handed to the driver, the one process that writes the manifest (or adopts
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

The run's tail: once no shard waits, an actor that empties would idle until the slowest shard
ends (``python -m bench scale`` measures it). With ``--ray-copy-stragglers`` (default) it is
given a copy of the lease likely to finish last (:func:`pick_stragglers`; a shard may run on
several actors at the very end, so no GPU idles while one is unfinished); the first commit
stands, the other copy's publish is a no-op (engine/io/commit.py) and its answer is ignored, and
the run ends when every shard is committed, stopping the losers.

Leasing is done here, not by Ray: actors are created with ``max_restarts=0`` and calls with no
retries, and ``ray.util.ActorPool`` is not used (it drops the work of an actor that died). Every
cluster call goes through a :class:`Cluster` (engine/cluster/actor.py): Ray's, or the
simulator's virtual cluster (engine/cluster/simulator.py). The pass around the leasing (checks,
sink, summary) is the one driver's (engine/core/driver.py; engine/cluster/executor.py).
"""

from __future__ import annotations

import contextlib
import heapq
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.cluster.actor import Cluster, WorkFailed
from engine.core.config import RunConfig
from engine.io.readers import shard_name
from engine.ops import events

_NO_WORKER_TIMEOUT_S = 300.0  # no live actor for this long (all nodes gone): the remaining shards fail
_LATE_GRACE_S = 15.0  # how long a finished run waits for leases it gave up on (only when there are some)
_MAX_START_FAILURES = 3  # actors failing to start this many times in a row: give up starting more


@dataclass
class Lease:
    """One shard given to one actor: the pending call's reference, whether the shard runs
    alone on its actor (it was in flight beside another when an actor failed), when it was
    given, and whether it is a straggler's copy (``--ray-copy-stragglers``)."""

    ref: Any
    path: Path
    attempt: int
    alone: bool
    given_at: float = 0.0
    copy: bool = False


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
    """What one leasing round did: committed shards and their summed counts (not their markers:
    a driver of 50,000 shards keeps what it needs for the summary), failed shards, the figures."""

    committed: list[str] = field(default_factory=list)  # in commit order
    counts: Counter = field(default_factory=Counter)  # written, rejected: summed over the committed markers
    by_stage: Counter = field(default_factory=Counter)  # their rejected_by_stage, summed
    failed: dict[str, str] = field(default_factory=dict)  # shard → why its last attempt failed
    retries: int = 0
    copies: int = 0  # stragglers' copies given to idle actors at the run's tail
    copies_first: int = 0  # copies that committed before their original
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
            "straggler_copies": self.copies, "straggler_copies_first": self.copies_first,
            "failed_shards": dict(sorted(self.failed.items())), "late_results": self.late,
            "nodes": {node: {**counts, "images_per_s": round(counts["samples"] / self.wall_s, 2) if self.wall_s else None}
                      for node, counts in sorted(nodes.items())},
            "actors": [a.figures() for a in self.actors],
        }


def pick_actor(actors: Iterable[ActorRecord], *, alone: bool, depth: int, waiting: int,
               live: int) -> ActorRecord | None:
    """The actor to give the next of ``waiting`` shards: the one holding the fewest (the first
    of them), among ``actors`` that :meth:`ActorRecord.takes` it. A shard to run alone waits for
    an empty actor, and nothing overtakes it. A second shard goes to a busy actor only while more
    shards wait than there are ``live`` actors (ready or starting): the run's last shards go to
    whichever actor empties first, so none holds two while another idles (a caption shard can
    take an hour). The driver passes only the ready actors with room (a thousand actors, most
    of them full, are not scanned at every commit)."""
    takers = [actor for actor in actors if actor.takes(alone, depth if waiting > live else 1)]
    return min(takers, key=lambda actor: (len(actor.leases), actor.index), default=None)


def pick_stragglers(actors: Iterable[ActorRecord], running: Counter, n: int, suspects: set[Path]) -> list[Lease]:
    """The leases to copy onto ``n`` idle actors once no shard waits: those likely to finish
    last, among the shards with the fewest copies in flight (``running``: shard → its leases;
    each pick adds one). A lease queued behind another on its actor has not started (it ends a
    whole shard after its neighbour), so those come first; then the lease given longest ago.
    Never one of the ``suspects`` (shards that were on an actor when it died: a copy might kill
    another), nor a lease on an actor that is not ready."""
    copies = Counter(running)
    heap = [(copies[lease.path], -position, lease.given_at, order, lease) for order, (position, lease) in enumerate(
        (position, lease) for actor in actors if actor.state == "ready"
        for position, lease in enumerate(actor.leases) if lease.path not in suspects)]
    heapq.heapify(heap)
    picked: list[Lease] = []
    while heap and len(picked) < n:
        count, position, given_at, order, lease = heapq.heappop(heap)
        if count != copies[lease.path]:  # copied since this entry was made
            heapq.heappush(heap, (copies[lease.path], position, given_at, order, lease))
            continue
        picked.append(lease)
        copies[lease.path] += 1
        heapq.heappush(heap, (count + 1, position, given_at, order, lease))
    return picked


def lease_shards(cfg: RunConfig, paths: list[Path], on_commit: Callable[[str, dict[str, Any]], None],
                 cluster: Cluster) -> ClusterResult:
    """``paths`` leased to ``cluster``'s worker actors (Ray's, or engine/cluster/simulator.py's
    virtual ones) under ``cfg.cluster``'s settings; ``on_commit`` records each commit."""
    settings = cfg.cluster
    depth = settings.ray_shards_in_flight
    result = ClusterResult()
    start = cluster.now()
    queue: deque[Path] = deque(paths)
    tries: Counter = Counter()  # attempts made (each attempt's number is in its marker)
    charged: Counter = Counter()  # attempts that count against --ray-max-attempts
    alone: set[Path] = set()  # shards that were in flight beside another when an actor failed
    suspects: set[Path] = set()  # shards that were on an actor when it failed (never copied)
    running: Counter = Counter()  # shard → its leases in flight (more than one once copied)
    starting: dict[Any, ActorRecord] = {}
    busy: dict[Any, ActorRecord] = {}
    given_up: dict[Any, tuple[ActorRecord, Lease]] = {}
    states: Counter = Counter()  # actors by state
    with_room: dict[int, ActorRecord] = {}  # ready actors holding fewer than ``depth`` leases, by index
    empty: dict[int, ActorRecord] = {}  # ready actors holding none
    start_failures = 0
    last_worker = cluster.now()

    def set_state(record: ActorRecord, state: str) -> None:
        states[record.state] -= 1
        states[state] += 1
        record.state = state
        room_changed(record)

    def room_changed(record: ActorRecord) -> None:
        for actors, has_room in ((with_room, len(record.leases) < depth), (empty, not record.leases)):
            if record.state == "ready" and has_room:
                actors[record.index] = record
            else:
                actors.pop(record.index, None)

    def live() -> int:
        return states["ready"] + states["starting"]

    def start_actor() -> None:
        record = ActorRecord(len(result.actors), cluster.start())
        result.actors.append(record)
        states[record.state] += 1
        starting[cluster.ready(record.handle)] = record

    def lease(record: ActorRecord, path: Path, copy: bool = False) -> None:
        tries[path] += 1
        now = cluster.now()
        if not record.leases:
            record.busy_since = record.progress_at = now
        given = Lease(cluster.process(record.handle, str(path), tries[path]), path, tries[path], path in alone,
                      given_at=now, copy=copy)
        record.leases.append(given)
        busy[given.ref] = record
        running[path] += 1
        room_changed(record)

    def lease_next() -> bool:
        """Give the next shard to :func:`pick_actor`'s choice; False when no actor can take it."""
        path, waiting = queue[0], len(queue)
        # a shard to run alone, or one of the run's last, goes only to an empty actor
        candidates = empty if path in alone or waiting <= live() else with_room
        record = pick_actor(candidates.values(), alone=path in alone, depth=depth, waiting=waiting, live=live())
        if record is None:
            return False
        lease(record, queue.popleft())
        return True

    def copy_stragglers() -> None:
        """No shard waits: give each idle actor a copy of a lease likely to finish last (the first
        commit of a shard stands; the other copy's commit is a no-op and its answer is ignored)."""
        if not empty:
            return
        for record, straggler in zip(list(empty.values()),
                                     pick_stragglers(result.actors, running, len(empty), suspects)):
            result.copies += 1
            lease(record, straggler.path, copy=True)

    def take_lease(record: ActorRecord, ref: Any) -> Lease:
        taken = next(lease for lease in record.leases if lease.ref == ref)
        record.leases.remove(taken)
        room_changed(record)
        del busy[ref]
        running[taken.path] -= 1
        if not running[taken.path]:
            del running[taken.path]
        return taken

    def end_busy_spell(record: ActorRecord) -> None:
        record.busy_s += cluster.now() - record.busy_since

    def actor_failed(record: ActorRecord, state: str, reason: str, why: str) -> None:
        """Its shards go back to the front of the queue. Alone on it, the shard is charged an
        attempt; beside others, none is (which of them broke the actor is unknown) and each is
        retried alone, where a failure is charged: a shard that always kills its actor costs its
        neighbours one retry, never their attempts. A shard committed meanwhile, or whose copy
        still runs elsewhere, needs nothing."""
        finished = cluster.wait([lease.ref for lease in record.leases], num_returns=len(record.leases), timeout=0)
        for ref in finished:  # committed before the actor failed: not a victim
            with contextlib.suppress(WorkFailed):
                committed(record, ref, cluster.get(ref))
        leases = [take_lease(record, lease.ref) for lease in list(record.leases)]
        if leases:
            end_busy_spell(record)
        if state == "lost":
            given_up.update((lease.ref, (record, lease)) for lease in leases)
        victims = [lease for lease in leases if lease.path not in running and lease.path in unfinished]
        for lease in reversed(victims):  # front of the queue, in the order they were given
            shard_failed(lease.path, why, charge=len(leases) == 1)
        if len(leases) > 1:
            alone.update(lease.path for lease in victims)
        retire(record, state, reason)

    def retire(record: ActorRecord, state: str, reason: str) -> None:
        set_state(record, state)
        record.reason = reason
        events.emit("actor_retired", actor=record.index, actor_node=record.node, state=state, reason=reason)
        if state == "dead":
            cluster.kill(record.handle)
        if start_failures < _MAX_START_FAILURES and queue:
            start_actor()

    def late_result(record: ActorRecord, lease: Lease) -> None:
        """``lease``, given up on and already taken out of ``given_up``, has answered."""
        try:
            late = cluster.get(lease.ref)["marker"]
        except WorkFailed as exc:
            result.late.append(f"{shard_name(lease.path)} attempt {lease.attempt} on {record.node}: {exc}")
            set_state(record, "dead")
            return
        result.late.append(f"{shard_name(lease.path)} attempt {lease.attempt} on {record.node}: finished late; "
                           f"the marker of attempt {late.get('attempt')} stands")
        if record.state == "lost" and all(other is not record for other, _ in given_up.values()):
            set_state(record, "ready")  # slow, not broken: it takes shards again
            record.reason = ""

    def shard_failed(path: Path, reason: str, charge: bool) -> None:
        result.retries += 1
        suspects.add(path)
        charged[path] += charge
        if charged[path] >= settings.ray_max_attempts:
            result.failed[shard_name(path)] = f"{reason} (attempt {charged[path]} of {settings.ray_max_attempts})"
            events.emit("shard_failed", shard=shard_name(path), reason=reason, attempt=tries[path], given_up=True)
            unfinished.discard(path)
        else:
            events.emit("shard_failed", shard=shard_name(path), reason=reason, attempt=tries[path], given_up=False,
                        charged=bool(charge))
            queue.appendleft(path)  # retried before new work, so a failing shard is decided early

    def committed(record: ActorRecord, ref: Any, done_shard: dict[str, Any]) -> None:
        done = take_lease(record, ref)
        record.progress_at = cluster.now()
        if not record.leases:
            end_busy_spell(record)
        if done.path not in unfinished:
            return  # the other copy of a copied shard committed first; this one's commit was a no-op
        unfinished.discard(done.path)
        result.copies_first += done.copy
        record.shards += 1
        record.samples += done_shard["marker"].get("samples", 0)
        marker = done_shard["marker"]
        result.committed.append(shard_name(done.path))
        result.counts.update(written=marker.get("written", 0), rejected=marker.get("rejected", 0))
        result.by_stage.update(marker.get("rejected_by_stage", {}))
        on_commit(shard_name(done.path), marker)

    unfinished: set[Path] = set(paths)  # neither committed nor failed
    for _ in range(cluster.actor_count()):
        start_actor()
    try:
        while unfinished:
            while queue and lease_next():
                pass
            if settings.ray_copy_stragglers and not queue:
                copy_stragglers()
            if states["ready"]:
                last_worker = cluster.now()
            elif cluster.now() - last_worker > _NO_WORKER_TIMEOUT_S or (not starting and queue):
                for path in queue:
                    result.failed[shard_name(path)] = "no worker actor could be started to run it"
                queue.clear()
                break
            done = cluster.wait([*starting, *busy, *given_up], num_returns=1, timeout=0.5)
            for ref in done:
                if ref in starting:
                    record = starting.pop(ref)
                    try:
                        info = cluster.get(ref)
                    except WorkFailed as exc:
                        start_failures += 1
                        retire(record, "dead", f"could not start: {exc}")
                        continue
                    start_failures = 0
                    record.node, record.pid = info["node"], info["pid"]
                    set_state(record, "ready")
                elif ref in busy:
                    record = busy[ref]
                    try:
                        committed(record, ref, cluster.get(ref))
                    except WorkFailed as exc:
                        actor_failed(record, "dead", str(exc),
                                     f"worker actor {record.index} on {record.node or '?'} died: {exc}")
                else:
                    late_result(*given_up.pop(ref))
            if settings.ray_lease_timeout:
                now = cluster.now()
                for record in result.actors:
                    if record.leases and now - record.progress_at > settings.ray_lease_timeout:
                        actor_failed(record, "lost", "lease timed out",
                                     f"worker actor {record.index} on {record.node} committed nothing for "
                                     f"--ray-lease-timeout {settings.ray_lease_timeout:g}s")
        # A worker given up on may only have been slow: a short wait lets it report (its commit
        # was refused if the shard was committed meanwhile) before it is stopped.
        deadline = cluster.now() + _LATE_GRACE_S
        while given_up and cluster.now() < deadline:
            for ref in cluster.wait(list(given_up), num_returns=1, timeout=0.5):
                late_result(*given_up.pop(ref))
        result.stages = _stage_figures(cluster.stage_figures([r.handle for r in result.actors if r.state == "ready"]))
    finally:
        for record in result.actors:
            cluster.kill(record.handle)
        result.wall_s = cluster.now() - start
    return result


def _stage_figures(per_actor: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per-stage figures summed over the actors still alive at the end."""
    totals: dict[str, dict[str, Any]] = {}
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
