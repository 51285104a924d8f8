"""Benchmark: the full multi-graph alignment objective, JAX vs a PyTorch peer.

Six matchings, forward + backward, d = 4096 (GNN d -> d), at n = 16, 64, 256.
The PyTorch peer follows the original ExGra-Med structure: per matching, a kNN
graph, a Python loop over edges for edge attributes, torch_geometric GraphConv
(aggr='max') on a two-graph Batch, and a CPU solver (scipy on the augmented
partial-matching matrix, since LPMP no longer installs) inside an
autograd.Function with the black-box backward. torch_geometric's knn_graph needs
pyg-lib, which has no wheel for this torch, so the peer computes the same edge
list (query -> neighbour, flow='target_to_source') with torch.cdist + topk.
Both sides use solver="lap" (unary costs), the default of AlignmentConfig.

  python tools/benchmarks/alignment.py [--sizes 16,64,256] [--dim 4096] [--repeats 3]

Prints a table, then one JSON line with the figures.
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import numpy as np

BIG = 1e9


def scipy_partial_matching(cost: np.ndarray) -> np.ndarray:
    """Partial matching (unmatched at cost 0) via the (n+m) x (m+n) augmented matrix."""
    from scipy.optimize import linear_sum_assignment

    n, m = cost.shape
    aug = np.zeros((n + m, m + n))
    aug[:n, :m] = cost
    aug[:n, m:] = np.where(np.eye(n, dtype=bool), 0.0, BIG)
    aug[n:, :m] = np.where(np.eye(m, dtype=bool), 0.0, BIG)
    rows, cols = linear_sum_assignment(aug)
    y = np.zeros((n, m))
    keep = (rows < n) & (cols < m)
    y[rows[keep], cols[keep]] = 1.0
    return y


def torch_knn_edge_index(x, k):
    """Edge list of knn_graph(x, k, loop=False, flow='target_to_source'): [query; neighbour]."""
    import torch

    dist = torch.cdist(x, x)
    dist.fill_diagonal_(float("inf"))
    nbr = dist.topk(k, largest=False).indices
    query = torch.arange(x.shape[0]).repeat_interleave(k)
    return torch.stack([query, nbr.reshape(-1)])


def make_torch_peer(weights, *, k=5, lam=80.0, message_flow="original", dropout=0.1):
    """Returns loss_fn(image, response, caption, node_noise=None, training=False)."""
    import torch
    from torch_geometric.data import Batch, Data
    from torch_geometric.nn import GraphConv

    convs = []
    for w_root, w_rel, bias in weights:
        conv = GraphConv(w_root.shape[0], w_root.shape[1], aggr="max")
        with torch.no_grad():
            conv.lin_root.weight.copy_(torch.tensor(np.asarray(w_root).T))
            conv.lin_rel.weight.copy_(torch.tensor(np.asarray(w_rel).T))
            conv.lin_rel.bias.copy_(torch.tensor(np.asarray(bias)))
        convs.append(conv)

    class BlackBoxMatching(torch.autograd.Function):
        @staticmethod
        def forward(ctx, unary):
            y = torch.as_tensor(scipy_partial_matching(unary.detach().double().numpy()))
            y = y.to(unary.dtype)
            ctx.save_for_backward(unary, y)
            return y

        @staticmethod
        def backward(ctx, grad_y):
            unary, y = ctx.saved_tensors
            moved = (unary + lam * grad_y).detach().double().numpy()
            y_lam = torch.as_tensor(scipy_partial_matching(moved)).to(unary.dtype)
            return -(y - y_lam) / lam

    def gm(x, y, node_noise, training):
        edge_index = torch_knn_edge_index(x.detach(), k)
        if message_flow == "forward":
            edge_index = edge_index.flip(0)
        # The original computes raw edge attributes edge by edge (later replaced).
        for feats in (x, y):
            torch.stack([feats[edge_index[0, e]] - feats[edge_index[1, e]]
                         for e in range(edge_index.shape[1])])
        batch = Batch.from_data_list(
            [Data(x=x, edge_index=edge_index), Data(x=y, edge_index=edge_index)]
        )
        h = batch.x
        for conv in convs:
            h = conv(h, batch.edge_index).relu()
        h = torch.nn.functional.dropout(h, p=dropout, training=training)
        n = x.shape[0]
        h1 = torch.nn.functional.normalize(h[:n], dim=1)
        h2 = torch.nn.functional.normalize(h[n:], dim=1)
        cos = h1 @ h2.T
        if node_noise is not None:
            cos = cos + node_noise
        unary = -(cos - 0.5)
        match = BlackBoxMatching.apply(unary)
        eye = torch.eye(n, dtype=match.dtype)
        return (match * (1 - eye) + (1 - match) * eye).mean(0).sum()

    def loss_fn(image, response, caption, node_noise=None, training=False):
        bary = (image + response + caption) / 3
        total = 0
        for mod in (image, response, caption):
            total = total + (gm(mod, bary, node_noise, training) +
                             gm(bary, mod, node_noise, training)) / 2
        return total / 3

    return loss_fn, convs


def _jax_loss(params, image, response, caption, *, module, rngs):
    return module.apply(params, image, response, caption, deterministic=False, rngs=rngs)[0]


def _bench_size(n: int, d: int, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp
    import torch
    from flax import linen as nn

    from exgra_jax.alignment.objective import AlignmentConfig, MultiGraphAlignment

    cfg = AlignmentConfig(graph_scope="global")
    module = MultiGraphAlignment(cfg)
    keys = jax.random.split(jax.random.key(n), 6)
    feats = [jax.random.normal(kk, (n, d), jnp.float32) for kk in keys[:3]]
    params = module.init({"params": keys[3]}, *feats, deterministic=True)
    loss = functools.partial(
        _jax_loss, module=module, rngs={"gumbel": keys[4], "dropout": keys[5]}
    )
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))

    gnn = nn.meta.unbox(params)["params"]["gnn"]
    weights = [
        tuple(np.asarray(gnn[f"conv{i}"][name]) for name in ("root_kernel", "rel_kernel", "bias"))
        for i in range(cfg.gnn_layers)
    ]
    peer, convs = make_torch_peer(weights, k=cfg.k, lam=cfg.blackbox_lambda)

    def run_jax():
        jax.block_until_ready(step(params, *feats))

    def run_torch(rep):
        inputs = [torch.tensor(np.asarray(f), requires_grad=True) for f in feats]
        noise = torch.from_numpy(np.random.default_rng(rep).gumbel(0, 0.05, (n, n))).float()
        for conv in convs:
            conv.zero_grad()
        peer(*inputs, node_noise=noise, training=True).backward()

    run_jax()  # compile
    run_torch(0)  # warm-up
    # The sides alternate, so that load from other processes hits both alike.
    t_jax, t_torch = [], []
    for rep in range(repeats):
        t0 = time.perf_counter()
        run_jax()
        t_jax.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        run_torch(rep + 1)
        t_torch.append(time.perf_counter() - t0)
    return dict(n=n, d=d, jax_s=min(t_jax), torch_s=min(t_torch),
                speedup=min(t_torch) / min(t_jax))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="16,64,256")
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = [_bench_size(int(n), args.dim, args.repeats) for n in args.sizes.split(",")]

    print(f"{'n':>5} {'d':>6} {'jax (s)':>10} {'torch peer (s)':>15} {'speedup':>8}")
    for r in rows:
        print(f"{r['n']:>5} {r['d']:>6} {r['jax_s']:>10.4f} {r['torch_s']:>15.4f} "
              f"{r['speedup']:>7.1f}x")
    print(json.dumps({"benchmark": "alignment_objective", "rows": rows}))


if __name__ == "__main__":
    main()
