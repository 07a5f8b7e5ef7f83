"""Training: `python -m monoformer_jax.main --config=configs/NAME.py[:VARIANT] --workdir=DIR`.

Override any field on the command line: `--config.optimizer.learning_rate=3e-4`. Unknown fields
and wrong types are refused by the (locked) config before anything is built. DIR may be a local
folder or a bucket path (gs://...). Multi-host: set MONOFORMER_DISTRIBUTED=1 (the launch scripts
do) to call `jax.distributed.initialize()` first; on a single machine with several local
processes, also MONOFORMER_COORDINATOR=host:port, MONOFORMER_NUM_PROCESSES and
MONOFORMER_PROCESS_ID (see launch/local_multiprocess.sh).
"""

from absl import flags, logging

from monoformer_jax import cli
from monoformer_jax.compilation_cache import enable_compilation_cache
from monoformer_jax.distributed import maybe_initialize_distributed
from monoformer_jax.host_memory import tune_for_xla_cpu
from monoformer_jax.train.trainer import train_and_evaluate


def define_flags(fv, argv=()):
  """`argv`: the command line, where the config flag finds its --config.FIELD overrides."""
  cli.define_config(fv, argv, "Training config file (configs/*.py[:VARIANT]).")
  flags.DEFINE_string(
      "workdir", None, "Directory (or gs:// path) for checkpoints, metrics and samples.", flag_values=fv
  )
  flags.mark_flags_as_required(["config", "workdir"], flag_values=fv)


def run(fv, args, hooks=()) -> int:
  if args:
    raise cli.UsageError(f"unexpected arguments {args} (config fields are set as --config.FIELD=VALUE)")
  tune_for_xla_cpu()  # before JAX's first computation (see host_memory.py)
  enable_compilation_cache()  # a later run loads what this one compiles (compilation_cache.py)
  logging.set_verbosity(logging.WARNING)  # orbax / jax INFO lines drown the progress report
  maybe_initialize_distributed()
  train_and_evaluate(fv.config, fv.workdir, hooks=hooks)
  return 0


def main(argv=None, hooks=()) -> int:
  """`hooks`: see train.trainer (the tests inject faults through them)."""
  return cli.main(__doc__, define_flags, lambda fv, args: run(fv, args, hooks), argv)


if __name__ == "__main__":
  cli.run_as_script(main)
