"""Everything the trainer builds from a config: checks, tokenizer, objective, data, init, samples.

`validate_config` runs before anything is compiled and names the offending field.
"""

from __future__ import annotations

import hashlib
import json
import os

import jax
import numpy as np

from monoformer_jax.diffusion.flow import FLOW_SAMPLERS
from monoformer_jax.diffusion.objective import GAUSSIAN_SAMPLERS
from monoformer_jax.model.config import ModelConfig
from monoformer_jax.train import sharding as sharding_lib
from monoformer_jax.train.checkpointing import step_dirs
from monoformer_jax.train.scheduler import StepScheduler

IMAGE_SOURCES = ("mnist", "mnist_latents", "image_folder", "image_text_jsonl", "latents")
TEXT_SOURCES = ("pydoc", "text_file", "chat_jsonl")
OBJECTIVES = ("gaussian", "flow")


class ConfigError(ValueError):
  """A config value that cannot work, with the field named."""


def _fail(field: str, message: str):
  raise ConfigError(f"config.{field}: {message}")


def validate_config(config) -> None:
  """Cheap consistency checks, before any compile. Raises ConfigError naming the field."""
  try:
    model = ModelConfig.from_mapping(config.model)
  except (ValueError, TypeError) as e:
    raise ConfigError(f"config.model: {e}") from e
  n_dev = jax.device_count()
  try:
    data_ax, fsdp_ax, _ = sharding_lib.mesh_shape(config.mesh.to_dict(), n_dev)
  except ValueError as e:
    raise ConfigError(f"config.mesh: {e}") from e
  dp = data_ax * fsdp_ax
  accum = config.optimizer.grad_accum_steps
  if accum < 1:
    _fail("optimizer.grad_accum_steps", f"must be >= 1, got {accum}")
  weights = {k: config.schedule[k] for k in ("diffusion", "ar", "mixed")}
  if any(v < 0 for v in weights.values()) or not any(v > 0 for v in weights.values()):
    _fail("schedule", f"weights must be >= 0 with at least one > 0, got {weights}")
  warmup = config.schedule.text_warmup_steps
  if not isinstance(warmup, int):
    _fail("schedule.text_warmup_steps", f"must be an integer, got {warmup!r}")
  try:  # the scheduler's own checks (a warm-up needs AR steps), under the config's name
    StepScheduler(weights, warmup)
  except ValueError as e:
    _fail("schedule.text_warmup_steps", str(e))
  if weights["diffusion"] or weights["mixed"]:
    _check_batch(config, "data.image_batch_size", dp, accum)
    if config.data.image_source not in IMAGE_SOURCES:
      _fail("data.image_source", f"{config.data.image_source!r} is not one of {IMAGE_SOURCES}")
  if weights["ar"] or weights["mixed"]:
    _check_batch(config, "data.text_batch_size", dp, accum)
    if config.data.text_source not in TEXT_SOURCES:
      _fail("data.text_source", f"{config.data.text_source!r} is not one of {TEXT_SOURCES}")
  if config.objective.kind not in OBJECTIVES:
    _fail("objective.kind", f"{config.objective.kind!r} is not one of {OBJECTIVES}")
  gamma = config.objective.get("min_snr_gamma", 0.0)
  if gamma < 0 or (gamma and config.objective.kind != "gaussian"):
    _fail("objective.min_snr_gamma", f"must be >= 0 and only weights the gaussian objective's "
          f"mse (got {gamma} with objective.kind={config.objective.kind!r}; set "
          f"--config.objective.min_snr_gamma=0 for the flow objective)")
  # The sampler is only used after training: a mismatch must fail now, not after hours.
  samplers = FLOW_SAMPLERS if config.objective.kind == "flow" else GAUSSIAN_SAMPLERS
  if config.sampling.sampler not in samplers:
    _fail("sampling.sampler", f"{config.sampling.sampler!r} does not sample a "
          f"{config.objective.kind!r} objective; use one of {samplers}")
  if config.sampling.guidance_scale < 1:
    _fail("sampling.guidance_scale", f"must be >= 1 (1 = no guidance), got "
          f"{config.sampling.guidance_scale}")
  if config.sampling.num_steps < 1:
    _fail("sampling.num_steps", "must be >= 1")
  # x0 clipping bounds pixels; latents are unbounded, and the ODE samplers have no x0 step.
  vae_path = config.get("vae", {}).get("path", "")
  if config.sampling.get("clip_denoised", False) and (config.objective.kind != "gaussian"
                                                      or vae_path):
    _fail("sampling.clip_denoised", "clamps the predicted x0 to [-1, 1]: only for the gaussian "
          f"objective in pixel space (objective.kind={config.objective.kind!r}, "
          f"vae.path={vae_path!r})")
  if not 0 <= config.data.prompt_dropout < 1:
    _fail("data.prompt_dropout", f"must be in [0, 1), got {config.data.prompt_dropout}")
  if config.init_from and config.init_from.split(":", 1)[0] not in ("hf", "official", "run"):
    _fail("init_from", f"{config.init_from!r}: use hf:DIR, official:DIR or run:WORKDIR")
  if config.num_train_steps < 0:
    _fail("num_train_steps", f"must be >= 0 (0: only initialise and save step 0), got "
          f"{config.num_train_steps}")
  if config.log_every_steps < 1:
    _fail("log_every_steps", f"must be >= 1, got {config.log_every_steps}")
  if model.num_heads % config.mesh.tensor and config.mesh.tensor > 0:
    _fail("mesh.tensor", f"{config.mesh.tensor} does not divide model.num_heads={model.num_heads}")
  vae = config.get("vae")
  if vae and vae.path:
    vae_cfg = os.path.join(vae.path, "config.json")
    if not os.path.isfile(vae_cfg):
      _fail("vae.path", f"no VAE config at {vae_cfg!r}")
    with open(vae_cfg) as f:
      scaling = json.load(f).get("scaling_factor")
    if scaling is not None and abs(float(scaling) - float(vae.scale)) > 1e-6 * abs(scaling):
      _fail("vae.scale", f"{vae.scale} differs from the VAE's scaling_factor {scaling} "
            f"({vae_cfg})")
  if config.data.tokenizer == "train":
    want = config.data.tokenizer_vocab_size + 4
    if config.model.vocab_size < want:
      _fail("model.vocab_size", f"{config.model.vocab_size} is smaller than the tokenizer's "
            f"{want} (data.tokenizer_vocab_size + 4 special tokens)")


