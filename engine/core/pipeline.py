"""Pass 2 assembled: the stages from their declarations and ``run`` (what the CLI calls, in
process or on Ray), on the one driver (engine/core/driver.py) with the dataset writer as its sink.

The stages are the registry's (engine/core/registry.py: the built-in table, then plugins), in its
order, except that a stage moves after every selected stage that writes what it reads or uses;
``--stages`` picks a subset, ``--experts`` adds optional experts (in-tree or plugins). A stage declared ``always`` runs
whatever ``--stages`` says; what a selected stage ``reads`` must be written by a stage before it
(else a configuration error before any work). The decoder is built last, from the views that the
selected stages after it declare. Stages declared ``replicate`` are built once per replica
device (``engine/core/placement.py``): the runtime feeds the replicas as they free up.
"""

from __future__ import annotations

import sys
from pathlib import Path

from engine.core import driver
from engine.core.config import RunConfig
from engine.core.driver import Executor, Pass, Reader, Source, input_shards, run_pass
from engine.core.figures import RunSummary
from engine.core.placement import check_fits, format_plan, node_plan, on_device, replica_devices
from engine.core.registry import StageSpec, evidence_kinds, stage_specs
from engine.core.stage import Stage
from engine.io.manifest import Manifest
from engine.io.writers import DatasetWriter
from models.errors import ConfigError, Problems


def resolved(cfg: RunConfig) -> RunConfig:
    """The config with ``auto`` settled (device, and what the selected stages settle, like
    SGLang's memory share), so every stage sees the same answer."""
    cfg = driver.resolved(cfg)
    specs = selected_stages(cfg, check=False)  # the reads are checked with the stages' own checks
    names = tuple(spec.name for spec in specs)
    for spec in specs:
        if spec.resolve is not None:
            cfg = spec.resolve(cfg, names)
    return cfg


def selected_stages(cfg: RunConfig, *, check: bool = True) -> list[StageSpec]:
    """The stages of this run in order, checked: every name known, every read written before."""
    specs = stage_specs()
    named = set(cfg.runtime.stages) | set(cfg.runtime.experts)
    unknown = named - set(specs)
    if unknown:
        plugins = [name for name, spec in specs.items() if spec.plugin]
        raise ConfigError(f"unknown stage(s) {sorted(unknown)}; stages are: {', '.join(n for n in specs if n not in plugins)}"
                          + (f"; optional experts (--experts): {', '.join(plugins)}" if plugins else
                             " (no optional expert: none in engine/experts/, no plugin installed)"))
    wanted = [spec for spec in specs.values()
              if spec.always or spec.name in named or (not cfg.runtime.stages and not spec.plugin)]
    ordered = in_order(wanted)
    if check:
        check_reads(ordered)
    return ordered


def in_order(stages: list[StageSpec]) -> list[StageSpec]:
    """Registry order, except that a stage comes after every stage that writes what it reads or
    uses (a plugin's evidence before the prompt that shows it)."""
    left, placed = list(stages), []
    while left:
        ready = next((spec for spec in left if not any(
            other is not spec and set(other.writes) & set(spec.inputs()) for other in left)), None)
        if ready is None:
            raise ConfigError("stages that read each other's outputs: " + ", ".join(
                f"{spec.name} (reads {', '.join(spec.inputs())})" for spec in left))
        left.remove(ready)
        placed.append(ready)
    return placed


def check_reads(stages: list[StageSpec]) -> None:
    written, problems = set(), []
    for spec in stages:
        for name in spec.reads:
            if name not in written:
                makers = [s.name for s in stage_specs().values() if name in s.writes]
                problems.append(f"stage {spec.name} reads {name}, which no stage before it writes: add "
                                + (" or ".join(makers) if makers else "a stage that writes it") + " to --stages")
        written.update(spec.writes)
    if problems:
        raise ConfigError(*problems)


def selected_stage_names(cfg: RunConfig) -> list[str]:
    return [spec.name for spec in selected_stages(cfg)]


def build_stages(cfg: RunConfig) -> list[Stage | list[Stage]]:
    """The selected stages in order; a replicated stage is a list of its replicas. Every stage's
    checks run (its models resolved: local, cached, or on a reachable hub) and their problems
    are reported together."""
    specs = selected_stages(cfg)
    devices = replica_devices(cfg)
    several = devices != [cfg.runtime.device]
    built: dict[str, Stage | list[Stage]] = {}
    problems = Problems()
    for spec in specs:
        if not spec.decoder:
            with problems.check():
                built[spec.name] = [spec.build(on_device(cfg, d)) for d in devices] \
                    if several and spec.replicated(cfg) else spec.build(cfg)
    problems.raise_found()
    for index, spec in enumerate(specs):
        if spec.decoder:
            after = [_first(built[s.name]) for s in specs[index + 1:] if s.name in built]
            built[spec.name] = spec.build(cfg, tuple(v for stage in after for v in stage.views()))
    return [built[spec.name] for spec in specs]


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


def plugin_evidence(cfg: RunConfig) -> tuple[str, ...]:
    """The plugins' evidence kinds this run writes: a parquet column each."""
    kinds = evidence_kinds()
    return tuple(name for spec in selected_stages(cfg) if spec.plugin for name in spec.writes if name in kinds)


def open_writer(cfg: RunConfig, root: Path, *, worker: bool = False) -> DatasetWriter:
    """The driver's writer, or a worker's (engine/core/driver.py ``Pass``): no manifest, and other
    writers' temporaries left alone."""
    evidence = plugin_evidence(cfg)
    if worker:
        return DatasetWriter(root, None, clean=False, evidence=evidence)
    return DatasetWriter(root, Manifest(root), evidence=evidence)


PASS2 = Pass("run", "", open_writer, placed_stages, ("shards", "rejects"), resolve=resolved)


def run(cfg: RunConfig, executor: Executor | None = None, *, source_paths: list[Path] | None = None,
        source: Source | None = None, reader: Reader = input_shards) -> RunSummary:
    """Pass 2 over ``--shards`` (or ``source_paths``) read by ``reader`` (pass 1's selection
    with --curate), or over ``source``'s items; in process, or on ``executor``."""
    return run_pass(cfg, PASS2, executor, paths=source_paths, source=source, reader=reader)
