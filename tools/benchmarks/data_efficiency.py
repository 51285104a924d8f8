"""ExGra-Med's data-efficiency ablation at demo scale, on the synthetic demo data set.

For each of {10%, 100%} of the pre-training data x {alignment on, off}:
  1. pre-train configs/demo.py on pretrain.json + instruct.json (data.fraction = f),
  2. fine-tune the result on the VQA training questions (alignment off, same for all),
  3. evaluate VQA on the test questions (LLaVA-Med scoring).
Prints a table of the VQA metrics and, as its last line, one JSON object.

    python tools/benchmarks/data_efficiency.py --out /tmp/data_eff [--pretrain-epochs 4]

Each arm is a real training run; the whole sweep takes a while on a CPU (about 4 x the
demo's time). The figures are whatever the runs give: a synthetic set this small may or
may not show the paper's effect.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def sh(args: list[str]) -> str:
    out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"failed: {' '.join(args)}\n{out.stderr[-4000:]}")
    return out.stdout


def arm(data: str, out: str, fraction: float, align: bool, args) -> dict:
    name = f"f{int(fraction * 100)}_{'align' if align else 'noalign'}"
    pre, fine = os.path.join(out, name, "pretrain"), os.path.join(out, name, "finetune")
    cfg = f"--config=configs/demo.py:{data}"
    tic = time.time()
    pre_steps = max(1, int(args.pretrain_epochs * fraction * args.pretrain_size / 16))
    sh(["launch/train.py", cfg, f"--workdir={pre}",
        f"--config.data.json_paths={(f'{data}/pretrain.json', f'{data}/instruct.json')!r}",
        f"--config.data.fraction={fraction}", f"--config.alignment.enabled={align}",
        f"--config.train.total_steps={pre_steps}", f"--config.train.seed={args.seed}"])
    # Fine-tuning is a new run (own schedule and data) initialised from the pre-trained params.
    sh(["launch/train.py", cfg, f"--workdir={fine}",
        f"--config.data.json_paths={(f'{data}/vqa/train.json',)!r}",
        "--config.alignment.enabled=False",
        "--config.init.source=workdir", f"--config.init.workdir={pre}",
        f"--config.train.total_steps={args.finetune_steps}", f"--config.train.seed={args.seed}"])
    answers = os.path.join(fine, "vqa_answers.jsonl")
    sh(["launch/eval.py", cfg, f"--workdir={fine}", "--task=vqa", f"--out={answers}"])
    with open(answers[: -len(".jsonl")] + ".metrics.json") as f:
        metrics = json.load(f)
    return {"arm": name, "fraction": fraction, "alignment": align, "pretrain_steps": pre_steps,
            "minutes": (time.time() - tic) / 60, **metrics}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--pretrain-epochs", type=float, default=4.0)
    p.add_argument("--finetune-steps", type=int, default=150)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    data = os.path.join(args.out, "data")
    if not os.path.exists(os.path.join(data, "vqa", "test.json")):
        sh(["tools/make_demo_data.py", "--out", data])
    with open(os.path.join(data, "pretrain.json")) as f1, \
            open(os.path.join(data, "instruct.json")) as f2:
        args.pretrain_size = len(json.load(f1)) + len(json.load(f2))
    rows = [arm(data, args.out, frac, align, args) for frac in (0.1, 1.0)
            for align in (True, False)]
    keys = ("closed_accuracy", "open_recall", "open_accuracy", "f1")
    print(f"{'arm':<16}{'pre steps':>10}" + "".join(f"{k:>17}" for k in keys) + f"{'min':>7}")
    for r in rows:
        vals = "".join(f"{r.get(k, float('nan')):>17.2f}" for k in keys)
        print(f"{r['arm']:<16}{r['pretrain_steps']:>10}{vals}{r['minutes']:>7.1f}")
    print(json.dumps({"benchmark": "data_efficiency", "rows": rows}))


if __name__ == "__main__":
    main()
