"""Property-based fuzzing of read → probe → decode (hypothesis, derandomized for CI).

Generated shards (ordinary, long, non-UTF-8 and control-character names; sidecars; small
images) are damaged by generated mutations (bytes flipped, inserted, deleted, cut; size and
type fields rewritten; zero blocks; huge extended headers; concatenation; gzip). Properties:

- reading never raises and never takes long;
- every copy of a member header that survives anywhere in the bytes becomes a member at
  exactly its place (its data right after it), under its own name when nothing before it
  could have renamed it (the reader's one stated limit aside: ``hidden_by_two_faults``);
- keys are total and injective (two names never share a key, an escaped key never equals a
  usable one); each run of members with one key is one sample, samples have distinct keys (a
  key's other runs are rejected as ``key\\#n``), a key's sample is a run with an image member
  whenever one has one, whatever the order of the members; keys are valid
  UTF-8, only usable keys stay alive, every reject has a reason;
- probe and decode turn any image bytes into a decoded view or a reason, never an exception.
"""

from __future__ import annotations

import gzip
import io
import itertools
import tempfile
import time
import zlib
from pathlib import Path
from unittest import mock

import pytest
from conftest import encode, jpeg
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image
from tar_corpus import END, GNU, header, long_name, member, pad, pax

from engine.core.config import DecodeConfig, FilterConfig, InputConfig
from engine.core.record import Sample, ShardEnd, Source
from engine.core.stage import ImageView
from engine.io import tar as tar_module
from engine.io.keys import key_problem, lost_name, parse_member_name, split_member_name
from engine.io.readers import IMAGE_EXTS, member_samples, shard_items
from engine.io.tar import TarReader, parse_header
from engine.stages.decode import Decode
from engine.stages.probe import ResolutionFilter

