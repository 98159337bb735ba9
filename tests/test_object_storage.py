"""Shards on object storage, read in place: an S3 server (moto's server mode, as s3fs's own tests use)
and an HTTP server that drops connections, stalls and serves truncated bodies, both started here.
A URL run's output equals the local run's over the same bytes; a dropped connection resumes at the
byte already read; a body that never completes is a shard error with its reason."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import encode, jpeg, sample_members, write_tar
from contract import check_output_contract, output_rows
from PIL import Image
from tar_corpus import END, Archive, gz, header, member, pad
from test_bad_inputs import GOOD as GOOD_IMAGES
from test_commit import shard_samples, write_shard
from test_decode import bomb_png
from test_resume import ROOT, command, contents, held_back, make_shards, run_and_kill

import densefusion_local
from engine.core.config import InputConfig
from engine.core.record import ShardEnd
from engine.io import manifest as manifest_module
from engine.io import remote
from engine.io.commit import publish, temp_path
from engine.io.manifest import Manifest, read_manifest
from engine.io.object_output import ObjectPath, OutPath, staging_folder
from engine.io.readers import Selected, ShardReport, read_selected, read_shard, shard_items, shard_name
from engine.io.remote import RemoteShard, as_shard
from engine.io.writers import DatasetWriter

SHARDS = ("web-0", "web-1", "web-2")
OUT_BUCKET = "out-bucket"  # outputs on S3, a prefix per test
BLOCK = 64 << 10  # a small ranged read, so one shard takes several requests and a drop lands mid-shard


def noise(width: int, height: int, seed: int) -> bytes:
    """A JPEG that compresses badly: a shard of a few of them takes several ranged reads."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return encode(Image.fromarray(pixels), "JPEG", quality=90)


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("shards")
    for n, name in enumerate(SHARDS):
        members = []
        for i in range(6):
            members += sample_members(f"{name}-{i}", noise(600 + 40 * i, 480 + 20 * n, seed=10 * n + i),
                                      alt=f"photo {i} of {name}")
        members += sample_members(f"{name}-small", jpeg(40, 30))  # rejected by probe: rejects/ is compared too
        write_tar(folder / f"{name}.tar", members)
    table = pa.table({"key": ["p0", "p1"], "jpg": [jpeg(500, 400), jpeg(20, 20)], "caption": ["a", "b"]})
    pq.write_table(table, folder / "table.parquet")
    return folder


def run(shards: list[str], out: Path, *extra: str) -> int:
    return densefusion_local.main(["run", "--models", "tiny", "--stages", "probe", "decode", "--no-progress",
                                   "--shards", *shards, "--out", str(out), *extra])


def same_rows(out: Path) -> dict[str, tuple[list[dict], list[dict]]]:
    """Each shard's written and rejected rows, without what names where the shard was read from."""
    def strip(rows: list[dict]) -> list[dict]:
        return [{k: v for k, v in row.items() if k not in ("source", "shard_path", "path")} for row in rows]

    return {s: tuple(strip(rows) for rows in output_rows(out, s)) for s in read_manifest(out)}


