"""Real-token share of training batches, padded vs packed, for LLaVA-Med-like length mixes.

Three mixes are written as small LLaVA-Med JSON files (tiny PNG images) and read through
the training pipeline with the real LLaMA-family sentencepiece tokenizer (Mistral-7B's,
shipped by mistral-common) at the shipped configs' sizes (224 px, 256 image tokens with
<im_start>/<im_end>, max_len 2048, llava_v0):
  stage1    PMC-15M-style figure captions (tens of words) after a short instruction;
  finetune  VQA-RAD/SLAKE/PathVQA-style questions (a dozen words), answers of a few words;
  stage2    instruction conversations of 1-6 rounds (a few hundred tokens).
For each mix the example lengths measured on the padded pass choose `images_per_row` and
`examples_per_row` (the smallest limits whose first-fit share stays within 1% of the share
without them), then both pipelines run in one go over the same records.

  python tools/benchmarks/packing.py [--num 512] [--rows 8] [--mixes stage1 finetune stage2]

Prints a table and, last, one JSON line with the figures. `build_iterators` returns the
padded and packed iterators of a mix for timing runs.

`--throughput` also trains a small model (2 decoder layers of width 128, a 2-layer CLIP
tower of width 64 at 224 px, the real 32k vocabulary; the stage-1 recipe: projector and
embeddings trained, alignment off) on the padded and the packed batches of each mix in
one run, `--steps` timed steps each after a compile step, and reports real (non-padding)
tokens per second and their ratio. Goal: packed >= 3x padded for stage 1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
for path in (ROOT, HERE):  # also when imported from elsewhere (build_iterators)
    if path not in sys.path:
        sys.path.insert(0, path)

from _common import table  # noqa: E402

WORDS = (
    "the a of in and with shows showing demonstrates image scan axial coronal sagittal "
    "contrast-enhanced computed tomography magnetic resonance imaging ultrasound radiograph "
    "chest abdominal pelvic cranial left right bilateral upper lower lobe lung liver kidney "
    "spleen pancreas heart aorta vertebral femoral hepatic renal pulmonary cerebral lesion "
    "mass nodule opacity effusion consolidation hemorrhage infarction edema fracture tumor "
    "carcinoma metastasis lymphadenopathy hyperintense hypodense enhancing heterogeneous "
    "well-defined irregular margins arrow arrows indicates measuring cm mm patient year-old "
    "male female panel histopathology staining hematoxylin eosin magnification cells tissue "
    "inflammatory infiltrate necrosis fibrosis normal abnormal small large multiple single"
).split()
STAGE1_PROMPTS = ("Describe the image concisely.", "Provide a brief description of the "
                  "given image.", "Summarize the visual content of the image.",
                  "Write a terse but informative summary of the picture.")
GOALS = {"stage1": 0.85, "finetune": 0.85, "stage2": 0.6}


def _sentence(rng, n: int) -> str:
    return " ".join(rng.choice(WORDS, size=max(1, int(n)))).capitalize() + "."


def _words(rng, median: float, sigma: float, lo: int, hi: int) -> int:
    return int(np.clip(rng.lognormal(np.log(median), sigma), lo, hi))


def stage1_record(rng) -> list[dict]:
    caption = _sentence(rng, _words(rng, 35, 0.7, 5, 300))
    return [{"from": "human", "value": str(rng.choice(STAGE1_PROMPTS)) + "\n<image>"},
            {"from": "gpt", "value": caption}]


def finetune_record(rng) -> list[dict]:
    question = _sentence(rng, _words(rng, 9, 0.4, 3, 30))[:-1] + "?"
    closed = rng.random() < 0.5
    answer = str(rng.choice(["yes", "no"])) if closed else _sentence(rng, rng.integers(1, 6))
    return [{"from": "human", "value": "<image>\n" + question}, {"from": "gpt", "value": answer}]


def stage2_record(rng) -> list[dict]:
    turns = []
    for r in range(int(np.clip(1 + rng.poisson(1.5), 1, 6))):
        question = _sentence(rng, _words(rng, 12, 0.4, 4, 40))[:-1] + "?"
        turns += [{"from": "human", "value": ("<image>\n" if r == 0 else "") + question},
                  {"from": "gpt", "value": _sentence(rng, _words(rng, 45, 0.6, 5, 250))}]
    return turns


MIXES = {"stage1": stage1_record, "finetune": finetune_record, "stage2": stage2_record}


def write_mix(directory: str, mix: str, num: int, seed: int = 0, num_images: int = 8) -> str:
    """LLaVA-Med JSON of `num` records of `mix` whose images cycle over tiny PNGs."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = os.path.join(directory, "images")
    os.makedirs(images, exist_ok=True)
    for i in range(num_images):
        pixels = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(images, f"{i}.png"))
    records = [{"id": f"{mix}{i}", "image": f"{i % num_images}.png",
                "conversations": MIXES[mix](rng)} for i in range(num)]
    path = os.path.join(directory, f"{mix}.json")
    with open(path, "w") as f:
        json.dump(records, f)
    return path


