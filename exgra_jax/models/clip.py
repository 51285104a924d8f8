"""ViT vision towers: CLIP (transformers' CLIPVisionModel) and SigLIP (SiglipVisionModel).

Both share the encoder layer (pre-norm attention and MLP with biases); they differ in the
embeddings: CLIP prepends a class token and applies a pre-LayerNorm, its patch convolution
has no bias; SigLIP has neither class token nor pre-LayerNorm, a biased patch convolution,
and (in the config) gelu_pytorch_tanh and eps 1e-6. The position embedding has one row per
token, sized from the image size (336 px ViT-L/14: 577 rows).

Returns the hidden states the connector needs, in transformers' indexing: entry 0 is the
embedding output (after CLIP's pre-LayerNorm), entry i the output of encoder layer i. Layers
past the deepest one the connector reads are not computed (LLaVA reads layer -2, so the
last layer of a ViT-L/14 never runs); their parameters still exist for round trips.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from exgra_jax.models.config import ModelConfig
from exgra_jax.models.layers import (
    Dense,
    LayerNorm,
    activation,
    attention,
    attention_platform,
    constrain,
    dtype_of,
    resolve_attention_impl,
)

ACT_AXES = ("activation_batch", "activation_length", "activation_vision_embed")


class VisionAttention(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x_btd: jax.Array) -> jax.Array:
        cfg = self.config
        heads, hd = cfg.vision_heads, cfg.vision_width // cfg.vision_heads
        kw = dict(dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype), use_bias=True)
        qkv_axes = ("vision_embed", "vision_heads", "head_dim")
        q = Dense((heads, hd), qkv_axes, name="q", **kw)(x_btd)
        k = Dense((heads, hd), qkv_axes, name="k", **kw)(x_btd)
        v = Dense((heads, hd), qkv_axes, name="v", **kw)(x_btd)
        # Splash is the decoder's kernel (its sequences tile in 128-token blocks; CLIP has
        # 1 + patches tokens): the small tower runs XLA where the decoder runs splash.
        impl = "auto" if cfg.attention_impl == "splash" else cfg.attention_impl
        impl = resolve_attention_impl(impl, platform=attention_platform(),
                                      dtype=dtype_of(cfg.dtype), head_dim=hd,
                                      seq_len=x_btd.shape[1])
        out = attention(q, k, v, impl=impl)
        return Dense(
            (cfg.vision_width,), ("vision_heads", "head_dim", "vision_embed"), in_dims=2,
            name="o", **kw,
        )(out)


class VisionLayer(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x_btd: jax.Array) -> jax.Array:
        cfg = self.config
        dt, pdt = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        norm = dict(eps=cfg.vision_eps, dtype=dt, param_dtype=pdt)
        kw = dict(dtype=dt, param_dtype=pdt, use_bias=True)
        h = LayerNorm(name="ln1", **norm)(x_btd)
        x_btd = x_btd + VisionAttention(cfg, name="attn")(h)
        h = LayerNorm(name="ln2", **norm)(x_btd)
        h = Dense((cfg.vision_mlp,), ("vision_embed", "vision_mlp"), name="fc1", **kw)(h)
        h = constrain(activation(cfg.vision_act)(h), ("activation_batch", "activation_length",
                                                      "activation_vision_mlp"))
        h = Dense((cfg.vision_width,), ("vision_mlp", "vision_embed"), name="fc2", **kw)(h)
        return constrain(x_btd + h, ACT_AXES)


class VisionTower(nn.Module):
    """pixel_values [b, h, w, 3] (NHWC, normalized) -> list of hidden states [b, tokens, d]
    (tokens: 1 + patches for CLIP, patches for SigLIP)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> list[jax.Array]:
        cfg = self.config
        dt, pdt = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        b, h, w, c = pixel_values.shape
        if (h, w) != (cfg.image_size, cfg.image_size) or c != 3:
            raise ValueError(
                f"pixel_values must be [batch, {cfg.image_size}, {cfg.image_size}, 3] (NHWC), "
                f"got {pixel_values.shape}"
            )
        p = cfg.patch_size
        g = cfg.image_size // p
        # Non-overlapping patches flattened in (row, col, channel) order: a stride-p conv.
        patches = pixel_values.reshape(b, g, p, g, p, c).transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(b, g * g, p, p, c)
        clip = cfg.vision_has_cls
        x = Dense(
            (cfg.vision_width,), (None, None, None, "vision_embed"), in_dims=3,
            name="patch_embed", dtype=dt, param_dtype=pdt, use_bias=not clip,
        )(patches)
        pos = self.param(
            "pos_embed", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                      (None, "vision_embed")),
            (cfg.vision_positions, cfg.vision_width), pdt,
        )
        if clip:
            cls = self.param(
                "class_embed", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                            ("vision_embed",)),
                (cfg.vision_width,), pdt,
            )
            x = jnp.concatenate([jnp.broadcast_to(cls.astype(dt), (b, 1, cfg.vision_width)), x],
                                1)
        x = x + pos.astype(dt)[None]
        if clip:
            x = LayerNorm(cfg.vision_eps, dt, pdt, name="pre_ln")(x)
        x = constrain(x, ACT_AXES)

        # At init every layer runs so that all parameters exist; at apply only those needed.
        depth = cfg.vision_layers if self.is_initializing() else cfg.vision_layers_to_run
        hidden = [x]
        for i in range(depth):
            x = VisionLayer(cfg, name=f"layers_{i}")(x)
            hidden.append(x)
        if self.is_initializing():
            # Unused by LLaVA (it reads an inner layer), kept for checkpoint round trips.
            LayerNorm(cfg.vision_eps, dt, pdt, name="post_ln")(x[:, 0] if clip else x)
        return hidden
