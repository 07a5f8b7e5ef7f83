"""Text-to-image samples for scoring (CLIP score, FID): prompts from a file, as the official
PartiPrompts sampler (`sample_t2i.py`) draws them, written with the settings that drew them.

Sample i is drawn from prompt i mod P (the official sampler's cycle over its prompt list), as
`<s>Please generate an image of {prompt}<|im_start|>` (the training prefix, cut to the run's
data.max_prompt_tokens) guided against `<s><|im_start|>`, with noise from fold_in(key(seed), i)
and every prompt padded to the longest of the file: an image depends on its seed, prompt and
index only, the same on one device or eight, on one host or many. Work is cut into chunks of
`chunk` consecutive indices; chunk c is drawn by process c mod process_count, written as
`samples_<start>.npz` (images uint8, labels = the prompt's index, indices; what
`sample_dirs.load_samples` reads back and checks) and as `images/<index>.png`. Chunks already on
disk are skipped, so an interrupted run resumes; `manifest.json` records every setting (a resume
with others is refused, naming them).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import jax
import numpy as np
from etils import epath

from monoformer_jax import paths
from monoformer_jax.data import sequences as seq
from monoformer_jax.evaluation import sample_dirs
from monoformer_jax.run import images as images_lib
from monoformer_jax.run import open as open_lib
from monoformer_jax.sampling import classes as classes_lib
from monoformer_jax.sampling.image import sample_images

SCHEME = "t2i-1"
# What two sample sets differ in (num_samples may grow on resume, workdir may move).
MUST_MATCH = (
    "scheme",
    "prompts_sha256",
    "num_prompts",
    "samples_per_prompt",
    "chunk",
    "seed",
    "use_ema",
    "step",
    "sampling",
    "prompt_prefix",
    "max_prompt_tokens",
)


def read_prompts(path: str) -> list[str]:
  """The prompts of a file: a JSON list of strings or of {"prompt": ...} (the official
  parti_prompts.json), JSONL of either, TSV with a `Prompt` column (PartiPrompts.tsv), or
  plain text, one prompt a line. Errors name the file and the entry."""
  p = epath.Path(path)
  if not p.is_file():
    raise FileNotFoundError(f"no such prompts file {path!r}")
  text = p.read_text(encoding="utf-8")
  if path.endswith(".json"):
    try:
      entries = json.loads(text)
    except ValueError as e:
      raise ValueError(f"{path}: not JSON ({e})") from None
    if not isinstance(entries, list):
      raise ValueError(f"{path}: expected a JSON list of prompts")
  elif path.endswith(".jsonl"):
    try:
      entries = [json.loads(line) for line in text.split("\n") if line.strip()]
    except ValueError as e:
      raise ValueError(f"{path}: not JSON lines ({e})") from None
  elif path.endswith(".tsv"):
    rows = [line.split("\t") for line in text.split("\n") if line.strip()]
    if not rows or "Prompt" not in rows[0]:
      raise ValueError(f"{path}: a TSV needs a header with a 'Prompt' column (as PartiPrompts.tsv)")
    column = rows[0].index("Prompt")
    entries = [row[column] if column < len(row) else "" for row in rows[1:]]
  else:
    entries = [line for line in text.split("\n") if line.strip()]
  prompts = []
  for i, entry in enumerate(entries):
    prompt = entry.get("prompt") if isinstance(entry, dict) else entry
    if not isinstance(prompt, str) or not prompt.strip():
      raise ValueError(f"{path}: prompt {i} is empty or not text ({str(entry)[:80]!r})")
    prompts.append(prompt.strip())
  if not prompts:
    raise ValueError(f"{path}: no prompts")
  return prompts


def prompt_ids(tokenizer, prompt: str, max_prompt_tokens: int) -> list[int]:
  """`<s>{prefix}{prompt}<|im_start|>`, the prompt cut as training cuts it."""
  return [tokenizer.bos_id, *tokenizer.encode(seq.T2I_PREFIX + prompt)[:max_prompt_tokens], tokenizer.im_start_id]


def generate(
    workdir: str,
    out_dir: str,
    prompts: list[str],
    *,
    samples_per_prompt: int = 1,
    seed: int = 0,
    chunk: int = 64,
    sampling: dict | None = None,
    use_ema: bool = True,
    devices=None,
    mesh: str = "",
    dtype=None,
    share: tuple[int, int] | None = None,
) -> dict:
  """Draws this process's missing chunks of a run's prompt samples; returns the manifest.
  `sampling` overrides the run's image-sampling options (diffusion.ImageSampling fields);
  `devices`, `mesh` and `dtype` as fid_samples.generate takes them. `share` (index, count): the
  chunks c with c mod count = index (default: this process's of jax.distributed's; independent
  jobs without it can split the work so too)."""
  if samples_per_prompt < 1 or chunk < 1:
    raise ValueError(f"samples_per_prompt and chunk must be positive, got {samples_per_prompt} and {chunk}")
  devices = list(devices or jax.local_devices())
  mesh = open_lib.mesh_from_spec(mesh or "", devices)
  run = open_lib.open_run(workdir, use_ema=use_ema, dtype=dtype, mesh=mesh)
  options = run.image_sampling.replace(**(sampling or {}))
  max_tokens = int(run.config.data.max_prompt_tokens)
  num_samples = len(prompts) * samples_per_prompt
  manifest = {
      "scheme": SCHEME,
      "prompts_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest(),
      "num_prompts": len(prompts),
      "samples_per_prompt": int(samples_per_prompt),
      "num_samples": num_samples,
      "chunk": int(chunk),
      "seed": int(seed),
      "use_ema": bool(use_ema),
      "step": run.step,
      **({"dtype": dtype} if dtype not in (None, "float32") else {}),
      "workdir": paths.absolute(workdir),
      "sampling": dataclasses.asdict(options),
      "prompt_prefix": seq.T2I_PREFIX,
      "max_prompt_tokens": max_tokens,
  }
  epath.Path(out_dir, "images").mkdir(parents=True, exist_ok=True)
  sample_dirs.check_and_write_manifest(out_dir, manifest, MUST_MATCH)
  ids = [prompt_ids(run.tokenizer, p, max_tokens) for p in prompts]
  pad_to = max(map(len, ids))

  def draw(idx, padded):
    which = padded % len(prompts)
    images = sample_images(
        run.params,
        run.model_config,
        run.objective,
        [ids[k] for k in which],
        options=options,
        uncond_prompt=classes_lib.unconditional_prompt(run.tokenizer),
        rng=jax.random.key(seed),
        sample_ids=padded,
        pad_to=pad_to,
        mesh=mesh,
        rules=run.rules,
    )
    pixels = images_lib.to_uint8(images_lib.decode_images(images, run.config.vae.path, run.config.vae.scale))
    pixels = pixels[: len(idx)]
    for i, image in zip(idx, pixels):  # before the chunk: a chunk on disk has its PNGs too
      images_lib.save_png(os.path.join(out_dir, "images", f"{i:06d}.png"), image)
    return pixels, which[: len(idx)].astype(np.int32)

  sample_dirs.draw_missing_chunks(out_dir, num_samples, chunk, len(devices), draw, share)
  return manifest
