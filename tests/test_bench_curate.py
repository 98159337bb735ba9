"""``python -m bench curate`` at a toy size: it creates its --workdir and compares in words."""

import re

from bench.curate import main, times


def test_times_says_faster_or_slower():
    assert times(reference=3.0, ours=2.0) == "1.50x faster"
    assert times(reference=2.0, ours=5.0) == "2.50x slower"


def test_bench_curate_creates_its_workdir_and_prints_both_objectives(tmp_path, capsys):
    workdir = tmp_path / "not" / "yet"
    assert main(["--n", "3000", "--dim", "32", "--k", "6", "--niter", "4", "--points-per-centroid", "64",
                 "--workdir", str(workdir)]) == 0
    assert workdir.is_dir() and not any(workdir.iterdir())  # the temporary data is gone
    out = capsys.readouterr().out
    objectives = re.findall(r"objective \(mean cos to centroid\) ([0-9.]+)", out)
    assert len(objectives) == 2 and all(0.0 < float(o) <= 1.0 for o in objectives)
    assert re.search(r"ours is [0-9.]+x (faster|slower) in total", out)


def test_bench_curate_partitioned_measures_every_task_and_prints_the_extrapolation(tmp_path, capsys):
    assert main(["--partitioned", "--n", "1500", "--dim", "32", "--k", "3", "--niter", "3", "--points-per-centroid", "64",
                 "--workers", "1", "--probe-rows", "128", "--to-n", "1000000", "--to-k", "100",
                 "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    tasks = re.findall(r"^  (assign_range|select_partition) .* peak RSS ([0-9.]+) GB$", out, re.M)
    assert [t for t, _ in tasks].count("select_partition") == 3 and all(float(gb) > 0 for _, gb in tasks)
    assert "EXTRAPOLATED" in out and "1,000,000 x 32 into 100 clusters on 1,000 workers" in out
    for stage in ("fit (driver)", "assign (workers)", "dedup+select (workers)", "gather (driver)"):
        assert re.search(rf"^  {re.escape(stage)}: +[0-9.]+ h ", out, re.M), stage
