"""Sample grids and text written during training (WORKDIR/samples/), from the EMA weights.

Images: one row per class, prompts through the official sampling template, classifier-free
guidance against the official unconditional prompt, the config's sampler / steps / scale.
Text: continuations of a few fixed openings.

The samplers here recompute the full sequence at every step (simple and exact); the cached
samplers of `monoformer_jax.inference` are the fast path for sampling at scale.
"""

from __future__ import annotations

import os

import functools

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from monoformer_jax.model import inputs as inputs_lib
from monoformer_jax.model.monoformer import MonoFormer

TEXT_OPENINGS = ("The", "A class", "If the")


def to_uint8(images: np.ndarray) -> np.ndarray:
  """[-1, 1] floats -> uint8 (pixel-space models; latents are decoded before this)."""
  return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def grid(images_uint8: np.ndarray, rows: int) -> np.ndarray:
  """(N, H, W, C) -> one (rows*H, cols*W, C) image, row-major."""
  n, h, w, c = images_uint8.shape
  cols = int(np.ceil(n / rows))
  out = np.zeros((rows * h, cols * w, c), np.uint8)
  for i in range(n):
    r, k = divmod(i, cols)
    out[r * h:(r + 1) * h, k * w:(k + 1) * w] = images_uint8[i]
  return out


def save_png(path: str, image_hwc: np.ndarray) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  img = image_hwc[..., 0] if image_hwc.shape[-1] == 1 else image_hwc
  Image.fromarray(img).save(path)


def _prefix_batch(model_config, prefixes, with_image: bool, seq_len: int, labels=None) -> dict:
  shape = (model_config.image_height, model_config.image_width, model_config.image_channels)
  batch = inputs_lib.empty_batch(len(prefixes), seq_len, 1, shape)
  for r, ids in enumerate(prefixes):
    pieces = [("text", list(ids), False)]
    if with_image:
      pieces.append(("image", np.zeros(shape, np.float32), 0 if labels is None else labels[r]))
    inputs_lib.RowBuilder(batch, r, model_config.num_patches, model_config.has_t_token).add(pieces)
  return batch


def image_sampling_options(config) -> dict:
  """The image-sampler keyword arguments of `sample_class_images` from `config.sampling` (a
  run saved before clip_denoised existed samples as it did then, unclipped)."""
  s = config.sampling
  return dict(sampler=s.sampler, num_steps=s.num_steps, guidance_scale=s.guidance_scale,
              cfg_mode=s.cfg_mode, eta=s.eta, clip_denoised=bool(s.get("clip_denoised", False)))


def sample_class_images(params, model_config, objective, tokenizer, labels, class_names, *, rng,
                        sampler, num_steps, guidance_scale, cfg_mode="eps", eta=0.0,
                        clip_denoised=False,
                        template="Please generate an image of {}.", sample_ids=None,
                        batch_sharding=None):
  """Class-conditional samples (N, H, W, C) with CFG against the official empty prompt.

  Sample n's noise comes from fold_in(rng, sample_ids[n]) (default 0..N-1), so it does not
  depend on how a large request is cut into batches. `batch_sharding` (a NamedSharding of the
  leading axis) splits the rows over devices; params should then be replicated on the same mesh.
  """
  prompts = [[tokenizer.bos_id, *tokenizer.encode(template.format(class_names[int(y)])),
              tokenizer.im_start_id] for y in labels]
  uncond = [tokenizer.bos_id, tokenizer.im_start_id]
  guided = guidance_scale > 1.0
  rows = prompts + ([uncond] * len(prompts) if guided else [])
  # The row length depends on the class list only, not on which classes this call draws, so a
  # sample comes out the same whatever batch it is drawn in.
  longest = 2 + max(len(tokenizer.encode(template.format(c))) for c in class_names)
  seq_len = longest + model_config.num_patches + int(model_config.has_t_token)
  # With the optional label embedding, conditional rows carry their class and unconditional rows
  # the null class (index num_classes), as in training's CFG dropout.
  row_labels = [int(y) for y in labels] + ([model_config.num_classes] * len(prompts)
                                           if guided else [])
  batch = jax.tree.map(jnp.asarray, _prefix_batch(model_config, rows, True, seq_len, row_labels))
  ids = jnp.asarray(np.arange(len(prompts)) if sample_ids is None else sample_ids, jnp.int32)
  if batch_sharding is not None:
    batch, ids = jax.device_put((batch, ids), batch_sharding)
  return np.asarray(_sample_images(params, batch, rng, ids, objective,
                                   model_config, sampler, int(num_steps),
                                   float(guidance_scale), cfg_mode, float(eta),
                                   bool(clip_denoised)))


