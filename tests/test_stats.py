import json

import pytest
from output_fixture import write_fixture_output

from engine.evidence.language import pos_tagger
from engine.output import stats

# Hand-counted: chars / words / sentences; parts of speech per caption
#   "A red car."                                  10 / 3 / 1   noun car, adj red
#   "Two dogs run quickly. They are sleeping!"    40 / 7 / 2   num Two, noun dogs, verbs run
#                                                              sleeping (are: auxiliary), adv quickly
#   "Three small boats float slowly on the lake." 43 / 8 / 1   num Three, adj small, nouns boats
#                                                              lake, verb float, adv slowly
CAPTIONS = ("A red car.", "Two dogs run quickly. They are sleeping!",
            "Three small boats float slowly on the lake.")


def annotations(captions, scores=None):
    return [{"key": f"k{i}", "caption": c, "scores": (scores or {}).get(i, {}),
             "engine": {"finish_reason": "stop"}} for i, c in enumerate(captions)]


def test_table1_matches_hand_counts():
    result = stats.compute_stats(annotations(CAPTIONS + ("",)), [], pos_tagger())
    t = result["table1"]
    assert t["samples"] == 4 and t["captions"] == 3  # the empty caption counts as a sample only
    assert t["chars"] == pytest.approx((10 + 40 + 43) / 3)
    assert t["words"] == pytest.approx(18 / 3)
    assert t["sentences"] == pytest.approx(4 / 3)
    assert t["nouns"] == pytest.approx(4 / 18)
    assert t["adjectives"] == pytest.approx(2 / 18)
    assert t["adverbs"] == pytest.approx(2 / 18)
    assert t["verbs"] == pytest.approx(3 / 18)
    assert t["numerals"] == pytest.approx(2 / 18)
    assert result["pos_tagger"] == "pattern"


def test_histograms_count_every_caption():
    result = stats.compute_stats(annotations(CAPTIONS), [], pos_tagger())
    words = result["histograms"]["words"]
    assert sum(words["counts"]) == 3
    assert words["edges"][0] == 3 and words["edges"][-1] == 8
    assert sum(result["histograms"]["sentences"]["counts"]) == 3


def test_coverage_categories_and_rejects_are_summarised():
    scores = {0: {"cov_tags": 0.5, "category:photo": 0.9, "category:infographic": 0.1},
              1: {"cov_tags": 1.0, "category:photo": 0.2, "category:infographic": 0.8},
              2: {"category:photo": 0.6, "category:infographic": 0.4}}
    rejects = [{"key": "a", "stage": "probe", "status": "filtered", "reason": "short edge 100 < 448"},
               {"key": "b", "stage": "decode", "status": "error", "reason": "truncated"},
               {"key": "c", "stage": "probe", "status": "filtered", "reason": "short edge 100 < 448"}]
    result = stats.compute_stats(annotations(CAPTIONS, scores), rejects, pos_tagger())
    assert result["coverage"]["cov_tags"]["mean"] == pytest.approx(0.75)
    assert result["coverage"]["cov_tags"]["samples"] == 2
    assert result["categories"] == {"photo": 2, "infographic": 1}
    assert result["rejects"]["by_stage"] == {"probe": 2, "decode": 1}
    assert result["rejects"]["by_reason"]["short edge 100 < 448"] == 2
    assert result["finish_reasons"] == {"stop": 3}


def test_stats_command_on_an_output_folder(tmp_path, capsys):
    out = write_fixture_output(tmp_path / "out")
    assert stats.main([str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Nouns" in printed and "Samples" in printed
    written = json.loads((out / "stats.json").read_text())
    assert written["table1"]["samples"] == 3  # the failed sample is a reject, not a sample
    assert written["rejects"]["total"] == 1
    assert written["categories"] == {"photo": 1, "commercial design": 1}


def test_output_commands_run_through_the_cli(tmp_path, capsys):
    import densefusion_local

    out = write_fixture_output(tmp_path / "out")
    assert densefusion_local.main(["stats", str(out)]) == 0
    assert "Nouns" in capsys.readouterr().out
    assert densefusion_local.main(["export", "jsonl", str(out), "--to", str(tmp_path / "x")]) == 0
    assert (tmp_path / "x" / "densefusion.jsonl").read_text().count("\n") == 2
    assert densefusion_local.main(["report", str(out), "--samples", "1"]) == 0
    assert (out / "report.html").read_text().count('class="sample"') == 1
    assert densefusion_local.main(["stats", str(tmp_path / "missing")]) == 2


def test_shards_tallied_in_worker_processes_give_the_same_figures(tmp_path, monkeypatch):
    from output_fixture import fixture_samples

    monkeypatch.setattr(stats, "CAPTIONS_PER_WORKER", 1)  # the fixture is tiny: use workers anyway
    out = tmp_path / "out"
    for shard in ("00000", "00001"):
        write_fixture_output(out, fixture_samples(shard))
    serial = stats.output_stats(out, workers=1)
    parallel = stats.output_stats(out, workers=2)
    assert parallel == serial
    assert serial["table1"]["samples"] == 6 and serial["rejects"]["total"] == 2
