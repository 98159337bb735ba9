import pytest

from engine.core.config import FusionConfig
from engine.evidence.boxes import (
    balanced_sample,
    canonical_label,
    fuse_boxes,
    iou,
    keep_confident,
    keep_sized,
    merge_detectors,
    synonym_map,
)
from models.errors import ConfigError
from models.geometry import normalise_pixels, unpad_square
from models.records import Box


def box(label, score, xyxy, source="owlv2"):
    return Box(label, score, xyxy, source)


def square(cx, cy, side, label="thing", score=0.9, source="owlv2"):
    h = side / 2
    return box(label, score, (cx - h, cy - h, cx + h, cy + h), source)


def test_iou_by_hand():
    # two 2x2 squares overlapping in a 1x2 strip: inter 2, union 4 + 4 - 2 = 6
    assert iou((0, 0, 2, 2), (1, 0, 3, 2)) == pytest.approx(2 / 6)
    assert iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0


def test_normalise_non_square_image():
    # 800 x 400 image: x is divided by 800, y by 400; out-of-image parts are clipped
    assert normalise_pixels((200, 100, 600, 300), 800, 400) == (0.25, 0.25, 0.75, 0.75)
    assert normalise_pixels((-10, 0, 900, 500), 800, 400) == (0.0, 0.0, 1.0, 1.0)


def test_unpad_owlv2_square_landscape_and_portrait():
    # 800 x 400 landscape: padded square 800; y in the square * 800/400 = * 2
    assert unpad_square((0.25, 0.1, 0.5, 0.4), 800, 400) == pytest.approx((0.25, 0.2, 0.5, 0.8))
    # 300 x 600 portrait: x * 2; a box reaching into the right padding is clipped at 1
    assert unpad_square((0.1, 0.5, 0.6, 1.0), 300, 600) == pytest.approx((0.2, 0.5, 1.0, 1.0))
    # square image: unchanged
    assert unpad_square((0.1, 0.2, 0.3, 0.4), 500, 500) == pytest.approx((0.1, 0.2, 0.3, 0.4))


def test_per_detector_thresholds_and_empty_boxes():
    cfg = FusionConfig(open_min_score=0.3, closed_min_score=0.6)
    open_boxes = [box("cat", 0.29, (0, 0, 0.5, 0.5)), box("dog", 0.3, (0.5, 0.5, 0.6, 0.6)),
                  box("cup", 0.9, (0.2, 0.2, 0.2, 0.4))]  # zero width: dropped
    closed = [box("car", 0.55, (0, 0, 0.1, 0.1), "closed"), box("bus", 0.61, (0, 0, 0.2, 0.2), "closed")]
    out = fuse_boxes(open_boxes, closed, cfg, width=640, height=480)
    assert sorted(b.label for b in out) == ["bus", "dog"]
    assert keep_confident(open_boxes, 0.0) == open_boxes[:2]


def test_labels_singular_and_synonyms():
    syn = synonym_map(FusionConfig())
    assert canonical_label("Dogs", syn) == "dog"
    assert canonical_label("buses", syn) == "bus"
    assert canonical_label("glass", syn) == "glass"
    assert canonical_label("traffic lights", syn) == "traffic light"
    assert canonical_label("puppies", syn) == "puppy"
    assert canonical_label("man", syn) == "person"
    assert canonical_label("Television", syn) == "tv"
    assert canonical_label("cell_phone", syn) == "cell phone"


def test_merge_same_or_synonymous_label_keeps_higher_score():
    cfg = FusionConfig(merge_iou=0.5)
    open_boxes = [
        box("dogs", 0.4, (0.0, 0.0, 0.4, 0.4)),
        box("man", 0.8, (0.5, 0.5, 0.9, 0.9)),
        box("cat", 0.9, (0.0, 0.5, 0.2, 0.7)),
    ]
    closed = [
        box("dog", 0.7, (0.0, 0.0, 0.4, 0.3), "closed"),  # IoU 0.12/0.16 = 0.75 with the dogs box
        box("person", 0.6, (0.5, 0.5, 0.9, 0.8), "closed"),  # IoU 0.75 with "man"
        box("cat", 0.95, (0.1, 0.5, 0.3, 0.7), "closed"),  # IoU 0.02/0.06 = 1/3 < 0.5: kept apart
    ]
    out = merge_detectors(open_boxes, closed, cfg)
    fused = [b for b in out if b.source == "fused"]
    assert len(out) == 4 and len(fused) == 2
    dog = next(b for b in fused if b.label == "dog")
    assert dog.score == 0.7 and dog.xyxy == (0.0, 0.0, 0.4, 0.3)  # the closed box won
    person = next(b for b in fused if b.label == "man")
    assert person.score == 0.8 and person.xyxy == (0.5, 0.5, 0.9, 0.9)  # the open box won
    assert {(b.label, b.source) for b in out if b.source != "fused"} == {("cat", "owlv2"), ("cat", "closed")}


def test_merge_different_labels_never_merge_and_each_box_matches_once():
    cfg = FusionConfig(merge_iou=0.5)
    a = box("cat", 0.5, (0, 0, 1, 1))
    out = merge_detectors([a], [box("dog", 0.9, (0, 0, 1, 1), "closed")], cfg)
    assert len(out) == 2 and all(b.source != "fused" for b in out)
    # one open box, two identical-label closed boxes: the higher-IoU one is matched, the other stays
    closed = [box("cat", 0.6, (0, 0, 1, 0.6), "closed"), box("cat", 0.6, (0, 0, 1, 0.9), "closed")]
    out = merge_detectors([a], closed, cfg)
    assert [b.source for b in out] == ["fused", "closed"]
    assert out[0].xyxy == (0, 0, 1, 0.9) and out[1].xyxy == (0, 0, 1, 0.6)


