"""What both passes print: the live progress bar (stderr) and the end-of-run summary (stdout)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from engine.core.figures import RunSummary, describe_cache, expert_cache_figures
from engine.core.record import ShardEnd
from engine.core.stage import Stage

MAX_PROBLEM_LINES = 10
# tqdm's own rate flips to s/img below 1 img/s; rate_noinv_fmt never does
BAR_FORMAT = "{desc}: {n_fmt}img [{elapsed}, {rate_noinv_fmt}{postfix}]"


class ProgressBar:
    """Images, images/s (always that way round), shards done/total, time left when it can be
    known, the running reject count and the stages' live figures (the caption stage's
    tokens/s, prefix-cache hits, GPU). Shard problems are printed above the bar as they happen.

    Time left: from the sample counts of the shards still to do when every one is known up
    front (parquet files, folders); else from the mean samples per shard committed so far."""

    def __init__(self, enabled: bool, stages: Sequence[Stage] = (), *, shards_total: int = 0,
                 shards_before: int = 0, expected_samples: Sequence[int | None] = ()):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(unit="img", desc="images", file=sys.stderr, dynamic_ncols=True, smoothing=0.1,
                            bar_format=BAR_FORMAT)
        self.stages = stages
        self.rejected = 0
        self.shards_total, self.shards_before = shards_total, shards_before
        self.to_do = len(expected_samples)
        self.expected = sum(expected_samples) if expected_samples and None not in expected_samples else None
        self.committed = 0
        self.committed_samples = 0
        if self.bar is not None:
            self._refresh_figures()  # shards 0/N from the start

    def update(self, n: int, rejected: int) -> None:
        self.rejected += rejected
        if self.bar is not None:
            self.bar.update(n)
            if self.bar.n % 16 == 0:
                self._refresh_figures()

    def shard_committed(self, end: ShardEnd, problems: list[str]) -> None:
        self.committed += 1
        self.committed_samples += end.n_samples
        for problem in problems:
            self.warn(f"warning: shard {end.shard}: {problem}")
        if self.bar is not None:
            self._refresh_figures()

    def warn(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def seconds_left(self) -> float | None:
        if self.bar is None or not self.bar.n:
            return None
        expected = self.expected
        if expected is None and self.committed:
            expected = self.committed_samples / self.committed * self.to_do
        rate = self.bar.format_dict.get("rate") or self.bar.n / max(self.bar.format_dict["elapsed"], 1e-9)
        if expected is None or not rate:
            return None
        return max(expected - self.bar.n, 0) / rate

    def _refresh_figures(self) -> None:
        from tqdm import tqdm

        parts = []
        if self.shards_total:
            parts.append(f"shards {self.shards_before + self.committed}/{self.shards_total}")
        left = self.seconds_left()
        if left is not None:
            parts.append(f"ETA {tqdm.format_interval(left)}")
        parts.append(f"rejected={self.rejected}")
        live = {k: v for stage in self.stages for k, v in stage.progress().items()}
        parts += [f"{k}={v}" for k, v in live.items()]
        self.bar.set_postfix_str(", ".join(parts), refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def format_summary(summary: RunSummary) -> str:
    root, totals = summary.root, summary.totals
    if summary.nothing_to_do:
        lines = [f"nothing left to do: all {summary.shards_total} input shards are already committed "
                 f"in {root} (no model was loaded)"]
    else:
        how = "interrupted after" if summary.interrupted else "done in"
        lines = [f"{how} {summary.wall_s:.1f}s: {summary.written} written, {summary.rejected} rejected "
                 f"({summary.images_per_s:.1f} images/s)"]
    lines.append(f"shards: {len(summary.shards_done)} committed this run, {len(summary.shards_skipped)} "
                 f"already done, {summary.shards_total} in the input")
    if summary.rejects_by_stage:
        lines.append("rejected by stage: " + ", ".join(f"{k} {v}" for k, v in sorted(summary.rejects_by_stage.items())))
    lines += _problem_lines(summary)
    lines += _stage_table(summary.stages)
    if summary.figures:
        lines.append("  figures: " + ", ".join(f"{k} {v}" for k, v in summary.figures.items()))
    if summary.shards_skipped or summary.interrupted:
        lines.append(f"output so far (every run into {root}): {totals.shards} shards, "
                     f"{totals.written} written, {totals.rejected} rejected")
    if summary.interrupted:
        lines.append("interrupted: rerun with the same --out to finish the remaining shards")
    lines.append("output: " + "  ".join(f"{root / name}" for name in summary.outputs)
                 + f"  figures: {root / 'metrics.json'}")
    return "\n".join(lines)


def _problem_lines(summary: RunSummary) -> list[str]:
    problems = summary.totals.shard_problems
    if not problems:
        return []
    flat = [(shard, message) for shard, messages in problems.items() for message in messages]
    lines = [f"shard problems ({len(problems)} of {summary.totals.shards} committed shards; "
             f"their samples up to the problem, if any, were processed):"]
    lines += [f"  {shard}: {message}" for shard, message in flat[:MAX_PROBLEM_LINES]]
    if len(flat) > MAX_PROBLEM_LINES:
        lines.append(f"  … {len(flat) - MAX_PROBLEM_LINES} more in {summary.root / 'metrics.json'} (shard_problems)")
    return lines


def _stage_table(stages: list[dict]) -> list[str]:
    """One row per stage under column headers; the expert-cache column only when a stage has one."""
    if not stages:
        return []
    cache = expert_cache_figures(stages)
    cells = {s["stage"]: describe_cache(cache.get(s["stage"], {})) for s in stages} if cache else {}
    width = max(map(len, cells.values()), default=0)
    cache_head = f"{'expert cache':<{width}}  " if cache else ""
    lines = [f"  {'stage':<10} {'items':>7} {'items/s busy':>12} {'busy':>5}  {cache_head}what ran"]
    for stage in stages:
        rate = stage["items_per_busy_s"]
        cache_cell = f"{cells[stage['stage']]:<{width}}  " if cache else ""
        lines.append(f"  {stage['stage']:<10} {stage['items']:>7} {(f'{rate:.1f}' if rate else '-'):>12} "
                     f"{stage['busy_share'] or 0:>5.0%}  {cache_cell}{stage['description']}")
    return lines


