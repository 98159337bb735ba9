"""One prompt on every backend, proven where the user stands: ``densefusion_local.py run`` on
real-like images of varied sizes and aspect ratios (tall, wide, tiny, huge) with transformers,
with SGLang's CPU engine and with an OpenAI-compatible endpoint, then ``export sft`` into
``train``'s samples. Every local backend and train's samples hold the same prompt token ids
(text, turn markers and the image's AnyRes tokens at the same place), the endpoint gets the same
conversation, and greedy captions are equal.

What this guards against: SGLang once laid out its own chat template (94 tokens of system text,
the image after the prompt) while transformers used the checkpoint's; a unit test passed because
it gave SGLang the checkpoint's layout by hand, and every real image got two different prompts.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import sample_members, write_tar
from PIL import Image

from models.caption.chat import chat_text, check_chat_template, user_turn
from models.caption.families import LLAVA_1_6
from models.caption.sglang_backend import sglang_available
from models.errors import ConfigError

pytestmark = pytest.mark.slow  # starts SGLang's CPU engine: left out by the quick test command (README)

# (width, height): square, landscape and portrait photos, panoramas both ways, huge ones (cut to
# --caption-max-side), tiny ones (under the tiny model's 64 px tile), near-square, odd sizes
SIZES = ((500, 500), (1352, 900), (900, 1352), (640, 480), (480, 640), (1600, 400), (400, 1600),
         (3000, 1800), (1800, 3000), (72, 48), (33, 200), (3000, 500), (449, 1201), (801, 800))
KEY = re.compile(r"photo (\d{5}) of")  # the alt text names its sample's key
TOKENS = 12


def photo(width: int, height: int, seed: int, mode: str = "RGB") -> Image.Image:
    """Smooth gradients under sensor-like noise: compresses and decodes like a photograph."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y + 37 * seed) % 256], -1)
    pixels = (base + rng.integers(0, 40, (height, width, 3))).clip(0, 255).astype(np.uint8)
    return Image.fromarray(pixels).convert(mode)


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **({"quality": 85} if fmt == "JPEG" else {}))
    return buffer.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("parity")
    paths = []
    for s in range(2):
        members = []
        for i, (width, height) in enumerate(SIZES[s * 7:(s + 1) * 7]):
            key, n = f"{s}{i:04d}", s * 7 + i
            # one greyscale JPEG and one PNG among the RGB JPEGs, as web shards hold
            mode, fmt, ext = ("L", "JPEG", "jpg") if n == 4 else ("RGB", "PNG", "png") if n == 9 else ("RGB", "JPEG", "jpg")
            members += sample_members(key, encoded(photo(width, height, n, mode), fmt),
                                      f"photo {key} of a street, {width}x{height}", ext=ext)
        paths.append(write_tar(folder / f"shard-{s}.tar", members))
    return paths


def run_cli(shards: list[Path], out: Path, tiny_cache: Path, *options: str) -> dict[str, dict]:
    """``run`` as a user types it (tiny images kept: --min-short-edge 0); the written samples by key."""
    import densefusion_local
    from engine.output.dataset_reader import iter_samples

    code = densefusion_local.main([
        "run", "--shards", *map(str, shards), "--out", str(out), "--models", "tiny", "--device", "cpu",
        "--no-progress", "--cache-dir", str(tiny_cache), "--min-short-edge", "0",
        "--stages", "decode", "tag", "detect", "prompt", "caption", "--max-new-tokens", str(TOKENS), *options,
    ])
    assert code == 0
    return {s.key: s.annotations for s in iter_samples(out)}


def by_key(processor, sequences: list[list[int]]) -> dict[str, list[int]]:
    """Recorded token id sequences, keyed by the sample whose alt text they hold."""
    keyed = {}
    for ids in sequences:
        key = KEY.search(processor.tokenizer.decode(ids)).group(1)
        assert key not in keyed, f"{key} captioned twice"
        keyed[key] = ids
    return keyed


@pytest.fixture(scope="module")
def processor(tiny_cache):
    from transformers import AutoProcessor

    from models import tiny

    return AutoProcessor.from_pretrained(tiny.ensure("caption", tiny_cache / "tiny"))


@pytest.fixture(scope="module")
def runs(shards, tiny_cache, processor, tmp_path_factory):
    """The same shards through `run` on every backend, recording what each engine was fed: the
    transformers model's ``input_ids``, SGLang's own tokenisation of the request (its one image
    token expanded to as many as SGLang counted in the prompt), the endpoint's messages."""
    from bench._chat_server import ChatServer
    from models.caption import sglang_backend
    from models.caption.transformers_backend import TransformersCaptionEngine

    tmp = tmp_path_factory.mktemp("runs")
    fed: dict[str, list[list[int]]] = {"transformers": [], "sglang": []}
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    with pytest.MonkeyPatch.context() as patch:
        load_transformers = TransformersCaptionEngine.__init__

        def transformers_init(self, *args, **kwargs):
            load_transformers(self, *args, **kwargs)
            generate = self.net.generate

            def recording(**inputs):
                for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"], strict=True):
                    fed["transformers"].append(ids[mask.bool()].tolist())  # left padding off
                return generate(**inputs)

            self.net.generate = recording

        patch.setattr(TransformersCaptionEngine, "__init__", transformers_init)
        start_sglang = sglang_backend.SglangEngine.__init__

        def sglang_init(self, *args, **kwargs):
            start_sglang(self, *args, **kwargs)
            manager = self._engine.tokenizer_manager
            generate_request = manager.generate_request

            def asking_for_ids(obj, request=None):
                obj.return_prompt_token_ids = True  # SGLang's tokenisation comes back in the output
                return generate_request(obj, request)

            manager.generate_request = asking_for_ids

        patch.setattr(sglang_backend.SglangEngine, "__init__", sglang_init)
        to_caption = sglang_backend.caption_from_output

        def recording_output(out, *args):
            ids, total = list(out["prompt_token_ids"]), out["meta_info"]["prompt_tokens"]
            assert ids.count(image_id) == 1, "SGLang tokenised the request's text to more or fewer image slots"
            at = ids.index(image_id)
            fed["sglang"].append(ids[:at] + [image_id] * (total - len(ids) + 1) + ids[at + 1:])
            return to_caption(out, *args)

        patch.setattr(sglang_backend, "caption_from_output", recording_output)
        written = {"transformers": run_cli(shards, tmp / "transformers", tiny_cache),
                   "sglang": run_cli(shards, tmp / "sglang", tiny_cache, "--caption-backend", "sglang")}
    with ChatServer() as server:
        written["openai"] = run_cli(shards, tmp / "openai", tiny_cache, "--caption-backend", "openai",
                                    "--api-base", server.url, "--api-model", "fake")
    return written, {name: by_key(processor, ids) for name, ids in fed.items()}, server.messages, tmp


