"""Benchmark: the OpenAI-compatible server under concurrent load vs one request at a time.

The script builds the demo data set (tokenizer, images), a workdir holding a random model
of configs/demo.py's size (4 layers, d=128, 64 px images / 16 px patches; the
vocabulary of the data set's tokenizer), and starts
``python -m exgra_jax.serve --workdir ...`` on 127.0.0.1 (one CPU device). Every request
asks one question about one image (a data URL), greedy, ``--max-tokens`` new tokens.

  sequential: the N requests sent one after another by one client;
  concurrent: --clients clients (threads) sending --requests-each requests each, N in all.

Both phases run after a warm-up (compiles), on the same server, in one run; reported:
answers/s, generated tokens/s, p50/p99 latency, failed requests, the speed-up of the
concurrent phase, and the server's resident memory (VmRSS) after the warm-up and at the end.

  python tools/benchmarks/serve.py [--clients 32] [--requests-each 4] [--max-tokens 16]

Prints a table, then one JSON line with the figures.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
from tools.benchmarks._common import table  # noqa: E402

QUESTIONS = ("What is shown?", "Which organ is this?", "Is there an abnormality?",
             "Describe the image in detail.", "What imaging modality was used here?",
             "Where is the lesion located relative to the midline?")


def make_workdir(root: str) -> str:
    """Demo data and a workdir (config.json + one checkpoint of random weights)."""
    import jax  # noqa: PLC0415
    import ml_collections  # noqa: PLC0415

    from configs import demo  # noqa: PLC0415
    from exgra_jax.checkpoint import Checkpointer, param_shapes  # noqa: PLC0415
    from exgra_jax.data.tokenizer import load_tokenizer, special_token_ids  # noqa: PLC0415
    from exgra_jax.models.config import ModelConfig  # noqa: PLC0415
    from exgra_jax.models.llava import init_params  # noqa: PLC0415

    data = os.path.join(root, "data")
    subprocess.run([sys.executable, os.path.join(REPO, "tools", "make_demo_data.py"),
                    "--out", data, "--num-images", "8"], check=True, capture_output=True)
    config = demo.get_config(data)
    ids = special_token_ids(load_tokenizer(config.tokenizer))  # this data set's vocabulary
    config.model.vocab_size = max(ids.values()) + 1
    config.model.image_token_id, config.model.pad_token_id = ids["image_patch"], ids["pad"]
    mcfg = ModelConfig.from_dict(config.model.to_dict())
    params = init_params(mcfg, jax.random.key(0))
    workdir = os.path.join(root, "run")
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    ckpt.save(1, {"step": np.int32(1), "params": {"model": params}},
              meta={"model": mcfg.to_dict(), "param_shapes": param_shapes({"model": params})},
              force=True)
    ckpt.close()
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(ml_collections.ConfigDict(config).to_json_best_effort(indent=2))
    return workdir


def post(url: str, body: dict, timeout: float = 600) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kb / 1024


def run_phase(url: str, bodies: list[dict], clients: int) -> dict:
    """Send ``bodies`` from ``clients`` threads (each takes every clients-th body)."""
    latencies, tokens, failures = [], [], []
    lock = threading.Lock()

    def client(share):
        for body in share:
            t0 = time.perf_counter()
            try:
                reply = post(url, body)
                n = reply["usage"]["completion_tokens"]
            except (OSError, urllib.error.URLError, KeyError, ValueError) as e:
                with lock:
                    failures.append(repr(e))
                continue
            with lock:
                latencies.append(time.perf_counter() - t0)
                tokens.append(n)

    threads = [threading.Thread(target=client, args=(bodies[i::clients],))
               for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = np.asarray(latencies) if latencies else np.zeros(1)
    return {"requests": len(bodies), "failed": len(failures), "wall_s": wall,
            "answers_per_s": len(latencies) / wall, "tokens_per_s": sum(tokens) / wall,
            "p50_s": float(np.percentile(lat, 50)), "p99_s": float(np.percentile(lat, 99)),
            "errors": failures[:3]}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests-each", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--max-batch", type=int, default=32)
    args = p.parse_args()

    root = tempfile.mkdtemp(prefix="exgra_serve_bench_")
    workdir = make_workdir(root)
    images = sorted(os.listdir(os.path.join(root, "data", "images")))
    urls = []
    for name in images:
        with open(os.path.join(root, "data", "images", name), "rb") as f:
            urls.append("data:image/png;base64," + base64.b64encode(f.read()).decode())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    log = open(os.path.join(root, "server.log"), "w")  # noqa: SIM115
    server = subprocess.Popen(
        [sys.executable, "-m", "exgra_jax.serve", "--workdir", workdir, "--port", str(port),
         "--max_batch", str(args.max_batch), "--model_name", "demo"],
        env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if server.poll() is not None:
                raise SystemExit(open(log.name).read()[-3000:])
            try:
                urllib.request.urlopen(base + "/health", timeout=5)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("the server did not come up") from None
                time.sleep(0.5)
        n = args.clients * args.requests_each
        bodies = [{"model": "demo", "temperature": 0, "max_tokens": args.max_tokens,
                   "messages": [{"role": "user", "content": [
                       {"type": "text", "text": QUESTIONS[i % len(QUESTIONS)]},
                       {"type": "image_url", "image_url": {"url": urls[i % len(urls)]}}]}]}
                  for i in range(n)]
        chat = base + "/v1/chat/completions"
        # Warm-up: compile the batch-of-one and the batched programs.
        run_phase(chat, bodies[:2], 1)
        run_phase(chat, bodies, args.clients)
        run_phase(chat, bodies, args.clients)
        rss_before = rss_mb(server.pid)
        batches_before = json.loads(urllib.request.urlopen(base + "/health").read())["batches"]
        sequential = run_phase(chat, bodies, 1)
        batches_mid = json.loads(urllib.request.urlopen(base + "/health").read())["batches"]
        concurrent = run_phase(chat, bodies, args.clients)
        batches_after = json.loads(urllib.request.urlopen(base + "/health").read())["batches"]
        rss_after = rss_mb(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()

    concurrent["generate_calls"] = batches_after - batches_mid
    sequential["generate_calls"] = batches_mid - batches_before
    rows = [[name, r["requests"], r["failed"], r["generate_calls"], r["answers_per_s"],
             r["tokens_per_s"], r["p50_s"], r["p99_s"], r["wall_s"]]
            for name, r in (("sequential (1 client)", sequential),
                            (f"concurrent ({args.clients} clients)", concurrent))]
    print(table(["phase", "requests", "failed", "generate calls", "answers/s", "tokens/s",
                 "p50 s", "p99 s", "wall s"], rows))
    speedup = concurrent["answers_per_s"] / sequential["answers_per_s"]
    print(f"\nspeed-up (answers/s): {speedup:.2f}x; server RSS {rss_before:.0f} MB after "
          f"warm-up, {rss_after:.0f} MB at the end; batching: per batch (not continuous)")
    print(json.dumps({"benchmark": "serve", "clients": args.clients,
                      "requests": args.clients * args.requests_each,
                      "max_tokens": args.max_tokens, "batching": "per-batch",
                      "sequential": sequential, "concurrent": concurrent,
                      "speedup_answers_per_s": speedup,
                      "speedup_tokens_per_s": concurrent["tokens_per_s"]
                      / sequential["tokens_per_s"],
                      "rss_mb_before": rss_before, "rss_mb_after": rss_after}))


if __name__ == "__main__":
    main()
