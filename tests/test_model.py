"""Model behaviour: the mask by perturbation, packing, variants (scan, remat, bf16), heads."""
import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from monoformer_jax.model import inputs as inputs_lib
from monoformer_jax.model.monoformer import MonoFormer
from tests.helpers import build, image_sample, random_params, text_sample, tiny_config


def run(config, params, batch, t=None, **kw):
  t = np.full(batch["image_mask"].shape, 300.0, np.float32) if t is None else t
  return MonoFormer(config).apply({"params": params}, jax.tree.map(jnp.asarray, batch),
                                  jnp.asarray(batch["images"]), jnp.asarray(t), **kw)


@pytest.fixture(scope="module", params=["adaln_before_decoder", "add_before_image_tokens"])
def setup(request):
  config = tiny_config(t_embed=request.param)
  return config, random_params(config, seed=1)


def test_later_text_never_changes_earlier_outputs(setup):
  config, params = setup
  rng = np.random.default_rng(0)
  batch = build(config, [[image_sample(config, rng, 5, tail_len=4)]], 32)
  base = run(config, params, batch)
  n_valid = int((batch["segment_ids"][0] > 0).sum())
  for j in (n_valid - 1, n_valid - 3):  # text after the image
    changed = copy.deepcopy(batch)
    changed["tokens"][0, j] = (batch["tokens"][0, j] + 7) % config.vocab_size
    out = run(config, params, changed)
    np.testing.assert_array_equal(out["logits"][0, :j], base["logits"][0, :j])
    np.testing.assert_array_equal(out["image"], base["image"])
    assert np.abs(out["logits"][0, j] - base["logits"][0, j]).max() > 1e-4
  # A prompt token changes the image output (the image attends to the text before it).
  changed = copy.deepcopy(batch)
  changed["tokens"][0, 2] += 1
  assert np.abs(run(config, params, changed)["image"] - base["image"]).max() > 1e-5


@pytest.mark.parametrize("bidirectional", [True, False])
def test_image_tokens_see_each_other(bidirectional):
  config = tiny_config(bidirectional_image=bidirectional)
  params = random_params(config, seed=2)
  rng = np.random.default_rng(1)
  batch = build(config, [[image_sample(config, rng, 3)]], 24)
  base = np.asarray(run(config, params, batch)["image"])[0, 0]
  p = config.patch_size
  gw = config.grid_size[1]
  for patch in range(config.num_patches):
    r, c = divmod(patch, gw)
    changed = copy.deepcopy(batch)
    changed["images"][0, 0, r * p:(r + 1) * p, c * p:(c + 1) * p] += 0.5
    out = np.asarray(run(config, params, changed)["image"])[0, 0]
    for other in range(config.num_patches):
      r2, c2 = divmod(other, gw)
      diff = np.abs(out[r2 * p:(r2 + 1) * p, c2 * p:(c2 + 1) * p]
                    - base[r2 * p:(r2 + 1) * p, c2 * p:(c2 + 1) * p]).max()
      if bidirectional or other >= patch:
        assert diff > 1e-6, (patch, other)
      else:  # causal ablation: an earlier patch never sees a later one
        assert diff == 0.0, (patch, other)


def test_packed_samples_never_influence_each_other(setup):
  config, params = setup
  rng = np.random.default_rng(2)
  a = image_sample(config, rng, 4)
  b = image_sample(config, rng, 6, tail_len=3)
  c = text_sample(config, rng, 5)
  packed = build(config, [[a, b, c]], 96, slots=2)
  alone_b = build(config, [[b]], 48)
  alone_c = build(config, [[c]], 16)
  t_packed = np.array([[100.0, 700.0]], np.float32)
  out = run(config, params, packed, t_packed)
  out_b = run(config, params, alone_b, np.array([[700.0]], np.float32))
  out_c = run(config, params, alone_c)
  seg = packed["segment_ids"][0]
  nb = int((alone_b["segment_ids"][0] > 0).sum())
  np.testing.assert_allclose(out["logits"][0, seg == 2], out_b["logits"][0, :nb], atol=2e-5)
  np.testing.assert_allclose(out["image"][0, 1], out_b["image"][0, 0], atol=2e-5)
  np.testing.assert_allclose(out["logits"][0, seg == 3], out_c["logits"][0, :5], atol=2e-5)
  # Perturbing sample a (its text and its image) leaves b and c untouched.
  changed = copy.deepcopy(packed)
  changed["tokens"][0, 1] += 3
  changed["images"][0, 0] += 1.0
  out2 = run(config, params, changed, t_packed)
  np.testing.assert_array_equal(out2["logits"][0, seg >= 2], out["logits"][0, seg >= 2])
  np.testing.assert_array_equal(out2["image"][0, 1], out["image"][0, 1])
  assert np.abs(out2["image"][0, 0] - out["image"][0, 0]).max() > 1e-5


