"""LoRA: adapters start as the identity, PEFT (PyTorch) applies our exported adapters to the
exported base and gets our logits, the merged export equals PEFT's adapter forward, and
training moves only the adapters (base frozen, no optimizer state for it)."""

from __future__ import annotations

import hf_fixtures as F
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from peft import PeftModel
from train_fixtures import random_batch, tiny_config
from transformers import LlavaForConditionalGeneration

from exgra_jax import parallel
from exgra_jax.convert import peft as peft_export
from exgra_jax.models.llava import LlavaModel
from exgra_jax.models.lora import (
    ATTENTION_AND_PROJECTOR,
    LoraConfig,
    count,
    init_adapters,
    with_adapters,
    with_init_adapters,
)
from exgra_jax.train import state as st
from exgra_jax.train import trainer

NUM_IMG = 16
# Every kind of kernel layout: q/k/v [d, h, hd], o [h, hd, d] (LLM and CLIP), MLP and
# projector [in, out] with and without bias, the LM head.
ALL_KINDS = (r"^model/llm/layers(_\d+)?/(attn|mlp)/\w+/kernel$", r"^model/projector/",
             r"^model/vision_tower/layers_[12]/attn/(o|q)/kernel$",
             r"^model/llm/lm_head/kernel$")


def make_inputs(seed=0, batch=2, seq=26):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 99, (batch, seq))
    ids[:, 3:3 + NUM_IMG] = F.IMAGE_TOKEN
    am = np.ones((batch, seq), np.int64)
    am[1, -4:] = 0
    pix = rng.standard_normal((batch, 3, 32, 32)).astype(np.float32)
    return ids, am, pix


def torch_logits(model, ids, am, pix):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(am),
                     pixel_values=torch.tensor(pix)).logits.numpy()


def adapters_for(cfg, lcfg, seed=0, b_std=0.0):
    """Fresh adapters for ``cfg``'s model; ``b_std`` > 0 replaces B's zeros by noise (as
    after training)."""
    ids, pix = jnp.zeros((1, 8), jnp.int32), jnp.zeros((1, 32, 32, 3))
    boxed = jax.eval_shape(lambda r: LlavaModel(cfg).init(r, ids, pix, jnp.ones_like(ids)),
                           jax.random.key(0))["params"]
    lora = jax.tree.map(lambda x: x.value, init_adapters(jax.random.key(seed), {"model": boxed},
                                                         lcfg),
                        is_leaf=lambda x: hasattr(x, "names"))
    if b_std:
        flat = jax.tree_util.tree_leaves_with_path(lora)
        keys = iter(jax.random.split(jax.random.key(seed + 1), len(flat)))
        lora = jax.tree_util.tree_map_with_path(
            lambda p, x: b_std * jax.random.normal(next(keys), x.shape)
            if p[-1].key == "b" else x, lora)
    return lora


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
    """(our config, our params, the base exported by save_llava, loaded in transformers)."""
    return F.exported_llava(tmp_path_factory, seed=3)


def test_zero_b_gives_the_base_model_exactly(hf_base):
    cfg, params, _ = hf_base
    lcfg = LoraConfig(ALL_KINDS, rank=4, alpha=8.0)
    lora = adapters_for(cfg, lcfg)
    assert all(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(lora)[::2])  # A random
    ids, am, pix = make_inputs(1)
    model = LlavaModel(cfg)
    base = model.apply({"params": params}, ids, pix.transpose(0, 2, 3, 1), am)
    adapted = with_adapters({"model": params, "lora": lora}, lcfg)["model"]
    np.testing.assert_array_equal(model.apply({"params": adapted}, ids,
                                              pix.transpose(0, 2, 3, 1), am), base)


