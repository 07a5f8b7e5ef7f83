"""Sample images and text from a training run or a converted checkpoint (prefix KV-cached).

    python -m monoformer_jax.sample --workdir DIR --classes 0,1,2,3,4,5,6,7,8,9 \\
        --num_per_class 20 --out samples.npz          # + samples.png, a row per class
    python -m monoformer_jax.sample --workdir DIR --prompt "The" --max_new_tokens 64
    python -m monoformer_jax.sample --workdir DIR --t2i_prompt "a seven" --out t2i.png
    python -m monoformer_jax.sample --workdir DIR --interleaved --out parts \\
        --prompt "Please generate an image of seven.<|im_start|>"
    python -m monoformer_jax.sample --workdir DIR --describe digits.npz \\
        --question "Which digit is this?" --out answers.json    # a run that reads images
    python -m monoformer_jax.sample --workdir DIR --describe bus.jpg,street.png \\
        --question "What is unusual about this image?" --out answers.json     # a CLIP run
    python -m monoformer_jax.sample --workdir DIR --chat "Can you briefly introduce Berlin?"
    python -m monoformer_jax.sample --workdir DIR --chat_file questions.txt    # one turn a line
    python -m monoformer_jax.sample --workdir DIR --interleaved --out parts \\
        --read_images digits.npz --prompt "<image> is a seven. Another: <|im_start|>"
    python -m monoformer_jax.sample --official_checkpoint MonoFormer_ImageNet_256 \\
        --tokenizer tokenizer.model --class_names_file imagenet_labels.json --classes 207 ...

`--describe FILE.npz` answers a question about each image of its `images` array (uint8 0-255,
(N, H, W, C), the shape the run reads, e.g. (N, 28, 28, 1) digits), `--describe A.jpg,B.png`
about image files (centre-cropped to that shape): greedy unless a sampling flag says otherwise,
written to `--out answers.json` as a JSON list of N strings, in order.
`--chat` (repeatable) / `--chat_file` (one a line): the user turns of one dialogue, each answered
in turn in the run's chat template (data.chat_template) until `</s>`, the answers part of what
later turns read; printed as JSON lines {"user", "assistant"} (and to `--out X.json`, a list).
`--read_images FILE.npz` (with --interleaved): the prompts read its `images` where they say
`<image>`, in order over the prompts (as many images as placeholders).
`--out X.npz` writes `images` (uint8, N x H x W x C; MNIST: white digits on black) and `labels`
(class grids) or `prompts` (text-to-image), plus X.png (a grid, a row per class); `--out X.png`
writes the grid only. Text goes to stdout as JSON lines. Sampler, steps, guidance scale, CFG
mode, eta and the text sampling settings default to the run's `config.sampling`; the flags
override them. Noise and token keys derive from fold_in(seed, sample index), so a sample does not
depend on the batch size.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import zipfile

import numpy as np
from absl import flags, logging
from etils import epath

from monoformer_jax import cli, paths
from monoformer_jax.compilation_cache import enable_compilation_cache
from monoformer_jax.data.image_sources import IMAGE_EXTENSIONS, load_image
from monoformer_jax.data.registry import DataConfigError, names_from_json
from monoformer_jax.data.sources import BadRecordError
from monoformer_jax.diffusion.options import ImageSampling, SamplingOptionError
from monoformer_jax.host_memory import tune_for_xla_cpu
from monoformer_jax.inference import InferenceError, InferenceModel
from monoformer_jax.run import images as images_lib
from monoformer_jax.run.open import DTYPES, PRETRAINED_PREFIX
from monoformer_jax.sampling.describe import IMAGE_PLACEHOLDER


def define_flags(fv, argv=()):
  del argv  # no config file: the flags alone
  flags.DEFINE_string("workdir", None, "Training run directory (EMA weights).", flag_values=fv)
  flags.DEFINE_string(
      "official_checkpoint", None, "Official MonoFormer checkpoint folder (config.json + weights).", flag_values=fv
  )
  flags.DEFINE_string("hf_checkpoint", None, "transformers LLaMA folder (text only).", flag_values=fv)
  flags.DEFINE_string(
      "tokenizer", None, "SentencePiece tokenizer.model for --official_checkpoint / --hf_checkpoint.", flag_values=fv
  )
  flags.DEFINE_string(
      "class_names_file", None, "JSON list (or {id: name}) of class names for --official_checkpoint.", flag_values=fv
  )
  flags.DEFINE_string("classes", None, "Comma-separated class ids (or names) to draw.", flag_values=fv)
  flags.DEFINE_integer("num_per_class", None, "Samples per class.", flag_values=fv)
  flags.DEFINE_string(
      "template", None, "Class prompt template (default: 'Please generate an image of {}.').", flag_values=fv
  )
  flags.DEFINE_bool(
      "use_label_embedding",
      None,
      "Feed class labels to the label embedding (default: when the model has one).",
      flag_values=fv,
  )
  flags.DEFINE_multi_string("t2i_prompt", [], "Text-to-image prompt(s).", flag_values=fv)
  flags.DEFINE_string("t2i_prompt_file", None, "File with one text-to-image prompt a line.", flag_values=fv)
  flags.DEFINE_string(
      "out",
      None,
      "Output .npz (+ .png grid beside) or .png; with --interleaved, the stem of the image files.",
      flag_values=fv,
  )
  flags.DEFINE_multi_string("prompt", [], "Text prompt(s) to continue.", flag_values=fv)
  flags.DEFINE_string("prompt_file", None, "File with one text prompt per line.", flag_values=fv)
  flags.DEFINE_bool(
      "interleaved",
      False,
      "Text and images in one call: draw an image where the model writes <|im_start|>.",
      flag_values=fv,
  )
  flags.DEFINE_integer("max_images", 1, "Images per prompt with --interleaved.", flag_values=fv)
  # The image-sampling options (diffusion/options.py: ImageSampling); unset = the run's defaults.
  flags.DEFINE_string("sampler", None, "ddpm | ddim | dpmpp_2m (gaussian), euler | heun | ab2 (flow).", flag_values=fv)
  flags.DEFINE_integer("num_steps", None, "Sampling steps.", flag_values=fv)
  flags.DEFINE_float("guidance_scale", None, "Classifier-free guidance scale (>= 1).", flag_values=fv)
  flags.DEFINE_enum("cfg_mode", None, ["eps", "official_first3"], "Guided channels.", flag_values=fv)
  flags.DEFINE_float("eta", None, "DDIM eta.", flag_values=fv)
  flags.DEFINE_bool(
      "clip_denoised", None, "Clamp the predicted x0 to [-1, 1] at every Gaussian step (pixels).", flag_values=fv
  )
  flags.DEFINE_enum("dtype", None, list(DTYPES), "Weights' dtype in memory (default: float32).", flag_values=fv)
  flags.DEFINE_string(
      "mesh",
      None,
      "Shard the weights over this process's devices, e.g. 'fsdp=4,tensor=2' (default: one device).",
      flag_values=fv,
  )
  flags.DEFINE_integer("seed", None, "Random seed (default: the run's sampling.seed, 0).", flag_values=fv)
  flags.DEFINE_integer("batch_size", 200, "Images sampled per compiled call.", flag_values=fv)
  flags.DEFINE_integer("max_new_tokens", None, "Tokens to generate per prompt.", flag_values=fv)
  flags.DEFINE_float("temperature", None, "Text sampling temperature.", flag_values=fv)
  flags.DEFINE_integer("top_k", None, "Top-k filter (0 = off).", flag_values=fv)
  flags.DEFINE_float("top_p", None, "Nucleus filter (1 = off).", flag_values=fv)
  flags.DEFINE_bool("greedy", False, "Greedy decoding (argmax).", flag_values=fv)
  flags.DEFINE_bool(
      "use_ema", None, "EMA weights (the default where the run has them); --nouse_ema: the raw ones.", flag_values=fv
  )
  flags.DEFINE_string(
      "describe",
      None,
      "An .npz whose `images` (uint8, N x H x W x C) the model answers --question about, or image files "
      "(comma-separated; centre-cropped to the shape the run reads).",
      flag_values=fv,
  )
  flags.DEFINE_multi_string(
      "chat", [], "A user turn of a dialogue (repeat for several, answered in turn).", flag_values=fv
  )
  flags.DEFINE_string("chat_file", None, "A dialogue's user turns, one a line (after any --chat).", flag_values=fv)
  flags.DEFINE_string(
      "read_images",
      None,
      "With --interleaved: an .npz whose `images` (uint8) the prompts read where they say <image>, in order.",
      flag_values=fv,
  )
  flags.DEFINE_string(
      "question", None, "The question for --describe (default: the run's data.understand_question).", flag_values=fv
  )


UsageError = cli.UsageError
IMAGE_FLAGS = tuple(f.name for f in dataclasses.fields(ImageSampling))


def _read_lines(path, flag):
  if not epath.Path(path).is_file():
    raise UsageError(f"--{flag}: no such file {path!r}")
  return [line for line in epath.Path(path).read_text().split("\n") if line.strip()]


def load_model(fv) -> InferenceModel:
  """The model of --workdir / --official_checkpoint / --hf_checkpoint, in --dtype on --mesh."""
  sources = [x for x in (fv.workdir, fv.official_checkpoint, fv.hf_checkpoint) if x]
  if len(sources) != 1:
    raise UsageError("give exactly one of --workdir, --official_checkpoint, --hf_checkpoint")
  placement = dict(dtype=fv.dtype, mesh=fv.mesh)
  if fv.workdir:
    if not fv.workdir.startswith(PRETRAINED_PREFIX) and not epath.Path(fv.workdir).is_dir():
      raise UsageError(f"--workdir: no such run directory {fv.workdir!r}")
    return InferenceModel.from_workdir(fv.workdir, use_ema=fv.use_ema, **placement)
  path = sources[0]
  if not epath.Path(path).is_dir():
    raise UsageError(f"no such checkpoint folder {path!r}")
  tokenizer = fv.tokenizer or os.path.join(path, "tokenizer.model")
  if not epath.Path(tokenizer).is_file():
    raise UsageError(f"--tokenizer: no SentencePiece model at {tokenizer!r}")
  if fv.hf_checkpoint:
    return InferenceModel.from_hf(path, tokenizer=tokenizer, **placement)
  names = None
  if fv.class_names_file:
    if not epath.Path(fv.class_names_file).is_file():
      raise UsageError(f"--class_names_file: no such file {fv.class_names_file!r}")
    try:
      names = names_from_json(json.loads(epath.Path(fv.class_names_file).read_text()), fv.class_names_file)
    except (ValueError, DataConfigError) as e:
      raise UsageError(f"--class_names_file: {e}") from None
  return InferenceModel.from_official(path, tokenizer=tokenizer, class_names=names, **placement)


def sample_images(model, classes, num_per_class, **kw):
  """(uint8 images (N, H, W, C), labels (N,)) of a class list ('0,3,nine' or a list)."""
  if isinstance(classes, str):
    items = [s.strip() for s in classes.split(",")]
    if any(not s for s in items):
      raise UsageError(f"--classes: empty entry in {classes!r}")
    classes = items
  if not model.class_names:
    raise UsageError(
        "this model has no class names (not a class-conditional run; give "
        "--class_names_file for a converted checkpoint)"
    )
  per = num_per_class or model.defaults.get("num_per_class", 1)
  images, labels = model.sample_classes(classes, per, **kw)
  return images_lib.to_uint8(model.decode(images)), labels


def _write_images(out, images, rows, **arrays):
  stem, ext = os.path.splitext(out)
  if ext not in (".npz", ".png"):
    raise UsageError(f"--out: give a .npz or .png file, got {out!r}")
  epath.Path(paths.absolute(out)).parent.mkdir(parents=True, exist_ok=True)
  if ext == ".npz":
    paths.save_npz(out, images=images, **arrays)
  images_lib.save_png(paths.absolute(stem + ".png"), images_lib.grid(images, rows=rows))
  print(f"wrote {len(images)} images to {out}", file=sys.stderr)


def _read_describe(fv):
  """--describe's images: an .npz's `images` array, or the image files it names (checked here,
  read once the run's reading shape is known: `_describe_images`)."""
  if not fv.out or not fv.out.endswith(".json"):
    raise UsageError("--describe: give --out answers.json (the answers, a JSON list)")
  if fv.question is not None and not fv.question.strip():
    raise UsageError("--question: empty question")
  if fv.describe.endswith(".npz"):
    return _read_images_npz(fv.describe, "--describe")
  files = [f.strip() for f in fv.describe.split(",")]
  for f in files:
    if not f.lower().endswith(IMAGE_EXTENSIONS):
      raise UsageError(
          f"--describe: cannot read {f!r}: give an .npz of images or image files ({', '.join(IMAGE_EXTENSIONS)})"
      )
    if not epath.Path(f).is_file():
      raise UsageError(f"--describe: no such image file {f!r}")
  return files


def _describe_images(images, shape) -> np.ndarray:
  """The images to describe: an .npz's array as it is, or image files centre-cropped to `shape`."""
  if not isinstance(images, list):
    return images
  if shape is None:
    raise UsageError("--describe: this model does not read images (train it with understand steps)")
  height, width, channels = shape
  if height != width:
    raise UsageError(f"--describe: image files are centre-cropped square; this run reads {height}x{width} images")
  try:
    return np.stack([load_image(f, height, channels) for f in images])
  except BadRecordError as e:
    raise UsageError(f"--describe: {e}") from None


def _read_chat(fv) -> list[str]:
  turns = list(fv.chat) + (_read_lines(fv.chat_file, "chat_file") if fv.chat_file else [])
  if (fv["chat"].present or fv.chat_file) and (not turns or any(not t.strip() for t in turns)):
    raise UsageError("--chat: empty turn")
  return turns


def _read_images_npz(path: str, flag: str) -> np.ndarray:
  """The `images` array of the .npz `path`, checked (uint8, N x H x W x C, N >= 1)."""
  if not epath.Path(path).is_file():
    raise UsageError(f"{flag}: no such file {path!r}")
  try:
    with paths.load_npz(path) as data:
      names = sorted(data.files)
      images = np.asarray(data["images"]) if "images" in names else None
  except (ValueError, OSError, zipfile.BadZipFile) as e:  # np.load refuses pickled object arrays
    raise UsageError(f"{flag}: cannot read {path!r} as .npz ({e})") from None
  if images is None:
    raise UsageError(f"{flag}: {path} has no 'images' array (it has {names})")
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] == 0:
    raise UsageError(f"{flag}: 'images' must be uint8 (N, H, W, C) with N >= 1, got {images.dtype} {images.shape}")
  return images


