"""ONNX export of the vision experts: parity with torch, a dynamic batch, and the exported
detector loading through the engine's own ONNX detector backend."""

import json

import numpy as np
import pytest

from models.export.__main__ import main as export_main


@pytest.mark.parametrize("target", ["detector", "ram_plus", "embed"])
def test_tiny_experts_export_with_parity(target, tmp_path, tiny_cache, capsys):
    out = tmp_path / target
    assert export_main(["onnx", "--target", target, "--model", "tiny", "--out", str(out),
                        "--cache-dir", str(tiny_cache)]) == 0
    report = json.loads((out / f"{target}.export.json").read_text())
    assert (out / f"{target}.onnx").stat().st_size > 0
    assert report["max_abs_diff"] < 1e-3  # checked on batch size 3 after tracing with 2
    assert "ONNX Runtime vs torch" in capsys.readouterr().out


def test_exported_detector_runs_in_the_engine(tmp_path, tiny_cache):
    from models.detector import TINY_DETECTOR_LABELS, load_detector

    out = tmp_path / "det"
    assert export_main(["onnx", "--target", "detector", "--model", "tiny", "--out", str(out),
                        "--cache-dir", str(tiny_cache)]) == 0
    detector = load_detector(str(out / "detector.onnx"))
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (120, 200, 3), dtype=np.uint8), rng.integers(0, 255, (90, 60, 3), dtype=np.uint8)]
    results = detector.detect(images, min_score=0.0)
    assert len(results) == 2 and all(results)
    for boxes in results:
        for box in boxes:
            assert box.label in TINY_DETECTOR_LABELS.values()
            x1, y1, x2, y2 = box.xyxy
            assert 0 <= x1 <= x2 <= 1 and 0 <= y1 <= y2 <= 1


def test_unknown_model_folder_is_a_clear_error(tmp_path, capsys):
    assert export_main(["onnx", "--target", "embed", "--model", str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_tensorrt_without_the_package_says_what_to_install(tmp_path, capsys):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("tensorrt is installed here")
    except ImportError:
        pass
    assert export_main(["tensorrt", "--onnx", str(tmp_path / "x.onnx")]) == 2
    assert "pip install -e '.[tensorrt]'" in capsys.readouterr().err
