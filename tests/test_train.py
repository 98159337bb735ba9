"""Fine-tuning the caption engine on a meta dataset made by `meta`, for every family `train` knows
(tiny random-weight LLaVA-NeXT and Qwen2.5-VL, CPU): the same recipe, the family's parts from its
``TrainLayout``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from engine.core import config as config_module
from engine.train.config import TrainRunConfig
from engine.train.data import IGNORE, SampleEncoder, held_out_keys, read_records
from models.caption.families import FAMILIES, LLAVA_1_6, QWEN2_5_VL, QWEN3_VL, CaptionFamily

# Tiny and fast: one forward pass per sample, two samples per step; a learning rate that
# teaches the tiny model GPT-4V's words within a few dozen steps.
FAST = {"batch_size": 1, "global_batch": 2, "learning_rate": 3e-3, "warmup_ratio": 0.0, "max_grad_norm": 0.0,
        "loader_workers": 0, "log_every": 100, "device": "cpu"}
ENGINE_STEPS = 48


@pytest.fixture(scope="module")
def meta_out(tmp_path_factory, tiny_cache) -> Path:
    """A meta dataset as users make it: `meta` against a local chat-completions server."""
    import densefusion_local
    from bench._chat_server import ChatServer
    from engine.io.demo_data import write_demo_shards

    tmp = tmp_path_factory.mktemp("meta")
    shards = write_demo_shards(tmp / "in", n_shards=1)
    with ChatServer(output_words=40) as server:
        code = densefusion_local.main([
            "meta", "--shards", *map(str, shards), "--out", str(tmp / "out"), "--no-progress", "--device", "cpu",
            "--stages", "decode", "prompt", "caption", "qc", "--api-base", server.url, "--api-model", "fake-4v",
            "--subset-share", "1", "--caption-max-side", "256", "--cache-dir", str(tiny_cache),
        ])
    assert code == 0
    return tmp / "out"


@dataclass(frozen=True)
class Base:
    """A tiny base checkpoint to fine-tune: what `--base` names, its folder and family."""

    name: str
    folder: Path
    family: CaptionFamily

    @property
    def layout(self):
        return self.family.train

    def processor(self):
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(self.folder)

    def encoder(self, max_length: int = 4096) -> SampleEncoder:
        return SampleEncoder(self.processor(), self.layout, max_length=max_length, max_side=1344)


TINY_ROLES = {LLAVA_1_6.name: "caption", QWEN2_5_VL.name: "caption-qwen2_5_vl", QWEN3_VL.name: "caption-qwen3_vl"}
TRAINED = [f.name for f in FAMILIES if f.train is not None]


def test_every_trainable_family_is_tested_here():
    assert sorted(TRAINED) == sorted(TINY_ROLES)


def tiny_base_of(family: str, tiny_cache: Path) -> Base:
    """LLaVA-NeXT: `--base tiny`; another family: its tiny checkpoint's folder."""
    from models import tiny
    from models.base import ModelRef
    from models.caption.families import family_of_folder

    if family == LLAVA_1_6.name:
        folder = Path(ModelRef("tiny", "caption").resolve(tiny_cache))
        return Base("tiny", folder, family_of_folder(folder))
    folder = tiny.ensure(TINY_ROLES[family], tiny_cache / "tiny")
    return Base(str(folder), folder, family_of_folder(folder))


@pytest.fixture(scope="module", params=TRAINED)
def base(request, tiny_cache) -> Base:
    return tiny_base_of(request.param, tiny_cache)


@pytest.fixture(scope="module")
def llava(tiny_cache) -> Base:
    return tiny_base_of(LLAVA_1_6.name, tiny_cache)


def train_config(out: Path, base: Base, tiny_cache: Path, **options) -> TrainRunConfig:
    train = {"base": base.name, "out": str(out), "cache_dir": str(tiny_cache), **FAST, **options}
    return config_module.build(cls=TrainRunConfig, train=train)


