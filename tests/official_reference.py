"""A golden directory of any size, written from a reference that shares no code with our model.

`write_golden_dir(path, sizes)` writes config.json (official field names), model.safetensors
(random weights, official key names) and cases.npz with every array of the format of
tests/testdata/model_adaln/README.txt. The arrays come from:
  * the LLaMA decoder, LM head, logits and LM losses: transformers' LlamaForCausalLM (eager
    attention, float64) loaded strictly from the `model.*` / `lm_head.*` keys of model.safetensors;
    the image cases feed it the merged embeddings and the README's mask as a 4-D additive mask,
    forward_wo_image is its plain input_ids + 2-D mask path;
  * the merge, patchify / unpatchify, 2-D sin-cos table, timestep embedder, conditioning, final
    layer, forward_with_cfg, q_sample and the respaced DDPM loop (schedule, respacing, posterior):
    written here in float64 torch / NumPy from the README's formulas (loops over indices, not
    reshapes);
  * the diffusion training losses (mse / vb): monoformer_jax.diffusion.training_losses applied to
    this reference's x_out (checked against the official code by tests/test_diffusion_golden.py).
"""

import json
import math
import os

import numpy as np
import torch
import transformers
from safetensors.torch import load_file, save_file

SPECIAL_NAMES = ("<s>", "</s>", "<PAD>", "<image>", "<|im_start|>", "<|im_end|>", "\\n")


def _special(vocab: int) -> dict:
  return {
      "<s>": 1,
      "</s>": 2,
      "\\n": 13,
      "<PAD>": vocab - 4,
      "<image>": vocab - 3,
      "<|im_start|>": vocab - 2,
      "<|im_end|>": vocab - 1,
  }


def official_config(s: dict) -> dict:
  """config.json in the official (transformers 4.38 LlamaConfig + MonoFormer) field names."""
  sp = _special(s["vocab"])
  return {
      "architectures": ["MonoFormerForCausalLM"],
      "model_type": "llama",
      "vocab_size": s["vocab"],
      "hidden_size": s["hidden"],
      "intermediate_size": s["ffn"],
      "num_hidden_layers": s["layers"],
      "num_attention_heads": s["heads"],
      "num_key_value_heads": s["kv_heads"],
      "hidden_act": "silu",
      "rms_norm_eps": s["eps"],
      "rope_theta": s["rope_theta"],
      "rope_scaling": None,
      "max_position_embeddings": 256,
      "initializer_range": 0.02,
      "tie_word_embeddings": False,
      "attention_bias": False,
      "bos_token_id": 1,
      "eos_token_id": 2,
      "torch_dtype": "float32",
      "image_size": s["image_size"],
      "in_channels": s["channels"],
      "patch_size": s["patch"],
      "learn_sigma": True,
      "decoder_t_embed": s["t_embed"],
      "use_bi_attn_img_tokens": s["bidirectional"],
      "use_pos_embed": True,
      "add_pos_embed_each_layer": False,
      "use_adaln_final_layer": True,
      "image_token_index": sp["<image>"],
  }


def _llama_config(cfg: dict):
  return transformers.LlamaConfig(
      vocab_size=cfg["vocab_size"],
      hidden_size=cfg["hidden_size"],
      intermediate_size=cfg["intermediate_size"],
      num_hidden_layers=cfg["num_hidden_layers"],
      num_attention_heads=cfg["num_attention_heads"],
      num_key_value_heads=cfg["num_key_value_heads"],
      rms_norm_eps=cfg["rms_norm_eps"],
      rope_theta=cfg["rope_theta"],
      max_position_embeddings=cfg["max_position_embeddings"],
      tie_word_embeddings=False,
      attn_implementation="eager",
  )


