"""``densefusion_local.py status OUT``: how far an output is, while it is written or after.

Read only from what the run publishes anyway, each file whole and atomically replaced or
published once (so a reader never sees half of one, and the writer is never waited on or
locked): the per-shard done markers (``markers/*.json``: counts, attempt, node, finish time),
``metrics.json`` (the invocations: who runs, since when, killed or interrupted, the shards a Ray
run gave up on) and the writers' temporaries (``<file>.<host>-<pid>-<id>.tmp``: the shards in
flight, one name per attempt). ``manifest.jsonl`` is not needed: it is derived from the markers.

Per pass folder (OUT, and OUT/curate when pass 1 ran): shards done / failed / in flight / left,
images written and rejected, the rate over the last ``--window`` seconds and the time left at
that rate, and the last errors. ``--json`` prints the same as one object (:data:`STATUS_SCHEMA`).
"""

from __future__ import annotations

import argparse
import calendar
import json
import os
import re
import time
from pathlib import Path
from typing import Any

from engine.core.figures import shard_problems
from engine.io.commit import MARKERS_DIR, TMP_SUFFIX, node_name
from engine.io.object_output import output_folder

PASS_FOLDERS = ("curate", "")  # pass 1's folder under OUT, then pass 2's (OUT itself)
LAST_ERRORS = 5
# <final name>.<host>-<pid>-<8 hex>.tmp (engine/io/commit.py temp_path)
_TEMP = re.compile(r"^(?P<final>.+)\.(?P<host>[^/]+)-(?P<pid>\d+)-(?P<id>[0-9a-f]{8})" + re.escape(TMP_SUFFIX) + "$")

_COUNT = {"type": "integer", "minimum": 0}
_MAYBE_COUNT = {"type": ["integer", "null"], "minimum": 0}
STATUS_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["out", "passes"], "additionalProperties": False,
    "properties": {"out": {"type": "string"}, "passes": {"type": "array", "items": {
        "type": "object", "additionalProperties": False,
        "required": ["pass", "folder", "state", "writer", "shards", "in_flight", "failed", "retried", "images",
                     "rate", "eta_s", "last_errors", "invocations"],
        "properties": {
            "pass": {"type": "string"}, "folder": {"type": "string"},
            "state": {"enum": ["running", "finished", "stopped", "not started"]},
            "writer": {"type": "object", "required": ["node", "pid", "alive", "started_at"], "properties": {
                "node": {"type": "string"}, "pid": {"type": ["integer", "null"]},
                "alive": {"type": ["boolean", "null"]}, "started_at": {"type": ["string", "null"]}}},
            "shards": {"type": "object", "additionalProperties": False,
                       "required": ["total", "done", "failed", "in_flight", "left"],
                       "properties": {"total": _MAYBE_COUNT, "done": _COUNT, "failed": _COUNT, "in_flight": _COUNT,
                                      "left": _MAYBE_COUNT}},
            "in_flight": {"type": "array", "items": {"type": "object", "required": ["shard", "attempts", "writers"],
                                                     "properties": {"shard": {"type": "string"}, "attempts": _COUNT,
                                                                    "writers": {"type": "array"}}}},
            "failed": {"type": "array", "items": {"type": "object", "required": ["shard", "reason"]}},
            "retried": {"type": "array", "items": {"type": "object", "required": ["shard", "attempt"]}},
            "images": {"type": "object", "required": ["samples", "written", "rejected"],
                       "properties": {"samples": _COUNT, "written": _COUNT, "rejected": _COUNT}},
            "rate": {"type": "object", "required": ["window_s", "images", "images_per_s"],
                     "properties": {"window_s": {"type": "number"}, "images": _COUNT,
                                    "images_per_s": {"type": "number", "minimum": 0}}},
            "eta_s": {"type": ["number", "null"], "minimum": 0},
            "last_errors": {"type": "array", "items": {"type": "object", "required": ["shard", "at", "error"]}},
            "invocations": {"type": "object", "required": ["count", "killed", "interrupted"],
                            "properties": {"count": _COUNT, "killed": _COUNT, "interrupted": _COUNT}},
        }}}},
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", metavar="OUT", type=output_folder, help="the output folder of a run (being written or finished)")
    parser.add_argument("--json", action="store_true", help="print one JSON object (for scripts) instead of text")
    parser.add_argument("--window", type=float, default=600.0,
                        help="the rate and time left are over the shards finished in the last this many seconds "
                             "(default: 600)")


