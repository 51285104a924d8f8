"""The ExGra-Med trainer: build everything from a config, then train, checkpoint, evaluate.

``train_and_evaluate(config, workdir)`` resumes from the newest checkpoint in
``workdir/checkpoints`` when there is one (params, optimizer state, step and the data
iterator of every process), saves every ``checkpoint_every`` steps and on SIGTERM, and
writes metrics to the console and to TensorBoard event files in ``workdir/tb``. With
``eval.select_metric`` set it also answers the validation VQA set every ``eval_every``
steps and at the end, and keeps the best step's params in ``workdir/best``
(``exgra_jax.train.selection``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from exgra_jax import parallel
from exgra_jax.alignment.objective import AlignmentConfig, MultiGraphAlignment
from exgra_jax.checkpoint import Checkpointer, param_shapes
from exgra_jax.models import lora
from exgra_jax.models.config import ModelConfig
from exgra_jax.models.llava import LlavaModel
from exgra_jax.train import state as st
from exgra_jax.train.step import StepConfig, make_eval_step, make_train_step, pack_layout

log = logging.getLogger("exgra_jax.train")


# =============================================================================== configs
def model_config(config) -> ModelConfig:
    return ModelConfig.from_dict(config.model.to_dict())


def alignment_config(config) -> AlignmentConfig | None:
    a = config.alignment
    if not a.enabled or a.weight == 0:
        return None
    names = {f.name for f in dataclasses.fields(AlignmentConfig)}
    return AlignmentConfig(**{k: v for k, v in a.to_dict().items() if k in names})


def data_config(config, mcfg: ModelConfig, batch_size: int, *, eval_mode: bool = False):
    from exgra_jax.data.pipeline import DataConfig  # noqa: PLC0415

    d = config.data.to_dict()
    if eval_mode:
        d.update(json_paths=tuple(config.eval.json_paths), image_folder=config.eval.image_folder,
                 tfds_name="", shuffle=False)
    return DataConfig(
        json_paths=tuple(d["json_paths"]), image_folder=d["image_folder"] or None,
        tfds_name=d["tfds_name"] or None, tfds_split=d["tfds_split"],
        tfds_data_dir=d["tfds_data_dir"] or None, template=d["template"],
        max_len=d["max_len"], response_len=d["response_len"], caption_len=d["caption_len"],
        image_size=mcfg.image_size, image_aspect=d["image_aspect"],
        num_image_tokens=mcfg.num_image_tokens, mm_use_im_start_end=d["mm_use_im_start_end"],
        batch_size=batch_size, seed=d["seed"], fraction=d["fraction"],
        max_bad_fraction=d["max_bad_fraction"], worker_count=d["worker_count"],
        read_threads=d["read_threads"], shuffle=d["shuffle"] and not eval_mode,
        num_epochs=None if not eval_mode else 1,
    )


def validate(config, mcfg: ModelConfig, acfg: AlignmentConfig | None, mesh) -> None:
    """Errors that say what to change, before anything compiles."""
    t = config.train
    shards = parallel.batch_shard_count(mesh)
    if t.global_batch_size % (shards * t.micro_batches):
        raise ValueError(
            f"train.global_batch_size={t.global_batch_size} must be divisible by the batch "
            f"shards (mesh data x fsdp = {shards}) times train.micro_batches={t.micro_batches}"
        )
    if t.global_batch_size % jax.process_count():
        raise ValueError(f"train.global_batch_size must be divisible by the "
                         f"{jax.process_count()} processes")
    block = mcfg.num_image_tokens + (2 if config.data.mm_use_im_start_end else 0)
    if config.data.max_len <= block:
        raise ValueError(f"data.max_len={config.data.max_len} cannot hold the {block} image "
                         "tokens; raise data.max_len")
    if config.data.max_len > mcfg.max_positions:
        raise ValueError(f"data.max_len={config.data.max_len} exceeds model.max_positions="
                         f"{mcfg.max_positions}")
    if acfg is not None:
        micro = t.global_batch_size // t.micro_batches
        per_graph = micro // shards if acfg.graph_scope == "device" else micro
        if per_graph <= acfg.k:
            raise ValueError(
                f"alignment graphs get {per_graph} samples ({acfg.graph_scope} scope) but kNN "
                f"needs more than k={acfg.k}: raise the batch, lower alignment.k, or use "
                "alignment.graph_scope='global'"
            )
    for name in ("json_paths",):
        for p in config.data[name]:
            if not os.path.exists(p):
                raise FileNotFoundError(f"data.{name}: {p} does not exist")
    if config.data.image_folder and not os.path.isdir(config.data.image_folder):
        raise FileNotFoundError(f"data.image_folder {config.data.image_folder} is not a folder")
    if config.tokenizer and not os.path.isdir(config.tokenizer):
        raise FileNotFoundError(f"tokenizer {config.tokenizer} is not a directory")


# =============================================================================== params
def abstract_boxed_params(mcfg: ModelConfig, acfg: AlignmentConfig | None, num_groups: int):
    """Parameter shapes with logical-axis metadata, without allocating anything."""

    def init(rng):
        ids = jnp.zeros((1, 8), jnp.int32)
        pix = jnp.zeros((1, mcfg.image_size, mcfg.image_size, 3), jnp.float32)
        out = {"model": LlavaModel(mcfg).init(rng, ids, pix, jnp.ones_like(ids))["params"]}
        if acfg is not None:
            n = num_groups * (acfg.k + 1)
            x = jnp.zeros((n, mcfg.hidden_size), jnp.float32)
            out["alignment"] = MultiGraphAlignment(acfg, num_groups).init(
                {"params": rng, "gumbel": rng, "dropout": rng}, x, x, x,
                deterministic=True)["params"]
        return out

    return init, jax.eval_shape(init, jax.random.key(0))


def initial_params(config, mcfg, init_fn, shardings):
    """Random parameters, or weights from Hugging Face checkpoints, placed on the mesh."""
    src = config.init.source
    rng = jax.random.key(config.train.seed)
    params = jax.jit(lambda r: nn.unbox(init_fn(r)), out_shardings=shardings)(rng)
    if src == "random":
        return params
    if src == "workdir":
        return params_from_workdir(config.init.workdir, params, shardings)
    from exgra_jax.convert import hf  # noqa: PLC0415

    over = dict(scan_layers=mcfg.scan_layers, remat_policy=mcfg.remat_policy,
                dtype=mcfg.dtype, param_dtype=mcfg.param_dtype)
    if src == "llava_hf":
        loaded_cfg, loaded = hf.load_llava(config.init.hf_dir, **over)
    elif src == "llava_med":
        loaded_cfg, loaded = hf.load_llava_med(
            config.init.hf_dir, clip_dir=config.init.clip_dir or None,
            image_token_id=mcfg.image_token_id, dense_connector=mcfg.dense_connector, **over)
    elif src == "clip_llama":
        loaded_cfg, loaded = hf.load_clip_llama(config.init.clip_dir, config.init.llama_dir,
                                                vocab_size=mcfg.vocab_size,
                                                image_token_id=mcfg.image_token_id,
                                                pad_token_id=mcfg.pad_token_id, **over)
    else:
        raise ValueError("init.source must be random|llava_hf|llava_med|clip_llama|workdir, "
                         f"got {src!r}")
    if param_shapes(loaded) != param_shapes(params["model"]):
        raise ValueError(f"weights from {src} do not fit model config: {loaded_cfg} vs {mcfg}")
    params = dict(params)
    params["model"] = jax.tree.map(lambda x, s: jax.device_put(np.asarray(x), s), loaded,
                                   shardings["model"])
    return params


def params_from_workdir(workdir: str, like: dict, shardings: dict) -> dict:
    """The params of another run's newest checkpoint (e.g. stage 1 -> stage 2, or
    pre-training -> fine-tuning); parts it lacks (a new alignment GNN) keep ``like``."""
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    step = ckpt.latest_step()
    if step is None:
        raise FileNotFoundError(f"init.workdir {workdir} has no checkpoint")
    meta = ckpt.read_meta(step)
    saved = {k: list(v) for k, v in meta.get("param_shapes", {}).items()}
    target = {k: v for k, v in param_shapes(like).items()}
    common = [k for k in ("model", "alignment") if k in like
              and any(p.startswith(f"['{k}']") for p in saved)]
    for key in common:
        mine = {p: s for p, s in target.items() if p.startswith(f"['{key}']")}
        theirs = {p: s for p, s in saved.items() if p.startswith(f"['{key}']")}
        if mine != theirs:
            diff = sorted(set(mine.items()) ^ set(theirs.items()))[:5]
            raise ValueError(f"init.workdir {workdir} step {step}: {key} params differ from "
                             f"this config's: {diff}")
    abstract = {k: jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                like[k], shardings[k]) for k in common}
    # The state item is a plain PyTree checkpoint: read just the params, partially.
    item = {"params": abstract}
    restored = ocp.PyTreeCheckpointer().restore(
        os.path.join(os.path.abspath(workdir), "checkpoints", str(step), "state"),
        args=ocp.args.PyTreeRestore(
            item, restore_args=jax.tree.map(
                lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), item),
            partial_restore=True))
    ckpt.close()
    out = dict(like)
    out.update(restored["params"])
    log.info("initialised %s from %s step %d", common, workdir, step)
    return out


# =============================================================================== metrics
class MetricWriter:
    """Console lines on process 0 and TensorBoard event files."""

    def __init__(self, workdir: str, total_steps: int):
        self.total = total_steps
        self.tb = None
        if jax.process_index() == 0:
            from tensorboardX import SummaryWriter  # noqa: PLC0415

            self.tb = SummaryWriter(os.path.join(workdir, "tb"))
        self.t0 = time.time()
        self.first_step = None

    def write(self, step: int, metrics: dict[str, float], prefix: str = "train") -> None:
        if jax.process_index() != 0:
            return
        for k, v in metrics.items():
            self.tb.add_scalar(f"{prefix}/{k}", float(v), step)
        self.tb.flush()
        if prefix == "train":
            if self.first_step is None:
                self.first_step, self.t0 = step, time.time()
            done = step - self.first_step
            eta = (time.time() - self.t0) / done * (self.total - step) if done else float("nan")
            keys = ("loss", "lm_loss", "align_loss", "grad_norm", "lr", "step_time",
                    "tokens_per_s", "mfu")
            shown = " ".join(f"{k}={metrics[k]:.4g}" for k in keys if k in metrics)
            print(f"[{step}/{self.total}] {shown} eta={_fmt_time(eta)}", flush=True)
        else:
            print(f"[{prefix} @ {step}] " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()),
                  flush=True)

    def close(self):
        if self.tb is not None:
            self.tb.close()


def _fmt_time(s: float) -> str:
    if not np.isfinite(s):
        return "?"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s"


def text_branch_tokens(config, run) -> float:
    """LLM tokens per example of the 'llm' text branches: response + caption lengths, or
    the packed rows' share when they pack (a batch that does not fit runs padded)."""
    sc = run.step_config
    if run.alignment is None or sc.text_branch != "llm":
        return 0.0
    lengths = (config.data.response_len, config.data.caption_len)
    b = config.train.global_batch_size // config.train.micro_batches
    groups, rows, row_len = pack_layout(sc, b, lengths)
    return groups * rows * row_len / b if rows else float(sum(lengths))


