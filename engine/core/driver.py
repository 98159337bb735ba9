"""The one driver of both passes: a pass supplies its stages and its sink, the driver checks and
assembles it, and an executor runs the shards left.

    resolve the config ─▶ expand and check the shards ─▶ build the stages (their checks; no
    model loads before setup) ─▶ open the sink: its manifest says what is done ─▶ nothing
    left? summary, no model loaded ─▶ else the executor runs the shards left ─▶ summary ─▶
    metrics.json (every invocation, and the output's totals)

Two executors: :class:`InProcess` (the Pipeline under StopOnSignals with the progress bar,
here) and the Ray executor (engine/cluster/executor.py: the shards leased to worker actors,
each of which builds its stages, sink and reader with :func:`open_worker`, the same code as
here). The CLI picks one; this module knows neither Ray nor the cluster.

Pass 2 is ``engine.core.pipeline`` (``run``), pass 1 ``engine.curate.pass1``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from engine.core.config import RunConfig
from engine.core.console import ProgressBar
from engine.core.figures import MetricsFile, OutputTotals, RunSummary, shard_problems
from engine.core.record import Sample, ShardEnd
from engine.core.runtime import Item, Pipeline, StopOnSignals
from engine.core.sink import Sink
from engine.core.stage import Stage
from engine.core.subset import take_subset
from engine.io.object_output import OutPath, output_root
from engine.io.readers import expand_shards, expected_samples, shard_items, shard_name
from engine.ops import events, prometheus
from engine.ops.watch import RunWatch
from models.base import resolve_device
from models.errors import ConfigError

Source = Callable[[set[str]], Iterator[Sample | ShardEnd]]  # finished shard names → items
ShardItems = Callable[[Path], Iterator[Item]]  # one shard's items, its ShardEnd last
# The config → how a shard is read; a module-level function, so a Ray actor is handed it and
# builds its own reader where it runs (the curated reader opens pass 1's store).
Reader = Callable[[RunConfig], ShardItems]


def resolved(cfg: RunConfig) -> RunConfig:
    """The config with ``auto`` settled (device), so every stage sees the same answer."""
    runtime = dataclasses.replace(cfg.runtime, device=resolve_device(cfg.runtime.device))
    return dataclasses.replace(cfg, runtime=runtime)


def input_shards(cfg: RunConfig) -> ShardItems:
    """The default reader: the samples of ``--shards`` as they are."""
    return lambda path: shard_items(path, cfg.input)


@dataclass(frozen=True)
class Pass:
    """What makes a pass a pass: where it writes, into what, through which stages.

    ``open_sink(cfg, root)`` opens the driver's sink (it records the manifest);
    ``open_sink(cfg, root, worker=True)`` a worker's beside others (a Ray actor's): it publishes
    its shards' files and markers, and the driver records them (engine/io/commit.py)."""

    name: str
    folder: str  # under --out ("" for OUT itself): the sink's manifest and metrics.json live there
    open_sink: Callable[..., Sink]
    build_stages: Callable[[RunConfig], list[Stage | list[Stage]]]  # a list: one stage's replicas
    outputs: tuple[str, ...]  # folders under the pass's root that the summary points to
    resolve: Callable[[RunConfig], RunConfig] = resolved  # the config with ``auto`` settled

    def root(self, cfg: RunConfig) -> OutPath:
        """The pass's output folder (created) or prefix on object storage: its sink, manifest and
        metrics.json."""
        return output_root(cfg.runtime.out, self.folder)


@dataclass(frozen=True)
class Work:
    """What the driver hands an executor once every check passed and the sink is open."""

    spec: Pass
    given: RunConfig  # as the CLI built it: a Ray actor settles ``auto`` (the device) on its own node
    cfg: RunConfig  # resolved here
    reader: Reader
    source: Source | None  # in process only: items instead of the shards' (a test's, a benchmark's)
    stages: list[Stage | list[Stage]]  # built here for their checks; their models load in setup()
    sink: Sink
    todo: list[Path]  # the shards the sink has not finished, in order
    expected: list[int | None]  # samples in each of ``todo``, where a shard's header says
    summary: RunSummary  # the invocation before any work: what was skipped, the totals


class Executor(Protocol):
    """Runs the shards a pass has left: :class:`InProcess`, or on Ray (engine/cluster/executor.py)."""

    def device(self, cfg: RunConfig) -> str:
        """What metrics.json records as the invocation's device."""

    def run(self, work: Work) -> RunSummary:
        """Every shard of ``work.todo`` to its commit into ``work.sink`` (or a stop); what was done."""

    def figures(self) -> dict[str, Any]:
        """Its own figures of the last invocation, added to its metrics.json entry ({} when none)."""

    def describe(self) -> str:
        """What the console shows after the pass's summary ("" when nothing)."""


def shard_source(paths: list[Path], cfg: RunConfig, skip: set[str], reader: Reader = input_shards) -> Iterator[Item]:
    """The items of ``paths`` but those named in ``skip``, read by ``reader``."""
    read = reader(cfg)
    for path in paths:
        if shard_name(path) not in skip:
            yield from read(path)