@pytest.fixture(scope="module")
def local_out(shard_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local") / "out"
    assert run([str(shard_dir / f"{s}.tar") for s in SHARDS] + [str(shard_dir / "table.parquet")], out) == 0
    return out


# --- HTTP --------------------------------------------------------------------------------


class FaultyFiles(BaseHTTPRequestHandler):
    """Serves a folder with ranged GETs; ``faults[name]`` misbehaves on that file's ranged GETs:
    ``("drop", n)``: the n-th ranged GET sends half its body and closes the connection (once);
    ``("stall", n)``: the n-th sends its headers and then nothing for longer than the client waits (once);
    ``("cut", offset)``: every body that would pass ``offset`` stops there and the connection closes."""

    folder: Path
    faults: dict[str, tuple[str, int]] = {}
    log: list[tuple[str, int, str]] = []  # (file, range start, what happened) per ranged GET
    stall_s = 3.0

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        path = self.folder / self.path.lstrip("/")
        if not path.is_file():
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(path.stat().st_size))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()

    def do_GET(self) -> None:
        name = self.path.lstrip("/")
        path = self.folder / name
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        ranged = self.headers.get("Range")
        start, end = 0, len(data)
        if ranged:
            lo, hi = ranged.removeprefix("bytes=").split("-")
            start, end = int(lo), min(int(hi) + 1, len(data))
        body, what = data[start:end], "ok"
        fault, arg = self.faults.get(name, ("", 0)) if ranged else ("", 0)
        nth = sum(1 for f, _, _ in self.log if f == name) + 1
        if fault in ("drop", "stall") and nth == arg:
            what = fault
        elif fault == "cut" and start <= arg < end:
            what = "cut"
        if ranged:
            self.log.append((name, start, what))
        self.send_response(206 if ranged else 200)
        self.send_header("Content-Length", str(len(body)))
        if ranged:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        self.end_headers()
        try:
            if what == "stall":
                time.sleep(self.stall_s)
            elif what in ("drop", "cut"):
                self.wfile.write(body[: (len(body) // 2 if what == "drop" else arg - start)])
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
                return
            self.wfile.write(body)
        except OSError:  # the client went away (a stall it gave up on, a GET it only checked)
            self.close_connection = True


@contextmanager
def serving(folder: Path) -> Iterator[tuple[type[FaultyFiles], str]]:
    """An HTTP server of ``folder`` on a free loopback port: its handler class (faults, log) and base URL."""
    handler = type("Handler", (FaultyFiles,), {"folder": folder, "faults": {}, "log": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield handler, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        thread.join()


@pytest.fixture
def http(shard_dir, monkeypatch):
    monkeypatch.setattr(remote, "BLOCK_BYTES", BLOCK)
    with serving(shard_dir) as served:
        yield served


def test_http_shards_resume_after_drops_and_stalls_and_equal_local(http, shard_dir, local_out, tmp_path):
    handler, base = http
    handler.faults.update({"web-1.tar": ("drop", 2), "web-2.tar": ("stall", 2)})
    out = tmp_path / "out"
    assert run([f"{base}/web-{{0..2}}.tar", f"{base}/table.parquet"], out, "--remote-timeout", "1") == 0

    check_output_contract(out, [shard_dir / f"{s}.tar" for s in SHARDS] + [shard_dir / "table.parquet"])
    assert same_rows(out) == same_rows(local_out)
    assert all(not entry.get("errors") for entry in read_manifest(out).values())
    for name, fault in (("web-1.tar", "drop"), ("web-2.tar", "stall")):
        starts = [(start, what) for file, start, what in handler.log if file == name]
        failed = next(i for i, (_, what) in enumerate(starts) if what == fault)
        assert starts[failed][0] > 0  # the failure came mid-shard; the read that met it re-opened at the
        assert 0 < starts[failed + 1][0] <= starts[failed][0]  # byte it had reached (its own start), not at 0
        assert all(start > 0 for start, _ in starts[failed + 1:])


def test_http_body_that_never_completes_is_a_shard_error(http, shard_dir, local_out, tmp_path):
    handler, base = http
    cut = (shard_dir / "web-1.tar").stat().st_size // 2
    handler.faults["web-1.tar"] = ("cut", cut)
    out = tmp_path / "out"
    assert run([f"{base}/web-{{0..2}}.tar"], out, "--remote-retries", "2") == 0

    manifest = read_manifest(out)
    errors = " ".join(manifest["web-1"]["errors"])  # where the stream broke off, and why
    assert f"{base}/web-1.tar: bytes" in errors and "failed 3 times in a row" in errors and "ContentLengthError" in errors
    assert sum(1 for file, _, what in handler.log if file == "web-1.tar" and what == "cut") == 3
    local = same_rows(local_out)
    got = same_rows(out)
    assert {s: got[s] for s in ("web-0", "web-2")} == {s: local[s] for s in ("web-0", "web-2")}
    check_output_contract(out, [shard_dir / "web-0.tar", shard_dir / "web-2.tar"])
    cut_keys = {r["key"] for rows in got["web-1"] for r in rows}
    assert cut_keys < {r["key"] for rows in local["web-1"] for r in rows}  # what came before the cut, no more


def test_run_over_urls_killed_then_resumed_equals_a_clean_run(tmp_path):
    shards = make_shards(tmp_path / "in")
    clean = tmp_path / "clean"
    subprocess.run(command(shards, clean), cwd=ROOT, check=True, capture_output=True)
    resumed = tmp_path / "resumed"
    with serving(tmp_path / "in") as (handler, base):
        cmd = command([f"{base}/shard-{{00..05}}.tar"], resumed)
        handler.stall_s = 20.0  # the last shard is held back until the run is killed
        handler.faults["shard-05.tar"] = ("stall", 1)
        assert run_and_kill(cmd, resumed, after_shards=len(shards) - 1) == len(shards) - 1
        handler.faults.clear()
        before = len(handler.log)
        final = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert final.returncode == 0, final.stderr
    assert contents(resumed, shards) == contents(clean, shards)
    assert f"{len(shards) - 1} already done" in final.stdout
    assert {file for file, _, _ in handler.log[before:]} == {"shard-05.tar"}  # finished shards are not fetched again


def test_pass2_reads_selected_members_by_ranged_reads(http, shard_dir):
    handler, base = http
    cfg = InputConfig()
    kept = list(read_shard(shard_dir / "web-1.tar", cfg, ShardReport()))[1::3]  # members apart: a read each
    got = list(read_selected(RemoteShard(f"{base}/web-1.tar"), [Selected(s.key, s.source) for s in kept], cfg))
    assert [(s.key, s.image_bytes) for s in got] == [(s.key, s.image_bytes) for s in kept]
    starts = [start for _, start, _ in handler.log]
    assert starts[0] == 0 and starts[1:] == [s.source.offset for s in kept]  # the gzip check, then one range each


def test_a_shard_from_its_text_is_a_url_or_a_path():
    assert as_shard("s3://bucket/laion/00001.tar") == RemoteShard("s3://bucket/laion/00001.tar")
    assert shard_name(as_shard("https://host/a/00001.tar?sig=x")) == "00001"
    assert as_shard("/data/laion/00001.tar") == Path("/data/laion/00001.tar")


def test_a_url_no_filesystem_reads_fails_before_any_work(tmp_path, capsys):
    assert run(["nosuchstore://bucket/00001.tar"], tmp_path / "out") == 2
    assert "no filesystem for nosuchstore://" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_http_glob_and_missing_url_fail_before_any_work(http, tmp_path, capsys):
    _, base = http
    assert run([f"{base}/web-*.tar"], tmp_path / "a") == 2
    assert "cannot be listed" in capsys.readouterr().err
    assert run([f"{base}/web-{{0..3}}.tar"], tmp_path / "b") == 2
    assert f"'{base}/web-3.tar' does not exist" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# --- S3 ----------------------------------------------------------------------------------


@contextmanager
def s3_server() -> Iterator[Any]:
    """moto's S3 server on a free loopback port, with the AWS_* variables pointing at it while the
    block runs (subprocesses and Ray actors get them too); yields an s3fs filesystem on it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    try:
        yield s3fs.S3FileSystem()
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


@pytest.fixture(scope="module")
def s3(shard_dir, tmp_path_factory):
    staging = tmp_path_factory.mktemp("tmpdir")  # the local temporaries of S3 outputs, here and in subprocesses
    saved = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"], tempfile.tempdir = str(staging), str(staging)
    try:
        with s3_server() as fs:
            fs.mkdir("shards-bucket")
            fs.mkdir(OUT_BUCKET)
            for name in [f"{s}.tar" for s in SHARDS] + ["table.parquet"]:
                fs.put_file(str(shard_dir / name), f"shards-bucket/laion/{name}")
            fs.pipe_file("shards-bucket/laion/notes.txt", b"not a shard")
            yield "s3://shards-bucket/laion"
    finally:
        tempfile.tempdir = saved[1]
        if saved[0] is None:
            os.environ.pop("TMPDIR")
        else:
            os.environ["TMPDIR"] = saved[0]


def test_s3_braces_and_globs_equal_local(s3, shard_dir, local_out, tmp_path):
    out = tmp_path / "braces"
    assert run([f"{s3}/web-{{0..2}}.tar", f"{s3}/table.parquet"], out) == 0
    check_output_contract(out, [shard_dir / f"{s}.tar" for s in SHARDS] + [shard_dir / "table.parquet"])
    assert same_rows(out) == same_rows(local_out)
    globbed = tmp_path / "glob"
    assert run([f"{s3}/web-*.tar", f"{s3}/*.parquet"], globbed) == 0
    assert same_rows(globbed) == same_rows(local_out)
    assert read_manifest(globbed)["web-1"]["path"] == f"{s3}/web-1.tar"


def hostile_tars() -> dict[str, bytes]:
    """Damaged and hostile archives (tests/tar_corpus.py's families): read from S3 they must give
    what they give from a disk, member for member, damage for damage."""
    image = noise(64, 48, seed=1)
    plain = Archive().sample("a", image).sample("b", image).sample("c", image).data + END
    bad_header = (Archive().sample("a", image).add(header(b"x.jpg", 700, bad_checksum=True) + pad(bytes(700)))
                  .sample("c", image).data + END)
    lying = Archive().sample("a", image).add(header(b"y.jpg", 10, size_field=b"77777777777\x00")).sample("c", image).data
    names = (member(b"../escape.jpg", image) + member(b"/abs.jpg", image) + member(b"dup.jpg", image)
             + member(b"other.jpg", image) + member(b"dup.jpg", image) + END)
    return {"plain.tar": plain, "bad-header.tar": bad_header, "lying-size.tar": lying, "cut.tar": plain[:-1500],
            "names.tar": names, "zipped.tar.gz": gz(plain), "zipped-cut.tar.gz": gz(plain)[:-40]}


def everything_read(shard) -> list:
    """Each item a shard gives, with where it was read from left out."""
    items = []
    for item in shard_items(shard, InputConfig()):
        if isinstance(item, ShardEnd):
            items.append((item.n_samples, [e.replace(str(shard), "SHARD") for e in item.errors], item.skipped,
                          item.unread_bytes))
        else:
            items.append({**vars(item), "source": (item.source.member, item.source.offset, item.source.size)})
    return items


def test_s3_hostile_tars_read_as_from_disk(s3, tmp_path):
    import s3fs

    fs = s3fs.S3FileSystem()
    for name, data in hostile_tars().items():
        (tmp_path / name).write_bytes(data)
        fs.pipe_file(f"{s3.removeprefix('s3://')}/hostile/{name}", data)
        local = everything_read(tmp_path / name)
        assert local[-1][1] or name in ("plain.tar", "names.tar", "zipped.tar.gz")  # the damage shows
        assert everything_read(RemoteShard(f"{s3}/hostile/{name}")) == local, name


def test_a_store_that_cannot_be_reached_fails_before_any_work(s3, tmp_path, capsys, monkeypatch):
    import s3fs

    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    s3fs.S3FileSystem.clear_instance_cache()  # one made for the live server would answer
    try:
        assert run([f"{s3}/web-{{0..2}}.tar"], tmp_path / "out") == 2
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
    assert "the store cannot be read (EndpointConnectionError" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_s3_misses_fail_before_any_work(s3, shard_dir, tmp_path, capsys):
    assert run([f"{s3}/nothing-*.tar", f"{s3}/web-9.tar"], tmp_path / "a") == 2
    err = capsys.readouterr().err
    assert f"'{s3}/nothing-*.tar' matches no file" in err and f"'{s3}/web-9.tar' does not exist" in err
    assert not (tmp_path / "a").exists()
    assert os.listdir(tmp_path) == []


# --- output on S3 -------------------------------------------------------------------------


def out_url(tmp_path: Path) -> str:
    return f"s3://{OUT_BUCKET}/{tmp_path.name}"


def objects(out: str, *, but: tuple[str, ...] = ()) -> dict[str, bytes]:
    """Every object under ``out`` with its bytes (those under the folders ``but`` left out)."""
    import s3fs

    fs = s3fs.S3FileSystem()
    prefix = out.removeprefix("s3://")
    fs.invalidate_cache()
    return {key.removeprefix(prefix + "/"): fs.cat_file(key) for key in fs.find(prefix)
            if key.removeprefix(prefix + "/").split("/")[0] not in but}


@pytest.fixture(scope="module")
def ten_shards(s3, tmp_path_factory) -> tuple[str, list[Path]]:
    """Ten shards in img2dataset's naming (00000..00009), on disk and on S3."""
    import s3fs

    folder = tmp_path_factory.mktemp("ten")
    paths = []
    for n in range(10):
        members = sample_members(f"{n:05d}-small", jpeg(40, 30))  # a reject in every shard
        for i in range(2):
            members += sample_members(f"{n:05d}{i}", noise(480 + 16 * i, 460, seed=100 * n + i), alt=f"alt {n} {i}")
        paths.append(write_tar(folder / f"{n:05d}.tar", members))
        s3fs.S3FileSystem().put_file(str(paths[-1]), f"shards-bucket/ten/{paths[-1].name}")
    return "s3://shards-bucket/ten", paths


def test_s3_in_and_out_passes_the_output_contract_and_equals_a_local_run(ten_shards, tmp_path, monkeypatch, capsys):
    base, paths = ten_shards
    monkeypatch.setattr(manifest_module, "SEGMENT_LINES", 4)  # ten shards span three manifest segments
    local = tmp_path / "local"
    assert run([str(p) for p in paths], local, "--device", "cpu") == 0
    out = out_url(tmp_path)
    assert run([f"{base}/{{00000..00009}}.tar"], out, "--device", "cpu") == 0

    root = ObjectPath(out)
    check_output_contract(root, paths)
    assert same_rows(root) == same_rows(local)
    stored = objects(out)
    assert sorted(k for k in stored if k.startswith("manifest")) == [f"manifest/{n:08d}.jsonl" for n in range(3)]
    assert not any(k.endswith(".tmp") or "probe" in k for k in stored)
    for path in paths:  # each marker holds the hashes of the objects that stand
        marker = json.loads(stored[f"markers/{path.stem}.json"])
        assert marker["files"] == {label: hashlib.sha256(stored[label]).hexdigest() for label in
                                   (f"shards/{path.stem}.tar", f"shards/{path.stem}.parquet",
                                    f"rejects/{path.stem}.parquet")}
    assert json.loads(stored["metrics.json"])["written"] == 20
    assert not list(staging_folder(root / "shards").iterdir())  # the local temporaries are gone
    capsys.readouterr()

    assert run([f"{base}/{{00000..00009}}.tar"], out, "--device", "cpu") == 0  # a rerun: nothing to do
    assert "all 10 input shards are already committed" in capsys.readouterr().out
    assert objects(out, but=("metrics.json",)) == {k: v for k, v in stored.items() if k != "metrics.json"}

    assert densefusion_local.main(["stats", out]) == 2  # the output tools read a folder: copied down, they do
    assert f"copy it down first (aws s3 sync {out} DIR)" in capsys.readouterr().err
    import s3fs

    copy = tmp_path / "copy"
    s3fs.S3FileSystem().get(out.removeprefix("s3://") + "/", str(copy), recursive=True)
    assert read_manifest(copy) == read_manifest(root)  # the manifest's segments, read from a folder
    assert densefusion_local.main(["stats", str(copy), "--json"]) == 0
    assert json.loads((copy / "stats.json").read_text())["table1"]["samples"] == 20


def test_s3_output_killed_then_resumed_equals_a_clean_run(s3, tmp_path):
    shards = make_shards(tmp_path / "in")
    clean = tmp_path / "clean"
    subprocess.run(command(shards, clean), cwd=ROOT, check=True, capture_output=True)
    out = out_url(tmp_path)
    root, cmd = ObjectPath(out), command(shards, out)
    run_and_kill(cmd, root, after_shards=1)  # right after the first commit
    with held_back(shards[-1]):
        killed = run_and_kill(cmd, root, after_shards=3)  # mid-run: work was left undone
    assert 1 <= killed < len(shards)
    before = objects(out, but=("manifest", "metrics.json"))
    unmarked = sorted(k for k in before if k.startswith("markers/"))[0]
    (root / unmarked).unlink()  # as if the kill came between publishing the files and the marker

    final = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert final.returncode == 0, final.stderr
    published = sum(1 for k in before if k.startswith("rejects/"))  # a shard's last file: all of them are there
    assert f"{published} already done" in final.stdout  # a shard without its marker is completed from its files
    after = objects(out, but=("manifest", "metrics.json"))
    kept = {k: v for k, v in before.items() if k != unmarked}
    assert {k: v for k, v in after.items() if k in kept} == kept  # nothing finished was redone
    completed = json.loads(after[unmarked])
    assert completed["completed_from_files"] and completed["files"] == json.loads(before[unmarked])["files"]
    assert contents(root, shards) == contents(clean, shards)
    assert not list(staging_folder(root / "shards").iterdir())


def test_a_late_writer_on_s3_changes_nothing(s3, tmp_path):
    """The frozen/late writer on S3: its conditional creates fail (412) and what stands stays."""
    root = ObjectPath(out_url(tmp_path))
    zombie = DatasetWriter(root, None, clean=False)
    for sample in shard_samples("s", 4, "zombie"):
        zombie.write(sample)
    redo = DatasetWriter(root, Manifest(root), clean=False)
    redo.attempts["s"] = 2
    write_shard(redo, "s", 4, "redo")
    before = objects(root.url, but=("manifest",))
    zombie.commit(ShardEnd("s", "/in/s.tar", 4))
    assert objects(root.url, but=("manifest",)) == before
    assert zombie.committed["s"] == json.loads(before["markers/s.json"])  # the zombie learns which marker stands
    assert json.loads(before["markers/s.json"])["attempt"] == 2
    assert not list(staging_folder(root / "shards").iterdir())

    late = temp_path(root / "shards" / "s.tar")
    late.write_bytes(b"a late writer's bytes")
    assert publish(late, root / "shards" / "s.tar") == hashlib.sha256(before["shards/s.tar"]).hexdigest()
    assert not late.exists() and objects(root.url, but=("manifest",)) == before


def test_a_multipart_upload_is_a_conditional_create_too(s3, tmp_path, monkeypatch):
    """Above s3fs's part size a publish is a multipart upload; its completion carries the
    condition, and a refused one is aborted (no parts left stored)."""
    import s3fs

    monkeypatch.setattr(s3fs.core, "calculate_chunksize", lambda size, chunksize=None: 5 << 20)
    final = ObjectPath(out_url(tmp_path)) / "shards" / "big.tar"
    first, second = temp_path(final), temp_path(final)
    first.write_bytes(os.urandom(11 << 20))
    second.write_bytes(os.urandom(11 << 20))
    digest = hashlib.sha256(first.read_bytes()).hexdigest()
    assert publish(first, final) == digest
    assert publish(second, final) == digest  # refused: the hash of what stands
    assert hashlib.sha256(final.read_bytes()).hexdigest() == digest
    fs = s3fs.S3FileSystem()
    assert fs.info(str(final))["ETag"].strip('"').endswith("-3")  # three parts: it was a multipart upload
    assert not fs.call_s3("list_multipart_uploads", Bucket=OUT_BUCKET).get("Uploads")
    assert not first.exists() and not second.exists()


def bad_images_tar(folder: Path) -> bytes:
    """tests/test_bad_inputs.py's images: good ones in every odd mode beside broken and hostile ones."""
    members = []
    for key, data in GOOD_IMAGES.items():
        members += sample_members(key, data, ext="png" if data[:4] == b"\x89PNG" else "jpg")
    truncated = jpeg(800, 600, quality=95)
    members += sample_members("bad-zero", b"") + sample_members("bad-truncated", truncated[: len(truncated) // 2])
    members += sample_members("bad-html", b"<!doctype html><p>404</p>")
    members += sample_members("bad-bomb", bomb_png(60_000, 60_000), ext="png")
    members += [("../escape.jpg", jpeg(600, 600)), ("good-hugealt.jpg", jpeg(600, 600)),
                ("good-hugealt.txt", b"\xff\xfe" + b"word " * 200_000), ("good-hugealt.json", b"{not json")]
    return write_tar(folder / "bad-images.tar", members).read_bytes()


def test_s3_output_of_hostile_shards_equals_the_local_output(s3, tmp_path):
    import s3fs

    fs = s3fs.S3FileSystem()
    shards = {**hostile_tars(), "bad-images.tar": bad_images_tar(tmp_path)}
    for name, data in shards.items():
        (tmp_path / name).write_bytes(data)
        fs.pipe_file(f"shards-bucket/hostile-run/{name}", data)
    local = tmp_path / "local"
    assert run([str(tmp_path / name) for name in shards], local) == 0
    out = out_url(tmp_path)
    assert run(["s3://shards-bucket/hostile-run/*.tar*"], out) == 0

    root = ObjectPath(out)
    assert same_rows(root) == same_rows(local)

    def damage(folder: OutPath) -> dict:
        return {s: (e["written"], e["rejected"], len(e["errors"]), e.get("unread_bytes")) for s, e in
                read_manifest(folder).items()}
    assert damage(root) == damage(local)
    assert any(errors for _, _, errors, _ in damage(root).values())
    written, rejected = output_rows(root, "bad-images")
    assert {r["key"] for r in written} == set(GOOD_IMAGES) | {"good-hugealt"} and len(rejected) == 5


def test_two_drivers_never_write_one_manifest_segment(s3, tmp_path, monkeypatch):
    monkeypatch.setattr(manifest_module, "SEGMENT_LINES", 2)
    root = ObjectPath(out_url(tmp_path))
    first, late = Manifest(root), Manifest(root)
    first.record({"a": {"written": 1}})
    late.record({"b": {"written": 2}})  # segment 0 is taken: its create fails, it writes segment 1
    first.record({"c": {"written": 3}, "d": {"written": 4}})  # fills segment 0, then opens segment 2
    assert sorted(objects(root.url)) == [f"manifest/{n:08d}.jsonl" for n in range(3)]
    assert list(Manifest(root).entries()) == [(s, {"written": n}) for s, n in (("a", 1), ("c", 3), ("b", 2), ("d", 4))]


def test_output_stores_that_cannot_hold_exactly_once_fail_before_any_work(s3, shard_dir, tmp_path, capsys,
                                                                           monkeypatch):
    import s3fs

    shard = str(shard_dir / "web-0.tar")
    assert run([shard], "http://127.0.0.1:9/out") == 2
    assert "http:// cannot hold an output" in capsys.readouterr().err
    assert run([shard], "s3://no-such-bucket/out") == 2
    assert "the store cannot be written (" in capsys.readouterr().err
    assert densefusion_local.main(["curate", "--models", "tiny", "--shards", shard, "--out", out_url(tmp_path)]) == 2
    assert "curation (curate, run --curate) keeps its embedding store in a folder" in capsys.readouterr().err

    create = s3fs.S3FileSystem._pipe_file

    async def ignoring_the_condition(self, path, data, mode="overwrite", **kwargs):  # an S3 look-alike without it
        return await create(self, path, data, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_pipe_file", ignoring_the_condition)
    s3fs.S3FileSystem.clear_instance_cache()  # the instances bind their methods when made
    try:
        assert run([shard], out_url(tmp_path)) == 2
    finally:
        monkeypatch.undo()
        s3fs.S3FileSystem.clear_instance_cache()
    assert "does not refuse a second create of one key" in capsys.readouterr().err
    assert objects(out_url(tmp_path)) == {}  # the probe was removed; nothing else was written
    assert os.listdir(tmp_path) == []


def test_the_caption_api_journal_of_an_output_on_object_storage_is_kept_under_the_cache_dir(tmp_path):
    from engine.core.config import ApiConfig, CaptionConfig, SglangConfig
    from engine.stages.caption import backend_settings

    def journal(out: str) -> Path:
        return Path(backend_settings("openai", CaptionConfig(), ApiConfig(), SglangConfig(), out, str(tmp_path)).journal)

    assert journal("s3://bucket/run").is_relative_to(tmp_path / "object-outputs")
    assert journal("s3://bucket/run").parent != journal("s3://other/run").parent  # one journal per output
    assert journal(str(tmp_path / "out")).is_relative_to(tmp_path / "out")


@pytest.mark.parametrize("command", ["stats", "report", "export", "status"])
@pytest.mark.parametrize("url, copy", [("s3://bucket/run", "aws s3 sync"), ("gs://bucket/run", "gcloud storage rsync -r")])
def test_the_tools_that_read_an_output_folder_refuse_a_url_with_the_copy_down_command(command, url, copy, capsys):
    args = ["export", "jsonl", url, "--to", "unused"] if command == "export" else [command, url]
    assert densefusion_local.main(args) == 2
    assert f"copy it down first ({copy} {url} DIR)" in capsys.readouterr().err
