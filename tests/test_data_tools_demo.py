"""tools/make_demo_data.py: deterministic, valid LLaVA-Med formats, answers match the drawings."""

import filecmp
import importlib.util
import json
import os
import re
import sys

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_tool():
    spec = importlib.util.spec_from_file_location(
        "make_demo_data", os.path.join(ROOT, "tools", "make_demo_data.py")
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


demo = _load_tool()
SIZE = 64
N_IMAGES = 40


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("demo_a"))
    demo.build(out, seed=3, num_images=N_IMAGES, image_size=SIZE, vocab_size=800, verbose=False)
    return out


def _load(out, name):
    with open(os.path.join(out, name), encoding="utf-8") as f:
        return json.load(f)


def _tree(root):
    files = []
    for dirpath, _, names in os.walk(root):
        files += [os.path.relpath(os.path.join(dirpath, n), root) for n in names]
    return sorted(files)


def test_same_seed_same_bytes_other_seed_differs(built, tmp_path):
    again = str(tmp_path / "again")
    demo.build(again, seed=3, num_images=N_IMAGES, image_size=SIZE, vocab_size=800, verbose=False)
    files = _tree(built)
    assert files == _tree(again)
    assert "tokenizer/tokenizer.json" in files
    _, mismatch, errors = filecmp.cmpfiles(built, again, files, shallow=False)
    assert mismatch == [] and errors == []

    other = str(tmp_path / "other")
    demo.build(other, seed=4, num_images=N_IMAGES, image_size=SIZE, tokenizer=False, verbose=False)
    assert not filecmp.cmp(
        os.path.join(built, "findings.json"), os.path.join(other, "findings.json"), shallow=False
    )


