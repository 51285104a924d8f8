"""tools/convert_checkpoint.py: from-hf builds a workdir at step 0 holding the Hugging Face
weights; to-hf exports it back to a directory transformers loads with the same logits."""

from __future__ import annotations

import os
import subprocess
import sys

import hf_fixtures as F
import numpy as np
import torch
from transformers import LlavaForConditionalGeneration

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_tool(*args):
    # This checkout's package first (not whichever one is installed), then the fixtures.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]),
               XLA_FLAGS="--xla_force_host_platform_device_count=1")
    out = subprocess.run([sys.executable, "tools/convert_checkpoint.py", *args], cwd=ROOT,
                         env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_from_hf_then_to_hf_round_trip(tmp_path):
    src = str(tmp_path / "hf_src")
    model = F.llava(seed=21)
    model.save_pretrained(src)
    workdir, exported = str(tmp_path / "work"), str(tmp_path / "hf_out")
    run_tool("from-hf", "--hf-dir", src, "--out", workdir, "--config",
             "tests/tiny_train_config.py", "--format", "llava-hf")
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "0"))
    run_tool("to-hf", "--workdir", workdir, "--out", exported)
    reloaded = LlavaForConditionalGeneration.from_pretrained(exported).eval()
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 99, (2, 24))
    ids[:, 2:18] = F.IMAGE_TOKEN
    pix = torch.tensor(rng.standard_normal((2, 3, 32, 32)), dtype=torch.float32)
    with torch.no_grad():
        a = model(input_ids=torch.tensor(ids), pixel_values=pix).logits
        b = reloaded(input_ids=torch.tensor(ids), pixel_values=pix).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_to_hf_without_checkpoint_is_a_clear_error(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "tests"))
    out = subprocess.run([sys.executable, "tools/convert_checkpoint.py", "to-hf", "--workdir",
                          str(tmp_path), "--out", str(tmp_path / "x")], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    assert out.returncode != 0 and "no checkpoint found" in out.stderr
