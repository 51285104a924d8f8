"""Tokenizer, conversation templates, exact label masking, truncation, answer sequences."""

import numpy as np
import pytest
from test_data_fixtures import make_tokenizer
from transformers import AutoTokenizer

from exgra_jax.data.conversation import (
    IGNORE_INDEX,
    ConversationError,
    ConversationTokenizer,
    normalize_turns,
)
from exgra_jax.data.tokenizer import load_tokenizer

N_IMG = 5
IMG = "<im_start>" + "<im_patch>" * N_IMG + "<im_end>"
LLAVA_SYS = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
VICUNA_SYS = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
CONV = [
    {"from": "human", "value": "<image>\nWhat is shown?"},
    {"from": "gpt", "value": "A chest x-ray with a nodule."},
    {"from": "human", "value": "Which side?"},
    {"from": "gpt", "value": "Left lung.\nSmall."},
]

# Hand-written renderings of CONV: (full text, the target pieces in order).
EXPECTED = {
    "llava_v0": (
        f"{LLAVA_SYS}\n\n### Human: {IMG}\nWhat is shown?\n### Assistant: A chest x-ray with a "
        "nodule.\n### Human: Which side?\n### Assistant: Left lung.\nSmall.\n### ",
        [" A chest x-ray with a nodule.\n###", " Left lung.\nSmall.\n###"],
    ),
    "vicuna_v1": (
        f"{VICUNA_SYS} USER: {IMG}\nWhat is shown? ASSISTANT: A chest x-ray with a nodule.</s>"
        "USER: Which side? ASSISTANT: Left lung.\nSmall.</s>",
        [" A chest x-ray with a nodule.</s>", " Left lung.\nSmall.</s>"],
    ),
    "simple": (
        f"{LLAVA_SYS}###Human: Hi!###Assistant: Hi there! How can I help you today?###"
        f"Human: {IMG}\nWhat is shown?###Assistant: A chest x-ray with a nodule.###"
        "Human: Which side?###Assistant: Left lung.\nSmall.###",
        [" A chest x-ray with a nodule.###", " Left lung.\nSmall.###"],
    ),
}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(str(tmp_path_factory.mktemp("tok")))


def _hf_ids(tok, text):
    return tok(text).input_ids


def _expected_labels(tok, text, targets):
    """Reference labels: token spans of each target found by tokenizing prefixes with HF."""
    ids = _hf_ids(tok, text)
    labels = [IGNORE_INDEX] * len(ids)
    pos = 0
    for target in targets:
        start = text.index(target, pos)
        before = len(_hf_ids(tok, text[:start]))
        after = len(_hf_ids(tok, text[: start + len(target)]))
        assert _hf_ids(tok, text[: start + len(target)]) == ids[:after]  # a true prefix
        labels[before:after] = ids[before:after]
        pos = start + len(target)
    return ids, labels


# ------------------------------------------------------------------------------------------
# Tokenizer


def test_trained_tokenizer_is_llama_style(tok, tmp_path):
    raw = AutoTokenizer.from_pretrained(str(tmp_path.parent / "tok0" / "tokenizer"))
    assert (raw.unk_token_id, raw.bos_token_id, raw.eos_token_id) == (0, 1, 2)
    assert raw.convert_ids_to_tokens([3, 3 + 0x0A, 258]) == ["<0x00>", "<0x0A>", "<0xFF>"]
    n = len(raw)
    assert raw.pad_token is None
    # The four LLaVA-Med tokens follow the base vocabulary, in LLaVA-Med's order.
    assert tok.convert_tokens_to_ids(["[PAD]", "<im_patch>", "<im_start>", "<im_end>"]) == [
        n, n + 1, n + 2, n + 3,
    ]
    assert tok.pad_token == "[PAD]" and len(tok) == n + 4
    # BOS only; unseen characters go through byte fallback and round-trip exactly.
    text = "Nodule ñ 肺 in the left lung"
    ids = tok(text).input_ids
    assert ids[0] == 1 and ids[-1] != 2
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert "<0xC3>" in tok.convert_ids_to_tokens(ids)
    assert tok.convert_ids_to_tokens(tok("a\nb").input_ids).count("<0x0A>") == 1
    # Loading again adds nothing twice.
    again = load_tokenizer(str(tmp_path.parent / "tok0" / "tokenizer"))
    assert len(again) == len(tok)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_tokenizer(str(tmp_path / "missing"))


