"""Best-step selection while fine-tuning: the select-metric expression, the in-loop
validation VQA pass, the best params in WORKDIR/best across a restart, and loading them
with ``--step best`` (launch/eval.py, tools/convert_checkpoint.py to-hf)."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import socket
import struct
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from best_step_config import SELECT, finetune_config
from eval_fixtures import REPO, random_params, shared_demo_data, subprocess_env

from exgra_jax import paths
from exgra_jax.checkpoint import Checkpointer
from exgra_jax.eval import metrics
from exgra_jax.eval.checkpoint_loading import load_for_eval, parse_step
from exgra_jax.eval.vqa import run_vqa
from exgra_jax.train import selection, trainer
from exgra_jax.train import state as st

# Scores forced per step (open_recall = closed_accuracy = the value, so the select metric
# is the value too); step 2 keeps its real score. 4 beats it, then after a restart 6 is
# worse and 8 ties: the best stays step 4.
FORCED = {4: 100.0, 6: 50.0, 8: 100.0}


# ------------------------------------------------------------------------------- set-up
def write_validation_set(data_dir: str, path: str, count: int = 6) -> str:
    """The first ``count`` test questions of the demo data, open and closed ones both
    (6: the last batch of 8 is padded, as real validation sets are)."""
    records = metrics.read_ground_truth(os.path.join(data_dir, "vqa", "test.json"))[:count]
    assert {r["answer_type"].upper() for r in records} == {"OPEN", "CLOSED"}
    with open(path, "w") as f:
        json.dump(records, f)
    return path


def start_from_random_weights(config, workdir: str) -> None:
    """Step 0 as ``convert_checkpoint.py from-hf`` leaves it (weights drawn with numpy:
    compiling the Flax init would double the test's time)."""
    run = trainer.build(config, config.train.total_steps)
    params = {"model": random_params(run.model)}
    state = jax.jit(lambda p: st.init_state(p, run.mask, run.optimizer),
                    out_shardings=run.state_sharding)(params)
    ckpt = Checkpointer(paths.join(workdir, "checkpoints"), async_save=False)
    ckpt.save(0, state, None, trainer.run_meta(run), force=True)
    ckpt.close()
    paths.write_text(paths.join(workdir, "config.json"), config.to_json_best_effort(indent=2))


@contextlib.contextmanager
def forced_scores():
    """``metrics.score`` with FORCED values for the loop's evaluations of those steps (the
    step is read from the answers' model_id, 'WORKDIR@STEP')."""
    real = metrics.score

    def score(gt, preds, candidates=None):
        out = real(gt, preds, candidates)
        model_id = preds[0].get("model_id", "") if preds else ""
        step = int(model_id.rsplit("@", 1)[1]) if "@" in model_id else None
        if step in FORCED:
            out.update(open_recall=FORCED[step], closed_accuracy=FORCED[step])
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(metrics, "score", score)
        yield


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("best_step")
    data_dir = shared_demo_data()
    return dict(root=root, data=data_dir,
                val=write_validation_set(data_dir, str(root / "val.json")))


@pytest.fixture(scope="module")
def trained(data):
    """A run of 8 steps stopped after 4: validation VQA at steps 2 and 4."""
    config = finetune_config(data["data"], data["val"], stop_after_steps=4)
    workdir = str(data["root"] / "run")
    start_from_random_weights(config, workdir)
    with forced_scores():
        result = trainer.train_and_evaluate(config, workdir)
    return dict(config=config, workdir=workdir, result=result)


def tb_scalars(workdir: str, tag: str) -> dict[int, float]:
    """Scalars of ``tag`` in the TensorBoard event files (TFRecord-framed Event protos)."""
    from tensorboardX.proto import event_pb2  # noqa: PLC0415

    out = {}
    tb = os.path.join(workdir, "tb")
    for name in sorted(os.listdir(tb)):
        with open(os.path.join(tb, name), "rb") as f:
            raw = f.read()
        pos = 0
        while pos < len(raw):
            (length,) = struct.unpack("<Q", raw[pos:pos + 8])
            event = event_pb2.Event.FromString(raw[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for v in event.summary.value:
                if v.tag == tag:
                    out[event.step] = v.simple_value
    return out


def checkpoint_params(directory: str, step: int) -> dict:
    """The params saved at ``step``, onto one device (whatever topology saved them)."""
    ckpt = Checkpointer(directory, async_save=False)
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
                            ckpt.manager.item_metadata(step)["state"])
    state = ckpt.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))["state"]
    ckpt.close()
    return state["params"]


