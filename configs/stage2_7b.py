"""Stage 2 (instruction tuning with the ExGra-Med multi-graph alignment loss), 7B.

    python tools/convert_checkpoint.py to-hf --workdir STAGE1_DIR --out STAGE1_HF
    python launch/train.py --config=configs/stage2_7b.py:/data/llava_med --workdir=DIR \
        --config.init.hf_dir=STAGE1_HF

The optional argument after ':' is the data root holding LLaVA-Med's instruction data with
ExGra-Med's extended captions (``conversations_long``, made by
``tools/generate_extended_captions.py --merged``) and its ``images/`` folder; or set
``--config.data.json_paths=...`` / ``--config.data.tfds_name=llava_med`` directly.
Data-efficiency runs: ``--config.data.fraction=0.1``.

Loss: cross-entropy + 1.0 x alignment (black-box lambda 80, the quadratic matcher); the
response and caption branches run through the LLM. bf16 compute, fp32 master weights and
Adam moments, full remat of each decoder layer. The alignment settings are the defaults,
which reproduce the original (docs/fidelity.md): one graph per 16 contiguous samples, as
the original's one graph per GPU, on any mesh. Batches are packed: 32 rows of 2048 tokens,
up to 4 conversations each (~87 a step), one alignment node per conversation, padding
nodes masked out. On a v5e-64 slice (16 GiB per chip): tensor=2, fsdp=32, one row per
batch shard (peak per chip: docs/aot_compile.md). The rows must split over data x fsdp:
on more chips raise mesh.tensor (v5e-256: ``--config.mesh.tensor=8``). One example per
row: ``--config.data.packing=False --config.train.global_batch_size=64
--config.mesh.tensor=1``.
Adding ``mini`` to the argument (``:ARGS,mini``) runs the same recipe at CPU sizes
(``exgra_jax.train.miniature``); CI runs it end to end.
"""

import os

from exgra_jax.train.defaults import base_config, use_packing
from exgra_jax.train.miniature import shrink, split_arg


def get_config(arg: str | None = None):
    arg, mini = split_arg(arg)
    root = arg or "data/llava_med"
    c = base_config("llava_med_7b", dtype="bfloat16", param_dtype="float32",
                    remat_policy="full", scan_layers=True,
                    vocab_pad_multiple=128)  # 32004 -> 32128 rows: any tensor axis splits it
    c.data.json_paths = (os.path.join(root, "llava_med_instruct_60k_inline_mention_long.json"),)
    c.data.image_folder = os.path.join(root, "images")
    c.tokenizer = os.path.join(root, "tokenizer")
    c.init.source = "llava_hf"  # the stage-1 result exported with convert_checkpoint to-hf
    c.init.hf_dir = os.path.join(root, "stage1_hf")

    c.alignment.enabled = True
    c.alignment.weight = 1.0
    c.alignment.blackbox_lambda = 80.0
    c.alignment.text_branch = "llm"
    c.alignment.solver = "ipfp"
    c.alignment.graph_scope = "fixed"
    c.alignment.graph_size = 16
    # The text branches run padded: with at most 4 examples per batch shard there is
    # little to pack them with, and a batch that does not fit runs padded after all.
    c.alignment.text_pack_fraction = 0.0

    c.train.trainable = (r"^model/projector/", r"^model/llm/", r"^alignment/")
    c.train.frozen = (r"^model/vision_tower/",)
    c.train.lr = 2e-5
    c.train.global_batch_size = 64
    c.train.micro_batches = 1
    c.train.num_epochs = 3.0
    c.train.checkpoint_every = 500

    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    # Instruction conversations are ~650 tokens: 32 packed rows of 2048 hold ~87 examples
    # a step (2.7 per row, real-token share 0.90; tools/benchmarks/packing.py), one
    # alignment node each, in graphs of 16.
    use_packing(c, rows=32, images_per_row=4, examples_per_row=4, mean_examples_per_row=2.7,
                tensor=2)
    return shrink(c) if mini else c
