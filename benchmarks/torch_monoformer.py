"""The benchmark's MonoFormer in plain PyTorch: the model, its image and text train steps.

What `benchmarks/cpu_vs_torch.py` times against our steps at the same shapes. Written from the
model's definition (docs in monoformer_jax/model), sharing no model code with it: a LLaMA decoder
(RMSNorm, rotate-half RoPE, grouped-query attention through `scaled_dot_product_attention`,
SwiGLU), the image path (patches in (c, ph, pw) order through x_embedder, the 2-D sin-cos table,
adaLN of the timestep embedding on the image tokens before the decoder, the DiT final layer read
back in (ph, pw, c) order) and the official learned-sigma loss (eps mse + the variational bound
on a frozen mean). Rows have the benchmark's fixed layout `<s> P <|im_start|> img <|im_end|> \\n
</s>`: the image tokens sit at the same place in every row, so the mask is causal plus one
bidirectional block. Both steps do the work ours does: the image step skips the LM head, AdamW
(decoupled weight decay 0) and an EMA of the weights follow every step.

`load_flax_params` copies our parameter tree in, so the parity test (tests/test_torch_monoformer.py)
can check losses and gradients against ours.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def _sincos_2d(dim: int, grid: int) -> np.ndarray:
  """(grid * grid, dim): the first half encodes the column, the second the row (MAE / DiT)."""

  def one_axis(d, pos):
    omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
    out = np.outer(pos.astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  rows, cols = np.divmod(np.arange(grid * grid), grid)
  return np.concatenate([one_axis(dim // 2, cols), one_axis(dim // 2, rows)], axis=1).astype(np.float32)


def gaussian_tables(steps: int = 1000) -> dict:
  """The linear-beta chain's float64 tables the official loss reads, as float32 tensors."""
  betas = np.linspace(1e-4, 0.02, steps, dtype=np.float64)
  ac = np.cumprod(1.0 - betas)
  ac_prev = np.append(1.0, ac[:-1])
  post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
  tables = dict(
      sqrt_ac=np.sqrt(ac),
      sqrt_1mac=np.sqrt(1.0 - ac),
      sqrt_recip_ac=np.sqrt(1.0 / ac),
      sqrt_recipm1_ac=np.sqrt(1.0 / ac - 1.0),
      post_log_var=np.log(np.append(post_var[1], post_var[1:])),
      coef1=betas * np.sqrt(ac_prev) / (1.0 - ac),
      coef2=(1.0 - ac_prev) * np.sqrt(1.0 - betas) / (1.0 - ac),
      log_betas=np.log(betas),
  )
  return {k: torch.tensor(v, dtype=torch.float32) for k, v in tables.items()}


