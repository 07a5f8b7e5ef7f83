"""Sample images and text from a training run (EMA weights, the run's config defaults).

    python -m monoformer_jax.sample --workdir DIR --classes 0,1,2,3,4,5,6,7,8,9 \\
        --num_per_class 20 --out samples.npz          # + samples.png, a row per class
    python -m monoformer_jax.sample --workdir DIR --prompt "The" --max_new_tokens 64

`--out` writes `images` (uint8, N x H x W x C; MNIST: white digits on black) and `labels` (N,).
Sampler, steps, guidance scale and CFG mode default to the run's `config.sampling`; override them
with the flags. Per-sample seeds come from `fold_in(seed, sample index)`, so a sample does not
depend on the batch size.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", None, "Training run directory.")
_CLASSES = flags.DEFINE_string("classes", None, "Comma-separated class ids (or names) to draw.")
_NUM_PER_CLASS = flags.DEFINE_integer("num_per_class", None, "Samples per class.")
_OUT = flags.DEFINE_string("out", None, "Output .npz for images (a .png grid is written beside).")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "Text prompt(s) to continue.")
_PROMPT_FILE = flags.DEFINE_string("prompt_file", None, "File with one text prompt per line.")
_SAMPLER = flags.DEFINE_string("sampler", None, "ddpm | ddim (gaussian), euler | heun (flow).")
_STEPS = flags.DEFINE_integer("num_steps", None, "Sampling steps.")
_SCALE = flags.DEFINE_float("guidance_scale", None, "Classifier-free guidance scale (>= 1).")
_CFG_MODE = flags.DEFINE_enum("cfg_mode", None, ["eps", "official_first3"], "Guided channels.")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")
_BATCH = flags.DEFINE_integer("batch_size", 200, "Images sampled per compiled call.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", None, "Tokens to generate per prompt.")
_TEMPERATURE = flags.DEFINE_float("temperature", None, "Text sampling temperature.")
_USE_EMA = flags.DEFINE_bool("use_ema", True, "Use the EMA weights.")


class UsageError(ValueError):
  pass


def parse_classes(spec: str, names) -> list[int]:
  out = []
  for item in (s.strip() for s in spec.split(",")):
    if not item:
      raise UsageError(f"--classes: empty entry in {spec!r}")
    if item.isdigit():
      c = int(item)
      if not 0 <= c < len(names):
        raise UsageError(f"--classes: class id {c} is out of range (the run has {len(names)} "
                         "classes)")
    elif item in names:
      c = list(names).index(item)
    else:
      raise UsageError(f"--classes: unknown class {item!r} (known: {', '.join(names)})")
    out.append(c)
  return out


def sample_images(workdir, classes, num_per_class, *, seed=0, batch_size=200, sampler=None,
                  num_steps=None, guidance_scale=None, cfg_mode=None, use_ema=True):
  """(uint8 images (N, H, W, C), labels (N,)) drawn from a run."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from monoformer_jax.train import periodic_samples as ps  # pylint: disable=import-outside-toplevel
  from monoformer_jax.train.checkpointing import load_for_inference  # pylint: disable=import-outside-toplevel
  from monoformer_jax.train.setup import build_objective, class_names  # pylint: disable=import-outside-toplevel
  config, model_config, params, tok = load_for_inference(workdir, use_ema=use_ema)
  names = class_names(config)
  if not names:
    raise UsageError(f"the run in {workdir} has no class names (not a class-conditional run)")
  classes = parse_classes(classes, names) if isinstance(classes, str) else list(classes)
  s = config.sampling
  scale = s.guidance_scale if guidance_scale is None else guidance_scale
  if scale < 1:
    raise UsageError(f"--guidance_scale must be >= 1 (1 = no guidance), got {scale}")
  if num_per_class is not None and num_per_class < 1:
    raise UsageError("--num_per_class must be >= 1")
  labels = np.repeat(np.asarray(classes), num_per_class or s.num_per_class)
  objective = build_objective(config)
  rng = jax.random.key(seed)
  chunks = []
  for start in range(0, len(labels), batch_size):
    chunk = labels[start:start + batch_size]
    # Noise is keyed by the sample's global index, whatever the batch size.
    images = ps.sample_class_images(
        params, model_config, objective, tok, chunk, names, rng=rng,
        sample_ids=np.arange(start, start + len(chunk)), sampler=sampler or s.sampler,
        num_steps=num_steps or s.num_steps, guidance_scale=scale,
        cfg_mode=cfg_mode or s.cfg_mode, eta=s.eta)
    chunks.append(ps.decode_images(images, config))
  return ps.to_uint8(np.concatenate(chunks)), labels


def generate(workdir, prompts, *, seed=0, max_new_tokens=None, temperature=None, use_ema=True):
  import jax  # pylint: disable=import-outside-toplevel
  from monoformer_jax.train import periodic_samples as ps  # pylint: disable=import-outside-toplevel
  from monoformer_jax.train.checkpointing import load_for_inference  # pylint: disable=import-outside-toplevel
  if not prompts or any(not p.strip() for p in prompts):
    raise UsageError("--prompt: empty prompt")
  config, model_config, params, tok = load_for_inference(workdir, use_ema=use_ema)
  s = config.sampling
  return ps.generate_text(params, model_config, tok, prompts, rng=jax.random.key(seed),
                          max_new_tokens=max_new_tokens or s.max_new_tokens,
                          temperature=s.temperature if temperature is None else temperature,
                          top_k=s.top_k, top_p=s.top_p)


def main(argv):
  del argv
  import numpy as np  # pylint: disable=import-outside-toplevel
  from absl import logging  # pylint: disable=import-outside-toplevel
  logging.set_verbosity(logging.WARNING)
  try:
    if not _WORKDIR.value or not os.path.isdir(_WORKDIR.value):
      raise UsageError(f"--workdir: no such run directory {_WORKDIR.value!r}")
    prompts = list(_PROMPT.value)
    if _PROMPT_FILE.value:
      if not os.path.isfile(_PROMPT_FILE.value):
        raise UsageError(f"--prompt_file: no such file {_PROMPT_FILE.value!r}")
      with open(_PROMPT_FILE.value) as f:
        prompts += [line.rstrip("\n") for line in f if line.strip()]
    if _PROMPT.present and not prompts:
      raise UsageError("--prompt: empty prompt")
    if not prompts and _CLASSES.value is None:
      raise UsageError("nothing to do: give --classes (images) and/or --prompt (text)")
    if prompts:
      texts = generate(_WORKDIR.value, prompts, seed=_SEED.value,
                       max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value,
                       use_ema=_USE_EMA.value)
      for p, t in zip(prompts, texts):
        print(json.dumps({"prompt": p, "completion": t}, ensure_ascii=False))
    if _CLASSES.value is not None:
      if not _OUT.value:
        raise UsageError("--out: give the .npz file to write the images to")
      images, labels = sample_images(
          _WORKDIR.value, _CLASSES.value, _NUM_PER_CLASS.value, seed=_SEED.value,
          batch_size=_BATCH.value, sampler=_SAMPLER.value, num_steps=_STEPS.value,
          guidance_scale=_SCALE.value, cfg_mode=_CFG_MODE.value, use_ema=_USE_EMA.value)
      from monoformer_jax.train import periodic_samples as ps  # pylint: disable=import-outside-toplevel
      out = _OUT.value
      os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
      np.savez(out, images=images, labels=labels)
      rows = len(np.unique(labels))
      ps.save_png(os.path.splitext(out)[0] + ".png", ps.grid(images, rows=rows))
      print(f"wrote {len(images)} images to {out}")
  except (UsageError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
