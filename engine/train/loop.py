"""The training loop: one process per device under torchrun/accelerate, or one alone.

``accelerate`` holds the distributed parts (DDP, or FSDP from an accelerate config such as
``engine/train/fsdp_8gpu.yaml``), bf16 mixed precision on GPUs and the checkpointed state;
the data order, gradient accumulation, logging and the checkpoint schedule are written here.
Each optimizer step reads one global batch (``DataOrder``); every ``--save-every`` steps a
checkpoint is sealed (``checkpoints.py``), and ``--resume`` restores the newest one and
carries on with the batch after it, so an interrupted and resumed run ends with the weights
of an uninterrupted one. The finished model is written with ``save_pretrained`` next to the
base model's processor files, so ``run --caption-model OUT`` loads it unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.io.manifest import write_json_atomic
from engine.train import checkpoints
from engine.train.config import TrainConfig, TrainRunConfig
from engine.train.data import (
    DataOrder,
    EncodedRecords,
    MetaRecord,
    SampleEncoder,
    collate,
    held_out_keys,
    prompt_token_counts,
    read_records,
)
from engine.train.parts import describe, layer_classes, parameter_groups, select_trainable
from models.caption.chat import check_chat_template
from models.caption.families import FAMILIES, TrainLayout, family_for
from models.errors import ConfigError

METRICS = "metrics.jsonl"
RECORD = "densefusion_train.json"  # written last: its presence means the engine is complete


@dataclass(frozen=True)
class TrainResult:
    out: Path
    steps: int
    resumed_from: int  # 0: a fresh start
    losses: list[float]  # per optimizer step, from the first step this invocation ran
    held_out: list[str]
    held_out_loss: float | None
    main_process: bool  # under a launcher, only the main process reports


def check_out(train: TrainConfig) -> None:
    """Before anything loads: a finished engine is never overwritten, a stopped run never
    silently restarted."""
    out = Path(train.out)
    if (out / RECORD).is_file():
        raise ConfigError(f"{out} already holds a trained engine ({RECORD}): choose a new --out")
    if checkpoints.latest(out) and not train.resume:
        raise ConfigError(f"{out} has checkpoints of a stopped run: pass --resume to continue it, "
                          f"or choose a new --out")


def base_model(name: str, cache_dir: str):
    """The base checkpoint's reference ('tiny': the tiny LLaVA-NeXT, built on first use; any
    family's checkpoint folder or hub id), checked."""
    from engine.core.config import RuntimeConfig
    from engine.core.models import resolve_model

    ref = resolve_model("caption", name, RuntimeConfig(cache_dir=cache_dir))
    if ref is None:
        raise ConfigError("--base is empty: name the caption engine to fine-tune (folder, hub id or 'tiny')")
    return ref


