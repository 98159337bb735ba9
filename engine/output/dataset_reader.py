"""Reading back a finished output folder (the output contract that engine/io/writers.py writes).

Statistics, exports and the report all start here. The tar shards are the source of truth:
``<key>.json`` holds ``sample.annotations()`` with ``meta`` and ``scores`` as real objects,
and the image bytes sit next to it. Only committed shards are read (temporaries end in .tmp).
"""

from __future__ import annotations

import heapq
import json
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

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


# Names held at once while listing a folder of the output in order (~150 bytes each).
LIST_BATCH = 1000


def output_files(out: Path, folder: str, suffix: str) -> Iterator[str]:
    """OUT/<folder>/*<suffix> in name order, in memory bounded whatever their number: the folder
    is listed once per LIST_BATCH names, each pass keeping the next names in order (50 passes
    over 50,000 shards: 7 s in all on a loaded machine; reading the shards takes hours). Paths
    are strings: pathlib interns every name it parses, and 50,000 names passing through the
    interpreter's table of interned strings make it resize, megabytes at a time."""
    directory = os.path.join(out, folder)
    after = ""
    while True:
        try:
            with os.scandir(directory) as entries:
                batch = heapq.nsmallest(LIST_BATCH, (e.name for e in entries
                                                     if e.name.endswith(suffix) and e.name > after
                                                     and not e.name.startswith(".")))
        except FileNotFoundError:
            return
        last, more = (batch[-1] if batch else ""), len(batch) == LIST_BATCH
        yield from (os.path.join(directory, name) for name in batch)
        del batch  # not held while the next pass lists the next names
        if not more:
            return
        after = last


def open_output_file(path: str | Path) -> BinaryIO:
    """A committed file of the output, opened for reading (the one place the readers open one)."""
    return open(path, "rb")


def shard_tars(out: Path) -> Iterator[str]:
    return output_files(check_output(out), "shards", ".tar")


def iter_samples(out: Path, *, with_images: bool = False) -> Iterator[WrittenSample]:
    """Every written sample, shard by shard, in the order the writer wrote them."""
    for tar_path in shard_tars(out):
        yield from iter_tar(tar_path, with_images=with_images)


def iter_tar(tar_path: str | Path, *, with_images: bool = False) -> Iterator[WrittenSample]:
    pending: dict[str, dict[str, Any]] = {}
    with open_output_file(tar_path) as handle, tarfile.open(fileobj=handle, mode="r:") as tar:
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

    for path in output_files(check_output(out), "rejects", ".parquet"):
        with open_output_file(path) as handle:
            rows = pq.read_table(handle).to_pylist()
        yield from rows


def read_json(path: Path) -> dict[str, Any]:
    """A figures file (metrics.json, stats.json); {} when the run wrote none."""
    return json.loads(path.read_text()) if path.exists() else {}


def tiny_model_runs(metrics: dict[str, Any]) -> int:
    """How many invocations recorded in ``metrics`` (metrics.json) ran on ``--models tiny``:
    random-weight models whose captions, tags and boxes are noise."""
    from engine.core.models import ran_tiny_models

    return sum(1 for i in metrics.get("invocations") or [] if ran_tiny_models(i.get("config") or {}))
