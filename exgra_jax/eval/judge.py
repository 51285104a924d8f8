"""A GPT judge over any OpenAI-compatible ``/chat/completions`` endpoint, as LLaVA-Med's
chatbot evaluation uses it: the judge reads the figure's caption and context, the question,
the reference answer (assistant 1) and ours (assistant 2), and scores both from 1 to 10 on
the first line of its reply.

The API key is read from an environment variable, sent only in the Authorization header,
and never logged or shown in errors. Transient failures (connection errors, 408/409/429 and
5xx) are retried with exponential backoff, waiting as long as a ``Retry-After`` header asks.
"""

from __future__ import annotations

import email.utils
import json
import logging
import os
import random
import re
import time
import urllib.error
import urllib.request
from typing import Any

log = logging.getLogger("exgra_jax.eval")

SYSTEM_PROMPT = "You are a careful and exact judge of the quality of answers."

INSTRUCTIONS = (
    "Please give us your assessment of the two AI assistants' answers to the question "
    "above. The user asked it while looking at an image; you cannot see the image, so its "
    "caption and the text that mentions it describe it for you.\n"
    "Rate the helpfulness, relevance, accuracy and level of detail of each answer together "
    "as one overall score from 1 to 10 per assistant, where higher is better.\n"
    "On the first line write only the two scores, for Assistant 1 and Assistant 2 in this "
    "order, separated by one space. From the next line on, explain your assessment "
    "thoroughly and without bias; the order in which the answers appear must not change "
    "your judgment.")

RETRYABLE_STATUS = (408, 409, 429, 500, 502, 503, 504)


class JudgeError(RuntimeError):
    """The judge endpoint refused the request for a reason retrying does not fix."""


class JudgeUnavailable(JudgeError):
    """Transient failures went on for every attempt."""


class UnparsableReply(ValueError):
    def __init__(self, reply: str):
        super().__init__(f"the judge's first line is not two scores in [1, 10]: "
                         f"{reply.splitlines()[0][:200] if reply.strip() else '(empty)'!r}")
        self.reply = reply


def judge_messages(question: dict, answer: str) -> list[dict]:
    """The chat messages for one qa50 question (its fields as in LLaVA-Med's file)."""
    user = (f"[Context]\nFigure caption:\n{question['fig_label']}: {question['fig_caption']}\n\n"
            f"Text mentioning the figure:\n\t- {question['in_text_mention']}\n\n"
            f"[Question]\n{question['text']}\n\n"
            f"[Assistant 1]\n{question['gpt4_answer']}\n\n[End of Assistant 1]\n\n"
            f"[Assistant 2]\n{answer}\n\n[End of Assistant 2]\n\n"
            f"[System]\n{INSTRUCTIONS}\n\n")
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


_SCORES = re.compile(r"^\s*(\d+(?:\.\d+)?)\s+(\d+(?:\.\d+)?)\s*$")


def parse_scores(reply: str) -> tuple[float, float]:
    """(reference score, our score) from the reply's first line, both in [1, 10]."""
    match = _SCORES.match(reply.strip().split("\n", 1)[0]) if reply else None
    if match is None:
        raise UnparsableReply(reply or "")
    scores = float(match.group(1)), float(match.group(2))
    if not all(1.0 <= s <= 10.0 for s in scores):
        raise UnparsableReply(reply)
    return scores


def retry_after_seconds(value: str | None) -> float | None:
    """A Retry-After header: delay seconds or an HTTP date; None if absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class JudgeClient:
    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY",
                 timeout_s: float = 120.0, max_attempts: int = 6, backoff_s: float = 1.0,
                 max_wait_s: float = 120.0, max_tokens: int = 1024):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self._key = os.environ.get(api_key_env, "")
        if not self._key:
            log.warning("judge: $%s is not set; calling %s without an API key", api_key_env,
                        self.url)
        self.timeout_s, self.max_attempts = timeout_s, max_attempts
        self.backoff_s, self.max_wait_s, self.max_tokens = backoff_s, max_wait_s, max_tokens

    def __repr__(self) -> str:  # never the key
        return f"JudgeClient({self.url!r}, model={self.model!r})"

    def _post(self, body: dict) -> dict:
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        request = urllib.request.Request(self.url, data=json.dumps(body).encode(),
                                         headers=headers)
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
            return json.loads(response.read())

    def _wait(self, attempt: int, retry_after: float | None) -> float:
        backoff = self.backoff_s * 2**attempt * (1 + random.random() / 4)
        return min(self.max_wait_s, retry_after if retry_after is not None else backoff)

    def complete(self, messages: list[dict]) -> str:
        """The reply text; retries transient failures, raises JudgeError otherwise."""
        body = {"model": self.model, "messages": messages, "temperature": 0.0,
                "max_tokens": self.max_tokens}
        for attempt in range(self.max_attempts):
            retry_after = None
            try:
                reply: Any = self._post(body)
                return reply["choices"][0]["message"]["content"] or ""
            except urllib.error.HTTPError as e:
                if e.code not in RETRYABLE_STATUS:
                    raise JudgeError(f"the judge at {self.url} answered HTTP {e.code}: "
                                     f"{e.read()[:300]!r}") from None
                retry_after = retry_after_seconds(e.headers.get("Retry-After"))
                problem = f"HTTP {e.code}"
            except (urllib.error.URLError, OSError, json.JSONDecodeError) as e:
                problem = f"{type(e).__name__}: {e}"
            except (KeyError, IndexError, TypeError) as e:
                raise JudgeError(f"the judge at {self.url} sent no choices[0].message: "
                                 f"{e!r}") from None
            if attempt + 1 == self.max_attempts:
                raise JudgeUnavailable(f"the judge at {self.url} failed {self.max_attempts} "
                                       f"times; last: {problem}")
            wait = self._wait(attempt, retry_after)
            log.info("judge: %s; retrying in %.1fs", problem, wait)
            time.sleep(wait)
        raise AssertionError("unreachable")
