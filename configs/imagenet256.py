"""The paper's recipe: MonoFormer (TinyLlama-1.1B) on ImageNet-256 SD-VAE latents.

Given only local files (a TinyLlama folder with its tokenizer.model, the SD-VAE, ImageNet):

    # 1. latents, with human class names from ImageNet's synset mapping (class_names.json lands
    #    beside the latents and the run reads it from there):
    python -m monoformer_jax.tools.extract_latents --vae /path/to/sd-vae-ft-mse --source image_folder \
        --input /path/to/imagenet/train --image_size 256 \
        --class_names /path/to/LOC_synset_mapping.txt --out /path/to/imagenet256_latents
    # 2. before paying for a slice: does it fit, how fast will it be (nothing runs; minutes on a CPU)
    python -m monoformer_jax.tools.compile_for --config=configs/imagenet256.py --topology=v5e:16x16
    # 3. train (the tokenizer is TinyLlama's tokenizer.model, found in the init_from folder)
    launch/tpu_pod.sh --config=configs/imagenet256.py --workdir=gs://BUCKET/runs/in256 \
        --config.init_from=hf:/path/to/TinyLlama-1.1B-Chat-v1.0 \
        --config.data.image_path=/path/to/imagenet256_latents --config.vae.path=/path/to/sd-vae-ft-mse

Official settings (MonoFormer's scripts/train_imagenet.sh and configs): AdamW lr 1e-4 constant,
weight decay 0, clip 2.0, global batch 256, EMA 0.9999 every step (no warm-up), bf16 compute,
1000-step linear-beta Gaussian diffusion with learned sigma, class names as text prompts with the
official templates and 10% prompt dropout, `adaln_before_decoder` (the released checkpoint).
ImageNet-only training has no LM loss, so only diffusion steps run. Sampling: 250 respaced DDPM
steps, CFG 1.5 on the first three eps channels (`official_first3`, the official sampler behind the
paper's FID). The state (params, EMA, Adam moments: 16 bytes a parameter, ~18 GB) is sharded over
every chip (FSDP); on v5e:16x16 each step fits a 16 GiB chip (benchmarks/RESULTS.md). Periodic
samples: a grid of the first `sampling.grid_classes` classes x `num_per_class`, drawn on the
training mesh from the sharded EMA weights and decoded through `vae.path` when given.

Variants: `repo` uses the t-token conditioning of the official repository's configs
(`add_before_image_tokens`); `dp` replicates the state (pure data parallelism, small models
only); `eps` guides every eps channel; `smoke` is the same recipe and code path shrunk to run in
seconds on a CPU (a tiny model on 16x16 images through a 2-level VAE: 8x8x4 latents; tokenizer
trained on the run; what the tests run end to end: extraction, training on 2 processes,
sampling, FID).
"""

import ml_collections

from monoformer_jax.run.config import base_config


def get_config(arg: str = ""):
  c = base_config()
  c.num_train_steps = 500_000
  c.log_every_steps = 100
  c.checkpoint_every_steps = 10_000
  c.sample_every_steps = 10_000
  c.model.update(dict(dtype="bfloat16", remat="full", scan_layers=True))
  # SD-VAE's scaling_factor; vae.scale and data.latent_scale are one value (setting either sets both).
  scale = ml_collections.FieldReference(0.18215)
  c.data.update(
      dict(
          image_source="latents",
          image_batch_size=256,
          latent_scale=scale,
          prompt_dropout=0.1,
          tokenizer="",  # "": the init_from folder's tokenizer.model (TinyLlama's)
          tokenizer_vocab_size=32000,
      )
  )
  c.vae.scale = scale
  c.schedule.update(dict(diffusion=1.0, ar=0.0, mixed=0.0))
  c.sampling.update(dict(sampler="ddpm", num_steps=250, guidance_scale=1.5, cfg_mode="official_first3"))
  c.mesh.update(dict(data=1, fsdp=-1, tensor=1))
  for variant in filter(None, arg.split(",")):
    if variant == "repo":
      c.model.t_embed = "add_before_image_tokens"
    elif variant == "dp":
      c.mesh.update(dict(data=-1, fsdp=1, tensor=1))
    elif variant == "eps":
      c.sampling.cfg_mode = "eps"
    elif variant == "smoke":
      _shrink_for_smoke(c)
    else:
      raise ValueError(f"unknown variant {variant!r} of imagenet256 (variants: repo, dp, eps, smoke)")
  return c


def _shrink_for_smoke(c) -> None:
  """The recipe at toy size: the same data path (latents + class_names.json), FSDP mesh, bf16,
  remat, scanned layers, guided sampler and periodic samples; no TinyLlama (a fresh model and a
  tokenizer trained on the run's prompts and the embedded text). Give data.image_path and
  vae.path (and vae.scale: the VAE's scaling_factor) on the command line."""
  c.num_train_steps = 4
  c.log_every_steps = 2
  c.checkpoint_every_steps = 2
  c.sample_every_steps = 4
  c.model.update(
      dict(
          hidden_size=32,
          intermediate_size=64,
          num_layers=2,
          num_heads=4,
          num_kv_heads=2,
          vocab_size=516,
          image_height=8,
          image_width=8,
          image_channels=4,
          patch_size=2,
          max_position_embeddings=128,
      )
  )
  c.data.update(dict(image_batch_size=8, tokenizer="train", tokenizer_vocab_size=512, max_prompt_tokens=16))
  c.sampling.update(dict(num_steps=4, num_per_class=2, grid_classes=2))
