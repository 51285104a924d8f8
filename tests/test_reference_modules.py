"""Module by module against Hugging Face transformers (PyTorch), float32, tiny random
weights: LLaMA attention (grouped-query, RoPE, causal with padded keys), LLaMA MLP, and one
CLIP encoder layer, each fed the same input as the torch module it replaces."""

from __future__ import annotations

import hf_fixtures as F
import numpy as np
import pytest
import torch

from exgra_jax.convert import hf
from exgra_jax.models.clip import VisionLayer
from exgra_jax.models.llama import MLP, Attention, positions_from_mask


def rel_err(ours, ref):
    a, b = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    """The torch model and our unscanned parameters converted from it."""
    d = str(tmp_path_factory.mktemp("llava_hf"))
    model = F.llava(seed=41)
    model.save_pretrained(d)
    cfg, params = hf.load_llava(d, scan_layers=False)
    return cfg, params, model


def hidden(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("layer", [0, 1])
def test_llama_attention(llava, layer):
    cfg, params, model = llava
    lm = model.model.language_model
    b, t = 3, 12
    x = hidden((b, t, cfg.hidden_size), seed=layer)
    am = np.ones((b, t), np.int32)
    am[1, :4] = 0  # left padding: keys before the real queries, which only the mask hides
    # transformers' 4-D additive mask: query i sees the real keys j <= i.
    allowed = np.tril(np.ones((t, t), bool))[None] & am.astype(bool)[:, None, :]
    mask4 = torch.tensor(np.where(allowed, 0.0, torch.finfo(torch.float32).min)[:, None],
                         dtype=torch.float32)
    pos = np.asarray(positions_from_mask(am))
    assert pos[1, 4] == 0 and pos[0, 4] == 4  # the real tokens count from 0
    with torch.no_grad():
        xt = torch.tensor(x)
        rope = lm.rotary_emb(xt, torch.tensor(pos))
        ref, _ = lm.layers[layer].self_attn(xt, position_embeddings=rope, attention_mask=mask4)
    ours, _ = Attention(cfg).apply(
        {"params": params["llm"][f"layers_{layer}"]["attn"]}, x, pos, am, None, None, 0)
    real = am.astype(bool)  # padded queries are never read
    assert rel_err(np.asarray(ours)[real], ref.numpy()[real]) <= 1e-5


def test_llama_mlp(llava):
    cfg, params, model = llava
    x = hidden((2, 7, cfg.hidden_size), seed=3)
    with torch.no_grad():
        ref = model.model.language_model.layers[1].mlp(torch.tensor(x)).numpy()
    ours = MLP(cfg).apply({"params": params["llm"]["layers_1"]["mlp"]}, x)
    assert rel_err(ours, ref) <= 1e-5


@pytest.mark.parametrize("layer", [0, 2])
def test_clip_encoder_layer(llava, layer):
    cfg, params, model = llava
    x = hidden((2, 1 + cfg.num_patches, cfg.vision_width), seed=10 + layer)
    with torch.no_grad():
        ref = model.model.vision_tower.encoder.layers[layer](torch.tensor(x), None).numpy()
    ours = VisionLayer(cfg).apply(
        {"params": params["vision_tower"][f"layers_{layer}"]}, x)
    assert rel_err(ours, ref) <= 1e-5
