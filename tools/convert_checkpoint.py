"""Convert between training workdirs and Hugging Face checkpoints.

    # A trained workdir -> a llava-hf directory (LlavaForConditionalGeneration) with the
    # tokenizer, preprocessor_config.json and the chat template, so AutoProcessor +
    # apply_chat_template build our prompts (--step best: the best validation step kept
    # by fine-tuning with eval.select_metric; a LoRA run's step: the merged model)
    python tools/convert_checkpoint.py to-hf --workdir DIR [--step N|best] --out HF_DIR

    # Hugging Face weights -> a workdir that `launch/train.py` resumes from (step 0)
    python tools/convert_checkpoint.py from-hf --hf-dir HF_DIR --out DIR \
        --config configs/stage2_7b.py [--format llava-hf|llava-med|clip-llama] \
        [--clip-dir CLIP_DIR] [--llama-dir LLAMA_DIR]

``from-hf`` builds the run of the given training config with its weights taken from the
Hugging Face checkpoint (llava-hf; a LLaVA-Med release: v1 / ExGra-Med or v1.5
``llava_mistral``; or separate CLIP/SigLIP + LLaMA/Mistral directories for stage 1), a
fresh optimizer state and the alignment GNN initialised from the config's seed, and saves
it as step 0. The run's config.json records the conversation template (a LLaVA-Med
release's own template is checked against the config's).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys

FORMATS = {"llava-hf": "llava_hf", "llava-med": "llava_med", "clip-llama": "clip_llama"}


def to_hf(workdir: str, out: str, step: int | str | None, dtype: str | None) -> str:

    from exgra_jax import paths
    from exgra_jax.checkpoint import Checkpointer
    from exgra_jax.convert.hf import save_llava
    from exgra_jax.eval.checkpoint_loading import (
        checkpoint_directory,
        holds_lora,
        restore_model_params,
    )
    from exgra_jax.models.config import ModelConfig
    from exgra_jax.workdir import BEST

    best = step == BEST
    directory = checkpoint_directory(workdir, step)
    if best and not paths.is_dir(directory):
        raise SystemExit(f"{workdir}: no best checkpoint (written when training with "
                         "config.eval.select_metric set)")
    ckpt = Checkpointer(directory, async_save=False)
    latest = ckpt.latest_step()
    if latest is None:
        raise SystemExit(f"{workdir}: no checkpoint found")
    if best:
        step = latest  # WORKDIR/best keeps one step: the best
    elif step is not None and step not in ckpt.all_steps():
        raise SystemExit(f"{workdir}: no checkpoint at step {step} (have {ckpt.all_steps()})")
    step = latest if step is None else step
    config = ModelConfig.from_dict(ckpt.read_meta(step)["model"])
    # Only params['model'] is read (no optimizer state), leaf by leaf as host numpy arrays
    # written out as they come: neither an accelerator chip nor the host ever holds a
    # whole 7B model. A LoRA checkpoint holds adapters only: the merged model is built
    # whole in host memory (base reloaded, adapters folded in), then written.
    try:
        lora_run = holds_lora(ckpt, step)
        if not lora_run:
            _stream_params_to_hf(ckpt, step, config, out, dtype)
    finally:
        ckpt.close()
    if lora_run:
        params, _ = restore_model_params(workdir, config, None, None, BEST if best else step)
        save_llava(config, params, out, dtype=dtype)
    run_config = _run_config(workdir)
    tokenizer_dir = run_config.get("tokenizer", "")
    if tokenizer_dir and os.path.isdir(tokenizer_dir):
        _save_processor(out, config, tokenizer_dir, run_config)
    else:
        print(f"warning: {workdir}/config.json names no tokenizer; no tokenizer or processor "
              "written", file=sys.stderr)
    print(f"wrote {out} from {workdir} {'best ' if best else ''}step {step}")
    return out


def _stream_params_to_hf(ckpt, step: int, config, out: str, dtype: str | None) -> None:
    """``params['model']`` of ``step`` -> a llava-hf directory, one leaf at a time, after
    checking the checkpoint's parameter shapes against ``config``."""
    from exgra_jax.checkpoint import check_meta, param_shapes
    from exgra_jax.convert.hf import abstract_params, unflatten, write_llava

    abstract = abstract_params(config)  # '/'-joined path -> ShapeDtypeStruct
    expected = {"model": config.to_dict(),
                "param_shapes": param_shapes({"model": unflatten(abstract)})}
    check_meta(ckpt.read_meta(step), expected, f"{ckpt.directory}/{step}", scope="['model']")
    write_llava(config, {path: a.shape for path, a in abstract.items()},
                lambda path: ckpt.restore_param_leaf(step, ("model", *path.split("/")),
                                                     abstract[path]),
                out, dtype=dtype)


