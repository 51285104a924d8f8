"""The layout of a training workdir: where every tool finds what the trainer wrote."""

CONFIG_JSON = "config.json"  # the resolved training config (absolute paths)
CHECKPOINTS = "checkpoints"  # orbax steps: state, data-iterator positions, meta
BEST_DIR = "best"  # the best validation step's params (fine-tuning with select_metric)
BEST_JSON = "best.json"  # a readable copy of the best step's record, inside BEST_DIR
ANSWERS_DIR = "val_vqa"  # validation answers and scores per evaluated step
FINAL_METRICS = "final_metrics.json"
TENSORBOARD = "tb"
BEST = "best"  # the --step value that names the best step
