"""Conversation templates with the real Mistral-7B tokenizer (mistral-common's
sentencepiece model): training ids and labels equal ids written out from the templates'
rules with sentencepiece itself, and the exported Jinja chat template renders exactly the
prompt text our builder makes."""

from __future__ import annotations

import hf_fixtures as F
import numpy as np
import pytest
import sentencepiece as spm

from exgra_jax.data.conversation import (
    IGNORE_INDEX,
    ConversationTokenizer,
    chat_template_jinja,
)
from exgra_jax.data.tokenizer import load_tokenizer

N_IMG = 5
BOS, EOS = 1, 2
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's "
                 "questions.")


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    d = F.mistral_tokenizer_dir(str(tmp_path_factory.mktemp("mistral_tok")))
    tok = load_tokenizer(d)
    sp = spm.SentencePieceProcessor(model_file=f"{d}/tokenizer.model")
    assert tok.convert_tokens_to_ids("<im_patch>") == 32001  # appended after 32000 pieces
    return tok, sp


def _pieces(sp, text, image_id):
    """LLaVA's rule for text holding '<image>': each chunk between images is a separate
    sentencepiece encoding; each image stands for N_IMG image tokens."""
    out = []
    for i, chunk in enumerate(text.split("<image>")):
        if i:
            out += [image_id] * N_IMG
        if chunk:
            out += sp.encode(chunk)
    return out


def _rule_ids(sp, rounds, image_id):
    """ids/labels from the rule: BOS, then per round its instruction (context) and answer
    (target), each round closed by EOS (a target). Every round is tokenized on its own, as
    LLaVA's training code does; the instruction must tokenize to a prefix of the round."""
    ids, labels = [BOS], [IGNORE_INDEX]
    for instruction, answer in rounds:
        inst = _pieces(sp, instruction, image_id)
        full = _pieces(sp, instruction + answer, image_id)
        assert full[: len(inst)] == inst
        ids += full + [EOS]
        labels += [IGNORE_INDEX] * len(inst) + full[len(inst):] + [EOS]
    return ids, labels


QUESTIONS = [("<image>\nWhat modality is this?", "A chest CT scan."),
             ("Is there an abnormality on the left?", "Yes, a small nodule."),
             ("Größe?", "About 8 mm.")]


@pytest.mark.parametrize("turns", [1, 3])
@pytest.mark.parametrize("template", ["mistral_instruct", "vicuna_v1"])
def test_training_ids_and_labels_follow_the_rules(toks, template, turns):
    tok, sp = toks
    image_id = tok.convert_tokens_to_ids("<im_patch>")
    conv = [{"from": role, "value": text} for q, a in QUESTIONS[:turns]
            for role, text in (("human", q), ("gpt", a))]
    if template == "mistral_instruct":  # "[INST] {q} [/INST] {a} </s>" per round
        rounds = [(f"[INST] {q} [/INST]", f" {a} ") for q, a in QUESTIONS[:turns]]
    else:  # "{system} USER: {q} ASSISTANT: {a}</s>USER: ..."
        rounds = [((VICUNA_SYSTEM + " " if i == 0 else "") + f"USER: {q} ASSISTANT:", f" {a}")
                  for i, (q, a) in enumerate(QUESTIONS[:turns])]
    want_ids, want_labels = _rule_ids(sp, rounds, image_id)
    ct = ConversationTokenizer(tok, template, num_image_tokens=N_IMG, use_im_start_end=False)
    ex = ct.tokenize_conversation(conv, has_image=True, max_len=len(want_ids) + 3)
    n = ex.num_tokens
    assert ex.input_ids[:n].tolist() == want_ids
    assert ex.labels[:n].tolist() == want_labels
    assert (ex.labels[n:] == IGNORE_INDEX).all() and not ex.truncated


@pytest.mark.parametrize("template", ["mistral_instruct", "vicuna_v1", "llava_v0", "simple"])
@pytest.mark.parametrize("image_first", [False, True])
def test_jinja_chat_template_renders_our_prompt(toks, template, image_first):
    tok, _ = toks
    ct = ConversationTokenizer(tok, template, num_image_tokens=N_IMG, use_im_start_end=True)
    jinja = chat_template_jinja(template, "<im_start><im_patch><im_end>", image_first)
    ct_one = ConversationTokenizer(tok, template, num_image_tokens=1, use_im_start_end=True)
    history = [("What modality is this?", "A chest CT scan."), ("  Which side?  ", None)]
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text",
                                                          "text": history[0][0]}]},
        {"role": "assistant", "content": [{"type": "text", "text": history[0][1]}]},
        {"role": "user", "content": history[1][0]},
    ]
    rendered = tok.apply_chat_template(messages, chat_template=jinja, tokenize=False,
                                       add_generation_prompt=True)
    assert rendered == tok.bos_token + ct_one.chat_prompt_text(history, True, image_first)
    # Expanding the single image token gives the model's prompt ids.
    expanded = rendered.replace("<im_patch>", "<im_patch>" * N_IMG)
    ids = tok(expanded, add_special_tokens=False).input_ids
    np.testing.assert_array_equal(ids, ct.encode_prompt(ct.chat_prompt_text(history, True,
                                                                            image_first)))
    # Without an image: no image block; '<image>' typed by a user is dropped as we do.
    messages = [{"role": "user", "content": "What is <image> this?"}]
    rendered = tok.apply_chat_template(messages, chat_template=jinja, tokenize=False,
                                       add_generation_prompt=True)
    assert "<im_patch>" in rendered  # the placeholder marks an image, as in our data
    messages = [{"role": "user", "content": "What is this?"}]
    rendered = tok.apply_chat_template(messages, chat_template=jinja, tokenize=False,
                                       add_generation_prompt=True)
    assert rendered == tok.bos_token + ct.prompt_text("What is this?", has_image=False)
