"""The VQA runner: answers file format, batching vs one-at-a-time generation, resuming,
scoring, checkpoint loading, and launch/eval.py end to end."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from eval_fixtures import (
    REPO,
    STEP,
    shared_demo_data,
    subprocess_env,
    tiny_config,
    write_workdir,
)

from exgra_jax.checkpoint import CheckpointMismatchError
from exgra_jax.data.conversation import ConversationTokenizer
from exgra_jax.data.image import ImageConfig, ImagePreprocessor
from exgra_jax.eval import metrics
from exgra_jax.eval.answering import AnswersFileError, answered_records, id_key, read_answers
from exgra_jax.eval.checkpoint_loading import load_for_eval
from exgra_jax.eval.vqa import metrics_path, read_vqa, run_vqa
from exgra_jax.inference.generate import GenerationConfig, generate


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("vqa")
    data = shared_demo_data()
    config = tiny_config(data)
    workdir = str(root / "run")
    write_workdir(workdir, config)
    model = load_for_eval(config, workdir=workdir)
    return dict(root=root, data=data, config=config, workdir=workdir, model=model)


# ------------------------------------------------------------------------ answers files
def test_read_answers_drops_only_an_interrupted_last_line(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"question_id": 1, "text": "a"}\n{"question_id": 2, "te')
    assert [r["question_id"] for r in read_answers(str(path))] == [1]
    path.write_text('{"question_id": 1}\n{broken\n{"question_id": 2}\n')
    with pytest.raises(AnswersFileError, match="line 2"):
        read_answers(str(path))
    path.write_text('{"text": "no id"}\n')
    with pytest.raises(AnswersFileError, match="no question_id"):
        read_answers(str(path))


def test_answered_records_rejects_foreign_and_conflicting_ids(tmp_path):
    out = tmp_path / "a.jsonl"
    out.write_text('{"question_id": "q1", "text": "x"}\n')
    keys = {id_key("q1"), id_key("q2")}
    assert list(answered_records(str(out), keys)) == [id_key("q1")]
    # The int 1 is not the string "1": scoring pairs ids by JSON value.
    out.write_text('{"question_id": 1, "text": "x"}\n')
    with pytest.raises(AnswersFileError, match="not in the question set"):
        answered_records(str(out), {id_key("1")})
    out.write_text('{"question_id": "q1", "text": "x"}\n{"question_id": "q1", "text": "y"}\n')
    with pytest.raises(AnswersFileError, match="two different answers"):
        answered_records(str(out), keys)


def test_read_vqa_keeps_image_names_and_checks_records(tmp_path, setup):
    records, questions = read_vqa([os.path.join(setup["data"], "vqa", "test.json")])
    assert [q.id for q in questions] == [r["id"] for r in records]
    assert [q.image for q in questions] == [r["image"] for r in records]
    assert all("<image>" not in q.text for q in questions)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"id": "x", "answer_type": "open", "conversations": [
        {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}]))
    with pytest.raises(metrics.ScoringInputError, match="answer_type"):
        read_vqa([str(bad)])


def test_bad_images_are_skipped_listed_and_left_out_of_the_scores(setup, tmp_path):
    """A truncated JPEG, an empty file, a missing file and a path escaping the image folder:
    each is a skipped question (in the answers file and the metrics); the rest is answered
    and scored as if the four were not in the test set."""
    import shutil

    from PIL import Image

    gt = metrics.read_ground_truth(os.path.join(setup["data"], "vqa", "test.json"))[:8]
    folder = tmp_path / "images"
    shutil.copytree(os.path.join(setup["data"], "images"), folder)
    outside = tmp_path / "outside.png"
    Image.new("RGB", (8, 8)).save(outside)
    jpeg = folder / "truncated.jpg"
    Image.new("RGB", (64, 64), (200, 10, 10)).save(jpeg)
    jpeg.write_bytes(jpeg.read_bytes()[:200])
    (folder / "empty.png").write_bytes(b"")
    broken = {0: "truncated.jpg", 2: "empty.png", 4: "no_such_file.png", 6: "../outside.png"}
    for i, name in broken.items():
        gt[i] = {**gt[i], "image": name}
    test_json = tmp_path / "test.json"
    test_json.write_text(json.dumps(gt))
    config = setup["config"].copy_and_resolve_references()
    config.eval.json_paths = (str(test_json),)
    config.eval.image_folder = str(folder)
    out = str(tmp_path / "answers.jsonl")
    result = run_vqa(config, setup["model"], out, log=lambda s: None)

    answers = read_answers(out)
    assert [a["question_id"] for a in answers] == [r["id"] for r in gt]
    skipped = {a["question_id"]: a["skipped"] for a in answers if "skipped" in a}
    assert sorted(skipped) == sorted(gt[i]["id"] for i in broken)
    assert all(a["text"] for a in answers if "skipped" not in a)
    assert result["num_skipped"] == 4 and result["num_questions"] == 8
    assert sorted(s["question_id"] for s in result["skipped"]) == sorted(skipped)
    kept = [i for i in range(8) if i not in broken]
    expected = metrics.score([gt[i] for i in kept], [answers[i] for i in kept],
                             metrics.read_candidates(config.eval.candidates))
    assert {k: result[k] for k in expected} == expected


# ------------------------------------------------------------------------ checkpoints
def test_checkpoint_loading_checks_the_config_and_the_step(setup):
    wrong = tiny_config(setup["data"], hidden_size=32)
    with pytest.raises(CheckpointMismatchError, match="hidden_size"):
        load_for_eval(wrong, workdir=setup["workdir"])
    with pytest.raises(FileNotFoundError, match=r"step 7 .*\[3\]"):
        load_for_eval(setup["config"], workdir=setup["workdir"], step=7)
    assert setup["model"].step == STEP


# ------------------------------------------------------------------------ the runner
def _one_at_a_time(setup, questions):
    """Reference answers: each question alone, unpadded, on one device, no bucketing."""
    model, config = setup["model"], setup["config"]
    tok = model.tokenizer
    conv = ConversationTokenizer(tok, config.data.template, model.config.num_image_tokens,
                                 config.data.mm_use_im_start_end)
    pre = ImagePreprocessor(ImageConfig(model.config.image_size, config.data.image_aspect),
                            config.eval.image_folder)
    gen = GenerationConfig(max_new_tokens=config.eval.max_new_tokens,
                           eos_token_ids=(tok.eos_token_id,), pad_token_id=conv.ids["pad"],
                           stop_strings=("###",))
    params = jax.device_get(model.params)  # host copies: no mesh, no sharding
    texts = []
    for q in questions:
        ids = conv.prompt_ids(q.text, True, config.eval.image_first)[None]
        out = generate(model.config, params, ids, np.ones_like(ids), pre(q.image)[None],
                       config=gen, tokenizer=tok)
        texts.append(out.texts[0].strip())
    return texts


def test_runner_batches_resumes_and_scores(setup, tmp_path):
    config, model = setup["config"], setup["model"]
    gt_path = os.path.join(setup["data"], "vqa", "test.json")
    gt = metrics.read_ground_truth(gt_path)
    out = str(tmp_path / "answers.jsonl")

    # Interrupted: 5 of 10 answered, then a crash in the middle of writing a line.
    assert run_vqa(config, model, out, limit=5, log=lambda s: None) is None
    first = read_answers(out)
    assert [r["question_id"] for r in first] == [r["id"] for r in gt[:5]]
    with open(out, "a") as f:
        f.write('{"question_id": "' + gt[5]["id"] + '", "prompt": "cut off')
    result = run_vqa(config, model, out, log=lambda s: None)
    answers = metrics.read_predictions(out)
    assert [a["question_id"] for a in answers] == [r["id"] for r in gt]  # once each, in order
    assert answers[:5] == first
    for a, r in zip(answers, gt, strict=True):
        assert set(a) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
        question = r["conversations"][0]["value"].replace("<image>", "").strip()
        assert a["prompt"] == question + "\n<image>"
        assert a["model_id"] == model.name and "###" not in a["text"]

    # An uninterrupted run writes the same bytes.
    clean = str(tmp_path / "clean.jsonl")
    clean_result = run_vqa(config, model, clean, log=lambda s: None)
    assert clean_result == {**result, "answers": clean}
    assert open(clean).read() == open(out).read()

    # The scores are saved next to the answers.
    assert result["num_open"] + result["num_closed"] == len(gt) == result["num_questions"]
    assert json.load(open(metrics_path(out))) == result

    # Rerunning a finished file answers nothing new and reports the same scores.
    assert run_vqa(config, model, out, log=lambda s: None) == result
    assert open(out).read() == open(clean).read()

    # A finished file is scored as it stands, not answered again: with texts set by hand
    # (the true answer for even positions, a word no answer contains for odd ones), the
    # scores are what LLaVA-Med's rules give by construction.
    kinds = [r["answer_type"] for r in gt]
    edited = [dict(a, text=r["conversations"][1]["value"] if i % 2 == 0 else "zzzz")
              for i, (a, r) in enumerate(zip(answers, gt, strict=True))]
    with open(out, "w") as f:
        f.writelines(json.dumps(a) + "\n" for a in edited)
    written = open(out).read()
    rescored = run_vqa(config, model, out, log=lambda s: None)
    assert open(out).read() == written

    def hit_rate(kind):  # percent of the questions of that kind answered correctly
        return 100 * np.mean([i % 2 == 0 for i, k in enumerate(kinds) if k == kind])

    assert (rescored["num_closed"], rescored["num_open"]) == (kinds.count("CLOSED"),
                                                             kinds.count("OPEN"))
    assert 0 < hit_rate("CLOSED") < 100 and 0 < hit_rate("OPEN") < 100
    # Closed: the answer is a substring of the text. Open: answer words found in the text.
    assert rescored["closed_accuracy"] == pytest.approx(hit_rate("CLOSED"))
    for key in ("open_recall", "recall", "precision", "f1"):
        assert rescored[key] == pytest.approx(hit_rate("OPEN")), key
    assert rescored["open_accuracy"] is not None  # the config's candidates were read


@pytest.mark.slow
def test_batched_answers_equal_one_at_a_time_generation(setup, tmp_path):
    """Left padding, bucketing, batch filling and sharding do not change any answer."""
    gt_path = os.path.join(setup["data"], "vqa", "test.json")
    out = str(tmp_path / "answers.jsonl")
    run_vqa(setup["config"], setup["model"], out, log=lambda s: None)
    _, questions = read_vqa([gt_path])
    texts = [a["text"] for a in metrics.read_predictions(out)]
    # Each distinct prompt length compiles once in the reference: the first 3 suffice.
    assert texts[:3] == _one_at_a_time(setup, questions[:3])
    assert len(set(texts)) > 1  # the random model does not answer everything alike


# ------------------------------------------------------------------------ launch/eval.py
@pytest.mark.slow
def test_launch_eval_cli_resumes_and_prints_metrics(setup, tmp_path):
    out = str(tmp_path / "cli.jsonl")
    cmd = [sys.executable, os.path.join(REPO, "launch", "eval.py"),
           f"--workdir={setup['workdir']}", "--task=vqa", f"--out={out}"]
    # No --config: the workdir's config.json is used, as after training.
    first = subprocess.run(cmd + ["--limit=3"], capture_output=True, text=True,
                           env=subprocess_env(), cwd=REPO, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    assert len(read_answers(out)) == 3
    assert not first.stdout.strip()  # no metrics while answers are missing (progress: stderr)
    second = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(),
                            cwd=REPO, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    printed = json.loads(second.stdout.strip().splitlines()[-1])
    gt = metrics.read_ground_truth(os.path.join(setup["data"], "vqa", "test.json"))
    answers = metrics.read_predictions(out)
    assert [a["question_id"] for a in answers] == [r["id"] for r in gt]
    # Same answers and scores as the in-process runner on the same checkpoint.
    ref = str(tmp_path / "ref.jsonl")
    in_process = run_vqa(setup["config"], setup["model"], ref, log=lambda s: None)
    scores = [k for k, v in in_process.items() if isinstance(v, float)]
    assert "closed_accuracy" in scores and "open_accuracy" in scores
    assert {k: printed[k] for k in scores} == pytest.approx({k: in_process[k] for k in scores})
    strip = [{k: v for k, v in a.items() if k not in ("answer_id", "model_id")}
             for a in metrics.read_predictions(ref)]
    assert strip == [{k: v for k, v in a.items() if k not in ("answer_id", "model_id")}
                     for a in answers]
