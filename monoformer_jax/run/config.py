"""The run config: its defaults (`base_config`, which every configs/*.py file starts from), the
checks made before anything is compiled, and the resolved copy a run keeps in WORKDIR/config.json.

One source of truth per default: the model section is ModelConfig's own defaults (the released
MonoFormer ImageNet-256 model), the rest is written once here.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Optional

import jax
import ml_collections
from etils import epath

from monoformer_jax import diffusion, paths
from monoformer_jax.data import chat_format, registry
from monoformer_jax.diffusion.options import ImageSampling, SamplingOptionError
from monoformer_jax.model.config import ModelConfig
from monoformer_jax.run import sharding as sharding_lib
from monoformer_jax.vision import registry as vision_registry

OBJECTIVES = ("gaussian", "flow")
CONFIG_FILE = "config.json"
CLASS_NAMES_FILE = "class_names.json"

# Fields a run cannot change once it has checkpoints (shapes, token ids, what the model learns).
# A resumed run may change anything else (intervals, learning rate, steps, mesh, batch sizes); the
# changes are listed in its log.
FIXED_FIELDS = (
    "model",
    "objective",
    "data.tokenizer",
    "data.tokenizer_vocab_size",
    "data.image_source",
    "data.text_source",
    "data.class_names_file",
    "data.chat_template",
    "vae",
    "input_images",
)
# Inside those, how a value is computed, not what: the same parameters, the same mathematics.
FREE_MODEL_FIELDS = ("model.attention", "model.attention_block", "model.remat")


class ConfigError(ValueError):
  """A config value that cannot work, with the field named."""


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Top-level names that scripts outside the package rely on (flax examples' conventions).
  c.seed = 0
  c.num_train_steps = 1000
  c.log_every_steps = 50
  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 3
  c.sample_every_steps = 0  # 0: only at the end of training
  c.init_from = ""  # "hf:DIR" (LLaMA), "official:DIR" (MonoFormer), "run:WORKDIR"

  c.model = ml_collections.ConfigDict(dataclasses.asdict(ModelConfig()))

  # The official objective: IDDPM Gaussian diffusion, 1000 linear-beta steps, eps + learned sigma.
  # min_snr_gamma > 0 weights the Gaussian mse by Min-SNR-gamma (not official; diffusion/losses.py).
  c.objective = ml_collections.ConfigDict(
      dict(kind="gaussian", num_timesteps=1000, beta_schedule="linear", min_snr_gamma=0.0)
  )

  # Defaults of `python -m monoformer_jax.sample` and of the periodic samples (drawn with `seed`,
  # like every sampler: the same seed gives the same images in training, FID and the API).
  # The image options and their defaults are ImageSampling's (diffusion/options.py).
  c.sampling = ml_collections.ConfigDict(
      dict(
          **dataclasses.asdict(ImageSampling()),
          num_per_class=4,
          grid_classes=16,  # rows of the periodic grid (its first classes): bounded at any scale
          temperature=0.7,
          top_k=50,
          top_p=0.95,
          max_new_tokens=64,
          seed=0,
      )
  )

  c.optimizer = ml_collections.ConfigDict(
      dict(
          learning_rate=1e-4,
          schedule="constant",
          warmup_steps=0,
          decay_steps=0,
          final_lr_fraction=0.0,
          b1=0.9,
          b2=0.999,
          eps=1e-8,
          weight_decay=0.0,
          grad_clip=2.0,
          grad_accum_steps=1,
      )
  )
  c.ema = ml_collections.ConfigDict(dict(decay=0.9999, warmup=False))
  # A non-finite loss or gradient norm: "stop" (exit 3, checkpoints intact) or "rollback" (restore
  # the last checkpoint, skip the batches read since, scale the learning rate by lr_factor, go on;
  # stop after max_tries rollbacks without a new checkpoint in between). train/nonfinite.py.
  c.nonfinite = ml_collections.ConfigDict(dict(policy="stop", lr_factor=0.5, max_tries=3))

  # Loss weights of the mixed step (official: 1.0 * L_diff + 0.01 * L_LM); understanding answers
  # are LM loss too (official: the same 0.01), weighted apart here.
  c.loss = ml_collections.ConfigDict(dict(diffusion_weight=1.0, lm_weight=0.01, understand_weight=0.01))
  # Which step runs when: weights of 'diffusion', 'ar' and 'mixed' steps; text_warmup_steps AR
  # steps first (train/scheduler.py).
  c.schedule = ml_collections.ConfigDict(dict(diffusion=1.0, ar=0.0, mixed=0.0, understand=0.0, text_warmup_steps=0))
  # Image understanding (the `understand` steps): what the model reads images with
  # (vision/encoders.py: "patch" = the image's own patches through im_embedder, "clip" = a frozen
  # CLIP vision tower from a local transformers folder, its `clip_layer` without CLS).
  # image_size > 0: the images read are RGB pixels of that size (what CLIP reads beside a model
  # that generates VAE latents); 0: the model's own images (pixels or latents).
  c.input_images = ml_collections.ConfigDict(
      dict(encoder="none", patch_size=4, clip_path="", clip_layer=-2, image_size=0)
  )

  c.data = ml_collections.ConfigDict(
      dict(
          image_source="mnist",  # data/registry.py: mnist | mnist_latents | latents | ...
          image_path="",
          image_batch_size=64,  # global batch of diffusion rows
          image_seq_len=0,  # 0: smallest length that fits prompt + image
          # > 1: diffusion rows are documents of 1..N images from consecutive records, each image
          # between its prompt and the next, its own block at its own t (data/interleaved.py).
          max_images_per_row=1,
          # > 0: each image of such a document is, with this probability, read instead of drawn
          # (an input image through input_images.encoder, then its class name, LM-trained in the
          # mixed steps): documents that read some images and generate others.
          read_fraction=0.0,
          text_source="pydoc",  # pydoc | text_file | chat_jsonl
          text_path="",
          # How dialogues are written, in training rows and chat prompts alike (data/chat_format.py):
          # "none" (official default: <s>{user}{answer}</s>) or "human_assistant" (the official
          # chat_template: <s>### Human: {user}### Assistant: {answer}</s>).
          chat_template="none",
          text_batch_size=64,  # global batch of AR rows
          text_seq_len=128,
          packing=True,  # pack several text samples per row
          prompt_dropout=0.1,  # CFG text dropout (official --text_dropout_prob)
          lm_loss_on_image_prompts=False,
          latent_scale=1.0,
          class_names_file="",  # JSON list (or {label: name}) of class names for prompts
          max_prompt_tokens=64,  # free-text prompts (image-text JSONL) are cut to this
          worker_count=0,
          skip_bad_records=False,
          # What the `understand` steps read: labelled images (an image source; the answer is the
          # class name) or conversations about images ("llava": understand_path, a JSON list, its
          # images under understand_image_root; rows of understand_seq_len tokens).
          understand_source="mnist",
          understand_path="",
          understand_image_root="",
          understand_seq_len=0,  # 0: labelled images' exact length (conversations need a length)
          understand_batch_size=64,
          understand_question="Which digit is this?",  # the answer is the image's class name
          understand_max_shift=0,  # pixels the read training images move by, at random (0: none)
          tokenizer="train",  # "train" (SentencePiece on the corpus, cached) or a .model path
          tokenizer_vocab_size=1024,
      )
  )
  # The VAE that decodes latents to pixels (a diffusers folder) and its scaling_factor; path ""
  # means the model works in pixel space. The sampler and the periodic samples read these.
  c.vae = ml_collections.ConfigDict(dict(path="", scale=1.0))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.logical_axis_rules = [list(r) for r in sharding_lib.DEFAULT_RULES]
  return c


def _fail(field: str, message: str):
  raise ConfigError(f"config.{field}: {message}")


def model_config_from(config, tokenizer=None) -> ModelConfig:
  """The ModelConfig of `config.model`, checked against the tokenizer's vocabulary, with the
  input-feature width of `config.input_images`' encoder."""
  try:
    model = ModelConfig.from_mapping(config.model)
  except (ValueError, TypeError) as e:
    raise ConfigError(f"config.model: {e}") from e
  enc = config.input_images
  if enc.encoder not in vision_registry.ENCODERS:
    _fail("input_images.encoder", f"{enc.encoder!r} is not one of {vision_registry.ENCODERS}")
  if enc.encoder != "none":
    try:
      width = vision_registry.input_feature_dim(
          enc.encoder, input_image_shape(model, enc), enc.patch_size, enc.clip_path
      )
    except (ValueError, OSError) as e:
      raise ConfigError(f"config.input_images: {e}") from e
    if model.input_feature_dim not in (0, width):
      _fail("model.input_feature_dim", f"{model.input_feature_dim}, but the {enc.encoder} encoder gives {width}")
    if model.input_embedder == "x_embedder" and (enc.encoder != "patch" or enc.patch_size != model.patch_size):
      _fail(
          "model.input_embedder",
          f"'x_embedder' reads images as the model's own {model.patch_size}x{model.patch_size} patches: set "
          f"input_images.encoder='patch' and input_images.patch_size={model.patch_size} "
          f"(now {enc.encoder!r}, {enc.patch_size})",
      )
    model = model.replace(input_feature_dim=width)
  if tokenizer is not None and model.vocab_size < tokenizer.vocab_size:
    _fail(
        "model.vocab_size",
        f"{model.vocab_size} is smaller than the tokenizer's vocabulary ({tokenizer.vocab_size})",
    )
  return model


