"""Names with dots: each sample ends exactly once in shards/ or rejects/, and every written key
is read back exactly by our readers (stats, exports, ``iter_samples``), webdataset and
Hugging Face ``datasets``, which all cut a member name at the first dot of its last part."""

from __future__ import annotations

import json

import pytest
from conftest import jpeg, sample_members, write_tar
from hypothesis import given, settings
from hypothesis import strategies as st
from output_fixture import fixture_samples, write_fixture_output

import densefusion_local
from engine.io.keys import split_member_name, usable_key
from engine.output.dataset_reader import iter_rejects, iter_samples
from engine.output.export import export
from engine.output.stats import output_stats


@pytest.mark.parametrize("whole, key", [("x.y", "x\\x2ey"), ("a/b.c/d", "a/b.c/d"), ("a.b/c.d.e", "a.b/c\\x2ed\\x2ee"),
                                        ("plain", "plain"), (".hidden", "\\x2ehidden")])
def test_a_whole_key_splits_back_from_its_member_names(whole, key):
    assert usable_key(whole) == (key, "")
    for ext in ("jpg", "json"):
        assert split_member_name(f"{key}.{ext}") == (key, ext)


def test_escaped_dots_never_merge_keys():
    names = ["x.y", "x\\x2ey", "x_y", "xy", "x..y", "x.y/", "x.y.", "x\\.y"]
    keys = [usable_key(name)[0] for name in names]
    assert len(set(keys)) == len(names)
    # a literal backslash is still rejected; a name with nothing before the extension too
    assert [bool(usable_key(name)[1]) for name in names] == [False, True, False, False, False, True, False, True]


def test_tar_member_with_two_dots_is_webdatasets_field_of_the_shorter_key(tmp_path):
    """``a.b.jpg`` is field ``b.jpg`` of key ``a`` (webdataset's rule): no image, rejected with
    a reason that says why, never silently dropped."""
    write_tar(tmp_path / "t.tar", [("a.b.jpg", jpeg(500, 500))])
    out = tmp_path / "out"
    assert densefusion_local.main(["run", "--shards", str(tmp_path / "t.tar"), "--out", str(out),
                                   "--no-progress", "--stages", "decode"]) == 0
    (reject,) = iter_rejects(out)
    assert reject["key"] == "a" and "b.jpg" in reject["reason"] and "first dot" in reject["reason"]
    assert list(iter_samples(out)) == []


@settings(max_examples=300, deadline=None)
@given(names=st.lists(st.text(alphabet="ab./\\x2e", max_size=8), min_size=2, max_size=12))
def test_whole_keys_stay_injective_and_split_back(names):
    owner: dict[str, str] = {}
    for name in names:
        key, problem = usable_key(name)
        assert owner.setdefault(key, name) == name, f"{name!r} and {owner[key]!r} share {key!r}"
        if not problem:
            assert split_member_name(f"{key}.jpg") == (key, "jpg")


@pytest.fixture(scope="module")
def dotted_out(tmp_path_factory):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path_factory.mktemp("dotted")
    folder = d / "folder"
    (folder / "a" / "b.c").mkdir(parents=True)
    (folder / "x.y.jpg").write_bytes(jpeg(500, 500, (10, 20, 30)))
    (folder / "x.y.txt").write_text("dotted alt")
    (folder / "a" / "b.c" / "d.jpg").write_bytes(jpeg(500, 500, (90, 20, 30)))
    (folder / "plain.jpg").write_bytes(jpeg(500, 500, (200, 20, 30)))
    pq.write_table(pa.table({"key": ["v1.2", "p"], "jpg": [jpeg(500, 500), jpeg(500, 500, (0, 90, 0))]}),
                   d / "pq.parquet")
    write_tar(d / "t.tar", [("a.b.jpg", jpeg(500, 500)), *sample_members("k", jpeg(500, 500)),
                            ("d.x/k2.jpg", jpeg(500, 500))])
    out = d / "out"
    assert densefusion_local.main(["run", "--shards", str(folder), str(d / "pq.parquet"), str(d / "t.tar"),
                                   "--out", str(out), "--no-progress", "--stages", "decode"]) == 0
    return out


INPUT_KEYS = {"folder": {"x\\x2ey", "a/b.c/d", "plain"}, "pq": {"v1\\x2e2", "p"}, "t": {"a", "k", "d.x/k2"}}


def test_each_dotted_name_ends_once_in_shards_or_rejects(dotted_out):
    import pyarrow.parquet as pq

    for shard, keys in INPUT_KEYS.items():
        written = pq.read_table(dotted_out / "shards" / f"{shard}.parquet").column("key").to_pylist()
        rejected = [r["key"] for r in iter_rejects(dotted_out) if r["shard"] == shard]
        assert sorted(written + rejected) == sorted(keys)
    assert [r["key"] for r in iter_rejects(dotted_out)] == ["a"]  # tar a.b.jpg: no image member


def test_every_written_key_is_found_by_our_readers(dotted_out):
    import pyarrow.parquet as pq

    written = {k for path in dotted_out.glob("shards/*.parquet") for k in pq.read_table(path).column("key").to_pylist()}
    samples = {s.key: s for s in iter_samples(dotted_out, with_images=True)}
    assert set(samples) == written == (set().union(*INPUT_KEYS.values()) - {"a"})
    assert samples["x\\x2ey"].annotations["alt_text"] == "dotted alt"
    assert all(s.image_name == f"{key}.jpg" and s.image_bytes for key, s in samples.items())
    assert output_stats(dotted_out)["table1"]["samples"] == len(written)


def test_the_output_tars_load_in_webdataset_and_datasets_with_the_same_keys(dotted_out, monkeypatch, tmp_path):
    import webdataset as wds

    tars = sorted(str(p) for p in dotted_out.glob("shards/*.tar"))
    ours = [s.key for s in iter_samples(dotted_out)]
    rows = list(wds.WebDataset(tars, shardshuffle=False))
    assert [row["__key__"] for row in rows] == ours
    assert all(json.loads(row["json"])["key"] == row["__key__"] and row["jpg"] for row in rows)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    from datasets import load_dataset

    ds = load_dataset("webdataset", data_files={"train": tars}, split="train", cache_dir=str(tmp_path / "hf"))
    assert ds["__key__"] == ours
    assert [row["json"]["key"] for row in ds] == ours


def test_exports_name_dotted_keys_by_their_written_key(tmp_path):
    samples = fixture_samples()
    for sample, whole in zip(samples, ("x.y", "a/b.c/d")):
        sample.key = usable_key(whole)[0]
    out = write_fixture_output(tmp_path / "out", samples)
    exported = export("jsonl", out, tmp_path / "jsonl")
    rows = [json.loads(line) for line in exported.path.read_text().splitlines()]
    assert sorted(row["image_id"] for row in rows) == ["00000/a/b.c/d", "00000/x\\x2ey"]
    assert (tmp_path / "jsonl" / "images" / "00000" / "x\\x2ey.jpg").is_file()
    assert (tmp_path / "jsonl" / "images" / "00000" / "a" / "b.c" / "d.jpg").is_file()
