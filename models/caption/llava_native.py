"""llava-hf LLaVA-NeXT checkpoints rewritten into the original LLaVA layout SGLang serves natively.

sglang 0.5.23 has no native class for llava-hf's ``LlavaNextForConditionalGeneration``: it
serves that layout through its Transformers fallback, which turns the radix cache (and chunked
prefill) off for multimodal models, so the fusion instruction's KV would be recomputed for
every image. Its native ``LlavaLlamaForCausalLM`` / ``LlavaMistralForCausalLM`` /
``LlavaQwenForCausalLM`` read the layout of ``liuhaotian/llava-v1.6-*`` (and of any caption
engine fine-tuned with the LLaVA code base): flat language-model config keys plus ``mm_*``
keys, the projector as ``model.mm_projector.{0,2}``, and a CLIP vision tower in a folder
named by ``mm_vision_tower``. :func:`convert` writes that layout from a llava-hf folder — the
same tensors under new names, nothing recomputed — and :func:`ensure_native` caches the
result (keyed by the source's files), so a run converts once and reuses it afterwards.

Traps this layout has (measured on sglang 0.5.23): the vision tower is only loaded when the
``mm_vision_tower`` string contains ``clip`` (or ``siglip``); the image processor and tokenizer
come from ``AutoProcessor`` on the converted folder, so their files are copied beside it.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
from pathlib import Path

from models.errors import ConfigError

CONVERTER_VERSION = 1  # bump when the written layout changes: cached conversions are then redone
LLAVA_HF_NEXT = "LlavaNextForConditionalGeneration"
# llava-hf text model type -> SGLang's native LLaVA class for it (sglang/srt/models/llava.py)
NATIVE_CLASSES = {
    "llama": "LlavaLlamaForCausalLM",
    "mistral": "LlavaMistralForCausalLM",
    "qwen2": "LlavaQwenForCausalLM",
}
VISION_FOLDER = "clip-vision-tower"  # SGLang loads the tower only if this path says "clip"
# llava-hf's vision_feature_select_strategy -> LLaVA's mm_vision_select_feature
_SELECT_FEATURE = {"default": "patch", "full": "cls_patch"}
_WEIGHT_RENAMES = (  # llava-hf name (both the hub's and transformers 5's save layout) -> original
    (re.compile(r"^(?:model\.language_model|language_model\.model)\."), "model."),
    (re.compile(r"^(?:language_model\.)?lm_head\."), "lm_head."),
    (re.compile(r"^(?:model\.)?vision_tower\.(?:vision_model\.)?"), "model.vision_tower.vision_tower.vision_model."),
    (re.compile(r"^(?:model\.)?multi_modal_projector\.linear_1\."), "model.mm_projector.0."),
    (re.compile(r"^(?:model\.)?multi_modal_projector\.linear_2\."), "model.mm_projector.2."),
    (re.compile(r"^(?:model\.)?image_newline$"), "model.image_newline"),
)
_VISION_PREFIX = "model.vision_tower.vision_tower."
# written anew rather than copied (the processor files describe LLaVA-NeXT's own image processor)
_REWRITTEN_FILES = ("config.json", "model.safetensors.index.json", "processor_config.json",
                    "preprocessor_config.json")


def read_config(folder: Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ConfigError(f"caption model folder {folder} has no config.json")
    return json.loads(path.read_text())


def architecture(config: dict) -> str:
    return (config.get("architectures") or [""])[0]


def native_weight_name(name: str) -> str:
    """The original-layout name of a llava-hf LLaVA-NeXT tensor."""
    for pattern, replacement in _WEIGHT_RENAMES:
        renamed, hits = pattern.subn(replacement, name, count=1)
        if hits:
            return renamed
    raise ConfigError(f"llava-hf weight {name!r} has no counterpart in the original LLaVA layout")


def native_config(hf: dict, vision_folder: str) -> dict:
    """The original layout's config: the language model's keys flat, plus LLaVA's ``mm_*`` keys."""
    text, vision = dict(hf["text_config"]), hf["vision_config"]
    model_type = text.get("model_type", "llama")
    if model_type not in NATIVE_CLASSES:
        raise ConfigError(
            f"LLaVA-NeXT with a {model_type!r} language model: SGLang has native LLaVA classes "
            f"only for {', '.join(sorted(NATIVE_CLASSES))}; use --caption-backend transformers"
        )
    select = hf.get("vision_feature_select_strategy", "default")
    layer = hf.get("vision_feature_layer", -2)
    if select not in _SELECT_FEATURE or not isinstance(layer, int):
        raise ConfigError(f"LLaVA-NeXT vision features {select!r} from layer(s) {layer!r}: the original "
                          f"layout takes one layer and 'default' or 'full'")
    rope = text.pop("rope_parameters", None) or {}
    if "rope_theta" in rope and "rope_theta" not in text:  # transformers 5 nests it; LLaVA reads it flat
        text["rope_theta"] = rope["rope_theta"]
    text.pop("model_type", None)
    text.pop("architectures", None)
    return {
        **text,
        "architectures": [NATIVE_CLASSES[model_type]],
        "model_type": "llava",
        "torch_dtype": hf.get("dtype") or hf.get("torch_dtype") or text.get("dtype") or "float16",
        "image_token_index": hf["image_token_index"],
        "image_aspect_ratio": "anyres",
        "image_grid_pinpoints": hf["image_grid_pinpoints"],
        "mm_patch_merge_type": "spatial_unpad",
        "mm_hidden_size": vision["hidden_size"],
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": layer,
        "mm_vision_select_feature": _SELECT_FEATURE[select],
        "mm_vision_tower": vision_folder,
        "tie_word_embeddings": hf.get("tie_word_embeddings", text.get("tie_word_embeddings", False)),
    }


