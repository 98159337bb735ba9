"""RAM++ (Recognize Anything Plus): open-vocabulary image tagging over 4,585 tag classes.

The architecture and the parameter names follow the reference implementation
(xinyu1205/recognize-anything: ``ram/models/ram_plus.py``, ``bert.py``,
``swin_transformer.py``) so that the released ``ram_plus_swin_large_14m.pth`` loads with
strict key matching:

* ``visual_encoder``: Swin-L (Microsoft layout: ``layers.i.downsample`` at the *end* of a
  stage, no classification head); output = [mean-pooled token, 144 patch tokens];
* ``image_proj``: 1536 → 512;
* ``label_embed``: 51 CLIP text embeddings (512-d) of LLM-written descriptions per tag;
  the image's global token weighs each tag's descriptions (softmax over the 51, scaled by
  ``exp(reweight_scale)``) into one query per tag, ``wordvec_proj`` (512 → 768) + ReLU;
* ``tagging_head``: a 2-layer BERT decoder with cross-attention only (the reference
  deletes the embeddings and the self-attention) from the tag queries to the image tokens;
* ``fc``: 768 → 1 logit per tag; a tag is on when sigmoid(logit) > its class threshold
  (``ram_tag_list_threshold.txt``, default 0.68).

The reference loops over the batch in Python to weigh the descriptions; here it is one
``einsum`` for the whole batch. The Swin and decoder are written here rather than taken
from timm/transformers because their module names and patch-merging order differ.

Files next to the checkpoint (or its ONNX export, which the exporter copies them beside):
``ram_tag_list.txt`` (one English tag a line, required), ``ram_tag_list_threshold.txt``
(optional), ``ram_plus_config.json`` (optional, only for non-default sizes such as the tiny
test model).
"""

from __future__ import annotations

import json
import pickle
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.records import Tag

CHECKPOINT_NAME = "ram_plus_swin_large_14m.pth"
TAG_LIST_NAME = "ram_tag_list.txt"
THRESHOLD_NAME = "ram_tag_list_threshold.txt"
CONFIG_NAME = "ram_plus_config.json"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class RamPlusConfig:
    """Model sizes; the defaults are the released Swin-L 384 model."""

    image_size: int = 384
    embed_dim: int = 192
    depths: tuple[int, ...] = (2, 2, 18, 2)
    num_heads: tuple[int, ...] = (6, 12, 24, 48)
    window_size: int = 12
    text_dim: int = 512  # CLIP text embedding size of the tag descriptions
    descriptions_per_class: int = 51
    num_classes: int = 4585
    hidden_size: int = 768  # tagging decoder (reference q2l_config.json)
    num_layers: int = 2
    num_attention_heads: int = 4
    intermediate_size: int = 3072
    layer_norm_eps: float = 1e-12
    threshold: float = 0.68

    @property
    def vision_width(self) -> int:
        return self.embed_dim * 2 ** (len(self.depths) - 1)

    @classmethod
    def from_json(cls, path: Path) -> RamPlusConfig:
        data = json.loads(Path(path).read_text())
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


# --- Swin transformer (reference names) ----------------------------------------------


def _window_partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    b, h, w, c = x.shape
    x = x.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws * ws, c)


