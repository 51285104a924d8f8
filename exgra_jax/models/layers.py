"""Building blocks shared by the vision tower and the LLM: dtypes, dense layers with logical
axis names, attention through ``jax.nn.dot_product_attention``, remat policies."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_of(name: str):
    return DTYPES[name]


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Logical sharding constraint on an activation (a no-op without axis rules)."""
    return nn.with_logical_constraint(x, tuple(axes))


class Dense(nn.Module):
    """A dense layer whose kernel may have several input/output dims (e.g. [d, heads, head_dim]).

    Kernel layout is [*in_shape, *out_shape]; ``axes`` names every kernel dim.

    LoRA with dropout (``exgra_jax.models.lora.training_params``) puts ``lora_a``
    [*in_shape, rank], ``lora_b`` [rank, *out_shape] (already scaled) and ``lora_dropout``
    (the rate) beside the kernel; the layer then adds ``lora_b . lora_a . dropout(x)``, the
    inputs dropped only when the apply is given a 'dropout' rng (training).
    """

    features: tuple[int, ...]
    axes: tuple[str | None, ...]
    in_dims: int = 1  # trailing input dims contracted
    use_bias: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    init_std: float = 0.02

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        in_shape = x.shape[-self.in_dims :]
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(nn.initializers.normal(self.init_std), self.axes),
            (*in_shape, *self.features),
            self.param_dtype,
        )
        x = x.astype(self.dtype)
        kernel = kernel.astype(self.dtype)
        contract = tuple(range(x.ndim - self.in_dims, x.ndim))
        y = jax.lax.dot_general(x, kernel, ((contract, tuple(range(self.in_dims))), ((), ())))
        if self.use_bias:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros, self.axes[self.in_dims :]),
                self.features,
                self.param_dtype,
            )
            y = y + bias.astype(self.dtype)
        if self.has_variable("params", "lora_a"):
            y = y + self._adapter(x, contract)
        return y

    def _adapter(self, x: jax.Array, contract: tuple[int, ...]) -> jax.Array:
        a, b = (self.get_variable("params", n).astype(self.dtype) for n in ("lora_a", "lora_b"))
        if self.has_rng("dropout"):
            rate = self.get_variable("params", "lora_dropout")
            keep = jax.random.uniform(self.make_rng("dropout"), x.shape) >= rate
            x = jnp.where(keep, x / (1.0 - rate).astype(x.dtype), jnp.zeros((), x.dtype))
        h = jax.lax.dot_general(x, a, ((contract, tuple(range(self.in_dims))), ((), ())))
        return jax.lax.dot_general(h, b, (((h.ndim - 1,), (0,)), ((), ())))


def attention(
    q_btnh: jax.Array,
    k_bskh: jax.Array,
    v_bskh: jax.Array,
    mask_bts: jax.Array | None,
    *,
    is_causal: bool = False,
    implementation: str | None = None,
) -> jax.Array:
    """Scaled dot-product attention with grouped-query heads.

    Routed through ``jax.nn.dot_product_attention`` so XLA's fused kernels (cuDNN on GPU)
    are used where available; on the CPU it is the exact XLA computation.
    """
    mask = None if mask_bts is None else mask_bts[:, None, :, :]
    return jax.nn.dot_product_attention(
        q_btnh,
        k_bskh,
        v_bskh,
        mask=mask,
        is_causal=is_causal,
        implementation=implementation,
    )


def sliding_window_mask(q_positions_bt: jax.Array, k_positions_bs: jax.Array,
                        window: int) -> jax.Array:
    """[b, t, s]: key s is within the last ``window`` positions of query t (itself included).

    Positions, not array indices, so padding and packed segments do not shift the window
    (Mistral's rule: q - window < k, combined with the causal mask).
    """
    delta = q_positions_bt[:, :, None] - k_positions_bs[:, None, :]
    return delta < window


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, dtype) -> jax.Array:
    """RMSNorm computed in float32, scaled in the compute dtype (as LLaMA does)."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(dtype) * x32.astype(dtype)


class RMSNorm(nn.Module):
    eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        weight = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
            (x.shape[-1],),
            self.param_dtype,
        )
        return rms_norm(x, weight, self.eps, self.dtype)


class LayerNorm(nn.Module):
    """LayerNorm with logically named params; statistics in float32."""

    eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (d,),
            self.param_dtype,
        )
        bias = self.param(
            "bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)), (d,),
            self.param_dtype,
        )
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


def activation(name: str):
    if name == "quick_gelu":
        return lambda x: x * jax.nn.sigmoid(1.702 * x)
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return lambda x: jax.nn.gelu(x, approximate=True)
    if name == "silu":
        return jax.nn.silu
    raise ValueError(f"unsupported activation {name!r}")


REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole layer
    "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_dots": jax.checkpoint_policies.checkpoint_dots,
}


def maybe_remat(module_cls, policy: str, *, scanned: bool, static_argnums: tuple[int, ...] = ()):
    """Wrap a layer class in nn.remat with a policy named in the config.

    Under nn.scan the loop already keeps XLA from merging recomputation with the forward
    pass, so CSE prevention (which costs speed) is only needed for unrolled layers.
    """
    if policy == "none":
        return module_cls
    if policy not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {policy!r}")
    return nn.remat(
        module_cls,
        policy=REMAT_POLICIES[policy],
        prevent_cse=not scanned,
        static_argnums=static_argnums,
    )
