"""A packed batch (several examples per row, images in several segments, a text-only
example) gives the same loss and gradients, alignment loss included, as the same examples
one per row (fp32): the packing is only a layout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_data_fixtures import make_tokenizer
from test_data_packing import _records, _write
from train_fixtures import tiny_config

from exgra_jax.data.pipeline import DataConfig, ExampleProcessor, make_source, make_train_iterator
from exgra_jax.train import trainer
from exgra_jax.train.step import forward_loss, token_count

ROWS, SEQ, IMAGES, SLOTS = 2, 224, 3, 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("packed_eq"))
    tok = make_tokenizer(directory)
    path = _write(directory, _records(12))
    data = DataConfig(json_paths=(path,), image_folder=f"{directory}/images", max_len=SEQ,
                      response_len=16, caption_len=24, image_size=32, num_image_tokens=16,
                      batch_size=ROWS, seed=1, packing=True, images_per_row=IMAGES,
                      examples_per_row=SLOTS)
    iterator = make_train_iterator(data, tok, 0, 1)
    packed = dict(next(iterator), _index=iterator.last_indices)

    c = tiny_config(batch=ROWS * SLOTS)
    c.model.vocab_size = len(tok)
    c.model.image_token_id = tok.convert_tokens_to_ids("<im_patch>")
    c.alignment.k = 2
    c.alignment.graph_scope = "fixed"
    c.alignment.graph_size = ROWS * SLOTS
    c.alignment.dropout = 0.0
    c.alignment.gumbel_scale = 0.0
    run = trainer.build(c, total_steps=2, devices=jax.devices()[:1])
    params = jax.device_get(trainer.init_train_state(run)["params"])
    return tok, data, packed, run.step_config, params


def _one_per_row(tok, data: DataConfig, packed: dict) -> dict:
    """The packed batch's examples, one per row, in slot order; the empty slots as padding
    rows. Built by the unpacked processor from the same records."""
    unpacked = data.replace(packing=False)
    processor = ExampleProcessor(unpacked, tok)
    source = make_source(unpacked)
    rows = [processor.process(source[int(i)]) if i >= 0 else processor.padding_example()
            for i in packed["_index"].reshape(-1)]
    keys = [k for k in rows[0] if not k.startswith("_")]
    return {k: np.stack([r[k] for r in rows]) for k in keys}


def _loss_and_grads(sc, params, batch):
    batch = {k: jnp.asarray(v) for k, v in batch.items() if not k.startswith("_")}

    def loss(p):
        return forward_loss(p, batch, jax.random.key(0), sc, token_count(batch),
                            deterministic=True)

    (value, metrics), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return float(value), jax.device_get(metrics), jax.device_get(grads)


def test_packed_batch_has_what_the_equivalence_needs(setup):
    _, _, packed, _, _ = setup
    per_row = (packed["segment_ids"].max(axis=1))
    assert (per_row >= 2).all(), "every row should hold several examples"
    assert ((packed["image_segment_ids"] > 0).sum(axis=1) >= 2).any(), "images in 2+ segments"
    used = packed["example_mask"] > 0
    assert (used & (packed["has_image"] == 0)).any(), "a text-only example"


def test_packed_equals_one_example_per_row(setup):
    tok, data, packed, sc, params = setup
    reference = _one_per_row(tok, data, packed)
    loss_p, metrics_p, grads_p = _loss_and_grads(sc, params, packed)
    loss_r, metrics_r, grads_r = _loss_and_grads(sc, params, reference)

    assert metrics_p["lm_tokens"] == metrics_r["lm_tokens"] > 0
    np.testing.assert_allclose(metrics_p["align_loss"], metrics_r["align_loss"], rtol=1e-5)
    assert metrics_p["align_loss"] > 0  # the alignment really ran on real nodes
    np.testing.assert_allclose(loss_p, loss_r, rtol=1e-5)
    flat_p = jax.tree_util.tree_leaves_with_path(grads_p)
    # Relative to each leaf's largest entry; leaves whose gradient is zero in exact
    # arithmetic (e.g. key biases) hold rounding noise, judged against the largest leaf.
    floor = 1e-6 * max(float(np.abs(g).max()) for g in jax.tree.leaves(grads_r))
    for (path, g_p), g_r in zip(flat_p, jax.tree.leaves(grads_r), strict=True):
        scale = max(float(np.abs(g_r).max()), floor)
        np.testing.assert_allclose(g_p / scale, g_r / scale, atol=1e-5,
                                   err_msg=jax.tree_util.keystr(path))
    # Gradients reach the vision tower through images spliced in several segments.
    assert np.abs(grads_p["model"]["projector"]["linear_1"]["kernel"]).max() > 0
