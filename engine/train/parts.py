"""Which parameters of LLaVA-NeXT train, and why.

Full fine-tuning (the default) trains the projector, the language model (embeddings and
head included) and the top ``--vision-layers`` layers of the vision tower that feed the
projector, at ``--vision-learning-rate``. The paper's engine is LLaVA-1.6 fine-tuned on
GPT-4V captions; LLaVA-1.6's own fine-tuning unfreezes the vision tower at a tenth of the
learning rate, and the paper's ablation (§4, "Vision Encoder") finds tuning the last 12 of
24 layers as good as all of them, so that is the default. Layers above the one LLaVA reads
its features from (``vision_feature_layer``, the penultimate) get no gradient and stay
frozen, so distributed data parallel never waits for gradients that never come.

LoRA (``--lora``) follows LLaVA's LoRA recipe: adapters on every linear layer of the
language model, the projector trained in full, the vision tower frozen.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.train.config import LoraConfig, TrainConfig

PROJECTOR = "multi_modal_projector"


@dataclass(frozen=True)
class TrainedParts:
    description: str  # one line for the console and the training record
    trainable: int
    total: int


def vision_layers_used(model) -> list:
    """The vision encoder layers whose output reaches the projector, bottom to top."""
    layers = list(model.model.vision_tower.encoder.layers)
    feature_layer = model.config.vision_feature_layer
    if not isinstance(feature_layer, int):  # a list of layers: the highest one counts
        feature_layer = max(feature_layer, key=lambda i: i % (len(layers) + 1))
    # hidden_states holds the embeddings then every layer's output: index -2 is layer n-2's output
    used = feature_layer % (len(layers) + 1)
    return layers[:used]


def select_trainable(model, train: TrainConfig, lora: LoraConfig):
    """Freeze what does not train; returns the model to train (wrapped by peft for LoRA)."""
    model.requires_grad_(False)
    if lora.lora:
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        config = PeftLoraConfig(
            r=lora.lora_rank, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
            target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
            modules_to_save=[PROJECTOR],
        )
        return get_peft_model(model, config)
    model.model.language_model.requires_grad_(True)
    model.lm_head.requires_grad_(True)
    model.model.multi_modal_projector.requires_grad_(True)
    model.model.image_newline.requires_grad_(True)
    if train.vision_layers:
        for layer in vision_layers_used(model)[-train.vision_layers:]:
            layer.requires_grad_(True)
    return model


def describe(model, train: TrainConfig, lora: LoraConfig) -> TrainedParts:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    if lora.lora:
        what = (f"LoRA rank {lora.lora_rank} on the language model's linear layers + the projector; "
                f"vision tower frozen")
    else:
        used = len(vision_layers_used(model))
        vision = (f"top {min(train.vision_layers, used)} of {used} vision layers" if train.vision_layers
                  else "vision tower frozen")
        what = f"language model + projector + {vision}"
    return TrainedParts(f"{what}: {trainable:,} of {total:,} parameters train", trainable, total)


def parameter_groups(model, learning_rate: float, vision_learning_rate: float, weight_decay: float):
    """AdamW groups: the vision tower at its own learning rate, everything else at the main one."""
    vision, rest = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (vision if ".vision_tower." in f".{name}" else rest).append(param)
    groups = [{"params": rest, "lr": learning_rate, "weight_decay": weight_decay}]
    if vision:
        groups.append({"params": vision, "lr": vision_learning_rate, "weight_decay": weight_decay})
    return groups
