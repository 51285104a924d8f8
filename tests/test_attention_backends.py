"""Attention backends by name: resolution rules, Pallas splash (interpret mode on the CPU)
and cuDNN (only where a GPU is present) against XLA's dense attention, packed segment ids
with padding, GQA, gradients, and no NaN from padded rows.

On a GPU machine the cuDNN checks run with:
    JAX_PLATFORMS=cuda,cpu python -m pytest -q -m gpu tests/test_attention_backends.py
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from exgra_jax.models import config as mc
from exgra_jax.models.layers import attention, resolve_attention_impl, segment_runs
from exgra_jax.models.llama import LlamaModel
from exgra_jax.parallel import DEFAULT_RULES, batch_sharding, make_mesh

HEADS, HEAD_DIM, T = 4, 16, 384  # 384: three 128-token splash blocks


def packed_segments(t: int = T) -> np.ndarray:
    """Row 0: three packed sequences then end padding; row 1: left padding, two sequences,
    a one-token sequence and end padding; row 2: padding only."""
    seg = np.zeros((3, t), np.int32)
    seg[0, :100], seg[0, 100:250], seg[0, 250:340] = 1, 2, 3
    seg[1, 30:230], seg[1, 230:300], seg[1, 300] = 1, 2, 3
    return seg


def qkv(kv_heads: int, b: int = 3, t: int = T, seed: int = 0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, t, HEADS, HEAD_DIM))
    k = rng.standard_normal((b, t, kv_heads, HEAD_DIM))
    v = rng.standard_normal((b, t, kv_heads, HEAD_DIM))
    ct = rng.standard_normal((b, t, HEADS, HEAD_DIM))  # cotangent for the gradient check
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v, ct))


def numpy_attention(q, k, v, seg, window: int = 0) -> np.ndarray:
    """Written-out reference: softmax over keys j <= i of the same segment (and in the
    window), GQA by repeating each key/value head for its group of query heads."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, n, h = q.shape
    rep = n // k.shape[2]
    k, v = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)
    i, j = np.arange(t)[:, None], np.arange(t)[None, :]
    allowed = (j <= i)[None] & (seg[:, :, None] == seg[:, None, :])
    if window:
        allowed &= (i - j < window)[None]
    logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(h)
    logits = np.where(allowed[:, None], logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", p, v)


def value_and_grads(impl, q, k, v, ct, seg, window=0):
    def f(q, k, v):
        positions = jnp.broadcast_to(jnp.arange(q.shape[1]), q.shape[:2])
        out = attention(q, k, v, impl=impl, segment_ids_bt=seg, causal=True,
                        positions_bt=positions, sliding_window=window)
        return jnp.sum(out.astype(jnp.float32) * ct), out

    (_, out), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return np.asarray(out, np.float32), [np.asarray(g, np.float32) for g in grads]


def rel_err(a, b) -> float:
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-12))


# ---------------------------------------------------------------------------- resolution
@pytest.mark.parametrize("impl,platform,dtype,seq_len,expected", [
    ("auto", "tpu", jnp.bfloat16, 2048, "splash"),
    ("auto", "tpu", jnp.bfloat16, 257, "xla"),  # no whole 128-token blocks (CLIP-L/14)
    ("auto", "cpu", jnp.bfloat16, 2048, "xla"),
    ("auto", "gpu", jnp.float32, 2048, "xla"),  # cuDNN flash attention is half precision
    ("xla", "tpu", jnp.float32, 2048, "xla"),
    ("splash", "tpu", jnp.float32, 2048, "splash"),
    ("splash", "cpu", jnp.float32, 384, "splash"),  # Pallas interpret mode
])
def test_resolution_rules(impl, platform, dtype, seq_len, expected):
    assert resolve_attention_impl(impl, platform=platform, dtype=dtype, head_dim=128,
                                  seq_len=seq_len) == expected


@pytest.mark.parametrize("impl,platform,dtype,head_dim,seq_len,message", [
    ("cudnn", "cpu", jnp.bfloat16, 128, 2048, "needs an NVIDIA GPU"),
    ("cudnn", "tpu", jnp.bfloat16, 128, 2048, "needs an NVIDIA GPU"),
    ("cudnn", "gpu", jnp.float32, 128, 2048, "bfloat16 or float16"),
    ("cudnn", "gpu", jnp.bfloat16, 100, 2048, "multiple of 8"),
    ("splash", "gpu", jnp.bfloat16, 128, 2048, "TPU kernel"),
    ("splash", "tpu", jnp.bfloat16, 128, 200, "multiple of 128"),
    ("flash", "cpu", jnp.float32, 128, 2048, "unknown attention_impl"),
])
def test_impossible_choices_fail_clearly(impl, platform, dtype, head_dim, seq_len, message):
    with pytest.raises(ValueError, match=message):
        resolve_attention_impl(impl, platform=platform, dtype=dtype, head_dim=head_dim,
                               seq_len=seq_len)


