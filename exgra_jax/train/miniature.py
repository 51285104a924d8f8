"""Every shipped config in miniature: the same recipe at sizes a CPU runs in a minute.

``configs/NAME.py:mini`` (or ``mini`` among the comma-separated config arguments, e.g.
``configs/finetune_vqa_rad_7b.py:TFDS,VQA_JSON,mini``) keeps everything that defines the
recipe — init source and its checkpoint format, the vocabulary and its special-token ids,
precision policy (compute dtype, fp32 master weights), trainable/frozen regexes and
embedding rows, remat, scan, mesh axes and rules, alignment settings, best-step selection,
templates, file layout — and shrinks only sizes: widths, depths, image size, sequence
lengths, batch, steps. CI runs each shipped config this way from tiny checkpoints written
in the format the config expects (``tests/test_shipped_configs.py``), so what ships is
what is tested.
"""

from __future__ import annotations

import math

MINI_ARG = "mini"

# Vision: 28 px / 14 px patches -> 4 image tokens; 3 layers so that layer -2 exists.
MINI_VISION = dict(image_size=28, patch_size=14, vision_width=32, vision_layers=3,
                   vision_heads=2, vision_mlp=64)
MINI_TEXT = dict(hidden_size=64, mlp_size=128, num_layers=2, num_heads=4, head_dim=0,
                 max_positions=256)
MINI_LENGTHS = dict(max_len=96, response_len=24, caption_len=32)
MINI_BATCH = 8
MINI_STEPS = 4
# Packed miniatures: rows that hold about three miniature examples (~70 tokens each).
# One row per batch shard of the 8-device test mesh (8 / tensor rows).
MINI_PACKED = dict(max_len=224, images_per_row=3, examples_per_row=3)
MINI_TENSOR = 2  # tensor-parallel ways at most: the miniature widths split in two


def split_arg(arg: str | None) -> tuple[str | None, bool]:
    """(the config's own argument without 'mini', whether 'mini' was given)."""
    if not arg:
        return arg, False
    parts = arg.split(",")
    mini = MINI_ARG in parts
    rest = ",".join(p for p in parts if p != MINI_ARG)
    return rest or None, mini


def mini_model_sizes(num_heads: int, num_kv_heads: int) -> dict:
    """MINI sizes keeping the model's grouped-query ratio (MHA stays MHA, GQA stays GQA)."""
    heads = MINI_TEXT["num_heads"]
    kv = max(1, heads * num_kv_heads // num_heads)
    return {**MINI_VISION, **MINI_TEXT, "num_kv_heads": kv}


def shrink(c):
    """The miniature of config ``c``, in place (returns ``c``)."""
    m = c.model
    sizes = mini_model_sizes(m.num_heads, m.num_kv_heads)
    if m.dense_connector != "none":  # hidden-state layers must exist in 3 layers
        sizes.update(dci_ranges=((0, 1), (1, 2)), sci_layers=(1,), sti_layers=(1,), sti_pool=2)
    for k, v in sizes.items():
        m[k] = v
    for k, v in MINI_LENGTHS.items():
        c.data[k] = v
    t = c.train
    t.global_batch_size = MINI_BATCH
    t.micro_batches = min(t.micro_batches, MINI_BATCH // 2)
    t.total_steps = MINI_STEPS
    t.checkpoint_every = 2
    t.log_every = 1
    t.eval_every = 2 if t.eval_every else 0
    t.eval_batches = 2
    t.warmup_frac = min(t.warmup_frac, 0.25)
    c.eval.batch_size = MINI_BATCH
    c.eval.max_new_tokens = 4
    if "graph_size" in c.alignment:
        c.alignment.graph_size = min(c.alignment.graph_size, MINI_BATCH)
    # The miniature's key/value heads (1 for a GQA model) must split over tensor too.
    c.mesh.tensor = math.gcd(min(c.mesh.tensor, MINI_TENSOR), sizes["num_kv_heads"])
    if c.data.get("packing", False):
        p = MINI_PACKED
        c.data.max_len = p["max_len"]
        c.data.images_per_row = min(c.data.images_per_row, p["images_per_row"])
        c.data.examples_per_row = min(c.data.examples_per_row, p["examples_per_row"])
        t.global_batch_size = MINI_BATCH // c.mesh.tensor
        t.micro_batches = min(t.micro_batches, t.global_batch_size // 2)
    return c
