"""Multi-host start-up shared by every entry point (no absl flags here: importable anywhere).

Set MONOFORMER_DISTRIBUTED=1 (the launch scripts do) to call `jax.distributed.initialize()`;
with several processes on one machine also MONOFORMER_COORDINATOR=host:port,
MONOFORMER_NUM_PROCESSES and MONOFORMER_PROCESS_ID (see launch/local_multiprocess.sh). Without
MONOFORMER_COORDINATOR, JAX finds the processes itself: TPU pods, and SLURM from the SLURM_*
variables srun sets (launch/gpu_slurm.sbatch; tests/test_slurm_launch.py simulates it).

`initialize` also installs JAX's SIGTERM notifier and preemption sync service, on which the
trainer's preemption handling relies under jax.distributed (train/preemption.py).
"""

import os


def maybe_initialize_distributed() -> None:
  import jax  # pylint: disable=import-outside-toplevel

  if os.environ.get("MONOFORMER_DISTRIBUTED") != "1":
    return
  coordinator = os.environ.get("MONOFORMER_COORDINATOR")
  if coordinator:
    jax.distributed.initialize(
        coordinator, int(os.environ["MONOFORMER_NUM_PROCESSES"]), int(os.environ["MONOFORMER_PROCESS_ID"])
    )
  else:  # TPU pods / SLURM: discovered from the environment
    jax.distributed.initialize()
  expected = os.environ.get("MONOFORMER_NUM_PROCESSES")
  if expected and jax.process_count() != int(expected):
    raise RuntimeError(f"expected {expected} processes, jax sees {jax.process_count()}")
  print(
      f"process {jax.process_index()} of {jax.process_count()}, "
      f"{jax.local_device_count()} local / {jax.device_count()} global devices",
      flush=True,
  )
