"""How close does the IPFP quadratic matcher get to the optimum, per iteration count?

On the objective's own costs: correlated image/response/caption vectors go through
MultiGraphAlignment (solver "ipfp", training mode: dropout and Gumbel noise on), and the
unary and edge-pair costs of its six matchings are read back (the "costs" intermediate).
For each instance the reference energy is the best of
  * brute force over every partial matching (n <= 7), and
  * many restarts of an independent NumPy IPFP (dense gradient, scipy LAP), each from the
    LAP of the unary costs under strong random Gumbel noise,
  * and every matching our solver returned.
Reports per n and iteration count: the mean relative energy gap to that reference, the
share of instances at the reference (within 1e-6), the share never above the LAP start
(must be 100%), and the time of one jitted call solving the six matchings.

    python tools/experiments/matcher_quality.py [--sizes 6,7,16,32,64] [--iters 0,1,2,5,10,20,50]

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import time

import _peer  # tools/experiments/_peer.py
import numpy as np


# ----------------------------------------------------------------- independent reference
@functools.cache
def partial_matchings(n):
    """Every partial matching of n x n as col_for_row, -1 for unmatched: [M, n]."""
    cands = []
    for size in range(n + 1):
        for rows in itertools.combinations(range(n), size):
            for cols in itertools.permutations(range(n), size):
                c = np.full(n, -1)
                c[list(rows)] = cols
                cands.append(c)
    return np.stack(cands)


def brute_force(unary, quad, e1, e2):
    """Minimum energy over every partial matching."""
    n = unary.shape[0]
    c = partial_matchings(n)
    (s1, t1), (s2, t2) = e1, e2
    emap = np.full((n, n), -1)
    emap[s2, t2] = np.arange(len(s2))
    total = np.where(c >= 0, unary[np.arange(n), np.maximum(c, 0)], 0.0).sum(1)
    a, b = c[:, s1], c[:, t1]  # [M, E1]
    e = np.where((a >= 0) & (b >= 0), emap[np.maximum(a, 0), np.maximum(b, 0)], -1)
    total += np.where(e >= 0, quad[np.arange(len(s1)), np.maximum(e, 0)], 0.0).sum(1)
    return float(total.min())


# ----------------------------------------------------------------------------- ours
def objective_costs(n, seed, d=64):
    """The six matchings' (unary [6,n,n], quad [6,E,E], nbr [6,n,k]) of one training step."""
    import jax

    from exgra_jax.alignment.objective import AlignmentConfig, MultiGraphAlignment

    cfg = AlignmentConfig(solver="ipfp", graph_scope="global")
    keys = jax.random.split(jax.random.key(seed), 7)
    topic = jax.random.normal(keys[0], (n, d))
    feats = [topic + 0.7 * jax.random.normal(kk, (n, d)) for kk in keys[1:4]]
    mod = MultiGraphAlignment(cfg)
    params = mod.init(keys[4], *feats, deterministic=True)
    _, state = mod.apply(params, *feats, deterministic=False, mutable="intermediates",
                         rngs={"gumbel": keys[5], "dropout": keys[6]})
    unary, quad, nbr = state["intermediates"]["costs"][0]
    return (np.asarray(unary[0], np.float64), np.asarray(quad[0], np.float64),
            np.asarray(nbr[0]))


def our_solver():
    import jax

    from exgra_jax.alignment import assignment

    # num_iters is traced (fori_loop becomes a while loop): one compile per shape.
    one = lambda u, q, a, b, it: assignment.ipfp_matrix(u, q, a, b, num_iters=it)  # noqa: E731
    return jax.jit(jax.vmap(one, in_axes=(0, 0, 0, 0, None)))


def study(n, draws, iters_list, restarts, solve):
    import jax
    import jax.numpy as jnp

    peer = _peer.load()
    energy, partial_lap = peer.quadratic_energy, peer.scipy_partial_matching
    gaps = {it: [] for it in iters_list}
    above_lap = {it: 0 for it in iters_list}
    times = {}
    rng = np.random.default_rng(n)
    for draw in range(draws):
        unary, quad, nbr = objective_costs(n, seed=1000 * n + draw)
        args = [jnp.asarray(a, jnp.float32) for a in (unary, quad)] + [jnp.asarray(nbr)] * 2
        ours = {}
        for it in iters_list:
            x = jax.block_until_ready(solve(*args, it))
            if draw == 0:
                t0 = time.perf_counter()
                for _ in range(3):
                    jax.block_until_ready(solve(*args, it))
                times[it] = (time.perf_counter() - t0) / 3 * 1e3
            ours[it] = np.asarray(x, np.float64)
        for p in range(unary.shape[0]):
            e = peer.edge_lists(nbr[p])
            u, q = unary[p], quad[p]
            ref = [energy(ours[it][p], u, q, e, e) for it in iters_list]
            if n <= 7:
                ref.append(brute_force(u, q, e, e))
            for _ in range(restarts):
                noisy = u + rng.uniform(0.1, 1.0) * rng.gumbel(size=u.shape)
                ref.append(peer.numpy_ipfp(u, q, e, e, 30, x=partial_lap(noisy))[1])
            best = min(ref)
            e_lap = energy(partial_lap(u), u, q, e, e)
            for it in iters_list:
                e_it = energy(ours[it][p], u, q, e, e)
                gaps[it].append((e_it - best) / abs(best))
                above_lap[it] += e_it > e_lap + 1e-6 * abs(e_lap)
    rows = []
    for it in iters_list:
        g = np.array(gaps[it])
        rows.append(dict(n=n, iters=it, instances=len(g), mean_gap=float(g.mean()),
                         max_gap=float(g.max()), at_best=float(np.mean(g <= 1e-6)),
                         above_lap=int(above_lap[it]), ms_per_call=times[it],
                         reference="brute force + restarts" if n <= 7 else "restarts"))
    return rows


def main():
    from exgra_jax.runtime import setup_process  # noqa: PLC0415

    setup_process()  # CPU here: no TPU probing (libtpu is installed for AOT compiles)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="6,7,16,32,64")
    p.add_argument("--iters", default="0,1,2,5,10,20,50")
    p.add_argument("--draws", type=int, default=4, help="training steps per n (6 matchings each)")
    p.add_argument("--restarts", type=int, default=20)
    args = p.parse_args()
    solve = our_solver()
    iters_list = [int(i) for i in args.iters.split(",")]
    rows = []
    for n in args.sizes.split(","):
        rows += study(int(n), args.draws, iters_list, args.restarts, solve)
        print(f"# n = {n} done", flush=True)
    print("iters 0 = the LAP start (unary costs only); gap = (E - E_ref) / |E_ref|")
    print(f"{'n':>4}{'iters':>6}{'inst':>6}{'mean gap':>10}{'max gap':>9}{'at ref':>8}"
          f"{'> LAP':>7}{'ms/call (6)':>12}  reference")
    for r in rows:
        print(f"{r['n']:>4}{r['iters']:>6}{r['instances']:>6}{r['mean_gap']:>9.2%}"
              f"{r['max_gap']:>9.2%}{r['at_best']:>8.0%}{r['above_lap']:>7}"
              f"{r['ms_per_call']:>12.2f}  {r['reference']}")
    print(json.dumps({"experiment": "matcher_quality", "rows": rows}))


if __name__ == "__main__":
    main()
