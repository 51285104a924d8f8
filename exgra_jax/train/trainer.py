"""The ExGra-Med trainer: build everything from a config, then train, checkpoint, evaluate.

``train_and_evaluate(config, workdir)`` resumes from the newest checkpoint in
``workdir/checkpoints`` when there is one (params, optimizer state, step and the data
iterator of every process), saves every ``checkpoint_every`` steps and on SIGTERM, and
writes metrics to the console and to TensorBoard event files in ``workdir/tb``. Every
``eval_every`` steps and at the end it runs its evaluators (``exgra_jax.train.evaluators``):
the LM loss of the eval set, and with ``eval.select_metric`` the validation VQA set, keeping
the best step's params in ``workdir/best`` (``exgra_jax.train.selection``).
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import time
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from exgra_jax import parallel, paths
from exgra_jax.alignment.objective import AlignmentConfig, MultiGraphAlignment, graph_count
from exgra_jax.checkpoint import Checkpointer, param_shapes
from exgra_jax.config_paths import (
    absolutize_config_paths,
    check_config_paths,
    default_tokenizer,
)
from exgra_jax.eval.checkpoint_loading import init_source_model_params, rules_of
from exgra_jax.models import lora
from exgra_jax.models.config import ModelConfig
from exgra_jax.models.llava import init_boxed_params
from exgra_jax.train import state as st
from exgra_jax.train.evaluators import EvalContext, Evaluator, LMLoss, check_names
from exgra_jax.train.step import StepConfig, make_eval_step, make_train_step, pack_layout
from exgra_jax.workdir import CHECKPOINTS, CONFIG_JSON, FINAL_METRICS, TENSORBOARD

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
    """The pipeline's DataConfig: config.data's fields (base_config takes them from
    DataConfig), the image geometry from the model, ``batch_size`` rows per host; an eval
    set is read once, in order, unpacked."""
    from exgra_jax.data.pipeline import DataConfig  # noqa: PLC0415

    names = {f.name for f in dataclasses.fields(DataConfig)}
    d = {k: v for k, v in config.data.to_dict().items() if k in names}
    if eval_mode:
        d.update(json_paths=config.eval.json_paths, image_folder=config.eval.image_folder,
                 tfds_name="", shuffle=False, packing=False)
    for optional in ("image_folder", "tfds_name", "tfds_data_dir"):
        d[optional] = d.get(optional) or None  # '' in a config: unset
    return DataConfig(**{
        **d, "json_paths": tuple(d["json_paths"]), "image_size": mcfg.image_size,
        "vision_type": mcfg.vision_type, "num_image_tokens": mcfg.num_image_tokens,
        "batch_size": batch_size, "num_epochs": 1 if eval_mode else None})


def examples_per_step(config) -> float:
    """Examples a training step sees: the global batch, or with packing its rows times the
    measured mean examples per row."""
    t, d = config.train, config.data
    if not d.get("packing", False):
        return float(t.global_batch_size)
    return t.global_batch_size * d.mean_examples_per_row


def total_steps(config, num_records: int) -> int:
    """train.total_steps, else train.num_epochs over the data set."""
    t, d = config.train, config.data
    if t.total_steps:
        return int(t.total_steps)
    if d.get("packing", False) and d.mean_examples_per_row <= 0:
        raise ValueError("with data.packing a step holds a varying number of examples: set "
                         "data.mean_examples_per_row (tools/benchmarks/packing.py measures it) "
                         "or train.total_steps")
    return max(1, int(t.num_epochs * num_records // examples_per_step(config)))


def validate(config, mcfg: ModelConfig, acfg: AlignmentConfig | None, mesh) -> None:
    """Errors that say what to change, before anything compiles (the config's paths are
    checked separately: ``config_paths.check_config_paths``)."""
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
    if acfg is not None:  # one alignment node per example (per example slot when packed)
        slots = _per_row(config)[1]
        graph_count(acfg, t.global_batch_size // t.micro_batches * slots, shards,
                    config.data.get("packing", False))
    if config.eval.select_metric and not config.eval.json_paths:
        raise ValueError("eval.select_metric needs a validation set: set eval.json_paths, or "
                         "--config.eval.select_metric='' to train without best-step selection")
    if config.eval.json_paths and config.eval.batch_size % jax.process_count():
        raise ValueError(f"eval.batch_size={config.eval.batch_size} (global) must be divisible "
                         f"by the {jax.process_count()} processes")


# =============================================================================== params
def abstract_boxed_params(mcfg: ModelConfig, acfg: AlignmentConfig | None, num_groups: int):
    """Parameter shapes with logical-axis metadata, without allocating anything."""

    def init(rng):
        out = {"model": init_boxed_params(mcfg, rng)}
        if acfg is not None:
            n = num_groups * acfg.graph_size  # splits in every graph_scope
            x = jnp.zeros((n, mcfg.hidden_size), jnp.float32)
            out["alignment"] = MultiGraphAlignment(acfg, num_groups).init(
                {"params": rng, "gumbel": rng, "dropout": rng}, x, x, x,
                deterministic=True)["params"]
        return out

    return init, jax.eval_shape(init, jax.random.key(0))


def sharded_abstract(abstract: dict, shardings: dict) -> dict:
    """ShapeDtypeStruct leaves that carry their target sharding (restore targets)."""
    return jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                        abstract, shardings)


def check_against_abstract(tree, abstract, what: str) -> None:
    """Refuse a state that differs from the abstract state in structure, shape, dtype or
    sharding (e.g. bfloat16 master weights from a loader): the first mismatch is named."""
    got = dict(jax.tree_util.tree_leaves_with_path(tree))
    want = dict(jax.tree_util.tree_leaves_with_path(abstract))
    names = {jax.tree_util.keystr(k) for k in got} ^ {jax.tree_util.keystr(k) for k in want}
    if names:
        raise ValueError(f"{what}: parameter tree differs from the config's at "
                         f"{sorted(names)[:5]}")
    for path, a in want.items():
        x, name = got[path], jax.tree_util.keystr(path)
        if tuple(x.shape) != tuple(a.shape) or x.dtype != a.dtype:
            raise ValueError(f"{what}: {name} is {x.dtype}{list(x.shape)} but the config's "
                             f"state wants {a.dtype}{list(a.shape)}")
        sh = getattr(a, "sharding", None)
        if sh is not None and not x.sharding.is_equivalent_to(sh, x.ndim):
            raise ValueError(f"{what}: {name} is sharded as {x.sharding} but the config "
                             f"wants {sh}")


def initial_params(config, mcfg, init_fn, abstract: dict) -> dict:
    """Random parameters, or weights from Hugging Face checkpoints or another workdir (a
    LoRA workdir gives its merged model), created directly in the abstract state's dtype
    and sharding (``abstract``: sharded ShapeDtypeStructs) and checked against it."""
    src = config.init.source
    rng = jax.random.key(config.train.seed)
    shardings = jax.tree.map(lambda a: a.sharding, abstract)

    def fresh(keys) -> dict:  # random init of some top-level parts (XLA drops the rest)
        keys = tuple(k for k in abstract if k in keys)
        if not keys:
            return {}
        return jax.jit(lambda r: {k: nn.unbox(init_fn(r))[k] for k in keys},
                       out_shardings={k: shardings[k] for k in keys})(rng)

    if src == "random":
        params = fresh(tuple(abstract))
    else:
        mesh = jax.tree.leaves(shardings["model"])[0].mesh
        # Already in param_dtype and placed by the same rules: no second copy is made.
        loaded = {"model": init_source_model_params(config, mcfg, mesh, rules_of(config))}
        if src == "workdir" and "alignment" in abstract:
            loaded.update(alignment_from_workdir(config.init.workdir, abstract["alignment"]))
        params = {**fresh(tuple(k for k in abstract if k not in loaded)), **loaded}
    params = {k: params[k] for k in abstract}
    check_against_abstract(params, abstract, f"initial parameters (init.source={src})")
    return params


def alignment_from_workdir(workdir: str, abstract: dict) -> dict:
    """``{'alignment': ...}`` of another run's newest checkpoint (e.g. stage 1 -> stage 2)
    restored into ``abstract`` (sharded ShapeDtypeStructs); {} when that run has none."""
    ckpt = Checkpointer(paths.join(workdir, CHECKPOINTS), async_save=False, read_only=True)
    try:
        step = ckpt.latest_step()
        if step is None:
            raise FileNotFoundError(f"init.workdir {workdir} has no checkpoint")
        saved = {p: s for p, s in ckpt.read_meta(step).get("param_shapes", {}).items()
                 if p.startswith("['alignment']")}
        if not saved:
            return {}
        mine = param_shapes({"alignment": abstract})
        if mine != saved:
            diff = sorted(set(map(str, mine.items())) ^ set(map(str, saved.items())))[:5]
            raise ValueError(f"init.workdir {workdir} step {step}: alignment params differ "
                             f"from this config's: {diff}")
        log.info("initialised the alignment head from %s step %d", workdir, step)
        return ckpt.restore_params(step, {"alignment": abstract})
    finally:
        ckpt.close()


# =============================================================================== metrics
class MetricWriter:
    """Console lines on process 0 and TensorBoard event files."""

    def __init__(self, workdir: str, total_steps: int):
        self.total = total_steps
        self.tb = None
        if jax.process_index() == 0:
            from tensorboardX import SummaryWriter  # noqa: PLC0415

            self.tb = SummaryWriter(paths.join(workdir, TENSORBOARD))
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
                    "real_tokens_per_s", "real_token_share", "mfu", "mfu_real")
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
    b = config.train.global_batch_size // config.train.micro_batches * _per_row(config)[1]
    groups, rows, row_len = pack_layout(sc, b, lengths)
    return groups * rows * row_len / b if rows else float(sum(lengths))


def _per_row(config) -> tuple[int, int]:
    """(images, example slots) per batch row: (1, 1) unless packed."""
    d = config.data
    return (d.images_per_row, d.examples_per_row) if d.get("packing", False) else (1, 1)


def step_flops(config, run) -> float:
    """Analytic FLOPs of one training step of ``run`` (every token slot, padding included)."""
    images, slots = _per_row(config)
    return flops_per_step(run.model, config.train.global_batch_size, config.data.max_len,
                          text_branch_tokens(config, run), slots, images)


def flops_per_step(mcfg: ModelConfig, batch: int, seq: int, text_branch_tokens: float,
                   slots: int = 1, images: int = 1) -> float:
    """Analytic training FLOPs: 6 N per LLM token (forward + backward) plus causal attention,
    and 2 N per patch for the frozen vision tower (forward only). ``batch`` rows of ``seq``
    tokens, each with ``slots`` examples' text branches and ``images`` images."""
    d, layers = mcfg.hidden_size, mcfg.num_layers
    hd = mcfg.resolved_head_dim
    attn_proj = d * hd * (mcfg.num_heads * 2 + mcfg.num_kv_heads * 2)
    llm = layers * (attn_proj + 3 * d * mcfg.mlp_size) + 2 * mcfg.vocab_size * d
    tokens = batch * (seq + slots * text_branch_tokens)
    attn = 6 * layers * 2 * mcfg.num_heads * hd * (seq * seq / 2) * batch
    w = mcfg.vision_width
    vit = mcfg.vision_layers_to_run * (4 * w * w + 2 * w * mcfg.vision_mlp)
    patches = batch * images * (mcfg.num_patches + 1)
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


