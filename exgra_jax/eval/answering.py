"""Batched, resumable question answering shared by the VQA and zero-shot runners.

A question is a ``Question`` (id, text, image path or None). ``answer_questions`` turns
each into a prompt with the conversation template, generates in batches and rewrites the
answers file (one JSON line per question, through ``exgra_jax.paths``, so gs:// works)
after every batch, so an interruption loses at most the batch in flight. A rerun skips
every id already in the file.

A question whose image cannot be read (missing, corrupt, not an image, outside the image
folder) is not answered: it gets a line with ``"skipped": reason`` and everything else is
answered; the runners score the rest and list the skipped ones in their metrics.

Static shapes: every batch has ``batch_size`` rows (the last one is filled by repeating
its final question; the copies are discarded) and prompts are left-padded to a multiple
of ``bucket`` tokens, so the number of compiled programs is the number of distinct
buckets, not of distinct prompt lengths.

Several processes: every process runs the same batches on one global mesh (the model's
parameters stay sharded as in training, nothing is gathered to a host), each passing the
whole batch; generation returns every row's tokens to every process, and process 0 alone
reads and writes the answers file, so no shared filesystem is needed. Which questions are
already answered is broadcast from process 0.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np

from exgra_jax import paths
from exgra_jax.data.conversation import ConversationTokenizer
from exgra_jax.data.image import (
    ImageConfig,
    ImageDecodeError,
    ImagePreprocessor,
    normalization,
)
from exgra_jax.data.medical_image import MedicalImageOptions
from exgra_jax.inference.generate import GenerationConfig, generate, pad_prompts

log = logging.getLogger("exgra_jax.eval")


class AnswersFileError(ValueError):
    """An answers file that cannot be resumed from (corrupt line, unknown or repeated id)."""


@dataclasses.dataclass(frozen=True)
class Question:
    id: Any  # str or int, written back unchanged as question_id
    text: str  # the question as the model should read it (no <image> placeholder)
    image: str | None  # as the record names it (relative to the image folder), or None


def id_key(question_id: Any) -> str:
    """Ids compare by their JSON spelling, so 7 and "7" stay different (as in scoring)."""
    return json.dumps(question_id)


# ------------------------------------------------------------------------- answers file
def read_answers(path: str) -> list[dict]:
    """JSON lines of ``path`` ([] if absent). A final line without a newline that does
    not parse is an interrupted write (from an older, appending version): dropped."""
    if not paths.exists(path):
        return []
    data = paths.read_text(path)
    records = []
    lines = data.splitlines(keepends=True)
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line) if line.strip() else None
        except json.JSONDecodeError as e:
            if line.endswith("\n") or number != len(lines):
                raise AnswersFileError(f"{path} line {number}: not valid JSON ({e})") from e
            log.warning("%s: dropping a partial last line (an interrupted write)", path)
            break
        if record is not None:
            if not isinstance(record, dict) or "question_id" not in record:
                raise AnswersFileError(f"{path} line {number}: no question_id")
            records.append(record)
    return records


def answered_records(out_path: str, known_ids: set[str]) -> dict[str, dict]:
    """Answers so far, keyed by ``id_key``; checks each id."""
    answered: dict[str, dict] = {}
    for record in read_answers(out_path):
        key = id_key(record["question_id"])
        if key not in known_ids:
            raise AnswersFileError(
                f"{out_path} answers question_id {record['question_id']!r}, which is not in "
                "the question set: use another --out for another test set")
        if key in answered and answered[key] != record:
            raise AnswersFileError(f"{out_path}: question_id {record['question_id']!r} has "
                                   "two different answers")
        answered[key] = record
    return answered


def write_ordered(out_path: str, questions: Sequence[Question], answered: dict[str, dict]):
    """Rewrite OUT atomically with the answered questions, in question order."""
    lines = [json.dumps(answered[id_key(q.id)], ensure_ascii=False) + "\n"
             for q in questions if id_key(q.id) in answered]
    paths.write_text(out_path, "".join(lines))


def skipped_questions(records: Sequence[dict]) -> list[dict]:
    """The ``{"question_id", "reason"}`` of every skipped record."""
    return [{"question_id": r["question_id"], "reason": r[SKIPPED]}
            for r in records if SKIPPED in r]


SKIPPED = "skipped"


# ----------------------------------------------------------------------------- prompts
def bucket_length(n: int, bucket: int) -> int:
    return -(-n // bucket) * bucket


def image_config(config, model_config) -> ImageConfig:
    """How a config's images reach the model: the model's size and its tower's
    normalization, the data's aspect rule and DICOM/NIfTI windowing
    (``config.data.medical``), as in training."""
    medical = config.data.get("medical")
    options = MedicalImageOptions(**medical.to_dict()) if medical else MedicalImageOptions()
    mean, std = normalization(model_config.vision_type)
    return ImageConfig(model_config.image_size, config.data.image_aspect, mean, std,
                       medical=options)


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
    image_root: str | None = None  # the folder record image names are relative to
    allow_outside: bool = False  # image names may leave image_root (absolute, '..')

    def __post_init__(self):
        if self.batch_size < 1 or self.bucket < 1:
            raise ValueError("batch_size and bucket must be >= 1")
        tok = self.model.tokenizer
        self.conv = ConversationTokenizer(tok, self.template, self.model.config.num_image_tokens,
                                          self.use_im_start_end)
        self.images = ImagePreprocessor(self.image_config, self.image_root, self.allow_outside)
        self.gen = GenerationConfig(
            max_new_tokens=self.max_new_tokens, eos_token_ids=(tok.eos_token_id,),
            pad_token_id=self.conv.ids["pad"], stop_strings=(self.conv.stop_string,))

    def prompt_ids(self, q: Question) -> np.ndarray:
        return self.conv.prompt_ids(q.text, q.image is not None, self.image_first)

    def pixels(self, q: Question) -> tuple[np.ndarray | None, str | None]:
        """(pixel values, None), or (None, why) when the image cannot be used."""
        if q.image is None:
            return self.images.blank(), None
        try:
            return self.images(q.image), None
        except (ImageDecodeError, OSError) as e:
            return None, f"image {q.image}: {e}"

    def answer(self, questions: Sequence[Question]) -> list[tuple[str | None, str | None]]:
        """Per question (answer text, None), or (None, why it was skipped); one generate
        call for the usable ones."""
        if not 0 < len(questions) <= self.batch_size:
            raise ValueError(f"a batch holds 1..{self.batch_size} questions")
        loaded = [self.pixels(q) for q in questions]
        usable = [i for i, (_, why) in enumerate(loaded) if why is None]
        out: list[tuple[str | None, str | None]] = [(None, why) for _, why in loaded]
        if not usable:
            return out
        rows = usable + [usable[-1]] * (self.batch_size - len(usable))
        prompts = [self.prompt_ids(questions[i]) for i in rows]
        longest = max(len(p) for p in prompts)
        limit = self.model.config.max_positions - self.max_new_tokens
        if longest > limit:
            raise ValueError(f"a prompt has {longest} tokens; with max_new_tokens="
                             f"{self.max_new_tokens} the model's {limit}-token budget is "
                             "exceeded")
        length = min(bucket_length(longest, self.bucket), limit)
        ids, mask = pad_prompts(prompts, self.conv.ids["pad"], length=length)
        pixels = None
        if any(questions[i].image is not None for i in rows):
            pixels = np.stack([loaded[i][0] for i in rows])
        result = generate(self.model.config, self.model.params, ids, mask, pixels,
                          config=self.gen, tokenizer=self.model.tokenizer, mesh=self.model.mesh,
                          rules=self.model.rules)
        for i, text in zip(usable, result.texts, strict=False):
            out[i] = (text.strip(), None)
        return out


def answerer_for(config, model, *, template: str | None = None, bucket: int = 32,
                 image_root: str | None = None) -> Answerer:
    """The Answerer a run's config asks for: its template (or ``template``), image rules,
    eval batch and token budget, images under ``image_root`` (default eval.image_folder)."""
    return Answerer(
        model=model, template=template or config.data.template,
        image_config=image_config(config, model.config),
        use_im_start_end=config.data.mm_use_im_start_end,
        max_new_tokens=config.eval.max_new_tokens, batch_size=config.eval.batch_size,
        bucket=bucket, image_first=config.eval.get("image_first", False),
        image_root=image_root or config.eval.image_folder or None,
        allow_outside=config.data.get("allow_outside_image_folder", False))


def shown_prompt(q: Question) -> str:
    """The ``prompt`` field of an answer: the question, plus "\\n<image>" when it has one
    (LLaVA-Med's answers files record the question this way, not the full template)."""
    return q.text + ("\n<image>" if q.image is not None else "")


def _batches(items: Sequence[Question], size: int) -> Iterator[list[Question]]:
    for start in range(0, len(items), size):
        yield list(items[start:start + size])


def _from_process_0(keys: list[str]) -> list[str]:
    """Process 0's list of strings on every process (others may not see its files)."""
    if jax.process_count() == 1:
        return keys
    from jax.experimental import multihost_utils  # noqa: PLC0415

    data = np.frombuffer(json.dumps(keys).encode(), np.uint8)
    size = int(multihost_utils.broadcast_one_to_all(np.int64(data.size)))
    buf = np.zeros(size, np.uint8)
    if jax.process_index() == 0:
        buf[:] = data
    out = np.asarray(multihost_utils.broadcast_one_to_all(buf), np.uint8)
    return json.loads(out.tobytes().decode())


def answer_questions(
    questions: Sequence[Question],
    answerer: Answerer,
    out_path: str,
    make_record: Callable[[Question, str, str], dict],
    limit: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[list[dict], bool]:
    """Answer every question not yet in ``out_path``; returns (records in question order,
    complete). ``make_record(question, prompt, text)`` builds one JSON line; a skipped
    question's line also has ``"skipped": reason``. ``limit`` > 0 stops after that many
    new answers, leaving a resumable file. Every process must call this alike.
    """
    keys = [id_key(q.id) for q in questions]
    if len(set(keys)) != len(keys):
        seen: set[str] = set()
        dup = next(k for k in keys if k in seen or seen.add(k))
        raise ValueError(f"question_id {dup} occurs twice in the question set")
    writer = jax.process_index() == 0
    answered = answered_records(out_path, set(keys)) if writer else {}
    done_keys = set(_from_process_0(sorted(answered)))
    pending = [q for q in questions if id_key(q.id) not in done_keys]
    if limit > 0:
        pending = pending[:limit]
    done = 0
    for batch in _batches(pending, answerer.batch_size):
        for q, (text, why) in zip(batch, answerer.answer(batch), strict=True):
            record = make_record(q, shown_prompt(q), text or "")
            if why is not None:
                record[SKIPPED] = why
            answered[id_key(q.id)] = record
        if writer:
            write_ordered(out_path, questions, answered)
        before, done = done, done + len(batch)
        # About ten progress lines per run, whatever the number of batches.
        if progress is not None and (10 * done // len(pending) > 10 * before // len(pending)):
            progress(done, len(pending))
    complete = done_keys.union(id_key(q.id) for q in pending) >= set(keys)
    records = [answered[k] for k in keys if k in answered]
    return records, complete
