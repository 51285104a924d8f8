"""The chatbot (qa50) evaluation against a fake OpenAI-compatible judge on 127.0.0.1: the
per-type / per-domain table against NumPy, resuming after an interruption without judging
any question twice, malformed replies retried then reported, Retry-After honoured, bounded
concurrency, and the API key sent but never logged."""

import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from eval_fixtures import REPO, shared_demo_data, subprocess_env, tiny_config, write_workdir

from exgra_jax.eval import chatbot
from exgra_jax.eval.answering import id_key
from exgra_jax.eval.judge import JudgeClient, JudgeError, parse_scores

KEY = "sk-test-secret-4711"
DOMAINS = ("chest_xray", "mri", "histology", "gross", "ct_scan")


def _scores(k: int) -> tuple[int, int]:
    """The fake judge's scores for question k: (reference, ours)."""
    return 4 + k % 6, 1 + (7 * k) % 10


def make_questions(n: int, images: list[str]) -> list[dict]:
    questions = []
    for k in range(n):
        domain = {d: False for d in DOMAINS}
        domain[DOMAINS[k % 5]] = True
        if k % 3 == 0:  # several domains marked: the first one in LLaVA-Med's order counts
            domain[DOMAINS[(k + 2) % 5]] = True
        questions.append({
            "question_id": k if k % 2 else f"q{k}", "image": images[k % len(images)],
            "text": f"Question {k}: what does the image show?", "gpt4_answer": f"Reference {k}.",
            "fig_caption": f"Caption {k}.", "fig_label": f"Figure {k}",
            "in_text_mention": f"As Figure {k} shows.",
            "type": "conversation" if k % 4 else "detailed_description", "domain": domain})
    return questions


