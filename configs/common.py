"""Defaults shared by every config; each config file starts from `base_config()`."""

import ml_collections

from monoformer_jax.train.sharding import DEFAULT_RULES


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Top-level names that scripts outside the package rely on (flax examples' conventions).
  c.seed = 0
  c.num_train_steps = 1000
  c.log_every_steps = 50
  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 3
  c.sample_every_steps = 0          # 0: only at the end of training
  c.init_from = ""                  # "hf:DIR" (LLaMA), "official:DIR" (MonoFormer), "run:WORKDIR"

  c.model = ml_collections.ConfigDict(dict(
      vocab_size=32004, hidden_size=2048, intermediate_size=5632, num_layers=22, num_heads=32,
      num_kv_heads=4, head_dim=0, rms_norm_eps=1e-5, rope_theta=10000.0,
      max_position_embeddings=2048, initializer_range=0.02, image_height=32, image_width=32,
      image_channels=4, patch_size=2, learn_sigma=True, t_embed="adaln_before_decoder",
      bidirectional_image=True, use_pos_embed=True, num_classes=0, timestep_freq_dim=256,
      dtype="bfloat16", remat="none", scan_layers=False))

  # The official objective: IDDPM Gaussian diffusion, 1000 linear-beta steps, eps + learned sigma.
  # min_snr_gamma > 0 weights the Gaussian mse by Min-SNR-gamma (not official; diffusion/losses.py).
  c.objective = ml_collections.ConfigDict(dict(
      kind="gaussian", num_timesteps=1000, beta_schedule="linear", min_snr_gamma=0.0))

  # Defaults of `python -m monoformer_jax.sample` and of the periodic samples.
  c.sampling = ml_collections.ConfigDict(dict(
      sampler="ddpm", num_steps=250, guidance_scale=1.5, cfg_mode="eps", eta=0.0,
      clip_denoised=False,           # clamp predicted x0 to [-1, 1] (pixels; official: off)
      num_per_class=4, temperature=0.7, top_k=50, top_p=0.95, max_new_tokens=64))

  c.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=1e-4, schedule="constant", warmup_steps=0, decay_steps=0,
      final_lr_fraction=0.0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, grad_clip=2.0,
      grad_accum_steps=1))
  c.ema = ml_collections.ConfigDict(dict(decay=0.9999, warmup=False))

  # Loss weights of the mixed step (official: 1.0 * L_diff + 0.01 * L_LM).
  c.loss = ml_collections.ConfigDict(dict(diffusion_weight=1.0, lm_weight=0.01))
  # Which step runs when: weights of 'diffusion', 'ar' and 'mixed' steps; text_warmup_steps AR
  # steps first (train/scheduler.py).
  c.schedule = ml_collections.ConfigDict(dict(diffusion=1.0, ar=0.0, mixed=0.0,
                                              text_warmup_steps=0))

  c.data = ml_collections.ConfigDict(dict(
      image_source="mnist",          # mnist | image_folder | latents (ArrayRecord) | image_text_jsonl
      image_path="",
      image_batch_size=64,           # global batch of diffusion rows
      image_seq_len=0,               # 0: smallest length that fits prompt + image
      image_slots=1,
      text_source="pydoc",           # pydoc | text_file | chat_jsonl
      text_path="",
      text_batch_size=64,            # global batch of AR rows
      text_seq_len=128,
      packing=True,                  # pack several text samples per row
      prompt_dropout=0.1,            # CFG text dropout (official --text_dropout_prob)
      prompt_templates="official",
      lm_loss_on_image_prompts=False,
      latent_scale=1.0,
      class_names_file="",           # JSON list (or {label: name}) of class names for prompts
      max_prompt_tokens=64,          # free-text prompts (image-text JSONL) are cut to this
      worker_count=0,
      skip_bad_records=False,
      tokenizer="train",             # "train" (SentencePiece on the corpus, cached) or a .model path
      tokenizer_vocab_size=1024,
  ))
  # The VAE that decodes latents to pixels (a diffusers folder) and its scaling_factor; path ""
  # means the model works in pixel space. The sampler and the periodic samples read these.
  c.vae = ml_collections.ConfigDict(dict(path="", scale=1.0))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.logical_axis_rules = [list(r) for r in DEFAULT_RULES]
  return c
