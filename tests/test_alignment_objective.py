"""The multi-graph alignment objective: PyTorch peer parity and the 8-device mesh."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from exgra_jax.alignment.objective import AlignmentConfig, MultiGraphAlignment, masked_mean

_PEER = pathlib.Path(__file__).parents[1] / "tools" / "benchmarks" / "alignment.py"


def _peer_module():
    spec = importlib.util.spec_from_file_location("alignment_bench", _PEER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _inputs(n, d, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return [jax.random.normal(k, (n, d), jnp.float32) for k in keys]


def test_masked_mean():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 5, 4)).astype(np.float32)
    mask = np.array([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], bool)
    ours = np.asarray(masked_mean(jnp.asarray(x, jnp.bfloat16), jnp.asarray(mask)))
    xb = np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))
    np.testing.assert_allclose(ours[0], xb[0, :2].mean(0), rtol=1e-6)
    np.testing.assert_allclose(ours[1], xb[1].mean(0), rtol=1e-6)
    np.testing.assert_array_equal(ours[2], 0)
    padded = np.asarray(masked_mean(jnp.asarray(x), jnp.asarray(mask), include_padding=True))
    np.testing.assert_allclose(padded, x.mean(1), rtol=1e-6)


def test_config_and_shapes_are_checked():
    with pytest.raises(ValueError, match="solver"):
        AlignmentConfig(solver="lpmp")
    mod = MultiGraphAlignment(AlignmentConfig(graph_scope="device"), num_groups=3)
    with pytest.raises(ValueError, match="equal groups"):
        mod.init(jax.random.key(0), *_inputs(16, 8), deterministic=True)
    with pytest.raises(ValueError, match="graph_size=16 must divide the .* 24 samples"):
        MultiGraphAlignment(AlignmentConfig()).init(
            jax.random.key(0), *_inputs(24, 8), deterministic=True)
    with pytest.raises(ValueError, match="graph_size=5 must exceed k=5"):
        AlignmentConfig(graph_size=5)


@pytest.mark.parametrize("solver,message_flow,loss_scale", [
    ("lap", "original", 1.0), ("lap", "forward", 1.0), ("lap", "original", 256.0),
    ("ipfp", "original", 1.0)])
def test_matches_pytorch_peer_loss_and_gradients(solver, message_flow, loss_scale):
    """Our loss and input gradients equal the original-structured PyTorch version (with
    "ipfp": edge-pair costs and a NumPy IPFP in its autograd Function); with
    emulated_loss_scale=S, those of the peer's loss scaled by S and its gradients
    unscaled, as fp16 loss scaling does (the solver backward does not grow with S)."""
    n, d = 12, 16
    cfg = AlignmentConfig(k=3, message_flow=message_flow, graph_scope="global", solver=solver,
                          emulated_loss_scale=loss_scale)
    mod = MultiGraphAlignment(cfg)
    feats = _inputs(n, d, seed=3)
    params = mod.init(jax.random.key(1), *feats, deterministic=True)

    def loss(*xs):
        return mod.apply(params, *xs, deterministic=True)[0]

    value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(*feats)

    gnn = nn.meta.unbox(params)["params"]["gnn"]
    weights = [tuple(np.asarray(gnn[f"conv{i}"][w]) for w in ("root_kernel", "rel_kernel", "bias"))
               for i in range(cfg.gnn_layers)]
    peer, _ = _peer_module().make_torch_peer(weights, k=cfg.k, lam=cfg.blackbox_lambda,
                                            message_flow=message_flow, solver=solver,
                                            ipfp_iters=cfg.ipfp_iters)
    xs = [torch.tensor(np.asarray(f), dtype=torch.float64, requires_grad=True) for f in feats]
    for conv in _:
        conv.double()
    ref = peer(*xs)
    (ref * loss_scale).backward()
    np.testing.assert_allclose(float(value), ref.item(), rtol=1e-6)
    for ours, x in zip(grads, xs):
        np.testing.assert_allclose(np.asarray(ours), x.grad.numpy() / loss_scale, rtol=1e-4,
                                   atol=1e-6 / loss_scale)
    assert any(float(jnp.abs(g).sum()) > 0 for g in grads)


def _mesh():
    devices = np.array(jax.devices()[:8]).reshape(4, 2)
    return Mesh(devices, ("data", "fsdp"))


@pytest.mark.slow
@pytest.mark.parametrize("scope", ["fixed", "device", "global"])
def test_sharded_value_and_grad_equals_single_device(scope):
    """One device and an 8-device mesh give the same loss and gradients; with "fixed"
    the 4 graphs of 12 straddle the 8 shards of 6 samples."""
    n, d = 48, 16
    cfg = AlignmentConfig(k=3, graph_scope=scope, graph_size=12, solver="ipfp", ipfp_iters=3)
    mod = MultiGraphAlignment(cfg, num_groups=8)
    feats = _inputs(n, d, seed=5)
    params = mod.init(jax.random.key(2), *feats, deterministic=True)
    rngs = {"gumbel": jax.random.key(3), "dropout": jax.random.key(4)}

    def loss(p, *xs):
        return mod.apply(p, *xs, deterministic=False, rngs=rngs)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))
    single = jax.device_put((params, feats), jax.devices()[0])
    (l1, m1), g1 = step(single[0], *single[1])

    mesh = _mesh()
    batch_sharding = NamedSharding(mesh, P(("data", "fsdp"), None))
    sharded = [jax.device_put(f, batch_sharding) for f in feats]
    params_r = jax.device_put(params, NamedSharding(mesh, P()))
    (l8, m8), g8 = step(params_r, *sharded)
    assert len(sharded[0].sharding.device_set) == 8
    assert np.isfinite(float(l8)) and all(
        np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(g8))
    np.testing.assert_allclose(float(l8), float(l1), rtol=1e-6)
    for k in m1:
        np.testing.assert_allclose(float(m8[k]), float(m1[k]), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g8), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("scope", ["fixed", "device"])
def test_grouped_scopes_are_the_mean_of_per_group_graphs(scope):
    """Groups of 8: by graph_size ("fixed", whatever num_groups says) or by shards."""
    # d large enough that ReLU leaves no all-zero GNN outputs: their exact cost ties
    # would let float rounding pick between equally good matchings.
    n, d, groups = 32, 32, 4
    cfg = AlignmentConfig(k=3, graph_scope=scope, graph_size=8, solver="lap")
    feats = _inputs(n, d, seed=6)
    grouped = MultiGraphAlignment(cfg, num_groups=groups if scope == "device" else 2)
    params = grouped.init(jax.random.key(0), *feats, deterministic=True)
    whole = float(grouped.apply(params, *feats, deterministic=True)[0])
    one_cfg = AlignmentConfig(k=3, graph_scope="global", solver="lap")
    one = jax.jit(lambda *xs: MultiGraphAlignment(one_cfg).apply(
        params, *xs, deterministic=True)[0])
    parts = [float(one(*(f[g * 8:(g + 1) * 8] for f in feats))) for g in range(groups)]
    np.testing.assert_allclose(whole, np.mean(parts), rtol=1e-6)
    assert float(one(*feats)) != pytest.approx(whole)
