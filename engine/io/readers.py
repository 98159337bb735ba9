"""Readers: small generator chains from an input shard to :class:`Sample` records.

``expand_shards`` turns ``--shards`` patterns into paths and URLs (``engine.io.remote``: read in
place); ``read_shard`` picks the chain by the shard's kind; ``shard_items`` is what a driver
calls: the samples, then the shard's ``ShardEnd``, and no exception but a ``ConfigError``. Tar
shards are streamed by our own reader (``engine.io.tar``: open → members → group by key →
samples) and never extracted: member names only become keys (``engine.io.keys``: total and
injective), never paths.
A sample is one run of consecutive members with one key (webdataset's rule: a new sample
starts whenever the key changes); each key is given out once (``one_sample_per_key``): a key's
sample is its first run with an image member (or its first run, when none has one), and any
other run of it is a duplicate, rejected under its own key ``key\\#n``, so every key lands in
``shards/`` or ``rejects/`` exactly once.
Per-sample problems (a hostile name, a damaged or oversized member) become failed samples, so
the key still reaches ``rejects/``; damage to the archive itself becomes shard-level errors
with the byte ranges skipped; sidecars that cannot be read become flags.
"""

from __future__ import annotations

import glob
import itertools
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.core.config import InputConfig
from engine.core.record import Sample, ShardEnd, Source
from engine.io.keys import MemberName, escape, lost_name, parse_member_name, split_member_name, usable_key
from engine.io.remote import RemoteShard, Shard, UrlExpander, is_url, open_binary
from engine.io.sidecars import MAX_JSON_BYTES, parse_json_sidecar, text_bytes_to_read
from engine.io.tar import TarMember, TarReader, is_gzip, open_stream
from engine.io.text import decode_text, unescape_entities, valid_text
from models.errors import ConfigError

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


def expand_shards(patterns: Iterable[str]) -> list[Shard]:
    """Every pattern must match something and every image folder hold an image (all the
    problems are reported at once, before any model loads); output shard names must be unique.
    A URL is expanded by its store (a glob lists it) and names a :class:`RemoteShard`."""
    paths: list[Shard] = []
    unmatched: list[str] = []  # glob patterns that match nothing
    missing: list[str] = []  # plain names (a brace range's too) that do not exist
    urls = UrlExpander()
    for pattern in patterns:
        for expanded in expand_braces(pattern):
            if is_url(expanded):
                shards, found = urls.expand(expanded)
                paths.extend(shards)
                if not found:
                    (unmatched if glob.has_magic(expanded) else missing).append(expanded)
            elif glob.has_magic(expanded):
                matches = sorted(glob.glob(expanded))
                unmatched += [] if matches else [expanded]
                paths.extend(Path(m) for m in matches)
            elif Path(expanded).exists():
                paths.append(Path(expanded))
            else:
                missing.append(expanded)
    paths = list(dict.fromkeys(paths))
    # An empty folder would load every model and commit an empty shard.
    empty = [str(p) for p in paths if p.is_dir() and next(_image_files(p), None) is None]
    problems = [_problem(unmatched, "--shards pattern", "matches no file", "match no file"),
                _problem(missing, "input shard", "does not exist", "do not exist"),
                _problem(empty, "image folder", "holds no image file", "hold no image file")]
    problems = [p for p in problems if p]
    if empty:
        them = "it" if len(empty) == 1 else "them"
        problems[-1] += f" ({', '.join(IMAGE_EXTS)}): nothing to caption; leave {them} out of --shards"
    if problems:
        raise ConfigError("; ".join(problems))
    names: dict[str, Shard] = {}
    for path in paths:
        name = shard_name(path)
        if name in names:
            raise ConfigError(
                f"two input shards map to the same output name {name!r}: {names[name]} and "
                f"{path}; rename one (outputs are named after the input file)"
            )
        names[name] = path
    return paths


_LISTED = 5  # names shown in a problem; the rest are counted


