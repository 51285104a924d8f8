"""Benchmark: the jitted ExGra-Med train step on this CPU.

(a) exgra_jax vs transformers PyTorch eager, alignment off. Our side is the real trainer
    (``exgra_jax.train.trainer.build`` + ``init_train_state``, weights from a llava-hf
    directory via ``init.source='llava_hf'``); the peer is
    ``LlavaForConditionalGeneration`` loaded from that same directory +
    ``torch.optim.AdamW`` (loss.backward, clip_grad_norm_(1.0), step). Both train the
    projector + LLM with the CLIP tower frozen, constant lr 1e-3, AdamW (0.9, 0.999, 1e-8,
    weight decay 0). Model: ``--a-model demo`` (configs/demo.py's model and lengths, batch
    16: 160 tokens, 16 image tokens) and/or ``m100`` (the ~145M model of forward.py,
    batch 4 x 512). The losses of the first steps are compared before timing, so the two
    sides provably run the same optimisation.
(b) exgra_jax alone at configs/demo.py (model, lengths, batch 16, the whole model trainable
    as the demo does) on real batches of the demo data (``tools/make_demo_data.py``, built
    into a temporary directory unless ``--b-data-dir`` names one; ``--b-data synthetic``
    uses random lengths instead): alignment on (graph_scope 'global', k=5) against off, one
    row per ``--b-branches`` entry: ``llm`` (text branches through the LLM, packed, the
    default), ``llm_padded`` (the same through the LLM at the padded lengths, the step
    before packing), ``llm_before`` (``llm_padded`` at ``--b-before-lengths``, the demo's
    lengths before they were sized to the data) and ``embeddings`` (token embeddings only).
    Each side cycles through the same batches.

Tokens/s counts batch x max_len (the multimodal sequence; padding included, same on both
sides). Steps alternate between sides in every repeat; medians are reported. Our compile
time (first call minus a steady call) is reported apart.

  python tools/benchmarks/train_step.py [--a-model demo|m100|demo,m100] [--repeats 3]
      [--steps 2] [--scan on|off] [--b-branches llm,llm_padded,llm_before,embeddings]
      [--b-data demo|synthetic] [--b-data-dir DIR] [--b-before-lengths 48,96]

Prints a table, then one JSON line with the figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (a) model definitions in transformers' terms, with batch and sequence lengths.
DEMO_VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                   num_attention_heads=4, image_size=64, patch_size=16, hidden_act="quick_gelu",
                   layer_norm_eps=1e-5)
DEMO_TEXT = dict(vocab_size=1003, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                 rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
                 pad_token_id=999)
M100_VISION = dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
                   num_attention_heads=6, image_size=224, patch_size=32,
                   hidden_act="quick_gelu", layer_norm_eps=1e-5)
M100_TEXT = dict(vocab_size=32004, hidden_size=768, intermediate_size=2048,
                 num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
                 max_position_embeddings=1024, rms_norm_eps=1e-6, rope_theta=10000.0,
                 tie_word_embeddings=False, pad_token_id=0)
MODELS = {
    # name: (vision, text, image token, batch, max_len, response_len, caption_len)
    "demo": (DEMO_VISION, DEMO_TEXT, 1000, 16, 160, 48, 96),
    "m100": (M100_VISION, M100_TEXT, 32001, 4, 512, 48, 96),
}
LR = 1e-3


def synthetic_batch(batch, seq, resp, cap, image, n_img, image_token, vocab, seed=0):
    """A host batch with the data contract's keys: image tokens after a short prompt,
    prompt and image unsupervised, random right padding."""

    rng = np.random.default_rng(seed)
    text_hi = min(vocab, image_token) - 1
    ids = rng.integers(3, text_hi, (batch, seq)).astype(np.int32)
    start = 4
    ids[:, start:start + n_img] = image_token
    lengths = rng.integers(seq - seq // 4, seq + 1, batch)
    lengths[0] = seq
    mask = (np.arange(seq)[None] < lengths[:, None]).astype(np.int32)
    ids[mask == 0] = 0
    labels = np.where(mask > 0, ids, -100).astype(np.int32)
    labels[:, :start + n_img + 8] = -100
    rmask = (np.arange(resp)[None] < rng.integers(4, resp + 1, (batch, 1))).astype(np.int32)
    cmask = (np.arange(cap)[None] < rng.integers(8, cap + 1, (batch, 1))).astype(np.int32)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
        "pixel_values": rng.standard_normal((batch, image, image, 3)).astype(np.float32),
        "has_image": np.ones(batch, np.int32),
        "response_ids": (rng.integers(3, text_hi, (batch, resp)) * rmask).astype(np.int32),
        "response_mask": rmask,
        "caption_ids": (rng.integers(3, text_hi, (batch, cap)) * cmask).astype(np.int32),
        "caption_mask": cmask,
        "example_mask": np.ones(batch, np.int32),
    }


# --------------------------------------------------------------------------------- our side
def our_config(mcfg, batch, seq, resp, cap, *, alignment: bool, hf_dir: str = ""):
    from exgra_jax.train.defaults import base_config

    c = base_config("tiny")
    c.model = type(c.model)(mcfg.to_dict())
    c.data.max_len, c.data.response_len, c.data.caption_len = seq, resp, cap
    c.alignment.enabled = alignment
    c.alignment.k = 5
    c.alignment.graph_scope = "global"
    t = c.train
    t.global_batch_size = batch
    t.schedule = "constant"
    t.lr = LR
    t.warmup_frac = 0.0
    t.clip_norm = 1.0
    t.weight_decay = 0.0
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
    if hf_dir:
        c.init.source, c.init.hf_dir = "llava_hf", hf_dir
    return c


def demo_config(alignment: bool, scan: bool, data_dir: str = ""):
    """configs/demo.py, on ``data_dir`` or with its data paths cleared (synthetic batches)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("demo_cfg", os.path.join(REPO, "configs",
                                                                          "demo.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config(data_dir or None)
    if not data_dir:
        c.data.json_paths, c.data.image_folder, c.tokenizer = (), "", ""
    c.eval.json_paths = ()
    c.alignment.enabled = alignment
    c.model.scan_layers = scan
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
    return c


def demo_batches(config, n: int) -> list[dict]:
    """The first n host batches of the demo's training pipeline."""
    from exgra_jax.data.pipeline import make_train_iterator
    from exgra_jax.data.tokenizer import load_tokenizer
    from exgra_jax.train import trainer

    dcfg = trainer.data_config(config, trainer.model_config(config),
                               config.train.global_batch_size)
    it = make_train_iterator(dcfg, load_tokenizer(config.tokenizer))
    batches = [next(it) for _ in range(n)]
    it.close()
    return batches


def pad_branches(batch: dict, response_len: int, caption_len: int) -> dict:
    """Right-pads the text-branch arrays to longer lengths (masked: the same examples)."""
    out = dict(batch)
    for key, n in (("response", response_len), ("caption", caption_len)):
        for name in (key + "_ids", key + "_mask"):
            x = batch[name]
            if n < x.shape[1]:
                raise SystemExit(f"--b-before-lengths: {key} {n} < the config's {x.shape[1]}")
            out[name] = np.pad(x, ((0, 0), (0, n - x.shape[1])))
    return out


class OurStep:
    """A built trainer and its state; ``__call__`` runs one step on the next of its batches
    and waits for it. ``step_changes`` re-jits the step with those StepConfig fields."""

    def __init__(self, config, batches_np, step_changes=None):
        import jax

        from exgra_jax import parallel
        from exgra_jax.train import trainer

        self.run = trainer.build(config, total_steps=1000, devices=jax.devices()[:1])
        if step_changes:
            self.run.train_step = rejit(self.run, config, **step_changes)
        self.state = trainer.init_train_state(self.run)
        batches_np = batches_np if isinstance(batches_np, list) else [batches_np]
        self.batches = [{k: jax.device_put(v, parallel.batch_sharding(self.run.mesh, v.ndim))
                         for k, v in b.items()} for b in batches_np]
        self.calls = 0
        self.metrics = None

    def __call__(self):
        import jax

        batch = self.batches[self.calls % len(self.batches)]
        self.calls += 1
        self.state, self.metrics = self.run.train_step(self.state, batch)
        jax.block_until_ready((self.state, self.metrics))
        return self.metrics


def rejit(run, config, **changes):
    """The run's train step, jitted as trainer.build does, with StepConfig ``changes``."""
    import flax.linen as nn
    import jax

    from exgra_jax import parallel
    from exgra_jax.train.step import make_train_step

    raw = make_train_step(dataclasses.replace(run.step_config, **changes), run.optimizer,
                          run.mask, run.lr_schedule)
    rules = [tuple(r) for r in config.rules]

    def step(state, batch):
        with jax.sharding.use_abstract_mesh(run.mesh.abstract_mesh), \
                nn.logical_axis_rules(rules):
            return raw(state, batch)

    return jax.jit(step, in_shardings=(run.state_sharding, parallel.batch_sharding(run.mesh)),
                   out_shardings=(run.state_sharding, None), donate_argnums=(0,))


# ------------------------------------------------------------------------------- torch side
class TorchStep:
    def __init__(self, model, batch_np):
        import torch

        self.model = model.train()
        for name, p in model.named_parameters():
            p.requires_grad_("vision_tower" not in name)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=LR, betas=(0.9, 0.999), eps=1e-8,
                                     weight_decay=0.0)
        self.kw = dict(
            input_ids=torch.tensor(batch_np["input_ids"], dtype=torch.long),
            attention_mask=torch.tensor(batch_np["attention_mask"], dtype=torch.long),
            pixel_values=torch.tensor(batch_np["pixel_values"].transpose(0, 3, 1, 2))
            .contiguous(),
        )
        self.labels = torch.tensor(batch_np["labels"], dtype=torch.long)

    def __call__(self):
        import torch
        import torch.nn.functional as F

        self.opt.zero_grad(set_to_none=True)
        logits = self.model(**self.kw, use_cache=False).logits
        v = logits.shape[-1]
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, v).float(),
                               self.labels[:, 1:].reshape(-1), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        return float(loss.detach())


