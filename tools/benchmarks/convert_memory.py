"""Peak host memory of ``tools/convert_checkpoint.py`` against the sizes it converts.

    python tools/benchmarks/convert_memory.py [--preset 1b] [--directions to-hf from-hf]
                                              [--keep DIR]

A random model (``1b``: a TinyLlama-1.1B-shaped decoder with a small CLIP tower) is saved
as a training checkpoint (params only, fp32) by one child process; a second child runs
``to-hf`` on it while this process samples the child's resident set size every 20 ms
(psutil). ``to-hf`` restores ``params['model']`` one leaf at a time and writes each leaf's
tensors as it goes, so its peak should stay well under one copy of the weights. ``from-hf``
then builds a training run of the same model from that export (a training config written
here, with the default recipe: alignment head, AdamW) and saves its step 0: the fp32 weights
and their Adam moments (zeros, which compress to almost nothing on disk), a train state of
about 3x the parameter bytes that it must hold at once. The goal for both is peak RSS <=
1.3 x the checkpoint they read or write, counted in memory: the parameters for ``to-hf``,
the whole train state for ``from-hf`` (``300m`` measures from-hf where ``1b``'s train state,
about 13 GiB, leaves too little room on the machine). Prints a table and, last, one JSON
line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
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
    # The same decoder at half the width (about 0.3B parameters).
    "300m": dict(hidden_size=1024, mlp_size=2816, num_layers=22, num_heads=16, num_kv_heads=4,
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

TRAIN_CONFIG = """
import json
from exgra_jax.train.defaults import base_config


def get_config():
    c = base_config("llava_med_7b", **json.loads({sizes!r}))
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
    c.train.total_steps = 1
    return c
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


def _bytes_under(directory: str, suffix: str = "") -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(directory)
               for f in files if f.endswith(suffix))


def _measured(cmd: list[str], env: dict, what: str):
    peak, seconds, result = peak_rss(cmd, env)
    if result.returncode:
        sys.exit(f"{what} failed (exit {result.returncode}):\n" + result.stderr[-3000:])
    return peak, seconds, result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="1b")
    parser.add_argument("--directions", nargs="+", choices=("to-hf", "from-hf"),
                        default=["to-hf", "from-hf"], help="from-hf runs on to-hf's export")
    parser.add_argument("--keep", default="", help="work here and keep the files")
    args = parser.parse_args(argv)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    env.pop("XLA_FLAGS", None)  # one CPU device, as conversion on a host uses
    root = args.keep or tempfile.mkdtemp(prefix="convert_memory_")
    workdir, out = os.path.join(root, "run"), os.path.join(root, "hf")
    os.makedirs(workdir, exist_ok=True)
    written = subprocess.run([sys.executable, "-c", WRITER, json.dumps(PRESETS[args.preset]),
                              workdir], cwd=REPO, env=env, capture_output=True, text=True)
    if written.returncode:
        sys.exit(f"writing the checkpoint failed (exit {written.returncode}):\n"
                 + written.stderr[-3000:])
    param_bytes = int(written.stdout.strip().splitlines()[-1])
    rows = []
    # from-hf reads to-hf's export, so to-hf always runs; it is reported when asked for.
    peak, seconds, _ = _measured([sys.executable, "tools/convert_checkpoint.py", "to-hf",
                               "--workdir", workdir, "--out", out], env, "to-hf")
    if "to-hf" in args.directions:
        rows.append({"direction": "to-hf", "output": "safetensors",
                     "output_bytes": _bytes_under(out, ".safetensors"),
                     "checkpoint_bytes": param_bytes, "peak_rss_bytes": peak,
                     "seconds": seconds})
    if "from-hf" in args.directions:
        config = os.path.join(root, "train_config.py")
        with open(config, "w") as f:
            f.write(TRAIN_CONFIG.format(sizes=json.dumps(PRESETS[args.preset])))
        run = os.path.join(root, "from_hf")
        peak, seconds, result = _measured(
            [sys.executable, "tools/convert_checkpoint.py", "from-hf", "--hf-dir", out,
             "--out", run, "--config", config], env, "from-hf")
        state_bytes = int(re.search(r"train state of (\d+) bytes", result.stdout).group(1))
        rows.append({"direction": "from-hf", "output": "checkpoint (params + Adam)",
                     "output_bytes": _bytes_under(os.path.join(run, "checkpoints")),
                     "checkpoint_bytes": state_bytes, "peak_rss_bytes": peak,
                     "seconds": seconds})
    gib = 1024**3
    print(f"preset {args.preset}: {param_bytes / gib:.2f} GiB of fp32 parameters")
    print(f"{'direction':>9} {'writes':>27} {'on disk GiB':>12} {'checkpoint GiB':>15} "
          f"{'peak RSS GiB':>13} {'peak / ckpt':>12} {'seconds':>8}")
    for r in rows:
        r["peak_over_checkpoint"] = round(r["peak_rss_bytes"] / r["checkpoint_bytes"], 3)
        r["seconds"] = round(r["seconds"], 1)
        print(f"{r['direction']:>9} {r['output']:>27} {r['output_bytes'] / gib:>12.2f} "
              f"{r['checkpoint_bytes'] / gib:>15.2f} {r['peak_rss_bytes'] / gib:>13.2f} "
              f"{r['peak_over_checkpoint']:>12.2f} {r['seconds']:>8.1f}")
    print(json.dumps({"preset": args.preset, "param_bytes": param_bytes, "rows": rows,
                      "goal_met": all(r["peak_over_checkpoint"] <= 1.3 for r in rows)}))
    if not args.keep:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
