"""Does fp16 loss scaling attenuate ExGra-Med's alignment gradient? (PyTorch, CPU.)

The original trains stage 2 with ``--fp16``: the Trainer scales the loss
(lm + alpha * align) by S (torch.amp.GradScaler, dynamic, from 2^16), back-propagates,
then divides every gradient by S before the optimizer step. The alignment gradient
passes through the solver's autograd Function, whose black-box backward solves again at
C + lambda * dL/dY and returns -(Y - Y_lambda) / lambda: a value in {0, +-1/lambda} that
does not grow with S although dL/dY does. After the division by S it is ~1/S of nominal.

This script follows that structure: a small shared "LLM" and projector make the image,
response and caption vectors; the alignment loss is the PyTorch peer of
tools/benchmarks/alignment.py (kNN + torch_geometric GraphConv per matching, a CPU
solver in an autograd.Function with the black-box backward; unary costs, as the scale
argument does not depend on the solver); the LM loss is a next-token cross-entropy.
The forward runs under torch.autocast("cpu", dtype=torch.float16) and the scaling is
torch.amp.GradScaler("cpu", init_scale=S) (scale, backward, unscale_). For each S it
reports the norm of the gradient reaching the shared weights (and the GNN) relative to
the same step without scaling (S = 1), for the alignment and the LM loss apart, and
checks the algebra in float32: scaling by S equals black-box lambda * S without scaling
(exgra_jax's alignment.emulated_loss_scale).

    python tools/experiments/fp16_loss_scale.py [--n 16] [--trials 5]

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json

import _peer  # tools/experiments/_peer.py
import numpy as np
import torch


class Shared(torch.nn.Module):
    """The weights both losses reach: a projector for images and a tiny LM."""

    def __init__(self, vocab=64, d=32, image_dim=24):
        super().__init__()
        self.projector = torch.nn.Linear(image_dim, d)
        self.embed = torch.nn.Embedding(vocab, d)
        self.body = torch.nn.Sequential(torch.nn.Linear(d, d), torch.nn.Tanh(),
                                        torch.nn.Linear(d, d), torch.nn.Tanh())
        self.head = torch.nn.Linear(d, vocab)

    def hidden(self, ids):
        return self.body(self.embed(ids))


def losses(model, peer, batch, noise):
    image, response, caption, text = batch
    lm_logits = model.head(model.hidden(text[:, :-1]))
    lm = torch.nn.functional.cross_entropy(lm_logits.float().reshape(-1, lm_logits.shape[-1]),
                                           text[:, 1:].reshape(-1))
    vecs = [model.projector(image), model.hidden(response).mean(1), model.hidden(caption).mean(1)]
    align = peer(*vecs, node_noise=noise, training=False)
    return lm, align


def grad_norms(model, convs, loss_fn, scale: float | None):
    """Gradient norms of the shared weights and the GNN after backward of loss_fn(),
    through a GradScaler at `scale` (None: plain fp32 backward, no scaling)."""
    params = list(model.parameters()) + [p for c in convs for p in c.parameters()]
    for p in params:
        p.grad = None
    opt = torch.optim.SGD(params, lr=0.0)
    if scale is None:
        loss_fn().backward()
    else:
        scaler = torch.amp.GradScaler("cpu", init_scale=scale)
        scaler.scale(loss_fn()).backward()
        scaler.unscale_(opt)  # divides every gradient by S, as before the optimizer step

    def norm(ps):
        return float(torch.sqrt(sum(((p.grad.float() ** 2).sum() for p in ps
                                     if p.grad is not None), torch.zeros(()))))

    return norm(list(model.parameters())), norm([p for c in convs for p in c.parameters()])


def trial(seed: int, n: int, scales, lam: float, d: int = 32) -> list[dict]:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = Shared(d=d)
    weights = [(rng.uniform(-d ** -0.5, d ** -0.5, (d, d)), rng.uniform(-d ** -0.5, d ** -0.5, (d, d)),
                np.zeros(d)) for _ in range(2)]
    peer_mod = _peer.load()
    topic = torch.randn(n, 24)  # the three views of a sample share a topic
    batch = (topic + 0.5 * torch.randn(n, 24),
             torch.randint(0, 64, (n, 12)), torch.randint(0, 64, (n, 20)),
             torch.randint(0, 64, (n, 16)))
    noise = torch.from_numpy(rng.gumbel(0, 0.05, (n, n))).float()

    def run(which, scale, lam_eff, fp16=True):
        peer, convs = peer_mod.make_torch_peer(weights, k=5, lam=lam_eff)

        def loss_fn():
            with torch.autocast("cpu", dtype=torch.float16, enabled=fp16):
                lm, align = losses(model, peer, batch, noise)
            return align if which == "align" else lm

        return grad_norms(model, convs, loss_fn, scale)

    base = {w: run(w, None, lam) for w in ("align", "lm")}
    rows = []
    for s in scales:
        scaled = {w: run(w, s, lam) for w in ("align", "lm")}
        # The algebra, in float32 (fp16 would underflow the unscaled lambda*S gradient):
        # scaling by S gives the gradient of black-box lambda * S without scaling.
        scaled32 = run("align", s, lam, fp16=False)[0]
        as_lambda = run("align", None, lam * s, fp16=False)[0]
        rows.append(dict(
            seed=seed, scale=s,
            align_shared_ratio=scaled["align"][0] / base["align"][0],
            align_gnn_ratio=scaled["align"][1] / base["align"][1],
            lm_shared_ratio=scaled["lm"][0] / base["lm"][0],
            lambda_times_s_rel_diff=abs(as_lambda - scaled32) / scaled32,
        ))
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--lam", type=float, default=80.0)
    args = p.parse_args()
    scales = [2.0 ** e for e in (0, 4, 8, 12, 16)]
    rows = [r for t in range(args.trials) for r in trial(t, args.n, scales, args.lam)]
    keys = ("align_shared_ratio", "align_gnn_ratio", "lm_shared_ratio", "lambda_times_s_rel_diff")
    print(f"n = {args.n}, lambda = {args.lam}, {args.trials} trials (min / median / max)")
    print(f"{'S':>7}{'1/S':>10}" + "".join(f"{k:>34}" for k in keys))
    summary = []
    for s in scales:
        sel = [r for r in rows if r["scale"] == s]
        stat = {k: [float(np.min([r[k] for r in sel])), float(np.median([r[k] for r in sel])),
                    float(np.max([r[k] for r in sel]))] for k in keys}
        summary.append({"scale": s, **stat})
        print(f"{s:>7.0f}{1 / s:>10.2e}" + "".join(
            f"{v[0]:>10.2e} {v[1]:>10.2e} {v[2]:>10.2e} " for v in stat.values()))
    print(json.dumps({"experiment": "fp16_loss_scale", "n": args.n, "lambda": args.lam,
                      "autocast": "cpu float16", "summary": summary, "rows": rows}))


if __name__ == "__main__":
    main()
