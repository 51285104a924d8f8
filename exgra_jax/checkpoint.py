"""orbax checkpoints of the train state and of every process's data-iterator position.

A checkpoint step holds three items: ``state`` (params, optimizer state, step, counters;
saved sharded, asynchronously), ``data`` (one JSON file per process with its Grain
iterator state) and ``meta`` (the model config and parameter shapes, used to refuse a
checkpoint that does not fit the run).
"""

from __future__ import annotations

import json
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from exgra_jax import paths


class _IteratorSnapshot:
    """What grain's orbax handler saves/restores: the state captured at save time (so an
    asynchronous save never races the training loop's iterator)."""

    def __init__(self, iterator, state: dict | None = None):
        self.iterator = iterator
        self.state = state

    def get_state(self) -> bytes:
        return json.dumps(self.state).encode()

    def set_state(self, state: bytes) -> None:
        self.iterator.set_state(json.loads(state.decode()))

    def start_prefetch(self) -> None:  # called by grain's handler after restore
        pass


def param_shapes(params) -> dict[str, list[int]]:
    flat = jax.tree_util.tree_leaves_with_path(params)
    return {jax.tree_util.keystr(p): list(np.shape(x)) for p, x in flat}


class CheckpointMismatchError(ValueError):
    pass


class Checkpointer:
    def __init__(self, directory: str, keep: int = 3, async_save: bool = True,
                 read_only: bool = False, save_concurrent_gb: int = 96):
        """``save_concurrent_gb``: how many GB orbax may be writing at once (its default,
        96, favours speed; a host converting a whole model lowers it to bound its memory)."""
        # orbax wants absolute local paths; URLs (gs://...) pass through unchanged.
        directory = paths.absolute(directory)
        self.directory = directory
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=not read_only,
            read_only=read_only,
        )
        self.manager = ocp.CheckpointManager(
            directory,
            options=options,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(save_concurrent_gb=save_concurrent_gb),
                "data": grain.checkpoint.CheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            },
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: dict, data_iterator=None, meta: dict | None = None,
             force: bool = False) -> bool:
        items: dict[str, Any] = {"state": ocp.args.StandardSave(state),
                                 "meta": ocp.args.JsonSave(meta or {})}
        if data_iterator is not None:
            snap = _IteratorSnapshot(data_iterator, data_iterator.get_state())
            items["data"] = grain.checkpoint.CheckpointSave(snap)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def has_item(self, step: int, item: str) -> bool:
        return (self.manager.directory / str(step) / item).exists()

    def read_meta(self, step: int) -> dict:
        out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out["meta"])

    def restore(self, step: int, abstract_state: dict, data_iterator=None,
                expect_meta: dict | None = None) -> dict:
        """Restore ``step`` into the shardings of ``abstract_state`` (jax.ShapeDtypeStruct
        leaves with .sharding); the data iterator is repositioned in place."""
        if expect_meta is not None:
            check_meta(self.read_meta(step), expect_meta, f"{self.directory}/{step}")
        items: dict[str, Any] = {"state": ocp.args.StandardRestore(abstract_state)}
        # A checkpoint made by `convert_checkpoint.py from-hf` has no data position yet:
        # the iterator then starts from the beginning.
        if data_iterator is not None and self.has_item(step, "data"):
            items["data"] = grain.checkpoint.CheckpointRestore(_IteratorSnapshot(data_iterator))
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        return out["state"]

    def restore_params(self, step: int, abstract_params: dict) -> dict:
        """Only ``state['params']`` parts named by ``abstract_params`` (ShapeDtypeStructs,
        e.g. ``{'model': ...}``): an orbax partial restore that never reads the optimizer
        state, so a model needs memory for its weights alone. Leaves with a sharding come
        back as arrays placed by it; without, as host numpy arrays (no device copy: what
        conversion tensor by tensor needs)."""
        item = {"params": abstract_params}
        if all(getattr(x, "sharding", None) is not None for x in jax.tree.leaves(item)):
            restore_args = ocp.checkpoint_utils.construct_restore_args(item)
        else:
            restore_args = jax.tree.map(
                lambda x: ocp.RestoreArgs(restore_type=np.ndarray, dtype=x.dtype), item)
        out = ocp.PyTreeCheckpointer().restore(
            self.manager.directory / str(step) / "state",
            args=ocp.args.PyTreeRestore(item, restore_args=restore_args, partial_restore=True))
        return out["params"]

    def restore_param_leaf(self, step: int, keys: tuple[str, ...],
                           abstract: jax.ShapeDtypeStruct) -> np.ndarray:
        """One leaf of ``state['params']`` (``keys``, e.g. ``('model', 'llm', 'embed_tokens')``)
        as a host numpy array, restored alone, so that a conversion read leaf by leaf holds
        one leaf (and orbax's buffers for it), never the whole model."""
        tree: Any = abstract
        for key in reversed(keys):
            tree = {key: tree}
        out = self.restore_params(step, tree)
        for key in keys:
            out = out[key]
        return out

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


# Fields that change the parameter tree or its meaning; the rest (dtype, remat, scan
# order is checked through shapes) may differ between runs.
ARCH_FIELDS = (
    "image_size", "patch_size", "vision_width", "vision_layers", "vision_heads", "vision_mlp",
    "projector", "dense_connector", "vocab_size", "hidden_size", "mlp_size", "num_layers",
    "num_heads", "num_kv_heads", "head_dim", "tie_embeddings", "image_token_id",
)


def check_meta(saved: dict, expected: dict, where: str, scope: str = "") -> None:
    """Refuse a checkpoint whose architecture or parameter shapes differ from the run's.
    ``scope`` (e.g. "['model']") limits the shape comparison to one part of the tree."""
    problems = []
    sm, em = saved.get("model", {}), expected.get("model", {})
    for f in ARCH_FIELDS:
        if f in sm and f in em and sm[f] != em[f]:
            problems.append(f"model.{f}: checkpoint {sm[f]!r}, config {em[f]!r}")
    ss, es = saved.get("param_shapes", {}), expected.get("param_shapes", {})
    ss = {k: v for k, v in ss.items() if k.startswith(scope)}
    es = {k: v for k, v in es.items() if k.startswith(scope)}
    if ss and es:
        for k in sorted(set(ss) | set(es)):
            if ss.get(k) != es.get(k):
                problems.append(f"param {k}: checkpoint {ss.get(k)}, config {es.get(k)}")
                if len(problems) > 8:
                    break
    if problems:
        raise CheckpointMismatchError(
            f"checkpoint {where} does not match this run's config:\n  " + "\n  ".join(problems)
            + "\nUse a fresh --workdir, or the config the checkpoint was trained with."
        )
