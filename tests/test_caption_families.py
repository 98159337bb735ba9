"""Caption engine families: the family comes from the checkpoint's config, an unknown one is refused
before any work, and the tiny Qwen2.5-VL captions through ``densefusion_local.py run`` on
transformers and on SGLang's CPU engine (natively, radix cache on) with the same prompt tokens and
the same greedy captions, on images of varied sizes (Qwen's dynamic resolution between its min and
max pixels), the fusion instruction shared as a cached prefix.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import sample_members, write_tar
from contract import check_output_contract
from test_prompt_parity import encoded, photo

from engine.evidence.prompt import CAPTION_ENGINE_INSTRUCTION
from models import tiny
from models.caption.chat import chat_text
from models.caption.families import FAMILIES, LLAVA_1_6, QWEN2_5_VL, family_of, family_of_folder
from models.caption.sglang_backend import sglang_available
from models.errors import ConfigError

# (width, height): square, landscape, portrait, panoramas, tiny (under min_pixels), odd sizes
SIZES = ((500, 500), (1352, 900), (900, 1352), (1600, 400), (400, 1600), (72, 48), (33, 200), (449, 1201),
         (120, 90), (56, 300))
TOKENS = 12


@pytest.fixture(scope="module")
def qwen(tiny_cache) -> Path:
    return tiny.ensure("caption-qwen2_5_vl", tiny_cache / "tiny")


@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> Path:
    members = []
    for i, (width, height) in enumerate(SIZES):
        members += sample_members(f"{i:05d}", encoded(photo(width, height, i), "JPEG"), alt=f"photo {i:05d} of a shop")
    return write_tar(tmp_path_factory.mktemp("families") / "shard.tar", members)


def run_cli(shard: Path, out: Path, cache: Path, model: Path, *options: str) -> int:
    import densefusion_local

    return densefusion_local.main([
        "run", "--shards", str(shard), "--out", str(out), "--device", "cpu", "--no-progress",
        "--cache-dir", str(cache), "--min-short-edge", "0", "--caption-model", str(model),
        "--stages", "decode", "prompt", "caption", "--max-new-tokens", str(TOKENS), *options,
    ])


def written(out: Path) -> dict[str, dict]:
    from engine.output.dataset_reader import iter_samples

    return {s.key: s.annotations for s in iter_samples(out)}


def test_the_family_comes_from_the_config_never_the_name(tmp_path, qwen, tiny_cache):
    misnamed = tmp_path / "llava-v1.6-vicuna-7b"  # a Qwen2.5-VL checkpoint in a LLaVA-named folder
    misnamed.mkdir()
    shutil.copy(qwen / "config.json", misnamed / "config.json")
    assert family_of_folder(misnamed) is QWEN2_5_VL
    assert family_of_folder(tiny.ensure("caption", tiny_cache / "tiny")) is LLAVA_1_6
    assert family_of({"model_type": "qwen2_5_vl"}, "m") is QWEN2_5_VL  # no architectures: the model type
    assert family_of({"architectures": ["LlavaLlamaForCausalLM"]}, "m") is LLAVA_1_6  # original layout


def test_an_unsupported_architecture_is_refused_before_any_work(tmp_path, shard, tiny_cache, capsys):
    folder = tmp_path / "mllama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["MllamaForConditionalGeneration"]}))
    with pytest.raises(ConfigError, match="MllamaForConditionalGeneration"):
        family_of_folder(folder)
    assert run_cli(shard, tmp_path / "out", tiny_cache, folder) == 2
    error = capsys.readouterr().err
    assert "MllamaForConditionalGeneration" in error
    assert all(family.name in error for family in FAMILIES)  # the list of what is supported
    assert not (tmp_path / "out" / "shards").exists()


def test_qwen_template_puts_the_instruction_before_the_image_and_the_budget_bounds_its_tokens(qwen):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(qwen)
    assert chat_text(processor, "describe [IMAGE]:") == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "describe [IMAGE]:<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n<|im_start|>assistant\n")
    counts = processor._get_num_multimodal_tokens(image_sizes=[(h, w) for w, h in SIZES]).num_image_tokens
    low, high = (pixels // (28 * 28) for pixels in tiny.TINY_QWEN_PIXELS)
    assert min(counts) >= low and max(counts) == high and len(set(counts)) >= 4


@pytest.mark.slow  # starts SGLang's CPU engine
@pytest.mark.skipif(not sglang_available(), reason="the sglang extra is not installed")
def test_qwen_captions_are_equal_on_transformers_and_sglang_with_the_instruction_cached(
        tmp_path, shard, tiny_cache, qwen):
    from transformers import AutoProcessor

    outputs = {}
    for backend in ("transformers", "sglang"):
        out = tmp_path / backend
        # two requests in flight: the ones after the first pair find the instruction in the cache
        assert run_cli(shard, out, tiny_cache, qwen, "--caption-backend", backend, "--sglang-window", "2") == 0
        check_output_contract(out, [shard])
        outputs[backend] = written(out)
    keys = sorted(outputs["transformers"])
    assert len(keys) == len(SIZES) and sorted(outputs["sglang"]) == keys
    for key in keys:
        ours, theirs = outputs["transformers"][key], outputs["sglang"][key]
        assert theirs["engine"]["backend"] == "sglang"
        assert theirs["engine"]["prompt_tokens"] == ours["engine"]["prompt_tokens"], key
        assert theirs["caption"] == ours["caption"], key
        assert ours["engine"]["output_tokens"] > 0
    assert len({outputs["transformers"][k]["engine"]["prompt_tokens"] for k in keys}) >= 4  # varied budgets

    metrics = json.loads((tmp_path / "sglang" / "metrics.json").read_text())
    caption = next(s for s in metrics["stages"] if s["stage"] == "caption")
    processor = AutoProcessor.from_pretrained(qwen)
    shared = chat_text(processor, CAPTION_ENGINE_INSTRUCTION).split(CAPTION_ENGINE_INSTRUCTION)[0]
    shared_ids = processor.tokenizer(shared + CAPTION_ENGINE_INSTRUCTION)["input_ids"]
    # a request after the first reused the system turn and the whole instruction (its last token
    # may merge with the text after it)
    assert caption["cached_tokens"] >= len(shared_ids) - 2 > 100
    assert caption["prefix_cache_hit_rate"] == pytest.approx(caption["cached_tokens"] / caption["prompt_tokens"])
    print(f"Qwen2.5-VL on SGLang's CPU engine: prefix cache hit rate {caption['prefix_cache_hit_rate']:.1%} "
          f"({caption['cached_tokens']:.0f} of {caption['prompt_tokens']:.0f} prompt tokens)")


def test_plan_counts_the_qwen_engine_at_its_own_image_budget(tmp_path, qwen):
    from safetensors.torch import load_file

    from engine.core import config
    from engine.stages.caption import TEXT_TOKENS, caption_need

    cfg = config.build(runtime={"out": str(tmp_path / "out")}, caption={"caption_model": str(qwen)})
    need = caption_need(cfg)
    max_image_tokens = tiny.TINY_QWEN_PIXELS[1] // (28 * 28)
    assert need.tokens_per_request == max_image_tokens + TEXT_TOKENS + cfg.caption.max_new_tokens
    text = json.loads((qwen / "config.json").read_text())["text_config"]
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    assert need.kv_bytes_per_token == 2 * text["num_hidden_layers"] * text["num_key_value_heads"] * head_dim * 2
    assert need.params == sum(t.numel() for t in load_file(qwen / "model.safetensors").values())


def test_the_cpu_setup_declares_the_placeholder_ops_in_every_interpreter_it_starts():
    """What SGLang's Qwen-VL processors bind on import (their absence hides every Qwen-VL
    checkpoint from SGLang's CPU engine); a call says what it is. In another interpreter, so this
    one keeps its ops as they are."""
    import os
    import subprocess
    import sys

    from models.caption import sglang_cpu

    check = ("import torch; names = __import__('sitecustomize').PLACEHOLDER_OPS\n"
             "ops = [getattr(torch.ops.sgl_kernel, n) for n in names]\n"
             "try:\n    ops[0]([torch.zeros(1)])\nexcept NotImplementedError as e:\n    print(len(ops), e)")
    env = {**os.environ, "SGLANG_USE_CPU_ENGINE": "1", "PYTHONPATH": str(sglang_cpu.SITE)}
    said = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, check=True).stdout
    assert said.startswith("4 a placeholder sgl_kernel CPU op was called")
    env["SGLANG_USE_CPU_ENGINE"] = "0"  # anywhere else (a GPU node): nothing declared
    with pytest.raises(subprocess.CalledProcessError):
        subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, check=True)