def input_image_shape(model: ModelConfig, input_images=None) -> tuple:
  """The shape of the images the `understand` steps read: RGB pixels of
  `input_images.image_size` when set, else those the model generates (pixels, or latents of the
  same VAE); a CLIP encoder resizes whatever it gets."""
  size = input_images.get("image_size", 0) if input_images is not None else 0  # 0 in runs before the field
  if size:
    return (size, size, 3)
  return (model.image_height, model.image_width, model.image_channels)


def validate_config(config, step_kinds, num_devices: Optional[int] = None) -> None:
  """Cheap consistency checks, before any compile. Raises ConfigError naming the field.

  `step_kinds`: the step kinds the schedule runs ('diffusion', 'ar', 'mixed'); `num_devices`:
  the devices the run will have (default: this process's jax.device_count()).
  """
  model = model_config_from(config)
  try:
    devices = jax.device_count() if num_devices is None else num_devices
    data_ax, fsdp_ax, _ = sharding_lib.mesh_shape(config.mesh.to_dict(), devices)
  except ValueError as e:
    raise ConfigError(f"config.mesh: {e}") from e
  if config.mesh.tensor > 0 and model.num_heads % config.mesh.tensor:
    _fail("mesh.tensor", f"{config.mesh.tensor} does not divide model.num_heads={model.num_heads}")
  accum = config.optimizer.grad_accum_steps
  if accum < 1:
    _fail("optimizer.grad_accum_steps", f"must be >= 1, got {accum}")
  _check_streams(config, model, step_kinds, data_ax * fsdp_ax, accum)
  _check_input_images(config)
  try:
    chat_format.check_template(config.data.chat_template)
  except ValueError as e:
    _fail("data.chat_template", str(e))
  _check_objective_and_sampling(config)
  if not 0 <= config.data.prompt_dropout < 1:
    _fail("data.prompt_dropout", f"must be in [0, 1), got {config.data.prompt_dropout}")
  _check_run(config)
  _check_nonfinite(config.nonfinite)
  _check_vae(config)
  if config.data.tokenizer == "train":
    want = config.data.tokenizer_vocab_size + 4
    if config.model.vocab_size < want:
      _fail(
          "model.vocab_size",
          f"{config.model.vocab_size} is smaller than the tokenizer's "
          f"{want} (data.tokenizer_vocab_size + 4 special tokens)",
      )


