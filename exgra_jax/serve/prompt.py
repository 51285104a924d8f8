"""The chat prompt the server builds from OpenAI-style messages.

One function, so that it can follow the project's shared prompt builder in one place.
"""

from __future__ import annotations

from exgra_jax.data.conversation import Template


def chat_prompt(template: Template, turns: list[tuple[str, str]], image_turn: int | None,
                image_text: str) -> str:
    """The text the model continues: ``turns`` ((role, text), role 'human' or 'gpt', ending
    with 'human') in the template, the image block after the text of turn ``image_turn``
    (LLaVA-Med's evaluation places it after the question), then the assistant prefix."""
    rendered = []
    for i, (role, text) in enumerate(turns):
        if i == image_turn:
            text = text + "\n" + image_text
        rendered.append((role, text))
    text, _ = template.render(rendered)
    if template.tail:
        text = text[: len(text) - len(template.tail)]
    return text + template.assistant_prefix
