"""LoRA dropout (PEFT's ``lora_dropout``): y = W x + scale B A dropout(x), the dropout on the
adapter's input only, while training; evaluation, the merge and dropout 0 stay the merged
kernel."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from eval_fixtures import random_params
from train_fixtures import random_batch, tiny_config

from exgra_jax import parallel
from exgra_jax.models.layers import Dense
from exgra_jax.models.llava import LlavaModel
from exgra_jax.models.lora import LoraConfig, init_adapters, training_params, with_adapters
from exgra_jax.train import trainer
from exgra_jax.train.state import use_lora
from exgra_jax.train.step import forward_loss, text_branch_vectors, token_count

D_IN, D_OUT, RANK, ALPHA, RATE = 6, 5, 3, 6.0, 0.4


def dense_params(seed: int, rank: int = RANK, identity: bool = False) -> dict:
    """A Dense's kernel with its adapters beside it, as ``training_params`` lays them out
    (``lora_b`` already scaled). ``identity``: W = 0 and A = B = I, so y = dropout(x)."""
    rng = np.random.default_rng(seed)
    if identity:
        return {"kernel": np.zeros((D_IN, D_IN), np.float32), "lora_a": np.eye(D_IN),
                "lora_b": np.eye(D_IN), "lora_dropout": np.float32(RATE)}
    return {"kernel": rng.standard_normal((D_IN, D_OUT)).astype(np.float32),
            "lora_a": rng.standard_normal((D_IN, rank)).astype(np.float32),
            "lora_b": ALPHA / rank * rng.standard_normal((rank, D_OUT)).astype(np.float32),
            "lora_dropout": np.float32(RATE)}


def apply_dense(params, x, key=None, features=D_OUT):
    layer = Dense((features,), ("embed", "mlp"))
    return np.asarray(layer.apply({"params": params}, x,
                                  rngs={} if key is None else {"dropout": key}))


def x_input(seed=1):
    return np.random.default_rng(seed).standard_normal((2, 4, D_IN)).astype(np.float32)


def drawn_mask(key, shape):
    """The keep mask our layer draws for ``key`` and an input of ``shape``, read off with
    W = 0, A = B = I (y = dropout(1) = mask / (1 - rate))."""
    kept = Dense((D_IN,), ("embed", "mlp")).apply(
        {"params": dense_params(0, identity=True)}, jnp.ones(shape), rngs={"dropout": key})
    return kept * (1 - RATE)


def test_dense_is_peft_lora_linear_with_the_same_mask():
    x, key = x_input(), jax.random.key(7)
    mask = np.asarray(drawn_mask(key, x.shape))
    np.testing.assert_allclose(mask * (1 - mask), 0, atol=1e-6)  # zeros and ones
    assert 0 < mask.mean() < 1

    p = dense_params(0)
    ours_train, ours_eval = apply_dense(p, x, key), apply_dense(p, x)

    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(D_IN, D_OUT, bias=False)

        def forward(self, t):
            return self.lin(t)

    model = peft.get_peft_model(One(), peft.LoraConfig(
        r=RANK, lora_alpha=ALPHA, lora_dropout=RATE, target_modules=["lin"]))
    lin = model.base_model.model.lin
    with torch.no_grad():
        lin.base_layer.weight.copy_(torch.tensor(p["kernel"].T))
        lin.lora_A["default"].weight.copy_(torch.tensor(p["lora_a"].T))
        lin.lora_B["default"].weight.copy_(torch.tensor(p["lora_b"].T * RANK / ALPHA))
    drop = lin.lora_dropout["default"]
    assert isinstance(drop, torch.nn.Dropout) and drop.p == RATE  # PEFT's own dropout

    class SameMask(torch.nn.Module):  # PEFT's dropout with our mask
        def forward(self, t):
            return t * torch.tensor(mask) / (1 - RATE)

    lin.lora_dropout["default"] = SameMask()
    with torch.no_grad():
        ref_train = model.train()(torch.tensor(x)).numpy()
        lin.lora_dropout["default"] = drop
        ref_eval = model.eval()(torch.tensor(x)).numpy()
    np.testing.assert_allclose(ours_train, ref_train, rtol=0, atol=1e-5)
    np.testing.assert_allclose(ours_eval, ref_eval, rtol=0, atol=1e-5)
    assert np.abs(ours_train - ours_eval).max() > 1e-2


def test_dropout_keeps_the_expectation_and_drops_the_rate():
    x, p, n = x_input(2), dense_params(3), 4000
    keys = jax.random.split(jax.random.key(0), n)
    layer = Dense((D_OUT,), ("embed", "mlp"))
    ys = np.asarray(jax.vmap(lambda k: layer.apply({"params": p}, x,
                                                   rngs={"dropout": k}))(keys), np.float64)
    plain = apply_dense(p, x)  # no rng: no dropout
    err = np.abs(ys.mean(0) - plain)
    assert np.all(err < 5 * ys.std(0) / np.sqrt(n) + 1e-6), err.max()
    masks = jax.vmap(lambda k: drawn_mask(k, x.shape))(keys[:200])
    assert abs(float(1 - masks.mean()) - RATE) < 0.02


# ======================================================================== in the model
# Every kernel layout: q/k/v [d, h, hd] and o [h, hd, d] of the scanned decoder, the MLP,
# the projector with bias, a CLIP layer, the LM head.
ALL_KINDS = (r"^model/llm/layers/(attn|mlp)/\w+/kernel$", r"^model/projector/",
             r"^model/vision_tower/layers_1/attn/(o|q)/kernel$", r"^model/llm/lm_head/kernel$")


@pytest.fixture(scope="module")
def adapted():
    """(model config, LoRA config, params with trained-looking adapters (B != 0), inputs);
    weights drawn with NumPy (compiling the Flax init would double the test's time)."""
    mcfg = trainer.model_config(tiny_config())
    lcfg = LoraConfig(ALL_KINDS, rank=4, alpha=8.0, dropout=0.3)
    ids = jnp.zeros((1, 8), jnp.int32)
    pix = jnp.zeros((1, mcfg.image_size, mcfg.image_size, 3))
    boxed = jax.eval_shape(lambda: LlavaModel(mcfg).init(jax.random.key(0), ids, pix,
                                                         jnp.ones_like(ids)))["params"]
    lora = nn.unbox(init_adapters(jax.random.key(1), {"model": boxed}, lcfg))
    lora = jax.tree_util.tree_map_with_path(
        lambda k, x: 0.05 * np.random.default_rng(2).standard_normal(x.shape, np.float32)
        if k[-1].key == "b" else x, lora)
    params = {"model": random_params(mcfg), "lora": lora}
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 99, (2, 24))
    ids[:, 2:2 + mcfg.num_image_tokens] = mcfg.image_token_id
    pix = rng.standard_normal((2, mcfg.image_size, mcfg.image_size, 3)).astype(np.float32)
    return mcfg, lcfg, params, (ids, pix, np.ones_like(ids))


