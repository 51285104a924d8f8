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
import functools
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from exgra_jax import parallel, paths
from exgra_jax.checkpoint import Checkpointer, check_meta, param_shapes
from exgra_jax.inference.generate import param_shardings, shard_params
from exgra_jax.models import lora
from exgra_jax.models.config import ModelConfig
from exgra_jax.models.layers import dtype_of
from exgra_jax.models.llava import abstract_params, init_params
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
    """The model params of a training checkpoint (``step``: a number, None for the newest,
    or 'best') and its step, sharded on ``mesh`` (None: host numpy arrays). Every reader
    of a workdir comes here (evaluation, chat, serving, ``to-hf``, ``init.source=workdir``).

    A full checkpoint gives its ``params['model']``. A LoRA checkpoint holds only the
    adapters: the base is reloaded from where the LoRA run took it, then the adapters are
    folded in (``_merged_lora``)."""
    directory = paths.absolute(checkpoint_directory(workdir, step))
    if not paths.is_dir(directory):
        if step == BEST:
            raise FileNotFoundError(f"{directory} does not exist: no best step was selected "
                                    "(train with config.eval.select_metric set)")
        raise FileNotFoundError(f"{directory} does not exist; is {workdir} a training workdir?")
    ckpt = Checkpointer(directory, async_save=False, read_only=True)
    try:
        step = _step_to_load(ckpt.all_steps(), directory, step)
        abstract = abstract_params(mcfg)
        expected = {"model": mcfg.to_dict(), "param_shapes": param_shapes({"model": abstract})}
        meta = ckpt.read_meta(step)
        check_meta(meta, expected, f"{directory}/{step}", scope="['model']")
        if holds_lora(ckpt, step):
            params = _merged_lora(workdir, ckpt, step, meta, mcfg, mesh, rules)
        else:
            shardings = None if mesh is None else param_shardings(mcfg, mesh, rules)
            params = ckpt.restore_params(step, {"model": _placed(abstract, shardings)})["model"]
    finally:
        ckpt.close()
    return params, step


def holds_lora(ckpt: Checkpointer, step: int) -> bool:
    """Whether a checkpoint step is a LoRA run's (adapters under ``state['params']``)."""
    return "lora" in dict(ckpt.manager.item_metadata(step)["state"]["params"])


def _placed(abstract, shardings):
    """ShapeDtypeStructs carrying ``shardings`` (None: left unplaced, restored to host)."""
    if shardings is None:
        return abstract
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        abstract, shardings)


def _merged_lora(workdir: str, ckpt: Checkpointer, step: int, meta: dict, mcfg: ModelConfig,
                 mesh: Mesh | None, rules) -> Any:
    """Base + adapters of a LoRA checkpoint, merged as the run computed its forward: the base
    held in ``lora.base_dtype``, W + scale A B summed in float32, returned in param_dtype.

    The LoRA settings and the seed come from the run's WORKDIR/config.json, the base's source
    from the checkpoint's meta (``lora_base``: the run's ``init`` section when it saved)."""
    where = f"{ckpt.directory}/{step}"
    if not paths.exists(paths.join(workdir, CONFIG_JSON)):
        raise FileNotFoundError(f"{where} holds LoRA adapters only; merging them needs the "
                                f"run's {CONFIG_JSON} (its lora section and base), missing in "
                                f"{workdir}")
    run = read_workdir_config(workdir)
    lcfg = lora.LoraConfig.from_config(run)
    if lcfg is None or "lora_base" not in meta:
        raise ValueError(f"{where} holds LoRA adapters but {workdir}/{CONFIG_JSON} has no "
                         "enabled lora section or the checkpoint no lora_base: the workdir is "
                         "not as the LoRA trainer wrote it")
    boxed = lora.init_adapters(jax.random.key(0), {"model": abstract_params(mcfg, boxed=True)},
                               lcfg)
    adapters = nn.unbox(boxed)
    saved = {k: v for k, v in meta.get("param_shapes", {}).items() if k.startswith("['lora']")}
    if saved != param_shapes({"lora": adapters}):
        raise ValueError(f"{where}: the adapter shapes differ from those of the lora section "
                         f"of {workdir}/{CONFIG_JSON} (rank {lcfg.rank}, targets "
                         f"{list(lcfg.targets)})")
    if mesh is not None:
        adapters = _placed(adapters, parallel.logical_sharding(boxed, mesh, rules))
    restored = ckpt.restore_params(step, {"lora": adapters})
    run.init = ml_collections.ConfigDict(meta["lora_base"])
    base = init_source_model_params(run, mcfg, mesh, rules)
    params = {**lora.hold_base({"model": base}, lcfg), **restored}
    if mesh is None:  # in the host's memory, as the rest of a host restore
        with jax.default_device(jax.devices("cpu")[0]):
            return jax.tree.map(np.asarray, _merge(params, lcfg, mcfg.param_dtype))
    return jax.device_put(_merge(params, lcfg, mcfg.param_dtype),
                          param_shardings(mcfg, mesh, rules))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _merge(params: dict, lcfg, param_dtype: str) -> dict:
    """The merged model, every leaf in ``param_dtype`` (the held base's too)."""
    dt = dtype_of(param_dtype)
    return jax.tree.map(lambda x: x.astype(dt), lora.with_adapters(params, lcfg, dt)["model"])


