"""Caption engine families: which vision-language models the caption stage serves, and how.

A family is picked from the checkpoint's own ``config.json`` (its ``architectures``, else its
``model_type``), never from its name: a fine-tuned folder may be called anything. A checkpoint of
no known family is refused before any work, with the list of the families there are.

What differs between families is data here, not branches in the backends: the prompt itself is
the same for all (``models/caption/chat.py``: the fusion prompt, then the image, in the
checkpoint's chat template, which decides where the image placeholder goes), and every backend
reads the checkpoint's own processor for the image's tokens (LLaVA's AnyRes tiles, Qwen's
dynamic resolution bounded by the processor's ``min_pixels``/``max_pixels``, InternVL's 448 px
tiles up to the processor's ``max_patches`` plus a thumbnail). What ``train`` needs of a family
is its ``TrainLayout``: where its language model, projector and vision layers sit, and how its
processor's inputs batch; a family without one captions but does not train.

Each family has a tiny random-weight build in ``models/tiny.py`` and is tested through ``run``
(``tests/test_caption_families.py``). A family SGLang cannot serve natively here says why in
``sglang_refusal``, and ``--caption-backend sglang`` refuses it before any work
(:func:`require_backend`) instead of SGLang falling back to its Transformers path in silence.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from models.errors import ConfigError


def anyres_image_tokens(config, folder: Path | None) -> int:
    """LLaVA-NeXT's most tokens for one image: the base tile, the largest pinpoint's grid of
    tiles and a newline token per row of the grid."""
    vision = config.vision_config
    per_tile = (vision.image_size // vision.patch_size) ** 2
    tiles = max(w * h for w, h in config.image_grid_pinpoints) // vision.image_size**2
    return per_tile * (1 + tiles) + int(math.sqrt(per_tile * tiles))


def dynamic_resolution_image_tokens(config, folder: Path | None) -> int:
    """Qwen-VL's most tokens for one image: its processor's max_pixels over the pixels one token
    covers (a patch merged merge_size x merge_size)."""
    from transformers import AutoImageProcessor

    if folder is None:
        raise ConfigError("the image budget of a Qwen-VL checkpoint is its processor's max_pixels: pass a local "
                          "folder")
    processor = AutoImageProcessor.from_pretrained(folder)
    return processor.size["longest_edge"] // (processor.patch_size * processor.merge_size) ** 2


# How `train` batches one processor output of a sample (engine/train/data.py collate):
ROWS = "rows"  # rows of one sample's images (Qwen's flat patches, grid sizes): concatenated
TILES = "tiles"  # one sample's image as a stack of tiles (LLaVA's AnyRes): zero tiles pad, then concatenated
TOKENS = "tokens"  # one value per prompt token (Qwen's mm_token_type_ids): 0 past the prompt and in padding
BATCHING = (ROWS, TILES, TOKENS)


@dataclass(frozen=True)
class TrainLayout:
    """What `train` must know of a family's model (engine/train/parts.py, data.py): dotted paths
    from the ``...ForConditionalGeneration`` model, and how its processor's inputs batch."""

    language_model: tuple[str, ...]  # trained in full (LoRA: adapters on its linear layers)
    language_layers: str  # the decoder's layer list (FSDP shards each layer on its own)
    projector: tuple[str, ...]  # vision -> language connector: trained in full, under LoRA too
    vision_tower: str  # its parameters (the projector's aside) train at --vision-learning-rate
    vision_layers: str  # the vision encoder's layer list, bottom to top
    # config attribute naming the vision layer whose output the projector reads (layers above it
    # get no gradient and stay frozen); None: the top layer's
    vision_feature_layer: str | None
    # processor outputs beside input_ids and attention_mask, each with its batching (ROWS, TILES, TOKENS)
    inputs: tuple[tuple[str, str], ...]

    def __post_init__(self) -> None:
        unknown = [f"{name}: {how}" for name, how in self.inputs if how not in BATCHING]
        if unknown:
            raise ValueError(f"TrainLayout.inputs: unknown batching ({', '.join(unknown)}); one of {BATCHING}")


