"""What the training loop runs at its evaluation steps (every ``train.eval_every`` steps and
at the end): a list of evaluators, called in order with the live training params.

An evaluator has a ``name`` (its TensorBoard group and its key in the final metrics), an
``evaluate(step, params, context)`` that returns its scores, and a ``final()`` with what the
final metrics keep beyond the last scores (e.g. the best step). It checks its settings when
it is built, before anything compiles. ``trainer.make_evaluators`` builds the ones
``config.eval`` asks for (``LMLoss`` on ``eval.json_paths``, ``selection.VQASelection``
with ``eval.select_metric``); ``trainer.train_and_evaluate(..., evaluators=[...])`` adds
others, such as a task-specific score.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import jax
from jax.sharding import Mesh

from exgra_jax import parallel
from exgra_jax.models.lora import LoraConfig


@dataclasses.dataclass(frozen=True)
class EvalContext:
    """What an evaluator may use of the training run."""

    mesh: Mesh  # the training mesh: params arrive sharded on it
    eval_step: Callable[[dict, dict], dict]  # (params, global batch) -> nll_sum, tokens
    checkpoint_meta: dict  # what the run's checkpoints record (model config, shapes)
    lora: LoraConfig | None  # params hold adapters beside a frozen base when set


class Evaluator(Protocol):
    name: str

    def evaluate(self, step: int, params: dict, context: EvalContext) -> dict[str, float]:
        """Scores of the training params at ``step``; called on every process alike."""
        ...

    def final(self) -> dict[str, Any]:
        """Entries for the final metrics beyond the last scores ({} for none)."""
        ...


class LMLoss:
    """Token-level LM loss of the eval set (one ordered pass, at most ``max_batches``
    batches; 0: all) under the train step's own loss function."""

    name = "eval"

    def __init__(self, batches: Callable[[], Iterator[dict]], max_batches: int = 0):
        self.batches = batches  # a fresh iterator of host batches per evaluation
        self.max_batches = max_batches

    def evaluate(self, step: int, params: dict, context: EvalContext) -> dict[str, float]:
        del step
        it = self.batches()
        nll = tokens = 0.0
        try:
            for i, host in enumerate(it):
                if self.max_batches and i >= self.max_batches:
                    break
                batch = parallel.make_global_batch(host, context.mesh)
                out = jax.device_get(context.eval_step(params, batch))
                nll += float(out["nll_sum"])
                tokens += float(out["tokens"])
        finally:
            it.close()
        return {"lm_loss": nll / max(tokens, 1.0), "tokens": tokens}

    def final(self) -> dict[str, Any]:
        return {}


def check_names(evaluators: list) -> None:
    """Evaluator names key TensorBoard groups and final metrics: they must differ."""
    names = [e.name for e in evaluators]
    taken = {"train", "step", *[n for i, n in enumerate(names) if n in names[:i]]}
    clash = sorted(n for n in set(names) if n in taken)
    if clash:
        raise ValueError(f"evaluator names must be unique and not 'train' or 'step': {clash}")
