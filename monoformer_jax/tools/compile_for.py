"""Compile a config's train steps and its sampler for a TPU slice, ahead of time, on this host.

    pip install -e '.[tpu]'   # libtpu: the TPU compiler (no TPU needed)
    python -m monoformer_jax.tools.compile_for --config=configs/imagenet256.py --topology=v5e:16x16 \\
        [--config.x=y ...] [--out report.json]

Nothing runs and no file is read: shapes come from the config (the rows of a diffusion step are
`data.image_seq_len` long, or long enough for a prompt of `data.max_prompt_tokens` tokens, an
upper bound). For every step kind the schedule uses, and for the sampler at the periodic grid's
batch, it reports per chip: the compiler's bytes (arguments, outputs, temporaries; donated state
counted once) against the chip's HBM and whether they fit; our own FLOP count beside the
compiler's; the compiler's `bytes accessed` and `optimal_seconds` (only where positive); and a
roofline: the step takes at least max(FLOPs / peak, bytes / HBM bandwidth, collective bytes /
interconnect bandwidth), so the predicted step time is a lower bound and the predicted MFU and
tokens/s/chip upper bounds. With scanned layers the compiler counts the loop body once, so the
cost figures come from a second compile with the layers unrolled (memory from the config as is).
The sampler has no predicted MFU (the compiler counts its loop once: see SAMPLER_MFU_NOTE).

A second sampler row, `sample_one_chip`, is what a sampling job needs: the sampler compiled for
one chip with the weights alone in `--sample_dtype` (bfloat16 by default, as `sample --dtype
bfloat16` opens them): the weights' bytes, the compiler's temporaries, and whether they fit.

A config that does not fit exits with status 2 and a message naming the largest arrays per chip
and the settings that shrink them (the report is still written with --out).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import time
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from etils import epath

from monoformer_jax import batch as batch_lib
from monoformer_jax import cli
from monoformer_jax.diffusion.options import ImageSampling
from monoformer_jax.model import attention
from monoformer_jax.model.config import ModelConfig
from monoformer_jax.run import chips as chips_lib
from monoformer_jax.run import config as config_lib
from monoformer_jax.run import open as open_lib
from monoformer_jax.run import sharding as sharding_lib
from monoformer_jax.run import state as state_lib
from monoformer_jax.sampling import image as image_lib
from monoformer_jax.sampling.decode import mesh_context
from monoformer_jax.train import metrics as metrics_lib
from monoformer_jax.train import steps as steps_lib
from monoformer_jax.train.trainer import make_scheduler

_COLLECTIVE = re.compile(
    r"=\s*(.*?)\s(all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)(?:-start)?\("
)
_SHAPE = re.compile(r"\b(pred|s8|u8|s16|u16|s32|u32|s64|u64|bf16|f16|f32|f64)\[([0-9,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4}
KNOBS = (
    "mesh.fsdp (shard the state over more chips: --config.mesh.data=1 --config.mesh.fsdp=-1)",
    "model.remat=full",
    "model.scan_layers=True",
    "a smaller data.image_batch_size / data.text_batch_size, or optimizer.grad_accum_steps",
)


class DoesNotFitError(ValueError):
  """A step needs more memory per chip than the chip has."""


def define_flags(fv, argv=()):
  cli.define_config(fv, argv, "Training config file (configs/*.py[:VARIANT]).")
  flags.DEFINE_string("topology", None, "TPU topology, e.g. v5e:16x16, v4:4x4x4, v5p:4x4x4, v6e:16x16.", flag_values=fv)
  flags.DEFINE_string("out", None, "Write the report as JSON here.", flag_values=fv)
  flags.DEFINE_enum(
      "sample_dtype",
      "bfloat16",
      list(open_lib.DTYPES),
      "Weights' dtype of the one-chip sampler row (what `sample --dtype` opens).",
      flag_values=fv,
  )
  flags.mark_flags_as_required(["config", "topology"], flag_values=fv)


def tpu_devices(topology: str):
  """The devices of a TPU slice of `topology`, described by libtpu on this (CPU) host."""
  # libtpu lets one process at a time hold it (a lock file) unless told otherwise; this tool only
  # compiles, so several may run side by side (and beside a TPU job on a TPU VM).
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    from jax.experimental import topologies  # pylint: disable=import-outside-toplevel  # experimental API
  except ImportError as e:  # pragma: no cover
    raise ValueError(f"this jax has no jax.experimental.topologies: {e}") from e
  try:
    return list(topologies.get_topology_desc(platform="tpu", topology_name=topology).devices)
  except Exception as e:  # pylint: disable=broad-except  # libtpu missing or a bad name: one message
    raise ValueError(
        f"cannot describe TPU topology {topology!r} ({type(e).__name__}: {str(e).splitlines()[0][:300]}); "
        "is libtpu installed (pip install -e '.[tpu]')?"
    ) from e


def row_shapes(config, model_config: ModelConfig) -> dict:
  """{step kind: (rows, row length, image slots)} of the batches the trainer would build."""
  d = config.data
  prompt = d.max_prompt_tokens
  tail_tokens = 1 if d.lm_loss_on_image_prompts else 0  # the newline of `<|im_end|>\n</s>`
  image_len = d.image_seq_len or (
      1
      + prompt
      + 1
      + int(model_config.has_t_token)
      + model_config.num_patches
      + ((2 + tail_tokens) if tail_tokens else 0)
  )
  slots = d.max_images_per_row
  if slots > 1 and not d.image_seq_len:  # documents (data/interleaved.py), a 1-token newline
    span = int(model_config.has_t_token) + model_config.num_patches
    image_len = 1 + slots * (prompt + 1 + span + 2) + 1
  return {
      "diffusion": (d.image_batch_size, image_len, slots),
      "ar": (d.text_batch_size, d.text_seq_len, 1),
      "mixed": (d.image_batch_size + d.text_batch_size, max(image_len, d.text_seq_len), slots),
  }


def abstract_batch(model_config: ModelConfig, rows: int, length: int, slots: int, mesh) -> dict:
  shape = (model_config.image_height, model_config.image_width, model_config.image_channels)
  example = batch_lib.empty_batch(rows, length, slots, shape)
  return {
      k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding_lib.batch_sharding(mesh, v.ndim))
      for k, v in example.items()
  }


def _with_shardings(abstract, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def shard_bytes(abstract_with_shardings) -> int:
  """Bytes of one chip's shard of every leaf (our own count, from the shardings)."""
  total = 0
  for leaf in jax.tree.leaves(abstract_with_shardings):
    total += int(np.prod(leaf.sharding.shard_shape(leaf.shape), dtype=np.int64)) * jnp.dtype(leaf.dtype).itemsize
  return total


