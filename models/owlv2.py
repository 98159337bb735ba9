"""OWLv2 open-set detection (``transformers`` ``Owlv2ForObjectDetection``) queried with tags.

Three things differ from calling the model the stock way:

* query embeddings (text tower + projection) are computed once per distinct query text and
  cached across images: a run sees the same few thousand tags again and again, and the
  text tower would otherwise run for every image × tag;
* the image side runs ``image_embedder`` + ``class_predictor`` + ``box_predictor`` with
  those cached queries, one batch of images against the union of their queries, each
  image's own queries unmasked;
* preprocessing on tensors: resize the longer side to the model's size and pad the
  bottom/right to a square (the stock processor pads first, then resizes the whole
  square with a Gaussian blur; same geometry, far less work). ``preprocess="stock"``
  keeps the processor for comparison (``python -m bench experts`` measures both).

Boxes come back normalised to [0, 1] of the original image (see ``engine.evidence.boxes.unpad_square``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from models.geometry import unpad_square
from models.records import Box

PREPROCESS_MODES = ("tensor", "stock")


class Owlv2Detector:
    def __init__(self, model: str, *, device: str = "cpu", preprocess: str = "tensor",
                 query_template: str = "a photo of a {}", nms_iou: float = 0.5, fp16: bool | None = None):
        import torch
        from transformers import (
            AutoImageProcessor,
            AutoTokenizer,
            Owlv2ForObjectDetection,
        )

        if preprocess not in PREPROCESS_MODES:
            raise ValueError(f"preprocess must be one of {PREPROCESS_MODES}")
        self.device = device
        self.dtype = torch.float16 if (device.startswith("cuda") if fp16 is None else fp16) else torch.float32
        self.model = Owlv2ForObjectDetection.from_pretrained(model, dtype=self.dtype).to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.processor = AutoImageProcessor.from_pretrained(model)
        self.size = self.model.config.vision_config.image_size
        self.preprocess_mode = preprocess
        self.query_template = query_template
        self.nms_iou = nms_iou
        self.max_query_tokens = min(self.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings)
        self._letterbox = None  # built on first use (buffers reused across batches)
        self._queries: dict[str, torch.Tensor] = {}  # query text → projected text embedding
        self.name = model

    # --- queries ---------------------------------------------------------------------

    def query_embeddings(self, labels: Sequence[str]):
        """(len(labels), D) query embeddings; only texts never seen before hit the text tower."""
        import torch

        texts = [self.query_template.format(label) for label in labels]
        missing = sorted({t for t in texts if t not in self._queries})
        if missing:
            tokens = self.tokenizer(missing, padding="max_length", truncation=True,
                                    max_length=self.max_query_tokens, return_tensors="pt").to(self.device)
            with torch.inference_mode():
                out = self.model.owlv2.get_text_features(input_ids=tokens["input_ids"],
                                                         attention_mask=tokens["attention_mask"])
            for text, embedding in zip(missing, out.pooler_output):
                self._queries[text] = embedding
        return torch.stack([self._queries[t] for t in texts])

    @property
    def cached_queries(self) -> int:
        return len(self._queries)

    # --- images ----------------------------------------------------------------------

    def preprocess(self, images: Sequence[np.ndarray]):
        """RGB uint8 HWC arrays → (B, 3, S, S) normalised, padded bottom/right to a square."""
        from models.preprocess import Letterbox, to_device

        if self.preprocess_mode == "stock":
            pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"]
            return to_device(pixels, self.device, self.dtype)
        if self._letterbox is None or self._letterbox.side != self.size:
            self._letterbox = Letterbox(self.size, self.device, self.processor.image_mean, self.processor.image_std)
        pixels, _ = self._letterbox(images)  # padding 0 = black, as the stock path
        return pixels.to(self.dtype)

    def detect(self, images: Sequence[np.ndarray], queries: Sequence[Sequence[str]], *,
               min_score: float = 0.0) -> list[list[Box]]:
        """Per image, boxes of its own query labels scoring at least ``min_score``."""
        import torch

        if len(images) != len(queries):
            raise ValueError("one query list per image")
        out: list[list[Box]] = [[] for _ in images]
        wanted = [i for i, q in enumerate(queries) if q]
        if not wanted:
            return out
        labels = sorted({label for i in wanted for label in queries[i]})
        column = {label: j for j, label in enumerate(labels)}
        query_embeds = self.query_embeddings(labels)
        mask = torch.zeros(len(wanted), len(labels), dtype=torch.bool, device=self.device)
        for row, i in enumerate(wanted):
            mask[row, [column[label] for label in queries[i]]] = True
        pixels = self.preprocess([images[i] for i in wanted])
        with torch.inference_mode():
            feature_map, _ = self.model.image_embedder(pixel_values=pixels)
            b, h, w, d = feature_map.shape
            image_feats = feature_map.reshape(b, h * w, d)
            logits, _ = self.model.class_predictor(
                image_feats, query_embeds[None].expand(b, -1, -1).to(image_feats.dtype), mask
            )
            boxes = self.model.box_predictor(image_feats, feature_map)  # cxcywh in the padded square
        scores, label_idx = torch.sigmoid(logits.float()).max(dim=-1)  # best query per patch
        xyxy = _cxcywh_to_xyxy(boxes.float())
        for row, i in enumerate(wanted):
            out[i] = self._boxes(xyxy[row], scores[row], label_idx[row], labels, images[i].shape, min_score)
        return out

    def _boxes(self, xyxy, scores, label_idx, labels, shape, min_score) -> list[Box]:
        from torchvision.ops import batched_nms

        keep = scores >= min_score
        xyxy, scores, label_idx = xyxy[keep], scores[keep], label_idx[keep]
        if self.nms_iou < 1.0 and len(scores):
            keep = batched_nms(xyxy, scores, label_idx, self.nms_iou)
            xyxy, scores, label_idx = xyxy[keep], scores[keep], label_idx[keep]
        h, w = shape[:2]
        return [
            Box(labels[int(k)], round(float(s), 4), unpad_square(box.tolist(), w, h), "owlv2")
            for box, s, k in zip(xyxy.cpu(), scores.cpu(), label_idx.cpu())
        ]

    def describe(self) -> str:
        return f"owlv2 {self.name} ({self.preprocess_mode} preprocessing, {self.device})"


def input_side(model: str) -> int:
    """The side of the square OWLv2 reads (960 for base, 1008 for large), from its config.json;
    the engine decodes the detector's view at this size."""
    config = Path(model) / "config.json"
    if config.is_file():
        return int(json.loads(config.read_text())["vision_config"].get("image_size", 960))
    return 960


