"""ExGra-Med's data-efficiency ablation at demo scale, with seeds and error bars.

Every arm, for each seed (train.seed = data.seed = the seed, so arms of one seed share
the initialisation and the 10% subset, and differences between arms are paired):
  1. pre-train configs/demo.py on pretrain.json + instruct.json (data.fraction = f),
  2. fine-tune the result on the VQA training questions (alignment off, same for all),
  3. evaluate VQA on the test questions (LLaVA-Med scoring).
Arms: {10%, 100%} x {alignment off, solver "lap", solver "ipfp"} at batch 16 (one graph
of 16), and at 10% the graph size 16 vs 64 with batch 64 (4 graphs of 16 vs one of 64;
as many steps as the batch-16 arm, so 4x the samples).

    nice -n 10 python tools/benchmarks/data_efficiency.py --out /tmp/data_eff --seeds 0,1,2 \
        [--pretrain-epochs 4 --finetune-steps 150 --eval-questions 0]
    python tools/benchmarks/data_efficiency.py --out /tmp/data_eff --summarize

With --warmup-epochs E the demo LLM is first trained on text alone, E epochs over the
synthetic captions (every record's short and extended caption as an answer, no image; one
warm-up per seed, OUT/warmup_sSEED), and every arm's pre-training starts from it
(init.source=workdir): stages 1-2 then begin from a language model that already knows the
captions' language, as the paper's begin from a pre-trained LLaMA, instead of from scratch.

Results are appended to OUT/results.jsonl as each arm ends, and arms already there are
skipped, so a sweep can be stopped and resumed; --summarize prints the tables from it.
Prints mean +- std per arm and metric, the paired differences with a 95% t interval, and
as its last line one JSON object. Subprocesses share a persistent XLA compilation cache,
so only the first run of each configuration compiles.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
from scipy import stats

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
METRICS = ("closed_accuracy", "open_recall", "open_accuracy", "f1")
# (name, fraction, solver or None for alignment off, graph size, global batch)
ARMS = (
    ("f10_off", 0.1, None, 16, 16),
    ("f10_lap", 0.1, "lap", 16, 16),
    ("f10_ipfp", 0.1, "ipfp", 16, 16),
    ("f100_off", 1.0, None, 16, 16),
    ("f100_lap", 1.0, "lap", 16, 16),
    ("f100_ipfp", 1.0, "ipfp", 16, 16),
    ("f10_b64_g16", 0.1, "ipfp", 16, 64),
    ("f10_b64_g64", 0.1, "ipfp", 64, 64),
)
# Run order: each group for every seed before the next group, so a sweep cut short by
# its time budget still has several seeds of the groups it finished.
GROUPS = (("f10_off", "f10_lap", "f10_ipfp"), ("f10_b64_g16", "f10_b64_g64"),
          ("f100_off", "f100_lap", "f100_ipfp"))
# Paired differences (a - b) to report.
CONTRASTS = (
    ("f10_lap", "f10_off"), ("f10_ipfp", "f10_off"), ("f10_ipfp", "f10_lap"),
    ("f100_lap", "f100_off"), ("f100_ipfp", "f100_off"), ("f100_ipfp", "f100_lap"),
    ("f10_ipfp", "f100_off"), ("f10_b64_g64", "f10_b64_g16"),
)


def sh(args: list[str], env: dict) -> str:
    out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                         env=env)
    if out.returncode:
        raise SystemExit(f"failed: {' '.join(args)}\n{out.stderr[-4000:]}")
    return out.stdout


def run_arm(arm, seed: int, data: str, args, env) -> dict:
    name, fraction, solver, graph_size, batch = arm
    pre = os.path.join(args.out, f"{name}_s{seed}", "pretrain")
    fine = os.path.join(args.out, f"{name}_s{seed}", "finetune")
    cfg = f"--config=configs/demo.py:{data}"
    seeds = [f"--config.train.seed={seed}", f"--config.data.seed={seed}"]
    tic = time.time()
    # Same number of steps for either batch size (the batch-16 count).
    pre_steps = max(1, int(args.pretrain_epochs * fraction * args.pretrain_size / 16))
    init = []
    if args.warmup_epochs:
        init = ["--config.init.source=workdir",
                f"--config.init.workdir={warm_up(seed, data, args, env)}"]
    align = [f"--config.alignment.enabled={solver is not None}"]
    if solver is not None:
        align += [f"--config.alignment.solver={solver}", "--config.alignment.graph_scope=fixed",
                  f"--config.alignment.graph_size={graph_size}"]
    sh(["launch/train.py", cfg, f"--workdir={pre}",
        f"--config.data.json_paths={(f'{data}/pretrain.json', f'{data}/instruct.json')!r}",
        f"--config.data.fraction={fraction}", f"--config.train.global_batch_size={batch}",
        f"--config.train.total_steps={pre_steps}", *align, *init, *seeds], env)
    # Fine-tuning is a new run (own schedule and data) initialised from the pre-trained params.
    sh(["launch/train.py", cfg, f"--workdir={fine}",
        f"--config.data.json_paths={(f'{data}/vqa/train.json',)!r}",
        "--config.alignment.enabled=False",
        "--config.init.source=workdir", f"--config.init.workdir={pre}",
        f"--config.train.total_steps={args.finetune_steps}", *seeds], env)
    answers = os.path.join(fine, "vqa_answers.jsonl")
    sh(["launch/eval.py", cfg, f"--workdir={fine}", "--task=vqa", f"--out={answers}",
        f"--config.eval.json_paths={(args.test_json,)!r}"], env)
    with open(answers[: -len(".jsonl")] + ".metrics.json") as f:
        metrics = json.load(f)
    return {"arm": name, "seed": seed, "fraction": fraction, "solver": solver or "off",
            "graph_size": graph_size, "batch": batch, "pretrain_steps": pre_steps,
            "warmup_epochs": args.warmup_epochs,
            "minutes": (time.time() - tic) / 60, **{k: metrics[k] for k in METRICS}}


def caption_texts(data: str) -> tuple[str, int]:
    """Text-only records (no image) whose answers are every pre-training and instruction
    record's short and extended caption, deduplicated, as OUT/data/warmup.json; (its path,
    its record count)."""
    out = os.path.join(data, "warmup.json")
    texts = []
    for name in ("pretrain.json", "instruct.json"):
        with open(os.path.join(data, name)) as f:
            for record in json.load(f):
                for turns in (record["conversations"], record.get("conversations_long") or []):
                    texts += [t["value"] for t in turns if t["from"] == "gpt"]
    records = [{"id": f"caption_{i:05d}", "conversations": [
        {"from": "human", "value": "Describe a medical image."}, {"from": "gpt", "value": t}]}
        for i, t in enumerate(dict.fromkeys(texts))]
    with open(out, "w") as f:
        json.dump(records, f)
    return out, len(records)


def warm_up(seed: int, data: str, args, env) -> str:
    """The seed's text-only warm-up run (trained once, reused by every arm of the seed)."""
    workdir = os.path.join(args.out, f"warmup_s{seed}")
    if os.path.exists(os.path.join(workdir, "final_metrics.json")):
        return workdir
    texts, count = caption_texts(data)
    steps = max(1, int(args.warmup_epochs * count / 16))
    sh(["launch/train.py", f"--config=configs/demo.py:{data}", f"--workdir={workdir}",
        f"--config.data.json_paths={(texts,)!r}", "--config.alignment.enabled=False",
        f"--config.train.total_steps={steps}", f"--config.train.seed={seed}",
        f"--config.data.seed={seed}"], env)
    return workdir