def collective_bytes(hlo_text: str) -> int:
  """Bytes produced by the collectives of a compiled HLO module (their result shapes)."""
  total = 0
  for result, _ in _COLLECTIVE.findall(hlo_text):
    for dtype, dims in _SHAPE.findall(result):
      n = int(np.prod([int(x) for x in dims.split(",") if x], dtype=np.int64))
      total += n * _BYTES.get(dtype, 8)
  return total


def _costs(compiled) -> dict:
  costs = compiled.cost_analysis()
  if isinstance(costs, (list, tuple)):
    costs = costs[0] if costs else {}
  return dict(costs or {})


@contextlib.contextmanager
def _tracing_for_tpu(mesh):
  """Traces for the slice, not this CPU host: the TPU kernels (model/attention.py), and Mosaic
  reads the chip it compiles for from the default device (only while tracing: eager arrays
  cannot live on a described device)."""
  with attention.compiling_for("tpu"), jax.default_device(mesh.devices.flat[0]):
    yield


def _lower_train_step(config, model_config, kind, objective, mesh, rules, shape):
  optimizer = state_lib.make_optimizer(config.optimizer)
  abstract, shardings = state_lib.state_shardings(model_config, optimizer, mesh, rules)
  state = _with_shardings(abstract, shardings)
  batch = abstract_batch(model_config, *shape, mesh)
  rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=sharding_lib.replicated(mesh))
  step_fn = steps_lib.train_step_from_config(kind, config, model_config, objective, optimizer)
  run = steps_lib.compile_step(step_fn, shardings, mesh, rules, batch)
  with mesh, nn.logical_axis_rules(rules), _tracing_for_tpu(mesh):
    lowered = run.jitted.lower(state, batch, rng)
  return lowered, {"state": state, "batch": batch, "rng": rng}