def convert(src: Path, out: Path) -> Path:
    """Write the original layout of the llava-hf LLaVA-NeXT folder ``src`` into ``out``.

    Written into a temporary sibling and renamed into place: a crash leaves no half folder,
    and a concurrent conversion of the same source loses the race harmlessly.
    """
    src, out = Path(src), Path(out).absolute()
    hf = read_config(src)
    if architecture(hf) != LLAVA_HF_NEXT:
        raise ConfigError(f"{src}: expected a llava-hf {LLAVA_HF_NEXT} checkpoint, found "
                          f"{architecture(hf) or 'no architecture'}")
    shards = sorted(src.glob("*.safetensors"))
    if not shards:
        raise ConfigError(f"{src}: no *.safetensors weights (convert .bin checkpoints to safetensors first)")
    config = native_config(hf, str(out / VISION_FOLDER))  # the final path: the folder is renamed into it
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        _write(src, scratch, hf, config, shards)
        try:
            scratch.rename(out)
        except OSError:
            if not (out / "config.json").is_file():  # not a concurrent conversion that won the race
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return out


def _write(src: Path, folder: Path, hf: dict, config: dict, shards: list[Path]) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    vision: dict = {}
    index: dict[str, str] = {}
    for shard in shards:
        tensors = {}
        with safe_open(str(shard), "pt") as weights:
            for name in weights.keys():
                native = native_weight_name(name)
                tensors[native] = weights.get_tensor(name)
                if native.startswith(_VISION_PREFIX):  # the tower's own folder, CLIPVisionModel names
                    vision[native[len(_VISION_PREFIX):]] = tensors[native]
        save_file(tensors, str(folder / shard.name), metadata={"format": "pt"})
        index.update(dict.fromkeys(tensors, shard.name))
        del tensors
    if len(shards) > 1:
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    tower = folder / VISION_FOLDER
    tower.mkdir()
    save_file(vision, str(tower / "model.safetensors"), metadata={"format": "pt"})
    tower_config = {**hf["vision_config"], "architectures": ["CLIPVisionModel"],
                    "model_type": "clip_vision_model", "torch_dtype": config["torch_dtype"]}
    (tower / "config.json").write_text(json.dumps(tower_config, indent=2))
    # tokenizer, chat template, generation config: everything but weights, config and processor
    for item in src.iterdir():
        if item.is_file() and item.suffix != ".safetensors" and item.name not in _REWRITTEN_FILES:
            shutil.copy2(item, folder / item.name)
    _write_processor(src, folder)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "densefusion-native.json").write_text(json.dumps(
        {"converted_from": str(src.absolute()), "converter_version": CONVERTER_VERSION}, indent=2))


def _write_processor(src: Path, folder: Path) -> None:
    """The original layout's processor: a CLIP image processor with the source's sizes and
    normalisation. SGLang tiles AnyRes itself and runs the image processor on each tile; the
    llava-hf LLaVA-NeXT image processor would tile each tile again."""
    from transformers import AutoProcessor, CLIPImageProcessor, LlavaProcessor

    source = AutoProcessor.from_pretrained(src)
    image = source.image_processor
    clip = CLIPImageProcessor(
        size=dict(image.size), crop_size=dict(image.crop_size), image_mean=list(image.image_mean),
        image_std=list(image.image_std), resample=image.resample, rescale_factor=image.rescale_factor,
        do_convert_rgb=True,
    )
    LlavaProcessor(
        image_processor=clip, tokenizer=source.tokenizer, patch_size=source.patch_size,
        vision_feature_select_strategy=source.vision_feature_select_strategy,
        num_additional_image_tokens=source.num_additional_image_tokens,
        chat_template=source.chat_template,
    ).save_pretrained(folder)


def source_fingerprint(src: Path) -> str:
    """Key of a conversion: the converter's version and every source file's name, size and mtime."""
    digest = hashlib.sha256(f"{CONVERTER_VERSION}\n{src.resolve()}\n".encode())
    for item in sorted(src.iterdir()):
        if item.is_file():
            stat = item.stat()
            digest.update(f"{item.name}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def ensure_native(path: str, cache_dir: Path) -> str:
    """The folder SGLang should load for ``path``: a llava-hf LLaVA-NeXT checkpoint is converted
    once into ``cache_dir/llava-native/<fingerprint>`` and reused; anything else is returned as is
    (:func:`check_native` decides whether SGLang serves it natively)."""
    folder = Path(path).expanduser()
    if not folder.is_dir():  # a hub id: the files the hub client has (or fetches) locally
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(path))
    if architecture(read_config(folder)) != LLAVA_HF_NEXT:
        return str(folder)
    target = Path(cache_dir) / "llava-native" / f"{folder.name}-{source_fingerprint(folder)}"
    if not (target / "config.json").is_file():
        convert(folder, target)
    return str(target)


def is_multimodal(config: dict) -> bool:
    return any(key in config for key in ("vision_config", "mm_vision_tower", "image_token_index",
                                         "image_token_id", "vision_tower"))


def check_native(path: str, native_architectures: set[str]) -> None:
    """Refuse a multimodal checkpoint SGLang would serve through its Transformers fallback: for
    multimodal models that fallback runs without the radix cache (silently slower)."""
    config = read_config(Path(path))
    name = architecture(config)
    if is_multimodal(config) and name not in native_architectures:
        raise ConfigError(
            f"caption model {path} ({name or 'no architecture'}): SGLang has no native class for it and "
            f"would serve it through its Transformers fallback, which disables the radix cache for "
            f"multimodal models. Pass a llava-hf LLaVA-NeXT checkpoint (converted automatically), "
            f"an original-layout LLaVA folder (python -m models.export llava-native SRC --out DIR), "
            f"or use --caption-backend transformers"
        )

