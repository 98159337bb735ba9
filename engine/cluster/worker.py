"""One worker of a Ray run: the single-node pipeline, kept running, fed shard after shard.

The stages are built and their models loaded once, when the worker starts; a shard given to
:meth:`ShardWorker.process` goes into the running pipeline's source and the call returns when
the shard is committed (engine/io/commit.py), with its marker: metadata only, the samples stay
on shared storage. Plain Python (no Ray import), so the engine part is testable on its own;
engine/cluster/actor.py makes it a Ray actor.
"""

from __future__ import annotations

import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.cluster.faults import STALL_S, faults_for
from engine.core.config import RunConfig, RuntimeConfig
from engine.core.driver import Pass, Reader, open_worker
from engine.core.record import Sample, ShardEnd
from engine.core.runtime import Item, Pipeline
from engine.io.readers import shard_name
from engine.io.remote import as_shard


@dataclass
class _Lease:
    attempt: int
    faults: set[str]
    done: threading.Event = field(default_factory=threading.Event)
    result: dict[str, Any] | None = None


class ShardWorker:
    """``stages`` run over the shards given to :meth:`process`; ``sink`` (a dataset writer or an
    embedding store in worker mode) commits each; ``shard_items`` reads one shard."""

    def __init__(self, stages: list, sink, shard_items: Callable[[Path], Iterator[Item]], runtime: RuntimeConfig):
        self.sink, self.shard_items = sink, shard_items
        self.pipeline = Pipeline(stages, runtime.queue_depth, max_bytes_in_flight=runtime.max_bytes_in_flight)
        self._inbox: queue.Queue[Path] = queue.Queue()
        self._leases: dict[str, _Lease] = {}
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="shard-worker", daemon=True)
        self._thread.start()

    def ready(self) -> None:
        """Wait until every stage has loaded its model; raise what stopped one."""
        while not self._started.wait(0.1):
            if self._error is not None:
                raise RuntimeError(f"worker could not start: {type(self._error).__name__}: {self._error}") from self._error

    def process(self, path: str, attempt: int) -> dict[str, Any]:
        """Run one shard to its commit; returns the shard's marker. Safe to call from several
        threads: shards given while another is in flight queue behind it in the same pipeline."""
        name = shard_name(as_shard(path))
        lease = self._leases[name] = _Lease(attempt, faults_for(name, attempt))
        self.sink.attempts[name] = attempt
        self._inbox.put(as_shard(path))
        while not lease.done.wait(0.2):
            if self._error is not None:
                raise RuntimeError(f"shard {name}: the worker's pipeline stopped: "
                                   f"{type(self._error).__name__}: {self._error}") from self._error
        del self._leases[name]
        return lease.result

    def figures(self) -> list[dict[str, Any]]:
        """Per-stage figures so far (the same as a single-node run's metrics.json ``stages``)."""
        return [m.as_dict(0.0) for m in self.pipeline.metrics]

    # --- the pipeline's side -------------------------------------------------------------

    def _run(self) -> None:
        try:
            self.pipeline.run(self._source(), self)
        except BaseException as exc:  # noqa: BLE001 - reported to the caller of process()
            self._error = exc

    def _source(self) -> Iterator[Item]:
        self._started.set()  # the pipeline reads its source only after every stage is set up
        while True:  # the actor lives as long as the driver needs it; Ray ends its process
            path = self._inbox.get()
            items = self.shard_items(path)
            if "kill" in self._leases[shard_name(path)].faults:
                items = _killed_half_way(items)
            yield from items

    def write(self, sample: Sample) -> None:
        self.sink.write(sample)

    def commit(self, end: ShardEnd) -> None:
        lease = self._leases[end.shard]
        if "freeze" in lease.faults:
            os.kill(os.getpid(), signal.SIGSTOP)  # test-only (faults.py): a worker frozen before it commits
        if "stall" in lease.faults:
            time.sleep(STALL_S)  # test-only (faults.py): a slow shard
        self.sink.commit(end)
        marker = self.sink.committed.pop(end.shard)
        lease.result = {"shard": end.shard, "marker": marker, "attempt": lease.attempt}
        lease.done.set()


def _killed_half_way(items: Iterator[Item]) -> Iterator[Item]:
    """Test-only (faults.py): the worker dies by SIGKILL with half of the shard's samples read."""
    items = list(items)
    yield from items[: max(1, len(items) // 2)]
    os.kill(os.getpid(), signal.SIGKILL)


def build_worker(cfg: RunConfig, spec: Pass, reader: Reader) -> ShardWorker:
    """The worker of one pass: its stages, its sink and how it reads a shard, as the one driver
    assembles them (engine/core/driver.py)."""
    stages, sink, shard_items = open_worker(cfg, spec, reader)
    return ShardWorker(stages, sink, shard_items, cfg.runtime)  # queue depth and bytes in flight: not resolved
