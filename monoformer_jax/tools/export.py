"""Export a run's weights, and only its weights, for others to load.

    python -m monoformer_jax.tools.export --workdir runs/mnist_tiny --out exported/mnist_tiny
    python -m monoformer_jax.tools.export --workdir gs://b/runs/in256 --out in256_official \\
        --format official --dtype bfloat16
    python -m monoformer_jax.tools.export --workdir runs/t2i --out tinyllama_t2i --format hf_llama

--format run (the default) writes a folder that `sample --workdir DIR`, `evaluate`,
`InferenceModel.from_workdir(DIR)` and `--config.init_from=run:DIR` open like the run it came from
(config.json, tokenizer/, class_names.json, weights.safetensors, export.json: the step, whether
EMA or raw weights, the dtype, the source and the code's commit). --format official writes the
released MonoFormer layout (config.json + ema/), for latent (SD-VAE) models; --format hf_llama the
language model as a transformers LLaMA folder. The EMA weights unless --nouse_ema. The output
folder must be new or empty; nothing is left half-written.
"""

from __future__ import annotations

import json
import sys

from absl import flags

from monoformer_jax import cli
from monoformer_jax.host_memory import tune_for_xla_cpu
from monoformer_jax.run import export as export_lib
from monoformer_jax.run.open import DTYPES


def define_flags(fv, argv=()):
  del argv  # no config file: the flags alone
  flags.DEFINE_string("workdir", None, "The run (a training workdir or an export) to export.", flag_values=fv)
  flags.DEFINE_string("out", None, "The new folder to write.", flag_values=fv)
  flags.DEFINE_enum("format", "run", list(export_lib.FORMATS), "Layout of the folder.", flag_values=fv)
  flags.DEFINE_enum("dtype", None, list(DTYPES), "Weights' dtype (default: as stored, float32).", flag_values=fv)
  flags.DEFINE_bool("use_ema", None, "EMA weights (default) or, with --nouse_ema, the raw ones.", flag_values=fv)
  flags.mark_flags_as_required(["workdir", "out"], flag_values=fv)


def run(fv, args) -> int:
  cli.refuse_arguments(args)
  tune_for_xla_cpu()  # before JAX's first computation (see host_memory.py)
  record = export_lib.export_run(fv.workdir, fv.out, fmt=fv.format, dtype=fv.dtype, use_ema=fv.use_ema)
  print(json.dumps(record, indent=2))
  print(f"exported step {record['step']} ({record['weights']} weights) to {fv.out}", file=sys.stderr)
  return 0


main = cli.entry_point(__doc__, define_flags, run)


if __name__ == "__main__":
  cli.run_as_script(main)
