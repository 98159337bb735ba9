import numpy as np
import pytest
import torch

from models.owlv2 import Owlv2Detector
from models.owlv2 import build_tiny as build_tiny_owlv2


@pytest.fixture(scope="module")
def owl_folder(tmp_path_factory):
    return build_tiny_owlv2(tmp_path_factory.mktemp("owlv2"))


def image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def test_query_embeddings_cached_per_distinct_text(owl_folder, monkeypatch):
    torch.set_num_threads(1)
    det = Owlv2Detector(str(owl_folder))
    calls = []
    original = det.model.owlv2.get_text_features
    monkeypatch.setattr(det.model.owlv2, "get_text_features", lambda **kw: calls.append(len(kw["input_ids"])) or original(**kw))
    first = det.query_embeddings(["dog", "cat", "dog"])
    assert calls == [2] and det.cached_queries == 2
    assert torch.equal(first[0], first[2])
    again = det.query_embeddings(["cat", "car"])
    assert calls == [2, 1] and torch.equal(again[0], first[1])


def test_cached_queries_give_the_stock_forward_scores(owl_folder):
    """Our split forward (cached query embeddings) scores patches exactly like model(...)."""
    torch.set_num_threads(1)
    det = Owlv2Detector(str(owl_folder), preprocess="stock")
    img = image(40, 64)
    pixels = det.preprocess([img])
    tokens = det.tokenizer(["a photo of a dog", "a photo of a cat"], padding="max_length", max_length=16,
                           truncation=True, return_tensors="pt")
    with torch.inference_mode():
        stock = det.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=pixels)
    probs = torch.sigmoid(stock.logits[0])  # patches x 2
    det.nms_iou = 1.0  # no NMS: one box per patch, the best query's score
    boxes = det.detect([img], [["dog", "cat"]], min_score=0.0)[0]
    assert len(boxes) == probs.shape[0]
    assert sorted(b.score for b in boxes) == pytest.approx(sorted(probs.max(-1).values.tolist()), abs=1e-4)


def test_each_image_gets_only_its_own_queries_and_boxes_map_back(owl_folder):
    torch.set_num_threads(1)
    det = Owlv2Detector(str(owl_folder))
    imgs = [image(32, 64, 1), image(64, 32, 2), image(50, 50, 3)]
    out = det.detect(imgs, [["dog"], ["cat", "car"], []], min_score=0.0)
    assert {b.label for b in out[0]} == {"dog"}
    assert {b.label for b in out[1]} <= {"cat", "car"} and out[1]
    assert out[2] == []
    for boxes in out:
        for b in boxes:
            x1, y1, x2, y2 = b.xyxy
            assert 0 <= x1 <= x2 <= 1 and 0 <= y1 <= y2 <= 1 and b.source == "owlv2"
    assert det.detect(imgs, [["dog"]] * 3, min_score=1.1) == [[], [], []]


def test_tensor_preprocessing_matches_stock_geometry(owl_folder):
    det = Owlv2Detector(str(owl_folder))
    stock = Owlv2Detector(str(owl_folder), preprocess="stock")
    img = np.full((32, 64, 3), 200, np.uint8)  # landscape: padded at the bottom
    ours, theirs = det.preprocess([img])[0], stock.preprocess([img])[0]
    assert ours.shape == theirs.shape == (3, 64, 64)
    # content in the top half, padding (0 before normalisation) in the bottom half, in both
    assert torch.allclose(ours[:, :30], theirs[:, :30], atol=1e-3)
    assert torch.allclose(ours[:, 34:], theirs[:, 34:], atol=1e-3)
    pad_value = -torch.tensor(det.processor.image_mean) / torch.tensor(det.processor.image_std)
    assert torch.allclose(ours[:, -1, -1], pad_value, atol=1e-5)
