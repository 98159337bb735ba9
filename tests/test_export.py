import glob
import json
from pathlib import Path

import pytest
from conftest import jpeg
from output_fixture import CAPTIONS, fixture_samples, write_fixture_output

import densefusion_local
from engine.io.manifest import read_manifest
from engine.output.dataset_reader import iter_samples
from engine.output.export import export, export_id, main, validate_llava


@pytest.fixture(scope="module")
def fixture_out(tmp_path_factory) -> Path:
    return write_fixture_output(tmp_path_factory.mktemp("fixture") / "out")


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "out"
    assert densefusion_local.main(["demo", "--out", str(out), "--no-progress"]) == 0
    return out


def test_llava_export_matches_the_schema_and_images_exist(fixture_out, tmp_path):
    result = export("llava", fixture_out, tmp_path / "llava", instruction="Describe it.")
    path, count = result.path, result.records
    records = json.loads(path.read_text())
    assert count == len(records) == 2  # s2 has no caption, "bad" was rejected
    assert validate_llava(path) == []
    first = records[0]
    assert first == {"id": "00000/s0", "image": "images/00000/s0.jpg", "conversations": [
        {"from": "human", "value": "<image>\nDescribe it."}, {"from": "gpt", "value": CAPTIONS["s0"]}]}
    original = next(s for s in iter_samples(fixture_out, with_images=True) if s.key == "s0")
    assert (path.parent / first["image"]).read_bytes() == original.image_bytes


def test_llava_validator_catches_missing_images_and_bad_turns(fixture_out, tmp_path):
    path = export("llava", fixture_out, tmp_path / "llava").path
    records = json.loads(path.read_text())
    (path.parent / records[0]["image"]).unlink()
    records[1]["conversations"].reverse()
    path.write_text(json.dumps(records))
    problems = validate_llava(path)
    assert len(problems) == 2
    assert "does not exist" in problems[0] and "one human turn" in problems[1]


def test_jsonl_export_has_the_released_fields(fixture_out, tmp_path):
    assert main(["jsonl", str(fixture_out), "--to", str(tmp_path / "j")]) == 0
    lines = [json.loads(x) for x in (tmp_path / "j" / "densefusion.jsonl").read_text().splitlines()]
    assert [set(x) for x in lines] == [{"image_id", "url", "image_path", "caption"}] * 2
    assert lines[0]["url"] == "https://example.com/s0.jpg" and lines[1]["url"] is None
    assert all((tmp_path / "j" / x["image_path"]).is_file() for x in lines)
    assert lines[1]["caption"] == CAPTIONS["s1"]


def test_rerunning_an_export_gives_the_same_files(fixture_out, tmp_path):
    first = export("jsonl", fixture_out, tmp_path).path
    before = first.read_bytes()
    again = export("jsonl", fixture_out, tmp_path)
    assert again.path.read_bytes() == before and again.records == 2
    assert not list(tmp_path.rglob("*.tmp"))


def test_demo_output_loads_with_webdataset(demo_out):
    import webdataset as wds

    tars = sorted(glob.glob(str(demo_out / "shards" / "*.tar")))
    rows = list(wds.WebDataset(tars, shardshuffle=False))
    written = sum(s["written"] for s in read_manifest(demo_out).values())
    assert len(rows) == written > 0
    for row in rows:
        annotations = json.loads(row["json"])
        assert annotations["key"] == row["__key__"]
        assert row.get("jpg") or row.get("png")  # the original image bytes


