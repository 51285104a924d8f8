"""The zero-shot (OmniMedVQA multiple-choice) runner: reading, prompts, answers file,
resuming and per-data-set accuracy."""

import json
import os

import pytest
from eval_fixtures import shared_demo_data, tiny_config, write_workdir

from exgra_jax.eval import zero_shot_scoring as zs
from exgra_jax.eval.answering import read_answers
from exgra_jax.eval.checkpoint_loading import load_for_eval
from exgra_jax.eval.vqa import metrics_path
from exgra_jax.eval.zero_shot import read_zero_shot, run_zero_shot


def _omni_records(images):
    """Six OmniMedVQA-style questions over two source data sets; C/D sometimes absent."""
    out = []
    for i, image in enumerate(images[:6]):
        record = {
            "question_id": f"omni_{i}" if i % 2 else i,  # ids may be strings or integers
            "question": "What modality is shown?",
            "option_A": "CT", "option_B": "MRI",
            "gt_answer": ["CT", "MRI", "X-ray"][i % 3],
            "image_path": os.path.join("images", image),
            "dataset": "SetA" if i < 4 else "SetB",
            "question_type": "Modality Recognition",
        }
        if i % 3 != 1:
            record["option_C"] = "X-ray"
        if i == 0:
            record["option_D"] = "Ultrasound"
        out.append(record)
    return out


@pytest.fixture(scope="module")
def omni(tmp_path_factory):
    root = tmp_path_factory.mktemp("zs")
    data = shared_demo_data()
    images = sorted(os.listdir(os.path.join(data, "images")))
    path = root / "omni.json"
    path.write_text(json.dumps(_omni_records(images)))
    config = tiny_config(data)
    config.eval.json_paths = (str(path),)
    config.eval.image_folder = data  # OmniMedVQA image paths are relative to its root
    return dict(root=root, data=data, config=config, path=str(path))


def test_read_zero_shot_builds_the_original_prompt_and_checks_records(omni, tmp_path):
    records, questions = read_zero_shot([omni["path"]])
    assert [q.id for q in questions] == [r["question_id"] for r in records]
    assert questions[0].text == (
        "What modality is shown?Here are 4 candidate answers:['CT', 'MRI', 'X-ray', "
        "'Ultrasound'] Only return what you think is the correct answer from the candidate "
        "answers, do not return any other irrelevant text!")
    assert "Here are 2 candidate answers:['CT', 'MRI']" in questions[1].text
    assert [q.image for q in questions] == [r["image_path"] for r in records]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"question": "q"}]))
    with pytest.raises(zs.ZeroShotInputError, match="question_id"):
        read_zero_shot([str(bad)])
    with pytest.raises(ValueError, match="json_paths"):
        read_zero_shot([])


@pytest.mark.slow
def test_zero_shot_runner_end_to_end_resumes_and_scores(omni, tmp_path):
    config = omni["config"]
    workdir = str(tmp_path / "run")
    write_workdir(workdir, config, seed=1)
    model = load_for_eval(config, workdir=workdir)
    out = str(tmp_path / "zs.jsonl")
    assert run_zero_shot(config, model, out, limit=2, log=lambda s: None) is None
    partial = read_answers(out)
    assert len(partial) == 2
    result = run_zero_shot(config, model, out, log=lambda s: None)
    answers = read_answers(out)
    records = json.load(open(omni["path"]))
    assert [a["question_id"] for a in answers] == [r["question_id"] for r in records]
    assert answers[:2] == partial
    for a, r in zip(answers, records, strict=True):
        assert {k: a[k] for k in r} == r  # the question record, unchanged
        assert isinstance(a["model_pred"], str) and "###" not in a["model_pred"]
        assert a["prompt"] == zs.build_prompt(r) + "\n<image>"

    # Accuracy recomputed by hand from the difflib mapping.
    per_set: dict = {}
    for a in answers:
        options = zs.candidate_options(a)
        pick = zs.match_option(a["model_pred"], options)
        hit = pick is not None and options[pick] == a["gt_answer"]
        per_set.setdefault(a["dataset"], []).append(hit)
    for name, hits in per_set.items():
        assert result["per_dataset"][name]["accuracy"] == pytest.approx(
            100 * sum(hits) / len(hits))
    all_hits = [h for hits in per_set.values() for h in hits]
    assert result["overall"]["accuracy"] == pytest.approx(100 * sum(all_hits) / len(all_hits))
    assert result["overall"]["total"] == 6
    assert json.load(open(metrics_path(out))) == result

    clean = str(tmp_path / "clean.jsonl")
    run_zero_shot(config, model, clean, log=lambda s: None)
    assert open(clean).read() == open(out).read()
