"""One invocation of a pass as it runs, seen from outside its threads: what the metrics endpoint
serves (engine/ops/prometheus.py), the events it logs, and the stall alarm.

Everything is read from what the runtime already keeps (the pipeline's :class:`StageMetrics`,
its queues, the stages' ``metrics()``, the sink's counts); the watch adds only what nobody
counted live: rejects by stage *and reason*, and when the last sample reached the writer.

The stall alarm: when no sample reaches the writer (and no shard commits) for ``--stall-seconds``
after the models loaded, the oldest item still in the pipeline is found (items move in order, so it is the one
furthest downstream: a batch in some stage's ``process()``, else a full queue, else the reader)
and reported once per stall, with its stage and replica.
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from engine.core.record import Sample, ShardEnd
from engine.core.runtime import Pipeline
from engine.core.sink import Sink
from engine.ops import events

_REASON_HEAD = re.compile(r"[A-Za-z][A-Za-z _-]{0,39}")


def reason_label(sample: Sample) -> str:
    """A bounded label for why a sample was rejected: the head of its reason when that is a short
    phrase of words ('too small', 'batch failed', a QC rule), else its status (filtered, error);
    never the free text (keys, sizes, exception messages would make one series per sample)."""
    head = sample.reason.split(":", 1)[0].strip()
    return head if _REASON_HEAD.fullmatch(head) else sample.status


@dataclass(frozen=True)
class Stall:
    stage: str  # where the oldest item is: a stage, "writer" (queued for it) or "source" (being read)
    replica: str  # "0:cuda:0" for a batch in process() on a replica, "queued", or "-"
    since: float  # time.monotonic() of the last sample that finished


class RunWatch:
    def __init__(self, pass_name: str, pipeline: Pipeline, sink: Sink, *, shards_total: int, shards_before: int,
                 expected_samples: list[int | None], stall_seconds: float):
        self.pass_name, self.pipeline, self.sink = pass_name, pipeline, sink
        self.shards_total, self.shards_before = shards_total, shards_before
        self.expected = sum(expected_samples) if None not in expected_samples else None
        self.stall_seconds = stall_seconds
        self.started = time.monotonic()
        self.rejected: Counter[tuple[str, str]] = Counter()  # (stage, reason)
        self.shards_committed = 0
        self.running = True
        self.stall: Stall | None = None
        self._ready_at: float | None = None  # when the models had loaded
        self._last_sample: float | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch_stalls, name="stall-alarm", daemon=True)

    def __enter__(self) -> RunWatch:
        if self.stall_seconds:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.running = False
        self._done.set()
        if self._thread.is_alive():
            self._thread.join()

    # --- fed by the driver's writer wrapper (the writer's thread) ---

    def sample_written(self, sample: Sample) -> None:
        if not sample.alive:
            self.rejected[(sample.stage or "?", reason_label(sample))] += 1
        self._progressed()

    def shard_committed(self, end: ShardEnd, marker: dict[str, Any], problems: list[str]) -> None:
        self.shards_committed += 1
        self._progressed()  # a commit (even of an empty shard) is progress too
        events.emit("shard_committed", pass_name=self.pass_name, shard=end.shard, samples=marker.get("samples"),
                    written=marker.get("written"), rejected=marker.get("rejected"), attempt=marker.get("attempt"),
                    problems=problems)

    # --- read by the metrics endpoint (its own thread) ---

    @property
    def ready(self) -> bool:
        return self.pipeline.ready_s > 0

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    @property
    def processed(self) -> int:
        return self.sink.written + self.sink.rejected

    @property
    def images_per_s(self) -> float:
        return self.processed / self.elapsed_s if self.elapsed_s else 0.0

    @property
    def eta_s(self) -> float | None:
        """Time left at this invocation's rate: by samples when every shard's count is known
        up front (tar indexes, parquet row counts), else by shards."""
        if not self.running:
            return 0.0
        if self.expected is not None and self.processed:
            return max(self.expected - self.processed, 0) / self.images_per_s
        if self.shards_committed:
            left = self.shards_total - self.shards_before - self.shards_committed
            return left * self.elapsed_s / self.shards_committed
        return None

    @property
    def seconds_since_last_sample(self) -> float:
        """Since the last sample reached the writer, or the models loaded; 0 before, and after the run."""
        since = self._since()
        return time.monotonic() - since if since is not None and self.running else 0.0

    def _since(self) -> float | None:
        if self._ready_at is None and self.ready:
            self._ready_at = time.monotonic()  # first seen loaded (within a tick, or a scrape)
        return self._last_sample or self._ready_at

    def stage_figures(self) -> list[dict[str, Any]]:
        """Per stage: the runtime's counters, its live queue depth and busy share, and the sum over
        its replicas of what their ``metrics()`` report (numbers only)."""
        elapsed = self.elapsed_s
        queues = self.pipeline.queues
        found = []
        for index, (replicas, m) in enumerate(zip(self.pipeline.replicas, self.pipeline.metrics)):
            extra: dict[str, float] = {}
            for replica in replicas:
                for key, value in _stage_metrics(replica).items():
                    if isinstance(value, (int, float)) and not isinstance(value, bool):
                        # counts add up over replicas; a rate or ratio is the first replica's
                        extra[key] = extra.get(key, 0) + value if _is_count(key) or key not in extra else extra[key]
            found.append({"stage": m.name, "items": m.items, "batches": m.batches, "failed_batches": m.failed_batches,
                          "busy_s": m.busy_s, "busy_share": m.busy_s / elapsed if elapsed else 0.0,
                          "queue_depth": queues[index].qsize() if queues else 0, "extra": extra})
        return found

    # --- the stall alarm ---

    def _progressed(self) -> None:
        self._last_sample = time.monotonic()
        if self.stall is not None:
            events.emit("stall_ended", text=f"stall over: samples finish again ({self.stall.stage} moved on)",
                        stage=self.stall.stage, replica=self.stall.replica,
                        stalled_s=round(time.monotonic() - self.stall.since, 1))
            self.stall = None

    def _watch_stalls(self) -> None:
        tick = min(1.0, self.stall_seconds / 4)
        while not self._done.wait(tick):
            since = self._since()
            if since is not None and self.stall is None and time.monotonic() - since >= self.stall_seconds:
                stage, replica = oldest_item(self.pipeline)
                self.stall = Stall(stage, replica, since)
                events.emit("stalled", text=f"warning: no sample finished for {time.monotonic() - since:.0f} s "
                                            f"(--stall-seconds {self.stall_seconds:g}); {_where(stage, replica)}",
                            stage=stage, replica=replica, stalled_s=round(time.monotonic() - since, 1))


def oldest_item(pipeline: Pipeline) -> tuple[str, str]:
    """(stage, replica) holding the oldest item: items keep their order, so it is the furthest
    downstream one, looked for from the writer back to the reader."""
    queues = pipeline.queues
    if queues and queues[-1].qsize():
        return "writer", "queued"
    for index in reversed(range(len(pipeline.stages))):
        running = list(pipeline.metrics[index].running.values())
        if running:
            stage, _ = min(running, key=lambda r: r[1])
            replicas = pipeline.replicas[index]
            number = next((i for i, r in enumerate(replicas) if r is stage), 0)
            return pipeline.stages[index].name, f"{number}:{stage.resources().device}"
        if queues and queues[index].qsize():
            return pipeline.stages[index].name, "queued"
    return "source", "-"


def _where(stage: str, replica: str) -> str:
    if stage == "source":
        return "nothing is in the pipeline: the reader waits for input (slow or blocked storage?)"
    if stage == "writer":
        return "the oldest item waits for the writer"
    if replica == "queued":
        return f"the oldest item is queued before stage {stage!r}"
    return f"the oldest item is in stage {stage!r}, replica {replica}"


def _is_count(key: str) -> bool:
    return not any(part in key for part in ("per_s", "rate", "share", "per_image", "mean", "peak"))


def _stage_metrics(stage) -> dict[str, Any]:
    figures = getattr(stage, "metrics", None)
    if not callable(figures):
        return {}
    try:
        return figures()
    except RuntimeError:  # a dict changed size under a live read: the next scrape gets it
        return {}