def flops_per_step(mcfg: ModelConfig, batch: int, seq: int, text_branch_tokens: float) -> float:
    """Analytic training FLOPs: 6 N per LLM token (forward + backward) plus causal attention,
    and 2 N per patch for the frozen vision tower (forward only)."""
    d, layers = mcfg.hidden_size, mcfg.num_layers
    hd = mcfg.resolved_head_dim
    attn_proj = d * hd * (mcfg.num_heads * 2 + mcfg.num_kv_heads * 2)
    llm = layers * (attn_proj + 3 * d * mcfg.mlp_size) + 2 * mcfg.vocab_size * d
    tokens = batch * (seq + text_branch_tokens)
    attn = 6 * layers * 2 * mcfg.num_heads * hd * (seq * seq / 2) * batch
    w = mcfg.vision_width
    vit = mcfg.vision_layers_to_run * (4 * w * w + 2 * w * mcfg.vision_mlp)
    patches = batch * (mcfg.num_patches + 1)
    return 6.0 * llm * tokens + attn + 2.0 * vit * patches


# =============================================================================== build
@dataclasses.dataclass
class Run:
    config: Any
    mesh: Any
    model: ModelConfig
    alignment: AlignmentConfig | None
    step_config: StepConfig
    optimizer: Any
    mask: dict
    state_sharding: dict
    abstract_state: dict
    init_fn: Any
    train_step: Any  # jitted
    eval_step: Any  # jitted
    lr_schedule: Any


