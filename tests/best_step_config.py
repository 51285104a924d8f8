"""Fine-tuning with best-step selection on the demo data, for tests/test_best_step.py.

    python launch/train.py --config=tests/best_step_config.py:DATA_DIR,VAL_JSON --workdir=W

(with tests/ on PYTHONPATH). A tiny model, the LM loss only, CLIP frozen, validation VQA
every 2 steps and a checkpoint at every evaluated step, so each has a reference.
"""

from eval_fixtures import tiny_config

SELECT = "mean(open_recall,closed_accuracy)"


def finetune_config(data_dir: str, val_json: str, **train):
    c = tiny_config(data_dir)
    c.alignment.enabled = False
    c.alignment.weight = 0.0
    c.train.trainable = (r"^model/projector/", r"^model/llm/")
    c.train.frozen = (r"^model/vision_tower/",)
    c.train.global_batch_size = 8
    c.train.total_steps = 8
    c.train.eval_every = 2
    c.train.checkpoint_every = 2
    c.train.keep_checkpoints = 10
    c.train.async_checkpoint = False
    c.train.log_every = 2
    c.train.warmup_frac = 0.0
    c.eval.json_paths = (val_json,)
    c.eval.batch_size = 8
    c.eval.select_metric = SELECT
    for k, v in train.items():
        c.train[k] = v
    return c


def get_config(arg: str):
    data_dir, val_json = arg.split(",")
    return finetune_config(data_dir, val_json)
