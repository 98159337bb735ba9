import numpy as np
import pytest
import torch

from models import ram_plus
from models.ram_plus import (
    RamPlus,
    RamPlusConfig,
    build_tiny,
    load_ram_plus,
    read_checkpoint_state,
)


def released_checkpoint_keys() -> dict[str, tuple[int, ...]]:
    """Key names and shapes of ``ram_plus_swin_large_14m.pth`` after the reference loader's
    clean-up, written out from the reference modules (recognize-anything ``ram_plus.py``:
    ``visual_encoder`` = Microsoft Swin-L 384 w12 [2,2,18,2] × [6,12,24,48], no head;
    ``image_proj``; ``label_embed`` 4585 × 51 descriptions; ``wordvec_proj``; ``fc``;
    ``reweight_scale``; ``tagging_head`` = BLIP ``BertModel`` of q2l_config (768 wide,
    2 layers, encoder_width 512) after ``del_selfattention()`` removed its embeddings and
    every layer's ``attention``).

    Checked on 2026-11-23 against an instance of the reference model (recognize-anything at
    7cb804a, ``RAM_plus(image_size=384, vit="swin_l")``): its state dict is exactly these 367
    names and shapes plus the derived ``relative_position_index`` / ``attn_mask`` buffers,
    which the loader drops."""
    keys: dict[str, tuple[int, ...]] = {}

    def linear(name, d_out, d_in, bias=True):
        keys[f"{name}.weight"] = (d_out, d_in)
        if bias:
            keys[f"{name}.bias"] = (d_out,)

    def norm(name, d):
        keys[f"{name}.weight"] = (d,)
        keys[f"{name}.bias"] = (d,)

    keys["visual_encoder.patch_embed.proj.weight"] = (192, 3, 4, 4)
    keys["visual_encoder.patch_embed.proj.bias"] = (192,)
    norm("visual_encoder.patch_embed.norm", 192)
    for i, (depth, heads) in enumerate(zip((2, 2, 18, 2), (6, 12, 24, 48))):
        dim = 192 * 2**i
        for j in range(depth):
            b = f"visual_encoder.layers.{i}.blocks.{j}"
            norm(f"{b}.norm1", dim)
            keys[f"{b}.attn.relative_position_bias_table"] = (23 * 23, heads)
            linear(f"{b}.attn.qkv", 3 * dim, dim)
            linear(f"{b}.attn.proj", dim, dim)
            norm(f"{b}.norm2", dim)
            linear(f"{b}.mlp.fc1", 4 * dim, dim)
            linear(f"{b}.mlp.fc2", dim, 4 * dim)
        if i < 3:
            linear(f"visual_encoder.layers.{i}.downsample.reduction", 2 * dim, 4 * dim, bias=False)
            norm(f"visual_encoder.layers.{i}.downsample.norm", 4 * dim)
    norm("visual_encoder.norm", 1536)
    linear("image_proj", 512, 1536)
    keys["label_embed"] = (4585 * 51, 512)
    linear("wordvec_proj", 768, 512)
    linear("fc", 1, 768)
    keys["reweight_scale"] = ()  # 0-d in the reference (checked against an instance of it)
    for n in range(2):
        layer = f"tagging_head.encoder.layer.{n}"
        linear(f"{layer}.crossattention.self.query", 768, 768)
        linear(f"{layer}.crossattention.self.key", 768, 512)
        linear(f"{layer}.crossattention.self.value", 768, 512)
        linear(f"{layer}.crossattention.output.dense", 768, 768)
        norm(f"{layer}.crossattention.output.LayerNorm", 768)
        linear(f"{layer}.intermediate.dense", 3072, 768)
        linear(f"{layer}.output.dense", 768, 3072)
        norm(f"{layer}.output.LayerNorm", 768)
    return keys


def test_real_size_model_defines_exactly_the_released_keys():
    with torch.device("meta"):  # shapes only: no 1.3 GB of weights
        model = RamPlus(RamPlusConfig(), [f"tag{i}" for i in range(4585)])
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = released_checkpoint_keys()
    assert sorted(set(ours) - set(expected)) == []
    assert sorted(set(expected) - set(ours)) == []
    assert {k: v for k, v in ours.items() if expected[k] != v} == {}
    # 195M Swin-L parameters + the description embeddings, as published
    swin = sum(v.numel() for k, v in model.state_dict().items() if k.startswith("visual_encoder."))
    assert 190e6 < swin < 200e6