class TorchMonoFormer(torch.nn.Module):
  """The decoder and image path for rows whose image tokens are positions [start, start + N)."""

  def __init__(self, *, vocab, hidden, ffn, layers, heads, kv_heads, latent, channels, patch, eps=1e-5):
    super().__init__()
    self.hidden, self.heads, self.kv_heads, self.eps = hidden, heads, kv_heads, eps
    self.head_dim = hidden // heads
    self.latent, self.channels, self.patch = latent, channels, patch
    self.grid = latent // patch
    lin = lambda i, o, bias=False: torch.nn.Linear(i, o, bias=bias)  # noqa: E731
    self.embed = torch.nn.Embedding(vocab, hidden)
    self.x_embedder = lin(channels * patch * patch, hidden, True)
    self.t_fc1, self.t_fc2 = lin(256, hidden, True), lin(hidden, hidden, True)
    self.adaln = lin(hidden, 2 * hidden, True)
    self.layers = torch.nn.ModuleList()
    for _ in range(layers):
      layer = torch.nn.Module()
      layer.norm1 = torch.nn.Parameter(torch.ones(hidden))
      layer.q, layer.k = lin(hidden, heads * self.head_dim), lin(hidden, kv_heads * self.head_dim)
      layer.v, layer.o = lin(hidden, kv_heads * self.head_dim), lin(heads * self.head_dim, hidden)
      layer.norm2 = torch.nn.Parameter(torch.ones(hidden))
      layer.gate, layer.up, layer.down = lin(hidden, ffn), lin(hidden, ffn), lin(ffn, hidden)
      self.layers.append(layer)
    self.norm = torch.nn.Parameter(torch.ones(hidden))
    self.lm_head = lin(hidden, vocab)
    self.final_mod = lin(hidden, 2 * hidden, True)
    self.final_linear = lin(hidden, patch * patch * 2 * channels, True)
    self.register_buffer("pos_embed", torch.from_numpy(_sincos_2d(hidden, self.grid)), persistent=False)

  def _rms(self, x, scale):
    return scale * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

  def _rope(self, x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin

  def timestep_embedding(self, t):
    half = 128
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return self.t_fc2(F.silu(self.t_fc1(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))))

  def patchify(self, images):
    """(B, H, W, C) -> (B, N, C * p * p), feature order (c, ph, pw)."""
    b, p, g, c = images.shape[0], self.patch, self.grid, self.channels
    x = images.reshape(b, g, p, g, p, c).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, g * g, c * p * p)

  def unpatchify(self, tokens):
    """(B, N, p * p * C') in (ph, pw, c) order -> (B, H, W, C')."""
    b, p, g = tokens.shape[0], self.patch, self.grid
    c = tokens.shape[-1] // (p * p)
    x = tokens.reshape(b, g, g, p, p, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, g * p, g * p, c)

  def decoder(self, x, mask):
    b, l, _ = x.shape
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim)
    freqs = torch.arange(l, dtype=torch.float32)[:, None] * inv_freq[None]
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos(), emb.sin()
    for layer in self.layers:
      h = self._rms(x, layer.norm1)
      q = layer.q(h).view(b, l, self.heads, self.head_dim).transpose(1, 2)
      k = layer.k(h).view(b, l, self.kv_heads, self.head_dim).transpose(1, 2)
      v = layer.v(h).view(b, l, self.kv_heads, self.head_dim).transpose(1, 2)
      q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
      a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
      x = x + layer.o(a.transpose(1, 2).reshape(b, l, -1))
      h = self._rms(x, layer.norm2)
      x = x + layer.down(F.silu(layer.gate(h)) * layer.up(h))
    return self._rms(x, self.norm)

  def denoise(self, tokens, images, t, start):
    """The image output (B, H, W, 2C) for noisy `images` at timesteps `t`."""
    n = self.grid * self.grid
    x = self.embed(tokens)
    cond = self.timestep_embedding(t)
    shift, scale = self.adaln(F.silu(cond))[:, None].chunk(2, dim=-1)  # the official "scale" is added
    img = self.x_embedder(self.patchify(images)) + self.pos_embed
    x = torch.cat([x[:, :start], img * (1 + scale) + shift, x[:, start + n :]], dim=1)
    l = x.shape[1]
    mask = torch.ones(l, l, dtype=torch.bool).tril()
    mask[start : start + n, start : start + n] = True
    h = self.decoder(x, mask)[:, start : start + n]
    f_shift, f_scale = self.final_mod(F.silu(cond))[:, None].chunk(2, dim=-1)
    h = F.layer_norm(h, (self.hidden,), eps=1e-6) * (1 + f_scale) + f_shift
    return self.unpatchify(self.final_linear(h))

  def logits(self, tokens):
    l = tokens.shape[1]
    return self.lm_head(self.decoder(self.embed(tokens), torch.ones(l, l, dtype=torch.bool).tril()))


def from_model_config(cfg) -> TorchMonoFormer:
  """The PyTorch model of one of our ModelConfigs (square images, learned sigma)."""
  if cfg.image_height != cfg.image_width or not cfg.learn_sigma:
    raise ValueError("the PyTorch benchmark model takes square images and learned sigma")
  return TorchMonoFormer(
      vocab=cfg.vocab_size,
      hidden=cfg.hidden_size,
      ffn=cfg.intermediate_size,
      layers=cfg.num_layers,
      heads=cfg.num_heads,
      kv_heads=cfg.num_kv_heads,
      latent=cfg.image_height,
      channels=cfg.image_channels,
      patch=cfg.patch_size,
      eps=cfg.rms_norm_eps,
  )


def _bits(x):
  return x.flatten(1).mean(1) / math.log(2.0)