def random_state_dict(cfg: dict, seed: int) -> dict:
  """Official key names; every weight random (the golden generator's scheme: W ~ N(0, g^2/fan_in)
  with g = 0.5 for the adaLN layers, biases ~ N(0, 0.1^2), norms ~ 1 + N(0, 0.1^2), embeddings
  ~ N(0, 1))."""
  gen = torch.Generator().manual_seed(seed)
  h, p, c = cfg["hidden_size"], cfg["patch_size"], cfg["in_channels"]
  with torch.device("meta"):
    shapes = {k: tuple(v.shape) for k, v in transformers.LlamaForCausalLM(_llama_config(cfg)).state_dict().items()}
  image = {
      "x_embedder": (h, c * p * p),
      "t_embedder.mlp.0": (h, 256),
      "t_embedder.mlp.2": (h, h),
      "final_layer.adaLN_modulation.1": (2 * h, h),
      "final_layer.linear": (p * p * 2 * c, h),
  }
  if cfg["decoder_t_embed"] == "adaln_before_decoder":
    image["adaLN_module.1"] = (2 * h, h)
  else:
    image.update({"t_projector.0": (h, h), "t_projector.2": (h, h)})
  for name, shape in image.items():
    shapes[name + ".weight"] = shape
    shapes[name + ".bias"] = shape[:1]
  state = {}
  for key, shape in sorted(shapes.items()):
    r = torch.randn(shape, generator=gen, dtype=torch.float64)
    if key.endswith("embed_tokens.weight"):
      v = r
    elif len(shape) == 2:
      v = r * ((0.5 if "adaLN" in key else 1.0) / math.sqrt(shape[1]))
    elif key.endswith(".bias"):
      v = 0.1 * r
    else:  # RMSNorm weights
      v = 1.0 + 0.1 * r
    state[key] = v.float().contiguous()
  return state


