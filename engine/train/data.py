"""Training samples for the caption engine: records, the held-out split, label masking, data order.

A record is one LLaVA conversation of the SFT export (``meta`` writes ``OUT/sft/``): the
human turn is ``<image>\\n`` + the caption-engine prompt with the sample's evidence, the gpt
turn is GPT-4V's caption. A sample becomes model inputs exactly as the transformers caption
backend builds them at inference (same image view, same chat text, same processor call, so
the same image tokens: LLaVA's AnyRes tiles, Qwen-VL's dynamic resolution), followed by the
caption's tokens as the checkpoint's template lays out the reply, and the end-of-sequence
token. Only those last ones carry labels: the prompt, the evidence and the image
tokens are context, never targets.

The data order is a pure function of (seed, step): every epoch is a seeded permutation cut
into global batches (the last incomplete one is left out; it differs every epoch), and each
process takes every world-th sample of a batch. A resumed run therefore reads exactly the
batches the interrupted one would have read.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.core.stage import ImageView
from models.caption.families import TILES, TOKENS, TrainLayout
from models.errors import ConfigError

SFT_FILE = "densefusion_sft.json"  # engine/output/export.py FILES["sft"]
IMAGE_PREFIX = "<image>\n"
IGNORE = -100  # the label of tokens that carry no loss (torch's cross-entropy ignore_index)
MAX_PIXELS = 89_478_485  # the engine's decompression-bomb guard (FilterConfig.max_pixels)


@dataclass(frozen=True)
class MetaRecord:
    key: str
    image: Path
    prompt: str  # the caption-engine prompt, without the image placeholder
    caption: str  # GPT-4V's caption: the target


def sft_file(data: Path) -> Path:
    """The SFT JSON of a meta output folder (OUT/sft/), of an export folder, or the file itself."""
    data = Path(data)
    for candidate in (data, data / SFT_FILE, data / "sft" / SFT_FILE):
        if candidate.is_file():
            return candidate
    if (data / "shards").is_dir():
        raise ConfigError(f"{data} is an output folder without sft/{SFT_FILE}: export it first with "
                          f"`python densefusion_local.py export sft {data} --to {data / 'sft'}`")
    raise ConfigError(f"{data}: no {SFT_FILE} found: pass a `meta` output folder, an `export sft` "
                      f"folder or the JSON file itself")


def read_records(data: Path) -> tuple[list[MetaRecord], list[str]]:
    """Every usable record, and one line per record left out (bad shape, missing image)."""
    path = sft_file(data)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    if not isinstance(raw, list):
        raise ConfigError(f"{path}: expected a JSON list of LLaVA conversations")
    records, problems = [], []
    seen: set[str] = set()
    for i, item in enumerate(raw):
        record, problem = _record(item, path.parent)
        if record is not None and record.key in seen:
            record, problem = None, "key seen before"
        if record is None:
            problems.append(f"record {i} ({item.get('id') if isinstance(item, dict) else '?'}): {problem}")
            continue
        seen.add(record.key)
        records.append(record)
    if not records:
        raise ConfigError(f"{path}: no usable records ({len(problems)} left out"
                          + (f", first: {problems[0]}" if problems else "") + ")")
    return records, problems


def _record(item, folder: Path) -> tuple[MetaRecord | None, str]:
    try:
        human, gpt = item["conversations"]
        prompt, caption = human["value"], gpt["value"]
        if (human["from"], gpt["from"]) != ("human", "gpt"):
            return None, "conversation must be one human turn, then one gpt turn"
        key, image = str(item["id"]), folder / item["image"]
    except (KeyError, TypeError, ValueError) as exc:
        return None, f"not a LLaVA conversation ({type(exc).__name__}: {exc})"
    if not isinstance(prompt, str) or not prompt.startswith(IMAGE_PREFIX):
        return None, "the human turn must start with '<image>\\n'"
    if not isinstance(caption, str) or not caption.strip():
        return None, "empty caption"
    if not image.is_file():
        return None, f"image {image} does not exist"
    return MetaRecord(key, image, prompt[len(IMAGE_PREFIX):], caption.strip()), ""


def held_out_keys(keys: list[str], share: float, seed: int) -> list[str]:
    """The keys kept out of training: the ``share`` with the smallest seeded hash (at least one
    when there are two or more keys), so the split depends on neither order nor batching."""
    if share <= 0 or len(keys) < 2:
        return []
    count = max(1, round(share * len(keys)))
    rank = sorted(keys, key=lambda k: hashlib.blake2b(f"held-out\0{seed}\0{k}".encode(), digest_size=8).digest())
    return sorted(rank[:count])


# --- one sample → model inputs -----------------------------------------------------------------


def caption_image(record: MetaRecord, view: ImageView) -> np.ndarray:
    """The record's image as `run` hands it to the caption engine (the ``caption`` view)."""
    from engine.image.decode import decode_views

    image = decode_views(record.image.read_bytes(), (view,), MAX_PIXELS)[view.name]
    return np.require(image, requirements="W")  # PIL's arrays are read-only; torch warns on those


