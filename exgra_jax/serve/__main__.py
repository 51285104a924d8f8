"""Serve a checkpoint over an OpenAI-compatible API, with the web chat at ``/``.

    python -m exgra_jax.serve --workdir demo_out/run [--step N|best] [--port 8000]
    python -m exgra_jax.serve --hf_dir HF_DIR --config configs/demo.py --image_dir /data/scans

Then e.g. ``openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")``.
Binds to 127.0.0.1 unless --host says otherwise (there is no authentication).
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m exgra_jax.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="training workdir (newest checkpoint, or --step)")
    src.add_argument("--hf_dir", help="a llava-hf directory (needs --config)")
    p.add_argument("--config", help="config file (default: WORKDIR/config.json)")
    p.add_argument("--step", default=None, help="checkpoint step or 'best'")
    p.add_argument("--template", default=None, help="default: config.data.template")
    p.add_argument("--model_name", default=None, help="the 'model' clients must name "
                   "(default: the run's name and step, or the hf_dir's name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--image_dir", default=None,
                   help="allow image_url paths (or file:// URLs) below this directory")
    p.add_argument("--allow_http", action="store_true", help="fetch http(s) image URLs")
    p.add_argument("--max_tokens", type=int, default=128,
                   help="answer length when a request gives none")
    p.add_argument("--max_batch", type=int, default=16, help="requests per generate call")
    p.add_argument("--batch_window_ms", type=float, default=10.0,
                   help="how long the first queued request waits for others")
    p.add_argument("--bucket", type=int, default=32, help="prompt length padding multiple")
    p.add_argument("--max_body_mb", type=float, default=32.0)
    p.add_argument("--max_image_mb", type=float, default=20.0)
    p.add_argument("--max_image_pixels", type=int, default=50_000_000)
    return p.parse_args(argv)


def build_app(args: argparse.Namespace):
    """Load the model and return the ASGI app (the engine's worker is running)."""
    from exgra_jax.config_paths import load_config_file  # noqa: PLC0415
    from exgra_jax.eval.answering import image_config  # noqa: PLC0415
    from exgra_jax.eval.checkpoint_loading import (  # noqa: PLC0415
        load_for_eval,
        parse_step,
        read_workdir_config,
    )
    from exgra_jax.serve.app import create_app  # noqa: PLC0415
    from exgra_jax.serve.engine import Engine  # noqa: PLC0415
    from exgra_jax.serve.media import MediaPolicy  # noqa: PLC0415

    if args.config:
        config = load_config_file(args.config)
    elif args.workdir:
        config = read_workdir_config(args.workdir)
    else:
        raise SystemExit("--hf_dir needs --config (for the tokenizer and the template)")
    model = load_for_eval(config, workdir=args.workdir, hf_dir=args.hf_dir,
                          step=parse_step(args.step))
    media = MediaPolicy(image_dir=args.image_dir, allow_http=args.allow_http,
                        max_image_bytes=int(args.max_image_mb * 2**20),
                        max_image_pixels=args.max_image_pixels)
    engine = Engine(model, args.template or config.data.template,
                    image_config(config, model.config),
                    config.data.mm_use_im_start_end, config.eval.get("image_first", False),
                    media, default_max_tokens=args.max_tokens,
                    max_batch=args.max_batch, window_s=args.batch_window_ms / 1000,
                    bucket=args.bucket)
    return create_app(engine, args.model_name or model.name,
                      max_body_bytes=int(args.max_body_mb * 2**20))


def main(argv=None) -> int:
    import uvicorn  # noqa: PLC0415

    args = parse_args(argv)
    app = build_app(args)
    print(f"serving on http://{args.host}:{args.port}/ (API at /v1)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


if __name__ == "__main__":
    sys.exit(main())
