"""ExGra-Med stage 2 (instruction tuning with the multi-graph alignment loss) starting from
LLaVA-Med v1.5 (Mistral-7B, CLIP ViT-L/14 at 336 px), instead of a stage-1 LLaMA model.

    python launch/train.py --config=configs/stage2_from_llava_med_v15.py:/data/llava_med \
        --workdir=DIR --config.init.hf_dir=/models/llava-med-v1.5-mistral-7b

The argument after ':' is the data root of configs/stage2_7b.py (LLaVA-Med's instruction
data with ExGra-Med's extended captions, and ``images/``). ``init.hf_dir`` is the release
directory as published (``model_type`` ``llava_mistral``, sharded safetensors, its
tokenizer); it is read directly (``init.source='llava_med'``), the four LLaVA-Med v1 tokens
([PAD], <im_patch>, <im_start>, <im_end>) appended to its vocabulary, and its tokenizer
is the run's tokenizer.

As v1.5 was trained: template ``mistral_instruct``, no image start/end tokens, images
padded to square with the mean colour, 576 image tokens. Everything else (loss weights,
black-box lambda, frozen tower, optimizer, precision, mesh) is stage 2's; at 336 px each
example carries 2.25x the image tokens of the 224-px model.
"""

import os

from exgra_jax.train.defaults import base_config


def get_config(arg: str | None = None):
    root = arg or "data/llava_med"
    c = base_config("llava_med_v15_7b", dtype="bfloat16", param_dtype="float32",
                    remat_policy="full", scan_layers=True)
    c.data.json_paths = (os.path.join(root, "llava_med_instruct_60k_inline_mention_long.json"),)
    c.data.image_folder = os.path.join(root, "images")
    c.data.template = "mistral_instruct"
    c.data.mm_use_im_start_end = False
    c.data.image_aspect = "pad"
    c.init.source = "llava_med"
    c.init.hf_dir = os.path.join(root, "llava-med-v1.5-mistral-7b")
    c.tokenizer = c.init.hf_dir
    c.eval.image_first = True  # LLaVA-Med v1.5's VQA prompt: "<image>\n{question}"

    c.alignment.enabled = True
    c.alignment.weight = 1.0
    c.alignment.blackbox_lambda = 80.0
    c.alignment.text_branch = "llm"
    c.alignment.graph_scope = "global"
    c.alignment.text_pack_fraction = 0.0  # one example per batch shard: nothing to pack

    c.train.trainable = (r"^model/projector/", r"^model/llm/", r"^alignment/")
    c.train.frozen = (r"^model/vision_tower/",)
    c.train.lr = 2e-5
    c.train.global_batch_size = 64
    c.train.micro_batches = 1
    c.train.num_epochs = 3.0
    c.train.checkpoint_every = 500

    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    return c
