"""The first caption chain end to end on the demo shards: OCR → prompt → caption → output."""

import json
import tarfile

import pyarrow.parquet as pq
import pytest
import torch

from engine import config as config_module
from engine import pipeline
from engine.demo_data import demo_members, write_demo_shards
from engine.prompt import sanitize


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("demo")
    shards = write_demo_shards(root / "input", n_shards=1)
    cfg = config_module.build(
        input={"shards": tuple(map(str, shards))},
        runtime={"out": str(root / "out"), "models": "tiny", "device": "cpu",
                 "cache_dir": str(root / "cache"), "progress": False},
        caption={"max_new_tokens": 8, "caption_batch": 4},
    )
    summary = pipeline.run(cfg)
    rows = pq.read_table(root / "out" / "shards" / "demo-00000.parquet").to_pylist()
    return summary, {row["key"]: row for row in rows}, root / "out"


def test_every_good_sample_gets_a_caption(demo_run):
    summary, rows, _ = demo_run
    good = [m for m in demo_members(0) if m.meta["kind"] not in ("small", "broken")]
    assert sorted(rows) == sorted(m.key for m in good)
    assert summary.written == len(good)
    for row in rows.values():
        assert row["caption"].strip()
        assert row["engine"]["backend"] == "transformers" and row["engine"]["model"] == "tiny"
        assert 0 < row["engine"]["output_tokens"] <= 8
        assert row["prompt"].endswith("[IMAGE]:")
        assert f"[World Knowledge]: {sanitize(row['alt_text'], 600)}".rstrip() in row["prompt"]


def test_ocr_section_holds_the_rendered_text(demo_run):
    _, rows, _ = demo_run
    texty = [m for m in demo_members(0) if m.meta["kind"] in ("poster", "slide")]
    assert len(texty) == 2
    for member in texty:
        prompt = rows[member.key]["prompt"]
        ocr_section = prompt.split("[OCR]:\n", 1)[1].split("\n\n[IMAGE]:")[0]
        assert ocr_section.splitlines() == list(member.meta["rendered_text"])
        assert [o["text"] for o in rows[member.key]["ocr"]] == list(member.meta["rendered_text"])


def test_tar_json_carries_the_same_caption(demo_run):
    _, rows, out = demo_run
    with tarfile.open(out / "shards" / "demo-00000.tar") as tar:
        annotations = [
            json.load(tar.extractfile(m)) for m in tar.getmembers() if m.name.endswith(".json")
        ]
    assert {a["key"]: a["caption"] for a in annotations} == {k: r["caption"] for k, r in rows.items()}
    assert all(a["engine"]["finish_reason"] in ("stop", "length") for a in annotations)