def sentencepiece_tokenizer(directory: str):
    """Mistral-7B's sentencepiece model as a LLaMA tokenizer directory, loaded with the
    LLaVA-Med special tokens."""
    import mistral_common

    from exgra_jax.data.tokenizer import load_tokenizer

    out = os.path.join(directory, "tokenizer")
    os.makedirs(out, exist_ok=True)
    model = os.path.join(os.path.dirname(mistral_common.__file__), "data", "tokenizer.model.v1")
    shutil.copy(model, os.path.join(out, "tokenizer.model"))
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>",
                   "eos_token": "</s>", "unk_token": "<unk>", "legacy": True,
                   "add_bos_token": True, "add_eos_token": False}, f)
    return load_tokenizer(out)


def data_config(json_path: str, rows: int, **changes):
    """The shipped configs' data sizes (224 px, 256 image tokens, max_len 2048), one epoch."""
    from exgra_jax.data.pipeline import DataConfig

    fields = dict(json_paths=(json_path,), image_folder=os.path.join(os.path.dirname(json_path),
                  "images"), template="llava_v0", max_len=2048, response_len=128,
                  caption_len=256, image_size=224, num_image_tokens=256,
                  mm_use_im_start_end=True, batch_size=rows, num_epochs=1, seed=0)
    fields.update(changes)
    return DataConfig(**fields)


def build_iterators(json_path: str, tokenizer, rows: int, images_per_row: int,
                    examples_per_row: int, **changes) -> dict:
    """{'padded': ..., 'packed': ...} training iterators over the same records."""
    from exgra_jax.data.pipeline import make_train_iterator

    cfg = data_config(json_path, rows, **changes)
    packed = cfg.replace(packing=True, images_per_row=images_per_row,
                         examples_per_row=examples_per_row)
    return {"padded": make_train_iterator(cfg, tokenizer, 0, 1),
            "packed": make_train_iterator(packed, tokenizer, 0, 1)}


def first_fit_share(lengths, images, rows: int, max_len: int, images_per_row: int,
                    examples_per_row: int) -> float:
    """Mean real-token share of the batches first-fit packing closes on these lengths."""
    from exgra_jax.data.packing import BatchPacker

    # Placement only: no batch is built, so no padding example is needed.
    packer = BatchPacker(rows, max_len, images_per_row, examples_per_row, padding_example={})
    shares, filled = [], 0
    for n, image in zip(lengths, images):
        example = {"attention_mask": np.ones(n, np.int32), "has_image": image}
        if not packer.add(example):
            shares.append(filled / (rows * max_len))
            packer.clear()
            packer.add(example)
            filled = 0
        filled += n
    return float(np.mean(shares)) if shares else filled / (rows * max_len)


