"""Connectors from vision-tower hidden states to LLM embeddings.

Dense connectors (ExGra-Med's DCI / SCI / STI) combine several tower layers before the
projector; CLIP's CLS token is dropped from every layer they read (SigLIP has none).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from exgra_jax.models.config import ModelConfig
from exgra_jax.models.layers import Dense, activation, dtype_of


def select_features(config: ModelConfig, hidden: list[jax.Array]) -> jax.Array:
    """hidden states (transformers indexing) -> [b, tokens, connector_in_dim]."""
    first_patch = 1 if config.vision_has_cls else 0

    def patches(i):
        return hidden[i][:, first_patch:]

    sel = hidden[config.select_layer_index]
    if config.vision_select_strategy == "patch":
        sel = sel[:, first_patch:]
    kind = config.dense_connector
    if kind == "none":
        return sel
    if kind == "dci":
        groups = [
            jnp.mean(jnp.stack([patches(i) for i in range(lo, hi)]), axis=0)
            for lo, hi in config.dci_ranges
        ]
        return jnp.concatenate([sel, *groups], axis=-1)
    if kind == "sci":
        return jnp.concatenate([sel, *[patches(i) for i in config.sci_layers]], axis=-1)
    if kind == "sti":
        pooled = []
        for i in config.sti_layers:
            h = patches(i)
            b, p, d = h.shape
            pooled.append(jnp.mean(h.reshape(b, p // config.sti_pool, config.sti_pool, d), 2))
        return jnp.concatenate([sel, *pooled], axis=1)
    raise ValueError(f"unknown dense connector {kind!r}")


class Projector(nn.Module):
    """[b, tokens, connector_in_dim] -> [b, tokens, hidden_size]."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        kw = dict(
            dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype),
            use_bias=cfg.projector_bias,
        )
        if cfg.projector == "identity":
            return x.astype(dtype_of(cfg.dtype))
        if cfg.projector == "linear":
            return Dense((cfg.hidden_size,), ("connector_in", "embed"), name="linear_1", **kw)(x)
        h = Dense((cfg.hidden_size,), ("connector_in", "mlp"), name="linear_1", **kw)(x)
        h = activation("gelu")(h)
        return Dense((cfg.hidden_size,), ("mlp", "embed"), name="linear_2", **kw)(h)