def _window_reverse(windows: torch.Tensor, ws: int, h: int, w: int) -> torch.Tensor:
    b = windows.shape[0] // ((h // ws) * (w // ws))
    x = windows.view(b, h // ws, w // ws, ws, ws, -1).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, -1)


class WindowAttention(nn.Module):
    def __init__(self, dim: int, window_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        coords = torch.stack(torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij"))
        coords = coords.flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window_size - 1)
        index = rel[..., 0] * (2 * window_size - 1) + rel[..., 1]
        # derived from the window size, so not part of the checkpoint (the reference's
        # loader deletes it from the state dict too)
        self.register_buffer("relative_position_index", index, persistent=False)
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        bw, n, c = x.shape
        q, k, v = self.qkv(x).view(bw, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(n, n, -1).permute(2, 0, 1).unsqueeze(0).to(q.dtype)  # 1, heads, n, n
        if mask is not None:  # shifted windows: -100 between tokens from different regions
            n_windows = mask.shape[0]
            bias = (bias + mask.unsqueeze(1).to(q.dtype)).repeat(bw // n_windows, 1, 1, 1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(bw, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwinTransformerBlock(nn.Module):
    def __init__(self, dim: int, resolution: int, num_heads: int, window_size: int, shift: bool):
        super().__init__()
        self.resolution = resolution
        self.window_size = min(window_size, resolution)
        self.shift_size = self.window_size // 2 if shift and resolution > window_size else 0
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, self.window_size, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim)
        self.register_buffer("attn_mask", self._shift_mask() if self.shift_size else None, persistent=False)

    def _shift_mask(self) -> torch.Tensor:
        ws, s, r = self.window_size, self.shift_size, self.resolution
        regions = torch.zeros(1, r, r, 1)
        label = 0
        for hs in (slice(0, -ws), slice(-ws, -s), slice(-s, None)):
            for vs in (slice(0, -ws), slice(-ws, -s), slice(-s, None)):
                regions[:, hs, vs, :] = label
                label += 1
        windows = _window_partition(regions, ws).squeeze(-1)
        mask = windows.unsqueeze(1) - windows.unsqueeze(2)
        return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, c = x.shape
        r, ws, s = self.resolution, self.window_size, self.shift_size
        h = self.norm1(x).view(b, r, r, c)
        if s:
            h = torch.roll(h, shifts=(-s, -s), dims=(1, 2))
        h = _window_reverse(self.attn(_window_partition(h, ws), self.attn_mask), ws, r, r)
        if s:
            h = torch.roll(h, shifts=(s, s), dims=(1, 2))
        x = x + h.reshape(b, r * r, c)
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    def __init__(self, resolution: int, dim: int):
        super().__init__()
        self.resolution = resolution
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, c = x.shape
        x = x.view(b, self.resolution, self.resolution, c)
        # the reference's concatenation order: (0,0), (1,0), (0,1), (1,1) as (row, col)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x.view(b, -1, 4 * c)))


class BasicLayer(nn.Module):
    def __init__(self, dim: int, resolution: int, depth: int, num_heads: int, window_size: int, downsample: bool):
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(dim, resolution, num_heads, window_size, shift=j % 2 == 1) for j in range(depth)
        )
        self.downsample = PatchMerging(resolution, dim) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.downsample(x) if self.downsample is not None else x


class PatchEmbed(nn.Module):
    def __init__(self, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=4, stride=4)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class SwinTransformer(nn.Module):
    """Returns ``[mean token, patch tokens]``: (B, 1 + (image_size/32)², vision_width)."""

    def __init__(self, cfg: RamPlusConfig):
        super().__init__()
        self.patch_embed = PatchEmbed(cfg.embed_dim)
        resolution = cfg.image_size // 4
        self.layers = nn.ModuleList()
        for i, (depth, heads) in enumerate(zip(cfg.depths, cfg.num_heads)):
            last = i == len(cfg.depths) - 1
            self.layers.append(
                BasicLayer(cfg.embed_dim * 2**i, resolution >> i, depth, heads, cfg.window_size, not last)
            )
        self.norm = nn.LayerNorm(cfg.vision_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        x = self.norm(x)
        return torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)


# --- the tagging decoder (BERT layers with cross-attention only, reference names) ----------


class BertCrossSelfAttention(nn.Module):
    def __init__(self, cfg: RamPlusConfig):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.text_dim, cfg.hidden_size)  # encoder_width = 512 (image_proj)
        self.value = nn.Linear(cfg.text_dim, cfg.hidden_size)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        def heads(t):
            return t.view(t.shape[0], t.shape[1], self.num_heads, -1).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.query(x)), heads(self.key(memory)), heads(self.value(memory)))
        return out.transpose(1, 2).reshape(x.shape)


class BertOutput(nn.Module):
    """dense → dropout (inference: none) → LayerNorm(residual + ·), BERT's post-norm."""

    def __init__(self, d_in: int, d_out: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        self.LayerNorm = nn.LayerNorm(d_out, eps=eps)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(h) + residual)


class BertCrossAttention(nn.Module):
    def __init__(self, cfg: RamPlusConfig):
        super().__init__()
        self.self = BertCrossSelfAttention(cfg)
        self.output = BertOutput(cfg.hidden_size, cfg.hidden_size, cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, memory), x)


