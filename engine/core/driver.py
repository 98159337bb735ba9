"""The one driver of both passes: a pass supplies its stages and its sink, the driver does the rest.

    resolve the config ─▶ expand and check the shards ─▶ build the stages (their checks; no
    model loads before setup) ─▶ open the sink: its manifest says what is done ─▶ nothing
    left? summary, no model loaded ─▶ else the Pipeline under SigintStops with the progress
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
from engine.core.runtime import Item, Pipeline, SigintStops
from engine.core.sink import Sink
from engine.core.stage import Stage
from engine.core.subset import take_subset
from engine.io.readers import expand_shards, expected_samples, shard_items, shard_name
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
    paths = expand_shards(cfg.input.shards) if paths is None else paths
    if not paths and source is None:
        raise ConfigError("no input shards: pass --shards (tar, parquet or image folders)")
    expected = [expected_samples(path) for path in paths]  # also refuses what is no shard
    stages = spec.build_stages(cfg)  # their checks; models load later, in setup()
    root = Path(cfg.runtime.out) / spec.folder
    root.mkdir(parents=True, exist_ok=True)
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
        summary = _process(cfg, sink, stages, summary, paths, source,
                           [n for p, n in zip(paths, expected) if shard_name(p) not in sink.finished])
        summary.totals = OutputTotals.of(sink.manifest)
    metrics.finish(summary, cfg.runtime.device)
    return summary


def _process(cfg: RunConfig, sink: Sink, stages: list[Stage | list[Stage]], summary: RunSummary, paths: list[Path],
             source: Source | None, expected: list[int | None]) -> RunSummary:
    before = set(sink.finished)
    items = source(before) if source else shard_source(paths, cfg, before)
    items = take_subset(items, cfg.subset)
    pipeline = Pipeline(stages, cfg.runtime.queue_depth)
    progress = ProgressBar(cfg.runtime.progress, pipeline.stages, shards_total=len(paths),
                           shards_before=len(summary.shards_skipped), expected_samples=expected)
    pipeline.progress = progress.update
    start = time.perf_counter()
    try:
        with SigintStops(pipeline):
            rejects, interrupted = pipeline.run(items, _Reporting(sink, progress))
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
    """The sink as the runtime sees it, telling the progress bar (and the console) of each commit."""

    def __init__(self, sink: Sink, progress: ProgressBar):
        self.sink, self.progress = sink, progress
        self.write = sink.write

    def commit(self, end: ShardEnd) -> None:
        self.sink.commit(end)
        self.progress.shard_committed(end, shard_problems(self.sink.committed.pop(end.shard)))