def test_reference_layout_is_read_like_the_reference_loader(tmp_path):
    folder = build_tiny(tmp_path / "ram")
    path = folder / ram_plus.CHECKPOINT_NAME
    state = torch.load(path, weights_only=True)["model"]
    # the reference checkpoint also holds derived buffers and may use the old decoder name
    state = {k.replace("tagging_head", "vision_multi"): v for k, v in state.items()}
    state["visual_encoder.layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(16, 16)
    state["visual_encoder.layers.1.blocks.1.attn_mask"] = torch.zeros(1)
    torch.save({"model": state}, path)
    loaded = read_checkpoint_state(path)
    assert not any("vision_multi" in k or "relative_position_index" in k or "attn_mask" in k for k in loaded)
    model = load_ram_plus(folder)  # strict: raises on any missing or unexpected key
    assert set(model.state_dict()) == set(loaded)


def test_tiny_roundtrip_strict_and_same_outputs(tmp_path):
    torch.set_num_threads(1)
    folder = build_tiny(tmp_path / "ram")
    model = load_ram_plus(folder)
    saved = torch.load(folder / ram_plus.CHECKPOINT_NAME, weights_only=True)["model"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k]), k
    # a missing key fails the strict load
    del saved["fc.bias"]
    torch.save({"model": saved}, folder / ram_plus.CHECKPOINT_NAME)
    with pytest.raises(RuntimeError, match="fc.bias"):
        load_ram_plus(folder)


def _reference_forward(model: RamPlus, pixels: torch.Tensor) -> torch.Tensor:
    """The reference's per-image loop for the description weighting, for comparison."""
    cfg = model.cfg
    image_embeds = model.image_proj(model.visual_encoder(pixels))
    cls = image_embeds[:, 0] / image_embeds[:, 0].norm(dim=-1, keepdim=True)
    logits = (model.reweight_scale.exp() * cls @ model.label_embed.t()).view(len(pixels), -1, cfg.descriptions_per_class)
    weights = torch.softmax(logits, dim=2)
    reweighted = torch.empty(len(pixels), cfg.num_classes, cfg.text_dim)
    for i in range(len(pixels)):
        value = model.label_embed.view(-1, cfg.descriptions_per_class, cfg.text_dim)
        reweighted[i] = (weights[i].unsqueeze(-1) * value).sum(dim=1)
    queries = torch.relu(model.wordvec_proj(reweighted))
    return torch.sigmoid(model.fc(model.tagging_head(queries, image_embeds)).squeeze(-1))


def test_vectorised_forward_matches_per_image_loop_and_tags_follow_thresholds(tmp_path):
    torch.set_num_threads(1)
    model = load_ram_plus(build_tiny(tmp_path / "ram"))
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (48, 80, 3), dtype=np.uint8), rng.integers(0, 255, (90, 30, 3), dtype=np.uint8)]
    vocabulary = model.vocabulary
    pixels = vocabulary.preprocess(images, "cpu")
    assert pixels.shape == (2, 3, 64, 64)
    with torch.no_grad():
        probs = model(pixels)
        assert torch.allclose(probs, _reference_forward(model, pixels), atol=1e-5)
        # batching does not change an image's result
        assert torch.allclose(model(pixels[1:]), probs[1:], atol=1e-5)
    assert model.tag(images) == vocabulary.tags(probs.numpy())  # tag() is preprocess, forward, tags
    vocabulary.thresholds[:] = 0.0
    tags = vocabulary.tags(probs.numpy())
    assert [t.name for t in tags[0]] == [ram_plus.TINY_TAGS[i] for i in torch.argsort(-probs[0]).tolist()]
    vocabulary.thresholds[:] = 1.0
    assert vocabulary.tags(probs.numpy()) == [[], []]
    cut = float(probs[0].median())
    vocabulary.thresholds[:] = cut
    assert {t.name for t in vocabulary.tags(probs.numpy())[0]} == {
        ram_plus.TINY_TAGS[i] for i in range(len(ram_plus.TINY_TAGS)) if probs[0, i] > cut
    }


def test_swin_shift_mask_separates_rolled_regions():
    block = ram_plus.SwinTransformerBlock(dim=4, resolution=8, num_heads=1, window_size=4, shift=True)
    mask = block.attn_mask  # 4 windows of 16 tokens
    assert mask.shape == (4, 16, 16)
    assert (mask[0] == 0).all()  # top-left window holds one region only
    assert (mask[3] == -100).any() and (mask.diagonal(dim1=1, dim2=2) == 0).all()
    assert ram_plus.SwinTransformerBlock(4, 4, 1, 4, shift=True).shift_size == 0  # window covers all


def test_missing_tag_list_is_a_clear_error(tmp_path):
    folder = build_tiny(tmp_path / "ram")
    (folder / ram_plus.TAG_LIST_NAME).unlink()
    with pytest.raises(FileNotFoundError, match="ram_tag_list.txt"):
        load_ram_plus(folder)


def test_checkpoint_with_pickled_objects_is_refused_with_a_way_out(tmp_path):
    import argparse

    folder = build_tiny(tmp_path / "ram")
    path = folder / ram_plus.CHECKPOINT_NAME
    state = torch.load(path, weights_only=True)
    torch.save({**state, "args": argparse.Namespace(lr=1e-4)}, path)  # what training scripts often add
    with pytest.raises(ValueError, match="re-save its state dict"):
        load_ram_plus(folder)
