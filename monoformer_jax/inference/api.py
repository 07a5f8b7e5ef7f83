"""`InferenceModel`: params + config + tokenizer + objective + sampling defaults, strings in.

    model = InferenceModel.from_workdir("runs/mnist_tiny")            # a training run (EMA)
    model = InferenceModel.from_workdir("gs://b/in256", dtype="bfloat16", mesh="fsdp=4,tensor=2")
    model = InferenceModel.from_official("MonoFormer_ImageNet_256/", tokenizer="tokenizer.model")
    model = InferenceModel.from_hf("TinyLlama-1.1B/", tokenizer="TinyLlama-1.1B/tokenizer.model")
    texts = model.generate_text(["The"], max_new_tokens=32)
    images, labels = model.sample_classes(["seven", 3], num_per_class=4)   # float, model space
    images, labels = model.sample_classes(["seven"], 4, guidance_scale=2.0, num_steps=20)
    images = model.text_to_image(["a red circle"])
    parts = model.generate(["Draw a seven: <|im_start|>"])   # [('text', s) | ('image', a), ...]
    parts = model.generate(["<image> is a seven. Another: <|im_start|>"], images=[[digit]])
    answers = model.describe(digits_uint8, "Which digit is this?")      # a run that reads images
    answers = model.chat(["Can you briefly introduce Berlin?", "And Paris?"])   # the run's template

Every option defaults to the run's `config.sampling` (or the official settings for converted
checkpoints): the image options are one `ImageSampling`, overridden per call by its field names
(or replaced by `sampling=ImageSampling(...)`); images come back in the model's space ([-1, 1] pixels, or latents: see
`decode`, which applies the run's VAE).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np

from monoformer_jax import diffusion
from monoformer_jax.convert import checkpoints as convert_checkpoints
from monoformer_jax.data import registry
from monoformer_jax.data.tokenizer import load_sentencepiece
from monoformer_jax.model.config import ModelConfig
from monoformer_jax.model.monoformer import init_params
from monoformer_jax.diffusion.options import ImageSampling
from monoformer_jax.run import images as images_lib
from monoformer_jax.run import open as open_lib
from monoformer_jax.run import sharding as sharding_lib
from monoformer_jax.run.input_encoder import build_input_encoder
from monoformer_jax.sampling import chat as chat_lib
from monoformer_jax.sampling import classes as classes_lib
from monoformer_jax.sampling import describe as describe_lib
from monoformer_jax.sampling import image as image_lib
from monoformer_jax.sampling import interleaved as interleaved_lib
from monoformer_jax.sampling import text as text_lib
from monoformer_jax.sampling.tokens import TokenSampling

# The official code's text sampling (infer_llm.py); its image sampling is diffusion.OFFICIAL.
OFFICIAL_TEXT = dict(temperature=0.7, top_k=50, top_p=0.95, max_new_tokens=64, seed=0)


class InferenceError(ValueError):
  """A request that cannot be served (named argument and reason in the message)."""


def check_params(params, config: ModelConfig, source: str = "checkpoint") -> None:
  """Raises InferenceError naming every parameter whose shape differs from `config`'s model."""
  want = nn.unbox(jax.eval_shape(lambda: init_params(config, jax.random.key(0))))
  want_flat = {jax.tree_util.keystr(p): v.shape for p, v in jax.tree_util.tree_flatten_with_path(want)[0]}
  got_flat = {jax.tree_util.keystr(p): np.shape(v) for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  problems = [
      f"{k}: checkpoint {got_flat.get(k, 'missing')} vs model {s}" for k, s in want_flat.items() if got_flat.get(k) != s
  ]
  problems += [f"{k}: not in the model" for k in got_flat if k not in want_flat]
  if problems:
    raise InferenceError(
        f"the {source} holds a model of another shape than the config "
        f"({len(problems)} parameters differ): " + "; ".join(problems[:6])
    )


def _mesh(mesh):
  """A jax Mesh, a spec string ('fsdp=4,tensor=2') over the local devices, or None."""
  if mesh is None or not isinstance(mesh, str):
    return mesh
  try:
    return open_lib.mesh_from_spec(mesh)
  except ValueError as e:
    raise InferenceError(str(e)) from None


def _placed(params, config: ModelConfig, mesh, dtype):
  """Host weights of a converted checkpoint onto `mesh` (sharded by the default rules), in
  `dtype`; as they are (the default device) without either."""
  if mesh is None and dtype is None:
    return params
  mesh = open_lib.one_device_mesh() if mesh is None else mesh
  try:
    open_lib.check_mesh_fits(config, mesh)
    abstract = open_lib.abstract_params(config, mesh, sharding_lib.DEFAULT_RULES, dtype)
  except ValueError as e:
    raise InferenceError(str(e)) from None
  check_params(params, config)
  return jax.tree.map(lambda x, a: jax.device_put(np.asarray(x).astype(a.dtype), a.sharding), params, abstract)


@dataclasses.dataclass
class InferenceModel:
  """Weights + model config + tokenizer + objective + sampling defaults (`image_sampling` for
  images; `defaults` for text: temperature, top_k, top_p, max_new_tokens, seed)."""

  params: Any
  config: ModelConfig
  tokenizer: Any
  objective: Any
  image_sampling: ImageSampling = diffusion.OFFICIAL
  defaults: dict = dataclasses.field(default_factory=dict)
  class_names: Optional[Sequence[str]] = None
  run_config: Any = None  # the training run's ConfigDict (VAE settings), if any
  mesh: Any = None
  rules: Any = None
  step: Optional[int] = None  # the training step of the checkpoint, for a run

  def __post_init__(self):
    check_params(self.params, self.config)
    self.defaults = {**OFFICIAL_TEXT, **dict(self.defaults)}

  # -- loading ---------------------------------------------------------------------------------
  @classmethod
  def from_workdir(cls, workdir: str, *, use_ema: Optional[bool] = None, dtype=None, mesh=None) -> "InferenceModel":
    """A run's newest good checkpoint, or an exported folder (run.open.open_run): its EMA
    weights (`use_ema`), in `dtype` ('bfloat16' halves them), sharded over `mesh` (a Mesh or
    'fsdp=4,tensor=2' over the local devices) when one device is too small."""
    try:
      run = open_lib.open_run(workdir, use_ema=use_ema, dtype=dtype, mesh=_mesh(mesh))
    except FileNotFoundError:
      raise
    except ValueError as e:
      raise InferenceError(str(e)) from e
    except Exception as e:  # pylint: disable=broad-except  # orbax names shapes, not the cause
      raise InferenceError(
          f"the checkpoint in {workdir} does not fit the model of its "
          f"config.json (a checkpoint of another model shape?): "
          f"{type(e).__name__}: {str(e)[:500]}"
      ) from e
    return cls(
        run.params,
        run.model_config,
        run.tokenizer,
        run.objective,
        run.image_sampling,
        {k: run.config.sampling[k] for k in (*OFFICIAL_TEXT, "num_per_class")},
        run.class_names,
        run_config=run.config,
        mesh=run.mesh,
        rules=run.rules,
        step=run.step,
    )

  @classmethod
  def from_official(
      cls, path: str, *, tokenizer: str, class_names=None, objective=None, dtype=None, mesh=None, **defaults
  ) -> "InferenceModel":
    """An official MonoFormer checkpoint folder (config.json + weights or ema/). `defaults`:
    image-sampling options (ImageSampling fields) and text ones, over the official settings."""
    config, params = convert_checkpoints.load_official_checkpoint(path)
    return cls._converted(
        config,
        params,
        load_sentencepiece(tokenizer),
        objective=objective,
        class_names=class_names,
        dtype=dtype,
        mesh=mesh,
        defaults=defaults,
    )

  @classmethod
  def from_hf(
      cls,
      path: str,
      *,
      tokenizer: str,
      vocab_size: Optional[int] = None,
      objective=None,
      dtype=None,
      mesh=None,
      **defaults,
  ) -> "InferenceModel":
    """A transformers LLaMA folder; the image path is freshly initialised (text only, really)."""
    tok = load_sentencepiece(tokenizer)
    config, params = convert_checkpoints.load_llama_checkpoint(path, vocab_size=vocab_size or tok.vocab_size)
    return cls._converted(
        config, params, tok, objective=objective, class_names=None, dtype=dtype, mesh=mesh, defaults=defaults
    )

  @classmethod
  def _converted(cls, config, params, tokenizer, *, objective, class_names, dtype, mesh, defaults):
    mesh = _mesh(mesh)
    image_names = {f.name for f in dataclasses.fields(ImageSampling)}
    try:
      image = diffusion.OFFICIAL.replace(**{k: v for k, v in defaults.items() if k in image_names})
    except diffusion.SamplingOptionError as e:
      raise InferenceError(str(e)) from None
    return cls(
        _placed(params, config, mesh, dtype),
        config,
        tokenizer,
        objective or diffusion.make_objective("gaussian", learn_sigma=config.learn_sigma),
        image,
        {k: v for k, v in defaults.items() if k not in image_names},
        class_names,
        mesh=mesh,
        rules=None if mesh is None else sharding_lib.DEFAULT_RULES,
    )

  @property
  def on_mesh(self) -> dict:
    """The samplers' `mesh` and `rules` keywords: where this model's weights are placed."""
    return {"mesh": self.mesh, "rules": self.rules}

  def _opt(self, name, value):
    return self.defaults[name] if value is None else value

  def options(self, sampling: Optional[ImageSampling] = None, **overrides) -> ImageSampling:
    """The image-sampling options of a call: `sampling` (default: this model's), with the
    `overrides` that are not None (guidance_scale=..., num_steps=...), checked against the
    objective and the model's space."""
    try:
      options = (sampling or self.image_sampling).replace(**overrides)
      options.check_objective(self.objective.kind, latent=bool(self.run_config and self.run_config.vae.path))
    except diffusion.SamplingOptionError as e:
      raise InferenceError(str(e)) from None
    return options

  # -- prompts ---------------------------------------------------------------------------------
  def image_prompt(self, text: str) -> list[int]:
    """`<s>{text}<|im_start|>` (the official conditional prefix)."""
    return classes_lib.image_prompt(self.tokenizer, text)

  def unconditional_prompt(self) -> list[int]:
    """`<s><|im_start|>` (the official unconditional prefix: prompt "")."""
    return classes_lib.unconditional_prompt(self.tokenizer)

  def class_ids(self, classes) -> list[int]:
    """Class ids or names -> ids; unknown names and ids out of range are named."""
    names = list(self.class_names or [])
    out = []
    for c in classes:
      if isinstance(c, str) and not c.strip().isdigit():
        if c.strip() not in names:
          known = ", ".join(names) if names else "none: this model has no class names"
          raise InferenceError(f"unknown class {c.strip()!r} (known: {known})")
        out.append(names.index(c.strip()))
        continue
      c = int(c)
      if not 0 <= c < len(names):
        raise InferenceError(f"class id {c} is out of range (the model has {len(names)} classes)")
      out.append(c)
    return out

  # -- images ----------------------------------------------------------------------------------
  def sample_classes(
      self,
      classes,
      num_per_class: int = 1,
      *,
      template: str = None,
      use_label_embedding: Optional[bool] = None,
      seed: Optional[int] = None,
      batch_size: int = 64,
      sampling: Optional[ImageSampling] = None,
      **overrides,
  ) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, H, W, C), labels (N,)), `num_per_class` per class, in class order.

    Classes go in as text through `template` (official: "Please generate an image of {}."), and
    as labels to the label embedding when the model has one (`use_label_embedding`). Sample n is
    drawn with sample id n: the same images as the run's periodic grid for the same seed.
    `sampling` / `overrides` (guidance_scale=4.0, num_steps=10, ...): see `options`.
    """
    if num_per_class < 1:
      raise InferenceError(f"num_per_class must be >= 1, got {num_per_class}")
    ids = self.class_ids(classes)
    if not ids:
      raise InferenceError("no classes given")
    labels = np.repeat(np.asarray(ids, np.int32), num_per_class)
    images = self.sample_labels(
        labels,
        template=template,
        use_label_embedding=use_label_embedding,
        seed=seed,
        batch_size=batch_size,
        sampling=sampling,
        **overrides,
    )
    return images, labels

  def sample_labels(
      self,
      labels,
      sample_ids=None,
      *,
      template: str = None,
      use_label_embedding: Optional[bool] = None,
      seed: Optional[int] = None,
      batch_size: int = 64,
      sampling: Optional[ImageSampling] = None,
      **overrides,
  ) -> np.ndarray:
    """Images (N, H, W, C) of class ids `labels`, sample i drawn with id `sample_ids[i]`
    (default 0..N-1): the image an FID sample directory holds for that index and label."""
    self.class_ids(np.asarray(labels).reshape(-1).tolist())  # range-checked, named on error
    if use_label_embedding and not self.config.num_classes:
      raise InferenceError("use_label_embedding: this model has no label embedding")
    return classes_lib.sample_classes(
        self.params,
        self.config,
        self.objective,
        self.tokenizer,
        self.class_names,
        labels,
        options=self.options(sampling, **overrides),
        seed=int(self._opt("seed", seed)),
        sample_ids=sample_ids,
        template=template or classes_lib.DEFAULT_CLASS_TEMPLATE,
        use_label_embedding=use_label_embedding,
        batch_size=batch_size,
        **self.on_mesh,
    )

  def text_to_image(
      self,
      prompts: Sequence[str],
      *,
      seed: Optional[int] = None,
      batch_size: int = 64,
      sampling: Optional[ImageSampling] = None,
      **overrides,
  ) -> np.ndarray:
    """Images (N, H, W, C) in model space for free-text prompts (the official
    `<s>{prompt}<|im_start|>`), sample i drawn with id i."""
    _check_prompts(prompts)
    options = self.options(sampling, **overrides)
    ids = [self.image_prompt(p) for p in prompts]
    rng = jax.random.key(int(self._opt("seed", seed)))
    return np.concatenate(
        [
            image_lib.sample_images(
                self.params,
                self.config,
                self.objective,
                ids[start : start + batch_size],
                options=options,
                uncond_prompt=self.unconditional_prompt(),
                rng=rng,
                sample_ids=np.arange(start, min(start + batch_size, len(ids))),
                **self.on_mesh,
            )
            for start in range(0, len(ids), batch_size)
        ]
    )

  def decode(self, images: np.ndarray) -> np.ndarray:
    """Model-space images -> pixels in [-1, 1] through the run's VAE (identity in pixel space)."""
    if self.run_config is None:
      return np.asarray(images)
    return images_lib.decode_images(images, self.run_config.vae.path, self.run_config.vae.scale)

  # -- text ------------------------------------------------------------------------------------
  def _token_sampling(self, temperature, top_k, top_p, greedy):
    if greedy:
      return TokenSampling()
    return TokenSampling(
        float(self._opt("temperature", temperature)), int(self._opt("top_k", top_k)), float(self._opt("top_p", top_p))
    )

  def _continuation(self, prompt_ids, new_ids):
    return text_lib.continuation(self.tokenizer, prompt_ids, new_ids)

  def generate_text(
      self,
      prompts: Sequence[str],
      *,
      max_new_tokens=None,
      temperature=None,
      top_k=None,
      top_p=None,
      greedy: bool = False,
      seed: Optional[int] = None,
      stop_tokens: Optional[Sequence[int]] = None,
  ) -> list[str]:
    """Continuations of `<s>{prompt}` (cut before the stop token; default `</s>`)."""
    _check_prompts(prompts)
    return text_lib.generate_text(
        self.params,
        self.config,
        self.tokenizer,
        prompts,
        max_new_tokens=int(self._opt("max_new_tokens", max_new_tokens)),
        sampling=self._token_sampling(temperature, top_k, top_p, greedy),
        seed=int(self._opt("seed", seed)),
        stop_tokens=stop_tokens,
        **self.on_mesh,
    )

  def generate(
      self,
      prompts: Sequence[str],
      *,
      max_new_tokens=None,
      max_images: int = 1,
      temperature=None,
      top_k=None,
      top_p=None,
      greedy: bool = False,
      seed: Optional[int] = None,
      images: Optional[Sequence] = None,
      sampling: Optional[ImageSampling] = None,
      **overrides,
  ) -> list[list[tuple]]:
    """Text and images in one call. Per prompt, the new parts in order: ('text', str) and
    ('image', (H, W, C) array in model space). A prompt may end with `<|im_start|>`.

    `images` (a run that reads images): per prompt, the images it reads (uint8 pixels or
    model-space floats), one for each `<image>` in its text, read as understanding rows read
    them (`<|im_start|>` [image] `<|im_end|>`); everything after reads them. Prompts of one
    token length are generated together, one call per length. `sampling` / `overrides`: the
    image-sampling options (see `options`)."""
    _check_prompts(prompts)
    tok = self.tokenizer
    kw = dict(
        image_token=tok.im_start_id,
        end_token=tok.im_end_id,
        uncond_prompt=self.unconditional_prompt(),
        max_new_tokens=int(self._opt("max_new_tokens", max_new_tokens)),
        sampling=self._token_sampling(temperature, top_k, top_p, greedy),
        stop_tokens=(tok.eos_id,),
        max_images=max_images,
        options=self.options(sampling, **overrides),
        rng=jax.random.key(int(self._opt("seed", seed))),
        **self.on_mesh,
    )
    if images is None:
      ids = [[tok.bos_id, *tok.encode(p)] for p in prompts]
      results = interleaved_lib.generate_interleaved(self.params, self.config, self.objective, ids, **kw)
      return [self._parts(p, r) for p, r in zip(ids, results)]
    pieces = self._reading_prompts(prompts, images)
    by_length = {}
    for i, p in enumerate(pieces):
      by_length.setdefault(describe_lib.prompt_length(self._input_encoder, p), []).append(i)
    out = [None] * len(prompts)
    for rows in by_length.values():
      ids, inputs = describe_lib.prompt_batch(self._input_encoder, [pieces[i] for i in rows])
      results = interleaved_lib.generate_interleaved(
          self.params, self.config, self.objective, ids, prompt_inputs=inputs, **kw
      )
      for i, result in zip(rows, results):
        # The text after the prompt's last image: what continuations are decoded against.
        out[i] = self._parts([tok.bos_id, *pieces[i][-1][1]], result)
    return out

  def _check_reads_images(self) -> None:
    if not self.config.input_feature_dim or self.run_config is None:
      raise InferenceError("this model does not read images (train it with understand steps: input_images.encoder)")
    if self.run_config.vae.path and self.run_config.input_images.encoder == "patch":
      raise InferenceError("a latent run reads model-space latents: encode the images with its VAE")

  def _reading_prompts(self, prompts, images) -> list:
    self._check_reads_images()
    if len(images) != len(prompts):
      raise InferenceError(f"{len(prompts)} prompts but images for {len(images)}")
    shape = self._input_encoder.image_shape
    try:
      return [
          describe_lib.reading_pieces(
              self.tokenizer, p, describe_lib.model_space_images(np.asarray(x), shape) if len(x) else []
          )
          for p, x in zip(prompts, images)
      ]
    except ValueError as e:
      raise InferenceError(str(e)) from e

  def describe(
      self,
      images,
      question: Optional[str] = None,
      *,
      max_new_tokens: Optional[int] = None,
      greedy: bool = True,
      temperature=None,
      top_k=None,
      top_p=None,
      seed: Optional[int] = None,
  ) -> list[str]:
    """One answer per image (N, H, W, C of `reading_shape`; uint8 pixels or model-space floats),
    written by the LM through the KV cache after `<|im_start|>` [image] `<|im_end|>\n{question}`
    in the template its understanding rows were trained in (default question: the run's
    `data.understand_question`), until `</s>` or `max_new_tokens` (default: 16 for class names,
    the run's sampling.max_new_tokens for a run that read conversations). Greedy unless
    `greedy=False`."""
    self._check_reads_images()
    question = self.run_config.data.understand_question if question is None else question
    conversations = self.run_config.data.understand_source in registry.CONVERSATION_SOURCES
    try:
      return chat_lib.describe_images(
          self.params,
          self.config,
          self.tokenizer,
          self._input_encoder,
          images,
          question,
          template=self.chat_template if conversations else "none",
          max_new_tokens=max_new_tokens or (self.defaults["max_new_tokens"] if conversations else 16),
          sampling=self._token_sampling(temperature, top_k, top_p, greedy),
          seed=int(self._opt("seed", seed)),
          **self.on_mesh,
      )
    except ValueError as e:
      raise InferenceError(str(e)) from e

  @property
  def chat_template(self) -> str:
    """The run's `data.chat_template` (data/chat_format.py): how its dialogues were written."""
    return self.run_config.data.get("chat_template", "none") if self.run_config is not None else "none"

  @property
  def reading_shape(self) -> Optional[tuple]:
    """The (H, W, C) of the images this model reads (None: it reads none)."""
    return tuple(self._input_encoder.image_shape) if self.config.input_feature_dim and self.run_config else None

  def chat(
      self,
      turns,
      images: Sequence = (),
      *,
      max_new_tokens=None,
      greedy: bool = False,
      temperature=None,
      top_k=None,
      top_p=None,
      seed: Optional[int] = None,
  ):
    """Answers in the run's chat template (`chat_template`), each until `</s>`: `turns` is one
    question (the answer, a string, comes back) or a dialogue, a list of user turns (each
    answered in order, its answer part of what the next reads) and (user, answer) pairs (history);
    the list of the written answers comes back. `images`: read where the turns say `<image>`,
    in order (a run that reads images; `reading_shape`)."""
    one = isinstance(turns, str)
    if len(images) > 0:
      self._check_reads_images()
    try:
      answers = chat_lib.chat(
          self.params,
          self.config,
          self.tokenizer,
          [turns] if one else list(turns),
          template=self.chat_template,
          images=images,
          encoder=self._input_encoder if len(images) > 0 else None,
          max_new_tokens=int(self._opt("max_new_tokens", max_new_tokens)),
          sampling=self._token_sampling(temperature, top_k, top_p, greedy),
          seed=int(self._opt("seed", seed)),
          **self.on_mesh,
      )
    except ValueError as e:
      raise InferenceError(str(e)) from e
    return answers[0] if one else answers

  @functools.cached_property
  def _input_encoder(self):
    return build_input_encoder(self.run_config, self.config)

  def _parts(self, prompt_ids, result) -> list[tuple]:
    tok, parts, run, k = self.tokenizer, [], [], 0
    context = list(prompt_ids[1:])
    if prompt_ids[-1] == tok.im_start_id and result["images"]:  # the prompt opened the image
      parts.append(("image", result["images"][0]))
      k, context = 1, []
    for t in result["tokens"]:
      if t == tok.eos_id:
        break
      if t == tok.im_start_id and k < len(result["images"]):
        if run:
          parts.append(("text", self._continuation(context, run)))
        parts.append(("image", result["images"][k]))
        k, context, run = k + 1, [], []
        continue
      if t == tok.im_end_id:
        continue
      run.append(t)
    if run:
      parts.append(("text", self._continuation(context, run)))
    return parts


def _check_prompts(prompts):
  if isinstance(prompts, str):
    raise InferenceError("prompts must be a list of strings, not one string")
  if not prompts:
    raise InferenceError("no prompts given")
  for i, p in enumerate(prompts):
    if not p.strip():
      raise InferenceError(f"empty prompt (prompt {i})")
