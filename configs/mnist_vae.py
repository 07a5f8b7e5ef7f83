"""A small AutoencoderKL on the embedded MNIST-5k digits: the VAE of the latent-space default.

    python -m monoformer_jax.vae.train_vae --config=configs/mnist_vae.py --workdir=runs/mnist_vae

28x28x1 digits in [-1, 1] -> 7x7x4 latents (two stride-2 downsamples: 28 -> 14 -> 7), diffusers'
AutoencoderKL architecture at a tiny width, trained with an L2 (+ L1) reconstruction loss and a
small KL weight on the 4,500 training digits (the 500 of `split_indices` are held out). Writes
WORKDIR/vae (a diffusers folder, loadable by `load_diffusers_vae` and diffusers itself, with the
latents' 1/std as `scaling_factor`) and WORKDIR/vae_metrics.json. A few minutes on 2 CPU cores.

Variants (`--config=configs/mnist_vae.py:VARIANT`):
  test    a few steps of an even smaller VAE on a few hundred digits (seconds; the tests).
"""

import ml_collections


def get_config(arg: str = ""):
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.num_train_steps = 600
  c.batch_size = 64
  c.log_every_steps = 50
  c.holdout_fraction = 0.1  # the same fixed split as MnistSource("train" / "holdout")
  c.max_train_images = 0  # 0: all training digits
  c.vae = ml_collections.ConfigDict(
      dict(
          block_out_channels=(16, 32, 32),
          layers_per_block=1,
          latent_channels=4,
          norm_num_groups=8,
          mid_block_add_attention=True,
      )
  )
  c.optimizer = ml_collections.ConfigDict(
      dict(learning_rate=2e-3, warmup_steps=30, final_lr_fraction=0.05, grad_clip=1.0)
  )
  # Per-element means: recon = mean |x - y|^2 + l1_weight * mean |x - y|; the KL is averaged per
  # latent element. A small KL keeps the posterior a real distribution (logvar well above the
  # -30 clip) that the diffusion data pipeline can re-sample, without blurring the digits.
  c.loss = ml_collections.ConfigDict(dict(l1_weight=0.1, kl_weight=1e-3))
  c.num_scale_images = 1000  # training digits whose sampled latents set scaling_factor
  if arg == "test":
    c.num_train_steps = 60
    c.batch_size = 16
    c.log_every_steps = 10
    c.max_train_images = 512
    c.num_scale_images = 128
    c.vae.update(dict(block_out_channels=(8, 16, 16), norm_num_groups=8, mid_block_add_attention=False))
    c.optimizer.update(dict(learning_rate=3e-3, warmup_steps=5))
  elif arg:
    raise ValueError(f"unknown variant {arg!r} of mnist_vae (variants: test)")
  return c
