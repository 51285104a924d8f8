"""Fine-tune ExGra-Med 7B on VQA-RAD (15 epochs, lr 2e-5, global batch 64).

    python -m exgra_jax.data.tfds.prepare vqa_rad --manual-dir RAW --data-dir TFDS \
        --export-dir VQA_JSON
    python launch/train.py --config=configs/finetune_vqa_rad_7b.py:TFDS,VQA_JSON \
        --workdir=DIR --config.init.hf_dir=STAGE2_HF

Arguments after ':' are the TFDS data dir (training reads the ``vqa_rad`` builder) and the
exported LLaVA-Med VQA JSON folder (evaluation and best-step selection read it); the
exported ``train.json`` can replace TFDS: ``--config.data.tfds_name=
--config.data.json_paths=VQA_JSON/train.json --config.data.image_folder=IMAGES``.
VQA-RAD has no validation split, so selection runs on ``test.json`` (as LLaVA-Med).
lr 2e-5: the smallest training set of the three (about 1.8k questions) takes the low end.
Weights: a stage-2 result exported with ``tools/convert_checkpoint.py to-hf``.
Best step: its params are kept in ``DIR/best`` (``best.json`` has its scores); evaluate or
export them with ``launch/eval.py --step best`` / ``convert_checkpoint.py to-hf --step best``.
Adding ``mini`` to the argument (``:ARGS,mini``) runs the same recipe at CPU sizes
(``exgra_jax.train.miniature``); CI runs it end to end.
"""

from exgra_jax.config_paths import load_sibling

RECIPE = load_sibling(__file__, "finetune_vqa_recipe")


def get_config(arg: str | None = None):
    return RECIPE.finetune_vqa_config("vqa_rad", arg, lr=2e-5, batch=64, eval_split="test",
                                      eval_every=100)