def _problem(items: list[str], what: str, verb_one: str, verb_many: str) -> str:
    """'input shard 'a' does not exist', or '8 input shards 'a', ... and 3 more do not exist'."""
    if len(items) <= 1:
        return f"{what} {items[0]!r} {verb_one}" if items else ""
    shown = ", ".join(map(repr, items[:_LISTED])) + (f" and {len(items) - _LISTED} more" if len(items) > _LISTED else "")
    return f"{len(items)} {what}s {shown} {verb_many}"


def shard_name(path: Shard) -> str:
    name = path.name
    for suffix in (".tar.gz", ".tgz", ".tar", ".parquet"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def shard_kind(path: Shard) -> str:
    if path.is_dir():
        return "folder"
    if path.name.endswith(".parquet"):
        return "parquet"
    if path.name.endswith((".tar", ".tar.gz", ".tgz")):
        return "tar"
    raise ConfigError(f"{path}: not a tar, parquet file or image folder")


def expected_samples(path: Shard) -> int | None:
    """A shard's sample count when it is cheap to know before reading it (the progress bar's
    time left): a local parquet file's row count from its footer, a folder's image files; ``None``
    for a tar (its members are known only once read), a URL (a request each) or a file that cannot tell."""
    kind = shard_kind(path)
    if kind == "folder":
        return len(folder_images(path))
    if kind == "parquet" and not isinstance(path, RemoteShard):
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(path).metadata.num_rows
        except Exception:  # noqa: BLE001 - a broken file becomes a shard error when it is read
            return None
    return None


# --- one shard -------------------------------------------------------------------------


@dataclass
class ShardReport:
    """Filled while a shard is read; becomes the :class:`ShardEnd` marker."""

    n_samples: int = 0  # keys read (each one ends written or rejected)
    errors: list[str] = field(default_factory=list)
    skipped: list[tuple[int, int]] = field(default_factory=list)  # damaged byte ranges [start, end)
    unread_bytes: int = 0  # member data passed over without being kept


def read_shard(path: Shard, cfg: InputConfig, report: ShardReport) -> Iterator[Sample]:
    """A shard's samples, each key once (a tar's runs of members are made so in ``member_samples``),
    alt text unescaped."""
    kind = shard_kind(path)
    if kind == "tar":
        return unescape_alt_texts(read_tar(path, cfg, report))
    samples = {"parquet": read_parquet, "folder": read_folder}[kind](path, cfg, report)
    return unescape_alt_texts(one_sample_per_key((sample, True) for sample in samples))


def shard_items(path: Shard, cfg: InputConfig) -> Iterator[Sample | ShardEnd]:
    """One shard's samples, then its :class:`ShardEnd`, whatever the shard holds: anything the
    reader raises ends the shard with a shard-level error (kept in the manifest, so a rerun
    skips the shard instead of failing on it again) and the run goes on. A ``ConfigError`` is
    misconfiguration (e.g. no image column): it still stops the run before the shard commits."""
    report = ShardReport()
    try:
        yield from read_shard(path, cfg, report)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - third-party parsers raise more than they document
        report.errors.append(f"{path}: reading stopped after {report.n_samples} samples: "
                             f"{type(exc).__name__}: {str(exc)[:500]}")
    yield shard_end(path, report)


def shard_end(path: Shard, report: ShardReport) -> ShardEnd:
    return ShardEnd(shard_name(path), valid_text(str(path)), report.n_samples,
                    tuple(valid_text(e) for e in report.errors), tuple(report.skipped), report.unread_bytes)


def unescape_alt_texts(samples: Iterable[Sample]) -> Iterator[Sample]:
    """Alt text comes from web pages' alt attributes, often still HTML-escaped (``bike &amp;
    pickup truck``, common in LAION): its character references become characters, once, here
    where it is read, so the prompt, the parquet and the exports see the text a reader saw. The
    text as read stays in ``meta["alt_text_raw"]``."""
    for sample in samples:
        text = unescape_entities(sample.alt_text)
        if text != sample.alt_text:
            sample.meta["alt_text_raw"], sample.alt_text = sample.alt_text, text
        yield sample


def one_sample_per_key(samples: Iterable[tuple[Sample, bool]]) -> Iterator[Sample]:
    """The key is the id everywhere, so each is given out once and ends in ``shards/`` or
    ``rejects/`` once. Each sample comes with whether it claims its key (a tar run of members
    without an image member does not: sidecars apart from their image must not take the key
    from an image that comes later). A key's sample is the first that claims it, or, when none
    does, the first that does not (given out at the end). Any other sample with that key is a
    duplicate: rejected with the reason under ``key\\#n``, the key's n-th sample (escaping never
    writes ``\\#``, so that key equals no other). Holds each key given out (as the shard's keys
    always were), and the samples that wait (image-less: small)."""
    given: set[str] = set()
    copies: dict[str, int] = {}  # duplicates per key so far
    waiting: dict[str, Sample] = {}
    for sample, claims in samples:
        key = sample.key
        if key in given or (key in waiting and not claims):
            yield _duplicate(sample, copies)
        elif not claims:
            waiting[key] = sample
        else:
            given.add(key)
            yield sample
            if key in waiting:
                yield _duplicate(waiting.pop(key), copies)
    yield from waiting.values()


def _duplicate(sample: Sample, copies: dict[str, int]) -> Sample:
    key = sample.key
    copies[key] = copies.get(key, 1) + 1
    sample.key = f"{key}\\#{copies[key]}"
    sample.fail(READER, f"duplicate key {key!r} in shard: another sample with it is kept (in a tar, a sample "
                        f"is one run of consecutive members with one key); this one ({sample.source.member!r}) "
                        f"is rejected as {sample.key!r}")
    return sample


# --- tar shards ---------------------------------------------------------------------------


def read_tar(path: Shard, cfg: InputConfig, report: ShardReport) -> Iterator[Sample]:
    """Samples of a tar (plain or gzip), streamed by :class:`TarReader`; damage becomes shard
    errors with the byte ranges skipped, every member whose header survived becomes a sample."""
    with _open(path, cfg) as handle, open_stream(handle) as stream:
        tar = TarReader(stream, _keep_policy(cfg))
        try:
            for sample in member_samples(tar, shard_name(path), path, cfg):
                report.n_samples += 1
                yield sample
        finally:
            report.unread_bytes = tar.unread_bytes
            if tar.end_problem:
                report.errors.append(f"{path}: tar {tar.end_problem}; members before it were read")
            for damage in tar.damage:
                report.errors.append(f"{path}: bytes {damage.start}-{damage.end} skipped: {damage.what}")
                report.skipped.append((damage.start, damage.end))


def _open(path: Shard, cfg: InputConfig):
    """A shard's bytes: a local file, or its URL read in place with ranged resume."""
    return open_binary(path, retries=cfg.remote_retries, timeout_s=cfg.remote_timeout)


def _keep_policy(cfg: InputConfig):
    """How many bytes of a member the reader keeps: images up to --max-member-bytes (none
    above), the start of a .txt, a .json up to its cap, nothing of anything else."""
    text_bytes = text_bytes_to_read(cfg.max_alt_text_chars)
    image_exts = {ext.encode() for ext in IMAGE_EXTS}

    def keep(raw_name: bytes, size: int) -> int:
        ext = raw_name.rpartition(b"/")[2].partition(b".")[2].lower()
        if ext in image_exts:
            return size if size <= cfg.max_member_bytes else 0
        if ext == b"txt":
            return min(size, text_bytes)
        if ext == b"json":
            return size if size <= MAX_JSON_BYTES else 0
        return 0

    return keep


def member_samples(members: Iterable[TarMember], shard: str, path: Shard, cfg: InputConfig) -> Iterator[Sample]:
    """Consecutive members with one key form one sample (img2dataset writes them together; as
    webdataset does, a new sample starts whenever the key changes), each key once: a run
    without an image member waits for a run of its key that has one (see ``one_sample_per_key``)."""
    runs = (_Parts.collect(group) for _, group in itertools.groupby(_named(members), key=lambda named: named[0].key))
    return one_sample_per_key((_tar_sample(parts, shard, path, cfg), parts.image is not None) for parts in runs)


def _named(members: Iterable[TarMember]) -> Iterator[tuple[MemberName, TarMember]]:
    for member in members:
        if member.name_lost:
            yield lost_name(member.name, member.offset, member.problem), member
        else:
            yield parse_member_name(member.name), member


@dataclass
class _Parts:
    """The members of one key, kept to a bound: the first image, .txt and .json; the rest only
    counted (a key repeated a million times costs no more than one sample)."""

    name: MemberName
    image: tuple[MemberName, TarMember] | None = None
    sidecars: dict[str, TarMember] = field(default_factory=dict)  # "txt", "json"
    exts: list[str] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)

    @classmethod
    def collect(cls, group: Iterable[tuple[MemberName, TarMember]]) -> _Parts:
        parts: _Parts | None = None
        for name, member in group:
            if parts is None:
                parts = cls(name)
            if len(parts.exts) < 16 and name.ext not in parts.exts:
                parts.exts.append(name.ext)
            if name.ext in IMAGE_EXTS:
                if parts.image is None:
                    parts.image = (name, member)
                    continue
                what = "image"
            elif name.ext in ("txt", "json"):
                if name.ext not in parts.sidecars:
                    parts.sidecars[name.ext] = member
                    continue
                what = name.ext
            else:
                continue
            if len(parts.flags) < 16:
                parts.flags.append(f"read: another {what} member {name.shown!r} ignored (the first is kept)")
        assert parts is not None  # groupby never yields an empty group
        return parts


