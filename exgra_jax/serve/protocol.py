"""OpenAI chat-completions requests: validation into a ``ChatRequest``, and errors.

Every rejection is an ``ApiError`` carrying the HTTP status and the OpenAI error body
(``{"error": {"message", "type", "param", "code"}}``), so the server answers it and stays up.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from exgra_jax.data.tokenizer import IMAGE_PLACEHOLDER

MAX_STOP_STRINGS = 4  # as the OpenAI API


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


@dataclasses.dataclass(frozen=True)
class ChatRequest:
    exchanges: tuple[tuple[str, str | None], ...]  # (question, answer); the last answer None
    image_url: str | None  # the one image (in the first user message), if any
    max_tokens: int | None  # None: the server's default
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    seed: int | None
    stream: bool
    include_usage: bool


def parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from e


def _number(body: dict, name: str, default, kind, low=None, high=None, low_open=False):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise ApiError(400, f"'{name}' must be {'a number' if kind is float else 'an integer'}",
                       param=name)
    too_low = low is not None and (value <= low if low_open else value < low)
    if too_low or (high is not None and value > high):
        bounds = f"{'(' if low_open else '['}{low}, {high if high is not None else 'inf'}]"
        raise ApiError(400, f"'{name}' must lie in {bounds}, got {value}", param=name)
    return kind(value)


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stop = [stop] if isinstance(stop, str) else stop
    if (not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS
            or not all(isinstance(s, str) and s for s in stop)):
        raise ApiError(400, f"'stop' must be a non-empty string or a list of at most "
                       f"{MAX_STOP_STRINGS} non-empty strings", param="stop")
    return tuple(stop)


def _content(message: dict, index: int) -> tuple[str, list[str]]:
    """The text of one message and the image URLs it carries."""
    content = message.get("content")
    param = f"messages[{index}].content"
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise ApiError(400, "content must be a string or a list of parts", param=param)
    texts, images = [], []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str) or not url:
                raise ApiError(400, "an image_url part needs {'url': ...}", param=param)
            images.append(url)
        else:
            raise ApiError(400, "content parts must be {'type': 'text', 'text': ...} or "
                           "{'type': 'image_url', 'image_url': {'url': ...}}", param=param)
    return "\n".join(texts), images


def _exchanges(messages: Any) -> tuple[list[tuple[str, str | None]], str | None]:
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    texts: list[str] = []
    image_url = None
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role == "system":
            raise ApiError(400, "system messages are not supported: the checkpoint's "
                           "conversation template fixes the system prompt",
                           param=f"messages[{i}]")
        if role not in ("user", "assistant"):
            raise ApiError(400, f"messages[{i}].role must be 'user' or 'assistant'",
                           param=f"messages[{i}].role")
        if role != ("user", "assistant")[len(texts) % 2]:
            raise ApiError(400, "messages must alternate user/assistant, starting with user",
                           param=f"messages[{i}].role")
        text, images = _content(message, i)
        if len(images) > 1 or (images and image_url is not None):
            raise ApiError(400, "too many images: the model takes one image per conversation",
                           param=f"messages[{i}].content", code="too_many_images")
        if images and i > 0:
            raise ApiError(400, "the image must come with the first user message (the "
                           "template places it with the first question)",
                           param=f"messages[{i}].content")
        image_url = image_url or (images[0] if images else None)
        # A literal "<image>" would not be the image: the server places the image itself.
        text = text.replace(IMAGE_PLACEHOLDER, " ").strip()
        if role == "user" and not text:
            raise ApiError(400, f"messages[{i}] has no text", param=f"messages[{i}].content")
        texts.append(text)
    if len(texts) % 2 == 0:
        raise ApiError(400, "the last message must come from the user", param="messages")
    return list(zip(texts[::2], [*texts[1::2], None], strict=True)), image_url


def parse_chat_request(body: Any, model_name: str) -> ChatRequest:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if model != model_name:
        raise ApiError(404, f"the model {model!r} does not exist; this server serves "
                       f"{model_name!r} (see GET /v1/models)", param="model",
                       code="model_not_found")
    if _number(body, "n", 1, int) != 1:
        raise ApiError(400, "only n=1 is supported", param="n")
    exchanges, image_url = _exchanges(body.get("messages"))
    max_tokens = _number(body, "max_completion_tokens", None, int, 1)
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", None, int, 1)
    stream = body.get("stream", False)
    options = body.get("stream_options") or {}
    if not isinstance(stream, bool) or not isinstance(options, dict):
        raise ApiError(400, "'stream' must be a boolean and 'stream_options' an object",
                       param="stream")
    return ChatRequest(
        exchanges=tuple(exchanges), image_url=image_url, max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, float, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, float, 0.0, 1.0, low_open=True),
        stop=_stop(body), seed=_number(body, "seed", None, int), stream=stream,
        include_usage=bool(stream and options.get("include_usage")))
