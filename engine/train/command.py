"""``python densefusion_local.py train META_OUT --base MODEL --out CKPT``: the CLI of ``engine.train.loop``."""

from __future__ import annotations

import argparse
from pathlib import Path

from engine.core import config as config_module
from engine.train.config import TrainRunConfig

EXAMPLES = """\
    # one process (a GPU, or the CPU with --base tiny to try it out)
    python densefusion_local.py train /data/meta --base llava-hf/llava-v1.6-vicuna-7b-hf --out /ckpt/engine
    # Qwen2.5-VL instead of LLaVA-1.6: the same recipe
    python densefusion_local.py train /data/meta --base Qwen/Qwen2.5-VL-7B-Instruct --out /ckpt/engine-qwen
    # one node, 8 GPUs, FSDP (full fine-tuning of the 7B model)
    accelerate launch --config_file engine/train/fsdp_8gpu.yaml densefusion_local.py train /data/meta \\
        --base llava-hf/llava-v1.6-vicuna-7b-hf --out /ckpt/engine
    # stopped? the same command with --resume continues from the newest checkpoint
"""


EPILOG = """\
META_OUT is a `meta` output folder (its sft/densefusion_sft.json), an `export sft` folder, or
that JSON file. Each sample: the human turn is the caption-engine prompt with the image, the
target is GPT-4V's caption; only the caption's tokens carry loss. --held-out-share of the
samples never train: `evaluate CKPT --meta META_OUT` captions them.

--base is a LLaVA-1.6 (llava-hf) or Qwen2.5-VL checkpoint; the family comes from its config.json.
Writes CKPT/ (a checkpoint of the base's family: `run --caption-model CKPT` loads it), CKPT/metrics.jsonl
(loss, learning rate, gradient norm per step; held-out loss per epoch), CKPT/checkpoints/
(every --save-every steps; --resume continues from the newest with the same data order) and
CKPT/densefusion_train.json (what was trained, on what, and the held-out keys).

Several GPUs: launch the same command with `torchrun --nproc_per_node 8 densefusion_local.py
train ...` (data parallel) or `accelerate launch --config_file engine/train/fsdp_8gpu.yaml
densefusion_local.py train ...` (FSDP: parameters, gradients and optimizer state sharded).
--global-batch stays the same whatever the number of processes.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = f"{parser.description}\n\n{EXAMPLES}"
    parser.usage = "%(prog)s META_OUT --base MODEL --out CKPT [OPTIONS]  (--help lists them)"
    parser.epilog = EPILOG
    parser.add_argument("data", type=Path, metavar="META_OUT",
                        help="`meta` output folder, `export sft` folder, or densefusion_sft.json")
    parser.add_argument("--config", metavar="YAML", help="YAML file with sections train: and lora:; flags override it")
    config_module.add_arguments(parser, cls=TrainRunConfig)


def command(args: argparse.Namespace) -> int:
    from engine.train.loop import train

    cfg = config_module.build(args, args.config, cls=TrainRunConfig)
    result = train(args.data, cfg)
    if not result.main_process:
        return 0
    if result.losses:
        print(f"train: loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f} over steps "
              f"{result.resumed_from + 1}-{result.steps}"
              + (f", held-out loss {result.held_out_loss:.4f}" if result.held_out_loss is not None else ""))
    print(f"train: engine written to {result.out} (caption with `run --caption-model {result.out}`; "
          f"evaluate with `evaluate {result.out} --meta {args.data}`)")
    return 0
