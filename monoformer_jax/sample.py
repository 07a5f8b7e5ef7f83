"""Sample images and text from a training run or a converted checkpoint (prefix KV-cached).

    python -m monoformer_jax.sample --workdir DIR --classes 0,1,2,3,4,5,6,7,8,9 \\
        --num_per_class 20 --out samples.npz          # + samples.png, a row per class
    python -m monoformer_jax.sample --workdir DIR --prompt "The" --max_new_tokens 64
    python -m monoformer_jax.sample --workdir DIR --t2i_prompt "a seven" --out t2i.png
    python -m monoformer_jax.sample --workdir DIR --interleaved --out parts \\
        --prompt "Please generate an image of seven.<|im_start|>"
    python -m monoformer_jax.sample --official_checkpoint MonoFormer_ImageNet_256 \\
        --tokenizer tokenizer.model --class_names_file imagenet_labels.json --classes 207 ...

`--out X.npz` writes `images` (uint8, N x H x W x C; MNIST: white digits on black) and `labels`
(class grids) or `prompts` (text-to-image), plus X.png (a grid, a row per class); `--out X.png`
writes the grid only. Text goes to stdout as JSON lines. Sampler, steps, guidance scale, CFG
mode, eta and the text sampling settings default to the run's `config.sampling`; the flags
override them. Noise and token keys derive from fold_in(seed, sample index), so a sample does not
depend on the batch size.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", None, "Training run directory (EMA weights).")
_OFFICIAL = flags.DEFINE_string("official_checkpoint", None,
                                "Official MonoFormer checkpoint folder (config.json + weights).")
_HF = flags.DEFINE_string("hf_checkpoint", None, "transformers LLaMA folder (text only).")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "SentencePiece tokenizer.model for "
                                 "--official_checkpoint / --hf_checkpoint.")
_CLASS_NAMES = flags.DEFINE_string("class_names_file", None, "JSON list (or {id: name}) of class "
                                   "names for --official_checkpoint.")
_CLASSES = flags.DEFINE_string("classes", None, "Comma-separated class ids (or names) to draw.")
_NUM_PER_CLASS = flags.DEFINE_integer("num_per_class", None, "Samples per class.")
_TEMPLATE = flags.DEFINE_string("template", None, "Class prompt template (default: "
                                "'Please generate an image of {}.').")
_LABEL_EMBED = flags.DEFINE_bool("use_label_embedding", None, "Feed class labels to the label "
                                 "embedding (default: when the model has one).")
_T2I = flags.DEFINE_multi_string("t2i_prompt", [], "Text-to-image prompt(s).")
_T2I_FILE = flags.DEFINE_string("t2i_prompt_file", None, "File with one text-to-image prompt a line.")
_OUT = flags.DEFINE_string("out", None, "Output .npz (+ .png grid beside) or .png; with "
                           "--interleaved, the stem of the image files.")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "Text prompt(s) to continue.")
_PROMPT_FILE = flags.DEFINE_string("prompt_file", None, "File with one text prompt per line.")
_INTERLEAVED = flags.DEFINE_bool("interleaved", False, "Text and images in one call: draw an "
                                 "image where the model writes <|im_start|>.")
_MAX_IMAGES = flags.DEFINE_integer("max_images", 1, "Images per prompt with --interleaved.")
_SAMPLER = flags.DEFINE_string("sampler", None, "ddpm | ddim (gaussian), euler | heun (flow).")
_STEPS = flags.DEFINE_integer("num_steps", None, "Sampling steps.")
_SCALE = flags.DEFINE_float("guidance_scale", None, "Classifier-free guidance scale (>= 1).")
_CFG_MODE = flags.DEFINE_enum("cfg_mode", None, ["eps", "official_first3"], "Guided channels.")
_ETA = flags.DEFINE_float("eta", None, "DDIM eta.")
_CLIP = flags.DEFINE_bool("clip_denoised", None, "Clamp the predicted x0 to [-1, 1] at every "
                          "Gaussian step (pixel-space models; default: the run's config).")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")
_BATCH = flags.DEFINE_integer("batch_size", 200, "Images sampled per compiled call.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", None, "Tokens to generate per prompt.")
_TEMPERATURE = flags.DEFINE_float("temperature", None, "Text sampling temperature.")
_TOP_K = flags.DEFINE_integer("top_k", None, "Top-k filter (0 = off).")
_TOP_P = flags.DEFINE_float("top_p", None, "Nucleus filter (1 = off).")
_GREEDY = flags.DEFINE_bool("greedy", False, "Greedy decoding (argmax).")
_USE_EMA = flags.DEFINE_bool("use_ema", True, "Use the EMA weights of a run.")


class UsageError(ValueError):
  pass


def _read_lines(path, flag):
  if not os.path.isfile(path):
    raise UsageError(f"--{flag}: no such file {path!r}")
  with open(path) as f:
    return [line.rstrip("\n") for line in f if line.strip()]


def load_model(workdir=None, official=None, hf=None, tokenizer=None, class_names_file=None,
               use_ema=True):
  from monoformer_jax.inference import InferenceModel  # pylint: disable=import-outside-toplevel
  sources = [s for s in (workdir, official, hf) if s]
  if len(sources) != 1:
    raise UsageError("give exactly one of --workdir, --official_checkpoint, --hf_checkpoint")
  if workdir:
    if not os.path.isdir(workdir):
      raise UsageError(f"--workdir: no such run directory {workdir!r}")
    return InferenceModel.from_workdir(workdir, use_ema=use_ema)
  path = official or hf
  if not os.path.isdir(path):
    raise UsageError(f"no such checkpoint folder {path!r}")
  tokenizer = tokenizer or os.path.join(path, "tokenizer.model")
  if not os.path.isfile(tokenizer):
    raise UsageError(f"--tokenizer: no SentencePiece model at {tokenizer!r}")
  if hf:
    return InferenceModel.from_hf(hf, tokenizer=tokenizer)
  names = None
  if class_names_file:
    with open(class_names_file) as f:
      names = json.load(f)
    if isinstance(names, dict):
      names = [names[k] for k in sorted(names, key=int)]
    names = [n if isinstance(n, str) else n[-1] for n in names]
  return InferenceModel.from_official(official, tokenizer=tokenizer, class_names=names)


def sample_images(model, classes, num_per_class, **kw):
  """(uint8 images (N, H, W, C), labels (N,)) of a class list ('0,3,nine' or a list)."""
  from monoformer_jax.train import periodic_samples as ps  # pylint: disable=import-outside-toplevel
  if isinstance(classes, str):
    items = [s.strip() for s in classes.split(",")]
    if any(not s for s in items):
      raise UsageError(f"--classes: empty entry in {classes!r}")
    classes = items
  if not model.class_names:
    raise UsageError("this model has no class names (not a class-conditional run; give "
                     "--class_names_file for a converted checkpoint)")
  per = num_per_class or model.defaults.get("num_per_class", 1)
  images, labels = model.sample_classes(classes, per, **kw)
  return ps.to_uint8(model.decode(images)), labels


def _write_images(out, images, rows, **arrays):
  import numpy as np  # pylint: disable=import-outside-toplevel
  from monoformer_jax.train import periodic_samples as ps  # pylint: disable=import-outside-toplevel
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  stem, ext = os.path.splitext(out)
  if ext not in (".npz", ".png"):
    raise UsageError(f"--out: give a .npz or .png file, got {out!r}")
  if ext == ".npz":
    np.savez(out, images=images, **arrays)
  ps.save_png(os.path.abspath(stem + ".png"), ps.grid(images, rows=rows))
  print(f"wrote {len(images)} images to {out}", file=sys.stderr)


def run(argv_flags) -> None:
  import numpy as np  # pylint: disable=import-outside-toplevel
  from monoformer_jax.inference import InferenceError  # pylint: disable=import-outside-toplevel
  from monoformer_jax.train import periodic_samples as ps  # pylint: disable=import-outside-toplevel
  del argv_flags
  prompts = list(_PROMPT.value) + (_read_lines(_PROMPT_FILE.value, "prompt_file")
                                   if _PROMPT_FILE.value else [])
  t2i = list(_T2I.value) + (_read_lines(_T2I_FILE.value, "t2i_prompt_file")
                            if _T2I_FILE.value else [])
  if (_PROMPT.present or _PROMPT_FILE.value) and (not prompts or any(not p.strip()
                                                                     for p in prompts)):
    raise UsageError("--prompt: empty prompt")
  if (_T2I.present or _T2I_FILE.value) and (not t2i or any(not p.strip() for p in t2i)):
    raise UsageError("--t2i_prompt: empty prompt")
  if not prompts and not t2i and _CLASSES.value is None:
    raise UsageError("nothing to do: give --classes or --t2i_prompt (images) and/or --prompt "
                     "(text)")
  if t2i and _CLASSES.value is not None:
    raise UsageError("--classes and --t2i_prompt both write --out: run them separately")
  if (t2i or _CLASSES.value is not None or _INTERLEAVED.value) and not _OUT.value:
    raise UsageError("--out: give the file to write the images to")
  if _SCALE.value is not None and _SCALE.value < 1:
    raise UsageError(f"--guidance_scale must be >= 1 (1 = no guidance), got {_SCALE.value}")
  model = load_model(_WORKDIR.value, _OFFICIAL.value, _HF.value, _TOKENIZER.value,
                     _CLASS_NAMES.value, _USE_EMA.value)
  image_kw = dict(seed=_SEED.value, guidance_scale=_SCALE.value, cfg_mode=_CFG_MODE.value,
                  sampler=_SAMPLER.value, num_steps=_STEPS.value, eta=_ETA.value,
                  clip_denoised=_CLIP.value)
  text_kw = dict(seed=_SEED.value, max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value,
                 top_k=_TOP_K.value, top_p=_TOP_P.value, greedy=_GREEDY.value)
  try:
    if prompts and _INTERLEAVED.value:
      stem = os.path.splitext(_OUT.value)[0]
      results = model.generate(prompts, max_images=_MAX_IMAGES.value, **text_kw,
                               **{k: v for k, v in image_kw.items() if k != "seed"})
      for i, (p, parts) in enumerate(zip(prompts, results)):
        shown = []
        for kind, value in parts:
          if kind == "text":
            shown.append({"text": value})
            continue
          path = f"{stem}_p{i}_{sum('image' in s for s in shown)}.png"
          ps.save_png(os.path.abspath(path), ps.to_uint8(model.decode(value[None]))[0])
          shown.append({"image": path})
        print(json.dumps({"prompt": p, "parts": shown}, ensure_ascii=False))
    elif prompts:
      for p, t in zip(prompts, model.generate_text(prompts, **text_kw)):
        print(json.dumps({"prompt": p, "completion": t}, ensure_ascii=False))
    if _CLASSES.value is not None:
      images, labels = sample_images(model, _CLASSES.value, _NUM_PER_CLASS.value,
                                     template=_TEMPLATE.value,
                                     use_label_embedding=_LABEL_EMBED.value,
                                     batch_size=_BATCH.value, **image_kw)
      _write_images(_OUT.value, images, len(np.unique(labels)), labels=labels)
    if t2i:
      images = ps.to_uint8(model.decode(model.text_to_image(t2i, batch_size=_BATCH.value,
                                                            **image_kw)))
      _write_images(_OUT.value, images, 1, prompts=np.asarray(t2i))
  except InferenceError as e:
    raise UsageError(str(e)) from e


def main(argv):
  from monoformer_jax.host_memory import tune_for_xla_cpu  # pylint: disable=import-outside-toplevel
  tune_for_xla_cpu()  # before JAX's first computation (see host_memory.py)
  from absl import logging  # pylint: disable=import-outside-toplevel
  logging.set_verbosity(logging.WARNING)
  try:
    run(argv)
  except (UsageError, FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
