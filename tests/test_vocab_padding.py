"""The padded vocabulary (``model.vocab_pad_multiple``): Hugging Face import pads the
embedding and LM head with zero rows, export trims them, logits on the real vocabulary
match transformers, and padded logits never reach the loss, argmax or sampling."""

from __future__ import annotations

import os

import hf_fixtures as F
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from transformers import LlavaForConditionalGeneration

from exgra_jax.convert import hf
from exgra_jax.inference.sampling import greedy, sample
from exgra_jax.models import config as mc
from exgra_jax.models.llama import MASKED_LOGIT
from exgra_jax.models.llava import LlavaModel
from exgra_jax.train.step import lm_loss_sums, supervised_positions

VOCAB, MULTIPLE, PADDED = 131, 64, 192  # 131 rounded up to a multiple of 64


def test_padded_vocab_size_rounds_up():
    assert mc.tiny(vocab_size=VOCAB, vocab_pad_multiple=MULTIPLE).padded_vocab_size == PADDED
    assert mc.tiny(vocab_size=128, vocab_pad_multiple=128).padded_vocab_size == 128
    assert mc.tiny(vocab_size=VOCAB).padded_vocab_size == VOCAB
    assert mc.llava_med_7b(vocab_pad_multiple=128).padded_vocab_size == 32128
    with pytest.raises(ValueError, match="vocab_pad_multiple"):
        mc.tiny(vocab_pad_multiple=0)


def inputs(seed=0, batch=2, seq=24):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, VOCAB, (batch, seq))
    ids[:, 2:2 + 16] = F.IMAGE_TOKEN  # (32 / 8)^2 image tokens
    am = np.ones((batch, seq), np.int64)
    am[1, -4:] = 0
    pix = rng.standard_normal((batch, 3, 32, 32)).astype(np.float32)
    return ids, am, pix


def torch_logits(model, ids, am, pix) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(am),
                     pixel_values=torch.tensor(pix)).logits.numpy()


def our_logits(cfg, params, ids, am, pix) -> np.ndarray:
    return np.asarray(LlavaModel(cfg).apply({"params": params}, jnp.asarray(ids),
                                            jnp.asarray(pix.transpose(0, 2, 3, 1)),
                                            jnp.asarray(am)))


def rel_err(a, b) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def hf_round_trip(tmp_path_factory):
    src = str(tmp_path_factory.mktemp("hf_src"))
    ref = F.llava(seed=4, text={"vocab_size": VOCAB})
    ref.save_pretrained(src)
    cfg, params = hf.load_llava(src, vocab_pad_multiple=MULTIPLE)
    out = str(tmp_path_factory.mktemp("hf_out"))
    hf.save_llava(cfg, params, out)
    return src, ref, cfg, params, out


def test_import_pads_with_zero_rows(hf_round_trip):
    _, ref, cfg, params, _ = hf_round_trip
    emb, head = np.asarray(params["llm"]["embed_tokens"]), np.asarray(
        params["llm"]["lm_head"]["kernel"])
    assert cfg.vocab_size == VOCAB and emb.shape[0] == PADDED and head.shape[1] == PADDED
    assert np.all(emb[VOCAB:] == 0) and np.all(head[:, VOCAB:] == 0)
    torch_emb = ref.get_input_embeddings().weight.detach().numpy()
    np.testing.assert_array_equal(emb[:VOCAB], torch_emb)


def test_logits_match_transformers_on_the_real_vocab(hf_round_trip):
    _, ref, cfg, params, _ = hf_round_trip
    ids, am, pix = inputs()
    ours = our_logits(cfg, params, ids, am, pix)
    want = torch_logits(ref, ids, am, pix)
    assert ours.shape[-1] == PADDED
    real = am.astype(bool)
    assert rel_err(ours[..., :VOCAB][real], want[real]) <= 1e-5
    assert np.all(ours[..., VOCAB:] == MASKED_LOGIT)


def test_export_trims_to_the_real_vocab(hf_round_trip):
    src, ref, _, _, out = hf_round_trip
    written = load_file(os.path.join(out, "model.safetensors"))
    original = load_file(os.path.join(src, "model.safetensors"))
    for name in ("embed_tokens.weight", "lm_head.weight"):
        ours = next(v for k, v in written.items() if k.endswith(name))
        theirs = next(v for k, v in original.items() if k.endswith(name))
        np.testing.assert_array_equal(ours, theirs)
    reloaded = LlavaForConditionalGeneration.from_pretrained(out).eval()
    assert reloaded.config.text_config.vocab_size == VOCAB
    ids, am, pix = inputs(seed=1)
    np.testing.assert_allclose(torch_logits(reloaded, ids, am, pix),
                               torch_logits(ref, ids, am, pix), rtol=0, atol=1e-6)


def test_loss_argmax_and_sampling_ignore_padded_rows(hf_round_trip):
    """Padded LM-head columns made huge (as training could never make them): the loss
    from train/step.py equals the unpadded model's, and no padded id is ever chosen."""
    _, _, cfg, params, _ = hf_round_trip
    head = np.asarray(params["llm"]["lm_head"]["kernel"]).copy()
    head[:, VOCAB:] = 50.0
    padded = jax.tree.map(lambda x: x, params)
    padded["llm"]["lm_head"]["kernel"] = jnp.asarray(head)
    unpadded = jax.tree.map(lambda x: x, params)
    unpadded["llm"]["embed_tokens"] = params["llm"]["embed_tokens"][:VOCAB]
    unpadded["llm"]["lm_head"]["kernel"] = jnp.asarray(head[:, :VOCAB])
    ids, am, pix = inputs(seed=2)
    labels = np.where(am > 0, ids, -100)
    labels[:, :18] = -100  # image and prompt are not supervised
    logits_p = our_logits(cfg, padded, ids, am, pix)
    logits_u = our_logits(cfg.replace(vocab_pad_multiple=1), unpadded, ids, am, pix)
    valid = supervised_positions({"labels": jnp.asarray(labels),
                                  "example_mask": jnp.ones((ids.shape[0],), jnp.int32)})
    nll_p, n_p = lm_loss_sums(jnp.asarray(logits_p), jnp.asarray(labels), valid)
    nll_u, n_u = lm_loss_sums(jnp.asarray(logits_u), jnp.asarray(labels), valid)
    assert float(n_p) == float(n_u) > 0
    np.testing.assert_allclose(float(nll_p), float(nll_u), rtol=1e-6)
    flat = jnp.asarray(logits_p.reshape(-1, PADDED))
    assert int(jnp.max(greedy(flat))) < VOCAB
    drawn = sample(jnp.repeat(flat, 8, axis=0), jax.random.key(0), temperature=5.0, top_p=0.99)
    assert int(jnp.max(drawn)) < VOCAB
