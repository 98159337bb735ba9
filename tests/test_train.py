"""Fine-tuning the caption engine on a meta dataset made by `meta` (tiny LLaVA-NeXT, CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.core import config as config_module
from engine.train.config import TrainRunConfig
from engine.train.data import IGNORE, SampleEncoder, held_out_keys, read_records

# Tiny and fast: one forward pass per sample, two samples per step; a learning rate that
# teaches the tiny model GPT-4V's words within a few dozen steps.
FAST = {"batch_size": 1, "global_batch": 2, "learning_rate": 3e-3, "warmup_ratio": 0.0, "max_grad_norm": 0.0,
        "loader_workers": 0, "log_every": 100, "device": "cpu"}


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


def train_config(out: Path, tiny_cache: Path, **options) -> TrainRunConfig:
    train = {"base": "tiny", "out": str(out), "cache_dir": str(tiny_cache), **FAST, **options}
    return config_module.build(cls=TrainRunConfig, train=train)


def tiny_base(tiny_cache: Path) -> Path:
    """The folder of the tiny LLaVA-NeXT that `--base tiny` trains from."""
    from models.base import ModelRef

    return Path(ModelRef("tiny", "caption").resolve(tiny_cache))


def tiny_processor(tiny_cache: Path):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_base(tiny_cache))


def test_only_the_caption_tokens_and_end_of_sequence_carry_loss(meta_out, tiny_cache):
    from models.caption.chat import chat_text

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


@pytest.fixture(scope="module")
def engine(meta_out, tiny_cache, tmp_path_factory):
    """One fine-tuned engine for the tests that read it: a few dozen steps, 1 of 6 samples held out."""
    from engine.train.loop import train

    out = tmp_path_factory.mktemp("engine") / "engine"
    lines: list[str] = []
    result = train(meta_out, train_config(out, tiny_cache, max_steps=24, held_out_share=0.2, log_every=8),
                   log=lines.append)
    return out, result, lines


def test_a_few_dozen_steps_lower_the_training_loss(meta_out, tiny_cache, engine):
    import torch
    from transformers import AutoModelForImageTextToText

    from engine.train.loop import RECORD, iter_rows, mean_loss

    out, result, lines = engine
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
        return mean_loss(model, training, encoder, pad, device="cpu")

    before, after = loss_of(tiny_base(tiny_cache)), loss_of(out)
    assert after < 0.8 * before, (before, after)

    rows = list(iter_rows(out / "metrics.jsonl"))
    assert [r["step"] for r in rows] == list(range(1, 25))
    assert all(r["lr"] >= 0 and r["loss"] > 0 for r in rows) and rows[0]["lr"] > rows[-1]["lr"]  # cosine decay
    assert sum("held_out_loss" in r for r in rows) >= 2
    assert any(line.startswith("step 8/24") for line in lines)
    assert any("language model + projector + top 1 of 1 vision layers" in line for line in lines)


@pytest.mark.parametrize("backend", ["transformers", pytest.param("sglang", marks=pytest.mark.slow)])
def test_the_engine_captions_through_run_caption_model(meta_out, engine, tiny_cache, tmp_path, backend):
    """The checkpoint serves unchanged on transformers and, converted to the native LLaVA layout
    by the sglang backend itself, on SGLang's CPU engine (in a child process: its own engine)."""
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


def cli_train(meta_out: Path, out: Path, tiny_cache: Path, *extra: str) -> list[str]:
    """The `train` command line with the FAST options."""
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in FAST.items()]
    return ["train", str(meta_out), "--base", "tiny", "--out", str(out), "--cache-dir", str(tiny_cache),
            *flags, *extra]


