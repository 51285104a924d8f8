"""LoRA adapters as a parameter transform: W + (alpha / rank) * A @ B on chosen kernels.

Kernels are chosen by regexes over parameter paths such as ``model/llm/layers/attn/q/kernel``.
A kernel of layout [*lead, *in, *out] (lead: the stacked 'layers' axis of a scanned decoder)
gets ``a`` [*lead, *in, rank] and ``b`` [*lead, rank, *out], float32, with the kernel's
logical axis names on their shared dims, so they shard with the kernel they adapt. ``a`` is
drawn uniformly in +-1/sqrt(fan_in) (PEFT's default bound), ``b`` starts at zero, so a new
adapter leaves the model unchanged.

The adapters live beside the model in the params tree: ``params['lora']`` mirrors
``params['model']`` down to each adapted kernel's module (``.../attn/q/{a,b}``).
``with_adapters`` folds them into the kernels before the model runs; the same function is
the merge used for export, evaluation and generation.

Dropout on the adapter's input (PEFT's ``lora_dropout``: y = W x + scale B A dropout(x)) has
no parameter-space form: with ``dropout`` > 0 the training forward (``training_params``)
instead hands each adapted ``layers.Dense`` its adapters beside its kernel, and the layer
adds the adapter path itself, dropping inputs with the model's 'dropout' rng. With dropout
0 the training forward is the merged kernel, as before.
"""

from __future__ import annotations

import dataclasses
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from exgra_jax.models.layers import dtype_of

# A kernel whose first (non-layer) axis is a head axis contracts heads and head_dim.
HEAD_AXES = ("heads", "vision_heads")
LAYER_AXIS = "layers"
# The usual LLaVA LoRA recipe's reach: attention projections of every decoder layer (scanned
# or unrolled) and the projector.
ATTENTION_AND_PROJECTOR = (r"^model/llm/layers(_\d+)?/attn/(q|k|v|o)/kernel$",
                           r"^model/projector/linear_\d/kernel$")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    targets: tuple[str, ...]  # regexes over '/'-joined kernel paths ('model/llm/...')
    rank: int = 16
    alpha: float = 32.0
    base_dtype: str = "float32"  # the frozen base is held in this dtype ('bfloat16': half)
    dropout: float = 0.0  # on the adapters' input while training (PEFT's lora_dropout)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_config(cls, config) -> LoraConfig | None:
        """The ``lora`` section of a training config, or None when absent or disabled."""
        sec = config.get("lora")
        if sec is None or not sec.enabled:
            return None
        if sec.rank < 1:
            raise ValueError(f"lora.rank must be >= 1, got {sec.rank}")
        dropout = float(sec.get("dropout", 0.0))
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {dropout}")
        return cls(tuple(sec.targets), int(sec.rank), float(sec.alpha), sec.base_dtype,
                   dropout)


def _path(keys) -> str:
    return "/".join(keys)


def kernel_split(names: tuple[str | None, ...]) -> tuple[int, int]:
    """(leading layer dims, contracted input dims) of a kernel from its logical axis names."""
    lead = 1 if names and names[0] == LAYER_AXIS else 0
    return lead, (2 if names[lead] in HEAD_AXES else 1)


def init_adapters(rng: jax.Array, boxed_params: dict, cfg: LoraConfig) -> dict:
    """Adapters (boxed with logical names) for every kernel of ``boxed_params`` that a target
    regex matches; the tree is keyed like ``boxed_params`` without the 'kernel' leaf."""
    pats = [re.compile(p) for p in cfg.targets]
    flat = traverse_util.flatten_dict(boxed_params)
    chosen = sorted(k for k in flat
                    if k[-1] == "kernel" and any(p.search(_path(k)) for p in pats))
    if not chosen:
        raise ValueError(f"lora.targets {list(cfg.targets)} match no kernel; paths look like "
                         f"{_path(next(k for k in flat if k[-1] == 'kernel'))}")
    out = {}
    for i, key in enumerate(chosen):
        box = flat[key]
        shape, names = box.value.shape, tuple(box.names)
        lead, n_in = kernel_split(names)
        cut = lead + n_in
        bound = 1.0 / math.sqrt(math.prod(shape[lead:cut]))
        a = jax.random.uniform(jax.random.fold_in(rng, i), (*shape[:cut], cfg.rank),
                               jnp.float32, -bound, bound)
        b = jnp.zeros((*shape[:lead], cfg.rank, *shape[cut:]), jnp.float32)
        out[(*key[:-1], "a")] = nn.LogicallyPartitioned(a, (*names[:cut], None))
        out[(*key[:-1], "b")] = nn.LogicallyPartitioned(b, (*names[:lead], None, *names[cut:]))
    return traverse_util.unflatten_dict(out)


