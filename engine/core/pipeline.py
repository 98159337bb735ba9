"""Pass 2 assembled: the stage table, the shard source, and ``run`` (what the CLI calls).

``STAGES`` is the one ordered table of stages, each a stage module's ``build(cfg)``;
``--stages`` picks a subset in this order. The probe always runs (it fills width/height that
every later stage relies on), and the decode stage is built last, from the views that the
selected stages after it declare.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from engine.core.config import RunConfig
from engine.core.errors import ConfigError
from engine.core.record import Sample, ShardEnd
from engine.core.runtime import Item, Pipeline, RunSummary, SigintStops
from engine.core.stage import Stage
from engine.core.subset import take_subset
from engine.io.manifest import Manifest, write_json_atomic
from engine.io.readers import expand_shards, shard_items, shard_kind, shard_name
from engine.io.writers import DatasetWriter
from engine.stages import caption, category, decode, detect, ocr, probe, prompt, qc, score, tag
from models.base import resolve_device

StageFactory = Callable[[RunConfig], Stage]

STAGES: dict[str, StageFactory] = {
    "probe": probe.build,
    "decode": decode.build,  # given the views of the stages after it (build_stages)
    "category": category.build,  # leaves the embedding on the sample for the clip tagger
    "tag": tag.build,
    "detect": detect.build,
    "ocr": ocr.build,
    "prompt": prompt.build,
    "caption": caption.build,
    "qc": qc.build,
    "score": score.build,
}
ALWAYS = ("probe",)


def resolved(cfg: RunConfig) -> RunConfig:
    """The config with ``auto`` settled (device), so every stage sees the same answer."""
    runtime = dataclasses.replace(cfg.runtime, device=resolve_device(cfg.runtime.device))
    return dataclasses.replace(cfg, runtime=runtime)


def selected_stage_names(cfg: RunConfig) -> list[str]:
    wanted = set(cfg.runtime.stages) | set(ALWAYS) if cfg.runtime.stages else set(STAGES)
    unknown = wanted - set(STAGES)
    if unknown:
        raise ConfigError(f"unknown stage(s) {sorted(unknown)}; stages are: {', '.join(STAGES)}")
    return [name for name in STAGES if name in wanted]


def build_stages(cfg: RunConfig) -> list[Stage]:
    names = selected_stage_names(cfg)
    built = {name: STAGES[name](cfg) for name in names if name != "decode"}
    if "decode" in names:
        after = [built[n] for n in names[names.index("decode") + 1:]]
        built["decode"] = decode.build(cfg, tuple(v for stage in after for v in stage.views()))
    return [built[name] for name in names]


def shard_source(paths: list[Path], cfg: RunConfig, skip: set[str]) -> Iterator[Item]:
    for path in paths:
        if shard_name(path) in skip:
            continue
        yield from shard_items(path, cfg.input)


def run(cfg: RunConfig, *, source_paths: list[Path] | None = None,
        source: Callable[[set[str]], Iterator[Sample | ShardEnd]] | None = None) -> RunSummary:
    """Everything is checked (shards exist, models found, output writable) before any work."""
    cfg = resolved(cfg)
    paths = source_paths if source_paths is not None else expand_shards(cfg.input.shards)
    if source is None and not paths:
        raise ConfigError("no input shards: pass --shards (tar, parquet or image folders)")
    for path in paths:
        shard_kind(path)
    stages = build_stages(cfg)
    out = Path(cfg.runtime.out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(out / "manifest.json")
    writer = DatasetWriter(out, manifest)
    writer.settle([shard_name(p) for p in paths])
    skipped = [shard_name(p) for p in paths if shard_name(p) in manifest.finished]
    items = source(manifest.finished) if source else shard_source(paths, cfg, manifest.finished)
    items = take_subset(items, cfg.subset)

    progress = ProgressBar(cfg.runtime.progress, stages)
    pipeline = Pipeline(stages, cfg.runtime.queue_depth, progress.update)
    start = time.perf_counter()
    try:
        with SigintStops(pipeline):
            rejects, interrupted = pipeline.run(items, writer)
    finally:
        writer.close()
        progress.close()
    wall = time.perf_counter() - start
    summary = RunSummary(
        shards_done=sorted(manifest.finished - set(skipped)), shards_skipped=skipped,
        written=writer.written, rejected=writer.rejected, rejects_by_stage=dict(rejects),
        wall_s=wall, interrupted=interrupted and not {shard_name(p) for p in paths} <= manifest.finished,
 stages=[m.as_dict(wall) for m in pipeline.metrics],
    )
    write_json_atomic(out / "metrics.json", {
        "wall_s": round(wall, 3), "images_per_s": round(summary.images_per_s, 2),
        "written": summary.written, "rejected": summary.rejected,
        "rejects_by_stage": summary.rejects_by_stage, "device": cfg.runtime.device,
        "stages": summary.stages, "config": cfg.to_dict(),
    })
    return summary


class ProgressBar:
    """Images/s on stderr for both passes (tqdm), with the running reject count and the
    stages' live figures (the caption stage's tokens/s, prefix-cache hits, GPU)."""

    def __init__(self, enabled: bool, stages: Sequence[Stage] = ()):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(unit="img", desc="images", file=sys.stderr, dynamic_ncols=True, smoothing=0.1)
        self.stages = stages
        self.rejected = 0

    def update(self, n: int, rejected: int) -> None:
        self.rejected += rejected
        if self.bar is not None:
            self.bar.update(n)
            if self.bar.n % 16 == 0:
                live = {k: v for stage in self.stages for k, v in stage.progress().items()}
                self.bar.set_postfix(rejected=self.rejected, **live, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def format_summary(summary: RunSummary, out: Path) -> str:
    lines = [
        f"done in {summary.wall_s:.1f}s: {summary.written} written, {summary.rejected} rejected "
        f"({summary.images_per_s:.1f} images/s)",
        f"shards: {len(summary.shards_done)} committed this run, {len(summary.shards_skipped)} already done",
    ]
    if summary.rejects_by_stage:
        lines.append("rejected by stage: " + ", ".join(f"{k} {v}" for k, v in sorted(summary.rejects_by_stage.items())))
    for stage in summary.stages:
        rate = stage["items_per_busy_s"]
        lines.append(f"  {stage['stage']:<10} {stage['items']:>7} items  "
                     f"{(f'{rate:.1f}/s busy' if rate else '-'):>14}  busy {stage['busy_share'] or 0:.0%}  "
                     f"{stage['description']}")
    if summary.interrupted:
        lines.append(f"interrupted: rerun with --out {out} to finish the remaining shards")
    lines.append(f"output: {out}/shards  rejects: {out}/rejects  figures: {out}/metrics.json")
    return "\n".join(lines)
