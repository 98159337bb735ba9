import json

from output_fixture import CAPTIONS, fixture_samples, write_fixture_output

from engine.evidence.prompt import CAPTION_ENGINE_INSTRUCTION, PromptConfig, sample_prompt
from engine.output.export import export, validate_llava
from engine.output.meta import caption_engine_prompt


def test_sft_export_puts_each_samples_caption_engine_prompt_in_the_human_turn(tmp_path):
    out = write_fixture_output(tmp_path / "out")
    result = export("sft", out, tmp_path / "sft")
    path, count = result.path, result.records
    records = json.loads(path.read_text())
    assert count == len(records) == 2 and path.name == "densefusion_sft.json"
    assert validate_llava(path) == []
    by_key = {r["id"]: r for r in records}
    originals = {s.key: s for s in fixture_samples()}
    for key in ("s0", "s1"):
        human, gpt = by_key[f"00000/{key}"]["conversations"]
        # Exactly the prompt the caption stage builds for this sample at inference.
        expected = sample_prompt(originals[key], PromptConfig(prompt_template="caption_engine"))
        assert human["value"] == "<image>\n" + expected
        assert human["value"].startswith("<image>\n" + CAPTION_ENGINE_INSTRUCTION)
        assert gpt["value"] == CAPTIONS[key]
    assert "GRAND OPENING" in by_key["00000/s1"]["conversations"][0]["value"]
    assert "car: [0.10, 0.20, 0.60, 0.80]" in by_key["00000/s0"]["conversations"][0]["value"]


def test_prompt_is_rebuilt_from_json_annotations_whatever_template_the_run_used():
    sample = fixture_samples()[0]
    annotations = json.loads(json.dumps(sample.annotations()))  # lists, not tuples
    gpt4v_run = PromptConfig(prompt_template="gpt4v", box_decimals=3)
    prompt = caption_engine_prompt(annotations, gpt4v_run)
    assert prompt.startswith(CAPTION_ENGINE_INSTRUCTION)
    assert "car: [0.100, 0.200, 0.600, 0.800]" in prompt


def test_meta_defaults_to_the_papers_share_unless_one_is_given(tmp_path):
    import densefusion_local

    parser = densefusion_local.build_parser()
    base = ["meta", "--out", str(tmp_path), "--api-base", "http://127.0.0.1:1/v1", "--api-model", "m"]
    cfg = densefusion_local.meta_config(parser.parse_args(base))
    assert cfg.subset.subset_share == 0.1
    assert (cfg.prompt.prompt_template, cfg.caption.caption_backend) == ("gpt4v", "openai")
    chosen = densefusion_local.meta_config(parser.parse_args([*base, "--subset-share", "1", "--subset-seed", "4"]))
    assert (chosen.subset.subset_share, chosen.subset.subset_seed) == (1.0, 4)


def run_meta(tmp_path, output_words: int, *flags: str):
    """``meta`` over one demo shard against a fake GPT-4V endpoint: (exit code, shards, out, server)."""
    import densefusion_local
    from bench._chat_server import ChatServer
    from engine.io.demo_data import write_demo_shards

    shards = write_demo_shards(tmp_path / "in", n_shards=1)
    out = tmp_path / "out"
    with ChatServer(output_words=output_words) as server:
        code = densefusion_local.main([
            "meta", "--shards", *map(str, shards), "--out", str(out), "--no-progress", "--device", "cpu",
            "--api-base", server.url, "--api-model", "fake-4v", "--caption-max-side", "256", *flags,
        ])
    return code, shards, out, server


def test_meta_command_captions_the_subset_with_gpt4v_and_exports_sft(tmp_path, capsys):
    import pyarrow.parquet as pq

    from engine.core.subset import in_subset
    from engine.evidence.prompt import GPT4V_INSTRUCTION

    code, shards, out, server = run_meta(tmp_path, 40, "--stages", "decode", "prompt", "caption", "qc",
                                         "--subset-share", "0.6", "--subset-seed", "2")
    assert code == 0
    written = pq.read_table(out / "shards" / f"{shards[0].stem}.parquet").to_pylist()
    rejected = pq.read_table(out / "rejects" / f"{shards[0].stem}.parquet").to_pylist()
    assert written and all(in_subset(r["key"], 0.6, 2) for r in written)
    assert any(r["stage"] == "subset" for r in rejected)
    for row in written:
        assert row["prompt"].startswith(GPT4V_INSTRUCTION)  # GPT-4V was asked with its template
        assert row["caption"] == server.caption_for(row["prompt"])
    records = json.loads((out / "sft" / "densefusion_sft.json").read_text())
    assert validate_llava(out / "sft" / "densefusion_sft.json") == []
    assert sorted(r["id"] for r in records) == sorted(f"{shards[0].stem}/{r['key']}" for r in written)
    by_key = {f"{shards[0].stem}/{r['key']}": r for r in written}
    for record in records:
        human, gpt = record["conversations"]
        assert human["value"].startswith("<image>\n" + CAPTION_ENGINE_INSTRUCTION)  # the engine's template
        assert gpt["value"] == by_key[record["id"]]["caption"]
    assert f"{len(records)} GPT-4V captions exported" in capsys.readouterr().out


def test_meta_with_curate_draws_its_share_from_pass_1s_selection(tmp_path, tiny_cache):
    import pyarrow.parquet as pq

    code, shards, out, _ = run_meta(tmp_path, 20, "--stages", "decode", "prompt", "caption", "--subset-share", "1",
                                    "--curate", "--embed-model", "tiny", "--cache-dir", str(tiny_cache),
                                    "--embed-batch", "2", "--curate-clusters", "1", "--curate-top-n", "2")
    assert code == 0
    selection = pq.read_table(out / "curate" / "selection.parquet").to_pylist()
    selected = {r["key"] for r in selection if r["kept"]}
    assert 0 < len(selected) <= 2 < len(selection)  # the top 2 of one cluster, out of every embedded image
    written = {r["key"] for r in pq.read_table(out / "shards" / f"{shards[0].stem}.parquet").to_pylist()}
    assert written == selected
    rejected = pq.read_table(out / "rejects" / f"{shards[0].stem}.parquet").to_pylist()
    assert {r["stage"] for r in rejected} >= {"curate"}
    records = json.loads((out / "sft" / "densefusion_sft.json").read_text())
    assert {r["id"] for r in records} == {f"{shards[0].stem}/{key}" for key in written}
