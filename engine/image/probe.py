"""Header probe and the resolution filter: image size from the header, no pixels decoded.

PIL's ``Image.open`` parses only the header, which is what makes the filter ~100× cheaper
than decode-then-check (see ``python -m bench io``). The probe also catches non-images,
zero-byte files and decompression bombs before any decoder sees them.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image

_EXIF_ORIENTATION = 0x0112
_TRANSPOSED = {5, 6, 7, 8}  # orientations that swap width and height


@dataclass(frozen=True)
class Header:
    width: int  # after EXIF orientation
    height: int
    format: str
    mode: str
    frames: int


def probe_header(data: bytes) -> Header:
    """Read size, format and mode from the header; raises on anything that is not an image."""
    if not data:
        raise ValueError("zero-byte image")
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        try:
            orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
        except Exception:  # noqa: BLE001 - a broken EXIF block is not a broken image
            orientation = 1
        if orientation in _TRANSPOSED:
            width, height = height, width
        return Header(width, height, image.format or "", image.mode, getattr(image, "n_frames", 1))
