"""Evaluate LLaVA-Med v1.5 (Mistral-7B, CLIP-336) on VQA-RAD as released, with its own
prompt (``mistral_instruct``, "<image>\\n{question}").

    python -m exgra_jax.data.tfds.prepare vqa_rad --manual-dir RAW --data-dir TFDS \
        --export-dir VQA_JSON
    python tools/convert_checkpoint.py from-hf --format llava-med \
        --hf-dir /models/llava-med-v1.5-mistral-7b --out DIR \
        --config configs/eval_llava_med_v15_vqa_rad.py --config-arg VQA_JSON,/models/llava-med-v1.5-mistral-7b
    python launch/eval.py --config=configs/eval_llava_med_v15_vqa_rad.py:VQA_JSON,/models/llava-med-v1.5-mistral-7b \
        --workdir=DIR --task=vqa

The argument after ':' is 'VQA_JSON,V15_DIR': the exported LLaVA-Med VQA JSON folder
(``test.json``, ``candidate.json``, ``images/``) and the release directory (weights and
tokenizer). ``from-hf`` turns the release into a workdir at step 0 (the same import as
configs/stage2_from_llava_med_v15.py); ``tools/convert_checkpoint.py to-hf --workdir DIR``
then gives a llava-hf directory with processor and chat template for transformers/vLLM.
Adding ``mini`` to the argument (``:ARGS,mini``) runs the same recipe at CPU sizes
(``exgra_jax.train.miniature``); CI runs it end to end.
"""

import os

from exgra_jax.train.defaults import base_config
from exgra_jax.train.miniature import shrink, split_arg


def get_config(arg: str | None = None):
    arg, mini = split_arg(arg)
    vqa_json, v15_dir = (arg or "data/vqa_rad,llava-med-v1.5-mistral-7b").split(",")
    c = base_config("llava_med_v15_7b", dtype="bfloat16", param_dtype="bfloat16",
                    scan_layers=True)
    c.init.source = "llava_med"
    c.init.hf_dir = v15_dir
    c.tokenizer = v15_dir
    c.data.template = "mistral_instruct"
    c.data.mm_use_im_start_end = False
    c.data.image_aspect = "pad"
    c.alignment.enabled = False
    c.alignment.weight = 0.0

    c.eval.json_paths = (os.path.join(vqa_json, "test.json"),)
    c.eval.candidates = os.path.join(vqa_json, "candidate.json")
    c.eval.image_folder = os.path.join(vqa_json, "images")
    c.eval.image_first = True
    c.eval.batch_size = 64
    c.eval.max_new_tokens = 32

    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    return shrink(c) if mini else c
