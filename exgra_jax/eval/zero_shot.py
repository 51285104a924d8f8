"""Zero-shot image classification as multiple-choice VQA (OmniMedVQA): answer, then score.

    python launch/eval.py --config=configs/NAME.py --workdir=DIR --task=zero_shot \
        --config.eval.json_paths=QA_information/Open-access/X.json \
        --config.eval.image_folder=OmniMedVQA [--out answers.jsonl]

Questions: OmniMedVQA JSON lists (``exgra_jax.eval.zero_shot_scoring`` checks the fields);
``image_path`` is relative to ``config.eval.image_folder``. Prompt: ``build_prompt`` (the
question, "Here are N candidate answers:", the options, the instruction), with the image
tokens after it in the conversation template (as in VQA). The answers file holds each
question record plus ``model_pred`` (the generated text) and ``prompt``, as the original's
answers files do, resumable like VQA; ``zero_shot_scoring.score`` maps each text to an
option by ``difflib`` ratio and reports accuracy per source data set and overall.
"""

from __future__ import annotations

import json
from typing import Any

from exgra_jax import paths
from exgra_jax.eval import zero_shot_scoring as zs
from exgra_jax.eval.answering import (
    SKIPPED,
    Question,
    answer_questions,
    answerer_for,
    skipped_questions,
)
from exgra_jax.eval.vqa import metrics_path


def read_zero_shot(json_paths) -> tuple[list[dict], list[Question]]:
    """Question records and the questions to ask; image paths stay relative to the image
    folder (read, and checked, when answering: an unusable image is a skipped question)."""
    if not json_paths:
        raise ValueError("no zero-shot question files: set config.eval.json_paths")
    records: list[dict] = []
    for path in json_paths:
        records.extend(zs.read_questions(path))
    questions = []
    for record in records:
        questions.append(Question(record["question_id"], zs.build_prompt(record),
                                  record["image_path"]))
    return records, questions


def run_zero_shot(config, model, out_path: str, *, template: str | None = None,
                  limit: int = 0, bucket: int = 32, log=print) -> dict[str, Any] | None:
    """Answer (resuming) and score; returns the accuracies, or None while answers are missing."""
    import jax  # noqa: PLC0415

    records, questions = read_zero_shot(tuple(config.eval.json_paths))
    by_id = {json.dumps(r["question_id"]): r for r in records}
    answerer = answerer_for(config, model, template=template, bucket=bucket)

    def make_record(q: Question, prompt: str, text: str) -> dict:
        return {**by_id[json.dumps(q.id)], "prompt": prompt, zs.GENERATED_FIELD: text,
                "model_id": model.name}

    def progress(done: int, total: int) -> None:
        log(f"zero_shot: answered {done}/{total}")

    answers, complete = answer_questions(questions, answerer, out_path, make_record,
                                         limit=limit, progress=progress)
    if jax.process_index() != 0 or not complete:
        if not complete:
            log(f"zero_shot: {len(answers)}/{len(questions)} answered; rerun to continue")
        return None
    skipped = skipped_questions(answers)
    result = zs.score([a for a in answers if SKIPPED not in a])
    result.update(num_skipped=len(skipped), skipped=skipped, model=model.name, answers=out_path)
    paths.write_json(metrics_path(out_path), result, indent=1)
    return result
