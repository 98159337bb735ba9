import pytest

from engine.core.config import ScoreConfig
from engine.core.record import Sample, Source
from engine.evidence.coverage import (
    Evidence,
    coverage_scores,
    label_coverage,
    ocr_line_coverage,
    ocr_token_coverage,
    unseen_nouns,
)
from engine.evidence.language import pos_tagger
from engine.stages.score import ScoreStage
from models.records import Box, Caption, OcrLine, Tag


def test_ocr_lines_count_when_reproduced_whole_ignoring_case_and_punctuation():
    caption = 'A poster reads "Grand Opening!" above a photo of bread.'
    assert ocr_line_coverage(caption, ["GRAND OPENING", "FRESH BREAD DAILY"]) == 0.5
    assert ocr_line_coverage(caption, ["grand   opening", "GRAND OPENING"]) == 1.0  # one distinct line
    assert ocr_line_coverage("concatenate", ["CAT"]) == 0.0  # whole words only
    assert ocr_line_coverage(caption, []) is None


def test_ocr_tokens_give_partial_credit():
    caption = 'A poster reads "Grand Opening!" above a photo of fresh loaves.'
    # OCR words: grand opening fresh bread daily -> grand, opening, fresh found: 3/5
    assert ocr_token_coverage(caption, ["GRAND OPENING", "FRESH BREAD DAILY"]) == pytest.approx(3 / 5)
    assert ocr_token_coverage(caption, ["!!!"]) is None


def test_labels_are_named_in_singular_or_plural_or_by_synonym():
    caption = "Two dogs sit next to a man on a sofa near the buses and a traffic light."
    assert label_coverage(caption, ["dog"]) == 1.0  # plural in the caption
    assert label_coverage(caption, ["bus"]) == 1.0  # "buses": singularising "bus" is lossy
    assert label_coverage(caption, ["person"]) == 1.0  # synonym: man
    assert label_coverage(caption, ["couch"]) == 1.0  # synonym: sofa
    assert label_coverage(caption, ["traffic_light"]) == 1.0  # multi-word label, in order
    assert label_coverage(caption, ["light traffic"]) == 0.0
    assert label_coverage(caption, ["cat", "dog", "Dog", "umbrella"]) == pytest.approx(1 / 3, abs=1e-4)
    assert label_coverage(caption, []) is None


def test_unseen_nouns_are_objects_no_expert_reported():
    caption = "The image shows two dogs and a giraffe in the background. A sign reads SALE."
    evidence = Evidence(tags=("dog",), box_labels=("signboard",), ocr_lines=("SALE",))
    unseen, objects = unseen_nouns(caption, evidence, pos_tagger())
    # nouns: image, background (descriptive, ignored); dogs (tag), giraffe (no expert),
    # sign (synonym of the box label signboard), SALE (read by OCR)
    assert unseen == {"giraffe"}
    assert objects == 4


def test_coverage_scores_for_a_caption():
    caption = "A red car is parked on the street. A sign reads OPEN. A cat sleeps on the hood."
    evidence = Evidence(tags=("car", "road", "tree"), box_labels=("car",), ocr_lines=("OPEN", "24 HOURS"))
    scores = coverage_scores(caption, evidence, pos_tagger())
    assert scores["cov_ocr_lines"] == 0.5
    assert scores["cov_ocr_tokens"] == pytest.approx(1 / 3, abs=1e-4)
    assert scores["cov_box_labels"] == 1.0
    assert scores["cov_tags"] == pytest.approx(2 / 3, abs=1e-4)  # car, road (~ street); not tree
    # car, street, sign, cat, hood are object nouns; sign, cat and hood were seen by no expert
    assert scores["unseen_nouns"] == 3.0
    assert scores["unseen_noun_share"] == pytest.approx(3 / 5)


def test_undefined_scores_are_left_out():
    scores = coverage_scores("A plain wall.", Evidence(), pos_tagger())
    assert set(scores) == {"unseen_nouns", "unseen_noun_share"}
    assert coverage_scores("", Evidence(tags=("wall",)), pos_tagger()) == {"cov_tags": 0.0}


def _sample(key: str, caption: str | None) -> Sample:
    s = Sample(key=key, source=Source("0", "in.tar", key), tags=[Tag("car", 0.9)],
               boxes=[Box("car", 0.8, (0, 0, 1, 1), "fused")], ocr=[OcrLine("STOP", 0.9, (0, 0, 1, 1))])
    if caption is not None:
        s.caption = Caption(caption, 1, 1, "stop", 0.0, "m", "b")
    return s


def test_score_stage_fills_sample_scores():
    stage = ScoreStage(ScoreConfig())
    stage.setup()
    batch = stage.process([_sample("a", "A car at a STOP sign."), _sample("b", None)])
    assert batch[0].scores["cov_tags"] == 1.0 and batch[0].scores["cov_ocr_lines"] == 1.0
    assert batch[0].scores["unseen_nouns"] == 1.0  # sign
    assert batch[1].scores == {} and batch[1].alive


def test_score_stage_runs_in_the_pipeline_and_reaches_the_statistics(tmp_path):
    import io

    from PIL import Image

    from engine.core import config, pipeline
    from engine.core.record import ShardEnd
    from engine.output.dataset_reader import iter_samples
    from engine.output.stats import output_stats

    buffer = io.BytesIO()
    Image.new("RGB", (640, 480), (90, 120, 200)).save(buffer, "JPEG")

    def source(skip):
        for key, caption in (("a", "A car at a STOP sign."), ("b", "A car and a tree.")):
            sample = _sample(key, caption)
            sample.image_bytes = buffer.getvalue()
            yield sample
        yield ShardEnd("0", "in.tar", 2)

    cfg = config.build(runtime={"out": str(tmp_path / "out"), "progress": False, "stages": ("score",)})
    summary = pipeline.run(cfg, source=source)
    assert summary.written == 2
    written = {s.key: s.annotations["scores"] for s in iter_samples(tmp_path / "out")}
    assert written["a"]["cov_ocr_lines"] == 1.0 and written["b"]["cov_ocr_lines"] == 0.0
    stats = output_stats(tmp_path / "out")
    assert stats["coverage"]["cov_ocr_lines"]["mean"] == 0.5 and stats["coverage"]["cov_tags"]["mean"] == 1.0
