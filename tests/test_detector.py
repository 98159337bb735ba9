import json

import numpy as np
import pytest
import torch

from models.detector import (
    TINY_DETECTOR_LABELS,
    OnnxDetector,
    TransformersDetector,
    load_detector,
    read_label_map,
)
from models.detector import build_tiny as build_tiny_detector
from models.errors import ConfigError


def image(h, w, value=255):
    return np.full((h, w, 3), value, np.uint8)


def write_onnx_detector(path, size=100, batch="B"):
    """boxes/scores/labels constants; scores scaled by max(pixel)/255 so the input matters."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    boxes = np.array([[[10, 20, 50, 40], [0, 0, 100, 100], [60, 10, 90, 30]]], np.float32)
    scores = np.array([[0.9, 0.4, 0.7]], np.float32)
    labels = np.array([[1, 0, 7]], np.int64)
    nodes = [
        helper.make_node("ReduceMax", ["images"], ["peak"], keepdims=0),
        helper.make_node("Div", ["peak", "c255"], ["gain"]),
        helper.make_node("Mul", ["score_const", "gain"], ["scores_1"]),
        helper.make_node("Shape", ["images"], ["shape"], start=0, end=1),
        helper.make_node("Concat", ["shape", "one"], ["rep2"], axis=0),
        helper.make_node("Concat", ["shape", "one", "one"], ["rep3"], axis=0),
        helper.make_node("Tile", ["scores_1", "rep2"], ["scores"]),
        helper.make_node("Tile", ["box_const", "rep3"], ["boxes"]),
        helper.make_node("Tile", ["label_const", "rep2"], ["labels"]),
    ]
    inits = [numpy_helper.from_array(boxes, "box_const"), numpy_helper.from_array(scores, "score_const"),
             numpy_helper.from_array(labels, "label_const"), numpy_helper.from_array(np.float32(255), "c255"),
             numpy_helper.from_array(np.array([1], np.int64), "one")]
    graph = helper.make_graph(
        nodes, "tiny_detector",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [batch, 3, size, size])],
        [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [batch, 3, 4]),
         helper.make_tensor_value_info("scores", TensorProto.FLOAT, [batch, 3]),
         helper.make_tensor_value_info("labels", TensorProto.INT64, [batch, 3])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def test_onnx_backend_maps_boxes_labels_and_threshold(tmp_path):
    path = write_onnx_detector(tmp_path / "det.onnx")
    (tmp_path / "labels.json").write_text(json.dumps({"0": "person", "1": "dog"}))
    det = load_detector(str(path))
    assert isinstance(det, OnnxDetector) and det.size == 100
    # 200 x 100 image: scale 0.5 into the 100 x 100 input; input pixel boxes * 2 / (200, 100)
    first = det.detect([image(100, 200)], min_score=0.5)[0]
    assert [(b.label, b.score) for b in first] == [("dog", 0.9), ("7", 0.7)]  # unknown id → its number
    assert first[0].xyxy == pytest.approx((0.1, 0.4, 0.5, 0.8))
    assert first[1].xyxy == pytest.approx((0.6, 0.2, 0.9, 0.6))
    assert all(b.source == "closed" for b in first)
    assert det.detect([image(50, 50, value=0)], min_score=0.5) == [[]]  # black: the graph scores 0
    assert len(det.detect([image(100, 200)] * 3, min_score=0.5)) == 3


def test_onnx_label_map_and_contract_errors(tmp_path):
    path = write_onnx_detector(tmp_path / "det.onnx")
    with pytest.raises(ConfigError, match="label map"):
        OnnxDetector(str(path))
    (tmp_path / "names.txt").write_text("person\ndog\n")
    assert read_label_map(tmp_path / "names.txt") == {0: "person", 1: "dog"}
    det = OnnxDetector(str(path), label_map=str(tmp_path / "names.txt"))
    assert det.detect([image(100, 100)], min_score=0.0)[0][1].label == "person"
    dynamic = write_onnx_detector(tmp_path / "dyn.onnx", size="S")
    with pytest.raises(ConfigError, match="dynamic"):
        OnnxDetector(str(dynamic), label_map=str(tmp_path / "names.txt"))


def test_transformers_backend_normalised_boxes_with_label_names(tmp_path):
    torch.set_num_threads(1)
    folder = build_tiny_detector(tmp_path / "yolos")
    det = load_detector(str(folder))
    assert isinstance(det, TransformersDetector)
    out = det.detect([image(40, 80, 120), image(90, 30, 30)], min_score=0.0)
    assert len(out) == 2 and all(len(boxes) == 5 for boxes in out)  # 5 detection tokens
    for boxes in out:
        for b in boxes:
            assert b.label in TINY_DETECTOR_LABELS.values() and b.source == "closed"
            assert all(0.0 <= v <= 1.0 for v in b.xyxy)
    top = max(b.score for b in out[0])
    assert det.detect([image(40, 80, 120)], min_score=top + 1e-3) == [[]]
