"""Zero-shot medical image classification (OmniMedVQA multiple choice) with a 7B model.

    python launch/eval.py --config=configs/zero_shot.py:/data/OmniMedVQA --workdir=DIR \
        --task=zero_shot --config.init.hf_dir=EXGRA_MED_HF \
        --config.eval.json_paths=/data/OmniMedVQA/QA_information/Open-access/ACRIMA.json

The argument after ':' is the OmniMedVQA root: question files (``QA_information/*/*.json``)
name images relative to it. Each question becomes a prompt listing its 2-4 options
(exgra_jax.eval.zero_shot_scoring); the greedy answer maps to the most similar option, and
accuracy is reported per source data set and overall. The weights are read from
``init.hf_dir`` (llava-hf layout; ``--config.init.source=llava_med`` for the LLaVA-Med v1 /
ExGra-Med release layout) unless DIR holds a training checkpoint.
Adding ``mini`` to the argument (``:ARGS,mini``) runs the same recipe at CPU sizes
(``exgra_jax.train.miniature``); CI runs it end to end.
"""

import os

from exgra_jax.train.defaults import base_config
from exgra_jax.train.miniature import shrink, split_arg


def get_config(arg: str | None = None):
    arg, mini = split_arg(arg)
    root = arg or "data/OmniMedVQA"
    c = base_config("llava_med_7b", dtype="bfloat16", param_dtype="bfloat16",
                    scan_layers=True)
    c.init.source = "llava_hf"
    c.init.hf_dir = "exgra_med_7b_hf"
    c.tokenizer = ""  # the one saved with the weights in init.hf_dir
    c.alignment.enabled = False
    c.alignment.weight = 0.0

    c.eval.json_paths = (os.path.join(root, "QA_information", "Open-access", "ACRIMA.json"),)
    c.eval.image_folder = root
    c.eval.batch_size = 16
    c.eval.max_new_tokens = 32  # answers are one option; enough for the longest names

    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    return shrink(c) if mini else c
