import json

from output_fixture import CAPTIONS, fixture_samples, write_fixture_output

from engine.export import export, validate_llava
from engine.meta import caption_engine_prompt
from engine.prompt import CAPTION_ENGINE_INSTRUCTION, PromptConfig, sample_prompt


def test_sft_export_puts_each_samples_caption_engine_prompt_in_the_human_turn(tmp_path):
    out = write_fixture_output(tmp_path / "out")
    path, count = export("sft", out, tmp_path / "sft")
    records = json.loads(path.read_text())
    assert count == len(records) == 2 and path.name == "densefusion_sft.json"
    assert validate_llava(path) == []
    by_key = {r["id"]: r for r in records}
    originals = {s.key: s for s in fixture_samples()}
    for key in ("s0", "s1"):
        human, gpt = by_key[key]["conversations"]
        # Exactly the prompt the caption stage builds for this sample at inference.
        expected = sample_prompt(originals[key], PromptConfig(prompt_template="caption_engine"))
        assert human["value"] == "<image>\n" + expected
        assert human["value"].startswith("<image>\n" + CAPTION_ENGINE_INSTRUCTION)
        assert gpt["value"] == CAPTIONS[key]
    assert "GRAND OPENING" in by_key["s1"]["conversations"][0]["value"]
    assert "car: [0.10, 0.20, 0.60, 0.80]" in by_key["s0"]["conversations"][0]["value"]


def test_prompt_is_rebuilt_from_json_annotations_whatever_template_the_run_used():
    sample = fixture_samples()[0]
    annotations = json.loads(json.dumps(sample.annotations()))  # lists, not tuples
    gpt4v_run = PromptConfig(prompt_template="gpt4v", box_decimals=3)
    prompt = caption_engine_prompt(annotations, gpt4v_run)
    assert prompt.startswith(CAPTION_ENGINE_INSTRUCTION)
    assert "car: [0.100, 0.200, 0.600, 0.800]" in prompt