def test_llava_med_training_json(built):
    findings = {r["id"]: r for r in _load(built, "findings.json")}
    train_ids = {k for k, r in findings.items() if r["split"] == "train"}
    for name in ("pretrain.json", "instruct.json"):
        records = _load(built, name)
        assert {r["id"] for r in records} == train_ids
        for rec in records:
            assert rec["image"] == rec["id"] + ".png"
            short, long = rec["conversations"], rec["conversations_long"]
            assert len(short) == len(long) >= 2 and len(short) % 2 == 0
            assert [t["from"] for t in short] == ["human", "gpt"] * (len(short) // 2)
            # Same questions, longer answers.
            assert [t["value"] for t in short[::2]] == [t["value"] for t in long[::2]]
            for s, lg in zip(short[1::2], long[1::2]):
                assert len(lg["value"]) > len(s["value"])
            text = json.dumps(short)
            assert text.count("<image>") == 1 and short[0]["value"].startswith("<image>\n")
    # Pre-training captions state the drawn findings.
    for rec in _load(built, "pretrain.json"):
        f = findings[rec["id"]]
        caption = rec["conversations"][1]["value"]
        if f["count"]:
            assert f"{demo.NUMBER_WORDS[f['count']]} {f['size']}" in caption
            assert f["location"] in caption
        else:
            assert "no focal abnormality" in caption


def test_images_are_rgb_pngs_of_the_requested_size(built):
    for rec in _load(built, "findings.json"):
        with Image.open(os.path.join(built, "images", rec["image"])) as im:
            assert im.format == "PNG" and im.mode == "RGB" and im.size == (SIZE, SIZE)


def test_vqa_files_and_candidates(built):
    train, test = _load(built, "vqa/train.json"), _load(built, "vqa/test.json")
    findings = {r["image"]: r for r in _load(built, "findings.json")}
    assert {e["image"] for e in train}.isdisjoint({e["image"] for e in test})
    assert all(findings[e["image"]]["split"] == "test" for e in test)
    types = {e["answer_type"] for e in train + test}
    assert types == {"OPEN", "CLOSED"}
    for e in train + test:
        human, gpt = e["conversations"]
        assert human["from"] == "human" and gpt["from"] == "gpt"
        assert human["value"].startswith("<image>\n")
        if e["answer_type"] == "CLOSED":
            m = re.search(r" \(Answer with either (.+)\)\.$", human["value"])
            assert m, human["value"]
            options = re.findall(r'"([^"]+)"', m.group(1))
            assert gpt["value"].lower() in [o.lower() for o in options]
        else:
            assert "Answer with either" not in human["value"]
    open_answers = []
    for e in train:
        a = e["conversations"][1]["value"].lower()
        if e["answer_type"] == "OPEN" and a not in open_answers:
            open_answers.append(a)
    assert _load(built, "vqa/candidate.json") == {"0": open_answers}


def test_vqa_answers_match_findings(built):
    findings = {r["image"]: r for r in _load(built, "findings.json")}
    checked = 0
    for e in _load(built, "vqa/train.json") + _load(built, "vqa/test.json"):
        f = findings[e["image"]]
        q = e["conversations"][0]["value"].split("\n", 1)[1].split(" (Answer with either")[0]
        a = e["conversations"][1]["value"]
        if q.startswith("How many"):
            assert a == str(f["count"])
        elif q.startswith("Where is"):
            assert a == f["location"] and f["count"] > 0
        elif q.startswith(f"Is there {demo.article(f['noun'])} {f['noun']} in"):
            assert a == ("yes" if f["count"] else "no")
        elif q.startswith("Is there more than one"):
            assert a == ("yes" if f["count"] > 1 else "no")
        elif q.startswith("Which organ"):
            assert a == f["organ"]
        elif q.startswith("What imaging modality"):
            assert a == demo.MODALITY_OPEN_ANSWER[f["modality"]]
        elif "small or large" in q or q.startswith("What is the size"):
            assert a == f["size"]
        elif "left or right side" in q:
            assert a == f["side"]
        elif m := re.fullmatch(r"Is this an? (\S+) image\?", q):
            modality = {"histopathology": "pathology"}.get(m.group(1), m.group(1))
            assert a == ("yes" if f["modality"] == modality else "no")
        elif m := re.fullmatch(r"(?:Does this image show the (\w+)|Is this (\w+) tissue)\?", q):
            assert a == ("yes" if f["organ"] in m.groups() else "no")
        elif m := re.fullmatch(r"Is the .+ in the (left|right) \w+\?", q):
            assert f["location"] and a == ("yes" if f["side"] == m.group(1) else "no")
        elif " or " in q:  # a choice between the image's modality (organ) and another
            assert a in (demo.MODALITY_OPEN_ANSWER[f["modality"]], f["organ"]), q
        else:
            continue
        checked += 1
    assert checked > N_IMAGES  # most questions are of the kinds above


def test_drawn_lesions_match_findings(built):
    """Re-draw each scan without its lesions: the difference must show exactly `count` blobs,
    on the recorded side (patient's right = image left), larger for 'large' than 'small'."""
    records = _load(built, "findings.json")
    areas = {"small": [], "large": []}
    with_findings = 0
    for index, rec in enumerate(records):
        pixels = np.asarray(Image.open(os.path.join(built, "images", rec["image"])))
        f = demo.Findings(rec["id"], rec["split"], rec["modality"], rec["organ"])
        f.lesions = [demo.Lesion(**les) for les in rec["lesions"]]
        _, anat, tex, noise, _ = demo.image_seeds(3, index)
        # The recorded (rounded) findings redraw the stored image exactly, up to rounding.
        redrawn = demo.render(f, SIZE, (anat, tex, noise))
        assert np.abs(redrawn.astype(int) - pixels).max() <= 1
        clean = demo.render(f, SIZE, (anat, tex, noise), draw_lesions=False)
        diff = np.abs(pixels.astype(int) - clean.astype(int)).max(axis=-1)
        blobs, n = ndimage.label(diff > 10)
        assert n == rec["count"], rec
        if not n:
            assert diff.max() <= 1
            continue
        with_findings += 1
        for k in range(1, n + 1):
            _, cx = ndimage.center_of_mass(blobs == k)
            if rec["side"] == "right":
                assert cx < SIZE / 2
            elif rec["side"] == "left":
                assert cx > SIZE / 2
            areas[rec["size"]].append(int((blobs == k).sum()))
    assert with_findings >= N_IMAGES // 4
    assert areas["small"] and areas["large"]
    assert max(areas["small"]) < min(areas["large"])


def _question(record):
    return record["conversations"][0]["value"]


def test_each_question_gets_each_of_its_answers_equally_often(built):
    """The image-blind prior (most common training answer per question) is at chance."""
    for split in ("train", "test"):
        answers = {}
        for e in _load(built, f"vqa/{split}.json"):
            answers.setdefault(_question(e), []).append(e["conversations"][1]["value"])
        assert len(answers) > 10
        for question, given in answers.items():
            counts = {a: given.count(a) for a in given}
            assert len(counts) >= 2 and len(set(counts.values())) == 1, (question, counts)
    # Every kind of question survives the balancing at this size, open and closed.
    questions = {_question(e) for e in _load(built, "vqa/train.json")}
    for start in ("Is there a", "Is this a", "Does this image show", "Which organ",
                  "What imaging modality", "How many", "Is the", "Where is", "What is the size"):
        assert any(q.split("\n", 1)[1].startswith(start) for q in questions), start


def test_balance_by_question_rules():
    def item(k, question, answer):
        return demo.VQAItem(f"q{k}", "x.png", question, answer, "CLOSED")

    items = [item(0, "A?", "yes"), item(1, "B?", "no"), item(2, "A?", "yes"),
             item(3, "A?", "no"), item(4, "C?", "1"), item(5, "A?", "yes"),
             item(6, "C?", "2"), item(7, "C?", "3"), item(8, "C?", "1"), item(9, "C?", "2")]
    kept = demo.balance_by_question(items, np.random.default_rng(0), max_per_answer=5)
    ids = [it.qid for it in kept]
    assert ids == sorted(ids, key=lambda q: int(q[1:]))  # original order
    by = {}
    for it in kept:
        by.setdefault(it.question, []).append(it.answer)
    # A?: yes 3, no 1 -> one of each; B?: one answer only -> dropped; C?: 1, 2, 3 once each.
    assert sorted(by["A?"]) == ["no", "yes"] and "q3" in ids
    assert "B?" not in by
    assert sorted(by["C?"]) == ["1", "2", "3"] and "q7" in ids
    capped = demo.balance_by_question(items, np.random.default_rng(0), max_per_answer=1)
    assert len(capped) == len(kept)
    # Nothing to balance (every text has one answer): everything is kept, not nothing.
    single = [items[1], items[4]]
    assert demo.balance_by_question(single, np.random.default_rng(0), 5) == single


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="image-size"):
        demo.build("/nonexistent", image_size=15, tokenizer=False, verbose=False)
    with pytest.raises(ValueError, match="num-images"):
        demo.build("/nonexistent", num_images=1, tokenizer=False, verbose=False)


