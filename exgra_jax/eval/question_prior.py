"""Image-blind VQA baseline: answer each question with its most common training answer.

    python -m exgra_jax.eval.question_prior --train train.json [more.json ...] --gt test.json \
        --out answers.jsonl [--candidates candidate.json]

writes the answers as JSON lines (the fields `launch/eval.py` writes) and prints the metrics
of `exgra_jax.eval.metrics` as one JSON object, scored by `metrics.score`. A model that does
not look at the image can at best learn this prior, so a trained model must beat it before
its score says anything about the image.

Rules:
  * Training questions are the (human turn, next gpt turn) pairs of every training record,
    so multi-turn instruction records count each of their questions.
  * Two questions are the same when their texts are, after removing `<image>`, lowercasing
    and collapsing whitespace; the options LLaVA-Med appends to closed questions are part of
    the text.
  * The answer is the training answer (as written there) that the same question gets most
    often; a tie goes to the answer seen first in the training files.
  * A test question never seen in training gets the most common answer of the training
    questions with the same `answer_type` (OPEN or CLOSED; records without one only count
    for their own questions), ties again to the first seen; with no such training question,
    the answer is empty.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from exgra_jax.data.tokenizer import IMAGE_PLACEHOLDER
from exgra_jax.eval import metrics

MODEL_NAME = "question_prior"


def question_key(text: str) -> str:
    """The text two questions must share to count as the same question."""
    return " ".join(text.replace(IMAGE_PLACEHOLDER, " ").lower().split())


def _turns(record: Mapping[str, Any]) -> list:
    turns = record.get("conversations", record.get("conversatons"))
    if not isinstance(turns, list):
        raise metrics.ScoringInputError(f"record {record.get('id')!r} has no 'conversations' list")
    return turns


def question_answer_pairs(record: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(question, answer) for every human turn that a gpt turn answers."""
    turns = _turns(record)
    pairs = []
    for asked, answered in zip(turns, turns[1:]):
        if not (isinstance(asked, Mapping) and isinstance(answered, Mapping)):
            continue
        if asked.get("from") == "human" and answered.get("from") == "gpt":
            pairs.append((asked["value"], answered["value"]))
    return pairs


class QuestionPrior:
    """Answer counts per question text and per answer type, from training records."""

    def __init__(self, training_records: Iterable[Mapping[str, Any]]):
        # Counter.most_common keeps first-seen order among equal counts: the tie rule.
        self.by_question: dict[str, Counter] = defaultdict(Counter)
        self.by_type: dict[str, Counter] = defaultdict(Counter)
        for record in training_records:
            answer_type = record.get("answer_type")
            for question, answer in question_answer_pairs(record):
                self.by_question[question_key(question)][answer] += 1
                if answer_type:
                    self.by_type[answer_type][answer] += 1

    def answer(self, question: str, answer_type: str) -> tuple[str, str]:
        """(answer, where it came from: "question", "answer_type" or "none")."""
        counts = self.by_question.get(question_key(question))
        if counts:
            return counts.most_common(1)[0][0], "question"
        counts = self.by_type.get(answer_type)
        if counts:
            return counts.most_common(1)[0][0], "answer_type"
        return "", "none"


def answer_records(prior: QuestionPrior, gt_records: Sequence[Mapping[str, Any]]) -> list[dict]:
    """One answer per ground-truth record, in its order, as `launch/eval.py` writes them."""
    answers = []
    for record in gt_records:
        question = _turns(record)[0]["value"]
        text, source = prior.answer(question, record.get("answer_type", ""))
        answers.append({
            "question_id": record["id"],
            "prompt": question.replace(IMAGE_PLACEHOLDER, "").strip(),
            "text": text,
            "answer_id": f"{MODEL_NAME}:{record['id']}",
            "model_id": MODEL_NAME,
            "metadata": {"answer_from": source},
        })
    return answers


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m exgra_jax.eval.question_prior",
        description="Image-blind baseline: the most common training answer to the same "
                    "question; prints LLaVA-Med VQA metrics as one JSON object.")
    parser.add_argument("--train", required=True, nargs="+",
                        help="training JSON lists (LLaVA-Med VQA or instruction format)")
    parser.add_argument("--gt", required=True, help="LLaVA-Med VQA test JSON list")
    parser.add_argument("--out", required=True, help="answers to write, JSON lines")
    parser.add_argument("--candidates", "--candidate", dest="candidates",
                        help="open-answer candidates: {\"0\": [...]} or a JSON list")
    args = parser.parse_args(argv)
    try:
        training = [r for path in args.train for r in metrics.read_ground_truth(path)]
        gt_records = metrics.read_ground_truth(args.gt)
        answers = answer_records(QuestionPrior(training), gt_records)
        candidates = metrics.read_candidates(args.candidates) if args.candidates else None
        result = metrics.score(gt_records, answers, candidates)
    except (metrics.ScoringInputError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    with open(args.out, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(a) + "\n" for a in answers)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
