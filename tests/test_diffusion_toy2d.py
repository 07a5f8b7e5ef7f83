"""End to end: a small MLP learns a 2-D mixture of Gaussians with either objective.

Train a few hundred Adam steps through the objective interface (sample_timesteps, add_noise,
model_timesteps, loss), sample through objective.sample, and compare with the data: mean and
covariance within 10% (relative to the data's scale) and most samples within 3 std of a mode.
The same check on the untrained denoiser must fail, so the check can fail.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from monoformer_jax import diffusion as dif

CENTERS = np.array([[-0.5, -0.2], [1.5, -0.2], [0.5, 1.3]], np.float32)  # non-zero mean
MODE_STD = 0.1


def draw_data(rng, n):
  k_mode, k_noise = jax.random.split(rng)
  mode = jax.random.randint(k_mode, (n,), 0, CENTERS.shape[0])
  return jnp.asarray(CENTERS)[mode] + MODE_STD * jax.random.normal(k_noise, (n, 2))


class MLPDenoiser(nn.Module):
  out_channels: int
  width: int = 128

  @nn.compact
  def __call__(self, x, model_t):
    freqs = jnp.exp(jnp.linspace(0.0, np.log(100.0), 8))
    angles = (model_t / 1000.0)[:, None] * freqs[None, :]
    h = jnp.concatenate([x, jnp.sin(angles), jnp.cos(angles)], axis=-1)
    for _ in range(3):
      h = nn.silu(nn.Dense(self.width)(h))
    return nn.Dense(self.out_channels)(h)


def train(objective, model, params, steps, rng, batch=512, lr=3e-3):
  tx = optax.adam(optax.cosine_decay_schedule(lr, steps, 0.05))

  def loss_fn(p, key):
    k_data, k_noise, k_t = jax.random.split(key, 3)
    x0 = draw_data(k_data, batch)
    noise = jax.random.normal(k_noise, x0.shape)
    t = objective.sample_timesteps(k_t, (batch,))
    x_t = objective.add_noise(x0, noise, t)
    out = model.apply(p, x_t, objective.model_timesteps(t))
    return jnp.mean(objective.loss(out, x0, x_t, noise, t)["loss"])

  @jax.jit
  def run(params, key):
    def body(carry, k):
      p, opt = carry
      grads = jax.grad(loss_fn)(p, k)
      updates, opt = tx.update(grads, opt, p)
      return (optax.apply_updates(p, updates), opt), None

    (params, _), _ = jax.lax.scan(body, (params, tx.init(params)), jax.random.split(key, steps))
    return params

  return run(params, rng)


def matches_data(samples, key) -> tuple[bool, dict]:
  data = np.asarray(draw_data(key, 20000), np.float64)
  s = np.asarray(samples, np.float64)
  if not np.all(np.isfinite(s)):
    return False, {"finite": False}
  scale = np.sqrt(np.trace(np.cov(data.T)))
  mean_err = np.linalg.norm(s.mean(0) - data.mean(0)) / scale
  cov_err = np.linalg.norm(np.cov(s.T) - np.cov(data.T)) / np.linalg.norm(np.cov(data.T))
  nearest = np.min(np.linalg.norm(s[:, None, :] - CENTERS[None], axis=-1), axis=1)
  near_mode = float(np.mean(nearest < 3 * MODE_STD))
  stats = {"mean_err": mean_err, "cov_err": cov_err, "near_mode": near_mode}
  return bool(mean_err < 0.1 and cov_err < 0.1 and near_mode > 0.8), stats


@pytest.mark.parametrize(
    "kind,sampler,num_steps,train_steps",
    [("gaussian", "ddpm", 100, 800), ("flow", "euler", 50, 400), ("flow", "heun", 25, 400)],
)
def test_toy_mixture_is_learned(kind, sampler, num_steps, train_steps, seed):
  k_init, k_noise, k_sample, k_train, k_data = jax.random.split(jax.random.key(seed), 5)
  objective = dif.make_objective(kind)
  model = MLPDenoiser(objective.output_channels(2))
  init = model.init(k_init, jnp.zeros((1, 2)), jnp.zeros((1,)))
  x_T = dif.sample_noise(k_noise, jnp.arange(2000), (2,))

  @jax.jit
  def sample(params, x_T):
    denoise = lambda x, t: model.apply(params, x, t)  # noqa: E731
    return objective.sample(denoise, x_T, k_sample, sampler=sampler, num_steps=num_steps)

  untrained_ok, untrained = matches_data(sample(init, x_T), k_data)
  assert not untrained_ok, untrained
  trained = train(objective, model, init, train_steps, k_train)
  ok, stats = matches_data(sample(trained, x_T), k_data)
  assert ok, stats