def tile_image_tokens(config, folder: Path | None) -> int:
    """InternVL's most tokens for one image: its processor's max_patches tiles plus the thumbnail
    (added whenever an image takes more than one tile), image_seq_length tokens each, between
    <img> and </img>."""
    from transformers import AutoImageProcessor

    if folder is None:
        raise ConfigError("the image budget of an InternVL checkpoint is its processor's max_patches: pass a local "
                          "folder")
    processor = AutoImageProcessor.from_pretrained(folder)
    tiles = processor.max_patches + 1 if processor.crop_to_patches and processor.max_patches > 1 else 1
    return tiles * config.image_seq_length + 2


QWEN_VL_TRAIN = TrainLayout(
    language_model=("model.language_model", "lm_head"),
    language_layers="model.language_model.layers",
    projector=("model.visual.merger",),  # inside the vision model, trained like LLaVA's projector
    vision_tower="model.visual",
    vision_layers="model.visual.blocks",
    vision_feature_layer=None,  # the merger reads the last block
    # the flat patches of every image and each image's (t, h, w) grid; the token types place
    # the image in M-RoPE's 3-D positions (without them the model falls back to 1-D positions)
    inputs=(("pixel_values", ROWS), ("image_grid_thw", ROWS), ("mm_token_type_ids", TOKENS)),
)


@dataclass(frozen=True)
class CaptionFamily:
    name: str
    architectures: tuple[str, ...]  # config.json "architectures" of its checkpoints (any layout)
    model_types: tuple[str, ...]  # config.json "model_type", for a config without architectures
    image_budget: str  # what bounds one image's tokens (the processor's settings named)
    # The template puts the image after the fusion prompt's text, so the instruction before it is a
    # prefix every request shares (SGLang's radix cache reuses it); else only the turn's head is.
    instruction_before_image: bool
    sglang_dtype: str  # the dtype SGLang runs it in ("auto": the checkpoint's)
    # Why SGLang cannot serve it natively here ("" where it does): --caption-backend sglang refuses
    # it with this before any work, rather than letting SGLang fall back to its Transformers path
    sglang_refusal: str
    sglang_conversion: bool  # SGLang serves a converted copy (models/caption/llava_native.py)
    hf_config: str  # its transformers config class (`plan` builds the model from it on the meta device)
    max_image_tokens: Callable  # (that config, checkpoint folder or None) -> most tokens one image takes
    train: TrainLayout | None = None  # None: `train` refuses it (captioning works)


