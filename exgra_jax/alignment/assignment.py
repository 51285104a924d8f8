"""Assignment solvers that run inside jit and vmap on any backend.

* `lap_col_for_row`: exact linear assignment (minimum cost) by shortest augmenting
  paths with dual potentials (the Jonker-Volgenant / Crouse family, the algorithm
  behind `scipy.optimize.linear_sum_assignment`), warm-started by row reduction.
  Every loop is a `lax.while_loop` over fixed-shape state, so it jits and vmaps.
* `lap_matrix`, `partial_lap_matrix`: the same as 0/1 matrices; the partial version
  lets nodes stay unmatched (LPMP's graph matching model).
* `ipfp_matrix`: quadratic graph matching (unary + edge-pair costs) by IPFP /
  Frank-Wolfe with exact line search over partial matchings, keeping the best
  discrete iterate. The quadratic term is only ever evaluated over kNN edge pairs
  ([E1, E2] with E = n * k), never as an [n^2, n^2] matrix.

Edges are given in the kNN layout of `graph.py`: `nbr_nk[i, t]` is the t-th edge
out of node i, i.e. edge e = i * k + t runs from node i to node nbr_nk[i, t].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

_FREE = -1


def _check_cost(cost, name="cost"):
    if cost.ndim != 2:
        raise ValueError(f"{name} must be a 2-D [rows, cols] matrix, got shape {cost.shape}")
    if not jnp.issubdtype(cost.dtype, jnp.floating):
        raise ValueError(f"{name} must be floating point, got {cost.dtype}")


def _first_index(mask):
    """Index of the first True in a 1-D mask, or its length if none. (XLA:CPU runs
    argmin/argmax as slow variadic reductions; a plain min over indices is fast.)"""
    size = mask.shape[0]
    return jnp.min(jnp.where(mask, jnp.arange(size, dtype=jnp.int32), size))


def lap_col_for_row(cost_nm: jax.Array) -> jax.Array:
    """Minimum-cost assignment of every row to a distinct column (rows <= cols).

    Returns col_for_row [n] int32. Costs must be finite. Exact: each augmentation
    is a Dijkstra search on reduced costs (shortest augmenting path with dual
    potentials), so the result is optimal up to floating point rounding.

    Under vmap, batches of up to `_VMAP_MAX_ROWS` rows are solved in lockstep (the
    fixed cost of a loop step is shared); larger ones one after another, because in
    lockstep every augmentation waits for the longest search in the batch.
    """
    _check_cost(cost_nm)
    n, m = cost_nm.shape
    if n > m:
        raise ValueError(f"lap_col_for_row needs rows <= cols, got {n} x {m}; transpose it")
    return _lap_batchable(cost_nm)


# Measured on CPU (tools/benchmarks/assignment.py): lockstep wins up to n = 64-128.
_VMAP_MAX_ROWS = 128


@jax.custom_batching.custom_vmap
def _lap_batchable(cost_nm):
    return _lap_solve(cost_nm)


@_lap_batchable.def_vmap
def _lap_vmap_rule(axis_size, in_batched, cost_bnm):
    (batched,) = in_batched
    if not batched:
        return _lap_batchable(cost_bnm), False
    if cost_bnm.shape[-2] <= _VMAP_MAX_ROWS:
        return jax.vmap(_lap_solve)(cost_bnm), True
    return lax.map(_lap_batchable, cost_bnm), True


def _lap_solve(cost_nm):
    n, m = cost_nm.shape
    dtype = cost_nm.dtype
    inf = jnp.array(jnp.inf, dtype)
    zero = jnp.zeros((), dtype)
    rows = jnp.arange(n, dtype=jnp.int32)
    cols = jnp.arange(m, dtype=jnp.int32)

    # Warm start (row reduction): u_i = min_j C_ij, v = 0 is dual feasible, and each
    # column claimed as the row minimum by exactly one winning row is a tight edge.
    u = cost_nm.min(axis=1)
    v = jnp.zeros((m,), dtype)
    best_col = jnp.min(jnp.where(cost_nm == u[:, None], cols, m), axis=1)
    claimed_by = jnp.min(jnp.where(best_col[None, :] == cols[:, None], rows, n), axis=1)
    col_for_row = jnp.where(claimed_by[best_col] == rows, best_col, _FREE)
    row_for_col = jnp.where(claimed_by < n, claimed_by, _FREE)
    if n == m:
        # Then column reduction of the free columns (as Jonker-Volgenant; square only:
        # rectangular problems need v = 0 on the columns left free): v_j = min_i C_ij - u_i
        # keeps every reduced cost >= 0 and makes a tight edge in column j, which takes
        # its row if that row is free and no earlier column took it. Better potentials
        # from the start shorten the searches below (3-4x faster at n = 16-64).
        free_col = row_for_col == _FREE
        slack = cost_nm - u[:, None]
        v = jnp.where(free_col, slack.min(axis=0), zero)
        tight_row = jnp.min(jnp.where(slack == v, rows[:, None], n), axis=0)
        tight_row_c = jnp.minimum(tight_row, n - 1)
        row_free = col_for_row == _FREE
        offer = free_col & (tight_row < n) & row_free[tight_row_c]
        first_offer = jnp.min(jnp.where(offer & (tight_row == rows[:, None]), cols, m), axis=1)
        col_for_row = jnp.where(row_free & (first_offer < m), first_offer, col_for_row)
        row_for_col = jnp.where(offer & (first_offer[tight_row_c] == cols), tight_row,
                                row_for_col)

    # The loops are nested (rows; Dijkstra steps; path edges) so that the step that
    # runs most often, one Dijkstra step, is as few XLA ops as possible: on XLA:CPU
    # the time per step is mostly a fixed cost per op.
    def search(cur, u, v, r4c):
        """Dijkstra from free row `cur` on reduced costs to the nearest free column.
        spc: shortest path cost per column; path: the row that reached it."""

        def body(s):
            i, min_val, spc, path, scanned, _, _ = s
            reduced = min_val + cost_nm[i] - u[i] - v
            better = (reduced < spc) & ~scanned
            path = jnp.where(better, i, path)
            spc = jnp.where(better, reduced, spc)
            open_spc = jnp.where(scanned, inf, spc)
            lowest = open_spc.min()
            # The first column at the lowest cost, a free one preferred (it ends the
            # search), in one reduction.
            key = jnp.min(jnp.where(open_spc == lowest, jnp.where(r4c < 0, cols, cols + m),
                                    2 * m))
            found = key < m
            j = jnp.where(found, key, key - m)
            scanned = scanned | (cols == j)
            return jnp.maximum(r4c[j], 0), lowest, spc, path, scanned, j, found

        # `cur >= n` (nothing left; only reached under vmap) must not search: with
        # every column taken it would never find a free one.
        init = (jnp.minimum(cur, n - 1), zero, jnp.full((m,), inf),
                jnp.full((m,), _FREE, jnp.int32), jnp.zeros((m,), bool), jnp.int32(_FREE),
                cur >= n)
        _, min_val, spc, path, scanned, j, _ = lax.while_loop(lambda s: ~s[6], body, init)
        return min_val, spc, path, scanned, j

    def augment(cur, j, path, c4r, r4c):
        """Flip the alternating path that ends at free column j back to row cur."""

        def body(s):
            j, c4r, r4c = s
            r = path[j]
            prev = c4r[r]
            r4c = jnp.where(cols == j, r, r4c)
            c4r = jnp.where(rows == r, j, c4r)
            return jnp.where(r == cur, _FREE, prev), c4r, r4c

        _, c4r, r4c = lax.while_loop(lambda s: s[0] >= 0, body, (j, c4r, r4c))
        return c4r, r4c

    def next_row(s):
        cur, u, v, c4r, r4c = s
        min_val, spc, path, scanned, j = search(cur, u, v, r4c)
        # Dual update: reduced costs stay >= 0 and tight along the matching.
        shift = jnp.where(scanned, min_val - spc, zero)
        u = u + jnp.where(c4r >= 0, shift[jnp.maximum(c4r, 0)], zero)
        u = u + jnp.where(rows == cur, min_val, zero)
        v = v - shift
        c4r, r4c = augment(cur, jnp.where(cur < n, j, _FREE), path, c4r, r4c)
        return _first_index(c4r == _FREE), u, v, c4r, r4c

    state = (_first_index(col_for_row == _FREE), u, v, col_for_row, row_for_col)
    return lax.while_loop(lambda s: s[0] < n, next_row, state)[3]


def lap_matrix(cost_nm: jax.Array) -> jax.Array:
    """Minimum-cost assignment as a 0/1 matrix of cost's shape and dtype (any n, m)."""
    _check_cost(cost_nm)
    n, m = cost_nm.shape
    if n > m:
        return lap_matrix(cost_nm.T).T
    col_for_row = lap_col_for_row(cost_nm)
    return jax.nn.one_hot(col_for_row, m, dtype=cost_nm.dtype)