def assert_trees_equal(a, b):
    flat_a = jax.tree_util.tree_leaves_with_path(a)
    flat_b = jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (path, x), (_, y) in zip(flat_a, flat_b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y),
                                      err_msg=jax.tree_util.keystr(path))


def best_record(workdir: str) -> dict:
    with open(os.path.join(workdir, "best", "best.json")) as f:
        return json.load(f)


def first_argmax(values: dict[int, float]) -> int:
    return max(values, key=lambda s: (values[s], -s))  # a tie: the earliest step


# ------------------------------------------------------------------------ the expression
def test_select_metric_expressions():
    sel = selection.parse_select_metric(" mean( open_recall , closed_accuracy ) ")
    assert sel.keys == ("open_recall", "closed_accuracy")
    assert sel({"open_recall": 20.0, "closed_accuracy": 50.0, "f1": 99.0}) == 35.0
    assert selection.parse_select_metric("bleu")({"bleu": 7.5}) == 7.5
    for bad, message in [("max(f1,bleu)", "not 'KEY'"), ("mean(open_recall,foo)", "foo"),
                         ("mean()", "not 'KEY'"), ("num_open", "unknown metric"),
                         ("mean(f1,f1)", "repeats"), ("f1;bleu", "not 'KEY'")]:
        with pytest.raises(ValueError, match=message):
            selection.parse_select_metric(bad)


def _forbid_build(monkeypatch):
    def build(*args, **kwargs):
        raise AssertionError("the run was built (and would compile) before the error")

    monkeypatch.setattr(trainer, "build", build)


def test_bad_settings_fail_before_anything_compiles(data, tmp_path, monkeypatch):
    _forbid_build(monkeypatch)
    config = finetune_config(data["data"], data["val"])
    config.eval.select_metric = "mean(open_recall,closed_acc)"
    with pytest.raises(ValueError, match="closed_acc"):
        trainer.train_and_evaluate(config, str(tmp_path / "a"))
    # A metric the validation set cannot produce: no open questions.
    closed = [r for r in metrics.read_ground_truth(data["val"])
              if r["answer_type"].upper() == "CLOSED"]
    only_closed = tmp_path / "closed.json"
    only_closed.write_text(json.dumps(closed))
    config = finetune_config(data["data"], str(only_closed))
    with pytest.raises(ValueError, match=r"open_recall.*cannot score"):
        trainer.train_and_evaluate(config, str(tmp_path / "b"))
    config.eval.json_paths = (str(tmp_path / "missing.json"),)
    with pytest.raises(FileNotFoundError):
        trainer.train_and_evaluate(config, str(tmp_path / "c"))


# ------------------------------------------------------------------------ a run
def test_best_step_is_the_argmax_of_the_logged_select_metric(trained):
    workdir, config = trained["workdir"], trained["config"]
    logged = tb_scalars(workdir, "val_vqa/select")
    assert sorted(logged) == [2, 4]
    best = best_record(workdir)
    assert best["step"] == first_argmax(logged) == 4 and best["select_metric"] == SELECT
    assert best["value"] == pytest.approx(logged[4]) == FORCED[4]
    assert trained["result"]["best"] == best
    # The unforced evaluation logged LLaVA-Med's scoring of the answers it wrote.
    gt = metrics.read_ground_truth(config.eval.json_paths[0])
    answers = metrics.read_predictions(selection.answers_path(workdir, 2))
    assert [a["question_id"] for a in answers] == [r["id"] for r in gt]
    expected = metrics.score(gt, answers, metrics.read_candidates(config.eval.candidates))
    assert logged[2] == pytest.approx((expected["open_recall"]
                                       + expected["closed_accuracy"]) / 2, abs=1e-4)
    assert tb_scalars(workdir, "val_vqa/open_accuracy")[2] == pytest.approx(
        expected["open_accuracy"], abs=1e-4)
    assert set(best["metrics"]) == {k for k, v in expected.items() if v is not None}


