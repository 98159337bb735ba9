"""Tar archives built byte by byte, damaged on purpose (issue 17's families).

``tarfile`` cannot write most of these (bad checksums, lying size fields, raw non-UTF-8
names, hostile PAX records), so headers are assembled here from the ustar layout.
"""

from __future__ import annotations

import gzip
import json
import zlib
from dataclasses import dataclass, field

BLOCK = 512
POSIX = b"ustar\x0000"
GNU = b"ustar  \x00"


def header(name: bytes, size: int, kind: bytes = b"0", *, magic: bytes = POSIX,
           size_field: bytes | None = None, extended: bool = False, bad_checksum: bool = False) -> bytes:
    block = bytearray(BLOCK)
    block[0:len(name[:100])] = name[:100]
    block[100:108] = b"0000644\x00"
    block[108:116] = b"0000000\x00"
    block[116:124] = b"0000000\x00"
    block[124:136] = size_field if size_field is not None else b"%011o\x00" % size
    block[136:148] = b"00000000000\x00"
    block[156:157] = kind
    block[257:265] = magic
    if extended:
        block[482] = 1
    block[148:156] = b" " * 8
    checksum = sum(block) + (1 if bad_checksum else 0)
    block[148:156] = b"%06o\x00 " % checksum
    return bytes(block)


def pad(data: bytes) -> bytes:
    return data + bytes(-len(data) % BLOCK)


def member(name: bytes, data: bytes, kind: bytes = b"0", **kw) -> bytes:
    return header(name, len(data), kind, **kw) + pad(data)


def pax_record(key: bytes, value: bytes) -> bytes:
    body = b" " + key + b"=" + value + b"\n"
    length = len(body) + 1
    while len(str(length).encode()) + len(body) != length:
        length += 1
    return str(length).encode() + body


def pax(records: dict[bytes, bytes] | bytes, kind: bytes = b"x") -> bytes:
    data = records if isinstance(records, bytes) else b"".join(pax_record(k, v) for k, v in records.items())
    return member(b"PaxHeader/x", data, kind)


def long_name(name: bytes) -> bytes:
    return member(b"././@LongLink", name + b"\0", b"L", magic=GNU)


END = bytes(2 * BLOCK)


@dataclass
class Entry:
    """One sample written into an archive: where its headers start and end (to tell later
    whether they survived a mutation), its key as the reader must report it."""

    key: str
    headers: bytes  # extended headers + plain header of the image member, contiguous
    good: bool = True  # a valid image the reader must keep alive


@dataclass
class Archive:
    data: bytes = b""
    entries: list[Entry] = field(default_factory=list)

    def add(self, raw: bytes, key: str | None = None, good: bool = False, headers_end: int = BLOCK) -> Archive:
        if key is not None:
            self.entries.append(Entry(key, raw[:headers_end], good))
        self.data += raw
        return self

    def sample(self, key: str, image: bytes, *, alt: bytes | None = b"alt", meta: bytes | None = None) -> Archive:
        self.add(member(f"{key}.jpg".encode(), image), key, good=True)
        if alt is not None:
            self.add(member(f"{key}.txt".encode(), alt))
        self.add(member(f"{key}.json".encode(), meta if meta is not None else json.dumps({"url": f"u/{key}"}).encode()))
        return self


def gz(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=1, mtime=0)


def gzip_of_zeros(n_mib: int) -> bytes:
    """``n_mib`` MiB of zeros as concatenated gzip members (gzip allows it), built from one
    compressed MiB, so a 1 GiB member costs a few KiB to write."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    one = compressor.compress(bytes(1 << 20)) + compressor.flush()
    return one * n_mib