def train_prompt_ids(processor, layout, out: Path, to: Path) -> dict[str, list[int]]:
    """`export sft` of the output, read as `train` reads it (``layout``: the family's
    ``TrainLayout``): each sample's context (its tokens without a label) is the prompt with the
    image's tokens."""
    import densefusion_local
    from engine.train.data import IGNORE, SampleEncoder, read_records

    assert densefusion_local.main(["export", "sft", str(out), "--to", str(to)]) == 0
    records, left_out = read_records(to)
    assert left_out == []
    encoder = SampleEncoder(processor, layout, max_length=4096, max_side=1344)  # train's default --caption-max-side
    ids = {}
    for record in records:
        sample = encoder(record)
        context = int((sample["labels"] == IGNORE).sum())
        assert (sample["labels"][:context] == IGNORE).all()  # the context comes first, whole
        ids[record.key.split("/", 1)[1]] = sample["input_ids"][:context].tolist()  # export ids are <shard>/<key>
    assert len(ids) == len(records)  # the test's keys are unique across its shards
    return ids


@pytest.mark.skipif(not sglang_available(), reason="the sglang extra is not installed")
def test_every_backend_and_train_see_the_same_prompt_tokens(runs, processor):
    written, fed, _, tmp = runs
    keys = sorted(written["transformers"])
    assert len(keys) == len(SIZES) and all(sorted(w) == keys for w in written.values())
    assert sorted(fed["transformers"]) == sorted(fed["sglang"]) == keys
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    train = train_prompt_ids(processor, LLAVA_1_6.train, tmp / "transformers", tmp / "sft")
    assert sorted(train) == keys
    tiles = set()
    for key in keys:
        prompt = written["transformers"][key]["prompt"]
        assert written["sglang"][key]["prompt"] == written["openai"][key]["prompt"] == prompt
        ids = fed["transformers"][key]
        assert fed["sglang"][key] == ids, key
        assert train[key] == ids, key
        # ...and they are the one chat text, its image placeholder expanded into the AnyRes tokens
        text = chat_text(processor, prompt)
        head, tail = (processor.tokenizer(part, add_special_tokens=False)["input_ids"]
                      for part in text.split(processor.image_token))
        n_image = len(ids) - len(head) - len(tail)
        assert ids == head + [image_id] * n_image + tail, key
        tiles.add(n_image)
        assert written["transformers"][key]["engine"]["prompt_tokens"] == len(ids)
        assert written["sglang"][key]["engine"]["prompt_tokens"] == len(ids), key
    assert len(tiles) >= 4  # the sizes reached several AnyRes grids, not one


@pytest.mark.skipif(not sglang_available(), reason="the sglang extra is not installed")
def test_greedy_captions_are_equal_on_transformers_and_sglang(runs):
    written = runs[0]
    differ = {key: (sample["caption"], written["sglang"][key]["caption"])
              for key, sample in written["transformers"].items()
              if sample["caption"] != written["sglang"][key]["caption"]}
    assert not differ
    assert all(sample["engine"]["output_tokens"] > 0 for sample in written["transformers"].values())


@pytest.mark.skipif(not sglang_available(), reason="the sglang extra is not installed")
def test_the_endpoint_gets_the_same_conversation(runs):
    written, _, messages, _ = runs
    assert len(messages) == len(SIZES)
    for sent in messages:
        text, image = sent[0]["content"]
        key = KEY.search(text["text"]).group(1)
        assert image["type"] == "image_url" and image["image_url"]["url"].startswith("data:image/jpeg;base64,")
        # the turn the local engines render with the checkpoint's template, the image part in its slot
        assert sent == user_turn(written["transformers"][key]["prompt"], image)
        assert written["openai"][key]["caption"]  # the endpoint's answer was written


def test_the_tiny_template_puts_the_image_first_without_system_text(processor):
    assert chat_text(processor, "describe [IMAGE]:") == "USER: <image>\ndescribe [IMAGE]: ASSISTANT:"


@pytest.mark.parametrize("template, problem", [
    ("", "no chat template"),
    ("{% for m in messages %}{{ m['content'][0]['text'] }}{% endfor %}", "0 image placeholders"),
    ("<image><image>{% for m in messages %}{{ m['content'][0]['text'] }}{% endfor %}", "2 image placeholders"),
])
def test_a_chat_template_that_loses_or_doubles_the_image_is_refused_before_any_work(processor, template, problem):
    import copy

    broken = copy.copy(processor)
    broken.chat_template = template or None
    with pytest.raises(ConfigError, match=problem):
        check_chat_template(broken, "m")
    check_chat_template(processor, "m")  # the real one passes