def _check_batch(config, field, dp, accum):
  section, name = field.split(".")
  value = config[section][name]
  procs = jax.process_count()
  if value % (dp * accum):
    _fail(field, f"{value} is not divisible by the data-parallel size {dp} (mesh data x fsdp)"
          + (f" times optimizer.grad_accum_steps={accum}" if accum > 1 else ""))
  if value % procs:
    _fail(field, f"{value} is not divisible by the number of processes {procs}")


def config_hash(config) -> str:
  return hashlib.sha256(config.to_json(sort_keys=True).encode()).hexdigest()[:16]


def save_resolved_config(config, workdir: str, is_main: bool) -> None:
  """Writes WORKDIR/config.json (what the run really used) and logs it."""
  if not is_main:
    return
  path = os.path.join(workdir, "config.json")
  text = config.to_json(indent=2, sort_keys=True)
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    if old.get("model") != json.loads(text)["model"]:
      raise ConfigError(f"{workdir} holds a run of a different model (config.model differs from "
                        f"{path}); use a new --workdir")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)
  print("resolved config:\n" + text, flush=True)


def model_config_from(config, tokenizer) -> ModelConfig:
  model = ModelConfig.from_mapping(config.model)
  if tokenizer is not None and model.vocab_size < tokenizer.vocab_size:
    raise ConfigError(f"config.model.vocab_size={model.vocab_size} is smaller than the tokenizer's "
                      f"vocabulary ({tokenizer.vocab_size})")
  return model


def build_objective(config):
  from monoformer_jax import diffusion  # pylint: disable=import-outside-toplevel
  opts = config.objective.to_dict()
  kind = opts.pop("kind")
  learn_sigma = config.model.learn_sigma
  if kind == "gaussian":
    return diffusion.make_objective("gaussian", learn_sigma=learn_sigma, **opts)
  return diffusion.make_objective("flow", learn_sigma=learn_sigma)