def test_only_the_caption_tokens_and_end_of_sequence_carry_loss(meta_out, base):
    import torch

    from models.caption.chat import chat_text
    from models.caption.families import TOKENS

    processor = base.processor()
    encoder = SampleEncoder(processor, base.layout, max_length=4096, max_side=1344)
    records, left_out = read_records(meta_out)
    assert len(records) >= 4 and left_out == []
    tokenizer = processor.tokenizer
    image_id = tokenizer.convert_tokens_to_ids(processor.image_token)
    for record in records:
        sample = encoder(record)
        ids, labels = sample["input_ids"].tolist(), sample["labels"].tolist()
        # the context is exactly what the transformers backend feeds the engine at inference
        chat = chat_text(processor, record.prompt)
        fed = processor(text=[chat], images=[encoder.image(record)], return_tensors="pt")
        inference = fed["input_ids"][0].tolist()
        assert ids[:len(inference)] == inference
        image = encoder.image(record)
        expected = processor._get_num_multimodal_tokens(image_sizes=[image.shape[:2]]).num_image_tokens[0]
        assert inference.count(image_id) == expected >= 4  # the image's tokens, all expanded
        assert labels[:len(inference)] == [IGNORE] * len(inference)  # prompt, evidence, image: context
        target = ids[len(inference):]
        assert labels[len(inference):] == target and target[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(target[:-1]).strip() == record.caption  # the GPT-4V caption, whole
        # the reply as the template lays it out (its own separator), ending where generation stops
        answered = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "text", "text": record.prompt}, {"type": "image"}]},
             {"role": "assistant", "content": [{"type": "text", "text": record.caption}]}])
        assert answered.startswith(chat + tokenizer.decode(target[:-1]))
        assert record.caption.startswith("caption for ") and "[OCR]" in record.prompt
        # the image inputs are the inference ones; per-token ones (Qwen's token types) text past the prompt
        for name, batching in base.layout.inputs:
            if batching == TOKENS:
                assert sample[name][:len(inference)].tolist() == fed[name][0].tolist()
                assert not sample[name][len(inference):].any()
            else:
                assert torch.equal(sample[name], fed[name]), name


def test_a_batch_loses_what_its_samples_lose_alone(meta_out, base):
    """Collation keeps each sample's images and positions: the padded batch's loss is the
    token-weighted mean of the samples' own losses (images of different sizes, so different
    patch counts, grids or AnyRes tiles)."""
    import torch
    from transformers import AutoModelForImageTextToText

    from engine.train.data import collate

    encoder = base.encoder()
    records = read_records(meta_out)[0][:3]
    samples = [encoder(r) for r in records]
    model = AutoModelForImageTextToText.from_pretrained(base.folder, dtype=torch.float32).eval()
    pad = encoder.processor.tokenizer.pad_token_id

    def loss(items):
        batch = collate(items, pad, base.layout.inputs)
        with torch.no_grad():
            return model(**{k: v for k, v in batch.items() if k != "failures"}, use_cache=False).loss.item()

    # the loss is the mean over every labelled token of the batch (the first label of a sample is
    # never one: the prompt comes first), so a sample weighs as many labels as it has
    counts = [int((s["labels"] != IGNORE).sum()) for s in samples]
    alone = [loss([s]) for s in samples]
    assert len({len(s["input_ids"]) for s in samples}) > 1  # padding happens
    expected = sum(a * n for a, n in zip(alone, counts, strict=True)) / sum(counts)
    assert loss(samples) == pytest.approx(expected, rel=1e-4)
    assert collate([*samples[:1], "broken: ValueError"], pad, base.layout.inputs)["failures"] == ["broken: ValueError"]


