"""The one driver of both passes: a pass supplies its stages and its sink, the driver does the rest.

    resolve the config ─▶ expand and check the shards ─▶ build the stages (their checks; no
    model loads before setup) ─▶ open the sink: its manifest says what is done ─▶ nothing
    left? summary, no model loaded ─▶ else the Pipeline under StopOnSignals with the progress
    bar ─▶ summary ─▶ metrics.json (every invocation, and the output's totals)

Pass 2 is ``engine.core.pipeline`` (``run``), pass 1 ``engine.curate.pass1``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from engine.core.config import RunConfig
from engine.core.console import ProgressBar
from engine.core.errors import ConfigError
from engine.core.figures import MetricsFile, OutputTotals, RunSummary, shard_problems
from engine.core.record import Sample, ShardEnd
from engine.core.runtime import Item, Pipeline, StopOnSignals
from engine.core.sink import Sink
from engine.core.stage import Stage
from engine.core.subset import take_subset
from engine.io.object_output import output_root
from engine.io.readers import expand_shards, expected_samples, shard_items, shard_name
from engine.ops import events, prometheus
from engine.ops.watch import RunWatch
from models.base import resolve_device

Source = Callable[[set[str]], Iterator[Sample | ShardEnd]]  # finished shard names → items


def resolved(cfg: RunConfig) -> RunConfig:
    """The config with ``auto`` settled (device), so every stage sees the same answer."""
    runtime = dataclasses.replace(cfg.runtime, device=resolve_device(cfg.runtime.device))
    return dataclasses.replace(cfg, runtime=runtime)


@dataclass(frozen=True)
class Pass:
    """What makes a pass a pass: where it writes, into what, through which stages."""

    name: str
    folder: str  # under --out ("" for OUT itself): the sink's manifest and metrics.json live there
    open_sink: Callable[[RunConfig, Path], Sink]
    build_stages: Callable[[RunConfig], list[Stage | list[Stage]]]  # a list: one stage's replicas
    outputs: tuple[str, ...]  # folders under the pass's root that the summary points to
    resolve: Callable[[RunConfig], RunConfig] = resolved  # the config with ``auto`` settled


def shard_source(paths: list[Path], cfg: RunConfig, skip: set[str]) -> Iterator[Item]:
    for path in paths:
        if shard_name(path) in skip:
            continue
        yield from shard_items(path, cfg.input)


def run_pass(cfg: RunConfig, spec: Pass, *, paths: list[Path] | None = None,
             source: Source | None = None) -> RunSummary:
    """Run ``spec`` over ``paths`` (default: ``--shards``) or over ``source`` (items of the
    shards not yet finished, e.g. a curated selection). Everything is checked (shards exist,
    models found, output writable) before anything is written or loaded."""
    cfg = spec.resolve(cfg)
    events.configure(cfg.ops.log_format, cfg.ops.log_file)
    prometheus.endpoint(cfg.ops.metrics_port)  # a port in use is refused here, before any work
    paths = expand_shards(cfg.input.shards) if paths is None else paths
    if not paths and source is None:
        raise ConfigError("no input shards: pass --shards (tar, parquet or image folders)")
    expected = [expected_samples(path) for path in paths]  # also refuses what is no shard
    stages = spec.build_stages(cfg)  # their checks, every model resolved at once; models load later, in setup()
    root = output_root(cfg.runtime.out, spec.folder)
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
        summary = _process(cfg, spec.name, sink, stages, summary, paths, source,
                           [n for p, n in zip(paths, expected) if shard_name(p) not in sink.finished])
        summary.totals = OutputTotals.of(sink.manifest)
    metrics.finish(summary, cfg.runtime.device)
    if summary.interrupted:
        events.emit("interrupted", pass_name=spec.name, shards_committed=len(summary.shards_done),
                    shards_left=summary.shards_total - len(summary.shards_done) - len(summary.shards_skipped))
    prometheus.wait_for_final_scrape(cfg.ops.metrics_port, cfg.ops.metrics_final_scrape_s)
    return summary


def _process(cfg: RunConfig, pass_name: str, sink: Sink, stages: list[Stage | list[Stage]], summary: RunSummary,
             paths: list[Path], source: Source | None, expected: list[int | None]) -> RunSummary:
    before = set(sink.finished)
    items = source(before) if source else shard_source(paths, cfg, before)
    items = take_subset(items, cfg.subset)
    pipeline = Pipeline(stages, cfg.runtime.queue_depth, max_bytes_in_flight=cfg.runtime.max_bytes_in_flight)
    progress = ProgressBar(cfg.runtime.progress, pipeline.stages, shards_total=len(paths),
                           shards_before=len(summary.shards_skipped), expected_samples=expected)
    pipeline.progress = progress.update
    watch = RunWatch(pass_name, pipeline, sink, shards_total=len(paths), shards_before=len(summary.shards_skipped),
                     expected_samples=expected, stall_seconds=cfg.ops.stall_seconds)
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
        interrupted=interrupted and not {shard_name(p) for p in paths} <= sink.finished,
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
