"""Parity with transformers for the other backbones (fp32, tiny random configs): Mistral
(GQA, rope_theta 1e6, a sliding window shorter than the sequence, also under cached
decoding), CLIP at a non-224 size, SigLIP, and llava-hf with a Mistral text model and a
SigLIP tower."""

from __future__ import annotations

import hf_fixtures as F
import jax
import numpy as np
import pytest
import torch
from test_models_parity import make_inputs, rel_err, torch_logits

from exgra_jax.convert import hf
from exgra_jax.inference.generate import GenerationConfig, generate
from exgra_jax.models.clip import VisionTower
from exgra_jax.models.llava import LlavaModel

WINDOW = 5  # shorter than every test sequence


def logits(cfg, params, ids, pixels_nchw, am):
    """Our forward, jitted (one compile is far quicker than op-by-op dispatch here)."""
    pix = None if pixels_nchw is None else pixels_nchw.transpose(0, 2, 3, 1)
    return np.asarray(jax.jit(LlavaModel(cfg).apply)({"params": params}, ids, pix, am))


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("backbones")
    out = {}
    for name, model in (("clip", F.clip_vision(seed=2)),
                        ("siglip", F.siglip_vision(seed=4)),
                        ("mistral", F.mistral(seed=5)),
                        ("mistral_window", F.mistral(seed=6, sliding_window=WINDOW))):
        model.save_pretrained(str(root / name))
        out[name] = (str(root / name), model)
    return out


def test_mistral_logits_with_a_sliding_window(dirs):
    d, model = dirs["mistral_window"]
    cfg, params = hf.load_clip_llama(dirs["clip"][0], d)
    assert cfg.llm_type == "mistral" and cfg.sliding_window == WINDOW
    assert cfg.num_kv_heads < cfg.num_heads and cfg.rope_theta == 1e6
    ids, am, _ = make_inputs(seed=13, right_pad=(0, 6, 3))
    ids[ids == F.IMAGE_TOKEN] = 7  # text only
    ref = torch_logits(model, ids, am)
    ours = logits(cfg, params, ids, None, am)
    assert rel_err(ours[..., :128], ref, am.astype(bool)) <= 1e-4
    # The window matters: without it the logits differ.
    wide = logits(cfg.replace(sliding_window=0), params, ids, None, am)
    assert rel_err(wide[..., :128], ref, am.astype(bool)) > 1e-2


def test_mistral_sliding_window_cached_greedy_decoding(dirs):
    """Prompt (left padded in our batch) plus generated tokens run well past the window:
    the cache path's window mask must give transformers' greedy tokens."""
    d, model = dirs["mistral_window"]
    cfg, params = hf.load_clip_llama(dirs["clip"][0], d)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, 120, n).tolist() for n in (9, 4)]
    steps = 12
    gen = GenerationConfig(max_new_tokens=steps, eos_token_ids=(), pad_token_id=0)
    width = max(len(p) for p in prompts)
    ids = np.zeros((2, width), np.int32)
    mask = np.zeros((2, width), np.int32)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
    ours = generate(cfg, params, ids, mask, None,
                    config=gen, rng=jax.random.key(0))
    for i, p in enumerate(prompts):
        with torch.no_grad():
            out = model.generate(torch.tensor([p]), max_new_tokens=steps, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)
        expected = out[0, len(p):].tolist()
        assert np.asarray(ours.tokens)[i, :steps].tolist() == expected, f"prompt {i}"


@pytest.mark.parametrize("tower", ["clip", "siglip"])
def test_vision_hidden_states_every_layer(dirs, tower):
    d, model = dirs[tower]
    cfg, params = hf.load_clip_llama(d, dirs["mistral"][0], vision_select_layer=-1)
    assert cfg.vision_type == tower and cfg.vision_has_cls == (tower == "clip")
    pix = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        ref = model(pixel_values=torch.tensor(pix), output_hidden_states=True).hidden_states
    ours = jax.jit(VisionTower(cfg).apply)({"params": params["vision_tower"]},
                                           pix.transpose(0, 2, 3, 1))
    assert len(ours) == len(ref) == cfg.vision_layers + 1
    for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
        assert a.shape == b.shape
        assert rel_err(a, b.numpy()) <= 1e-5, f"hidden state {i}"


def _llava_parity(tmp_path, seed, image_size, **kw):
    model = F.llava(seed=seed, vision=dict(image_size=image_size), **kw)
    d = str(tmp_path / "llava")
    model.save_pretrained(d)
    cfg, params = hf.load_llava(d)
    n = (image_size // 8) ** 2
    assert cfg.num_image_tokens == n
    ids, am, _ = make_inputs(seed=seed, seq=n + 12, right_pad=(0, 4, 0))
    ids[:, 3:3 + 16] = 5
    ids[:, 3:3 + n] = F.IMAGE_TOKEN
    pix = np.random.default_rng(seed).standard_normal((3, 3, image_size, image_size))
    pix = pix.astype(np.float32)
    ref = torch_logits(model, ids, am, pix)
    assert rel_err(logits(cfg, params, ids, pix, am), ref, am.astype(bool)) <= 1e-4
    return cfg, params


def test_llava_clip_at_a_non_224_size(tmp_path):
    # The 336-px analogue: 6x6 patches, 37 position rows (CLS + 36), sized from the config.
    cfg, params = _llava_parity(tmp_path, 14, 48)
    assert params["vision_tower"]["pos_embed"].shape == (37, cfg.vision_width)


def test_llava_mistral_text_siglip_vision(tmp_path):
    cfg, params = _llava_parity(tmp_path, 15, 32, text_model="mistral", vision_model="siglip",
                                text=dict(sliding_window=WINDOW))
    assert (cfg.llm_type, cfg.vision_type, cfg.sliding_window) == ("mistral", "siglip", WINDOW)
    assert "class_embed" not in params["vision_tower"]
    # Export and reload: the same architecture and the same tensors.
    out = str(tmp_path / "export")
    hf.save_llava(cfg, params, out)
    cfg2, params2 = hf.load_llava(out)
    assert cfg2 == cfg
    for k, v in hf.flatten(params).items():
        np.testing.assert_array_equal(hf.flatten(params2)[k], v, err_msg=k)


def test_unknown_tensors_are_refused_by_name(tmp_path):
    from exgra_jax.convert.safetensors_io import write_safetensors

    model = F.llava(seed=16)
    d = tmp_path / "extra"
    model.save_pretrained(str(d))
    extra = tmp_path / "extra" / "extra.safetensors"
    write_safetensors(str(extra), [("model.gnn.weight", (2, 2), np.dtype(np.float32))],
                      lambda name: np.ones((2, 2), np.float32))
    import json
    index = {"metadata": {}, "weight_map": {"model.gnn.weight": "extra.safetensors"}}
    reader = hf.CheckpointReader(str(d))
    for name in reader.keys():
        index["weight_map"][name] = "model.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"model\.gnn\.weight"):
        hf.load_llava(str(d))