def test_train_sees_the_prompt_tokens_run_feeds_the_engine(base, tiny_cache, tmp_path, monkeypatch):
    """`run` on photos of varied sizes, then `export sft` read as train reads it: each sample's
    context is the token ids the transformers backend fed the engine (SGLang's equal transformers'
    in test_prompt_parity for LLaVA, test_caption_families for Qwen2.5-VL)."""
    from conftest import sample_members, write_tar
    from test_prompt_parity import SIZES, by_key, encoded, photo, train_prompt_ids

    import densefusion_local
    from models.caption.transformers_backend import TransformersCaptionEngine

    members = []
    for i, (width, height) in enumerate(SIZES[:8]):
        key = f"0{i:04d}"
        members += sample_members(key, encoded(photo(width, height, i), "JPEG"), f"photo {key} of a street")
    shard = write_tar(tmp_path / "shard.tar", members)
    fed: list[list[int]] = []
    load = TransformersCaptionEngine.__init__

    def recording_init(self, *args, **kwargs):
        load(self, *args, **kwargs)
        generate = self.net.generate

        def recording(**inputs):
            for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"], strict=True):
                fed.append(ids[mask.bool()].tolist())  # left padding off
            return generate(**inputs)

        self.net.generate = recording

    monkeypatch.setattr(TransformersCaptionEngine, "__init__", recording_init)
    assert densefusion_local.main([
        "run", "--shards", str(shard), "--out", str(tmp_path / "run"), "--device", "cpu", "--no-progress",
        "--cache-dir", str(tiny_cache), "--min-short-edge", "0", "--caption-model", str(base.folder),
        "--stages", "decode", "prompt", "caption", "--max-new-tokens", "4"]) == 0
    processor = base.processor()
    fed_ids = by_key(processor, fed)
    train = train_prompt_ids(processor, base.layout, tmp_path / "run", tmp_path / "sft")
    assert len(train) == 8 and sorted(train) == sorted(fed_ids)
    for key, ids in train.items():
        assert ids == fed_ids[key], key
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    assert len({ids.count(image_id) for ids in train.values()}) >= 3  # the sizes reached several image budgets


def test_a_template_that_cannot_lay_out_the_reply_is_refused(llava):
    """The target is the reply as the template lays it out: a template that drops the assistant's
    turn cannot say where the caption goes."""
    import copy

    from models.errors import ConfigError

    processor = copy.copy(llava.processor())
    processor.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}USER: <image>\n"
                               "{{ m['content'][0]['text'] }}{% endif %}{% endfor %}"
                               "{% if add_generation_prompt %} ASSISTANT:{% endif %}")
    with pytest.raises(ConfigError, match="assistant turn"):
        SampleEncoder(processor, llava.layout, max_length=4096, max_side=1344)


def test_a_caption_longer_than_max_length_is_cut_never_the_prompt(meta_out, base):
    from models.caption.families import TOKENS

    record = read_records(meta_out)[0][0]
    whole = base.encoder()(record)
    prompt = sum(1 for label in whole["labels"].tolist() if label == IGNORE)
    cut = base.encoder(max_length=prompt + 3)(record)
    assert cut["input_ids"].tolist() == whole["input_ids"].tolist()[:prompt + 3]
    for name, batching in base.layout.inputs:
        if batching == TOKENS:  # one value per token, cut with them
            assert len(cut[name]) == prompt + 3
    with pytest.raises(ValueError, match="max-length"):
        base.encoder(max_length=prompt)(record)


def test_held_out_split_is_seeded_and_independent_of_order():
    keys = [f"k{i:03d}" for i in range(200)]
    held = held_out_keys(keys, 0.05, seed=1)
    assert len(held) == 10 and held == held_out_keys(list(reversed(keys)), 0.05, seed=1)
    assert held != held_out_keys(keys, 0.05, seed=2)
    assert held_out_keys(keys[:2], 0.01, seed=0) and not held_out_keys(keys[:1], 0.5, seed=0)


@pytest.fixture(scope="module")
def engine(meta_out, base, tiny_cache, tmp_path_factory):
    """One fine-tuned engine per family for the tests that read it: a few dozen steps (what the
    tiny engines need to write some of GPT-4V's words greedily), 1 of 6 samples held out."""
    from engine.train.loop import train

    out = tmp_path_factory.mktemp("engine") / "engine"
    lines: list[str] = []
    result = train(meta_out, train_config(out, base, tiny_cache, max_steps=ENGINE_STEPS, held_out_share=0.2,
                                                  log_every=16),
                   log=lines.append)
    return out, result, lines


