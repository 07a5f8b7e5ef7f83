"""`InferenceModel`: params + config + tokenizer + objective + sampling defaults, strings in.

    model = InferenceModel.from_workdir("runs/mnist_tiny")            # a training run (EMA)
    model = InferenceModel.from_official("MonoFormer_ImageNet_256/", tokenizer="tokenizer.model")
    model = InferenceModel.from_hf("TinyLlama-1.1B/", tokenizer="TinyLlama-1.1B/tokenizer.model")
    texts = model.generate_text(["The"], max_new_tokens=32)
    images, labels = model.sample_classes(["seven", 3], num_per_class=4)   # float, model space
    images = model.text_to_image(["a red circle"])
    parts = model.generate(["Draw a seven: <|im_start|>"])   # [('text', s) | ('image', a), ...]

Every option defaults to the run's `config.sampling` (or the official settings for converted
checkpoints); images come back in the model's space ([-1, 1] pixels, or latents: see
`decode`, which applies the run's VAE).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np

from monoformer_jax.inference import decode as decode_lib
from monoformer_jax.inference import image as image_lib
from monoformer_jax.inference import interleaved as interleaved_lib
from monoformer_jax.inference.tokens import TokenSampling
from monoformer_jax.model.config import ModelConfig

OFFICIAL_SAMPLING = dict(sampler="ddpm", num_steps=50, guidance_scale=4.0, cfg_mode="eps",
                         eta=0.0, clip_denoised=False, temperature=0.7, top_k=50, top_p=0.95,
                         max_new_tokens=64)


class InferenceError(ValueError):
  """A request that cannot be served (named argument and reason in the message)."""


def check_params(params, config: ModelConfig, source: str = "checkpoint") -> None:
  """Raises InferenceError naming every parameter whose shape differs from `config`'s model."""
  from monoformer_jax.model.monoformer import init_params  # pylint: disable=import-outside-toplevel
  want = nn.unbox(jax.eval_shape(lambda: init_params(config, jax.random.key(0))))
  want_flat = {jax.tree_util.keystr(p): v.shape
               for p, v in jax.tree_util.tree_flatten_with_path(want)[0]}
  got_flat = {jax.tree_util.keystr(p): np.shape(v)
              for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  problems = [f"{k}: checkpoint {got_flat.get(k, 'missing')} vs model {s}"
              for k, s in want_flat.items() if got_flat.get(k) != s]
  problems += [f"{k}: not in the model" for k in got_flat if k not in want_flat]
  if problems:
    raise InferenceError(f"the {source} holds a model of another shape than the config "
                         f"({len(problems)} parameters differ): " + "; ".join(problems[:6]))


@dataclasses.dataclass
class InferenceModel:
  params: Any
  config: ModelConfig
  tokenizer: Any
  objective: Any
  defaults: dict
  class_names: Optional[Sequence[str]] = None
  run_config: Any = None            # the training run's ConfigDict (VAE settings), if any
  mesh: Any = None
  rules: Any = None

  def __post_init__(self):
    check_params(self.params, self.config)
    self.defaults = {**OFFICIAL_SAMPLING, **dict(self.defaults)}

  # -- loading ---------------------------------------------------------------------------------
  @classmethod
  def from_workdir(cls, workdir: str, *, use_ema: bool = True) -> "InferenceModel":
    from monoformer_jax.train.checkpointing import load_for_inference  # pylint: disable=import-outside-toplevel
    from monoformer_jax.train.setup import build_objective, class_names  # pylint: disable=import-outside-toplevel
    try:
      config, model_config, params, tok = load_for_inference(workdir, use_ema=use_ema)
    except FileNotFoundError as e:
      from monoformer_jax.train.checkpointing import step_dirs  # pylint: disable=import-outside-toplevel
      ckpt_dir = os.path.join(workdir, "checkpoints")
      steps = step_dirs(workdir)
      if not steps:
        raise
      # The trainer's restore skips steps it cannot read; with steps present that means the
      # stored arrays do not fit the model config.json describes.
      raise InferenceError(f"no checkpoint in {ckpt_dir} (steps {steps}) fits "
                           f"the model of {workdir}/config.json: a checkpoint of another model "
                           "shape, or corrupted files (the log above names the arrays)") from e
    except Exception as e:  # pylint: disable=broad-except  # orbax names shapes, not the cause
      raise InferenceError(f"the checkpoint in {workdir} does not fit the model of its "
                           f"config.json (a checkpoint of another model shape?): "
                           f"{type(e).__name__}: {str(e)[:500]}") from e
    return cls(jax.device_get(params), model_config, tok, build_objective(config),
               dict(config.sampling), class_names(config), run_config=config)

  @classmethod
  def from_official(cls, path: str, *, tokenizer: str, class_names=None, objective=None,
                    **defaults) -> "InferenceModel":
    """An official MonoFormer checkpoint folder (config.json + weights or ema/)."""
    from monoformer_jax.convert.checkpoints import load_official_checkpoint  # pylint: disable=import-outside-toplevel
    from monoformer_jax.data.tokenizer import load_sentencepiece  # pylint: disable=import-outside-toplevel
    from monoformer_jax.diffusion import make_objective  # pylint: disable=import-outside-toplevel
    config, params = load_official_checkpoint(path)
    return cls(params, config, load_sentencepiece(tokenizer),
               objective or make_objective("gaussian", learn_sigma=config.learn_sigma), defaults,
               class_names)

  @classmethod
  def from_hf(cls, path: str, *, tokenizer: str, vocab_size: Optional[int] = None,
              objective=None, **defaults) -> "InferenceModel":
    """A transformers LLaMA folder; the image path is freshly initialised (text only, really)."""
    from monoformer_jax.convert.checkpoints import load_llama_checkpoint  # pylint: disable=import-outside-toplevel
    from monoformer_jax.data.tokenizer import load_sentencepiece  # pylint: disable=import-outside-toplevel
    from monoformer_jax.diffusion import make_objective  # pylint: disable=import-outside-toplevel
    tok = load_sentencepiece(tokenizer)
    config, params = load_llama_checkpoint(path, vocab_size=vocab_size or tok.vocab_size)
    return cls(params, config, tok, objective or make_objective("gaussian"), defaults)

  def _opt(self, name, value):
    return self.defaults[name] if value is None else value

  def _image_options(self, guidance_scale, cfg_mode, sampler, num_steps, eta, clip_denoised):
    scale = float(self._opt("guidance_scale", guidance_scale))
    if scale < 1.0:
      raise InferenceError(f"guidance_scale must be >= 1 (1 = no guidance), got {scale}")
    steps = int(self._opt("num_steps", num_steps))
    if steps < 1:
      raise InferenceError(f"num_steps must be >= 1, got {steps}")
    clip = bool(self._opt("clip_denoised", clip_denoised))
    if clip and self.objective.kind != "gaussian":
      raise InferenceError(f"clip_denoised clamps the Gaussian sampler's x0; the "
                           f"{self.objective.kind!r} objective's samplers have no x0 to clamp")
    return dict(guidance_scale=scale, cfg_mode=self._opt("cfg_mode", cfg_mode),
                sampler=self._opt("sampler", sampler), num_steps=steps,
                eta=float(self._opt("eta", eta)), clip_denoised=clip)

  # -- prompts ---------------------------------------------------------------------------------
  def image_prompt(self, text: str) -> list[int]:
    """`<s>{text}<|im_start|>` (the official conditional prefix)."""
    tok = self.tokenizer
    return [tok.bos_id, *tok.encode(text), tok.im_start_id]

  def unconditional_prompt(self) -> list[int]:
    """`<s><|im_start|>` (the official unconditional prefix: prompt "")."""
    return [self.tokenizer.bos_id, self.tokenizer.im_start_id]

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
  def _sample(self, prompts, labels, *, seed, batch_size, pad_to, **image_options):
    rng = jax.random.key(seed)
    chunks = []
    for start in range(0, len(prompts), batch_size):
      stop = min(start + batch_size, len(prompts))
      chunks.append(image_lib.sample_images(
          self.params, self.config, self.objective, prompts[start:stop],
          uncond_prompt=self.unconditional_prompt(),
          labels=None if labels is None else labels[start:stop], rng=rng,
          sample_ids=np.arange(start, stop), pad_to=pad_to, mesh=self.mesh, rules=self.rules,
          **image_options))
    return np.concatenate(chunks)

  def sample_classes(self, classes, num_per_class: int = 1, *, template: str = None,
                     use_label_embedding: Optional[bool] = None, seed: int = 0,
                     batch_size: int = 64, guidance_scale=None, cfg_mode=None, sampler=None,
                     num_steps=None, eta=None,
                     clip_denoised=None) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, H, W, C), labels (N,)), `num_per_class` per class, in class order.

    Classes go in as text through `template` (official: "Please generate an image of {}."), and
    as labels to the label embedding when the model has one (`use_label_embedding`).
    """
    if num_per_class < 1:
      raise InferenceError(f"num_per_class must be >= 1, got {num_per_class}")
    ids = self.class_ids(classes)
    if not ids:
      raise InferenceError("no classes given")
    template = template or image_lib.DEFAULT_CLASS_TEMPLATE
    labels = np.repeat(np.asarray(ids, np.int32), num_per_class)
    prompts = [self.image_prompt(template.format(self.class_names[y])) for y in labels]
    # One padded length for the whole class list: a sample is bit-identical in any batch.
    pad_to = max(len(self.image_prompt(template.format(n))) for n in self.class_names)
    use_labels = self.config.num_classes > 0 if use_label_embedding is None else use_label_embedding
    if use_labels and not self.config.num_classes:
      raise InferenceError("use_label_embedding: this model has no label embedding")
    opts = self._image_options(guidance_scale, cfg_mode, sampler, num_steps, eta,
                               clip_denoised)
    images = self._sample(prompts, labels if use_labels else None, seed=seed,
                          batch_size=batch_size, pad_to=pad_to, **opts)
    return images, labels

  def text_to_image(self, prompts: Sequence[str], *, seed: int = 0, batch_size: int = 64,
                    guidance_scale=None, cfg_mode=None, sampler=None, num_steps=None,
                    eta=None, clip_denoised=None) -> np.ndarray:
    _check_prompts(prompts)
    opts = self._image_options(guidance_scale, cfg_mode, sampler, num_steps, eta,
                               clip_denoised)
    return self._sample([self.image_prompt(p) for p in prompts], None, seed=seed,
                        batch_size=batch_size, pad_to=0, **opts)

  def decode(self, images: np.ndarray) -> np.ndarray:
    """Model-space images -> pixels in [-1, 1] through the run's VAE (identity in pixel space)."""
    if self.run_config is None:
      return np.asarray(images)
    from monoformer_jax.train.periodic_samples import decode_images  # pylint: disable=import-outside-toplevel
    return np.asarray(decode_images(images, self.run_config))

  # -- text ------------------------------------------------------------------------------------
  def _token_sampling(self, temperature, top_k, top_p, greedy):
    if greedy:
      return TokenSampling()
    return TokenSampling(float(self._opt("temperature", temperature)),
                         int(self._opt("top_k", top_k)), float(self._opt("top_p", top_p)))

  def _continuation(self, prompt_ids, new_ids):
    # Decode prompt + continuation together: SentencePiece drops the leading space of a piece
    # decoded alone ("The" + "▁class" would lose the space between them).
    head = self.tokenizer.decode(prompt_ids)
    full = self.tokenizer.decode(list(prompt_ids) + list(new_ids))
    return full[len(head):] if full.startswith(head) else self.tokenizer.decode(new_ids)

  def generate_text(self, prompts: Sequence[str], *, max_new_tokens=None, temperature=None,
                    top_k=None, top_p=None, greedy: bool = False, seed: int = 0,
                    stop_tokens: Optional[Sequence[int]] = None) -> list[str]:
    """Continuations of `<s>{prompt}` (cut before the stop token; default `</s>`)."""
    _check_prompts(prompts)
    tok = self.tokenizer
    ids = [[tok.bos_id, *tok.encode(p)] for p in prompts]
    stops = (tok.eos_id,) if stop_tokens is None else tuple(stop_tokens)
    out = decode_lib.generate_tokens(
        self.params, self.config, ids, max_new_tokens=int(self._opt("max_new_tokens",
                                                                   max_new_tokens)),
        sampling=self._token_sampling(temperature, top_k, top_p, greedy),
        rng=jax.random.key(seed), stop_tokens=stops, mesh=self.mesh, rules=self.rules)
    return [self._continuation(p[1:], [t for t in new if t not in stops])
            for p, new in zip(ids, out)]

  def generate(self, prompts: Sequence[str], *, max_new_tokens=None, max_images: int = 1,
               temperature=None, top_k=None, top_p=None, greedy: bool = False, seed: int = 0,
               guidance_scale=None, cfg_mode=None, sampler=None, num_steps=None,
               eta=None, clip_denoised=None) -> list[list[tuple]]:
    """Text and images in one call. Per prompt, the new parts in order: ('text', str) and
    ('image', (H, W, C) array in model space). A prompt may end with `<|im_start|>`."""
    _check_prompts(prompts)
    tok = self.tokenizer
    ids = [[tok.bos_id, *tok.encode(p)] for p in prompts]
    opts = self._image_options(guidance_scale, cfg_mode, sampler, num_steps, eta,
                               clip_denoised)
    results = interleaved_lib.generate_interleaved(
        self.params, self.config, self.objective, ids, image_token=tok.im_start_id,
        end_token=tok.im_end_id, uncond_prompt=self.unconditional_prompt(),
        max_new_tokens=int(self._opt("max_new_tokens", max_new_tokens)),
        sampling=self._token_sampling(temperature, top_k, top_p, greedy),
        stop_tokens=(tok.eos_id,), max_images=max_images, rng=jax.random.key(seed),
        mesh=self.mesh, rules=self.rules, **opts)
    return [self._parts(p, r) for p, r in zip(ids, results)]

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
