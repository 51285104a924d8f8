"""End-to-end trainer runs: SIGKILL + resume equals an uninterrupted run bit for bit,
SIGTERM saves the current step, and two processes under jax.distributed train together."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from exgra_jax.checkpoint import Checkpointer

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("demo"))
    subprocess.run([sys.executable, "tools/make_demo_data.py", "--out", out, "--num-images", "40",
                    "--image-size", "32", "--vocab-size", "300"], cwd=ROOT, check=True,
                   capture_output=True)
    return out


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
    # The runs compile the same programs; a shared persistent cache skips recompiling.
    global CACHE_DIR
    CACHE_DIR = str(tmp_path_factory.mktemp("jax_cache"))


CACHE_DIR = ""


def _env(devices=1, **extra):
    env = dict(os.environ)
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=CACHE_DIR,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", **extra)
    return env


def train_cmd(data_dir, workdir, *overrides):
    return [sys.executable, "launch/train.py", f"--config=tests/loop_config.py:{data_dir}",
            f"--workdir={workdir}", *overrides]


def final_params(workdir):
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    step = ckpt.latest_step()
    import orbax.checkpoint as ocp

    state = ckpt.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    ckpt.close()
    return step, state["state"]


def wait_for_checkpoint(workdir, step, proc, timeout=600):
    path = os.path.join(workdir, "checkpoints", str(step))
    end = time.time() + timeout
    while time.time() < end:
        # A finalized orbax step directory has no temporary suffix and holds its items.
        if os.path.isdir(path) and os.path.isdir(os.path.join(path, "state")):
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited ({proc.returncode}) before step {step}:\n"
                                 + proc.stdout.read())
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint {step} after {timeout}s")


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """An uninterrupted run's final step and state."""
    ref_dir = str(tmp_path_factory.mktemp("ref"))
    subprocess.run(train_cmd(data_dir, ref_dir), cwd=ROOT, env=_env(), check=True,
                   capture_output=True, text=True)
    return final_params(ref_dir)


def assert_same_state(reference, workdir):
    import jax

    step_a, ref = reference
    step_b, resumed = final_params(workdir)
    assert step_a == step_b == 6
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ref),
                            jax.tree.leaves(resumed), strict=True):
        assert a.dtype == b.dtype, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


def test_sigkill_then_resume_is_bit_exact(data_dir, reference, tmp_path):
    killed_dir = str(tmp_path / "killed")
    proc = subprocess.Popen(train_cmd(data_dir, killed_dir), cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_checkpoint(killed_dir, 2, proc)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.kill()
    proc.wait()
    killed_at, _ = final_params(killed_dir)
    assert killed_at < 6
    out = subprocess.run(train_cmd(data_dir, killed_dir), cwd=ROOT, env=_env(), check=True,
                         capture_output=True, text=True)
    assert f"resumed from step {killed_at}" in out.stderr + out.stdout
    assert_same_state(reference, killed_dir)


def test_sigint_saves_the_current_step_and_resumes_bit_exact(data_dir, reference, tmp_path):
    """Ctrl-C while the first step compiles: that step is saved, the run exits 0 with one
    line saying so, and resuming ends where an uninterrupted run does."""
    workdir = str(tmp_path / "int")
    proc = subprocess.Popen(train_cmd(data_dir, workdir, "--config.train.checkpoint_every=1000"),
                            cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    log = []
    for line in proc.stdout:
        log.append(line)
        if line.startswith("compiling the train step"):
            break
    else:
        raise AssertionError("".join(log))
    proc.send_signal(signal.SIGINT)
    rest = proc.stdout.read()
    assert proc.wait(timeout=300) == 0, rest
    assert "Traceback" not in rest, rest
    step, _ = final_params(workdir)
    assert 1 <= step < 6, rest
    assert f"checkpoint of step {step} saved" in rest
    subprocess.run(train_cmd(data_dir, workdir, "--config.train.checkpoint_every=1000"),
                   cwd=ROOT, env=_env(), check=True, capture_output=True, text=True)
    assert_same_state(reference, workdir)


def test_sigterm_saves_the_current_step(data_dir, tmp_path):
    workdir = str(tmp_path / "term")
    proc = subprocess.Popen(
        train_cmd(data_dir, workdir, "--config.train.total_steps=1000",
                  "--config.train.checkpoint_every=1000"),
        cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = []
    for line in proc.stdout:
        log.append(line)
        if line.startswith("[3/1000]"):
            break
    else:
        raise AssertionError("".join(log))
    proc.send_signal(signal.SIGTERM)
    rest = proc.stdout.read()
    assert proc.wait(timeout=300) == 0, rest
    step, _ = final_params(workdir)
    assert step >= 3 and f"checkpoint of step {step} saved" in rest


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_and_resume(data_dir, tmp_path):
    workdir = str(tmp_path / "multi")

    def launch(total):
        port = _free_port()
        procs = [
            subprocess.Popen(
                train_cmd(data_dir, workdir, f"--config.train.total_steps={total}",
                          f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                          "--config.distributed.num_processes=2",
                          f"--config.distributed.process_id={i}"),
                cwd=ROOT, env=_env(2, JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo"),
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for i in range(2)
        ]
        outs = [p.communicate(timeout=600)[0] for p in procs]
        for p, o in zip(procs, outs, strict=True):
            assert p.returncode == 0, o
        return outs

    first = launch(4)
    assert "[4/4]" in first[0]
    second = launch(6)
    assert "resumed from step 4" in second[0]
    assert "[6/6]" in second[0]
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    assert ckpt.all_steps()[-1] == 6
    ckpt.close()
