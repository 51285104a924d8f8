"""Medical VQA evaluation (VQA-RAD, SLAKE, PathVQA in LLaVA-Med format): answer, then score.

    python launch/eval.py --config=configs/NAME.py --workdir=DIR --task=vqa [--step N]
        [--hf_dir D] [--out PRED.jsonl] [--config.eval.json_paths=test.json ...]

Questions come from ``config.eval.json_paths`` (LLaVA-Med VQA JSON lists, concatenated in
order; ids must be unique across them) and images from ``config.eval.image_folder``.
As in LLaVA-Med's ``model_vqa_med.py``: the question is the first turn's text with
``<image>`` removed, the image tokens follow it after a newline, the conversation template
wraps it (by default the one the model was trained with, ``config.data.template``; ExGra-Med
trains and evaluates with the llava_v0 '###' conversation), generation stops at the
template's stop string ('###'), and the answer is the text before it, stripped. Decoding is
greedy (the original sampled at temperature 0.7; greedy makes runs reproducible and
resumable). Answers are JSON lines ``question_id, prompt, text, answer_id, model_id`` in
question order, scored by ``exgra_jax.eval.metrics`` (with ``config.eval.candidates`` when
set); the metrics JSON is written next to the answers and returned. A question whose image
cannot be used is skipped (its line says why), left out of the scores, and listed under
``skipped`` (with ``num_skipped``) in the metrics.
"""

from __future__ import annotations

from typing import Any

from exgra_jax import paths
from exgra_jax.data.tokenizer import IMAGE_PLACEHOLDER
from exgra_jax.eval import metrics
from exgra_jax.eval.answering import (
    SKIPPED,
    Question,
    answer_questions,
    answerer_for,
    id_key,
    skipped_questions,
)


def read_vqa(json_paths) -> tuple[list[dict], list[Question]]:
    """Ground-truth records (for scoring) and the questions to ask, in file order; image
    names stay relative to the image folder (read, and checked, when answering)."""
    if not json_paths:
        raise ValueError("no VQA test files: set config.eval.json_paths")
    records: list[dict] = []
    for path in json_paths:
        records.extend(metrics.read_ground_truth(path))
    for position, record in enumerate(records, 1):
        if not isinstance(record, dict) or "id" not in record:
            raise metrics.ScoringInputError(f"VQA record {position} is not an object with 'id'")
    # The scorer's own field checks, now rather than after hours of generation.
    metrics.pair_records(records, [{"question_id": r["id"], "text": ""} for r in records])
    questions = []
    for record in records:
        turns = record.get("conversations", record.get("conversatons"))
        first = turns[0] if isinstance(turns[0], dict) else {}
        if not isinstance(first.get("value"), str):
            raise metrics.ScoringInputError(f"VQA record {record['id']!r}: the question turn "
                                            "has no string 'value'")
        text = first["value"].replace(IMAGE_PLACEHOLDER, "").strip()
        questions.append(Question(record["id"], text, record.get("image") or None))
    return records, questions


def metrics_path(answers_path: str) -> str:
    root = answers_path[: -len(".jsonl")] if answers_path.endswith(".jsonl") else answers_path
    return root + ".metrics.json"


def run_vqa(config, model, out_path: str, *, template: str | None = None, limit: int = 0,
            bucket: int = 32, log=print) -> dict[str, Any] | None:
    """Answer (resuming) and score; returns the metrics, or None while answers are missing.

    ``model`` is a ``checkpoint_loading.EvalModel``; only process 0 scores and writes.
    """
    import jax  # noqa: PLC0415

    records, questions = read_vqa(tuple(config.eval.json_paths))
    answerer = answerer_for(config, model, template=template, bucket=bucket)

    def make_record(q: Question, prompt: str, text: str) -> dict:
        # answer_id is derived, not random, so a rerun writes the same bytes.
        return {"question_id": q.id, "prompt": prompt, "text": text,
                "answer_id": f"{model.name}:{q.id}", "model_id": model.name, "metadata": {}}

    def progress(done: int, total: int) -> None:
        log(f"vqa: answered {done}/{total}")

    answers, complete = answer_questions(questions, answerer, out_path, make_record,
                                         limit=limit, progress=progress)
    if jax.process_index() != 0 or not complete:
        if not complete:
            log(f"vqa: {len(answers)}/{len(questions)} answered; rerun to continue")
        return None
    candidates = (metrics.read_candidates(config.eval.candidates)
                  if config.eval.candidates else None)
    skipped = skipped_questions(answers)
    if skipped:
        log(f"vqa: {len(skipped)} question(s) skipped (unusable images), e.g. "
            f"{skipped[0]['question_id']!r}: {skipped[0]['reason']}")
    result = score_answered(records, answers, candidates)
    result.update(num_questions=len(questions), num_skipped=len(skipped), skipped=skipped,
                  model=model.name, answers=out_path)
    paths.write_json(metrics_path(out_path), result, indent=1)
    return result


def score_answered(records: list[dict], answers: list[dict], candidates) -> dict[str, Any]:
    """LLaVA-Med scores over the answered questions (skipped ones left out)."""
    kept = {id_key(a["question_id"]) for a in answers if SKIPPED not in a}
    return metrics.score([r for r in records if id_key(r["id"]) in kept],
                         [a for a in answers if SKIPPED not in a], candidates)
