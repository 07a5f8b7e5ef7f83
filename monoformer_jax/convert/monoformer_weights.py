"""PyTorch state dicts (official MonoFormer / Hugging Face LLaMA key names) <-> our parameter tree.

One table maps every parameter: our path, the official key, and how the array is laid out on each
side (PyTorch Linear weights are (out, in); our kernels are (in, out), attention kernels split the
head axis). The same table converts both ways, so export is the exact inverse of import.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping

import flax.linen as nn
import jax
import numpy as np

from monoformer_jax.model.config import ModelConfig
from monoformer_jax.model.monoformer import init_params


def _linear(w: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(w.T)


def _heads_in(heads: int, d: int):
  """(heads*d, hidden) -> (hidden, heads, d) and back."""

  def fwd(w):
    return np.ascontiguousarray(w.T.reshape(w.shape[1], heads, d))

  def inv(k):
    return np.ascontiguousarray(k.reshape(k.shape[0], heads * d).T)

  return fwd, inv


def _heads_out(heads: int, d: int):
  """(hidden, heads*d) -> (heads, d, hidden) and back."""

  def fwd(w):
    return np.ascontiguousarray(w.T.reshape(heads, d, w.shape[0]))

  def inv(k):
    return np.ascontiguousarray(k.reshape(heads * d, k.shape[-1]).T)

  return fwd, inv


def _identity(x):
  return x


Rule = tuple[tuple[str, ...], str, Callable, Callable]


def weight_table(config: ModelConfig, *, include_image: bool = True) -> list[Rule]:
  """(our path, official key, official->ours, ours->official) for every parameter."""
  d = config.dim_per_head
  rules: list[Rule] = []

  def lin(path, key, bias=False):
    rules.append((path + ("kernel",), key + ".weight", _linear, _linear))
    if bias:
      rules.append((path + ("bias",), key + ".bias", _identity, _identity))

  rules.append((("embed_tokens", "embedding"), "model.embed_tokens.weight", _identity, _identity))
  for i in range(config.num_layers):
    pre, key = (f"layers_{i}",), f"model.layers.{i}"
    for name, heads in (("q_proj", config.num_heads), ("k_proj", config.num_kv_heads), ("v_proj", config.num_kv_heads)):
      fwd, inv = _heads_in(heads, d)
      rules.append((pre + ("self_attn", name, "kernel"), f"{key}.self_attn.{name}.weight", fwd, inv))
    fwd, inv = _heads_out(config.num_heads, d)
    rules.append((pre + ("self_attn", "o_proj", "kernel"), f"{key}.self_attn.o_proj.weight", fwd, inv))
    for name in ("gate_proj", "up_proj", "down_proj"):
      lin(pre + ("mlp", name), f"{key}.mlp.{name}")
    for name in ("input_layernorm", "post_attention_layernorm"):
      rules.append((pre + (name, "scale"), f"{key}.{name}.weight", _identity, _identity))
  rules.append((("norm", "scale"), "model.norm.weight", _identity, _identity))
  lin(("lm_head",), "lm_head")
  if include_image:
    lin(("x_embedder",), "x_embedder", bias=True)
    lin(("t_embedder", "fc1"), "t_embedder.mlp.0", bias=True)
    lin(("t_embedder", "fc2"), "t_embedder.mlp.2", bias=True)
    if config.t_embed == "adaln_before_decoder":
      lin(("adaln_module",), "adaLN_module.1", bias=True)
    else:
      lin(("t_projector_fc1",), "t_projector.0", bias=True)
      lin(("t_projector_fc2",), "t_projector.2", bias=True)
    lin(("final_layer", "adaln_modulation"), "final_layer.adaLN_modulation.1", bias=True)
    lin(("final_layer", "linear"), "final_layer.linear", bias=True)
    if config.num_classes:
      # Ours only (the official model has no label embedding); DiT's key name.
      rules.append((("label_embedder", "embedding"), "y_embedder.embedding_table.weight", _identity, _identity))
  return rules


def _get(tree, path):
  for p in path:
    tree = tree[p]
  return tree


def _set(tree, path, value):
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def state_dict_to_params(
    state: Mapping[str, np.ndarray],
    config: ModelConfig,
    *,
    allow_missing: Iterable[str] = (),
    ignore: Iterable[str] = (),
) -> dict:
  """Official / HF state dict -> our (unboxed, unscanned) params, float32.

  Every key must be used and every parameter found, except keys matching `ignore` prefixes and
  parameters whose official key starts with one of `allow_missing` (left out of the result).
  Shape mismatches are reported by key.
  """
  allow_missing, ignore = tuple(allow_missing), tuple(ignore)
  params: dict = {}
  known = set()
  problems = []
  want = _expected_shapes(config)
  for path, key, fwd, _ in weight_table(config):
    known.add(key)
    if key not in state:
      if not (allow_missing and key.startswith(allow_missing)):
        problems.append(f"missing key {key!r}")
      continue
    value = fwd(np.asarray(state[key], dtype=np.float32))
    if value.shape != want[path]:
      problems.append(
          f"{key!r}: shape {tuple(np.shape(state[key]))} does not fit the config "
          f"(expected {want[path]} after conversion, got {value.shape})"
      )
      continue
    _set(params, path, value)
  # Non-persistent buffers that some exporters still include are not parameters.
  buffers = ("rotary_emb.inv_freq", "pos_embed")
  unexpected = sorted(
      k for k in state if k not in known and not k.endswith(buffers) and not (ignore and k.startswith(ignore))
  )
  if unexpected:
    problems.append(
        "unexpected key(s): "
        + ", ".join(unexpected[:10])
        + (f" (+{len(unexpected) - 10} more)" if len(unexpected) > 10 else "")
    )
  if problems:
    raise ValueError("checkpoint does not match the model config: " + "; ".join(problems))
  return params


def params_to_state_dict(params: Mapping, config: ModelConfig, *, include_image: bool = True) -> dict[str, np.ndarray]:
  """Our (unboxed, unscanned) params -> state dict with the official key names, float32."""
  out = {}
  for path, key, _, inv in weight_table(config, include_image=include_image):
    out[key] = inv(np.asarray(_get(params, path), dtype=np.float32))
  return out


def _expected_shapes(config: ModelConfig) -> dict:
  shapes = jax.eval_shape(lambda: nn.unbox(init_params(config, jax.random.key(0))))
  flat = {}

  def walk(tree, prefix):
    for k, v in tree.items():
      if isinstance(v, Mapping):
        walk(v, prefix + (k,))
      else:
        flat[prefix + (k,)] = tuple(v.shape)

  walk(shapes, ())
  return flat


def stack_layers(params: Mapping, num_layers: int) -> dict:
  """Unscanned params (layers_0, layers_1, ...) -> scanned layout ('layers' with a leading axis)."""
  out = {k: v for k, v in params.items() if not k.startswith("layers_")}
  out["layers"] = jax.tree.map(lambda *xs: np.stack(xs), *[params[f"layers_{i}"] for i in range(num_layers)])
  return out


def unstack_layers(params: Mapping, num_layers: int) -> dict:
  """Scanned layout -> unscanned."""
  out = {k: v for k, v in params.items() if k != "layers"}
  for i in range(num_layers):
    out[f"layers_{i}"] = jax.tree.map(lambda x, i=i: np.asarray(x[i]), params["layers"])
  return out