def test_best_params_are_the_params_of_the_best_step(trained):
    workdir = trained["workdir"]
    best_ckpt = Checkpointer(os.path.join(workdir, "best"), async_save=False)
    assert best_ckpt.all_steps() == [4]  # only the best is kept
    best_ckpt.close()
    stored = checkpoint_params(os.path.join(workdir, "best"), 4)
    assert_trees_equal(stored, checkpoint_params(os.path.join(workdir, "checkpoints"), 4))
    with pytest.raises(AssertionError):  # and training did change them
        assert_trees_equal(stored, checkpoint_params(os.path.join(workdir, "checkpoints"), 2))


def test_step_best_loads_the_best_params(trained, tmp_path):
    config, workdir = trained["config"], trained["workdir"]
    assert parse_step("best") == "best" and parse_step("12") == 12 and parse_step(None) is None
    with pytest.raises(ValueError, match="'best'"):
        parse_step("latest")
    model = load_for_eval(config, workdir=workdir, step="best")
    assert model.step == 4
    reference = checkpoint_params(os.path.join(workdir, "checkpoints"), 4)
    assert_trees_equal(jax.device_get(model.params), reference["model"])
    # Evaluated offline, the best params answer as the loop's evaluation of step 4 did.
    out = str(tmp_path / "best.jsonl")
    run_vqa(config, model, out, log=lambda s: None)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("answer_id", "model_id")}
                          for r in rows]
    in_loop = metrics.read_predictions(selection.answers_path(workdir, 4))
    assert strip(metrics.read_predictions(out)) == strip(in_loop)

    # tools/convert_checkpoint.py to-hf --step best exports the same weights.
    spec = importlib.util.spec_from_file_location(
        "convert_checkpoint", os.path.join(REPO, "tools", "convert_checkpoint.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    hf_dir = str(tmp_path / "hf")
    tool.main(["to-hf", "--workdir", workdir, "--step", "best", "--out", hf_dir])
    from exgra_jax.convert.hf import load_llava  # noqa: PLC0415

    _, exported = load_llava(hf_dir, scan_layers=model.config.scan_layers)
    assert_trees_equal(exported, reference["model"])
    with pytest.raises(SystemExit):  # argparse: not a step
        tool.main(["to-hf", "--workdir", workdir, "--step", "newest", "--out", hf_dir])


def test_step_best_without_a_selection_is_a_clear_error(data, tmp_path):
    config = finetune_config(data["data"], data["val"])
    with pytest.raises(FileNotFoundError, match="select_metric"):
        load_for_eval(config, workdir=str(tmp_path), step="best")


def test_changing_the_select_metric_on_resume_is_refused(data, trained, monkeypatch):
    _forbid_build(monkeypatch)
    config = finetune_config(data["data"], data["val"])
    config.eval.select_metric = "closed_accuracy"
    with pytest.raises(ValueError, match="holds the best step by"):
        trainer.train_and_evaluate(config, trained["workdir"])


def test_a_restart_keeps_the_earlier_best(data, trained, tmp_path):
    """Resumed at step 4: step 6 scores worse and step 8 ties; step 4 stays the best."""
    workdir = str(tmp_path / "resumed")
    shutil.copytree(trained["workdir"], workdir)
    with forced_scores():
        result = trainer.train_and_evaluate(trained["config"], workdir)
    assert result["step"] == 8
    logged = tb_scalars(workdir, "val_vqa/select")
    assert sorted(logged) == [2, 4, 6, 8]
    assert (logged[6], logged[8]) == (FORCED[6], FORCED[8])
    best = best_record(workdir)
    assert (best["step"], best["value"]) == (first_argmax(logged), FORCED[4]) == (4, 100.0)
    assert_trees_equal(checkpoint_params(os.path.join(workdir, "best"), 4),
                       checkpoint_params(os.path.join(workdir, "checkpoints"), 4))


# ------------------------------------------------------------------------ several processes
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_processes_select_and_launch_eval_loads_the_best(data, tmp_path):
    """Two processes (2 CPU devices each) under jax.distributed: both generate on the
    training mesh (4 devices, parameters sharded as they train), process 0 alone writes and
    scores the answers and best.json, the best params are saved collectively; then
    `launch/eval.py --step best` evaluates them."""
    config = finetune_config(data["data"], data["val"], total_steps=4)
    workdir = str(tmp_path / "multi")
    start_from_random_weights(config, workdir)
    single = str(tmp_path / "single")
    start_from_random_weights(config, single)
    port = _free_port()
    env = dict(subprocess_env(), XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
    env["PYTHONPATH"] = os.path.join(REPO, "tests") + os.pathsep + env["PYTHONPATH"]
    cmd = [sys.executable, "launch/train.py",
           f"--config=tests/best_step_config.py:{data['data']},{data['val']}",
           "--config.train.total_steps=4"]
    # Each process has its own scratch directory; only the checkpoints are shared (orbax
    # writes every process's shards there, e.g. on gs://). Evaluation files are process 0's.
    for i in range(2):
        os.makedirs(tmp_path / f"scratch{i}")
    procs = [subprocess.Popen(
        [*cmd, f"--workdir={workdir}",
         f"--config.distributed.coordinator_address=127.0.0.1:{port}",
         "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"],
        cwd=REPO, env=dict(env, TMPDIR=str(tmp_path / f"scratch{i}")), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
        for i in range(2)]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-4000:]
    # The same run as one process over the same 4 devices: the same answers and choice.
    one = subprocess.run([*cmd, f"--workdir={single}"], cwd=REPO, capture_output=True,
                         text=True, timeout=900,
                         env=dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=4"))
    assert one.returncode == 0, one.stderr[-4000:]
    assert tb_scalars(single, "val_vqa/select") == tb_scalars(workdir, "val_vqa/select")
    assert best_record(single)["step"] == best_record(workdir)["step"]
    for step in (2, 4):  # the same answers (model names differ: they name the workdir)
        answers = [[(a["question_id"], a["prompt"], a["text"]) for a in
                    metrics.read_predictions(selection.answers_path(w, step))]
                   for w in (single, workdir)]
        assert answers[0] == answers[1]

    logged = tb_scalars(workdir, "val_vqa/select")
    assert sorted(logged) == [2, 4]
    best = best_record(workdir)
    assert best["step"] == first_argmax(logged)
    gt = metrics.read_ground_truth(data["val"])
    cands = metrics.read_candidates(config.eval.candidates)
    for step in (2, 4):  # every question answered once
        answers = metrics.read_predictions(selection.answers_path(workdir, step))
        assert [a["question_id"] for a in answers] == [r["id"] for r in gt]
        expected = metrics.score(gt, answers, cands)
        assert logged[step] == pytest.approx(
            (expected["open_recall"] + expected["closed_accuracy"]) / 2, abs=1e-4)
    assert sorted(os.listdir(os.path.join(workdir, "val_vqa"))) == [
        "step_2.jsonl", "step_2.metrics.json", "step_4.jsonl", "step_4.metrics.json"]
    assert_trees_equal(checkpoint_params(os.path.join(workdir, "best"), best["step"]),
                       checkpoint_params(os.path.join(workdir, "checkpoints"), best["step"]))

    out = subprocess.run([sys.executable, "launch/eval.py", f"--workdir={workdir}",
                          "--task=vqa", "--step=best"], cwd=REPO, env=subprocess_env(),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    printed = json.loads(out.stdout.strip().splitlines()[-1])
    assert printed["answers"] == os.path.join(workdir, "eval",
                                              f"vqa_best_step{best['step']}.jsonl")
    assert {k: printed[k] for k in best["metrics"]} == pytest.approx(best["metrics"])
