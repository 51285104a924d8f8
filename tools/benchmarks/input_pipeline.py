"""Input pipeline throughput: exgra_jax Grain pipeline vs. a LLaVA-Med-style PyTorch loader.

Both read the same generated files (JPEG images + LLaVA-Med JSON with conversations and
conversations_long) and produce the same work per example: decode, CLIP preprocessing,
tokenization of the full conversation with masked labels, and of the two answer-only
sequences; then batching. The baseline does it the original way (PIL + CLIPImageProcessor +
the Hugging Face tokenizer per example, v0 label masking by re-tokenizing each turn, a
torch DataLoader with padding collate).

  python tools/benchmarks/input_pipeline.py [--num 512] [--batch 16] [--workers 1 2]

Prints a table and, last, one JSON line with the figures (samples/s and ratios).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

WORDS = (
    "chest x-ray shows small large nodule lesion left right lung liver kidney brain fracture "
    "opacity mass effusion normal abnormal present absent CT MRI scan axial coronal image"
).split()
SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


def make_data(directory: str, num: int, image_px: int, seed: int = 0) -> str:
    from PIL import Image

    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(directory, "images"), exist_ok=True)
    records = []
    yy, xx = np.mgrid[0:image_px, 0:image_px]
    for i in range(num):
        # Smooth blobs plus noise: JPEG sizes like a real scan rather than pure noise.
        cy, cx = rng.uniform(0.2, 0.8, 2) * image_px
        r = rng.uniform(10, 60)
        blob = 200 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        gray = np.clip(blob + rng.normal(40, 12, blob.shape), 0, 255).astype(np.uint8)
        name = f"{i:05d}.jpg"
        Image.fromarray(np.stack([gray] * 3, -1)).save(
            os.path.join(directory, "images", name), quality=90
        )

        def sentence(n):
            return " ".join(rng.choice(WORDS, size=n)) + "."

        turns = [{"from": "human", "value": "<image>\n" + sentence(8)}]
        long_turns = copy.deepcopy(turns)
        for _ in range(int(rng.integers(1, 3))):
            turns.append({"from": "gpt", "value": sentence(int(rng.integers(10, 40)))})
            long_turns.append({"from": "gpt", "value": sentence(int(rng.integers(40, 80)))})
            q = {"from": "human", "value": sentence(6)}
            turns.append(q)
            long_turns.append(dict(q))
        turns, long_turns = turns[:-1], long_turns[:-1]
        records.append({"id": str(i), "image": name, "conversations": turns,
                        "conversations_long": long_turns})
    path = os.path.join(directory, "data.json")
    with open(path, "w") as f:
        json.dump(records, f)
    return path


def make_tokenizer(directory: str):
    from exgra_jax.data.tokenizer import load_tokenizer, train_tokenizer

    rng = np.random.default_rng(1)
    texts = [" ".join(rng.choice(WORDS, size=12)) for _ in range(2000)] + [SYSTEM] * 50
    path = train_tokenizer(texts, os.path.join(directory, "tokenizer"), vocab_size=1000)
    return load_tokenizer(path)


# ------------------------------------------------------------------------------------------
# Baseline: the original-style PyTorch dataset


class OriginalStyleDataset:
    """Per example: PIL open, CLIPImageProcessor, HF tokenizer calls, v0 masking by turn."""

    def __init__(self, json_path, image_folder, tokenizer, cfg):
        from transformers import CLIPImageProcessor

        with open(json_path) as f:
            self.records = json.load(f)
        self.image_folder = image_folder
        self.tokenizer = tokenizer
        self.cfg = cfg
        size = cfg.image_size
        self.processor = CLIPImageProcessor(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}
        )
        image = "<im_patch>" * cfg.num_image_tokens
        self.image_text = "<im_start>" + image + "<im_end>"

    def __len__(self):
        return len(self.records)

    def _tok(self, text, max_len):
        return self.tokenizer(text, return_tensors="pt", max_length=max_len,
                              truncation=True).input_ids[0]

    def __getitem__(self, i):
        import torch
        from PIL import Image

        record = self.records[i]
        image = Image.open(os.path.join(self.image_folder, record["image"])).convert("RGB")
        pixels = self.processor.preprocess(image, return_tensors="pt")["pixel_values"][0]
        turns = copy.deepcopy(record["conversations"])
        header = SYSTEM + "\n\n"
        text = header
        for turn in turns:
            role = "Human" if turn["from"] == "human" else "Assistant"
            value = turn["value"].replace("<image>", self.image_text)
            turn["value"] = "### " + role + ": " + value + "\n"
            text += turn["value"]
        text += "### "
        input_ids = self._tok(text, self.cfg.max_len)
        labels = input_ids.clone()
        lens = [len(self._tok(s, self.cfg.max_len)) for s in [header] + [t["value"] for t in turns]]
        cur = lens[0]
        labels[:cur] = -100
        for n, turn in zip(lens[1:], turns):
            if turn["from"] == "human":
                labels[cur + 2 : cur + n] = -100
            cur += n

        def answers(ts):
            return ". ".join(t["value"].replace("<image>", "").replace("\n", " ").strip()
                             for t in ts if t["from"] == "gpt")

        response = self._tok(answers(record["conversations"]), self.cfg.response_len)
        caption = self._tok(answers(record["conversations_long"]), self.cfg.caption_len)
        return dict(input_ids=input_ids, labels=labels, pixel_values=pixels,
                    response_ids=response, caption_ids=caption, has_image=torch.tensor(1))


def _collate(pad_id):
    def collate(items):
        import torch
        from torch.nn.utils.rnn import pad_sequence

        out = {}
        for key in ("input_ids", "response_ids", "caption_ids"):
            out[key] = pad_sequence([x[key] for x in items], batch_first=True,
                                    padding_value=pad_id)
        out["labels"] = pad_sequence([x["labels"] for x in items], batch_first=True,
                                     padding_value=-100)
        out["attention_mask"] = out["input_ids"].ne(pad_id)
        out["pixel_values"] = torch.stack([x["pixel_values"] for x in items])
        out["has_image"] = torch.stack([x["has_image"] for x in items])
        return out

    return collate


def run_torch(json_path, image_folder, tokenizer, cfg, workers):
    import torch

    torch.set_num_threads(1)
    ds = OriginalStyleDataset(json_path, image_folder, tokenizer, cfg)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=cfg.batch_size, shuffle=True, num_workers=workers, drop_last=True,
        collate_fn=_collate(tokenizer.pad_token_id),
        persistent_workers=False, generator=torch.Generator().manual_seed(0),
    )
    return _time_batches(iter(loader), len(ds) // cfg.batch_size, cfg.batch_size)


def run_grain(cfg, tokenizer, workers):
    from exgra_jax.data.pipeline import make_train_iterator

    iterator = make_train_iterator(cfg.replace(worker_count=workers), tokenizer, 0, 1)
    try:
        return _time_batches(iterator, None, cfg.batch_size)
    finally:
        iterator.close()


def _time_batches(iterator, num_batches, batch_size):
    """Samples/s over all batches but the first (worker start-up is timed separately)."""
    start = time.perf_counter()
    next(iterator)
    first = time.perf_counter()
    count = 0
    for _ in iterator if num_batches is None else range(num_batches - 1):
        if num_batches is not None:
            next(iterator)
        count += 1
    end = time.perf_counter()
    return {"samples_per_s": count * batch_size / (end - first), "startup_s": first - start}


def main():
    from exgra_jax.runtime import setup_process  # noqa: PLC0415

    setup_process()  # CPU here: no TPU probing (libtpu is installed for AOT compiles)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=512)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--image_px", type=int, default=336)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()

    from exgra_jax.data.pipeline import DataConfig

    with tempfile.TemporaryDirectory() as tmp:
        json_path = make_data(tmp, args.num, args.image_px)
        tokenizer = make_tokenizer(tmp)
        cfg = DataConfig(
            json_paths=(json_path,), image_folder=os.path.join(tmp, "images"),
            template="llava_v0", max_len=1024, response_len=128, caption_len=256,
            image_size=224, image_aspect="crop", num_image_tokens=256,
            mm_use_im_start_end=True, batch_size=args.batch, num_epochs=1, seed=0,
        )
        rows = []
        for workers in args.workers:
            base = run_torch(json_path, cfg.image_folder, tokenizer, cfg, workers)
            ours = run_grain(cfg, tokenizer, workers)
            rows.append({"workers": workers,
                         "torch_samples_per_s": round(base["samples_per_s"], 1),
                         "grain_samples_per_s": round(ours["samples_per_s"], 1),
                         "ratio": round(ours["samples_per_s"] / base["samples_per_s"], 2),
                         "torch_startup_s": round(base["startup_s"], 2),
                         "grain_startup_s": round(ours["startup_s"], 2)})

    print(f"input pipeline: {args.num} JPEG {args.image_px}px examples, batch {args.batch}, "
          f"224px CLIP, T=1024 / Tr=128 / Tc=256, 256 image tokens")
    print(f"{'workers':>7} | {'torch samples/s':>15} | {'grain samples/s':>15} | "
          f"{'ratio':>5} | {'startup torch/grain s':>21}")
    for r in rows:
        print(f"{r['workers']:>7} | {r['torch_samples_per_s']:>15.1f} | "
              f"{r['grain_samples_per_s']:>15.1f} | {r['ratio']:>5.2f} | "
              f"{r['torch_startup_s']:>10.2f} / {r['grain_startup_s']:<8.2f}")
    print(json.dumps({"benchmark": "input_pipeline", "num_examples": args.num,
                      "batch_size": args.batch, "rows": rows}))


if __name__ == "__main__":
    main()
