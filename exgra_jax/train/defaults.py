"""Every training setting and its default, in one place.

``configs/*.py`` start from ``base_config(model_preset)`` and change what differs; any
field can be overridden on the command line as ``--config.a.b=value``.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from exgra_jax.alignment.objective import AlignmentConfig
from exgra_jax.models import config as mc
from exgra_jax.parallel import DEFAULT_RULES


def _dataclass_dict(obj) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dataclasses.asdict(obj))


def base_config(model_preset: str = "tiny", **model_overrides) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = _dataclass_dict(mc.preset(model_preset, **model_overrides))

    c.alignment = _dataclass_dict(AlignmentConfig())
    c.alignment.enabled = True
    c.alignment.weight = 1.0
    c.alignment.text_branch = "llm"  # 'llm' (the original's after_de) | 'embeddings'
    c.alignment.pool_include_padding = False  # True: the original's mean over padding
    # Packed rows for the 'llm' text branches per batch shard, as a fraction of their padded
    # tokens (train/step.py); 0 runs them padded. A batch that does not fit runs padded.
    c.alignment.text_pack_fraction = 0.25

    # Data (exgra_jax.data.pipeline.DataConfig); image size and image-token count come
    # from the model config.
    c.data = ml_collections.ConfigDict(dict(
        json_paths=(), image_folder="", tfds_name="", tfds_split="train", tfds_data_dir="",
        template="llava_v0", max_len=2048, response_len=128, caption_len=256,
        image_aspect="pad", mm_use_im_start_end=True, seed=0, fraction=1.0,
        max_bad_fraction=0.05, worker_count=0, read_threads=1, shuffle=True,
        allow_outside_image_folder=False,  # True: image names may leave image_folder
        # Packing (data/packing.py): several examples per row of max_len tokens; then
        # train.global_batch_size counts rows. tools/benchmarks/packing.py measures a data
        # mix and prints the per-row limits and the mean examples per row, which turns
        # train.num_epochs into steps.
        packing=False, images_per_row=6, examples_per_row=8, mean_examples_per_row=0.0,
    ))
    # DICOM / NIfTI to RGB (exgra_jax.data.medical_image.MedicalImageOptions): window is a
    # CT preset (brain, subdural, stroke, soft_tissue, abdomen, mediastinum, liver, lung,
    # wide, bone) or "C,W"; "" uses the file's window, else the percentiles' range.
    c.data.medical = ml_collections.ConfigDict(dict(
        window="", channel_windows=(), use_file_window=True, percentiles=(0.0, 100.0),
        frame=ml_collections.config_dict.placeholder(int),  # None: the middle frame
        slice_index=ml_collections.config_dict.placeholder(int),  # None: the middle slice
        axis=-1,
    ))
    # A local Hugging Face tokenizer directory; '' with init.source llava_hf/llava_med: the
    # one saved with those weights (init.hf_dir).
    c.tokenizer = ""

    c.train = ml_collections.ConfigDict(dict(
        seed=0,
        global_batch_size=64,
        micro_batches=1,  # gradient accumulation steps
        num_epochs=1.0,
        total_steps=0,  # 0: derived from num_epochs and the data set size
        lr=2e-5,
        schedule="warmup_cosine",
        warmup_frac=0.03,
        weight_decay=0.0,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        clip_norm=1.0,
        # Regexes over parameter paths such as 'model/llm/layers/attn/q/kernel'.
        trainable=(r"^model/projector/", r"^model/llm/", r"^alignment/"),
        frozen=(r"^model/vision_tower/",),
        trainable_embedding_rows=(),  # if set, only these rows of embed_tokens train
        log_every=10,
        eval_every=0,  # 0: only at the end
        eval_batches=0,  # 0: the whole eval set
        checkpoint_every=500,
        keep_checkpoints=3,
        async_checkpoint=True,
        peak_flops_per_device=0.0,  # for MFU; 0: not reported
        stop_after_steps=0,  # >0: stop (with a checkpoint) after this many steps this run
    ))
    c.eval = ml_collections.ConfigDict(dict(
        json_paths=(), image_folder="", batch_size=8, candidates="",
        max_new_tokens=32, select_metric="",
        # Where the prompt puts the image: False after the question (LLaVA-Med's VQA
        # evaluation), True before it (where LLaVA-Med's training conversations put it).
        image_first=False,
    ))

    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, num_slices=1))
    c.rules = tuple(DEFAULT_RULES)

    # Where the initial weights come from when the workdir has no checkpoint.
    c.init = ml_collections.ConfigDict(dict(
        source="random",  # random | llava_hf | llava_med | clip_llama | workdir
        hf_dir="", clip_dir="", llama_dir="", workdir="",
    ))
    c.distributed = ml_collections.ConfigDict(dict(
        coordinator_address="", num_processes=0, process_id=-1, local_device_ids="",
    ))
    return c


# Best fine-tuning step: the mean of these two metric keys of exgra_jax.eval.metrics.
SELECT_METRIC = "mean(open_recall,closed_accuracy)"


def use_packing(c, *, rows: int, images_per_row: int, examples_per_row: int,
                mean_examples_per_row: float, tensor: int) -> None:
    """Pack several examples per row (data/packing.py), in place. ``rows`` is the new
    train.global_batch_size; chosen with the per-row limits and the mean (measured by
    tools/benchmarks/packing.py on the recipe's data mix) so that a step sees about as
    many examples as the padded recipe. ``tensor``: the tensor-parallel ways that keep
    rows divisible by the batch shards on a v5e-64 (64 / tensor shards)."""
    c.data.packing = True
    c.data.images_per_row = images_per_row
    c.data.examples_per_row = examples_per_row
    c.data.mean_examples_per_row = mean_examples_per_row
    c.train.global_batch_size = rows
    c.mesh.tensor = tensor


def finetune_vqa_config(tfds_name: str, arg: str | None, *, lr: float, batch: int,
                        eval_split: str, eval_every: int) -> ml_collections.ConfigDict:
    """The 7B medical-VQA fine-tuning recipe shared by VQA-RAD, SLAKE and PathVQA: 15 epochs
    of the autoregressive loss on a stage-2 model, CLIP frozen. ``arg`` is
    'TFDS_DIR,VQA_JSON_DIR' (the builder's data dir and its exported evaluation JSON),
    optionally with ',mini' (``exgra_jax.train.miniature``)."""
    import os  # noqa: PLC0415

    from exgra_jax.train.miniature import shrink, split_arg  # noqa: PLC0415

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
