"""Train an ExGra-Med model.

    python launch/train.py --config=configs/stage2_7b.py --workdir=gs://bucket/run \
        [--config.train.lr=2e-5 ...]

Resumes from the newest checkpoint in WORKDIR/checkpoints when there is one. SIGTERM or
Ctrl-C saves the current step and exits (a second Ctrl-C aborts at once). The full config
goes to WORKDIR/config.json, not to the console. On several hosts, every host runs this
same command (see launch/tpu_pod.sh, launch/gpu_multihost.sbatch).
"""

from absl import app, flags
from ml_collections import config_flags

from exgra_jax.runtime import setup_process

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and logs go here.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    setup_process()
    from exgra_jax.train import distributed  # noqa: PLC0415

    config = _CONFIG.value
    distributed.initialize(config.distributed)
    from exgra_jax.train.trainer import train_and_evaluate  # noqa: PLC0415 (after init)

    train_and_evaluate(config, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
