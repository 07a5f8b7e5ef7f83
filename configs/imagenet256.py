"""The paper's recipe: MonoFormer (TinyLlama-1.1B) on ImageNet-256 SD-VAE latents.

    # latents first: python -m monoformer_jax.tools.extract_latents ... (see README)
    launch/tpu_pod.sh --config=configs/imagenet256.py --workdir=gs://BUCKET/runs/in256 \\
        --config.init_from=hf:/path/to/TinyLlama-1.1B-Chat-v1.0 \\
        --config.data.image_path=/path/to/imagenet256_latents

Official settings (MONOFORMER.md section 3): AdamW lr 1e-4 constant, weight decay 0, clip 2.0,
global batch 256, EMA 0.9999 every step (no warm-up), bf16 compute, 1000-step linear-beta
Gaussian diffusion with learned sigma, class names as text prompts with the official templates and
10% prompt dropout, `adaln_before_decoder` (the released checkpoint). ImageNet-only training has no
LM loss, so only diffusion steps run. Sampling: 250 respaced DDPM steps, CFG 1.5 on the first three
eps channels (`official_first3`, the official sampler behind the paper's FID). The state (params,
EMA, Adam moments: 16 bytes a parameter, ~18 GB) is sharded over every chip (FSDP); on v5e:16x16
each step fits a 16 GiB chip (`python -m monoformer_jax.tools.compile_for --config=configs/imagenet256.py
--topology=v5e:16x16`; benchmarks/RESULTS.md).

Variants: `repo` uses the t-token conditioning of the repository's configs
(`add_before_image_tokens`); `dp` replicates the state (pure data parallelism, small models
only); `eps` guides every eps channel.
"""

from monoformer_jax.run.config import base_config


def get_config(arg: str = ""):
  c = base_config()
  c.num_train_steps = 500_000
  c.log_every_steps = 100
  c.checkpoint_every_steps = 10_000
  c.sample_every_steps = 10_000
  c.model.update(dict(dtype="bfloat16", remat="full", scan_layers=True))
  c.data.update(
      dict(
          image_source="latents",
          image_batch_size=256,
          latent_scale=0.18215,
          prompt_dropout=0.1,
          tokenizer="",
          tokenizer_vocab_size=32000,
      )
  )
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
    else:
      raise ValueError(f"unknown variant {variant!r} of imagenet256 (variants: repo, dp, eps)")
  return c
