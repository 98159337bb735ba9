"""Training checkpoints: written whole or not at all, newest found by name, old ones pruned.

A checkpoint is ``OUT/checkpoints/step-<N>/``: accelerate's state (model, optimizer,
learning-rate schedule, random generators; sharded per process under FSDP) plus
``trainer_state.json`` (the step, the run's fingerprint, the figures so far). It is written
under ``.tmp-step-<N>`` and renamed once every process has written its part, so a run killed
while saving leaves the previous checkpoint as the newest.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from engine.io.manifest import fsync_dir, write_json_atomic
from models.errors import ConfigError

CHECKPOINTS = "checkpoints"
STATE = "trainer_state.json"


def checkpoint_dirs(out: Path) -> list[Path]:
    """Finished checkpoints, oldest first (a temporary one is never listed)."""
    root = Path(out) / CHECKPOINTS
    found = [p for p in root.glob("step-*") if (p / STATE).is_file()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.removeprefix("step-")))


def latest(out: Path) -> tuple[Path, dict[str, Any]] | None:
    dirs = checkpoint_dirs(out)
    if not dirs:
        return None
    return dirs[-1], json.loads((dirs[-1] / STATE).read_text())


def save(accelerator, out: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Every process writes its part; the main process seals the checkpoint and prunes."""
    root = Path(out) / CHECKPOINTS
    final, tmp = root / f"step-{step:08d}", root / f".tmp-step-{step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a run killed while saving
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json_atomic(tmp / STATE, {**state, "step": step})
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        fsync_dir(root)
        for old in checkpoint_dirs(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def check_compatible(saved: dict[str, Any], current: dict[str, Any], where: Path) -> None:
    """A resume must see the same data, base model and recipe, or the same order means nothing."""
    changed = sorted(k for k in current if saved.get(k) != current[k])
    if changed:
        details = "; ".join(f"{k}: {saved.get(k)!r} then, {current[k]!r} now" for k in changed)
        raise ConfigError(f"cannot resume from {where}: the run changed ({details}); "
                          f"rerun with the same options or start a new --out")
