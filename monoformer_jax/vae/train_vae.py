"""Trains a small AutoencoderKL on MNIST-5k and saves it as a diffusers folder.

    python -m monoformer_jax.vae.train_vae --config=configs/mnist_vae.py --workdir=runs/mnist_vae

Writes WORKDIR/vae (config.json + diffusion_pytorch_model.safetensors, loadable with
`load_diffusers_vae` exactly like the real SD-VAE; `scaling_factor` = 1 / std of the sampled
training latents, as SD chose 0.18215), WORKDIR/vae_metrics.json (held-out reconstruction MSE
and PSNR, the mean-image baseline, training time) and WORKDIR/reconstructions.png (held-out
digits over their reconstructions). The loss is a per-element L2 (+ L1) reconstruction of a
latent *sampled* from the posterior, plus a small KL to N(0, I).
"""

from __future__ import annotations

import io
import json
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags
from etils import epath

from monoformer_jax import cli
from monoformer_jax.compilation_cache import enable_compilation_cache
from monoformer_jax.data import mnist
from monoformer_jax.host_memory import tune_for_xla_cpu
from monoformer_jax.vae import export, latents
from monoformer_jax.vae.autoencoder_kl import AutoencoderKL, VAEConfig, init_params

IMAGE_SIZE = 28


def vae_config_from(config, scaling_factor: float = 1.0) -> VAEConfig:
  v = config.vae
  return VAEConfig(
      in_channels=1,
      out_channels=1,
      block_out_channels=tuple(v.block_out_channels),
      layers_per_block=v.layers_per_block,
      latent_channels=v.latent_channels,
      norm_num_groups=v.norm_num_groups,
      scaling_factor=scaling_factor,
      mid_block_add_attention=v.mid_block_add_attention,
  )


def mnist_splits(config) -> tuple[np.ndarray, np.ndarray]:
  """(train, held-out) float32 digits in [-1, 1], N x 28 x 28 x 1 (MnistSource's fixed split)."""
  images, labels = mnist.load_mnist5k()
  train, hold = mnist.split_indices(len(labels), config.holdout_fraction)
  if config.max_train_images:  # a random subset: the file is sorted by digit
    subset = np.random.default_rng(config.seed).permutation(len(train))[: config.max_train_images]
    train = train[np.sort(subset)]
  to_float = lambda x: x.astype(np.float32) / 127.5 - 1.0
  return to_float(images[train]), to_float(images[hold])