def test_a_few_dozen_steps_lower_the_training_loss(meta_out, base, engine):
    import torch
    from transformers import AutoModelForImageTextToText

    from engine.train.loop import RECORD, iter_rows, mean_loss
    from engine.train.parts import vision_layers_used
    from models.caption.families import family_of_folder

    out, result, lines = engine
    assert result.steps == ENGINE_STEPS and len(result.held_out) == 1
    record = json.loads((out / RECORD).read_text())
    assert record["held_out"] == result.held_out and record["samples"]["train"] == 5
    assert family_of_folder(out) is base.family  # the engine is a checkpoint of its base's family

    # measured on the training samples, with the same loss, base model vs the written engine
    encoder = base.encoder()
    training = [r for r in read_records(meta_out)[0] if r.key not in result.held_out]
    pad = encoder.processor.tokenizer.pad_token_id

    def loss_of(folder) -> float:
        model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)
        return mean_loss(model, training, encoder, pad, device="cpu")

    before, after = loss_of(base.folder), loss_of(out)
    assert after < 0.8 * before, (before, after)
    used = len(vision_layers_used(AutoModelForImageTextToText.from_pretrained(base.folder), base.layout))

    rows = list(iter_rows(out / "metrics.jsonl"))
    assert [r["step"] for r in rows] == list(range(1, ENGINE_STEPS + 1))
    assert all(r["lr"] >= 0 and r["loss"] > 0 for r in rows) and rows[0]["lr"] > rows[-1]["lr"]  # cosine decay
    assert sum("held_out_loss" in r for r in rows) >= 2
    assert any(line.startswith(f"step 16/{ENGINE_STEPS}") for line in lines)
    # the default --vision-layers 12 covers every layer the tiny projector reads
    assert any(f"language model + projector + top {used} of {used} vision layers" in line for line in lines)