@pytest.mark.slow
def test_the_model_applies_adapters_on_the_activation_path(adapted):
    mcfg, lcfg, params, inputs = adapted
    model = LlavaModel(mcfg)
    act = training_params(params, lcfg, jnp.float32)["model"]
    assert "lora_a" in act["llm"]["layers"]["attn"]["o"]

    @jax.jit
    def outputs(params, act):
        merged = model.apply({"params": with_adapters(params, lcfg)["model"]}, *inputs)
        evaluated = model.apply({"params": act}, *inputs)  # no 'dropout' rng
        drawn = [model.apply({"params": act}, *inputs, rngs={"dropout": jax.random.key(k)})
                 for k in (1, 2, 1)]
        return merged, evaluated, drawn

    merged, evaluated, (a, b, again) = jax.tree.map(np.asarray, outputs(params, act))
    # Evaluation: W x + scale B A x, the merged kernel's output.
    np.testing.assert_allclose(evaluated, merged, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(a, again)  # the masks are a function of the key
    assert np.abs(a - merged).max() > 1e-3
    assert np.abs(a - b).max() > 1e-3


def test_dropout_zero_is_the_merged_kernel_bit_for_bit(adapted):
    _, lcfg, params, _ = adapted
    off = dataclasses.replace(lcfg, dropout=0.0)
    got, want = training_params(params, off, jnp.float32), with_adapters(params, off,
                                                                         jnp.float32)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_the_train_loss_and_the_text_branches_draw_dropout():
    c = tiny_config(alignment=False)
    use_lora(c, (r"^model/llm/layers/attn/(q|v)/kernel$",), rank=4, alpha=8.0,
             base_dtype="float32", dropout=0.3)
    run = trainer.build(c, 10, devices=jax.devices()[:1])
    sc = run.step_config
    assert sc.text_branch == "llm"
    params = {"model": random_params(run.model), "lora": jax.tree.map(
        lambda x: np.full(x.shape, 0.05, x.dtype), run.abstract_state["params"]["lora"])}
    batch = parallel.make_global_batch(random_batch(0), run.mesh)
    total = token_count(batch)
    off = dataclasses.replace(sc, lora=dataclasses.replace(sc.lora, dropout=0.0))
    model = LlavaModel(run.model)

    @jax.jit
    def losses(p, key):
        dropped, grads = jax.value_and_grad(
            lambda q: forward_loss(q, batch, key, sc, total)[0])(p)
        act = training_params(p, sc.lora, jnp.float32)["model"]
        text = [text_branch_vectors(model, act, batch, sc, k)[:2] for k in (key, None)]
        merged = with_adapters(p, sc.lora)["model"]
        text.append(text_branch_vectors(model, merged, batch, sc)[:2])
        return dropped, forward_loss(p, batch, key, off, total)[0], grads, text

    dropped, merged, grads, (text, text_eval, text_merged) = losses(params, jax.random.key(0))
    assert float(dropped) != float(losses(params, jax.random.key(1))[0])
    assert abs(float(dropped) - float(merged)) > 1e-4
    for leaf in jax.tree.leaves(grads["lora"]):
        assert np.isfinite(leaf).all() and float(jnp.abs(leaf).max()) > 0
    for drawn, plain, want in zip(text, text_eval, text_merged, strict=True):
        np.testing.assert_allclose(plain, want, rtol=0, atol=1e-5)
        assert np.abs(np.asarray(drawn) - np.asarray(want)).max() > 1e-4