def _run_config(workdir: str) -> dict:
    from exgra_jax import paths

    path = paths.join(workdir, "config.json")
    return paths.read_json(path) if paths.exists(path) else {}


def _save_processor(out: str, config, tokenizer_dir: str, run_config: dict) -> None:
    """Tokenizer, image processor and chat template as the run asks and evaluates."""
    from exgra_jax.convert.processor import save_processor
    from exgra_jax.data.image import ImageConfig, normalization
    from exgra_jax.data.tokenizer import load_tokenizer
    from exgra_jax.train.defaults import base_config

    defaults = base_config().to_dict()
    data = {**defaults["data"], **run_config.get("data", {})}
    evaluation = {**defaults["eval"], **run_config.get("eval", {})}
    save_processor(out, config, load_tokenizer(tokenizer_dir), template=data["template"],
                   image_first=bool(evaluation["image_first"]),
                   use_im_start_end=bool(data["mm_use_im_start_end"]),
                   image=ImageConfig(config.image_size, data["image_aspect"],
                                     *normalization(config.vision_type)))


def from_hf(args) -> str:
    import jax

    from exgra_jax import paths
    from exgra_jax.checkpoint import Checkpointer
    from exgra_jax.config_paths import load_config_file
    from exgra_jax.train import trainer

    config = load_config_file(f"{args.config}:{args.config_arg}" if args.config_arg
                              else args.config)
    config.init.source = FORMATS[args.format]
    config.init.hf_dir = args.hf_dir or ""
    config.init.clip_dir = args.clip_dir or ""
    config.init.llama_dir = args.llama_dir or ""
    if args.format == "llava-med":
        from exgra_jax.convert.hf import release_template

        recorded = release_template(args.hf_dir)
        if config.data.template != recorded:
            print(f"warning: {args.hf_dir} was trained with the {recorded!r} template, the "
                  f"config uses {config.data.template!r} (--config.data.template)",
                  file=sys.stderr)
    run = trainer.build(config, total_steps=max(int(config.train.total_steps), 1))
    state = trainer.init_train_state(run)
    # Writing about one leaf at a time keeps the save's buffers small beside the state it
    # writes (orbax needs room for the largest; peak host memory of from-hf:
    # tools/benchmarks/convert_memory.py).
    largest = max(x.nbytes for x in jax.tree.leaves(state))
    ckpt = Checkpointer(paths.join(args.out, "checkpoints"), async_save=False,
                        save_concurrent_gb=max(1, math.ceil(largest / 1e9)))
    if ckpt.latest_step() is not None:
        raise SystemExit(f"{args.out} already holds checkpoints; choose a new --out")
    ckpt.save(0, state, None, trainer.run_meta(run), force=True)
    ckpt.close()
    paths.write_text(paths.join(args.out, "config.json"), config.to_json_best_effort(indent=2))
    if args.hf_dir and os.path.exists(os.path.join(args.hf_dir, "tokenizer_config.json")):
        shutil.copytree(args.hf_dir, os.path.join(args.out, "hf_source_tokenizer"),
                        ignore=shutil.ignore_patterns("*.safetensors", "*.bin"),
                        dirs_exist_ok=True)
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    print(f"wrote {args.out} (step 0, {jax.device_count()} devices, train state of "
          f"{state_bytes} bytes) from {args.format}")
    return args.out


def _step_arg(value: str):
    from exgra_jax.eval.checkpoint_loading import parse_step

    try:
        return parse_step(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("to-hf", help="workdir checkpoint -> llava-hf directory")
    t.add_argument("--workdir", required=True)
    t.add_argument("--step", type=_step_arg, default=None,
                   help="a step number, or 'best' (default: the newest)")
    t.add_argument("--out", required=True)
    t.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None)
    f = sub.add_parser("from-hf", help="Hugging Face weights -> workdir at step 0")
    f.add_argument("--hf-dir", default=None)
    f.add_argument("--out", required=True)
    f.add_argument("--config", required=True, help="training config file, e.g. "
                                                    "configs/stage2_7b.py")
    f.add_argument("--config-arg", default=None, help="argument passed to get_config()")
    f.add_argument("--format", choices=sorted(FORMATS), default="llava-hf")
    f.add_argument("--clip-dir", default=None)
    f.add_argument("--llama-dir", default=None)
    args = p.parse_args(argv)
    from exgra_jax.runtime import setup_process

    setup_process()
    if args.command == "to-hf":
        to_hf(args.workdir, args.out, args.step, args.dtype)
    else:
        if args.format == "clip-llama" and not (args.clip_dir and args.llama_dir):
            p.error("--format clip-llama needs --clip-dir and --llama-dir")
        if args.format != "clip-llama" and not args.hf_dir:
            p.error(f"--format {args.format} needs --hf-dir")
        from_hf(args)


if __name__ == "__main__":
    main()