def with_init_adapters(init_fn, cfg: LoraConfig):
    """Wrap a params init function ``rng -> boxed {'model': ..., ...}`` so that its result
    also holds ``'lora'`` adapters for ``cfg``'s targets."""

    def init(rng):
        params = dict(init_fn(rng))
        params["lora"] = init_adapters(jax.random.fold_in(rng, 0x10A),
                                       {"model": params["model"]}, cfg)
        return params

    return init


def delta(a: jax.Array, b: jax.Array, kernel_ndim: int) -> jax.Array:
    """A @ B in the kernel's layout [*lead, *in, *out], float32."""
    lead = a.ndim + b.ndim - 2 - kernel_ndim
    lead_shape = a.shape[:lead]
    a2 = a.reshape(*lead_shape, -1, a.shape[-1])
    b2 = b.reshape(*lead_shape, b.shape[lead], -1)
    d = jnp.matmul(a2.astype(jnp.float32), b2.astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST)
    return d.reshape(*a.shape[:-1], *b.shape[lead + 1:])


def _adapted_kernels(params: dict):
    """(flat model params, {module key: (kernel key, a, b)}) for the adapters in ``params``."""
    flat = traverse_util.flatten_dict(params["model"])
    found = {}
    for key, ab in traverse_util.flatten_dict(params["lora"]["model"], sep=None,
                                              is_leaf=lambda _, v: "a" in v).items():
        kkey = (*key, "kernel")
        if kkey not in flat:
            raise ValueError(f"adapter {_path(('model', *key))} has no kernel to adapt")
        found[key] = (kkey, ab["a"], ab["b"])
    return flat, found


def _without_lora(params: dict, flat_model: dict) -> dict:
    out = {k: v for k, v in params.items() if k != "lora"}
    out["model"] = traverse_util.unflatten_dict(flat_model)
    return out


def with_adapters(params: dict, cfg: LoraConfig | None, dtype=None) -> dict:
    """``params`` without 'lora', each adapted kernel W replaced by W + scale * A @ B
    (summed in float32, returned in ``dtype``, default W's dtype). Differentiable in the
    adapters: this is both the training forward (dropout 0) and the merge. No config:
    ``params``."""
    if cfg is None:
        return params
    flat, found = _adapted_kernels(params)
    for kkey, a, b in found.values():
        w = flat[kkey]
        merged = w.astype(jnp.float32) + cfg.scale * delta(a, b, w.ndim)
        flat[kkey] = merged.astype(dtype or w.dtype)
    return _without_lora(params, flat)


def training_params(params: dict, cfg: LoraConfig | None, dtype) -> dict:
    """What the training forward runs on. Dropout 0: ``with_adapters`` (merged kernels).
    Dropout > 0: kernels in ``dtype`` with their adapters beside them in the same module:
    ``lora_a`` (A), ``lora_b`` (scale * B, float32) and ``lora_dropout`` (the rate, one per
    leading layer), which ``layers.Dense`` applies on the activation path."""
    if cfg is None or cfg.dropout == 0:
        return with_adapters(params, cfg, dtype)
    flat, found = _adapted_kernels(params)
    for key, (kkey, a, b) in found.items():
        w = flat[kkey]
        lead = a.ndim + b.ndim - 2 - w.ndim
        flat[kkey] = w.astype(dtype)
        flat[(*key, "lora_a")] = a
        flat[(*key, "lora_b")] = cfg.scale * b.astype(jnp.float32)
        flat[(*key, "lora_dropout")] = jnp.full(a.shape[:lead], cfg.dropout, jnp.float32)
    return _without_lora(params, flat)


def hold_base(params: dict, cfg: LoraConfig | None) -> dict:
    """The frozen base ('model') in ``cfg.base_dtype``; adapters stay float32."""
    if cfg is None:
        return params
    dt = dtype_of(cfg.base_dtype)
    return {**params, "model": jax.tree.map(lambda x: x.astype(dt), params["model"])}


def count(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