def test_peft_applies_our_export_and_merge_matches(hf_base, tmp_path):
    cfg, params, base_dir = hf_base
    lcfg = LoraConfig(ALL_KINDS, rank=4, alpha=16.0)
    lora = adapters_for(cfg, lcfg, seed=2, b_std=0.05)
    both = {"model": params, "lora": lora}
    ids, am, pix = make_inputs(2)
    ours = LlavaModel(cfg).apply({"params": with_adapters(both, lcfg)["model"]}, ids,
                                 pix.transpose(0, 2, 3, 1), am)
    base_logits = LlavaModel(cfg).apply({"params": params}, ids, pix.transpose(0, 2, 3, 1), am)
    assert np.abs(ours - base_logits).max() > 1e-2  # the adapters do change the model

    adir = str(tmp_path / "adapter")
    peft_export.save_adapters(cfg, lora, lcfg, adir, base_model=base_dir)
    peft_model = PeftModel.from_pretrained(
        LlavaForConditionalGeneration.from_pretrained(base_dir).eval(), adir).eval()
    wrapped = [n for n, m in peft_model.named_modules() if hasattr(m, "lora_A")]
    # 2 LLM layers x 7 kernels + 2 projector + 2 CLIP layers x 2 + lm_head
    assert len(wrapped) == 2 * 7 + 2 + 4 + 1
    ref = torch_logits(peft_model, ids, am, pix)
    valid = am.astype(bool)
    np.testing.assert_allclose(np.asarray(ours)[valid], ref[valid], rtol=0, atol=1e-4)

    # The merged export, loaded plainly in transformers, equals PEFT's adapter forward ...
    mdir = str(tmp_path / "merged")
    peft_export.save_merged(cfg, both, lcfg, mdir)
    merged = LlavaForConditionalGeneration.from_pretrained(mdir).eval()
    np.testing.assert_allclose(torch_logits(merged, ids, am, pix)[valid], ref[valid],
                               rtol=0, atol=1e-5)
    # ... and its weights are PEFT's own merge.
    peft_merged = peft_model.merge_and_unload().state_dict()
    for name, w in merged.state_dict().items():
        np.testing.assert_allclose(w.numpy(), peft_merged[name].numpy(), rtol=0, atol=1e-6,
                                   err_msg=name)


# ================================================================= training with adapters
@pytest.fixture(scope="module")
def lora_run():
    c = tiny_config(alignment=True)
    st.use_lora(c, ATTENTION_AND_PROJECTOR, rank=4, alpha=8.0, base_dtype="bfloat16",
                also_train=(r"^alignment/",))
    run = trainer.build(c, 10, devices=jax.devices()[:1])
    return run, trainer.init_train_state(run)


def test_adapters_shard_with_their_kernels():
    c = tiny_config(mesh=(1, 4, 2))
    st.use_lora(c, ATTENTION_AND_PROJECTOR, rank=4)
    sh = trainer.build(c, 10).state_sharding["params"]
    attn, adapters = sh["model"]["llm"]["layers"]["attn"], sh["lora"]["model"]["llm"]["layers"]
    def pad(spec, n=5):  # PartitionSpecs may drop trailing Nones
        return tuple(spec) + (None,) * (n - len(tuple(spec)))

    for name, n_in in (("q", 1), ("k", 1), ("v", 1), ("o", 2)):
        kernel = pad(attn[name]["kernel"].spec, 4)  # [layers, *in, *out]
        assert any(kernel), kernel  # the test means something only if kernels shard
        a, b = adapters["attn"][name]["a"].spec, adapters["attn"][name]["b"].spec
        assert pad(a) == pad(kernel[:1 + n_in])  # [layers, *in, rank]
        assert pad(b) == pad((kernel[0], None, *kernel[1 + n_in:]))  # [layers, rank, *out]


def _grads(run, state, batch):
    """Gradients of the step's loss w.r.t. the whole params tree, base included."""
    from exgra_jax.train.step import forward_loss, token_count  # noqa: PLC0415

    sc = run.step_config
    return jax.jit(jax.grad(lambda p: forward_loss(p, batch, jax.random.key(0), sc,
                                                   token_count(batch))[0]))(state["params"])


