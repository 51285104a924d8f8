"""One prompt builder: the chat asks exactly as VQA evaluation does (same ids, same answers),
and a multi-turn chat prompt is the training sequence cut before the answer it asks for."""

import dataclasses
import os

import numpy as np
import pytest
from eval_fixtures import shared_demo_data, tiny_config, write_workdir

from exgra_jax.data.conversation import IGNORE_INDEX, ConversationTokenizer
from exgra_jax.data.image import ImageConfig
from exgra_jax.eval.answering import Answerer
from exgra_jax.eval.chat import ChatSession
from exgra_jax.eval.checkpoint_loading import load_for_eval
from exgra_jax.eval.vqa import read_vqa


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    data = shared_demo_data()
    config = tiny_config(data)
    assert config.eval.image_first  # the demo asks image first: the case the chat got wrong
    workdir = str(tmp_path_factory.mktemp("prompts") / "run")
    write_workdir(workdir, config, seed=5)
    model = load_for_eval(config, workdir=workdir)
    # Image names are relative to the image folder; these tests open them directly.
    questions = [dataclasses.replace(q, image=os.path.join(config.eval.image_folder, q.image))
                 for q in read_vqa(tuple(config.eval.json_paths))[1]]
    return dict(config=config, model=model, questions=questions[:4])


def _answerer(setup):
    config, model = setup["config"], setup["model"]
    return Answerer(model=model, template=config.data.template,
                    image_config=ImageConfig(model.config.image_size, config.data.image_aspect),
                    use_im_start_end=config.data.mm_use_im_start_end,
                    max_new_tokens=config.eval.max_new_tokens, batch_size=4,
                    image_first=config.eval.image_first)


def _session(setup):
    config, model = setup["config"], setup["model"]
    return ChatSession(model, config.data.template,
                       ImageConfig(model.config.image_size, config.data.image_aspect),
                       config.data.mm_use_im_start_end, config.eval.max_new_tokens,
                       image_first=config.eval.image_first)


def test_chat_first_turn_ids_equal_evaluation_ids(setup):
    answerer, session = _answerer(setup), _session(setup)
    for q in setup["questions"]:
        session.set_image(q.image)
        chat_ids = session._encode(session.prompt_text(q.text, []))
        np.testing.assert_array_equal(chat_ids, answerer.prompt_ids(q))
        # The image block comes first, as the config says (start token right after "Human: ").
        head = session.prompt_text(q.text, []).split("### Human: ", 1)[1]
        assert head.startswith("<im_start>") and head.endswith(q.text + "\n### Assistant:")


@pytest.mark.parametrize("template", ["llava_v0", "vicuna_v1", "simple"])
@pytest.mark.parametrize("image_first", [False, True])
def test_multi_turn_prompt_is_the_training_prefix(setup, template, image_first):
    """The prompt for turn k equals the tokenized training conversation up to the first
    label of answer k: the chat asks in the format the model was trained on."""
    model = setup["model"]
    conv = ConversationTokenizer(model.tokenizer, template, model.config.num_image_tokens)
    q1 = "What is shown?"
    q1_with_image = "<image>\n" + q1 if image_first else q1 + "\n<image>"
    conversation = [{"from": "human", "value": q1_with_image},
                    {"from": "gpt", "value": "A nodule."},
                    {"from": "human", "value": "Which side?"},
                    {"from": "gpt", "value": "Left."}]
    ex = conv.tokenize_conversation(conversation, has_image=True, max_len=400)
    starts = np.flatnonzero((ex.labels != IGNORE_INDEX)
                            & np.r_[True, ex.labels[:-1] == IGNORE_INDEX])
    assert len(starts) == 2
    first = conv.encode_prompt(conv.chat_prompt_text([(q1, None)], True, image_first))
    np.testing.assert_array_equal(first, ex.input_ids[: starts[0]])
    second = conv.encode_prompt(conv.chat_prompt_text(
        [(q1, "A nodule."), ("Which side?", None)], True, image_first))
    np.testing.assert_array_equal(second, ex.input_ids[: starts[1]])
    with pytest.raises(ValueError, match="last answer None"):
        conv.chat_prompt_text([(q1, None), ("Which side?", None)], True)


@pytest.mark.slow
def test_chat_answers_equal_evaluation_answers(setup):
    """Batched, bucketed evaluation (as launch/eval.py runs it) and the chat, one question
    per fresh conversation, give the same answers."""
    questions = setup["questions"]
    expected = [text for text, _ in _answerer(setup).answer(questions)]
    session = _session(setup)
    got = []
    for q in questions:
        session.set_image(q.image)
        got.append(session.ask(q.text))
    assert got == expected