def _check_streams(config, model, step_kinds, dp: int, accum: int) -> None:
  """The data of each step kind the schedule runs: its batch size over `dp` data-parallel
  devices and `accum` micro-steps, its source, its row options."""
  if {"diffusion", "mixed"} & set(step_kinds):
    _check_batch(config, "data.image_batch_size", dp, accum)
    if not isinstance(config.data.max_images_per_row, int) or config.data.max_images_per_row < 1:
      _fail("data.max_images_per_row", f"must be an integer >= 1, got {config.data.max_images_per_row!r}")
    if config.data.image_source not in registry.IMAGE_SOURCES:
      _fail("data.image_source", f"{config.data.image_source!r} is not one of {tuple(registry.IMAGE_SOURCES)}")
    _check_read_fraction(config, step_kinds)
  if {"ar", "mixed"} & set(step_kinds):
    _check_batch(config, "data.text_batch_size", dp, accum)
    if config.data.text_source not in registry.TEXT_SOURCES:
      _fail("data.text_source", f"{config.data.text_source!r} is not one of {tuple(registry.TEXT_SOURCES)}")
  if "understand" in step_kinds:
    _check_understand(config, model, dp, accum)


def _check_run(config) -> None:
  """The run's own fields: where it starts from, how long it trains, how often it logs."""
  if config.init_from and config.init_from.split(":", 1)[0] not in ("hf", "official", "run"):
    _fail("init_from", f"{config.init_from!r}: use hf:DIR, official:DIR or run:WORKDIR")
  if config.num_train_steps < 0:
    _fail("num_train_steps", f"must be >= 0 (0: only initialise and save step 0), got {config.num_train_steps}")
  if config.log_every_steps < 1:
    _fail("log_every_steps", f"must be >= 1, got {config.log_every_steps}")