def test_config_refuses_unknown_backend():
    with pytest.raises(ValueError, match="attention_impl must be one of"):
        mc.tiny(attention_impl="flash")
    assert mc.ModelConfig.from_dict({"attention_impl": None}).attention_impl == "auto"


# ---------------------------------------------------------------------------- splash
@pytest.mark.parametrize("kv_heads,window", [(1, 0), (2, 64), (HEADS, 0)])
def test_splash_matches_xla_forward_and_gradients(kv_heads, window):
    q, k, v, ct = qkv(kv_heads, seed=kv_heads)
    seg = jnp.asarray(packed_segments())
    ref = numpy_attention(q, k, v, np.asarray(seg), window)
    out_x, grads_x = value_and_grads("xla", q, k, v, ct, seg, window)
    out_s, grads_s = value_and_grads("splash", q, k, v, ct, seg, window)
    assert rel_err(out_x, ref) < 1e-5  # the XLA backend against the written-out rule
    assert rel_err(out_s, out_x) < 1e-5
    for g_s, g_x in zip(grads_s, grads_x, strict=True):
        assert np.all(np.isfinite(g_s))
        assert rel_err(g_s, g_x) < 1e-5


def test_splash_sharded_over_a_mesh_matches_xla():
    """Under the trainer's mesh and logical axis rules the kernel runs per shard
    (batch over data x fsdp, heads over tensor)."""
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices()[:8])
    seg = jnp.asarray(np.concatenate([packed_segments()] * 2 + [packed_segments()[:2]]))
    q, k, v, ct = qkv(2, b=8, seed=5)
    out_x, grads_x = value_and_grads("xla", q, k, v, ct, seg)
    q, k, v, ct = (jax.device_put(x, batch_sharding(mesh, 4)) for x in (q, k, v, ct))
    seg = jax.device_put(seg, batch_sharding(mesh, 2))
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        out_s, grads_s = value_and_grads("splash", q, k, v, ct, seg)
        jaxpr = str(jax.make_jaxpr(lambda *a: attention(*a, impl="splash", segment_ids_bt=seg,
                                                        causal=True))(q, k, v))
    assert "shard_map" in jaxpr and "pallas_call" in jaxpr
    assert rel_err(out_s, out_x) < 1e-5
    for g_s, g_x in zip(grads_s, grads_x, strict=True):
        assert rel_err(g_s, g_x) < 1e-5


def test_splash_compiles_to_mosaic_kernels_for_a_tpu_topology():
    """On a TPU the kernel is real Pallas/Mosaic: compiled ahead of time by libtpu for a
    4-chip v5e under the trainer's mesh axes, the gradient holds the forward, dq and dkv
    kernels as TPU custom calls."""
    pytest.importorskip("libtpu")
    import os  # noqa: PLC0415

    from jax.experimental import topologies  # noqa: PLC0415

    # libtpu as a compiler only: no TPU lock, no cloud metadata query (as tools/aot_compile).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    devices = topologies.get_topology_desc(
        platform="tpu", topology_name="v5e:2x2", chip_config_name="default",
        chips_per_host_bounds=(2, 2, 1), num_slices=1, wrap=(False, False, False)).devices
    mesh = make_mesh({"data": 1, "fsdp": 2, "tensor": 2}, list(devices))
    heads = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
        ("data", "fsdp"), None, "tensor", None))
    q = jax.ShapeDtypeStruct((4, 1024, 8, 128), jnp.bfloat16, sharding=heads)
    kv = jax.ShapeDtypeStruct((4, 1024, 2, 128), jnp.bfloat16, sharding=heads)
    seg = jax.ShapeDtypeStruct((4, 1024), jnp.int32, sharding=batch_sharding(mesh, 2))

    def grads(q, k, v, seg):
        with nn.logical_axis_rules(DEFAULT_RULES):
            loss = lambda q, k, v: jnp.sum(attention(  # noqa: E731
                q, k, v, impl="splash", segment_ids_bt=seg, causal=True).astype(jnp.float32))
            return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    # conftest's float32 'highest' matmul precision is no Mosaic bf16 matmul: the default.
    with jax.set_mesh(mesh), jax.default_matmul_precision("default"):
        hlo = jax.jit(grads).lower(q, kv, kv, seg).compile().as_text()
    assert hlo.count("tpu_custom_call") == 3


def test_splash_needs_whole_blocks():
    q, k, v, _ = qkv(2, b=1, t=200)
    with pytest.raises(ValueError, match="multiple of 128"):
        attention(q, k, v, impl="splash", segment_ids_bt=jnp.ones((1, 200), jnp.int32),
                  causal=True)


