"""LoRA workdirs read like any other: evaluation (any step), ``to-hf`` and
``init.source=workdir`` get the merged model (the base reloaded from where the LoRA run took
it, held as the run held it, plus scale * A B), and the llava-hf export equals PEFT applying
the run's adapters to its base."""

from __future__ import annotations

import copy
import importlib.util
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
from eval_fixtures import shared_demo_data
from peft import PeftModel
from transformers import LlavaForConditionalGeneration

from exgra_jax import paths
from exgra_jax.checkpoint import Checkpointer
from exgra_jax.convert import hf
from exgra_jax.convert import peft as peft_export
from exgra_jax.eval.checkpoint_loading import load_for_eval, read_workdir_config
from exgra_jax.models.lora import ATTENTION_AND_PROJECTOR, LoraConfig, with_adapters
from exgra_jax.train import trainer
from exgra_jax.train.state import use_lora

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RANK, ALPHA = 4, 8.0


def moved(tree, by: float):
    """Every leaf shifted by a different smooth pattern, as training would move it."""
    return jax.tree.map(lambda x: x + by * jnp.sin(jnp.arange(x.size, dtype=x.dtype)
                                                    .reshape(x.shape)), tree)


@pytest.fixture(scope="module")
def lora_workdir(tmp_path_factory):
    """A LoRA workdir as the trainer writes it (its ``checkpointed`` state and ``run_meta``,
    config.json): a random base held in bf16, adapters with dropout and the GNN trained,
    checkpoints at steps 2 and 4 whose adapters (B != 0) and GNN differ."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from loop_config import get_config  # noqa: PLC0415

    c = get_config(shared_demo_data())
    c.train.total_steps = 4
    use_lora(c, ATTENTION_AND_PROJECTOR, rank=RANK, alpha=ALPHA, base_dtype="bfloat16",
             also_train=(r"^alignment/",), dropout=0.1)
    workdir = str(tmp_path_factory.mktemp("lora_run"))
    run = trainer.build(c, 4)
    state = trainer.init_train_state(run)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    for step in (2, 4):
        for part in ("lora", "alignment"):
            state["params"][part] = moved(state["params"][part], 0.01 * step)
        ckpt.save(step, trainer.checkpointed(run, state), None, trainer.run_meta(run),
                  force=True)
    ckpt.close()
    paths.write_text(os.path.join(workdir, "config.json"), c.to_json_best_effort(indent=2))
    return c, workdir, jax.tree.map(np.asarray, state["params"]["model"])


def saved_params(workdir: str, step: int) -> dict:
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    out = ckpt.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    ckpt.close()
    return jax.tree.map(np.asarray, out["state"]["params"])


@pytest.fixture(scope="module")
def reference(lora_workdir):
    """step -> (the base as the run held it, the step's adapters, their merge as the run's
    forward computes it: ``with_adapters``, here with every leaf in float32)."""
    c, workdir, held = lora_workdir
    lcfg = LoraConfig.from_config(c)
    out = {}
    for step in (2, 4):
        lora = saved_params(workdir, step)["lora"]
        merged = with_adapters({"model": held, "lora": lora}, lcfg, jnp.float32)["model"]
        out[step] = (held, lora, jax.tree.map(lambda x: np.asarray(x, np.float32), merged))
    return out


def assert_trees_close(got, want, atol):
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want),
                            strict=True):
        assert np.shape(a) == np.shape(b), jax.tree_util.keystr(path)
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                   rtol=0, atol=atol, err_msg=jax.tree_util.keystr(path))


def test_the_checkpoint_holds_adapters_only_and_the_merge_is_base_plus_scaled_ab(
        lora_workdir, reference):
    _, workdir, _ = lora_workdir
    assert set(saved_params(workdir, 4)) == {"lora", "alignment"}
    base, lora, merged = reference[4]
    # One kernel by hand (NumPy): layer 0's q, [d, heads, head_dim], base rounded to bf16.
    a = lora["model"]["llm"]["layers"]["attn"]["q"]["a"][0]
    b = lora["model"]["llm"]["layers"]["attn"]["q"]["b"][0]
    w = np.asarray(base["llm"]["layers"]["attn"]["q"]["kernel"][0], np.float32)
    want = w + ALPHA / RANK * np.einsum("dr,rhk->dhk", a, b)
    np.testing.assert_allclose(merged["llm"]["layers"]["attn"]["q"]["kernel"][0], want,
                               rtol=0, atol=1e-6)
    assert np.abs(want - w).max() > 1e-3  # the adapters moved


@pytest.mark.parametrize("step", [None, 2])
def test_eval_loads_the_merged_model_of_any_step(lora_workdir, reference, step):
    """launch/eval.py --step N (None: the newest) through load_for_eval, on the 8-device
    mesh of the run's config.json."""
    _, workdir, _ = lora_workdir
    model = load_for_eval(read_workdir_config(workdir), workdir=workdir, step=step)
    assert model.step == (step or 4)
    assert {x.dtype for x in jax.tree.leaves(model.params)} == {jnp.dtype(jnp.float32)}
    assert_trees_close(model.params, reference[model.step][2], atol=1e-6)


