"""Train steps: 1 device == data2 x fsdp4 == data2 x fsdp2 x tensor2 (params really sharded);
gradient accumulation == the full batch; scan-over-layers and remat == the plain model."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from monoformer_jax.run.config import base_config
from monoformer_jax.convert.monoformer_weights import unstack_layers
from monoformer_jax.diffusion import make_objective
from monoformer_jax.model.monoformer import init_params
from monoformer_jax.run import sharding as sharding_lib
from monoformer_jax.run import state as state_lib
from monoformer_jax.train import steps as steps_lib
from monoformer_jax.train.data_streams import MixedIterator
from tests.helpers import build, image_sample, text_sample, tiny_config

MESHES = [
    {"data": 1, "fsdp": 1, "tensor": 1},
    {"data": 2, "fsdp": 4, "tensor": 1},
    {"data": 2, "fsdp": 2, "tensor": 2},
]


class _ListIt:

  def __init__(self, batches):
    self.batches, self.i = batches, 0

  def __next__(self):
    self.i += 1
    return self.batches[self.i - 1]


def _batches(config, seed):
  """5 batches of 8 rows per step kind (the text batches end with the first one again). Two rows of each image batch are text-only, placed so the
  two strided micro-batches of gradient accumulation (even / odd rows) hold different numbers of
  images, as they hold different numbers of trained text tokens."""
  rng = np.random.default_rng(seed)

  def image_row(j, r):
    if r in ((3 + j) % 4, (3 + j) % 4 + 4):
      return [text_sample(config, rng, int(rng.integers(4, 20)))]
    return [image_sample(config, rng, int(rng.integers(2, 6)))]

  images = [build(config, [image_row(j, r) for r in range(8)], 24) for j in range(5)]
  texts = [
      build(config, [[text_sample(config, rng, int(rng.integers(4, 20)))] for _ in range(8)], 24) for _ in range(4)
  ]
  texts.append(texts[0])  # the last AR step sees the first one's batch again: has it learnt?
  mixed_it = MixedIterator(_ListIt(images), _ListIt(texts))
  mixed = [next(mixed_it) for _ in range(5)]
  return {"diffusion": images, "ar": texts, "mixed": mixed}


def _stack_layers(params, num_layers):
  """Unscanned -> scanned parameter layout, traceable (the converter's version is numpy)."""
  out = {k: v for k, v in params.items() if not k.startswith("layers_")}
  out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *[params[f"layers_{i}"] for i in range(num_layers)])
  return out


def _train(config, kind, batches, mesh_spec, seed, accum=1, init_config=None):
  """5 steps from a fresh init -> (losses, final state, metrics, initial params).

  `init_config`: initialise with that (unscanned) model's params, converted to `config`'s layout,
  so a scanned / rematerialised model starts from the same weights as the plain one."""
  c = base_config()
  c.optimizer.update(dict(learning_rate=3e-3, warmup_steps=2, grad_clip=1.0, grad_accum_steps=accum))
  devices = jax.devices()[: int(np.prod(list(mesh_spec.values())))]
  mesh = sharding_lib.make_mesh(mesh_spec, devices)
  rules = sharding_lib.DEFAULT_RULES
  opt = state_lib.make_optimizer(c.optimizer)
  init_fn = None
  if init_config is not None:

    def init_fn(rng):
      params = nn.unbox(init_params(init_config, rng))
      return _stack_layers(params, config.num_layers) if config.scan_layers else params

  init_key, step_key = jax.random.split(jax.random.key(seed))
  state, _, shardings = state_lib.create_train_state(config, opt, init_key, mesh, rules, init_params_fn=init_fn)
  initial = jax.device_get(state.params)
  objective = make_objective("gaussian")
  fn = steps_lib.make_train_step(
      kind, config, objective, opt, grad_accum_steps=accum, lm_weight=0.5, ema_decay_value=0.99
  )
  step = steps_lib.compile_step(fn, shardings, mesh, rules, batches[0])
  losses, metrics = [], []
  for b in batches:
    state, m = step(state, sharding_lib.global_batch(b, mesh), step_key)
    losses.append(float(m["loss"]))
    metrics.append(jax.device_get(m))
  return losses, state, metrics, initial


@pytest.fixture(scope="module")
def setup(module_seed):
  config = tiny_config(vocab_size=96, hidden_size=32, num_heads=4, num_kv_heads=2, intermediate_size=64)
  return config, _batches(config, module_seed("batches")), module_seed("init and noise")


@pytest.fixture(scope="module")
def single_device(setup):
  """Memoised 1-device runs (each costs a compile): the reference of every comparison here."""
  config, batches, seed = setup
  memo = {}

  def get(kind, accum=1):
    if (kind, accum) not in memo:
      losses, state, metrics, initial = _train(config, kind, batches[kind], MESHES[0], seed, accum)
      memo[kind, accum] = losses, jax.device_get(state), metrics, initial
    return memo[kind, accum]

  return get


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return np.asarray(tree)


