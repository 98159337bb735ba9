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
- looks for a header that starts inside a member's data (a size field larger than the data
  swallows the next member): that member is marked and reading goes on at the header. Data the
  caller keeps is read whole and checked at block boundaries only (one byte per 512; the full
  search cost a third of the read time); a header off the block grid (bytes lost inside the
  member) shows as damage or an odd end after it (past any zero blocks), and is searched for
  then in the bytes still held. Data not kept (over the cap, unused members, extended headers)
  is searched fully;
- caps extended headers (PAX records, GNU long names) and parses PAX records in one linear pass;
- reads data in chunks and keeps only what the caller's ``keep(name, size)`` asks for, so a
  member over the caller's cap costs one chunk of memory, never its size.

Offsets are positions in the uncompressed stream (for a plain tar, file offsets). Names stay
bytes (a PAX ``hdrcharset=BINARY`` name is just bytes too): :mod:`engine.io.keys` turns them
into keys. Limits, stated: a header without the ``ustar`` magic (pre-POSIX V7) is read in
sequence but cannot be found again after damage; an uncompressed tar stored as a member looks
like damage (its headers are headers); a damaged gzip stream ends the shard where it breaks;
a header off the block grid inside a member read whole is missed when a valid header still
follows that member (two faults lined up: bytes lost inside it and a rewritten header behind).
"""

from __future__ import annotations

import gzip
import struct
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

BLOCK = 512
_ZERO = bytes(BLOCK)
_CHUNK = 1 << 20  # read size; also the most a skipped member holds in memory at once
_MAGIC = b"ustar"
_MAGIC_AT = 257
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
def open_stream(path: Path) -> Iterator[BinaryIO]:
    """The shard's bytes, gunzipped when its first bytes are gzip's magic."""
    with open(path, "rb") as handle:
        gzipped = handle.read(2) == GZIP_MAGIC
        handle.seek(0)
        if not gzipped:
            yield handle
            return
        with gzip.GzipFile(fileobj=handle, mode="rb") as unzipped:
            yield unzipped


def is_gzip(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(2) == GZIP_MAGIC


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
        """Give back the last bytes read (rare: after damage or a header found inside data)."""
        self._back, self._back_at = data + self._back[self._back_at:], 0
        self.pos -= len(data)


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
    """The first block boundary of ``buf`` where a valid header starts, else -1 (checks the
    magic's first byte of every block at once: ~1 µs for a 200 KB image)."""
    marks = buf[_MAGIC_AT::BLOCK]
    i = marks.find(b"u")
    while i >= 0:
        h = i * BLOCK
        if h + BLOCK <= len(buf) and buf[h + _MAGIC_AT:h + _MAGIC_AT + 5] == _MAGIC \
                and parse_header(buf[h:h + BLOCK]) is not None:
            return h
        i = marks.find(b"u", i + 1)
    return -1


def _padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def _find_header(buf: bytes, lo: int, hi: int) -> int:
    """The first ``h`` in ``[lo, hi)`` where a valid header starts in ``buf``, else -1."""
    i = buf.find(_MAGIC, lo + _MAGIC_AT)
    while i != -1 and i - _MAGIC_AT < hi:
        h = i - _MAGIC_AT
        if h + BLOCK <= len(buf) and parse_header(buf[h:h + BLOCK]) is not None:
            return h
        i = buf.find(_MAGIC, i + 1)
    return -1


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
        # the padding after the last member when its data was read whole (None otherwise): with
        # its data, what ``_rescan`` searches when damage follows it
        self._held_padding: bytes | None = None

    def __iter__(self) -> Iterator[TarMember]:
        held: TarMember | None = None  # the last member, given out once what follows it is known
        zeros = 0  # zero blocks since the last header
        while True:
            start = self._in.pos
            block = self._in.read(BLOCK)
            if len(block) < BLOCK:
                if (block or zeros < 2) and self._rescan(held, zeros, block):
                    zeros = 0
                    continue  # the archive ended oddly: a header inside the last member explains it
                self._finish(start, block, zeros, held)
                break
            if block == _ZERO:
                zeros += 1
                continue
            header = parse_header(block)
            if header is None:
                if self._rescan(held, zeros, block):
                    zeros = 0
                    continue  # a header inside the last member's data: read on from there
                if held is not None and zeros < 2 and block[_MAGIC_AT:_MAGIC_AT + 5] != _MAGIC:
                    # data, not a damaged header, follows the member: its size field is wrong
                    held.problem = held.problem or "what follows its data is not a header: its size field is wrong"
                self._in.unread(block)
                self._resync(start, "no valid tar header here (bad checksum or size field)")
                self._pending, zeros = _Pending(), 0
                continue
            zeros = 0
            if held is not None:
                yield held
                held, self._held_padding = None, None
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
            self._data(header.size, 0)
            return
        cap = MAX_NAME_BYTES if header.type in (b"L", b"K") else MAX_EXTENDED_BYTES
        data, problem = self._data(header.size, header.size if header.size <= cap else 0)
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
        if keep >= size > 0:
            data, self._held_padding, problem = self._whole(size)
        else:
            (data, problem), self._held_padding = self._data(size, keep), None
        member.data = data
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

    def _data(self, size: int, keep: int) -> tuple[bytes, str]:
        """Consume a member's data and padding, keeping the first ``keep`` bytes. A header that
        starts inside ends the data there (its bytes go back to the input)."""
        start = self._in.pos
        hit, kept, cut = self._scan(start, start + _padded(size), keep, first=start)
        if hit >= 0:
            return kept, _overrun(size, hit)
        if cut:
            return kept, f"is cut: the archive ends inside its data ({self._in.pos - start} of {size} bytes)"
        return kept, ""

    def _whole(self, size: int) -> tuple[bytes, bytes | None, str]:
        """Read a member's data whole, then its padding: the fast path of every member the caller
        keeps. Only headers at block boundaries are looked for here (one byte every 512 is
        checked); one at any other offset shows as damage right after the member, and
        ``_rescan`` finds it then in the bytes still held. Returns (data, padding, problem)."""
        start, parts, got = self._in.pos, [], 0
        while got < size:
            want = min(_CHUNK, size - got)
            chunk = self._in.read(want)
            hit = _aligned_header(chunk)
            if hit >= 0:
                parts.append(chunk)
                return self._overrun_at(start, b"".join(parts), got + hit, size)
            parts.append(chunk)
            got += len(chunk)
            if len(chunk) < want:  # b"": no padding, but what was read may still hold a header
                return b"".join(parts), b"", f"is cut: the archive ends inside its data ({got} of {size} bytes)"
        data = b"".join(parts)
        padding = self._in.read(_padded(size) - size)
        tail = size % BLOCK
        if tail and len(padding) == BLOCK - tail and _aligned_header(data[-tail:] + padding) == 0:
            return self._overrun_at(start, data + padding, size - tail, size)
        return data, padding, ""

    def _overrun_at(self, start: int, read: bytes, hit: int, size: int) -> tuple[bytes, None, str]:
        """A header at block boundary ``hit`` of the data: the member ends there, or at a header
        off the grid before it (the size field overran more than one member). ``read`` is every
        byte consumed since ``start``; what follows the member's end goes back to the input."""
        early = _find_header(read, 1, hit)
        end = early if early >= 0 else hit
        self._in.unread(read[end:])
        return read[:end], None, _overrun(size, start + end)

    def _rescan(self, held: TarMember | None, zeros: int, after: bytes) -> bool:
        """Damage (or an odd end) right after a member read whole: a header inside its data at
        an offset that is not a block boundary (bytes were lost before it) explains it. If there
        is one, the member ends there and reading goes on at that header. Zero blocks may lie
        between: the hidden member's own zero data and the end-of-archive blocks, read off the
        grid (one fuzzed shard had three, and lost the hidden member's key when only two were
        allowed)."""
        padding = self._held_padding
        if held is None or padding is None or zeros > _RESCAN_ZERO_BLOCKS:
            return False
        region = held.data + padding
        after = bytes(BLOCK * zeros) + after
        hit = _find_header(region + after, 1, len(region))
        if hit < 0:
            return False
        self._in.unread(region[hit:] + after)
        held.problem = held.problem or _overrun(held.size, held.data_offset + hit)
        held.data = held.data[:hit]
        self._held_padding = None
        return True

    def _resync(self, start: int, what: str) -> None:
        """Skip to the next valid header after ``start`` (or the end); record the skipped range."""
        hit, _, _ = self._scan(start, None, 0, first=start + 1)
        end = hit if hit >= 0 else self._in.pos
        if end > start:
            self._note(start, end, what)

    def _scan(self, start: int, end: int | None, keep: int, first: int) -> tuple[int, bytes, bool]:
        """Read from ``start`` to ``end`` (None: the end of the stream), keeping ``keep`` bytes,
        and stop at the first valid header that starts at or after ``first`` and before ``end``.
        Returns (header position or -1, kept bytes, whether the stream ended first)."""
        parts: list[bytes] = []
        kept = 0
        window = b""  # the bytes read last, plus a header's length before them
        checked = first  # headers starting before this were looked for already
        while end is None or self._in.pos < end:
            want = _CHUNK if end is None else min(_CHUNK, end - self._in.pos)
            chunk = self._in.read(want)
            if not chunk:
                return -1, b"".join(parts), True
            if kept < keep:
                parts.append(chunk[:keep - kept])
                kept += len(parts[-1])
            window = window[-(BLOCK - 1):] + chunk
            base = self._in.pos - len(window)
            hi = (end if end is not None else self._in.pos) - base
            hit = _find_header(window, checked - base, min(hi, len(window) - BLOCK + 1))
            if hit < 0 and end is not None and self._in.pos >= end:
                # a header may start in the last bytes and end past the data: look a block ahead
                ahead = self._in.read(BLOCK - 1)
                self._in.unread(ahead)
                tail = max(0, len(window) - BLOCK + 1)
                found = _find_header(window[tail:] + ahead, max(checked - base, tail) - tail, hi - tail)
                hit = tail + found if found >= 0 else -1
            if hit >= 0:
                self._in.unread(window[hit:])
                data = b"".join(parts)
                return base + hit, data[:base + hit - start], False
            checked = max(checked, base + len(window) - BLOCK + 1)
        return -1, b"".join(parts), False

    def _finish(self, start: int, tail: bytes, zeros: int, held: TarMember | None) -> None:
        if self._in.failure:
            self._note(start, start + len(tail), f"the compressed stream is damaged: {self._in.failure}")
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

