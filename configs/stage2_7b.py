"""Stage 2 (instruction tuning with the ExGra-Med multi-graph alignment loss), 7B.

    python tools/convert_checkpoint.py to-hf --workdir STAGE1_DIR --out STAGE1_HF
    python launch/train.py --config=configs/stage2_7b.py:/data/llava_med --workdir=DIR \
        --config.init.hf_dir=STAGE1_HF

The optional argument after ':' is the data root holding LLaVA-Med's instruction data with
ExGra-Med's extended captions (``conversations_long``, made by
``tools/generate_extended_captions.py --merged``) and its ``images/`` folder; or set
``--config.data.json_paths=...`` / ``--config.data.tfds_name=llava_med`` directly.
Data-efficiency runs: ``--config.data.fraction=0.1``.

Loss: cross-entropy + 1.0 x alignment (black-box lambda 80); the response and caption
branches run through the LLM. bf16 compute, fp32 master weights and Adam moments, full
remat of each decoder layer. The alignment graph spans the whole (micro-)batch
(graph_scope='global'), so every mesh gives the same graphs. Fits a v5e-64 slice (16 GiB
per chip) as shipped: fsdp=64, one example per chip, 5.3 GiB peak per chip in the AOT
compile (docs/aot_compile.md). The batch must split over data x fsdp, so on more than 64
chips keep 64 batch shards, e.g. v5e-256 with ``--config.mesh.tensor=4``.
Adding ``mini`` to the argument (``:ARGS,mini``) runs the same recipe at CPU sizes
(``exgra_jax.train.miniature``); CI runs it end to end.
"""

import os

from exgra_jax.train.defaults import base_config
from exgra_jax.train.miniature import shrink, split_arg


def get_config(arg: str | None = None):
    arg, mini = split_arg(arg)
    root = arg or "data/llava_med"
    c = base_config("llava_med_7b", dtype="bfloat16", param_dtype="float32",
                    remat_policy="full", scan_layers=True)
    c.data.json_paths = (os.path.join(root, "llava_med_instruct_60k_inline_mention_long.json"),)
    c.data.image_folder = os.path.join(root, "images")
    c.tokenizer = os.path.join(root, "tokenizer")
    c.init.source = "llava_hf"  # the stage-1 result exported with convert_checkpoint to-hf
    c.init.hf_dir = os.path.join(root, "stage1_hf")

    c.alignment.enabled = True
    c.alignment.weight = 1.0
    c.alignment.blackbox_lambda = 80.0
    c.alignment.text_branch = "llm"
    c.alignment.graph_scope = "global"
    # One example per batch shard leaves nothing to pack the text branches with: the
    # response and caption together rarely fit one row, and a batch that does not fit
    # runs padded after all. Run them padded.
    c.alignment.text_pack_fraction = 0.0

    c.train.trainable = (r"^model/projector/", r"^model/llm/", r"^alignment/")
    c.train.frozen = (r"^model/vision_tower/",)
    c.train.lr = 2e-5
    c.train.global_batch_size = 64
    c.train.micro_batches = 1
    c.train.num_epochs = 3.0
    c.train.checkpoint_every = 500

    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    return shrink(c) if mini else c