def test_only_adapters_train_and_base_is_held_in_bf16(lora_run):
    run, state = lora_run
    model_leaves = jax.tree.leaves(state["params"]["model"])
    assert {x.dtype for x in model_leaves} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(state["params"]["lora"])} == {jnp.dtype("float32")}
    # Optimizer state: two Adam moments of the adapters and the GNN, plus scalar counts.
    trainable = count(state["params"]["lora"]) + count(state["params"]["alignment"])
    moments = [x for x in jax.tree.leaves(state["opt_state"]) if x.ndim > 0]
    assert sum(x.size for x in moments) == 2 * trainable
    batch = parallel.make_global_batch(random_batch(0), run.mesh)
    base_before = jax.tree.map(np.asarray, state["params"]["model"])
    new, metrics = run.train_step(jax.tree.map(jnp.copy, state), batch)
    assert np.isfinite(metrics["loss"])
    for a, b in zip(jax.tree.leaves(base_before), jax.tree.leaves(new["params"]["model"]),
                    strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))
    # B = 0 at the start, so the first step moves every B (A's gradient is B-weighted: 0).
    before, after = (jax.tree_util.tree_leaves_with_path(s["params"]["lora"])
                     for s in (state, new))
    for (path, a), (_, b) in zip(before, after, strict=True):
        moved = not np.array_equal(np.asarray(a), np.asarray(b))
        assert moved == (path[-1].key == "b"), jax.tree_util.keystr(path)


def test_alignment_loss_alone_reaches_the_adapters(lora_run):
    """With no supervised token the loss is the alignment objective only: its gradient must
    still reach the adapters (through image features and the LLM text branches)."""
    run, state = lora_run
    host = random_batch(1)
    host["labels"][:] = -100
    batch = parallel.make_global_batch(host, run.mesh)
    g = _grads(run, {"params": jax.tree.map(lambda x: x.astype(jnp.float32),
                                            state["params"])}, batch)
    lora_g = g["lora"]["model"]
    # Before any step B is zero, so A's gradient vanishes; B's must not.
    for name in ("q", "k", "v", "o"):
        assert float(jnp.abs(lora_g["llm"]["layers"]["attn"][name]["b"]).max()) > 0, name
    assert float(jnp.abs(lora_g["projector"]["linear_2"]["b"]).max()) > 0
    assert float(jnp.abs(jax.tree.leaves(g["alignment"])[0]).max()) > 0


# ======================================================================== shipped configs
LORA_CONFIGS = ("finetune_vqa_rad_lora_7b", "finetune_slake_lora_7b",
                "finetune_pathvqa_lora_7b", "stage2_lora_7b")


@pytest.mark.parametrize("name", LORA_CONFIGS)
def test_lora_configs_adapt_attention_and_projector_of_the_7b_model(name):
    import importlib.util
    import os
    import re

    from flax import traverse_util

    path = os.path.join(os.path.dirname(__file__), "..", "configs", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"cfg_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    lcfg = LoraConfig.from_config(c)
    assert (lcfg.rank, lcfg.alpha, lcfg.base_dtype) == (16, 32.0, "bfloat16")
    acfg = trainer.alignment_config(c)
    init_fn, _ = trainer.abstract_boxed_params(trainer.model_config(c), acfg, 1)
    boxed = jax.eval_shape(with_init_adapters(init_fn, lcfg), jax.random.key(0))
    abstract = jax.tree.map(lambda x: x.value, boxed, is_leaf=lambda x: hasattr(x, "names"))
    mask = traverse_util.flatten_dict(st.trainable_mask(abstract, c.train.trainable,
                                                        c.train.frozen), sep="/")
    chosen = {p for p, m in mask.items() if m}
    adapters = {p for p in chosen if p.startswith("lora/")}
    expect = {f"lora/model/llm/layers/attn/{n}/{ab}" for n in "qkvo" for ab in "ab"} | {
        f"lora/model/projector/linear_{i}/{ab}" for i in (1, 2) for ab in "ab"}
    assert adapters == expect
    assert chosen - adapters == {p for p in mask if re.match("alignment/", p)}
    assert bool(chosen - adapters) == (name == "stage2_lora_7b")
    q = traverse_util.flatten_dict(abstract, sep="/")["lora/model/llm/layers/attn/q/b"]
    assert q.shape == (32, 16, 32, 128)  # [layers, rank, heads, head_dim]