# ------------------------------------------------------------------------------------------
# Label masking, token by token


@pytest.mark.parametrize("template", ["llava_v0", "vicuna_v1", "simple"])
def test_label_masking_matches_hand_written_conversation(tok, template):
    text, targets = EXPECTED[template]
    ref_ids, ref_labels = _expected_labels(tok, text, targets)
    ct = ConversationTokenizer(tok, template, num_image_tokens=N_IMG, use_im_start_end=True)
    max_len = len(ref_ids) + 7
    ex = ct.tokenize_conversation(CONV, has_image=True, max_len=max_len)
    assert ex.num_tokens == len(ref_ids) and not ex.truncated
    np.testing.assert_array_equal(ex.input_ids[: len(ref_ids)], ref_ids)
    np.testing.assert_array_equal(ex.labels[: len(ref_ids)], ref_labels)
    pad = tok.pad_token_id
    assert (ex.input_ids[len(ref_ids) :] == pad).all()
    assert (ex.labels[len(ref_ids) :] == IGNORE_INDEX).all()
    np.testing.assert_array_equal(ex.attention_mask, np.arange(max_len) < len(ref_ids))
    # The supervised tokens decode to exactly the answers and their separators.
    supervised = tok.decode([i for i in ex.labels if i != IGNORE_INDEX])
    assert supervised.replace(" ", "") == "".join(targets).replace(" ", "")
    # Human turns, the system prompt and the image never carry labels.
    image_ids = tok.convert_tokens_to_ids(["<im_patch>", "<im_start>", "<im_end>"])
    assert not np.isin(ex.labels, image_ids).any()


def test_image_tokens_without_start_end(tok):
    ct = ConversationTokenizer(tok, "llava_v0", num_image_tokens=7, use_im_start_end=False)
    ex = ct.tokenize_conversation(CONV, has_image=True, max_len=200)
    patch = tok.convert_tokens_to_ids("<im_patch>")
    where = np.flatnonzero(ex.input_ids == patch)
    assert len(where) == 7 and (np.diff(where) == 1).all()
    assert tok.convert_tokens_to_ids("<im_start>") not in ex.input_ids


def test_image_placeholder_handling(tok):
    ct = ConversationTokenizer(tok, "llava_v0", num_image_tokens=N_IMG)
    patch = tok.convert_tokens_to_ids("<im_patch>")
    # No image: the placeholder is removed, no image tokens.
    ex = ct.tokenize_conversation(CONV, has_image=False, max_len=200)
    assert (ex.input_ids == patch).sum() == 0
    # Image but no placeholder: one image block is put first in the first question.
    conv = [{"from": "human", "value": "Describe."}, {"from": "gpt", "value": "A scan."}]
    ex = ct.tokenize_conversation(conv, has_image=True, max_len=200)
    assert (ex.input_ids == patch).sum() == N_IMG
    # Two placeholders: still exactly one image block.
    conv = [{"from": "human", "value": "<image> and <image>"}, {"from": "gpt", "value": "x"}]
    ex = ct.tokenize_conversation(conv, has_image=True, max_len=200)
    assert (ex.input_ids == patch).sum() == N_IMG


# ------------------------------------------------------------------------------------------
# Truncation


def _image_block_ok(tok, ids, n):
    start = np.flatnonzero(ids == tok.convert_tokens_to_ids("<im_start>"))
    end = np.flatnonzero(ids == tok.convert_tokens_to_ids("<im_end>"))
    patch = np.flatnonzero(ids == tok.convert_tokens_to_ids("<im_patch>"))
    return len(start) == 1 and len(end) == 1 and len(patch) == n and end[0] - start[0] == n + 1


def test_truncation_cuts_the_end_not_the_image(tok):
    ct = ConversationTokenizer(tok, "llava_v0", num_image_tokens=N_IMG)
    full = ct.tokenize_conversation(CONV, has_image=True, max_len=300)
    short = ct.tokenize_conversation(CONV, has_image=True, max_len=full.num_tokens - 6)
    assert short.truncated and short.num_tokens == full.num_tokens - 6
    np.testing.assert_array_equal(short.input_ids, full.input_ids[: full.num_tokens - 6])
    np.testing.assert_array_equal(short.labels, full.labels[: full.num_tokens - 6])
    assert _image_block_ok(tok, short.input_ids, N_IMG)