def initialise_from(config, state, shardings, model_config, optimizer, rng):
  """Replaces fresh params (and EMA) by converted ones; the optimizer state restarts."""
  from monoformer_jax.convert import checkpoints  # pylint: disable=import-outside-toplevel
  from monoformer_jax.convert.monoformer_weights import stack_layers  # pylint: disable=import-outside-toplevel
  kind, path = config.init_from.split(":", 1)
  if kind == "hf":
    loaded_cfg, params = checkpoints.load_llama_checkpoint(
        path, vocab_size=model_config.vocab_size, rng=rng,
        image_height=model_config.image_height, image_width=model_config.image_width,
        image_channels=model_config.image_channels, patch_size=model_config.patch_size,
        t_embed=model_config.t_embed, learn_sigma=model_config.learn_sigma)
  elif kind == "official":
    loaded_cfg, params = checkpoints.load_official_checkpoint(path)
  else:
    from monoformer_jax.train.checkpointing import load_for_inference  # pylint: disable=import-outside-toplevel
    _, loaded_cfg, params, _ = load_for_inference(path, use_ema=False)
    params = jax.device_get(params)
  mismatch = {f: (getattr(loaded_cfg, f), getattr(model_config, f))
              for f in ("hidden_size", "num_layers", "num_heads", "num_kv_heads",
                        "intermediate_size", "vocab_size", "image_channels", "patch_size")
              if getattr(loaded_cfg, f) != getattr(model_config, f)}
  if mismatch:
    raise ConfigError(f"config.init_from={config.init_from!r} holds a different model: "
                      + ", ".join(f"{k}: checkpoint {a} vs config {b}" for k, (a, b) in
                                  mismatch.items()))
  if model_config.scan_layers and "layers" not in params:
    params = stack_layers(params, model_config.num_layers)
  from monoformer_jax.train.state import place_params  # pylint: disable=import-outside-toplevel
  params = place_params(params, shardings.params)
  ema = place_params(jax.device_get(params), shardings.ema_params)
  opt_state = jax.jit(optimizer.init, out_shardings=shardings.opt_state)(params)
  print(f"initialised from {config.init_from}", flush=True)
  return state.replace(params=params, ema_params=ema, opt_state=opt_state)


def flops_for(model_config: ModelConfig, kind: str, batch_size: int, seq_len: int,
              image_slots: int) -> float:
  from monoformer_jax.train.metrics import train_flops_per_step  # pylint: disable=import-outside-toplevel
  image_tokens = model_config.num_patches * image_slots if kind != "ar" else 0
  return train_flops_per_step(model_config, batch_size, seq_len, image_tokens,
                              lm_head=(kind != "diffusion"))


def tokenizer_corpus(config) -> list[str]:
  """Texts a tokenizer is trained on: the text corpus plus the image prompts it will see."""
  from monoformer_jax.data import sequences as seq  # pylint: disable=import-outside-toplevel
  from monoformer_jax.data.sources import pydoc_passages  # pylint: disable=import-outside-toplevel
  texts = []
  if config.data.text_source == "pydoc":
    texts.extend(pydoc_passages())
  elif config.data.text_path:
    source = _text_source(config, split="all")
    for i in range(min(len(source), 200_000)):
      rec = source[i]
      if rec is None:
        continue
      texts.extend([rec["text"]] if "text" in rec else [t for pair in rec["turns"] for t in pair])
  names = class_names(config)
  if names:
    texts.extend(t.format(n) for n in names for t in seq.MAIN_TEMPLATES)
  return texts


def build_tokenizer(config, workdir: str):
  """SentencePiece: a given .model file, or one trained on the corpus (cached in WORKDIR)."""
  from monoformer_jax.data import tokenizer as tok_lib  # pylint: disable=import-outside-toplevel
  spec = config.data.tokenizer
  if not spec:
    raise ConfigError("config.data.tokenizer: give the path of a SentencePiece tokenizer.model "
                      "(e.g. TinyLlama's), or 'train' to train one on the corpus")
  if spec != "train":
    if not os.path.isfile(spec):
      raise ConfigError(f"config.data.tokenizer: no such file {spec!r}")
    return tok_lib.load_sentencepiece(spec)
  out_dir = os.path.join(workdir, "tokenizer")
  saved = os.path.join(out_dir, "tokenizer.model")
  if os.path.isfile(saved) and step_dirs(workdir):
    # A run's tokenizer is part of the run: resuming or sampling it must never retrain it (a
    # changed corpus or recipe would silently renumber the tokens its weights were trained on).
    return tok_lib.load_sentencepiece(saved)
  if jax.process_count() > 1:
    # Process 0 trains (or finds) the cached model; the others load it after a barrier.
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    if jax.process_index() == 0:
      tok_lib.train_sentencepiece(tokenizer_corpus(config), config.data.tokenizer_vocab_size,
                                  out_dir)
    multihost_utils.sync_global_devices("monoformer_tokenizer")
  return tok_lib.train_sentencepiece(tokenizer_corpus(config), config.data.tokenizer_vocab_size,
                                     out_dir)