def command(args: argparse.Namespace) -> int:
    from models.errors import ConfigError

    out = args.out
    if not out.is_dir():
        raise ConfigError(f"{out} is not a folder: pass the --out of a run")
    if args.window <= 0:
        raise ConfigError("--window must be > 0 seconds")
    report = status(out, window_s=args.window)
    if not report["passes"]:
        raise ConfigError(f"{out} holds no run: no markers/, manifest or metrics.json in it or in {out}/curate")
    print(json.dumps(report, indent=2) if args.json else format_status(report))
    return 0


def status(out: Path, *, window_s: float = 600.0, now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    passes = []
    for folder in PASS_FOLDERS:
        root = out / folder
        if (root / MARKERS_DIR).is_dir() or (root / "metrics.json").exists():
            passes.append(pass_status(root, folder, window_s, now))
    return {"out": str(out), "passes": passes}


def pass_status(root: Path, folder: str, window_s: float, now: float) -> dict[str, Any]:
    markers = _markers(root / MARKERS_DIR)
    invocations = _read_json(root / "metrics.json").get("invocations", [])
    last = invocations[-1] if invocations else {}
    total = _shards_total(last.get("config") or {})
    failed = {shard: why for shard, why in ((last.get("cluster") or {}).get("failed_shards") or {}).items()
              if shard not in markers}
    alive = _alive(last.get("node", ""), last.get("pid"))
    running = last.get("status") == "running" and alive is not False
    in_flight = _in_flight(root, set(markers), running)
    # the rate: over the window up to now (running) or up to the last commit (stopped, finished),
    # never before the last invocation started
    finished_at = {shard: _parse(m.get("finished_at")) or 0 for shard, m in markers.items()}
    end = now if running else max(finished_at.values(), default=now)
    begin = max(end - window_s, _parse(last.get("started_at")) or end - window_s)
    span = end - begin
    images = sum(m.get("samples", 0) for shard, m in markers.items() if begin <= finished_at[shard] <= end)
    rate = images / span if span > 0 else 0.0
    done = len(markers)
    left = None if total is None else max(total - done - len(failed), 0)
    per_shard = sum(m.get("samples", 0) for m in markers.values()) / done if done else None
    eta = left * per_shard / rate if running and left is not None and per_shard is not None and rate > 0 else None
    state = ("finished" if total is not None and left == 0 and not in_flight else
             "running" if running else "not started" if not invocations and not done else "stopped")
    return {
        "pass": last.get("pass") or ("curate" if folder else "run"), "folder": str(root), "state": state,
        "writer": {"node": last.get("node", ""), "pid": last.get("pid"), "alive": alive,
                   "started_at": last.get("started_at")},
        "shards": {"total": total, "done": done, "failed": len(failed), "in_flight": len(in_flight), "left": left},
        "in_flight": in_flight,
        "failed": [{"shard": shard, "reason": why} for shard, why in sorted(failed.items())],
        "retried": [{"shard": shard, "attempt": m["attempt"]} for shard, m in sorted(markers.items())
                    if m.get("attempt", 1) > 1],
        "images": {"samples": sum(m.get("samples", 0) for m in markers.values()),
                   "written": sum(m.get("written", 0) for m in markers.values()),
                   "rejected": sum(m.get("rejected", 0) for m in markers.values())},
        "rate": {"window_s": round(span, 1), "images": images, "images_per_s": round(rate, 3)},
        "eta_s": None if eta is None else round(eta, 1),
        "last_errors": _last_errors(markers, failed, invocations),
        "invocations": {"count": len(invocations),
                        "killed": sum(i.get("status") == "killed" for i in invocations)
                        + (last.get("status") == "running" and alive is False),
                        "interrupted": sum(i.get("status") == "interrupted" for i in invocations)},
    }


def format_status(report: dict[str, Any]) -> str:
    lines = [f"status of {report['out']}"]
    for p in report["passes"]:
        s, i, r = p["shards"], p["images"], p["rate"]
        writer = p["writer"]
        who = f"pid {writer['pid']} on {writer['node']}" if writer["pid"] else "no writer recorded"
        lines.append(f"pass {p['pass']} ({p['folder']}): {p['state']}"
                     + (f", since {writer['started_at']} ({who})" if p["state"] == "running" else ""))
        lines.append(f"  shards: {s['done']} done of {s['total'] if s['total'] is not None else '?'}, "
                     f"{s['in_flight']} in flight, {s['failed']} failed, "
                     f"{s['left'] if s['left'] is not None else '?'} left")
        for shard in p["in_flight"]:
            lines.append(f"    in flight: {shard['shard']} (attempt {shard['attempts']}: {', '.join(shard['writers'])})")
        for shard in p["retried"]:
            lines.append(f"    done on attempt {shard['attempt']}: {shard['shard']}")
        lines.append(f"  images: {i['written']} written, {i['rejected']} rejected, of {i['samples']} read")
        lines.append(f"  rate: {r['images_per_s']:.2f} images/s over the last {r['window_s']:.0f} s ({r['images']} images)"
                     + (f"; time left about {_duration(p['eta_s'])}" if p["eta_s"] is not None else ""))
        invocations = p["invocations"]
        if invocations["killed"] or invocations["interrupted"]:
            lines.append(f"  invocations: {invocations['count']} ({invocations['killed']} killed, "
                         f"{invocations['interrupted']} interrupted); a rerun with the same --out resumes")
        for error in p["last_errors"]:
            lines.append(f"  error {error['at'] or ''} {error['shard']}: {error['error']}")
    return "\n".join(lines)


def _markers(folder: Path) -> dict[str, dict[str, Any]]:
    found = {}
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else ():
        marker = _read_json(path)  # published whole (a link): never half-written
        if marker:
            found[path.stem] = marker
    return found


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _shards_total(config: dict[str, Any]) -> int | None:
    """The shards the last invocation was given, when they can be listed from here."""
    from engine.io.readers import expand_shards

    patterns = (config.get("input") or {}).get("shards")
    if not patterns:
        return None
    try:
        return len(expand_shards(tuple(patterns))) or None
    except Exception:  # noqa: BLE001 - the input is on another machine's path, or gone: unknown
        return None


def _alive(node: str, pid: int | None) -> bool | None:
    """Whether the writer's process still runs; None when it cannot be told from here."""
    if not pid or node != node_name():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _in_flight(root: Path, done: set[str], running: bool) -> list[dict[str, Any]]:
    """Shards not done whose files are being written: one temporary name per writer (attempt).
    A dead writer's leftovers (a killed run) are not in flight: the next run removes them."""
    writers: dict[str, set[str]] = {}
    for folder in (p for p in root.iterdir() if p.is_dir()):
        for tmp in folder.glob(f"*{TMP_SUFFIX}"):
            match = _TEMP.match(tmp.name)
            if not match:
                continue
            shard = match["final"].split(".", 1)[0]
            if shard in done:
                continue
            host, pid = match["host"], int(match["pid"])
            if _alive(host, pid) is False or not running:
                continue
            writers.setdefault(shard, set()).add(f"{host}-{pid}")
    return [{"shard": shard, "attempts": len(w), "writers": sorted(w)} for shard, w in sorted(writers.items())]


def _last_errors(markers: dict[str, dict[str, Any]], failed: dict[str, str],
                 invocations: list[dict[str, Any]]) -> list[dict[str, Any]]:
    errors = [{"shard": shard, "at": m.get("finished_at"), "error": problem}
              for shard, m in markers.items() for problem in shard_problems(m)]
    errors += [{"shard": shard, "at": (invocations[-1].get("finished_at") if invocations else None), "error": why}
               for shard, why in failed.items()]
    errors.sort(key=lambda e: e["at"] or "")
    return errors[-LAST_ERRORS:]


def _parse(stamp: str | None) -> float | None:
    return calendar.timegm(time.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ")) if stamp else None


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"
