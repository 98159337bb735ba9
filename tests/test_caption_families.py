"""Caption engine families: the family comes from the checkpoint's config, an unknown one is refused
before any work, and each family's tiny random-weight build captions through ``densefusion_local.py
run``: on transformers and (where SGLang serves it natively) on SGLang's CPU engine with the same
prompt tokens and the same greedy captions on images of varied sizes (each family's own image
budget), the fusion instruction shared as a cached prefix, and a run killed with SIGKILL then
resumed equal to an uninterrupted one. A family SGLang cannot serve is refused on that path before
any work, saying where it fails.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import sample_members, write_tar
from contract import check_output_contract
from test_prompt_parity import encoded, photo
from test_resume import held_back, run_and_kill
from test_sglang_run import alive, finished, run_watching

from engine.evidence.prompt import CAPTION_ENGINE_INSTRUCTION
from models import tiny
from models.caption.chat import chat_text
from models.caption.families import (
    FAMILIES,
    INTERNVL,
    LLAVA_1_6,
    QWEN2_5_VL,
    QWEN3_VL,
    family_of,
    family_of_folder,
)
from models.caption.sglang_backend import sglang_available
from models.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
# (width, height): square, landscape, portrait, panoramas, tiny (under min_pixels), odd sizes
SIZES = ((500, 500), (1352, 900), (900, 1352), (1600, 400), (400, 1600), (72, 48), (33, 200), (449, 1201),
         (120, 90), (56, 300))
SHARD_SIZES = (4, 3, 3)  # the images above in three shards, so a kill can land between commits
TOKENS = 12
# family -> its tiny build's role and the most tokens one image takes at that build's budget
ROLES = {QWEN2_5_VL: "caption-qwen2_5_vl", QWEN3_VL: "caption-qwen3_vl", INTERNVL: "caption-internvl"}
MOST_IMAGE_TOKENS = {
    QWEN2_5_VL: tiny.TINY_QWEN2_5_VL.budget[1] // (28 * 28),  # one token per 2x2 patches of 14 px
    QWEN3_VL: tiny.TINY_QWEN3_VL.budget[1] // (32 * 32),  # one token per 2x2 patches of 16 px
    INTERNVL: (tiny.TINY_INTERNVL.budget[1] + 1) * 16 + 2,  # tiles and thumbnail, 16 tokens each, <img> </img>
}
SERVED_BY_SGLANG = [f for f in ROLES if not f.sglang_refusal]


def build(family, tiny_cache) -> Path:
    return tiny.ensure(ROLES[family], tiny_cache / "tiny")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("families")
    paths, start = [], 0
    for s, count in enumerate(SHARD_SIZES):
        members = []
        for i in range(start, start + count):
            width, height = SIZES[i]
            members += sample_members(f"{i:05d}", encoded(photo(width, height, i), "JPEG"), alt=f"photo {i:05d} of a shop")
        paths.append(write_tar(folder / f"shard-{s}.tar", members))
        start += count
    return paths


def options(shards: list[Path], out: Path, cache: Path, model: Path, *more: str) -> list[str]:
    return ["run", "--shards", *map(str, shards), "--out", str(out), "--device", "cpu", "--no-progress",
            "--cache-dir", str(cache), "--min-short-edge", "0", "--caption-model", str(model),
            "--stages", "decode", "prompt", "caption", "--max-new-tokens", str(TOKENS), *more]


def run_cli(*args) -> int:
    import densefusion_local

    return densefusion_local.main(options(*args))


def command(*args) -> list[str]:
    return [sys.executable, str(ROOT / "densefusion_local.py"), *options(*args)]


def written(out: Path) -> dict[str, dict]:
    from engine.output.dataset_reader import iter_samples

    return {s.key: s.annotations for s in iter_samples(out)}


def caption_figures(out: Path) -> dict:
    return next(s for s in json.loads((out / "metrics.json").read_text())["stages"] if s["stage"] == "caption")


def test_the_family_comes_from_the_config_never_the_name(tmp_path, tiny_cache):
    for family in ROLES:
        misnamed = tmp_path / f"llava-v1.6-vicuna-7b-{family.model_types[0]}"  # in a LLaVA-named folder
        misnamed.mkdir()
        shutil.copy(build(family, tiny_cache) / "config.json", misnamed / "config.json")
        assert family_of_folder(misnamed) is family
        assert family_of({"model_type": family.model_types[0]}, "m") is family  # no architectures: the type
    assert family_of_folder(tiny.ensure("caption", tiny_cache / "tiny")) is LLAVA_1_6
    assert family_of({"architectures": ["LlavaLlamaForCausalLM"]}, "m") is LLAVA_1_6  # original layout


def test_an_unsupported_architecture_is_refused_before_any_work(tmp_path, shards, tiny_cache, capsys):
    folder = tmp_path / "mllama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["MllamaForConditionalGeneration"]}))
    with pytest.raises(ConfigError, match="MllamaForConditionalGeneration"):
        family_of_folder(folder)
    assert run_cli(shards, tmp_path / "out", tiny_cache, folder) == 2
    error = capsys.readouterr().err
    assert "MllamaForConditionalGeneration" in error
    assert all(family.name in error for family in FAMILIES)  # the list of what is supported
    assert not (tmp_path / "out" / "shards").exists()


@pytest.mark.parametrize("family", list(ROLES), ids=lambda f: f.name)
def test_each_template_puts_the_instruction_before_the_image_and_the_budget_bounds_its_tokens(family, tiny_cache):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(build(family, tiny_cache))
    text = chat_text(processor, "describe [IMAGE]:")
    assert text.count(processor.image_token) == 1
    assert family.instruction_before_image
    assert text.index("describe [IMAGE]:") < text.index(processor.image_token)
    counts = processor._get_num_multimodal_tokens(image_sizes=[(h, w) for w, h in SIZES]).num_image_tokens
    assert max(counts) == MOST_IMAGE_TOKENS[family] and len(set(counts)) >= 4  # varied, up to the budget


@pytest.mark.parametrize("family", list(ROLES), ids=lambda f: f.name)
def test_plan_counts_each_engine_at_its_own_image_budget(family, tmp_path, tiny_cache):
    from safetensors.torch import load_file

    from engine.core import config
    from engine.stages.caption import TEXT_TOKENS, caption_need

    folder = build(family, tiny_cache)
    cfg = config.build(runtime={"out": str(tmp_path / "out")}, caption={"caption_model": str(folder)})
    need = caption_need(cfg)
    assert need.tokens_per_request == MOST_IMAGE_TOKENS[family] + TEXT_TOKENS + cfg.caption.max_new_tokens
    text = json.loads((folder / "config.json").read_text())["text_config"]
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    assert need.kv_bytes_per_token == 2 * text["num_hidden_layers"] * text["num_key_value_heads"] * head_dim * 2
    assert need.params == sum(t.numel() for t in load_file(folder / "model.safetensors").values())


def test_sglang_refuses_internvl_before_any_work_saying_where_it_fails(tmp_path, shards, tiny_cache, capsys):
    # prepare() is not reached: the family is refused first, so nothing of SGLang's CPU setup is set here
    assert run_cli(shards, tmp_path / "out", tiny_cache, build(INTERNVL, tiny_cache), "--caption-backend",
                   "sglang") == 2
    error = capsys.readouterr().err
    assert "InternVLChatModel" in error and "sglang/srt/multimodal/processors/internvl.py" in error
    assert "--caption-backend transformers" in error
    assert not (tmp_path / "out" / "shards").exists()


def test_auto_on_a_gpu_picks_transformers_for_a_family_sglang_does_not_serve_and_plan_counts_that(tmp_path, tiny_cache):
    from engine.core import config
    from engine.stages.caption import caption_need
    from models.caption.registry import resolve_backend

    internvl, qwen = build(INTERNVL, tiny_cache), build(QWEN3_VL, tiny_cache)
    assert resolve_backend("auto", "cuda", str(internvl)) == "transformers"
    if sglang_available():
        assert resolve_backend("auto", "cuda", str(qwen)) == "sglang"
    need = caption_need(config.build(runtime={"out": str(tmp_path / "out")}, caption={"caption_model": str(internvl)}))
    assert need.backend == "transformers"


def test_internvl_on_transformers_killed_then_resumed_equals_an_uninterrupted_run(tmp_path, shards, tiny_cache):
    model = build(INTERNVL, tiny_cache)
    clean = tmp_path / "clean"
    assert run_cli(shards, clean, tiny_cache, model, "--caption-backend", "transformers") == 0
    check_output_contract(clean, shards)
    resumed = tmp_path / "resumed"
    cmd = command(shards, resumed, tiny_cache, model, "--caption-backend", "transformers")
    with held_back(shards[-1]):
        assert 1 <= run_and_kill(cmd, resumed, after_shards=1) < len(shards)
    rerun = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert "already done" in rerun.stdout
    check_output_contract(resumed, shards)
    ours, theirs = written(clean), written(resumed)
    assert len(ours) == len(SIZES) and ours.keys() == theirs.keys()
    assert {k: v["caption"] for k, v in ours.items()} == {k: v["caption"] for k, v in theirs.items()}
    assert len({v["engine"]["prompt_tokens"] for v in ours.values()}) >= 4  # the tiles vary with the image


@pytest.mark.slow  # starts SGLang's CPU engine twice
@pytest.mark.skipif(not sglang_available(), reason="the sglang extra is not installed")
@pytest.mark.parametrize("family", SERVED_BY_SGLANG, ids=lambda f: f.name)
def test_sglang_killed_then_resumed_captions_as_transformers_with_the_instruction_cached(
        family, tmp_path, shards, tiny_cache):
    """SGLang runs in child processes (as a user starts it): its CPU setup stays out of this one."""
    from transformers import AutoProcessor

    model = build(family, tiny_cache)
    reference = tmp_path / "transformers"
    assert run_cli(shards, reference, tiny_cache, model, "--caption-backend", "transformers") == 0
    check_output_contract(reference, shards)

    out = tmp_path / "sglang"
    # two requests in flight: the ones after the first pair find the instruction in the cache
    cmd = command(shards, out, tiny_cache, model, "--caption-backend", "sglang", "--sglang-window", "2")
    with held_back(shards[-1]):  # the kill after the first commit lands with shards left
        code, children, output = run_watching(cmd, kill_after_shards=1)
    assert code == -signal.SIGKILL, output
    assert 1 <= finished(out) < len(shards)
    code, more, output = run_watching(cmd)
    assert code == 0, output
    assert "already done" in output
    assert not alive(children | more), "SGLang processes outlived a run"
    check_output_contract(out, shards)

    ours, theirs = written(reference), written(out)
    keys = sorted(ours)
    assert len(keys) == len(SIZES) and sorted(theirs) == keys
    for key in keys:
        assert theirs[key]["engine"]["backend"] == "sglang"
        assert theirs[key]["engine"]["prompt_tokens"] == ours[key]["engine"]["prompt_tokens"], key
        assert theirs[key]["caption"] == ours[key]["caption"], key
        assert ours[key]["engine"]["output_tokens"] > 0
    assert len({ours[k]["engine"]["prompt_tokens"] for k in keys}) >= 4  # varied budgets

    caption = caption_figures(out)  # the resumed run's: two shards, four requests after the first pair
    processor = AutoProcessor.from_pretrained(model)
    shared = chat_text(processor, CAPTION_ENGINE_INSTRUCTION).split(CAPTION_ENGINE_INSTRUCTION)[0]
    shared_ids = processor.tokenizer(shared + CAPTION_ENGINE_INSTRUCTION)["input_ids"]
    # a request after the first reused the turn's head and the whole instruction (its last token
    # may merge with the text after it)
    assert caption["cached_tokens"] >= len(shared_ids) - 2 > 100
    assert caption["prefix_cache_hit_rate"] == pytest.approx(caption["cached_tokens"] / caption["prompt_tokens"])
    assert f"prefix hit {caption['prefix_cache_hit_rate']:.0%}" in output
    print(f"{family.name} on SGLang's CPU engine: prefix cache hit rate {caption['prefix_cache_hit_rate']:.1%} "
          f"({caption['cached_tokens']:.0f} of {caption['prompt_tokens']:.0f} prompt tokens)")


def test_train_refuses_a_family_it_cannot_fine_tune_yet_before_loading_it(tmp_path, tiny_cache):
    from engine.train.config import TrainConfig
    from engine.train.loop import load_base

    with pytest.raises(ConfigError, match="is a InternVL checkpoint: train fine-tunes"):
        load_base(TrainConfig(base=str(build(INTERNVL, tiny_cache)), out=str(tmp_path / "engine"),
                              cache_dir=str(tiny_cache)))


def test_the_cpu_setup_declares_the_placeholder_ops_in_every_interpreter_that_imports_sglang(tmp_path):
    """What SGLang's Qwen-VL processors bind on import (their absence hides every Qwen-VL
    checkpoint from SGLang's CPU engine); a call says what it is. Declared on the first import of
    ``sglang`` (here an empty package of that name: the trigger is the name), so an interpreter
    that never imports it does not even import torch. In other interpreters, so this one keeps
    its ops as they are."""
    import os

    from models.caption import sglang_cpu

    (tmp_path / "sglang").mkdir()
    (tmp_path / "sglang" / "__init__.py").write_text("")
    check = ("import sys; print('torch' in sys.modules)\n"
             "import sglang, torch; names = __import__('sitecustomize').PLACEHOLDER_OPS\n"
             "ops = [getattr(torch.ops.sgl_kernel, n) for n in names]\n"
             "try:\n    ops[0]([torch.zeros(1)])\nexcept NotImplementedError as e:\n    print(len(ops), e)")
    env = {**os.environ, "SGLANG_USE_CPU_ENGINE": "1", "PYTHONPATH": os.pathsep.join([str(sglang_cpu.SITE),
                                                                                      str(tmp_path)])}
    said = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, check=True).stdout
    assert said.startswith("False\n4 a placeholder sgl_kernel CPU op was called")
    env["SGLANG_USE_CPU_ENGINE"] = "0"  # anywhere else (a GPU node): nothing declared
    with pytest.raises(subprocess.CalledProcessError):
        subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, check=True)
