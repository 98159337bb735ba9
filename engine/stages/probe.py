"""The resolution filter: short edge and pixel limit from the header probe (engine/image/probe.py), no pixels decoded."""

from __future__ import annotations

from PIL import Image, UnidentifiedImageError

from engine.core.config import FilterConfig, RunConfig
from engine.core.record import Sample
from engine.core.stage import Resources, Stage
from engine.image.probe import probe_header


def build(cfg: RunConfig) -> ResolutionFilter:
    return ResolutionFilter(cfg.filter)


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
        except Exception as exc:  # noqa: BLE001 - PIL's plugins raise more than they document
            sample.fail(self.name, f"not a readable image: {type(exc).__name__}: {exc}")
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