class Reference:
  """The official forward, float64, from a directory's config.json + model.safetensors."""

  def __init__(self, path: str):
    with open(os.path.join(path, "config.json")) as f:
      self.cfg = json.load(f)
    state = load_file(os.path.join(path, "model.safetensors"))
    lm = {k: v for k, v in state.items() if k.startswith(("model.", "lm_head."))}
    self.llama = transformers.LlamaForCausalLM(_llama_config(self.cfg)).eval()
    self.llama.load_state_dict(lm, strict=True)
    self.llama.double()
    self.w = {k: v.double() for k, v in state.items() if k not in lm}
    cfg = self.cfg
    self.h, self.p, self.c = cfg["hidden_size"], cfg["patch_size"], cfg["in_channels"]
    self.latent = cfg["image_size"] // 8
    self.grid = self.latent // self.p
    self.n_img = self.grid * self.grid
    self.t_token = cfg["decoder_t_embed"] == "add_before_image_tokens"
    self.special = _special(cfg["vocab_size"])

  def _linear(self, name, x):
    return x @ self.w[name + ".weight"].T + self.w[name + ".bias"]

  def t_embed(self, t):
    """TimestepEmbedder: [cos, sin] of float32 t * freqs (as the official, in float32), MLP in
    float64."""
    half = 128
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = torch.as_tensor(t).float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1).double()
    return self._linear("t_embedder.mlp.2", torch.nn.functional.silu(self._linear("t_embedder.mlp.0", emb)))

  def pos_embed(self):
    """MAE/DiT table: features [0, H/2) encode the column, [H/2, H) the row; each half is
    [sin(pos * omega), cos(pos * omega)], omega_k = 10000^(-k / (H/4))."""
    quarter = self.h // 4
    omega = 1.0 / 10000 ** (np.arange(quarter) / quarter)
    table = np.zeros((self.n_img, self.h))
    for r in range(self.grid):
      for col in range(self.grid):
        feats = []
        for v in (col, r):
          feats += [np.sin(v * omega), np.cos(v * omega)]
        table[r * self.grid + col] = np.concatenate(feats)
    return table

  def patchify(self, x):
    """(C, h, w) -> (n_img, C*p*p): token hp*G + wp, feature c*p*p + ph*p + pw."""
    p, g = self.p, self.grid
    out = np.zeros((self.n_img, self.c * p * p))
    for hp in range(g):
      for wp in range(g):
        for c in range(self.c):
          for ph in range(p):
            for pw in range(p):
              out[hp * g + wp, c * p * p + ph * p + pw] = x[c, hp * p + ph, wp * p + pw]
    return out

  def unpatchify(self, tokens):
    """(n_img, p*p*C_out) in (ph, pw, C) feature order -> (C_out, h, w)."""
    p, g, c_out = self.p, self.grid, 2 * self.c
    out = np.zeros((c_out, self.latent, self.latent))
    for hp in range(g):
      for wp in range(g):
        for ph in range(p):
          for pw in range(p):
            for c in range(c_out):
              out[c, hp * p + ph, wp * p + pw] = tokens[hp * g + wp, (ph * p + pw) * c_out + c]
    return out

  def forward(self, ids, mask, x_t, t, labels=None):
    """The official training-path forward (merge, image path, decoder, both heads)."""
    ids, mask = np.asarray(ids), np.asarray(mask).astype(bool)
    b = len(ids)
    h = self.h
    embed = self.llama.model.embed_tokens.weight.detach()
    t_emb = self.t_embed(t)
    if self.t_token:
      c_embeds = self._linear(
          "t_projector.2", torch.nn.functional.gelu(self._linear("t_projector.0", t_emb), approximate="none")
      )
    else:
      c_embeds = self._linear("adaLN_module.1", torch.nn.functional.silu(t_emb))
    rows, kinds, row_labels = [], [], []
    for r in range(b):
      vecs, kind, lab = [], [], []
      for j in np.nonzero(mask[r])[0]:
        tok = int(ids[r, j])
        if tok == self.special["<image>"]:
          if self.t_token:
            vecs.append(c_embeds[r])
            kind.append("t")
            lab.append(-100)
          patches = torch.as_tensor(self.patchify(np.asarray(x_t[r], np.float64)))
          vecs += list(self._linear("x_embedder", patches))
          kind += ["img"] * self.n_img
          lab += [-100] * self.n_img
        else:
          vecs.append(embed[tok])
          kind.append("text")
          lab.append(-100 if labels is None else int(labels[r, j]))
      rows.append(vecs)
      kinds.append(kind)
      row_labels.append(lab)
    length = max(len(v) for v in rows)
    merged = torch.zeros((b, length, h), dtype=torch.float64)  # pads: zero vectors
    valid = np.zeros((b, length), bool)
    gen = np.zeros((b, length), bool)
    text = np.zeros((b, length), bool)
    merged_labels = np.full((b, length), -100, np.int64)
    spans = np.full((b, 2), -1, np.int64)
    for r in range(b):
      n = len(rows[r])
      merged[r, :n] = torch.stack(rows[r])
      valid[r, :n] = True
      gen[r, :n] = [k == "img" for k in kinds[r]]
      text[r, :n] = [k == "text" for k in kinds[r]]
      merged_labels[r, :n] = row_labels[r]
      if gen[r].any():
        pos = np.nonzero(gen[r])[0]
        spans[r] = pos[0], pos[-1] + 1
        assert spans[r, 1] < length, "the official last-token pos_embed quirk is not modelled"
    x = merged.clone()
    table = torch.as_tensor(self.pos_embed())
    for r in range(b):
      if spans[r, 0] >= 0:
        s0 = spans[r, 0]
        x[r, s0 : s0 + self.n_img] += table
        if not self.t_token:
          c = c_embeds[r]
          x[r, s0 : s0 + self.n_img] = x[r, s0 : s0 + self.n_img] * (1 + c[h:]) + c[:h]
    # allowed(q, k) = (k <= q and valid(k)) or (gen(q) and gen(k))
    q_idx, k_idx = np.meshgrid(np.arange(length), np.arange(length), indexing="ij")
    allowed = (k_idx <= q_idx)[None] & valid[:, None, :]
    if self.cfg["use_bi_attn_img_tokens"]:
      allowed = allowed | (gen[:, :, None] & gen[:, None, :])
    additive = torch.zeros((b, 1, length, length), dtype=torch.float64).masked_fill(
        ~torch.as_tensor(allowed)[:, None], torch.finfo(torch.float64).min
    )
    layer_outs, final = [], []
    hooks = [layer.register_forward_hook(lambda m, i, o: layer_outs.append(o)) for layer in self.llama.model.layers]
    hooks.append(self.llama.model.norm.register_forward_hook(lambda m, i, o: final.append(o)))
    try:
      with torch.no_grad():
        logits = self.llama(
            inputs_embeds=x, attention_mask=additive, position_ids=torch.arange(length)[None].expand(b, length)
        ).logits
    finally:
      for hook in hooks:
        hook.remove()
    hidden = final[0]
    # Final layer at every position; adaLN modulation on generated-image tokens only.
    y = torch.nn.functional.layer_norm(hidden, (h,), eps=1e-6)
    mod = self._linear("final_layer.adaLN_modulation.1", torch.nn.functional.silu(t_emb))
    shift, scale = mod[:, :h], mod[:, h:]
    gen_t = torch.as_tensor(gen)[..., None]
    y = torch.where(gen_t, y * (1 + scale[:, None]) + shift[:, None], y)
    flo = self._linear("final_layer.linear", y)
    image_rows = [r for r in range(b) if spans[r, 0] >= 0]
    x_out = (
        np.stack([self.unpatchify(flo[r, spans[r, 0] : spans[r, 1]].numpy()) for r in image_rows])
        if image_rows
        else None
    )
    out = {
        "merged_embeds": merged,
        "layer0_input": x,
        "final_hidden": hidden,
        "logits": logits,
        "final_layer_out": flo,
        "t_emb": t_emb,
        "c_embeds": c_embeds,
        "merged_attention_mask": valid,
        "gen_mask": gen,
        "text_mask": text,
        "attn_allowed": allowed,
        "image_spans": spans,
        "x_indices": np.asarray(image_rows),
        "x_out": x_out,
    }
    for i, o in enumerate(layer_outs):
      out[f"layer{i}_output"] = o
    if labels is not None:
      out["merged_labels"] = merged_labels
      text_rows = [r for r in range(b) if spans[r, 0] < 0]  # LM loss over text rows only
      if text_rows:
        lg = logits[text_rows, :-1].reshape(-1, logits.shape[-1])
        tg = torch.as_tensor(merged_labels[text_rows, 1:]).reshape(-1)
        out["lm_loss"] = torch.nn.functional.cross_entropy(lg, tg, ignore_index=-100)
      else:
        out["lm_loss"] = torch.zeros(())
    return {k: _np(v) for k, v in out.items() if v is not None}

  def forward_wo_image(self, ids, mask):
    """HF's own path: input_ids (the <PAD> embedding at pads), a 2-D mask, labels -100 on pads."""
    ids_t, mask_t = torch.as_tensor(ids), torch.as_tensor(np.asarray(mask).astype(np.int64))
    labels = torch.where(mask_t.bool(), ids_t, -100)
    with torch.no_grad():
      out = self.llama(input_ids=ids_t, attention_mask=mask_t, labels=labels)
    return _np(out.logits), _np(out.loss)

  def forward_with_cfg(self, ids, mask, x_t, t, scale):
    """Second half of x_t replaced by the first; channels 0..2 guided, written to both halves."""
    half = len(x_t) // 2
    combined = np.concatenate([x_t[:half], x_t[:half]])
    out = self.forward(ids, mask, combined, t)
    x_out = out["x_out"].copy()
    cond, uncond = x_out[:half, :3], x_out[half:, :3]
    guided = uncond + scale * (cond - uncond)
    x_out[:half, :3] = guided
    x_out[half:, :3] = guided
    return out, x_out


