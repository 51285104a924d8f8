"""Stage 2 (instruction tuning with the ExGra-Med multi-graph alignment loss), 7B, LoRA:
rank 16, alpha 32 on the attention q/k/v/o of every decoder layer and the projector, the base
frozen in bfloat16; the alignment GNN trains in full.

    python launch/train.py --config=configs/stage2_lora_7b.py:/data/llava_med --workdir=DIR \
        --config.init.hf_dir=STAGE1_HF

Everything else as ``stage2_7b.py`` (data, alignment settings, batch 64, 3 epochs); lr 2e-4,
LLaVA's LoRA rate. The alignment objective is unchanged: its gradients reach the adapters
through the image features and the LLM text branches. Checkpoints hold the adapters, the
GNN and their optimizer state; on resume the base is reloaded from ``init``.
Adapter input dropout (PEFT's ``lora_dropout``; LLaVA's LoRA recipe: 0.05) is off by
default: ``--config.lora.dropout=0.05``. Evaluation at any step, ``to-hf`` and
``init.source=workdir`` read such a workdir as the merged model.
"""

import importlib.util
import os

from exgra_jax.models.lora import ATTENTION_AND_PROJECTOR
from exgra_jax.train.state import use_lora


def _stage2_config(arg):
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "stage2_7b.py")
    spec = importlib.util.spec_from_file_location("stage2_7b", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def get_config(arg: str | None = None):
    c = _stage2_config(arg)
    c.train.lr = 2e-4
    use_lora(c, ATTENTION_AND_PROJECTOR, rank=16, alpha=32.0, base_dtype="bfloat16",
             also_train=(r"^alignment/",))
    return c
