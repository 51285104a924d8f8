"""Shared set-up for the server tests: a tiny checkpoint served in-process on 127.0.0.1 and
the reference answer computed with ``generate`` on a hand-written prompt."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import jax
import uvicorn

from exgra_jax.inference.generate import GenerationConfig, generate, pad_prompts

SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the human's questions.")


def image_block(n: int) -> str:
    return "<im_start>" + "<im_patch>" * n + "<im_end>"


def llava_v0_prompt(exchanges: list[tuple[str, str]], question: str, block: str | None,
                    image_first: bool = False) -> str:
    """The llava_v0 chat prompt written out by hand: the image block after (or before) the
    first question, earlier answers after 'Assistant: '."""
    text = f"{SYSTEM}\n\n###"
    for i, (q, a) in enumerate([*exchanges, (question, None)]):
        if i == 0 and block:
            q = f"{block}\n{q}" if image_first else f"{q}\n{block}"
        text += f" Human: {q}\n###"
        if a is not None:
            text += f" Assistant: {a}\n###"
    return text + " Assistant:"


def reference_answer(model, prompt: str, pixels, max_new_tokens: int) -> tuple[str, int]:
    """``generate`` on one prompt alone, without a mesh: (answer, prompt tokens). The prompt
    is left-padded to a multiple of 64 only so that few programs compile (padding does not
    change a row's tokens)."""
    tok = model.tokenizer
    ids = tok(prompt).input_ids
    ids, mask = pad_prompts([ids], tok.pad_token_id, length=-(-len(ids) // 64) * 64)
    gen = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_ids=(tok.eos_token_id,),
                           pad_token_id=tok.pad_token_id, stop_strings=("###",))
    out = generate(model.config, _host_params(model), ids, mask,
                   None if pixels is None else pixels[None], config=gen, tokenizer=tok)
    return out.texts[0].strip(), int(mask.sum())


_HOST_PARAMS: dict[int, object] = {}


def _host_params(model):
    if id(model) not in _HOST_PARAMS:
        _HOST_PARAMS[id(model)] = jax.device_get(model.params)
    return _HOST_PARAMS[id(model)]


def data_url(path: str, media_type: str = "image/png") -> str:
    with open(path, "rb") as f:
        return f"data:{media_type};base64," + base64.b64encode(f.read()).decode()


class LocalServer:
    """uvicorn serving ``app`` on a free 127.0.0.1 port in a background thread."""

    def __init__(self, app):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)

    def close(self):
        self.server.should_exit = True
        self.thread.join(timeout=60)
        self.sock.close()


def http_json(url: str, body=None, timeout: float = 120) -> tuple[int, dict]:
    """GET (no body) or POST (a dict as JSON, or raw bytes); (status, JSON reply)."""
    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