def _check_understand(config, model, dp, accum):
  d = config.data
  _check_batch(config, "data.understand_batch_size", dp, accum)
  if config.input_images.encoder == "none":
    _fail("input_images.encoder", "the schedule has understand steps: set 'patch' or 'clip'")
  if d.understand_source in registry.CONVERSATION_SOURCES:
    if not d.understand_path:
      _fail("data.understand_path", f"required for understand_source={d.understand_source!r}")
    if d.understand_seq_len < 1:
      _fail("data.understand_seq_len", f"conversations need a row length (official: 512), got {d.understand_seq_len}")
    return
  if d.understand_source not in registry.IMAGE_SOURCES:
    known = tuple(registry.IMAGE_SOURCES) + tuple(registry.CONVERSATION_SOURCES)
    _fail("data.understand_source", f"{d.understand_source!r} is not one of {known}")
  if not d.understand_question.strip():
    _fail("data.understand_question", "is empty")
  shape = input_image_shape(model, config.input_images)
  if not 0 <= d.understand_max_shift < min(shape[:2]):
    _fail("data.understand_max_shift", f"{d.understand_max_shift} is not in 0..{min(shape[:2]) - 1}")


def _check_input_images(config):
  enc = config.input_images
  if enc.image_size < 0:
    _fail("input_images.image_size", f"must be >= 0, got {enc.image_size}")
  if enc.image_size and config.data.read_fraction:
    _fail("input_images.image_size", "documents read the model's own images (data.read_fraction > 0): set 0")
  if enc.encoder == "clip" and config.vae.path and not enc.image_size:
    _fail(
        "input_images.image_size",
        "CLIP reads pixels, and this model's images are latents (vae.path): give the pixel size read "
        "(224 for ViT-L/14)",
    )


def _check_read_fraction(config, step_kinds):
  fraction = config.data.read_fraction
  if not 0 <= fraction <= 1:
    _fail("data.read_fraction", f"must be in [0, 1], got {fraction}")
  if not fraction:
    return
  if config.data.max_images_per_row < 2:
    _fail("data.read_fraction", "reads images inside documents: set data.max_images_per_row >= 2")
  if config.input_images.encoder == "none":
    _fail("data.read_fraction", "needs an encoder for the read images: set input_images.encoder to 'patch' or 'clip'")
  if "mixed" not in step_kinds:
    _fail("data.read_fraction", "the names after read images are trained in mixed steps: set schedule.mixed > 0")


def _check_nonfinite(policy):
  if policy.policy not in ("stop", "rollback"):
    _fail("nonfinite.policy", f"{policy.policy!r}: use 'stop' or 'rollback'")
  if not 0 < policy.lr_factor <= 1:
    _fail("nonfinite.lr_factor", f"must be in (0, 1], got {policy.lr_factor}")
  if not isinstance(policy.max_tries, int) or policy.max_tries < 1:
    _fail("nonfinite.max_tries", f"must be an integer >= 1, got {policy.max_tries!r}")


def _check_batch(config, field, dp, accum):
  section, name = field.split(".")
  value = config[section][name]
  if value % (dp * accum):
    _fail(
        field,
        f"{value} is not divisible by the data-parallel size {dp} (mesh data x fsdp)"
        + (f" times optimizer.grad_accum_steps={accum}" if accum > 1 else ""),
    )
  if value % jax.process_count():
    _fail(field, f"{value} is not divisible by the number of processes {jax.process_count()}")


def _check_objective_and_sampling(config):
  kind = config.objective.kind
  if kind not in OBJECTIVES:
    _fail("objective.kind", f"{kind!r} is not one of {OBJECTIVES}")
  gamma = config.objective.min_snr_gamma
  if gamma < 0 or (gamma and kind != "gaussian"):
    _fail(
        "objective.min_snr_gamma",
        f"must be >= 0 and only weights the gaussian objective's "
        f"mse (got {gamma} with objective.kind={kind!r}; set "
        f"--config.objective.min_snr_gamma=0 for the flow objective)",
    )
  # The sampler is only used after training: a mismatch must fail now, not after hours.
  image_sampling(config)


def image_sampling(config) -> ImageSampling:
  """The run's image-sampling options (`config.sampling`), checked against its objective and
  space; ConfigError names the field."""
  try:
    options = ImageSampling.from_config(config.sampling)
    options.check_objective(config.objective.kind, latent=bool(config.vae.path))
  except SamplingOptionError as e:
    raise ConfigError(f"config.sampling.{e.field}: {e.reason}") from None
  return options