def sample_rows(config) -> tuple[int, int]:
  """(rows, prompt length) of the periodic grid's sampling call (guided: [cond; uncond])."""
  n = config.sampling.grid_classes * config.sampling.num_per_class  # an upper bound: the classes are data
  return (2 * n if config.sampling.guidance_scale > 1 else n), config.data.max_prompt_tokens + 2


def _lower_sampler(config, model_config, objective, mesh, rules, dtype=None):
  """The cached-prefix sampler at the periodic grid's batch, its weights as a sampling job opens
  them (run.open: the weights alone, in `dtype`, sharded by the rules over `mesh`)."""
  params = open_lib.abstract_params(model_config, mesh, rules, dtype)
  rows, prompt = sample_rows(config)
  replicated = sharding_lib.replicated(mesh)
  ints = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32, sharding=replicated)
  objective = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=replicated), objective
  )
  s = config.sampling
  n = rows // 2 if s.guidance_scale > 1 else rows
  rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated)
  with mesh_context(mesh, rules), _tracing_for_tpu(mesh):
    lowered = image_lib._sample_cached.lower(  # pylint: disable=protected-access  # the compiled core itself
        params,
        ints(rows, prompt),
        ints(rows),
        ints(rows),
        rng,
        ints(n),
        objective,
        config=model_config,
        options=ImageSampling.from_config(s),
    )
  return lowered, {"params": params}


def _sample_flops(config, model_config) -> float:
  """Our count of one sampling call: each denoising step runs the image span over the cache."""
  rows, prompt = sample_rows(config)
  span = image_lib.span_length(model_config)
  per_step = metrics_lib.forward_flops_per_sequence(model_config, span, model_config.num_patches, lm_head=False)
  # The span also attends to the prompt's cached keys: 4 x q-width FLOPs per (query, key) pair.
  q = model_config.num_heads * model_config.dim_per_head
  per_step += model_config.num_layers * 4 * q * span * prompt
  prefill = metrics_lib.forward_flops_per_sequence(model_config, prompt, 0, lm_head=False)
  return float(rows * (config.sampling.num_steps * per_step + prefill))


_OUT_OF_HBM = re.compile(r"required for HLO temporaries \(([0-9.]+)([KMGT])\)")


def _out_of_memory(error: Exception, chip, own_flops: float) -> dict:
  """The report of a step the TPU compiler refused for its memory (temporaries beyond HBM)."""
  found = _OUT_OF_HBM.search(str(error))
  temps = int(float(found.group(1)) * 1024 ** " KMGT".index(found.group(2))) if found else None
  return {
      "fits": False,
      "bytes_per_chip": temps,
      "hbm_bytes_per_chip": chip.hbm_bytes,
      "temp_bytes": temps,
      "compiler_error": str(error).strip().splitlines()[-1][:500],
      "flops_per_step": own_flops,
      "optimal_seconds": None,
      "predicted_step_seconds": None,
      "predicted_mfu": None,
  }


# Why the sampler's report has no predicted MFU: a figure the tool cannot compute stays null.
SAMPLER_MFU_NOTE = (
    "the compiler counts the denoising loop's body once, so the roofline's compute term is our own "
    "FLOP count and an MFU from it would be 1 by construction; measure the sampler on a chip"
)


