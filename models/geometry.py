"""Box coordinates: pixels or a model's padded square → [0, 1] of the original image. Used by the
detectors and the OCR here and by the engine's box fusion."""

from __future__ import annotations

from collections.abc import Sequence

XYXY = tuple[float, float, float, float]


def normalise_pixels(xyxy: Sequence[float], width: int, height: int) -> XYXY:
    """Pixel box on a ``width`` × ``height`` image → [0, 1] coordinates, clipped."""
    x1, y1, x2, y2 = xyxy
    return clip_unit((x1 / width, y1 / height, x2 / width, y2 / height))


def unpad_square(xyxy: Sequence[float], width: int, height: int) -> XYXY:
    """Box normalised to OWLv2's padded square → [0, 1] of the original image.

    OWLv2 pads the image at the bottom/right to a square of side ``max(width, height)``, so
    a coordinate ``u`` of the square is ``u * side`` pixels, i.e. ``u * side / width`` of
    the original width. Boxes on the padding are clipped away.
    """
    side = max(width, height)
    sx, sy = side / width, side / height
    x1, y1, x2, y2 = xyxy
    return clip_unit((x1 * sx, y1 * sy, x2 * sx, y2 * sy))


def clip_unit(xyxy: Sequence[float]) -> XYXY:
    x1, y1, x2, y2 = (min(1.0, max(0.0, float(v))) for v in xyxy)
    return (x1, y1, x2, y2)
