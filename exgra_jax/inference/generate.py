"""Batched KV-cache generation for LlavaModel: prefill, then a jitted decode loop.

Shapes are static: the cache holds ``prompt_len + max_new_tokens`` positions and the output
buffer ``max_new_tokens`` tokens, so one compiled program serves every batch of the same
prompt length (bucket prompt lengths with ``pad_prompts(..., length=...)``).

- Prompts may be padded on either side; padded keys are masked out of the cache and RoPE
  positions skip padding, so a row's tokens do not depend on how much padding it got.
  Left padding is the usual choice (``pad_prompts``).
- The decode loop is a ``lax.while_loop`` that exits early once every row has ended (EOS
  token or a stop token sequence). Rows that ended keep computing (the batch is static)
  but emit ``pad_token_id``.
- Stop strings are checked on the host between chunks of ``check_every`` decode steps
  against the decoded text (needs a tokenizer); finished rows are marked done on device,
  and the returned tokens are cut right after the token that completed the stop string.
- Sampling: the token at step i is drawn with ``jax.random.fold_in(rng, i)``, so outputs
  depend only on the seed (and not on sharding: JAX's threefry is partitionable).
- Sharding: given a mesh and logical axis rules (as in training), parameters are placed by
  their logical names, the batch and the cache are split over the batch axes, and the
  model's own activation constraints apply.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from exgra_jax import parallel
from exgra_jax.inference import stopping
from exgra_jax.inference.sampling import greedy, sample
from exgra_jax.models.config import ModelConfig
from exgra_jax.models.llama import KVCache, init_cache, positions_from_mask
from exgra_jax.models.llava import LlavaModel

DEFAULT_RULES = parallel.DEFAULT_RULES
# Cache [layers, b, max_len, kv_heads, head_dim]: split like the keys the layers produce.
CACHE_AXES = ("layers", "activation_batch", "activation_length", "kv_heads", "head_dim")


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    stop_token_sequences: tuple[tuple[int, ...], ...] = ()  # matched on device
    stop_strings: tuple[str, ...] = ()  # matched on the host; needs a tokenizer
    check_every: int = 16  # decode steps between host checks of stop strings

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")
        if self.check_every < 1:
            raise ValueError(f"check_every must be >= 1, got {self.check_every}")
        if any(not s for s in self.stop_strings):
            raise ValueError("stop strings must be non-empty")
        stopping.stop_sequence_table(self.stop_token_sequences)  # validates


class GenerationOutput(NamedTuple):
    tokens: np.ndarray  # [b, max_new_tokens] int32, pad_token_id after each row's end
    lengths: np.ndarray  # [b] tokens kept per row (a final EOS / stop counts)
    texts: list[str] | None  # decoded, cut before the first stop string (with a tokenizer)
    num_steps: int  # tokens generated per row before the loop ended (<= max_new_tokens)


class DecodeState(NamedTuple):
    step: jax.Array  # int32 scalar: tokens generated so far
    tokens: jax.Array  # [b, max_new] output buffer
    last: jax.Array  # [b] the token fed to the next step
    positions: jax.Array  # [b] RoPE position of that token
    done: jax.Array  # [b] bool
    lengths: jax.Array  # [b] tokens emitted before the row ended
    window: jax.Array  # [b, w] most recent tokens, for stop token sequences
    cache: KVCache
    cache_mask: jax.Array  # [b, max_len] valid keys (prompt padding excluded)


# ---------------------------------------------------------------------------------------
# Host-side helpers
# ---------------------------------------------------------------------------------------


def pad_prompts(
    prompts: Sequence[Sequence[int]], pad_token_id: int, length: int | None = None,
    side: str = "left",
) -> tuple[np.ndarray, np.ndarray]:
    """Token lists -> (input_ids [b, length], attention_mask [b, length]), int32."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    longest = max(len(p) for p in prompts)
    length = longest if length is None else length
    if length < longest:
        raise ValueError(f"a prompt has {longest} tokens, more than length={length}")
    ids = np.full((len(prompts), length), pad_token_id, np.int32)
    mask = np.zeros((len(prompts), length), np.int32)
    for i, p in enumerate(prompts):
        sl = slice(length - len(p), length) if side == "left" else slice(0, len(p))
        ids[i, sl] = p
        mask[i, sl] = 1
    return ids, mask


