"""A cluster on a virtual clock (an :class:`engine.cluster.actor.Cluster`): the real driver
of engine/cluster/driver.py (leasing, attempts, commits, markers, manifest, resume) runs against
a thousand simulated actors without a Ray process or an image. ``python -m bench scale`` and
tests/test_scale.py use it.

An actor loads its models for ``startup_s``, then works its leases one after another (a worker's
pipeline takes shards in the order given); each shard's work time is drawn from
:class:`WorkTimes`. A call reaches its actor, and an answer the driver, ``latency_s`` after it
is sent. An actor dies during a shard with probability ``death_rate``, and always during a
``poison`` shard; its pending calls then fail, as Ray's do. When a shard's work ends, the
worker's commit runs for real: the shard's marker (engine/io/commit.py's fields) is published
no-replace into ``markers/``, so a second copy's commit is the same no-op it is on a cluster.

Virtual time passes in :meth:`SimulatedCluster.wait` and, in between, by the driver's own CPU
time: a driver that spends a second per commit idles every actor for that second, as it would
on a cluster. The simulator's bookkeeping and the workers' commits are not the driver's and
are left out of both (``own_cpu_s``).
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.cluster.actor import WorkFailed
from engine.core.record import ShardEnd
from engine.io.commit import MARKERS_DIR, ShardMarkers, shard_info
from engine.io.readers import shard_name

SAMPLES_PER_SHARD = 10_000  # img2dataset's default shard


@dataclass(frozen=True)
class WorkTimes:
    """A shard's work time: log-normal around ``median_s``, and a ``straggler_share`` of shards
    ``straggler_factor`` times slower (a slow node, a shard of huge images)."""

    median_s: float = 600.0
    spread: float = 0.2  # sigma of the log-normal
    straggler_share: float = 0.01
    straggler_factor: tuple[float, float] = (2.0, 4.0)

    def draw(self, rng: random.Random) -> float:
        seconds = self.median_s * math.exp(rng.gauss(0.0, self.spread))
        if rng.random() < self.straggler_share:
            seconds *= rng.uniform(*self.straggler_factor)
        return seconds


@dataclass(eq=False)
class _Ref:
    """A call's answer: ``value`` (a shard's marker is read back from ``markers/``), or ``error``
    when its actor died."""

    actor: _Actor | None
    at: float  # when the answer reaches the driver (unless the actor dies first)
    shard: str = ""
    attempt: int = 0
    given: float = 0.0  # when the driver made the call
    work: tuple[float, float] = (0.0, 0.0)  # when its actor worked on it
    value: Any = None
    error: str = ""
    answered: bool = False
    stood: bool = False  # its commit was the shard's first (its marker stands)


@dataclass(eq=False)
class _Actor:
    index: int
    ready_at: float
    node: str
    free_at: float = 0.0
    dies_at: float = math.inf
    ended_at: float = math.inf  # died or was killed
    calls: list[_Ref] = field(default_factory=list)


class SimulatedCluster:
    def __init__(self, actors: int, out: Path, *, times: WorkTimes = WorkTimes(), startup_s: float = 60.0,
                 latency_s: float = 0.005, death_rate: float = 0.0, poison: frozenset[str] = frozenset(),
                 actors_per_node: int = 8, seed: int = 0):
        self.actors, self.times, self.startup_s, self.latency_s = actors, times, startup_s, latency_s
        self.death_rate, self.poison, self.actors_per_node = death_rate, poison, actors_per_node
        self.markers = ShardMarkers(out / MARKERS_DIR)
        self.rng = random.Random(seed)
        self.started: list[_Actor] = []
        self.calls: list[_Ref] = []
        self._events: list[tuple[float, int, str, Any]] = []  # (time, order, kind, ref or actor)
        self._order = itertools.count()
        self._unread: set[_Ref] = set()  # answered, not yet read by get()
        self._virtual = 0.0
        self._cpu_mark = time.process_time()
        self.own_cpu_s = 0.0

    # --- the Cluster interface ------------------------------------------------------------

    def actor_count(self) -> int:
        return self.actors

    def now(self) -> float:
        return self._virtual + time.process_time() - self._cpu_mark

    def start(self) -> _Actor:
        index = len(self.started)
        actor = _Actor(index, self.now() + self.latency_s + self.startup_s, f"sim-node-{index // self.actors_per_node}")
        actor.free_at = actor.ready_at
        self.started.append(actor)
        return actor

    def ready(self, actor: _Actor) -> _Ref:
        ref = _Ref(actor, actor.ready_at + self.latency_s, value={"node": actor.node, "pid": actor.index})
        return self._schedule(ref)

    def process(self, actor: _Actor, path: str, attempt: int) -> _Ref:
        now = self.now()
        shard = shard_name(Path(path))
        begin = max(now + self.latency_s, actor.free_at)
        end = begin + self.times.draw(self.rng)
        ref = _Ref(actor, end + self.latency_s, shard, attempt, now, (begin, end))
        actor.free_at = end
        if shard in self.poison or self.rng.random() < self.death_rate:
            death = begin + (end - begin) * self.rng.random()
            if death < actor.dies_at:
                actor.dies_at = death
                self._push(death, "death", actor)
        actor.calls.append(ref)
        self.calls.append(ref)
        if actor.ended_at < math.inf:
            ref.at = now + 2 * self.latency_s
        return self._schedule(ref)

    def wait(self, refs: list[_Ref], *, num_returns: int, timeout: float) -> list[_Ref]:
        """As ``ray.wait``, for answers not yet read (the driver reads each answer once)."""
        with self._own_time():
            self._advance(self._virtual)
            wanted = set(refs)
            done = [ref for ref in self._unread if ref in wanted]
            deadline = self._virtual + timeout
            while len(done) < num_returns and self._events and self._events[0][0] <= deadline:
                self._virtual = self._events[0][0]
                done += [ref for ref in self._advance(self._virtual) if ref in wanted]
            if len(done) < num_returns:
                self._virtual = deadline
            return done[:num_returns]

    def get(self, ref: _Ref) -> Any:
        """The answer; a shard's is the marker that stands, read back as the worker does (kept
        nowhere else: the simulator's memory stays apart from the driver's)."""
        with self._own_time():
            self._unread.discard(ref)
            if ref.error:
                raise WorkFailed(ref.error)
            if ref.shard:
                return {"shard": ref.shard, "marker": self.markers.read(ref.shard), "attempt": ref.attempt}
            return ref.value

    def kill(self, actor: _Actor) -> None:
        self._end(actor, self.now(), "killed by the driver")

    def stage_figures(self, handles: list[Any]) -> list[list[dict[str, Any]]]:
        return []

    # --- the simulated side -----------------------------------------------------------------

    @contextlib.contextmanager
    def _own_time(self):
        """The clock catches up with the driver's CPU time; what runs inside is not the driver's."""
        self._virtual = self.now()
        cpu = time.process_time()
        try:
            yield
        finally:
            self.own_cpu_s += time.process_time() - cpu
            self._cpu_mark = time.process_time()

    def _push(self, at: float, kind: str, item: Any) -> None:
        heapq.heappush(self._events, (at, next(self._order), kind, item))

    def _schedule(self, ref: _Ref) -> _Ref:
        self._push(ref.at, "answer", ref)
        return ref

    def _advance(self, until: float) -> list[_Ref]:
        """Play every event up to ``until``; returns the calls answered."""
        answered = []
        while self._events and self._events[0][0] <= until:
            at, _, kind, item = heapq.heappop(self._events)
            if kind == "death":
                answered += self._end(item, at, "ActorDiedError: the worker actor's process died")
            elif not item.answered:
                answered.append(self._answer(item))
        self._unread.update(answered)
        return answered

    def _answer(self, ref: _Ref) -> _Ref:
        ref.answered = True
        if ref.actor is not None and ref.actor.ended_at < math.inf and ref.shard:
            ref.error = "ActorDiedError: the actor is dead"
        elif ref.shard:  # the worker's commit: the marker is published no-replace
            end = ShardEnd(ref.shard, f"/shared/in/{ref.shard}.tar", SAMPLES_PER_SHARD)
            written = SAMPLES_PER_SHARD - 600
            marker = {**shard_info(end, ref.attempt, ref.actor.node), "written": written, "rejected": 600,
                      "rejected_by_stage": {"probe": 450, "qc": 150},
                      "files": {f"{folder}/{ref.shard}.{ext}": f"{hash((ref.shard, folder)) & (2**256 - 1):064x}"
                                for folder, ext in (("shards", "tar"), ("shards", "parquet"), ("rejects", "parquet"))}}
            stands = self.markers.write(ref.shard, marker)
            ref.stood = stands.get("attempt") == ref.attempt and stands.get("node") == ref.actor.node
        return ref

    def _end(self, actor: _Actor, at: float, why: str) -> list[_Ref]:
        """The actor is gone at ``at``: its unanswered calls fail now."""
        if actor.ended_at < math.inf:
            return []
        actor.ended_at = at
        failed = [ref for ref in actor.calls if not ref.answered]
        for ref in failed:
            ref.answered, ref.error = True, why
        return failed

    # --- what the run did, for the figures -------------------------------------------------------

    def usage(self, end: float) -> Usage:
        """GPU time up to ``end`` (the driver's return): busy, idle between shards (while shards
        wait) and at the tail (after the last shard was first given out), and work thrown away."""
        first_given: dict[str, float] = {}
        for ref in self.calls:
            if ref.shard:
                first_given[ref.shard] = min(first_given.get(ref.shard, math.inf), ref.given)
        tail_from = max(first_given.values(), default=end)
        usage = Usage(tail_s=end - tail_from)
        for actor in self.started:
            alive = (min(actor.ready_at, end), min(actor.ended_at, end))
            busy_before, busy_after = 0.0, 0.0
            for ref in actor.calls:
                begin, stop = max(ref.work[0], alive[0]), min(ref.work[1], alive[1], actor.dies_at)
                if stop <= begin:
                    continue
                busy_before += max(0.0, min(stop, tail_from) - begin)
                busy_after += max(0.0, stop - max(begin, tail_from))
                if not ref.stood:
                    usage.wasted_s += stop - begin
            usage.steady_s += max(0.0, min(alive[1], tail_from) - alive[0])
            usage.tail_gpu_s += max(0.0, alive[1] - max(alive[0], tail_from))
            usage.busy_steady_s += busy_before
            usage.busy_tail_s += busy_after
        return usage


@dataclass
class Usage:
    tail_s: float = 0.0  # from the last shard's first lease to the run's end
    steady_s: float = 0.0  # actor-seconds alive before the tail
    tail_gpu_s: float = 0.0  # actor-seconds alive during the tail
    busy_steady_s: float = 0.0
    busy_tail_s: float = 0.0
    wasted_s: float = 0.0  # work whose commit did not stand (a dead actor's, a losing copy's)

    @property
    def idle_between(self) -> float:
        return 1 - self.busy_steady_s / self.steady_s if self.steady_s else 0.0

    @property
    def idle_tail(self) -> float:
        return 1 - self.busy_tail_s / self.tail_gpu_s if self.tail_gpu_s else 0.0

    @property
    def idle(self) -> float:
        total = self.steady_s + self.tail_gpu_s
        return 1 - (self.busy_steady_s + self.busy_tail_s) / total if total else 0.0
