"""The jitted ExGra-Med train and eval steps.

loss = shifted, masked cross-entropy + alignment_weight * multi-graph alignment loss.

Gradient accumulation splits the global batch into ``micro_batches`` interleaved slices
(row r goes to slice r % M, so every device keeps its own rows and no data moves) and
sums gradients over a scan. The cross-entropy is normalised by the token count of the
whole batch, so M micro-batches of b give the same update as one batch of M*b; the
alignment graphs span one micro-batch and their loss is averaged over micro-batches.

The alignment's text branches through the LLM are mostly padding (short answers, fixed
lengths), so the answer-only sequences of each batch shard are packed into a few rows
(first-fit decreasing, one segment per sequence, positions restarting at 0) and run as one
LLM call; a batch that does not fit runs padded instead. Both give the same vectors.

A batch is padded (one example per row) or packed (several per row, data/packing.py): the
LM loss then stays within segments, and every example with an image is one alignment
node, its padding slots masked out of the graphs (`alignment_nodes`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from exgra_jax.alignment.objective import AlignmentConfig, MultiGraphAlignment, masked_mean
from exgra_jax.models.config import ModelConfig
from exgra_jax.models.layers import dtype_of
from exgra_jax.models.llava import LlavaModel
from exgra_jax.models.lora import LoraConfig, training_params, with_adapters
from exgra_jax.train.state import merge, split

IGNORE = -100


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static (hashable) settings of the step."""

    model: ModelConfig
    alignment: AlignmentConfig | None  # None: the alignment loss is off
    alignment_weight: float = 1.0
    text_branch: str = "llm"  # 'llm' (the original's after_de) | 'embeddings'
    pool_include_padding: bool = False  # True reproduces the original's mean over padding
    num_groups: int = 1  # alignment graphs per micro-batch in "device" scope
    micro_batches: int = 1
    seed: int = 0
    # Packed text-branch rows per batch shard, as a fraction of the padded branch tokens
    # (rounded up to whole rows of max(response_len, caption_len)); 0: always padded.
    text_pack_fraction: float = 0.25
    lora: LoraConfig | None = None  # LoRA: adapters folded into their kernels per forward


def is_packed(batch) -> bool:
    """Packed rows (several examples per row, see data/packing.py) carry segment ids."""
    return "segment_ids" in batch


def supervised_positions(batch) -> jax.Array:
    """[b, t-1]: whether the token at t+1 is a label predicted from position t.

    Unpacked: its label is set and its row is a real example. Packed: its label is set
    and it lies in the same segment as t, so no prediction crosses into another example.
    """
    lab = batch["labels"][:, 1:]
    if is_packed(batch):
        seg = batch["segment_ids"]
        same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
        return (lab != IGNORE) & same
    return (lab != IGNORE) & (batch["example_mask"][:, None] > 0)