def _tar_sample(parts: _Parts, shard: str, path: Shard, cfg: InputConfig) -> Sample:
    image_name, image = parts.image or (parts.name, None)
    sample = Sample(
        key=parts.name.key,
        source=Source(shard, str(path), image_name.shown, image.data_offset if image else -1,
                      image.size if image else -1),
        image_ext=image_name.ext if image else "jpg",
    )
    if parts.name.problem:
        sample.fail(READER, f"{parts.name.problem}: {image_name.shown!r}")
    elif image is None:
        dotted = next((ext for ext in parts.exts if "." in ext), "")  # webdataset's rule, said where it bites
        sample.fail(READER, f"no image member (found: {', '.join(sorted(parts.exts)) or 'nothing'})" + (
            f"; an extension starts at the name's first dot, so {parts.name.key}.{dotted} is field {dotted!r} of "
            f"key {parts.name.key!r}" if dotted else ""))
    elif image.problem:
        sample.fail(READER, f"member {image_name.shown!r} {image.problem}")
    elif image.size > cfg.max_member_bytes:
        sample.fail(READER, f"member {image_name.shown!r} has {image.size} bytes, over "
                            f"--max-member-bytes ({cfg.max_member_bytes}): not read")
    else:
        sample.image_bytes = image.data
        sample.flags.extend(parts.flags)
        _attach_text(sample, parts, cfg)
    return sample