def _np(v):
  if isinstance(v, torch.Tensor):
    v = v.detach().numpy()
  v = np.asarray(v)
  return v.astype(np.float32) if v.dtype == np.float64 else v


def linear_alphas_cumprod(steps: int = 1000) -> np.ndarray:
  betas = np.linspace(1e-4 * 1000 / steps, 0.02 * 1000 / steps, steps, dtype=np.float64)
  return np.cumprod(1.0 - betas)


def respaced_chain(num_steps: int) -> dict:
  """The official space_timesteps(1000, [num_steps]) chain in float64."""
  stride = (1000 - 1) / (num_steps - 1)
  kept, cur = [], 0.0
  for _ in range(num_steps):
    kept.append(round(cur))
    cur += stride
  ac_full = linear_alphas_cumprod()
  betas, last = [], 1.0
  for i in kept:
    betas.append(1.0 - ac_full[i] / last)
    last = ac_full[i]
  betas = np.asarray(betas)
  ac = np.cumprod(1.0 - betas)
  ac_prev = np.append(1.0, ac[:-1])
  post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
  return {
      "timestep_map": np.asarray(kept, np.int64),
      "betas": betas,
      "ac": ac,
      "post_log_var": np.log(np.append(post_var[1], post_var[1:])),
      "coef1": betas * np.sqrt(ac_prev) / (1.0 - ac),
      "coef2": (1.0 - ac_prev) * np.sqrt(1.0 - betas) / (1.0 - ac),
  }