# ---------------------------------------------------------------------------- the model
def test_model_splash_matches_xla_with_packing_and_padding():
    """LlamaModel with packed segments (positions restarting), left and end padding and an
    all-padding row: splash gives XLA's logits and parameter gradients, all finite."""
    t = 128
    seg = np.zeros((3, t), np.int32)
    seg[0, :50], seg[0, 50:100] = 1, 2
    seg[1, 20:] = 1
    pos = np.zeros((3, t), np.int32)
    for r, s_id in ((0, 1), (0, 2), (1, 1)):  # positions restart in every segment
        idx = np.nonzero(seg[r] == s_id)[0]
        pos[r, idx] = np.arange(len(idx))
    ids = np.random.default_rng(0).integers(1, 128, (3, t)).astype(np.int32)
    real = seg > 0
    batch = [jnp.asarray(x) for x in (ids, real.astype(np.int32), pos, seg)]

    def run(impl, params):
        model = LlamaModel(mc.tiny(attention_impl=impl, num_layers=1))

        def loss(p, ids, mask, pos, seg):
            x = model.apply({"params": p}, ids, method=LlamaModel.embed)
            h, _ = model.apply({"params": p}, x, mask, pos, segment_ids_bt=seg,
                               method=LlamaModel.decode)
            logits = model.apply({"params": p}, h, method=LlamaModel.logits)
            return jnp.sum(jnp.where(mask[..., None] > 0, logits, 0.0) ** 2), logits

        (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params, *batch)
        return np.asarray(logits), [np.asarray(g) for g in jax.tree.leaves(grads)]

    # Initialising with splash works at a length no kernel tile fits (init traces XLA).
    splash_model = LlamaModel(mc.tiny(attention_impl="splash", num_layers=1))
    params = nn.unbox(splash_model.init(jax.random.key(0), batch[0][:, :8])["params"])
    logits_x, grads_x = run("xla", params)
    logits_s, grads_s = run("splash", params)
    for logits, grads in ((logits_x, grads_x), (logits_s, grads_s)):
        assert np.all(np.isfinite(logits)) and all(np.all(np.isfinite(g)) for g in grads)
    assert rel_err(logits_s[real], logits_x[real]) < 1e-5
    for g_s, g_x in zip(grads_s, grads_x, strict=True):
        assert rel_err(g_s, g_x) < 1e-4


# ---------------------------------------------------------------------------- cuDNN
def test_segment_runs_describe_every_token():
    """cuDNN's packed layout: each row's runs of equal ids (padding included) as lengths
    and start offsets, -1 after the last; checked against a run-length count."""
    t = 64
    seg = np.concatenate([packed_segments()[:, ::6], np.arange(t)[None] // 3], axis=0)
    lengths, offsets = (np.asarray(x) for x in segment_runs(jnp.asarray(seg)))
    assert lengths.shape == (4, t) and offsets.shape == (4, t + 1)
    for row, lens, offs in zip(seg, lengths, offsets, strict=True):
        runs, start = [], 0
        for i in range(1, t + 1):
            if i == t or row[i] != row[i - 1]:
                runs.append((start, i - start))
                start = i
        n = len(runs)
        assert [(int(o), int(ln)) for o, ln in zip(offs[:n], lens[:n])] == runs
        assert np.all(lens[n:] == -1) and np.all(offs[n:] == -1)
        assert lens[:n].sum() == t


def _has_gpu() -> bool:
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


@pytest.mark.gpu
@pytest.mark.skipif(not _has_gpu(), reason="cuDNN attention needs a GPU "
                    "(run with JAX_PLATFORMS=cuda,cpu -m gpu)")
@pytest.mark.parametrize("kv_heads", [1, 2, HEADS])
def test_cudnn_matches_xla_forward_and_gradients(kv_heads):
    """bfloat16 cuDNN flash attention against XLA in float32 on the same bf16 inputs."""
    gpu = jax.devices("gpu")[0]
    q, k, v, ct = (jax.device_put(x, gpu) for x in qkv(kv_heads, seed=kv_heads,
                                                       dtype=jnp.bfloat16))
    seg = jax.device_put(jnp.asarray(packed_segments()), gpu)
    out_c, grads_c = value_and_grads("cudnn", q, k, v, ct, seg)
    f32 = [x.astype(jnp.float32) for x in (q, k, v, ct)]
    out_x, grads_x = value_and_grads("xla", *f32, seg)
    assert np.all(np.isfinite(out_c))
    assert rel_err(out_c, out_x) < 2e-2
    for g_c, g_x in zip(grads_c, grads_x, strict=True):
        assert np.all(np.isfinite(g_c))
        assert rel_err(g_c, g_x) < 3e-2
