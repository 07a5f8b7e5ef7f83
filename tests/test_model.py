"""Model behaviour: the mask by perturbation, packing, variants (scan, remat, bf16), heads."""

import copy
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from monoformer_jax import batch as batch_lib
from monoformer_jax.model.monoformer import MonoFormer, init_params
from tests.helpers import build, image_sample, text_sample, tiny_config
from tests.random_weights import random_params


@functools.lru_cache(maxsize=None)
def _jitted_apply(config, options=()):
  """One compiled forward per config and apply options (a tuple of (name, value) pairs)."""
  model = MonoFormer(config)
  return jax.jit(lambda p, b, x, t: model.apply({"params": p}, b, x, t, **dict(options)))


def run(config, params, batch, t=None, **kw):
  t = np.full(batch["image_mask"].shape, 300.0, np.float32) if t is None else t
  options = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in kw.items()))
  return _jitted_apply(config, options)(
      params, jax.tree.map(jnp.asarray, batch), jnp.asarray(batch["images"]), jnp.asarray(t)
  )


def run_rows(config, params, batch, t=300.0):
  """One jitted forward of a batch whose rows are variants of one sample (rows never interact)."""
  ts = np.full(batch["image_mask"].shape, t, np.float32)
  out = _jitted_apply(config)(params, jax.tree.map(jnp.asarray, batch), jnp.asarray(batch["images"]), jnp.asarray(ts))
  return jax.tree.map(np.asarray, out)


def _variants(batch, n):
  """n copies of row 0 of `batch`, to be perturbed one per row."""
  return {k: np.repeat(v[:1], n, axis=0) for k, v in batch.items()}


def _patch_slices(config, patch):
  p = config.patch_size
  r, c = divmod(patch, config.grid_size[1])
  return slice(r * p, (r + 1) * p), slice(c * p, (c + 1) * p)


def _positions(batch, kind):
  return np.nonzero((batch["kinds"][0] == kind) & (batch["segment_ids"][0] > 0))[0]


@pytest.fixture(scope="module", params=["adaln_before_decoder", "add_before_image_tokens"])
def setup(request, module_seed):
  config = tiny_config(t_embed=request.param)
  return config, random_params(config, seed=module_seed("params"))


def test_later_text_never_changes_earlier_outputs(setup, rng):
  config, params = setup
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
  changed["tokens"][0, 2] = (changed["tokens"][0, 2] + 1) % config.vocab_size
  assert np.abs(run(config, params, changed)["image"] - base["image"]).max() > 1e-5


def test_a_row_without_the_text_tail_gives_the_same_image_output(setup, rng):
  # What lets the data pipeline end untrained image rows with the image (sequences.image_sample).
  config, params = setup
  sample = image_sample(config, rng, int(rng.integers(2, 7)), tail_len=3)
  full = build(config, [[sample]], 32)
  short = build(config, [[sample[:2]]], 32)
  assert (short["segment_ids"] > 0).sum() == (full["segment_ids"] > 0).sum() - 3
  np.testing.assert_allclose(
      run_rows(config, params, short)["image"], run_rows(config, params, full)["image"], rtol=1e-5, atol=1e-6
  )


@pytest.mark.parametrize("bidirectional", [True, False])
def test_image_tokens_see_each_other(bidirectional, rng, seed):
  config = tiny_config(bidirectional_image=bidirectional)
  params = random_params(config, seed=seed + 1)
  batch = build(config, [[image_sample(config, rng, 3)]], 24)
  base = np.asarray(run(config, params, batch)["image"])[0, 0]
  p = config.patch_size
  gw = config.grid_size[1]
  for patch in range(config.num_patches):
    r, c = divmod(patch, gw)
    changed = copy.deepcopy(batch)
    changed["images"][0, 0, r * p : (r + 1) * p, c * p : (c + 1) * p] += 0.5
    out = np.asarray(run(config, params, changed)["image"])[0, 0]
    for other in range(config.num_patches):
      r2, c2 = divmod(other, gw)
      diff = np.abs(
          out[r2 * p : (r2 + 1) * p, c2 * p : (c2 + 1) * p] - base[r2 * p : (r2 + 1) * p, c2 * p : (c2 + 1) * p]
      ).max()
      if bidirectional or other >= patch:
        assert diff > 1e-6, (patch, other)
      else:  # causal ablation: an earlier patch never sees a later one
        assert diff == 0.0, (patch, other)


