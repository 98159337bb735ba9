"""What a run reports: one invocation's :class:`RunSummary`, the output's totals, metrics.json.

A run may take several invocations (a resume after Ctrl-C or a kill, a rerun of a finished
output). Figures of one invocation say how fast it went; only the manifest says what the
output holds. So ``metrics.json`` keeps both:

    written, rejected, samples, shards, rejects_by_stage, shard_problems
                        the output as committed, summed from the manifest (every invocation)
    wall_s, images_per_s, expert_cache
                        summed over the invocations that reported figures
    stages              per-stage figures of the latest invocation that processed samples
    invocations         one entry per invocation, in order: its own counts, stages and config;
                        ``status`` is running, finished, interrupted, nothing to do, or killed
                        (an invocation that never reached its summary)
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.io.commit import node_name
from engine.io.manifest import Manifest, write_json_atomic

EMPTY_SHARD = "no samples in this shard"
MAX_RANGES_SHOWN = 5
_STAGE_FIELDS = {"stage", "description", "items", "batches", "busy_s", "items_per_busy_s", "busy_share",
                 "mean_queue_depth", "failed_batches"}


def shard_problems(entry: dict[str, Any]) -> list[str]:
    """A committed shard's problems: the reader's errors, damaged byte ranges it skipped, or
    that it held nothing at all."""
    errors = list(entry.get("errors") or ())
    skipped = entry.get("skipped") or ()
    if skipped:
        ranges = ", ".join(f"{start}–{end}" for start, end in skipped[:MAX_RANGES_SHOWN])
        more = f" and {len(skipped) - MAX_RANGES_SHOWN} more" if len(skipped) > MAX_RANGES_SHOWN else ""
        errors.append(f"skipped {len(skipped)} damaged byte range(s) with no usable header: {ranges}{more}")
    if not errors and not entry.get("samples"):
        errors.append(EMPTY_SHARD)
    return errors


@dataclass(frozen=True)
class OutputTotals:
    """What the output holds, from its manifest: the same after one clean run, a resume or a rerun."""

    shards: int = 0
    samples: int = 0
    written: int = 0
    rejected: int = 0
    rejects_by_stage: dict[str, int] = field(default_factory=dict)
    shard_problems: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def of(cls, manifest: Manifest) -> OutputTotals:
        """Summed in one pass over the manifest's entries (memory: the shards with problems)."""
        counts: Counter = Counter()
        by_stage: Counter = Counter()
        problems = {}
        for name, entry in manifest.entries():
            counts.update(shards=1, samples=entry.get("samples", 0), written=entry.get("written", 0),
                          rejected=entry.get("rejected", 0))
            by_stage.update(entry.get("rejected_by_stage") or {})
            if found := shard_problems(entry):
                problems[name] = found
        return cls(shards=counts["shards"], samples=counts["samples"], written=counts["written"],
                   rejected=counts["rejected"], rejects_by_stage=dict(sorted(by_stage.items())),
                   shard_problems=dict(sorted(problems.items())))


@dataclass
class RunSummary:
    """One invocation of a pass: what it did, how fast, and the output's totals after it."""

    shards_done: list[str]  # committed by this invocation
    shards_skipped: list[str]  # already committed before it started
    written: int
    rejected: int
    rejects_by_stage: dict[str, int]
    wall_s: float
    interrupted: bool
    stages: list[dict[str, Any]]
    root: Path = Path(".")  # the pass's output folder (its manifest and metrics.json)
    outputs: tuple[str, ...] = ()  # the folders under root that hold the pass's results
    shards_total: int = 0
    totals: OutputTotals = field(default_factory=OutputTotals)
    figures: dict[str, str] = field(default_factory=dict)  # the stages' live figures (progress bar), final

    @property
    def images_per_s(self) -> float:
        return (self.written + self.rejected) / self.wall_s if self.wall_s else 0.0

    @property
    def shards_left(self) -> int:
        """Shards neither committed by now nor before (interrupted, or failed on Ray)."""
        return self.shards_total - len(self.shards_done) - len(self.shards_skipped)

    @property
    def nothing_to_do(self) -> bool:
        return not self.shards_done and self.shards_total == len(self.shards_skipped) and not self.interrupted

    @property
    def status(self) -> str:
        return "interrupted" if self.interrupted else "nothing to do" if self.nothing_to_do else "finished"

    @property
    def problems_this_run(self) -> dict[str, list[str]]:
        return {s: self.totals.shard_problems[s] for s in self.shards_done if s in self.totals.shard_problems}

    @property
    def expert_cache(self) -> dict[str, dict[str, Any]]:
        return stage_extras(self.stages)


