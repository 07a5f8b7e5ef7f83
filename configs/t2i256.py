"""The paper's text-to-image recipe: MonoFormer (TinyLlama-1.1B) on captioned images (JourneyDB),
SD-VAE latents at 256.

Given only local files (a TinyLlama folder with its tokenizer.model, the SD-VAE, JourneyDB's
images and its train_anno.jsonl, lines {"img_path": ..., "prompt": ...}):

    # 1. latents with their captions (JourneyDB misses many images: they are skipped and counted)
    python -m monoformer_jax.tools.extract_latents --vae /path/to/sd-vae-ft-mse \
        --source image_text_jsonl --input /path/to/JourneyDB/train/train_anno.jsonl \
        --image_root /path/to/JourneyDB/train/images --image_key img_path --image_size 256 \
        --skip_bad_records --out /path/to/journeydb256_latents
    # 2. before paying for a slice: does it fit, how fast will it be (nothing runs)
    python -m monoformer_jax.tools.compile_for --config=configs/t2i256.py --topology=v5e:16x16
    # 3. train (the tokenizer is TinyLlama's tokenizer.model, found in the init_from folder)
    launch/tpu_pod.sh --config=configs/t2i256.py --workdir=gs://BUCKET/runs/t2i256 \
        --config.init_from=hf:/path/to/TinyLlama-1.1B-Chat-v1.0 \
        --config.data.image_path=/path/to/journeydb256_latents --config.vae.path=/path/to/sd-vae-ft-mse
    # 4. samples (the prompt gets the training prefix "Please generate an image of ")
    python -m monoformer_jax.sample --workdir=gs://BUCKET/runs/t2i256 \
        --t2i_prompt="a lighthouse on a cliff at sunset" --out=lighthouse.png
    # 5. CLIP score on PartiPrompts (the official sampler's file) and FID against real images
    python -m monoformer_jax.evaluate --suite clip_score,fid --workdir=gs://BUCKET/runs/t2i256 \
        --prompts /path/to/parti_prompts.json --config.eval.clip_model=/path/to/clip-vit-large-patch14 \
        --config.eval.inception_weights=/path/to/pt_inception-2015-12-05-6726825d.pth \
        --config.eval.reference=/path/to/coco_val_images

Official settings (MonoFormer's configs/train_journeydb.py and scripts/train_journeydb.sh):
AdamW lr 1e-4 constant, weight decay 0, clip 2.0, global batch 256 (8 x 16 x 2 accumulation),
500k steps, EMA 0.9999, bf16 compute, 1000-step linear-beta Gaussian diffusion with learned
sigma, the `add_before_image_tokens` t-token (the official repository's configs), captions prefixed
"Please generate an image of " and cut to 128 tokens (`source_max_length`), 10% prompt dropout,
loss weights diffusion 1.0 / LM 0.01 (an image row carries no LM loss: only the diffusion loss
trains here). Not official: rows are as long as the longest prompt and its image need (387
tokens: <s>, 128 prompt tokens, <|im_start|>, the t-token, 256 image tokens; the untrained
`<|im_end|>\n</s>` after the image changes no loss) and the official truncation at 512 tokens
(`tokenizer_max_length`) never cuts one; checkpoints every 10k steps (the official README's; its script's
50k). Sampling: the official text-to-image sampler's 20 respaced DDPM steps, CFG 4 on the first
three eps channels (`official_first3`, sample_t2i.py / scripts/sample_t2i.sh).

Variants: `smoke` is the same recipe and code path shrunk to run in seconds on a CPU (a tiny
model on 16x16 images through a 2-level VAE: 8x8x4 latents; a tiny LLaMA in Hugging Face format
as init_from, its tokenizer.model the run's tokenizer): what tests/test_recipes.py runs end to
end, by the commands above; `dp` replicates the state (pure data parallelism, small models only).
"""

import ml_collections

from monoformer_jax.run.config import base_config

T2I_VARIANTS = ("smoke", "dp")


def get_config(arg: str = ""):
  c = t2i_config()
  for variant in filter(None, arg.split(",")):
    apply_variant(c, variant, "t2i256", T2I_VARIANTS)
  return c


def t2i_config():
  """The text-to-image recipe (what t2i_chat256.py and mllm256.py add to)."""
  c = base_config()
  c.num_train_steps = 500_000
  c.log_every_steps = 100
  c.checkpoint_every_steps = 10_000
  c.sample_every_steps = 10_000
  c.model.update(dict(dtype="bfloat16", remat="full", scan_layers=True, t_embed="add_before_image_tokens"))
  # SD-VAE's scaling_factor; vae.scale and data.latent_scale are one value (setting either sets both).
  scale = ml_collections.FieldReference(0.18215)
  c.data.update(
      dict(
          image_source="latents",  # extract_latents of the captions: records {mean, logvar, prompt}
          image_batch_size=256,
          latent_scale=scale,
          prompt_dropout=0.1,
          max_prompt_tokens=128,
          tokenizer="",  # "": the init_from folder's tokenizer.model (TinyLlama's)
          tokenizer_vocab_size=32000,
      )
  )
  c.vae.scale = scale
  c.schedule.update(dict(diffusion=1.0, ar=0.0, mixed=0.0))
  c.sampling.update(dict(sampler="ddpm", num_steps=20, guidance_scale=4.0, cfg_mode="official_first3"))
  c.mesh.update(dict(data=1, fsdp=-1, tensor=1))
  return c


def apply_variant(c, variant: str, name: str, known) -> None:
  """The variants every recipe of this family shares; `known` names those of recipe `name`."""
  if variant == "smoke" and "smoke" in known:
    shrink_for_smoke(c)
  elif variant == "dp" and "dp" in known:
    c.mesh.update(dict(data=-1, fsdp=1, tensor=1))
  else:
    raise ValueError(f"unknown variant {variant!r} of {name} (variants: {', '.join(known)})")


def shrink_for_smoke(c) -> None:
  """The recipe at toy size: the same data path (captioned latents), init_from a LLaMA folder and
  its tokenizer.model, FSDP mesh, bf16, remat, scanned layers, t-token, guided sampler. Give
  init_from (a LLaMA of this shape), data.image_path and vae.path (and vae.scale: the VAE's
  scaling_factor) on the command line."""
  c.num_train_steps = 4
  c.log_every_steps = 2
  c.checkpoint_every_steps = 4
  c.sample_every_steps = 4
  c.model.update(
      dict(
          hidden_size=32,
          intermediate_size=64,
          num_layers=2,
          num_heads=4,
          num_kv_heads=2,
          vocab_size=516,  # a LLaMA of <= 512 pieces, grown by the 4 special tokens
          image_height=8,
          image_width=8,
          image_channels=4,
          patch_size=2,
          max_position_embeddings=256,
      )
  )
  c.data.update(dict(image_batch_size=8, max_prompt_tokens=16, text_batch_size=8, text_seq_len=64))
  c.sampling.update(dict(num_steps=4, max_new_tokens=8))