def test_packed_samples_never_influence_each_other(setup, rng):
  config, params = setup
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
  changed["tokens"][0, 1] = (changed["tokens"][0, 1] + 3) % config.vocab_size
  changed["images"][0, 0] += 1.0
  out2 = run(config, params, changed, t_packed)
  np.testing.assert_array_equal(out2["logits"][0, seg >= 2], out["logits"][0, seg >= 2])
  np.testing.assert_array_equal(out2["image"][0, 1], out["image"][0, 1])
  assert np.abs(out2["image"][0, 0] - out["image"][0, 0]).max() > 1e-5


def test_timestep_conditions_only_its_image(setup, rng):
  config, params = setup
  batch = build(config, [[image_sample(config, rng, 4), image_sample(config, rng, 3)]], 80, slots=2)
  out1 = run(config, params, batch, np.array([[10.0, 500.0]], np.float32))
  out2 = run(config, params, batch, np.array([[900.0, 500.0]], np.float32))
  assert np.abs(out1["image"][0, 0] - out2["image"][0, 0]).max() > 1e-5
  np.testing.assert_array_equal(out1["image"][0, 1], out2["image"][0, 1])


def test_heads_are_optional_and_text_only_path(setup, rng):
  config, params = setup
  batch = build(config, [[text_sample(config, rng, 9)], [text_sample(config, rng, 4)]], 12)
  full = run(config, params, batch)
  text_only = MonoFormer(config).apply({"params": params}, jax.tree.map(jnp.asarray, batch))
  # Two programs (with and without the image path), fused differently: float32 rounding of
  # logits of magnitude ~10 (seed sweep: worst 1.3e-6).
  scale = max(1.0, float(np.abs(full["logits"]).max()))
  np.testing.assert_allclose(text_only["logits"], full["logits"], rtol=0, atol=1e-6 * scale)
  assert "image" not in text_only
  img_batch = build(config, [[image_sample(config, rng, 3)]], 24)
  no_logits = run(config, params, img_batch, return_logits=False)
  assert set(no_logits) == {"image"}
  image = run(config, params, img_batch)["image"]
  np.testing.assert_allclose(no_logits["image"], image, rtol=0, atol=1e-6 * max(1.0, float(np.abs(image).max())))


