"""KV-cache generation: equals full recomputation and transformers' generate; sampling,
stop conditions, sharding."""

from __future__ import annotations

import hf_fixtures as F
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import LlavaForConditionalGeneration

from exgra_jax import parallel
from exgra_jax.inference import sampling, stopping
from exgra_jax.inference.generate import (
    GenerationConfig,
    generate,
    pad_prompts,
    shard_params,
)
from exgra_jax.models.llava import LlavaModel

NUM_IMG = 16
MAX_NEW = 10
GREEDY = GenerationConfig(max_new_tokens=MAX_NEW)


def make_batch(seed=0):
    """Three prompts of different lengths; rows 0 and 2 carry an image (NHWC pixels)."""
    rng = np.random.default_rng(seed)
    text = lambda n: rng.integers(3, 99, n).tolist()  # noqa: E731
    prompts = [
        text(2) + [F.IMAGE_TOKEN] * NUM_IMG + text(5),
        text(4),
        [F.IMAGE_TOKEN] * NUM_IMG + text(9),
    ]
    ids, mask = pad_prompts(prompts, pad_token_id=0)
    pix = rng.standard_normal((3, 32, 32, 3)).astype(np.float32)
    return ids, mask, pix


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A noise-randomized tiny llava-hf model, exported by save_llava and reloaded by HF."""
    return F.exported_llava(tmp_path_factory, seed=3)


@pytest.fixture(scope="module")
def greedy_out(model):
    cfg, params, _ = model
    ids, mask, pix = make_batch()
    return generate(cfg, params, ids, mask, pix, config=GREEDY).tokens


def recompute_greedy(cfg, params, ids, mask, pix, steps):
    """Reference without a cache: the whole sequence through the model at every step.

    The sequence lives in a fixed buffer (future slots masked out) so one compiled forward
    serves every step; causal attention keeps future slots from influencing the present.
    """
    b, t = ids.shape
    seq = np.concatenate([ids, np.zeros((b, steps), np.int32)], 1)
    am = np.concatenate([mask, np.zeros((b, steps), np.int32)], 1)
    forward = jax.jit(lambda s, m: LlavaModel(cfg).apply({"params": params}, s, pix, m))
    for i in range(steps):
        logits = np.asarray(forward(seq, am))
        seq[:, t + i] = logits[:, t + i - 1].argmax(-1)
        am[:, t + i] = 1
    return seq[:, t:]


def test_cache_equals_full_recomputation(model, greedy_out):
    cfg, params, _ = model
    ids, mask, pix = make_batch()
    ref = recompute_greedy(cfg, params, ids, mask, pix, MAX_NEW)
    np.testing.assert_array_equal(greedy_out, ref)
    # The comparison has teeth: rows differ and none is one token repeated.
    assert len({tuple(r) for r in ref}) == 3 and all(len(set(r)) > 1 for r in ref)


def test_padding_does_not_change_a_row(model, greedy_out):
    """Row 1 (4 tokens) right-padded, or left-padded next to other rows, gives the same
    tokens whatever its neighbours."""
    cfg, params, _ = model
    ids, mask, pix = make_batch()
    row = ids[1][mask[1] > 0].tolist()
    right = pad_prompts([row], 0, length=ids.shape[1], side="right")
    ids2 = np.stack([right[0][0], ids[1], ids[1]])
    mask2 = np.stack([right[1][0], mask[1], mask[1]])
    out = generate(cfg, params, ids2, mask2, pix, config=GREEDY).tokens
    for r in range(3):
        np.testing.assert_array_equal(out[r], greedy_out[1], err_msg=f"row {r}")


def test_eos_ends_rows_and_the_loop(model, greedy_out):
    cfg, params, _ = model
    ids, mask, pix = make_batch()
    eos = tuple(sorted({int(greedy_out[0, 2]), int(greedy_out[1, 1]), int(greedy_out[2, 3])}))
    out = generate(cfg, params, ids, mask, pix,
                   config=GenerationConfig(max_new_tokens=MAX_NEW, eos_token_ids=eos))
    ends = [int(np.flatnonzero(np.isin(r, eos))[0]) + 1 for r in greedy_out]
    for r, n in enumerate(ends):
        np.testing.assert_array_equal(out.tokens[r, :n], greedy_out[r, :n])
        assert (out.tokens[r, n:] == 0).all() and out.lengths[r] == n
    assert out.num_steps == max(ends) < MAX_NEW  # the loop stopped once every row ended


def test_matches_transformers_generate(model, greedy_out):
    cfg, params, export_dir = model
    ref_model = LlavaForConditionalGeneration.from_pretrained(export_dir).eval()
    ids, mask, pix = make_batch()
    # An EOS that row 0 reaches mid-way exercises early stopping on both sides.
    eos = int(greedy_out[0, 4])
    ours = generate(cfg, params, ids, mask, pix,
                    config=GenerationConfig(max_new_tokens=MAX_NEW, eos_token_ids=(eos,)))
    with torch.no_grad():
        theirs = ref_model.generate(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
            # transformers takes pixel values only for the rows that hold image tokens.
            pixel_values=torch.tensor(pix[[0, 2]].transpose(0, 3, 1, 2)),
            max_new_tokens=MAX_NEW, do_sample=False, num_beams=1,
            pad_token_id=0, eos_token_id=eos, bos_token_id=None,
        ).numpy()[:, ids.shape[1]:]
    n = theirs.shape[1]
    np.testing.assert_array_equal(ours.tokens[:, :n], theirs)
    assert (ours.tokens[:, n:] == 0).all()
    assert ours.lengths[0] == int(np.flatnonzero(greedy_out[0] == eos)[0]) + 1


def test_sampling_is_seeded_and_tiny_top_p_is_greedy(model, greedy_out):
    cfg, params, _ = model
    ids, mask, pix = make_batch()
    cfg_s = GenerationConfig(max_new_tokens=MAX_NEW, temperature=1.5, top_p=0.95)
    a, b, c = (generate(cfg, params, ids, mask, pix, config=cfg_s, rng=jax.random.key(k)).tokens
               for k in (1, 1, 2))
    np.testing.assert_array_equal(a, b)
    assert (a != c).any() and (a != greedy_out).any()
    tiny = GenerationConfig(max_new_tokens=MAX_NEW, temperature=1.0, top_p=1e-6)
    out = generate(cfg, params, ids, mask, pix, config=tiny, rng=jax.random.key(3)).tokens
    np.testing.assert_array_equal(out, greedy_out)


def reference_top_p_probs(logits, temperature, top_p):
    z = np.asarray(logits, np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p)
    before = np.cumsum(p[order]) - p[order]
    keep = order[before < top_p]
    out = np.zeros_like(p)
    out[keep] = p[keep] / p[keep].sum()
    return out


def test_top_p_filter_keeps_the_smallest_covering_set():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((4, 50)).astype(np.float32) * 3
    for p in (1e-6, 0.3, 0.75, 0.99):
        kept = np.isfinite(np.asarray(sampling.top_p_filter(jnp.asarray(logits), p)))
        for r in range(4):
            np.testing.assert_array_equal(kept[r], reference_top_p_probs(logits[r], 1, p) > 0)


def test_sampling_frequencies_follow_the_warped_distribution():
    logits = np.array([2.0, 1.5, 1.0, 0.0, -1.0, -3.0], np.float32)
    t, p, n = 0.7, 0.8, 20000
    draws = sampling.sample(jnp.tile(logits, (n, 1)), jax.random.key(0), t, p)
    freq = np.bincount(np.asarray(draws), minlength=6) / n
    ref = reference_top_p_probs(logits, t, p)
    assert (freq[ref == 0] == 0).all()
    np.testing.assert_allclose(freq, ref, atol=0.02)


def test_truncate_at_stop():
    assert stopping.truncate_at_stop("yes, it is.###Human: next", ["###"]) == "yes, it is."
    assert stopping.truncate_at_stop("a</s>b###c", ["###", "</s>"]) == "a"  # earliest wins
    assert stopping.truncate_at_stop("no stop here", ["###"]) == "no stop here"
    assert stopping.truncate_at_stop("###", ["###"]) == ""
    assert stopping.truncate_at_stop("ab#", ["##"]) == "ab#"  # a partial stop is kept
    with pytest.raises(ValueError, match="non-empty"):
        stopping.truncate_at_stop("x", [""])


class CharTokenizer:
    """One character per token: id i decodes to letter i % 26 (enough to place a stop)."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + i % 26) for i in ids)