def p_sample(chain: dict, out: np.ndarray, x: np.ndarray, i: int, noise: np.ndarray):
  """One learned-range-variance DDPM step at respaced index i: (x_prev, pred_xstart)."""
  c = x.shape[1]
  eps, v = out[:, :c].astype(np.float64), out[:, c:].astype(np.float64)
  frac = (v + 1) / 2
  log_var = frac * np.log(chain["betas"][i]) + (1 - frac) * chain["post_log_var"][i]
  ac = chain["ac"][i]
  pred_x0 = np.sqrt(1.0 / ac) * x - np.sqrt(1.0 / ac - 1.0) * eps
  mean = chain["coef1"][i] * pred_x0 + chain["coef2"][i] * x
  return mean + float(i != 0) * np.exp(0.5 * log_var) * noise, pred_x0


def _pad_rows(rows, pad_id):
  length = max(len(r) for r in rows)
  ids = np.full((len(rows), length), pad_id, np.int64)
  for r, row in enumerate(rows):
    ids[r, : len(row)] = row
  return ids


def write_golden_dir(path: str, sizes: dict, seed: int = 0) -> None:
  """Writes config.json, model.safetensors and cases.npz (every array of the golden format)."""
  os.makedirs(path, exist_ok=True)
  cfg = official_config(sizes)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(cfg, f, indent=2)
  save_file(random_state_dict(cfg, seed), os.path.join(path, "model.safetensors"))
  ref = Reference(path)
  sp = ref.special
  rng = np.random.default_rng(seed + 1)
  vocab = cfg["vocab_size"]
  c, lat = ref.c, ref.latent

  def words(n):  # ordinary text ids (not special)
    return [int(v) for v in rng.integers(14, vocab - 4, n)]

  def image_target():
    return [sp["<|im_start|>"], sp["<image>"], sp["<|im_end|>"], sp["\\n"], sp["</s>"]]

  def latents(n):
    return rng.standard_normal((n, c, lat, lat))

  cases = {"special_token_ids": np.asarray([sp[k] for k in SPECIAL_NAMES], np.int64)}
  ac_full = linear_alphas_cumprod()

  def q_sample(x0, t, noise):
    a = ac_full[t][:, None, None, None]
    return (np.sqrt(a) * x0 + np.sqrt(1 - a) * noise).astype(np.float32)

  def collate(rows):
    """Right-padded ids, mask = ids != <PAD>, labels = ids with -100 on the right padding (a
    dropout row's inner <PAD>s keep their id as label; the merge drops them anyway)."""
    ids = _pad_rows(rows, sp["<PAD>"])
    lengths = np.asarray([len(r) for r in rows])
    labels = np.where(np.arange(ids.shape[1])[None] < lengths[:, None], ids, -100)
    return ids, ids != sp["<PAD>"], labels

  def store(prefix, out, keys):
    for k in keys:
      cases[f"{prefix}_{k}"] = out[k]

  model_keys = [
      "merged_embeds",
      "layer0_input",
      "final_hidden",
      "logits",
      "final_layer_out",
      "t_emb",
      "c_embeds",
      "merged_attention_mask",
      "gen_mask",
      "text_mask",
      "attn_allowed",
      "image_spans",
  ] + [f"layer{i}_output" for i in range(cfg["num_hidden_layers"])]

  # text: two pure text rows through the training path; also forward_wo_image.
  rows = [[sp["<s>"]] + words(7) + words(9) + [sp["</s>"]], [sp["<s>"]] + words(3) + words(2) + [sp["</s>"]]]
  ids, mask, labels = collate(rows)
  t = rng.integers(0, 1000, 2)
  out = ref.forward(ids, mask, np.zeros((2, c, lat, lat)), t, labels)
  cases.update(text_input_ids=ids, text_attention_mask=mask, text_labels=labels, text_t=t)
  store("text", out, model_keys)
  logits_wo, loss_wo = ref.forward_wo_image(ids, mask)
  cases["text_logits_wo_image"] = logits_wo
  cases["text_lm_loss_wo_image"] = np.asarray(loss_wo, np.float32)[None]
  cases["text_lm_loss"] = np.asarray(out["lm_loss"], np.float32)[None]

  def diffusion_losses(prefix, x_out, rows_img, lm):
    import jax.numpy as jnp
    from monoformer_jax import diffusion  # ours: see the module docstring

    def nhwc(a):
      return jnp.asarray(np.moveaxis(np.asarray(a, np.float32), 1, -1))

    terms = diffusion.training_losses(
        diffusion.create_gaussian_diffusion(),
        nhwc(x_out),
        nhwc(cases[f"{prefix}_x0"][rows_img]),
        nhwc(cases[f"{prefix}_x_t"][rows_img]),
        nhwc(cases[f"{prefix}_noise"][rows_img]),
        jnp.asarray(cases[f"{prefix}_t"][rows_img]),
    )
    cases[f"{prefix}_loss_mse"] = np.asarray(terms["mse"])
    cases[f"{prefix}_loss_vb"] = np.asarray(terms["vb"])
    cases[f"{prefix}_loss_terms"] = np.asarray(terms["loss"])
    cases[f"{prefix}_total_loss"] = np.asarray(
        np.mean(np.asarray(terms["loss"], np.float64)) + 0.01 * float(lm), np.float32
    )[None]

  # train: two image rows with different prompt lengths.
  rows = [[sp["<s>"]] + words(6) + image_target(), [sp["<s>"]] + words(2) + image_target()]
  ids, mask, labels = collate(rows)
  x0, noise = 0.9 * latents(2), latents(2)
  t = np.asarray([137, 862])
  x_t = q_sample(x0, t, noise)
  cases.update(
      train_input_ids=ids,
      train_attention_mask=mask,
      train_labels=labels,
      train_t=t,
      train_x0=x0.astype(np.float32),
      train_noise=noise.astype(np.float32),
      train_x_t=x_t,
  )
  out = ref.forward(ids, mask, x_t, t, labels)
  store("train", out, model_keys + ["merged_labels", "x_indices", "x_out"])
  cases["train_lm_loss"] = np.asarray(out["lm_loss"], np.float32)[None]
  diffusion_losses("train", out["x_out"], out["x_indices"], out["lm_loss"])

  # mixed: image, text and text-dropout (prompt replaced by <PAD> * n) rows.
  n_drop = 5
  rows = [
      [sp["<s>"]] + words(3) + image_target(),
      [sp["<s>"]] + words(5) + words(2) + [sp["</s>"]],
      [sp["<s>"]] + [sp["<PAD>"]] * n_drop + image_target(),
  ]
  ids, mask, labels = collate(rows)
  is_image = np.asarray([True, False, True])
  x0 = 0.9 * latents(3) * is_image[:, None, None, None]
  noise = latents(3) * is_image[:, None, None, None]
  t = np.asarray([421, 55, 999])
  x_t = q_sample(x0, t, noise)
  cases.update(
      mixed_input_ids=ids,
      mixed_attention_mask=mask,
      mixed_labels=labels,
      mixed_t=t,
      mixed_is_image=is_image,
      mixed_x0=x0.astype(np.float32),
      mixed_noise=noise.astype(np.float32),
      mixed_x_t=x_t,
  )
  out = ref.forward(ids, mask, x_t, t, labels)
  store("mixed", out, model_keys + ["merged_labels", "x_indices", "x_out"])
  cases["mixed_lm_loss"] = np.asarray(out["lm_loss"], np.float32)[None]
  diffusion_losses("mixed", out["x_out"], out["x_indices"], out["lm_loss"])

  # cfg: forward_with_cfg on [cond, uncond]; x_t[1] differs (it is ignored).
  scale = float(sizes["cfg_scale"])
  cond_uncond = [[sp["<s>"]] + words(6) + image_target()[:3], [sp["<s>"]] + image_target()[:3]]
  ids = _pad_rows(cond_uncond, sp["<PAD>"])
  mask = ids != sp["<PAD>"]
  x_t = latents(2).astype(np.float32)
  t = np.asarray([500, 500])
  out, guided = ref.forward_with_cfg(ids, mask, x_t, t, scale)
  cases.update(
      cfg_input_ids=ids, cfg_attention_mask=mask, cfg_x_t=x_t, cfg_t=t, cfg_scale=np.asarray([scale], np.float32)
  )
  store("cfg", out, model_keys)
  cases["cfg_x_out_unguided"] = out["x_out"]
  cases["cfg_x_out"] = guided.astype(np.float32)

  # sample: the respaced DDPM loop with forward_with_cfg, on recorded noise.
  steps = int(sizes.get("sample_steps", 20))
  chain = respaced_chain(steps)
  ids = _pad_rows([[sp["<s>"]] + words(4) + image_target()[:3], [sp["<s>"]] + image_target()[:3]], sp["<PAD>"])
  mask = ids != sp["<PAD>"]
  z = np.repeat(0.9 * latents(1), 2, axis=0).astype(np.float32)
  step_noise = latents(2 * steps).reshape(steps, 2, c, lat, lat).astype(np.float32)
  x = z.astype(np.float64)
  traj, outs, preds, t_model = [], [], [], []
  for k in range(steps):
    i = steps - 1 - k
    t = np.full((2,), chain["timestep_map"][i])
    _, model_out = ref.forward_with_cfg(ids, mask, x, t, scale)
    x, pred = p_sample(chain, model_out, x, i, step_noise[k])
    traj.append(x)
    outs.append(model_out)
    preds.append(pred)
    t_model.append(t)
  cases.update(
      sample_input_ids=ids,
      sample_attention_mask=mask,
      sample_z=z,
      sample_noise=step_noise,
      sample_seed=np.asarray([seed], np.int64),
      sample_t_index=np.arange(steps - 1, -1, -1, dtype=np.int64),
      sample_t_model=np.stack(t_model).astype(np.int64),
      sample_timestep_map=chain["timestep_map"],
      sample_traj=np.stack(traj).astype(np.float32),
      sample_model_out=np.stack(outs).astype(np.float32),
      sample_pred_xstart=np.stack(preds).astype(np.float32),
      sample_final=traj[-1].astype(np.float32),
  )
  cases["pos_embed"] = ref.pos_embed().astype(np.float32)
  cases = {k: (v.astype(np.int64) if np.issubdtype(v.dtype, np.integer) else v) for k, v in cases.items()}
  np.savez(os.path.join(path, "cases.npz"), **cases)