def make_loss(model: AutoencoderKL, l1_weight: float, kl_weight: float):
  def loss_fn(params, images, rng):
    mean, logvar = model.apply({"params": params}, images, method=model.encode)
    z = latents.sample_latents(mean, logvar, rng, scale=1.0)
    recon = model.apply({"params": params}, z, method=model.decode)
    err = recon - images
    l2, l1 = jnp.mean(jnp.square(err)), jnp.mean(jnp.abs(err))
    kl = 0.5 * jnp.mean(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
    loss = l2 + l1_weight * l1 + kl_weight * kl
    return loss, {"loss": loss, "l2": l2, "l1": l1, "kl": kl, "logvar": jnp.mean(logvar)}

  return loss_fn


def make_optimizer(config):
  o = config.optimizer
  schedule = optax.warmup_cosine_decay_schedule(
      0.0,
      o.learning_rate,
      max(o.warmup_steps, 1),
      max(config.num_train_steps, 2),
      end_value=o.learning_rate * o.final_lr_fraction,
  )
  return optax.chain(optax.clip_by_global_norm(o.grad_clip), optax.adam(schedule))


def reconstruct(params, vae_config: VAEConfig, images: np.ndarray, batch_size: int = 250):
  """Decodes the posterior mean of each image (the deterministic reconstruction), float32."""
  out = []
  for start in range(0, len(images), batch_size):
    mean, _ = latents.encode_moments(params, images[start : start + batch_size], config=vae_config)
    out.append(np.asarray(latents.decode_latents(params, mean, 1.0, config=vae_config)))
  return np.concatenate(out)


def reconstruction_metrics(images: np.ndarray, recon: np.ndarray) -> dict:
  """MSE in [-1, 1] units, and PSNR in dB of the images mapped to [0, 1] (recon clipped)."""
  recon = np.clip(recon, -1.0, 1.0)
  mse = float(np.mean(np.square(recon - images)))
  psnr = float(10 * np.log10(4.0 / max(mse, 1e-12)))  # peak-to-peak 2 in [-1, 1] units
  return {"mse": mse, "psnr_db": psnr}


def latent_scaling_factor(params, vae_config: VAEConfig, images: np.ndarray, seed: int) -> float:
  """1 / std of latents sampled from the posterior (how SD's 0.18215 was set)."""
  mean, logvar = latents.encode_moments(params, images, config=vae_config)
  z = latents.sample_latents(mean, logvar, jax.random.key(seed), scale=1.0)
  return float(1.0 / jnp.std(z))


def _save_grid(path: str, top: np.ndarray, bottom: np.ndarray) -> None:
  from PIL import Image  # pylint: disable=import-outside-toplevel

  rows = [np.concatenate(list(row[..., 0]), axis=1) for row in (top, np.clip(bottom, -1, 1))]
  grid = np.concatenate(rows, axis=0)
  buf = io.BytesIO()
  Image.fromarray(np.round((grid + 1) * 127.5).astype(np.uint8)).save(buf, format="PNG")
  epath.Path(path).write_bytes(buf.getvalue())


def _train(config, vae_config, train_images: np.ndarray):
  """(params, the last logged step's metrics, seconds) of `config.num_train_steps` steps over
  `train_images`, a fresh permutation of them every epoch."""
  model = AutoencoderKL(vae_config)
  rng = jax.random.key(config.seed)
  rng, init_rng = jax.random.split(rng)
  params = nn.unbox(init_params(vae_config, init_rng, IMAGE_SIZE))
  optimizer = make_optimizer(config)
  opt_state = optimizer.init(params)
  loss_fn = make_loss(model, config.loss.l1_weight, config.loss.kl_weight)

  @jax.jit
  def train_step(params, opt_state, images, rng):
    grads, metrics = jax.grad(loss_fn, has_aux=True)(params, images, rng)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, metrics

  order_rng = np.random.default_rng(config.seed)
  order, pos = order_rng.permutation(len(train_images)), 0
  start = time.time()
  metrics = {}
  for step in range(1, config.num_train_steps + 1):
    if pos + config.batch_size > len(order):  # a fresh permutation per epoch
      order, pos = order_rng.permutation(len(train_images)), 0
    batch = train_images[order[pos : pos + config.batch_size]]
    pos += config.batch_size
    params, opt_state, metrics = train_step(params, opt_state, batch, jax.random.fold_in(rng, step))
    if step % config.log_every_steps == 0 or step == config.num_train_steps:
      m = {k: float(v) for k, v in jax.device_get(metrics).items()}
      if not np.isfinite(m["loss"]):
        raise FloatingPointError(f"step {step}: non-finite VAE loss {m}")
      print(
          f"step {step}/{config.num_train_steps}: "
          + ", ".join(f"{k}={v:.4g}" for k, v in m.items())
          + f" ({time.time() - start:.1f}s)",
          flush=True,
      )
  jax.block_until_ready(params)
  return params, metrics, time.time() - start


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains, measures and saves; returns the metrics written to WORKDIR/vae_metrics.json."""
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  train_images, hold_images = mnist_splits(config)
  if len(train_images) < config.batch_size:
    raise ValueError(f"batch_size {config.batch_size} exceeds the {len(train_images)} digits")
  vae_config = vae_config_from(config)
  params, metrics, train_time = _train(config, vae_config, train_images)

  recon = reconstruct(params, vae_config, hold_images)
  scale = latent_scaling_factor(params, vae_config, train_images[: config.num_scale_images], config.seed + 1)
  baseline = np.broadcast_to(train_images.mean(axis=0, keepdims=True), hold_images.shape)
  result = {
      "heldout": reconstruction_metrics(hold_images, recon),
      "heldout_mean_image_baseline": reconstruction_metrics(hold_images, baseline),
      "num_heldout": int(len(hold_images)),
      "scaling_factor": scale,
      "latent_shape": [IMAGE_SIZE // vae_config.downsample_factor] * 2 + [vae_config.latent_channels],
      "train_time_s": train_time,
      "num_train_steps": int(config.num_train_steps),
      "batch_size": int(config.batch_size),
      "final_train_metrics": {k: float(v) for k, v in jax.device_get(metrics).items()},
      "devices": f"{jax.device_count()} x {jax.devices()[0].platform}",
  }
  vae_dir = export.save_diffusers_vae(os.path.join(workdir, "vae"), vae_config_from(config, scale), params, IMAGE_SIZE)
  epath.Path(workdir, "vae_metrics.json").write_text(json.dumps(result, indent=2))
  shown = np.linspace(0, len(hold_images) - 1, 16).astype(int)  # every digit (sorted by class)
  _save_grid(os.path.join(workdir, "reconstructions.png"), hold_images[shown], recon[shown])
  print(
      f"held-out reconstruction: MSE {result['heldout']['mse']:.5f}, PSNR "
      f"{result['heldout']['psnr_db']:.2f} dB (mean-image baseline MSE "
      f"{result['heldout_mean_image_baseline']['mse']:.4f}); scaling_factor {scale:.4f}; "
      f"trained in {train_time:.1f}s; wrote {vae_dir}",
      flush=True,
  )
  return result


def define_flags(fv, argv=()):
  """`argv`: the command line, where the config flag finds its --config.FIELD overrides."""
  cli.define_config(fv, argv, "VAE training config file.")
  flags.DEFINE_string("workdir", None, "Output directory (WORKDIR/vae, vae_metrics.json).", flag_values=fv)
  flags.mark_flags_as_required(["config", "workdir"], flag_values=fv)


def run(fv, args) -> int:
  cli.refuse_arguments(args)
  tune_for_xla_cpu()  # before JAX's first computation (see host_memory.py)
  enable_compilation_cache()  # a later run loads what this one compiles (compilation_cache.py)
  train_and_evaluate(fv.config, fv.workdir)
  return 0


main = cli.entry_point(__doc__, define_flags, run)


if __name__ == "__main__":
  cli.run_as_script(main)