def partial_lap_matrix(
    cost_nm: jax.Array,
    row_unmatched: jax.Array | float = 0.0,
    col_unmatched: jax.Array | float = 0.0,
) -> jax.Array:
    """Minimum-cost partial matching: a node may stay unmatched at its own cost.

    Matching (i, a) instead of leaving both alone changes the total by
    C_ia - row_unmatched_i - col_unmatched_a. Clamping that at 0 and solving a full
    assignment gives the optimum, because padding a partial matching with pairs of
    clamped cost 0 never costs more, and dropping the non-negative pairs of a full
    assignment loses nothing. This avoids the (n+m) x (n+m) dummy-node augmentation.
    """
    _check_cost(cost_nm)
    rel = cost_nm - jnp.reshape(row_unmatched, (-1, 1)) - jnp.reshape(col_unmatched, (1, -1))
    assign = lap_matrix(jnp.minimum(rel, 0))
    return assign * (rel < 0).astype(cost_nm.dtype)


# ---------------------------------------------------------------------------
# Quadratic matching over kNN edges.


def _edge_pairs(x_nn, nbr1_nk, nbr2_nk):
    """X[j, b] for every edge pair (i->j in graph 1, a->b in graph 2): [n1, k1, n2, k2]."""
    return x_nn[nbr1_nk[:, :, None, None], nbr2_nk[None, None, :, :]]


