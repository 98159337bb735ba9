"""Valid UTF-8 whatever came in: the one place that makes text safe to write.

Python strings can hold lone surrogates (a JSON ``"\\udXXX"`` escape, a name decoded with
``surrogateescape``) that no UTF-8 encoder accepts: one of them in a JSON sidecar or a tar
name used to raise ``UnicodeEncodeError`` inside the writer and end the run. Readers clean what
they read and writers clean what they write, both with these functions.
"""

from __future__ import annotations

import html
import re
from typing import Any

_SURROGATE = re.compile("[\ud800-\udfff]")


def valid_text(text: str) -> str:
    """``text`` with every lone surrogate replaced by U+FFFD (like undecodable bytes)."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text)


def valid_utf8(value: Any) -> Any:
    """A JSON-like value (dicts, lists, tuples, strings) with every string valid UTF-8; keys too."""
    if isinstance(value, str):
        return valid_text(value)
    if isinstance(value, dict):
        return {valid_utf8(k): valid_utf8(v) for k, v in value.items()}
    if isinstance(value, list):
        return [valid_utf8(v) for v in value]
    if isinstance(value, tuple):
        return tuple(valid_utf8(v) for v in value)
    return value


def decode_text(data: bytes, max_chars: int) -> str:
    """Alt text as UTF-8, undecodable bytes replaced (never dropped silently), cut to a cap."""
    text = data.decode("utf-8", errors="replace").strip()
    return text[:max_chars]


# A character reference with its semicolon: named (&amp;), decimal (&#39;) or hex (&#x27;).
_ENTITY = re.compile(r"&(?:[A-Za-z][A-Za-z0-9]{1,31}|#[0-9]{1,8}|#[xX][0-9A-Fa-f]{1,8});")


def unescape_entities(text: str) -> str:
    """HTML character references as the characters they stand for, in one pass (``&amp;amp;``
    becomes ``&amp;``). Only references closed by ``;``: ``html.unescape`` alone also reads
    HTML's legacy bare names, turning ``?a=1&para=2`` in a pasted URL into ``?a=1¶=2``."""
    return valid_text(_ENTITY.sub(lambda match: html.unescape(match.group()), text))
