"""Conversation templates and tokenization with exact label masking.

A template renders a LLaVA-Med conversation (`[{"from": "human"|"gpt", "value": ...}]`) as
one string made of pieces that are either context (label -100) or target (label = token id).
The target of an assistant turn is its answer plus the end separator the model must learn
to emit (the template's stop string), starting at the space after the role's colon:

  llava_v0 (ExGra-Med / LLaVA-Med v0 training format):
    "{system}\\n\\n### Human: {q}\\n### Assistant:[ {a}\\n###] Human: ...\\n### Assistant:[ {a}\\n###] "
  vicuna_v1 (LLaVA v1):
    "{system} USER: {q} ASSISTANT:[ {a}</s>]USER: {q} ASSISTANT:[ {a}</s>]"
  simple (LLaVA-Med VQA evaluation prompt, one-shot greeting, '###' separators):
    "{system}###Human: Hi!###Assistant: Hi there! How can I help you today?###Human: {q}###Assistant:[ {a}###]"
  mistral_instruct (LLaVA-Med v1.5; LLaVA's LLAMA_2 separator style, empty system prompt):
    "[INST] {q} [/INST][ {a} </s>][INST] {q} [/INST][ {a} </s>]"

(brackets mark the targets). The whole string is tokenized once; a token is a target when
its first character lies inside a target range, so the labels follow the real tokenization
of the full string rather than a sum of separately tokenized pieces. Role names and the
human turns are never targets (the original v0 code also trained on the role tags; we do
not, as LLaVA v1 does not).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from exgra_jax.data.tokenizer import (
    IM_END_TOKEN,
    IM_START_TOKEN,
    IMAGE_PATCH_TOKEN,
    IMAGE_PLACEHOLDER,
    special_token_ids,
)

IGNORE_INDEX = -100

_LLAVA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
_VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


class ConversationError(ValueError):
    """A conversation that cannot be turned into a training example."""


@dataclass(frozen=True)
class Template:
    """Rendering rules; see the module docstring for the resulting strings."""

    name: str
    header: str  # system prompt and any fixed preamble
    human_prefix: str
    human_suffix: str
    assistant_prefix: str  # ends with the role's colon; generation starts after it
    stop: str  # ends every assistant answer; part of the target
    tail: str = ""  # appended after the last turn (context)

    def render(self, turns: list[tuple[str, str]]) -> tuple[str, list[tuple[int, int]]]:
        """Returns the full text and the character ranges [start, end) of the targets."""
        parts = [self.header]
        length = len(self.header)
        targets = []
        for role, value in turns:
            if role == "human":
                piece = self.human_prefix + value + self.human_suffix
            else:
                parts.append(self.assistant_prefix)
                length += len(self.assistant_prefix)
                piece = " " + value + self.stop
                targets.append((length, length + len(piece)))
            parts.append(piece)
            length += len(piece)
        parts.append(self.tail)
        return "".join(parts), targets

    def chat_prompt(self, turns: Sequence[tuple[str, str | None]]) -> str:
        """The text a model continues to answer the last question of ``turns``.

        ``turns`` are (question, answer) pairs, image tokens already in the questions; the
        last answer is None. Earlier exchanges are rendered exactly as in training, so the
        prompt is the prefix of the training sequence up to the last answer.
        """
        if not turns or turns[-1][1] is not None or any(a is None for _, a in turns[:-1]):
            raise ValueError("chat_prompt needs (question, answer) turns, only the last "
                             "answer None")
        flat = [(role, text) for q, a in turns
                for role, text in (("human", q), ("gpt", a)) if text is not None]
        text, _ = self.render(flat)
        return text[: len(text) - len(self.tail)] + self.assistant_prefix


TEMPLATES = {
    "llava_v0": Template(
        name="llava_v0",
        header=_LLAVA_SYSTEM + "\n\n###",
        human_prefix=" Human: ",
        human_suffix="\n###",
        assistant_prefix=" Assistant:",
        stop="\n###",
        tail=" ",
    ),
    "vicuna_v1": Template(
        name="vicuna_v1",
        header=_VICUNA_V1_SYSTEM + " ",
        human_prefix="USER: ",
        human_suffix=" ",
        assistant_prefix="ASSISTANT:",
        stop="</s>",
    ),
    "simple": Template(
        name="simple",
        header=_LLAVA_SYSTEM + "###Human: Hi!###Assistant: Hi there! How can I help you today?###",
        human_prefix="Human: ",
        human_suffix="###",
        assistant_prefix="Assistant:",
        stop="###",
    ),
    "mistral_instruct": Template(
        name="mistral_instruct",
        header="",
        human_prefix="[INST] ",
        human_suffix=" [/INST]",
        assistant_prefix="",
        stop=" </s>",
    ),
}


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise ValueError(f"unknown conversation template {name!r}; known: {sorted(TEMPLATES)}")
    return TEMPLATES[name]


def chat_template_jinja(template: str, image_text: str, image_first: bool) -> str:
    """A Jinja chat template (transformers' ``apply_chat_template``) rendering exactly what
    `ConversationTokenizer.chat_prompt_text` builds, with ``image_text`` as the image block
    (for a processor: one image token that it expands to the image's token count).

    Messages are {"role": "user"|"assistant", "content": str | [{"type": "text"|"image"}]}.
    As in `chat_prompt_text`: ``<image>`` is removed from user text, which is stripped; a
    conversation with an image (an image part anywhere, or ``<image>`` in user text) gets
    the image block on its first question, before it with ``image_first``, else after.
    """
    t = get_template(template)

    def lit(text: str) -> str:
        return json.dumps(text)  # a JSON string is a valid Jinja string literal

    image = lit(image_text)
    placed = f"{image} + '\\n' + text" if image_first else f"text + '\\n' + {image}"
    return (
        "{%- macro text_of(content) -%}"
        "{%- if content is string -%}{{ content }}{%- else -%}"
        "{%- for part in content if part['type'] == 'text' -%}{{ part['text'] }}{%- endfor -%}"
        "{%- endif -%}{%- endmacro -%}"
        "{%- set ns = namespace(image=false, first=true) -%}"
        "{%- for m in messages if m['role'] == 'user' -%}"
        "{%- if m['content'] is string -%}"
        "{%- if '<image>' in m['content'] -%}{%- set ns.image = true -%}{%- endif -%}"
        "{%- else -%}{%- for part in m['content'] if part['type'] == 'image' -%}"
        "{%- set ns.image = true -%}{%- endfor -%}{%- endif -%}"
        "{%- endfor -%}"
        "{{ bos_token }}" + "{{ " + lit(t.header) + " }}"
        "{%- for m in messages -%}"
        "{%- set text = text_of(m['content']) -%}"
        "{%- if m['role'] == 'user' -%}"
        "{%- set text = text.replace('<image>', '') | trim -%}"
        "{%- if ns.first and ns.image -%}{%- set text = " + placed + " -%}{%- endif -%}"
        "{%- set ns.first = false -%}"
        "{{ " + lit(t.human_prefix) + " + text + " + lit(t.human_suffix) + " }}"
        "{%- elif m['role'] == 'assistant' -%}"
        "{{ " + lit(t.assistant_prefix + " ") + " + text + " + lit(t.stop) + " }}"
        "{%- else -%}{{ raise_exception('only user and assistant messages') }}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ " + lit(t.assistant_prefix) + " }}"
        "{%- else -%}{{ " + lit(t.tail) + " }}{%- endif -%}"
    )


def image_token_string(num_image_tokens: int, use_im_start_end: bool) -> str:
    body = IMAGE_PATCH_TOKEN * num_image_tokens
    return IM_START_TOKEN + body + IM_END_TOKEN if use_im_start_end else body


def normalize_turns(conversation) -> list[tuple[str, str]]:
    """Validates a LLaVA-Med turn list and returns (role, text) pairs, human first.

    A leading gpt turn is dropped (as LLaVA does); roles must then alternate.
    """
    if not isinstance(conversation, (list, tuple)) or not conversation:
        raise ConversationError("conversation is empty or not a list")
    turns = []
    for turn in conversation:
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise ConversationError(f"malformed turn {turn!r}")
        role = str(turn["from"]).lower()
        if role not in ("human", "gpt"):
            raise ConversationError(f"unknown speaker {turn['from']!r}")
        value = turn["value"]
        if not isinstance(value, (str, int, float)):
            raise ConversationError(f"turn value of type {type(value).__name__}")
        turns.append((role, str(value)))
    if turns[0][0] == "gpt":
        turns = turns[1:]
    for i, (role, _) in enumerate(turns):
        if role != ("human", "gpt")[i % 2]:
            raise ConversationError("speakers do not alternate human/gpt")
    if not any(role == "gpt" and value.strip() for role, value in turns):
        raise ConversationError("conversation has no non-empty gpt answer")
    return turns


def answers_text(turns: list[tuple[str, str]]) -> str:
    """The gpt answers alone, joined with '. ', without image placeholders and newlines."""
    answers = []
    for role, value in turns:
        if role != "gpt":
            continue
        text = " ".join(value.replace(IMAGE_PLACEHOLDER, " ").split())
        if text:
            answers.append(text)
    return ". ".join(answers)


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: np.ndarray  # int32 [T]
    attention_mask: np.ndarray  # int32 [T]
    labels: np.ndarray  # int32 [T]
    num_tokens: int  # before padding
    truncated: bool


class ConversationTokenizer:
    """Turns conversations into fixed-length training sequences and generation prompts.

    Works on the Rust tokenizer behind a Hugging Face fast tokenizer (one call per sequence,
    offsets included), so it pickles into data-loader worker processes and stays fast.
    """

    def __init__(
        self,
        tokenizer,
        template: str = "llava_v0",
        num_image_tokens: int = 256,
        use_im_start_end: bool = True,
    ):
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("ConversationTokenizer needs a fast (tokenizers-backed) tokenizer")
        self.template = get_template(template)
        self.num_image_tokens = int(num_image_tokens)
        self.use_im_start_end = bool(use_im_start_end)
        self.ids = special_token_ids(tokenizer)
        self._backend = tokenizer.backend_tokenizer
        self._image_text = image_token_string(self.num_image_tokens, self.use_im_start_end)
        self._image_len = self.num_image_tokens + (2 if self.use_im_start_end else 0)
        self._header_len = len(self._encode(self.template.header)[0])  # never cut

    # ----------------------------------------------------------------------------------
    def _expand_image(self, turns, has_image: bool):
        """Replaces `<image>` with image tokens; exactly one image block when has_image."""
        out = []
        seen = False
        for role, value in turns:
            if IMAGE_PLACEHOLDER in value:
                if not has_image or role != "human" or seen:
                    # No pixels for it, or a second copy: the model would splice garbage.
                    value = value.replace(IMAGE_PLACEHOLDER, "").strip()
                else:
                    head, _, rest = value.partition(IMAGE_PLACEHOLDER)
                    value = head + self._image_text + rest.replace(IMAGE_PLACEHOLDER, "")
                    seen = True
            out.append((role, value))
        if has_image and not seen:
            # LLaVA puts the image first in the first question when the data forgot it.
            out[0] = (out[0][0], self._image_text + "\n" + out[0][1])
        return out

    def _encode(self, text: str):
        enc = self._backend.encode(text, add_special_tokens=True)
        return np.asarray(enc.ids, np.int32), enc.offsets

    def tokenize_conversation(self, conversation, has_image: bool, max_len: int):
        """input_ids / attention_mask / labels of length `max_len` (right padded)."""
        turns = self._expand_image(normalize_turns(conversation), has_image)
        text, targets = self.template.render(turns)
        ids, offsets = self._encode(text)
        starts = np.fromiter((s for s, _ in offsets), np.int64, len(offsets))
        ends = np.fromiter((e for _, e in offsets), np.int64, len(offsets))
        is_target = np.zeros(len(ids), bool)
        for lo, hi in targets:
            is_target |= (starts >= lo) & (starts < hi) & (ends > starts)
        labels = np.where(is_target, ids, IGNORE_INDEX).astype(np.int32)
        ids, labels, truncated = self._truncate(ids, labels, has_image, max_len)
        return self._pad(ids, labels, max_len, truncated)

    def _truncate(self, ids, labels, has_image, max_len):
        if len(ids) <= max_len:
            return ids, labels, False
        if has_image:
            first = self.ids["im_start"] if self.use_im_start_end else self.ids["image_patch"]
            start = int(np.argmax(ids == first))
            end = start + self._image_len
            overflow = end - max_len
            if overflow > 0:
                # Cut the question text right before the image instead of the image itself.
                if start - overflow < self._header_len:
                    raise ConversationError(
                        f"max_len={max_len} cannot hold the prompt and the "
                        f"{self._image_len} image tokens"
                    )
                keep = np.r_[0 : start - overflow, start : len(ids)]
                ids, labels = ids[keep], labels[keep]
        return ids[:max_len], labels[:max_len], True

    def _pad(self, ids, labels, max_len, truncated) -> TokenizedExample:
        n = len(ids)
        input_ids = np.full(max_len, self.ids["pad"], np.int32)
        input_ids[:n] = ids
        out_labels = np.full(max_len, IGNORE_INDEX, np.int32)
        out_labels[:n] = labels
        mask = np.zeros(max_len, np.int32)
        mask[:n] = 1
        return TokenizedExample(input_ids, mask, out_labels, n, truncated)

    def tokenize_text(self, text: str, max_len: int) -> tuple[np.ndarray, np.ndarray]:
        """Plain text -> (ids [max_len], mask [max_len]): BOS + text, right padded/truncated."""
        ids, _ = self._encode(text)
        ids = ids[:max_len]
        out = np.full(max_len, self.ids["pad"], np.int32)
        out[: len(ids)] = ids
        mask = np.zeros(max_len, np.int32)
        mask[: len(ids)] = 1
        return out, mask

    def answers(self, conversation, max_len: int) -> tuple[np.ndarray, np.ndarray]:
        """The alignment-loss text branch: the gpt answers alone (see `answers_text`)."""
        return self.tokenize_text(answers_text(normalize_turns(conversation)), max_len)

    # ----------------------------------------------------------------------------------
    def chat_prompt_text(self, turns: Sequence[tuple[str, str | None]], has_image: bool,
                         image_first: bool = False) -> str:
        """THE generation prompt: VQA evaluation, the chat, the server and the exported
        chat template all build their prompts with this rule.

        ``turns``: (question, answer) pairs, the last answer None. ``<image>`` placeholders
        are removed from the questions; with ``has_image`` the image tokens go after the
        first question (LLaVA-Med's evaluation prompt) or, with ``image_first``, before it
        (how its training conversations place them), joined by a newline.
        """
        clean = [(q.replace(IMAGE_PLACEHOLDER, "").strip(), a) for q, a in turns]
        if has_image and clean:
            q, a = clean[0]
            q = self._image_text + "\n" + q if image_first else q + "\n" + self._image_text
            clean[0] = (q, a)
        return self.template.chat_prompt(clean)

    def prompt_text(self, question: str, has_image: bool, image_first: bool = False) -> str:
        """The generation prompt for one question (see `chat_prompt_text`)."""
        return self.chat_prompt_text([(question, None)], has_image, image_first)

    def encode_prompt(self, text: str) -> np.ndarray:
        """Token ids (BOS first, unpadded) of a prompt text."""
        return self._encode(text)[0]

    def prompt_ids(self, question: str, has_image: bool, image_first: bool = False) -> np.ndarray:
        """Token ids (BOS first, unpadded) of the generation prompt for one question."""
        return self.encode_prompt(self.prompt_text(question, has_image, image_first))

    @property
    def min_length_with_image(self) -> int:
        """Tokens taken by BOS, the template header and the image block."""
        return self._header_len + self._image_len

    @property
    def stop_string(self) -> str:
        return self.template.stop.strip()
