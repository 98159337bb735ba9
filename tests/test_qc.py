import dataclasses

import pytest

from engine.core.config import QcConfig
from engine.core.record import Sample, Source
from engine.evidence.qc import QC_RULES, check_caption
from engine.stages.qc import QualityControl
from models.errors import ConfigError
from models.records import Caption

GOOD = (
    "A red double-decker bus drives along a wet city street lined with brick buildings. "
    "Its front sign reads \"Oxford Circus\" in bright orange letters, and two passengers sit "
    "on the upper deck. On the left, a woman in a yellow raincoat holds a black umbrella "
    "while waiting at a crosswalk. Small puddles reflect the grey sky and the glowing "
    "shop windows behind her."
)

# One caption per rule that this rule (and only the rules listed) must reject.
BAD = {
    "empty": ("   \n", "stop", {"empty"}),
    "short": ("A dog on grass.", "stop", {"short"}),
    "token_limit": (GOOD, "length", {"token_limit"}),
    "unfinished": (GOOD + " Behind the bus, a cyclist in a green", "stop", {"unfinished"}),
    "repeated_ngrams": (
        "A cat sits on a mat next to a window and " * 8 + "a lamp.",
        "stop",
        {"repeated_ngrams"},
    ),
    "repeated_sentences": (
        GOOD + " The bus is red. The bus is red! The bus is red.",
        "stop",
        {"repeated_sentences"},
    ),
    "scaffolding_coordinates": (
        GOOD + " A bus [0.12, 0.34, 0.56, 0.78] stands in the centre.",
        "stop",
        {"scaffolding"},
    ),
    "scaffolding_ocr": (GOOD + " [OCR]: Oxford Circus.", "stop", {"scaffolding"}),
    "scaffolding_world_knowledge": (
        GOOD + " [World Knowledge] says this is London.",
        "stop",
        {"scaffolding"},
    ),
    "scaffolding_external": (
        GOOD + " The external information mentions a bus.",
        "stop",
        {"scaffolding"},
    ),
    "scaffolding_detection_box": (
        GOOD + " According to the detection box, there are two people.",
        "stop",
        {"scaffolding"},
    ),
}


def _sample(text: str, finish_reason: str = "stop") -> Sample:
    s = Sample(key="k1", source=Source(shard="s0", path="p", member="k1.jpg"))
    s.caption = Caption(text, 100, 80, finish_reason, 0.1, "tiny", "transformers")
    return s


def test_good_captions_pass_every_rule():
    cfg = QcConfig()
    assert check_caption(GOOD, "stop", cfg) == []
    # Closing quotes and non-Latin sentence ends are still sentence ends.
    assert check_caption(GOOD + ' The sign says "Open."', "stop", cfg) == []
    assert check_caption(GOOD + " 看板には「営業中」と書かれています。", "stop", cfg) == []
    # Plain numbers in brackets are not coordinates.
    assert check_caption(GOOD + " The poster lists prices [5, 10] in dollars.", "stop", cfg) == []


@pytest.mark.parametrize("case", sorted(BAD))
def test_each_rule_drops_its_failing_caption(case):
    text, finish, rules = BAD[case]
    verdicts = check_caption(text, finish, QcConfig())
    assert {v.rule for v in verdicts} == rules
    sample = _sample(text, finish)
    QualityControl(QcConfig()).process([sample])
    assert sample.status == "filtered" and sample.stage == "qc"
    assert sample.reason.startswith(f"{next(iter(rules))}: ")


def test_flag_mode_keeps_the_sample_and_records_the_verdict():
    stage = QualityControl(QcConfig(qc_action="flag"))
    sample = _sample("A dog on grass", "length")
    stage.process([sample])
    assert sample.alive
    assert [f.split(":")[0] for f in sample.flags] == ["short", "token_limit", "unfinished"]
    assert stage.metrics() == {"flagged_short": 1.0, "flagged_token_limit": 1.0,
                               "flagged_unfinished": 1.0}