def load_base(train: TrainConfig) -> tuple[Any, Any, TrainLayout]:
    """``(processor, model, its family's TrainLayout)`` of the base checkpoint, float32 weights
    (bf16 is autocast's job); a family train does not know is refused before its weights load."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = base_model(train.base, train.cache_dir).resolve(Path(train.cache_dir))
    family = family_for(path, train.base)
    if family.train is None:
        trainable = ", ".join(f.name for f in FAMILIES if f.train is not None)
        raise ConfigError(f"--base {train.base} is a {family.name} checkpoint: train fine-tunes {trainable} "
                          f"only so far (captioning with {family.name} works: run --caption-model)")
    processor = AutoProcessor.from_pretrained(path)
    check_chat_template(processor, train.base)  # the samples' text is the inference one (models/caption/chat.py)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    return processor, model, family.train


def make_accelerator(train: TrainConfig):
    import torch
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    if train.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {train.device} asked for a GPU but torch sees none: pass --device cpu")
    cpu = train.device == "cpu" or not torch.cuda.is_available()
    bf16 = train.dtype == "bfloat16" or (train.dtype == "auto" and not cpu)
    # on the CPU accelerate would pick MPI where torch has it: gloo is what every build has
    # (named only under a launcher: a backend makes accelerate expect a process group)
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    handlers = [InitProcessGroupKwargs(backend="gloo")] if cpu and launched else []
    return Accelerator(cpu=cpu, mixed_precision="bf16" if bf16 else "no", kwargs_handlers=handlers)


def fingerprint(cfg: TrainRunConfig, records: list[MetaRecord], total_steps: int, world: int) -> dict[str, Any]:
    """What a resumed run must share with the one it continues."""
    keys = hashlib.sha256("\n".join(r.key for r in records).encode()).hexdigest()[:16]
    recipe = {k: v for k, v in dataclasses.asdict(cfg.train).items()
              if k not in ("out", "resume", "save_every", "keep_checkpoints", "log_every", "loader_workers",
                           "cache_dir", "device")}
    return {"recipe": recipe, "lora": dataclasses.asdict(cfg.lora), "samples": len(records), "keys": keys,
            "total_steps": total_steps, "processes": world}


def train(data: Path, cfg: TrainRunConfig, *, log: Callable[[str], None] = print) -> TrainResult:
    import torch
    from accelerate.utils import DistributedType, set_seed
    from transformers import get_cosine_schedule_with_warmup

    t = cfg.train
    out = Path(t.out)
    check_out(t)
    accelerator = make_accelerator(t)
    say = log if accelerator.is_main_process else (lambda _line: None)
    world, rank = accelerator.num_processes, accelerator.process_index
    if t.global_batch % (t.batch_size * world):
        raise ConfigError(f"--global-batch {t.global_batch} is not a multiple of --batch-size {t.batch_size} "
                          f"x {world} processes")
    if cfg.lora.lora and accelerator.distributed_type == DistributedType.FSDP:
        raise ConfigError("--lora trains few parameters: run it with plain data parallelism (torchrun), "
                          "not FSDP (that config is for full fine-tuning)")

    records, left_out = read_records(data)
    held = held_out_keys([r.key for r in records], t.held_out_share, t.seed)
    set_seed(t.seed)
    processor, model, layout = load_base(t)
    # the template's reply layout is checked here, before any training (models/caption/chat.py)
    encoder = SampleEncoder(processor, layout, max_length=t.max_length, max_side=t.caption_max_side)
    train_records, held_records, too_long = _split(records, set(held), processor, t)
    left_out += too_long
    order = DataOrder(len(train_records), t.global_batch, t.seed)
    if not order.steps_per_epoch:
        raise ConfigError(f"{len(train_records)} training samples are fewer than --global-batch {t.global_batch}")
    total = t.max_steps or math.ceil(t.epochs * order.steps_per_epoch)
    say(f"train: {len(train_records)} samples ({len(held)} held out, {len(left_out)} left out), "
        f"{order.steps_per_epoch} steps per epoch of {t.global_batch}, {total} steps, {world} process(es)")
    for line in left_out[:5]:
        say(f"  left out: {line}")

    model = select_trainable(model, layout, t, cfg.lora)
    parts = describe(model, layout, t, cfg.lora)
    say(f"train: {parts.description}")
    if t.gradient_checkpointing:
        # gradient_checkpointing_enable: the name both transformers 5.19 (what sglang pins) and later releases have
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    learning_rate = cfg.lora.learning_rate(t.learning_rate)
    optimizer = torch.optim.AdamW(parameter_groups(model, layout, learning_rate, t.vision_learning_rate,
                                                   t.weight_decay))
    schedule = get_cosine_schedule_with_warmup(optimizer, round(t.warmup_ratio * total), total)
    if accelerator.distributed_type == DistributedType.FSDP:  # one shard group per layer, whatever the family
        accelerator.state.fsdp_plugin.transformer_cls_names_to_wrap = layer_classes(model, layout)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(schedule)

    run_fingerprint = fingerprint(cfg, train_records, total, world)
    start, figures = 0, {"losses": []}
    found = checkpoints.latest(out) if t.resume else None
    if found:
        folder, state = found
        checkpoints.check_compatible(state["fingerprint"], run_fingerprint, folder)
        accelerator.load_state(str(folder))
        start, figures = state["step"], state["figures"]
        say(f"train: resumed from {folder} (step {start} of {total})")
    metrics = _Metrics(out / METRICS, start, accelerator.is_main_process)

    pad_id = processor.tokenizer.pad_token_id
    pad_id = processor.tokenizer.eos_token_id if pad_id is None else pad_id
    plan = [mb for step in range(start, total) for mb in order.micro_batches(step, rank, world, t.batch_size)]
    loader = torch.utils.data.DataLoader(
        EncodedRecords(train_records, encoder), batch_sampler=plan, num_workers=t.loader_workers,
        collate_fn=functools.partial(collate, pad_id=pad_id, inputs=layout.inputs))
    batches = iter(loader)
    accumulation = t.global_batch // (t.batch_size * world)
    model.train()
    run_losses: list[float] = []
    spare = None
    for step in range(start, total):
        began = time.perf_counter()
        step_loss, failures, spare = _step(model, accelerator, [next(batches) for _ in range(accumulation)], spare)
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm) if t.max_grad_norm else None
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        loss = accelerator.reduce(step_loss.detach(), reduction="mean").item()
        run_losses.append(loss)
        figures["losses"].append(loss)
        row = {"step": step + 1, "epoch": round((step + 1) / order.steps_per_epoch, 4), "loss": round(loss, 6),
               "lr": schedule.get_last_lr()[0], "grad_norm": None if grad_norm is None else round(float(grad_norm), 6),
               "seconds": round(time.perf_counter() - began, 4), "failed_samples": failures}
        done = step + 1
        if done % order.steps_per_epoch == 0 or done == total:
            row["held_out_loss"] = _held_out_loss(model, accelerator, held_records, encoder, pad_id)
        metrics.write(row)
        if done % t.log_every == 0 or done in (1, total) or "held_out_loss" in row:
            say(_format(row, total))
        if done % t.save_every == 0 or done == total:
            checkpoints.save(accelerator, out, done, {"fingerprint": run_fingerprint, "figures": figures},
                             t.keep_checkpoints)
    held_loss = _last_held_out_loss(out / METRICS)
    _save_final(accelerator, model, processor, cfg, out, {
        "base": t.base, "data": str(Path(data).resolve()), "held_out": held, "parts": parts.description,
        "samples": {"train": len(train_records), "held_out": len(held_records), "left_out": len(left_out)},
        "left_out": left_out[:100], "steps": total, "processes": world, "learning_rate": learning_rate,
        "final_loss": figures["losses"][-1] if figures["losses"] else None, "held_out_loss": held_loss,
        "config": dataclasses.asdict(cfg),
    })
    return TrainResult(out, total, start, run_losses, held, held_loss, accelerator.is_main_process)


def _split(records, held: set[str], processor, t: TrainConfig):
    """(training records, held-out records, a line for each record left out: an image whose
    header cannot be read, or a prompt and image that alone pass --max-length)."""
    counts = prompt_token_counts(processor, records, t.caption_max_side)
    fits, left_out = [], []
    for record, n in zip(records, counts, strict=True):
        if n is None:
            left_out.append(f"{record.key}: image {record.image} cannot be read")
        elif n >= t.max_length:
            left_out.append(f"{record.key}: prompt and image take {n} tokens >= --max-length {t.max_length}")
        else:
            fits.append(record)
    return [r for r in fits if r.key not in held], [r for r in fits if r.key in held], left_out


def _inputs(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items() if k != "failures"}


def _step(model, accelerator, micro_batches: list[dict], spare: dict | None):
    """Forward and backward over one process's micro-batches; gradients are exchanged once,
    after the last. A micro-batch whose samples all failed still joins the exchange: it runs
    the last good batch (``spare``) with its loss times zero, so the other processes never
    wait for it and no gradient changes. Returns (mean loss, failed samples, the new spare)."""
    import torch

    total = torch.zeros((), device=accelerator.device)
    failures = 0
    for i, batch in enumerate(micro_batches):
        failures += len(batch["failures"])
        sync = contextlib.nullcontext() if i == len(micro_batches) - 1 else accelerator.no_sync(model)
        with sync:
            if "input_ids" in batch:
                spare = batch
                loss = model(**_inputs(batch, accelerator.device), use_cache=False).loss
            elif spare is not None:
                loss = model(**_inputs(spare, accelerator.device), use_cache=False).loss * 0.0
            else:  # the run's very first batch failed whole: nothing to run, zero gradients
                loss = sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0
            accelerator.backward(loss / len(micro_batches))
        total += loss.detach() / len(micro_batches)
    return total, failures, spare


def sample_losses(model, records: list[MetaRecord], encoder: SampleEncoder, pad_id: int, device) -> list[float | None]:
    """Each record's mean caption-token loss, one forward pass each, without gradients (None:
    the record failed to encode)."""
    import torch

    losses: list[float | None] = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for record in records:
            batch = collate([EncodedRecords([record], encoder)[0]], pad_id, encoder.inputs)
            losses.append(model(**_inputs(batch, device), use_cache=False).loss.item() if "input_ids" in batch
                          else None)
    model.train(was_training)
    return losses


def mean_loss(model, records: list[MetaRecord], encoder: SampleEncoder, pad_id: int, device) -> float | None:
    losses = [x for x in sample_losses(model, records, encoder, pad_id, device) if x is not None]
    return sum(losses) / len(losses) if losses else None


def _held_out_loss(model, accelerator, held: list[MetaRecord], encoder, pad_id: int) -> float | None:
    """Mean over the held-out records, spread over the processes. Every process runs the same
    number of forward passes (the last ones repeat a record and do not count): a distributed
    model's forward is a collective step, which a process with nothing to do would leave hanging."""
    import torch

    if not held:
        return None
    world, rank = accelerator.num_processes, accelerator.process_index
    indices = range(rank, -(-len(held) // world) * world, world)
    losses = sample_losses(model, [held[i % len(held)] for i in indices], encoder, pad_id, accelerator.device)
    counted = [x for i, x in zip(indices, losses, strict=True) if i < len(held) and x is not None]
    pair = torch.tensor([sum(counted), float(len(counted))], device=accelerator.device)
    total = accelerator.reduce(pair, reduction="sum")
    return round(float(total[0] / total[1]), 6) if total[1] else None


def _format(row: dict, total: int) -> str:
    text = (f"step {row['step']}/{total} epoch {row['epoch']:.2f} loss {row['loss']:.4f} lr {row['lr']:.2e}"
            + (f" grad-norm {row['grad_norm']:.3f}" if row["grad_norm"] is not None else "")
            + f" {row['seconds']:.2f}s/step")
    if row.get("held_out_loss") is not None:
        text += f" held-out loss {row['held_out_loss']:.4f}"
    if row["failed_samples"]:
        text += f" ({row['failed_samples']} samples failed)"
    return text


class _Metrics:
    """OUT/metrics.jsonl, one JSON object per step; a resumed run drops the rows after its checkpoint."""

    def __init__(self, path: Path, start: int, active: bool):
        self.path, self.active = path, active
        if not active:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= start] \
            if path.exists() and start else []
        path.write_text("".join(line + "\n" for line in rows))

    def write(self, row: dict) -> None:
        if self.active:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(row) + "\n")