def _attach_text(sample: Sample, parts: _Parts, cfg: InputConfig) -> None:
    """Sidecars are data: whatever is wrong with one, it is ignored and a flag says why."""
    text, meta = parts.sidecars.get("txt"), parts.sidecars.get("json")
    if text is not None:
        if text.problem:
            sample.flags.append(f"read: txt sidecar ignored: it {text.problem}")
        else:
            sample.alt_text = decode_text(text.data, cfg.max_alt_text_chars)
    if meta is not None:
        problem = meta.problem and f"it {meta.problem}"
        if not problem:
            sample.meta, problem = parse_json_sidecar(meta.data, meta.size)
        if problem:
            sample.meta = {"meta_error": f"unreadable {sample.key}.json: {problem}"}
            sample.flags.append(f"read: json sidecar ignored: {problem}")
    if not sample.alt_text:
        sample.alt_text = decode_text(str(sample.meta.get("caption") or "").encode(), cfg.max_alt_text_chars)


# --- parquet and folders ----------------------------------------------------------------

_IMAGE_COLUMNS = ("image", "jpg", "img", "image_bytes", "bytes")
_TEXT_COLUMNS = ("caption", "text", "TEXT", "alt_text", "txt")


def read_parquet(path: Shard, cfg: InputConfig, report: ShardReport) -> Iterator[Sample]:
    import pyarrow.parquet as pq

    name = shard_name(path)
    if not isinstance(path, RemoteShard):  # pyarrow's own file reads a local file fastest
        yield from _parquet_samples(pq.ParquetFile(path), path, name, cfg, report)
        return
    with _open(path, cfg) as handle:
        yield from _parquet_samples(pq.ParquetFile(handle), path, name, cfg, report)


