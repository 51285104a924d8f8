"""The medical visual chatbot evaluation of LLaVA-Med (``llava_med_eval_qa50``), judged by a
GPT model over an OpenAI-compatible endpoint (``exgra_jax.eval.judge``).

    python launch/eval.py --workdir=DIR --task=chatbot \
        --chatbot_questions=llava_med_eval_qa50_qa.jsonl --chatbot_images=IMAGES \
        --judge_url=https://api.openai.com/v1 --judge_model=gpt-4 [--judge_key_env=OPENAI_API_KEY]

1. Answers: each question (JSON lines with ``question_id``, ``image``, ``text``,
   ``gpt4_answer``, ``fig_caption``, ``fig_label``, ``in_text_mention``, ``type`` and
   ``domain``) is answered with the checkpoint's template like the VQA runner does
   (``exgra_jax.eval.answering``: batched, resumable) into OUT.
2. Judgments: the judge scores the reference answer (assistant 1) and ours (assistant 2);
   each judgment is appended to OUT's ``.judgments.jsonl`` as it arrives, so a rerun
   judges only what is missing and no question is judged twice. A reply whose first line
   is not two scores is asked again (``parse_attempts`` in all), then reported. Questions
   the answerer skipped (an unreadable image) are not judged and are reported.
3. Summary, as LLaVA-Med's summarize_gpt_review: per question type, per imaging domain (the
   first of chest_xray, mri, histology, gross, ct_scan marked true) and overall, the mean
   score of each assistant, the relative score mean(ours / reference) x 100 and the count;
   printed as a table and written to OUT's ``.metrics.json``.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
from collections.abc import Callable, Sequence

from exgra_jax import paths
from exgra_jax.eval.answering import (
    SKIPPED,
    AnswersFileError,
    Question,
    answerer_for,
    id_key,
    read_answers,
)
from exgra_jax.eval.judge import (
    JudgeClient,
    JudgeError,
    JudgeUnavailable,
    UnparsableReply,
    judge_messages,
    parse_scores,
)

log = logging.getLogger("exgra_jax.eval")

TYPES = ("conversation", "detailed_description")
DOMAINS = ("chest_xray", "mri", "histology", "gross", "ct_scan")
FIELDS = ("question_id", "image", "text", "gpt4_answer", "fig_caption", "fig_label",
          "in_text_mention", "type", "domain")


def read_questions(path: str) -> list[dict]:
    """The qa50 JSON lines, each checked for the fields the evaluation reads."""
    questions = []
    for number, line in enumerate(paths.read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        q = json.loads(line)
        missing = [k for k in FIELDS if k not in q] if isinstance(q, dict) else FIELDS
        if missing:
            raise ValueError(f"{path} line {number}: missing {list(missing)}")
        if q["type"] not in TYPES:
            raise ValueError(f"{path} line {number}: type {q['type']!r} is not one of "
                             f"{TYPES}")
        if not isinstance(q["domain"], dict):
            raise ValueError(f"{path} line {number}: domain must be a dict of booleans "
                             f"over {DOMAINS}")
        questions.append(q)
    if not questions:
        raise ValueError(f"{path} holds no questions")
    return questions


def domain_of(question: dict) -> str | None:
    return next((d for d in DOMAINS if question["domain"].get(d)), None)


def output_paths(out_path: str) -> tuple[str, str]:
    """(judgments file, summary file) next to the answers file OUT."""
    root = out_path[: -len(".jsonl")] if out_path.endswith(".jsonl") else out_path
    return root + ".judgments.jsonl", root + ".metrics.json"


# ----------------------------------------------------------------------------- answers
def answer_chatbot(config, model, questions: Sequence[dict], image_folder: str, out_path: str,
                   *, template: str | None = None, limit: int = 0, bucket: int = 32,
                   progress: Callable[[int, int], None] | None = None):
    """Our answers (records in question order, complete) via the shared VQA answerer."""
    from exgra_jax.eval.answering import answer_questions  # noqa: PLC0415

    asked = [Question(q["question_id"], q["text"], q["image"]) for q in questions]
    missing = [q.image for q in asked if not paths.exists(paths.join(image_folder, q.image))]
    if len(missing) == len(asked):
        raise FileNotFoundError(f"no image found in {image_folder!r}, e.g. {missing[0]}: "
                                "check --chatbot_images")
    answerer = answerer_for(config, model, template=template, bucket=bucket,
                            image_root=image_folder)

    def make_record(q: Question, prompt: str, text: str) -> dict:
        return {"question_id": q.id, "prompt": prompt, "text": text,
                "answer_id": f"{model.name}:{q.id}", "model_id": model.name, "metadata": {}}

    return answer_questions(asked, answerer, out_path, make_record, limit=limit,
                            progress=progress)


# --------------------------------------------------------------------------- judgments
def _judge_one(judge: JudgeClient, question: dict, answer: str, attempts: int) -> dict:
    messages = judge_messages(question, answer)
    for attempt in range(1, attempts + 1):
        reply = judge.complete(messages)
        try:
            reference, ours = parse_scores(reply)
        except UnparsableReply as e:
            log.warning("judge: question %s, attempt %d/%d: %s", question["question_id"],
                        attempt, attempts, e)
            if attempt == attempts:
                raise
            continue
        return {"question_id": question["question_id"], "type": question["type"],
                "domain": domain_of(question), "reference_score": reference,
                "answer_score": ours, "answer": answer, "judge_model": judge.model,
                "judge_reply": reply}
    raise AssertionError("unreachable")


def judge_answers(questions: Sequence[dict], answers: dict[str, str], judge: JudgeClient,
                  judgments_path: str, *, concurrency: int = 4, parse_attempts: int = 3,
                  progress: Callable[[int, int], None] | None = None
                  ) -> tuple[dict[str, dict], list[dict]]:
    """Judge every question not yet in ``judgments_path`` (``answers``: id_key -> our text).

    Returns (judgments by id_key, failures [{question_id, error, reply}]). Judgments are
    appended as they arrive. A JudgeError other than unavailability stops the run (what was
    judged stays written)."""
    if concurrency < 1 or parse_attempts < 1:
        raise ValueError("concurrency and parse_attempts must be >= 1")
    known = {id_key(q["question_id"]) for q in questions}
    judged: dict[str, dict] = {}
    for record in read_answers(judgments_path):
        key = id_key(record["question_id"])
        if key not in known:
            raise AnswersFileError(f"{judgments_path} judges question_id "
                                   f"{record['question_id']!r}, not in the question set")
        judged[key] = record
    pending = [q for q in questions if id_key(q["question_id"]) not in judged]
    failures: list[dict] = []
    fatal: JudgeError | None = None
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        futures = {pool.submit(_judge_one, judge, q, answers[id_key(q["question_id"])],
                               parse_attempts): q for q in pending}
        for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
            if future.cancelled():
                continue
            q = futures[future]
            try:
                record = future.result()
            except (UnparsableReply, JudgeUnavailable) as e:
                failures.append({"question_id": q["question_id"], "error": str(e),
                                 "reply": getattr(e, "reply", None)})
                continue
            except JudgeError as e:  # stop asking, but keep what is still in flight
                fatal = fatal or e
                for other in futures:
                    other.cancel()
                continue
            judged[id_key(q["question_id"])] = record
            # Stored as it arrives (a whole-file atomic write, as for the answers).
            paths.write_text(judgments_path, "".join(
                json.dumps(r, ensure_ascii=False) + "\n" for r in judged.values()))
            if progress is not None:
                progress(done, len(pending))
    if fatal is not None:
        raise fatal
    return judged, failures


# ----------------------------------------------------------------------------- summary
def summarize(judgments: Sequence[dict]) -> dict[str, dict]:
    """Per type, per domain and overall: each assistant's mean score, the relative score
    mean(ours / reference) x 100 and the count (categories without questions left out)."""
    groups: dict[str, list[dict]] = {c: [] for c in (*TYPES, *DOMAINS, "overall")}
    for j in judgments:
        for category in (j["type"], j["domain"], "overall"):
            if category is not None:
                groups[category].append(j)
    summary = {}
    for category, items in groups.items():
        if not items:
            continue
        n = len(items)
        summary[category] = {
            "reference_score": sum(j["reference_score"] for j in items) / n,
            "answer_score": sum(j["answer_score"] for j in items) / n,
            "relative_score": 100 * sum(j["answer_score"] / j["reference_score"]
                                        for j in items) / n,
            "count": n}
    return summary


def format_table(summary: dict[str, dict]) -> str:
    lines = [f"{'category':<22} {'reference':>9} {'ours':>7} {'relative %':>10} {'count':>6}"]
    for category, s in summary.items():
        lines.append(f"{category:<22} {s['reference_score']:>9.2f} {s['answer_score']:>7.2f} "
                     f"{s['relative_score']:>10.1f} {s['count']:>6d}")
    return "\n".join(lines)


def run_chatbot(config, model, out_path: str, *, questions_path: str, image_folder: str,
                judge: JudgeClient, concurrency: int = 4, parse_attempts: int = 3,
                template: str | None = None, limit: int = 0, bucket: int = 32,
                log=print) -> dict | None:
    """Answer, judge and summarize (each step resuming); returns the summary JSON, or None
    while answers are missing (or on processes other than 0)."""
    import jax  # noqa: PLC0415

    questions = read_questions(questions_path)
    answers, complete = answer_chatbot(
        config, model, questions, image_folder, out_path, template=template, limit=limit,
        bucket=bucket, progress=lambda d, t: log(f"chatbot: answered {d}/{t}"))
    if jax.process_index() != 0 or not complete:
        if not complete:
            log(f"chatbot: {len(answers)}/{len(questions)} answered; rerun to continue")
        return None
    judgments_path, summary_path = output_paths(out_path)
    skipped = [{"question_id": a["question_id"], "reason": a[SKIPPED]}
               for a in answers if SKIPPED in a]
    to_judge = [q for q, a in zip(questions, answers, strict=True) if SKIPPED not in a]
    judged, failures = judge_answers(
        to_judge, {id_key(a["question_id"]): a["text"] for a in answers}, judge,
        judgments_path, concurrency=concurrency, parse_attempts=parse_attempts,
        progress=lambda d, t: log(f"chatbot: judged {d}/{t}"))
    ordered = [judged[k] for k in (id_key(q["question_id"]) for q in questions) if k in judged]
    summary = summarize(ordered)
    result = {"summary": summary, "num_questions": len(questions), "num_judged": len(ordered),
              "complete": len(ordered) == len(to_judge), "failures": failures,
              "skipped": skipped,
              "model": model.name, "judge_model": judge.model, "answers": out_path,
              "judgments": judgments_path}
    paths.write_json(summary_path, result, indent=1)
    log(format_table(summary))
    for failure in failures:
        log(f"chatbot: question {failure['question_id']} not judged: {failure['error']}")
    if failures:
        log(f"chatbot: {len(failures)} questions not judged; rerun to ask the judge again")
    if skipped:
        log(f"chatbot: {len(skipped)} questions skipped (their image could not be used)")
    return result
