"""OCR expert: real PP-OCR models from the rapidocr wheel, reading order, caps, misconfiguration."""

import sys
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from engine.core.config import OcrConfig
from engine.core.record import Sample, ShardEnd, Source
from engine.stages.ocr import Ocr, ocr_settings
from models.errors import ConfigError
from models.ocr import OcrModel, RawText, reading_order

FONT = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"


def render(placed: list[tuple[str, int, int]], size=(720, 360), font_px=32) -> np.ndarray:
    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    font = ImageFont.truetype(str(FONT), font_px)
    for text, x, y in placed:
        draw.text((x, y), text, font=font, fill=(10, 10, 10))
    return np.asarray(image)


@pytest.fixture(scope="module")
def ocr_stage():
    stage = Ocr(OcrConfig())
    stage.setup()
    return stage


def test_reads_rendered_text_in_reading_order(ocr_stage):
    # two columns on two rows, drawn in scrambled order; the right column sits a little higher
    image = render([("WEST GATE", 380, 200), ("OPEN DAILY", 30, 60), ("NORTH PARK", 30, 204),
                    ("FREE ENTRY", 380, 54)])
    sample = Sample(key="k", source=Source("s", "s.tar", "k"), views={"ocr": image})
    ocr_stage.process([sample])
    assert sample.alive, sample.reason
    assert [line.text for line in sample.ocr] == ["OPEN DAILY", "FREE ENTRY", "NORTH PARK", "WEST GATE"]
    first = sample.ocr[0]
    assert all(0.0 <= v <= 1.0 for line in sample.ocr for v in line.xyxy)
    # "OPEN DAILY" starts 30 px from the left of 720 and 60 px from the top of 360
    assert first.xyxy[0] == pytest.approx(30 / 720, abs=0.03)
    assert first.xyxy[1] == pytest.approx(60 / 360, abs=0.06)
    assert first.score >= OcrConfig().ocr_min_score


def test_stage_declares_its_view_and_fails_per_sample(ocr_stage):
    assert [(v.name, v.max_side) for v in ocr_stage.views()] == [("ocr", 960)]
    good = Sample(key="a", source=Source("s", "s.tar", "a"), views={"ocr": render([("HELLO", 40, 100)])})
    bad = Sample(key="b", source=Source("s", "s.tar", "b"))  # no decoded view
    ocr_stage.process([bad, good])
    assert bad.status == "error" and bad.stage == "ocr"
    assert good.alive and [line.text for line in good.ocr] == ["HELLO"]


class FakeBackend:
    name = "fake"
    describe = "fake"

    def __init__(self, texts):
        self.texts = texts

    def load(self):
        pass

    def detect_and_read(self, images):
        return [self.texts for _ in images]


def model_with(texts, **config) -> OcrModel:
    model = OcrModel(ocr_settings(OcrConfig(**config)))
    model.backend = FakeBackend(texts)
    return model


def test_threshold_and_caps():
    texts = [RawText(f"line{i}", 0.9, (0, 10 * i, 50, 10 * i + 8)) for i in range(6)]
    texts.append(RawText("unsure", 0.2, (0, 100, 50, 108)))
    texts.append(RawText("   ", 0.99, (0, 120, 50, 128)))
    texts.append(RawText("•-", 0.99, (0, 130, 50, 138)))
    image = np.zeros((200, 100, 3), np.uint8)
    assert [line.text for line in model_with(texts).read([image])[0]] == [f"line{i}" for i in range(6)]
    assert [line.text for line in model_with(texts, ocr_max_lines=2).read([image])[0]] == ["line0", "line1"]
    assert [line.text for line in model_with(texts, ocr_max_chars=12).read([image])[0]] == ["line0", "line1", "li"]
    line = model_with(texts[:1]).read([image])[0][0]
    assert line.xyxy == (0.0, 0.0, 0.5, 0.04)


def test_reading_order_groups_rows_despite_tilt():
    texts = [
        RawText("right", 0.9, (300, 12, 400, 42)),  # same row, slightly lower
        RawText("below", 0.9, (10, 60, 100, 90)),
        RawText("left", 0.9, (10, 8, 100, 36)),
        RawText("middle", 0.9, (150, 10, 250, 40)),
    ]
    assert [t.text for t in reading_order(texts)] == ["left", "middle", "right", "below"]


def test_original_language_is_kept():
    texts = [RawText("快递 周通通流", 0.95, (0, 0, 10, 10))]
    assert model_with(texts).read([np.zeros((10, 10, 3), np.uint8)])[0][0].text == "快递 周通通流"