def test_truncation_keeps_image_after_long_question(tok):
    question = "what organ is shown in this scan " * 30 + "<image>"
    conv = [{"from": "human", "value": question}, {"from": "gpt", "value": "The liver."}]
    ct = ConversationTokenizer(tok, "llava_v0", num_image_tokens=N_IMG)
    full = ct.tokenize_conversation(conv, has_image=True, max_len=1000)
    max_len = ct.min_length_with_image + 20
    assert full.num_tokens > max_len
    ex = ct.tokenize_conversation(conv, has_image=True, max_len=max_len)
    assert ex.truncated and ex.attention_mask.all()
    assert _image_block_ok(tok, ex.input_ids, N_IMG)
    # The prompt header survives: the sequence starts like the untruncated one.
    head = ct.min_length_with_image - N_IMG - 2
    np.testing.assert_array_equal(ex.input_ids[:head], full.input_ids[:head])
    with pytest.raises(ConversationError, match="image tokens"):
        ct.tokenize_conversation(conv, has_image=True, max_len=ct.min_length_with_image - 3)


# ------------------------------------------------------------------------------------------
# The answer-only sequences and the generation prompt


def test_answer_sequences_multi_turn(tok):
    ct = ConversationTokenizer(tok, "llava_v0", num_image_tokens=N_IMG)
    ids, mask = ct.answers(CONV, max_len=40)
    ref = _hf_ids(tok, "A chest x-ray with a nodule.. Left lung. Small.")
    np.testing.assert_array_equal(ids[: len(ref)], ref)
    assert mask.sum() == len(ref) and (ids[len(ref) :] == tok.pad_token_id).all()
    assert tok.convert_tokens_to_ids("<0x0A>") not in ids[: len(ref)]
    # Truncated to its own length.
    ids, mask = ct.answers(CONV, max_len=5)
    np.testing.assert_array_equal(ids, ref[:5])
    assert mask.all()
    # Image placeholders in answers are removed too.
    conv = [{"from": "human", "value": "q"}, {"from": "gpt", "value": "See <image>\nhere"}]
    ids, mask = ct.answers(conv, 20)
    np.testing.assert_array_equal(ids[: mask.sum()], _hf_ids(tok, "See here"))


@pytest.mark.parametrize("template", ["llava_v0", "vicuna_v1", "simple"])
def test_generation_prompt_matches_training_prefix(tok, template):
    ct = ConversationTokenizer(tok, template, num_image_tokens=N_IMG)
    question = "What is shown?"
    conv = [
        {"from": "human", "value": question + "\n<image>"},
        {"from": "gpt", "value": "A nodule."},
    ]
    ex = ct.tokenize_conversation(conv, has_image=True, max_len=200)
    first_target = int(np.argmax(ex.labels != IGNORE_INDEX))
    prompt = ct.prompt_ids("<image>\n" + question, has_image=True)
    np.testing.assert_array_equal(prompt, ex.input_ids[:first_target])
    # image_first: the prefix of a conversation that puts the image first, as training data do.
    conv[0]["value"] = "<image>\n" + question
    ex = ct.tokenize_conversation(conv, has_image=True, max_len=200)
    first_target = int(np.argmax(ex.labels != IGNORE_INDEX))
    prompt = ct.prompt_ids(question + "\n<image>", has_image=True, image_first=True)
    np.testing.assert_array_equal(prompt, ex.input_ids[:first_target])
    assert ct.prompt_text(question, has_image=False).endswith(
        {"llava_v0": "### Human: What is shown?\n### Assistant:",
         "vicuna_v1": "USER: What is shown? ASSISTANT:",
         "simple": "###Human: What is shown?###Assistant:"}[template]
    )
    assert ct.stop_string == {"llava_v0": "###", "vicuna_v1": "</s>", "simple": "###"}[template]


def test_malformed_conversations_raise():
    for bad in ([], None, [{"from": "human"}], [{"from": "robot", "value": "x"}],
                [{"from": "human", "value": "q"}, {"from": "human", "value": "q"}],
                [{"from": "human", "value": "q"}, {"from": "gpt", "value": "  "}]):
        with pytest.raises(ConversationError):
            normalize_turns(bad)
    # A leading gpt turn is dropped, as LLaVA does.
    turns = normalize_turns([{"from": "gpt", "value": "hi"}, {"from": "human", "value": "q"},
                             {"from": "gpt", "value": "a"}])
    assert turns == [("human", "q"), ("gpt", "a")]
