"""Exporting a run's weights for others: weights only, in the dtype asked, in one of three layouts.

  run       (ours) config.json, tokenizer/, class_names.json, weights.safetensors, export.json:
            `sample --workdir DIR`, `InferenceModel.from_workdir(DIR)`, `evaluate` and
            `--config.init_from=run:DIR` open it like the training run it came from.
  official  the released MonoFormer layout: config.json and ema/ (config.json + model.safetensors)
            under the official key names, with the tokenizer: `sample --official_checkpoint DIR`,
            `init_from=official:DIR` and the official PyTorch code read it. SD-VAE latent models
            only (the layout describes 8x-downsampled square latents and no label embedding).
  hf_llama  the language model alone as a transformers LlamaForCausalLM folder, with the tokenizer.

The folder must not exist or be empty. Locally everything is written into a sibling folder that is
renamed into place at the end; in a bucket, export.json / config.json come last. Either way a
reader never takes a half-written export for a whole one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid

import jax
from etils import epath

import monoformer_jax
from monoformer_jax import paths
from monoformer_jax.convert import checkpoints as convert_checkpoints
from monoformer_jax.run import open as open_lib
from monoformer_jax.run import weights_file
from monoformer_jax.run.config import CONFIG_FILE

FORMATS = ("run", "official", "hf_llama")


class ExportError(ValueError):
  """An export that cannot be made as asked (named reason)."""


def code_version() -> str:
  """The git commit of this package's checkout (with '+dirty' for local changes), else its version."""
  here = os.path.dirname(os.path.abspath(monoformer_jax.__file__))
  try:
    commit = subprocess.run(
        ["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    ).stdout.strip()
    return commit + ("+dirty" if dirty else "")
  except (OSError, subprocess.SubprocessError):
    return f"monoformer_jax {monoformer_jax.__version__}"


def export_run(workdir: str, out: str, *, fmt: str = "run", dtype=None, use_ema=None) -> dict:
  """Writes the weights of `workdir` (a run or an export) to the new folder `out`; returns the
  export's record (what export.json holds for the `run` format)."""
  if fmt not in FORMATS:
    raise ExportError(f"unknown format {fmt!r}: use one of {FORMATS}")
  target = epath.Path(out)
  if target.exists() and (not target.is_dir() or any(target.iterdir())):
    raise ExportError(f"{out} exists and is not an empty folder: give a new one (nothing was written)")
  run = open_lib.open_run(workdir, use_ema=use_ema, dtype=dtype)
  if fmt == "official" and not run.config.vae.path:
    raise ExportError(
        "the official layout holds SD-VAE latent models (image_size = 8 x latent size); this run draws "
        "pixels (no vae.path): export it as 'run' (or 'hf_llama' for its language model)"
    )
  record = {
      "format": fmt,
      "step": run.step,
      "weights": run.weights,
      "dtype": str(jax.tree.leaves(run.params)[0].dtype),
      "source": paths.absolute(workdir),
      "code": code_version(),
      "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
  }
  writer = {"run": _write_run, "official": _write_official, "hf_llama": _write_hf_llama}[fmt]
  if paths.is_local(out):
    staging = f"{os.path.abspath(out)}.partial-{uuid.uuid4().hex[:8]}"
    try:
      writer(run, workdir, epath.Path(staging), record)
      if target.exists():
        target.rmdir()  # empty, checked above
      os.replace(staging, out)
    finally:
      shutil.rmtree(staging, ignore_errors=True)
  else:
    writer(run, workdir, target, record)
  return record


def _copy_tokenizer(workdir, dest: epath.Path, name: str) -> None:
  dest.mkdir(parents=True, exist_ok=True)
  (dest / name).write_bytes((epath.Path(workdir) / open_lib.TOKENIZER_FILE).read_bytes())


def _write_run(run, workdir, out: epath.Path, record: dict) -> None:
  out.mkdir(parents=True, exist_ok=True)
  _copy_tokenizer(workdir, out / "tokenizer", "tokenizer.model")
  if run.class_names:
    (out / open_lib.CLASS_NAMES_FILE).write_text(json.dumps(list(run.class_names), indent=1))
  record["weight_bytes"] = weights_file.save_weights(
      out / open_lib.WEIGHTS_FILE, run.params, metadata={"step": str(run.step), "weights": run.weights}
  )
  (out / CONFIG_FILE).write_text((epath.Path(workdir) / CONFIG_FILE).read_text())
  paths.write_text_atomic(out / open_lib.EXPORT_FILE, json.dumps(record, indent=2))


def _write_official(run, workdir, out: epath.Path, record: dict) -> None:
  params = jax.device_get(run.params)
  try:
    config = convert_checkpoints.official_config(run.model_config, run.tokenizer.image_id)
  except ValueError as e:
    raise ExportError(str(e)) from None
  convert_checkpoints.save_official(
      params, run.model_config, str(out / "ema"), image_token_index=run.tokenizer.image_id
  )
  _copy_tokenizer(workdir, out, "tokenizer.model")
  # The official scripts load the tokenizer with transformers' AutoTokenizer from this folder.
  (out / "tokenizer_config.json").write_text(json.dumps(_hf_tokenizer_config(run.tokenizer), indent=1))
  (out / "export.json").write_text(json.dumps(record, indent=2))
  paths.write_text_atomic(out / "config.json", json.dumps(config, indent=2))


def _write_hf_llama(run, workdir, out: epath.Path, record: dict) -> None:
  convert_checkpoints.save_hf_llama(jax.device_get(run.params), run.model_config, str(out))
  _copy_tokenizer(workdir, out, "tokenizer.model")
  (out / "tokenizer_config.json").write_text(json.dumps(_hf_tokenizer_config(run.tokenizer), indent=1))
  paths.write_text_atomic(out / "export.json", json.dumps(record, indent=2))


def _hf_tokenizer_config(tokenizer) -> dict:
  """A LlamaTokenizer config whose added tokens are ours (`<PAD>`, `<image>`, `<|im_start|>`,
  `<|im_end|>` right after the SentencePiece pieces), so transformers gives the same ids."""
  added = {
      str(i): {"content": name, "special": True, "lstrip": False, "rstrip": False, "normalized": False}
      for name, i in tokenizer.special_ids.items()
  }
  return {
      "tokenizer_class": "LlamaTokenizer",
      "bos_token": "<s>",
      "eos_token": "</s>",
      "unk_token": "<unk>",
      "pad_token": "<PAD>",
      "add_bos_token": True,
      "add_eos_token": False,
      "legacy": False,
      "added_tokens_decoder": added,
  }
