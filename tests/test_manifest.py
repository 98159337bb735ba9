"""The manifest (engine/io/manifest.py): a line appended per finished shard, a torn last line
left by a kill skipped and cut off, an older output's manifest.json read and converted."""

import json

from engine.io.manifest import LEGACY_MANIFEST, SEGMENTS, Manifest, read_manifest


def test_shards_are_appended_and_read_back_in_commit_order(tmp_path):
    manifest = Manifest(tmp_path)
    manifest.record({"b": {"written": 2}})
    before = manifest.path.read_bytes()
    manifest.record({"a": {"written": 1, "errors": ["cut"]}})
    assert manifest.path.read_bytes().startswith(before)  # appended, never rewritten
    assert list(Manifest(tmp_path).entries()) == [("b", {"written": 2}), ("a", {"written": 1, "errors": ["cut"]})]
    assert Manifest(tmp_path).finished == {"a", "b"}


def test_a_property_is_recorded_once_and_kept_apart_from_the_shards(tmp_path):
    assert Manifest(tmp_path).setdefault("embed_model", "x") == "x"
    Manifest(tmp_path).record({"s": {"rows": 3}})
    reopened = Manifest(tmp_path)
    assert reopened.setdefault("embed_model", "y") == "x"
    assert reopened.properties == {"embed_model": "x"} and read_manifest(tmp_path) == {"s": {"rows": 3}}


def test_a_line_torn_by_a_kill_is_skipped_then_cut_off_by_the_next_append(tmp_path):
    Manifest(tmp_path).record({"a": {"written": 1}})
    with open(Manifest(tmp_path).path, "a") as handle:
        handle.write('{"shard": "b", "writ')  # the driver died mid-append
    assert read_manifest(tmp_path) == {"a": {"written": 1}}
    Manifest(tmp_path).record({"b": {"written": 2}})  # what settle does from b's marker
    assert read_manifest(tmp_path) == {"a": {"written": 1}, "b": {"written": 2}}
    assert all(json.loads(line) for line in Manifest(tmp_path).path.read_text().splitlines())


def test_an_older_outputs_manifest_json_is_read_and_converted_at_the_first_append(tmp_path):
    (tmp_path / LEGACY_MANIFEST).write_text(json.dumps(
        {"version": 1, "embed_model": "m", "shards": {"a": {"written": 1}}}, indent=2))
    old = Manifest(tmp_path)
    assert old.finished == {"a"} and old.properties == {"embed_model": "m"}
    old.record({"b": {"written": 2}})
    assert not (tmp_path / LEGACY_MANIFEST).exists()
    assert read_manifest(tmp_path) == {"a": {"written": 1}, "b": {"written": 2}}
    assert Manifest(tmp_path).properties == {"embed_model": "m"}


def test_an_output_copied_down_from_object_storage_reads_its_segments_and_converts_them(tmp_path):
    (tmp_path / SEGMENTS).mkdir()
    (tmp_path / SEGMENTS / "00000000.jsonl").write_text('{"shard": "a", "written": 1}\n{"embed_model": "x"}\n')
    (tmp_path / SEGMENTS / "00000001.jsonl").write_text('{"shard": "b", "written": 2}\n')
    assert read_manifest(tmp_path) == {"a": {"written": 1}, "b": {"written": 2}}
    Manifest(tmp_path).record({"c": {"written": 3}})
    assert list(Manifest(tmp_path).entries()) == [("a", {"written": 1}), ("b", {"written": 2}), ("c", {"written": 3})]
    assert Manifest(tmp_path).properties == {"embed_model": "x"}
    assert list((tmp_path / SEGMENTS).iterdir()) == []
