import json
import random
from collections import Counter

import numpy as np
import pytest
from output_fixture import write_fixture_output

from engine.evidence.language import pos_tagger
from engine.output import dataset_reader, stats, summaries

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


def exact_figures(values):
    counts, edges = np.histogram(values, bins=min(summaries.HISTOGRAM_BINS, len(set(values))))
    return {"mean": np.mean(values), "median": np.median(values), "min": min(values), "max": max(values),
            "counts": [int(c) for c in counts], "edges": [round(float(e), 2) for e in edges]}


def test_a_distribution_gives_the_figures_of_its_list_of_values_and_merges():
    rng = np.random.default_rng(0)
    lengths = [int(v) for v in rng.integers(40, 2000, 3000)]
    shares = [k / n for n, k in zip(rng.integers(1, 30, 3000), rng.integers(0, 30, 3000)) if k <= n]
    for values in (lengths, shares, lengths[:4]):  # 4: an even count, the median between two values
        whole, parts = summaries.Distribution(), [summaries.Distribution() for _ in range(3)]
        for i, v in enumerate(values):
            whole.add(v)
            parts[i % 3].add(v)
        merged = parts[0].merge(parts[1]).merge(parts[2])
        expected = exact_figures(values)
        for d in (whole, merged):
            assert not d.width  # well under MAX_DISTINCT distinct values: exact
            s, h = d.summary(), d.histogram()
            assert s["samples"] == len(values) and s["mean"] == pytest.approx(expected["mean"], rel=1e-12)
            assert (s["median"], s["min"], s["max"]) == (expected["median"], expected["min"], expected["max"])
            assert (h["counts"], h["edges"]) == (expected["counts"], expected["edges"])
            assert "median_within" not in s and "approximate_within" not in h


def test_a_distribution_past_its_distinct_values_bins_them_within_the_bound_it_states():
    rng = np.random.default_rng(1)
    values = list(rng.random(20_000) ** 2)  # 20,000 distinct floats, skewed
    halves = summaries.Distribution(), summaries.Distribution()
    for i, v in enumerate(values):
        halves[i % 2].add(v)
    d = halves[0].merge(halves[1])
    assert 0 < d.width <= 2 / summaries.MAX_DISTINCT and len(d.counts) <= summaries.MAX_DISTINCT
    s, h = d.summary(), d.histogram()
    expected = exact_figures(values)
    assert s["median_within"] == d.width / 2
    assert abs(s["median"] - expected["median"]) <= s["median_within"]
    assert s["mean"] == pytest.approx(expected["mean"], rel=1e-12)  # count, sum, min, max stay exact
    assert (s["min"], s["max"], s["samples"]) == (expected["min"], expected["max"], len(values))
    assert h["edges"] == expected["edges"] and sum(h["counts"]) == len(values)
    edges = np.histogram_bin_edges(values, bins=len(h["counts"]))
    near = [sum(1 for v in values if e0 - d.width <= v < e0 + d.width) for e0 in edges[1:-1]]
    for i, (got, want) in enumerate(zip(h["counts"], expected["counts"])):
        # a value within approximate_within of an edge may land in the bin beside
        assert abs(got - want) <= (near[i - 1] if i else 0) + (near[i] if i < len(near) else 0)


def test_frequent_counts_are_exact_until_full_then_low_by_at_most_the_stated_undercount():
    reasons = [f"short edge {i % 7}" for i in range(5000)] + [f"duplicate key 'k{i}'" for i in range(3000)]
    exact = Counter(reasons)
    few = summaries.FrequentCounts(keep=10)
    for r in reasons[:5000]:
        few.add(r)
    assert few.undercount == 0 and few.counts == exact - Counter(reasons[5000:])
    parts = [summaries.FrequentCounts(keep=10) for _ in range(2)]
    for i, r in enumerate(reasons):
        parts[i % 2].add(r)
    merged = parts[0].merge(parts[1])
    assert 0 < merged.undercount <= len(reasons) / 11 and len(merged.counts) <= 20
    top = merged.most_common(7)
    assert set(top) == {f"short edge {i}" for i in range(7)}  # the frequent ones survive
    for reason, count in top.items():
        assert exact[reason] - merged.undercount <= count <= exact[reason]


def test_output_files_are_listed_in_name_order_in_batches(tmp_path, monkeypatch):
    names = [f"{i:05d}.tar" for i in random.Random(0).sample(range(100), 23)]
    for name in names + ["00042.tar.1a2b.tmp", ".hidden.tar", "x.parquet"]:
        (tmp_path / "shards").mkdir(exist_ok=True)
        (tmp_path / "shards" / name).touch()
    monkeypatch.setattr(dataset_reader, "LIST_BATCH", 4)
    listed = list(dataset_reader.output_files(tmp_path, "shards", ".tar"))
    assert listed == [str(tmp_path / "shards" / name) for name in sorted(names)]
    assert list(dataset_reader.output_files(tmp_path, "rejects", ".parquet")) == []  # no folder: none


def test_stats_figures_past_the_exact_range_say_they_are_approximate(tmp_path, monkeypatch):
    """Coverage scores with more distinct values than kept: the median says how far it may be
    off, and is that close to the exact median of the scores written."""
    monkeypatch.setattr(summaries, "MAX_DISTINCT", 8)
    rng = np.random.default_rng(2)
    values = list(rng.random(40))
    result = stats.compute_stats(annotations(("A red car.",) * 40, {i: {"cov_tags": v} for i, v in enumerate(values)}),
                                 [], pos_tagger())
    cov = result["coverage"]["cov_tags"]
    assert cov["median_within"] > 0 and abs(cov["median"] - np.median(values)) <= cov["median_within"]
    assert cov["mean"] == pytest.approx(np.mean(values)) and cov["samples"] == 40
    assert "approximate_within" not in result["histograms"]["chars"]  # one distinct length: exact
