"""`convert_checkpoint.py to-hf` writes what `AutoProcessor` needs: on the exported demo
model, ``processor.apply_chat_template`` gives exactly the prompt ids and pixels of our
evaluation (template, image placement and image tokens from the run's config), and
transformers' greedy answers equal our evaluation's answers."""

from __future__ import annotations

import dataclasses
import importlib.util
import os

import numpy as np
import pytest
import torch
from eval_fixtures import REPO, shared_demo_data, tiny_config, write_workdir
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from exgra_jax.data.image import ImageConfig
from exgra_jax.eval.answering import Answerer
from exgra_jax.eval.checkpoint_loading import load_for_eval
from exgra_jax.eval.vqa import read_vqa


def _convert_tool():
    spec = importlib.util.spec_from_file_location(
        "convert_checkpoint", os.path.join(REPO, "tools", "convert_checkpoint.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    config = tiny_config(shared_demo_data())
    workdir, out = str(root / "run"), str(root / "hf")
    write_workdir(workdir, config, seed=11)
    _convert_tool().to_hf(workdir, out, None, None)
    model = load_for_eval(config, workdir=workdir)
    answerer = Answerer(model=model, template=config.data.template,
                        image_config=ImageConfig(model.config.image_size,
                                                 config.data.image_aspect),
                        use_im_start_end=config.data.mm_use_im_start_end,
                        max_new_tokens=config.eval.max_new_tokens, batch_size=3,
                        image_first=config.eval.image_first)
    # Image names are relative to the image folder; these tests open them directly.
    questions = [dataclasses.replace(q, image=os.path.join(config.eval.image_folder, q.image))
                 for q in read_vqa(tuple(config.eval.json_paths))[1]]
    return dict(out=out, answerer=answerer, questions=questions[:3], config=config)


def test_autoprocessor_chat_template_gives_our_ids_and_greedy_answers(exported):
    out, answerer, questions = exported["out"], exported["answerer"], exported["questions"]
    for name in ("preprocessor_config.json", "processor_config.json", "tokenizer_config.json"):
        assert os.path.exists(os.path.join(out, name)), name
    processor = AutoProcessor.from_pretrained(out)
    model = LlavaForConditionalGeneration.from_pretrained(out).eval()
    tok = processor.tokenizer
    ours = [text for text, _ in answerer.answer(questions)]  # (text, skip reason)
    steps = exported["config"].eval.max_new_tokens
    for q, our_answer in zip(questions, ours, strict=True):
        messages = [{"role": "user", "content": [
            {"type": "image", "image": Image.open(q.image)},
            {"type": "text", "text": q.text}]}]
        inputs = processor.apply_chat_template(messages, add_generation_prompt=True,
                                               tokenize=True, return_dict=True,
                                               return_tensors="pt")
        assert inputs["input_ids"][0].tolist() == answerer.prompt_ids(q).tolist()
        np.testing.assert_allclose(inputs["pixel_values"][0].numpy().transpose(1, 2, 0),
                                   answerer.images(q.image), atol=1e-5)
        with torch.no_grad():
            gen = model.generate(**inputs, max_new_tokens=steps, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        text = tok.decode(gen[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        assert text.split(answerer.conv.stop_string)[0].strip() == our_answer
