"""Serve the browser demo of a run (see monoformer_jax/demo/__init__.py):

    python -m monoformer_jax.demo --workdir runs/mnist_tiny [--port 8000] [--host 127.0.0.1]
    python -m monoformer_jax.demo --workdir pretrained:all_in_one

then open the printed address. `--workdir` is a training run's directory or a shipped
`pretrained:NAME`. The page draws digits by class or caption, reads a digit drawn with the mouse
(a run trained to read images) and continues text; what the run cannot do is shown disabled, with
the reason. `--host 0.0.0.0` serves other machines too (there is no login: mind who can reach it).
"""

from __future__ import annotations

import sys

from absl import flags, logging
from etils import epath

from monoformer_jax import cli
from monoformer_jax.compilation_cache import enable_compilation_cache
from monoformer_jax.demo.server import DemoServer
from monoformer_jax.demo.service import DemoService
from monoformer_jax.host_memory import tune_for_xla_cpu
from monoformer_jax.inference import InferenceModel

PRETRAINED_PREFIX = "pretrained:"


def define_flags(fv, argv=()):
  del argv  # no config file: the flags alone
  flags.DEFINE_string(
      "workdir", None, "Training run directory, or pretrained:NAME for shipped weights.", flag_values=fv
  )
  flags.DEFINE_integer("port", 8000, "Port to serve on (0: any free port).", flag_values=fv)
  flags.DEFINE_string("host", "127.0.0.1", "Address to serve on (0.0.0.0: every interface).", flag_values=fv)


def run(fv, args) -> int:
  cli.refuse_arguments(args)
  if not fv.workdir:
    raise cli.UsageError("--workdir: give a run directory or pretrained:NAME")
  if not fv.workdir.startswith(PRETRAINED_PREFIX) and not epath.Path(fv.workdir).is_dir():
    raise cli.UsageError(f"--workdir: no such run directory {fv.workdir!r}")
  if not 0 <= fv.port <= 65535:
    raise cli.UsageError(f"--port must be in 0..65535, got {fv.port}")
  tune_for_xla_cpu()  # before JAX's first computation (see host_memory.py)
  enable_compilation_cache()  # a later start loads what this one compiles (compilation_cache.py)
  logging.set_verbosity(logging.WARNING)
  print(f"loading {fv.workdir} ...", file=sys.stderr, flush=True)
  service = DemoService(InferenceModel.from_workdir(fv.workdir), source=fv.workdir)
  try:
    server = DemoServer(service, fv.host, fv.port)
  except OSError as e:
    raise cli.UsageError(f"--port {fv.port}: cannot serve on {fv.host}:{fv.port} ({e.strerror or e})") from None
  for feature, reason in service.features.items():
    if reason:
      print(f"{feature}: off ({reason})", file=sys.stderr)
  print(f"serving the demo at {server.url} (Ctrl-C stops it)", file=sys.stderr, flush=True)
  try:
    server.serve_forever()
  except KeyboardInterrupt:
    print("stopped", file=sys.stderr)
  finally:
    server.server_close()
  return 0


main = cli.entry_point(__doc__, define_flags, run)


if __name__ == "__main__":
  cli.run_as_script(main)
