"""Pass 1 from the CLI on the demo shards with the tiny embedder: end to end, SIGKILL and resume,
and ``run --curate`` feeding only the selected samples to pass 2."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr

import densefusion_local
from engine.core import config as config_module
from engine.curate.pass2_source import selected_source
from engine.io.demo_data import write_demo_shards
from engine.io.manifest import Manifest, read_manifest

ROOT = Path(__file__).resolve().parents[1]
EPS = 0.02  # the random tiny model maps every image close together; a small eps keeps some


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_demo_shards(tmp_path_factory.mktemp("input"), n_shards=4)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def clean(shards, cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean")
    assert densefusion_local.main(curate_args(shards, out, cache)) == 0
    return out


def curate_args(shards, out, cache, top_n=2):
    return ["curate", "--shards", *map(str, shards), "--out", str(out), "--models", "tiny",
            "--cache-dir", str(cache), "--no-progress", "--embed-batch", "1", "--device", "cpu",
            "--curate-clusters", "3", "--curate-eps", str(EPS), "--curate-top-n", str(top_n)]


def read_outputs(out: Path):
    curate = out / "curate"
    return (pq.read_table(curate / "index.parquet").to_pylist(),
            zarr.open_array(curate / "embeddings.zarr")[:],
            pq.read_table(curate / "selection.parquet").to_pylist(),
            json.loads((curate / "report.json").read_text()))


def test_curate_end_to_end_respects_top_n_and_eps(clean):
    index, vectors, selection, report = read_outputs(clean)
    assert len(index) == len(selection) == report["n_embedded"] == len(vectors) > 0
    norms = np.linalg.norm(vectors.astype(np.float32), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=2e-3)
    x = vectors.astype(np.float32)
    kept = [r for r in selection if r["kept"]]
    assert report["n_selected"] == len(kept) > 0
    n_dups = sum(r["reason"].startswith("duplicate of ") for r in selection)
    assert report["n_after_dedup"] == report["n_embedded"] - n_dups >= report["n_selected"]
    assert report["n_in"] == report["n_after_resolution_filter"] + report["rejected_by_stage"]["probe"]
    assert report["n_in"] == len(index) + sum(report["rejected_by_stage"].values())
    assert sum(h["clusters"] for h in report["cluster_size_histogram"]) == 3
    assert report["keep"] == "hard"
    similarity = [1 - r["distance"] for r in selection]
    assert report["kmeans_objective"] == pytest.approx(np.mean(similarity), abs=1e-5)
    assert 1 <= report["kmeans_iterations"] <= 20
    for c in {r["cluster"] for r in selection}:
        members = sorted((r for r in selection if r["cluster"] == c), key=lambda r: r["rank"])
        assert [r["rank"] for r in members] == list(range(len(members)))  # rank: closest first
        assert sum(r["kept"] for r in members) <= 2  # top N
        members = members[::-1]  # SemDeDup's default keep order: farthest first
        rows = [selection.index(r) for r in members]
        survivors = []
        for pos, r in enumerate(members):
            earlier = x[rows[:pos]] @ x[rows[pos]]
            is_dup = bool(pos) and earlier.max() > 1 - EPS + 2e-3  # float16 storage margin
            if is_dup:
                assert r["reason"].startswith("duplicate of ") and not r["kept"]
            if not r["reason"].startswith("duplicate of "):
                assert pos == 0 or earlier.max() <= 1 - EPS + 2e-3
                survivors.append(r)
        survivors = survivors[::-1]  # the top N are the survivors closest to the centroid
        assert [r["kept"] for r in survivors] == [i < 2 for i in range(len(survivors))]
        assert all(r["reason"] == f"beyond top 2 of cluster {c}" for r in survivors[2:])
    first = index[0]
    with open(first["path"], "rb") as handle:  # the index locates the image bytes in the tar
        handle.seek(first["offset"])
        assert handle.read(first["size"])[:2] in (b"\xff\xd8", b"\x89P")


def test_curate_resumes_after_sigkill(shards, cache, clean, tmp_path):
    killed = tmp_path / "killed"
    cmd = [sys.executable, str(ROOT / "densefusion_local.py"), *curate_args(shards, killed, cache)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if Manifest(killed / "curate").finished:
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_at_kill = len(Manifest(killed / "curate").finished)
    assert 0 < done_at_kill < len(shards), "the kill must land between shards to test a resume"
    assert not (killed / "curate" / "selection.parquet").exists()
    assert densefusion_local.main(curate_args(shards, killed, cache)) == 0
    a, b = read_outputs(clean), read_outputs(killed)
    assert a[0] == b[0]
    np.testing.assert_array_equal(a[1], b[1])
    assert a[2] == b[2]


def test_run_curate_captions_only_the_selection(shards, cache, tmp_path):
    out = tmp_path / "run"
    args = curate_args(shards, out, cache)
    args[0] = "run"
    assert densefusion_local.main([*args, "--curate", "--stages", "probe", "decode"]) == 0
    selection = pq.read_table(out / "curate" / "selection.parquet").to_pylist()
    written = [k for p in sorted((out / "shards").glob("*.parquet")) for k in pq.read_table(p).column("key").to_pylist()]
    rejects = [r for p in sorted((out / "rejects").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    assert sorted(written) == sorted(r["key"] for r in selection if r["kept"])
    # pass 2's samples carry pass 1's embedding (for CLIP zero-shot tagging without re-embedding)
    vectors = zarr.open_array(out / "curate" / "embeddings.zarr")[:]
    picked = [(row, r) for row, r in enumerate(selection) if r["kept"]]
    source = selected_source(config_module.build(None, None, input={"shards": tuple(map(str, shards))},
                                                 runtime={"out": str(out)}))
    seen = {s.key: s.embedding for s in source(set()) if hasattr(s, "key") and s.alive}
    for row, r in picked:
        np.testing.assert_allclose(seen[r["key"]], vectors[row].astype(np.float32))
    by_key = {(r["shard"], r["key"]): r for r in rejects}
    for r in selection:
        if not r["kept"]:
            assert by_key[(r["shard"], r["key"])]["reason"] == r["reason"]
            assert by_key[(r["shard"], r["key"])]["stage"] == "curate"
    # every input sample ends in exactly one place
    assert sum(s["samples"] for s in read_manifest(out).values()) == len(written) + len(rejects)
    assert len(set(map(tuple, ((r["shard"], r["key"]) for r in rejects)))) == len(rejects)


@pytest.mark.parametrize("flags, message", [
    (["--curate-eps", "1.5"], "--curate-eps"),
    (["--embed-model", "/no/such/folder"], "embedding model"),
    (["--embed-model", "EVA02-L-14", "--embed-weights", ""], "--embed-weights"),
])
def test_curate_misconfiguration_fails_before_work(shards, tmp_path, capsys, flags, message):
    out = tmp_path / "bad"
    args = ["curate", "--shards", str(shards[0]), "--out", str(out), "--no-progress", *flags]
    assert densefusion_local.main(args) == 2
    assert message in capsys.readouterr().err
    assert not Manifest(out / "curate").path.exists()


def test_resuming_with_another_embedding_model_is_refused(shards, clean, capsys):
    args = ["curate", "--shards", str(shards[0]), "--out", str(clean), "--no-progress",
            "--embed-model", "EVA02-L-14", "--embed-weights", "random"]
    assert densefusion_local.main(args) == 2
    assert "holds embeddings of tiny" in capsys.readouterr().err
