"""The OpenAI-compatible server, driven with the official ``openai`` client on 127.0.0.1:
answers equal ``generate`` on the hand-written prompt (plain, streamed, multi-turn and
batched), and bad requests get OpenAI-style errors while the server stays up."""

import base64
import io
import os
import shutil
import subprocess
import sys
import threading
import time

import openai
import pytest
from eval_fixtures import REPO, shared_demo_data, subprocess_env, tiny_config, write_workdir
from PIL import Image
from serve_fixtures import (
    LocalServer,
    data_url,
    http_json,
    image_block,
    llava_v0_prompt,
    reference_answer,
)

from exgra_jax.data.image import ImageConfig, ImagePreprocessor
from exgra_jax.eval.checkpoint_loading import load_for_eval
from exgra_jax.serve.app import create_app
from exgra_jax.serve.engine import Engine, settled_text
from exgra_jax.serve.media import MediaPolicy

MAX_TOKENS = 8
MODEL = "tiny-test"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    data = shared_demo_data()
    config = tiny_config(data)
    workdir = str(tmp_path_factory.mktemp("serve") / "run")
    write_workdir(workdir, config, seed=5)
    model = load_for_eval(config, workdir=workdir)
    images = os.path.join(data, "images")
    image_config = ImageConfig(model.config.image_size, config.data.image_aspect)
    allowed = tmp_path_factory.mktemp("allowed")  # the folder local image paths may name
    shutil.copy(os.path.join(images, sorted(os.listdir(images))[0]), allowed)
    media = MediaPolicy(image_dir=str(allowed), max_image_bytes=300_000,
                        max_image_pixels=1_000_000)
    engine = Engine(model, "llava_v0", image_config, True, image_first=False, media=media,
                    default_max_tokens=MAX_TOKENS, max_batch=8, window_s=0.05)
    server = LocalServer(create_app(engine, MODEL, max_body_bytes=1_000_000))
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                           timeout=120)
    image = os.path.join(images, sorted(os.listdir(images))[0])
    yield dict(server=server, client=client, model=model, engine=engine, image=image,
               pixels=ImagePreprocessor(image_config)(image), config=config, workdir=workdir,
               block=image_block(model.config.num_image_tokens), allowed=str(allowed))
    server.close()


def _ask(client, messages, **kwargs):
    return client.chat.completions.create(model=MODEL, messages=messages, temperature=0,
                                          max_tokens=MAX_TOKENS, **kwargs)


def _user(text, url=None):
    content = [{"type": "text", "text": text}]
    if url:
        content.append({"type": "image_url", "image_url": {"url": url}})
    return {"role": "user", "content": content}


def test_settled_text_holds_back_what_may_still_change():
    assert settled_text(" The lung ", ("###",)) == "The lung"
    assert settled_text(" The lung\n#", ("###",)) == "The lung"  # '#' may start '###'
    assert settled_text(" The lung\n### Human", ("###",)) == "The lung"
    assert settled_text(" caf\ufffd", ("###",)) == "caf"  # an incomplete character


