"""Readers: small generator chains from an input shard to :class:`Sample` records.

``expand_shards`` turns ``--shards`` patterns into paths; ``read_shard`` picks the chain by
the shard's kind. Tar shards are streamed (``open → members → group by key → samples``) and
never extracted: member names are only ever split into key and extension, never used as paths.
Per-sample problems (a hostile name, an unreadable member) become failed samples, so the key
still reaches ``rejects/``; a truncated tar ends the shard with a shard-level error.
"""

from __future__ import annotations

import glob
import itertools
import json
import re
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from engine.core.config import InputConfig
from engine.core.errors import ConfigError
from engine.core.record import Sample, ShardEnd, Source

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
READER = "read"


# --- shard lists -----------------------------------------------------------------------


def expand_braces(pattern: str) -> list[str]:
    """``a{00..02}b{x,y}`` → 6 strings; zero padding of numeric ranges is kept."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if not match:
        return [pattern]
    head, body, tail = pattern[: match.start()], match.group(1), pattern[match.end():]
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        lo, hi = numeric.groups()
        width = len(lo) if lo.startswith("0") else 0
        choices = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        choices = body.split(",")
    return [s for c in choices for s in expand_braces(head + c + tail)]


def expand_shards(patterns: Iterable[str]) -> list[Path]:
    """Every pattern must match something; output shard names must be unique."""
    paths: list[Path] = []
    for pattern in patterns:
        for expanded in expand_braces(pattern):
            matches = sorted(glob.glob(expanded)) if glob.has_magic(expanded) else [expanded]
            if not matches or not Path(matches[0]).exists():
                raise ConfigError(f"input shard {expanded!r} does not exist (from {pattern!r})")
            paths.extend(Path(m) for m in matches)
    names: dict[str, Path] = {}
    for path in paths:
        name = shard_name(path)
        if name in names and names[name] != path:
            raise ConfigError(
                f"two input shards map to the same output name {name!r}: {names[name]} and "
                f"{path}; rename one (outputs are named after the input file)"
            )
        names[name] = path
    return list(dict.fromkeys(paths))


def shard_name(path: Path) -> str:
    name = path.name
    for suffix in (".tar.gz", ".tgz", ".tar", ".parquet"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def shard_kind(path: Path) -> str:
    if path.is_dir():
        return "folder"
    if path.name.endswith(".parquet"):
        return "parquet"
    if path.name.endswith((".tar", ".tar.gz", ".tgz")):
        return "tar"
    raise ConfigError(f"{path}: not a tar, parquet file or image folder")


# --- one shard -------------------------------------------------------------------------


@dataclass
class ShardReport:
    """Filled while a shard is read; becomes the :class:`ShardEnd` marker."""

    n_samples: int = 0
    errors: list[str] = field(default_factory=list)


def read_shard(path: Path, cfg: InputConfig, report: ShardReport) -> Iterator[Sample]:
    readers = {"tar": read_tar, "parquet": read_parquet, "folder": read_folder}
    samples = readers[shard_kind(path)](path, cfg, report)
    return reject_duplicate_keys(samples)


def shard_end(path: Path, report: ShardReport) -> ShardEnd:
    return ShardEnd(shard_name(path), str(path), report.n_samples, tuple(report.errors))


def reject_duplicate_keys(samples: Iterable[Sample]) -> Iterator[Sample]:
    """The key is the id everywhere: the first sample with a key wins, later ones are rejected."""
    seen: set[str] = set()
    for sample in samples:
        if sample.key in seen and sample.alive:
            sample.fail(READER, f"duplicate key {sample.key!r} in shard (first occurrence kept)")
        seen.add(sample.key)
        yield sample


@dataclass
class _Member:
    name: str
    data: bytes
    offset: int
    size: int
    error: str = ""


def tar_members(path: Path, report: ShardReport) -> Iterator[_Member]:
    """Regular-file members of a tar, streamed; a truncated tar ends with a shard error."""
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                try:
                    handle = tar.extractfile(info)
                    data = handle.read() if handle else b""
                    if len(data) != info.size:
                        raise tarfile.ReadError(f"read {len(data)} of {info.size} bytes")
                    yield _Member(info.name, data, info.offset_data, info.size)
                except (tarfile.TarError, OSError, EOFError) as exc:
                    yield _Member(info.name, b"", info.offset_data, info.size, f"unreadable member: {exc}")
                    raise
    except (tarfile.TarError, OSError, EOFError) as exc:
        report.errors.append(f"{path}: tar ends early or is corrupt ({exc}); members before it were read")


def split_member_name(name: str) -> tuple[str, str]:
    """``dir/000123.jpg`` → (``dir/000123``, ``jpg``); webdataset's rule: extension after the first dot of the basename."""
    directory, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{directory}/{stem}" if directory else stem
    return key, ext.lower() if dot else ""


