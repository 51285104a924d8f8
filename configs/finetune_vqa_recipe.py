"""The 7B medical-VQA fine-tuning recipe that ``finetune_{vqa_rad,slake,pathvqa}_7b.py`` and
their LoRA variants share (not a config file itself): 15 epochs of the autoregressive loss
on a stage-2 model, CLIP frozen, packed rows, best-step selection on the validation VQA set.
The configs load it with ``exgra_jax.config_paths.load_sibling``.
"""

import os

import ml_collections

from exgra_jax.train.defaults import SELECT_METRIC, base_config, use_packing
from exgra_jax.train.miniature import shrink, split_arg


def finetune_vqa_config(tfds_name: str, arg: str | None, *, lr: float, batch: int,
                        eval_split: str, eval_every: int) -> ml_collections.ConfigDict:
    """The 7B medical-VQA fine-tuning recipe shared by VQA-RAD, SLAKE and PathVQA: 15 epochs
    of the autoregressive loss on a stage-2 model, CLIP frozen. ``arg`` is
    'TFDS_DIR,VQA_JSON_DIR' (the builder's data dir and its exported evaluation JSON),
    optionally with ',mini' (``exgra_jax.train.miniature``)."""
    arg, mini = split_arg(arg)
    tfds_dir, vqa_json = (arg or f"data/tfds,data/{tfds_name}").split(",")
    c = base_config("llava_med_7b", dtype="bfloat16", param_dtype="float32",
                    remat_policy="full", scan_layers=True,
                    vocab_pad_multiple=128)  # 32004 -> 32128 rows: any tensor axis splits it
    c.data.json_paths = ()
    c.data.tfds_name = tfds_name
    c.data.tfds_split = "train"
    c.data.tfds_data_dir = tfds_dir
    c.init.source = "llava_hf"  # a stage-2 result exported with convert_checkpoint to-hf
    c.init.hf_dir = "stage2_hf"
    c.tokenizer = ""  # the one to-hf saved with the weights in init.hf_dir

    c.alignment.enabled = False  # fine-tuning: the autoregressive loss only
    c.alignment.weight = 0.0

    c.train.trainable = (r"^model/projector/", r"^model/llm/")
    c.train.frozen = (r"^model/vision_tower/",)
    c.train.lr = lr
    c.train.global_batch_size = batch
    c.train.num_epochs = 15.0
    c.train.eval_every = eval_every

    c.eval.json_paths = (os.path.join(vqa_json, f"{eval_split}.json"),)
    c.eval.candidates = os.path.join(vqa_json, "candidate.json")
    # The image folder prepare.py prints in its summary (VQA_JSON/images for parquet
    # releases, else the raw image folder): --config.eval.image_folder=...
    c.eval.image_folder = os.path.join(vqa_json, "images")
    c.eval.select_metric = SELECT_METRIC
    c.eval.batch_size = 64

    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    # VQA examples are ~330 tokens: 6 per 2048-token row (share 0.96, measured by
    # tools/benchmarks/packing.py); 16 rows hold ~96 examples a step.
    use_packing(c, rows=max(1, batch // 4), images_per_row=6, examples_per_row=6,
                mean_examples_per_row=6.0, tensor=4)
    return shrink(c) if mini else c