def test_openai_client_plain_streamed_and_multi_turn(served):
    client, model = served["client"], served["model"]
    assert [m.id for m in client.models.list().data] == [MODEL]
    url = data_url(served["image"])
    prompt = llava_v0_prompt([], "What is shown?", served["block"])
    expected, prompt_tokens = reference_answer(model, prompt, served["pixels"], MAX_TOKENS)

    reply = _ask(client, [_user("What is shown?", url)])
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens == prompt_tokens
    assert reply.usage.total_tokens == prompt_tokens + reply.usage.completion_tokens

    chunks = list(_ask(client, [_user("What is shown?", url)], stream=True,
                       stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == \
        reply.choices[0].finish_reason
    assert chunks[-1].usage.prompt_tokens == prompt_tokens

    # A second turn: the history is rendered in the template, the image stays with turn 1.
    second = llava_v0_prompt([("What is shown?", expected)], "Where is it?", served["block"])
    expected2, _ = reference_answer(model, second, served["pixels"], MAX_TOKENS)
    reply2 = _ask(client, [_user("What is shown?", url),
                           {"role": "assistant", "content": expected},
                           {"role": "user", "content": "Where is it?"}])
    assert reply2.choices[0].message.content == expected2

    # Text only: no image tokens in the prompt.
    expected3, _ = reference_answer(model, llava_v0_prompt([], "Hello?", None), None,
                                    MAX_TOKENS)
    assert _ask(client, [{"role": "user", "content": "Hello?"}]).choices[0].message.content \
        == expected3


def test_concurrent_requests_are_batched_and_answer_as_alone(served):
    client, model, engine = served["client"], served["model"], served["engine"]
    url = data_url(served["image"])
    # Different lengths (other padding) and with/without the image in one batch.
    questions = ["What is shown?", "Is there a fracture in the left lower lobe of the lung?",
                 "Describe it.", "Which organ?", "Any abnormality visible here?", "Size?"]
    with_image = [True, True, False, True, False, True]
    expected = [reference_answer(model, llava_v0_prompt([], q, served["block"] if im else None),
                                 served["pixels"] if im else None, MAX_TOKENS)[0]
                for q, im in zip(questions, with_image, strict=True)]
    answers = [None] * len(questions)
    barrier = threading.Barrier(len(questions))

    def ask(i):
        barrier.wait()
        answers[i] = _ask(client, [_user(questions[i], url if with_image[i] else None)]
                          ).choices[0].message.content

    before = engine.batches
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(questions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert answers == expected
    assert engine.batches - before < len(questions)  # some requests shared a generate call


def _png_bytes(size, mode="L") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def test_bad_requests_get_openai_errors_and_the_server_stays_up(served, capsys):
    base = served["server"].url
    png = "data:image/png;base64,"
    good = {"model": MODEL, "max_tokens": MAX_TOKENS, "temperature": 0,
            "messages": [_user("What is shown?", data_url(served["image"]))]}

    def chat(text="What is shown?", url=None, **extra):
        return {"model": MODEL, "max_tokens": MAX_TOKENS,
                "messages": [_user(text, url)], **extra}

    bomb = _png_bytes((2000, 2000))  # a few KB claiming 4M pixels (the limit is 1M)
    assert len(bomb) < 30_000
    cases = [  # (what, request body, status, code or error type)
        ("invalid JSON", b'{"model": "tiny-test", "messages": [', 400, "invalid_request_error"),
        ("bad base64", chat(url=png + "@@not base64@@"), 400, "invalid_base64"),
        ("not an image", chat(url=png + base64.b64encode(b"hello world").decode()), 400,
         "invalid_image_format"),
        ("not an image media type", chat(url="data:text/plain;base64,aGVsbG8="), 400,
         "invalid_image_format"),
        ("too many images", {"model": MODEL, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "Compare"},
            {"type": "image_url", "image_url": {"url": data_url(served["image"])}},
            {"type": "image_url", "image_url": {"url": data_url(served["image"])}}]}]},
         400, "too_many_images"),
        ("prompt longer than positions", chat(text="lung " * 400), 400,
         "context_length_exceeded"),
        ("unknown model", {**chat(), "model": "gpt-4o"}, 404, "model_not_found"),
        ("body over the limit", chat(text="x" * 1_100_000), 413, "request_too_large"),
        ("image over the byte limit", chat(url=png + "A" * 500_000), 413, "image_too_large"),
        ("decompression bomb", chat(url=png + base64.b64encode(bomb).decode()), 413,
         "image_too_large"),
        ("path outside the allowed dir", chat(url="../../../../etc/passwd"), 403,
         "path_not_allowed"),
        ("file URL outside the allowed dir", chat(url="file:///etc/hostname"), 403,
         "path_not_allowed"),
        ("http fetching disabled", chat(url="http://127.0.0.1:9/x.png"), 403,
         "http_not_allowed"),
        ("n=2", chat(n=2), 400, "invalid_request_error"),
        ("temperature 3", chat(temperature=3), 400, "invalid_request_error"),
        ("system message", {"model": MODEL, "messages": [
            {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]},
         400, "invalid_request_error"),
        ("image after the first message", {"model": MODEL, "messages": [
            {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
            _user("What is shown?", data_url(served["image"]))]}, 400, "invalid_request_error"),
        ("assistant last", {"model": MODEL, "messages": [
            {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
         400, "invalid_request_error"),
    ]
    rows = []
    for what, body, status, code in cases:
        got, reply = http_json(base + "/v1/chat/completions", body)
        error = reply["error"]
        rows.append((what, got, error["code"] or error["type"], error["message"]))
        assert (got, error["code"] or error["type"]) == (status, code), what
        assert error["message"]
    got, reply = http_json(base + "/v1/chat/completions", good)
    rows.append(("good request", got, "-", reply["choices"][0]["message"]["content"]))
    assert got == 200
    assert http_json(base + "/health")[1]["status"] == "ok"
    got, reply = http_json(base + "/v1/nothing")
    assert got == 404 and reply["error"]["type"] == "not_found_error"
    with capsys.disabled():
        print(f"\n{'request':<34} {'status':>6}  {'code':<24} message")
        for what, status, code, message in rows:
            print(f"{what:<34} {status:>6}  {code:<24} {message[:90]}")


def test_local_path_under_the_allowed_dir(served):
    name = os.path.basename(served["image"])
    expected = reference_answer(served["model"],
                                llava_v0_prompt([], "What is shown?", served["block"]),
                                served["pixels"], MAX_TOKENS)[0]
    reply = _ask(served["client"], [_user("What is shown?", name)])
    assert reply.choices[0].message.content == expected


def test_stop_strings_and_seeded_sampling(served):
    client = served["client"]
    url = data_url(served["image"])
    full = _ask(client, [_user("What is shown?", url)]).choices[0].message.content
    stop = full.split()[1]  # a word of the greedy answer: the answer ends before it
    reply = _ask(client, [_user("What is shown?", url)], stop=[stop])
    assert reply.choices[0].message.content == full.split(stop)[0].strip()
    assert reply.choices[0].finish_reason == "stop"

    def sample(seed):
        return client.chat.completions.create(
            model=MODEL, messages=[_user("What is shown?", url)], temperature=1.0,
            top_p=0.9, seed=seed, max_tokens=MAX_TOKENS).choices[0].message.content

    assert sample(3) == sample(3)  # a seed fixes the sample (the request runs alone)


def test_dicom_chat_through_data_url_and_allowed_path(served):
    pydicom = pytest.importorskip("pydicom")
    path = pydicom.data.get_testdata_file("CT_small.dcm")
    model = served["model"]
    pixels = ImagePreprocessor(ImageConfig(model.config.image_size,
                                           served["config"].data.image_aspect))(path)
    expected = reference_answer(model, llava_v0_prompt([], "Which organ?", served["block"]),
                                pixels, MAX_TOKENS)[0]
    url = data_url(path, "application/dicom")
    reply = _ask(served["client"], [_user("Which organ?", url)])
    assert reply.choices[0].message.content == expected
    streamed = "".join(c.choices[0].delta.content or "" for c in
                       _ask(served["client"], [_user("Which organ?", url)], stream=True))
    assert streamed == expected
    shutil.copy(path, os.path.join(served["allowed"], "ct.dcm"))
    reply = _ask(served["client"], [_user("Which organ?", "ct.dcm")])
    assert reply.choices[0].message.content == expected


@pytest.mark.slow
def test_command_line_server(served, tmp_path):
    """``python -m exgra_jax.serve --workdir`` loads the checkpoint and answers as in-process."""
    import socket  # noqa: PLC0415

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "exgra_jax.serve", "--workdir", served["workdir"],
         "--port", str(port), "--max_tokens", str(MAX_TOKENS), "--model_name", MODEL],
        env=subprocess_env(), cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                if http_json(f"http://127.0.0.1:{port}/health")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.5)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused",
                               max_retries=0, timeout=120)
        url = data_url(served["image"])
        reply = client.chat.completions.create(model=MODEL, temperature=0,
                                               messages=[_user("What is shown?", url)])
        # The workdir's config (configs/demo.py) asks with the image first.
        prompt = llava_v0_prompt([], "What is shown?", served["block"],
                                 image_first=served["config"].eval.image_first)
        expected = reference_answer(served["model"], prompt, served["pixels"], MAX_TOKENS)[0]
        assert reply.choices[0].message.content == expected
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()


@pytest.mark.slow
def test_web_page_in_headless_chromium(served, tmp_path):
    from cdp_pipe import Browser, find_chromium  # noqa: PLC0415

    chromium = find_chromium()
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    questions = ["What is shown?", "Where is it?"]
    browser = Browser(chromium, str(tmp_path / "profile"), served["server"].url + "/")
    try:
        page = browser.page_session()
        browser.wait_for(page, "document.readyState === 'complete' && "
                               "!!document.getElementById('model') && "
                               f"document.getElementById('model').textContent === '{MODEL}'",
                         timeout=60)
        doc = browser.send("DOM.getDocument", {}, page)
        node = browser.send("DOM.querySelector", {"nodeId": doc["root"]["nodeId"],
                                                  "selector": "#image"}, page)["nodeId"]
        browser.send("DOM.setFileInputFiles", {"nodeId": node, "files": [served["image"]]},
                     page)
        browser.evaluate(page, "document.getElementById('image').dispatchEvent("
                               "new Event('change'))")
        browser.wait_for(page, "document.getElementById('preview').src.startsWith('data:')")
        for turn, question in enumerate(questions, 1):
            browser.evaluate(page, f"document.getElementById('question').value = {question!r};"
                                   "document.getElementById('send').click()")
            try:  # the first answer includes compiling generate
                browser.wait_for(page, "document.querySelectorAll('.assistant.done').length >= "
                                       f"{turn} || document.querySelector('.error') !== null",
                                 timeout=300)
            except TimeoutError as e:
                raise AssertionError(browser.evaluate(page, "document.body.innerText")) from e
        assert browser.evaluate(page, "document.querySelector('.error') === null")
        shown = browser.evaluate(page, "[...document.querySelectorAll('.user, .assistant')]"
                                       ".map(d => d.textContent)")
        shot = browser.send("Page.captureScreenshot", {"format": "png"}, page)["data"]
    finally:
        browser.close()
    png = tmp_path / "chat_page.png"
    png.write_bytes(base64.b64decode(shot))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The page streamed the same answers the API gives to the same conversation. The page
    # asks without max_tokens: the server default (MAX_TOKENS here).
    client, url = served["client"], data_url(served["image"])
    first = _ask(client, [_user(questions[0], url)]).choices[0].message.content
    second = _ask(client, [_user(questions[0], url), {"role": "assistant", "content": first},
                           {"role": "user", "content": questions[1]}]).choices[0].message.content
    assert shown == [f"You: {questions[0]}", f"Assistant: {first}",
                     f"You: {questions[1]}", f"Assistant: {second}"]