def lm_loss_sums(logits_btv, labels_bt, valid_bt):
    """(sum of next-token NLL over the ``supervised_positions``, their number)."""
    lab = labels_bt[:, 1:]
    logp = jax.nn.log_softmax(logits_btv[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.where(valid_bt, lab, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * valid_bt), jnp.sum(valid_bt).astype(jnp.float32)


def token_count(batch) -> jax.Array:
    return jnp.sum(supervised_positions(batch)).astype(jnp.float32)


# ====================================================================== text branches
def pack_placement(lengths_n, rows: int, row_len: int):
    """First-fit decreasing of n sequence lengths into ``rows`` rows of ``row_len`` slots:
    (row [n], first column [n], whether all fit)."""
    order = jnp.argsort(-lengths_n, stable=True)

    def place(fill_r, n):
        fits_r = fill_r + n <= row_len
        r = jnp.argmax(fits_r)
        return fill_r.at[r].add(jnp.where(fits_r[r], n, 0)), (r, fill_r[r], fits_r[r])

    _, (row, col, ok) = jax.lax.scan(place, jnp.zeros(rows, jnp.int32), lengths_n[order])
    inverse = jnp.argsort(order)
    return row[inverse], col[inverse], jnp.all(ok)


def pack_sequences(seqs, rows: int, row_len: int):
    """Pack the masked tokens of [(ids [n_k, t_k], mask [n_k, t_k]), ...] into flat rows.

    Returns (ids, segment ids, positions), each [rows * row_len], the slot of every token
    per input ([n_k, t_k]; rows * row_len, out of range, for padding) and whether all fit.
    Sequence s (counting across the inputs) is segment s + 1; empty slots are segment 0.
    """
    lengths = jnp.concatenate([jnp.sum(m, axis=1) for _, m in seqs]).astype(jnp.int32)
    row, col, fits = pack_placement(lengths, rows, row_len)
    start, size = row * row_len + col, rows * row_len
    out = [jnp.zeros(size, jnp.int32) for _ in range(3)]
    slots, first = [], 0
    for ids, m in seqs:
        n = m.shape[0]
        pos = jnp.cumsum(m, axis=1) - 1  # skips padding, as positions_from_mask does
        slot = jnp.where(m > 0, start[first:first + n, None] + pos, size)
        seg = jnp.broadcast_to(jnp.arange(first + 1, first + n + 1)[:, None], m.shape)
        out = [o.at[slot.reshape(-1)].set(v.reshape(-1), mode="drop")
               for o, v in zip(out, (ids, seg, pos), strict=True)]
        slots.append(slot)
        first += n
    return (*out, slots, fits)


def pack_rows(sc: StepConfig, n: int, lengths: tuple[int, ...]) -> tuple[int, int]:
    """(rows, row length) of the packed layout for n examples per shard; rows 0: padded."""
    row_len = max(lengths)
    rows = max(1, -(-int(sc.text_pack_fraction * n * sum(lengths)) // row_len))
    packs = (sc.text_branch == "llm" and not sc.pool_include_padding
             and sc.text_pack_fraction > 0 and rows * row_len < n * sum(lengths))
    return (rows, row_len) if packs else (0, row_len)


def pack_layout(sc: StepConfig, b: int, lengths: tuple[int, ...]) -> tuple[int, int, int]:
    """(shard groups, rows per group, row length) of the text branches of a b-example
    micro-batch: packing stays within batch shards; rows 0: padded."""
    groups = sc.num_groups if b % sc.num_groups == 0 else 1
    return (groups, *pack_rows(sc, b // groups, lengths))


def text_branch_vectors(model: LlavaModel, params, batch, sc: StepConfig, dropout_key=None):
    """Pooled response and caption vectors [b, d] (float32) and whether they were packed;
    ``dropout_key``: LoRA dropout's, one key per model call."""
    def rngs(i):
        return {} if dropout_key is None else {"dropout": jax.random.fold_in(dropout_key, i)}

    names = (("response_ids", "response_mask"), ("caption_ids", "caption_mask"))
    seqs = [(batch[i], batch[m]) for i, m in names]
    not_packed = jnp.zeros((), bool)

    def pool(states):
        return tuple(masked_mean(h, m, include_padding=sc.pool_include_padding)
                     for h, (_, m) in zip(states, seqs, strict=True))

    if sc.text_branch == "embeddings":
        return (*pool([model.apply({"params": params}, ids, method=LlavaModel.text_embeddings)
                       for ids, _ in seqs]), not_packed)
    if sc.text_branch != "llm":
        raise ValueError(f"text_branch must be 'llm' or 'embeddings', got {sc.text_branch!r}")

    def padded(p):
        return pool([model.apply({"params": p}, ids, m, method=LlavaModel.text_hidden_states,
                                 rngs=rngs(i)) for i, (ids, m) in enumerate(seqs)])

    b = seqs[0][0].shape[0]
    groups, rows, row_len = pack_layout(sc, b, tuple(ids.shape[1] for ids, _ in seqs))
    if not rows:
        return (*padded(params), not_packed)

    per_group = [jax.tree.map(lambda x: x.reshape(groups, b // groups, *x.shape[1:]), s)
                 for s in seqs]
    ids, seg, pos, slots, fits = jax.vmap(
        lambda sq: pack_sequences(sq, rows, row_len))(per_group)
    fits = jnp.all(fits)

    def packed(p):
        def as_rows(x):
            return x.reshape(groups * rows, row_len)

        h = model.apply({"params": p}, as_rows(ids), None, as_rows(pos), as_rows(seg),
                        method=LlavaModel.text_hidden_states, rngs=rngs(2))
        h = h.reshape(groups, rows * row_len, h.shape[-1])
        take = jax.vmap(lambda h_, s_: jnp.take(h_, s_, axis=0, mode="fill", fill_value=0))
        return pool([take(h, s).reshape(b, *s.shape[2:], h.shape[-1]) for s in slots])

    # The gradient of a cond keeps the residuals of both branches (the untaken one zero
    # filled): rematerialising the rare padded fallback leaves it only its inputs, which
    # cost the packed path nothing (without it: +70% on the demo's text branches).
    return (*jax.lax.cond(fits, packed, jax.checkpoint(padded), params), fits)


# ================================================================================ loss
def alignment_nodes(batch, feats):
    """One alignment node per example: (batch of per-example text inputs [n, ...], pooled
    image features [n, d], node mask [n]). Examples without an image are not nodes.

    Packed rows hold K example slots and I images: slot k's image is the one whose
    image_segment_ids is k + 1; the slots of all rows, in row order, are the nodes.
    """
    keys = ("response_ids", "response_mask", "caption_ids", "caption_mask")
    pooled = jnp.mean(feats.astype(jnp.float32), axis=-2)  # [b, d] or [b, i, d]
    mask = (batch["example_mask"] > 0) & (batch["has_image"] > 0)
    if not is_packed(batch):
        return {k: batch[k] for k in keys}, pooled, mask
    b, slots = batch["example_mask"].shape
    segment = jnp.arange(1, slots + 1)
    owner = (batch["image_segment_ids"][:, None, :] == segment[None, :, None])  # [b, K, i]
    image = jnp.einsum("bki,bid->bkd", owner.astype(jnp.float32), pooled)
    text = {k: batch[k].reshape(b * slots, *batch[k].shape[2:]) for k in keys}
    return text, image.reshape(b * slots, -1), mask.reshape(-1)


def forward_loss(params, batch, rng, sc: StepConfig, total_tokens, deterministic=False):
    """Loss of one micro-batch, scaled so that summing over micro-batches gives the
    batch loss; plus unscaled metrics. ``batch`` is padded (one example per row) or
    packed (`is_packed`); both give the same loss on the same examples."""
    params = training_params(params, sc.lora, dtype_of(sc.model.dtype))
    lora_key = None  # LoRA dropout's input masks: the model's 'dropout' rng (layers.Dense)
    if sc.lora is not None and sc.lora.dropout and not deterministic:
        lora_key = jax.random.fold_in(rng, 1)
    model = LlavaModel(sc.model)
    packing = (batch["positions"], batch["segment_ids"]) if is_packed(batch) else (None, None)
    logits, feats = model.apply(
        {"params": params["model"]}, batch["input_ids"], batch["pixel_values"],
        batch["attention_mask"], *packing, method=LlavaModel.forward_features,
        rngs={} if lora_key is None else {"dropout": jax.random.fold_in(lora_key, 3)},
    )
    nll_sum, count = lm_loss_sums(logits, batch["labels"], supervised_positions(batch))
    loss = nll_sum / jnp.maximum(total_tokens, 1.0)
    metrics = {"lm_nll_sum": nll_sum, "lm_tokens": count}
    if sc.alignment is not None:
        text, image, node_mask = alignment_nodes(batch, feats)
        response, caption, packed = text_branch_vectors(model, params["model"], text, sc,
                                                        lora_key)
        gumbel, dropout = jax.random.split(rng)
        align, align_metrics = MultiGraphAlignment(sc.alignment, sc.num_groups).apply(
            {"params": params["alignment"]}, image, response, caption,
            deterministic=deterministic, node_mask=node_mask,
            rngs={"gumbel": gumbel, "dropout": dropout},
        )
        loss = loss + sc.alignment_weight * align / sc.micro_batches
        metrics["align_loss"] = align
        metrics.update(align_metrics)
        if sc.text_branch == "llm":
            metrics["align/text_packed"] = packed.astype(jnp.float32)  # share of batches
    return loss, metrics


def _micro_slices(batch, m):
    """[B, ...] -> [m, B/m, ...] with row r in slice r % m (rows stay on their device)."""
    def one(x):
        b = x.shape[0]
        if b % m:
            raise ValueError(f"batch of {b} does not split into {m} micro-batches")
        return jnp.swapaxes(x.reshape(b // m, m, *x.shape[1:]), 0, 1)

    return jax.tree.map(one, batch)


def make_train_step(sc: StepConfig, optimizer: optax.GradientTransformation, mask: dict,
                    lr_schedule=None, embed_row_mask=None):
    """train_step(state, batch) -> (state, metrics); pure, ready for jax.jit."""

    def train_step(state: dict[str, Any], batch: dict[str, jax.Array]):
        train, frozen = split(state["params"], mask)
        step_key = jax.random.fold_in(jax.random.key(sc.seed), state["step"])
        total = token_count(batch)

        def micro(carry, xs):
            grads_acc, metrics_acc = carry
            mb, idx = xs

            def loss_of(tr):
                return forward_loss(merge(tr, frozen), mb, jax.random.fold_in(step_key, idx),
                                    sc, total)

            (loss, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(train)
            metrics = dict(metrics, loss=loss)
            grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
            metrics_acc = jax.tree.map(jnp.add, metrics_acc, metrics)
            return (grads_acc, metrics_acc), None

        slices = _micro_slices(batch, sc.micro_batches)
        zeros_g = jax.tree.map(jnp.zeros_like, train)
        first = jax.tree.map(lambda x: x[0], slices)
        metric_shapes = jax.eval_shape(
            lambda: forward_loss(merge(train, frozen), first, step_key, sc, total)[1])
        zeros_m = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes)
        zeros_m["loss"] = jnp.zeros((), jnp.float32)
        (grads, msum), _ = jax.lax.scan(
            micro, (zeros_g, zeros_m), (slices, jnp.arange(sc.micro_batches)))

        if embed_row_mask is not None and "embed_tokens" in grads.get("model", {}).get("llm", {}):
            g = grads["model"]["llm"]["embed_tokens"]
            grads["model"]["llm"]["embed_tokens"] = g * embed_row_mask.astype(g.dtype)

        grad_norm = optax.global_norm(grads)
        ok = jnp.isfinite(grad_norm) & jnp.isfinite(msum["loss"])
        updates, new_opt = optimizer.update(grads, state["opt_state"], train)
        new_train = optax.apply_updates(train, updates)
        keep = lambda new, old: jnp.where(ok, new, old)  # noqa: E731
        new_state = {
            "step": state["step"] + 1,
            "params": merge(jax.tree.map(keep, new_train, train), frozen),
            "opt_state": jax.tree.map(keep, new_opt, state["opt_state"]),
            "skipped": state["skipped"] + (1 - ok.astype(jnp.int32)),
        }
        m = sc.micro_batches
        metrics = {
            "loss": msum["loss"],
            "lm_loss": msum["lm_nll_sum"] / jnp.maximum(msum["lm_tokens"], 1.0),
            "grad_norm": grad_norm,
            "skipped_updates": new_state["skipped"],
            "supervised_tokens": msum["lm_tokens"],
            # Real tokens (image tokens included) and the LM's token slots: their ratio
            # is the share of the LM compute that is not padding.
            "tokens": jnp.sum(batch["attention_mask"]).astype(jnp.float32),
            "token_slots": jnp.asarray(batch["attention_mask"].size, jnp.float32),
            "examples": jnp.sum(batch["example_mask"] > 0).astype(jnp.float32),
        }
        if sc.alignment is not None:
            metrics["align_loss"] = msum["align_loss"] / m
            for k, v in msum.items():
                if k.startswith("align/"):
                    metrics[k] = v / m
        if lr_schedule is not None:
            metrics["lr"] = lr_schedule(state["step"])
        return new_state, metrics

    return train_step


def make_eval_step(sc: StepConfig):
    """eval_step(params, batch) -> sums of NLL and supervised tokens (LM loss only)."""

    def eval_step(params, batch):
        params = with_adapters(params, sc.lora, dtype_of(sc.model.dtype))
        model = LlavaModel(sc.model)
        logits = model.apply({"params": params["model"]}, batch["input_ids"],
                             batch["pixel_values"], batch["attention_mask"])
        nll, count = lm_loss_sums(logits, batch["labels"], supervised_positions(batch))
        return {"nll_sum": nll, "tokens": count}

    return eval_step
