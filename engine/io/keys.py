"""Sample keys: total (every name gets one) and injective (two names never share one).

A usable key is kept as it is. A name that cannot be a key (not valid UTF-8, a control
character, a backslash, absolute, escaping with ``..``, empty, too long) gets its *escaped*
form instead and is rejected with the reason: every backslash, control character and
undecodable byte is written as ``\\xHH`` (ASCII and raw bytes) or ``\\uHHHH`` (C1 controls).
A backslash is never in a usable key, and the other problems survive escaping, so an escaped
key can never equal a usable one (``ctl\\x01``, ``ctl\\x02`` and a valid ``ctl?`` stay three
keys), and escaping is reversible, so two hostile names never merge either. Every key is valid
UTF-8, whatever bytes the name held.
"""

from __future__ import annotations

from dataclasses import dataclass

# Keys become member names in the output tar and file names when someone extracts it.
MAX_KEY_BYTES = 1024


@dataclass(frozen=True)
class MemberName:
    key: str  # the output key: the name's own key when usable, else its escaped form
    ext: str  # lowercased extension (escaped like the key)
    shown: str  # the whole name, valid UTF-8, for reasons and ``Source.member``
    problem: str  # why the key cannot be written ('' when it can)


def split_member_name(name: str) -> tuple[str, str]:
    """``dir/000123.jpg`` → (``dir/000123``, ``jpg``); webdataset's rule: extension after the
    first dot of the basename. Everything before the basename stays, a leading ``/`` too, so
    ``/x.jpg`` keys as ``/x`` (absolute: rejected), never as ``x``."""
    directory, slash, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return directory + slash + stem, ext.lower() if dot else ""


def parse_member_name(raw: bytes) -> MemberName:
    """A tar member name as raw bytes (tar headers carry bytes, whatever their charset). An
    extension that is not clean text simply matches no known extension: that member is unused."""
    text = raw.decode("utf-8", "surrogateescape")
    key, ext = split_member_name(text)
    return MemberName(escape(key), escape(ext), escape(text), key_problem(key))


def lost_name(raw: bytes, offset: int, problem: str) -> MemberName:
    """A member whose extended header (PAX or GNU long name) was unusable: ``raw`` is only the
    fallback name of its plain header, so the key carries the member's offset (``\\@``, which
    escaping never writes) and can equal neither a usable key nor another member's."""
    name = parse_member_name(raw)
    return MemberName(f"{name.key}\\@{offset}", name.ext, name.shown, problem)


def usable_key(text: str) -> tuple[str, str]:
    """(key, problem) for a key that comes whole (a parquet column, a file path): the same
    rules and the same escaping as a tar member's key."""
    return escape(text), key_problem(text)


def key_problem(key: str) -> str:
    """Why ``key`` cannot be written ('' when it can). Escaping keeps every one of these
    problems (a backslash stays, '..', a leading '/', emptiness and length too)."""
    if any("\udc80" <= ch <= "\udcff" for ch in key):
        return "name is not valid UTF-8"
    if any(ord(ch) < 32 or 127 <= ord(ch) < 160 for ch in key):
        return "control character in name"
    if not key or key.startswith("/") or "\\" in key:
        return "absolute or malformed name"
    if ".." in key.split("/"):
        return "name escapes the shard ('..')"
    if len(key.encode("utf-8")) > MAX_KEY_BYTES:
        return f"key longer than {MAX_KEY_BYTES} bytes"
    return ""


def escape(text: str) -> str:
    """Reversible and valid UTF-8: raw bytes and ASCII controls/backslash as ``\\xHH``, C1
    controls as ``\\uHHHH``; every other character as it is."""
    if not any(ord(ch) < 32 or 127 <= ord(ch) < 160 or ch == "\\" or "\udc80" <= ch <= "\udcff" for ch in text):
        return text
    out = []
    for ch in text:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:
            out.append(f"\\x{code - 0xDC00:02x}")  # surrogateescape: the undecodable byte
        elif code < 32 or code == 127 or ch == "\\":
            out.append(f"\\x{code:02x}")
        elif 127 < code < 160:
            out.append(f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out)
