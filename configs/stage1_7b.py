"""Stage 1 (feature alignment), 7B: train the projector and the <im_start>/<im_end> rows.

    python launch/train.py --config=configs/stage1_7b.py:/data/llava_med --workdir=DIR \
        --config.init.clip_dir=/models/clip-vit-large-patch14 \
        --config.init.llama_dir=/models/vicuna-7b

The optional argument after ':' is the data root holding LLaVA-Med's pre-training captions
(``llava_med_alignment_500k.json``) and its ``images/`` folder; any path can also be set
directly, e.g. ``--config.data.json_paths=/x/a.json --config.data.image_folder=/x/images``.
Initial weights: CLIP ViT-L/14 and Vicuna/LLaMA-7B (init.source='clip_llama'), with the
LLaVA-Med v1 vocabulary: [PAD]=32000, <im_patch>=32001, <im_start>=32002, <im_end>=32003.
Data-efficiency runs: ``--config.data.fraction=0.1``. Batches are packed: 32 rows of 2048
tokens, up to 5 examples each (``--config.data.packing=False
--config.train.global_batch_size=128 --config.mesh.tensor=1`` for one example per row).
Adding ``mini`` to the argument (``:ARGS,mini``) runs the same recipe at CPU sizes
(``exgra_jax.train.miniature``); CI runs it end to end.
"""

import os

from exgra_jax.train.defaults import base_config, use_packing
from exgra_jax.train.miniature import shrink, split_arg

IM_START, IM_END = 32002, 32003


def get_config(arg: str | None = None):
    arg, mini = split_arg(arg)
    root = arg or "data/llava_med"
    c = base_config("llava_med_7b", dtype="bfloat16", param_dtype="float32",
                    remat_policy="full", scan_layers=True,
                    vocab_pad_multiple=128)  # 32004 -> 32128 rows: any tensor axis splits it
    c.data.json_paths = (os.path.join(root, "llava_med_alignment_500k.json"),)
    c.data.image_folder = os.path.join(root, "images")
    c.tokenizer = os.path.join(root, "tokenizer")  # LLaMA tokenizer + the 4 added tokens
    c.init.source = "clip_llama"

    c.alignment.enabled = False  # stage 1 is the autoregressive loss only
    c.alignment.weight = 0.0

    c.train.trainable = (r"^model/projector/", r"^model/llm/embed_tokens$")
    c.train.frozen = (r"^model/vision_tower/",)
    c.train.trainable_embedding_rows = (IM_START, IM_END)  # the rest of the table stays
    c.train.lr = 2e-3
    c.train.global_batch_size = 128
    c.train.num_epochs = 1.0
    c.train.checkpoint_every = 1000

    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    # Captions with their 256 image tokens are ~380 tokens: 32 packed rows of 2048 hold
    # ~150 examples a step (4.7 per row, real-token share 0.93; tools/benchmarks/packing.py)
    # where the padded recipe had 128 rows of one example each.
    use_packing(c, rows=32, images_per_row=5, examples_per_row=5, mean_examples_per_row=4.7,
                tensor=2)
    return shrink(c) if mini else c