def quadratic_energy(x_nn, unary_nn, quad_ee, nbr1_nk, nbr2_nk):
    """<C, X> + sum over edge pairs Q[(i,j),(a,b)] X_ia X_jb."""
    n1, k1 = nbr1_nk.shape
    n2, k2 = nbr2_nk.shape
    q = quad_ee.reshape(n1, k1, n2, k2)
    src = x_nn[:, None, :, None]  # X_ia broadcast over (t1, t2)
    return jnp.sum(unary_nn * x_nn) + jnp.sum(q * src * _edge_pairs(x_nn, nbr1_nk, nbr2_nk))


def _quadratic_gradient(x_nn, unary_nn, quad_ee, nbr1_nk, nbr2_nk):
    """d energy / d X, computed over edge pairs only (gathers and scatter-adds)."""
    n1, k1 = nbr1_nk.shape
    n2, k2 = nbr2_nk.shape
    q = quad_ee.reshape(n1, k1, n2, k2)
    # Edge pair as the source end: sum_{t1,t2} Q X[j, b] lands on (i, a).
    from_src = jnp.sum(q * _edge_pairs(x_nn, nbr1_nk, nbr2_nk), axis=(1, 3))
    # As the destination end: Q X[i, a] lands on (j, b).
    weighted = q * x_nn[:, None, :, None]
    idx1 = jnp.broadcast_to(nbr1_nk[:, :, None, None], weighted.shape).reshape(-1)
    idx2 = jnp.broadcast_to(nbr2_nk[None, None, :, :], weighted.shape).reshape(-1)
    from_dst = jnp.zeros_like(x_nn).at[idx1, idx2].add(weighted.reshape(-1))
    return unary_nn + from_src + from_dst


def ipfp_matrix(
    unary_nn: jax.Array,
    quad_ee: jax.Array,
    nbr1_nk: jax.Array,
    nbr2_nk: jax.Array,
    *,
    num_iters: int = 10,
    partial: bool = True,
) -> jax.Array:
    """Approximately minimise the quadratic matching energy with IPFP.

    Starts from the LAP solution of the unary costs, then repeats: linearise at the
    current (continuous) point, solve the LAP, move to the exact line-search optimum
    along the segment. Returns the lowest-energy discrete matching seen, so the
    result is never worse than the LAP start.
    """
    _check_cost(unary_nn, "unary")
    n1, k1 = nbr1_nk.shape
    n2, k2 = nbr2_nk.shape
    if unary_nn.shape != (n1, n2) or quad_ee.shape != (n1 * k1, n2 * k2):
        raise ValueError(
            f"shapes disagree: unary {unary_nn.shape}, quadratic {quad_ee.shape}, "
            f"edges {nbr1_nk.shape} and {nbr2_nk.shape}"
        )
    solve = partial_lap_matrix if partial else lap_matrix

    def energy(x):
        return quadratic_energy(x, unary_nn, quad_ee, nbr1_nk, nbr2_nk)

    x0 = solve(unary_nn)
    e0 = energy(x0)

    def step(_, state):
        x, best, best_e = state
        grad = _quadratic_gradient(x, unary_nn, quad_ee, nbr1_nk, nbr2_nk)
        b = solve(grad)
        e_b = energy(b)
        improved = e_b < best_e
        best = jnp.where(improved, b, best)
        best_e = jnp.where(improved, e_b, best_e)
        # energy(x + t d) = energy(x) + t * slope + t^2 * curv, exactly.
        d = b - x
        slope = jnp.sum(grad * d)
        curv = energy(d) - jnp.sum(unary_nn * d)
        t_star = jnp.where(curv > 0, -slope / jnp.where(curv > 0, 2 * curv, 1), 1.0)
        t = jnp.clip(t_star, 0.0, 1.0)
        return x + t * d, best, best_e

    _, best, _ = lax.fori_loop(0, num_iters, step, (x0, x0, e0))
    return best