def official_image_loss(out, x0, x_t, noise, t, tables) -> torch.Tensor:
  """The official learned-sigma loss per image: eps mse + the bound (KL; decoder NLL at t = 0)
  with the mean prediction frozen, in bits per dimension."""
  g = lambda name: tables[name][t].view(-1, 1, 1, 1)  # noqa: E731
  c = x0.shape[-1]
  eps, v = out[..., :c], out[..., c:]
  mse = (noise - eps).pow(2).flatten(1).mean(1)
  frac = (v + 1) / 2
  log_var = frac * g("log_betas") + (1 - frac) * g("post_log_var")
  x0_pred = g("sqrt_recip_ac") * x_t - g("sqrt_recipm1_ac") * eps.detach()
  mean = g("coef1") * x0_pred + g("coef2") * x_t
  true_mean, true_log_var = g("coef1") * x0 + g("coef2") * x_t, g("post_log_var")
  kl = 0.5 * (
      -1.0
      + log_var
      - true_log_var
      + torch.exp(true_log_var - log_var)
      + (true_mean - mean).pow(2) * torch.exp(-log_var)
  )

  def cdf(z):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z.pow(3))))

  inv_std = torch.exp(-0.5 * log_var)
  plus, minus = cdf(inv_std * (x0 - mean + 1 / 255)), cdf(inv_std * (x0 - mean - 1 / 255))
  log_lik = torch.where(
      x0 < -0.999,
      plus.clamp_min(1e-12).log(),
      torch.where(x0 > 0.999, (1 - minus).clamp_min(1e-12).log(), (plus - minus).clamp_min(1e-12).log()),
  )
  vb = torch.where(t == 0, _bits(-log_lik), _bits(kl))
  return mse + vb


def text_loss(model, tokens, targets, loss_mask) -> torch.Tensor:
  logits = model.logits(tokens)
  nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
  mask = loss_mask.flatten().float()
  return (nll * mask).sum() / mask.sum().clamp_min(1.0)


def load_flax_params(model: TorchMonoFormer, params) -> None:
  """Copies our parameter tree (unboxed, Flax kernel layout (in, ...out)) into the model."""
  as_t = lambda a: torch.tensor(np.asarray(a, np.float32))  # noqa: E731

  def dense(module, tree):
    kernel = np.asarray(tree["kernel"], np.float32)
    module.weight.data = as_t(kernel.reshape(-1, kernel.shape[-1]) if kernel.ndim == 2 else kernel).T.contiguous()
    if "bias" in tree:
      module.bias.data = as_t(tree["bias"])

  def heads_in(module, kernel):  # (hidden, heads, d) -> weight (heads * d, hidden)
    k = np.asarray(kernel, np.float32)
    module.weight.data = as_t(k.reshape(k.shape[0], -1)).T.contiguous()

  model.embed.weight.data = as_t(params["embed_tokens"]["embedding"])
  dense(model.x_embedder, params["x_embedder"])
  dense(model.t_fc1, params["t_embedder"]["fc1"])
  dense(model.t_fc2, params["t_embedder"]["fc2"])
  dense(model.adaln, params["adaln_module"])
  for i, layer in enumerate(model.layers):
    p = params[f"layers_{i}"]
    layer.norm1.data = as_t(p["input_layernorm"]["scale"])
    layer.norm2.data = as_t(p["post_attention_layernorm"]["scale"])
    for name in ("q", "k", "v"):
      heads_in(getattr(layer, name), p["self_attn"][f"{name}_proj"]["kernel"])
    o = np.asarray(p["self_attn"]["o_proj"]["kernel"], np.float32)  # (heads, d, hidden)
    layer.o.weight.data = as_t(o.reshape(-1, o.shape[-1])).T.contiguous()
    for name in ("gate", "up", "down"):
      dense(getattr(layer, name), p["mlp"][f"{name}_proj"])
  model.norm.data = as_t(params["norm"]["scale"])
  dense(model.lm_head, params["lm_head"])
  dense(model.final_mod, params["final_layer"]["adaln_modulation"])
  dense(model.final_linear, params["final_layer"]["linear"])


class TorchTrainer:
  """AdamW (lr 1e-4, no clipping, no weight decay) and an EMA of the weights after every step."""

  def __init__(self, model: TorchMonoFormer, ema_decay: float = 0.9999):
    self.model = model
    self.params = [p for p in model.parameters()]
    self.opt = torch.optim.AdamW(self.params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    self.ema = [p.detach().clone() for p in self.params]
    self.ema_decay = ema_decay
    self.tables = gaussian_tables()

  def _apply(self, loss):
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    self.opt.step()
    with torch.no_grad():
      torch._foreach_lerp_(self.ema, self.params, 1.0 - self.ema_decay)  # pylint: disable=protected-access
    return float(loss.detach())

  def image_step(self, tokens, images, start, generator):
    b = images.shape[0]
    t = torch.randint(0, 1000, (b,), generator=generator)
    noise = torch.randn(images.shape, generator=generator)
    x_t = self.tables["sqrt_ac"][t].view(-1, 1, 1, 1) * images + self.tables["sqrt_1mac"][t].view(-1, 1, 1, 1) * noise
    out = self.model.denoise(tokens, x_t, t, start)
    return self._apply(official_image_loss(out, images, x_t, noise, t, self.tables).mean())

  def text_step(self, tokens, targets, loss_mask):
    return self._apply(text_loss(self.model, tokens, targets, loss_mask))