def recommend_limits(lengths, images, rows: int, max_len: int, image_block: int,
                     tolerance: float = 0.01) -> tuple[int, int]:
    """The smallest examples_per_row, then images_per_row, whose first-fit share stays
    within `tolerance` (relative) of the share without that limit."""
    most_images = max_len // image_block

    def share(i, k):
        return first_fit_share(lengths, images, rows, max_len, i, k)

    most_examples = int(max_len // max(1, min(lengths))) + 1
    best = share(min(most_images, most_examples), most_examples)
    k = next(k for k in range(1, most_examples + 1)
             if share(min(most_images, k), k) >= (1 - tolerance) * best)
    at_k = share(min(most_images, k), k)
    i = next(i for i in range(1, min(most_images, k) + 1)
             if share(i, k) >= (1 - tolerance) * at_k)
    return i, k


def measure(iterator) -> dict:
    """Real-token share and examples per batch over all batches but a partly filled last."""
    from exgra_jax.data.packing import real_token_share

    batches = [(real_token_share(b), int(b["example_mask"].sum())) for b in iterator]
    iterator.close()
    full = batches[:-1] if len(batches) > 1 else batches
    return {"batches": len(batches), "real_token_share": float(np.mean([s for s, _ in full])),
            "examples_per_batch": float(np.mean([n for _, n in full]))}


def example_lengths(json_path: str, tokenizer, rows: int):
    """(real tokens, has image) of each example, as the padded pipeline makes them."""
    from exgra_jax.data.pipeline import make_train_iterator

    lengths, images = [], []
    iterator = make_train_iterator(data_config(json_path, rows), tokenizer, 0, 1)
    for batch in iterator:
        lengths += batch["attention_mask"].sum(1).tolist()
        images += batch["has_image"].tolist()
    iterator.close()
    return lengths, images


def run_mix(directory: str, mix: str, tokenizer, num: int, rows: int) -> dict:
    path = write_mix(directory, mix, num)
    lengths, images = example_lengths(path, tokenizer, rows)
    cfg = data_config(path, rows)
    image_block = cfg.num_image_tokens + 2
    i, k = recommend_limits(lengths, images, rows, cfg.max_len, image_block)
    iterators = build_iterators(path, tokenizer, rows, i, k)
    padded, packed = measure(iterators["padded"]), measure(iterators["packed"])
    return {"mix": mix, "examples": len(lengths),
            "tokens_p10_p50_p90": [int(np.percentile(lengths, q)) for q in (10, 50, 90)],
            "images_per_row": i, "examples_per_row": k,
            "padded_share": round(padded["real_token_share"], 4),
            "packed_share": round(packed["real_token_share"], 4),
            "share_ratio": round(packed["real_token_share"] / padded["real_token_share"], 2),
            "padded_examples_per_batch": padded["examples_per_batch"],
            "packed_examples_per_batch": round(packed["examples_per_batch"], 2),
            "goal_share": GOALS[mix], "meets_goal": packed["real_token_share"] >= GOALS[mix]}


def small_train_config(tokenizer, rows: int):
    """A small model under the stage-1 recipe, for timing the train step on this CPU."""
    from exgra_jax.data.tokenizer import special_token_ids
    from exgra_jax.train.defaults import base_config

    ids = special_token_ids(tokenizer)
    c = base_config("tiny", image_size=224, patch_size=14, vision_width=64, vision_layers=2,
                    vision_heads=2, vision_mlp=128, hidden_size=128, mlp_size=256, num_layers=2,
                    num_heads=4, num_kv_heads=4, vocab_size=len(tokenizer),
                    image_token_id=ids["image_patch"], pad_token_id=ids["pad"],
                    max_positions=2048, remat_policy="none")
    c.data.max_len = 2048
    c.alignment.enabled = False
    c.train.global_batch_size = rows
    c.train.trainable = (r"^model/projector/", r"^model/llm/embed_tokens$")
    c.train.frozen = (r"^model/vision_tower/",)
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
    return c


def time_training(config, iterator, steps: int) -> dict:
    """Seconds per step and real tokens per step over `steps` steps after one compile step."""
    import time

    import jax

    from exgra_jax.parallel import make_global_batch
    from exgra_jax.train import trainer

    run = trainer.build(config, total_steps=steps + 1, devices=jax.devices()[:1])
    state = trainer.init_train_state(run)
    batches = [make_global_batch(next(iterator), run.mesh) for _ in range(steps + 1)]
    iterator.close()
    state, metrics = run.train_step(state, batches[0])
    jax.block_until_ready(metrics)
    t0, tokens = time.perf_counter(), 0.0
    for batch in batches[1:]:
        state, metrics = run.train_step(state, batch)
        tokens += float(metrics["tokens"])
    jax.block_until_ready(state)
    seconds = (time.perf_counter() - t0) / steps
    return {"step_s": seconds, "real_tokens_per_s": tokens / steps / seconds}


def run_throughput(directory: str, mix: str, tokenizer, num: int, rows: int, steps: int,
                   limits: tuple[int, int]) -> dict:
    """Padded vs packed train-step throughput of one mix, side by side."""
    path = os.path.join(directory, f"{mix}.json")  # written by run_mix
    base = small_train_config(tokenizer, rows)
    out = {"mix": mix, "rows": rows}
    iterators = build_iterators(path, tokenizer, rows, *limits, num_epochs=None)
    for layout in ("padded", "packed"):
        config = base.copy_and_resolve_references()
        if layout == "packed":
            config.data.packing = True
            config.data.images_per_row, config.data.examples_per_row = limits
        out[layout] = time_training(config, iterators[layout], steps)
    out["speedup"] = out["packed"]["real_tokens_per_s"] / out["padded"]["real_tokens_per_s"]
    return out


def main():
    from exgra_jax.runtime import setup_process  # noqa: PLC0415

    setup_process()  # CPU here: no TPU probing (libtpu is installed for AOT compiles)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=512, help="records per mix")
    parser.add_argument("--rows", type=int, default=8, help="rows per host batch")
    parser.add_argument("--mixes", nargs="+", default=list(MIXES), choices=list(MIXES))
    parser.add_argument("--throughput", action="store_true",
                        help="also time training padded vs packed on a small model")
    parser.add_argument("--throughput-rows", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per layout")
    args = parser.parse_args()

    speed = []
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = sentencepiece_tokenizer(tmp)
        results = [run_mix(os.path.join(tmp, m), m, tokenizer, args.num, args.rows)
                   for m in args.mixes]
        if args.throughput:
            for r in results:
                speed.append(run_throughput(
                    os.path.join(tmp, r["mix"]), r["mix"], tokenizer, args.num,
                    args.throughput_rows, args.steps,
                    (r["images_per_row"], r["examples_per_row"])))
    print(f"packing: {args.num} records per mix, {args.rows} rows of 2048 tokens, 224 px / "
          "256 image tokens, llava_v0, Mistral-7B sentencepiece tokenizer")
    header = ("mix", "tokens p10/p50/p90", "I", "K", "padded share", "packed share", "ratio",
              "padded ex/batch", "packed ex/batch", "goal", "met")
    print(table(header, [(r["mix"], "/".join(map(str, r["tokens_p10_p50_p90"])),
                          r["images_per_row"], r["examples_per_row"], r["padded_share"],
                          r["packed_share"], r["share_ratio"], r["padded_examples_per_batch"],
                          r["packed_examples_per_batch"], r["goal_share"], r["meets_goal"])
                         for r in results]))
    if speed:
        print(f"\ntrain step, small model (stage-1 recipe), {args.throughput_rows} rows of 2048 "
              f"tokens, {args.steps} timed steps per layout")
        print(table(("mix", "padded s/step", "packed s/step", "padded real tok/s",
                     "packed real tok/s", "speedup"),
                    [(r["mix"], round(r["padded"]["step_s"], 3), round(r["packed"]["step_s"], 3),
                      round(r["padded"]["real_tokens_per_s"]),
                      round(r["packed"]["real_tokens_per_s"]), round(r["speedup"], 2))
                     for r in speed]))
    print(json.dumps({"benchmark": "packing", "records_per_mix": args.num, "rows": args.rows,
                      "max_len": 2048, "mixes": results, "throughput": speed}))


if __name__ == "__main__":
    main()