FUZZ = settings(derandomize=True, deadline=None, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
CFG = InputConfig(max_member_bytes=4096)
IMAGES = [jpeg(16, 12), encode(Image.new("RGB", (9, 20), (1, 2, 3)), "PNG"),
          encode(Image.new("P", (30, 8)), "GIF"), encode(Image.new("RGB", (12, 12)), "BMP")]

PLAIN = "abcdefghijklmnopqrstuvwxyz0123456789"
names = st.one_of(
    st.text(PLAIN, min_size=1, max_size=12).map(str.encode),
    st.binary(min_size=1, max_size=12),  # control characters, non-UTF-8, '/', '.'
    st.text(PLAIN, min_size=1, max_size=4).map(lambda s: (s * 60).encode()),  # past 100 bytes
    st.sampled_from([b"../up", b"/abs", b"dir/sub/k", b"ctl\x01", b"ctl?", b"caf\xc3\xa9", b"\xff\xfe"]),
)
exts = st.sampled_from([b"jpg", b"png", b"txt", b"json", b"gif", b"bmp", b"seg.png", b"JPG", b""])
payloads = st.one_of(st.sampled_from(IMAGES), st.binary(max_size=1500),
                     st.sampled_from([b'{"caption": "\\ud800"}', b"[" * 3000, b"1" * 4400, b"{}"]))


def build(entries: list[tuple[bytes, bytes, bytes, int]]) -> tuple[bytes, list[tuple[bytes, int, bytes]]]:
    """Members as (stem, ext, payload, header kind: plain, GNU long name, PAX path). Returns the
    tar and, per member, its headers (extended + plain), the plain one's length, and the name
    the format keeps (ustar fields and GNU long names end at a NUL; PAX records do not)."""
    data, headers = b"", []
    for stem, ext, payload, kind in entries:
        name = stem + (b"." + ext if ext else b"")
        extended, kept = b"", name.split(b"\0", 1)[0]
        if kind == 2:
            extended, kept = pax({b"path": name, b"hdrcharset": b"BINARY"}), name
        elif kind == 1 or len(name) > 100:
            extended = long_name(name)
        elif len(kept) == 100:
            kept = name  # a name of exactly 100 bytes fills the field: no NUL
        raw = extended + member(name[:100], payload, magic=GNU if kind == 1 else b"ustar\x0000")
        headers.append((raw[:len(extended) + 512], len(extended), kept))
        data += raw
    return data + END, headers


mutations = st.lists(st.tuples(st.sampled_from(["flip", "insert", "delete", "cut", "size", "type", "zeros",
                                                "pax", "repeat"]),
                               st.integers(0, 1 << 16), st.integers(0, 2000), st.binary(max_size=8)),
                     max_size=4)


def mutate(data: bytes, steps) -> bytes:
    for op, where, amount, extra in steps:
        at = where % (len(data) + 1)
        block = at - at % 512
        if op == "flip" and data:
            at = min(at, len(data) - 1)
            data = data[:at] + bytes([data[at] ^ (1 + amount % 255)]) + data[at + 1:]
        elif op == "insert":
            data = data[:at] + (extra or b"\0") * (1 + amount % 700) + data[at:]
        elif op == "delete":
            data = data[:at] + data[at + amount:]
        elif op == "cut":
            data = data[:at]
        elif op == "size":  # a valid header with a lying size field
            data = data[:block] + header(b"lie%d.jpg" % amount, amount * 7) + data[block + 512:]
        elif op == "type":
            kind = bytes([extra[0] if extra else 0x31])
            data = data[:block] + header(b"typed.jpg", amount, kind) + data[block + 512:]
        elif op == "zeros":
            data = data[:block] + bytes(512 * (1 + amount % 3)) + data[block:]
        elif op == "pax":  # a huge or malformed extended header in front of whatever follows
            body = b"9" * (amount * 50) if amount % 2 else b"%d path=x\n" % (amount * 1000)
            data = data[:block] + pax(body) + data[block:]
        elif op == "repeat":
            data = data + data[:at]
    return data


@pytest.fixture(scope="module")
def stages():
    """Probe and decode as a run builds them (PIL, one thread), set up once for all examples."""
    decode = Decode(DecodeConfig(decoder="pil", decode_threads=1), FilterConfig(min_short_edge=0),
                    (ImageView("embed", 24),))
    decode.setup()
    yield ResolutionFilter(FilterConfig(min_short_edge=0)), decode
    decode.teardown()


# How much of a member the caller keeps: all of it (the reader holds it whole), none (it is
# skipped, only its last bytes held), or a prefix (a .txt past its kept start)
KEEP = {"all": lambda name, size: min(size, 1 << 16), "none": lambda name, size: 0,
        "prefix": lambda name, size: min(size, 100)}


def read_members(data: bytes, gzipped: bool = False, keep: str = "all") -> tuple[list, TarReader, float]:
    start = time.perf_counter()
    stream = gzip.GzipFile(fileobj=io.BytesIO(data)) if gzipped else io.BytesIO(data)
    tar = TarReader(stream, KEEP[keep])
    members = list(tar)
    return members, tar, time.perf_counter() - start


@settings(FUZZ, max_examples=2000)
@given(entries=st.lists(st.tuples(names, exts, payloads, st.integers(0, 2)), min_size=1, max_size=8),
       steps=mutations, keep=st.sampled_from(sorted(KEEP)))
# Found by randomized runs of 20,000: a header off the grid behind three zero blocks (was lost),
# and one behind a lying size field with an extended header right after (the stated limit).
@example(entries=[(b"0", b"jpg", IMAGES[0], 1), (b"0", b"jpg", b"\0", 1)], steps=[("delete", 1289, 1535, b"")], keep="all")
@example(entries=[(b"0", b"jpg", IMAGES[0], 0)] * 2,
         steps=[("insert", 0, 0, b""), ("size", 512, 220, b""), ("pax", 3072, 0, b"")], keep="all")
def test_every_surviving_header_is_read_at_its_place(entries, steps, keep):
    data, headers = build(entries)
    damaged = mutate(data, steps)
    members, tar, seconds = read_members(damaged, keep=keep)
    assert seconds < 10, f"{seconds:.1f}s for {len(damaged)} bytes"  # a hang, not a speed goal
    by_data_offset = {m.data_offset: m for m in members}
    for raw, extended, name in headers:
        plain = raw[extended:]
        at = damaged.find(plain)
        while at >= 0:
            found = by_data_offset.get(at + 512)
            assert found is not None or hidden_by_two_faults(at, members, damaged), \
                f"the header at byte {at} survived but was not read"
            if found is None:
                at = damaged.find(plain, at + 1)
                continue
            whole = damaged[at - extended:at + 512] == raw  # its extended headers survived too
            if found.offset == at - extended and (whole or not extended):  # nothing else could rename it
                assert found.name == name
            at = damaged.find(plain, at + 1)
    if not steps:
        assert not tar.damage and not tar.end_problem
        assert [m.name for m in members] == [name for _, _, name in headers]
    check_samples(members)


def member_name(member):
    return lost_name(member.name, member.offset, member.problem) if member.name_lost else parse_member_name(member.name)


def hidden_by_two_faults(at: int, members, data: bytes) -> bool:
    """The one stated limit of the fast path (engine/io/tar.py): a header off the block grid
    inside a member read whole, with a valid header right after that member's data (bytes
    lost inside it *and* a rewritten header lined up behind it), reads as that member's data.
    The header behind may be an extended one that makes no member of its own."""
    for m in members:
        end = m.data_offset + -(-m.size // 512) * 512
        if m.data_offset < at < end and (at - m.data_offset) % 512 and parse_header(data[end:end + 512]):
            return True
    return False


def check_samples(members) -> list[Sample]:
    """Each run of members with one key is one sample, under a key of its own; a key's own
    sample (its plain key) is a run with an image member whenever one has one."""
    samples = list(member_samples(members, "s", Path("s.tar"), CFG))
    keys = [s.key for s in samples]
    assert len(keys) == len(set(keys)), "a key given out twice"
    runs = [(key, [m for _, m in group]) for key, group in
            itertools.groupby(((name.key, name) for name in map(member_name, members)), key=lambda x: x[0])]
    assert len(samples) == len(runs), "a run of members without its own sample"
    with_image = {key for key, names in runs if any(n.ext in IMAGE_EXTS for n in names)}
    plain = {s.key: s for s in samples}
    for key in {key for key, _ in runs}:
        assert key in plain, f"no sample under {key!r} itself"
        assert (key in with_image) == (plain[key].source.offset >= 0), f"{key!r} is not its run with an image"
    for sample in samples:
        sample.key.encode("utf-8")
        sample.reason.encode("utf-8")
        sample.source.member.encode("utf-8")
        assert not sample.alive or not key_problem(sample.key)
        assert sample.alive or sample.reason
    return samples


@settings(FUZZ, max_examples=500)
@given(entries=st.lists(st.tuples(names, exts, payloads, st.integers(0, 2)), min_size=1, max_size=6),
       cut=st.integers(0, 1 << 14))
def test_gzip_cut_anywhere_reads_what_decompresses(entries, cut):
    data, headers = build(entries)
    packed = zlib.compress(data, 1, wbits=31)
    damaged = packed[:cut % (len(packed) + 1)]
    members, tar, _ = read_members(damaged, gzipped=True)
    readable = zlib.decompressobj(wbits=31).decompress(damaged)
    offsets = {m.data_offset for m in members}
    for raw, extended, _ in headers:
        at = readable.find(raw[extended:])
        if at >= 0:
            assert at + 512 in offsets, f"the header at byte {at} decompresses but was not read"
    assert bool(tar.end_problem) == (len(damaged) < len(packed))
    check_samples(members)


@settings(FUZZ, max_examples=400)
@given(order=st.lists(st.tuples(st.sampled_from([b"k", b"j", b"dir/k"]), st.sampled_from([b"jpg", b"png", b"txt", b"json"]),
                                st.integers(0, 2)), min_size=1, max_size=10),
       steps=mutations)
def test_members_in_any_order_give_each_key_once(order, steps):
    """Issue 21, item 5: members of a key apart from each other (``k.jpg, j.jpg, k.txt``;
    ``k.txt, j.jpg, k.jpg``; a PAX block lost between them). Each run is one sample under a key
    of its own, and a key's sample is a run with an image whenever one has it."""
    entries = [(key, ext, IMAGES[0] if ext in (b"jpg", b"png") else b"t", kind) for key, ext, kind in order]
    members, _, _ = read_members(mutate(build(entries)[0], steps))
    samples = check_samples(members)
    if not steps:  # the order alone says what each key's sample is
        runs = [key for key, _ in itertools.groupby(key for key, _, _ in order)]
        assert len(samples) == len(runs)
        by_key = {s.key: s for s in samples}
        for key in set(runs):
            has_image = any(k == key and e in (b"jpg", b"png") for k, e, _ in order)
            assert by_key[key.decode()].alive == has_image


# Data that says ``ustar`` every few bytes without holding a header: the units the byte-by-byte
# search spent a full header test on, and generated ones (the magic, then digits, spaces, NULs)
hostile_units = st.one_of(st.sampled_from([b"ustar000", b"ustar0", b"ustar" + b"0" * 19, b"ustar\x0000" + b"7" * 8]),
                          st.tuples(st.binary(max_size=8), st.lists(st.sampled_from(b"0127 \0"), max_size=24))
                          .map(lambda t: t[0] + b"ustar" + bytes(t[1])))


def without_headers(unit: bytes, size: int) -> bytes:
    """``unit`` repeated to ``size`` bytes, a byte changed wherever a valid header would start."""
    data = bytearray((unit * (size // len(unit) + 1))[:size])
    at = data.find(b"ustar")
    while at >= 0:
        if at >= 257 and parse_header(bytes(data[at - 257:at + 255]).ljust(512, b"\0")) is not None:
            data[at - 257 + 148] = ord("9")  # an invalid checksum field
        at = data.find(b"ustar", at + 1)
    return bytes(data)


@settings(FUZZ, max_examples=60)
@given(unit=hostile_units, size=st.integers(600, 200_000), keep=st.sampled_from(sorted(KEEP)),
       place=st.sampled_from(["member", "pax", "resync"]), lie=st.integers(-3, 3))
def test_lying_data_costs_no_header_test_per_hit(unit, size, keep, place, lie):
    """Issue 21, item 3: data full of the magic, in a member (kept or skipped, its size field
    true or lying by whole blocks), in an extended header, or after damage, is passed over with
    no Python header test per hit (only the archive's own headers are tested), and the member
    after it is read at its place."""
    data = without_headers(unit, size)
    claimed = max(0, size + 512 * lie) if place == "member" else size
    before = {"member": header(b"fill.bin", claimed) + pad(data), "pax": pax(data),
              "resync": header(b"lost.bin", size, bad_checksum=True) + pad(data)}[place]
    after = member(b"after.jpg", IMAGES[0])
    with mock.patch.object(tar_module, "parse_header", wraps=tar_module.parse_header) as spy:
        members, tar, _ = read_members(before + after + END, keep=keep)
    assert members[-1].name == b"after.jpg" and members[-1].data_offset == len(before) + 512
    assert len(members) <= 2
    assert spy.call_count <= 8, f"{spy.call_count} header tests for {len(data)} bytes"


@settings(FUZZ, max_examples=400)
@given(entries=st.lists(st.tuples(names, exts, payloads, st.integers(0, 2)), min_size=1, max_size=6),
       steps=mutations, gzipped=st.booleans())
def test_read_probe_decode_accounts_for_every_key(stages, entries, steps, gzipped):
    """The chain a run uses (shard_items → probe → decode) on a damaged shard file: one
    ShardEnd, as many samples as it counts, each decoded or rejected with a reason."""
    data = mutate(build(entries)[0], steps)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / ("s.tar.gz" if gzipped else "s.tar")
        path.write_bytes(zlib.compress(data, 1, wbits=31) if gzipped else data)
        items = list(shard_items(path, CFG))
    end = items.pop()
    assert isinstance(end, ShardEnd) and end.n_samples == len(items)
    assert all(isinstance(s, Sample) for s in items)
    probe, decode = stages
    for sample in decode.process(probe.process(items)):
        assert (sample.alive and sample.views["embed"].ndim == 3) or (not sample.alive and sample.reason)
    alive = [s.key for s in items if s.alive]
    assert len(alive) == len(set(alive))


def field_bytes(width: int):
    """A tar number field as writers and forgers leave it: digits, spaces, NULs, base-256 marks."""
    return st.lists(st.sampled_from(b"01234567 \0\x80\xff8u"), min_size=width, max_size=width).map(bytes)


@st.composite
def header_like(draw) -> bytes:
    """A ustar header with its size and checksum fields rewritten; its checksum then true
    (unsigned or signed, in any layout the parser takes) or not."""
    block = bytearray(header(draw(st.sampled_from([b"a.jpg", b"\xff\xfe\xfd.jpg"])), 0))
    block[124:136] = draw(field_bytes(12))
    block[148:156] = b" " * 8
    if draw(st.booleans()):
        signed = draw(st.booleans())
        total = sum(b - 256 * (signed and b >= 128) for b in block)
        layout = draw(st.sampled_from([b"%06o\0 ", b"%07o\0", b" %o\0xyz", b"%o  ", b"%08o"]))
        block[148:156] = (layout % total)[:8].ljust(8, b"\0") if total >= 0 else b"-"
    else:
        block[148:156] = draw(field_bytes(8))
    return bytes(block)


@settings(FUZZ, max_examples=300)
@given(parts=st.lists(st.one_of(header_like(), st.sampled_from([b"ustar000" * 9, b"ustar0", b"\0" * 511, b"x"])),
                      max_size=12),
       lo=st.integers(0, 700), hi=st.integers(0, 8000))
def test_the_vectorised_header_search_finds_what_a_byte_by_byte_one_finds(parts, lo, hi):
    """The reader tests every offset of a span at once, as 64-bit words; ``parse_header``, one
    offset at a time, is the reference (issue 21, item 3)."""
    buf = b"".join(parts)
    expect = next((h for h in range(lo, min(hi, len(buf) - 511)) if buf[h + 257:h + 262] == b"ustar"
                   and parse_header(buf[h:h + 512])), -1)
    assert tar_module._find_header(buf, lo, hi) == expect
    aligned = next((h for h in range(0, len(buf) - 511, 512) if buf[h + 257:h + 262] == b"ustar"
                    and parse_header(buf[h:h + 512])), -1)
    assert tar_module._aligned_header(buf) == aligned


image_mutations = st.lists(st.tuples(st.sampled_from(["flip", "cut", "insert", "dims"]),
                                     st.integers(0, 1 << 12), st.integers(0, 255)), max_size=3)


@settings(FUZZ, max_examples=800)
@given(base=st.sampled_from(IMAGES + [b"", b"GIF89a", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff"]),
       steps=image_mutations)
def test_probe_and_decode_never_raise(stages, base, steps):
    data = base
    for op, where, value in steps:
        at = where % (len(data) + 1)
        if op == "flip" and data:
            at = min(at, len(data) - 1)
            data = data[:at] + bytes([value]) + data[at + 1:]
        elif op == "cut":
            data = data[:at]
        elif op == "insert":
            data = data[:at] + bytes([value]) * (value + 1) + data[at:]
        elif op == "dims" and len(data) > 24:  # width/height fields of PNG and GIF headers
            data = data[:16] + b"\x7f\xff\xff\xff" + data[20:] if data[:4] == b"\x89PNG" else \
                data[:6] + bytes([0xFF, 0xFF, 0xFF, 0xFF]) + data[10:]
    sample = Sample(key="k", source=Source("s", "s.tar", "k.jpg"), image_bytes=data)
    probe, decode = stages
    (sample,) = decode.process(probe.process([sample]))
    assert (sample.alive and sample.views["embed"].ndim == 3) or (not sample.alive and sample.reason)


@settings(FUZZ, max_examples=500)
@given(raws=st.lists(st.one_of(st.binary(max_size=16), st.sampled_from(
    [b"ctl\x01.jpg", b"ctl\\x01.jpg", b"ctl?.jpg", b"a\xc2\x85.jpg", b"a\\u0085.jpg", b"a\x85.jpg", b""])),
    min_size=2, max_size=12))
def test_keys_are_total_and_injective(raws):
    """Every name gets a valid UTF-8 key; two different keys in the names never share one;
    a usable key is kept as it is, and no escaped key equals a usable one."""
    owner: dict[str, str] = {}
    for raw in raws:
        name = parse_member_name(raw)
        name.key.encode("utf-8"), name.shown.encode("utf-8"), name.ext.encode("utf-8")
        stem = split_member_name(raw.decode("utf-8", "surrogateescape"))[0]
        assert owner.setdefault(name.key, stem) == stem, f"{stem!r} and {owner[name.key]!r} share {name.key!r}"
        assert (not name.problem) == (name.key == stem and not key_problem(name.key))
        assert bool(name.problem) == bool(key_problem(name.key))  # escaping keeps a key unusable
