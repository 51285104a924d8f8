"""Load what evaluation needs: model config, parameters (on a mesh) and tokenizer.

Two sources:
  * a training workdir: the newest (or a given) step in ``WORKDIR/checkpoints``, or with
    step ``"best"`` the best validation step kept in ``WORKDIR/best`` when fine-tuning
    with ``config.eval.select_metric`` (``exgra_jax.train.selection``). Only
    ``params['model']`` is read (orbax partial restore), never the optimizer state or the
    alignment head, so a 7B model needs memory for its weights alone. The checkpoint's
    meta is checked against the config's model first, with the same error training gives.
  * a llava-hf directory (``exgra_jax.convert.hf.load_llava``); its tokenizer is read from
    the same directory when it has one, else from ``config.tokenizer``.

The training config is taken from ``--config`` when given, else from ``WORKDIR/config.json``
(written by the trainer), so ``python -m exgra_jax.eval.chat --workdir DIR`` needs nothing else.

The parameters are placed on the config's mesh over every device of every process, sharded
by its rules exactly as in training: a 7B model is never gathered onto one host or device.
Local paths and gs:// URLs work alike.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from exgra_jax import parallel, paths
from exgra_jax.checkpoint import Checkpointer, check_meta, param_shapes
from exgra_jax.inference.generate import param_shardings, shard_params
from exgra_jax.models.config import ModelConfig
from exgra_jax.workdir import BEST, BEST_DIR, CHECKPOINTS, CONFIG_JSON

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


@dataclasses.dataclass
class EvalModel:
    config: ModelConfig
    params: Any  # the LlavaModel parameter tree, placed on `mesh`
    tokenizer: Any
    mesh: Mesh
    rules: tuple
    step: int | None  # checkpoint step (None for a Hugging Face directory)
    name: str  # for answers files ("model_id")


def read_workdir_config(workdir: str) -> ml_collections.ConfigDict:
    path = paths.join(workdir, CONFIG_JSON)
    if not paths.exists(path):
        raise FileNotFoundError(f"{path} not found: pass --config (the training config)")
    return ml_collections.ConfigDict(paths.read_json(path))


def rules_of(config) -> tuple:
    return tuple((name, tuple(ax) if isinstance(ax, list) else ax) for name, ax in config.rules)


def eval_mesh(config, devices=None) -> Mesh:
    """The config's (training) mesh over ``devices`` (default: every device of every
    process); an axis set to -1 fills them."""
    m = config.mesh
    devices = jax.devices() if devices is None else devices
    return parallel.make_mesh(dict(data=m.data, fsdp=m.fsdp, tensor=m.tensor), devices=devices)


def _model_config(config) -> ModelConfig:
    return ModelConfig.from_dict(config.model.to_dict())


def parse_step(value: str | int | None) -> int | str | None:
    """A ``--step`` value: None or '' (the newest), 'best', or a step number."""
    if value is None or value == "":
        return None
    if isinstance(value, int) or value == BEST:
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    raise ValueError(f"--step must be a step number or 'best', got {value!r}")


def checkpoint_directory(workdir: str, step: int | str | None) -> str:
    """Where ``step`` of ``workdir`` lives: WORKDIR/best for 'best', else WORKDIR/checkpoints."""
    return paths.join(workdir, BEST_DIR if step == BEST else CHECKPOINTS)


def _step_to_load(steps: list[int], directory: str, step: int | str | None) -> int:
    steps = sorted(steps)
    if step == BEST:
        if not steps:
            raise FileNotFoundError(f"no best checkpoint in {directory}; it is written while "
                                    "training with config.eval.select_metric set")
        return steps[-1]
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {directory}; train first or pass --hf_dir")
    if step is None:
        return steps[-1]
    if step not in steps:
        raise FileNotFoundError(f"no checkpoint for step {step} in {directory}; have {steps}")
    return step


def restore_model_params(workdir: str, mcfg: ModelConfig, mesh: Mesh | None, rules,
                         step: int | str | None = None) -> tuple[Any, int]:
    """``params['model']`` of a training checkpoint (``step``: a number, None for the
    newest, or 'best'), sharded on ``mesh`` (None: host numpy arrays); and its step."""
    directory = paths.absolute(checkpoint_directory(workdir, step))
    if not paths.is_dir(directory):
        if step == BEST:
            raise FileNotFoundError(f"{directory} does not exist: no best step was selected "
                                    "(train with config.eval.select_metric set)")
        raise FileNotFoundError(f"{directory} does not exist; is {workdir} a training workdir?")
    ckpt = Checkpointer(directory, async_save=False, read_only=True)
    try:
        step = _step_to_load(ckpt.all_steps(), directory, step)
        abstract = _abstract_params(mcfg)
        if mesh is not None:
            abstract = jax.tree.map(
                lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                abstract, param_shardings(mcfg, mesh, rules))
        expected = {"model": mcfg.to_dict(), "param_shapes": param_shapes({"model": abstract})}
        check_meta(ckpt.read_meta(step), expected, f"{directory}/{step}", scope="['model']")
        params = ckpt.restore_params(step, {"model": abstract})["model"]
    finally:
        ckpt.close()
    return params, step


def _abstract_params(mcfg: ModelConfig):
    from exgra_jax.models.llava import init_params  # noqa: PLC0415

    return jax.eval_shape(lambda: init_params(mcfg, jax.random.key(0)))


def _load_tokenizer(path: str, mcfg: ModelConfig):
    from exgra_jax.data.tokenizer import check_tokenizer, load_tokenizer  # noqa: PLC0415

    if not path:
        raise ValueError("no tokenizer: set config.tokenizer (a Hugging Face tokenizer dir)")
    tokenizer = load_tokenizer(path)
    check_tokenizer(tokenizer, mcfg)
    return tokenizer


def load_for_eval(config, *, workdir: str | None = None, hf_dir: str | None = None,
                  step: int | str | None = None, mesh: Mesh | None = None) -> EvalModel:
    """Model, parameters and tokenizer from a workdir checkpoint (``step``: a number, None
    for the newest, 'best' for the best validation step) or a llava-hf directory."""
    if bool(workdir) == bool(hf_dir):
        raise ValueError("give exactly one of workdir (a training run) or hf_dir (llava-hf)")
    rules = rules_of(config)
    mesh = eval_mesh(config) if mesh is None else mesh
    if hf_dir:
        from exgra_jax.convert.hf import load_llava  # noqa: PLC0415

        base = _model_config(config)
        mcfg, host_params = load_llava(hf_dir, array_dtype=base.param_dtype, dtype=base.dtype,
                                       param_dtype=base.param_dtype,
                                       scan_layers=base.scan_layers, remat_policy="none")
        params = shard_params(mcfg, jax.tree.map(np.asarray, host_params), mesh, rules)
        has_tok = any(paths.exists(paths.join(hf_dir, f)) for f in _TOKENIZER_FILES)
        tokenizer = _load_tokenizer(hf_dir if has_tok else config.tokenizer, mcfg)
        return EvalModel(mcfg, params, tokenizer, mesh, rules, None, paths.basename(hf_dir))
    mcfg = _model_config(config)
    params, step = restore_model_params(workdir, mcfg, mesh, rules, step)
    tokenizer = _load_tokenizer(config.tokenizer, mcfg)
    name = f"{paths.basename(workdir)}@{step}"
    return EvalModel(mcfg, params, tokenizer, mesh, rules, step, name)
