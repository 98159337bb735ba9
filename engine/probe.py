"""Header probe and the resolution filter: image size from the header, no pixels decoded.

PIL's ``Image.open`` parses only the header, which is what makes the filter ~100× cheaper
than decode-then-check (see ``python -m bench io``). The probe also catches non-images,
zero-byte files and decompression bombs before any decoder sees them.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from engine.config import FilterConfig
from engine.record import Sample
from engine.stage import Resources, Stage

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


class ResolutionFilter(Stage):
    """Drops images whose shorter side is below the minimum; rejects what is not an image."""

    name = "probe"

    def __init__(self, cfg: FilterConfig):
        self.cfg = cfg

    def resources(self) -> Resources:
        return Resources(batch_size=64)

    def process(self, batch: list[Sample]) -> list[Sample]:
        for sample in batch:
            self._check(sample)
        return batch

    def _check(self, sample: Sample) -> None:
        try:
            header = probe_header(sample.image_bytes)
        except UnidentifiedImageError:
            sample.fail(self.name, f"not an image: unknown format (starts with {sample.image_bytes[:12]!r})")
            return
        except (ValueError, OSError, SyntaxError) as exc:
            sample.fail(self.name, f"not a readable image: {type(exc).__name__}: {exc}")
            return
        except Image.DecompressionBombError as exc:
            sample.fail(self.name, f"decompression bomb: {exc}")
            return
        sample.width, sample.height = header.width, header.height
        sample.image_format, sample.image_mode = header.format, header.mode
        sample.meta.setdefault("original_width", header.width)
        sample.meta.setdefault("original_height", header.height)
        if header.width * header.height > self.cfg.max_pixels:
            sample.fail(
                self.name,
                f"decompression bomb guard: {header.width}x{header.height} exceeds "
                f"--max-pixels {self.cfg.max_pixels}",
            )
        elif min(header.width, header.height) < self.cfg.min_short_edge:
            sample.filter(
                self.name,
                f"short edge {min(header.width, header.height)} < --min-short-edge {self.cfg.min_short_edge}",
            )

    def describe(self) -> str:
        return f"probe (min short edge {self.cfg.min_short_edge}, max pixels {self.cfg.max_pixels})"