def _images_per_prompt(prompts, images) -> list:
  """--read_images' images dealt to the prompts' <image> placeholders, in order."""
  counts = [p.count(IMAGE_PLACEHOLDER) for p in prompts]
  if sum(counts) != len(images):
    raise UsageError(
        f"--read_images: the prompts say {IMAGE_PLACEHOLDER} {sum(counts)} time(s), the file has {len(images)} images"
    )
  starts = np.cumsum([0] + counts)
  return [images[a:b] for a, b in zip(starts[:-1], starts[1:])]


def _image_overrides(fv) -> dict:
  """The image-sampling flags that were given, checked now (before the model loads)."""
  given = {name: fv[name].value for name in IMAGE_FLAGS if fv[name].value is not None}
  try:
    ImageSampling().replace(**given)
  except SamplingOptionError as e:
    raise UsageError(f"--{e}") from None
  return given


def _requests(fv) -> dict:
  """What the command line asks for, checked for consistency before anything loads."""
  prompts = list(fv.prompt) + (_read_lines(fv.prompt_file, "prompt_file") if fv.prompt_file else [])
  t2i = list(fv.t2i_prompt) + (_read_lines(fv.t2i_prompt_file, "t2i_prompt_file") if fv.t2i_prompt_file else [])
  if (fv["prompt"].present or fv.prompt_file) and (not prompts or any(not p.strip() for p in prompts)):
    raise UsageError("--prompt: empty prompt")
  if (fv["t2i_prompt"].present or fv.t2i_prompt_file) and (not t2i or any(not p.strip() for p in t2i)):
    raise UsageError("--t2i_prompt: empty prompt")
  describe = _read_describe(fv) if fv.describe is not None else None
  chat = _read_chat(fv)
  read_images = None
  if fv.read_images is not None:
    if not fv.interleaved or not prompts:
      raise UsageError("--read_images: the images are read by --interleaved --prompt ... <image> ...")
    read_images = _images_per_prompt(prompts, _read_images_npz(fv.read_images, "--read_images"))
  if not prompts and not t2i and fv.classes is None and describe is None and not chat:
    raise UsageError(
        "nothing to do: give --classes or --t2i_prompt (images), --prompt (text), --chat (a dialogue) "
        "and/or --describe (answers)"
    )
  if chat and describe is not None:
    raise UsageError("--chat and --describe both write answers: run them separately")
  if describe is not None and (t2i or fv.classes is not None or fv.interleaved):
    raise UsageError("--describe writes --out too: run it apart from --classes / --t2i_prompt / --interleaved")
  if t2i and fv.classes is not None:
    raise UsageError("--classes and --t2i_prompt both write --out: run them separately")
  if (t2i or fv.classes is not None or fv.interleaved) and not fv.out:
    raise UsageError("--out: give the file to write the images to")
  return dict(
      prompts=prompts, t2i=t2i, describe=describe, chat=chat, read_images=read_images, image=_image_overrides(fv)
  )