def build(config, total_steps: int, devices=None) -> Run:
    mcfg = model_config(config)
    acfg = alignment_config(config)
    m = config.mesh
    mesh = parallel.make_mesh(dict(data=m.data, fsdp=m.fsdp, tensor=m.tensor),
                              devices=devices, num_slices=m.num_slices)
    validate(config, mcfg, acfg, mesh)
    num_groups = parallel.batch_shard_count(mesh)
    rules = [tuple(r) for r in config.rules]
    init_fn, boxed = abstract_boxed_params(mcfg, acfg, num_groups)
    lcfg = lora.LoraConfig.from_config(config)
    if lcfg is not None:  # LoRA: the adapters join the params (exgra_jax/models/lora.py)
        init_fn = lora.with_init_adapters(init_fn, lcfg)
        boxed = jax.eval_shape(init_fn, jax.random.key(0))
    unboxed_abs = nn.unbox(boxed)
    mask = st.trainable_mask(unboxed_abs, config.train.trainable, config.train.frozen)
    tcfg = ml_collections.ConfigDict(config.train.to_dict())
    tcfg.total_steps = total_steps
    schedule = st.learning_rate_schedule(tcfg)
    optimizer = st.make_optimizer(tcfg)
    sharding = st.state_shardings(boxed, mask, optimizer, mesh, rules)
    parallel.check_divisible(unboxed_abs, sharding["params"])
    abstract_state = jax.eval_shape(
        lambda p: st.init_state(lora.hold_base(p, lcfg), mask, optimizer), unboxed_abs)

    sc = StepConfig(
        model=mcfg, alignment=acfg, alignment_weight=config.alignment.weight,
        text_branch=config.alignment.text_branch,
        pool_include_padding=config.alignment.pool_include_padding,
        num_groups=num_groups, micro_batches=config.train.micro_batches, seed=config.train.seed,
        text_pack_fraction=config.alignment.text_pack_fraction, lora=lcfg,
    )
    rows = st.embedding_row_mask(unboxed_abs, config.train.trainable_embedding_rows) \
        if config.train.trainable_embedding_rows else None
    raw_step = make_train_step(sc, optimizer, mask, schedule, rows)

    # Flax applies activation sharding constraints only under a mesh context; entering it
    # while tracing makes the compiled step carry them however it is called (loop, AOT).
    def step_with_rules(state, batch):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
            return raw_step(state, batch)

    def eval_with_rules(params, batch):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
            return make_eval_step(sc)(params, batch)

    batch_sh = parallel.batch_sharding(mesh)
    train_step = jax.jit(step_with_rules, in_shardings=(sharding, batch_sh),
                         out_shardings=(sharding, None), donate_argnums=(0,))
    eval_step = jax.jit(eval_with_rules, in_shardings=(sharding["params"], batch_sh))
    return Run(config, mesh, mcfg, acfg, sc, optimizer, mask, sharding, abstract_state,
               init_fn, train_step, eval_step, schedule)


