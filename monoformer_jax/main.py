"""Entry point: `python -m monoformer_jax.main --config=configs/NAME.py[:VARIANT] --workdir=DIR`.

Override any field on the command line: `--config.optimizer.learning_rate=3e-4`. Unknown fields
and wrong types are refused by the (locked) config before anything is built. Multi-host: set
MONOFORMER_DISTRIBUTED=1 (the launch scripts do) to call `jax.distributed.initialize()` first;
on a single machine with several local processes, also set MONOFORMER_COORDINATOR=host:port,
MONOFORMER_NUM_PROCESSES and MONOFORMER_PROCESS_ID (see launch/local_multiprocess.sh).
"""

import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  from monoformer_jax.host_memory import tune_for_xla_cpu  # pylint: disable=import-outside-toplevel
  tune_for_xla_cpu()  # before JAX's first computation (see host_memory.py)
  from absl import logging  # pylint: disable=import-outside-toplevel
  logging.set_verbosity(logging.WARNING)  # orbax / jax INFO lines drown the progress report
  from monoformer_jax.distributed import maybe_initialize_distributed  # pylint: disable=import-outside-toplevel
  maybe_initialize_distributed()
  from monoformer_jax.train.setup import ConfigError  # pylint: disable=import-outside-toplevel
  from monoformer_jax.train.trainer import train_and_evaluate  # pylint: disable=import-outside-toplevel
  try:
    train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
