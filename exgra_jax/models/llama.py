"""LLaMA / Mistral decoder: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU MLP,
and Mistral's sliding attention window when the config sets one.

Layers run under ``nn.scan`` (one compiled layer body, parameters stacked on a leading
'layers' axis) or unrolled, with a remat policy chosen by name. The decoder takes input
embeddings, so the multimodal model can splice image features in before it runs, and an
optional key/value cache for incremental decoding.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from exgra_jax.models.config import ModelConfig
from exgra_jax.models.layers import (
    Dense,
    RMSNorm,
    attention,
    attention_platform,
    constrain,
    dense_attention,
    dtype_of,
    maybe_remat,
    resolve_attention_impl,
    sliding_window_mask,
)

ACT_AXES = ("activation_batch", "activation_length", "activation_embed")
# Logits of the padded vocabulary rows: exp() underflows to exactly 0 and, unlike -inf,
# 0 * MASKED_LOGIT stays finite, so log-softmax, entropies and sampling never see NaN.
MASKED_LOGIT = -1e9


class KVCache(NamedTuple):
    """Per-layer keys and values, stacked over layers: [layers, b, max_len, kv_heads, head_dim]."""

    k: jax.Array
    v: jax.Array


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype=None) -> KVCache:
    dtype = dtype or dtype_of(config.dtype)
    shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.resolved_head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def positions_from_mask(attention_mask_bt: jax.Array) -> jax.Array:
    """RoPE positions that skip padding: real tokens count 0, 1, 2, ... whatever the padding."""
    return jnp.maximum(jnp.cumsum(attention_mask_bt.astype(jnp.int32), axis=-1) - 1, 0)


def rotary(x_btnh: jax.Array, positions_bt: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding in LLaMA's half-split layout (rotate_half), computed in float32."""
    hd = x_btnh.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
    angles = positions_bt.astype(jnp.float32)[..., None] * inv_freq  # [b, t, hd/2]
    cos = jnp.cos(angles)[:, :, None, :].astype(x_btnh.dtype)
    sin = jnp.sin(angles)[:, :, None, :].astype(x_btnh.dtype)
    x1, x2 = jnp.split(x_btnh, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class Attention(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x_btd, positions_bt, segment_ids_bt, cache_mask_bts, cache, cache_index):
        cfg = self.config
        hd = cfg.resolved_head_dim
        kw = dict(dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype))
        q = Dense((cfg.num_heads, hd), ("embed", "heads", "head_dim"), name="q", **kw)(x_btd)
        k = Dense((cfg.num_kv_heads, hd), ("embed", "kv_heads", "head_dim"), name="k", **kw)(x_btd)
        v = Dense((cfg.num_kv_heads, hd), ("embed", "kv_heads", "head_dim"), name="v", **kw)(x_btd)
        q = constrain(rotary(q, positions_bt, cfg.rope_theta),
                      ("activation_batch", "activation_length", "activation_heads", None))
        k = rotary(k, positions_bt, cfg.rope_theta)
        if cache is None:
            # Initialisation only needs shapes (its dummy sequence fits no kernel's tiles).
            chosen = "xla" if self.is_initializing() else cfg.attention_impl
            impl = resolve_attention_impl(chosen, platform=attention_platform(),
                                          dtype=dtype_of(cfg.dtype), head_dim=hd,
                                          seq_len=x_btd.shape[1])
            out = attention(q, k, v, impl=impl, segment_ids_bt=segment_ids_bt, causal=True,
                            positions_bt=positions_bt, sliding_window=cfg.sliding_window)
            new_cache = None
        else:  # incremental decoding keeps XLA with the cache's own mask
            ck, cv = cache
            ck = jax.lax.dynamic_update_slice_in_dim(ck, k.astype(ck.dtype), cache_index, axis=1)
            cv = jax.lax.dynamic_update_slice_in_dim(cv, v.astype(cv.dtype), cache_index, axis=1)
            out = dense_attention(q, ck.astype(q.dtype), cv.astype(q.dtype), cache_mask_bts)
            new_cache = (ck, cv)
        out = Dense(
            (cfg.hidden_size,), ("heads", "head_dim", "embed"), in_dims=2, name="o", **kw
        )(out)
        return out, new_cache


class MLP(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x_btd):
        cfg = self.config
        kw = dict(dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype))
        gate = Dense((cfg.mlp_size,), ("embed", "mlp"), name="gate", **kw)(x_btd)
        up = Dense((cfg.mlp_size,), ("embed", "mlp"), name="up", **kw)(x_btd)
        h = constrain(jax.nn.silu(gate) * up,
                      ("activation_batch", "activation_length", "activation_mlp"))
        return Dense((cfg.hidden_size,), ("mlp", "embed"), name="down", **kw)(h)


