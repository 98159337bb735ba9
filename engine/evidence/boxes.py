"""Box fusion: the detectors' raw boxes → the few boxes the fusion prompt shows.

Pure functions over :class:`models.records.Box` (coordinates normalised to [0, 1] of the
original image). The order of the rules is the paper's (§3.2.1): keep confident detections
(a threshold per detector) that have a size (both sides at least ``min_box_side`` pixels of
the original image: detectors emit degenerate boxes, and the small-first quotas would prefer
them), merge the two detectors' duplicates, then *balanced sampling* that favours small
objects — a generalist MLLM already sees the big ones — capped at a number of boxes per image.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from models.records import Box

if TYPE_CHECKING:  # the config's default synonyms come from here
    from engine.core.config import FusionConfig

SIZE_BUCKETS = ("small", "medium", "large")
# Label groups the detectors' vocabularies spell differently (COCO/LVIS names, RAM++ tags):
# merged as one label ('canonical=syn1,syn2'); --label-synonyms replaces them.
LABEL_SYNONYMS = ("person=man,woman,boy,girl,child,people", "car=automobile", "cell phone=mobile phone,phone",
                  "tv=television", "sofa=couch", "bicycle=bike", "motorcycle=motorbike", "airplane=aeroplane,plane")


# --- coordinates ---------------------------------------------------------------------


def area(xyxy: Sequence[float]) -> float:
    x1, y1, x2, y2 = xyxy
    return max(0.0, x2 - x1) * max(0.0, y2 - y1)


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    inter = area((max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])))
    union = area(a) + area(b) - inter
    return inter / union if union > 0 else 0.0


# --- labels --------------------------------------------------------------------------


def _clean(label: str) -> str:
    return re.sub(r"[\s_]+", " ", label.strip().lower())


def _singular(word_phrase: str) -> str:
    """English plural → singular on the last word: enough to match 'dogs'/'dog', 'buses'/'bus'."""
    head, _, last = word_phrase.rpartition(" ")
    if len(last) > 3 and last.endswith("ies"):
        last = last[:-3] + "y"
    elif len(last) > 3 and last.endswith(("ches", "shes", "sses", "xes", "zes")) or len(last) > 4 and last.endswith("uses"):
        last = last[:-2]
    elif len(last) > 2 and last.endswith("s") and not last.endswith(("ss", "us", "is")):
        last = last[:-1]
    return f"{head} {last}" if head else last


def synonym_map(cfg: FusionConfig) -> dict[str, str]:
    """Every synonym (and canonical name), normalised, → its canonical name."""
    table: dict[str, str] = {}
    for group in cfg.label_synonyms:
        canonical, _, rest = group.partition("=")
        head = _singular(_clean(canonical))
        for word in (canonical, *rest.split(",")):
            if word.strip():
                table[_singular(_clean(word))] = head
    return table


def canonical_label(label: str, synonyms: dict[str, str]) -> str:
    """The name two detectors' labels are compared by: lower case, singular, synonyms folded."""
    word = _singular(_clean(label))
    return synonyms.get(word, word)


# --- the rules -----------------------------------------------------------------------


def keep_confident(boxes: Iterable[Box], min_score: float) -> list[Box]:
    """Boxes scoring at least ``min_score`` with a non-empty area."""
    return [b for b in boxes if b.score >= min_score and area(b.xyxy) > 0]


def keep_sized(boxes: Iterable[Box], min_side: float, width: int, height: int) -> list[Box]:
    """Boxes whose sides both span at least ``min_side`` pixels of a ``width`` × ``height`` image.

    An image of unknown size (0) keeps every box of non-empty area."""
    if width <= 0 or height <= 0:
        return [b for b in boxes if area(b.xyxy) > 0]
    return [b for b in boxes
            if (b.xyxy[2] - b.xyxy[0]) * width >= min_side and (b.xyxy[3] - b.xyxy[1]) * height >= min_side]


def merge_detectors(open_boxes: Sequence[Box], closed_boxes: Sequence[Box], cfg: FusionConfig) -> list[Box]:
    """One box per object seen by both detectors (same canonical label, IoU >= ``merge_iou``).

    Pairs are matched greedily by descending IoU, each box at most once; a merged box keeps
    the label, score and coordinates of the more confident of the two, with source "fused".
    Unmatched boxes pass through unchanged.
    """
    synonyms = synonym_map(cfg)
    open_labels = [canonical_label(b.label, synonyms) for b in open_boxes]
    closed_labels = [canonical_label(b.label, synonyms) for b in closed_boxes]
    pairs = []
    for i, ob in enumerate(open_boxes):
        for j, cb in enumerate(closed_boxes):
            overlap = iou(ob.xyxy, cb.xyxy)
            if open_labels[i] == closed_labels[j] and overlap >= cfg.merge_iou and overlap > 0:
                pairs.append((-overlap, i, j))
    pairs.sort()
    used_open: set[int] = set()
    used_closed: set[int] = set()
    fused = []
    for _, i, j in pairs:
        if i in used_open or j in used_closed:
            continue
        used_open.add(i)
        used_closed.add(j)
        best = max(open_boxes[i], closed_boxes[j], key=lambda b: b.score)
        fused.append(replace(best, source="fused"))
    rest_open = [b for i, b in enumerate(open_boxes) if i not in used_open]
    rest_closed = [b for j, b in enumerate(closed_boxes) if j not in used_closed]
    return fused + rest_open + rest_closed


def size_bucket(box: Box, cfg: FusionConfig) -> str:
    a = area(box.xyxy)
    if a < cfg.small_area:
        return "small"
    return "medium" if a < cfg.large_area else "large"


def balanced_sample(boxes: Sequence[Box], cfg: FusionConfig) -> list[Box]:
    """Favour small objects: fill each size bucket's quota, small first, most confident first.

    A bucket that has fewer boxes than its quota passes the unused quota on to the next
    bucket (small → medium → large). Slots still free after that (the large bucket ran
    short too) go to the remaining boxes, small bucket first. Never more than ``max_boxes``;
    the result is sorted by descending score.
    """
    by_bucket = {name: [] for name in SIZE_BUCKETS}
    for box in sorted(boxes, key=lambda b: -b.score):
        by_bucket[size_bucket(box, cfg)].append(box)
    quotas = dict(zip(SIZE_BUCKETS, (cfg.quota_small, cfg.quota_medium, cfg.quota_large)))
    chosen: list[Box] = []
    carry = 0
    for name in SIZE_BUCKETS:
        room = max(0, cfg.max_boxes - len(chosen))
        take = min(quotas[name] + carry, len(by_bucket[name]), room)
        carry = quotas[name] + carry - take
        chosen += by_bucket[name][:take]
        by_bucket[name] = by_bucket[name][take:]
    for name in SIZE_BUCKETS:
        room = max(0, cfg.max_boxes - len(chosen))
        chosen += by_bucket[name][:room]
    return sorted(chosen, key=lambda b: -b.score)


def fuse_boxes(open_boxes: Sequence[Box], closed_boxes: Sequence[Box], cfg: FusionConfig, *,
               width: int, height: int) -> list[Box]:
    """All rules in order: per-detector thresholds, a minimum side in pixels of the original
    ``width`` × ``height`` image, cross-detector merge, balanced sampling."""
    def usable(boxes: Sequence[Box], min_score: float) -> list[Box]:
        return keep_sized(keep_confident(boxes, min_score), cfg.min_box_side, width, height)

    merged = merge_detectors(usable(open_boxes, cfg.open_min_score), usable(closed_boxes, cfg.closed_min_score), cfg)
    return balanced_sample(merged, cfg)