def first_questions(data: str, count: int) -> str:
    """The first `count` test questions as their own file (all of them for 0)."""
    path = os.path.join(data, "vqa", "test.json")
    if not count:
        return path
    with open(path) as f:
        questions = json.load(f)[:count]
    out = os.path.join(data, "vqa", f"test_first{count}.json")
    with open(out, "w") as f:
        json.dump(questions, f)
    return out


def interval(x: np.ndarray) -> tuple[float, float, float]:
    """Mean and the 95% Student-t interval of the mean (NaN bounds for one value)."""
    mean = float(np.mean(x))
    if len(x) < 2:
        return mean, float("nan"), float("nan")
    half = stats.t.ppf(0.975, len(x) - 1) * np.std(x, ddof=1) / np.sqrt(len(x))
    return mean, mean - half, mean + half


def summarize(rows: list[dict]) -> dict:
    by = {}
    for r in rows:
        by.setdefault(r["arm"], {})[r["seed"]] = r
    print(f"{'arm':<13}{'seeds':>6}{'pre steps':>10}" + "".join(f"{k:>18}" for k in METRICS)
          + f"{'min/run':>9}")
    arms = {}
    for name, *_ in ARMS:
        runs = list(by.get(name, {}).values())
        if not runs:
            continue
        vals = {k: np.array([r[k] for r in runs]) for k in METRICS}
        arms[name] = {k: [float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else float("nan")]
                      for k, v in vals.items()}
        cells = "".join(f"{v.mean():>10.2f} +-{arms[name][k][1]:>5.2f}" for k, v in vals.items())
        print(f"{name:<13}{len(runs):>6}{runs[0]['pretrain_steps']:>10}{cells}"
              f"{np.mean([r['minutes'] for r in runs]):>9.1f}")
    print(f"\npaired differences (same seed), mean [95% t interval]\n{'a - b':<26}{'pairs':>6}"
          + "".join(f"{k:>24}" for k in METRICS))
    diffs = {}
    for a, b in CONTRASTS:
        seeds = sorted(set(by.get(a, {})) & set(by.get(b, {})))
        if not seeds:
            continue
        cells, diffs[f"{a} - {b}"] = "", {}
        for k in METRICS:
            mean, lo, hi = interval(np.array([by[a][s][k] - by[b][s][k] for s in seeds]))
            diffs[f"{a} - {b}"][k] = [mean, lo, hi]
            cells += f"{mean:>+8.2f} [{lo:>+6.1f},{hi:>+6.1f}]"
        print(f"{a + ' - ' + b:<26}{len(seeds):>6}{cells}")
    return {"benchmark": "data_efficiency", "arms": arms, "paired_differences": diffs,
            "rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--arms", default=",".join(a[0] for a in ARMS))
    p.add_argument("--pretrain-epochs", type=float, default=4.0)
    p.add_argument("--finetune-steps", type=int, default=150)
    p.add_argument("--eval-questions", type=int, default=0, help="first N test questions; 0: all")
    p.add_argument("--warmup-epochs", type=float, default=0.0,
                   help="text-only warm-up of the LLM on the captions first (0: none)")
    p.add_argument("--summarize", action="store_true", help="only print the tables")
    args = p.parse_args()
    results = os.path.join(args.out, "results.jsonl")
    rows = []
    if os.path.exists(results):
        with open(results) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    if not args.summarize:
        env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=os.path.join(args.out, "xla_cache"),
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
        data = os.path.join(args.out, "data")
        if not os.path.exists(os.path.join(data, "vqa", "test.json")):
            sh(["tools/make_demo_data.py", "--out", data], env)
        with open(os.path.join(data, "pretrain.json")) as f1, \
                open(os.path.join(data, "instruct.json")) as f2:
            args.pretrain_size = len(json.load(f1)) + len(json.load(f2))
        args.test_json = first_questions(data, args.eval_questions)
        done = {(r["arm"], r["seed"]) for r in rows}
        wanted = set(args.arms.split(","))
        arms = {a[0]: a for a in ARMS}
        for group in GROUPS:
            for seed in (int(s) for s in args.seeds.split(",")):
                for name in group:
                    if name not in wanted or (name, seed) in done:
                        continue
                    row = run_arm(arms[name], seed, data, args, env)
                    rows.append(row)
                    with open(results, "a") as f:
                        f.write(json.dumps(row) + "\n")
                    print(f"# {name} seed {seed}: {row['minutes']:.1f} min", flush=True)
    print(json.dumps(summarize(rows)))


if __name__ == "__main__":
    main()
