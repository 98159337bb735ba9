"""llava-hf LLaVA-NeXT -> the original LLaVA layout SGLang serves natively, and SGLang's CPU stub.

These need neither SGLang nor a GPU; tests/test_sglang_engine.py serves the converted folder."""

from __future__ import annotations

import json

import pytest

from models import tiny
from models.caption import llava_native, sglang_cpu
from models.caption.llava_native import check_native, ensure_native, native_weight_name
from models.errors import ConfigError
from models.export.__main__ import main as export_main


@pytest.fixture(scope="module")
def source(tiny_cache):
    return tiny.ensure("caption", tiny_cache / "tiny")


@pytest.mark.parametrize("hf, native", [
    ("language_model.model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.up_proj.weight"),
    ("model.language_model.embed_tokens.weight", "model.embed_tokens.weight"),
    ("language_model.lm_head.weight", "lm_head.weight"),
    ("lm_head.weight", "lm_head.weight"),
    ("vision_tower.vision_model.encoder.layers.1.mlp.fc1.bias",
     "model.vision_tower.vision_tower.vision_model.encoder.layers.1.mlp.fc1.bias"),
    ("vision_tower.embeddings.patch_embedding.weight",  # transformers 5 saves it flattened
     "model.vision_tower.vision_tower.vision_model.embeddings.patch_embedding.weight"),
    ("model.vision_tower.post_layernorm.bias", "model.vision_tower.vision_tower.vision_model.post_layernorm.bias"),
    ("multi_modal_projector.linear_1.weight", "model.mm_projector.0.weight"),
    ("model.multi_modal_projector.linear_2.bias", "model.mm_projector.2.bias"),
    ("image_newline", "model.image_newline"),
    ("model.image_newline", "model.image_newline"),
])
def test_weight_names_map_from_both_llava_hf_save_layouts(hf, native):
    assert native_weight_name(hf) == native


def test_an_unknown_weight_is_an_error_not_a_silent_drop():
    with pytest.raises(ConfigError, match="no counterpart"):
        native_weight_name("some_adapter.weight")


