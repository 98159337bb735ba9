"""Sidecar files (``key.json`` metadata, ``key.txt`` alt text): data, never a crash.

``json.loads`` raises more than ``JSONDecodeError`` on hostile input: ``RecursionError`` on
100,000 ``[``, ``ValueError`` on an integer of more than 4,300 digits, and it accepts ``NaN``,
``1e999`` (infinity) and lone ``\\udXXX`` escapes that no JSON or UTF-8 writer takes back.
Here every failure is a reason string: the sample keeps its image, the sidecar is ignored and
the reason becomes a flag. Sizes are capped before anything is read (the tar reader keeps at
most ``MAX_JSON_BYTES`` of a ``.json`` and ``text_bytes_to_read`` of a ``.txt``).
"""

from __future__ import annotations

import json
import math
from typing import Any

from engine.io.text import valid_utf8

MAX_JSON_BYTES = 1 << 20  # img2dataset's sidecars are ~1 KB
MAX_JSON_DEPTH = 64


def text_bytes_to_read(max_chars: int) -> int:
    """Bytes of a ``.txt`` to keep so that ``max_chars`` characters survive: UTF-8 needs at most
    4 bytes a character, plus room for the whitespace ``decode_text`` strips."""
    return 4 * max_chars + 1024


def parse_json_sidecar(data: bytes, size: int) -> tuple[dict[str, Any], str]:
    """(metadata, problem): the metadata as a dict (a non-object is kept as ``{"value": ...}``),
    or ``({}, why)`` when the sidecar is ignored."""
    if size > MAX_JSON_BYTES:
        return {}, f"json sidecar of {size} bytes is over the {MAX_JSON_BYTES} byte cap"
    try:
        value = json.loads(data.decode("utf-8", errors="replace"),
                           parse_constant=_no_constant, parse_float=_finite_float)
    except json.JSONDecodeError as exc:
        return {}, f"unreadable json sidecar: {exc.msg} at character {exc.pos}"
    except RecursionError:
        return {}, "json sidecar nested too deep to parse"
    except (ValueError, MemoryError) as exc:  # int over 4,300 digits, NaN/Infinity, 1e999
        return {}, f"unreadable json sidecar: {str(exc)[:200]}"
    if _depth_over(value, MAX_JSON_DEPTH):
        return {}, f"json sidecar nested deeper than {MAX_JSON_DEPTH} levels"
    value = valid_utf8(value)
    return (value if isinstance(value, dict) else {"value": value}), ""


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def _depth_over(value: Any, limit: int) -> bool:
    """Iterative (the value may be as deep as the parser's recursion limit allowed)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return True
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return False