def _assert_params_close(a, b, rtol=1e-5, atol=1e-5):
  """atol: 1/300 of one Adam step (lr 3e-3). Where a gradient entry is ~0, Adam's g / sqrt(v)
  turns float32 rounding of the sums that make it up into visible noise in the update (worst
  seen over 30 seeds: 3.3e-6, gradient accumulation of a diffusion step; RESULTS.md)."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


@pytest.mark.parametrize("kind", ["ar", "diffusion", "mixed"])
def test_meshes_give_the_same_losses(setup, single_device, kind):
  config, batches, seed = setup
  ref, ref_state, _, initial = single_device(kind)
  # The steps really train (or the comparisons below would hold trivially).
  path = ("layers_0", "mlp", "gate_proj", "kernel")
  moved = np.abs(_get(ref_state.params, path) - _get(initial, path)).max()
  assert moved > 1e-3, moved
  if kind == "ar":
    assert ref[4] < ref[0]  # the same batch, 4 updates later
  for spec in MESHES[1:]:
    losses, state, _, _ = _train(config, kind, batches[kind], spec, seed)
    np.testing.assert_allclose(losses, ref, rtol=1e-5)
    # Parameters really are sharded: a device holds about total / (fsdp x tensor) bytes.
    params = state.params
    total = sum(x.nbytes for x in jax.tree.leaves(params))
    per_device = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(params))
    shards = spec["fsdp"] * spec["tensor"]
    assert per_device < 1.6 * total / shards, (per_device, total, shards)
    gate = params["layers_0"]["mlp"]["gate_proj"]["kernel"]
    assert gate.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    # The trained weights and their EMA are the 1-device run's, to the bar of every comparison here.
    trained, ema = jax.device_get((state.params, state.ema_params))
    _assert_params_close(trained, ref_state.params)
    _assert_params_close(ema, ref_state.ema_params)


@pytest.mark.parametrize("kind", ["ar", "diffusion", "mixed"])
def test_gradient_accumulation_is_the_full_batch_step(setup, single_device, kind):
  _, batches, _ = setup
  # The micro-batches (even rows / odd rows) differ in what the losses average over, so averaging
  # per-micro-batch means would not give the full batch's loss.
  counts = {"ar": ["loss_mask"], "diffusion": ["image_mask"], "mixed": ["loss_mask", "image_mask"]}[kind]
  for key in counts:
    per_micro = [steps_lib.split_micro_batches(b[key], 2).reshape(2, -1).sum(1) for b in batches[kind]]
    assert any(n[0] != n[1] for n in per_micro), (key, per_micro)
  full, full_state, full_metrics, _ = single_device(kind)
  accumulated, acc_state, acc_metrics, _ = single_device(kind, accum=2)
  np.testing.assert_allclose(accumulated, full, rtol=1e-5)
  for a, b in zip(acc_metrics, full_metrics):
    assert set(a) == set(b)
    for key in a:  # each loss term, the token / image counts, the gradient norm
      np.testing.assert_allclose(a[key], b[key], rtol=1e-5, err_msg=key)
  _assert_params_close(acc_state.params, full_state.params)
  _assert_params_close(acc_state.ema_params, full_state.ema_params)


@pytest.mark.parametrize("variant", [dict(scan_layers=True), dict(remat="full")])
def test_scan_and_remat_train_like_the_plain_model(setup, single_device, variant):
  config, batches, seed = setup
  ref, ref_state, _, _ = single_device("mixed")
  cfg = config.replace(**variant)
  losses, state, _, _ = _train(cfg, "mixed", batches["mixed"], MESHES[0], seed, init_config=config)
  np.testing.assert_allclose(losses, ref, rtol=1e-5)
  params, ema = jax.device_get((state.params, state.ema_params))
  if cfg.scan_layers:  # compare in the unscanned layout
    params, ema = (unstack_layers(p, cfg.num_layers) for p in (params, ema))
  _assert_params_close(params, ref_state.params)
  _assert_params_close(ema, ref_state.ema_params)


def test_learning_rate_schedule_and_ema():
  c = ml_collections.ConfigDict(
      dict(learning_rate=1.0, schedule="cosine", warmup_steps=10, decay_steps=110, final_lr_fraction=0.1)
  )
  fn = state_lib.learning_rate_schedule(c)
  assert float(fn(0)) == 0.0 and abs(float(fn(5)) - 0.5) < 1e-6
  assert abs(float(fn(10)) - 1.0) < 1e-6 and abs(float(fn(110)) - 0.1) < 1e-6
  # A quarter of the way down the cosine, where a linear decay (0.775) or none (1.0) differ:
  # 0.1 + 0.9 * (1 + cos(pi / 4)) / 2.
  assert abs(float(fn(35)) - 0.8681981) < 1e-6
  assert abs(float(fn(85)) - 0.2318019) < 1e-6  # three quarters: 0.1 + 0.9 * (1 - cos(pi / 4)) / 2
  assert float(state_lib.ema_decay(jnp.int32(0), 0.9999, True)) == pytest.approx(0.1)
  assert float(state_lib.ema_decay(jnp.int32(10**6), 0.9999, True)) == pytest.approx(0.9999)
  assert float(state_lib.ema_decay(jnp.int32(0), 0.9999, False)) == pytest.approx(0.9999)