def _check_inputs(cfg: ModelConfig, gen: GenerationConfig, ids, mask, pixels) -> None:
    if ids.ndim != 2 or ids.shape != mask.shape:
        raise ValueError(f"input_ids {ids.shape} and attention_mask {mask.shape} must both be "
                         "[batch, prompt_len]")
    if not np.all(mask.sum(1) > 0):
        raise ValueError("every row needs at least one prompt token (attention_mask all zero)")
    if ids.min() < 0 or ids.max() >= cfg.vocab_size:
        raise ValueError(f"token ids must lie in [0, {cfg.vocab_size})")
    longest = int(mask.sum(1).max()) + gen.max_new_tokens
    if longest > cfg.max_positions:
        raise ValueError(f"prompt + max_new_tokens = {longest} exceeds the model's "
                         f"max_positions {cfg.max_positions}")
    counts = ((ids == cfg.image_token_id) & (mask > 0)).sum(1)
    if pixels is None:
        if counts.any():
            raise ValueError("the prompts contain image tokens but no pixel_values were given")
        return
    want = (ids.shape[0], cfg.image_size, cfg.image_size, 3)
    if pixels.shape != want:
        raise ValueError(f"pixel_values must be NHWC {want}, got {pixels.shape}")
    bad = [i for i, c in enumerate(counts) if c not in (0, cfg.num_image_tokens)]
    if bad:
        raise ValueError(f"rows {bad} have {counts[bad].tolist()} image tokens; a row with an "
                         f"image needs exactly {cfg.num_image_tokens}")


def _to_host(x: jax.Array) -> np.ndarray:
    """A writable numpy copy of a (possibly multi-host sharded) array."""
    if x.is_fully_addressable:
        return np.array(x)
    from jax.experimental import multihost_utils

    return np.array(multihost_utils.process_allgather(x, tiled=True))


def _decoder(tokenizer):
    def decode(ids):
        return tokenizer.decode([int(t) for t in ids], skip_special_tokens=True)

    return decode


# ---------------------------------------------------------------------------------------
# Sharding
# ---------------------------------------------------------------------------------------


def _rules_tuple(rules) -> tuple:
    return tuple((name, tuple(ax) if isinstance(ax, list) else ax) for name, ax in rules)


def _batch_axes(mesh: Mesh, rules) -> tuple[str, ...]:
    """Mesh axes the rules give ``activation_batch``, restricted to the mesh."""
    for name, axes in rules:
        if name == "activation_batch":
            axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
            return tuple(a for a in axes if a in mesh.shape)
    return ()


def param_shardings(cfg: ModelConfig, mesh: Mesh, rules=DEFAULT_RULES):
    """NamedShardings for LlavaModel parameters from their logical axis names."""
    model = LlavaModel(cfg)
    ids = jnp.zeros((1, 4), jnp.int32)
    pix = jnp.zeros((1, cfg.image_size, cfg.image_size, 3), jnp.float32)
    abstract = jax.eval_shape(model.init, jax.random.key(0), ids, pix, jnp.ones_like(ids))
    shardings = parallel.logical_sharding(abstract["params"], mesh, rules)
    parallel.check_divisible(nn.unbox(abstract["params"]), shardings)
    return shardings


def shard_params(cfg: ModelConfig, params, mesh: Mesh, rules=DEFAULT_RULES):
    """Place parameters on the mesh as training does (a no-op move if already there)."""
    shardings = param_shardings(cfg, mesh, rules)
    try:
        return jax.device_put(params, shardings)
    except ValueError as e:
        raise ValueError(f"params do not match the model's parameter tree for this config "
                         f"(scan_layers={cfg.scan_layers}?): {e}") from e


def _rules_context(mesh: Mesh | None, rules):
    """Logical axis rules while tracing; none without a mesh, so constraints are no-ops."""
    return nn.logical_axis_rules(() if mesh is None else rules)


@contextlib.contextmanager
def _sharding_context(mesh: Mesh | None, rules):
    """Mesh and rules around the jitted calls (``jax.set_mesh`` is not allowed inside)."""
    with contextlib.ExitStack() as stack:
        if mesh is not None:
            stack.enter_context(jax.set_mesh(mesh))
        stack.enter_context(_rules_context(mesh, rules))
        yield


# ---------------------------------------------------------------------------------------
# Compiled programs
# ---------------------------------------------------------------------------------------


def _prefill_logits(module: LlavaModel, ids, pixels, positions, cache, cache_mask, last_idx):
    """Write the prompt into the cache; logits only at each row's last real token."""
    embeds, _ = module.embed_multimodal(ids, pixels)
    h, cache = module.llm.decode(embeds, positions_bt=positions, cache=cache, cache_index=0,
                                 cache_mask_bs=cache_mask)
    h_last = jnp.take_along_axis(h, last_idx[:, None, None], axis=1)
    return module.llm.logits(h_last)[:, 0], cache