def test_a_new_run_initialised_from_a_lora_workdir_starts_from_its_merged_model(
        lora_workdir, reference):
    c, workdir, _ = lora_workdir
    c2 = copy.deepcopy(c)
    c2.lora.enabled = False
    c2.train.trainable, c2.train.frozen = (r"^model/llm/", r"^alignment/"), ()
    c2.init.source, c2.init.workdir = "workdir", workdir
    run = trainer.build(c2, 10, devices=jax.devices()[:2])
    state = trainer.init_train_state(run)
    assert_trees_close(state["params"]["model"], reference[4][2], atol=1e-6)
    assert_trees_close(state["params"]["alignment"], saved_params(workdir, 4)["alignment"],
                       atol=0)


def test_to_hf_exports_what_peft_computes_from_the_base_and_the_adapters(
        lora_workdir, reference, tmp_path):
    c, workdir, _ = lora_workdir
    spec = importlib.util.spec_from_file_location(
        "convert_checkpoint", os.path.join(ROOT, "tools", "convert_checkpoint.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = str(tmp_path / "hf")
    tool.main(["to-hf", "--workdir", workdir, "--out", out])
    mcfg, exported = hf.load_llava(out)
    assert_trees_close(exported, reference[4][2], atol=1e-6)

    # The reference: PEFT applying the run's adapters to the run's (bf16-held) base.
    base, lora, _ = reference[4]
    base_dir, adapter_dir = str(tmp_path / "base"), str(tmp_path / "adapter")
    hf.save_llava(mcfg, jax.tree.map(lambda x: np.asarray(x, np.float32), base), base_dir)
    peft_export.save_adapters(mcfg, lora, LoraConfig.from_config(c), adapter_dir,
                              base_model=base_dir)
    peft_model = PeftModel.from_pretrained(
        LlavaForConditionalGeneration.from_pretrained(base_dir).eval(), adapter_dir).eval()
    merged = LlavaForConditionalGeneration.from_pretrained(out).eval()

    rng = np.random.default_rng(0)
    ids = rng.integers(3, mcfg.image_token_id, (2, 24))
    ids[:, 2:2 + mcfg.num_image_tokens] = mcfg.image_token_id
    am = np.ones_like(ids)
    pix = rng.standard_normal((2, 3, mcfg.image_size, mcfg.image_size)).astype(np.float32)
    with torch.no_grad():
        inputs = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(am),
                      pixel_values=torch.tensor(pix))
        ref, got = peft_model(**inputs).logits.numpy(), merged(**inputs).logits.numpy()
        with peft_model.disable_adapter():
            plain = peft_model(**inputs).logits.numpy()
    assert np.abs(ref - plain).max() > 1e-3  # the adapters change the model
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4)


def test_a_lora_workdir_without_its_config_is_a_clear_error(lora_workdir, tmp_path):
    c, workdir, _ = lora_workdir
    bare = str(tmp_path / "bare")
    shutil.copytree(os.path.join(workdir, "checkpoints"), os.path.join(bare, "checkpoints"))
    with pytest.raises(FileNotFoundError, match="LoRA adapters only.*config.json"):
        load_for_eval(c, workdir=bare)