def _text_options(fv) -> dict:
  return dict(
      seed=fv.seed,
      max_new_tokens=fv.max_new_tokens,
      temperature=fv.temperature,
      top_k=fv.top_k,
      top_p=fv.top_p,
      greedy=fv.greedy,
  )


def _answer(fv, model, images) -> None:
  sampled = fv.temperature is not None or fv.top_k is not None or fv.top_p is not None
  answers = model.describe(
      images,
      fv.question,
      max_new_tokens=fv.max_new_tokens,
      greedy=not sampled or fv.greedy,
      temperature=fv.temperature,
      top_k=fv.top_k,
      top_p=fv.top_p,
      seed=fv.seed,
  )
  epath.Path(paths.absolute(fv.out)).parent.mkdir(parents=True, exist_ok=True)
  paths.write_text_atomic(paths.absolute(fv.out), json.dumps(answers, ensure_ascii=False, indent=1))
  print(f"wrote {len(answers)} answers to {fv.out}", file=sys.stderr)


def _chat(fv, model, turns) -> None:
  """A dialogue's answers, as JSON lines {"user", "assistant"} (and to --out X.json, a list)."""
  answers = model.chat(turns, **_text_options(fv))
  dialogue = [{"user": u, "assistant": a} for u, a in zip(turns, answers)]
  for turn in dialogue:
    print(json.dumps(turn, ensure_ascii=False))
  if fv.out and fv.out.endswith(".json"):
    paths.write_text_atomic(paths.absolute(fv.out), json.dumps(dialogue, ensure_ascii=False, indent=1))