def test_paddleocr_needs_local_model_folders(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="needs --ocr-model-dir"):
        Ocr(OcrConfig(ocr_backend="paddleocr"))
    with pytest.raises(ConfigError, match=r"lacks the model folder\(s\) \['rec'\]"):
        (tmp_path / "det").mkdir()
        Ocr(OcrConfig(ocr_backend="paddleocr", ocr_model_dir=str(tmp_path)))
    (tmp_path / "rec").mkdir()
    monkeypatch.setitem(sys.modules, "paddleocr", None)  # as when the package is not installed
    with pytest.raises(ConfigError, match="paddleocr package is not installed"):
        Ocr(OcrConfig(ocr_backend="paddleocr", ocr_model_dir=str(tmp_path)))


def test_rapidocr_model_dir_must_hold_one_det_and_one_rec(tmp_path):
    (tmp_path / "a_det_x.onnx").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"exactly one \*rec\*.onnx"):
        Ocr(OcrConfig(ocr_model_dir=str(tmp_path)))


@pytest.mark.parametrize("bad", [{"ocr_min_score": 1.5}, {"ocr_max_lines": 0}, {"ocr_backend": "tesseract"}])
def test_config_validation(bad):
    with pytest.raises(ConfigError):
        OcrConfig(**bad).validate()


def test_parallel_sessions_read_the_same_lines(ocr_stage):
    """Several sessions in parallel (the runtime's workers) give each image exactly what one
    session gives it."""
    from engine.core.runtime import Pipeline

    class Keep:
        def write(self, sample):
            written[sample.key] = sample

        def commit(self, end):
            pass

    texts = ["OPEN DAILY", "WEST GATE", "FREE ENTRY", "NORTH PARK", "CITY HALL", "MAIN ST"]
    images = [render([(text, 40, 60 + 30 * (i % 3))]) for i, text in enumerate(texts)]
    parallel = Ocr(OcrConfig(ocr_workers=3))
    assert parallel.resources().workers == 3
    one, many = ([Sample(key=str(i), source=Source("s", "s.tar", str(i)), views={"ocr": im})
                  for i, im in enumerate(images)] for _ in range(2))
    ocr_stage.process(one)
    written: dict[str, Sample] = {}
    Pipeline([parallel], queue_depth=2).run(iter([*many, ShardEnd("s", "s.tar", 6)]), Keep())
    assert [[line.text for line in written[str(i)].ocr] for i in range(6)] == [[t] for t in texts]
    assert [[line.text for line in s.ocr] for s in many] == [[line.text for line in s.ocr] for s in one]
    assert parallel._idle.qsize() == 3  # every session is returned after use


def test_batched_backend_reads_what_rapidocr_reads():
    """The batched path (several images per detection call, the crops of all images in one
    recognition call) reads the same lines as rapidocr's pipeline, one image at a time."""
    placed = [[("OPEN DAILY", 30, 60), ("WEST GATE", 380, 200)], [("FREE ENTRY", 40, 100)],
              [("NORTH PARK", 30, 40), ("CITY HALL", 30, 200)], [("MAIN ST 42", 200, 150)]]
    sizes = [(720, 360), (480, 640), (720, 540), (900, 300)]
    images = [render(p, size=s) for p, s in zip(placed, sizes)]
    rapid = OcrModel(ocr_settings(OcrConfig(ocr_backend="rapidocr")))
    batched = OcrModel(ocr_settings(OcrConfig(ocr_backend="batched", ocr_det_batch=3, ocr_rec_batch=4)))
    for model in (rapid, batched):
        model.load()
    by_rapid = [[line.text for line in lines] for lines in rapid.read(images)]
    by_batch = batched.read(images)
    assert [[line.text for line in lines] for lines in by_batch] == by_rapid == [[t for t, _, _ in p] for p in
                                                                                  [sorted(q, key=lambda t: t[2]) for q in placed]]
    # one image per call gives each image what the batch gave it; the padding of a shared
    # detection call moves a box edge by a pixel or two at most
    alone = [batched.read([image])[0] for image in images]
    assert [[line.text for line in lines] for lines in alone] == by_rapid
    for one, many in zip(alone, by_batch):
        for a, b in zip(one, many):
            assert a.xyxy == pytest.approx(b.xyxy, abs=0.01)


def test_one_bad_image_fails_alone(ocr_stage):
    good = Sample(key="a", source=Source("s", "s.tar", "a"), views={"ocr": render([("HELLO", 40, 100)])})
    bad = Sample(key="b", source=Source("s", "s.tar", "b"), views={"ocr": np.zeros((0, 5, 3), np.uint8)})
    ocr_stage.process([good, bad])
    assert bad.status == "error" and bad.stage == "ocr"
    assert good.alive and [line.text for line in good.ocr] == ["HELLO"]
