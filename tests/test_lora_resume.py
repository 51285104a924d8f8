"""LoRA checkpoints: they hold the adapters, the GNN and their optimizer state (not the
frozen base, which is named in the metadata), and a run stopped and resumed ends bit for bit
where an uninterrupted run ends."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from exgra_jax.checkpoint import Checkpointer
from exgra_jax.models.lora import ATTENTION_AND_PROJECTOR
from exgra_jax.train.state import use_lora
from exgra_jax.train.trainer import train_and_evaluate

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    data = str(tmp_path_factory.mktemp("demo"))
    subprocess.run([sys.executable, "tools/make_demo_data.py", "--out", data, "--num-images",
                    "40", "--image-size", "32", "--vocab-size", "300"], cwd=ROOT, check=True,
                   capture_output=True)
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from loop_config import get_config  # noqa: PLC0415

    c = get_config(data)
    c.train.total_steps = 4
    c.train.log_every = 2
    use_lora(c, ATTENTION_AND_PROJECTOR, rank=4, alpha=8.0, base_dtype="bfloat16",
             also_train=(r"^alignment/",))
    return c


def saved(workdir):
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    step = ckpt.latest_step()
    out = ckpt.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
    ckpt.close()
    return step, out["state"], out["meta"]


def test_stop_and_resume_equals_uninterrupted_run(config, tmp_path):
    ref_dir, split_dir = str(tmp_path / "ref"), str(tmp_path / "split")
    train_and_evaluate(config, ref_dir)
    config.train.stop_after_steps = 2
    assert train_and_evaluate(config, split_dir)["step"] == 2
    assert train_and_evaluate(config, split_dir)["step"] == 4

    step, ref, meta = saved(ref_dir)
    assert step == 4
    assert set(ref["params"]) == {"lora", "alignment"}  # no base in the checkpoint
    assert meta["lora_base"]["source"] == "random"
    # The optimizer state tracks the adapters and the GNN only.
    trainable = sum(x.size for x in jax.tree.leaves(ref["params"]))
    assert sum(np.size(x) for x in jax.tree.leaves(ref["opt_state"]) if np.ndim(x)) \
        == 2 * trainable
    _, resumed, _ = saved(split_dir)
    assert int(resumed["step"]) == 4
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ref),
                            jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
