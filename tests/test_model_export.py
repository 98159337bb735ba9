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


def test_exported_embedder_tower_serves_the_engine(tmp_path, tiny_cache):
    """The ONNX image tower gives the torch embeddings, and the pipeline uses it when asked."""
    import densefusion_local
    from engine.core import config as config_module
    from models.embedder import ClipEmbedder
    from models.errors import ConfigError
    from models.tiny import ensure

    out = tmp_path / "embed"
    assert export_main(["onnx", "--target", "embed", "--model", "tiny", "--out", str(out),
                        "--cache-dir", str(tiny_cache)]) == 0
    folder = str(ensure("embed", tiny_cache / "tiny"))
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 255, (300, 400, 3), dtype=np.uint8), rng.integers(0, 255, (500, 250, 3), dtype=np.uint8)]
    on_torch = ClipEmbedder(folder).embed_images(images)
    onnx = ClipEmbedder(folder, image_onnx=str(out / "embed.onnx"))
    assert "onnxruntime" in onnx.describe()
    assert np.abs(onnx.embed_images(images) - on_torch).max() < 1e-4

    with pytest.raises(ConfigError, match="--embed-onnx"):
        config_module.build(None, None, curate={"embed_onnx": str(tmp_path / "missing.onnx")},
                            runtime={"out": str(tmp_path / "o")})
    demo_out = tmp_path / "demo"
    assert densefusion_local.main(["demo", "--out", str(demo_out), "--no-progress", "--cache-dir", str(tiny_cache),
                                   "--stages", "category", "--embed-onnx", str(out / "embed.onnx")]) == 0
    metrics = json.loads((demo_out / "metrics.json").read_text())
    category = next(s for s in metrics["stages"] if s["stage"] == "category")
    assert "onnxruntime" in category["description"] and category["items"] > 0


def test_exported_ram_plus_tags_like_the_checkpoint_in_the_engine(tmp_path, tiny_cache, demo_output):
    """The export writes the vocabulary beside the graph; --ram-plus-model FILE.onnx tags on
    ONNX Runtime what the torch checkpoint tags, in the pipeline too."""
    import densefusion_local
    from engine.core.config import ExpertsConfig
    from engine.core.record import Sample, Source
    from engine.stages.tag import RAM_VIEW, RamPlusTag
    from models.ram_plus import TAG_LIST_NAME, THRESHOLD_NAME, TINY_TAGS, load_tagger
    from models.tiny import ensure

    out = tmp_path / "ram"
    assert export_main(["onnx", "--target", "ram_plus", "--model", "tiny", "--out", str(out),
                        "--cache-dir", str(tiny_cache)]) == 0
    assert (out / TAG_LIST_NAME).read_text().split("\n")[:3] == list(TINY_TAGS[:3])
    # every tag on, on both sides (the tiny model's probabilities sit around its 0.5 thresholds):
    # the tags then show the whole ranking, and the export's threshold file is what is read
    (out / THRESHOLD_NAME).write_text("\n".join("0" for _ in TINY_TAGS))
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 255, (80, 120, 3), dtype=np.uint8) for _ in range(3)]
    torch_tagger = load_tagger(ensure("ram_plus", tiny_cache / "tiny"), "cpu")
    torch_tagger.vocabulary.thresholds[:] = 0.0
    on_torch = torch_tagger.tag(images)
    cfg = ExpertsConfig(max_tags=100)
    stage = RamPlusTag(cfg, model=str(out / "ram_plus.onnx"), device="cpu")
    stage.setup()
    samples = [Sample(key=str(i), source=Source("s", "s.tar", str(i)), views={RAM_VIEW.name: im})
               for i, im in enumerate(images)]
    stage.process(samples)
    assert "onnxruntime CPUExecutionProvider" in stage.describe()
    assert [[t.name for t in s.tags] for s in samples] == [[t.name for t in tags] for tags in on_torch]
    assert all(len(s.tags) == len(TINY_TAGS) for s in samples)
    for sample, tags in zip(samples, on_torch):
        assert [t.score for t in sample.tags] == pytest.approx([t.score for t in tags], abs=1e-4)

    run_out = tmp_path / "run"  # `run`, not `demo`: --models tiny would take the tiny checkpoint instead
    shards = sorted(str(p) for p in (demo_output / "input").glob("*.tar"))
    assert densefusion_local.main(["run", "--shards", *shards, "--out", str(run_out), "--no-progress",
                                   "--cache-dir", str(tiny_cache), "--stages", "decode", "tag",
                                   "--ram-plus-model", str(out / "ram_plus.onnx"), "--expert-cache", "off"]) == 0
    metrics = json.loads((run_out / "metrics.json").read_text())
    tag = next(stage for stage in metrics["stages"] if stage["stage"] == "tag")
    assert "onnxruntime" in tag["description"] and tag["items"] > 0
