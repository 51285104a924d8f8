"""Benchmark: LoRA against full fine-tuning at the demo size (configs/demo.py), on this CPU.

(speed) The jitted train step of configs/demo.py (its model, lengths, batch 16, alignment on
    as the demo runs) on synthetic batches, three sides: ``full_demo`` (the demo as shipped:
    the whole model trains), ``full_ft`` (the fine-tuning recipe: projector + LLM train, CLIP
    frozen) and ``lora`` (rank ``--rank``, alpha 2 x rank, on attention q/k/v/o + projector,
    the base frozen in bfloat16; the GNN trains in every side). Steps alternate between sides
    in every repeat; medians are reported, with each side's trainable parameters and
    optimizer-state bytes.
(finetune) A short VQA fine-tuning run and its LLaVA-Med scores on the demo's VQA test set:
    a starting model (configs/demo.py trained ``--base-steps`` steps on the instruction
    data only, never on the VQA questions) is fine-tuned ``--ft-steps`` steps on the demo's
    VQA training questions with LoRA (and, unless ``--no-full``, with full fine-tuning of
    projector + LLM, for reference), alignment off as in the fine-tuning configs. The starting model is scored
    through the same LoRA run at lr 0 (B = 0: the base itself).

  python tools/benchmarks/lora.py [--parts speed,finetune] [--repeats 5] [--rank 16]
      [--data-dir DIR] [--base-steps 300] [--ft-steps 150] [--no-full]
      [--targets attn|all] [--base-workdir DIR]

Prints a table per part, then one JSON line with the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402
from train_step import REPO, OurStep, demo_config, synthetic_batch  # noqa: E402

METRICS = ("closed_accuracy", "open_recall", "exact_match", "f1", "bleu")


# --targets: attention q/k/v/o + projector (the 7B recipe), or every decoder kernel too.
TARGETS = {"attn": None, "all": (r"^model/llm/layers(_\d+)?/(attn|mlp)/\w+/kernel$",
                                 r"^model/projector/linear_\d/kernel$")}


def lora_side(c, rank: int, also_train=(r"^alignment/",), targets: str = "attn"):
    from exgra_jax.models.lora import ATTENTION_AND_PROJECTOR
    from exgra_jax.train.state import use_lora

    use_lora(c, TARGETS[targets] or ATTENTION_AND_PROJECTOR, rank=rank, alpha=2.0 * rank, base_dtype="bfloat16",
             also_train=also_train)
    return c


def full_ft_side(c, also_train=(r"^alignment/",)):
    c.train.trainable = (r"^model/projector/", r"^model/llm/", *also_train)
    c.train.frozen = (r"^model/vision_tower/",)
    return c


def trainable_and_opt_bytes(step: OurStep) -> tuple[int, int]:
    import jax

    from exgra_jax.train.state import split

    train, _ = split(step.state["params"], step.run.mask)
    opt = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(step.state["opt_state"]))
    return _common.count(train), int(opt)


def part_speed(repeats: int, rank: int) -> dict:
    import jax

    base = demo_config(alignment=True, scan=True)
    mcfg = base.model
    batch = synthetic_batch(base.train.global_batch_size, base.data.max_len,
                            base.data.response_len, base.data.caption_len, mcfg.image_size,
                            (mcfg.image_size // mcfg.patch_size) ** 2, mcfg.image_token_id,
                            mcfg.vocab_size)
    sides = {"full_demo": OurStep(demo_config(alignment=True, scan=True), batch),
             "full_ft": OurStep(full_ft_side(demo_config(alignment=True, scan=True)), batch),
             "lora": OurStep(lora_side(demo_config(alignment=True, scan=True), rank), batch)}
    for s in sides.values():  # compile and warm up
        s()
        s()
    med, _ = _common.interleaved(sides, repeats)
    out = {}
    for name, s in sides.items():
        n_train, opt_bytes = trainable_and_opt_bytes(s)
        out[name] = {"step_s": med[name], "trainable_params": n_train,
                     "all_params": _common.count(s.state["params"]),
                     "opt_state_bytes": opt_bytes,
                     "loss": float(jax.device_get(s.metrics["loss"]))}
    full = out["full_demo"]
    rows = [(name, r["step_s"] * 1e3, full["step_s"] / r["step_s"], r["trainable_params"],
             r["trainable_params"] / full["trainable_params"], r["opt_state_bytes"] / 2**20)
            for name, r in out.items()]
    print(_common.table(("side", "step ms", "speed vs full_demo", "trainable params",
                         "share of full_demo", "opt state MiB"), rows))
    return out


def ensure_data(data_dir: str) -> str:
    if os.path.exists(os.path.join(data_dir, "vqa", "test.json")):
        return data_dir
    subprocess.run([sys.executable, "tools/make_demo_data.py", "--out", data_dir], cwd=REPO,
                   check=True, capture_output=True)
    return data_dir


def quiet_train(config, workdir: str) -> dict:
    from exgra_jax.train.trainer import train_and_evaluate

    with contextlib.redirect_stdout(io.StringIO()):
        return train_and_evaluate(config, workdir)


def part_finetune(data_dir: str, base_steps: int, ft_steps: int, rank: int, lr: float,
                  with_full: bool, targets: str, base_dir: str) -> dict:
    import importlib.util

    from exgra_jax.train.defaults import SELECT_METRIC

    spec = importlib.util.spec_from_file_location("demo_cfg", os.path.join(REPO, "configs",
                                                                          "demo.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    root = tempfile.mkdtemp(prefix="lora_bench_")

    def config(json_name: str | None, steps: int):
        c = mod.get_config(data_dir)
        if json_name:
            c.data.json_paths = (os.path.join(data_dir, json_name),)
        c.train.total_steps = steps
        c.train.checkpoint_every = steps
        c.train.log_every = max(steps // 5, 1)
        c.eval.select_metric = SELECT_METRIC
        return c

    if not base_dir:
        base_dir = os.path.join(root, "base")
        base_cfg = config("instruct.json", base_steps)
        base_cfg.eval.select_metric = ""
        quiet_train(base_cfg, base_dir)

    def finetune(name, side, steps, side_lr):
        c = config(os.path.join("vqa", "train.json"), steps)
        c.alignment.enabled = False
        c.alignment.weight = 0.0
        c.init.source, c.init.workdir = "workdir", base_dir
        c.train.lr, c.train.warmup_frac = side_lr, 0.03
        side(c)
        out = quiet_train(c, os.path.join(root, name))
        return {k: out["val_vqa"][k] for k in METRICS if k in out["val_vqa"]}, out["loss"]

    results = {}
    no_align = ()
    def lora_ft(c):
        return lora_side(c, rank, no_align, targets)

    results["start"], _ = finetune("start", lora_ft, 1, 0.0)
    results["lora"], lora_loss = finetune("lora", lora_ft, ft_steps, lr)
    losses = {"lora": lora_loss}
    if with_full:
        results["full_ft"], losses["full_ft"] = finetune(
            "full_ft", lambda c: full_ft_side(c, no_align), ft_steps, lr / 10)
    rows = [(m, *(r.get(m, float("nan")) for r in results.values())) for m in METRICS]
    print(f"VQA on the demo test set; start: {base_steps} steps on instruction data; "
          f"fine-tuning: {ft_steps} steps on VQA train (LoRA r{rank} on {targets} lr {lr:g}, "
          f"full lr {lr / 10:g})")
    print(_common.table(("metric", *results), rows))
    return {"scores": results, "base_steps": base_steps, "ft_steps": ft_steps, "rank": rank,
            "targets": targets, "lora_lr": lr, "full_lr": lr / 10, "final_loss": losses}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="speed,finetune")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--xla-threads", type=int, default=0)
    ap.add_argument("--data-dir", default="", help="a built demo data set (else built anew)")
    ap.add_argument("--base-steps", type=int, default=300)
    ap.add_argument("--ft-steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=2e-3, help="LoRA lr (full: a tenth of it)")
    ap.add_argument("--no-full", action="store_true", help="(finetune) skip the full run")
    ap.add_argument("--targets", default="attn", choices=sorted(TARGETS))
    ap.add_argument("--base-workdir", default="", help="(finetune) a trained starting model")
    args = ap.parse_args()
    _common.set_xla_threads(args.xla_threads)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    parts = args.parts.split(",")
    out = {}
    if "speed" in parts:
        out["speed"] = part_speed(args.repeats, args.rank)
    if "finetune" in parts:
        data = ensure_data(args.data_dir or tempfile.mkdtemp(prefix="lora_demo_data_"))
        out["finetune"] = part_finetune(data, args.base_steps, args.ft_steps, args.rank,
                                        args.lr, not args.no_full, args.targets,
                                        args.base_workdir)
    print(json.dumps(out, default=float))


if __name__ == "__main__":
    main()