def _hf(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    from datasets import load_dataset

    return load_dataset


def test_demo_output_loads_with_datasets_parquet(demo_out, monkeypatch, tmp_path):
    load_dataset = _hf(monkeypatch, tmp_path)
    files = sorted(glob.glob(str(demo_out / "shards" / "*.parquet")))
    ds = load_dataset("parquet", data_files={"train": files}, split="train")
    keys = [s.key for s in iter_samples(demo_out)]
    assert ds["key"] == keys
    assert ds[0]["meta"]["url"].startswith("https://example.com/demo/")
    demo = {s.key: s.annotations["meta"] for s in iter_samples(demo_out)}
    assert all(r["meta"]["original_width"] == demo[r["key"]]["original_width"] > 0 for r in ds)


def test_meta_and_scores_are_columns_to_filter_on(tmp_path, monkeypatch):
    samples = fixture_samples()
    # source metadata is whatever the input held: odd types keep their value under "other"
    samples[1].meta = {"url": "https://example.com/s1.png", "width": "640", "original_width": 2**70,
                       "exif": {"Make": "Canon"}, "license": "CC-BY", "status": "success"}
    samples[1].scores["cov_tags"] = 0.5
    out = write_fixture_output(tmp_path / "out", samples)
    files = [str(out / "shards" / "00000.parquet")]
    load_dataset = _hf(monkeypatch, tmp_path)
    ds = load_dataset("parquet", data_files={"train": files}, split="train")
    assert ds.filter(lambda r: (r["scores"]["category:photo"] or 0) > 0.5)["key"] == ["s0"]
    assert ds.filter(lambda r: r["meta"]["status"] == "success")["key"] == ["s1"]
    s1 = ds[1]
    assert s1["scores"]["cov_tags"] == 0.5 and s1["scores"]["category:commercial design"] == 0.7
    assert s1["meta"]["url"] == "https://example.com/s1.png" and s1["meta"]["width"] is None
    assert json.loads(s1["meta"]["other"]) == {"width": "640", "original_width": 2**70,
                                               "exif": {"Make": "Canon"}, "license": "CC-BY"}
    assert ds[2]["meta"]["other"] is None and ds[2]["scores"]["cov_tags"] is None
    # pandas: the struct arrives as a dict per row
    import pandas as pd

    frame = pd.read_parquet(files[0])
    photo = frame["scores"].map(lambda scores: scores["category:photo"])
    assert frame.loc[photo > 0.5, "key"].tolist() == ["s0"]
    # one schema whatever a shard held: a shard with no meta or scores at all has the same
    bare = write_fixture_output(tmp_path / "bare", fixture_samples("00001")[2:])
    import pyarrow.parquet as pq

    assert pq.read_schema(bare / "shards" / "00001.parquet") == pq.read_schema(files[0])


def test_fixture_output_loads_with_datasets_webdataset(fixture_out, monkeypatch, tmp_path):
    load_dataset = _hf(monkeypatch, tmp_path)
    ds = load_dataset("webdataset", data_files={"train": [str(fixture_out / "shards" / "00000.tar")]},
                      split="train")
    assert ds["__key__"] == ["s0", "s1", "s2"]
    assert all(image.size == (64, 48) for image in ds["jpg"])
    assert ds[1]["json"]["ocr"][0]["text"] == "GRAND OPENING"


def test_demo_output_with_mixed_image_formats_loads_with_datasets_webdataset(demo_out, monkeypatch, tmp_path):
    load_dataset = _hf(monkeypatch, tmp_path)
    tars = sorted(glob.glob(str(demo_out / "shards" / "*.tar")))
    ds = load_dataset("webdataset", data_files={"train": tars}, split="train")
    assert len(ds) == len(list(iter_samples(demo_out)))
    image_fields = [f for f in ds.column_names if not f.startswith("__") and f != "json"]
    assert all(any(row[f] is not None for f in image_fields) for row in ds)


def test_export_of_the_demo_output_validates(demo_out, tmp_path):
    # the demo's tiny-model captions are noise, all flagged by quality control: include them
    result = export("llava", demo_out, tmp_path / "x", include_flagged=True)
    path, count = result.path, result.records
    assert count == sum(bool(s.caption.strip()) for s in iter_samples(demo_out))
    assert validate_llava(path) == []
    # the tar names every image .jpg; exported files carry their real format's extension
    formats = {export_id(s): s.annotations["image_format"] for s in iter_samples(demo_out)}
    records = json.loads(path.read_text())
    assert {"JPEG", "PNG"} <= set(formats.values())
    assert all(r["image"].endswith(".png" if formats[r["id"]] == "PNG" else ".jpg") for r in records)


def test_flagged_captions_are_left_out_unless_asked_for(tmp_path, capsys):
    samples = fixture_samples()
    samples[1].flags.append("repeated_sentences: the same sentence 4 times")
    out = write_fixture_output(tmp_path / "out", samples)
    for kind in ("llava", "jsonl", "sft"):
        result = export(kind, out, tmp_path / kind)
        assert (result.records, result.flagged_left_out) == (1, 1)
        assert "s1" not in result.path.read_text() and "s0" in result.path.read_text()
        assert not (tmp_path / kind / "images" / "00000" / "s1.jpg").exists()
    kept = export("jsonl", out, tmp_path / "all", include_flagged=True)
    assert (kept.records, kept.flagged_left_out) == (2, 0)
    assert [json.loads(x)["image_id"] for x in kept.path.read_text().splitlines()] == ["00000/s0", "00000/s1"]
    # the console says how many were left out, and how to keep them
    assert main(["llava", str(out), "--to", str(tmp_path / "cli")]) == 0
    said = capsys.readouterr().out
    assert "exported 1 captioned samples" in said
    assert "1 captions flagged by quality control left out (--include-flagged keeps them)" in said
    assert main(["llava", str(out), "--to", str(tmp_path / "cli2"), "--include-flagged"]) == 0
    said = capsys.readouterr().out
    assert "exported 2 captioned samples" in said and "left out" not in said


def test_ids_and_image_files_are_unique_across_shards(tmp_path, capsys):
    """Two image folders both holding 0001.jpg (and one a sub/0001.jpg): run through the CLI, then
    every export gives each image its own id and its own file, holding that image's bytes."""
    from bench._chat_server import ChatServer

    images = {"a/0001": jpeg(500, 500, (200, 0, 0)), "b/0001": jpeg(500, 500, (0, 200, 0)),
              "b/sub/0001": jpeg(500, 500, (0, 0, 200))}
    for name, data in images.items():
        (tmp_path / "in" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / f"{name}.jpg").write_bytes(data)
    out = tmp_path / "out"
    with ChatServer(output_words=20) as server:
        assert densefusion_local.main([
            "run", "--shards", str(tmp_path / "in" / "a"), str(tmp_path / "in" / "b"), "--out", str(out),
            "--stages", "decode", "prompt", "caption", "--caption-backend", "openai", "--api-base", server.url,
            "--api-model", "m", "--no-progress", "--device", "cpu"]) == 0
    for kind, ids in (("llava", "id"), ("sft", "id"), ("jsonl", "image_id")):
        to = tmp_path / kind
        assert densefusion_local.main(["export", kind, str(out), "--to", str(to)]) == 0
        text = (to / {"llava": "densefusion_llava.json", "sft": "densefusion_sft.json",
                      "jsonl": "densefusion.jsonl"}[kind]).read_text()
        records = [json.loads(x) for x in text.splitlines()] if kind == "jsonl" else json.loads(text)
        assert sorted(r[ids] for r in records) == sorted(images)
        paths = [r["image_path" if kind == "jsonl" else "image"] for r in records]
        assert len(set(paths)) == len(images) == len(list((to / "images").rglob("*.jpg")))
        assert {r[ids]: (to / path).read_bytes() for r, path in zip(records, paths)} == images
    capsys.readouterr()


def test_export_with_nothing_to_export_says_why_and_writes_nothing(tmp_path, capsys):
    flagged = fixture_samples()
    for sample in flagged:
        sample.flags.append("repeated_sentences: the same sentence 4 times")
    out = write_fixture_output(tmp_path / "flagged", flagged)
    to = tmp_path / "export"
    assert densefusion_local.main(["export", "llava", str(out), "--to", str(to)]) == 1
    said = capsys.readouterr()
    assert said.out == ""
    assert said.err == (f"nothing exported from {out}: all 2 captions were flagged by quality control "
                        f"(--include-flagged exports them); densefusion_llava.json was not written\n")
    assert not to.exists()  # neither the file nor an images folder
    # an output without captions (the caption stage left out)
    bare = fixture_samples()
    for sample in bare:
        sample.caption = None
    out = write_fixture_output(tmp_path / "bare", bare)
    (to / "kept.txt").parent.mkdir()
    (to / "kept.txt").write_text("mine")
    assert densefusion_local.main(["export", "jsonl", str(out), "--to", str(to)]) == 1
    assert "none of its 3 written samples has a caption" in capsys.readouterr().err
    assert sorted(p.name for p in to.iterdir()) == ["kept.txt"]  # a folder that was there stays
    # the help says what the exit code means
    with pytest.raises(SystemExit):
        densefusion_local.main(["export", "--help"])
    assert "exit code 1 when nothing is left to export" in " ".join(capsys.readouterr().out.split())