def subprocess_env() -> dict[str, str]:
    import os

    # one thread, like the in-process runs compared with it (reduction order, hence the last bits)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def test_a_run_killed_mid_training_and_resumed_ends_with_the_uninterrupted_weights(meta_out, tiny_cache, tmp_path):
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
        args = densefusion_local.build_parser().parse_args(cli_train(meta_out, clean, tiny_cache, *steps))
        train(args.data, config_module.build(args, cls=TrainRunConfig))

        stopped = tmp_path / "stopped"
        process = subprocess.Popen([sys.executable, "densefusion_local.py", *cli_train(meta_out, stopped, tiny_cache,
                                                                                       *steps)],
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
    base = weights(tiny_base(tiny_cache))
    assert any(not torch.equal(base[name], tensor) for name, tensor in expected.items())  # it did train
    rows = [json.loads(line) for line in (stopped / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 11))  # the steps after the checkpoint, once
    assert [len(checkpoints.checkpoint_dirs(stopped))] == [2]  # --keep-checkpoints


def test_two_processes_on_the_cpu_train_like_one_and_checkpoint(meta_out, tiny_cache, tmp_path):
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
                                 "2", "densefusion_local.py", *cli_train(meta_out, tmp_path / "two", tiny_cache,
                                                                         *steps)],
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
        train(meta_out, train_config(tmp_path / "one", tiny_cache, max_steps=4, save_every=2))
    finally:
        torch.set_num_threads(threads)
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    for name, tensor in one.items():
        torch.testing.assert_close(two[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


def test_lora_trains_adapters_and_saves_them_merged_into_a_plain_checkpoint(meta_out, tiny_cache, tmp_path):
    import torch

    from engine.train.loop import train

    lines: list[str] = []
    cfg = config_module.build(cls=TrainRunConfig, lora={"lora": True, "lora_rank": 4, "lora_alpha": 8},
                              train={"base": "tiny", "out": str(tmp_path / "lora"), "cache_dir": str(tiny_cache),
                                     **FAST, "max_steps": 3})
    train(meta_out, cfg, log=lines.append)
    assert any("LoRA rank 4" in line for line in lines)
    base, tuned = weights(tiny_base(tiny_cache)), weights(tmp_path / "lora")
    assert tuned.keys() == base.keys()  # merged: no adapter weights, loads as the base does
    changed = {name for name in base if not torch.equal(base[name], tuned[name])}
    assert any("language_model" in n and "q_proj" in n for n in changed)  # adapters merged in
    assert any("multi_modal_projector" in n for n in changed)  # trained in full
    assert not any("vision_tower" in n or "embed_tokens" in n for n in changed)  # frozen


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


def test_bad_records_are_left_out_with_a_reason_and_the_rest_train(meta_out, tiny_cache, tmp_path):
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
    result = train(export, train_config(tmp_path / "engine", tiny_cache, max_steps=1, held_out_share=0.0),
                   log=lines.append)
    assert result.steps == 1
    record = json.loads((tmp_path / "engine" / RECORD).read_text())
    assert record["samples"] == {"train": 4, "held_out": 0, "left_out": 3}
    reasons = "\n".join(record["left_out"])
    assert f"{records[0]['id']}: image" in reasons and "cannot be read" in reasons
    assert "does not exist" in reasons and "not a LLaVA conversation" in reasons
    assert any("left out:" in line for line in lines)


def test_the_8_gpu_config_is_an_fsdp_config_that_wraps_the_models_own_layers(tiny_cache):
    """What can be checked without GPUs: accelerate reads the shipped config as FSDP on 8 processes
    in bf16, and the layer classes it shards by are the ones LLaVA-NeXT is built of."""
    from accelerate.commands.config.config_args import ClusterConfig
    from transformers import AutoConfig, AutoModelForImageTextToText

    import engine.train

    config = ClusterConfig.from_yaml_file(str(Path(engine.train.__file__).parent / "fsdp_8gpu.yaml"))
    assert (str(config.distributed_type), config.num_processes, config.mixed_precision) == \
        ("DistributedType.FSDP", 8, "bf16")
    model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(tiny_base(tiny_cache)))
    built_of = {type(m).__name__ for m in model.modules()}
    assert set(config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"].split(",")) <= built_of
