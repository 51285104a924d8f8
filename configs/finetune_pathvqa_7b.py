"""Fine-tune ExGra-Med 7B on PathVQA (15 epochs, lr 3e-5, global batch 64).

    python -m exgra_jax.data.tfds.prepare path_vqa --manual-dir RAW --data-dir TFDS \
        --export-dir VQA_JSON
    python launch/train.py --config=configs/finetune_pathvqa_7b.py:TFDS,VQA_JSON \
        --workdir=DIR --config.init.hf_dir=STAGE2_HF

Arguments after ':' are the TFDS data dir (training reads the ``path_vqa`` builder) and the
exported LLaVA-Med VQA JSON folder; the best step is chosen on ``validation.json`` by the
mean of open recall and closed accuracy. lr 3e-5: the largest training set (about 20k
questions) at the usual batch, the middle of the 2e-5..4e-5 range. The exported
``train.json`` can replace TFDS (``--config.data.tfds_name= --config.data.json_paths=...``).
Best step: its params are kept in ``DIR/best`` (``best.json`` has its scores); evaluate or
export them with ``launch/eval.py --step best`` / ``convert_checkpoint.py to-hf --step best``.
Adding ``mini`` to the argument (``:ARGS,mini``) runs the same recipe at CPU sizes
(``exgra_jax.train.miniature``); CI runs it end to end.
"""

from exgra_jax.config_paths import load_sibling

RECIPE = load_sibling(__file__, "finetune_vqa_recipe")


def get_config(arg: str | None = None):
    return RECIPE.finetune_vqa_config("path_vqa", arg, lr=3e-5, batch=64, eval_split="validation",
                                      eval_every=500)