def _last_held_out_loss(path: Path) -> float | None:
    if not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return next((r["held_out_loss"] for r in reversed(rows) if r.get("held_out_loss") is not None), None)


def _save_final(accelerator, model, processor, cfg: TrainRunConfig, out: Path, record: dict) -> None:
    """The merged, full model as ``save_pretrained`` writes it, the processor beside it, and the
    training record last; written to a temporary folder first, then moved in."""
    import torch

    accelerator.wait_for_everyone()
    state = accelerator.get_state_dict(model)  # gathered to the main process under FSDP
    if accelerator.is_main_process:
        final = accelerator.unwrap_model(model)
        if cfg.lora.lora:
            final = final.merge_and_unload()
            state = final.state_dict()
        if accelerator.mixed_precision == "bf16":  # what bf16 training serves in; half the size
            state = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state.items()}
        tmp = out / ".final.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        final.save_pretrained(tmp, state_dict=state)
        processor.save_pretrained(tmp)
        for item in tmp.iterdir():
            os.replace(item, out / item.name)
        tmp.rmdir()
        write_json_atomic(out / RECORD, record)
    accelerator.wait_for_everyone()


def iter_rows(path: Path) -> Iterator[dict]:
    """The metrics file's rows (for plotting, and the tests)."""
    for line in Path(path).read_text().splitlines():
        yield json.loads(line)