class BertIntermediate(nn.Module):
    def __init__(self, cfg: RamPlusConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class BertTaggingLayer(nn.Module):
    def __init__(self, cfg: RamPlusConfig):
        super().__init__()
        self.crossattention = BertCrossAttention(cfg)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertOutput(cfg.intermediate_size, cfg.hidden_size, cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        x = self.crossattention(x, memory)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, cfg: RamPlusConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertTaggingLayer(cfg) for _ in range(cfg.num_layers))


class TaggingHead(nn.Module):
    def __init__(self, cfg: RamPlusConfig):
        super().__init__()
        self.encoder = BertEncoder(cfg)

    def forward(self, queries: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        for layer in self.encoder.layer:
            queries = layer(queries, memory)
        return queries


# --- RAM++ ---------------------------------------------------------------------------


class RamPlus(nn.Module):
    def __init__(self, cfg: RamPlusConfig, tag_list: list[str], thresholds: list[float] | None = None):
        super().__init__()
        self.cfg = cfg
        self.vocabulary = RamPlusVocabulary.of(cfg, tag_list, thresholds)
        self.visual_encoder = SwinTransformer(cfg)
        self.image_proj = nn.Linear(cfg.vision_width, cfg.text_dim)
        self.label_embed = nn.Parameter(torch.zeros(cfg.num_classes * cfg.descriptions_per_class, cfg.text_dim))
        self.wordvec_proj = (
            nn.Linear(cfg.text_dim, cfg.hidden_size) if cfg.hidden_size != cfg.text_dim else nn.Identity()
        )
        self.tagging_head = TaggingHead(cfg)
        self.fc = nn.Linear(cfg.hidden_size, 1)
        self.reweight_scale = nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))  # a 0-d scalar, as in the checkpoint

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised (B, 3, S, S) images → (B, num_classes) tag probabilities."""
        cfg = self.cfg
        image_embeds = self.image_proj(self.visual_encoder(pixels))  # B, 1+L, 512
        image_cls = F.normalize(image_embeds[:, 0], dim=-1)
        descriptions = self.label_embed.to(image_cls.dtype)
        logits = self.reweight_scale.exp() * image_cls @ descriptions.t()  # B, C*D
        weights = logits.view(-1, cfg.num_classes, cfg.descriptions_per_class).softmax(dim=-1)
        per_class = descriptions.view(cfg.num_classes, cfg.descriptions_per_class, cfg.text_dim)
        queries = torch.einsum("bcd,cde->bce", weights, per_class)  # the reference's per-image loop
        queries = F.relu(self.wordvec_proj(queries))
        decoded = self.tagging_head(queries, image_embeds)
        return torch.sigmoid(self.fc(decoded).squeeze(-1))

    def side_files(self) -> tuple[tuple[str, str], ...]:
        """(name, text) of the files :func:`read_vocabulary` reads beside the checkpoint, or
        beside its ONNX export."""
        vocabulary = self.vocabulary
        return ((CONFIG_NAME, json.dumps(asdict(self.cfg), indent=1)),
                (TAG_LIST_NAME, "\n".join(vocabulary.tag_list) + "\n"),
                (THRESHOLD_NAME, "\n".join(f"{t:.6g}" for t in vocabulary.thresholds) + "\n"))

    def tag(self, images: list[np.ndarray]) -> list[list[Tag]]:
        """RGB uint8 HWC arrays → their tags, most probable first."""
        pixels = self.vocabulary.preprocess(images, self.label_embed.device)
        with torch.inference_mode():
            probs = self(pixels.to(self.label_embed.dtype))
        return self.vocabulary.tags(probs.float().cpu().numpy())


@dataclass(frozen=True, eq=False)
class RamPlusVocabulary:
    """The tags, their thresholds and the input size: what turns images into RAM++'s input
    and its probabilities into tags, for the torch model and its ONNX export alike."""

    tag_list: tuple[str, ...]
    thresholds: np.ndarray  # (num_classes,) float32: a tag is on above its class's
    image_size: int

    @classmethod
    def of(cls, cfg: RamPlusConfig, tag_list: list[str], thresholds: list[float] | None) -> RamPlusVocabulary:
        if len(tag_list) != cfg.num_classes:
            raise ValueError(f"tag list has {len(tag_list)} tags, the model {cfg.num_classes} classes")
        per_class = np.full(cfg.num_classes, cfg.threshold) if thresholds is None else np.asarray(thresholds)
        return cls(tuple(tag_list), per_class.astype(np.float32), cfg.image_size)

    def tags(self, probs: np.ndarray) -> list[list[Tag]]:
        """Tags above their class threshold, most probable first, per image."""
        out = []
        for p in probs:
            index = np.flatnonzero(p > self.thresholds)
            index = index[np.argsort(-p[index], kind="stable")]
            out.append([Tag(self.tag_list[i], round(float(p[i]), 4)) for i in index])
        return out

    def preprocess(self, images: list[np.ndarray], device: str | torch.device) -> torch.Tensor:
        """RGB uint8 HWC arrays → normalised (B, 3, S, S), resized on the device (the reference
        resizes to a square, ignoring the aspect ratio)."""
        from models.preprocess import normalise, resize, to_tensor

        size = (self.image_size, self.image_size)
        batch = torch.cat([resize(to_tensor(image, device), size) for image in images])
        return normalise(batch, IMAGENET_MEAN, IMAGENET_STD, torch.float32)


class OnnxRamPlus:
    """The graph ``python -m models.export onnx --target ram_plus`` writes, on ONNX Runtime
    (TensorRT or CUDA on a GPU), with the vocabulary files the export puts beside it."""

    def __init__(self, path: str | Path, device: str = "cpu", threads: int = 0):
        from models.onnx_session import open_session

        path = Path(path).expanduser()
        self.session = open_session(path, device, flag="--ram-plus-model", threads=threads)
        self.vocabulary = read_vocabulary(path)
        self.input_name = self.session.get_inputs()[0].name

    def tag(self, images: list[np.ndarray]) -> list[list[Tag]]:
        pixels = self.vocabulary.preprocess(images, "cpu").numpy()  # ONNX Runtime takes host arrays
        (probs,) = self.session.run(None, {self.input_name: pixels})
        return self.vocabulary.tags(probs)

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]


# --- files -----------------------------------------------------------------------------


def checkpoint_path(name: str | Path) -> Path:
    """A checkpoint file, or a folder holding ``ram_plus_swin_large_14m.pth`` (or one .pth)."""
    path = Path(name).expanduser()
    if path.is_file():
        return path
    if (path / CHECKPOINT_NAME).is_file():
        return path / CHECKPOINT_NAME
    found = sorted(path.glob("*.pth"))
    if len(found) != 1:
        raise FileNotFoundError(f"no RAM++ checkpoint ({CHECKPOINT_NAME}) in {path}")
    return found[0]


def read_checkpoint_state(path: Path) -> dict[str, torch.Tensor]:
    """The reference's checkpoint layout → our state dict.

    The released file holds ``{"model": state_dict}``; the buffers the model derives from
    its sizes (``relative_position_index``, ``attn_mask``) are dropped, and the old name
    ``vision_multi`` becomes ``tagging_head``, as the reference's loader does.
    """
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # a checkpoint that pickled more than tensors
        raise ValueError(
            f"{path} holds more than tensors; if you trust it, re-save its state dict once: "
            f"torch.save({{'model': torch.load(path, weights_only=False)['model']}}, path)"
        ) from exc
    state = raw.get("model", raw)
    out = {}
    for key, value in state.items():
        if "relative_position_index" in key or "attn_mask" in key:
            continue
        out[key.replace("vision_multi", "tagging_head")] = value
    return out


def read_config(folder: Path) -> RamPlusConfig:
    return RamPlusConfig.from_json(folder / CONFIG_NAME) if (folder / CONFIG_NAME).exists() else RamPlusConfig()


def read_vocabulary(model_file: Path) -> RamPlusVocabulary:
    """Tag list (required) and thresholds (optional) from the files beside ``model_file``."""
    folder = model_file.parent
    tag_file = folder / TAG_LIST_NAME
    if not tag_file.exists():
        raise FileNotFoundError(f"RAM++ needs its tag vocabulary {tag_file} (one tag a line) next to {model_file.name}")
    thresholds = [float(v) for v in read_lines(folder / THRESHOLD_NAME)] if (folder / THRESHOLD_NAME).exists() else None
    return RamPlusVocabulary.of(read_config(folder), read_lines(tag_file), thresholds)


def load_ram_plus(name: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> RamPlus:
    """Load a RAM++ checkpoint with strict key matching; tags/thresholds from files beside it."""
    ckpt = checkpoint_path(name)
    vocabulary = read_vocabulary(ckpt)
    model = RamPlus(read_config(ckpt.parent), list(vocabulary.tag_list), list(vocabulary.thresholds))
    model.load_state_dict(read_checkpoint_state(ckpt), strict=True)
    return model.to(device=device, dtype=dtype).eval()


def load_tagger(name: str | Path, device: str) -> RamPlus | OnnxRamPlus:
    """An ``.onnx`` export → ONNX Runtime; a checkpoint (or its folder) → torch, fp16 on a GPU."""
    if str(name).endswith(".onnx"):
        return OnnxRamPlus(name, device)
    return load_ram_plus(name, device=device, dtype=torch.float16 if device.startswith("cuda") else torch.float32)


def vocabulary_file(name: str | Path) -> Path:
    """The tag list beside a checkpoint, its folder, or its ONNX export."""
    return checkpoint_path(name).parent / TAG_LIST_NAME


def read_lines(path: Path) -> list[str]:
    """A vocabulary-style file: one entry a line, blank lines skipped."""
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


TINY_TAGS = (
    "dog", "cat", "person", "car", "tree", "sky", "building", "table",
    "cup", "book", "grass", "road", "bicycle", "flower", "water", "chair",
)


def build_tiny(folder: Path, seed: int = 0) -> Path:
    """A random-weight RAM++ of the real architecture, saved like the released checkpoint."""
    cfg = RamPlusConfig(
        image_size=64, embed_dim=8, depths=(1, 2), num_heads=(1, 2), window_size=4, text_dim=16,
        descriptions_per_class=3, num_classes=len(TINY_TAGS), hidden_size=16, num_layers=2,
        num_attention_heads=2, intermediate_size=32, threshold=0.5,
    )
    torch.manual_seed(seed)
    model = RamPlus(cfg, list(TINY_TAGS))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in model.side_files():
        (folder / name).write_text(text, encoding="utf-8")
    torch.save({"model": model.state_dict()}, folder / CHECKPOINT_NAME)
    return folder
