"""Assignment solvers against scipy.optimize.linear_sum_assignment and brute force."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from exgra_jax.alignment import assignment

BIG = 1e9


def _costs(rng, shape, kind):
    if kind == "uniform":
        return rng.random(shape)
    if kind == "ties":  # few distinct values: many optimal assignments
        return rng.integers(0, 4, shape).astype(np.float64)
    if kind == "wide":  # magnitudes from 1e-3 to 1e3, both signs
        return rng.choice([-1, 1], shape) * 10.0 ** rng.uniform(-3, 3, shape)
    raise ValueError(kind)


def _check_optimal(cost, col_for_row):
    n, m = cost.shape
    assert len(set(col_for_row.tolist())) == n and col_for_row.min() >= 0
    assert col_for_row.max() < m
    rows, cols = linear_sum_assignment(cost)
    best = cost[rows, cols].sum()
    ours = cost[np.arange(n), col_for_row].sum()
    np.testing.assert_allclose(ours, best, rtol=1e-5, atol=1e-4 * np.abs(cost).max())


@pytest.mark.parametrize("kind", ["uniform", "ties", "wide"])
@pytest.mark.parametrize("shape", [(1, 1), (4, 4), (9, 9), (24, 24), (5, 11), (17, 40)])
def test_lap_matches_scipy(shape, kind):
    rng = np.random.default_rng(hash((shape, kind)) % 2**32)
    solve = jax.jit(assignment.lap_col_for_row)
    for _ in range(5):
        cost = _costs(rng, shape, kind)
        _check_optimal(cost, np.asarray(solve(jnp.asarray(cost, jnp.float32))))


@pytest.mark.parametrize("kind", ["uniform", "ties", "wide"])
def test_lap_vmapped_matches_scipy(kind):
    rng = np.random.default_rng(7)
    costs = _costs(rng, (6, 20, 20), kind)
    cols = np.asarray(jax.jit(jax.vmap(assignment.lap_col_for_row))(jnp.asarray(costs, jnp.float32)))
    for cost, col in zip(costs, cols):
        _check_optimal(cost, col)


def test_lap_matrix_tall_is_transposed_wide():
    rng = np.random.default_rng(3)
    cost = rng.random((12, 5))
    y = np.asarray(assignment.lap_matrix(jnp.asarray(cost, jnp.float32)))
    assert y.shape == (12, 5) and np.all(y.sum(0) == 1) and np.all(y.sum(1) <= 1)
    rows, cols = linear_sum_assignment(cost)
    np.testing.assert_allclose((y * cost).sum(), cost[rows, cols].sum(), rtol=1e-5)


def _scipy_partial(cost, row_unmatched, col_unmatched):
    """Optimal partial matching cost via the (n+m) x (m+n) dummy-node augmentation."""
    n, m = cost.shape
    aug = np.zeros((n + m, m + n))
    aug[:n, :m] = cost
    aug[:n, m:] = np.where(np.eye(n, dtype=bool), row_unmatched[:, None], BIG)
    aug[n:, :m] = np.where(np.eye(m, dtype=bool), col_unmatched[None, :], BIG)
    rows, cols = linear_sum_assignment(aug)
    return aug[rows, cols].sum()


@pytest.mark.parametrize("shape", [(6, 6), (15, 15), (7, 13), (13, 7)])
@pytest.mark.parametrize("kind", ["uniform", "ties", "wide"])
def test_partial_matching_matches_augmented_scipy(shape, kind):
    rng = np.random.default_rng(hash((shape, kind, "p")) % 2**32)
    solve = jax.jit(assignment.partial_lap_matrix)
    for trial in range(4):
        cost = _costs(rng, shape, kind) - (0.5 if kind == "uniform" else 1.0)
        row_u = np.zeros(shape[0]) if trial % 2 == 0 else rng.random(shape[0]) - 0.5
        col_u = np.zeros(shape[1]) if trial % 2 == 0 else rng.random(shape[1]) - 0.5
        y = np.asarray(solve(jnp.asarray(cost, jnp.float32), row_u.astype(np.float32),
                             col_u.astype(np.float32)), np.float64)
        assert np.all(y.sum(0) <= 1) and np.all(y.sum(1) <= 1) and set(np.unique(y)) <= {0, 1}
        ours = (y * cost).sum() + ((1 - y.sum(1)) * row_u).sum() + ((1 - y.sum(0)) * col_u).sum()
        best = _scipy_partial(cost, row_u, col_u)
        np.testing.assert_allclose(ours, best, rtol=1e-5, atol=1e-4 * np.abs(cost).max())


def test_partial_leaves_all_unmatched_when_every_pair_costs():
    y = assignment.partial_lap_matrix(jnp.ones((5, 5)))
    assert float(y.sum()) == 0.0


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="2-D"):
        assignment.lap_col_for_row(jnp.ones((3,)))
    with pytest.raises(ValueError, match="floating"):
        assignment.lap_col_for_row(jnp.ones((3, 3), jnp.int32))
    with pytest.raises(ValueError, match="rows <= cols"):
        assignment.lap_col_for_row(jnp.ones((4, 3)))
    with pytest.raises(ValueError, match="shapes disagree"):
        assignment.ipfp_matrix(jnp.ones((4, 4)), jnp.ones((8, 7)), jnp.zeros((4, 2), jnp.int32),
                               jnp.zeros((4, 2), jnp.int32))


# --- quadratic matching ------------------------------------------------------


def _random_graph(rng, n, k):
    return np.stack([rng.choice([j for j in range(n) if j != i], k, replace=False)
                     for i in range(n)]).astype(np.int32)


def _energy_loops(x, unary, quad, nbr1, nbr2):
    """The quadratic energy with explicit loops over edge pairs (independent check)."""
    total = float((unary * x).sum())
    k1, k2 = nbr1.shape[1], nbr2.shape[1]
    for i, t1, a, t2 in itertools.product(range(nbr1.shape[0]), range(k1),
                                          range(nbr2.shape[0]), range(k2)):
        j, b = nbr1[i, t1], nbr2[a, t2]
        total += quad[i * k1 + t1, a * k2 + t2] * x[i, a] * x[j, b]
    return total


def _instance(rng, n, k):
    nbr1, nbr2 = _random_graph(rng, n, k), _random_graph(rng, n, k)
    unary = rng.normal(0, 0.5, (n, n)) - 0.3
    quad = 0.5 * rng.normal(0, 0.5, (n * k, n * k))  # the -0.5 factor of the model
    return unary, quad, nbr1, nbr2


def test_sparse_energy_matches_loops():
    rng = np.random.default_rng(0)
    unary, quad, nbr1, nbr2 = _instance(rng, 5, 2)
    x = (rng.random((5, 5)) < 0.4).astype(np.float64)
    ours = assignment.quadratic_energy(jnp.asarray(x), jnp.asarray(unary), jnp.asarray(quad),
                                       jnp.asarray(nbr1), jnp.asarray(nbr2))
    np.testing.assert_allclose(float(ours), _energy_loops(x, unary, quad, nbr1, nbr2), rtol=1e-5)


def _all_partial_matchings(n):
    out = []
    for size in range(n + 1):
        for rows in itertools.combinations(range(n), size):
            for cols in itertools.permutations(range(n), size):
                x = np.zeros((n, n))
                x[list(rows), list(cols)] = 1
                out.append(x)
    return np.stack(out)


def _energies(xs, unary, quad, nbr1, nbr2):
    n, k = nbr1.shape
    q = quad.reshape(n, k, n, k)
    pair = xs[:, :, None, :, None] * xs[:, nbr1[:, :, None, None], nbr2[None, None, :, :]]
    return np.einsum("mij,ij->m", xs, unary) + np.einsum("mitaz,itaz->m", pair, q)


@pytest.mark.slow
def test_ipfp_never_worse_than_lap_and_finds_brute_force_optimum():
    rng = np.random.default_rng(1)
    solve = jax.jit(lambda u, q, a, b: assignment.ipfp_matrix(u, q, a, b, num_iters=15))
    hits, trials = 0, 0
    for n, k, count in ((4, 2, 12), (5, 2, 12), (6, 2, 8)):
        xs = _all_partial_matchings(n)
        for _ in range(count):
            unary, quad, nbr1, nbr2 = _instance(rng, n, k)
            x = np.asarray(solve(*(jnp.asarray(a, jnp.float32) for a in (unary, quad)),
                                 jnp.asarray(nbr1), jnp.asarray(nbr2)), np.float64)
            x_lap = np.asarray(assignment.partial_lap_matrix(jnp.asarray(unary, jnp.float32)))
            e = _energy_loops(x, unary, quad, nbr1, nbr2)
            assert e <= _energy_loops(x_lap, unary, quad, nbr1, nbr2) + 1e-5
            best = _energies(xs, unary, quad, nbr1, nbr2).min()
            assert e >= best - 1e-5
            hits += e <= best + 1e-5
            trials += 1
    rate = hits / trials
    print(f"IPFP found the brute-force optimum in {hits}/{trials} = {rate:.0%} of instances")
    assert rate >= 0.6


@pytest.mark.slow
def test_ipfp_on_the_objectives_costs_never_above_lap_and_as_numpy_ipfp():
    """On the costs of a training step of the objective (n = 16, k = 5, noise and
    dropout on), the six IPFP matchings are never above their LAP start, and their
    energies are those of an independent NumPy IPFP (float64, scipy LAP)."""
    import importlib.util
    import pathlib

    from exgra_jax.alignment.objective import AlignmentConfig, MultiGraphAlignment

    path = pathlib.Path(__file__).parents[1] / "tools" / "benchmarks" / "alignment.py"
    spec = importlib.util.spec_from_file_location("alignment_bench", path)
    peer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peer)

    n, d = 16, 32
    keys = jax.random.split(jax.random.key(7), 7)
    topic = jax.random.normal(keys[0], (n, d))
    feats = [topic + 0.7 * jax.random.normal(k, (n, d)) for k in keys[1:4]]
    mod = MultiGraphAlignment(AlignmentConfig(solver="ipfp", graph_scope="global"))
    params = mod.init(keys[4], *feats, deterministic=True)
    _, state = mod.apply(params, *feats, deterministic=False, mutable="intermediates",
                         rngs={"gumbel": keys[5], "dropout": keys[6]})
    unary, quad, nbr = state["intermediates"]["costs"][0]
    solve = jax.jit(jax.vmap(lambda u, q, a: assignment.ipfp_matrix(u, q, a, a, num_iters=10)))
    ours = np.asarray(solve(unary[0], quad[0], nbr[0]), np.float64)
    for p in range(6):
        u, q = np.asarray(unary[0, p], np.float64), np.asarray(quad[0, p], np.float64)
        e = peer.edge_lists(np.asarray(nbr[0, p]))
        e_ours = peer.quadratic_energy(ours[p], u, q, e, e)
        e_lap = peer.quadratic_energy(peer.scipy_partial_matching(u), u, q, e, e)
        assert e_ours <= e_lap + 1e-5 * abs(e_lap)
        np.testing.assert_allclose(e_ours, peer.numpy_ipfp(u, q, e, e, 10)[1], rtol=1e-5)