def test_timestep_conditions_only_its_image(setup):
  config, params = setup
  rng = np.random.default_rng(3)
  batch = build(config, [[image_sample(config, rng, 4), image_sample(config, rng, 3)]], 80, slots=2)
  out1 = run(config, params, batch, np.array([[10.0, 500.0]], np.float32))
  out2 = run(config, params, batch, np.array([[900.0, 500.0]], np.float32))
  assert np.abs(out1["image"][0, 0] - out2["image"][0, 0]).max() > 1e-5
  np.testing.assert_array_equal(out1["image"][0, 1], out2["image"][0, 1])


def test_heads_are_optional_and_text_only_path(setup):
  config, params = setup
  rng = np.random.default_rng(4)
  batch = build(config, [[text_sample(config, rng, 9)], [text_sample(config, rng, 4)]], 12)
  full = run(config, params, batch)
  text_only = MonoFormer(config).apply({"params": params}, jax.tree.map(jnp.asarray, batch))
  np.testing.assert_allclose(text_only["logits"], full["logits"], atol=1e-6)
  assert "image" not in text_only
  img_batch = build(config, [[image_sample(config, rng, 3)]], 24)
  no_logits = run(config, params, img_batch, return_logits=False)
  assert set(no_logits) == {"image"}
  np.testing.assert_allclose(no_logits["image"], run(config, params, img_batch)["image"], atol=1e-6)


def test_scan_and_remat_give_the_same_outputs(setup):
  from monoformer_jax.convert.monoformer_weights import stack_layers
  config, params = setup
  rng = np.random.default_rng(5)
  batch = build(config, [[image_sample(config, rng, 4)], [text_sample(config, rng, 7)]], 24)
  ref = run(config, params, batch)
  for kw in (dict(scan_layers=True), dict(remat="full"), dict(scan_layers=True, remat="dots")):
    cfg = config.replace(**kw)
    p = stack_layers(params, config.num_layers) if cfg.scan_layers else params
    out = run(cfg, p, batch)
    np.testing.assert_allclose(out["logits"], ref["logits"], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(out["image"], ref["image"], atol=1e-5, rtol=1e-5)


def test_bfloat16_compute_is_close_and_params_stay_float32(setup):
  config, params = setup
  rng = np.random.default_rng(6)
  batch = build(config, [[image_sample(config, rng, 4)]], 24)
  ref = run(config, params, batch)
  out = run(config.replace(dtype="bfloat16"), params, batch)
  assert out["logits"].dtype == jnp.float32
  scale = float(np.abs(ref["image"]).max())
  assert np.abs(np.asarray(out["image"], np.float32) - ref["image"]).max() < 0.1 * scale


def test_wrong_image_shape_is_a_clear_error(setup):
  config, params = setup
  rng = np.random.default_rng(7)
  batch = build(config, [[image_sample(config, rng, 4)]], 24)
  bad = np.zeros((1, 1, 8, 8, 3), np.float32) + 1
  with pytest.raises(ValueError, match="model expects"):
    MonoFormer(config).apply({"params": params}, jax.tree.map(jnp.asarray, batch), bad,
                             jnp.ones((1, 1)))


def test_config_validation_names_the_field():
  with pytest.raises(ValueError, match="patch_size=3 does not divide image_height=4"):
    tiny_config(patch_size=3)
  with pytest.raises(ValueError, match="t_embed"):
    tiny_config(t_embed="add_at_each_layer")
  from monoformer_jax.model.config import ModelConfig
  with pytest.raises(ValueError, match="unknown model config field.*hiden_size"):
    ModelConfig.from_mapping({"hiden_size": 3})


def test_label_embedding_variant_conditions_on_the_class():
  config = tiny_config(num_classes=10)
  params = random_params(config, seed=3)
  rng = np.random.default_rng(8)
  batch = build(config, [[image_sample(config, rng, 2, label=3)]], 24)
  out1 = run(config, params, batch)
  batch["labels"][0, 0] = 7
  out2 = run(config, params, batch)
  assert np.abs(out1["image"] - out2["image"]).max() > 1e-5
  assert inputs_lib.KIND_IMAGE == 1