def first_and_steady(step, n: int):
    """Run ``n`` steps; (first-call seconds, per-step outputs)."""
    t0 = time.perf_counter()
    outs = [step()]
    first = time.perf_counter() - t0
    outs += [step() for _ in range(n - 1)]
    return first, outs


# ---------------------------------------------------------------------------------- parts
def part_a(name, scan, repeats, steps):
    from exgra_jax.convert import hf

    vision, text, image_token, batch, seq, resp, cap = MODELS[name]
    ref = _common.hf_llava(vision, text, image_token, seed=1)
    with tempfile.TemporaryDirectory() as d:
        ref.save_pretrained(d)
        mcfg, params = hf.load_llava(d, scan_layers=scan, remat_policy="none")
        config = our_config(mcfg, batch, seq, resp, cap, alignment=False, hf_dir=d)
        hb = synthetic_batch(batch, seq, resp, cap, mcfg.image_size, mcfg.num_image_tokens,
                             image_token, mcfg.vocab_size)
        ours = OurStep(config, hb)
    theirs = TorchStep(ref, hb)

    # Agreement: the losses of the first steps (same init, same batch, same optimizer).
    check_steps = 3
    first, our_m = first_and_steady(ours, check_steps)
    our_losses = [float(m["loss"]) for m in our_m]
    torch_losses = [theirs() for _ in range(check_steps)]
    err = max(abs(a - b) / abs(b) for a, b in zip(our_losses, torch_losses, strict=True))
    if not err < 2e-4:
        raise SystemExit(f"(a) {name}: losses disagree: ours {our_losses} vs torch "
                         f"{torch_losses}")
    if not our_losses[-1] < our_losses[0]:
        raise SystemExit(f"(a) {name}: loss does not fall: {our_losses}")

    med, times = _common.interleaved({"exgra_jax": ours, "torch": theirs}, repeats, steps)
    tokens = batch * seq
    compile_s = max(first - med["exgra_jax"], 0.0)
    n_train = _common.count({k: v for k, v in params.items() if k != "vision_tower"})
    return dict(
        model=name, params=_common.count(params), trainable_params=n_train, batch=batch,
        seq=seq, image_tokens=mcfg.num_image_tokens, scan_layers=scan,
        exgra_jax_step_s=med["exgra_jax"], torch_step_s=med["torch"],
        exgra_jax_tokens_per_s=tokens / med["exgra_jax"], torch_tokens_per_s=tokens / med["torch"],
        speedup=med["torch"] / med["exgra_jax"], compile_s=compile_s,
        losses_exgra_jax=our_losses, losses_torch=torch_losses, loss_rel_err=err,
        times_exgra_jax=times["exgra_jax"], times_torch=times["torch"],
        loss_falls=bool(np.all(np.diff(our_losses) < 0)),
    )