class DecoderLayer(nn.Module):
    """One pre-norm block. Signature fits nn.scan: (carry, *args) -> (carry, per-layer out)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_btd, positions_bt, segment_ids_bt, cache_mask_bts, cache, cache_index):
        cfg = self.config
        norm = dict(eps=cfg.rms_eps, dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype))
        h = RMSNorm(name="input_norm", **norm)(x_btd)
        h, new_cache = Attention(cfg, name="attn")(h, positions_bt, segment_ids_bt,
                                                   cache_mask_bts, cache, cache_index)
        x_btd = constrain(x_btd + h, ACT_AXES)
        h = RMSNorm(name="post_attn_norm", **norm)(x_btd)
        x_btd = constrain(x_btd + MLP(cfg, name="mlp")(h), ACT_AXES)
        return x_btd, new_cache


class LlamaModel(nn.Module):
    """Token embeddings, decoder stack, final norm and LM head."""

    config: ModelConfig

    def setup(self):
        cfg = self.config
        dt, pdt = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        self.embed_tokens = self.param(
            "embed_tokens",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
            (cfg.padded_vocab_size, cfg.hidden_size),
            pdt,
        )
        layer_cls = maybe_remat(DecoderLayer, cfg.remat_policy, scanned=cfg.scan_layers)
        if cfg.scan_layers:
            self.layers = nn.scan(
                layer_cls,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast),
                length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg, name="layers")
        else:
            self.layers = [layer_cls(cfg, name=f"layers_{i}") for i in range(cfg.num_layers)]
        self.norm = RMSNorm(cfg.rms_eps, dt, pdt, name="norm")
        if not cfg.tie_embeddings:
            self.lm_head = Dense((cfg.padded_vocab_size,), ("embed", "vocab"), name="lm_head",
                                 dtype=dt, param_dtype=pdt)

    def embed(self, input_ids_bt: jax.Array) -> jax.Array:
        emb = jnp.take(self.embed_tokens, input_ids_bt, axis=0)
        return constrain(emb.astype(dtype_of(self.config.dtype)), ACT_AXES)

    def decode(
        self,
        x_btd: jax.Array,
        attention_mask_bt: jax.Array | None = None,
        positions_bt: jax.Array | None = None,
        cache: KVCache | None = None,
        cache_index: jax.Array | int = 0,
        cache_mask_bs: jax.Array | None = None,
        segment_ids_bt: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Embeddings -> final normed hidden states (and the updated cache).

        Without a cache the sequence attends causally to itself, padded keys removed;
        ``segment_ids_bt`` (packed sequences; 0 = padding) further limits each token to the
        keys of its own segment. The attention backend is ``config.attention_impl``; it gets
        segment ids (padding = segment 0), never a dense mask.
        With a cache, x is written at ``cache_index``; ``cache_mask_bs`` marks the valid
        keys of the whole cache (prompt padding excluded), and queries see keys up to
        their own index.
        """
        b, t, _ = x_btd.shape
        if attention_mask_bt is None:
            attention_mask_bt = jnp.ones((b, t), jnp.int32)
        if positions_bt is None:
            positions_bt = positions_from_mask(attention_mask_bt)
        x_btd = constrain(x_btd.astype(dtype_of(self.config.dtype)), ACT_AXES)
        if cache is None:
            real = attention_mask_bt.astype(bool)
            segments = real.astype(jnp.int32) if segment_ids_bt is None else jnp.where(
                real, segment_ids_bt.astype(jnp.int32), 0)
            mask = None
            layer_caches = None
        else:
            if cache_mask_bs is None or segment_ids_bt is not None:
                raise ValueError("decoding with a cache needs cache_mask_bs and no segment_ids")
            s = cache.k.shape[2]
            q_idx = cache_index + jnp.arange(t)
            mask = (jnp.arange(s)[None, :] <= q_idx[:, None])[None] & cache_mask_bs.astype(
                bool
            )[:, None, :]
            if self.config.sliding_window:
                # The cache's valid slots hold consecutive positions (padding excluded).
                mask = mask & sliding_window_mask(positions_bt, positions_from_mask(cache_mask_bs),
                                                  self.config.sliding_window)
            segments = None
            layer_caches = (cache.k, cache.v)

        if self.config.scan_layers:
            x_btd, new = self.layers(x_btd, positions_bt, segments, mask, layer_caches,
                                     cache_index)
        else:
            new_k, new_v = [], []
            for i, layer in enumerate(self.layers):
                lc = None if cache is None else (cache.k[i], cache.v[i])
                x_btd, nc = layer(x_btd, positions_bt, segments, mask, lc, cache_index)
                if nc is not None:
                    new_k.append(nc[0])
                    new_v.append(nc[1])
            new = (jnp.stack(new_k), jnp.stack(new_v)) if cache is not None else None
        h = self.norm(x_btd)
        return h, (None if new is None else KVCache(*new))

    def logits(self, h_btd: jax.Array) -> jax.Array:
        """Final hidden states -> float32 logits [b, t, padded_vocab_size]; the padded rows
        read MASKED_LOGIT, so losses, argmax and sampling never pick them."""
        cfg = self.config
        if cfg.tie_embeddings:
            w = self.embed_tokens.astype(h_btd.dtype)
            out = jnp.einsum("btd,vd->btv", h_btd, w)
        else:
            out = self.lm_head(h_btd)
        out = out.astype(jnp.float32)
        if cfg.padded_vocab_size != cfg.vocab_size:
            out = jnp.where(jnp.arange(cfg.padded_vocab_size) < cfg.vocab_size, out, MASKED_LOGIT)
        return constrain(out, ("activation_batch", "activation_length", "activation_vocab"))

    def __call__(self, input_ids_bt, attention_mask_bt=None, positions_bt=None):
        h, _ = self.decode(self.embed(input_ids_bt), attention_mask_bt, positions_bt)
        return self.logits(h)