def analyse(lowered, cost_lowered, chip, num_chips: int, own_flops: float, tokens: float, sampler=False) -> dict:
  """The report of one step: bytes per device, costs, roofline. `chip`: one device's share of a
  chip. For the sampler the compiler's costs of its denoising loop are to be read with care (see
  benchmarks/RESULTS.md): the roofline's compute term takes the larger of its count and ours,
  and no MFU is predicted (`predicted_mfu_note` says why)."""
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    return _out_of_memory(e, chip, own_flops)
  cost_compiled = compiled if cost_lowered is None else cost_lowered.compile()
  costs = _costs(cost_compiled)
  flops = float(costs.get("flops", 0.0))
  accessed = float(costs.get("bytes accessed", 0.0))
  coll = collective_bytes(cost_compiled.as_text())
  own_per_chip = own_flops / num_chips
  compute_s = max(flops, own_per_chip) / chip.peak_flops
  hbm_s = accessed / chip.hbm_bytes_per_s
  ici_s = coll / chip.ici_bytes_per_s
  predicted = max(compute_s, hbm_s, ici_s)
  optimal = costs.get("optimal_seconds")
  return {
      **_memory(compiled, chip),
      "flops_per_step": own_flops,
      "flops_per_chip": own_per_chip,
      "compiler_flops_per_chip": flops,
      "compiler_bytes_accessed_per_chip": accessed,
      "collective_bytes_per_chip": coll,
      "optimal_seconds": float(optimal) if optimal is not None and float(optimal) > 0 else None,
      "roofline_seconds": {"compute": compute_s, "hbm": hbm_s, "interconnect": ici_s},
      "bound": max(("compute", compute_s), ("hbm", hbm_s), ("interconnect", ici_s), key=lambda kv: kv[1])[0],
      "predicted_step_seconds": predicted,
      "predicted_mfu": own_per_chip / (predicted * chip.peak_flops) if predicted > 0 and not sampler else None,
      **({"predicted_mfu_note": SAMPLER_MFU_NOTE} if sampler else {}),
      "tokens_per_s_per_chip": tokens / predicted / num_chips if predicted > 0 else None,
  }


def _memory(compiled, chip) -> dict:
  """The bytes a device of the compiled step holds, and whether they fit `chip`'s HBM."""
  memory = compiled.memory_analysis()
  args, outs = int(memory.argument_size_in_bytes), int(memory.output_size_in_bytes)
  temps, alias = int(memory.temp_size_in_bytes), int(memory.alias_size_in_bytes)
  total = args + outs + temps - alias
  return {
      "fits": total <= chip.hbm_bytes,
      "bytes_per_chip": total,
      "hbm_bytes_per_chip": chip.hbm_bytes,
      "argument_bytes": args,
      "output_bytes": outs,
      "temp_bytes": temps,
      "alias_bytes": alias,
  }


def _sampler_report(config, model_config, lowered, cost, device, num_devices: int) -> dict:
  rows, prompt = sample_rows(config)
  tokens = rows * config.sampling.num_steps * image_lib.span_length(model_config)
  return {
      "kind": "sample",
      "rows": rows,
      "row_length": prompt + image_lib.span_length(model_config),
      "num_steps": int(config.sampling.num_steps),
      **analyse(lowered, cost, device, num_devices, _sample_flops(config, model_config), tokens, sampler=True),
  }


def sample_on_one_chip(config, model_config, objective, devices, device, dtype) -> dict:
  """The sampler as a sampling job runs it on one chip of the slice (a laptop-sized job: one
  device, the weights alone in `dtype`): the bytes that device holds (the weights, which we
  count, plus the compiler's temporaries and outputs) and whether they fit its HBM."""
  one = sharding_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices[:1])
  rules = sharding_lib.rules_from_config(config.logical_axis_rules)
  lowered, shapes = _lower_sampler(config, model_config, objective, one, rules, dtype)
  out = _sampler_report(config, model_config, lowered, None, device, 1)
  out["weights_dtype"] = dtype or "float32"
  out["weight_bytes"] = shard_bytes(shapes["params"])
  return out


