"""Building blocks shared by the vision tower and the LLM: dtypes, dense layers with logical
axis names, attention backends chosen by name (XLA, cuDNN, Pallas splash), remat policies."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

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


# ============================================================================ attention
GPU_PLATFORMS = ("gpu", "cuda")
SPLASH_BLOCKS = (512, 256, 128)  # tried in order; the kernel's tiles are multiples of 128


def attention_platform() -> str:
    """The platform being compiled for: the devices of the mesh in context (an AOT compile
    for a TPU topology runs on a CPU host), else the default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and mesh.abstract_device is not None:
        return mesh.abstract_device.platform
    return jax.default_backend()


def _cudnn_problem(dtype, head_dim: int) -> str | None:
    """Why cuDNN's fused attention with segment ids cannot run here (None: it can)."""
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"cuDNN flash attention computes in bfloat16 or float16, not {jnp.dtype(dtype)}"
    if head_dim % 8 or head_dim > 256:
        return f"cuDNN flash attention needs head_dim <= 256 and a multiple of 8, got {head_dim}"
    gpus = [d for d in jax.local_devices() if d.platform in GPU_PLATFORMS]
    capability = getattr(gpus[0], "compute_capability", "0.0") if gpus else "0.0"
    if tuple(int(x) for x in capability.split(".")) < (9, 0):
        return ("cuDNN's segment-id (packed) layout needs a Hopper or later GPU (compute "
                f"capability >= 9.0), got {capability}")
    return None


def resolve_attention_impl(impl: str, *, platform: str, dtype, head_dim: int,
                           seq_len: int) -> str:
    """``model.attention_impl`` -> the backend that runs: 'xla', 'cudnn' or 'splash'.

    'auto' takes splash on TPU (when whole 128-token blocks tile the sequence), cuDNN on a
    GPU where it can run (half precision, head_dim, Hopper), XLA elsewhere. An explicit
    choice that cannot run here fails with the reason. Splash on the CPU runs in Pallas
    interpret mode (for tests: slow, exact).
    """
    if impl == "auto":
        if platform == "tpu" and seq_len % SPLASH_BLOCKS[-1] == 0:
            return "splash"
        if platform in GPU_PLATFORMS and _cudnn_problem(dtype, head_dim) is None:
            return "cudnn"
        return "xla"
    if impl == "cudnn":
        if platform not in GPU_PLATFORMS:
            raise ValueError(f"model.attention_impl='cudnn' needs an NVIDIA GPU, but this "
                             f"compiles for {platform!r}; use 'xla' or 'auto'")
        problem = _cudnn_problem(dtype, head_dim)
        if problem:
            raise ValueError(f"model.attention_impl='cudnn': {problem}; use 'xla' or 'auto'")
    elif impl == "splash":
        if platform not in ("tpu", "cpu"):
            raise ValueError(f"model.attention_impl='splash' is a TPU kernel, but this "
                             f"compiles for {platform!r}; use 'cudnn', 'xla' or 'auto'")
        splash_block_size(seq_len)
    elif impl != "xla":
        raise ValueError(f"unknown attention_impl {impl!r}; choose auto, xla, cudnn or splash")
    return impl


def attention(
    q_btnh: jax.Array,
    k_bskh: jax.Array,
    v_bskh: jax.Array,
    *,
    impl: str,
    segment_ids_bt: jax.Array | None = None,
    causal: bool = False,
    positions_bt: jax.Array | None = None,
    sliding_window: int = 0,
) -> jax.Array:
    """Self-attention with grouped-query heads through the backend ``impl`` (resolved).

    A token sees only keys with its own segment id (packed rows; padding is segment 0, a
    segment of its own, so no query row is ever empty: every backend stays finite in the
    forward and backward pass). ``causal`` adds the causal mask; ``sliding_window`` keeps
    the last ``sliding_window`` positions (XLA reads ``positions_bt``; the fused kernels
    use array indices, which agree within a segment). Fused backends get segment ids,
    never a dense mask.
    """
    if impl == "xla":
        mask = None
        if segment_ids_bt is not None:
            mask = segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :]
        if sliding_window:
            window = sliding_window_mask(positions_bt, positions_bt, sliding_window)
            mask = window if mask is None else mask & window
        return dense_attention(q_btnh, k_bskh, v_bskh, mask, causal=causal)
    if impl == "cudnn":
        return cudnn_attention(q_btnh, k_bskh, v_bskh, segment_ids_bt, causal=causal,
                               sliding_window=sliding_window)
    if impl == "splash":
        if segment_ids_bt is None:
            segment_ids_bt = jnp.ones(q_btnh.shape[:2], jnp.int32)
        return splash_attention(q_btnh, k_bskh, v_bskh, segment_ids_bt, causal=causal,
                                sliding_window=sliding_window)
    raise ValueError(f"attention: impl must be resolved to xla, cudnn or splash, got {impl!r}")


def dense_attention(q_btnh, k_bskh, v_bskh, mask_bts: jax.Array | None, *,
                    causal: bool = False) -> jax.Array:
    """XLA's attention with a dense boolean mask (True: key s is visible to query t)."""
    mask = None if mask_bts is None else mask_bts[:, None, :, :]
    return jax.nn.dot_product_attention(q_btnh, k_bskh, v_bskh, mask=mask, is_causal=causal,
                                        implementation="xla")


