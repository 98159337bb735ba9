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

Boxes come back normalised to [0, 1] of the original image (see ``engine.boxes.unpad_square``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from engine.boxes import unpad_square
from engine.record import Box

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
        self.mean = torch.tensor(self.processor.image_mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(self.processor.image_std, device=device).view(1, 3, 1, 1)
        self.preprocess_mode = preprocess
        self.query_template = query_template
        self.nms_iou = nms_iou
        self.max_query_tokens = min(self.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings)
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
        import torch
        import torch.nn.functional as F

        if self.preprocess_mode == "stock":
            pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"]
            return pixels.to(self.device, self.dtype)
        s = self.size
        batch = torch.zeros(len(images), 3, s, s, device=self.device)  # padding = 0 in [0, 1], as stock
        for i, image in enumerate(images):
            h, w = image.shape[:2]
            scale = s / max(h, w)
            nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
            t = torch.from_numpy(np.ascontiguousarray(image)).to(self.device).permute(2, 0, 1)[None].float()
            if (nh, nw) != (h, w):
                t = F.interpolate(t, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
            batch[i, :, :nh, :nw] = t[0] / 255.0
        return ((batch - self.mean) / self.std).to(self.dtype)

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


def _cxcywh_to_xyxy(boxes):
    import torch

    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)
