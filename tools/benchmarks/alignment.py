"""Benchmark: the full multi-graph alignment objective, JAX vs a PyTorch peer.

Six matchings, forward + backward, d = 4096 (GNN d -> d), at n = 16, 64, 256.
The PyTorch peer follows the original ExGra-Med structure: per matching, a kNN
graph, a Python loop over edges for edge attributes, torch_geometric GraphConv
(aggr='max') on a two-graph Batch, and a CPU solver (scipy on the augmented
partial-matching matrix, since LPMP no longer installs) inside an
autograd.Function with the black-box backward. torch_geometric's knn_graph needs
pyg-lib, which has no wheel for this torch, so the peer computes the same edge
list (query -> neighbour, flow='target_to_source') with torch.cdist + topk.
With --solver ipfp (the default of AlignmentConfig, the original's quadratic problem)
the peer also builds the edge features and the [E, E] edge-pair costs with their Gumbel
noise, as the original, and its autograd Function runs a NumPy IPFP (`numpy_ipfp`, the
same algorithm and iteration count as ours; LPMP itself no longer installs) with the
black-box backward for both cost tensors; --solver lap compares the unary-only versions.

  python tools/benchmarks/alignment.py [--sizes 16,64,256] [--dim 4096] [--repeats 3]
      [--solver ipfp|lap]

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


# --- a NumPy quadratic matcher (IPFP), independent of exgra_jax; edges as (src, dst) lists
def edge_lists(nbr_nk):
    n, k = nbr_nk.shape
    return np.repeat(np.arange(n), k), nbr_nk.reshape(-1)


def quadratic_energy(x, unary, quad, e1, e2):
    (s1, t1), (s2, t2) = e1, e2
    return float((unary * x).sum() + (quad * x[s1][:, s2] * x[t1][:, t2]).sum())


def edge_pair_indicator(x, e1, e2):
    (s1, t1), (s2, t2) = e1, e2
    return x[s1][:, s2] * x[t1][:, t2]


def numpy_ipfp(unary, quad, e1, e2, iters, x=None):
    """Frank-Wolfe over partial matchings with exact line search, from x (default: the
    LAP of the unary costs); returns the lowest-energy discrete matching and its energy."""
    (s1, t1), (s2, t2) = e1, e2
    x = scipy_partial_matching(unary) if x is None else x
    best, best_e = x, quadratic_energy(x, unary, quad, e1, e2)
    for _ in range(iters):
        g = unary.copy()
        np.add.at(g, (s1[:, None], s2[None, :]), quad * x[t1][:, t2])
        np.add.at(g, (t1[:, None], t2[None, :]), quad * x[s1][:, s2])
        b = scipy_partial_matching(g)
        e_b = quadratic_energy(b, unary, quad, e1, e2)
        if e_b < best_e:
            best, best_e = b, e_b
        d = b - x
        slope = float((g * d).sum())
        curv = quadratic_energy(d, unary, quad, e1, e2) - float((unary * d).sum())
        t = 1.0 if curv <= 0 else min(max(-slope / (2 * curv), 0.0), 1.0)
        x = x + t * d
    return best, best_e


def torch_knn_edge_index(x, k):
    """Edge list of knn_graph(x, k, loop=False, flow='target_to_source'): [query; neighbour]."""
    import torch

    dist = torch.cdist(x, x)
    dist.fill_diagonal_(float("inf"))
    nbr = dist.topk(k, largest=False).indices
    query = torch.arange(x.shape[0]).repeat_interleave(k)
    return torch.stack([query, nbr.reshape(-1)])


def make_torch_peer(weights, *, k=5, lam=80.0, message_flow="original", dropout=0.1,
                    solver="lap", ipfp_iters=10):
    """Returns loss_fn(image, response, caption, node_noise=None, training=False,
    edge_noise=None); edge_noise(num_edges) -> [E, E] noise, drawn per matching."""
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

    class BlackBoxQuadratic(torch.autograd.Function):
        """The quadratic problem, as LPMP's GraphMatchingModule: Y from (unary, quad);
        backward solves at unary + lam * dL/dY, -(Y - Y_lam) / lam for the unary costs and
        the same of the edge-pair indicators for the quadratic ones."""

        @staticmethod
        def forward(ctx, unary, quad, nbr):
            e = edge_lists(nbr.numpy())
            u, q = unary.detach().double().numpy(), quad.detach().double().numpy()
            y = numpy_ipfp(u, q, e, e, ipfp_iters)[0]
            ctx.save_for_backward(unary, quad, nbr, torch.as_tensor(y))
            return torch.as_tensor(y).to(unary.dtype)

        @staticmethod
        def backward(ctx, grad_y):
            unary, quad, nbr, y = ctx.saved_tensors
            e = edge_lists(nbr.numpy())
            u = (unary + lam * grad_y).detach().double().numpy()
            y_lam = numpy_ipfp(u, quad.detach().double().numpy(), e, e, ipfp_iters)[0]
            z, z_lam = (edge_pair_indicator(a, e, e) for a in (y.numpy(), y_lam))
            g_u = -(y.numpy() - y_lam) / lam
            g_q = -(z - z_lam) / lam
            return (torch.as_tensor(g_u).to(unary.dtype), torch.as_tensor(g_q).to(quad.dtype),
                    None)

    def gm(x, y, node_noise, training, edge_noise):
        knn = edge_index = torch_knn_edge_index(x.detach(), k)
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
        if solver == "lap":
            match = BlackBoxMatching.apply(unary)
        else:
            # Edges query -> neighbour (e = i * k + t), features x_query - x_neighbour.
            query, nbr = knn
            e1, e2 = (torch.nn.functional.normalize(hh[query] - hh[nbr], dim=1)
                      for hh in (h[:n], h[n:]))
            quad = e1 @ e2.T
            if edge_noise is not None:
                quad = quad + edge_noise(quad.shape[0])
            quad = -0.5 * (quad - 0.5)
            match = BlackBoxQuadratic.apply(unary, quad, nbr.reshape(n, k))
        eye = torch.eye(n, dtype=match.dtype)
        return (match * (1 - eye) + (1 - match) * eye).mean(0).sum()

    def loss_fn(image, response, caption, node_noise=None, training=False, edge_noise=None):
        bary = (image + response + caption) / 3
        total = 0
        for mod in (image, response, caption):
            total = total + (gm(mod, bary, node_noise, training, edge_noise) +
                             gm(bary, mod, node_noise, training, edge_noise)) / 2
        return total / 3

    return loss_fn, convs


def _jax_loss(params, image, response, caption, *, module, rngs):
    return module.apply(params, image, response, caption, deterministic=False, rngs=rngs)[0]


def _bench_size(n: int, d: int, repeats: int, solver: str) -> dict:
    import jax
    import jax.numpy as jnp
    import torch
    from flax import linen as nn

    from exgra_jax.alignment.objective import AlignmentConfig, MultiGraphAlignment

    cfg = AlignmentConfig(graph_scope="global", solver=solver)
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
    peer, convs = make_torch_peer(weights, k=cfg.k, lam=cfg.blackbox_lambda, solver=solver,
                                  ipfp_iters=cfg.ipfp_iters)

    def run_jax():
        jax.block_until_ready(step(params, *feats))

    def run_torch(rep):
        inputs = [torch.tensor(np.asarray(f), requires_grad=True) for f in feats]
        rng = np.random.default_rng(rep)
        noise = torch.from_numpy(rng.gumbel(0, 0.05, (n, n))).float()

        def edge_noise(e):
            return torch.from_numpy(rng.gumbel(0, 0.05, (e, e))).float()

        for conv in convs:
            conv.zero_grad()
        peer(*inputs, node_noise=noise, training=True, edge_noise=edge_noise).backward()

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
    return dict(n=n, d=d, solver=solver, jax_s=min(t_jax), torch_s=min(t_torch),
                speedup=min(t_torch) / min(t_jax))


def main():
    from exgra_jax.runtime import setup_process  # noqa: PLC0415

    setup_process()  # CPU here: no TPU probing (libtpu is installed for AOT compiles)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="16,64,256")
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--solver", default="ipfp", choices=["ipfp", "lap"])
    args = parser.parse_args()

    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = [_bench_size(int(n), args.dim, args.repeats, args.solver)
            for n in args.sizes.split(",")]

    print(f"{'n':>5} {'d':>6} {'solver':>7} {'jax (s)':>10} {'torch peer (s)':>15} {'speedup':>8}")
    for r in rows:
        print(f"{r['n']:>5} {r['d']:>6} {r['solver']:>7} {r['jax_s']:>10.4f} {r['torch_s']:>15.4f} "
              f"{r['speedup']:>7.1f}x")
    print(json.dumps({"benchmark": "alignment_objective", "rows": rows}))


if __name__ == "__main__":
    main()