def test_balanced_sampling_small_first_with_quotas():
    cfg = FusionConfig(small_area=0.01, large_area=0.1, quota_small=2, quota_medium=1, quota_large=1, max_boxes=4)
    small = [square(0.1, 0.1, 0.05, f"s{i}", 0.5 + i / 100) for i in range(4)]  # area 0.0025
    medium = [square(0.5, 0.5, 0.2, f"m{i}", 0.9 - i / 100) for i in range(2)]  # area 0.04
    large = [square(0.5, 0.5, 0.5, f"l{i}", 0.95 - i / 100) for i in range(2)]  # area 0.25
    out = balanced_sample(small + medium + large, cfg)
    # two best small (s3, s2), best medium (m0), best large (l0); sorted by score
    assert [b.label for b in out] == ["l0", "m0", "s3", "s2"]


def test_balanced_sampling_passes_unused_quota_on_and_fills_up():
    cfg = FusionConfig(quota_small=3, quota_medium=1, quota_large=1, max_boxes=5)
    small = [square(0.1, 0.1, 0.05, "s0", 0.2)]
    medium = [square(0.5, 0.5, 0.2, f"m{i}", 0.8 - i / 10) for i in range(4)]  # 0.8 .. 0.5
    large = [square(0.5, 0.5, 0.5, "l0", 0.9)]
    out = balanced_sample(small + medium + large, cfg)
    # small has 1 of 3: 2 unused go to medium (1 + 2 = 3), large takes its 1 → 5 boxes
    assert [b.label for b in out] == ["l0", "m0", "m1", "m2", "s0"]
    # no small boxes, large bucket short: leftover slots are filled from what remains
    cfg = FusionConfig(quota_small=2, quota_medium=0, quota_large=1, max_boxes=3)
    out = balanced_sample(medium + large, cfg)
    assert [b.label for b in out] == ["l0", "m0", "m1"]


def test_cap_and_empty_input():
    cfg = FusionConfig(quota_small=10, quota_medium=10, quota_large=10, max_boxes=3)
    many = [square(0.1, 0.1, 0.05, f"s{i}", 0.1 * i) for i in range(1, 8)]
    assert [b.label for b in balanced_sample(many, cfg)] == ["s7", "s6", "s5"]
    assert balanced_sample([], cfg) == []
    assert balanced_sample(many, FusionConfig(max_boxes=0)) == []


def test_fuse_end_to_end_from_owlv2_padding_and_pixels():
    # 1000 x 500 image. OWLv2 box in the padded square, the closed detector in pixels.
    w, h = 1000, 500
    owl = Box("dog", 0.5, unpad_square((0.1, 0.05, 0.3, 0.2), w, h), "owlv2")
    assert owl.xyxy == pytest.approx((0.1, 0.1, 0.3, 0.4))
    closed = Box("dogs", 0.8, normalise_pixels((100, 50, 300, 190), w, h), "closed")
    out = fuse_boxes([owl], [closed], FusionConfig(), width=w, height=h)
    assert len(out) == 1 and out[0].source == "fused" and out[0].score == 0.8
    assert out[0].xyxy == pytest.approx((0.1, 0.1, 0.3, 0.38))


def test_boxes_without_a_size_never_take_the_small_slots():
    # The boxes: 4e-6 of the width ("bicycle") and of the height ("table") of a
    # 1000 x 750 image, more confident than the real small box ("cup", 30 x 30 px).
    w, h = 1000, 750
    sliver = box("bicycle", 0.95, (0.0, 0.67, 0.000004, 1.0))
    flat = box("table", 0.9, (0.0, 0.0, 0.58, 0.000004), "closed")
    cup = box("cup", 0.6, (0.5, 0.5, 0.53, 0.54))
    narrow = box("pole", 0.7, (0.2, 0.1, 0.203, 0.5))  # 3 px wide: below the default 4 px
    cfg = FusionConfig(quota_small=1, quota_medium=0, quota_large=0, max_boxes=1)
    assert [b.label for b in fuse_boxes([sliver, cup, narrow], [flat], cfg, width=w, height=h)] == ["cup"]
    # without the minimum side, the sliver (area > 0) took the one small slot
    no_minimum = FusionConfig(min_box_side=0.0, quota_small=1, quota_medium=0, quota_large=0, max_boxes=1)
    assert [b.label for b in fuse_boxes([sliver, cup, narrow], [flat], no_minimum, width=w, height=h)] == ["bicycle"]
    # configurable in pixels of the original image: 2 px lets the 3-px pole through
    assert keep_sized([sliver, cup, narrow], 2.0, w, h) == [cup, narrow]
    assert keep_sized([sliver, cup, narrow], 31.0, w, h) == []
    # on a 4x larger image the same normalised pole is 12 px wide and stays
    assert keep_sized([narrow], 4.0, 4 * w, 4 * h) == [narrow]
    # an image of unknown size still loses the boxes of no area
    assert keep_sized([box("dot", 0.9, (0.3, 0.3, 0.3, 0.4)), cup], 4.0, 0, 0) == [cup]


@pytest.mark.parametrize(
    "kwargs",
    [{"open_min_score": 1.5}, {"merge_iou": -0.1}, {"small_area": 0.2, "large_area": 0.1},
     {"max_boxes": -1}, {"label_synonyms": ("no equals sign",)}],
)
def test_config_validation(kwargs):
    with pytest.raises(ConfigError):
        FusionConfig(**kwargs).validate()
