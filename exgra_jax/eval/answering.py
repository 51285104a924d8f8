"""Batched, resumable question answering shared by the VQA and zero-shot runners.

A question is a ``Question`` (id, text, image path or None). ``answer_questions`` turns
each into a prompt with the conversation template, generates in batches and appends one
JSON line per question to the answers file, flushed after every batch, so an
interruption loses at most the batch in flight. A rerun skips every id already in the
file; a last line cut off mid-write is dropped first.

Static shapes: every batch has ``batch_size`` rows (the last one is filled by repeating
its final question; the copies are discarded) and prompts are left-padded to a multiple
of ``bucket`` tokens, so the number of compiled programs is the number of distinct
buckets, not of distinct prompt lengths.

Several processes: each runs one model replica on its own devices (the mesh over
``jax.local_devices()``), answers the strided share ``pending[process_index::count]``
into its own part file ``OUT.partK-of-N`` and, after a barrier, process 0 merges the
parts into OUT. Resuming with any process count works, since the ids answered so far
are read from OUT and from every part file present.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np

from exgra_jax.data.conversation import ConversationTokenizer
from exgra_jax.data.image import ImageConfig, ImagePreprocessor
from exgra_jax.inference.generate import GenerationConfig, generate, pad_prompts

log = logging.getLogger("exgra_jax.eval")


class AnswersFileError(ValueError):
    """An answers file that cannot be resumed from (corrupt line, unknown or repeated id)."""


@dataclasses.dataclass(frozen=True)
class Question:
    id: Any  # str or int, written back unchanged as question_id
    text: str  # the question as the model should read it (no <image> placeholder)
    image: str | None  # a path (already joined with the image folder), or None


def id_key(question_id: Any) -> str:
    """Ids compare by their JSON spelling, so 7 and "7" stay different (as in scoring)."""
    return json.dumps(question_id)


# ------------------------------------------------------------------------- answers file
def read_answers(path: str, repair: bool = False) -> list[dict]:
    """JSON lines of ``path`` ([] if absent). A final line without a newline that does
    not parse is an interrupted write: dropped (and cut from the file when ``repair``)."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    records, offset = [], 0
    for number, raw in enumerate(data.splitlines(keepends=True), 1):
        try:
            line = raw.decode("utf-8")
            record = json.loads(line) if line.strip() else None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            if raw.endswith(b"\n") or offset + len(raw) != len(data):
                raise AnswersFileError(f"{path} line {number}: not valid JSON ({e})") from e
            log.warning("%s: dropping a partial last line (an interrupted write)", path)
            if repair:
                with open(path, "r+b") as f:
                    f.truncate(offset)
            break
        if record is not None:
            if not isinstance(record, dict) or "question_id" not in record:
                raise AnswersFileError(f"{path} line {number}: no question_id")
            records.append(record)
        offset += len(raw)
    return records


def _part_paths(out_path: str) -> list[str]:
    return sorted(glob.glob(glob.escape(out_path) + ".part*-of-*"))


def answered_records(out_path: str, known_ids: set[str], repair: bool) -> dict[str, dict]:
    """Answers so far (OUT and any part files), keyed by ``id_key``; checks each id."""
    answered: dict[str, dict] = {}
    for path in [out_path, *_part_paths(out_path)]:
        for record in read_answers(path, repair=repair):
            key = id_key(record["question_id"])
            if key not in known_ids:
                raise AnswersFileError(
                    f"{path} answers question_id {record['question_id']!r}, which is not in "
                    "the question set: use another --out for another test set")
            if key in answered and answered[key] != record:
                raise AnswersFileError(f"{path}: question_id {record['question_id']!r} has "
                                       "two different answers")
            answered[key] = record
    return answered


def write_ordered(out_path: str, questions: Sequence[Question], answered: dict[str, dict]):
    """Rewrite OUT atomically with one answer per question, in question order."""
    tmp = out_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for q in questions:
            f.write(json.dumps(answered[id_key(q.id)], ensure_ascii=False) + "\n")
    os.replace(tmp, out_path)