class _Static(NamedTuple):
    """What fixes the compiled program; everything else in the config is a traced value."""

    max_new_tokens: int
    greedy: bool
    use_top_p: bool
    pad_token_id: int
    eos_shape: tuple[int, ...]
    stop_table_shape: tuple[int, ...]


class _Knobs(NamedTuple):
    """Traced settings: changing them does not recompile."""

    eos: np.ndarray  # [n] int32, NEVER-padded
    stop_table: np.ndarray  # [n, w] int32, see stopping.stop_sequence_table
    temperature: np.ndarray
    top_p: np.ndarray


def _split_config(gen: GenerationConfig) -> tuple[_Static, _Knobs]:
    table = stopping.stop_sequence_table(gen.stop_token_sequences)
    eos = stopping.padded_ids(gen.eos_token_ids)
    static = _Static(gen.max_new_tokens, gen.temperature == 0.0, gen.top_p < 1.0,
                     gen.pad_token_id, eos.shape, table.shape)
    knobs = _Knobs(eos, table, np.float32(gen.temperature or 1.0), np.float32(gen.top_p))
    return static, knobs


@functools.lru_cache(maxsize=16)
def _programs(cfg: ModelConfig, static: _Static, mesh: Mesh | None, rules: tuple):
    model = LlavaModel(cfg)
    max_new = static.max_new_tokens
    window_len = static.stop_table_shape[1]

    def ended(tok_b, window_bw, knobs: _Knobs):
        return jnp.isin(tok_b, knobs.eos) | stopping.matches_stop_sequence(
            window_bw, knobs.stop_table)

    def pick(logits_bv, rng, step, knobs: _Knobs):
        if static.greedy:
            return greedy(logits_bv)
        top_p = knobs.top_p if static.use_top_p else None
        return sample(logits_bv, jax.random.fold_in(rng, step), knobs.temperature, top_p)

    def prefill(params, ids, mask, pixels, rng, knobs) -> DecodeState:
        with _rules_context(mesh, rules):
            b, t = ids.shape
            cache = init_cache(cfg, b, t + max_new)
            cache = KVCache(*(nn.with_logical_constraint(c, CACHE_AXES) for c in cache))
            cache_mask = jnp.concatenate([mask > 0, jnp.ones((b, max_new), bool)], axis=1)
            last_idx = t - 1 - jnp.argmax(jnp.flip(mask, axis=1) > 0, axis=1)
            logits, cache = model.apply(
                {"params": params}, ids, pixels, positions_from_mask(mask), cache, cache_mask,
                last_idx, method=_prefill_logits)
            tok = pick(logits, rng, 0, knobs)
            window = stopping.push_window(jnp.full((b, window_len), -2, jnp.int32), tok)
            tokens = jnp.full((b, max_new), static.pad_token_id, jnp.int32).at[:, 0].set(tok)
            return DecodeState(
                step=jnp.int32(1), tokens=tokens, last=tok,
                positions=jnp.sum(mask > 0, axis=1).astype(jnp.int32),
                done=ended(tok, window, knobs), lengths=jnp.ones((b,), jnp.int32),
                window=window, cache=cache, cache_mask=cache_mask)

    def decode(params, state: DecodeState, rng, knobs, end_step) -> DecodeState:
        prompt_len = state.cache.k.shape[2] - max_new

        def cond(s: DecodeState):
            return (s.step < end_step) & ~jnp.all(s.done)

        def body(s: DecodeState):
            logits, cache = model.apply(
                {"params": params}, s.last[:, None], None, s.positions[:, None], s.cache,
                prompt_len + s.step - 1, s.cache_mask, method=LlavaModel.decode_step)
            tok = pick(logits[:, 0], rng, s.step, knobs)
            tok = jnp.where(s.done, static.pad_token_id, tok)
            window = stopping.push_window(s.window, tok)
            return DecodeState(
                step=s.step + 1,
                tokens=jax.lax.dynamic_update_slice(s.tokens, tok[:, None], (0, s.step)),
                last=tok, positions=s.positions + 1,
                done=s.done | ended(tok, window, knobs),
                lengths=s.lengths + (~s.done).astype(jnp.int32), window=window,
                cache=cache, cache_mask=s.cache_mask)

        with _rules_context(mesh, rules):
            return jax.lax.while_loop(cond, body, state)

    return jax.jit(prefill), jax.jit(decode, donate_argnums=(1,))


# ---------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------


