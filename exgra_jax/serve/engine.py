"""Batched generation for the server: per-batch (not continuous) batching.

Requests are prepared (image decoded, prompt tokenized and checked) in the caller's thread,
then queued. One worker thread takes the oldest request, waits up to ``window_s`` for
more, and runs every queued request with the same generation settings as one ``generate``
call: prompts left-padded to a multiple of ``bucket`` tokens, the batch padded to a power
of two (repeating its last row) so that few programs are compiled. A request arriving
while a batch decodes waits for the next batch; it does not join between decode steps.

Streaming: ``generate`` reports the tokens every ``check_every`` decode steps; each row's
text so far is cut at its stop strings, and only the part no later token can change (not a
possible start of a stop string, no trailing space or partial character) is sent.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from exgra_jax.data.conversation import ConversationTokenizer
from exgra_jax.data.image import ImageConfig, ImagePreprocessor
from exgra_jax.inference import stopping
from exgra_jax.inference.generate import GenerationConfig, generate, pad_prompts
from exgra_jax.serve.media import MediaPolicy, decode_image, image_bytes
from exgra_jax.serve.protocol import ApiError, ChatRequest

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int


@dataclasses.dataclass(eq=False)
class Job:
    """One prepared request. ``emit`` receives ("delta", str), then ("done", Completion)
    or ("error", Exception), from the worker thread."""

    ids: np.ndarray
    pixels: np.ndarray | None
    gen: GenerationConfig
    group: tuple  # jobs with equal groups share a generate call
    seed: int | None
    stream: bool
    emit: Callable[[tuple[str, Any]], None]
    sent: str = ""  # streamed text so far


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _batch_rows(n: int, max_batch: int) -> int:
    return min(1 << (n - 1).bit_length(), max_batch)


def settled_text(text: str, stops: tuple[str, ...]) -> str:
    """The part of a partial answer that further tokens cannot change: cut at the first
    stop string; without a trailing start of a stop string, whitespace (the answer is
    stripped) or an incomplete character."""
    text = stopping.truncate_at_stop(text, stops).lstrip()
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                text = text[:-k]
                break
    return text.rstrip().rstrip("\ufffd").rstrip()


class Engine:
    def __init__(self, model, template: str, image_config: ImageConfig,
                 use_im_start_end: bool = True, image_first: bool = False,
                 media: MediaPolicy | None = None,
                 default_max_tokens: int = 128, max_batch: int = 16, window_s: float = 0.01,
                 bucket: int = 32, max_queue: int = 256):
        self.model = model
        # The project's one prompt builder (training, evaluation, chat and this server).
        self.conv = ConversationTokenizer(model.tokenizer, template,
                                          model.config.num_image_tokens, use_im_start_end)
        self.image_first = image_first
        self.images = ImagePreprocessor(image_config)
        self.media = media or MediaPolicy()
        self.ids = self.conv.ids
        self.default_max_tokens = default_max_tokens
        self.max_batch, self.window_s, self.bucket = max_batch, window_s, bucket
        self.queue: queue.Queue[Job | None] = queue.Queue(max_queue)
        self._decode = lambda ids: model.tokenizer.decode(ids, skip_special_tokens=True)
        self._sampling_seed = int.from_bytes(os.urandom(4), "little")
        self.batches = 0  # generate calls so far (for /health and the benchmark)
        self._worker = threading.Thread(target=self._loop, name="exgra-serve-engine",
                                        daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------------ preparing
    def prompt_ids(self, request: ChatRequest) -> np.ndarray:
        return self.conv.encode_prompt(self.conv.chat_prompt_text(
            request.exchanges, request.image_url is not None, self.image_first))

    def prepare(self, request: ChatRequest, emit) -> Job:
        """Decode the image and tokenize the prompt; ApiError for what the model cannot
        take. Runs in the request's thread."""
        pixels = None
        if request.image_url is not None:
            image = decode_image(image_bytes(request.image_url, self.media), self.media,
                                 self.images.config.medical)
            pixels = self.images(image)
        ids = self.prompt_ids(request)
        positions = self.model.config.max_positions
        max_tokens = request.max_tokens or max(1, min(self.default_max_tokens,
                                                       positions - len(ids)))
        if len(ids) + max_tokens > positions:
            raise ApiError(400, f"the prompt has {len(ids)} tokens; with max_tokens="
                           f"{max_tokens} that exceeds the model's {positions} positions",
                           param="messages", code="context_length_exceeded")
        temperature = request.temperature
        top_p = request.top_p if temperature > 0 else 1.0
        gen = GenerationConfig(
            max_new_tokens=max_tokens, temperature=temperature, top_p=top_p,
            eos_token_ids=(self.ids["eos"],), pad_token_id=self.ids["pad"],
            stop_strings=(self.conv.stop_string, *request.stop))
        # A seeded sampled request runs alone: its tokens must not depend on its batch.
        alone = object() if request.seed is not None and temperature > 0 else None
        return Job(ids, pixels, gen, (gen, alone), request.seed, request.stream, emit)

    def submit(self, job: Job) -> None:
        try:
            self.queue.put_nowait(job)
        except queue.Full as e:
            raise ApiError(503, "the server is busy; retry later", type="server_error",
                           code="overloaded") from e

    def close(self) -> None:
        self.queue.put(None)
        self._worker.join(timeout=60)

    # ------------------------------------------------------------------------ the worker
    def _loop(self) -> None:
        pending: list[Job] = []
        closing = False
        while not (closing and not pending):
            if not pending:
                job = self.queue.get()
                if job is None:
                    return
                pending.append(job)
            deadline = time.monotonic() + self.window_s
            while not closing and len(pending) < self.max_batch:
                try:
                    job = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if job is None:
                    closing = True
                else:
                    pending.append(job)
            group = [j for j in pending if j.group == pending[0].group][: self.max_batch]
            pending = [j for j in pending if j not in group]
            try:
                self._run(group)
            except Exception as e:  # noqa: BLE001 - reported to the waiting requests
                log.exception("generation failed")
                for job in group:
                    job.emit(("error", e))

    def _rng(self, jobs: list[Job]):
        import jax  # noqa: PLC0415

        if jobs[0].seed is not None:
            return jax.random.key(jobs[0].seed)
        self._sampling_seed += 1
        return jax.random.key(self._sampling_seed)

    def _run(self, jobs: list[Job]) -> None:
        gen = jobs[0].gen
        limit = self.model.config.max_positions - gen.max_new_tokens
        length = min(_round_up(max(len(j.ids) for j in jobs), self.bucket), limit)
        rows = jobs + [jobs[-1]] * (_batch_rows(len(jobs), self.max_batch) - len(jobs))
        ids, mask = pad_prompts([j.ids for j in rows], self.ids["pad"], length=length)
        pixels = None
        if any(j.pixels is not None for j in rows):
            pixels = np.stack([self.images.blank() if j.pixels is None else j.pixels
                               for j in rows])
        streaming = [(r, j) for r, j in enumerate(jobs) if j.stream]

        def progress(tokens, lengths):
            for r, job in streaming:
                kept = [t for t in tokens[r, : lengths[r]].tolist() if t not in gen.eos_token_ids]
                self._send(job, settled_text(self._decode(kept), gen.stop_strings))

        m = self.model
        out = generate(m.config, m.params, ids, mask, pixels, config=gen, rng=self._rng(jobs),
                       tokenizer=m.tokenizer, mesh=m.mesh, rules=m.rules,
                       on_progress=progress if streaming else None)
        self.batches += 1
        for r, job in enumerate(jobs):
            text = out.texts[r].strip()
            n = int(out.lengths[r])
            row = out.tokens[r, :n].tolist()
            stopped = (n < gen.max_new_tokens or row[-1] in gen.eos_token_ids
                       or stopping.contains_stop(self._decode(row), gen.stop_strings))
            if job.stream:
                self._send(job, text)
            job.emit(("done", Completion(text, "stop" if stopped else "length",
                                         len(job.ids), n)))

    def _send(self, job: Job, text: str) -> None:
        if text.startswith(job.sent) and len(text) > len(job.sent):
            job.emit(("delta", text[len(job.sent):]))
            job.sent = text
        elif not text.startswith(job.sent):
            log.warning("streamed text %r is not a prefix of %r", job.sent, text)