def test_stop_strings_cut_text_and_tokens(model, greedy_out):
    cfg, params, _ = model
    ids, mask, pix = make_batch()
    tok = CharTokenizer()
    full = [tok.decode(r) for r in greedy_out]
    stops = tuple(t[2:4] for t in full)  # every row meets one within its first 4 tokens
    out = generate(cfg, params, ids, mask, pix, tokenizer=tok,
                   config=GenerationConfig(max_new_tokens=MAX_NEW, stop_strings=stops,
                                           check_every=2))
    for r, text in enumerate(full):
        cut = min(text.find(s) for s in stops if s in text)
        assert out.texts[r] == text[:cut]
        end = cut + len(next(s for s in stops if text.find(s) == cut))  # tokens incl. stop
        assert out.lengths[r] == end
        np.testing.assert_array_equal(out.tokens[r, :end], greedy_out[r, :end])
        assert (out.tokens[r, end:] == 0).all()
    assert out.num_steps <= 4 + 2 < MAX_NEW  # stopped within one check after the last stop


def test_stop_token_sequences_on_device(model, greedy_out):
    cfg, params, _ = model
    ids, mask, pix = make_batch()
    seqs = ((int(greedy_out[0, 2]), int(greedy_out[0, 3])), (int(greedy_out[2, 5]),))
    out = generate(cfg, params, ids, mask, pix,
                   config=GenerationConfig(max_new_tokens=MAX_NEW, stop_token_sequences=seqs))
    for r, row in enumerate(greedy_out):
        hits = [i + 1 for i in range(MAX_NEW)
                if any(tuple(row[max(0, i + 1 - len(s)): i + 1]) == s for s in seqs)]
        n = hits[0] if hits else MAX_NEW
        assert out.lengths[r] == n
        np.testing.assert_array_equal(out.tokens[r, :n], row[:n])
        assert (out.tokens[r, n:] == 0).all()


