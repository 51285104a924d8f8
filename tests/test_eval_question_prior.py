"""The image-blind question-prior baseline: its answers against the rules, on a hand-made set."""

import json
import subprocess
import sys
from pathlib import Path

from exgra_jax.eval import metrics
from exgra_jax.eval.question_prior import QuestionPrior, answer_records

REPO_ROOT = Path(__file__).resolve().parents[1]


def vqa(qid, answer_type, question, answer):
    return {"id": qid, "image": f"{qid}.png", "answer_type": answer_type,
            "conversations": [{"from": "human", "value": question},
                              {"from": "gpt", "value": answer}]}


TRAIN = [
    vqa("t1", "CLOSED", "<image>\nIs there a nodule?", "no"),
    # Same question: <image>, case and spacing do not matter.
    vqa("t2", "CLOSED", "is there  a NODULE?", "yes"),
    vqa("t3", "CLOSED", "Is there a nodule?\n<image>", "no"),
    vqa("t4", "OPEN", "<image>\nWhich organ is shown?", "liver"),
    vqa("t5", "OPEN", "<image>\nWhich organ is shown?", "brain"),
    vqa("t6", "OPEN", "<image>\nHow many nodules?", "2"),
    vqa("t7", "OPEN", "<image>\nHow many nodules?", "2"),
    # Instruction data: no answer_type, several questions, the last one unanswered.
    {"id": "t8", "image": "t8.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat kind of image is this?"},
        {"from": "gpt", "value": "A CT."},
        {"from": "human", "value": "How big is it?"},
        {"from": "gpt", "value": "Small."},
        {"from": "human", "value": "Is it red?"},
    ]},
]

# (question, answer_type, expected prediction, where it comes from), by the module's rules:
TEST = [
    ("<image>\nIs there a nodule?", "CLOSED", "no", "question"),  # no 2, yes 1
    ("Which organ is SHOWN?  <image>", "OPEN", "liver", "question"),  # 1-1 tie: first seen
    ("<image>\nHow big is it?", "OPEN", "Small.", "question"),  # an instruction turn
    ("<image>\nIs this a CT scan?", "CLOSED", "no", "answer_type"),  # closed: no 2, yes 1
    ("<image>\nWhat is the size?", "OPEN", "2", "answer_type"),  # open: 2 twice, others once
    ("<image>\nIs it red?", "OPEN", "2", "answer_type"),  # asked, never answered
]
GT = [vqa(f"q{i}", answer_type, question, "liver" if i % 2 else "no")
      for i, (question, answer_type, _, _) in enumerate(TEST)]


def test_answers_follow_the_rules():
    answers = answer_records(QuestionPrior(TRAIN), GT)
    assert [a["question_id"] for a in answers] == [r["id"] for r in GT]
    assert [a["text"] for a in answers] == [expected for _, _, expected, _ in TEST]
    assert [a["metadata"]["answer_from"] for a in answers] == [source for *_, source in TEST]
    assert answers[1]["prompt"] == "Which organ is SHOWN?"


def test_no_training_question_of_the_type_gives_an_empty_answer():
    prior = QuestionPrior([r for r in TRAIN if r.get("answer_type") != "OPEN"])
    assert prior.answer("What is the size?", "OPEN") == ("", "none")
    assert prior.answer("Is this a CT scan?", "CLOSED") == ("no", "answer_type")


def test_cli_writes_answers_and_prints_the_scorer_metrics(tmp_path):
    paths = {}
    for name, content in (("train", TRAIN[:4]), ("more", TRAIN[4:]), ("gt", GT),
                          ("candidates", {"0": ["liver", "brain", "2", "small"]})):
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(content))
    out = tmp_path / "answers.jsonl"
    run = subprocess.run(
        [sys.executable, "-m", "exgra_jax.eval.question_prior", "--train", str(paths["train"]),
         str(paths["more"]), "--gt", str(paths["gt"]), "--out", str(out),
         "--candidates", str(paths["candidates"])],
        cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    printed = json.loads(run.stdout)
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [a["text"] for a in written] == [expected for _, _, expected, _ in TEST]
    expected = [{"question_id": r["id"], "text": t} for r, (_, _, t, _) in zip(GT, TEST)]
    assert printed == metrics.score(GT, expected, ["liver", "brain", "2", "small"])
    # Same keys as `python -m exgra_jax.eval.metrics` prints for the same files.
    scorer = subprocess.run(
        [sys.executable, "-m", "exgra_jax.eval.metrics", "--gt", str(paths["gt"]),
         "--pred", str(out), "--candidates", str(paths["candidates"])],
        cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert json.loads(scorer.stdout) == printed


def test_cli_names_a_missing_file(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "exgra_jax.eval.question_prior", "--train",
         str(tmp_path / "nope.json"), "--gt", str(tmp_path / "gt.json"),
         "--out", str(tmp_path / "a.jsonl")],
        cwd=REPO_ROOT, capture_output=True, text=True)
    assert run.returncode == 1 and "nope.json" in run.stderr