@functools.partial(jax.jit, static_argnums=(5, 6, 7, 8, 9, 10, 11))
def _sample_images(params, batch, rng, ids, objective, model_config, sampler, num_steps, scale,
                   cfg_mode, eta, clip_denoised):
  from monoformer_jax import diffusion  # pylint: disable=import-outside-toplevel
  model = MonoFormer(model_config)

  def model_fn(x, t):
    out = model.apply({"params": params}, batch, x[:, None], t[:, None], return_logits=False)
    return out["image"][:, 0]

  if scale > 1.0:
    denoise = diffusion.cfg_denoise_fn(model_fn, scale, cfg_mode, model_config.learn_sigma)
  else:
    denoise = model_fn
  from monoformer_jax.inference.image import run_sampler  # pylint: disable=import-outside-toplevel
  shape = (model_config.image_height, model_config.image_width, model_config.image_channels)
  return run_sampler(objective, denoise, rng, ids, shape, sampler=sampler, num_steps=num_steps,
                     eta=eta, clip_denoised=clip_denoised)


def generate_text(params, model_config, tokenizer, prompts, *, rng, max_new_tokens,
                  temperature=1.0, top_k=0, top_p=1.0):
  """Sampled continuations of each prompt (full recompute per token), as strings."""
  prefixes = [[tokenizer.bos_id, *tokenizer.encode(p)] for p in prompts]
  seq_len = max(len(p) for p in prefixes) + max_new_tokens
  batch = _prefix_batch(model_config, prefixes, False, seq_len)
  lengths = np.array([len(p) for p in prefixes], np.int32)
  tokens = _generate(params, jax.tree.map(jnp.asarray, batch), jnp.asarray(lengths), rng,
                     model_config, int(max_new_tokens), float(temperature), int(top_k),
                     float(top_p))
  out = []
  for r, n in enumerate(lengths):
    ids = [int(t) for t in np.asarray(tokens[r, n:n + max_new_tokens])]
    if tokenizer.eos_id in ids:
      ids = ids[:ids.index(tokenizer.eos_id)]
    # Decode prompt + continuation together: SentencePiece drops a leading space when a
    # continuation is decoded alone ("The" + "debugger" would lose the space between them).
    head = tokenizer.decode(prefixes[r][1:])
    full = tokenizer.decode(prefixes[r][1:] + ids)
    out.append(full[len(head):] if full.startswith(head) else tokenizer.decode(ids))
  return out


