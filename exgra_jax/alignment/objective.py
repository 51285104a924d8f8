"""ExGra-Med's multi-graph alignment loss (arXiv 2410.02615), batched and jittable.

For n samples with pooled image, response and caption vectors [n, d]:
  b = (image + response + caption) / 3                      (gradients flow through b)
  loss = mean over m in modalities of (GM(m, b) + GM(b, m)) / 2
GM(x, y): kNN graph on x, y gets the same topology; a shared GNN on both; node and
edge features L2-normalised; costs
  C_ia = -(cos(x_i, y_a) + G_node - offset)
  Q[(i,j),(a,b)] = -0.5 (<e_ij, e_ab> + G_edge - offset)      (solver="ipfp" only)
solved as a partial matching (nodes may stay unmatched), with the Hamming loss
against the identity. The six matchings run as one vmapped batch.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from exgra_jax.alignment import assignment, estimators, graph

SOLVERS = ("lap", "ipfp")
ESTIMATORS = ("blackbox", "imle")
GRAPH_SCOPES = ("fixed", "device", "global")
MODALITIES = ("image", "response", "caption")


@dataclasses.dataclass(frozen=True)
class AlignmentConfig:
    k: int = 5  # kNN neighbours
    gnn_layers: int = 2
    dropout: float = 0.1
    # "original": torch_geometric knn_graph(flow='target_to_source') + GraphConv, as
    # ExGra-Med (node j aggregates the nodes that have j among their k nearest);
    # "forward": node i aggregates its own k nearest.
    message_flow: str = "original"
    # "ipfp": the quadratic partial matching (unary + edge-pair costs) the original
    # solves with LPMP; "lap": unary costs only, a cheaper approximation.
    solver: str = "ipfp"
    ipfp_iters: int = 10  # chosen by measurement (docs/fidelity.md)
    estimator: str = "blackbox"  # "blackbox" | "imle"
    blackbox_lambda: float = 80.0  # also I-MLE's lambda
    # The original trained in fp16 with dynamic loss scaling S: its solver backward does
    # not grow with S, so after unscaling the whole alignment gradient is that of lambda*S
    # (~1/S of nominal). S here reproduces that run (docs/fidelity.md); 1: as written.
    emulated_loss_scale: float = 1.0
    imle_samples: int = 4
    imle_temperature: float = 0.05
    gumbel_scale: float = 0.05  # Gumbel(0, scale) cost noise in training; 0 turns it off
    unmatched_offset: float = 0.5  # the -0.5 in the costs; a pair pays off only above it
    partial_matching: bool = True  # nodes may stay unmatched at cost 0 (LPMP's model)
    # "fixed": contiguous groups of graph_size samples, one graph each, on any mesh (the
    # original: one graph per GPU's batch of 16); "device": one graph per batch shard;
    # "global": one graph over the whole (micro-)batch.
    graph_scope: str = "fixed"
    graph_size: int = 16

    def __post_init__(self):
        for name, value, allowed in (
            ("message_flow", self.message_flow, graph.MESSAGE_FLOWS),
            ("solver", self.solver, SOLVERS),
            ("estimator", self.estimator, ESTIMATORS),
            ("graph_scope", self.graph_scope, GRAPH_SCOPES),
        ):
            if value not in allowed:
                raise ValueError(f"AlignmentConfig.{name} must be one of {allowed}, got {value!r}")
        if self.graph_size <= self.k:
            raise ValueError(f"AlignmentConfig.graph_size={self.graph_size} must exceed "
                             f"k={self.k}: kNN needs more than k samples per graph")
        if self.k < 1 or self.gnn_layers < 1 or self.ipfp_iters < 0 or self.imle_samples < 1:
            raise ValueError(f"AlignmentConfig has a non-positive count: {self}")
        if self.emulated_loss_scale < 1:
            raise ValueError(f"AlignmentConfig.emulated_loss_scale must be >= 1, got "
                             f"{self.emulated_loss_scale}")
        if not 0.0 <= self.dropout < 1.0 or self.gumbel_scale < 0:
            raise ValueError(f"AlignmentConfig dropout/gumbel_scale out of range: {self}")


def graph_count(config: AlignmentConfig, n: int, num_shards: int = 1,
                masked: bool = False) -> int:
    """How many contiguous graphs n samples form; a clear error when they cannot.

    ``masked``: the samples carry a node mask (packed batches), so a "fixed" scope
    rounds up to whole graphs (the missing nodes are padding) and graphs left with too
    few real nodes are dropped from the loss when it runs, not refused here.
    """
    if config.graph_scope == "fixed" and masked:
        return -(-n // config.graph_size)
    if config.graph_scope == "fixed":
        if n % config.graph_size:
            raise ValueError(
                f"alignment.graph_size={config.graph_size} must divide the (micro-)batch of "
                f"{n} samples: change alignment.graph_size or the batch size")
        groups = n // config.graph_size
    else:
        groups = num_shards if config.graph_scope == "device" else 1
        if groups < 1 or n % groups:
            raise ValueError(f"{n} samples do not split into {groups} equal groups (batch "
                             f"shards); change the batch or alignment.graph_scope")
    if n // groups <= config.k:
        raise ValueError(
            f"alignment graphs get {n // groups} samples but kNN needs more than "
            f"k={config.k}: raise the batch, lower alignment.k, or use "
            "alignment.graph_scope='global' or 'fixed' with a larger graph_size")
    return groups


def masked_mean(x_btd: jax.Array, mask_bt: jax.Array, *, include_padding: bool = False):
    """Mean over time of the masked tokens, in float32: [b, t, d] -> [b, d].

    include_padding=True averages over all t positions (the original ExGra-Med
    pooling, which averages over padding tokens too). A row with an empty mask
    pools to zeros instead of NaN.
    """
    if x_btd.ndim != 3 or mask_bt.shape != x_btd.shape[:2]:
        raise ValueError(f"masked_mean wants [b, t, d] and [b, t], got {x_btd.shape}, {mask_bt.shape}")
    x = x_btd.astype(jnp.float32)
    if include_padding:
        return x.mean(axis=1)
    w = mask_bt.astype(jnp.float32)[..., None]
    return jnp.sum(x * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)


def hamming_to_identity(y_nn: jax.Array, valid_n: jax.Array | None = None) -> jax.Array:
    """(Y (1 - T) + (1 - Y) T).mean(0).sum() with T the identity; with ``valid_n`` [..., n]
    over the valid rows and columns only (the mean over valid rows)."""
    eye = jnp.eye(y_nn.shape[-1], dtype=y_nn.dtype)
    errors = y_nn * (1 - eye) + (1 - y_nn) * eye
    if valid_n is None:
        return errors.mean(axis=-2).sum(axis=-1)
    v = valid_n.astype(y_nn.dtype)
    pairs = v[..., :, None] * v[..., None, :]
    return jnp.sum(errors * pairs, axis=(-2, -1)) / jnp.maximum(jnp.sum(v, axis=-1), 1.0)


# Cost of pairing a padding node with a real one: far above any real cost, so no solver
# (partial or full) ever makes the pair; padding-padding pairs cost 0.
_PADDING_PAIR_COST = 1e4


def compact_nodes(node_mask_n: jax.Array, *arrays: jax.Array):
    """Real nodes first, in their order (a stable sort on the mask): (mask, *arrays)."""
    order = jnp.argsort(~node_mask_n.astype(bool), stable=True)
    return (node_mask_n[order], *(x[order] for x in arrays))


def _make_solver(config: AlignmentConfig):
    """solve(unary, quad, nbr1, nbr2) -> 0/1 matching, before any estimator."""
    if config.solver == "lap":
        single = assignment.partial_lap_matrix if config.partial_matching else assignment.lap_matrix

        def solve(unary, quad, nbr1, nbr2):
            del quad, nbr1, nbr2
            return single(unary)

        return solve

    return functools.partial(
        _ipfp_solve, num_iters=config.ipfp_iters, partial=config.partial_matching
    )


def _ipfp_solve(unary, quad, nbr1, nbr2, *, num_iters, partial):
    return assignment.ipfp_matrix(unary, quad, nbr1, nbr2, num_iters=num_iters, partial=partial)


# Node sets: 0-2 the modalities (image, response, caption), 3 the barycenter b. The ten
# distinct GNN graphs (node set, topology set): per modality q (q, q), (b, q), (q, b);
# then (b, b). Matching 2q is GM(q, b) on graphs (q, q) x (b, q) with topology q;
# matching 2q + 1 is GM(b, q) on (b, b) x (q, b) with topology b.
_GRAPH_SET = np.array([0, 3, 0, 1, 3, 1, 2, 3, 2, 3])
_GRAPH_TOPOLOGY = np.array([0, 0, 3, 1, 1, 3, 2, 2, 3, 3])
_X_GRAPH = np.array([0, 9, 3, 9, 6, 9])
_Y_GRAPH = np.array([1, 2, 4, 5, 7, 8])
_MATCH_TOPOLOGY = np.array([0, 3, 1, 3, 2, 3])


class MultiGraphAlignment(nn.Module):
    """The alignment loss; its params are the shared GNN (d -> d).

    The n samples are split into contiguous groups (`graph_count`: of graph_size
    samples, or one per batch shard, num_groups of them, or one over all n) and each
    group is matched on its own, vmapped. Under a sharded jit GSPMD moves the vectors,
    so "fixed" and "global" give the same graphs on every mesh.
    RNG streams: "gumbel" (cost noise) and "dropout", both unused when deterministic.
    """

    config: AlignmentConfig
    num_groups: int = 1  # batch shards, for graph_scope="device"

    @nn.compact
    def __call__(self, image_nd, response_nd, caption_nd, *, deterministic: bool,
                 node_mask=None):
        """``node_mask`` [n] (optional): which samples are real. Padding samples take no
        part in kNN, GNN messages, matching or the loss, so the result equals running on
        the real samples alone; with the "fixed" scope real samples are first compacted
        (in order) into graphs of graph_size, and graphs with at most k real samples are
        left out of the loss."""
        cfg = self.config
        shapes = {x.shape for x in (image_nd, response_nd, caption_nd)}
        if len(shapes) != 1 or image_nd.ndim != 2:
            raise ValueError(f"the three modalities must share one [n, d] shape, got {shapes}")
        mods = [x.astype(jnp.float32) for x in (image_nd, response_nd, caption_nd)]
        masked = node_mask is not None
        valid = jnp.ones(image_nd.shape[0], bool) if not masked else node_mask.astype(bool)
        if masked and cfg.graph_scope == "fixed":
            valid, *mods = compact_nodes(valid, *mods)
            pad = -len(valid) % cfg.graph_size
            valid = jnp.pad(valid, (0, pad))
            mods = [jnp.pad(x, ((0, pad), (0, 0))) for x in mods]
        n, d = mods[0].shape
        groups = graph_count(cfg, n, self.num_groups, masked)
        m = n // groups
        if masked and cfg.graph_scope != "fixed":
            # Real nodes first within each graph too: the solvers then meet them in the
            # order the unpadded graph has, so near-ties break the same way.
            grouped = [x.reshape(groups, m, *x.shape[1:]) for x in (valid, *mods)]
            valid, *mods = (x.reshape(n, *x.shape[2:])
                            for x in jax.vmap(compact_nodes)(*grouped))

        bary = (mods[0] + mods[1] + mods[2]) / 3.0
        sets = jnp.stack([*mods, bary]).reshape(4, groups, m, d).swapaxes(0, 1)  # [G, 4, m, d]
        valid = valid.reshape(groups, m)
        nbr_sets = jax.vmap(jax.vmap(
            lambda x, v: graph.knn_neighbors(x, cfg.k, v if masked else None),
            in_axes=(0, None)))(sets, valid)

        # Six matchings, (mod, b) then (b, mod) per modality: GM(x, y) runs the GNN on x
        # and on y, both with x's kNN topology. Of their twelve graphs only ten differ
        # ((b, topology b) serves all three GM(b, mod)), and the first layer's root term
        # depends on the node set alone: GNN once per distinct graph, root once per set.
        h = graph.GraphGNN(d, cfg.gnn_layers, 0.0, cfg.message_flow, name="gnn")(
            sets, nbr_sets[:, _GRAPH_TOPOLOGY], src=_GRAPH_SET, deterministic=True
        )  # [G, 10, m, d]
        h = jnp.stack([h[:, _X_GRAPH], h[:, _Y_GRAPH]], axis=2)  # [G, 6, 2, m, d]
        # Dropout per matching and side, as when every matching runs its own GNN.
        h = nn.Dropout(cfg.dropout)(h, deterministic=deterministic)
        h = nn.with_logical_constraint(h, (None, None, None, None, "mlp"))
        nbr = nbr_sets[:, _MATCH_TOPOLOGY]  # [G, 6, m, k]
        nbr2 = jnp.broadcast_to(nbr[:, :, None], (groups, 6, 2, m, cfg.k))

        node = graph.l2_normalize(h)
        offset = cfg.unmatched_offset
        noisy = not deterministic and cfg.gumbel_scale > 0
        key = self.make_rng("gumbel") if noisy else None
        unary = jnp.einsum("gpid,gpjd->gpij", node[:, :, 0], node[:, :, 1])
        if noisy:
            # One node-noise draw per step (per graph), shared by all six matchings.
            k_node, k_edge, k_est = jax.random.split(key, 3)
            unary = unary + cfg.gumbel_scale * jax.random.gumbel(k_node, (groups, 1, m, m))
        unary = -(unary - offset)
        if masked:
            pair = valid[:, None, :, None] & valid[:, None, None, :]  # [G, 1, m, m]
            both_pad = ~valid[:, None, :, None] & ~valid[:, None, None, :]
            unary = jnp.where(pair, unary, jnp.where(both_pad, 0.0, _PADDING_PAIR_COST))

        quad = None
        if cfg.solver == "ipfp":
            edges = graph.l2_normalize(
                jax.vmap(jax.vmap(jax.vmap(graph.edge_features)))(h, nbr2)
            )  # [G, 6, 2, E, d]
            quad = jnp.einsum("gped,gpfd->gpef", edges[:, :, 0], edges[:, :, 1])
            if noisy:  # edge noise: one draw per matching
                quad = quad + cfg.gumbel_scale * jax.random.gumbel(k_edge, quad.shape)
            quad = -0.5 * (quad - offset)
            if masked:  # padding nodes' (self-loop) edges add nothing to any energy
                edge_ok = jnp.repeat(valid, cfg.k, axis=-1)  # [G, E]
                quad = jnp.where(edge_ok[:, None, :, None] & edge_ok[:, None, None, :], quad, 0.0)

        # Readable with apply(..., mutable="intermediates") (tools/experiments/matcher_quality.py).
        self.sow("intermediates", "costs", (unary, quad, nbr))
        solve = _make_solver(cfg)
        lam = cfg.blackbox_lambda * cfg.emulated_loss_scale
        if cfg.estimator == "imle" and noisy:
            matcher = estimators.imle(
                solve, lam, cfg.imle_samples, cfg.imle_temperature
            )
            keys = jax.random.split(k_est, groups * 6).reshape(groups, 6)
            y = jax.vmap(jax.vmap(matcher))(unary, quad, nbr, nbr, keys)
        else:
            # Deterministic runs solve the noise-free problem (black-box gradient).
            matcher = estimators.blackbox(solve, lam)
            y = jax.vmap(jax.vmap(matcher))(unary, quad, nbr, nbr)

        return self._loss_and_metrics(y, valid, masked)

    def _loss_and_metrics(self, y, valid, masked):
        """Hamming loss per graph and matching, averaged over the graphs that count
        (more than k real nodes; all of them without a node mask)."""
        groups = y.shape[0]
        real = jnp.sum(valid, axis=-1).astype(jnp.float32)  # [G]
        weight = (real > self.config.k).astype(jnp.float32)
        num = jnp.maximum(jnp.sum(weight), 1.0)
        ham = hamming_to_identity(y, valid[:, None, :] if masked else None)  # [G, 6]
        per_mod = jnp.sum(ham.reshape(groups, 3, 2).mean(axis=2) * weight[:, None], axis=0) / num
        loss = per_mod.mean()
        y_stop = jax.lax.stop_gradient(y)
        node_w = valid.astype(jnp.float32) * weight[:, None]  # [G, m]
        nodes = jnp.maximum(jnp.sum(node_w), 1.0) * 6
        metrics = {f"align/hamming_{name}": per_mod[i] for i, name in enumerate(MODALITIES)}
        diag = jnp.diagonal(y_stop, axis1=-2, axis2=-1)  # [G, 6, m]
        metrics["align/match_acc"] = jnp.sum(diag * node_w[:, None]) / nodes
        metrics["align/unmatched_frac"] = jnp.sum(
            (1.0 - y_stop.sum(axis=-1)) * node_w[:, None]) / nodes
        return loss, metrics
