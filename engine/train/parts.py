"""Which parameters of the caption engine train, and why; the same recipe for every family.

Where each part sits in a family's model is data in its ``TrainLayout``
(``models/caption/families.py``): the language model, the projector (LLaVA's
``multi_modal_projector``, Qwen-VL's patch ``merger``), the vision tower and its layer list.

Full fine-tuning (the default) trains the projector, the language model (embeddings and
head included) and the top ``--vision-layers`` layers of the vision tower that feed the
projector, at ``--vision-learning-rate``. The paper's engine is LLaVA-1.6 fine-tuned on
GPT-4V captions; LLaVA-1.6's own fine-tuning unfreezes the vision tower at a tenth of the
learning rate, and the paper's ablation (§4, "Vision Encoder") finds tuning the last 12 of
24 layers as good as all of them, so that is the default. Layers above the one the projector
reads (LLaVA's ``vision_feature_layer``, the penultimate; Qwen-VL's merger reads the last)
get no gradient and stay frozen, so distributed data parallel never waits for gradients
that never come.

LoRA (``--lora``) follows LLaVA's LoRA recipe: adapters on every linear layer of the
language model, the projector trained in full, the vision tower frozen.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass

from engine.train.config import LoraConfig, TrainConfig
from models.caption.families import TrainLayout

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class TrainedParts:
    description: str  # one line for the console and the training record
    trainable: int
    total: int


def part(model, path: str):
    """The module (or bare parameter, such as LLaVA's ``image_newline``) at a layout's dotted path."""
    return operator.attrgetter(path)(model)


def vision_layers_used(model, layout: TrainLayout) -> list:
    """The vision encoder layers whose output reaches the projector, bottom to top."""
    layers = list(part(model, layout.vision_layers))
    if layout.vision_feature_layer is None:
        return layers
    feature_layer = getattr(model.config, layout.vision_feature_layer)
    if not isinstance(feature_layer, int):  # a list of layers: the highest one counts
        feature_layer = max(feature_layer, key=lambda i: i % (len(layers) + 1))
    # hidden_states holds the embeddings then every layer's output: index -2 is layer n-2's output
    used = feature_layer % (len(layers) + 1)
    return layers[:used]


def layer_classes(model, layout: TrainLayout) -> list[str]:
    """The classes FSDP shards one by one: the decoder's and the vision encoder's layers, as this
    checkpoint builds them (LLaVA-1.6 comes with Llama, Mistral or Qwen2 decoders)."""
    return sorted({type(part(model, path)[0]).__name__ for path in (layout.language_layers, layout.vision_layers)})


def saved_modules(model, layout: TrainLayout) -> list[str]:
    """The projector's modules peft keeps trained copies of under LoRA. peft copies modules only:
    a module list (Qwen3-VL's DeepStack mergers) goes by its members, and a bare parameter of the
    projector stays as it is."""
    import torch

    paths = []
    for path in layout.projector:
        module = part(model, path)
        if isinstance(module, torch.nn.ModuleList):
            paths.extend(f"{path}.{index}" for index in range(len(module)))
        elif isinstance(module, torch.nn.Module):
            paths.append(path)
    return paths


def select_trainable(model, layout: TrainLayout, train: TrainConfig, lora: LoraConfig):
    """Freeze what does not train; returns the model to train (wrapped by peft for LoRA)."""
    model.requires_grad_(False)
    if lora.lora:
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        under = "|".join(re.escape(path) for path in layout.language_model)
        config = PeftLoraConfig(
            r=lora.lora_rank, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
            target_modules=rf"({under})\..*\.({'|'.join(LORA_TARGETS)})",
            modules_to_save=saved_modules(model, layout),
        )
        return get_peft_model(model, config)
    for path in (*layout.language_model, *layout.projector):
        part(model, path).requires_grad_(True)
    if train.vision_layers:
        for layer in vision_layers_used(model, layout)[-train.vision_layers:]:
            layer.requires_grad_(True)
    return model


def describe(model, layout: TrainLayout, train: TrainConfig, lora: LoraConfig) -> TrainedParts:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    if lora.lora:
        what = (f"LoRA rank {lora.lora_rank} on the language model's linear layers + the projector; "
                f"vision tower frozen")
    else:
        used = len(vision_layers_used(model, layout))
        vision = (f"top {min(train.vision_layers, used)} of {used} vision layers" if train.vision_layers
                  else "vision tower frozen")
        what = f"language model + projector + {vision}"
    return TrainedParts(f"{what}: {trainable:,} of {total:,} parameters train", trainable, total)


def parameter_groups(model, layout: TrainLayout, learning_rate: float, vision_learning_rate: float,
                     weight_decay: float):
    """AdamW groups: the vision tower at its own learning rate, everything else (the projector
    too, wherever it sits) at the main one."""
    def within(name: str, path: str) -> bool:
        return f".{path}." in f".{name}."  # peft prefixes the names (base_model.model.)

    vision, rest = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            in_vision = within(name, layout.vision_tower) and not any(within(name, p) for p in layout.projector)
            (vision if in_vision else rest).append(param)
    groups = [{"params": rest, "lr": learning_rate, "weight_decay": weight_decay}]
    if vision:
        groups.append({"params": vision, "lr": vision_learning_rate, "weight_decay": weight_decay})
    return groups