class SampleEncoder:
    """A record → ``input_ids``, ``labels`` and the family's other model inputs (``layout.inputs``:
    LLaVA's AnyRes tiles and image sizes, Qwen-VL's flat patches, grids and token types)."""

    def __init__(self, processor, layout: TrainLayout, *, max_length: int, max_side: int):
        from models.caption.chat import reply_separator

        self.processor, self.inputs, self.max_length = processor, layout.inputs, max_length
        self.view = ImageView("caption", max_side)
        self.eos_id = processor.tokenizer.eos_token_id
        self.separator = reply_separator(processor)

    def image(self, record: MetaRecord) -> np.ndarray:
        return caption_image(record, self.view)

    def caption_ids(self, chat: str, caption: str) -> list[int]:
        """The caption's tokens as they follow the prompt in the template's reply (tokenised in
        context, so the first one is what the model must produce after the prompt), plus
        end-of-sequence."""
        tokenizer = self.processor.tokenizer
        prompt_ids = tokenizer(chat)["input_ids"]
        full_ids = tokenizer(chat + self.separator + caption)["input_ids"]
        if full_ids[:len(prompt_ids)] != prompt_ids:
            raise ValueError("the caption's first token merges with the prompt's last one")
        return full_ids[len(prompt_ids):] + [self.eos_id]

    def __call__(self, record: MetaRecord) -> dict:
        import torch

        from models.caption.chat import chat_text

        chat = chat_text(self.processor, record.prompt)
        inputs = self.processor(text=[chat], images=[self.image(record)], return_tensors="pt")
        unknown = set(inputs) - {"input_ids", "attention_mask"} - {name for name, _ in self.inputs}
        if unknown:  # left out, the model would train on another input than it captions with
            raise ValueError(f"the processor returns {', '.join(sorted(unknown))}, which the family's TrainLayout.inputs "
                             f"does not declare (models/caption/families.py)")
        prompt = inputs["input_ids"][0]
        room = self.max_length - len(prompt)
        if room < 1:
            raise ValueError(f"prompt and image take {len(prompt)} tokens > --max-length {self.max_length}")
        target = torch.tensor(self.caption_ids(chat, record.caption)[:room], dtype=prompt.dtype)
        sample = {"input_ids": torch.cat([prompt, target]), "labels": torch.cat([torch.full_like(prompt, IGNORE), target])}
        for name, batching in self.inputs:
            value = inputs[name]  # the processor's batch of one
            sample[name] = torch.cat([value[0], value.new_zeros(len(target))]) if batching == TOKENS else value
        return sample


def prompt_token_counts(processor, records: list[MetaRecord], max_side: int) -> list[int | None]:
    """Tokens of each record's prompt with its image, from the image header alone (no decode);
    None where the header cannot be read."""
    from PIL import Image

    from engine.image.decode import fit_size
    from models.caption.transformers_backend import prompt_lengths

    shapes = []
    for record in records:
        try:
            with Image.open(record.image) as image:
                width, height = fit_size(*image.size, max_side)
        except Exception:  # noqa: BLE001 - PIL raises more than OSError on hostile files
            width = height = 0  # prompt_lengths leaves a bad image out
        # a read-only view of one byte with the image's shape: prompt_lengths reads shapes only
        shapes.append(np.broadcast_to(np.zeros((1, 1, 3), np.uint8), (height, width, 3)))
    counts = prompt_lengths(processor, [r.prompt for r in records], shapes)
    return [n if shape.shape[0] else None for n, shape in zip(counts, shapes, strict=True)]


class EncodedRecords:
    """A map-style dataset over records; a record that fails to encode yields its error instead."""

    def __init__(self, records: list[MetaRecord], encoder: SampleEncoder):
        self.records, self.encoder = records, encoder

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict | str:
        record = self.records[index]
        try:
            return self.encoder(record)
        except Exception as exc:  # noqa: BLE001 - a bad image or prompt fails alone, as data
            return f"{record.key}: {type(exc).__name__}: {exc}"


def collate(items: list[dict | str], pad_id: int, inputs: tuple[tuple[str, str], ...]) -> dict:
    """Right-padded batch (labels padded with IGNORE) of the samples; failures listed. The
    family's other inputs batch as declared (``inputs``): rows concatenated (the model splits
    them by each image's grid), AnyRes tiles padded with zero tiles (the model keeps each
    image's own, counted from ``image_sizes``), per-token values padded with zeros."""
    import torch

    samples = [item for item in items if isinstance(item, dict)]
    failures = [item for item in items if isinstance(item, str)]
    if not samples:
        return {"failures": failures}
    length = max(len(s["input_ids"]) for s in samples)

    def pad(tensor, value):
        return torch.nn.functional.pad(tensor, (0, length - len(tensor)), value=value)

    def pad_tiles(pixels, tiles):
        return torch.cat([pixels, pixels.new_zeros((1, tiles - pixels.shape[1], *pixels.shape[2:]))], dim=1)

    batch = {
        "input_ids": torch.stack([pad(s["input_ids"], pad_id) for s in samples]),
        "attention_mask": torch.stack([pad(torch.ones_like(s["input_ids"]), 0) for s in samples]),
        "labels": torch.stack([pad(s["labels"], IGNORE) for s in samples]),
    }
    for name, batching in inputs:
        values = [s[name] for s in samples]
        if batching == TOKENS:
            batch[name] = torch.stack([pad(v, 0) for v in values])
        elif batching == TILES:
            tiles = max(v.shape[1] for v in values)
            batch[name] = torch.cat([pad_tiles(v, tiles) for v in values])
        else:
            batch[name] = torch.cat(values)
    return {**batch, "failures": failures}


# --- data order ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataOrder:
    samples: int
    global_batch: int
    seed: int

    @property
    def steps_per_epoch(self) -> int:
        return self.samples // self.global_batch

    def step_indices(self, step: int) -> list[int]:
        """The samples of optimizer step ``step`` (0-based), over all processes."""
        import torch

        epoch, i = divmod(step, self.steps_per_epoch)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.samples, generator=generator).tolist()
        return order[i * self.global_batch:(i + 1) * self.global_batch]

    def micro_batches(self, step: int, rank: int, world: int, batch_size: int) -> list[list[int]]:
        """This process's share of a step, in forward passes of ``batch_size``."""
        mine = self.step_indices(step)[rank::world]
        return [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