def compile_report(config, topology: str, devices=None, log=print, sample_dtype: str = "bfloat16") -> dict:
  """Compiles every step kind of `config`'s schedule and the sampler for `topology`: on the
  training mesh, and on one chip with its weights in `sample_dtype` (report["sample_one_chip"])."""
  chip = chips_lib.tpu_chip(topology)
  devices = tpu_devices(topology) if devices is None else devices
  # v4 slices come as one device per TensorCore (two a chip): each holds half the chip.
  cores = len({getattr(d, "core_on_chip", 0) for d in devices})
  device = chips_lib.per_core(chip, cores)
  scheduler = make_scheduler(config)
  config_lib.validate_config(config, scheduler.weights, num_devices=len(devices))
  model_config = config_lib.model_config_from(config)
  unrolled = model_config.replace(scan_layers=False) if model_config.scan_layers else None
  mesh = sharding_lib.make_mesh(config.mesh.to_dict(), devices)
  rules = sharding_lib.rules_from_config(config.logical_axis_rules)
  objective = config_lib.build_objective(config)
  abstract, shardings = state_lib.state_shardings(model_config, state_lib.make_optimizer(config.optimizer), mesh, rules)
  state = _with_shardings(abstract, shardings)
  report = {
      "topology": topology,
      "device_kind": devices[0].device_kind,
      "num_chips": len(devices) // cores,
      "num_devices": len(devices),
      "devices_per_chip": cores,
      "mesh": {k: int(v) for k, v in mesh.shape.items()},
      "attention": model_config.attention,
      "n_params": int(sum(np.prod(x.shape, dtype=np.int64) for x in jax.tree.leaves(abstract.params))),
      "state_bytes_per_chip": shard_bytes(state),
      "largest_state_arrays_per_chip": _largest(state),
      "steps": {},
  }
  lowering = _Lowering(config, model_config, unrolled, objective, mesh, rules)
  shapes = row_shapes(config, model_config)
  for kind in scheduler.weights:
    t0 = time.perf_counter()
    report["steps"][kind] = _train_step_report(lowering, kind, shapes[kind], device, len(devices))
    log(f"compiled the {kind} step in {time.perf_counter() - t0:.0f} s")
  if scheduler.weights.keys() & {"diffusion", "mixed"}:
    t0 = time.perf_counter()
    lowered, _ = _lower_sampler(config, model_config, objective, mesh, rules)
    cost = None if unrolled is None else _lower_sampler(config, unrolled, objective, mesh, rules)[0]
    report["steps"]["sample"] = _sampler_report(config, model_config, lowered, cost, device, len(devices))
    log(f"compiled the sampler in {time.perf_counter() - t0:.0f} s")
    t0 = time.perf_counter()
    report["sample_one_chip"] = sample_on_one_chip(config, model_config, objective, devices, device, sample_dtype)
    log(f"compiled the sampler for one chip in {time.perf_counter() - t0:.0f} s")
  return report


class _Lowering(NamedTuple):
  """What a report's steps are lowered with; `unrolled`: the model with its layers unrolled, whose
  costs the compiler counts (None: the layers are not scanned, the model's own are counted)."""

  config: Any
  model_config: ModelConfig
  unrolled: ModelConfig | None
  objective: Any
  mesh: Any
  rules: Any


def _train_step_report(lowering: _Lowering, kind: str, shape, device, num_devices: int) -> dict:
  """The report of the `kind` train step on rows of `shape` (rows, length, image slots)."""
  config, model_config, unrolled, objective, mesh, rules = lowering
  rows, length, slots = shape
  lowered, _ = _lower_train_step(config, model_config, kind, objective, mesh, rules, shape)
  cost = None if unrolled is None else _lower_train_step(config, unrolled, kind, objective, mesh, rules, shape)[0]
  image_tokens = model_config.num_patches * slots if kind != "ar" else 0
  own = metrics_lib.train_flops_per_step(model_config, rows, length, image_tokens, lm_head=kind != "diffusion")
  return {
      "kind": kind,
      "rows": rows,
      "row_length": length,
      **analyse(lowered, cost, device, num_devices, own, rows * length),
  }


def _largest(state, n: int = 5) -> list:
  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  sized = []
  for path, leaf in leaves:
    shard = leaf.sharding.shard_shape(leaf.shape)
    sized.append(
        (int(np.prod(shard, dtype=np.int64)) * jnp.dtype(leaf.dtype).itemsize, jax.tree_util.keystr(path), shard)
    )
  sized.sort(key=lambda x: -x[0])
  return [{"name": name, "bytes": b, "shard_shape": list(shape)} for b, name, shape in sized[:n]]


