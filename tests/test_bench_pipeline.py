"""The pipeline-overlap benchmark runs end to end on tiny sizes (CI keeps it from rotting); its
figures are printed, and only what holds on any machine is asserted."""

from bench import pipeline


def test_bench_pipeline_measures_overlap_against_the_paced_engine(capsys):
    figures = pipeline.measure(images=6, rate=40.0, caption_batch=4, text_every=3,
                               stages=("tag", "detect", "ocr", "prompt", "decode", "caption"))
    assert figures["captioned"] == 6  # every image reached the engine
    assert set(figures["busy_s"]) == {"probe", "decode", "tag", "detect", "ocr", "prompt", "caption"}
    # the paced engine cannot beat its own rate, and the run lasts at least as long as any one stage
    assert figures["busy_s"]["caption"] >= 6 / 40.0
    assert 0 < figures["share_of_caption_rate"] <= figures["share_after_fill"] <= 1.0
    assert 0 < figures["fill_s"] < figures["wall_s"]
    assert figures["wall_over_slowest_busy"] >= 0.99
    assert pipeline.main(["--images", "4", "--caption-rate", "40", "--stages", "tag", "prompt"]) == 0
    out = capsys.readouterr().out
    assert "slowest stage's busy time" in out and "paced engine 40 images/s" in out