def _vae_scaling_factor(config):
  """The scaling_factor of the VAE folder `vae.path` (None if its config.json names none)."""
  path = epath.Path(config.vae.path) / "config.json"
  if not path.is_file():
    _fail("vae.path", f"no VAE config at {str(path)!r}")
  scaling = json.loads(path.read_text()).get("scaling_factor")
  return None if scaling is None else float(scaling)


def _check_vae(config):
  if not config.vae.path:
    if not config.vae.scale:
      _fail("vae.scale", "0 takes the VAE's scaling_factor, but there is no vae.path")
    return
  scaling = _vae_scaling_factor(config)
  if not config.vae.scale:  # taken from the VAE when the run starts (resolve_config)
    if scaling is None:
      _fail("vae.scale", f"is 0 (the VAE's scaling_factor), but {config.vae.path}/config.json names none")
    return
  if scaling is not None and abs(scaling - float(config.vae.scale)) > 1e-6 * abs(scaling):
    _fail("vae.scale", f"{config.vae.scale} differs from the VAE's scaling_factor {scaling} ({config.vae.path})")


def resolve_config(config) -> None:
  """Fills in what a config leaves to the run's start: `vae.scale` 0 becomes the VAE folder's
  scaling_factor (and `data.latent_scale` with it when it is 0 too or one reference with it)."""
  if config.vae.path and not config.vae.scale:
    scaling = _vae_scaling_factor(config)
    if scaling is None:
      _fail("vae.scale", f"is 0 (the VAE's scaling_factor), but {config.vae.path}/config.json names none")
    config.vae.scale = scaling
    if not config.data.latent_scale:
      config.data.latent_scale = scaling


def read_run_config(workdir) -> ml_collections.ConfigDict:
  """WORKDIR/config.json, the resolved config a run saved (FileNotFoundError if none)."""
  path = epath.Path(workdir) / CONFIG_FILE
  if not path.is_file():
    raise FileNotFoundError(f"{str(workdir)!r} is not a training run directory (no {CONFIG_FILE})")
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def _flatten(tree: dict, prefix: str = "") -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def config_changes(old: dict, new: dict) -> list[tuple[str, object, object]]:
  """(field, old value, new value) of every field that differs between two config dicts."""
  a, b = _flatten(old), _flatten(new)
  return [
      (k, a.get(k, "<absent>"), b.get(k, "<absent>"))
      for k in sorted(set(a) | set(b))
      if a.get(k, "<absent>") != b.get(k, "<absent>")
  ]


def save_resolved_config(config, workdir, is_main: bool, *, has_checkpoints: bool) -> list:
  """Writes WORKDIR/config.json (what the run really uses); returns the changes since the saved
  one. A run with checkpoints refuses changes of FIXED_FIELDS, naming each field and both values."""
  path = epath.Path(workdir) / CONFIG_FILE
  new = json.loads(config.to_json(sort_keys=True))
  changes = []
  if path.is_file():
    changes = config_changes(json.loads(path.read_text()), new)
    # A field a newer version added, at its default, changes nothing the old run did.
    defaults = _flatten(json.loads(base_config().to_json(sort_keys=True)))
    fixed = [
        c
        for c in changes
        if c[0].startswith(FIXED_FIELDS)
        and c[0] not in FREE_MODEL_FIELDS
        and not (c[1] == "<absent>" and defaults.get(c[0], "<none>") == c[2])
    ]
    if fixed and has_checkpoints:
      raise ConfigError(
          f"{workdir} holds checkpoints of a run whose config differs in fields "
          "that change the model or its data: "
          + "; ".join(f"config.{k}: {a!r} in {path}, {b!r} now" for k, a, b in fixed)
          + " (use a new --workdir, or the saved values)"
      )
  if is_main:
    paths.write_text_atomic(path, config.to_json(indent=2, sort_keys=True))
  return changes


def save_class_names(workdir, names) -> None:
  """WORKDIR/class_names.json: the names a run's class prompts use, kept with the run (its data
  may not be where a reader of the run is)."""
  if names:
    paths.write_text_atomic(epath.Path(workdir) / CLASS_NAMES_FILE, json.dumps(list(names), indent=1))


def build_objective(config):
  """The diffusion objective `config.objective` describes (learned sigma from the model)."""
  opts = config.objective.to_dict()
  kind = opts.pop("kind")
  if kind == "gaussian":
    return diffusion.make_objective("gaussian", learn_sigma=config.model.learn_sigma, **opts)
  return diffusion.make_objective("flow", learn_sigma=config.model.learn_sigma)