def packed_share(batches, step_config) -> float:
    """Share of ``batches`` whose text branches fit the packed layout (the rest run padded)."""
    import jax
    import jax.numpy as jnp

    from exgra_jax.train.step import pack_rows, pack_sequences

    lengths = (batches[0]["response_ids"].shape[1], batches[0]["caption_ids"].shape[1])
    rows, row_len = pack_rows(step_config, batches[0]["response_ids"].shape[0], lengths)
    if not rows:
        return 0.0
    fits = jax.jit(lambda *a: pack_sequences([(a[0], a[1]), (a[2], a[3])], rows, row_len)[-1])
    return float(np.mean([bool(fits(*(jnp.asarray(b[k]) for k in (
        "response_ids", "response_mask", "caption_ids", "caption_mask")))) for b in batches]))


# name: (alignment, text branch, StepConfig changes, before-lengths)
B_VARIANTS = {
    "off": (False, "llm", {}, False),
    "llm": (True, "llm", {}, False),
    "llm_padded": (True, "llm", {"text_pack_fraction": 0.0}, False),
    "llm_before": (True, "llm", {"text_pack_fraction": 0.0}, True),
    "embeddings": (True, "embeddings", {}, False),
}


def part_b(scan, repeats, steps, branches, data, data_dir, before_lengths):
    """Alignment off vs on (one side per variant) at configs/demo.py."""
    from exgra_jax.train import trainer
    from exgra_jax.train.step import pack_rows

    tmp = None
    if data == "demo" and not data_dir:
        tmp = tempfile.TemporaryDirectory()
        data_dir = tmp.name
        subprocess.run([sys.executable, os.path.join(REPO, "tools", "make_demo_data.py"),
                        "--out", data_dir], check=True, stdout=subprocess.DEVNULL)
    base = demo_config(True, scan, data_dir if data == "demo" else "")
    mcfg = trainer.model_config(base)
    n_batches = max(repeats * steps, 4)
    if data == "demo":
        all_batches = demo_batches(base, 64)  # 64 for the packed share, the first timed
    else:
        all_batches = [synthetic_batch(base.train.global_batch_size, base.data.max_len,
                                       base.data.response_len, base.data.caption_len,
                                       mcfg.image_size, mcfg.num_image_tokens,
                                       mcfg.image_token_id, mcfg.vocab_size, seed=i)
                       for i in range(n_batches)]
    batches = all_batches[:n_batches]
    before = [pad_branches(b, *before_lengths) for b in batches]
    variants = ["off"] + list(branches)
    sides, firsts, info = {}, {}, {}
    for key in variants:
        on, branch, changes, is_before = B_VARIANTS[key]
        c = demo_config(on, scan, data_dir if data == "demo" else "")
        c.alignment.text_branch = branch
        if is_before:
            c.data.response_len, c.data.caption_len = before_lengths
        step = OurStep(c, before if is_before else batches, step_changes=changes or None)
        first, outs = first_and_steady(step, 2)
        m = outs[-1]
        if on and not ("align_loss" in m and np.isfinite(float(m["align_loss"]))):
            raise SystemExit(f"(b) {key}: no finite align_loss in the metrics")
        sc = step.run.step_config if not changes else dataclasses.replace(
            step.run.step_config, **changes)
        b = c.train.global_batch_size
        extra, share = 0.0, None
        if on and branch == "llm":  # LLM tokens per example: packed rows or padded lengths
            rows, row_len = pack_rows(sc, b, (c.data.response_len, c.data.caption_len))
            share = packed_share(before if is_before else all_batches, sc)
            padded = c.data.response_len + c.data.caption_len
            extra = share * rows * row_len / b + (1 - share) * padded
        sides[key], firsts[key] = step, first
        info[key] = dict(
            {k: float(v) for k, v in m.items() if k in ("loss", "lm_loss", "align_loss")},
            lengths=f"{c.data.max_len}/{c.data.response_len}/{c.data.caption_len}",
            packed_share=share, branch_tokens_per_example=extra,
            analytic_flops=trainer.flops_per_step(mcfg, b, c.data.max_len, extra))
    common = dict(batch=base.train.global_batch_size, max_len=base.data.max_len,
                  response_len=base.data.response_len, caption_len=base.data.caption_len,
                  k=base.alignment.k, graph_scope=base.alignment.graph_scope,
                  image_tokens=mcfg.num_image_tokens, data=data, timed_batches=len(batches),
                  share_batches=len(all_batches))
    med, times = _common.interleaved(sides, repeats, steps)
    for key in variants:
        info[key].update(step_s=med[key], ratio=med[key] / med["off"],
                         compile_s=max(firsts[key] - med[key], 0.0), times=times[key],
                         analytic_flops_ratio=info[key]["analytic_flops"]
                         / info["off"]["analytic_flops"])
    if tmp is not None:
        tmp.cleanup()
    return dict(variants=info, **common, scan_layers=scan,
                ratio=med[branches[0]] / med["off"], first=branches[0])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--a-model", default="demo", help="comma list of: " + ",".join(MODELS))
    ap.add_argument("--parts", default="a,b")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2, help="steps per timed repeat (demo)")
    ap.add_argument("--scan", default="on", choices=["on", "off"])
    ap.add_argument("--xla-threads", type=int, default=0)
    ap.add_argument("--b-branches", default="llm,llm_padded,llm_before,embeddings",
                    help="(b) alignment-on variants to time, the first against the goal: "
                    + ",".join(k for k in B_VARIANTS if k != "off"))
    ap.add_argument("--b-data", default="demo", choices=["demo", "synthetic"])
    ap.add_argument("--b-data-dir", default="", help="(b) a built demo data set to reuse")
    ap.add_argument("--b-before-lengths", default="48,96",
                    help="(b) response,caption lengths of the llm_before variant")
    args = ap.parse_args()
    _common.set_xla_threads(args.xla_threads)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    import torch

    scan = args.scan == "on"
    parts = args.parts.split(",")
    res_a, res_b = [], None
    if "a" in parts:
        for name in args.a_model.split(","):
            big = name == "m100"
            res_a.append(part_a(name, scan, max(3, args.repeats // 2) if big else args.repeats,
                                1 if big else args.steps))
    if "b" in parts:
        branches = args.b_branches.split(",")
        unknown = set(branches) - set(B_VARIANTS) | ({"off"} & set(branches))
        if unknown:
            raise SystemExit(f"--b-branches: unknown {sorted(unknown)}")
        res_b = part_b(scan, args.repeats, args.steps, branches, args.b_data, args.b_data_dir,
                       tuple(int(x) for x in args.b_before_lengths.split(",")))

    print(f"CPU x{os.cpu_count()}, torch threads {torch.get_num_threads()}, scan_layers "
          f"{args.scan}, remat none, float32, XLA_FLAGS='{os.environ.get('XLA_FLAGS', '')}'; "
          f"medians of interleaved repeats\n")
    if res_a:
        print("(a) train step, alignment off: exgra_jax (jit) vs transformers eager + AdamW")
        rows = [[r["model"], f"{r['params'] / 1e6:.2f}M", f"{r['batch']}x{r['seq']}",
                 r["exgra_jax_step_s"], r["torch_step_s"], r["exgra_jax_tokens_per_s"],
                 r["torch_tokens_per_s"], r["speedup"], r["compile_s"], r["loss_rel_err"]]
                for r in res_a]
        print(_common.table(["model", "params", "batch", "ours s/step", "torch s/step",
                             "ours tok/s", "torch tok/s", "speedup", "compile s",
                             "loss rel err"], rows))
        print("goal speedup >= 1.5: " + ", ".join(
            f"{r['model']} {'met' if r['speedup'] >= 1.5 else 'NOT met'}" for r in res_a) + "\n")
    if res_b:
        r = res_b
        print(f"(b) configs/demo.py train step, batch {r['batch']}, {r['data']} batches "
              f"({r['timed_batches']} timed), alignment graph_scope {r['graph_scope']}, "
              f"k={r['k']}; ratio = step time / alignment off; packed = share of "
              f"{r['share_batches']} batches whose text branches fit the packed rows")
        rows = []
        for key, v in r["variants"].items():
            share = v["packed_share"]
            rows.append([key, v["lengths"], "-" if share is None else f"{share:.2f}",
                         v["branch_tokens_per_example"], v["step_s"],
                         r["batch"] * r["max_len"] / v["step_s"], v["ratio"],
                         v["analytic_flops_ratio"], v["compile_s"], v["loss"],
                         v.get("align_loss", "-")])
        print(_common.table(["variant", "lengths", "packed", "branch tok/ex", "s/step", "tok/s",
                             "ratio", "FLOPs ratio", "compile s", "loss", "align loss"], rows))
        print(f"goal ratio <= 1.3 ({r['first']}): {r['ratio']:.2f} -> "
              f"{'met' if r['ratio'] <= 1.3 else 'NOT met'}\n")
    print(json.dumps(dict(benchmark="train_step", cpu_count=os.cpu_count(),
                          torch_threads=torch.get_num_threads(), scan_layers=scan,
                          xla_flags=os.environ.get("XLA_FLAGS", ""), a=res_a, b=res_b),
                     default=float))


if __name__ == "__main__":
    main()
