"""Multi-turn chat about one image, in the terminal or (``--web``, the server's page) in a browser.

    python -m exgra_jax.eval.chat --workdir demo_out/run --image scan.png
    python -m exgra_jax.eval.chat --hf_dir HF_DIR --config configs/demo.py --image scan.png
    python -m exgra_jax.eval.chat --workdir demo_out/run --web --port 7860

Terminal commands: ``/image PATH`` (a new image; starts a new conversation), ``/reset``,
``/quit`` (or end of input). The whole conversation is kept in the model's conversation
template (``config.data.template`` unless ``--template``), built by the same function as
evaluation prompts (the image tokens placed by ``config.eval.image_first``); each answer
is generated after the template's assistant prefix and cut at its stop string. When the
history outgrows the model's context, the oldest exchanges are dropped (the image stays
with the first kept question).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from typing import Any

import numpy as np

from exgra_jax.data.conversation import ConversationTokenizer
from exgra_jax.data.image import ImageConfig, ImagePreprocessor
from exgra_jax.data.tokenizer import IMAGE_PLACEHOLDER
from exgra_jax.eval import answering
from exgra_jax.inference.generate import GenerationConfig, generate, pad_prompts


class ChatSession:
    """One conversation: an optional image and the (question, answer) history.

    Prompts come from `ConversationTokenizer.chat_prompt_text`, the builder VQA evaluation
    uses, with the same ``image_first``: the first question of a chat gets the tokens an
    evaluation of the same question gets.
    """

    def __init__(self, model, template: str, image_config: ImageConfig,
                 use_im_start_end: bool = True, max_new_tokens: int = 128,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                 bucket: int = 64, lock: threading.Lock | None = None,
                 image_first: bool = False):
        self.model = model
        self.conv = ConversationTokenizer(model.tokenizer, template,
                                          model.config.num_image_tokens, use_im_start_end)
        self.image_first = image_first
        self.images = ImagePreprocessor(image_config)
        self.ids = self.conv.ids
        self.gen = GenerationConfig(
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
            eos_token_ids=(self.ids["eos"],), pad_token_id=self.ids["pad"],
            stop_strings=(self.conv.stop_string,))
        self.seed = seed
        self.bucket = bucket
        self.lock = lock or threading.Lock()  # generation is serialized per model
        self.pixels: np.ndarray | None = None
        self.history: list[tuple[str, str]] = []

    def set_image(self, image: Any) -> None:
        """A path, encoded bytes or a uint8 array; starts a new conversation."""
        self.pixels = self.images(image)
        self.history = []

    def reset(self) -> None:
        self.history = []

    def prompt_text(self, question: str, history: list[tuple[str, str]]) -> str:
        return self.conv.chat_prompt_text([*history, (question, None)],
                                          self.pixels is not None, self.image_first)

    def _encode(self, text: str) -> list[int]:
        return self.conv.encode_prompt(text).tolist()

    def ask(self, question: str) -> str:
        question = question.replace(IMAGE_PLACEHOLDER, " ").strip()
        if not question:
            raise ValueError("empty question")
        limit = self.model.config.max_positions - self.gen.max_new_tokens
        history = list(self.history)
        ids = self._encode(self.prompt_text(question, history))
        while len(ids) > limit and history:
            history = history[1:]  # forget the oldest exchange
            ids = self._encode(self.prompt_text(question, history))
        if len(ids) > limit:
            raise ValueError(f"the question is too long: {len(ids)} prompt tokens, the model "
                             f"takes {limit} with max_new_tokens={self.gen.max_new_tokens}")
        length = min(-(-len(ids) // self.bucket) * self.bucket, limit)
        input_ids, mask = pad_prompts([ids], self.ids["pad"], length=length)
        pixels = None if self.pixels is None else self.pixels[None]
        import jax  # noqa: PLC0415

        rng = jax.random.key(self.seed + len(self.history))
        with self.lock:
            out = generate(self.model.config, self.model.params, input_ids, mask, pixels,
                           config=self.gen, rng=rng, tokenizer=self.model.tokenizer,
                           mesh=self.model.mesh, rules=self.model.rules)
        answer = out.texts[0].strip()
        self.history = [*history, (question, answer)]
        return answer


# ------------------------------------------------------------------------------ loading
def session_factory(args):
    """Loads the model once; returns a function making new sessions that share it."""
    from exgra_jax.config_paths import load_config_file  # noqa: PLC0415
    from exgra_jax.eval.checkpoint_loading import load_for_eval, read_workdir_config  # noqa: PLC0415

    if args.config:
        config = load_config_file(args.config)
    elif args.workdir:
        config = read_workdir_config(args.workdir)
    else:
        raise SystemExit("--hf_dir needs --config (for the tokenizer and the template)")
    model = load_for_eval(config, workdir=args.workdir, hf_dir=args.hf_dir, step=args.step)
    lock = threading.Lock()
    image_config = answering.image_config(config, model.config)

    def make() -> ChatSession:
        return ChatSession(model, args.template or config.data.template, image_config,
                           config.data.mm_use_im_start_end, args.max_new_tokens,
                           args.temperature, args.top_p, args.seed, lock=lock,
                           image_first=config.eval.get("image_first", False))

    return make


# ------------------------------------------------------------------------------ terminal
def terminal_chat(session: ChatSession, lines, write) -> None:
    """Reads questions and commands from ``lines``; writes prompts and answers."""
    write("Type a question, /image PATH, /reset or /quit.\n")
    for raw in lines:
        line = raw.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        try:
            if line.startswith("/image"):
                session.set_image(line[len("/image"):].strip())
                write("[new image; conversation cleared]\n")
            elif line == "/reset":
                session.reset()
                write("[conversation cleared]\n")
            else:
                write(f"ASSISTANT: {session.ask(line)}\n")
        except ValueError as e:  # bad image or question: report and keep chatting
            write(f"[error: {e}]\n")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m exgra_jax.eval.chat", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="training workdir (newest checkpoint, or --step)")
    src.add_argument("--hf_dir", help="a llava-hf directory")
    p.add_argument("--config", help="config file (default: WORKDIR/config.json)")
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--image", help="the image to talk about")
    p.add_argument("--template", default=None)
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--web", action="store_true",
                   help="serve the web chat instead (python -m exgra_jax.serve)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.web:  # the page of the OpenAI-compatible server (a layer above eval: exec it)
        source = ["--workdir", args.workdir] if args.workdir else ["--hf_dir", args.hf_dir]
        os.execv(sys.executable, [
            sys.executable, "-m", "exgra_jax.serve", *source,
            *(["--config", args.config] if args.config else []),
            *(["--step", str(args.step)] if args.step is not None else []),
            *(["--template", args.template] if args.template else []),
            "--max_tokens", str(args.max_new_tokens), "--host", args.host,
            "--port", str(args.port)])
    make_session = session_factory(args)
    session = make_session()
    if args.image:
        session.set_image(args.image)

    def lines():
        while True:
            try:
                yield input("USER: ")
            except EOFError:
                return

    terminal_chat(session, lines(), lambda s: print(s, end="", flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
