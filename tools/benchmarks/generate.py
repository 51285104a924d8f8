"""Benchmark: greedy KV-cache decoding, exgra_jax `generate` vs transformers `generate`.

One small random LLaVA (LLaMA ~58M parameters: 8 layers, d=512, vocab 32000; CLIP tower
4 layers, width 256, 112 px / patch 14 = 64 image tokens) is exported once with
`save_llava`; transformers loads that directory (PyTorch eager, KV cache, greedy) and
exgra_jax loads it with `load_llava`, so both sides run the same weights. Prompts: 48-64
text tokens around the 64 image tokens, left-padded; 64 new tokens, no early stop.

Timing per side and batch (median of --repeats, after a warm-up call):
  t(64) = generate 64 tokens, t(1) = generate 1 token (prefill + first token);
  decode tok/s = batch * 63 / (t(64) - t(1)); end-to-end tok/s = batch * 64 / t(64).
exgra_jax's compile time (first call minus a warm call, both programs) is reported apart.

  python tools/benchmarks/generate.py [--batches 1,8] [--new-tokens 64] [--repeats 3]

Prints a table, then one JSON line with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import numpy as np

IMAGE_TOKEN = 31999


def model_config():
    from exgra_jax.models.config import ModelConfig

    return ModelConfig(
        image_size=112, patch_size=14, vision_width=256, vision_layers=4, vision_heads=4,
        vision_mlp=1024, vocab_size=32000, hidden_size=512, mlp_size=1408, num_layers=8,
        num_heads=8, num_kv_heads=8, max_positions=512, image_token_id=IMAGE_TOKEN,
        pad_token_id=0,
    )


def make_prompts(batch: int, num_image_tokens: int, image_size: int, seed: int = 0):
    from exgra_jax.inference.generate import pad_prompts

    rng = np.random.default_rng(seed)
    prompts = []
    for _ in range(batch):
        n = int(rng.integers(48, 65))
        text = rng.integers(3, 31000, n).tolist()
        prompts.append(text[:8] + [IMAGE_TOKEN] * num_image_tokens + text[8:])
    ids, mask = pad_prompts(prompts, pad_token_id=0, length=64 + num_image_tokens)
    pix = rng.standard_normal((batch, image_size, image_size, 3)).astype(np.float32)
    return ids, mask, pix


def timed(fn, repeats: int):
    """(median seconds over ``repeats`` calls, the last call's result)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def run_jax(cfg, params, ids, mask, pix, new_tokens, repeats):
    import jax

    from exgra_jax.inference.generate import GenerationConfig, generate

    out = {}
    for n in (1, new_tokens):
        gen = GenerationConfig(max_new_tokens=n)

        def call(gen=gen):
            res = generate(cfg, params, ids, mask, pix, config=gen)
            jax.block_until_ready(res.tokens)
            return res

        t0 = time.perf_counter()
        call()
        first = time.perf_counter() - t0
        out[n], res = timed(call, repeats)
        out[f"compile_{n}"] = max(first - out[n], 0.0)
        out[f"tokens_{n}"] = res.tokens
    return out


def run_torch(model, ids, mask, pix, new_tokens, repeats):
    import torch

    kw = dict(
        input_ids=torch.tensor(ids, dtype=torch.long),
        attention_mask=torch.tensor(mask, dtype=torch.long),
        pixel_values=torch.tensor(pix.transpose(0, 3, 1, 2)),
        do_sample=False, num_beams=1, pad_token_id=0, use_cache=True,
    )

    def call(n):
        with torch.inference_mode():
            return model.generate(**kw, max_new_tokens=n)

    call(2)  # warm-up of the prefill and decode paths (eager kernels compile nothing per shape)
    out = {}
    for n in (1, new_tokens):
        out[n], res = timed(lambda n=n: call(n), repeats)
        out[f"tokens_{n}"] = res[:, ids.shape[1]:].numpy()
        if out[f"tokens_{n}"].shape[1] != n:
            raise RuntimeError(f"transformers stopped after {out[f'tokens_{n}'].shape[1]} of "
                               f"{n} tokens; the timing would be wrong")
    return out


def main():
    from exgra_jax.runtime import setup_process  # noqa: PLC0415

    setup_process()  # CPU here: no TPU probing (libtpu is installed for AOT compiles)
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import jax
    import torch
    from transformers import LlavaForConditionalGeneration

    from exgra_jax.convert import hf
    from exgra_jax.models.llava import init_params

    cfg0 = model_config()
    with tempfile.TemporaryDirectory() as d:
        hf.save_llava(cfg0, init_params(cfg0, jax.random.key(0)), d)
        cfg, params = hf.load_llava(d)
        ref = LlavaForConditionalGeneration.from_pretrained(d).eval()
    ref.generation_config.eos_token_id = None  # never stop early: time all new tokens
    llm_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params["llm"]))

    n = args.new_tokens
    rows, figures = [], {}
    for b in (int(x) for x in args.batches.split(",")):
        ids, mask, pix = make_prompts(b, cfg.num_image_tokens, cfg.image_size)
        j = run_jax(cfg, params, ids, mask, pix, n, args.repeats)
        t = run_torch(ref, ids, mask, pix, n, args.repeats)
        f = {}
        for name, r in (("jax", j), ("torch", t)):
            f[f"{name}_prefill_ms"] = 1e3 * r[1]
            f[f"{name}_decode_tok_s"] = b * (n - 1) / max(r[n] - r[1], 1e-9)
            f[f"{name}_e2e_tok_s"] = b * n / r[n]
        f["decode_ratio"] = f["jax_decode_tok_s"] / f["torch_decode_tok_s"]
        f["e2e_ratio"] = f["jax_e2e_tok_s"] / f["torch_e2e_tok_s"]
        f["jax_compile_s"] = j["compile_1"] + j[f"compile_{n}"]
        f["token_agreement"] = float(np.mean(j[f"tokens_{n}"] == t[f"tokens_{n}"]))
        figures[f"batch_{b}"] = f
        rows.append((b, f))

    print(f"greedy decoding, LLaMA {llm_params / 1e6:.0f}M params + CLIP tower, prompt "
          f"{ids.shape[1]} tokens ({cfg.num_image_tokens} image), {n} new tokens, "
          f"median of {args.repeats}; torch threads {torch.get_num_threads()}, "
          f"cpu count {os.cpu_count()}, jax {jax.__version__} on {jax.default_backend()}")
    head = (f"{'batch':>5} | {'jax decode tok/s':>16} {'torch decode tok/s':>18} {'ratio':>6} | "
            f"{'jax e2e tok/s':>13} {'torch e2e tok/s':>15} {'ratio':>6} | "
            f"{'jax prefill ms':>14} {'torch prefill ms':>16} | {'jax compile s':>13} | "
            f"{'same tokens':>11}")
    print(head)
    print("-" * len(head))
    for b, f in rows:
        print(f"{b:>5} | {f['jax_decode_tok_s']:>16.1f} {f['torch_decode_tok_s']:>18.1f} "
              f"{f['decode_ratio']:>6.2f} | {f['jax_e2e_tok_s']:>13.1f} "
              f"{f['torch_e2e_tok_s']:>15.1f} {f['e2e_ratio']:>6.2f} | "
              f"{f['jax_prefill_ms']:>14.1f} {f['torch_prefill_ms']:>16.1f} | "
              f"{f['jax_compile_s']:>13.1f} | {f['token_agreement']:>11.2f}")
    figures.update(llm_params=llm_params, new_tokens=n, prompt_len=int(ids.shape[1]),
                   repeats=args.repeats, torch_threads=torch.get_num_threads())
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
