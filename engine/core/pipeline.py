"""Pass 2 assembled: the stage table and ``run`` (what the CLI calls; a cluster actor builds
the same ``PASS2``), on the one driver (engine/core/driver.py) with the dataset writer as its sink.

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
from collections.abc import Callable
from pathlib import Path

from engine.core import driver
from engine.core.config import RunConfig
from engine.core.driver import Pass, Source, run_pass
from engine.core.errors import ConfigError, Problems
from engine.core.figures import RunSummary
from engine.core.placement import REPLICATED, check_fits, format_plan, node_plan, on_device, replica_devices, sglang_mem_fraction
from engine.core.stage import Stage
from engine.io.manifest import Manifest
from engine.io.writers import DatasetWriter
from engine.stages import caption, category, decode, detect, ocr, probe, prompt, qc, score, tag
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
    cfg = driver.resolved(cfg)
    stages = tuple(selected_stage_names(cfg))
    captioning = cfg.caption
    if "caption" in stages and \
            resolve_backend(captioning.caption_backend, cfg.runtime.device, captioning.caption_model) == "sglang":
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
    if resolve_backend(cfg.caption.caption_backend, cfg.runtime.device, cfg.caption.caption_model) == "transformers":
        names.add("caption")
    return names


def build_stages(cfg: RunConfig) -> list[Stage | list[Stage]]:
    """The selected stages in order; a replicated stage is a list of its replicas. Every stage's
    checks run (its models resolved: local, cached, or on a reachable hub) and their problems
    are reported together."""
    names = selected_stage_names(cfg)
    devices = replica_devices(cfg)
    replicate = replicated_stage_names(cfg) if devices != [cfg.runtime.device] else set()
    built: dict[str, Stage | list[Stage]] = {}
    problems = Problems()
    for name in names:
        if name != "decode":
            with problems.check():
                built[name] = [STAGES[name](on_device(cfg, d)) for d in devices] if name in replicate \
                    else STAGES[name](cfg)
    problems.raise_found()
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


def placed_stages(cfg: RunConfig) -> list[Stage | list[Stage]]:
    """The stages, once the node's memory plan says they fit (before any model loads); their
    placement and the plan go to stderr."""
    plan = node_plan(cfg, tuple(selected_stage_names(cfg)))
    check_fits(plan)
    stages = build_stages(cfg)
    print(describe_placement(stages) + (f"\n{format_plan(plan)}" if plan else ""), file=sys.stderr, flush=True)
    return stages


def open_writer(cfg: RunConfig, root: Path) -> DatasetWriter:
    return DatasetWriter(root, Manifest(root))


PASS2 = Pass("run", "", open_writer, placed_stages, ("shards", "rejects"), resolve=resolved)


def run(cfg: RunConfig, *, source_paths: list[Path] | None = None, source: Source | None = None) -> RunSummary:
    """Pass 2 over ``--shards`` (or ``source_paths``), or over ``source``'s items (a curated selection)."""
    return run_pass(cfg, PASS2, paths=source_paths, source=source)
