"""Fine-tuning the caption engine on a meta dataset made by `meta` (tiny LLaVA-NeXT, CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.core import config as config_module
from engine.train.config import TrainRunConfig
from engine.train.data import IGNORE, SampleEncoder, held_out_keys, read_records

# Tiny and fast: one forward pass per sample, two samples per step.
FAST = {"batch_size": 1, "global_batch": 2, "learning_rate": 1e-3, "warmup_ratio": 0.0,
        "loader_workers": 0, "log_every": 100, "device": "cpu"}


@pytest.fixture(scope="module")
def meta_out(tmp_path_factory, tiny_cache) -> Path:
    """A meta dataset as users make it: `meta` against a local chat-completions server."""
    import densefusion_local
    from bench._chat_server import ChatServer
    from engine.io.demo_data import write_demo_shards

    tmp = tmp_path_factory.mktemp("meta")
    shards = write_demo_shards(tmp / "in", n_shards=1)
    with ChatServer(output_words=24) as server:
        code = densefusion_local.main([
            "meta", "--shards", *map(str, shards), "--out", str(tmp / "out"), "--no-progress", "--device", "cpu",
            "--stages", "decode", "prompt", "caption", "qc", "--api-base", server.url, "--api-model", "fake-4v",
            "--subset-share", "1", "--caption-max-side", "256", "--cache-dir", str(tiny_cache),
        ])
    assert code == 0
    return tmp / "out"


def train_config(out: Path, tiny_cache: Path, **options) -> TrainRunConfig:
    train = {"base": "tiny", "out": str(out), "cache_dir": str(tiny_cache), **FAST, **options}
    return config_module.build(cls=TrainRunConfig, train=train)


def tiny_processor(tiny_cache: Path):
    from transformers import AutoProcessor

    from models.base import ModelRef

    return AutoProcessor.from_pretrained(ModelRef("tiny", "caption").resolve(tiny_cache))


def test_only_the_caption_tokens_and_end_of_sequence_carry_loss(meta_out, tiny_cache):
    from models.caption.transformers_backend import chat_text

    processor = tiny_processor(tiny_cache)
    encoder = SampleEncoder(processor, max_length=4096, max_side=1344)
    records, left_out = read_records(meta_out)
    assert len(records) >= 4 and left_out == []
    tokenizer = processor.tokenizer
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    for record in records:
        sample = encoder(record)
        ids, labels = sample["input_ids"].tolist(), sample["labels"].tolist()
        # the context is exactly what the transformers backend feeds the engine at inference
        inference = processor(text=[chat_text(processor, record.prompt)], images=[encoder.image(record)],
                              return_tensors="pt")["input_ids"][0].tolist()
        assert ids[:len(inference)] == inference
        image = encoder.image(record)
        anyres = processor._get_num_multimodal_tokens(image_sizes=[image.shape[:2]]).num_image_tokens[0]
        assert inference.count(image_id) == anyres > 16  # AnyRes tiles + overview (16 tokens each), all expanded
        assert labels[:len(inference)] == [IGNORE] * len(inference)  # prompt, evidence, image: context
        target = ids[len(inference):]
        assert labels[len(inference):] == target and target[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(target[:-1]).strip() == record.caption  # the GPT-4V caption, whole
        assert record.caption.startswith("caption for ") and "[OCR]" in record.prompt


def test_a_caption_longer_than_max_length_is_cut_never_the_prompt(meta_out, tiny_cache):
    processor = tiny_processor(tiny_cache)
    record = read_records(meta_out)[0][0]
    whole = SampleEncoder(processor, max_length=4096, max_side=1344)(record)
    prompt = sum(1 for label in whole["labels"].tolist() if label == IGNORE)
    cut = SampleEncoder(processor, max_length=prompt + 3, max_side=1344)(record)
    assert cut["input_ids"].tolist() == whole["input_ids"].tolist()[:prompt + 3]
    with pytest.raises(ValueError, match="max-length"):
        SampleEncoder(processor, max_length=prompt, max_side=1344)(record)


def test_held_out_split_is_seeded_and_independent_of_order():
    keys = [f"k{i:03d}" for i in range(200)]
    held = held_out_keys(keys, 0.05, seed=1)
    assert len(held) == 10 and held == held_out_keys(list(reversed(keys)), 0.05, seed=1)
    assert held != held_out_keys(keys, 0.05, seed=2)
    assert held_out_keys(keys[:2], 0.01, seed=0) and not held_out_keys(keys[:1], 0.5, seed=0)


def test_a_few_dozen_steps_lower_the_training_loss(meta_out, tiny_cache, tmp_path, capsys):
    import torch
    from transformers import AutoModelForImageTextToText

    from engine.train.loop import RECORD, iter_rows, mean_loss, train

    out = tmp_path / "engine"
    result = train(meta_out, train_config(out, tiny_cache, max_steps=24, held_out_share=0.2, log_every=8))
    assert result.steps == 24 and len(result.held_out) == 1
    record = json.loads((out / RECORD).read_text())
    assert record["held_out"] == result.held_out and record["samples"]["train"] == 5

    # measured on the training samples, with the same loss, base model vs the written engine
    processor = tiny_processor(tiny_cache)
    encoder = SampleEncoder(processor, max_length=4096, max_side=1344)
    training = [r for r in read_records(meta_out)[0] if r.key not in result.held_out]
    pad = processor.tokenizer.pad_token_id

    def loss_of(folder) -> float:
        model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)
        return mean_loss(model, training, encoder, pad, batch_size=2, device="cpu")

    from models.base import ModelRef

    before = loss_of(ModelRef("tiny", "caption").resolve(tiny_cache))
    after = loss_of(out)
    assert after < 0.8 * before, (before, after)

    rows = list(iter_rows(out / "metrics.jsonl"))
    assert [r["step"] for r in rows] == list(range(1, 25))
    assert all(r["lr"] >= 0 and r["loss"] > 0 for r in rows) and rows[0]["lr"] > rows[-1]["lr"]  # cosine decay
    assert sum("held_out_loss" in r for r in rows) >= 2
    printed = capsys.readouterr().out
    assert "step 8/24" in printed and "language model + projector" in printed
