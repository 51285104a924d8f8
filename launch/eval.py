"""Evaluate a checkpoint: medical VQA metrics, zero-shot multiple-choice accuracy, or the
GPT-judged medical chatbot evaluation (exgra_jax/eval/chatbot.py).

    python launch/eval.py --config=configs/demo.py --workdir=demo_out/run --task=vqa
    python launch/eval.py --config=configs/NAME.py --workdir=DIR --task=zero_shot \
        --config.eval.json_paths=omni.json --config.eval.image_folder=OmniMedVQA
    python launch/eval.py --config=configs/NAME.py --workdir=OUT_DIR --hf_dir=HF --task=vqa
    python launch/eval.py --workdir=DIR --task=chatbot --chatbot_questions=QA50.jsonl \
        --chatbot_images=IMAGES --judge_url=URL/v1 --judge_model=gpt-4  # key: $OPENAI_API_KEY

Weights: the newest checkpoint in WORKDIR/checkpoints (or --step N; --step best: the best
validation step that fine-tuning with config.eval.select_metric kept in WORKDIR/best), or a
llava-hf directory (--hf_dir; WORKDIR then only receives the outputs). A LoRA run's
checkpoints (adapters only) give the merged model: its base reloaded from the run's init
source, the adapters folded in. Without --config the
training config saved in WORKDIR/config.json is used. Answers go to --out (default
WORKDIR/eval/TASK_stepN.jsonl, or TASK_best_stepN.jsonl) and the metrics next to them
(.metrics.json); the metrics JSON is also printed as the last line. Rerunning resumes:
answered questions are skipped.
On several hosts, every host runs this same command.
"""

import json
import sys

from absl import app, flags
from ml_collections import config_flags

from exgra_jax.runtime import setup_process

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (default: "
                                          "WORKDIR/config.json).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (checkpoints; outputs).")
_TASK = flags.DEFINE_enum("task", "vqa", ["vqa", "zero_shot", "chatbot"], "What to evaluate.")
_STEP = flags.DEFINE_string("step", None, "Checkpoint step, or 'best' (the best validation "
                            "step kept while fine-tuning); default: the newest.")
_HF_DIR = flags.DEFINE_string("hf_dir", None, "Evaluate a llava-hf directory instead.")
_OUT = flags.DEFINE_string("out", None, "Answers file (JSON lines).")
_TEMPLATE = flags.DEFINE_string("template", None, "Conversation template (default: "
                                "config.data.template, the one the model was trained with).")
_LIMIT = flags.DEFINE_integer("limit", 0, "Answer at most this many new questions, then stop "
                              "(the file stays resumable); 0: all.")
_BUCKET = flags.DEFINE_integer("bucket", 32, "Prompt lengths are padded to a multiple of this.")
_CHAT_QUESTIONS = flags.DEFINE_string("chatbot_questions", None, "chatbot: LLaVA-Med qa50 "
                                      "questions (JSON lines).")
_CHAT_IMAGES = flags.DEFINE_string("chatbot_images", "", "chatbot: their image folder.")
_JUDGE_URL = flags.DEFINE_string("judge_url", None, "chatbot: OpenAI-compatible base URL "
                                 "of the judge (ending in /v1).")
_JUDGE_MODEL = flags.DEFINE_string("judge_model", "gpt-4", "chatbot: the judge model.")
_JUDGE_KEY_ENV = flags.DEFINE_string("judge_key_env", "OPENAI_API_KEY", "chatbot: the "
                                     "environment variable holding the judge's API key.")
_JUDGE_CONCURRENCY = flags.DEFINE_integer("judge_concurrency", 4, "chatbot: judge requests "
                                          "in flight at once.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
    del argv
    setup_process()
    from exgra_jax import paths  # noqa: PLC0415
    from exgra_jax.config_paths import EVAL_FIELDS, check_config_paths  # noqa: PLC0415
    from exgra_jax.eval.checkpoint_loading import parse_step, read_workdir_config  # noqa: PLC0415
    from exgra_jax.train import distributed  # noqa: PLC0415
    from exgra_jax.workdir import BEST  # noqa: PLC0415

    try:
        step = parse_step(_STEP.value)
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    chatbot = _chatbot_runner() if _TASK.value == "chatbot" else None
    workdir = _WORKDIR.value
    config = _CONFIG.value if _CONFIG.value is not None else read_workdir_config(workdir)
    check_config_paths(config, only=EVAL_FIELDS[:-1] if _HF_DIR.value else EVAL_FIELDS)
    distributed.initialize(config.distributed)
    import jax  # noqa: PLC0415

    from exgra_jax.eval.checkpoint_loading import load_for_eval  # noqa: PLC0415
    from exgra_jax.eval.vqa import metrics_path, run_vqa  # noqa: PLC0415
    from exgra_jax.eval.zero_shot import run_zero_shot  # noqa: PLC0415

    if _HF_DIR.value:
        model = load_for_eval(config, hf_dir=_HF_DIR.value)
        tag = "hf"
    else:
        model = load_for_eval(config, workdir=workdir, step=step)
        tag = f"best_step{model.step}" if step == BEST else f"step{model.step}"
    out = _OUT.value or paths.join(workdir, "eval", f"{_TASK.value}_{tag}.jsonl")
    first = jax.process_index() == 0
    # Progress to stderr; stdout carries only the metrics JSON.
    log = (lambda text: print(text, file=sys.stderr, flush=True)) if first else (lambda text: None)
    log(f"evaluating {model.name} ({_TASK.value}) -> {out}")
    run = chatbot or (run_vqa if _TASK.value == "vqa" else run_zero_shot)
    result = run(config, model, out, template=_TEMPLATE.value, limit=_LIMIT.value,
                 bucket=_BUCKET.value, log=log)
    if first and result is not None:
        log(f"metrics written to {metrics_path(out)}")
        print(json.dumps(result), flush=True)


def _chatbot_runner():
    import functools  # noqa: PLC0415

    from exgra_jax.eval.chatbot import run_chatbot  # noqa: PLC0415
    from exgra_jax.eval.judge import JudgeClient  # noqa: PLC0415

    if not _CHAT_QUESTIONS.value or not _JUDGE_URL.value:
        raise app.UsageError("--task=chatbot needs --chatbot_questions and --judge_url")
    judge = JudgeClient(_JUDGE_URL.value, _JUDGE_MODEL.value, api_key_env=_JUDGE_KEY_ENV.value)
    return functools.partial(run_chatbot, questions_path=_CHAT_QUESTIONS.value,
                             image_folder=_CHAT_IMAGES.value, judge=judge,
                             concurrency=_JUDGE_CONCURRENCY.value)


if __name__ == "__main__":
    app.run(main)
