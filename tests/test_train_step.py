"""The jitted train step: sharded equals single-device, accumulation equals the big batch,
frozen parameters stay put, non-finite updates are skipped, packed text branches equal
unpacked ones."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_fixtures import random_batch, tiny_config

from exgra_jax.models.llava import LlavaModel
from exgra_jax.parallel import make_global_batch
from exgra_jax.train import trainer
from exgra_jax.train.step import forward_loss, pack_placement, text_branch_vectors, token_count

ONE = jax.devices()[:1]


def run_steps(config, batches, devices=ONE):
    run = trainer.build(config, total_steps=10, devices=devices)
    state = trainer.init_train_state(run)
    losses = []
    for b in batches:
        state, metrics = run.train_step(state, make_global_batch(b, run.mesh))
        losses.append(jax.device_get(metrics))
    return jax.device_get(state), losses


def assert_trees_close(a, b, rtol, atol):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b),
                            strict=True):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow
def test_fsdp_tensor_mesh_matches_single_device():
    batches = [random_batch(s) for s in range(3)]
    one, m1 = run_steps(tiny_config(mesh=(1, 1, 1)), batches, devices=jax.devices()[:1])
    eight, m8 = run_steps(tiny_config(mesh=(1, 4, 2)), batches, devices=None)
    for a, b in zip(m1, m8, strict=True):
        for k in ("loss", "lm_loss", "align_loss", "grad_norm"):
            np.testing.assert_allclose(a[k], b[k], rtol=2e-5, err_msg=k)
    assert m1[0]["loss"] != m1[-1]["loss"]
    # Adam divides by sqrt(v): near-zero gradients amplify reduction-order noise slightly.
    assert_trees_close(one["params"], eight["params"], rtol=1e-4, atol=1e-5)


def test_gradient_accumulation_equals_large_batch():
    big = [random_batch(s, batch=16) for s in range(2)]
    ref, mref = run_steps(tiny_config(batch=16, alignment=False), big)
    acc, macc = run_steps(tiny_config(batch=16, alignment=False, micro_batches=4), big)
    for a, b in zip(mref, macc, strict=True):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
        np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-5)
    assert_trees_close(ref["params"], acc["params"], rtol=1e-5, atol=1e-5)


def test_frozen_params_unchanged_and_without_optimizer_state():
    config = tiny_config()
    run = trainer.build(config, total_steps=10, devices=ONE)
    state = trainer.init_train_state(run)
    before = jax.device_get(state["params"])
    state, _ = run.train_step(state, make_global_batch(random_batch(0), run.mesh))
    after = jax.device_get(state["params"])
    tower_b, tower_a = before["model"]["vision_tower"], after["model"]["vision_tower"]
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(tower_b),
                                                    jax.tree.leaves(tower_a), strict=True))
    proj_b, proj_a = before["model"]["projector"], after["model"]["projector"]
    assert not np.array_equal(proj_b["linear_1"]["kernel"], proj_a["linear_1"]["kernel"])
    # Adam moments exist for trainable parameters only.
    mu = state["opt_state"][1][0].mu
    assert "vision_tower" not in mu["model"] and "projector" in mu["model"]


def test_embedding_rows_mask_trains_only_listed_rows():
    config = tiny_config(alignment=False, trainable_embedding_rows=(101, 102))
    config.train.trainable = (r"^model/projector/", r"^model/llm/embed_tokens$")
    run = trainer.build(config, total_steps=10, devices=ONE)
    state = trainer.init_train_state(run)
    before = np.asarray(jax.device_get(state["params"]["model"]["llm"]["embed_tokens"]))
    batch = random_batch(1)
    batch["input_ids"][:, 1] = 101
    batch["input_ids"][:, 18] = 102
    state, _ = run.train_step(state, make_global_batch(batch, run.mesh))
    after = np.asarray(jax.device_get(state["params"]["model"]["llm"]["embed_tokens"]))
    changed = np.where(np.any(before != after, axis=1))[0]
    assert set(changed.tolist()) == {101, 102}


def test_non_finite_update_is_skipped_and_counted():
    run = trainer.build(tiny_config(alignment=False), total_steps=10, devices=ONE)
    state = trainer.init_train_state(run)
    before = jax.device_get(state["params"])
    batch = random_batch(2)
    batch["pixel_values"][0, 0, 0, 0] = np.nan
    state, metrics = run.train_step(state, make_global_batch(batch, run.mesh))
    assert int(metrics["skipped_updates"]) == 1 and int(state["step"]) == 1
    assert_trees_close(before, jax.device_get(state["params"]), rtol=0, atol=0)
    state, metrics = run.train_step(state, make_global_batch(random_batch(3), run.mesh))
    assert int(metrics["skipped_updates"]) == 1 and np.isfinite(metrics["loss"])


def test_validation_errors_say_what_to_change():
    with pytest.raises(ValueError, match="divisible by the batch shards"):
        trainer.build(tiny_config(batch=6, mesh=(1, 4, 2)), total_steps=1)
    with pytest.raises(ValueError, match="set one axis to -1"):
        trainer.build(tiny_config(mesh=(1, 3, 1)), total_steps=1, devices=jax.devices())
    bad = tiny_config()
    bad.data.max_len = 16
    with pytest.raises(ValueError, match="raise data.max_len"):
        trainer.build(bad, total_steps=1, devices=ONE)
    knn = tiny_config(batch=8, mesh=(1, 4, 2))
    knn.alignment.graph_scope = "device"
    with pytest.raises(ValueError, match="needs more than k=3"):
        trainer.build(knn, total_steps=1)


# ------------------------------------------------------------------ packed text branches
def with_branch_lengths(batch, seed, longest):
    """The batch with answer-only sequences of random lengths up to ``longest`` (response,
    caption); sequence 1 of each is empty (it pools to zeros, packed or not)."""
    rng = np.random.default_rng(seed)
    out = dict(batch)
    for key, top in zip(("response", "caption"), longest, strict=True):
        ids = batch[key + "_ids"]
        mask = np.arange(ids.shape[1])[None] < rng.integers(1, top + 1, (ids.shape[0], 1))
        mask[1] = False
        out[key + "_mask"] = mask.astype(np.int32)
        out[key + "_ids"] = np.where(mask, np.maximum(ids, 3), 0).astype(np.int32)
    return out


def test_pack_placement_is_first_fit_decreasing():
    row, col, fits = pack_placement(jnp.array([5, 3, 0, 4, 2]), rows=2, row_len=7)
    assert bool(fits)
    # 5 -> row 0 at 0, 4 -> row 1 at 0, 3 -> row 1 at 4, 2 -> row 0 at 5, 0 -> row 0 at 7.
    np.testing.assert_array_equal(row, [0, 1, 0, 1, 0])
    np.testing.assert_array_equal(col, [0, 4, 7, 0, 5])
    assert not bool(pack_placement(jnp.array([5, 5, 5]), rows=2, row_len=7)[2])


@pytest.mark.parametrize("groups", [1, 2])
def test_packed_text_branches_equal_each_sequence_alone(groups):
    """Packed vectors and their gradients against every sequence run alone, unpadded."""
    run = trainer.build(tiny_config(), total_steps=1, devices=ONE)
    params = jax.device_get(trainer.init_train_state(run)["params"]["model"])
    sc = dataclasses.replace(run.step_config, num_groups=groups, text_pack_fraction=0.5)
    batch = with_branch_lengths(random_batch(4), seed=groups, longest=(4, 5))
    model = LlavaModel(sc.model)
    w = jax.random.normal(jax.random.key(1), (2, 8, sc.model.hidden_size))

    def score(resp, cap):  # any function of both vectors, to compare gradients
        return jnp.sum(jnp.sin(resp) * w[0]) + jnp.sum(jnp.cos(cap) * w[1])

    def packed(p):
        resp, cap, was_packed = text_branch_vectors(model, p, batch, sc)
        return score(resp, cap), (resp, cap, was_packed)

    def alone(p):
        vecs = []
        for key in ("response", "caption"):
            rows = []
            for ids, mask in zip(batch[key + "_ids"], batch[key + "_mask"], strict=True):
                n = int(mask.sum())
                h = model.apply({"params": p}, ids[None, :n],
                                method=LlavaModel.text_hidden_states) if n else None
                rows.append(jnp.mean(h[0], axis=0) if n else jnp.zeros(sc.model.hidden_size))
            vecs.append(jnp.stack(rows))
        return score(*vecs), tuple(vecs)

    (v, (resp, cap, was_packed)), g = jax.jit(jax.value_and_grad(packed, has_aux=True))(params)
    (v_ref, (resp_ref, cap_ref)), g_ref = jax.jit(jax.value_and_grad(alone, has_aux=True))(
        params)
    assert bool(was_packed)
    np.testing.assert_allclose(resp, resp_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cap, cap_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(v, v_ref, rtol=1e-5)
    # Gradients sum many per-token terms in another order (values up to ~0.1).
    assert_trees_close(g, g_ref, rtol=1e-4, atol=1e-4)


def test_forward_loss_same_packed_padded_and_overflowing():
    """The loss and every gradient match the padded computation, whether a batch packs
    or overflows the packed rows (and so runs padded inside the packed step)."""
    run = trainer.build(tiny_config(), total_steps=1, devices=ONE)
    params = jax.device_get(trainer.init_train_state(run)["params"])
    padded_sc = dataclasses.replace(run.step_config, text_pack_fraction=0.0)
    packed_sc = dataclasses.replace(run.step_config, text_pack_fraction=0.5)
    rng = jax.random.key(3)

    def loss_and_grads(sc, batch):
        fn = jax.value_and_grad(forward_loss, has_aux=True)
        return jax.jit(fn, static_argnums=3)(params, batch, rng, sc, token_count(batch))

    # 7 packed rows of 12 tokens hold the short texts, not the full lengths 8 + 12.
    for longest, packs in (((4, 5), 1.0), ((8, 12), 0.0)):
        batch = with_branch_lengths(random_batch(5), seed=0, longest=longest)
        if not packs:
            batch["response_mask"][2:] = batch["caption_mask"][2:] = 1
        (loss_ref, m_ref), g_ref = loss_and_grads(padded_sc, batch)
        (loss, m), g = loss_and_grads(packed_sc, batch)
        assert float(m["align/text_packed"]) == packs and float(m_ref["align/text_packed"]) == 0
        np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
        np.testing.assert_allclose(m["align_loss"], m_ref["align_loss"], rtol=1e-5)
        assert_trees_close(g, g_ref, rtol=1e-4, atol=1e-6)