def test_conversion_keeps_every_tensor_and_writes_the_native_config(source, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoProcessor, CLIPImageProcessor

    out = llava_native.convert(source, tmp_path / "native")
    config = json.loads((out / "config.json").read_text())
    hf = json.loads((source / "config.json").read_text())
    assert config["architectures"] == ["LlavaLlamaForCausalLM"] and config["model_type"] == "llava"
    assert config["hidden_size"] == hf["text_config"]["hidden_size"]  # the language model's keys, flat
    assert config["image_token_index"] == hf["image_token_index"]
    assert config["image_grid_pinpoints"] == hf["image_grid_pinpoints"]
    assert config["mm_hidden_size"] == hf["vision_config"]["hidden_size"]
    assert (config["image_aspect_ratio"], config["mm_patch_merge_type"], config["mm_vision_select_feature"]) == \
        ("anyres", "spatial_unpad", "patch")
    tower = config["mm_vision_tower"]
    assert "clip" in tower and tower == str(out / llava_native.VISION_FOLDER)  # SGLang loads it only then

    before, after = load_file(str(source / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert set(after) == {native_weight_name(name) for name in before}
    for name, tensor in before.items():
        assert after[native_weight_name(name)].equal(tensor)
    vision = load_file(f"{tower}/model.safetensors")
    assert vision["vision_model.embeddings.patch_embedding.weight"].equal(
        before["vision_tower.embeddings.patch_embedding.weight"])

    processor = AutoProcessor.from_pretrained(out)
    # a plain CLIP processor: SGLang tiles AnyRes itself and processes every tile with it
    assert isinstance(processor.image_processor, CLIPImageProcessor)
    original = AutoProcessor.from_pretrained(source)
    assert processor.image_processor.size["shortest_edge"] == original.image_processor.size["shortest_edge"]
    assert list(processor.image_processor.image_mean) == list(original.image_processor.image_mean)
    assert processor.tokenizer("[OCR] text")["input_ids"] == original.tokenizer("[OCR] text")["input_ids"]
    assert (out / "generation_config.json").read_text() == (source / "generation_config.json").read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["native"]  # no temporary folder left behind


def test_conversion_is_cached_per_source_and_redone_when_it_changes(source, tmp_path):
    import shutil
    from pathlib import Path

    first = ensure_native(str(source), tmp_path / "cache")
    written = (Path(first) / "config.json").stat().st_mtime_ns
    assert ensure_native(str(source), tmp_path / "cache") == first  # reused, not rewritten
    assert (Path(first) / "config.json").stat().st_mtime_ns == written
    copy = tmp_path / "copy"
    shutil.copytree(source, copy)
    assert ensure_native(str(copy), tmp_path / "cache") != first  # another source, another conversion
    native = ensure_native(str(copy), tmp_path / "cache")
    assert ensure_native(native, tmp_path / "cache") == native  # already native: served as it is


def test_sglang_is_refused_a_multimodal_checkpoint_it_would_serve_without_the_radix_cache(source, tmp_path):
    native = {"LlavaLlamaForCausalLM", "LlamaForCausalLM"}
    with pytest.raises(ConfigError, match="radix cache"):
        check_native(str(source), native)  # llava-hf LLaVA-NeXT itself: SGLang's Transformers fallback
    check_native(ensure_native(str(source), tmp_path), native)
    text_only = tmp_path / "text"
    text_only.mkdir()
    (text_only / "config.json").write_text(json.dumps({"architectures": ["SomeCausalLM"]}))
    check_native(str(text_only), native)  # no images: the fallback keeps its cache


def test_a_language_model_without_a_native_llava_class_is_refused():
    hf = {"text_config": {"model_type": "gemma"}, "vision_config": {"hidden_size": 8}}
    with pytest.raises(ConfigError, match="native LLaVA classes"):
        llava_native.native_config(hf, "/x/clip")


def test_export_command_writes_the_native_layout(tmp_path, tiny_cache, capsys):
    out = tmp_path / "native"
    assert export_main(["llava-native", "tiny", "--out", str(out), "--cache-dir", str(tiny_cache)]) == 0
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlavaLlamaForCausalLM"]
    assert str(out) in capsys.readouterr().out
    assert export_main(["llava-native", "tiny", "--out", str(out), "--cache-dir", str(tiny_cache)]) == 2  # never overwritten


def test_the_stand_in_driver_answers_no_device(tmp_path):
    import subprocess
    import sys

    stub = sglang_cpu.build_stub(tmp_path)
    # loaded in another process: loaded here, it would stand in for libcuda.so.1 in later tests
    check = (f"import ctypes; lib = ctypes.CDLL({str(stub)!r}); "
             f"print([getattr(lib, n)() for n in {sglang_cpu.DRIVER_SYMBOLS!r}])")
    answers = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True).stdout
    assert json.loads(answers) == [sglang_cpu.CUDA_ERROR_NO_DEVICE] * len(sglang_cpu.DRIVER_SYMBOLS)
    assert sglang_cpu.build_stub(tmp_path) == stub  # built once


def test_without_gcc_the_cpu_setup_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(ConfigError, match="install gcc"):
        sglang_cpu.build_stub(tmp_path)


def test_transformers_says_it_does_not_load_the_original_layout(source, tmp_path):
    from engine.core.config import ApiConfig, CaptionConfig, SglangConfig
    from engine.stages.caption import backend_settings
    from models.caption.registry import load_engine

    native = ensure_native(str(source), tmp_path)
    settings = backend_settings("transformers", CaptionConfig(), ApiConfig(), SglangConfig(), out="")
    with pytest.raises(ConfigError, match="original LLaVA layout"):
        load_engine("transformers", "native", native, "cpu", settings)
