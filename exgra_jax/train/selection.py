"""Best-step selection while fine-tuning: answer the validation VQA set with the live
params, score it, and keep the params of the best-scoring step in ``WORKDIR/best``.

``config.eval.select_metric`` names what "best" means: one metric key of
``exgra_jax.eval.metrics.score`` (``"closed_accuracy"``) or the mean of several
(``"mean(open_recall,closed_accuracy)"``). The best params are an orbax checkpoint with one
step (the best one) whose ``meta`` item holds the score; a restart reads the previous best
from that checkpoint, so a worse later step never replaces it. ``WORKDIR/best/best.json``
is a readable copy of the record. ``launch/eval.py --step best`` and
``tools/convert_checkpoint.py to-hf --step best`` load it.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any

import jax
import numpy as np

from exgra_jax import paths
from exgra_jax.checkpoint import Checkpointer
from exgra_jax.eval import metrics
from exgra_jax.eval.checkpoint_loading import EvalModel, rules_of
from exgra_jax.eval.vqa import read_vqa, run_vqa
from exgra_jax.models import lora
from exgra_jax.workdir import ANSWERS_DIR, BEST_DIR, BEST_JSON

log = logging.getLogger("exgra_jax.train")

# Scores of exgra_jax.eval.metrics.score that can rank steps (the rest are counts).
SELECTABLE = ("closed_accuracy", "open_recall", "open_accuracy", "exact_match", "f1",
              "precision", "recall", "bleu")


# ============================================================================ the expression
@dataclasses.dataclass(frozen=True)
class SelectMetric:
    expression: str
    keys: tuple[str, ...]

    def __call__(self, metrics: dict[str, float]) -> float:
        return float(np.mean([metrics[k] for k in self.keys]))


def parse_select_metric(expression: str) -> SelectMetric:
    """``"KEY"`` or ``"mean(KEY,KEY,...)"`` over ``SELECTABLE`` keys; ValueError otherwise."""
    text = "".join(expression.split())
    mean = re.fullmatch(r"mean\((.*)\)", text)
    keys = tuple(mean.group(1).split(",")) if mean else (text,)
    form = "'KEY' or 'mean(KEY,KEY,...)'"
    if not all(re.fullmatch(r"\w+", k) for k in keys):
        raise ValueError(f"eval.select_metric={expression!r} is not {form}")
    unknown = [k for k in keys if k not in SELECTABLE]
    if unknown:
        raise ValueError(f"eval.select_metric={expression!r}: unknown metric {unknown}; "
                         f"choose from {list(SELECTABLE)}")
    if len(set(keys)) != len(keys):
        raise ValueError(f"eval.select_metric={expression!r} repeats a metric")
    return SelectMetric(expression, keys)


def defined_metric_keys(records, candidates) -> list[str]:
    """The score keys that have a value on these ground-truth records (``open_recall`` needs
    open questions, ``closed_accuracy`` closed ones, ``open_accuracy`` candidates)."""
    blank = [{"question_id": r["id"], "text": ""} for r in records]
    return [k for k, v in metrics.score(records, blank, candidates).items() if v is not None]


# ============================================================================ best params
class BestCheckpoint:
    """The params of the best step so far (orbax, one step kept) and its score."""

    def __init__(self, workdir: str, select: SelectMetric):
        self.directory = paths.join(workdir, BEST_DIR)
        self.select = select
        self.record: dict[str, Any] | None = None
        if paths.is_dir(self.directory):
            ckpt = self._open()
            step = ckpt.latest_step()
            if step is not None:
                self.record = ckpt.read_meta(step)["best"]
            ckpt.close()
        if self.record is not None and self.record["select_metric"] != select.expression:
            raise ValueError(
                f"{self.directory} holds the best step by {self.record['select_metric']!r} but "
                f"eval.select_metric is {select.expression!r}: restore the setting, or move "
                f"{self.directory} away to start the selection afresh")
        if self.record is not None:
            log.info("best step so far: %d (%s=%.4g)", self.record["step"],
                     select.expression, self.record["value"])
            self._write_json()  # a crash may have come between the save and the JSON

    def update(self, step: int, metrics: dict[str, float], params, meta: dict) -> bool:
        """Save ``params`` if ``step`` scores higher than the best so far (a tie keeps the
        earlier step). Every process calls this with the same metrics: saving is collective."""
        value = self.select(metrics)
        if self.record is not None and not value > self.record["value"]:
            return False
        record = {"step": step, "value": value, "select_metric": self.select.expression,
                  "metrics": metrics}
        ckpt = self._open()
        for old in ckpt.all_steps():
            # Only after a restart re-evaluated a step at or before the stored one.
            if old >= step:
                ckpt.manager.delete(old)
        ckpt.save(step, {"params": params}, None, {**meta, "best": record}, force=True)
        ckpt.close()  # waits for the save; keep=1 then drops the previous best
        self.record = record
        self._write_json()
        return True

    def _write_json(self) -> None:
        if jax.process_index() == 0:
            paths.write_json(paths.join(self.directory, BEST_JSON), self.record, indent=1)

    def _open(self) -> Checkpointer:
        # Opened per use: selection happens rarely, and nothing stays open on an error.
        return Checkpointer(self.directory, keep=1, async_save=False)


# ============================================================================ the evaluation
def answers_path(workdir: str, step: int) -> str:
    """The validation answers of ``step`` (scores beside them: ``.metrics.json``)."""
    return paths.join(workdir, ANSWERS_DIR, f"step_{step}.jsonl")


def _from_process_0(values: np.ndarray) -> np.ndarray:
    """Process 0's float64 values on every process (as bytes: without jax_enable_x64 a
    float64 broadcast would round to float32, and processes must decide alike)."""
    if jax.process_count() == 1:
        return values
    from jax.experimental import multihost_utils  # noqa: PLC0415

    raw = np.frombuffer(values.astype(np.float64).tobytes(), np.uint8)
    shared = np.asarray(multihost_utils.broadcast_one_to_all(raw), np.uint8)
    return np.frombuffer(shared.tobytes(), np.float64)


class VQASelection:
    """An evaluator (``exgra_jax.train.evaluators``): answers the validation questions
    (``config.eval``) with the training params at a step, scores them as ``launch/eval.py``
    does, and keeps the best step's params.

    Everything that can be wrong with the setting (the expression, the files, a metric the
    validation set cannot produce, a select metric changed on resume) fails here, before
    anything compiles.
    """

    name = "val_vqa"

    def __init__(self, config, workdir: str, model_config, tokenizer):
        self.select = parse_select_metric(config.eval.select_metric)
        records, _ = read_vqa(tuple(config.eval.json_paths))
        candidates = (metrics.read_candidates(config.eval.candidates)
                      if config.eval.candidates else None)
        self.keys = defined_metric_keys(records, candidates)
        missing = [k for k in self.select.keys if k not in self.keys]
        if missing:
            raise ValueError(f"eval.select_metric uses {missing}, which the validation set "
                             f"{list(config.eval.json_paths)} cannot score (no open or no "
                             "closed questions, or no eval.candidates for open_accuracy)")
        self.config, self.workdir = config, workdir
        self.model_config, self.tokenizer = model_config, tokenizer
        self.rules = rules_of(config)
        self.best = BestCheckpoint(workdir, self.select)

    def evaluate(self, step: int, params: dict, context) -> dict[str, float]:
        """Scores of ``params`` (the whole training params tree) at ``step``, the select
        value under ``"select"``; saves them as the best when they are. Collective: every
        process generates on the training mesh with the parameters sharded as they train
        (nothing is gathered to a host); process 0 writes and scores the answers."""
        params = lora.with_adapters(params, context.lora)  # generation uses merged kernels
        out = answers_path(self.workdir, step)
        if jax.process_index() == 0 and paths.exists(out):
            paths.write_text(out, "")  # a restart re-evaluates a step: answer afresh
        name = f"{paths.basename(self.workdir)}@{step}"
        model = EvalModel(self.model_config, params["model"], self.tokenizer, context.mesh,
                          self.rules, step, name)
        result = run_vqa(self.config, model, out, log=log.debug)
        local = np.array([result[k] if result else 0.0 for k in self.keys], np.float64)
        shared = _from_process_0(local)
        scores = {k: float(v) for k, v in zip(self.keys, shared, strict=True)}
        value = self.select(scores)
        improved = self.best.update(step, scores, params, context.checkpoint_meta)
        best = self.best.record
        log.info("step %d: %s=%.4g; best step %d (%.4g)%s", step, self.select.expression,
                 value, best["step"], best["value"], " (new)" if improved else "")
        return {**scores, "select": value, "best_step": float(best["step"]),
                "best_select": best["value"]}

    def final(self) -> dict[str, Any]:
        return {"best": self.best.record}