def test_scan_and_remat_give_the_same_outputs(setup, rng):
  from monoformer_jax.convert.monoformer_weights import stack_layers

  config, params = setup
  batch = build(config, [[image_sample(config, rng, 4)], [text_sample(config, rng, 7)]], 24)
  ref = run(config, params, batch)
  for kw in (dict(scan_layers=True), dict(remat="full"), dict(scan_layers=True, remat="dots")):
    cfg = config.replace(**kw)
    p = stack_layers(params, config.num_layers) if cfg.scan_layers else params
    out = run(cfg, p, batch)
    np.testing.assert_allclose(out["logits"], ref["logits"], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(out["image"], ref["image"], atol=1e-5, rtol=1e-5)


BF16_OF_SCALE = 3e-2


def test_bfloat16_compute_is_close_and_params_stay_float32(setup, rng):
  config, params = setup
  batch = build(config, [[image_sample(config, rng, 4)]], 24)
  ref = run(config, params, batch)
  bf16 = config.replace(dtype="bfloat16")
  out, state = run(bf16, params, batch, mutable=["intermediates"])
  assert out["logits"].dtype == jnp.float32
  assert state["intermediates"]["final_hidden"][0].dtype == jnp.bfloat16  # really computed in bf16
  # bf16 keeps 8 significant bits (relative rounding 2^-9 ~ 0.2%), compounded over the layers:
  # both outputs within BF16_OF_SCALE of their largest value (worst seen: RESULTS.md).
  for key in ("image", "logits"):
    scale = float(np.abs(ref[key]).max())
    np.testing.assert_allclose(
        np.asarray(out[key], np.float32), ref[key], rtol=0, atol=BF16_OF_SCALE * scale, err_msg=key
    )
  # Fresh parameters of the bf16-compute model are float32, every leaf.
  fresh = jax.eval_shape(lambda: nn.unbox(init_params(bf16, jax.random.key(0))))
  dtypes = {jnp.dtype(leaf.dtype) for leaf in jax.tree.leaves(fresh)}
  assert dtypes == {jnp.dtype(jnp.float32)}
  assert len(jax.tree.leaves(fresh)) == len(jax.tree.leaves(params))


def test_wrong_image_shape_is_a_clear_error(setup, rng):
  config, params = setup
  batch = build(config, [[image_sample(config, rng, 4)]], 24)
  bad = np.zeros((1, 1, 8, 8, 3), np.float32) + 1
  with pytest.raises(ValueError, match="model expects"):
    MonoFormer(config).apply({"params": params}, jax.tree.map(jnp.asarray, batch), bad, jnp.ones((1, 1)))


def test_config_validation_names_the_field():
  with pytest.raises(ValueError, match="patch_size=3 does not divide image_height=4"):
    tiny_config(patch_size=3)
  with pytest.raises(ValueError, match="t_embed"):
    tiny_config(t_embed="add_at_each_layer")
  from monoformer_jax.model.config import ModelConfig

  with pytest.raises(ValueError, match="unknown model config field.*hiden_size"):
    ModelConfig.from_mapping({"hiden_size": 3})


def test_label_embedding_variant_conditions_on_the_class(rng, seed):
  config = tiny_config(num_classes=10)
  params = random_params(config, seed=seed + 1)
  batch = build(config, [[image_sample(config, rng, 2, label=3)]], 24)
  out1 = run(config, params, batch)
  batch["labels"][0, 0] = 7
  out2 = run(config, params, batch)
  assert np.abs(out1["image"] - out2["image"]).max() > 1e-5
  assert batch_lib.KIND_IMAGE == 1


def test_prompt_token_changes_later_outputs_and_the_image_never_earlier_ones(setup, rng):
  """(a) a prompt token before the image: earlier logits bit-identical; its own and the image's
  outputs change."""
  config, params = setup
  sample = image_sample(config, rng, 7, tail_len=3)
  batch = build(config, [[sample]], 40)
  js = (1, 2, 3, 4, 5, 6)  # prompt positions; 1 + 6 rows = the row count of the test below
  rows = _variants(batch, 1 + len(js))
  for r, j in enumerate(js, start=1):
    rows["tokens"][r, j] = (rows["tokens"][r, j] + 1 + rng.integers(0, config.vocab_size - 1)) % config.vocab_size
    assert rows["tokens"][r, j] != batch["tokens"][0, j]
  out = run_rows(config, params, rows)
  image_scale = np.abs(out["image"][0]).max()
  for r, j in enumerate(js, start=1):
    np.testing.assert_array_equal(out["logits"][r, :j], out["logits"][0, :j])
    assert np.abs(out["logits"][r, j] - out["logits"][0, j]).max() > 1e-2
    # Every image patch output moves (the whole image attends to the prompt).
    diff = np.abs(out["image"][r, 0] - out["image"][0, 0])
    for patch in range(config.num_patches):
      assert diff[_patch_slices(config, patch)].max() > 1e-3 * image_scale, (j, patch)


def test_later_text_sees_every_image_token(setup, rng):
  """(b) text after the image (after <|im_end|>) depends on each single image token's x_t patch;
  the text before the image does not."""
  config, params = setup
  batch = build(config, [[image_sample(config, rng, 4, tail_len=4)]], 40)
  n = config.num_patches
  rows = _variants(batch, 1 + n)
  for patch in range(n):
    hs, ws = _patch_slices(config, patch)
    rows["images"][1 + patch, 0, hs, ws] += 2.0 * rng.standard_normal(rows["images"][1 + patch, 0, hs, ws].shape)
  out = run_rows(config, params, rows)
  after = _positions(batch, batch_lib.KIND_TEXT)
  first_image = _positions(batch, batch_lib.KIND_IMAGE)[0]
  before, after = after[after < first_image], after[after > first_image]
  assert len(after) == 4 and len(before) == 4
  for patch in range(n):
    np.testing.assert_array_equal(out["logits"][1 + patch, before], out["logits"][0, before])
    for pos in after:
      assert np.abs(out["logits"][1 + patch, pos] - out["logits"][0, pos]).max() > 1e-2, (patch, pos)


@pytest.mark.parametrize("t_embed", ["adaln_before_decoder", "add_before_image_tokens"])
def test_causal_image_switch_hides_later_image_tokens(t_embed, rng, seed):
  """(c) bidirectional_image=False: an image token's output never depends on later image
  tokens, always on earlier ones and itself (and later text still sees the whole image)."""
  config = tiny_config(t_embed=t_embed, bidirectional_image=False)
  params = random_params(config, seed=seed + 1)
  batch = build(config, [[image_sample(config, rng, 3, tail_len=2)]], 40)
  n = config.num_patches
  rows = _variants(batch, 1 + n)
  for patch in range(n):
    hs, ws = _patch_slices(config, patch)
    rows["images"][1 + patch, 0, hs, ws] += 2.0 * rng.standard_normal(rows["images"][1 + patch, 0, hs, ws].shape)
  out = run_rows(config, params, rows)
  scale = np.abs(out["image"][0]).max()
  image_pos = _positions(batch, batch_lib.KIND_IMAGE)
  tail = _positions(batch, batch_lib.KIND_TEXT)
  tail = tail[tail > image_pos[-1]]
  for patch in range(n):
    for other in range(n):
      sl = (1 + patch, 0) + _patch_slices(config, other)
      base = out["image"][(0, 0) + _patch_slices(config, other)]
      if other < patch:
        np.testing.assert_array_equal(out["image"][sl], base)
        np.testing.assert_array_equal(out["logits"][1 + patch, image_pos[other]], out["logits"][0, image_pos[other]])
      else:
        assert np.abs(out["image"][sl] - base).max() > 1e-3 * scale, (patch, other)
    assert np.abs(out["logits"][1 + patch, tail] - out["logits"][0, tail]).max() > 1e-2


@pytest.mark.parametrize(
    "kw",
    [
        dict(t_embed="adaln_before_decoder"),
        dict(t_embed="add_before_image_tokens"),
        dict(t_embed="adaln_before_decoder", num_classes=10, scan_layers=True),
        dict(t_embed="add_before_image_tokens", num_classes=10),
        dict(t_embed="add_before_image_tokens", scan_layers=True, remat="full"),
    ],
)
def test_every_parameter_carries_logical_axis_names(kw):
  config = tiny_config(**kw)
  boxed = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
  is_box = lambda x: isinstance(x, nn.Partitioned)  # noqa: E731
  leaves = jax.tree_util.tree_leaves_with_path(boxed, is_leaf=is_box)
  # Every leaf is boxed (nothing unnamed slipped through) ...
  for path, leaf in leaves:
    assert isinstance(leaf, nn.LogicallyPartitioned), jax.tree_util.keystr(path)
    assert len(leaf.names) == len(leaf.value.shape), jax.tree_util.keystr(path)
  # ... and its partition spec names every axis.
  specs = jax.tree.leaves(nn.get_partition_spec(boxed), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  assert len(specs) == len(leaves) == len(jax.tree.leaves(nn.unbox(boxed)))
  for (path, _), spec in zip(leaves, specs):
    assert len(spec) and all(isinstance(name, str) for name in spec), (jax.tree_util.keystr(path), spec)
  names = {jax.tree_util.keystr(p) for p, _ in leaves}
  if config.num_classes:
    assert any("label_embedder" in n for n in names)
  if config.scan_layers:
    layer_specs = [s for (p, _), s in zip(leaves, specs) if "'layers'" in jax.tree_util.keystr(p)]
    assert layer_specs and all(s[0] == "layers" for s in layer_specs)