def unsafe_name_reason(name: str) -> str:
    """Why a member name cannot become an output member name ('' when it is fine)."""
    if not name or name.startswith("/") or "\\" in name:
        return "absolute or malformed member name"
    if any(part == ".." for part in PurePosixPath(name).parts):
        return "member name escapes the shard ('..')"
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        return "control character in member name"
    return ""


def group_by_key(members: Iterable[_Member]) -> Iterator[tuple[str, dict[str, _Member]]]:
    """Consecutive members sharing a key form one sample (img2dataset writes them together)."""
    for key, group in itertools.groupby(members, key=lambda m: split_member_name(m.name)[0]):
        yield key, {split_member_name(m.name)[1]: m for m in group}


def read_tar(path: Path, cfg: InputConfig, report: ShardReport) -> Iterator[Sample]:
    name = shard_name(path)
    for key, parts in group_by_key(tar_members(path, report)):
        report.n_samples += 1
        image_ext = next((ext for ext in IMAGE_EXTS if ext in parts), "")
        image = parts.get(image_ext)
        member = image.name if image else next(iter(parts.values())).name
        sample = Sample(
            key=key,
            source=Source(name, str(path), member, image.offset if image else -1, image.size if image else -1),
            image_bytes=image.data if image else b"",
            image_ext=image_ext or "jpg",
        )
        problem = unsafe_name_reason(member)
        if problem:
            sample.key = _printable(key)
            sample.fail(READER, f"{problem}: {member!r}")
        elif image is None:
            sample.fail(READER, f"no image member (found: {', '.join(sorted(parts)) or 'nothing'})")
        elif image.error:
            sample.fail(READER, image.error)
        else:
            _attach_text(sample, parts, cfg)
        yield sample


def _printable(text: str) -> str:
    return "".join(ch if 32 <= ord(ch) < 127 else "?" for ch in text)


def _attach_text(sample: Sample, parts: dict[str, _Member], cfg: InputConfig) -> None:
    if "txt" in parts:
        sample.alt_text = decode_text(parts["txt"].data, cfg.max_alt_text_chars)
    if "json" in parts:
        try:
            meta = json.loads(parts["json"].data.decode("utf-8", errors="replace"))
            sample.meta = meta if isinstance(meta, dict) else {"value": meta}
        except json.JSONDecodeError as exc:
            sample.meta = {"meta_error": f"unreadable {sample.key}.json: {exc.msg}"}
    if not sample.alt_text:
        sample.alt_text = decode_text(str(sample.meta.get("caption") or "").encode(), cfg.max_alt_text_chars)


def decode_text(data: bytes, max_chars: int) -> str:
    """Alt text as UTF-8, undecodable bytes replaced (never dropped silently), cut to a cap."""
    text = data.decode("utf-8", errors="replace").strip()
    return text[:max_chars]


# --- parquet and folders ----------------------------------------------------------------

_IMAGE_COLUMNS = ("image", "jpg", "img", "image_bytes", "bytes")
_TEXT_COLUMNS = ("caption", "text", "TEXT", "alt_text", "txt")