@functools.partial(jax.jit, static_argnums=(4, 5, 6, 7, 8))
def _generate(params, batch, lengths, rng, model_config, max_new, temperature, top_k, top_p):
  model = MonoFormer(model_config)
  rows = jnp.arange(batch["tokens"].shape[0])

  def body(i, state):
    tokens, seg = state
    b = dict(batch, tokens=tokens, segment_ids=seg)
    logits = model.apply({"params": params}, b, return_image=False)["logits"]
    pos = lengths - 1 + i
    logits = logits[rows, pos].astype(jnp.float32) / jnp.maximum(temperature, 1e-6)
    if top_k:
      kth = jnp.sort(logits, axis=-1)[:, -top_k][:, None]
      logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
      sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
      cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
      cutoff = jnp.take_along_axis(sorted_logits, jnp.sum(cum < top_p, axis=-1)[:, None], -1)
      logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    nxt = jax.random.categorical(jax.random.fold_in(rng, i), logits)
    tokens = tokens.at[rows, pos + 1].set(nxt)
    seg = seg.at[rows, pos + 1].set(1)
    return tokens, seg

  positions = jnp.broadcast_to(jnp.arange(batch["tokens"].shape[1]), batch["tokens"].shape)
  batch = dict(batch, positions=positions)
  tokens, _ = jax.lax.fori_loop(0, max_new, body, (batch["tokens"], batch["segment_ids"]))
  return tokens


def decode_images(images, config):
  """Latents -> pixels through the run's VAE (config.vae.path); pixel-space runs pass through."""
  vae = config.get("vae") if hasattr(config, "get") else None
  if not vae or not vae.get("path"):
    return images
  from monoformer_jax import vae as vae_lib  # pylint: disable=import-outside-toplevel
  vae_config, vae_params = vae_lib.load_diffusers_vae(vae.path)
  return np.asarray(vae_lib.decode_latents(vae_params, jnp.asarray(images), scale=vae.scale,
                                           config=vae_config))


class PeriodicSampler:
  """Writes `samples/step_<N>.png` (a row per class) and `samples/step_<N>.txt`."""

  def __init__(self, config, model_config, objective, tokenizer, workdir, writer, is_main):
    self.config, self.model_config, self.objective = config, model_config, objective
    self.tokenizer, self.writer, self.is_main = tokenizer, writer, is_main
    self.dir = os.path.join(workdir, "samples")
    from monoformer_jax.train.setup import class_names  # pylint: disable=import-outside-toplevel
    self.class_names = class_names(config)

  def discard_after(self, step: int) -> None:
    """Deletes sample files of steps past `step` (written by a killed run after its last
    checkpoint): the resumed run writes its own, and a sample it never reaches must not stay."""
    if not self.is_main or not os.path.isdir(self.dir):
      return
    for name in os.listdir(self.dir):
      stem, ext = os.path.splitext(name)
      if ext in (".png", ".txt") and stem.startswith("step_") and stem[5:].isdigit() \
          and int(stem[5:]) > step:
        os.remove(os.path.join(self.dir, name))

  def __call__(self, step: int, params) -> None:
    s = self.config.sampling
    rng = jax.random.key(self.config.seed + 12345)
    params = jax.device_get(params)
    if self.objective is not None and self.class_names:
      per = s.num_per_class
      labels = np.repeat(np.arange(len(self.class_names)), per)
      images = sample_class_images(
          params, self.model_config, self.objective, self.tokenizer, labels, self.class_names,
          rng=rng, **image_sampling_options(self.config))
      images = decode_images(images, self.config)
      picture = grid(to_uint8(images), rows=len(self.class_names))
      if self.is_main:
        save_png(os.path.join(self.dir, f"step_{step}.png"), picture)
        self.writer.write_image(step, "samples", picture if picture.shape[-1] == 3 else
                                np.repeat(picture, 3, axis=-1))
    if self.config.schedule.ar > 0 or self.config.schedule.mixed > 0:
      texts = generate_text(
          params, self.model_config, self.tokenizer, list(TEXT_OPENINGS), rng=rng,
          max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k,
          top_p=s.top_p)
      body = "\n\n".join(f"[{p}] {p}{t}" for p, t in zip(TEXT_OPENINGS, texts))
      if self.is_main:
        os.makedirs(self.dir, exist_ok=True)
        with open(os.path.join(self.dir, f"step_{step}.txt"), "w") as f:
          f.write(body + "\n")
        self.writer.write_text(step, "text_samples", body)
    if self.is_main:
      print(f"wrote samples for step {step} to {self.dir}", flush=True)
