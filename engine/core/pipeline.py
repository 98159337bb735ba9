"""Pass 2 assembled: the stage table, the shard source, and ``run`` (what the CLI calls).

``STAGES`` is the one ordered table of stages, each a stage module's ``build(cfg)``;
``--stages`` picks a subset in this order. The probe always runs (it fills width/height that
every later stage relies on), and the decode stage is built last, from the views that the
selected stages after it declare. Model-backed experts (and a transformers caption engine) are
built once per replica device (``engine/core/placement.py``): the runtime feeds the replicas as
they free up.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from engine.core.config import RunConfig
from engine.core.errors import ConfigError
from engine.core.placement import REPLICATED, check_fits, format_plan, node_plan, on_device, replica_devices, sglang_mem_fraction
from engine.core.record import Sample, ShardEnd
from engine.core.runtime import Item, Pipeline, RunSummary, SigintStops
from engine.core.stage import Stage
from engine.core.subset import take_subset
from engine.io.manifest import Manifest, write_json_atomic
from engine.io.readers import expand_shards, shard_items, shard_kind, shard_name
from engine.io.writers import DatasetWriter
from engine.stages import caption, category, decode, detect, ocr, probe, prompt, qc, score, tag
from models.base import resolve_device
from models.caption.registry import resolve_backend

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
    """The config with ``auto`` settled (device, SGLang's memory share), so every stage sees
    the same answer."""
    runtime = dataclasses.replace(cfg.runtime, device=resolve_device(cfg.runtime.device))
    cfg = dataclasses.replace(cfg, runtime=runtime)
    stages = tuple(selected_stage_names(cfg))
    if "caption" in stages and resolve_backend(cfg.caption.caption_backend, runtime.device) == "sglang":
        fraction = sglang_mem_fraction(cfg, stages)
        cfg = dataclasses.replace(cfg, sglang=dataclasses.replace(cfg.sglang, sglang_mem_fraction=fraction))
    return cfg


def selected_stage_names(cfg: RunConfig) -> list[str]:
    wanted = set(cfg.runtime.stages) | set(ALWAYS) if cfg.runtime.stages else set(STAGES)
    unknown = wanted - set(STAGES)
    if unknown:
        raise ConfigError(f"unknown stage(s) {sorted(unknown)}; stages are: {', '.join(STAGES)}")
    return [name for name in STAGES if name in wanted]


def replicated_stage_names(cfg: RunConfig) -> set[str]:
    """Stages built once per replica device: the model-backed experts, and the caption engine
    when it runs in this process on one device (SGLang spans the GPUs itself; an endpoint is remote)."""
    names = set(REPLICATED)
    if resolve_backend(cfg.caption.caption_backend, cfg.runtime.device) == "transformers":
        names.add("caption")
    return names


def build_stages(cfg: RunConfig) -> list[Stage | list[Stage]]:
    """The selected stages in order; a replicated stage is a list of its replicas."""
    names = selected_stage_names(cfg)
    devices = replica_devices(cfg)
    replicate = replicated_stage_names(cfg) if devices != [cfg.runtime.device] else set()
    built: dict[str, Stage | list[Stage]] = {
        name: [STAGES[name](on_device(cfg, d)) for d in devices] if name in replicate else STAGES[name](cfg)
        for name in names if name != "decode"
    }
    if "decode" in names:
        after = [_first(built[n]) for n in names[names.index("decode") + 1:]]
        built["decode"] = decode.build(cfg, tuple(v for stage in after for v in stage.views()))
    return [built[name] for name in names]


def _first(stage: Stage | list[Stage]) -> Stage:
    return stage[0] if isinstance(stage, list) else stage


def describe_placement(stages: list[Stage | list[Stage]]) -> str:
    """One line: each stage with its replicas' devices."""
    return "placement: " + ", ".join(
        f"{s[0].name} x{len(s)} ({' '.join(r.resources().device for r in s)})" if isinstance(s, list)
        else f"{s.name} ({s.resources().device})" for s in stages)


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
    plan = node_plan(cfg, tuple(selected_stage_names(cfg)))
    check_fits(plan)  # before any model loads
    stages = build_stages(cfg)
    print(describe_placement(stages) + (f"\n{format_plan(plan)}" if plan else ""), file=sys.stderr, flush=True)
    out = Path(cfg.runtime.out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(out / "manifest.json")
    writer = DatasetWriter(out, manifest)
    writer.settle([shard_name(p) for p in paths])
    skipped = [shard_name(p) for p in paths if shard_name(p) in manifest.finished]
    items = source(manifest.finished) if source else shard_source(paths, cfg, manifest.finished)
    items = take_subset(items, cfg.subset)

    pipeline = Pipeline(stages, cfg.runtime.queue_depth)
    progress = ProgressBar(cfg.runtime.progress, pipeline.stages)
    pipeline.progress = progress.update
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
