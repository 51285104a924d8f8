"""Fine-tune ExGra-Med 7B on SLAKE (English) with LoRA (rank 16, alpha 32, on the attention q/k/v/o
of every decoder layer and the projector; the base frozen in bfloat16).

    python launch/train.py --config=configs/finetune_slake_lora_7b.py:TFDS,VQA_JSON \
        --workdir=DIR --config.init.hf_dir=STAGE2_HF

Everything else as ``finetune_slake_7b.py`` (data, 15 epochs, batch 128, best-step
selection); lr 2e-4, LLaVA's LoRA rate. Checkpoints hold the adapters and their optimizer
state only; on resume the base is reloaded from ``init``. Export: ``exgra_jax.convert.peft``
(PEFT adapters, or the merged model as llava-hf).
Adapter input dropout (PEFT's ``lora_dropout``; LLaVA's LoRA recipe: 0.05) is off by
default: ``--config.lora.dropout=0.05``. Evaluation at any step, ``to-hf`` and
``init.source=workdir`` read such a workdir as the merged model.
"""

from exgra_jax.config_paths import load_sibling
from exgra_jax.models.lora import ATTENTION_AND_PROJECTOR
from exgra_jax.train.state import use_lora

RECIPE = load_sibling(__file__, "finetune_vqa_recipe")


def get_config(arg: str | None = None):
    c = RECIPE.finetune_vqa_config("slake", arg, lr=2e-4, batch=128, eval_split="validation",
                                   eval_every=100)
    use_lora(c, ATTENTION_AND_PROJECTOR, rank=16, alpha=32.0, base_dtype="bfloat16")
    return c