def test_tokenizer_loads_and_round_trips(built):
    from exgra_jax.data.conversation import get_template
    from exgra_jax.data.tokenizer import load_tokenizer, special_token_ids

    tok = load_tokenizer(os.path.join(built, "tokenizer"))
    ids = special_token_ids(tok)
    # Trained on the templated text: the system prompt is one piece per word, and a closed
    # question with its options and role tags costs a few tokens per word too.
    header = get_template("llava_v0").header
    assert len(tok(header, add_special_tokens=False)["input_ids"]) <= len(header.split()) + 4
    prompt = get_template("llava_v0").chat_prompt([(_question(_load(built, "vqa/test.json")[0]),
                                                    None)])
    assert len(tok(prompt, add_special_tokens=False)["input_ids"]) < len(prompt) / 3
    assert len({ids["pad"], ids["image_patch"], ids["im_start"], ids["im_end"]}) == 4
    caption = _load(built, "pretrain.json")[0]["conversations_long"][1]["value"]
    encoded = tok(caption, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in encoded
    # A tokenizer trained on this text needs far fewer tokens than characters.
    assert len(encoded) < len(caption) / 3
    assert tok.decode(encoded) == caption


def test_demo_folder_builds_as_llava_med_tfds(built, tmp_path):
    from exgra_jax.data.tfds import prepare

    builder = prepare.build("llava_med", built, str(tmp_path / "tfds"))  # findings.json ignored
    splits = {k: v.num_examples for k, v in builder.info.splits.items()}
    assert splits == {"pretrain": len(_load(built, "pretrain.json")),
                      "instruct": len(_load(built, "instruct.json"))}