def _interleave(fv, model, prompts, read_images, image_options) -> None:
  stem = os.path.splitext(fv.out)[0]
  results = model.generate(prompts, max_images=fv.max_images, images=read_images, **_text_options(fv), **image_options)
  for i, (p, parts) in enumerate(zip(prompts, results)):
    shown = []
    for kind, value in parts:
      if kind == "text":
        shown.append({"text": value})
        continue
      path = f"{stem}_p{i}_{sum('image' in s for s in shown)}.png"
      images_lib.save_png(paths.absolute(path), images_lib.to_uint8(model.decode(value[None]))[0])
      shown.append({"image": path})
    print(json.dumps({"prompt": p, "parts": shown}, ensure_ascii=False))


def run(fv, args) -> int:
  if args:
    raise UsageError(f"unexpected arguments {args}")
  tune_for_xla_cpu()  # before JAX's first computation (see host_memory.py)
  enable_compilation_cache()  # a later run loads what this one compiles (compilation_cache.py)
  logging.set_verbosity(logging.WARNING)
  asked = _requests(fv)
  try:
    model = load_model(fv)
    image_options = dict(asked["image"], seed=fv.seed)
    if asked["describe"] is not None:
      _answer(fv, model, _describe_images(asked["describe"], model.reading_shape))
    if asked["chat"]:
      _chat(fv, model, asked["chat"])
    if asked["prompts"] and fv.interleaved:
      _interleave(fv, model, asked["prompts"], asked["read_images"], asked["image"])
    elif asked["prompts"]:
      for p, t in zip(asked["prompts"], model.generate_text(asked["prompts"], **_text_options(fv))):
        print(json.dumps({"prompt": p, "completion": t}, ensure_ascii=False))
    if fv.classes is not None:
      images, labels = sample_images(
          model,
          fv.classes,
          fv.num_per_class,
          template=fv.template,
          use_label_embedding=fv.use_label_embedding,
          batch_size=fv.batch_size,
          **image_options,
      )
      _write_images(fv.out, images, len(np.unique(labels)), labels=labels)
    if asked["t2i"]:
      drawn = model.text_to_image(asked["t2i"], batch_size=fv.batch_size, **image_options)
      _write_images(fv.out, images_lib.to_uint8(model.decode(drawn)), 1, prompts=np.asarray(asked["t2i"]))
  except InferenceError as e:
    raise UsageError(str(e)) from e
  return 0


main = cli.entry_point(__doc__, define_flags, run)


if __name__ == "__main__":
  cli.run_as_script(main)
