"""Tiny random-weight models of the real architectures, for tests, the demo and CPU benchmarks.

Each role is built from a config in code (no download), seeded so that every build is the same,
saved with ``save_pretrained`` (weights + processor/tokenizer) and then loaded by the stages
through the same ``from_pretrained`` code a real checkpoint goes through. Tiny models write
noise: they exercise the machinery, not the quality.

Other modules add roles with :func:`register`.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from engine.errors import ConfigError

# Bump when a builder changes, so cached folders from an older build are not reused.
BUILD_VERSION = 3
SEED = 0

Builder = Callable[[Path], None]
_BUILDERS: dict[str, Builder] = {}


def register(role: str) -> Callable[[Builder], Builder]:
    """Decorator: ``builder(folder)`` writes the tiny model of ``role`` into an empty folder."""

    def add(builder: Builder) -> Builder:
        if role in _BUILDERS:
            raise ValueError(f"tiny model role {role!r} registered twice")
        _BUILDERS[role] = builder
        return builder

    return add


def roles() -> tuple[str, ...]:
    return tuple(sorted(_BUILDERS))


def ensure(role: str, root: Path) -> Path:
    """The folder of the tiny model for ``role`` under ``root``, built on first use.

    The build goes to a temporary folder that is renamed into place, so a crash or a concurrent
    build never leaves a half-written model behind.
    """
    if role not in _BUILDERS:
        raise ConfigError(f"no tiny model for role {role!r} (known: {', '.join(roles())})")
    root = Path(root)
    folder = root / f"{role}-v{BUILD_VERSION}"
    if folder.is_dir():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{role}-", dir=root))
    try:
        import torch

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            _BUILDERS[role](scratch)
        try:
            scratch.rename(folder)
        except OSError:
            if not folder.is_dir():  # not a concurrent build that won the race
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return folder

# --- the vision experts' roles (issue 5) -------------------------------------------------


@register("ram_plus")
def build_ram_plus(folder: Path) -> None:
    from models.ram_plus import build_tiny

    build_tiny(folder)


@register("detector")
def build_closed_detector(folder: Path) -> None:
    from models.detector import build_tiny

    build_tiny(folder)


@register("owlv2")
def build_owlv2(folder: Path) -> None:
    from models.owlv2 import build_tiny

    build_tiny(folder)