def check_fits(report) -> None:
  bad = {k: s for k, s in report["steps"].items() if not s["fits"]}
  if not bad:
    return
  gib = 1024**3
  steps = ", ".join(
      f"{k} needs {s['bytes_per_chip'] / gib:.1f} GiB (temporaries {s['temp_bytes'] / gib:.1f})"
      if s["bytes_per_chip"] is not None
      else f"{k}: {s.get('compiler_error')}"
      for k, s in bad.items()
  )
  largest = "; ".join(f"{a['name']} {a['bytes'] / gib:.2f} GiB" for a in report["largest_state_arrays_per_chip"][:3])
  hbm = next(iter(bad.values()))["hbm_bytes_per_chip"] / gib
  raise DoesNotFitError(
      f"does not fit {report['topology']} ({hbm:.0f} GiB HBM per chip, mesh {report['mesh']}): {steps}. "
      f"Largest state arrays per chip: {largest}. Settings that help: {'; '.join(KNOBS)}"
  )


def format_table(report) -> str:
  gib = 1024**3
  lines = [
      f"{report['topology']}: {report['num_chips']} chips ({report['device_kind']}, "
      f"{report['devices_per_chip']} device(s) a chip; figures per device), mesh {report['mesh']}, "
      f"{report['n_params']:,} parameters, state {report['state_bytes_per_chip'] / gib:.2f} GiB per chip",
      f"{'step':<20}{'fits':>5}{'GiB/chip':>10}{'of HBM':>8}{'TFLOP/chip':>12}{'compiler':>10}"
      f"{'bound':>14}{'step s >=':>11}{'MFU <=':>8}{'tok/s/chip <=':>15}",
  ]
  rows = list(report["steps"].items())
  if "sample_one_chip" in report:
    rows.append((f"sample@1 ({report['sample_one_chip']['weights_dtype']})", report["sample_one_chip"]))
  for kind, s in rows:
    if s["predicted_step_seconds"] is None:  # refused by the compiler for its memory
      lines.append(f"{kind:<20}{'NO':>5}{(s['bytes_per_chip'] or 0) / gib:>10.2f}{s['hbm_bytes_per_chip'] / gib:>8.0f}")
      continue
    mfu = f"{100 * s['predicted_mfu']:.1f}%" if s["predicted_mfu"] is not None else "-"
    tok = f"{s['tokens_per_s_per_chip']:,.0f}" if s["tokens_per_s_per_chip"] is not None else "-"
    lines.append(
        f"{kind:<20}{'yes' if s['fits'] else 'NO':>5}{s['bytes_per_chip'] / gib:>10.2f}"
        f"{s['hbm_bytes_per_chip'] / gib:>8.0f}"
        f"{s['flops_per_chip'] / 1e12:>12.3f}{s['compiler_flops_per_chip'] / 1e12:>10.3f}{s['bound']:>14}"
        f"{s['predicted_step_seconds']:>11.4f}{mfu:>8}{tok:>15}"
    )
  lines.append(
      "step s: a roofline lower bound (MFU and tokens/s: upper bounds; none for the sampler); "
      "sample@1: the sampler on one chip with its weights alone, as `sample --dtype` opens them; see --help."
  )
  return "\n".join(lines)


def run(fv, args) -> int:
  cli.refuse_arguments(args)
  # TPU executables cannot be loaded back on this host: keep them out of any persistent cache.
  jax.config.update("jax_enable_compilation_cache", False)
  report = compile_report(
      fv.config, fv.topology, log=lambda m: print(m, file=sys.stderr, flush=True), sample_dtype=fv.sample_dtype
  )
  print(format_table(report))
  if fv.out:
    epath.Path(fv.out).write_text(json.dumps(report, indent=2))
  check_fits(report)
  return 0


main = cli.entry_point(__doc__, define_flags, run)


if __name__ == "__main__":
  cli.run_as_script(main)