def generate(
    model_config: ModelConfig,
    params: Any,
    input_ids: Any,
    attention_mask: Any,
    pixel_values: Any | None = None,
    *,
    config: GenerationConfig = GenerationConfig(),
    rng: jax.Array | None = None,
    tokenizer: Any | None = None,
    mesh: Mesh | None = None,
    rules: Sequence = DEFAULT_RULES,
    on_progress: Callable[[np.ndarray, np.ndarray], None] | None = None,
) -> GenerationOutput:
    """Generate up to ``config.max_new_tokens`` tokens for each prompt row.

    ``input_ids``/``attention_mask`` are [b, t] (left padding recommended, see
    ``pad_prompts``); rows with an image contain exactly ``num_image_tokens`` image tokens
    and ``pixel_values`` is NHWC [b, H, W, 3], normalized. ``rng`` is required when
    ``config.temperature > 0``. With ``mesh``, parameters are placed by ``rules`` (pass
    ``shard_params(...)`` output to avoid moving them on every call).
    ``on_progress(tokens, lengths)`` (host arrays as in the output, before stop strings are
    cut) is called every ``check_every`` decode steps, e.g. to stream partial answers.
    """
    gen = config
    ids = np.asarray(input_ids, np.int32)
    mask = np.asarray(attention_mask, np.int32)
    pixels = None if pixel_values is None else np.asarray(pixel_values, np.float32)
    _check_inputs(model_config, gen, ids, mask, pixels)
    if gen.stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer (or use stop_token_sequences)")
    if gen.temperature > 0 and rng is None:
        raise ValueError("sampling (temperature > 0) needs an explicit rng key")
    rng = jax.random.key(0) if rng is None else rng  # unused when greedy
    rules = _rules_tuple(rules)

    batch = ids.shape[0]
    if mesh is not None:
        params = shard_params(model_config, params, mesh, rules)
        batch_axes = _batch_axes(mesh, rules)
        shards = int(np.prod([mesh.shape[a] for a in batch_axes])) if batch_axes else 1
        extra = -batch % shards  # repeat the last row so the batch splits evenly
        if extra:
            ids, mask = (np.concatenate([a, np.repeat(a[-1:], extra, 0)]) for a in (ids, mask))
            if pixels is not None:
                pixels = np.concatenate([pixels, np.repeat(pixels[-1:], extra, 0)])

        def put(a):
            spec = PartitionSpec(batch_axes or None, *([None] * (a.ndim - 1)))
            return jax.device_put(a, NamedSharding(mesh, spec))

        ids, mask = put(ids), put(mask)
        pixels = None if pixels is None else put(pixels)

    static, knobs = _split_config(gen)
    prefill, decode = _programs(model_config, static, mesh, rules)
    decode_text = None if tokenizer is None else _decoder(tokenizer)
    with _sharding_context(mesh, rules):
        state = prefill(params, ids, mask, pixels, rng, knobs)
        while True:
            if gen.stop_strings:
                state = _mark_stop_strings(state, decode_text, gen.stop_strings)
            if on_progress is not None:
                on_progress(_to_host(state.tokens)[:batch], _to_host(state.lengths)[:batch])
            step = int(state.step)
            if step >= gen.max_new_tokens or bool(jnp.all(state.done)):
                break
            end = gen.max_new_tokens
            if gen.stop_strings or on_progress is not None:
                end = min(step + gen.check_every, end)
            state = decode(params, state, rng, knobs, np.int32(end))

    tokens = _to_host(state.tokens)[:batch]
    lengths = _to_host(state.lengths)[:batch]
    texts = None
    if tokenizer is not None:
        texts = []
        eos = set(gen.eos_token_ids)
        for r in range(batch):
            if gen.stop_strings:  # cut the tokens right after the stop string completes
                lengths[r] = stopping.tokens_until_stop(
                    decode_text, tokens[r, : lengths[r]], gen.stop_strings)
                tokens[r, lengths[r]:] = gen.pad_token_id
            kept = [t for t in tokens[r, : lengths[r]].tolist() if t not in eos]
            texts.append(stopping.truncate_at_stop(decode_text(kept), gen.stop_strings))
    return GenerationOutput(tokens, lengths, texts, step)


def _mark_stop_strings(state: DecodeState, decode_text, stop_strings) -> DecodeState:
    """Mark rows whose decoded output contains a stop string as done (host round trip)."""
    tokens, lengths, done = (_to_host(x) for x in (state.tokens, state.lengths, state.done))
    for r in np.flatnonzero(~done):
        if stopping.contains_stop(decode_text(tokens[r, : lengths[r]]), stop_strings):
            done[r] = True
    return state._replace(done=jax.device_put(done, state.done.sharding))