LLAVA_1_6 = CaptionFamily(
    name="LLaVA-1.6",
    architectures=("LlavaNextForConditionalGeneration", "LlavaLlamaForCausalLM", "LlavaMistralForCausalLM",
                   "LlavaQwenForCausalLM"),
    model_types=("llava_next",),
    image_budget="AnyRes: a grid of base-size tiles from image_grid_pinpoints plus an overview",
    instruction_before_image=False,  # llava-hf templates put the image first, as LLaVA's training did
    # sglang 0.5.23 loads LLaVA's vision tower in float16 whatever it is told (models/llava.py)
    sglang_dtype="float16",
    sglang_refusal="",
    sglang_conversion=True,
    hf_config="LlavaNextConfig",
    max_image_tokens=anyres_image_tokens,
    train=TrainLayout(
        language_model=("model.language_model", "lm_head"),
        language_layers="model.language_model.layers",
        projector=("model.multi_modal_projector", "model.image_newline"),
        vision_tower="model.vision_tower",
        vision_layers="model.vision_tower.encoder.layers",
        vision_feature_layer="vision_feature_layer",  # the penultimate CLIP layer
        inputs=(("pixel_values", TILES), ("image_sizes", ROWS)),
    ),
)
QWEN2_5_VL = CaptionFamily(
    name="Qwen2.5-VL",
    architectures=("Qwen2_5_VLForConditionalGeneration",),
    model_types=("qwen2_5_vl",),
    image_budget="dynamic resolution: min_pixels..max_pixels, one token per 28x28 pixels",
    instruction_before_image=True,  # its template keeps the turn's order: text, then image
    sglang_dtype="auto",
    sglang_refusal="",
    sglang_conversion=False,
    hf_config="Qwen2_5_VLConfig",
    max_image_tokens=dynamic_resolution_image_tokens,
    train=QWEN_VL_TRAIN,
)
QWEN3_VL = CaptionFamily(
    name="Qwen3-VL",
    architectures=("Qwen3VLForConditionalGeneration",),
    model_types=("qwen3_vl",),
    image_budget="dynamic resolution: the processor's size shortest_edge..longest_edge in pixels, one token "
                 "per 32x32 pixels",
    instruction_before_image=True,  # its template keeps the turn's order and has no default system turn
    sglang_dtype="auto",
    sglang_refusal="",
    sglang_conversion=False,
    hf_config="Qwen3VLConfig",
    max_image_tokens=dynamic_resolution_image_tokens,
    # DeepStack's mergers (intermediate vision blocks into the first decoder layers) train with the merger
    train=dataclasses.replace(QWEN_VL_TRAIN, projector=("model.visual.merger", "model.visual.deepstack_merger_list")),
)
INTERNVL = CaptionFamily(
    name="InternVL",
    architectures=("InternVLForConditionalGeneration",),
    model_types=("internvl",),
    image_budget="tiles: 448 px tiles, the processor's min_patches..max_patches plus a thumbnail, "
                 "image_seq_length tokens each",
    instruction_before_image=True,  # its template keeps the turn's order and has no default system turn
    sglang_dtype="auto",
    sglang_refusal=(
        "SGLang 0.5.23 serves InternVL only in its original remote-code layout (InternVLChatModel, "
        "sglang/srt/models/internvl.py), not transformers' InternVLForConditionalGeneration (its Transformers "
        "fallback turns the radix cache off), and no conversion is offered: a converted copy loads and serves, "
        "but SGLang's InternVL processor (sglang/srt/multimodal/processors/internvl.py) tiles with its own code, "
        "at up to 12 tiles whatever the checkpoint's processor says, and not as transformers' processor does "
        "(measured at 12 tiles: a 500x500 image takes 10 tiles there, 1 in transformers), so the captions would "
        "not be transformers' or train's"),
    sglang_conversion=False,
    hf_config="InternVLConfig",
    max_image_tokens=tile_image_tokens,
)
FAMILIES = (LLAVA_1_6, QWEN2_5_VL, QWEN3_VL, INTERNVL)


def supported() -> str:
    return "; ".join(f"{f.name} ({', '.join(f.architectures)})" for f in FAMILIES)


def require_backend(family: CaptionFamily, backend: str, model: str) -> None:
    """Before any work: ``backend`` serves checkpoints of ``family`` (ConfigError saying why not)."""
    if backend == "sglang" and family.sglang_refusal:
        raise ConfigError(f"caption model {model!r} ({family.name}): --caption-backend sglang cannot serve this "
                          f"family: {family.sglang_refusal}. Use --caption-backend transformers")


def family_of(config: dict, model: str) -> CaptionFamily:
    """The family of a checkpoint whose config.json holds ``config``; ConfigError if none."""
    architectures = config.get("architectures") or []
    for family in FAMILIES:
        if any(a in family.architectures for a in architectures):
            return family
    if not architectures:
        for family in FAMILIES:
            if config.get("model_type") in family.model_types:
                return family
    found = ", ".join(architectures) or f"model_type {config.get('model_type')!r}"
    raise ConfigError(f"caption model {model!r} is a {found} checkpoint, which no caption engine family "
                      f"serves. Supported: {supported()}")


def family_of_folder(folder: str | Path, model: str | None = None) -> CaptionFamily:
    """The family of the checkpoint folder ``folder`` (``model``: its name in messages)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ConfigError(f"caption model {model or folder}: {path} is missing (a checkpoint folder holds "
                          f"config.json beside its weights)")
    return family_of(json.loads(path.read_text()), model or str(folder))


def local_family(model: str) -> CaptionFamily | None:
    """The family of ``model`` where it is a local checkpoint folder; None for a hub id or a
    model role (read when the model resolves)."""
    folder = Path(model).expanduser() if model else None
    return family_of_folder(folder, model) if folder is not None and (folder / "config.json").is_file() else None


def family_for(path: str, model: str | None = None) -> CaptionFamily:
    """The family of the checkpoint at ``path``: a folder, or a hub id (its config.json only)."""
    folder = Path(path).expanduser()
    if folder.is_dir():
        return family_of_folder(folder, model)
    from huggingface_hub import hf_hub_download

    return family_of_folder(Path(hf_hub_download(path, "config.json")).parent, model or path)
