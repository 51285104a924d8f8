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
Adding ``mini`` to the argument (``:ARGS,mini``) runs the same recipe at CPU sizes
(``exgra_jax.train.miniature``); CI runs it end to end.
"""

import dataclasses
import os

import ml_collections

from exgra_jax.config_paths import load_config_file
from exgra_jax.models import config as mc
from exgra_jax.train.miniature import shrink, split_arg


def get_config(arg: str | None = None):
    arg, mini = split_arg(arg)
    root = arg or "data/llava_med"
    # Stage 2's recipe (data, alignment, optimizer, precision, mesh), on v1.5's model.
    c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                      "stage2_7b.py") + ":" + root)
    c.model = ml_collections.ConfigDict(dataclasses.asdict(mc.llava_med_v15_7b(
        dtype="bfloat16", param_dtype="float32", remat_policy="full", scan_layers=True)))
    c.data.template = "mistral_instruct"
    c.data.mm_use_im_start_end = False
    c.data.image_aspect = "pad"
    c.init.source = "llava_med"
    c.init.hf_dir = os.path.join(root, "llava-med-v1.5-mistral-7b")
    c.tokenizer = c.init.hf_dir
    c.eval.image_first = True  # LLaVA-Med v1.5's VQA prompt: "<image>\n{question}"
    return shrink(c) if mini else c