def run_pass(cfg: RunConfig, spec: Pass, executor: Executor | None = None, *, paths: list[Path] | None = None,
             source: Source | None = None, reader: Reader = input_shards) -> RunSummary:
    """Run ``spec`` over ``paths`` (default: ``--shards``), read by ``reader``, or over ``source``
    (items of the shards not yet finished), on ``executor`` (default: :class:`InProcess`).
    Everything is checked (shards exist, models found, output writable) before anything is
    written or loaded."""
    executor = executor or InProcess()
    given, cfg = cfg, spec.resolve(cfg)
    events.configure(cfg.ops.log_format, cfg.ops.log_file)
    prometheus.endpoint(cfg.ops.metrics_port)  # a port in use is refused here, before any work
    paths = expand_shards(cfg.input.shards) if paths is None else paths
    if not paths and source is None:
        raise ConfigError("no input shards: pass --shards (tar, parquet or image folders)")
    expected = [expected_samples(path) for path in paths]  # also refuses what is no shard
    stages = spec.build_stages(cfg)  # their checks, every model resolved at once; models load later, in setup()
    root = spec.root(cfg)
    sink = spec.open_sink(cfg, root)
    sink.settle([shard_name(p) for p in paths])
    skipped = [shard_name(p) for p in paths if shard_name(p) in sink.finished]
    summary = RunSummary(shards_done=[], shards_skipped=skipped, written=0, rejected=0, rejects_by_stage={},
                         wall_s=0.0, interrupted=False, stages=[], root=root, outputs=spec.outputs,
                         shards_total=len(paths), totals=OutputTotals.of(sink.manifest))
    metrics = MetricsFile(root / "metrics.json")
    metrics.start(spec.name, cfg.to_dict(), summary.totals)
    if paths and len(skipped) == len(paths):  # a rerun of a finished output: no model is loaded
        sink.close()
    else:
        left = [(p, n) for p, n in zip(paths, expected) if shard_name(p) not in sink.finished]
        summary = executor.run(Work(spec, given, cfg, reader, source, stages, sink, [p for p, _ in left],
                                    [n for _, n in left], summary))
        summary.totals = OutputTotals.of(sink.manifest)
    metrics.invocations[-1].update(executor.figures())
    metrics.finish(summary, executor.device(cfg))
    if summary.interrupted:
        events.emit("interrupted", pass_name=spec.name, shards_committed=len(summary.shards_done),
                    shards_left=summary.shards_left)
    prometheus.wait_for_final_scrape(cfg.ops.metrics_port, cfg.ops.metrics_final_scrape_s)
    return summary


def open_worker(cfg: RunConfig, spec: Pass, reader: Reader) -> tuple[list[Stage | list[Stage]], Sink, ShardItems]:
    """``spec`` as one worker among others runs it (a Ray actor: engine/cluster/worker.py): the
    config settled, the stages, the sink and the shard reading of :func:`run_pass`, with a
    worker's sink (its commits are recorded by the driver) and no progress bar."""
    cfg = spec.resolve(dataclasses.replace(cfg, runtime=dataclasses.replace(cfg.runtime, progress=False)))
    read = reader(cfg)
    return (spec.build_stages(cfg), spec.open_sink(cfg, spec.root(cfg), worker=True),
            lambda path: take_subset(read(path), cfg.subset))


class InProcess:
    """The executor of one node: the Pipeline in this process under StopOnSignals, with the
    progress bar and the run's watch (metrics, events, stall alarm)."""

    def device(self, cfg: RunConfig) -> str:
        return cfg.runtime.device

    def figures(self) -> dict[str, Any]:
        return {}

    def describe(self) -> str:
        return ""

    def run(self, work: Work) -> RunSummary:
        cfg, sink, summary = work.cfg, work.sink, work.summary
        before = set(sink.finished)
        items = work.source(before) if work.source else shard_source(work.todo, cfg, before, work.reader)
        items = take_subset(items, cfg.subset)
        pipeline = Pipeline(work.stages, cfg.runtime.queue_depth, max_bytes_in_flight=cfg.runtime.max_bytes_in_flight)
        progress = ProgressBar(cfg.runtime.progress, pipeline.stages, shards_total=summary.shards_total,
                               shards_before=len(summary.shards_skipped), expected_samples=work.expected)
        pipeline.progress = progress.update
        watch = RunWatch(work.spec.name, pipeline, sink, shards_total=summary.shards_total,
                         shards_before=len(summary.shards_skipped), expected_samples=work.expected,
                         stall_seconds=cfg.ops.stall_seconds)
        served = prometheus.endpoint(cfg.ops.metrics_port)
        if served is not None:
            served.follow(watch)
        start = time.perf_counter()
        try:
            with StopOnSignals(pipeline), watch:
                rejects, interrupted = pipeline.run(items, _Reporting(sink, progress, watch))
        finally:
            sink.close()
            progress.close()
        wall = time.perf_counter() - start
        return dataclasses.replace(
            summary, shards_done=sorted(sink.finished - before), written=sink.written, rejected=sink.rejected,
            rejects_by_stage=dict(rejects), wall_s=wall,
            interrupted=interrupted and not {shard_name(p) for p in work.todo} <= sink.finished,
            stages=[m.as_dict(wall) for m in pipeline.metrics],
            figures={k: v for stage in pipeline.stages for k, v in stage.progress().items()},
        )


class _Reporting:
    """The sink as the runtime sees it, telling the progress bar (and the console) and the run's
    watch (metrics, events, stall alarm: engine/ops/) of each sample and commit."""

    def __init__(self, sink: Sink, progress: ProgressBar, watch: RunWatch):
        self.sink, self.progress, self.watch = sink, progress, watch

    def write(self, sample: Sample) -> None:
        self.sink.write(sample)
        self.watch.sample_written(sample)

    def commit(self, end: ShardEnd) -> None:
        self.sink.commit(end)
        marker = self.sink.committed.pop(end.shard)
        problems = shard_problems(marker)
        self.progress.shard_committed(end, problems)
        self.watch.shard_committed(end, marker, problems)
