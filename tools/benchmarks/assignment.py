"""Benchmark: time per linear assignment solve, exgra_jax vs scipy and lap.lapjv.

Random uniform square costs, n = 16 .. 256, one solve and a batch of 6 (vmapped
for JAX, a Python loop for the CPU libraries). Median of --repeats timed calls
after a warm-up (JAX compile excluded). Sides alternate within each repeat.

Two JAX figures: a jitted call per solve (what a host loop pays, dispatch included),
and "in graph": the time per solve when many solves run inside one jitted program,
as the train step runs them (no dispatch; `lax.map` over --in-graph problems).

  python tools/benchmarks/assignment.py [--sizes 16,32,64,128,256] [--repeats 20]

Prints a table, then one JSON line with the figures.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def _interleaved(sides, repeats):
    """Median seconds per call of each side; the sides alternate within every repeat."""
    for fn in sides.values():
        fn()
    times = {k: [] for k in sides}
    for _ in range(repeats):
        for k, fn in sides.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: float(np.median(v)) for k, v in times.items()}


def _bench_size(n, fns, repeats, in_graph):
    import jax.numpy as jnp
    import lap
    from scipy.optimize import linear_sum_assignment

    rng = np.random.default_rng(n)
    costs = rng.random((6, n, n))
    c_jax = jnp.asarray(costs, jnp.float32)
    many = jnp.asarray(rng.random((in_graph, 6, n, n)), jnp.float32)
    one = c_jax[0]
    sides = {
        "jax_1": lambda: fns["single"](one).block_until_ready(),
        "jax_6": lambda: fns["batched"](c_jax).block_until_ready(),
        "graph_1": lambda: fns["graph_single"](many).block_until_ready(),
        "graph_6": lambda: fns["graph_batched"](many).block_until_ready(),
        "scipy_1": lambda: linear_sum_assignment(costs[0]),
        "scipy_6": lambda: [linear_sum_assignment(c) for c in costs],
        "lapjv_1": lambda: lap.lapjv(costs[0]),
        "lapjv_6": lambda: [lap.lapjv(c) for c in costs],
    }
    row = dict(n=n, **_interleaved(sides, repeats))
    row["graph_1"] /= in_graph
    row["graph_6"] /= in_graph
    for b in ("1", "6"):
        row[f"jax_over_scipy_{b}"] = row[f"jax_{b}"] / row[f"scipy_{b}"]
        row[f"graph_over_scipy_{b}"] = row[f"graph_{b}"] / row[f"scipy_{b}"]
    return row


def main():
    from exgra_jax.runtime import setup_process  # noqa: PLC0415

    setup_process()  # CPU here: no TPU probing (libtpu is installed for AOT compiles)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="16,32,64,128,256")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--in-graph", type=int, default=8,
                        help="problems per jitted program for the in-graph figures")
    args = parser.parse_args()

    import jax

    from exgra_jax.alignment.assignment import lap_col_for_row

    batched = jax.vmap(lap_col_for_row)
    fns = {
        "single": jax.jit(lap_col_for_row),
        "batched": jax.jit(batched),
        "graph_single": jax.jit(lambda c: jax.lax.map(lap_col_for_row, c[:, 0])),
        "graph_batched": jax.jit(lambda c: jax.lax.map(batched, c)),
    }
    rows = [_bench_size(int(n), fns, args.repeats, args.in_graph)
            for n in args.sizes.split(",")]

    us = 1e6
    print("microseconds per solve (batch 1) or per batch of 6; x: JAX / scipy")
    print(f"{'n':>4} | {'jit call':>9} {'in graph':>9} {'scipy':>8} {'lapjv':>8} "
          f"{'x call':>7} {'x graph':>7} | {'jit call':>9} {'in graph':>9} {'scipy':>8} "
          f"{'lapjv':>8} {'x call':>7} {'x graph':>7}")
    for r in rows:
        cells = []
        for b in ("1", "6"):
            cells.append(f"{r['jax_' + b] * us:>9.0f} {r['graph_' + b] * us:>9.0f} "
                         f"{r['scipy_' + b] * us:>8.0f} {r['lapjv_' + b] * us:>8.0f} "
                         f"{r['jax_over_scipy_' + b]:>7.1f} {r['graph_over_scipy_' + b]:>7.1f}")
        print(f"{r['n']:>4} | " + " | ".join(cells))
    print(json.dumps({"benchmark": "assignment", "unit": "seconds", "rows": rows}))


if __name__ == "__main__":
    main()