def abstract_initial_params(run: Run) -> dict:
    """The parameters as sources provide them (param_dtype everywhere), with shardings; the
    train state may then hold a frozen LoRA base in another dtype (``lora.hold_base``)."""
    shapes = jax.eval_shape(lambda r: nn.unbox(run.init_fn(r)), jax.random.key(0))
    return sharded_abstract(shapes, run.state_sharding["params"])


def init_train_state(run: Run) -> dict:
    params = initial_params(run.config, run.model, run.init_fn, abstract_initial_params(run))
    # Donated: the state's params reuse these buffers, so building the state adds only the
    # optimizer moments (a 7B host converting with from-hf holds one copy of the weights).
    init = jax.jit(
        lambda p: st.init_state(lora.hold_base(p, run.step_config.lora), run.mask, run.optimizer),
        out_shardings=run.state_sharding, donate_argnums=0)
    state = init(params)
    del params
    check_against_abstract(state, sharded_abstract(run.abstract_state, run.state_sharding),
                           "initial train state")
    return state


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
    base = initial_params(run.config, run.model, run.init_fn, abstract_initial_params(run))
    return st.with_frozen(saved, lora.hold_base(base, run.step_config.lora), run.mask)


# =============================================================================== loop
class _Interruption:
    """SIGTERM (preemption) and a first SIGINT (Ctrl-C) set a flag: the loop saves the
    current step and exits at the next step boundary. A second SIGINT aborts at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = False
        self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.requested:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        name = signal.Signals(signum).name
        more = " (Ctrl-C again to abort without saving)" if signum == signal.SIGINT else ""
        print(f"{name} received: saving a checkpoint at the next step and stopping{more}",
              flush=True)
        self.requested = True

    def agreed(self, ckpt: Checkpointer, step: int, sync: bool) -> bool:
        """Whether to stop now. Several processes must agree: their flags are combined at
        ``sync`` steps only (an all-gather every step would stall the pipeline)."""
        flag = self.requested
        if jax.process_count() > 1:
            if not sync:
                return False
            from jax.experimental import multihost_utils  # noqa: PLC0415

            flag = bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))
        return flag or ckpt.manager.reached_preemption(step)

    def restore(self):
        for s, old in self._old.items():
            signal.signal(s, old)


def make_evaluators(config, workdir: str, mcfg: ModelConfig, tokenizer) -> list[Evaluator]:
    """The evaluations ``config.eval`` asks for, each checked now (before anything compiles):
    LM loss on ``eval.json_paths``, best-step selection with ``eval.select_metric``."""
    from exgra_jax.data.pipeline import make_eval_iterator  # noqa: PLC0415

    def eval_batches():  # built when used: eval.batch_size is validated with the run
        per_host = config.eval.batch_size // jax.process_count()
        return make_eval_iterator(data_config(config, mcfg, per_host, eval_mode=True),
                                  tokenizer)

    evaluators: list[Evaluator] = []
    if config.eval.json_paths:
        evaluators.append(LMLoss(eval_batches, config.train.eval_batches))
    if config.eval.select_metric:
        from exgra_jax.train.selection import VQASelection  # noqa: PLC0415

        evaluators.append(VQASelection(config, workdir, mcfg, tokenizer))
    return evaluators


def _finished_metrics(workdir: str, step: int) -> dict[str, Any] | None:
    """The metrics a finished run wrote, so rerunning it reports them (not an empty step)."""
    path = paths.join(workdir, FINAL_METRICS)
    if paths.exists(path):
        saved = paths.read_json(path)
        if saved.get("step") == step:
            return saved
    return None


def _batch_description(config) -> str:
    d, rows = config.data, config.train.global_batch_size
    if not d.get("packing", False):
        return f"{rows}"
    return (f"{rows} packed rows of {d.max_len} tokens (<= {d.examples_per_row} examples, "
            f"<= {d.images_per_row} images each; ~{examples_per_step(config):.0f} examples)")


def startup_summary(run: Run, *, workdir: str, records: int, total: int, start: int,
                    source_report=None) -> str:
    """The few facts a user checks first, in one block."""
    count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))  # noqa: E731
    params = run.abstract_state["params"]
    trainable = sum(int(np.prod(x.shape)) for x, m in
                    zip(jax.tree.leaves(params), jax.tree.leaves(run.mask)) if m)
    bad = source_report.num_bad if source_report is not None else 0
    m = run.mesh
    lines = [
        f"model       {count(params) / 1e6:,.1f}M parameters, {trainable / 1e6:,.1f}M trainable"
        f" ({run.model.param_dtype} master weights, {run.model.dtype} compute)",
        f"data        {records:,} records ({bad} dropped at start-up; bad ones are counted "
        "as they are read), "
        f"global batch {_batch_description(run.config)}",
        f"steps       {total:,} total; "
        + (f"resumed from step {start}" if start else
           f"starting from init.source={run.config.init.source}"),
        f"mesh        {dict(m.shape)} over {jax.device_count()} {jax.devices()[0].platform} "
        f"devices, {jax.process_count()} process(es)",
        f"alignment   {'off' if run.alignment is None else run.alignment.solver}",
        f"outputs     {workdir} (config.json, checkpoints/, tb/, {FINAL_METRICS})",
    ]
    return "\n".join("  " + line for line in lines)


def _print0(text: str) -> None:
    if jax.process_index() == 0:
        print(text, flush=True)


def _write_config(config, workdir: str) -> None:
    """The resolved config (absolute paths) as WORKDIR/config.json, for every later tool."""
    if jax.process_index() == 0:
        paths.write_text(paths.join(workdir, CONFIG_JSON), config.to_json_best_effort(indent=2))


def train_and_evaluate(config, workdir: str,
                       evaluators: Sequence[Evaluator] = ()) -> dict[str, Any]:
    """Train per ``config`` in ``workdir``; returns the last metrics. ``evaluators`` run at
    evaluation steps after those ``config.eval`` asks for (``exgra_jax.train.evaluators``)."""
    from exgra_jax.data.pipeline import make_source, make_train_iterator  # noqa: PLC0415
    from exgra_jax.data.tokenizer import check_tokenizer, load_tokenizer  # noqa: PLC0415

    workdir = paths.absolute(workdir)
    default_tokenizer(config)
    check_config_paths(config)  # before anything is read, loaded or compiled
    absolutize_config_paths(config)
    paths.makedirs(workdir)
    mcfg = model_config(config)
    tokenizer = load_tokenizer(config.tokenizer)
    check_tokenizer(tokenizer, mcfg)
    evaluators = [*make_evaluators(config, workdir, mcfg, tokenizer), *evaluators]
    check_names(evaluators)
    per_host = config.train.global_batch_size // jax.process_count()
    dcfg = data_config(config, mcfg, per_host)
    source = make_source(dcfg)
    total = total_steps(config, len(source))
    run = build(config, total)

    ckpt = Checkpointer(paths.join(workdir, CHECKPOINTS), keep=config.train.keep_checkpoints,
                        async_save=config.train.async_checkpoint)
    start = ckpt.latest_step()
    if start is not None and start >= total:
        done = _finished_metrics(workdir, start)
        if done is not None:
            ckpt.close()
            print(f"{workdir} already finished at step {start}; its final metrics:", flush=True)
            return done
    train_iter = make_train_iterator(dcfg, tokenizer, source=source)
    meta = run_meta(run)
    if start is not None:
        abstract = sharded_abstract(run.abstract_state, run.state_sharding)
        state = restored(run, ckpt.restore(start, checkpointed(run, abstract), train_iter,
                                           expect_meta=meta))
        check_against_abstract(state, abstract, f"checkpoint of step {start}")
    else:
        state = init_train_state(run)
        start = 0
        _write_config(config, workdir)
    _print0("exgra-jax training\n" + startup_summary(
        run, workdir=workdir, records=len(source), total=total, start=start,
        source_report=getattr(source, "report", None)))
    writer = MetricWriter(workdir, total)
    interrupt = _Interruption()
    t = config.train
    n_dev = jax.device_count()
    flops = step_flops(config, run)
    last: dict[str, Any] = {}
    step = start

    context = EvalContext(run.mesh, run.eval_step, meta, run.step_config.lora)

    def evaluate(step: int, params) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for evaluator in evaluators:
            out[evaluator.name] = evaluator.evaluate(step, params, context)
            writer.write(step, out[evaluator.name], evaluator.name)
        return out

    stop_at = min(total, start + t.stop_after_steps) if t.stop_after_steps else total
    # Steps are dispatched asynchronously: time whole logging intervals, not single calls.
    t_last, s_last = time.time(), step
    try:
        while step < stop_at:
            host = next(train_iter)
            if step == start:
                _print0("compiling the train step...")
                t_compile = time.time()
            state, metrics = run.train_step(state, parallel.make_global_batch(host, run.mesh))
            step += 1
            if step == start + 1:
                jax.block_until_ready(metrics)
                _print0(f"compiled and ran the first step in {time.time() - t_compile:.1f} s")
                t_last, s_last = time.time(), step
            log_now = step % t.log_every == 0 or step == stop_at
            if log_now:
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                if step > s_last:  # timed over the interval since the last log line
                    now = time.time()
                    dt = (now - t_last) / (step - s_last)
                    t_last, s_last = now, step
                    share = metrics["tokens"] / max(metrics["token_slots"], 1.0)
                    metrics.update(step_time=dt, real_tokens_per_s=metrics["tokens"] / dt,
                                   real_token_share=share)
                    if t.peak_flops_per_device:
                        # mfu counts every token slot's FLOPs; mfu_real only the real
                        # tokens' share of them (the work that is not padding).
                        metrics["mfu"] = flops / dt / (t.peak_flops_per_device * n_dev)
                        metrics["mfu_real"] = metrics["mfu"] * share
                writer.write(step, metrics)
                last = metrics
            if interrupt.agreed(ckpt, step, sync=log_now):
                ckpt.save(step, checkpointed(run, state), train_iter, meta, force=True)
                ckpt.wait()
                print(f"checkpoint of step {step} saved in {ckpt.directory}; rerun the same "
                      "command to resume", flush=True)
                return {"preempted_at": step, **last}
            evaluate_now = bool(t.eval_every and step % t.eval_every == 0) or step == total
            # Save before evaluating: an evaluation failure must never cost training.
            if step % t.checkpoint_every == 0 or step == stop_at or evaluate_now:
                ckpt.save(step, checkpointed(run, state), train_iter, meta,
                          force=step == stop_at or evaluate_now)
            if evaluate_now:
                ckpt.wait()
                last.update(evaluate(step, state["params"]))
        if start == total:  # a rerun after training ended but its evaluation did not
            last.update(evaluate(step, state["params"]))
    finally:
        ckpt.close()
        for evaluator in evaluators:
            last.update(evaluator.final())
        writer.close()
        interrupt.restore()
        train_iter.close()
    result = {"step": step, **last}
    if jax.process_index() == 0:
        paths.write_json(paths.join(workdir, FINAL_METRICS), result, indent=1, default=float)
    return result
