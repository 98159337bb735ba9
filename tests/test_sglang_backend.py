import pytest

from engine.core.config import ApiConfig, CaptionConfig, SglangConfig
from engine.stages.caption import backend_settings
from models.caption.base import SamplingParams
from models.caption.sglang_backend import (
    CPU_KV_TOKENS,
    caption_from_output,
    engine_args,
    generate_request,
    on_child_failure,
    require_sglang,
    sampling_dict,
    sglang_available,
)
from models.errors import ConfigError


def settings(**options):
    """The backend's settings as the caption stage builds them from ``--sglang-*`` options."""
    return backend_settings("sglang", CaptionConfig(), ApiConfig(), SglangConfig(**options), out="")


INSTRUCTION = (
    "You are a powerful multimodal model and you should generate detailed descriptions of "
    "this image, using additional external information such as [Caption], [Detection Box], "
    "and [OCR]."
)


def _fusion(alt: str, box: str) -> str:
    return (f"{INSTRUCTION}\n\n[External Information]:\n\n[World Knowledge]: {alt}\n\n"
            f"[Detection Box]:\n\n{box}\n\n[OCR]:\n\n\n[IMAGE]:")


def test_sampling_params_are_passed_through():
    params = SamplingParams(max_new_tokens=250, temperature=0.2, top_p=0.9, min_new_tokens=250)
    assert sampling_dict(params) == {"max_new_tokens": 250, "min_new_tokens": 250,
                                     "temperature": 0.2, "top_p": 0.9}
    # the checkpoint's suppressed tokens (transformers applies them; SGLang reads a logit bias)
    assert sampling_dict(params, (0, 7))["logit_bias"] == {"0": -1e9, "7": -1e9}


def test_engine_args_span_the_gpus():
    args = engine_args(settings(), "/ckpt/llava", "cuda", 8)
    assert (args["model_path"], args["dp_size"], args["tp_size"], args["base_gpu_id"]) == ("/ckpt/llava", 8, 1, 0)
    assert args["load_format"] == "auto" and args["disable_radix_cache"] is False
    assert args["custom_sigquit_handler"] is on_child_failure  # a dead child must not kill the run
    args = engine_args(settings(sglang_tp_size=2, sglang_dummy_weights=True,
                                    sglang_radix_cache=False), "m", "cuda", 8)
    assert (args["dp_size"], args["load_format"], args["disable_radix_cache"]) == (4, "dummy", True)
    with pytest.raises(ConfigError):
        engine_args(settings(sglang_tp_size=2), "m", "cuda", 1)


def test_engine_args_on_one_gpu_and_on_the_cpu():
    one = engine_args(settings(sglang_tp_size=2), "m", "cuda:4", 8)
    assert (one["base_gpu_id"], one["tp_size"], one["dp_size"]) == (4, 2, 1)
    with pytest.raises(ConfigError):
        engine_args(settings(sglang_tp_size=2), "m", "cuda:7", 8)
    cpu = engine_args(settings(sglang_dp_size=3), "m", "cpu", 0)
    assert (cpu["device"], cpu["tp_size"], cpu["dp_size"], cpu["dtype"]) == ("cpu", 1, 1, "float16")
    assert cpu["attention_backend"] == "torch_native" and cpu["disable_cuda_graph"] is True
    assert cpu["max_total_tokens"] == CPU_KV_TOKENS and "mem_fraction_static" not in cpu
    assert engine_args(settings(sglang_max_total_tokens=4096), "m", "cpu")["max_total_tokens"] == 4096


def test_outputs_become_captions():
    out = {"text": "A bus.", "meta_info": {"prompt_tokens": 3000, "completion_tokens": 250,
                                           "cached_tokens": 180,
                                           "finish_reason": {"type": "length", "length": 250}}}
    caption = caption_from_output(out, 1.5, "m")
    assert (caption.text, caption.prompt_tokens, caption.output_tokens) == ("A bus.", 3000, 250)
    assert caption.finish_reason == "length" and caption.backend == "sglang"
    stop = caption_from_output({"text": "x", "meta_info": {"finish_reason": {"type": "stop"}}},
                               0.1, "m")
    assert stop.finish_reason == "stop"
    abort = caption_from_output(
        {"text": "", "meta_info": {"finish_reason": {"type": "abort", "message": "too long"}}},
        0.1, "m")
    assert abort.finish_reason == "error" and "too long" in abort.text


def test_explicit_sglang_without_sglang_is_a_config_error(monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    assert not sglang_available()
    with pytest.raises(ConfigError, match="not installed"):
        require_sglang()


@pytest.mark.parametrize("change", [{"sglang_window": 0}, {"sglang_mem_fraction": 1.0},
                                    {"sglang_tp_size": 0}, {"sglang_max_total_tokens": -1}])
def test_bad_settings_fail_validation(change):
    with pytest.raises(ConfigError):
        SglangConfig(**change).validate()


def test_request_carries_every_backends_chat_text_the_image_as_png_and_the_sampling_params(tiny_cache):
    import io

    import numpy as np
    from PIL import Image
    from transformers import AutoProcessor

    from models import tiny
    from models.caption.chat import chat_text

    processor = AutoProcessor.from_pretrained(tiny.ensure("caption", tiny_cache / "tiny"))
    image = np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8)
    sampling = sampling_dict(SamplingParams(max_new_tokens=250, min_new_tokens=250))
    prompt = _fusion("a bus", "bus: [0.1, 0.2, 0.3, 0.4]")
    request = generate_request(prompt, image, sampling, processor)
    assert set(request) == {"prompt", "image_data", "sampling_params"}
    assert request["prompt"] == chat_text(processor, prompt) == f"USER: <image>\n{prompt} ASSISTANT:"
    # bytes, never a PIL image (SGLang would take it for a video frame and skip AnyRes), lossless
    assert isinstance(request["image_data"], bytes)
    decoded = Image.open(io.BytesIO(request["image_data"]))
    assert decoded.format == "PNG" and np.array_equal(np.asarray(decoded.convert("RGB")), image)
    assert request["sampling_params"] is sampling