def segment_runs(segment_ids_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Runs of equal segment ids as cuDNN's packed layout wants them: (lengths [b, t],
    offsets [b, t + 1]) with each row's runs first and -1 after. Padding (id 0) forms runs
    of its own, so every token belongs to a run. Up to t runs per row fit."""
    b, t = segment_ids_bt.shape
    is_start = jnp.concatenate(
        [jnp.ones((b, 1), bool), segment_ids_bt[:, 1:] != segment_ids_bt[:, :-1]], axis=1)
    n_runs = jnp.sum(is_start, axis=1, keepdims=True)
    # Starts of each row's runs, then t (the row's end) in every slot after the last run.
    starts = jax.vmap(lambda s: jnp.nonzero(s, size=t + 1, fill_value=t)[0])(is_start)
    slot = jnp.arange(t + 1)[None, :]
    lengths = jnp.where(slot[:, :-1] < n_runs, jnp.diff(starts, axis=1), -1)
    offsets = jnp.where(slot < n_runs, starts, -1)
    return lengths.astype(jnp.int32), offsets.astype(jnp.int32)


def cudnn_attention(q_btnh, k_bskh, v_bskh, segment_ids_bt: jax.Array | None, *,
                    causal: bool, sliding_window: int = 0) -> jax.Array:
    """cuDNN flash attention. With segment ids, each run of equal ids is a sequence of
    cuDNN's packed (ragged) layout; jax 0.10 exposes that layout only in its cuDNN module,
    ``jax.nn.dot_product_attention`` takes sequence lengths alone."""
    if segment_ids_bt is None:
        window = (sliding_window - 1, 0) if sliding_window else None
        return jax.nn.dot_product_attention(q_btnh, k_bskh, v_bskh, is_causal=causal,
                                            local_window_size=window, implementation="cudnn")
    from jax._src.cudnn import fused_attention_stablehlo as cudnn  # noqa: PLC0415

    lengths, offsets = segment_runs(segment_ids_bt)
    return cudnn.dot_product_attention(
        q_btnh, k_bskh, v_bskh, q_seqlen=lengths, kv_seqlen=lengths, q_offsets=offsets,
        kv_offsets=offsets, scale=q_btnh.shape[-1] ** -0.5,
        mask_type=cudnn.MaskType.PADDING_CAUSAL if causal else cudnn.MaskType.PADDING,
        sliding_window_length=sliding_window or None)


def splash_block_size(seq_len: int) -> int:
    for block in SPLASH_BLOCKS:
        if seq_len % block == 0:
            return block
    raise ValueError(
        f"splash attention tiles the sequence in blocks of {SPLASH_BLOCKS}: the sequence "
        f"length {seq_len} must be a multiple of 128; set data.max_len to a multiple of 128 "
        "or model.attention_impl='xla'")


def splash_attention(q_btnh, k_bskh, v_bskh, segment_ids_bt: jax.Array, *, causal: bool,
                     sliding_window: int = 0) -> jax.Array:
    """Pallas splash attention (TPU; Pallas interpret mode on the CPU) with segment ids.

    Under a mesh the kernel runs per shard (``shard_map``): batch and heads split as the
    logical axis rules place ``activation_batch`` and ``activation_heads``; the sequence
    stays whole.
    """
    kv_heads = k_bskh.shape[2]
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return _splash_local(q_btnh, k_bskh, v_bskh, segment_ids_bt, causal=causal,
                             sliding_window=sliding_window)
    batch_axes, _, head_axes, _ = nn.logical_to_mesh_axes(
        ("activation_batch", None, "activation_heads", None))
    head_split = _mesh_axes_size(mesh, head_axes)
    if kv_heads % head_split:
        raise ValueError(
            f"splash attention splits heads over mesh axes {head_axes} (size {head_split}), "
            f"which must divide num_kv_heads={kv_heads}; change the mesh or use "
            "model.attention_impl='xla'")
    heads = jax.sharding.PartitionSpec(batch_axes, None, head_axes, None)
    seg = jax.sharding.PartitionSpec(batch_axes, None)
    local = functools.partial(_splash_local, causal=causal, sliding_window=sliding_window)
    return jax.shard_map(local, mesh=mesh, in_specs=(heads, heads, heads, seg),
                         out_specs=heads, check_vma=False)(q_btnh, k_bskh, v_bskh,
                                                           segment_ids_bt)


def _mesh_axes_size(mesh, axes) -> int:
    if axes is None:
        return 1
    return int(np.prod([mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes)]))


def _splash_local(q_btnh, k_bskh, v_bskh, segment_ids_bt, *, causal: bool,
                  sliding_window: int) -> jax.Array:
    from jax.experimental.pallas.ops.tpu.splash_attention import (  # noqa: PLC0415
        splash_attention_kernel as splash,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import (  # noqa: PLC0415
        splash_attention_mask as masks,
    )

    _, t, n, hd = q_btnh.shape
    block = splash_block_size(t)
    if sliding_window:  # key j visible to query i when i - window < j <= i
        mask = masks.LocalMask((t, t), window_size=(sliding_window - 1, 0), offset=0)
    elif causal:
        mask = masks.CausalMask((t, t))
    else:
        mask = masks.FullMask((t, t))
    sizes = splash.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
        block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    kernel = splash.make_splash_mha(
        masks.MultiHeadMask([mask] * n), block_sizes=sizes, head_shards=1, q_seq_shards=1,
        interpret=attention_platform() == "cpu")

    def one_row(q_nth, k_kth, v_kth, seg_t):
        return kernel(q_nth, k_kth, v_kth, segment_ids=splash.SegmentIds(seg_t, seg_t))

    # The kernel takes heads first and does not scale the logits.
    to_heads = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731
    out = jax.vmap(one_row)(to_heads(q_btnh * jnp.asarray(hd ** -0.5, q_btnh.dtype)),
                            to_heads(k_bskh), to_heads(v_bskh), segment_ids_bt)
    return to_heads(out)


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