def test_flag_rules_only_flag_while_others_drop():
    cfg = QcConfig(qc_flag_rules=("token_limit",))
    kept = _sample(GOOD, "length")
    dropped = _sample("A dog on grass.", "length")
    stage = QualityControl(cfg)
    stage.process([kept, dropped])
    assert kept.alive and kept.flags == ["token_limit: stopped at the output token limit"]
    assert dropped.status == "filtered" and dropped.reason.startswith("short: ")
    assert stage.metrics() == {"dropped_short": 1.0, "flagged_token_limit": 1.0}


def test_disabled_rules_and_thresholds_are_configurable():
    text, finish, _ = BAD["short"]
    assert check_caption(text, finish, QcConfig(qc_rules=tuple(r for r in QC_RULES if r != "short"))) == []
    assert check_caption(text, finish, QcConfig(qc_min_words=3)) == []
    loop = BAD["repeated_ngrams"][0]
    assert check_caption(loop, "stop", QcConfig(qc_max_ngram_repeat_share=0.95)) == []
    leak = BAD["scaffolding_external"][0]
    assert check_caption(leak, "stop", QcConfig(qc_scaffolding=(r"\[ocr\]",))) == []


def test_samples_without_a_caption_are_left_alone():
    sample = Sample(key="k", source=Source(shard="s", path="p", member="m"))
    QualityControl(QcConfig()).process([sample])
    assert sample.alive and sample.flags == []


@pytest.mark.parametrize(
    "change",
    [
        {"qc_rules": ("nonsense",)},
        {"qc_flag_rules": ("nonsense",)},
        {"qc_max_ngram_repeat_share": 1.5},
        {"qc_ngram": 0},
        {"qc_scaffolding": ("[unclosed",)},
    ],
)
def test_bad_settings_fail_validation(change):
    with pytest.raises(ConfigError):
        dataclasses.replace(QcConfig(), **change).validate()


def test_drops_land_in_rejects_with_the_rule_name_through_the_pipeline(tmp_path):
    import io

    import pyarrow.parquet as pq
    from PIL import Image

    from engine.core import config, pipeline
    from engine.core.record import ShardEnd

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), "white").save(buf, format="JPEG")
    cases = {"good": (GOOD, "stop"), "loop": BAD["repeated_ngrams"][:2],
             "cut": BAD["token_limit"][:2], "leak": BAD["scaffolding_ocr"][:2]}

    def source(skip):
        for key, (text, finish) in cases.items():
            sample = _sample(text, finish)
            sample.key, sample.image_bytes = key, buf.getvalue()
            sample.source = Source(shard="s0", path="mem", member=f"{key}.jpg")
            yield sample
        yield ShardEnd("s0", "mem", len(cases))

    cfg = config.build(runtime={"out": str(tmp_path), "stages": ("qc",), "progress": False},
                       filter={"min_short_edge": 0})
    summary = pipeline.run(cfg, source_paths=[], source=source)
    assert (summary.written, summary.rejected) == (1, 3)
    rejects = pq.read_table(tmp_path / "rejects" / "s0.parquet").to_pylist()
    reasons = {r["key"]: (r["stage"], r["reason"].split(":")[0]) for r in rejects}
    assert reasons == {"loop": ("qc", "repeated_ngrams"), "cut": ("qc", "token_limit"),
                       "leak": ("qc", "scaffolding")}
    written = pq.read_table(tmp_path / "shards" / "s0.parquet").to_pylist()
    assert [row["key"] for row in written] == ["good"]


def test_auto_drops_on_real_models_and_flags_on_tiny_ones():
    assert QcConfig().for_models("").qc_action == "drop"
    assert QcConfig().for_models("tiny").qc_action == "flag"  # tiny models write noise
    assert QcConfig(qc_action="drop").for_models("tiny").qc_action == "drop"  # asked for explicitly
    assert QcConfig().drops("short") and not QcConfig(qc_action="flag").drops("short")
