"""Options of ``train`` and ``evaluate``, declared once; flags and YAML keys derive from them.

Defaults are the paper's recipe where it gives one (2 epochs of supervised fine-tuning of
LLaVA-1.6 7B on the meta dataset) and LLaVA-1.6's own fine-tuning recipe where it does not
(learning rate 2e-5 with cosine decay and 3% warm-up, no weight decay, global batch 128,
the vision tower at 2e-6, 4,096 tokens; LoRA rank 128, alpha 256, learning rate 2e-4).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from engine.core.config import check_output_folder, option
from models.errors import ConfigError

TRAIN_DTYPES = ("auto", "bfloat16", "float32")
DEFAULT_CACHE = str(Path.home() / ".cache" / "densefusion")


@dataclass(frozen=True)
class TrainConfig:
    base: str = option("llava-hf/llava-v1.6-vicuna-7b-hf",
                       "model to fine-tune: local folder or hub id of a LLaVA-1.6 (llava-hf) or Qwen2.5-VL "
                       "checkpoint (the family comes from its config.json), or 'tiny' (a random-weight "
                       "LLaVA-NeXT, for trying the command out)")
    out: str = option("", "folder of the fine-tuned engine (loads with `run --caption-model OUT`); "
                          "checkpoints go to OUT/checkpoints/")
    epochs: float = option(2.0, "passes over the training samples (the paper: 2)")
    max_steps: int = option(0, "stop after this many optimizer steps (0: --epochs decide)")
    batch_size: int = option(4, "samples per device per forward pass")
    global_batch: int = option(128, "samples per optimizer step over all devices "
                                    "(gradient accumulation makes up the difference)")
    learning_rate: float = option(0.0, "peak learning rate (0: 2e-5, or 2e-4 with --lora)")
    vision_learning_rate: float = option(2e-6, "learning rate of the trained vision-tower layers")
    vision_layers: int = option(12, "train the top N layers of the vision tower that feed the projector "
                                    "(0 freezes it; the paper tunes the last 12 of CLIP-L's 24)")
    warmup_ratio: float = option(0.03, "share of the steps spent warming the learning rate up")
    weight_decay: float = option(0.0, "AdamW weight decay")
    max_grad_norm: float = option(1.0, "gradient clipping norm (0: off)")
    max_length: int = option(4096, "tokens per sample (prompt + image + caption); longer captions are cut, "
                                   "samples whose prompt alone is longer are left out")
    caption_max_side: int = option(1344, "longer side of the image handed to the processor (as in `run`)")
    gradient_checkpointing: bool = option(True, "recompute activations in the backward pass (less memory)")
    dtype: str = option("auto", "auto: bfloat16 mixed precision on GPUs, float32 on the CPU",
                        choices=TRAIN_DTYPES)
    device: str = option("auto", "auto (the GPUs when there are any), cpu or cuda; under torchrun/accelerate "
                                 "each process takes its own GPU", choices=("auto", "cpu", "cuda"))
    seed: int = option(0, "seed of the data order, the held-out split and the initialisation of new weights")
    held_out_share: float = option(0.02, "share of the samples kept out of training for `evaluate` "
                                         "(at least one when there are two or more)")
    save_every: int = option(500, "write a checkpoint every N optimizer steps (and at the end)")
    keep_checkpoints: int = option(2, "keep the newest N checkpoints")
    resume: bool = option(False, "continue from the newest checkpoint in OUT/checkpoints/")
    log_every: int = option(10, "print loss and learning rate every N steps (all go to OUT/metrics.jsonl)")
    loader_workers: int = option(2, "processes preparing batches (images, AnyRes tiles, tokens)")
    cache_dir: str = option(DEFAULT_CACHE, "where the tiny model is built")

    def validate(self) -> None:
        if not self.out:
            raise ConfigError("--out is required: the folder to write the fine-tuned engine to")
        check_output_folder(Path(self.out))
        if self.epochs <= 0 and self.max_steps <= 0:
            raise ConfigError("--epochs must be > 0 (or give --max-steps)")
        if min(self.batch_size, self.global_batch, self.save_every, self.keep_checkpoints, self.log_every) < 1:
            raise ConfigError("--batch-size, --global-batch, --save-every, --keep-checkpoints and "
                              "--log-every must be >= 1")
        if self.global_batch % self.batch_size:
            raise ConfigError(f"--global-batch {self.global_batch} must be a multiple of --batch-size "
                              f"{self.batch_size} (times the number of processes)")
        if not 0.0 <= self.held_out_share < 1.0 or not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError("--held-out-share and --warmup-ratio must be in [0, 1)")
        if self.learning_rate < 0 or self.vision_learning_rate < 0 or self.vision_layers < 0:
            raise ConfigError("learning rates and --vision-layers must be >= 0")
        if self.max_length < 64 or self.caption_max_side < 32 or self.loader_workers < 0:
            raise ConfigError("--max-length must be >= 64, --caption-max-side >= 32, --loader-workers >= 0")


@dataclass(frozen=True)
class LoraConfig:
    lora: bool = option(False, "train LoRA adapters on the language model (and the projector in full) "
                               "instead of full fine-tuning; the adapters are merged into the saved model")
    lora_rank: int = option(128, "LoRA rank")
    lora_alpha: int = option(256, "LoRA alpha (scale = alpha / rank)")
    lora_dropout: float = option(0.05, "dropout on the LoRA path")

    def validate(self) -> None:
        if self.lora_rank < 1 or self.lora_alpha < 1 or not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError("--lora-rank and --lora-alpha must be >= 1, --lora-dropout in [0, 1)")

    def learning_rate(self, given: float) -> float:
        return given or (2e-4 if self.lora else 2e-5)


@dataclass(frozen=True)
class TrainRunConfig:
    train: TrainConfig = TrainConfig()
    lora: LoraConfig = LoraConfig()

    def validate(self) -> TrainRunConfig:
        self.train.validate()
        self.lora.validate()
        return self
