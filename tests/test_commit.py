"""The exactly-once commit: no-replace publishing, done markers, and markers completed from files."""

import json
import subprocess

import numpy as np
import pyarrow.parquet as pq
from conftest import jpeg, sample_members, write_tar
from test_resume import ROOT, command
from test_store import samples as embedded_samples

from engine.core.record import Sample, ShardEnd, Source
from engine.curate.store import EmbeddingStore
from engine.io.commit import file_sha256, publish, temp_path
from engine.io.manifest import MANIFEST, Manifest, read_manifest
from engine.io.writers import DatasetWriter


def test_publish_keeps_the_first_file_and_removes_every_temporary(tmp_path):
    final = tmp_path / "a.bin"
    first, second = temp_path(final), temp_path(final)
    assert first != second  # two writers of one file never share a temporary
    first.write_bytes(b"first")
    second.write_bytes(b"second, longer")
    assert publish(first, final) == file_sha256(final)
    assert publish(second, final) == file_sha256(final)  # EEXIST: the hash of what stands
    assert final.read_bytes() == b"first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]


def shard_samples(shard: str, n: int, tag: str) -> list[Sample]:
    out = []
    for i in range(n):
        sample = Sample(f"{shard}-{i}", Source(shard, f"/in/{shard}.tar", f"{i}.jpg"), alt_text=f"{tag} {i}",
                        width=640, height=480, image_bytes=b"img" + bytes([i]))
        if i == 1:
            sample.filter("probe", "too small")
        out.append(sample)
    return out


def write_shard(writer: DatasetWriter, shard: str, n: int, tag: str) -> None:
    for sample in shard_samples(shard, n, tag):
        writer.write(sample)
    writer.commit(ShardEnd(shard, f"/in/{shard}.tar", n))


def snapshot(out):
    """Every published file (temporaries of writers still at work left out)."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()
            and p.name != MANIFEST and p.suffix != ".tmp"}


def test_a_late_writer_of_a_finished_shard_changes_nothing(tmp_path):
    """The zombie case in one process: attempt 1 opens the shard first, attempt 2 redoes and
    commits it, then attempt 1 wakes up and commits its (different) version."""
    zombie = DatasetWriter(tmp_path, None, clean=False)
    for sample in shard_samples("s", 4, "zombie"):
        zombie.write(sample)
    redo = DatasetWriter(tmp_path, Manifest(tmp_path), clean=False)
    redo.attempts["s"] = 2
    write_shard(redo, "s", 4, "redo")
    before = snapshot(tmp_path)
    zombie.commit(ShardEnd("s", "/in/s.tar", 4))
    assert snapshot(tmp_path) == before
    assert not list(tmp_path.rglob("*.tmp"))
    marker = json.loads((tmp_path / "markers" / "s.json").read_text())
    assert marker["attempt"] == 2 and marker["written"] == 3 and marker["rejected"] == 1
    assert zombie.committed["s"] == marker  # the zombie learns which marker stands
    assert marker["files"] == {label: file_sha256(tmp_path / label) for label in
                               ("shards/s.tar", "shards/s.parquet", "rejects/s.parquet")}
    assert pq.read_table(tmp_path / "shards" / "s.parquet").column("alt_text").to_pylist() == \
        ["redo 0", "redo 2", "redo 3"]


def test_marker_is_completed_from_published_files_without_rewriting_them(tmp_path):
    writer = DatasetWriter(tmp_path, Manifest(tmp_path))
    write_shard(writer, "s", 3, "x")
    write_shard(writer, "t", 2, "x")
    original = json.loads((tmp_path / "markers" / "s.json").read_text())
    # killed between publishing and marking: files there, no marker, no manifest entry
    (tmp_path / "markers" / "s.json").unlink()
    Manifest(tmp_path).path.unlink()
    inodes = {p: p.stat().st_ino for p in writer.files("s")}

    rerun = DatasetWriter(tmp_path, Manifest(tmp_path))
    rerun.settle(["s", "t", "never-started"])
    assert rerun.manifest.finished == {"s", "t"}
    completed = json.loads((tmp_path / "markers" / "s.json").read_text())
    assert completed["completed_from_files"] is True
    for name in ("files", "written", "rejected", "samples", "path", "errors", "attempt", "node"):
        assert completed[name] == original[name], name
    assert {p: p.stat().st_ino for p in writer.files("s")} == inodes


def test_cli_rerun_after_a_crash_between_publish_and_marker_redoes_nothing(tmp_path):
    shards = [write_tar(tmp_path / f"in-{i}.tar", sample_members(f"k{i}", jpeg(500, 500), "alt")) for i in range(2)]
    out = tmp_path / "out"
    subprocess.run(command(shards, out), cwd=ROOT, check=True, capture_output=True)
    (out / "markers" / "in-0.json").unlink()
    manifest = Manifest(out).path  # the driver killed before it recorded in-0
    manifest.write_text("".join(line for line in manifest.read_text().splitlines(keepends=True)
                                if json.loads(line).get("shard") != "in-0"))
    stamps = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / "shards").iterdir()}

    again = subprocess.run(command(shards, out), cwd=ROOT, check=True, capture_output=True, text=True)
    assert "0 committed this run, 2 already done" in again.stdout
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / "shards").iterdir()} == stamps
    assert read_manifest(out)["in-0"]["written"] == 1


def test_worker_stores_publish_parts_and_the_driver_adopts_each_shard_once(tmp_path):
    a, b = embedded_samples("a", 5, seed=1), embedded_samples("b", 3, seed=2)
    first = EmbeddingStore(tmp_path, adopt=False)
    for s in a:
        first.write(s)
    first.commit(ShardEnd("a", "/in/a.tar", 5))
    late = EmbeddingStore(tmp_path, adopt=False)  # a zombie's second version of shard a
    for s in embedded_samples("a", 5, seed=9):
        late.write(s)
    late.commit(ShardEnd("a", "/in/a.tar", 5))
    for s in b:
        first.write(s)
    first.commit(ShardEnd("b", "/in/b.tar", 3))
    assert not (tmp_path / "embeddings.zarr").exists()  # workers never touch the shared array

    driver = EmbeddingStore(tmp_path)
    driver.settle(["a", "b"])
    driver.settle(["a", "b"])  # idempotent: nothing adopted twice
    assert driver.finished == {"a", "b"} and driver.rows == 8
    index = driver.consolidate().to_pylist()
    assert [r["row"] for r in index] == list(range(8))
    rows = driver.embeddings()[0:8].astype(np.float32)
    by_key = {s.key: s.embedding for s in a + b}
    np.testing.assert_allclose(rows, np.stack([by_key[r["key"]] for r in index]), atol=1e-3)


def test_store_marker_is_completed_from_parts(tmp_path):
    writer = EmbeddingStore(tmp_path, adopt=False)
    for s in embedded_samples("a", 4, seed=1):
        writer.write(s)
    writer.commit(ShardEnd("a", "/in/a.tar", 4))
    original = json.loads((tmp_path / "markers" / "a.json").read_text())
    (tmp_path / "markers" / "a.json").unlink()
    stale = temp_path(tmp_path / "index.parts" / "b.parquet")  # a killed writer's half-written part
    stale.write_bytes(b"half")
    driver = EmbeddingStore(tmp_path)
    driver.settle(["a", "b"])
    assert driver.finished == {"a"} and driver.rows == 4 and not stale.exists()
    assert json.loads((tmp_path / "markers" / "a.json").read_text())["files"] == original["files"]
