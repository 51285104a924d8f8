"""Train state: which parameters train (regex lists), the optimizer, and the initial state
with its shardings.

Parameters are one tree ``{'model': LlavaModel params, 'alignment': GNN params}`` whose
paths read like ``model/llm/layers/attn/q/kernel``. A parameter trains when its path
matches a ``trainable`` pattern and no ``frozen`` pattern. Frozen parameters get no
gradient and no optimizer state: the optimizer sees only the trainable subtree.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from exgra_jax.parallel import logical_sharding


def path_str(path: tuple[str, ...]) -> str:
    return "/".join(path)


def trainable_mask(params: dict, trainable: Sequence[str], frozen: Sequence[str]) -> dict:
    """Tree of bools: True where the parameter trains."""
    flat = traverse_util.flatten_dict(params)
    tr = [re.compile(p) for p in trainable]
    fr = [re.compile(p) for p in frozen]

    def trains(path):
        s = path_str(path)
        return any(p.search(s) for p in tr) and not any(p.search(s) for p in fr)

    mask = {k: trains(k) for k in flat}
    if not any(mask.values()):
        raise ValueError(f"no parameter matches the trainable patterns {list(trainable)} "
                         f"(minus frozen {list(frozen)})")
    return traverse_util.unflatten_dict(mask)


def split(params: dict, mask: dict) -> tuple[dict, dict]:
    """(trainable subtree, frozen subtree); each holds only its own leaves."""
    flat_p = traverse_util.flatten_dict(params)
    flat_m = traverse_util.flatten_dict(mask)
    train = {k: v for k, v in flat_p.items() if flat_m[k]}
    frozen = {k: v for k, v in flat_p.items() if not flat_m[k]}
    return traverse_util.unflatten_dict(train), traverse_util.unflatten_dict(frozen)


def merge(train: dict, frozen: dict) -> dict:
    flat = traverse_util.flatten_dict(frozen)
    flat.update(traverse_util.flatten_dict(train))
    return traverse_util.unflatten_dict(flat)


def without_frozen(state: dict, mask: dict) -> dict:
    """The state with only the trainable params: what a LoRA checkpoint holds (the frozen
    base is reloaded from its source on resume)."""
    return {**state, "params": split(state["params"], mask)[0]}


def with_frozen(saved: dict, frozen_params: dict, mask: dict) -> dict:
    """A state restored by ``without_frozen`` with the frozen params put back."""
    return {**saved, "params": merge(saved["params"], split(frozen_params, mask)[1])}


def use_lora(c, targets: Sequence[str], *, rank: int = 16, alpha: float = 32.0,
             base_dtype: str = "bfloat16", also_train: Sequence[str] = (),
             dropout: float = 0.0) -> None:
    """Turn a training config into a LoRA run (``exgra_jax.models.lora``): adapters on the
    kernels matching ``targets``, the whole model frozen (held in ``base_dtype``), only the
    adapters and the ``also_train`` patterns (e.g. the alignment GNN) trained."""
    import ml_collections  # noqa: PLC0415

    c.lora = ml_collections.ConfigDict(dict(enabled=True, targets=tuple(targets), rank=rank,
                                            alpha=alpha, base_dtype=base_dtype,
                                            dropout=dropout))
    c.train.trainable = (r"^lora/", *also_train)
    c.train.frozen = (r"^model/",)


def learning_rate_schedule(cfg) -> optax.Schedule:
    """Linear warmup over ``warmup_frac`` of the steps, then cosine to zero (as LLaVA)."""
    total = max(int(cfg.total_steps), 1)
    warmup = int(round(cfg.warmup_frac * total))
    if cfg.schedule == "constant":
        return optax.constant_schedule(cfg.lr)
    if cfg.schedule != "warmup_cosine":
        raise ValueError(f"unknown schedule {cfg.schedule!r}")
    if warmup:
        return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup_steps=warmup,
                                                  decay_steps=total, end_value=0.0)
    return optax.cosine_decay_schedule(cfg.lr, total)


def make_optimizer(cfg) -> optax.GradientTransformation:
    """AdamW with global-norm clipping on the trainable subtree."""
    parts = []
    if cfg.clip_norm and cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay))
    return optax.chain(*parts)


def embedding_row_mask(params: dict, rows: Sequence[int] | None) -> dict | None:
    """Gradient multipliers that let only some rows of the token embedding train
    (stage 1 trains the <im_start>/<im_end> rows with the projector)."""
    if not rows:
        return None
    emb = params["model"]["llm"]["embed_tokens"]
    m = jnp.zeros((emb.shape[0], 1), jnp.float32).at[jnp.asarray(list(rows))].set(1.0)
    return m


def init_state(params: dict, mask: dict, optimizer) -> dict[str, Any]:
    train, _ = split(params, mask)
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "opt_state": optimizer.init(train),
        "skipped": jnp.zeros((), jnp.int32),  # non-finite updates skipped so far
    }


def state_shardings(boxed_params: dict, mask: dict, optimizer, mesh, rules):
    """NamedShardings for the state: params by their logical names, optimizer moments
    like the parameters they track, counters replicated."""
    param_sh = logical_sharding(boxed_params, mesh, rules)
    unboxed = nn.unbox(boxed_params)
    train_abs, _ = split(unboxed, mask)
    train_sh, _ = split(param_sh, mask)
    opt_abs = jax.eval_shape(optimizer.init, train_abs)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    # Optimizer state leaves shaped like the trainable params take their sharding;
    # scalars (counts) are replicated. optax states mirror the param tree structure.
    train_leaves = jax.tree_util.tree_leaves(train_abs)
    train_sh_leaves = jax.tree_util.tree_leaves(
        train_sh, is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding))

    def like_params(sub):
        leaves = jax.tree_util.tree_leaves(sub)
        if len(leaves) == len(train_leaves) and all(
            a.shape == b.shape for a, b in zip(leaves, train_leaves, strict=True)
        ):
            return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(sub),
                                                train_sh_leaves)
        return None

    def place(node):
        sh = like_params(node)
        if sh is not None:
            return sh
        if isinstance(node, tuple) and not hasattr(node, "shape"):
            items = [place(x) for x in node]
            return type(node)(*items) if hasattr(node, "_fields") else tuple(items)
        return jax.tree_util.tree_map(lambda _: replicated, node)

    opt_sh = place(opt_abs)
    return {"step": replicated, "params": param_sh, "opt_state": opt_sh, "skipped": replicated}