def _parquet_samples(file, path: Shard, name: str, cfg: InputConfig, report: ShardReport) -> Iterator[Sample]:
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
            key, problem = usable_key(str(record.pop(key_col)) if key_col else f"{row:09d}")
            text = record.pop(text_col, None) if text_col else None
            report.n_samples += 1
            sample = Sample(key=key, source=Source(name, str(path), str(row)),
                            image_bytes=image or b"", image_ext="jpg")
            sample.alt_text = decode_text(str(text or "").encode(), cfg.max_alt_text_chars)
            sample.meta = {k: _jsonable(v) for k, v in record.items()}
            if problem:
                sample.fail(READER, f"row {row}: {problem}: {key!r}")
            elif not isinstance(image, (bytes, bytearray)) or not image:
                sample.fail(READER, f"row {row}: image column {image_col!r} holds no bytes")
            elif len(image) > cfg.max_member_bytes:
                sample.fail(READER, f"row {row}: image of {len(image)} bytes is over --max-member-bytes "
                                    f"({cfg.max_member_bytes})")
            row += 1
            yield sample


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except TypeError:
        return str(value)


def _image_files(path: Path) -> Iterator[Path]:
    return (p for p in path.rglob("*") if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTS)


def folder_images(path: Path) -> list[Path]:
    """The image files under a folder (by extension), in the order they are read."""
    return sorted(_image_files(path))


def read_folder(path: Path, cfg: InputConfig, report: ShardReport) -> Iterator[Sample]:
    """Images under a folder; ``name.txt`` beside ``name.jpg`` is its alt text."""
    name = shard_name(path)
    for file in folder_images(path):
        ext = file.suffix.lower().lstrip(".")
        relative = file.relative_to(path).as_posix()
        key, problem = usable_key(relative.rsplit(".", 1)[0])
        report.n_samples += 1
        sample = Sample(key=key, source=Source(name, str(path), escape(relative)), image_ext=ext)
        if problem:
            sample.fail(READER, f"{problem}: {escape(relative)!r}")
            yield sample
            continue
        try:
            size = file.stat().st_size
            if size > cfg.max_member_bytes:
                sample.fail(READER, f"{relative} has {size} bytes, over --max-member-bytes ({cfg.max_member_bytes})")
            else:
                sample.image_bytes = file.read_bytes()
                text = file.with_suffix(".txt")
                if text.exists():
                    with open(text, "rb") as handle:
                        data = handle.read(text_bytes_to_read(cfg.max_alt_text_chars))
                    sample.alt_text = decode_text(data, cfg.max_alt_text_chars)
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


def read_selected(path: Shard, selected: list[Selected], cfg: InputConfig) -> Iterator[Sample]:
    """The selected samples of one shard. Tars are read by member offset (a seek and a read
    per image, no scan of the rest of the tar); gzipped tars (offsets are in the uncompressed
    stream), parquet files and folders are read through their normal chain, keeping only the
    selected keys (the shard's errors were recorded when pass 1 read it)."""
    if shard_kind(path) != "tar" or any(s.source.offset < 0 for s in selected) or _gzipped(path, cfg):
        wanted = {s.key: s for s in selected}
        for sample in shard_items(path, cfg):
            if isinstance(sample, Sample) and sample.key in wanted:
                sample.embedding = wanted[sample.key].embedding
                yield sample
        return
    with _open(path, cfg) as handle:
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


def _gzipped(path: Shard, cfg: InputConfig) -> bool:
    with _open(path, cfg) as handle:
        return is_gzip(handle)