def _cxcywh_to_xyxy(boxes):
    import torch

    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


TINY_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
               "image_size": 64, "patch_size": 16}


def build_tiny(folder: Path, *, vision: dict | None = None) -> Path:
    """A random-weight OWLv2 with an in-memory byte-level BPE tokenizer (no download).

    ``vision`` replaces the tiny vision tower (``{}``: the real base one, 960 px) for
    throughput measurements. Traps: ``projection_dim`` must equal the text hidden size, and
    OWLv2 masks queries whose first token id is 0, so the BOS id is 1.
    """
    import torch
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import (
        Owlv2Config,
        Owlv2ForObjectDetection,
        Owlv2ImageProcessor,
        Owlv2Processor,
        PreTrainedTokenizerFast,
    )

    torch.manual_seed(0)
    specials = ["<pad>", "<|startoftext|>", "<|endoftext|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(["a photo of a dog cat person car tree sky table cup"] * 4, trainer)
    bpe.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", 1), ("<|endoftext|>", 2)]
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                        pad_token="<pad>", unk_token="<|endoftext|>", model_max_length=16)
    hidden = 32
    config = Owlv2Config(
        text_config={"vocab_size": bpe.get_vocab_size(), "hidden_size": hidden, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 16,
                     "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0},
        vision_config=TINY_VISION if vision is None else vision,
        projection_dim=hidden,
    )
    Owlv2ForObjectDetection(config).eval().save_pretrained(folder)
    side = config.vision_config.image_size
    Owlv2Processor(image_processor=Owlv2ImageProcessor(size={"height": side, "width": side}),
                   tokenizer=tokenizer).save_pretrained(folder)
    return Path(folder)

