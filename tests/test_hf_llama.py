"""Hugging Face LLaMA parity: load a transformers checkpoint, match its logits, export it back."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from monoformer_jax.convert import checkpoints
from monoformer_jax.model.monoformer import MonoFormer
from tests.helpers import build


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, module_seed):
  torch.manual_seed(module_seed("transformers weights"))
  cfg = transformers.LlamaConfig(
      vocab_size=211,
      hidden_size=48,
      intermediate_size=112,
      num_hidden_layers=3,
      num_attention_heads=6,
      num_key_value_heads=2,
      rope_theta=5000.0,
      rms_norm_eps=1e-6,
      tie_word_embeddings=False,
      max_position_embeddings=128,
  )
  model = transformers.LlamaForCausalLM(cfg).eval()
  with torch.no_grad():  # larger weights than the 0.02 default, so logits are not near zero
    for p in model.parameters():
      p.copy_(torch.randn_like(p) * (0.2 if p.ndim > 1 else 0.1) + (1.0 if p.ndim == 1 else 0.0))
  path = tmp_path_factory.mktemp("hf") / "llama"
  model.save_pretrained(path, safe_serialization=True)
  return path, model


def _ids(rng, lengths, total, vocab):
  ids = np.zeros((len(lengths), total), np.int64)
  mask = np.zeros((len(lengths), total), np.int64)
  for r, n in enumerate(lengths):
    ids[r, :n] = rng.integers(0, vocab, n)
    mask[r, :n] = 1
  return ids, mask


def _ours_logits(config, params, ids, mask):
  rows = [[[("text", ids[r, : mask[r].sum()], True)]] for r in range(len(ids))]
  batch = build(config, rows, ids.shape[1])
  return np.asarray(
      MonoFormer(config).apply({"params": params}, jax.tree.map(jnp.asarray, batch), return_image=False)["logits"]
  )


def _hf_logits(model, ids, mask):
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


def test_logits_match_transformers_with_padding(hf_dir, rng):
  path, model = hf_dir
  config, params = checkpoints.load_llama_checkpoint(str(path))
  assert (config.num_heads, config.num_kv_heads, config.vocab_size) == (6, 2, 211)
  ids, mask = _ids(rng, [17, 9, 13], 17, 211)
  ours, ref = _ours_logits(config, params, ids, mask), _hf_logits(model, ids, mask)
  valid = mask.astype(bool)
  assert np.abs(ref[valid]).max() > 1.0
  np.testing.assert_allclose(ours[valid], ref[valid], atol=1e-4, rtol=0)


def test_export_reloads_in_transformers(hf_dir, tmp_path, rng):
  path, model = hf_dir
  config, params = checkpoints.load_llama_checkpoint(str(path))
  checkpoints.save_hf_llama(params, config, str(tmp_path / "out"))
  with pytest.raises(FileExistsError):
    checkpoints.save_hf_llama(params, config, str(tmp_path / "out"))
  reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
  ids, mask = _ids(rng, [11, 6], 11, 211)
  np.testing.assert_array_equal(_hf_logits(reloaded, ids, mask), _hf_logits(model, ids, mask))


def test_vocabulary_growth_and_fresh_image_path(hf_dir, seed):
  path, model = hf_dir
  config, params = checkpoints.load_llama_checkpoint(str(path), vocab_size=215, rng=jax.random.key(seed))
  assert config.vocab_size == 215
  emb, head = np.asarray(params["embed_tokens"]["embedding"]), np.asarray(params["lm_head"]["kernel"])
  assert emb.shape == (215, 48) and head.shape == (48, 215)
  # The 211 tokens the checkpoint knows keep its rows and columns, each in its place.
  np.testing.assert_array_equal(emb[:211], model.model.embed_tokens.weight.detach().numpy())
  np.testing.assert_array_equal(head[:, :211], model.lm_head.weight.detach().numpy().T)
  # New rows ~ N(0, initializer_range): small, non-zero.
  assert 0.005 < emb[211:].std() < 0.05 and 0.005 < head[:, 211:].std() < 0.05
  # Official init of the image path: x_embedder and adaLN zero, t_embedder N(0, 0.02).
  assert not params["x_embedder"]["kernel"].any() and not params["adaln_module"]["kernel"].any()
  assert 0.01 < params["t_embedder"]["fc1"]["kernel"].std() < 0.03


def test_official_layout_roundtrip_and_ema_preference(tmp_path, testdata):
  from monoformer_jax.convert.golden_cases import load_golden_dir

  config, params, _, _ = load_golden_dir(str(testdata / "model_tok"))
  checkpoints.save_official(params, config, str(tmp_path / "ckpt"))
  shifted = jax.tree.map(lambda x: x + 1.0, params)
  checkpoints.save_official(shifted, config, str(tmp_path / "ckpt" / "ema"))
  cfg2, p_ema = checkpoints.load_official_checkpoint(str(tmp_path / "ckpt"))
  _, p_raw = checkpoints.load_official_checkpoint(str(tmp_path / "ckpt"), ema=False)
  assert cfg2 == config
  jax.tree.map(np.testing.assert_array_equal, p_ema, shifted)
  jax.tree.map(np.testing.assert_array_equal, p_raw, params)


def test_bad_checkpoints_are_named(tmp_path, hf_dir):
  with pytest.raises(FileNotFoundError, match="config.json"):
    checkpoints.load_llama_checkpoint(str(tmp_path))
  path, _ = hf_dir
  from monoformer_jax.convert.monoformer_weights import state_dict_to_params
  from monoformer_jax.convert.checkpoints import read_state_dict
  from monoformer_jax.model.config import from_official_config
  import json

  config = from_official_config(json.load(open(path / "config.json")))
  state = read_state_dict(str(path))
  state["model.layers.0.mlp.up_proj.weight"] = state["model.layers.0.mlp.up_proj.weight"][:5]
  del state["model.norm.weight"]
  with pytest.raises(ValueError, match="up_proj.weight.*shape.*missing key 'model.norm.weight'"):
    state_dict_to_params(state, config, allow_missing=("x_embedder", "t_embedder", "adaLN", "final_layer"))