@pytest.mark.parametrize("backend", ["transformers", pytest.param("sglang", marks=pytest.mark.slow)])
def test_the_engine_captions_through_run_caption_model(meta_out, engine, tiny_cache, tmp_path, backend):
    """The checkpoint serves unchanged on transformers and on SGLang's CPU engine (LLaVA converted
    to its native layout by the sglang backend itself; Qwen2.5-VL natively), in a child process."""
    import subprocess
    import sys

    import pyarrow.parquet as pq

    from models.caption.sglang_backend import sglang_available

    if backend == "sglang" and not sglang_available():
        pytest.skip("the sglang extra is not installed")
    out, _, _ = engine
    shards = sorted((meta_out.parent / "in").glob("*.tar"))
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([
        sys.executable, str(root / "densefusion_local.py"),
        "run", "--shards", *map(str, shards), "--out", str(tmp_path / "run"), "--no-progress", "--device", "cpu",
        "--stages", "decode", "prompt", "caption", "--caption-model", str(out), "--caption-backend", backend,
        "--max-new-tokens", "12", "--cache-dir", str(tiny_cache),
    ], cwd=root, env=subprocess_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = pq.read_table(tmp_path / "run" / "shards" / f"{shards[0].stem}.parquet").to_pylist()
    assert len(rows) == 6
    for row in rows:
        assert row["engine"]["model"] == str(out) and row["engine"]["backend"] == backend
        assert row["engine"]["finish_reason"] in ("stop", "length") and row["caption"].strip()


def test_evaluate_compares_base_and_fine_tuned_on_the_held_out_samples(meta_out, engine, capsys):
    import densefusion_local

    out, result, _ = engine
    assert densefusion_local.main(["evaluate", str(out), "--meta", str(meta_out), "--max-new-tokens", "16",
                                   "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "GPT-4V" in printed and "fine-tuned" in printed and "ROUGE-L vs GPT-4V" in printed
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["keys"] == result.held_out  # the same samples for both engines, none trained on
    scores = evaluation["scores"]
    assert {name: s["samples"] for name, s in scores.items()} == {"gpt4v": 1, "base": 1, "fine_tuned": 1}
    assert scores["gpt4v"]["rouge_l_vs_gpt4v"] == 1.0
    # the base writes noise; the fine-tuned engine writes GPT-4V's words (it learnt them)
    assert scores["fine_tuned"]["rouge_l_vs_gpt4v"] > scores["base"]["rouge_l_vs_gpt4v"]
    for name in ("qc_drop_rate", "table1", "coverage"):
        assert all(name in s for s in scores.values())
    caption = evaluation["captions"][0]
    assert caption["gpt4v"].startswith("caption for ") and caption["base"] != caption["fine_tuned"]


def test_rouge_l_is_the_f1_of_the_longest_common_word_subsequence():
    from engine.train.evaluate import rouge_l

    assert rouge_l("a red ball on a table", "a red ball on a table") == 1.0
    # LCS "a ball table": 3 words, precision 3/4, recall 3/6
    assert rouge_l("a ball the table", "a red ball on a table") == pytest.approx(2 * 0.75 * 0.5 / 1.25)
    assert rouge_l("", "a ball") == 0.0 and rouge_l("dog", "a ball") == 0.0


def cli_train(meta_out: Path, out: Path, base: Base, tiny_cache: Path, *extra: str) -> list[str]:
    """The `train` command line with the FAST options."""
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in FAST.items()]
    return ["train", str(meta_out), "--base", base.name, "--out", str(out), "--cache-dir", str(tiny_cache),
            *flags, *extra]


def subprocess_env() -> dict[str, str]:
    import os

    # one thread, like the in-process runs compared with it (reduction order, hence the last bits)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def test_a_run_killed_mid_training_and_resumed_ends_with_the_uninterrupted_weights(meta_out, base, tiny_cache,
                                                                                    tmp_path):
    import signal
    import subprocess
    import sys
    import time

    import torch

    import densefusion_local
    from engine.train import checkpoints
    from engine.train.loop import RECORD, train
    from models.errors import ConfigError

    steps = ["--max-steps", "10", "--save-every", "2"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        clean = tmp_path / "clean"
        args = densefusion_local.build_parser().parse_args(cli_train(meta_out, clean, base, tiny_cache, *steps))
        train(args.data, config_module.build(args, cls=TrainRunConfig))

        stopped = tmp_path / "stopped"
        process = subprocess.Popen([sys.executable, "densefusion_local.py", *cli_train(meta_out, stopped, base,
                                                                                       tiny_cache, *steps)],
                                   cwd=Path(__file__).resolve().parents[1], env=subprocess_env(),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while not checkpoints.checkpoint_dirs(stopped) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        assert process.wait() == -signal.SIGKILL, process.stderr.read().decode()[-2000:]
        process.stderr.close()
        sealed = checkpoints.checkpoint_dirs(stopped)
        assert sealed and int(sealed[-1].name.removeprefix("step-")) < 10 and not (stopped / RECORD).exists()

        with pytest.raises(ConfigError, match="--resume"):  # never restarted over a stopped run by accident
            train(args.data, config_module.build(args, cls=TrainRunConfig, train={"out": str(stopped)}))
        resumed = train(args.data, config_module.build(args, cls=TrainRunConfig,
                                                       train={"out": str(stopped), "resume": True}))
    finally:
        torch.set_num_threads(threads)
    assert resumed.resumed_from == int(sealed[-1].name.removeprefix("step-")) and resumed.steps == 10
    expected, got = weights(clean), weights(stopped)
    assert expected.keys() == got.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    before = weights(base.folder)
    assert any(not torch.equal(before[name], tensor) for name, tensor in expected.items())  # it did train
    rows = [json.loads(line) for line in (stopped / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 11))  # the steps after the checkpoint, once
    assert [len(checkpoints.checkpoint_dirs(stopped))] == [2]  # --keep-checkpoints


def test_two_processes_on_the_cpu_train_like_one_and_checkpoint(meta_out, llava, tiny_cache, tmp_path):
    """torchrun, 2 processes, gloo: each takes half of every global batch; the gradients are
    averaged, so the weights match one process that reads the whole batch."""
    import os
    import signal
    import subprocess
    import sys

    import torch

    from engine.train import checkpoints
    from engine.train.loop import RECORD, train

    steps = ["--max-steps", "4", "--save-every", "2"]
    # its own session: if it hangs, the launcher and both workers are killed together
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                                 "2", "densefusion_local.py", *cli_train(meta_out, tmp_path / "two", llava,
                                                                         tiny_cache, *steps)],
                                cwd=Path(__file__).resolve().parents[1], env=subprocess_env(), text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        stdout, stderr = launcher.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)
        stdout, stderr = launcher.communicate()
    assert launcher.returncode == 0, stderr[-3000:]
    assert "2 process(es)" in stdout and stdout.count("train: engine written") == 1  # the main process
    record = json.loads((tmp_path / "two" / RECORD).read_text())
    assert record["processes"] == 2
    assert [p.name for p in checkpoints.checkpoint_dirs(tmp_path / "two")] == ["step-00000002", "step-00000004"]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(meta_out, train_config(tmp_path / "one", llava, tiny_cache, max_steps=4, save_every=2))
    finally:
        torch.set_num_threads(threads)
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    for name, tensor in one.items():
        torch.testing.assert_close(two[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


def test_lora_trains_adapters_and_saves_them_merged_into_a_plain_checkpoint(meta_out, base, tiny_cache, tmp_path):
    import torch
    from transformers import AutoModelForImageTextToText

    from engine.train.loop import train

    lines: list[str] = []
    cfg = config_module.build(cls=TrainRunConfig, lora={"lora": True, "lora_rank": 4, "lora_alpha": 8},
                              train={"base": base.name, "out": str(tmp_path / "lora"), "cache_dir": str(tiny_cache),
                                     **FAST, "max_steps": 3})
    train(meta_out, cfg, log=lines.append)
    assert any("LoRA rank 4" in line for line in lines)
    assert weights(tmp_path / "lora").keys() == weights(base.folder).keys()  # merged: no adapter weights

    def parameters(folder: Path) -> dict:  # by module path, as the family's layout names them
        return dict(AutoModelForImageTextToText.from_pretrained(folder).named_parameters())

    before, tuned = parameters(base.folder), parameters(tmp_path / "lora")
    changed = {name for name in before if not torch.equal(before[name], tuned[name])}
    layout = base.layout

    def within(name: str, path: str) -> bool:
        return f".{path}." in f".{name}."

    language, projector = layout.language_model[0], layout.projector[0]
    assert any(within(n, language) and "q_proj" in n for n in changed)  # adapters merged in
    assert any(within(n, projector) for n in changed)  # trained in full
    frozen = [n for n in changed if within(n, layout.vision_tower) and not any(within(n, p) for p in layout.projector)]
    assert not frozen and not any("embed_tokens" in n for n in changed)  # vision tower, embeddings: frozen


def test_a_family_without_a_train_layout_is_refused_before_its_weights_load(tmp_path, tiny_cache, monkeypatch):
    import dataclasses

    from engine.train import loop
    from engine.train.config import TrainConfig
    from engine.train.loop import load_base
    from models.caption import families
    from models.errors import ConfigError

    qwen = tiny_base_of(QWEN2_5_VL.name, tiny_cache)
    untrained = dataclasses.replace(QWEN2_5_VL, train=None)  # as a family added for captioning only is
    for module in (families, loop):
        monkeypatch.setattr(module, "FAMILIES", (LLAVA_1_6, untrained))

    def no_weights(*args, **kwargs):
        raise AssertionError("the weights loaded before the family was checked")

    monkeypatch.setattr("transformers.AutoModelForImageTextToText.from_pretrained", no_weights)
    with pytest.raises(ConfigError, match="Qwen2.5-VL checkpoint: train fine-tunes LLaVA-1.6 only"):
        load_base(TrainConfig(base=qwen.name, out=str(tmp_path / "engine"), cache_dir=str(tiny_cache)))


def test_misconfiguration_fails_before_any_work(meta_out, tiny_cache, tmp_path, capsys):
    import densefusion_local

    base = ["--base", "tiny", "--cache-dir", str(tiny_cache), "--device", "cpu"]
    assert densefusion_local.main(["train", str(tmp_path / "nothing"), "--out", str(tmp_path / "a"), *base]) == 2
    assert "no densefusion_sft.json" in capsys.readouterr().err
    assert densefusion_local.main(["train", str(meta_out), "--out", str(tmp_path / "b"), "--global-batch", "3",
                                   "--batch-size", "2", *base]) == 2
    assert "multiple of --batch-size" in capsys.readouterr().err
    assert densefusion_local.main(["evaluate", str(tmp_path / "b")]) == 2
    assert "not a finished `train` output" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_help_walks_a_newcomer_through_train(capsys):
    import densefusion_local

    with pytest.raises(SystemExit):
        densefusion_local.main(["train", "--help"])
    text = capsys.readouterr().out
    for needle in ("META_OUT", "--resume", "--lora", "torchrun", "fsdp_8gpu.yaml", "--caption-model CKPT",
                   "metrics.jsonl", "--held-out-share"):
        assert needle in text, needle


def test_bad_records_are_left_out_with_a_reason_and_the_rest_train(meta_out, llava, tiny_cache, tmp_path):
    import shutil

    from engine.train.loop import RECORD, train

    export = tmp_path / "sft"
    shutil.copytree(meta_out / "sft", export)
    records = json.loads((export / "densefusion_sft.json").read_text())
    (export / records[0]["image"]).write_bytes(b"not an image")  # corrupt
    (export / records[1]["image"]).unlink()  # missing
    records.append({"id": "broken", "image": records[2]["image"], "conversations": [{"from": "human"}]})
    (export / "densefusion_sft.json").write_text(json.dumps(records))

    lines: list[str] = []
    result = train(export, train_config(tmp_path / "engine", llava, tiny_cache, max_steps=1, held_out_share=0.0),
                   log=lines.append)
    assert result.steps == 1
    record = json.loads((tmp_path / "engine" / RECORD).read_text())
    assert record["samples"] == {"train": 4, "held_out": 0, "left_out": 3}
    reasons = "\n".join(record["left_out"])
    assert f"{records[0]['id']}: image" in reasons and "cannot be read" in reasons
    assert "does not exist" in reasons and "not a LLaVA conversation" in reasons
    assert any("left out:" in line for line in lines)


def test_the_8_gpu_config_is_an_fsdp_config_that_wraps_the_models_own_layers(base):
    """What can be checked without GPUs: accelerate reads the shipped config as FSDP on 8 processes
    in bf16 with no layer classes of one family in it, and the classes `train` gives it for a
    family are that model's decoder and vision layers, ones transformers itself never splits."""
    from accelerate.commands.config.config_args import ClusterConfig
    from transformers import AutoConfig, AutoModelForImageTextToText

    import engine.train
    from engine.train.parts import layer_classes, part

    config = ClusterConfig.from_yaml_file(str(Path(engine.train.__file__).parent / "fsdp_8gpu.yaml"))
    assert (str(config.distributed_type), config.num_processes, config.mixed_precision) == \
        ("DistributedType.FSDP", 8, "bf16")
    assert config.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert "fsdp_transformer_layer_cls_to_wrap" not in config.fsdp_config  # train sets them per family
    model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(base.folder))
    classes = layer_classes(model, base.layout)
    assert len(classes) == 2 and set(classes) <= set(model._no_split_modules)
    layers = [*part(model, base.layout.language_layers), *part(model, base.layout.vision_layers)]
    assert {type(layer).__name__ for layer in layers} == set(classes)