# ----------------------------------------------------------------------------- prompts
def bucket_length(n: int, bucket: int) -> int:
    return -(-n // bucket) * bucket


@dataclasses.dataclass
class Answerer:
    """Generates answers for batches of questions with one model."""

    model: Any  # checkpoint_loading.EvalModel
    template: str
    image_config: ImageConfig
    use_im_start_end: bool = True
    max_new_tokens: int = 32
    batch_size: int = 8
    bucket: int = 32
    image_first: bool = False  # image block before the question (else after: LLaVA-Med eval)

    def __post_init__(self):
        if self.batch_size < 1 or self.bucket < 1:
            raise ValueError("batch_size and bucket must be >= 1")
        tok = self.model.tokenizer
        self.conv = ConversationTokenizer(tok, self.template, self.model.config.num_image_tokens,
                                          self.use_im_start_end)
        self.images = ImagePreprocessor(self.image_config)
        self.gen = GenerationConfig(
            max_new_tokens=self.max_new_tokens, eos_token_ids=(tok.eos_token_id,),
            pad_token_id=self.conv.ids["pad"], stop_strings=(self.conv.stop_string,))

    def prompt_ids(self, q: Question) -> np.ndarray:
        return self.conv.prompt_ids(q.text, q.image is not None, self.image_first)

    def answer(self, questions: Sequence[Question]) -> list[str]:
        """The answer text per question (stop string cut, stripped); one generate call."""
        if not 0 < len(questions) <= self.batch_size:
            raise ValueError(f"a batch holds 1..{self.batch_size} questions")
        rows = list(questions) + [questions[-1]] * (self.batch_size - len(questions))
        prompts = [self.prompt_ids(q) for q in rows]
        longest = max(len(p) for p in prompts)
        limit = self.model.config.max_positions - self.max_new_tokens
        if longest > limit:
            raise ValueError(f"a prompt has {longest} tokens; with max_new_tokens="
                             f"{self.max_new_tokens} the model's {limit}-token budget is "
                             "exceeded")
        length = min(bucket_length(longest, self.bucket), limit)
        ids, mask = pad_prompts(prompts, self.conv.ids["pad"], length=length)
        pixels = None
        if any(q.image is not None for q in rows):
            pixels = np.stack([self.images(q.image) if q.image is not None
                               else self.images.blank() for q in rows])
        out = generate(self.model.config, self.model.params, ids, mask, pixels, config=self.gen,
                       tokenizer=self.model.tokenizer, mesh=self.model.mesh,
                       rules=self.model.rules)
        return [t.strip() for t in out.texts[: len(questions)]]


def shown_prompt(q: Question) -> str:
    """The ``prompt`` field of an answer: the question, plus "\\n<image>" when it has one
    (LLaVA-Med's answers files record the question this way, not the full template)."""
    return q.text + ("\n<image>" if q.image is not None else "")


def _batches(items: Sequence[Question], size: int) -> Iterator[list[Question]]:
    for start in range(0, len(items), size):
        yield list(items[start:start + size])


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # noqa: PLC0415

        multihost_utils.sync_global_devices(name)


def answer_questions(
    questions: Sequence[Question],
    answerer: Answerer,
    out_path: str,
    make_record: Callable[[Question, str, str], dict],
    limit: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[list[dict], bool]:
    """Answer every question not yet in ``out_path``; returns (records in question order,
    complete). ``make_record(question, prompt, text)`` builds one JSON line. ``limit`` > 0
    stops after that many new answers (this process), leaving a resumable file.
    """
    keys = [id_key(q.id) for q in questions]
    if len(set(keys)) != len(keys):
        seen: set[str] = set()
        dup = next(k for k in keys if k in seen or seen.add(k))
        raise ValueError(f"question_id {dup} occurs twice in the question set")
    os.makedirs(os.path.dirname(os.path.abspath(out_path)) or ".", exist_ok=True)
    pid, count = jax.process_index(), jax.process_count()
    answered = answered_records(out_path, set(keys), repair=count == 1 or pid == 0)
    pending = [q for q in questions if id_key(q.id) not in answered]
    mine = pending[pid::count]
    if limit > 0:
        mine = mine[:limit]
    target = out_path if count == 1 else f"{out_path}.part{pid}-of-{count}"
    if count > 1:
        read_answers(target, repair=True)
    done = 0
    with open(target, "a", encoding="utf-8") as f:
        for batch in _batches(mine, answerer.batch_size):
            lines = []
            for q, text in zip(batch, answerer.answer(batch), strict=True):
                record = make_record(q, shown_prompt(q), text)
                answered[id_key(q.id)] = record
                lines.append(json.dumps(record, ensure_ascii=False) + "\n")
            f.write("".join(lines))
            f.flush()
            done += len(batch)
            if progress is not None:
                progress(done, len(mine))
    _barrier("exgra_eval_answers_written")
    if count > 1 and pid == 0:  # merge what every process wrote
        answered = answered_records(out_path, set(keys), repair=False)
    complete = all(k in answered for k in keys)
    if pid == 0:
        if complete or count > 1:
            ordered = [q for q in questions if id_key(q.id) in answered]
            write_ordered(out_path, ordered, answered)
            for part in _part_paths(out_path):
                os.remove(part)
    _barrier("exgra_eval_answers_merged")
    records = [answered[k] for k in keys if k in answered]
    return records, complete
