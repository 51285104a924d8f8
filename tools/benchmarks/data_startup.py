"""Training-iterator start-up time against the number of records (10k vs 500k by default).

Writes a LLaVA-Med JSON file of N records whose images cycle over a few small PNG files,
then times, for each N: building the file's byte-span index (once per file version, on the
first open), parsing the JSON whole (what every start-up did before the index), opening the
source from its cached index, and building the training iterator and taking its first batch
(what a host waits for before training starts). Records are parsed and checked, and image
files opened, only when read, so start-up should not grow with N.

  python tools/benchmarks/data_startup.py [--sizes 10000 500000] [--images 8]

Prints a table and, last, one JSON line with the figures (seconds and ratios).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def write_records(directory: str, num: int, num_images: int) -> str:
    """N small records cycling over `num_images` PNG files in directory/images."""
    from PIL import Image

    rng = np.random.default_rng(0)
    images = os.path.join(directory, "images")
    os.makedirs(images, exist_ok=True)
    names = [f"{i:03d}.png" for i in range(num_images)]
    for name in names:
        pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(images, name))
    records = [
        {"id": str(i), "image": names[i % num_images],
         "conversations": [{"from": "human", "value": f"<image>\nWhat is shown in scan {i}?"},
                           {"from": "gpt", "value": "a small nodule in the left lung."}]}
        for i in range(num)
    ]
    path = os.path.join(directory, f"data_{num}.json")
    with open(path, "w") as f:
        json.dump(records, f)
    return path


def _best_of(fn, repeats: int) -> float:
    """The shortest of `repeats` timings: the least disturbed by other processes."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(json_path: str, image_folder: str, tokenizer, batch_size: int,
            repeats: int) -> dict:
    from exgra_jax.data.pipeline import DataConfig, make_train_iterator
    from exgra_jax.data.sources import JsonSource

    def parse():
        with open(json_path) as f:
            return json.load(f)

    cfg = DataConfig(json_paths=(json_path,), image_folder=image_folder, max_len=128,
                     response_len=16, caption_len=16, image_size=32, num_image_tokens=4,
                     batch_size=batch_size, seed=0)

    def first_batch():
        iterator = make_train_iterator(cfg, tokenizer, 0, 1)
        next(iterator)
        iterator.close()

    start = time.perf_counter()
    source = JsonSource(json_path, image_folder)  # builds the index (cache is fresh)
    index_s = time.perf_counter() - start
    return {"records": len(source), "index_once_s": index_s,
            "parse_s": _best_of(parse, repeats),
            "open_source_s": _best_of(lambda: JsonSource(json_path, image_folder), repeats),
            "startup_s": _best_of(first_batch, repeats)}


def main():
    from exgra_jax.runtime import setup_process  # noqa: PLC0415

    setup_process()  # CPU here: no TPU probing (libtpu is installed for AOT compiles)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 500_000])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from input_pipeline import make_tokenizer  # the sibling benchmark's tiny tokenizer

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["EXGRA_DATA_CACHE"] = os.path.join(tmp, "index_cache")  # a fresh cache
        tokenizer = make_tokenizer(tmp)
        for num in args.sizes:
            path = write_records(tmp, num, args.images)
            row = measure(path, os.path.join(tmp, "images"), tokenizer, args.batch,
                          args.repeats)
            rows.append(row)
            os.remove(path)
    small, large = rows[0], rows[-1]
    growth = {key: round(large[key] / small[key], 2)
              for key in ("index_once_s", "parse_s", "open_source_s", "startup_s")}
    rows = [{k: round(v, 5) if isinstance(v, float) else v for k, v in r.items()} for r in rows]

    print(f"data start-up: training iterator to its first batch (batch {args.batch}); "
          f"records cycle over {args.images} PNG files; best of {args.repeats}")
    print(f"{'records':>8} | {'index once s':>12} | {'parse JSON s':>12} | "
          f"{'open source s':>13} | {'start-up s':>10}")
    for r in rows:
        print(f"{r['records']:>8} | {r['index_once_s']:>12.4f} | {r['parse_s']:>12.4f} | "
              f"{r['open_source_s']:>13.4f} | {r['startup_s']:>10.4f}")
    print(f"growth {large['records']} / {small['records']} records: "
          + ", ".join(f"{k} x{v}" for k, v in growth.items()))
    print(json.dumps({"benchmark": "data_startup", "batch_size": args.batch,
                      "images": args.images, "repeats": args.repeats, "rows": rows,
                      "growth": growth}))


if __name__ == "__main__":
    main()
