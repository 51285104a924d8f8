"""The chat: history kept in the template and the terminal entry driven through stdin (the
web chat is the server's page: tests/test_serve.py)."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from eval_fixtures import REPO, shared_demo_data, subprocess_env, tiny_config, write_workdir

from exgra_jax.data.image import ImageConfig, ImagePreprocessor
from exgra_jax.data.tokenizer import load_tokenizer
from exgra_jax.eval.chat import ChatSession
from exgra_jax.eval.checkpoint_loading import EvalModel, load_for_eval
from exgra_jax.inference.generate import GenerationConfig, generate
from exgra_jax.models.config import ModelConfig

SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the human's questions.")


@pytest.fixture(scope="module")
def chat_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    data = shared_demo_data()
    config = tiny_config(data)
    image = os.path.join(data, "images", sorted(os.listdir(os.path.join(data, "images")))[0])
    return dict(root=root, data=data, config=config, image=image)


def _image_block(n):
    return "<im_start>" + "<im_patch>" * n + "<im_end>"


def test_prompt_keeps_the_conversation_in_the_llava_v0_template(chat_setup):
    config = chat_setup["config"]
    mcfg = ModelConfig.from_dict(config.model.to_dict())
    model = EvalModel(mcfg, None, load_tokenizer(config.tokenizer), None, (), None, "t")
    session = ChatSession(model, "llava_v0", ImageConfig(mcfg.image_size, "crop"))
    session.set_image(chat_setup["image"])
    block = _image_block(mcfg.num_image_tokens)
    assert session.prompt_text("Q1?", []) == (
        f"{SYSTEM}\n\n### Human: Q1?\n{block}\n### Assistant:")
    assert session.prompt_text("Q2?", [("Q1?", "A1.")]) == (
        f"{SYSTEM}\n\n### Human: Q1?\n{block}\n### Assistant: A1.\n### Human: Q2?\n"
        "### Assistant:")
    session.set_image(chat_setup["image"])  # a new image clears the history
    assert session.history == []
    session.pixels = None  # without an image there are no image tokens
    assert "<im_patch>" not in session.prompt_text("Q?", [])


def _reference_answer(model, prompt: str, pixels, max_new_tokens: int) -> str:
    """Our generate on a hand-written prompt string, unpadded, without a mesh."""
    tok = model.tokenizer
    ids = np.asarray(tok(prompt).input_ids, np.int32)[None]
    gen = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_ids=(tok.eos_token_id,),
                           pad_token_id=tok.pad_token_id, stop_strings=("###",))
    out = generate(model.config, jax.device_get(model.params), ids, np.ones_like(ids),
                   pixels[None], config=gen, tokenizer=tok)
    return out.texts[0].strip()


@pytest.mark.slow
def test_terminal_chat_multi_turn_through_stdin(chat_setup, tmp_path):
    config = chat_setup["config"]
    workdir = str(tmp_path / "run")
    write_workdir(workdir, config, seed=2)
    script = "What is shown?\nWhere is it?\n/image /no/such.png\n/reset\nWhat is shown?\n/quit\n"
    proc = subprocess.run(
        [sys.executable, "-m", "exgra_jax.eval.chat", "--workdir", workdir,
         "--image", chat_setup["image"], "--max_new_tokens", "8"],
        input=script, capture_output=True, text=True, env=subprocess_env(), cwd=REPO,
        timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    answers = [line.split("ASSISTANT: ", 1)[1] for line in proc.stdout.splitlines()
               if "ASSISTANT: " in line]
    assert len(answers) == 3
    assert "[error: image file not found: /no/such.png]" in proc.stdout
    assert "[conversation cleared]" in proc.stdout

    model = load_for_eval(config, workdir=workdir)
    mcfg = model.config
    pixels = ImagePreprocessor(ImageConfig(mcfg.image_size, config.data.image_aspect))(
        chat_setup["image"])
    block = _image_block(mcfg.num_image_tokens)
    # The chat asks as evaluation does: the image block where config.eval.image_first says.
    asked = (f"{block}\nWhat is shown?" if config.eval.image_first
             else f"What is shown?\n{block}")
    first = f"{SYSTEM}\n\n### Human: {asked}\n### Assistant:"
    assert answers[0] == _reference_answer(model, first, pixels, 8)
    second = f"{first} {answers[0]}\n### Human: Where is it?\n### Assistant:"
    assert answers[1] == _reference_answer(model, second, pixels, 8)
    assert answers[2] == answers[0]  # after /reset the same question, the same answer