# Jitted once per model config: every random base of a process compiles the init once.
_random_model_params = jax.jit(init_params, static_argnums=0)


def init_source_model_params(config, mcfg: ModelConfig, mesh: Mesh | None, rules) -> Any:
    """The model params ``config.init`` names (random from ``train.seed``, a Hugging Face
    checkpoint, or another workdir's newest step), in param_dtype, sharded on ``mesh``
    (None: host numpy arrays)."""
    src = config.init.source
    shardings = None if mesh is None else param_shardings(mcfg, mesh, rules)
    if src == "workdir":
        return restore_model_params(config.init.workdir, mcfg, mesh, rules)[0]
    if src == "random":
        params = _random_model_params(mcfg, jax.random.key(config.train.seed))
        return jax.tree.map(np.asarray, params) if mesh is None else jax.device_put(params,
                                                                                    shardings)
    loaded = hf_model_params(config, mcfg)
    if param_shapes(loaded) != param_shapes(abstract_params(mcfg)):
        raise ValueError(f"weights from init.source={src} do not fit the model config {mcfg}")
    dt = dtype_of(mcfg.param_dtype)
    if mesh is None:
        return jax.tree.map(lambda x: np.asarray(x, dt), loaded)
    leaves, treedef = jax.tree.flatten(loaded)
    del loaded  # the list is now the only holder of the host arrays
    return jax.tree.unflatten(
        treedef, _placed_one_by_one(leaves, treedef.flatten_up_to(shardings), dt))


def _placed_one_by_one(host: list, shardings: list, dt) -> list:
    """Host numpy arrays placed by ``shardings`` in ``dt``, each dropped from ``host`` as
    soon as its device copy exists: the host never holds the weights twice."""
    placed = []
    for i, sh in enumerate(shardings):
        placed.append(jax.device_put(np.asarray(host[i], dt), sh))
        host[i] = None
    return placed


def hf_model_params(config, mcfg: ModelConfig) -> dict:
    """The model's weights from a Hugging Face source (``config.init``), as numpy arrays in
    ``param_dtype`` (fp32 master weights; the compute dtype only shapes activations)."""
    from exgra_jax.convert import hf  # noqa: PLC0415

    src, arrays = config.init.source, mcfg.param_dtype
    over = dict(scan_layers=mcfg.scan_layers, remat_policy=mcfg.remat_policy,
                param_dtype=mcfg.param_dtype, vocab_pad_multiple=mcfg.vocab_pad_multiple)
    if src == "llava_hf":
        _, loaded = hf.load_llava(config.init.hf_dir, arrays, **over)
    elif src == "llava_med":
        _, loaded = hf.load_llava_med(
            config.init.hf_dir, arrays, clip_dir=config.init.clip_dir or None,
            image_token_id=mcfg.image_token_id, dense_connector=mcfg.dense_connector,
            vision_heads=mcfg.vision_heads, **over)  # releases do not record the head count
    elif src == "clip_llama":
        _, loaded = hf.load_clip_llama(config.init.clip_dir, config.init.llama_dir, arrays,
                                       vocab_size=mcfg.vocab_size,
                                       image_token_id=mcfg.image_token_id,
                                       pad_token_id=mcfg.pad_token_id, **over)
    else:
        raise ValueError("init.source must be random|llava_hf|llava_med|clip_llama|workdir, "
                         f"got {src!r}")
    return loaded


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
