"""Fail fast, lose nothing: a wrong path in any config field stops the run before anything
is loaded or compiled, naming the field; an evaluation that fails after training leaves the
final checkpoint; rerunning a finished run reports its real metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from exgra_jax.checkpoint import Checkpointer
from exgra_jax.config_paths import ConfigPathError, check_config_paths, path_fields

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("demo"))
    subprocess.run([sys.executable, "tools/make_demo_data.py", "--out", out, "--num-images",
                    "24", "--image-size", "32", "--vocab-size", "300"], cwd=REPO, check=True,
                   capture_output=True)
    return out


def loop_config(data_dir):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from loop_config import get_config

    c = get_config(data_dir)
    c.eval.json_paths = (os.path.join(data_dir, "vqa", "test.json"),)
    c.eval.image_folder = os.path.join(data_dir, "images")
    c.eval.candidates = os.path.join(data_dir, "vqa", "candidate.json")
    return c


def _set(config, field, value):
    parent, _, leaf = field.rpartition(".")
    node = config
    for part in filter(None, parent.split(".")):
        node = node[part]
    node[leaf] = (value,) if isinstance(node[leaf], tuple) else value


@pytest.mark.parametrize("source", ["random", "llava_hf", "llava_med", "clip_llama", "workdir"])
def test_a_typo_in_any_path_field_names_that_field(data_dir, source, tmp_path):
    config = loop_config(data_dir)
    config.init.source = source
    for field in ("init.hf_dir", "init.clip_dir", "init.llama_dir", "init.workdir"):
        _set(config, field, str(tmp_path))  # exist: only the field under test is wrong
    check_config_paths(config)
    for field, kind in path_fields(config):
        broken = config.copy_and_resolve_references()
        _set(broken, field, os.path.join(data_dir, "no_such_thing"))
        with pytest.raises(ConfigPathError, match=rf"config\.{field}(\[0\])? = .*does not exist"):
            check_config_paths(broken)
        if kind == "dir":  # a file where a folder belongs
            _set(broken, field, os.path.join(data_dir, "instruct.json"))
            with pytest.raises(ConfigPathError, match=rf"config\.{field}.*not a directory"):
                check_config_paths(broken)


def test_the_trainer_checks_paths_before_loading_anything(data_dir, tmp_path, monkeypatch):
    from exgra_jax.train import trainer

    def must_not_run(*args, **kwargs):
        raise AssertionError("built before the paths were checked")

    monkeypatch.setattr(trainer, "build", must_not_run)
    config = loop_config(data_dir)
    config.eval.json_paths = (os.path.join(data_dir, "vqa", "tset.json"),)  # the typo
    with pytest.raises(ConfigPathError, match=r"config\.eval\.json_paths\[0\]"):
        trainer.train_and_evaluate(config, str(tmp_path / "run"))


@pytest.mark.slow
def test_an_evaluation_failure_keeps_the_final_checkpoint_and_a_rerun_reports(
        data_dir, tmp_path, monkeypatch):
    from exgra_jax.train import trainer
    from exgra_jax.train.evaluators import LMLoss

    def broken_eval(*args, **kwargs):
        raise RuntimeError("evaluation broke")

    config = loop_config(data_dir)
    config.train.checkpoint_every = 1000  # only the final step is saved
    workdir = str(tmp_path / "run")
    with monkeypatch.context() as m:
        m.setattr(LMLoss, "evaluate", broken_eval)
        with pytest.raises(RuntimeError, match="evaluation broke"):
            trainer.train_and_evaluate(config, workdir)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    assert ckpt.latest_step() == config.train.total_steps
    ckpt.close()
    # The rerun finds the training done, evaluates, and writes real metrics; a third run
    # reports them instead of an empty step.
    done = trainer.train_and_evaluate(config, workdir)
    assert done["step"] == config.train.total_steps and "eval" in done
    saved = json.load(open(os.path.join(workdir, "final_metrics.json")))
    assert trainer.train_and_evaluate(config, workdir) == saved


class ParamNorms:
    """A plug-in evaluator: the squared norm of the model params it is handed, per step."""

    name = "norms"

    def __init__(self):
        self.seen: dict[int, float] = {}

    def evaluate(self, step, params, context):
        del context
        leaves = jax.tree.leaves(jax.device_get(params["model"]))
        self.seen[step] = float(sum(np.sum(np.square(x, dtype=np.float64)) for x in leaves))
        return {"sq_norm": self.seen[step]}

    def final(self):
        return {"norm_steps": sorted(self.seen)}


@pytest.mark.slow
def test_a_plugged_in_evaluator_sees_each_evaluated_steps_params(data_dir, tmp_path):
    from exgra_jax.models.llava import abstract_params
    from exgra_jax.train import trainer
    from exgra_jax.train.evaluators import LMLoss

    config = loop_config(data_dir)
    config.train.eval_every = 2
    workdir = str(tmp_path / "run")
    norms = ParamNorms()
    result = trainer.train_and_evaluate(config, workdir, evaluators=[norms])
    # Called at steps 2, 4, 6 after the configured LM loss, with the params that step
    # saved: the reference is each checkpoint read back from disk.
    assert sorted(norms.seen) == [2, 4, 6] and result["norm_steps"] == [2, 4, 6]
    assert "lm_loss" in result["eval"] and result["norms"]["sq_norm"] == norms.seen[6]
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    abstract = {"model": abstract_params(trainer.model_config(config))}  # host numpy
    for step, value in norms.seen.items():
        saved = ckpt.restore_params(step, abstract)["model"]
        expected = sum(np.sum(np.square(x, dtype=np.float64)) for x in jax.tree.leaves(saved))
        assert value == pytest.approx(expected, rel=1e-12)
    ckpt.close()
    assert len({round(v, 6) for v in norms.seen.values()}) == 3  # training moved the params
    with pytest.raises(ValueError, match="unique"):
        trainer.train_and_evaluate(config, str(tmp_path / "again"),
                                   evaluators=[LMLoss(iter, 0)])  # a second "eval"

