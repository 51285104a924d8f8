"""Every training setting and its default, in one place.

``configs/*.py`` start from ``base_config(model_preset)`` and change what differs; any
field can be overridden on the command line as ``--config.a.b=value``.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from exgra_jax.alignment.objective import AlignmentConfig
from exgra_jax.data.medical_image import MedicalImageOptions
from exgra_jax.data.pipeline import DataConfig
from exgra_jax.models import config as mc
from exgra_jax.parallel import DEFAULT_RULES

# DataConfig fields that do not come from config.data: the image geometry and normalisation
# follow the model config, the batch and the number of passes the launcher (per host).
DATA_SET_ELSEWHERE = ("image_size", "vision_type", "num_image_tokens", "batch_size",
                      "num_epochs")


def _dataclass_dict(obj) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dataclasses.asdict(obj))


def config_defaults(cls, skip: tuple[str, ...] = ()) -> ml_collections.ConfigDict:
    """A dataclass's fields and defaults as config fields. A None default (an optional
    value) becomes '' for a string and a typed placeholder for an int, since a
    ``--config.a.b=value`` flag needs the field's type."""
    out = ml_collections.ConfigDict()
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        value = f.default
        if value is None:
            kind = str(f.type)
            if "int" in kind:
                value = ml_collections.config_dict.placeholder(int)
            elif "str" in kind:
                value = ""
            else:
                raise TypeError(f"{cls.__name__}.{f.name}: no config form for None of {kind}")
        out[f.name] = value
    return out


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

    # Data: DataConfig's fields and defaults (exgra_jax.data.pipeline), less those the model
    # config and the launcher set; '' is an unset path. With data.packing, several examples
    # share a row of max_len tokens and train.global_batch_size counts rows;
    # tools/benchmarks/packing.py measures a data mix and prints the per-row limits and the
    # mean examples per row, which turns train.num_epochs into steps.
    c.data = config_defaults(DataConfig, skip=(*DATA_SET_ELSEWHERE, "medical"))
    c.data.mean_examples_per_row = 0.0
    # DICOM / NIfTI to RGB (MedicalImageOptions): window is a CT preset (brain, subdural,
    # stroke, soft_tissue, abdomen, mediastinum, liver, lung, wide, bone) or "C,W"; "" uses
    # the file's window, else the percentiles' range; frame / slice_index None: the middle.
    c.data.medical = config_defaults(MedicalImageOptions)
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
