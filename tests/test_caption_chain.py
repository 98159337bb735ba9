"""The first caption chain end to end on the demo run: OCR → fusion prompt → caption → output."""

import json
import tarfile

import pyarrow.parquet as pq

from engine.evidence.prompt import sanitize
from engine.io.demo_data import demo_members

SHARDS = ("demo-00000", "demo-00001")


def rows(demo_output, shard):
    return {row["key"]: row for row in pq.read_table(demo_output / "shards" / f"{shard}.parquet").to_pylist()}


def test_every_good_sample_gets_a_caption(demo_output):
    for index, shard in enumerate(SHARDS):
        written = rows(demo_output, shard)
        good = [m.key for m in demo_members(index) if m.meta["kind"] in ("scene", "poster", "slide")]
        assert sorted(written) == sorted(good)
        for row in written.values():
            engine = json.loads(row["engine"]) if isinstance(row["engine"], str) else row["engine"]
            assert row["caption"].strip()
            assert engine["backend"] == "transformers" and engine["model"] == "tiny"
            assert 0 < engine["output_tokens"] <= 12 and engine["finish_reason"] in ("stop", "length")
            assert row["prompt"].endswith("[IMAGE]:")
            assert f"[World Knowledge]: {sanitize(row['alt_text'], 600)}".rstrip() in row["prompt"]


def test_ocr_section_holds_the_rendered_text(demo_output):
    for index, shard in enumerate(SHARDS):
        written = rows(demo_output, shard)
        texty = [m for m in demo_members(index) if m.meta["kind"] in ("poster", "slide")]
        assert len(texty) == 2
        for member in texty:
            prompt = written[member.key]["prompt"]
            ocr_section = prompt.split("\n\n[OCR]:\n", 1)[1].split("\n\n[IMAGE]:")[0]
            assert ocr_section.splitlines() == list(member.meta["rendered_text"])
            assert [o["text"] for o in written[member.key]["ocr"]] == list(member.meta["rendered_text"])


def test_tar_json_carries_the_same_caption(demo_output):
    written = rows(demo_output, SHARDS[0])
    with tarfile.open(demo_output / "shards" / f"{SHARDS[0]}.tar") as tar:
        annotations = [json.load(tar.extractfile(m)) for m in tar.getmembers() if m.name.endswith(".json")]
    assert {a["key"]: a["caption"] for a in annotations} == {k: r["caption"] for k, r in written.items()}
    assert {a["key"]: a["prompt"] for a in annotations} == {k: r["prompt"] for k, r in written.items()}