def test_tokens_until_stop_finds_the_shortest_prefix():
    tok = CharTokenizer()
    ids = [0, 1, 2, 3, 1, 2]  # "abcdbc"
    assert stopping.tokens_until_stop(tok.decode, ids, ["bc"]) == 3
    assert stopping.tokens_until_stop(tok.decode, ids, ["db", "cd"]) == 4
    assert stopping.tokens_until_stop(tok.decode, ids, ["zz"]) == 6


def test_sharded_generation_matches_unsharded(model, greedy_out):
    cfg, params, _ = model
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    placed = shard_params(cfg, params, mesh)
    emb = placed["llm"]["embed_tokens"]
    assert not emb.sharding.is_fully_replicated  # vocab x embed split over tensor x fsdp
    ids, mask, pix = make_batch()  # batch 3 is padded to the 4 batch shards internally
    out = generate(cfg, placed, ids, mask, pix, config=GREEDY, mesh=mesh)
    np.testing.assert_array_equal(out.tokens, greedy_out)


@pytest.mark.slow
def test_sharded_sampling_matches_unsharded(model):
    cfg, params, _ = model
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    ids, mask, pix = make_batch()
    gen = GenerationConfig(max_new_tokens=MAX_NEW, temperature=1.5, top_p=0.95)
    ref = generate(cfg, params, ids, mask, pix, config=gen, rng=jax.random.key(5)).tokens
    out = generate(cfg, params, ids, mask, pix, config=gen, rng=jax.random.key(5), mesh=mesh)
    np.testing.assert_array_equal(out.tokens, ref)


def test_bad_inputs_get_clear_errors(model):
    cfg, params, _ = model
    ids, mask, pix = make_batch()
    with pytest.raises(ValueError, match="no pixel_values"):
        generate(cfg, params, ids, mask, None, config=GREEDY)
    with pytest.raises(ValueError, match="NHWC"):
        generate(cfg, params, ids, mask, pix.transpose(0, 3, 1, 2), config=GREEDY)
    short = ids.copy()
    short[0, np.flatnonzero(short[0] == F.IMAGE_TOKEN)[0]] = 5
    with pytest.raises(ValueError, match="exactly 16"):
        generate(cfg, params, short, mask, pix, config=GREEDY)
    with pytest.raises(ValueError, match="rng"):
        generate(cfg, params, ids, mask, pix, config=GenerationConfig(temperature=1.0))
    with pytest.raises(ValueError, match="tokenizer"):
        generate(cfg, params, ids, mask, pix, config=GenerationConfig(stop_strings=("###",)))
    with pytest.raises(ValueError, match="max_positions"):
        generate(cfg, params, ids, mask, pix, config=GenerationConfig(max_new_tokens=300))
    with pytest.raises(ValueError, match="top_p"):
        GenerationConfig(top_p=0.0)
    with pytest.raises(ValueError, match="at least one"):
        pad_prompts([[1, 2], []], 0)
    with pytest.raises(ValueError, match="more than length"):
        pad_prompts([[1, 2, 3]], 0, length=2)