def init_train_state(run: Run) -> dict:
    params = initial_params(run.config, run.model, run.init_fn, run.state_sharding["params"])
    init = jax.jit(
        lambda p: st.init_state(lora.hold_base(p, run.step_config.lora), run.mask, run.optimizer),
        out_shardings=run.state_sharding)
    return init(params)


def run_meta(run: Run) -> dict:
    meta = {"model": run.model.to_dict(),
            "param_shapes": param_shapes(run.abstract_state["params"])}
    if run.step_config.lora is not None:  # LoRA checkpoints do not hold the base: name it
        meta["lora_base"] = run.config.init.to_dict()
    return meta


# ---- LoRA: a checkpoint holds the adapters and their optimizer state; the frozen base is
# ---- reloaded from config.init on resume.
def checkpointed(run: Run, state: dict) -> dict:
    return state if run.step_config.lora is None else st.without_frozen(state, run.mask)


def restored(run: Run, saved: dict) -> dict:
    if run.step_config.lora is None:
        return saved
    base = initial_params(run.config, run.model, run.init_fn, run.state_sharding["params"])
    return st.with_frozen(saved, lora.hold_base(base, run.step_config.lora), run.mask)


# =============================================================================== loop
class _Preemption:
    """SIGTERM sets a flag; the loop saves and exits at the next step boundary."""

    def __init__(self):
        self.requested = False
        self._old = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        log.warning("SIGTERM received: saving a checkpoint and stopping")
        self.requested = True

    def agreed(self, ckpt: Checkpointer, step: int) -> bool:
        flag = self.requested
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils  # noqa: PLC0415

            flag = bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))
        return flag or ckpt.manager.reached_preemption(step)

    def restore(self):
        signal.signal(signal.SIGTERM, self._old)


