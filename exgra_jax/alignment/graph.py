"""kNN graphs over pooled sample vectors, the GraphConv GNN, and edge features.

Edge layout used throughout `alignment/`: `nbr_nk[i, t]` is node i's t-th nearest
neighbour (Euclidean, no self loops), and edge e = i * k + t runs i -> nbr_nk[i, t].
This is torch_geometric `knn_graph(x, k, flow='target_to_source')`, whose
edge_index is [query i; neighbour j], with the edges grouped by query.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax import lax

MESSAGE_FLOWS = ("original", "forward")


def knn_neighbors(x_nd: jax.Array, k: int, valid_n: jax.Array | None = None) -> jax.Array:
    """The k nearest other nodes of every node: [n, k] int32, nearest first.

    With ``valid_n``, neighbours are chosen among valid nodes only, and an invalid node's
    list is k copies of itself: its messages then reach only itself, so invalid nodes
    (padding) take no part in a real node's aggregation, in either message flow.
    """
    n = x_nd.shape[0]
    if not 0 < k < n:
        raise ValueError(f"kNN needs 0 < k < number of nodes, got k={k} with {n} nodes")
    x = lax.stop_gradient(x_nd.astype(jnp.float32))
    sq = jnp.sum(x * x, axis=-1)
    gram = jnp.dot(x, x.T, precision=lax.Precision.HIGHEST)
    dist = sq[:, None] + sq[None, :] - 2.0 * gram
    dist = jnp.where(jnp.eye(n, dtype=bool), jnp.inf, dist)
    if valid_n is not None:
        dist = jnp.where(valid_n[None, :], dist, jnp.inf)
    _, nbr = lax.top_k(-dist, k)
    if valid_n is not None:
        nbr = jnp.where(valid_n[:, None], nbr, jnp.arange(n)[:, None])
    return nbr.astype(jnp.int32)


def max_aggregate(x_nd: jax.Array, nbr_nk: jax.Array, message_flow: str) -> jax.Array:
    """Max over each node's incoming messages; a node with none receives zeros.

    "original": edges i -> nbr[i, t] carry x_i, so node j aggregates the nodes that
    have j among their k nearest (torch_geometric knn_graph flow='target_to_source'
    followed by GraphConv, as ExGra-Med). In-degrees vary; a node may get nothing.
    "forward": node i aggregates its own k nearest neighbours.
    """
    n, k = nbr_nk.shape
    if message_flow == "forward":
        return jnp.max(x_nd[nbr_nk], axis=1)
    if message_flow != "original":
        raise ValueError(f"message_flow must be one of {MESSAGE_FLOWS}, got {message_flow!r}")
    dst = nbr_nk.reshape(-1)
    msgs = jnp.repeat(x_nd, k, axis=0)
    agg = jax.ops.segment_max(msgs, dst, num_segments=n)
    has_in = jax.ops.segment_sum(jnp.ones_like(dst), dst, num_segments=n) > 0
    return jnp.where(has_in[:, None], agg, 0)


def edge_features(h_nd: jax.Array, nbr_nk: jax.Array) -> jax.Array:
    """x_src - x_dst for every edge, [n * k, d] in edge order."""
    diff = h_nd[:, None, :] - h_nd[nbr_nk]
    return diff.reshape(-1, h_nd.shape[-1])


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """x / max(||x||, eps) along the last axis (torch F.normalize semantics)."""
    # sqrt(max(|x|^2, eps^2)) == max(|x|, eps), with a finite gradient at x = 0.
    norm = jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))
    return x / norm


def _map_leading(fn, x, nbr):
    """Apply fn([n, d], [n, k]) over any matching leading batch dims."""
    for _ in range(x.ndim - 2):
        fn = jax.vmap(fn)
    return fn(x, nbr)


class GraphConv(nn.Module):
    """x_i' = W_root x_i + W_rel max_{j -> i} x_j + b  (torch_geometric GraphConv, aggr='max').

    Works on [..., n, d] node features with [..., n, k] neighbour lists. With `src`
    [P], x holds distinct node sets [..., U, n, d] and graph p is set src[p] on
    topology nbr[..., p, :, :]: the root term is computed once per set, not per graph.
    """

    features: int
    message_flow: str = "original"

    @nn.compact
    def __call__(self, x: jax.Array, nbr: jax.Array, src: jax.Array | None = None) -> jax.Array:
        d_in = x.shape[-1]
        # torch.nn.Linear's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
        kernel_axes = ("embed", "mlp")
        w_root = self.param(
            "root_kernel", nn.with_logical_partitioning(init, kernel_axes), (d_in, self.features)
        )
        w_rel = self.param(
            "rel_kernel", nn.with_logical_partitioning(init, kernel_axes), (d_in, self.features)
        )
        bias = self.param(
            "bias", nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)), (self.features,)
        )
        root = x @ w_root
        if src is not None:
            root, x = jnp.take(root, src, axis=-3), jnp.take(x, src, axis=-3)
        agg = _map_leading(lambda a, b: max_aggregate(a, b, self.message_flow), x, nbr)
        return root + agg @ w_rel + bias


class GraphGNN(nn.Module):
    """ExGra-Med's GNN: GraphConv + ReLU per layer, dropout on the output (as GDPModel1)."""

    features: int
    num_layers: int = 2
    dropout: float = 0.1
    message_flow: str = "original"

    @nn.compact
    def __call__(self, x: jax.Array, nbr: jax.Array, *, deterministic: bool,
                 src: jax.Array | None = None) -> jax.Array:
        """`src`: as GraphConv's (distinct node sets shared by several graphs)."""
        for layer in range(self.num_layers):
            conv = GraphConv(self.features, self.message_flow, name=f"conv{layer}")
            x = conv(x, nbr, src if layer == 0 else None)
            x = nn.relu(x)
            x = nn.with_logical_constraint(x, (None,) * (x.ndim - 1) + ("mlp",))
        return nn.Dropout(self.dropout)(x, deterministic=deterministic)
