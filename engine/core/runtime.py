"""The staged runtime: one thread per stage, joined by bounded queues.

    source thread ─q─▶ stage 1 ─q─▶ stage 2 ─q─▶ … ─q─▶ writer (calling thread)

Queues carry lists of items (samples and :class:`ShardEnd` markers) and hold at most
``queue_depth`` lists, so a slow stage stops the ones before it (back-pressure) and memory
stays bounded. Each stage thread re-batches to its own batch size, flushes a partial batch
when a shard ends or its input runs dry, and forwards dead samples untouched; FIFO order
keeps every marker behind its shard's samples, so the writer can commit on it.
Queues bound the number of samples in flight, not their bytes (a shard of 127 MiB members once
sat whole in memory, +130 MB per member), so the source also waits while the image bytes
between it and the writer would pass ``max_bytes_in_flight`` (:class:`ByteBudget`). It hands
on what it holds first, and stages flush when their input runs dry, so the bytes it waits for
are on their way to the writer whatever the batch sizes (no deadlock); one sample larger than
the budget still runs, alone.
Torch, ONNX Runtime and PIL release the GIL in their kernels, which is what makes threads
(rather than processes) enough here, and keeps models loaded once per worker. A stage that asks
for ``workers`` > 1 has that many batches in ``process()`` at once, on helper threads; a shard's
marker then waits until every batch before it is out.

A stage may also come as several *replicas* (one per GPU, built by the placement in
``engine/core/placement.py``): each batch goes to whichever replica frees a slot first, so
faster devices take more; markers still wait for every batch before them, so the exactly-once
contract and the shard order hold whatever the number of replicas. A batch that raises fails
its own samples only; a replica whose batches raise ``_MAX_FAILED_BATCHES`` times in a row is
retired (a broken GPU), and the stage fails only when no replica is left. On a GPU, each thread
that runs batches has its own CUDA stream, so one batch's host→device copies (pinned,
non-blocking: ``models/preprocess.py``) overlap another's kernels.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from engine.core.record import Sample, ShardEnd
from engine.core.stage import Stage
from engine.ops import events

Item = Sample | ShardEnd
_STOP = object()  # end of input, passed down the chain
_IDLE_FLUSH_S = 0.2  # a partial batch waits at most this long for more input
_MAX_FAILED_BATCHES = 3  # a stage that raises on this many batches in a row is broken, not the data


@dataclass
class StageMetrics:
    name: str
    description: str = ""
    items: int = 0
    batches: int = 0
    busy_s: float = 0.0
    failed_batches: int = 0
    queue_depth_sum: int = 0
    queue_samples: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    # thread → (replica, start) of each batch in process(): where the stall alarm finds the oldest item
    running: dict[int, tuple[Stage, float]] = field(default_factory=dict, repr=False)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)  # batches on helper threads

    def as_dict(self, wall_s: float) -> dict[str, Any]:
        return {
            "stage": self.name,
            "description": self.description,
            "items": self.items,
            "batches": self.batches,
            "busy_s": round(self.busy_s, 3),
            "items_per_busy_s": round(self.items / self.busy_s, 2) if self.busy_s else None,
            "busy_share": round(self.busy_s / wall_s, 3) if wall_s else None,
            "mean_queue_depth": round(self.queue_depth_sum / self.queue_samples, 2) if self.queue_samples else 0,
            "failed_batches": self.failed_batches,
            **self.extra,
        }


class StageFailed(RuntimeError):
    """A stage raised repeatedly: a bug or a broken model, not a bad sample."""


class Pipeline:
    """``stages``: each entry a stage, or the replicas of one stage (same name, one per device)."""

    def __init__(self, stages: Sequence[Stage | Sequence[Stage]], queue_depth: int,
                 progress: Callable[[int, int], None] | None = None, *, max_bytes_in_flight: int | None = None):
        self.replicas = [[s] if isinstance(s, Stage) else list(s) for s in stages]
        self.stages = [replicas[0] for replicas in self.replicas]
        self.queue_depth = queue_depth
        self.budget = ByteBudget(max_bytes_in_flight)
        self.progress = progress
        self.metrics = [StageMetrics(s.name) for s in self.stages]
        self.queues: list[queue.Queue] = []  # each stage's inbox, then the writer's (live depths for engine/ops)
        self._stop = threading.Event()
        self._errors: list[BaseException] = []
        self.ready_s = 0.0  # time run() spent loading models before the first sample moved

    def stop(self) -> None:
        """Stop within a batch: reading stops, and each stage drops what it has not started
        (a whole list of items at a time, so a shard is either complete or its marker is dropped
        with it); batches already in ``process()`` finish. Committed shards stay committed; the
        others are redone by the next run, which is exact."""
        self._stop.set()

    def run(self, source: Iterator[Item], writer) -> tuple[Counter, bool]:
        """Drive ``source`` through the stages into ``writer``; returns rejects by stage."""
        queues = self.queues = [queue.Queue(self.queue_depth) for _ in range(len(self.stages) + 1)]
        ready = threading.Barrier(len(self.stages) + 1)
        threads = [threading.Thread(target=self._stage_loop, name=f"stage-{r[0].name}",
                                    args=(r, m, queues[i], queues[i + 1], ready), daemon=True)
                   for i, (r, m) in enumerate(zip(self.replicas, self.metrics))]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        try:
            ready.wait()  # every stage has loaded its model, or one failed and broke the barrier
            self.ready_s = time.perf_counter() - start
        except threading.BrokenBarrierError:
            for thread in threads:  # each returns at the broken barrier, tearing down what it loaded
                thread.join()
            raise self._errors[0] from None
        feeder = threading.Thread(target=self._feed, args=(source, queues[0]), name="source", daemon=True)
        feeder.start()
        rejects = self._write_loop(queues[-1], writer)
        feeder.join()
        for thread in threads:
            thread.join()
        if self._errors:
            raise self._errors[0]
        return rejects, self._stop.is_set()

    def _feed(self, source: Iterator[Item], out: queue.Queue) -> None:
        chunk: list[Item] = []
        try:
            for item in source:
                if self._stop.is_set():
                    break
                if chunk and not self.budget.fits(item):
                    out.put(chunk)  # the stages can free bytes only for the samples they have
                    chunk = []
                if not self.budget.take(item, self._stop):
                    break
                chunk.append(item)
                if len(chunk) >= 64 or isinstance(item, ShardEnd):
                    out.put(chunk)
                    chunk = []
            else:
                if chunk:
                    out.put(chunk)
        except BaseException as exc:  # noqa: BLE001 - reported by run()
            self._errors.append(exc)
            self._stop.set()
        out.put(_STOP)

    def _stage_loop(self, replicas: list[Stage], metrics: StageMetrics, inbox: queue.Queue,
                    outbox: queue.Queue, ready: threading.Barrier) -> None:
        stage = replicas[0]
        resources = stage.resources()
        batches = _Replicas(replicas, resources.workers, metrics)
        try:
            batches.set_up()
            metrics.description = stage.describe() + (f" x{len(replicas)} replicas" if len(replicas) > 1 else "")
        except BaseException as exc:  # noqa: BLE001 - reported by run()
            self._errors.append(exc)
            ready.abort()
            batches.close()  # tears down the replicas that did load
            return
        try:
            ready.wait()
        except threading.BrokenBarrierError:  # another stage could not load: nothing will run
            batches.close()
            return
        pending: list[Sample] = []

        def flush(passthrough: list[Item] | None = None) -> None:
            batches.submit(self._flush, metrics, pending, outbox, passthrough)

        try:
            while True:
                try:
                    items = inbox.get(timeout=_IDLE_FLUSH_S if pending else None)
                except queue.Empty:
                    if not self._stop.is_set():
                        flush()
                    pending = []
                    continue
                metrics.queue_depth_sum += inbox.qsize()
                metrics.queue_samples += 1
                if items is _STOP:
                    if not self._stop.is_set():
                        flush()
                    batches.drain()
                    outbox.put(_STOP)
                    return
                if self._stop.is_set():  # stopping: what has not reached process() is redone on resume
                    pending = []  # its shard's marker comes later and is dropped too: no commit
                    continue
                passthrough: list[Item] = []
                for item in items:
                    if isinstance(item, Sample) and item.alive:
                        pending.append(item)
                        if len(pending) >= resources.batch_size:
                            flush()
                            pending = []
                    elif isinstance(item, ShardEnd):
                        flush(passthrough)
                        batches.drain()  # the marker goes out after every sample of its shard
                        pending, passthrough = [], []
                        outbox.put([item])
                    else:
                        passthrough.append(item)
                if passthrough:
                    outbox.put(passthrough)
        except BaseException as exc:  # noqa: BLE001 - reported by run()
            self._errors.append(exc)
            self._stop.set()
            outbox.put(_STOP)
        finally:
            batches.close()  # waits for the batches in process(), then tears the replicas down
            extra = getattr(stage, "metrics", None)
            if callable(extra):
                metrics.extra.update(extra())

    def _flush(self, stage: Stage, metrics: StageMetrics, batch: list[Sample], outbox: queue.Queue,
               passthrough: list[Item] | None = None) -> Exception | None:
        """Run one batch on ``stage`` (one replica) and pass it on; returns what it raised."""
        error = None
        if batch:
            start = time.perf_counter()
            metrics.running[threading.get_ident()] = (stage, start)
            try:
                result = stage.process(batch)
                if len(result) != len(batch):
                    raise RuntimeError(f"stage {stage.name} returned {len(result)} samples for {len(batch)}")
            except StageFailed:  # the stage says it is broken (its engine died): no sample's fault
                raise
            except Exception as exc:  # noqa: BLE001 - the batch's samples fail; counted by _Replicas
                result, error = batch, exc
                for sample in batch:
                    sample.fail(stage.name, f"batch failed: {type(error).__name__}: {error}")
            with metrics.lock:
                metrics.failed_batches += error is not None
                metrics.busy_s += time.perf_counter() - start
                metrics.items += len(batch)
                metrics.batches += 1
                metrics.running.pop(threading.get_ident(), None)
            outbox.put(list(result) + (passthrough or []))
        elif passthrough:
            outbox.put(passthrough)
        return error

    def _write_loop(self, inbox: queue.Queue, writer) -> Counter:
        rejects: Counter = Counter()
        while True:
            items = inbox.get()
            if items is _STOP:
                return rejects
            for item in items:
                if isinstance(item, ShardEnd):
                    writer.commit(item)
                    continue
                writer.write(item)
                self.budget.give(item)
                if not item.alive:
                    rejects[item.stage] += 1
                if self.progress:
                    self.progress(1, 0 if item.alive else 1)


class ByteBudget:
    """The image bytes of the samples between the source and the writer, held under ``limit``
    (``None``: unbounded). A sample is charged when the source hands it on and freed when the
    writer has it; ``peak`` is the most ever held. An empty budget admits any sample."""

    def __init__(self, limit: int | None):
        self.limit = limit
        self.held = self.peak = 0
        self._charges: dict[int, int] = {}  # id(sample) -> its bytes when charged (a rejected one drops them)
        self._freed = threading.Condition()

    def fits(self, item: Item) -> bool:
        size = _image_bytes(item)
        return self.limit is None or not size or not self.held or self.held + size <= self.limit

    def take(self, item: Item, stop: threading.Event) -> bool:
        """Charge ``item`` once it fits; False when ``stop`` is set while it waits."""
        size = _image_bytes(item)
        if not size:
            return True
        with self._freed:
            while not self.fits(item):
                if stop.is_set():
                    return False
                self._freed.wait(0.1)
            self.held += size
            self.peak = max(self.peak, self.held)
            self._charges[id(item)] = size
        return True

    def give(self, item: Item) -> None:
        with self._freed:
            self.held -= self._charges.pop(id(item), 0)
            self._freed.notify_all()


def _image_bytes(item: Item) -> int:
    return len(item.image_bytes) if isinstance(item, Sample) else 0


class _Replicas:
    """Runs a stage's batches on its replicas. One replica: ``setup``, ``teardown`` and (with one
    worker) ``process`` in the stage's thread, ``workers`` > 1 on helper threads. Several: each
    replica has its own thread(s), which load it (all replicas load at once), run its batches
    and free it, so a replica only ever meets the threads of its own pool; each replica holds
    at most ``workers`` batches at once and a batch goes to the replica that frees a slot first.
    A batch's exception surfaces at the next ``submit`` or ``drain`` in the stage's thread."""

    def __init__(self, replicas: list[Stage], workers: int, metrics: StageMetrics):
        self.replicas, self.metrics = replicas, metrics
        name = replicas[0].name
        if len(replicas) > 1:
            self.pools = [ThreadPoolExecutor(workers, f"stage-{name}-{i}") for i in range(len(replicas))]
        else:
            self.pools = [ThreadPoolExecutor(workers, f"stage-{name}")] if workers > 1 else []
        self.free: queue.Queue[int] = queue.Queue()
        for _ in range(workers):
            for index in range(len(replicas)):  # interleaved: every replica gets work from the start
                self.free.put(index)
        self.failures = [0] * len(replicas)  # batches in a row that raised, per replica
        self.retired: set[int] = set()
        self.items = [0] * len(replicas)
        self.lock = threading.Lock()
        self.running: list[Future] = []
        self.loaded: list[int] = []

    def set_up(self) -> None:
        if len(self.replicas) == 1:
            self.replicas[0].setup()
            self.loaded.append(0)
            return
        # The first replica loads alone: the libraries' first imports (transformers' lazy
        # modules) are not thread-safe, and two replicas importing at once failed with
        # "cannot import name". The others then load at once.
        self.pools[0].submit(self.replicas[0].setup).result()
        self.loaded.append(0)
        futures = [pool.submit(replica.setup) for pool, replica in zip(self.pools[1:], self.replicas[1:])]
        wait(futures)
        self.loaded += [i for i, future in enumerate(futures, 1) if future.exception() is None]
        for future in futures:
            future.result()  # the first setup error, if any

    def submit(self, fn: Callable[..., Exception | None], *args: Any) -> None:
        """``fn(replica, *args)`` on a free replica; it returns what the batch raised, or None."""
        if not self.pools:
            self._run(0, fn, args)
            return
        index = self._take()  # back-pressure: never more than `workers` batches per replica
        self._collect(block=False)
        pool = self.pools[index] if len(self.pools) > 1 else self.pools[0]
        self.running.append(pool.submit(self._run, index, fn, args))

    def _take(self) -> int:
        while True:
            try:
                index = self.free.get(timeout=0.1)
            except queue.Empty:
                self._collect(block=False)  # raises once the last replica is retired
                continue
            if index not in self.retired:
                return index

    def _run(self, index: int, fn: Callable[..., Exception | None], args: tuple) -> None:
        replica = self.replicas[index]
        batch = args[1]
        try:
            with _device_stream(replica.resources().device):
                error = fn(replica, *args)
        except BaseException:
            self.free.put(index)
            raise
        with self.lock:
            self.items[index] += len(batch)
            if error is None:
                self.failures[index] = 0
            else:
                self.failures[index] += 1
                if self.failures[index] >= _MAX_FAILED_BATCHES:
                    self._retire(index, error)
            if len(self.replicas) > 1:
                self.metrics.extra["replica_items"] = {
                    f"{i}:{r.resources().device}": n for i, (r, n) in enumerate(zip(self.replicas, self.items))}
        self.free.put(index)

    def _retire(self, index: int, error: Exception) -> None:
        name = self.replicas[index].name
        where = f" on replica {index} ({self.replicas[index].resources().device})" if len(self.replicas) > 1 else ""
        message = (f"stage {name!r} failed {_MAX_FAILED_BATCHES} batches in a row{where}; "
                   f"last error: {type(error).__name__}: {error}")
        self.retired.add(index)
        if len(self.retired) == len(self.replicas):
            raise StageFailed(message) from error
        self.metrics.extra.setdefault("retired_replicas", []).append(index)
        events.emit("replica_retired", stage=name, replica=index, device=self.replicas[index].resources().device,
                    reason=f"{type(error).__name__}: {error}")
        print(f"warning: {message}; its batches go to the other replicas", file=sys.stderr, flush=True)

    def drain(self) -> None:
        """Wait for every batch submitted so far (their outputs are then in the outbox)."""
        self._collect(block=True)

    def close(self) -> None:
        """Wait for the batches in process() (after a failure, drop those not started), then
        tear down every replica that loaded, in the thread that loaded it."""
        if len(self.replicas) == 1:
            for pool in self.pools:
                pool.shutdown(wait=True, cancel_futures=True)
            if self.loaded:
                self.replicas[0].teardown()
            return
        wait(self.running)  # a replica holds at most `workers` batches: all of them started
        teardowns = [self.pools[i].submit(self.replicas[i].teardown) for i in self.loaded]
        for pool in self.pools:
            pool.shutdown(wait=True)
        for future in teardowns:
            future.result()

    def _collect(self, block: bool) -> None:
        still = []
        for future in self.running:
            if block or future.done():
                future.result()  # re-raises the batch's StageFailed in the stage's thread
            else:
                still.append(future)
        self.running = still


_streams = threading.local()


@contextlib.contextmanager
def _device_stream(device: str):
    """On a GPU: the calling thread's own CUDA stream on ``device`` (made once), after the work
    queued on the default stream (the weights ``setup`` loaded); on the CPU: nothing."""
    if not device.startswith("cuda"):
        yield
        return
    import torch

    streams = _streams.__dict__.setdefault("by_device", {})
    if device not in streams:
        streams[device] = torch.cuda.Stream(device=device)
    stream = streams[device]
    stream.wait_stream(torch.cuda.default_stream(device))
    with torch.cuda.device(device), torch.cuda.stream(stream):
        yield
    stream.synchronize()  # the batch's results are complete before the next stage reads them


class StopOnSignals:
    """Ctrl-C (SIGINT) or SIGTERM (a scheduler's stop): the pipeline stops within a batch
    (``Pipeline.stop``), saying so; the same signal again exits at once (``128 + signal``),
    leaving the shards in flight uncommitted, which a rerun redoes. Only the main thread can
    take signals; elsewhere (a cluster actor's worker) this does nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, pipeline: Pipeline):
        self.pipeline = pipeline
        self._previous: dict[int, Any] = {}
        self.received: int | None = None  # the signal that stopped the run

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.received is not None:
            print(f"\n{name} again: stopping at once; the shards in flight are redone on resume",
                  file=sys.stderr, flush=True)
            os._exit(128 + signum)  # threads in process() cannot be interrupted: don't wait for them
        self.received = signum
        print(f"\n{name}: stopping after the batches in progress (seconds); committed shards stay, "
              f"the shard in flight is redone when you rerun with the same --out "
              f"({'Ctrl-C' if signum == signal.SIGINT else name} again to stop at once)", file=sys.stderr, flush=True)
        self.pipeline.stop()

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        return False