def evaluate_lm(run: Run, params, tokenizer, max_batches: int = 0) -> dict[str, float]:
    """Token-level LM loss on the eval set (one ordered pass)."""
    from exgra_jax.data.pipeline import make_eval_iterator  # noqa: PLC0415

    cfg = run.config
    per_host = cfg.eval.batch_size // jax.process_count()
    it = make_eval_iterator(data_config(cfg, run.model, per_host, eval_mode=True), tokenizer)
    nll = tokens = 0.0
    for i, host in enumerate(it):
        if max_batches and i >= max_batches:
            break
        out = jax.device_get(run.eval_step(params, parallel.make_global_batch(host, run.mesh)))
        nll += float(out["nll_sum"])
        tokens += float(out["tokens"])
    it.close()
    return {"lm_loss": nll / max(tokens, 1.0), "tokens": tokens}


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
    """Train per ``config`` in ``workdir``; returns the last metrics."""
    from exgra_jax.data.pipeline import make_source, make_train_iterator  # noqa: PLC0415
    from exgra_jax.data.tokenizer import load_tokenizer  # noqa: PLC0415

    os.makedirs(workdir, exist_ok=True)
    mcfg = model_config(config)
    tokenizer = load_tokenizer(config.tokenizer)
    check_tokenizer(tokenizer, mcfg)
    selection = None
    if config.eval.select_metric:
        from exgra_jax.train.selection import VQASelection  # noqa: PLC0415

        selection = VQASelection(config, workdir, mcfg, tokenizer)
    per_host = config.train.global_batch_size // jax.process_count()
    dcfg = data_config(config, mcfg, per_host)
    source = make_source(dcfg)
    total = config.train.total_steps or max(
        1, int(config.train.num_epochs * len(source) // config.train.global_batch_size))
    run = build(config, total)
    train_iter = make_train_iterator(dcfg, tokenizer, source=source)

    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.train.keep_checkpoints,
                        async_save=config.train.async_checkpoint)
    meta = run_meta(run)
    start = ckpt.latest_step()
    if start is not None:
        abstract = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            run.abstract_state, run.state_sharding)
        state = restored(run, ckpt.restore(start, checkpointed(run, abstract), train_iter,
                                           expect_meta=meta))
        log.info("resumed from step %d", start)
    else:
        state = init_train_state(run)
        start = 0
        if jax.process_index() == 0:
            with open(os.path.join(workdir, "config.json"), "w") as f:
                f.write(config.to_json_best_effort(indent=2))
    writer = MetricWriter(workdir, total)
    preempt = _Preemption()
    t = config.train
    n_dev = jax.device_count()
    flops = flops_per_step(run.model, t.global_batch_size, config.data.max_len,
                           text_branch_tokens(config, run))
    last: dict[str, Any] = {}
    step = start
    stop_at = min(total, start + t.stop_after_steps) if t.stop_after_steps else total
    # Steps are dispatched asynchronously: time whole logging intervals, not single calls.
    t_last, s_last = time.time(), step
    try:
        while step < stop_at:
            host = next(train_iter)
            state, metrics = run.train_step(state, parallel.make_global_batch(host, run.mesh))
            step += 1
            if step % t.log_every == 0 or step == stop_at:
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                now = time.time()
                dt = (now - t_last) / (step - s_last)
                t_last, s_last = now, step
                metrics.update(step_time=dt, tokens_per_s=metrics["tokens"] / dt)
                if t.peak_flops_per_device:
                    metrics["mfu"] = flops / dt / (t.peak_flops_per_device * n_dev)
                writer.write(step, metrics)
                last = metrics
            evaluate_now = bool(t.eval_every and step % t.eval_every == 0) or step == total
            if evaluate_now and config.eval.json_paths:
                lm = evaluate_lm(run, state["params"], tokenizer, t.eval_batches)
                writer.write(step, lm, "eval")
                if step == total:
                    last["eval"] = lm
            if evaluate_now and selection is not None:
                last["val_vqa"] = selection.evaluate(
                    step, lora.with_adapters(state["params"], run.step_config.lora),
                    run.mesh, meta)
                writer.write(step, last["val_vqa"], "val_vqa")
            if preempt.agreed(ckpt, step):
                ckpt.save(step, checkpointed(run, state), train_iter, meta, force=True)
                ckpt.wait()
                log.warning("checkpoint of step %d saved after SIGTERM; exiting", step)
                return {"preempted_at": step, **last}
            if step % t.checkpoint_every == 0 or step == stop_at:
                ckpt.save(step, checkpointed(run, state), train_iter, meta,
                          force=step == stop_at)
    finally:
        ckpt.close()
        if selection is not None:
            last["best"] = selection.best.record
        writer.close()
        preempt.restore()
        train_iter.close()
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
            json.dump({"step": step, **{k: v for k, v in last.items()}}, f, indent=1,
                      default=float)
    return {"step": step, **last}


def check_tokenizer(tokenizer, mcfg: ModelConfig) -> None:
    from exgra_jax.data.tokenizer import special_token_ids  # noqa: PLC0415

    ids = special_token_ids(tokenizer)
    if ids["image_patch"] != mcfg.image_token_id:
        raise ValueError(f"the tokenizer's <im_patch> id is {ids['image_patch']} but "
                         f"model.image_token_id is {mcfg.image_token_id}")
    if len(tokenizer) > mcfg.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but model.vocab_size is "
                         f"{mcfg.vocab_size}")
