"""Peak host memory of ``tools/convert_checkpoint.py to-hf`` against the checkpoint's size.

    python tools/benchmarks/convert_memory.py [--preset 1b] [--keep DIR]

A random model of about a billion parameters (a TinyLlama-1.1B-shaped decoder with a small
CLIP tower) is saved as a training checkpoint (params only, fp32) by one child process;
a second child runs ``to-hf`` on it while this process samples the child's resident set
size every 20 ms (psutil). The conversion restores ``params['model']`` onto one CPU device
and writes the safetensors tensor by tensor, so its peak should stay near one copy of the
weights: the goal is peak RSS <= 1.3 x the checkpoint's bytes. Prints a table and, last,
one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PRESETS = {
    # TinyLlama-1.1B's decoder (22 x 2048, MLP 5632, 32 heads / 4 KV heads) + a 4-layer
    # CLIP-B-wide tower: about 1.0B parameters.
    "1b": dict(hidden_size=2048, mlp_size=5632, num_layers=22, num_heads=32, num_kv_heads=4,
               vision_width=768, vision_layers=4, vision_heads=12, vision_mlp=3072,
               image_size=224, patch_size=14),
    # A quick check of the script itself.
    "small": dict(hidden_size=256, mlp_size=688, num_layers=4, num_heads=8, num_kv_heads=2,
                  vision_width=128, vision_layers=2, vision_heads=4, vision_mlp=256,
                  image_size=56, patch_size=14),
}

WRITER = r"""
import json, os, sys
import jax
from exgra_jax.checkpoint import Checkpointer, param_shapes
from exgra_jax.models import config as mc
from exgra_jax.models.llava import init_params
from exgra_jax.workdir import CHECKPOINTS, CONFIG_JSON

import numpy as np
sizes, workdir = json.loads(sys.argv[1]), sys.argv[2]
cfg = mc.llava_med_7b(**sizes)
# Leaf by leaf (one copy of the weights as jax arrays, which orbax saves without copying;
# the values do not matter here).
rng = np.random.default_rng(0)
params = jax.tree.map(lambda a: jax.numpy.asarray(rng.standard_normal(a.shape, np.float32)),
                      jax.eval_shape(lambda: init_params(cfg, jax.random.key(0))))
state = {"params": {"model": params}}
ckpt = Checkpointer(os.path.join(workdir, CHECKPOINTS), async_save=False)
ckpt.save(1, state, None, {"model": cfg.to_dict(), "param_shapes": param_shapes(state["params"])},
          force=True)
ckpt.close()
with open(os.path.join(workdir, CONFIG_JSON), "w") as f:
    json.dump({"tokenizer": ""}, f)
print(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params)))
"""


def peak_rss(cmd: list[str], env: dict) -> tuple[int, float, subprocess.CompletedProcess]:
    """(peak resident bytes of the child, seconds, its result), sampled every 20 ms."""
    import psutil

    start = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    ps, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            peak = max(peak, ps.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.02)
    out, err = proc.communicate()
    return peak, time.time() - start, subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="1b")
    parser.add_argument("--keep", default="", help="work here and keep the files")
    args = parser.parse_args(argv)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    env.pop("XLA_FLAGS", None)  # one CPU device, as to-hf uses
    root = args.keep or tempfile.mkdtemp(prefix="convert_memory_")
    workdir, out = os.path.join(root, "run"), os.path.join(root, "hf")
    os.makedirs(workdir, exist_ok=True)
    written = subprocess.run([sys.executable, "-c", WRITER, json.dumps(PRESETS[args.preset]),
                              workdir], cwd=REPO, env=env, capture_output=True, text=True)
    if written.returncode:
        sys.exit(f"writing the checkpoint failed (exit {written.returncode}):\n"
                 + written.stderr[-3000:])
    param_bytes = int(written.stdout.strip().splitlines()[-1])
    peak, seconds, result = peak_rss(
        [sys.executable, "tools/convert_checkpoint.py", "to-hf", "--workdir", workdir,
         "--out", out], env)
    if result.returncode:
        sys.exit(f"to-hf failed (exit {result.returncode}):\n" + result.stderr[-3000:])
    hf_bytes = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out)
                   if f.endswith(".safetensors"))
    ratio = peak / param_bytes
    gib = 1024**3
    print(f"{'preset':>8} {'params GiB':>11} {'safetensors GiB':>16} {'peak RSS GiB':>13} "
          f"{'peak / params':>14} {'seconds':>8}")
    print(f"{args.preset:>8} {param_bytes / gib:>11.2f} {hf_bytes / gib:>16.2f} "
          f"{peak / gib:>13.2f} {ratio:>14.2f} {seconds:>8.1f}")
    print(json.dumps({"preset": args.preset, "param_bytes": param_bytes,
                      "safetensors_bytes": hf_bytes, "peak_rss_bytes": peak,
                      "peak_over_params": round(ratio, 3), "seconds": round(seconds, 1),
                      "goal_met": ratio <= 1.3}))
    if not args.keep:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