class FakeJudge:
    """An OpenAI-compatible /v1/chat/completions that scores by question number."""

    def __init__(self, malformed=None, fatal_after=None, throttle_first=False, delay=0.05):
        self.malformed = dict(malformed or {})  # question number -> bad replies still to send
        self.fatal_after = fatal_after  # answer 401 once this many scores were sent
        self.throttle_first = throttle_first
        self.delay = delay
        self.lock = threading.Lock()
        self.scored: list[int] = []  # question numbers given parsable scores
        self.requests: list[tuple[float, int, int]] = []  # (time, question, status)
        self.in_flight = self.max_in_flight = 0
        self.auth: set[str] = set()
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with judge.lock:
                    judge.in_flight += 1
                    judge.max_in_flight = max(judge.max_in_flight, judge.in_flight)
                try:
                    time.sleep(judge.delay)
                    status, headers, reply = judge.respond(body, self.headers)
                finally:
                    with judge.lock:
                        judge.in_flight -= 1
                data = json.dumps(reply).encode()
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def respond(self, body, headers):
        user = body["messages"][1]["content"]
        k = int(re.search(r"\[Question\]\nQuestion (\d+):", user).group(1))
        with self.lock:
            self.auth.add(headers.get("Authorization"))
            if self.throttle_first and not self.requests:
                self.requests.append((time.monotonic(), k, 429))
                return 429, {"Retry-After": "1"}, {"error": {"message": "slow down"}}
            if self.fatal_after is not None and len(self.scored) >= self.fatal_after:
                self.requests.append((time.monotonic(), k, 401))
                return 401, {}, {"error": {"message": "invalid key"}}
            self.requests.append((time.monotonic(), k, 200))
            if self.malformed.get(k, 0) > 0:
                self.malformed[k] -= 1
                text = "Both assistants did well overall."
            else:
                self.scored.append(k)
                ref, ours = _scores(k)
                text = f"{ref} {ours}\nAssistant 1 is more precise than assistant 2."
        return 200, {}, {"id": "x", "object": "chat.completion", "model": body["model"],
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": text}}]}

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def expected_summary(questions) -> dict:
    """LLaVA-Med's summary rules written out with NumPy."""
    rows = []
    for k, q in enumerate(questions):
        domain = next(d for d in DOMAINS if q["domain"][d])
        rows.append((q["type"], domain, *_scores(k)))
    out = {}
    for category in ("conversation", "detailed_description", *DOMAINS, "overall"):
        sel = [r for r in rows if category in (r[0], r[1], "overall")]
        if sel:
            ref = np.array([r[2] for r in sel], float)
            ours = np.array([r[3] for r in sel], float)
            out[category] = {"reference_score": ref.mean(), "answer_score": ours.mean(),
                             "relative_score": (ours / ref).mean() * 100, "count": len(sel)}
    return out


def _assert_summary(summary, questions):
    want = expected_summary(questions)
    assert list(summary) == list(want)
    for category, stats in want.items():
        assert summary[category]["count"] == stats["count"]
        for key in ("reference_score", "answer_score", "relative_score"):
            np.testing.assert_allclose(summary[category][key], stats[key], rtol=1e-12)


def _answers(questions):
    return {id_key(q["question_id"]): f"Our answer {k}." for k, q in enumerate(questions)}


def test_parse_scores():
    assert parse_scores("8 6\nbecause") == (8.0, 6.0)
    assert parse_scores("  7.5 10 \n") == (7.5, 10.0)
    for bad in ("", "8, 6", "Scores: 8 6", "8\n6", "0 5", "11 3", "8 6 4"):
        with pytest.raises(ValueError):
            parse_scores(bad)


def test_interrupted_run_resumes_without_judging_twice(tmp_path, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", KEY)
    questions = make_questions(12, ["a.png"])
    path = str(tmp_path / "answers.judgments.jsonl")
    first = FakeJudge(fatal_after=5)
    try:  # the judge starts refusing after 5 scores: the run stops, what it got is kept
        with pytest.raises(JudgeError, match="HTTP 401"):
            chatbot.judge_answers(questions, _answers(questions),
                                  JudgeClient(first.url, "judge", "JUDGE_KEY"), path,
                                  concurrency=3)
    finally:
        first.close()
    kept = [json.loads(line) for line in open(path)]
    assert len(kept) == len(first.scored) >= 5
    with open(path, "a") as f:  # and the process died in the middle of a line
        f.write('{"question_id": "q')
    second = FakeJudge()
    try:
        judged, failures = chatbot.judge_answers(
            questions, _answers(questions), JudgeClient(second.url, "judge", "JUDGE_KEY"),
            path, concurrency=3)
    finally:
        second.close()
    assert failures == []
    # Every question was scored exactly once over the two runs.
    assert sorted(first.scored + second.scored) == list(range(12))
    records = [json.loads(line) for line in open(path)]
    assert sorted(id_key(r["question_id"]) for r in records) == sorted(_answers(questions))
    _assert_summary(chatbot.summarize(records), questions)
    assert first.auth == second.auth == {f"Bearer {KEY}"}


def test_malformed_reply_retried_then_reported_and_retry_after_honoured(tmp_path, monkeypatch,
                                                                        caplog):
    monkeypatch.setenv("JUDGE_KEY", KEY)
    questions = make_questions(6, ["a.png"])
    # Question 1: one bad reply, then fine. Question 4: always bad (3 attempts).
    judge = FakeJudge(malformed={1: 1, 4: 99}, throttle_first=True)
    path = str(tmp_path / "j.jsonl")
    try:
        with caplog.at_level(logging.INFO, logger="exgra_jax.eval"):
            judged, failures = chatbot.judge_answers(
                questions, _answers(questions),
                JudgeClient(judge.url, "judge", "JUDGE_KEY", backoff_s=0.01), path,
                concurrency=2, parse_attempts=3)
    finally:
        judge.close()
    assert [f["question_id"] for f in failures] == ["q4"]
    assert "not two scores" in failures[0]["error"]
    assert failures[0]["reply"] == "Both assistants did well overall."
    assert sum(1 for _, k, s in judge.requests if k == 4 and s == 200) == 3
    assert sum(1 for _, k, s in judge.requests if k == 1 and s == 200) == 2
    assert sorted(judge.scored) == [0, 1, 2, 3, 5]
    assert len(judged) == 5 and id_key("q4") not in judged
    # The throttled request was retried no sooner than Retry-After said.
    t0, k0, status0 = judge.requests[0]
    assert status0 == 429
    retry = next(t for t, k, s in judge.requests[1:] if k == k0)
    assert retry - t0 >= 0.95
    assert judge.max_in_flight <= 2
    assert KEY not in caplog.text


@pytest.mark.slow
def test_launch_eval_chatbot_end_to_end(tmp_path):
    data = shared_demo_data()
    config = tiny_config(data)
    workdir = str(tmp_path / "run")
    write_workdir(workdir, config, seed=4)
    images = sorted(os.listdir(os.path.join(data, "images")))[:3]
    questions = make_questions(10, images)
    qfile = tmp_path / "qa50.jsonl"
    qfile.write_text("".join(json.dumps(q) + "\n" for q in questions))
    judge = FakeJudge(delay=0.0)
    env = {**subprocess_env(), "MY_JUDGE_KEY": KEY}
    try:
        proc = subprocess.run(
            [sys.executable, "launch/eval.py", f"--workdir={workdir}", "--task=chatbot",
             f"--chatbot_questions={qfile}", f"--chatbot_images={data}/images",
             f"--judge_url={judge.url}", "--judge_model=fake-gpt",
             "--judge_key_env=MY_JUDGE_KEY", "--judge_concurrency=3"],
            capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    finally:
        judge.close()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert KEY not in proc.stdout + proc.stderr
    assert sorted(judge.scored) == list(range(10))
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["complete"] and result["num_judged"] == 10 and result["failures"] == []
    _assert_summary(result["summary"], questions)
    table = proc.stderr.splitlines()  # progress and the table; stdout: the JSON alone
    header = next(i for i, line in enumerate(table) if line.startswith("category"))
    print("\n".join(table[header:header + 1 + len(result["summary"])]))
    overall = next(line for line in table if line.startswith("overall"))
    assert overall.split()[1:] == [f"{result['summary']['overall'][k]:.{p}f}" for k, p in
                                   (("reference_score", 2), ("answer_score", 2),
                                    ("relative_score", 1))] + ["10"]
    # The answers are the model's (one per question, in order); the judge saw them.
    answers = [json.loads(line) for line in
               open(os.path.join(workdir, "eval", "chatbot_step3.jsonl"))]
    assert [a["question_id"] for a in answers] == [q["question_id"] for q in questions]
    judgments = [json.loads(line) for line in
                 open(os.path.join(workdir, "eval", "chatbot_step3.judgments.jsonl"))]
    by_id = {id_key(a["question_id"]): a["text"] for a in answers}
    assert all(j["answer"] == by_id[id_key(j["question_id"])] for j in judgments)
