"""Reading back a finished output folder (the output contract that engine/io/writers.py writes).

Statistics, exports and the report all start here. The tar shards are the source of truth:
``<key>.json`` holds ``sample.annotations()`` with ``meta`` and ``scores`` as real objects,
and the image bytes sit next to it. Only committed shards are read (temporaries end in .tmp).
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.io.keys import split_member_name
from models.errors import ConfigError


@dataclass(frozen=True)
class WrittenSample:
    annotations: dict[str, Any]
    image_name: str  # tar member name, "<key>.<ext>"
    image_bytes: bytes | None  # None unless asked for

    @property
    def key(self) -> str:
        return self.annotations["key"]

    @property
    def caption(self) -> str:
        return self.annotations.get("caption") or ""


def check_output(out: Path) -> Path:
    out = Path(out)
    if not (out / "shards").is_dir():
        raise ConfigError(f"{out} is not an output folder: it has no shards/ (run the engine first)")
    return out


def shard_tars(out: Path) -> list[Path]:
    return sorted(check_output(out).glob("shards/*.tar"))


def iter_samples(out: Path, *, with_images: bool = False) -> Iterator[WrittenSample]:
    """Every written sample, shard by shard, in the order the writer wrote them."""
    for tar_path in shard_tars(out):
        yield from iter_tar(tar_path, with_images=with_images)


def iter_tar(tar_path: Path, *, with_images: bool = False) -> Iterator[WrittenSample]:
    pending: dict[str, dict[str, Any]] = {}
    with tarfile.open(tar_path, "r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, ext = split_member_name(member.name)  # the rule the reader keyed the input with
            entry = pending.setdefault(key, {})
            if ext == "json":
                entry["json"] = json.loads(tar.extractfile(member).read())
            else:
                entry["image_name"] = member.name
                entry["image"] = tar.extractfile(member).read() if with_images else None
            if "json" in entry and "image_name" in entry:
                yield WrittenSample(entry["json"], entry["image_name"], entry["image"])
                del pending[key]


def iter_rejects(out: Path) -> Iterator[dict[str, Any]]:
    """Every reject row, shard by shard (one shard's rows in memory at a time)."""
    import pyarrow.parquet as pq

    for path in sorted(check_output(out).glob("rejects/*.parquet")):
        yield from pq.read_table(path).to_pylist()


def read_json(path: Path) -> dict[str, Any]:
    """A figures file (metrics.json, stats.json); {} when the run wrote none."""
    return json.loads(path.read_text()) if path.exists() else {}


def tiny_model_runs(metrics: dict[str, Any]) -> int:
    """How many invocations recorded in ``metrics`` (metrics.json) ran on ``--models tiny``:
    random-weight models whose captions, tags and boxes are noise."""
    from engine.core.models import ran_tiny_models

    return sum(1 for i in metrics.get("invocations") or [] if ran_tiny_models(i.get("config") or {}))
