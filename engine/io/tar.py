"""A streaming tar reader of our own, for damaged and hostile shards.

Why not ``tarfile``: on the Python this project runs (3.11.7, before the CVE-2024-6232 fix)
its PAX header regex is quadratic (1 MiB of digits: about 17 minutes); on hostile headers it
raises ``ValueError``, ``IndexError`` and ``UnicodeDecodeError`` as well as ``TarError``; and on
damage in the middle of an archive it reports a normal end, so every key after the damage was
lost without a word. Guarding it would mean re-parsing each header ourselves anyway. This reader:

- reads ustar, GNU (long names ``L``/``K``) and PAX (``x``/``g``) headers, plain or gzip
  (recognised by its magic bytes, whatever the file name says);
- checks every header's checksum and size; on damage it records the byte range it skips and
  what was wrong, then resynchronises at the next valid header *at any offset* (``ustar``
  magic plus a good checksum), so a bad header costs its member, not the rest of the shard;
- reads through zero blocks and concatenated archives (as ``tar --ignore-zeros`` does), and
  says when an archive ends without its two end-of-archive blocks;
- trusts a member's size field to skip its data: only block boundaries are looked at for a
  header (one byte in 512; a size field that lies swallows whole members, whose headers lie on
  the grid), so skipping runs at disk speed whatever the data holds (``ustar`` repeated used to
  cost a full header test per hit: 2 MiB/s). A header found there ends the member, which is
  marked, and reading goes on at the header. A header off the grid (bytes lost inside the
  member) shows as damage or an odd end after it (past any zero blocks), and is searched for
  then in the bytes still held: the whole member when it was kept, else its last MiB or two;
- searches at any offset only to resynchronise after damage: ``bytes.find`` passes over data
  without the magic, and where it is, numpy tests every offset of a span at once (the magic,
  then the checksum and size fields and the checksum as 64-bit words), so the work per
  candidate is bounded;
- caps extended headers (PAX records, GNU long names) and parses PAX records in one linear pass;
- reads data in chunks and keeps only what the caller's ``keep(name, size)`` asks for, so a
  member over the caller's cap costs two chunks of memory, never its size; ``unread_bytes``
  says how much member data was passed over without being kept.

Offsets are positions in the uncompressed stream (for a plain tar, file offsets). Names stay
bytes (a PAX ``hdrcharset=BINARY`` name is just bytes too): :mod:`engine.io.keys` turns them
into keys. Limits, stated: a header without the ``ustar`` magic (pre-POSIX V7) is read in
sequence but cannot be found again after damage; an uncompressed tar stored as a member looks
like damage (its headers are headers); a damaged gzip stream ends the shard where it breaks;
a header off the block grid inside a member is missed when a valid header still follows that
member (two faults lined up: bytes lost inside it and a rewritten header behind), or when it
lies more than a MiB before the end of a member whose data was not kept.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

BLOCK = 512
_ZERO = bytes(BLOCK)
_CHUNK = 1 << 20  # read size; a skipped member holds its last two at most, for ``_rescan``
_MAGIC = b"ustar"
_MAGIC_AT = 257
_MAGIC_BYTES = np.frombuffer(_MAGIC, np.uint8)
# The first two bytes a valid header can have in its checksum field (a digit or a space, then
# also the NUL after one digit) and its size field (also a NUL: empty, or base-256's 0x80,
# either with anything after it), as tables indexed by the two bytes
_FIRST_BYTES = tuple((at, np.isin(np.arange(1 << 16) & 0xFF, list(first))
                       & (np.isin(np.arange(1 << 16) >> 8, list(b"01234567 \0"))
                          | np.isin(np.arange(1 << 16) & 0xFF, list(ends))))
                      for at, first, ends in ((148, b"01234567 ", b""), (124, b"01234567 \0\x80", b"\0\x80")))
_MAGIC_WORD = int.from_bytes(_MAGIC, "little")
_U64 = np.uint64
_ONES = _U64(0x0101010101010101)
_HIGH = _U64(0x8080808080808080)
_LOW7 = _U64(0x7F7F7F7F7F7F7F7F)
_GATHER = _U64(0x0102040810204080)  # times the byte flags (bits 8j): flag j lands at bit 56 + j
_LAST = np.array([max(i.bit_length() - 1, 0) for i in range(256)], np.uint64)  # highest set bit
_BYTES_OF = np.array([sum(0xFF << 8 * j for j in range(8) if i >> j & 1) for i in range(256)], np.uint64)
_SPAN = 1 << 18  # offsets tested at once when searching: a header found early costs one span
MAX_EXTENDED_BYTES = 1 << 20  # one PAX record set or GNU long name (real ones are < 4 KiB)
MAX_NAME_BYTES = 1 << 16
# Zero blocks a header hidden inside the last member may reach across (its own member's zero
# data, then the end-of-archive blocks, all shifted off the grid): at most 1 MiB held to look.
_RESCAN_ZERO_BLOCKS = 2048

_FILE_TYPES = {b"0", b"\0", b"7"}  # regular, old regular, contiguous
_NOT_FILES = {b"1": "a hard link", b"2": "a symbolic link", b"3": "a character device",
              b"4": "a block device", b"5": "a directory", b"6": "a FIFO"}
_EXTENDED = {b"x", b"g", b"L", b"K"}
_SPARSE = b"S"


@dataclass
class TarMember:
    name: bytes  # raw: PAX path, GNU long name, or ustar prefix/name
    offset: int  # where its first header (extended or plain) starts
    data_offset: int
    size: int  # from its headers
    data: bytes = b""  # the first ``keep(name, size)`` bytes
    problem: str = ""  # why it cannot be used ('' when it can)
    name_lost: bool = False  # its extended header was unusable: ``name`` is the ustar fallback


@dataclass(frozen=True)
class Damage:
    """Bytes ``[start, end)`` of the (uncompressed) stream that held no usable header."""

    start: int
    end: int
    what: str


GZIP_MAGIC = b"\x1f\x8b"


@contextmanager
def open_stream(handle: BinaryIO) -> Iterator[BinaryIO]:
    """The bytes of an open shard (a local file, or a URL's reader: ``engine.io.remote``), gunzipped
    when its first bytes are gzip's magic. The caller closes ``handle``."""
    gzipped = is_gzip(handle)
    if not gzipped:
        yield handle
        return
    with gzip.GzipFile(fileobj=handle, mode="rb") as unzipped:
        yield unzipped


def is_gzip(handle: BinaryIO) -> bool:
    """Whether an open shard is gzip; ``handle`` is left at its start."""
    gzipped = handle.read(2) == GZIP_MAGIC
    handle.seek(0)
    return gzipped


class _Input:
    """Reads with a position and a push-back buffer; a damaged compressed stream reads as its end."""

    def __init__(self, raw: BinaryIO):
        self.raw, self.pos = raw, 0
        self._back, self._back_at = b"", 0  # pushed-back bytes, and how many were read again
        self.failure = ""  # why the stream stopped before its end ('' at a real end)

    def read(self, n: int) -> bytes:
        """``n`` bytes, fewer only at the end of the stream."""
        out = self._back[self._back_at:self._back_at + n]
        self._back_at += len(out)
        if self._back_at == len(self._back):  # used up: what ``unread`` finds there must be what was read last
            self._back, self._back_at = b"", 0
        while len(out) < n and not self.failure:
            try:
                more = self.raw.read(n - len(out))
            except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
                self.failure = f"{type(exc).__name__}: {exc}"
                break
            if not more:
                break
            out = more if not out else out + more
        self.pos += len(out)
        return out

    def unread(self, data: bytes) -> None:
        """Give back the last bytes read (after damage or a header found inside data). When they
        came from the push-back buffer they are still there: nothing is copied, so members
        found one after another inside a chunk cost no more than reading it."""
        self.pos -= len(data)
        if len(data) <= self._back_at:
            self._back_at -= len(data)
        else:
            self._back, self._back_at = data + self._back[self._back_at:], 0


@dataclass
class _Header:
    name: bytes
    size: int
    type: bytes
    extended: bool  # GNU sparse: extension blocks follow


def parse_header(block: bytes) -> _Header | None:
    """The header in a 512-byte block, or None when its checksum or size field is invalid."""
    checksum = _octal(block[148:156])
    if checksum is None:
        return None
    unsigned = sum(block) - sum(block[148:156]) + 8 * 32
    if checksum != unsigned:
        signed = sum(struct.unpack("148b8x356b", block)) + 8 * 32
        if checksum != signed:
            return None
    size = _number(block[124:136])
    if size is None or size < 0:
        return None
    name = block[:100].split(b"\0", 1)[0]
    if block[257:263] == b"ustar\x00":  # POSIX: prefix/name; GNU's magic uses that area otherwise
        prefix = block[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return _Header(name, size, block[156:157], block[482] != 0)


def _octal(field: bytes) -> int | None:
    digits = field.split(b"\0", 1)[0].strip(b" ")
    if not digits or digits.strip(b"01234567"):
        return None
    return int(digits, 8)


def _number(field: bytes) -> int | None:
    """Octal, or GNU base-256 (first byte 0x80 positive, 0xff negative); '' reads as 0."""
    if field[0] in (0x80, 0xFF):
        value = int.from_bytes(field[1:], "big")
        return value if field[0] == 0x80 else value - (1 << (8 * (len(field) - 1)))
    digits = field.split(b"\0", 1)[0].strip(b" ")
    if not digits:
        return 0
    return None if digits.strip(b"01234567") else int(digits, 8)


def parse_pax(data: bytes) -> dict[bytes, bytes]:
    """PAX records ``"<len> <key>=<value>\\n"`` in one linear pass; ValueError when malformed."""
    records: dict[bytes, bytes] = {}
    pos, end = 0, len(data)
    while pos < end and data[pos] != 0:
        space = data.find(b" ", pos, pos + 21)
        digits = data[pos:space] if space > pos else b""
        if not digits.isdigit():
            raise ValueError(f"PAX record at byte {pos} has no length")
        stop = pos + int(digits)
        if stop > end or stop <= space + 2 or data[stop - 1] != 0x0A:
            raise ValueError(f"PAX record at byte {pos} has a wrong length")
        equals = data.find(b"=", space + 1, stop)
        if equals < 0:
            raise ValueError(f"PAX record at byte {pos} has no '='")
        key, value = data[space + 1:equals], data[equals + 1:stop - 1]
        if value:
            records[key] = value
        else:
            records.pop(key, None)  # an empty value deletes the key
        pos = stop
    return records


def _overrun(size: int, header_at: int) -> str:
    return f"runs over the next header (its size field says {size} bytes; a header starts at byte {header_at})"


def _aligned_header(buf: bytes) -> int:
    """The first block boundary of ``buf`` where a valid header starts, else -1. One byte in
    512 is looked at first (~1 µs for a 200 KB image); where the magic's first byte is, every
    block boundary is tested at once."""
    if b"u" not in buf[_MAGIC_AT::BLOCK]:
        return -1
    n = len(buf) // BLOCK
    blocks = np.frombuffer(buf, np.uint8, n * BLOCK).reshape(n, BLOCK)
    starts = np.flatnonzero((blocks[:, _MAGIC_AT:_MAGIC_AT + len(_MAGIC)] == _MAGIC_BYTES).all(1)) * BLOCK
    return _first_valid(buf, starts)


def _padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def _find_header(buf: bytes, lo: int, hi: int) -> int:
    """The first ``h`` in ``[lo, hi)`` where a valid header starts in ``buf``, else -1.
    ``bytes.find`` passes over data without the magic at memory speed; from the first magic on,
    a span at a time, numpy tests every offset at once (hostile data holds the magic every few
    bytes, and a header test per hit in Python ran at 2 MiB/s)."""
    hi = min(hi, len(buf) - BLOCK + 1)
    first = buf.find(_MAGIC, lo + _MAGIC_AT, hi + _MAGIC_AT + len(_MAGIC) - 1) if hi > lo else -1
    if first < 0:
        return -1
    arr = np.frombuffer(buf, np.uint8)
    for span in range(first - _MAGIC_AT, hi, _SPAN):
        hit = _first_valid(buf, _candidates(arr, span, min(hi, span + _SPAN)))
        if hit >= 0:
            return hit
    return -1


def _candidates(arr: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Offsets in ``[lo, hi)`` with the magic and first bytes of the checksum and size fields
    that a valid header can have: one pass over the span for the magic's first byte, then
    tests of those offsets only (hostile data holds it every few bytes, not at every one)."""
    starts = np.flatnonzero(arr[lo + _MAGIC_AT:hi + _MAGIC_AT] == _MAGIC[0]) + lo
    words = _words(arr)
    starts = starts[words[starts + _MAGIC_AT] & _U64(0xFFFFFFFFFF) == _MAGIC_WORD]
    for at, allowed in _FIRST_BYTES:
        starts = starts[allowed[words[starts + at] & _U64(0xFFFF)]]
    return starts


def _first_valid(buf: bytes, starts: np.ndarray) -> int:
    """The first of ``starts`` (ascending) where a valid header starts, else -1. All of them are
    tested at once, as ``parse_header`` tests one (checksum field, size field, the checksum),
    with each field read as one 64-bit word: the work per candidate is a few word operations
    whatever the data holds. ``parse_header`` confirms the one returned."""
    starts = starts[starts + BLOCK <= len(buf)]
    if not starts.size:
        return -1
    words = _words(buf)
    checksum, valid = _octal_word(words[starts + 148])
    starts, checksum = starts[valid], checksum[valid]
    field = words[starts + 148]
    pairs = (field & _U64(0x00FF00FF00FF00FF)) + ((field >> _U64(8)) & _U64(0x00FF00FF00FF00FF))
    field_sum = (pairs * _U64(0x0001000100010001) >> _U64(48)).astype(np.int64)
    unsigned = _block_sums(buf, starts) - field_sum + 8 * 32  # the field counts as 8 spaces
    # a signed sum counts each byte >= 128 256 less: only a multiple of 256 below can match
    plausible = (checksum == unsigned) | ((checksum < unsigned) & ((unsigned - checksum) % 256 == 0))
    starts, checksum, field, unsigned = starts[plausible], checksum[plausible], field[plausible], unsigned[plausible]
    low, high = words[starts + 124], words[starts + 132] & _U64(0xFFFFFFFF)  # the 12-byte size field
    first = low & _U64(0xFF)
    valid = (first == 0x80) | ((first != 0xFF) & _octal_shape(*_classes(low), *_classes(high))[0])
    starts, checksum, field, unsigned = starts[valid], checksum[valid], field[valid], unsigned[valid]
    match = checksum == unsigned
    if not match.all():  # the signed sum: how many bytes >= 128 the block has outside the field
        signed = ~match
        field_high = ((field[signed] & _HIGH) >> _U64(7)) * _ONES >> _U64(56)
        high = _block_sums(buf, starts[signed], high_bytes=True) - field_high.astype(np.int64)
        match[signed] = checksum[signed] == unsigned[signed] - 256 * high
    for h in starts[match]:
        if parse_header(buf[h:h + BLOCK]) is not None:
            return int(h)
    return -1


def _words(buf) -> np.ndarray:
    """The 8 bytes at every offset of ``buf`` as little-endian words: a view, nothing copied."""
    return np.ndarray((len(buf) - 7,), "<u8", buf, 0, (1,))


def _zero_bytes(words: np.ndarray) -> np.ndarray:
    """An 8-bit mask per word: bit j set when byte j is 0 (exact: no carries between bytes)."""
    flags = ~(((words & _LOW7) + _LOW7) | words | _LOW7)
    return (flags >> _U64(7)) * _GATHER >> _U64(56)


def _classes(words: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(octal digits, spaces, NULs) of each word's bytes, as 8-bit masks."""
    return (_zero_bytes((words & _U64(0xF8F8F8F8F8F8F8F8)) ^ _U64(0x3030303030303030)),
            _zero_bytes(words ^ _U64(0x2020202020202020)), _zero_bytes(words))


def _octal_shape(*classes: np.ndarray, empty_ok: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Whether a field (the classes of its words, in order) reads as a number: up to its first
    NUL, spaces around one run of octal digits (no digit: 0 when ``empty_ok``); and the run."""
    digits = spaces = nuls = np.zeros_like(classes[0])
    for i in range(0, len(classes), 3):
        shift = _U64(8 * i // 3)
        digits, spaces = digits | classes[i] << shift, spaces | classes[i + 1] << shift
        nuls = nuls | classes[i + 2] << shift
    before = (nuls & (~nuls + _U64(1))) - _U64(1)  # the bytes before the first NUL (all: none)
    before &= _U64((1 << 8 * len(classes) // 3) - 1)  # of this field's bytes
    run = digits & before
    valid = ((before & ~(digits | spaces)) == 0) & ((((run | (run - _U64(1))) + _U64(1)) & run) == 0)
    return (valid & (run != 0) if not empty_ok else valid), run


def _octal_word(field: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(value, valid) of 8-byte fields read as ``_octal`` reads one."""
    valid, run = _octal_shape(*_classes(field), empty_ok=False)
    run = run.astype(np.intp)
    packed = (field & _U64(0x0707070707070707) & _BYTES_OF[run]).byteswap()  # first byte highest
    packed = (packed | (packed >> _U64(5))) & _U64(0x003F003F003F003F)
    packed = (packed | (packed >> _U64(10))) & _U64(0x00000FFF00000FFF)
    packed = (packed | (packed >> _U64(20))) & _U64(0xFFFFFF)  # digit j at bits 3 * (7 - j)
    value = packed >> (_U64(3) * (_U64(7) - _LAST[run]))
    return value.astype(np.int64), valid


def _block_sums(buf: bytes, starts: np.ndarray, high_bytes: bool = False) -> np.ndarray:
    """The byte sum of each ``BLOCK`` at ``starts`` (or how many of its bytes are >= 128): rows
    gathered when few, else (hostile data) reduced in place, or prefix sums when they overlap."""
    arr = np.frombuffer(buf, np.uint8)
    if starts.size <= 64:
        blocks = arr[starts[:, None] + np.arange(BLOCK)]
        return ((blocks >= 128) if high_bytes else blocks).sum(1, dtype=np.int64)
    lo = int(starts[0])
    region = arr[lo:int(starts[-1]) + BLOCK]
    values = region >= 128 if high_bytes else region
    if (np.diff(starts) >= BLOCK).all():  # blocks apart (on the grid): one reduction each, no prefix sums
        bounds = np.stack([starts - lo, starts - lo + BLOCK], 1).ravel()[:-1]
        return np.add.reduceat(values, bounds, dtype=np.int64)[::2]
    sums = np.concatenate(([0], np.cumsum(values, dtype=np.int64)))
    return sums[starts - lo + BLOCK] - sums[starts - lo]


@dataclass
class _Span:
    """Data just read (with its padding), held for ``TarReader._rescan``: ``parts`` are the
    stream's bytes from ``held_at`` on (all of the data, or its last chunks)."""

    data_offset: int
    size: int
    held_at: int
    parts: list[bytes]
    owner: TarMember | str | None  # what a header found inside makes wrong (see ``_data``)


class _Pending:
    """What extended headers said about the next member."""

    def __init__(self, start: int = -1) -> None:
        self.start = start  # where the member's first extended header starts (-1: none yet)
        self.name: bytes | None = None
        self.size: int | None = None
        self.problem = ""
        self.sparse = False

    @property
    def active(self) -> bool:
        return self.start >= 0


class TarReader:
    """Iterate to get every member that has a name (directories ending in ``/`` excepted);
    ``damage`` and ``end_problem`` say what was skipped and how the archive ended."""

    def __init__(self, stream: BinaryIO, keep: Callable[[bytes, int], int]):
        self._in = _Input(stream)
        self._keep = keep
        self.damage: list[Damage] = []
        self.end_problem = ""  # '' when the archive ended with its end-of-archive blocks
        self._pending = _Pending()
        self.unread_bytes = 0  # member data passed over without being kept (found by size fields)
        self._span: _Span | None = None  # the data just read, for ``_rescan``

    def __iter__(self) -> Iterator[TarMember]:
        held: TarMember | None = None  # the last member, given out once what follows it is known
        zeros = 0  # zero blocks since the last header
        while True:
            start = self._in.pos
            block = self._in.read(BLOCK)
            if len(block) < BLOCK:
                if (block or zeros < 2) and self._rescan(zeros, block):
                    zeros = 0
                    continue  # the archive ended oddly: a header inside the last member explains it
                self._finish(start, block, zeros, held)
                break
            if block == _ZERO:
                zeros += 1
                continue
            header = parse_header(block)
            if header is None:
                if self._rescan(zeros, block):
                    zeros = 0
                    continue  # a header inside the last member's data: read on from there
                if held is not None and zeros < 2 and block[_MAGIC_AT:_MAGIC_AT + 5] != _MAGIC:
                    # data, not a damaged header, follows the member: its size field is wrong
                    held.problem = held.problem or "what follows its data is not a header: its size field is wrong"
                self._in.unread(block)
                self._resync(start, "no valid tar header here (bad checksum or size field)")
                self._pending, self._span, zeros = _Pending(), None, 0
                continue
            zeros, self._span = 0, None
            if held is not None:
                yield held
                held = None
            if header.type in _EXTENDED:
                self._extended(start, header)
                continue
            held = self._member(start, header, self._pending)
            self._pending = _Pending()
        if held is not None:
            yield held

    # --- one header at a time ------------------------------------------------------------

    def _extended(self, start: int, header: _Header) -> None:
        if header.type == b"g":  # global records name or size no member: checked, then skipped
            self._data(header.size, 0, None)
            return
        cap = MAX_NAME_BYTES if header.type in (b"L", b"K") else MAX_EXTENDED_BYTES
        data, problem = self._data(header.size, header.size if header.size <= cap else 0,
                                   f"its extended header ({header.type.decode()})")
        if not problem and header.size > cap:
            problem = f"of {header.size} bytes is over the {cap} byte cap"
        records: dict[bytes, bytes] = {}
        if not problem and header.type == b"x":
            try:
                records = parse_pax(data)
            except ValueError as exc:
                problem = f"is malformed: {exc}"
        names = not problem and (header.type == b"L" or b"path" in records or b"GNU.sparse.name" in records)
        if names or not self._pending.active:
            # an extended header that names a member starts that member's headers: any before
            # it belonged to a member whose own header is gone
            self._pending = _Pending(start)
        if problem:
            self._pending.problem = f"its extended header ({header.type.decode()}) {problem}"
        elif header.type == b"L":
            self._pending.name = data.split(b"\0", 1)[0]
        elif header.type == b"x":
            self._apply_pax(records, self._pending)
        # "K" (a long link target) names no member: only its size counts

    @staticmethod
    def _apply_pax(records: dict[bytes, bytes], pending: _Pending) -> None:
        if b"path" in records:
            if len(records[b"path"]) > MAX_NAME_BYTES:
                pending.problem = f"its PAX path is over the {MAX_NAME_BYTES} byte cap"
            else:
                pending.name = records[b"path"]
        if b"size" in records:
            if records[b"size"].isdigit() and len(records[b"size"]) <= 20:
                pending.size = int(records[b"size"])
            else:
                pending.problem = "its PAX size is not a number"
        if any(key.startswith(b"GNU.sparse.") for key in records):
            pending.sparse = True
            pending.name = records.get(b"GNU.sparse.name", pending.name)

    def _member(self, start: int, header: _Header, pending: _Pending) -> TarMember | None:
        name = pending.name if pending.name is not None and not pending.problem else header.name
        size = pending.size if pending.size is not None and not pending.problem else header.size
        member = TarMember(name, pending.start if pending.active else start, 0, size)
        if pending.problem:
            member.problem, member.name_lost = pending.problem, True
        if header.type == _SPARSE:
            member.problem = member.problem or "a GNU sparse member (not supported)"
            if header.extended and not self._sparse_extensions():
                member.problem = "a GNU sparse member whose extension blocks are cut"
        elif pending.sparse:
            member.problem = member.problem or "a PAX sparse member (GNU.sparse, not supported)"
        elif header.type in _NOT_FILES:
            member.problem = member.problem or f"{_NOT_FILES[header.type]}, not a file"
        elif header.type not in _FILE_TYPES:
            member.problem = member.problem or f"of unsupported tar type {header.type!r}"
        member.data_offset = self._in.pos
        keep = self._keep(name, size) if not member.problem else 0
        member.data, problem = self._data(size, keep, member)
        if problem:  # a link's meaningless size field stopped by the next header is no news
            member.problem = member.problem or problem
        if header.type == b"5" and name.endswith(b"/") and not problem:
            return None  # a directory entry: no key, nothing lost
        return member

    def _sparse_extensions(self) -> bool:
        """Skip GNU sparse extension blocks; False when the stream ends among them. A header
        that starts in one ends them there (the last extension's flag lied)."""
        while True:
            block = self._in.read(BLOCK)
            if len(block) < BLOCK:
                self._in.unread(block)
                return False
            ahead = self._in.read(BLOCK - 1)
            self._in.unread(ahead)
            hit = _find_header(block + ahead, 0, BLOCK)
            if hit >= 0:
                self._in.unread(block[hit:])
                return True
            if block[504] == 0:
                return True

    # --- data and resynchronisation -----------------------------------------------------

    def _data(self, size: int, keep: int, owner: TarMember | str | None) -> tuple[bytes, str]:
        start = self._in.pos
        data, problem = self._read_data(size, keep, owner)
        self.unread_bytes += min(self._in.pos - start, size) - len(data)
        return data, problem

    def _read_data(self, size: int, keep: int, owner: TarMember | str | None) -> tuple[bytes, str]:
        """Consume data of ``size`` bytes and its padding, keeping the first ``keep`` bytes;
        returns (kept bytes, problem). The size field is trusted: only block boundaries are
        looked at for a header (a size field that lies swallows whole members, whose headers
        lie on the grid). A header there ends the data (its bytes go back to the input). The
        bytes read last stay in ``_span`` for ``_rescan``: every byte when all are kept, else
        the last chunk or two, so a member over the cap costs two chunks of memory at most.
        ``owner`` is what a header found inside makes wrong: a member, an extended header (its
        name, for the next member's problem) or nothing (a global header)."""
        start = self._in.pos
        whole = keep >= size
        held: list[bytes] = []  # every chunk when whole, else the last two
        held_from = 0  # data offset of held[0]
        kept: list[bytes] = []
        n_kept = got = 0
        while got < size:
            want = min(_CHUNK, size - got)
            chunk = self._in.read(want)
            if not whole and len(held) == 2:
                held_from += len(held.pop(0))
            held.append(chunk)
            if not whole and n_kept < keep:
                kept.append(chunk[:keep - n_kept])
                n_kept += len(kept[-1])
            hit = _aligned_header(chunk)
            if hit >= 0:
                return self._data_ends(start, size, held, held_from, got + hit, None if whole else kept)
            got += len(chunk)
            if len(chunk) < want:  # no padding, but what was read may still hold a header
                data = b"".join(held) if whole else b"".join(kept)
                self._span = _Span(start, size, start + held_from, [data] if whole else held, owner)
                return data, f"is cut: the archive ends inside its data ({got} of {size} bytes)"
        padding = self._in.read(_padded(size) - size)
        tail = size % BLOCK
        if tail and len(padding) == BLOCK - tail and _aligned_header(held[-1][-tail:] + padding) == 0:
            held.append(padding)
            return self._data_ends(start, size, held, held_from, size - tail, None if whole else kept)
        data = b"".join(held) if whole else b"".join(kept)
        self._span = _Span(start, size, start + held_from, ([data] if whole else held) + [padding], owner)
        return data, ""

    def _data_ends(self, start: int, size: int, held: list[bytes], held_from: int, hit: int,
                   kept: list[bytes] | None) -> tuple[bytes, str]:
        """A header on the grid at data offset ``hit``: the data ends there, or at a header off
        the grid before it in the bytes still held (the size field overran more than one
        member). What follows the end goes back to the input. ``kept`` is None when every byte
        was kept (``held`` is then the data from its first byte)."""
        region = b"".join(held)
        early = _find_header(region, max(1 - held_from, 0), hit - held_from)
        end = held_from + early if early >= 0 else hit
        self._in.unread(region[end - held_from:])
        data = region[:end] if kept is None else b"".join(kept)[:end]
        self._span = None
        return data, _overrun(size, start + end)
    def _rescan(self, zeros: int, after: bytes) -> bool:
        """Damage (or an odd end) right after data: a header inside it at an offset that is not
        a block boundary (bytes were lost before it) explains it. If the bytes still held have
        one, the data ends there and reading goes on at that header. Zero blocks may lie
        between: the hidden member's own zero data and the end-of-archive blocks, read off the
        grid (one fuzzed shard had three, and lost the hidden member's key when only two were
        allowed)."""
        span = self._span
        if span is None or zeros > _RESCAN_ZERO_BLOCKS:
            return False
        region = b"".join(span.parts)
        after = bytes(BLOCK * zeros) + after
        hit = _find_header(region + after, max(span.data_offset + 1 - span.held_at, 0), len(region))
        if hit < 0:
            return False
        self._in.unread(region[hit:] + after)
        at, self._span = span.held_at + hit, None
        if isinstance(span.owner, TarMember):
            span.owner.problem = span.owner.problem or _overrun(span.size, at)
            span.owner.data = span.owner.data[:at - span.data_offset]
        elif span.owner is not None:
            self._pending.problem = self._pending.problem or f"{span.owner} {_overrun(span.size, at)}"
        return True

    def _resync(self, start: int, what: str) -> None:
        """Skip to the next valid header after ``start``, at any offset, or to the end; record
        the skipped range. A chunk at a time, each searched with the last bytes of the one
        before (a header may start there)."""
        window, checked = b"", start + 1  # headers starting before ``checked`` were looked for
        while chunk := self._in.read(_CHUNK):
            window = window[-(BLOCK - 1):] + chunk
            base = self._in.pos - len(window)
            hit = _find_header(window, checked - base, len(window))
            if hit >= 0:
                self._in.unread(window[hit:])
                self._note(start, base + hit, what)
                return
            checked = max(checked, self._in.pos - (BLOCK - 1))
        if self._in.pos > start:
            self._note(start, self._in.pos, what)

    def _finish(self, start: int, tail: bytes, zeros: int, held: TarMember | None) -> None:
        if self._in.failure:
            self._note(start, start + len(tail), f"the stream broke off (damaged gzip or a failed read): {self._in.failure}")
        if tail:
            self._note(start, start + len(tail), f"the archive ends inside a {BLOCK}-byte block")
        if self._pending.active:
            self._note(self._pending.start, start, "extended headers with no member header after them")
        if held is not None and held.problem.startswith("is cut"):
            self.end_problem = "ends early, inside a member's data"
        elif self._in.failure or tail:
            self.end_problem = "ends early (damaged or cut)"
        elif start == 0:
            self.end_problem = "is empty"
        elif zeros < 2:
            self.end_problem = "ends early: no end-of-archive blocks (cut at a header boundary?)"

    def _note(self, start: int, end: int, what: str) -> None:
        self.damage.append(Damage(start, end, what))

