"""Train steps on meshes: 1 device == data2 x fsdp4 == data2 x fsdp2 x tensor2, params sharded."""
import jax
import ml_collections
import numpy as np
import pytest

from configs.common import base_config
from monoformer_jax.diffusion import make_objective
from monoformer_jax.train import sharding as sharding_lib
from monoformer_jax.train import state as state_lib
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
  rng = np.random.default_rng(seed)
  images = [build(config, [[image_sample(config, rng, int(rng.integers(2, 6)))] for _ in range(8)],
                  24) for _ in range(5)]
  texts = [build(config, [[text_sample(config, rng, int(rng.integers(4, 20)))] for _ in range(8)],
                 24) for _ in range(5)]
  mixed_it = MixedIterator(_ListIt(images), _ListIt(texts))
  mixed = [next(mixed_it) for _ in range(5)]
  return {"diffusion": images, "ar": texts, "mixed": mixed}


def _train(config, kind, batches, mesh_spec, accum=1):
  c = base_config()
  c.optimizer.update(dict(learning_rate=3e-3, warmup_steps=2, grad_clip=1.0,
                          grad_accum_steps=accum))
  devices = jax.devices()[:int(np.prod(list(mesh_spec.values())))]
  mesh = sharding_lib.make_mesh(mesh_spec, devices)
  rules = sharding_lib.DEFAULT_RULES
  opt = state_lib.make_optimizer(c.optimizer)
  state, _, shardings = state_lib.create_train_state(config, opt, jax.random.key(0), mesh, rules)
  objective = make_objective("gaussian")
  fn = steps_lib.make_train_step(kind, config, objective, opt, grad_accum_steps=accum,
                                 lm_weight=0.5, ema_decay_value=0.99)
  step = steps_lib.compile_step(fn, shardings, mesh, rules, batches[0])
  losses = []
  for b in batches:
    state, m = step(state, sharding_lib.global_batch(b, mesh), jax.random.key(7))
    losses.append(float(m["loss"]))
  return losses, state


@pytest.fixture(scope="module")
def setup():
  config = tiny_config(vocab_size=96, hidden_size=32, num_heads=4, num_kv_heads=2,
                       intermediate_size=64)
  return config, _batches(config, 0)


@pytest.mark.parametrize("kind", ["ar", "diffusion", "mixed"])
def test_meshes_give_the_same_losses(setup, kind):
  config, batches = setup
  ref, ref_state = _train(config, kind, batches[kind], MESHES[0])
  assert ref[-1] < ref[0]  # it learns
  for spec in MESHES[1:]:
    losses, state = _train(config, kind, batches[kind], spec)
    np.testing.assert_allclose(losses, ref, rtol=1e-5)
    # Parameters really are sharded: a device holds about total / (fsdp x tensor) bytes.
    params = state.params
    total = sum(x.nbytes for x in jax.tree.leaves(params))
    per_device = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(params))
    shards = spec["fsdp"] * spec["tensor"]
    assert per_device < 1.6 * total / shards, (per_device, total, shards)
    gate = params["layers_0"]["mlp"]["gate_proj"]["kernel"]
    assert gate.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6),
                 jax.device_get(state.ema_params), jax.device_get(ref_state.ema_params))


def test_gradient_accumulation_matches_the_full_batch(setup):
  config, batches = setup
  full, _ = _train(config, "ar", batches["ar"], MESHES[0])
  accumulated, _ = _train(config, "ar", batches["ar"], MESHES[0], accum=2)
  # Accumulation averages the per-micro-batch means (as the official recipe does), so the loss
  # differs from the full batch's only by how tokens split between micro-batches.
  np.testing.assert_allclose(accumulated, full, rtol=0.05)


def test_learning_rate_schedule_and_ema():
  c = ml_collections.ConfigDict(dict(learning_rate=1.0, schedule="cosine", warmup_steps=10,
                                     decay_steps=110, final_lr_fraction=0.1))
  fn = state_lib.learning_rate_schedule(c)
  assert float(fn(0)) == 0.0 and abs(float(fn(5)) - 0.5) < 1e-6
  assert abs(float(fn(10)) - 1.0) < 1e-6 and abs(float(fn(110)) - 0.1) < 1e-6
  import jax.numpy as jnp
  assert float(state_lib.ema_decay(jnp.int32(0), 0.9999, True)) == pytest.approx(0.1)
  assert float(state_lib.ema_decay(jnp.int32(10**6), 0.9999, True)) == pytest.approx(0.9999)
  assert float(state_lib.ema_decay(jnp.int32(0), 0.9999, False)) == pytest.approx(0.9999)