def class_names(config):
  """Class names for label -> prompt: MNIST's, or a JSON list / {label: name} file."""
  from monoformer_jax.data import mnist  # pylint: disable=import-outside-toplevel
  if config.data.class_names_file:
    path = config.data.class_names_file
    if not os.path.isfile(path):
      raise ConfigError(f"config.data.class_names_file: no such file {path!r}")
    with open(path) as f:
      names = json.load(f)
    if isinstance(names, dict):
      names = [names[k] for k in sorted(names, key=int)]
    return [n if isinstance(n, str) else n[-1] for n in names]
  if config.data.image_source in ("mnist", "mnist_latents"):
    return list(mnist.CLASS_NAMES)
  return None


def _text_source(config, split="train"):
  from monoformer_jax.data import sources  # pylint: disable=import-outside-toplevel
  d = config.data
  if d.text_source == "pydoc":
    return sources.PydocSource(split="train" if split == "train" else "all")
  if not d.text_path:
    raise ConfigError(f"config.data.text_path: required for text_source={d.text_source!r}")
  paths = d.text_path.split(",")
  if d.text_source == "text_file":
    return sources.TextFileSource(paths, skip_bad_records=d.skip_bad_records)
  return sources.ChatJsonlSource(paths, skip_bad_records=d.skip_bad_records)


def _image_source(config):
  from monoformer_jax.data import sources  # pylint: disable=import-outside-toplevel
  from monoformer_jax.data import image_sources  # pylint: disable=import-outside-toplevel
  from monoformer_jax.data import tfds_latents  # pylint: disable=import-outside-toplevel
  d = config.data
  kind = d.image_source
  if kind == "mnist":
    return sources.MnistSource(split="train")
  if not d.image_path:
    raise ConfigError(f"config.data.image_path: required for image_source={kind!r}")
  if kind in ("latents", "mnist_latents"):
    return tfds_latents.latent_source(d.image_path, "train", class_names=class_names(config))
  size = config.model.image_height
  if kind == "image_folder":
    return image_sources.ImageFolderSource(d.image_path, image_size=size,
                                           channels=config.model.image_channels,
                                           skip_bad_records=d.skip_bad_records)
  return image_sources.ImageTextJsonlSource(d.image_path.split(","), image_size=size,
                                            channels=config.model.image_channels,
                                            skip_bad_records=d.skip_bad_records)


def build_data(config, model_config: ModelConfig, tokenizer) -> dict:
  """{step kind: DataStream} for every kind the schedule uses."""
  from monoformer_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  from monoformer_jax.train.data_streams import DataStream, MixedIterator  # pylint: disable=import-outside-toplevel
  d = config.data
  procs = jax.process_count()
  image_shape = (model_config.image_height, model_config.image_width, model_config.image_channels)

  def image_it(batch):
    return pipeline.make_image_iterator(
        _image_source(config), tokenizer, batch_size=batch // procs,
        patch_size=model_config.patch_size, t_token=model_config.has_t_token, seed=config.seed,
        image_shape=image_shape, text_dropout=d.prompt_dropout,
        train_text=d.lm_loss_on_image_prompts, latent_scale=d.latent_scale,
        seq_len=d.image_seq_len or None, class_names=class_names(config),
        max_prompt_tokens=(None if d.image_source != "image_text_jsonl"
                           else d.max_prompt_tokens),
        null_label=model_config.num_classes if model_config.num_classes else None,
        num_threads=max(d.worker_count, 1))

  def text_it(batch):
    return pipeline.make_text_iterator(
        _text_source(config), tokenizer, batch_size=batch // procs, seq_len=d.text_seq_len,
        seed=config.seed + 1, packing=d.packing, image_shape=image_shape,
        num_threads=max(d.worker_count, 1))

  streams = {}
  if config.schedule.diffusion > 0:
    streams["diffusion"] = DataStream(image_it(d.image_batch_size), d.image_batch_size, True)
  if config.schedule.ar > 0:
    streams["ar"] = DataStream(text_it(d.text_batch_size), d.text_batch_size, False)
  if config.schedule.mixed > 0:
    total = d.image_batch_size + d.text_batch_size
    streams["mixed"] = DataStream(MixedIterator(image_it(d.image_batch_size),
                                                text_it(d.text_batch_size)), total, True)
  return streams