def read_parquet(path: Path, cfg: InputConfig, report: ShardReport) -> Iterator[Sample]:
    import pyarrow.parquet as pq

    name = shard_name(path)
    file = pq.ParquetFile(path)
    columns = file.schema_arrow.names
    image_col = cfg.image_column or next((c for c in _IMAGE_COLUMNS if c in columns), "")
    if image_col not in columns:
        raise ConfigError(f"{path}: no image column (have {columns}); pass --image-column")
    text_col = cfg.text_column or next((c for c in _TEXT_COLUMNS if c in columns), "")
    key_col = cfg.key_column or ("key" if "key" in columns else "")
    row = 0
    for batch in file.iter_batches(batch_size=256):
        for record in batch.to_pylist():
            image = record.pop(image_col)
            if isinstance(image, dict):  # Hugging Face datasets' Image feature: {bytes, path}
                image = image.get("bytes")
            key = str(record.pop(key_col)) if key_col else f"{row:09d}"
            text = record.pop(text_col, None) if text_col else None
            report.n_samples += 1
            sample = Sample(key=key, source=Source(name, str(path), str(row)),
                            image_bytes=image or b"", image_ext="jpg")
            sample.alt_text = decode_text(str(text or "").encode(), cfg.max_alt_text_chars)
            sample.meta = {k: _jsonable(v) for k, v in record.items()}
            if not isinstance(image, (bytes, bytearray)) or not image:
                sample.fail(READER, f"row {row}: image column {image_col!r} holds no bytes")
            row += 1
            yield sample


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except TypeError:
        return str(value)


def read_folder(path: Path, cfg: InputConfig, report: ShardReport) -> Iterator[Sample]:
    """Images under a folder; ``name.txt`` beside ``name.jpg`` is its alt text."""
    name = shard_name(path)
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        ext = file.suffix.lower().lstrip(".")
        if ext not in IMAGE_EXTS:
            continue
        relative = file.relative_to(path).as_posix()
        key = relative.rsplit(".", 1)[0]
        report.n_samples += 1
        sample = Sample(key=key, source=Source(name, str(path), relative), image_ext=ext)
        try:
            sample.image_bytes = file.read_bytes()
            text = file.with_suffix(".txt")
            if text.exists():
                sample.alt_text = decode_text(text.read_bytes(), cfg.max_alt_text_chars)
        except OSError as exc:
            sample.fail(READER, f"cannot read {relative}: {exc}")
        yield sample


# --- selected members (pass 2 after curation) --------------------------------------------


@dataclass(frozen=True)
class Selected:
    """One sample pass 1 selected, located well enough to read it again directly."""

    key: str
    source: Source
    alt_text: str = ""
    embedding: Any = None  # pass 1's embedding (float32), so pass 2 can reuse it (CLIP zero-shot tags)


def read_selected(path: Path, selected: list[Selected], cfg: InputConfig) -> Iterator[Sample]:
    """The selected samples of one shard. Tars are read by member offset (a seek and a read
    per image, no scan of the rest of the tar); parquet files and folders are read through
    their normal chain, keeping only the selected keys."""
    if shard_kind(path) != "tar" or any(s.source.offset < 0 for s in selected):
        wanted = {s.key: s for s in selected}
        for sample in read_shard(path, cfg, ShardReport()):
            if sample.key in wanted:
                sample.embedding = wanted[sample.key].embedding
                yield sample
        return
    with open(path, "rb") as handle:
        for item in selected:
            sample = Sample(key=item.key, source=item.source, alt_text=item.alt_text,
                            image_ext=split_member_name(item.source.member)[1] or "jpg",
                            embedding=item.embedding)
            try:
                handle.seek(item.source.offset)
                sample.image_bytes = handle.read(item.source.size)
                if len(sample.image_bytes) != item.source.size:
                    raise OSError(f"read {len(sample.image_bytes)} of {item.source.size} bytes")
            except OSError as exc:
                sample.fail(READER, f"{path} member {item.source.member!r} at offset "
                                    f"{item.source.offset}: {exc}")
            yield sample