def stage_extras(stages: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per stage, the figures its ``metrics()`` added (expert-cache hits and misses, the caption
    engine's token rates...): everything beyond the runtime's own columns."""
    extras = {}
    for stage in stages:
        extra = {k: v for k, v in stage.items() if k not in _STAGE_FIELDS}
        if extra:
            extras[stage["stage"]] = extra
    return extras


def expert_cache_figures(stages: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per cached expert stage, its cache figures (the ``cache_*`` keys of its ``metrics()``)."""
    found = {}
    for name, extra in stage_extras(stages).items():
        cache = {k: v for k, v in extra.items() if k.startswith("cache_")}
        if cache:
            found[name] = cache
    return found


def describe_cache(figures: dict[str, Any]) -> str:
    """``cache_hits 12, cache_misses 3`` → "12 hits, 3 misses"; "–" for a stage without a cache."""
    return ", ".join(f"{v} {k.removeprefix('cache_').replace('_', ' ')}" for k, v in figures.items()) or "–"


class MetricsFile:
    """OUT/metrics.json: every invocation appended, totals rewritten from the manifest.

    ``start`` records the invocation as running before any work, so one that is killed still
    leaves its entry (marked killed by the next invocation)."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict[str, Any] = {}
        if path.exists():
            try:
                self.data = json.loads(path.read_text())
            except ValueError:
                self.data = {}  # a figures file is rebuilt from the manifest; never worth a failed run
        self.invocations: list[dict[str, Any]] = self.data.get("invocations", [])

    def start(self, pass_name: str, config: dict[str, Any], totals: OutputTotals) -> None:
        for entry in self.invocations:
            if entry.get("status") == "running":
                entry["status"] = "killed"
        # who runs it: `status` checks that a "running" invocation's process is still alive
        self.invocations.append({"pass": pass_name, "started_at": _now(), "status": "running", "node": node_name(),
                                 "pid": os.getpid(), "config": config})
        self._write(totals)

    def finish(self, summary: RunSummary, device: str) -> None:
        self.invocations[-1].update(
            status=summary.status, finished_at=_now(), wall_s=round(summary.wall_s, 3),
            images_per_s=round(summary.images_per_s, 2), written=summary.written, rejected=summary.rejected,
            rejects_by_stage=summary.rejects_by_stage, shards_committed=len(summary.shards_done),
            shards_skipped=len(summary.shards_skipped), device=device, stages=summary.stages,
        )
        self._write(summary.totals)

    def _write(self, totals: OutputTotals) -> None:
        reported = [e for e in self.invocations if "wall_s" in e]
        wall = sum(e["wall_s"] for e in reported)
        processed = sum(e["written"] + e["rejected"] for e in reported)
        working = [e for e in reported if e["written"] + e["rejected"]]
        cache: dict[str, Counter] = {}
        for entry in reported:
            for stage, figures in expert_cache_figures(entry["stages"]).items():
                cache.setdefault(stage, Counter()).update(
                    {k: v for k, v in figures.items() if isinstance(v, int)})  # counts add up, rates do not
        data = {
            "written": totals.written, "rejected": totals.rejected, "samples": totals.samples,
            "shards": totals.shards, "rejects_by_stage": totals.rejects_by_stage,
            "shard_problems": totals.shard_problems,
            "wall_s": round(wall, 3), "images_per_s": round(processed / wall, 2) if wall else 0.0,
            "expert_cache": {stage: dict(c) for stage, c in cache.items()},
            "stages": working[-1]["stages"] if working else [],
            "invocations": self.invocations,
        }
        write_json_atomic(self.path, data)
        self.data = data


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
