"""Schedules, respacing, tables, q_sample statistics, p_mean_variance and the training loss."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from monoformer_jax import diffusion as dif


def _key(seed, k):
  """The k-th key of a test (its seed from the `seed` fixture)."""
  return jax.random.fold_in(jax.random.key(seed), k)


def _rand(seed, k, shape, scale=1.0):
  return scale * jax.random.normal(_key(seed, k), shape, jnp.float32)


def test_linear_schedule_scales_with_step_count():
  np.testing.assert_array_equal(dif.linear_betas(1000), np.linspace(1e-4, 0.02, 1000))
  betas = dif.linear_betas(250)
  assert betas[0] == pytest.approx(4e-4) and betas[-1] == pytest.approx(0.08)


def test_cosine_schedule_follows_alpha_bar():
  betas = dif.cosine_betas(1000)
  ac = np.cumprod(1 - betas)
  s = np.arange(1, 1001) / 1000
  expected = np.cos((s + 0.008) / 1.008 * np.pi / 2) ** 2 / np.cos(0.008 / 1.008 * np.pi / 2) ** 2
  np.testing.assert_allclose(ac[:-5], expected[:-5], rtol=1e-9)
  assert betas.max() <= 0.999
  with pytest.raises(ValueError):
    dif.named_betas("quadratic", 10)


@pytest.mark.parametrize(
    "spacing,expected",
    [
        ("", list(range(10))),
        ("5", [0, 2, 4, 7, 9]),
        ("ddim5", [0, 2, 4, 6, 8]),
        ("2,3", [0, 4, 5, 7, 9]),
        (10, list(range(10))),
    ],
)
def test_spaced_timesteps(spacing, expected):
  assert dif.spaced_timesteps(10, spacing) == expected


def test_spaced_timesteps_official_strings_and_errors():
  kept = dif.spaced_timesteps(1000, "250")
  assert len(kept) == 250 and kept[0] == 0 and kept[-1] == 999
  assert dif.spaced_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
  with pytest.raises(ValueError):
    dif.spaced_timesteps(10, "11")
  with pytest.raises(ValueError):
    dif.spaced_timesteps(10, "ddim7")


def test_respaced_chain_keeps_alpha_bar_at_kept_steps():
  base = dif.float64_tables(dif.linear_betas(1000))
  betas, tmap = dif.respaced_float64(1000, "linear", "37")
  np.testing.assert_allclose(np.cumprod(1 - betas), base["alphas_cumprod"][tmap], rtol=1e-12)
  chain = dif.create_gaussian_diffusion(respacing="37")
  assert chain.num_timesteps == 37 and chain.num_original_timesteps == 1000
  np.testing.assert_array_equal(dif.model_timesteps(chain, jnp.arange(37)), tmap)


def test_float32_tables_are_the_cast_float64_tables():
  """Gather-then-cast (official) == cast-then-gather (ours): the tables are exactly f32(f64)."""
  chain = dif.create_gaussian_diffusion(schedule="cosine")
  ref = dif.float64_tables(dif.cosine_betas(1000))
  for name, value in ref.items():
    np.testing.assert_array_equal(np.asarray(getattr(chain, name)), value.astype(np.float32))
  # ... and float32 storage costs far less than the golden tolerance on the worst table.
  worst = np.max(
      np.abs(ref["sqrt_recip_alphas_cumprod"].astype(np.float32) - ref["sqrt_recip_alphas_cumprod"])
      / ref["sqrt_recip_alphas_cumprod"]
  )
  assert worst < 1e-7


@pytest.mark.parametrize("t", [3, 400, 990])
def test_q_sample_marginals_match_closed_form(t, seed):
  """Empirical mean/variance of q(x_t|x_0) over 40k draws vs sqrt(ab) x0 and 1 - ab."""
  chain = dif.create_gaussian_diffusion()
  n, x0 = 40000, _rand(seed, 0, (1, 3, 2), 0.8)
  noise = _rand(seed, 1, (n, 3, 2))
  tt = jnp.full((n,), t, jnp.int32)
  x_t = np.asarray(dif.q_sample(chain, jnp.broadcast_to(x0, (n, 3, 2)), tt, noise), np.float64)
  ab = np.cumprod(1 - dif.linear_betas(1000))[t]
  mean, var, _ = dif.q_mean_variance(chain, x0, jnp.array([t]))
  np.testing.assert_allclose(np.asarray(mean[0]), math.sqrt(ab) * np.asarray(x0[0]), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(var[0]), 1 - ab, rtol=1e-5)
  se_mean = math.sqrt((1 - ab) / n)
  assert np.all(np.abs(x_t.mean(0) - math.sqrt(ab) * np.asarray(x0[0])) < 5 * se_mean)
  assert np.all(np.abs(x_t.var(0) / (1 - ab) - 1) < 5 * math.sqrt(2 / n))


def test_q_posterior_is_the_gaussian_product(seed):
  """The posterior mean/var agree with q(x_t|x_{t-1}) q(x_{t-1}|x_0) done by hand in float64."""
  chain = dif.create_gaussian_diffusion()
  x0, x_t = _rand(seed, 1, (4, 5, 3)), _rand(seed, 2, (4, 5, 3))
  t = jnp.array([1, 10, 500, 999])
  post = dif.q_posterior(chain, x0, x_t, t)
  betas = dif.linear_betas(1000)
  ac = np.cumprod(1 - betas)
  for b, s in enumerate(np.asarray(t)):
    prec = 1 / (1 - ac[s - 1]) + (1 - betas[s]) / betas[s]
    mean = (
        math.sqrt(ac[s - 1]) * np.asarray(x0[b]) / (1 - ac[s - 1])
        + math.sqrt(1 - betas[s]) * np.asarray(x_t[b]) / betas[s]
    ) / prec
    np.testing.assert_allclose(np.asarray(post.mean[b]), mean, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(np.asarray(post.variance[b]), 1 / prec, rtol=1e-5)


@pytest.mark.parametrize("sigma_small", [False, True])
def test_p_mean_variance_fixed_variances(sigma_small, seed):
  chain = dif.create_gaussian_diffusion(respacing="50", learn_sigma=False, sigma_small=sigma_small)
  x, eps = _rand(seed, 3, (3, 4, 4, 2)), _rand(seed, 4, (3, 4, 4, 2))
  t = jnp.array([0, 7, 49])
  pred = dif.p_mean_variance(chain, eps, x, t)
  betas, _ = dif.respaced_float64(1000, "linear", "50")
  tab = dif.float64_tables(betas)
  var = tab["posterior_variance"] if sigma_small else tab["fixed_large_variance"]
  np.testing.assert_allclose(np.asarray(pred.variance[:, 0, 0, 0]), var[np.asarray(t)], rtol=1e-6)
  x0 = np.sqrt(1 / tab["alphas_cumprod"])[np.asarray(t), None, None, None] * np.asarray(x) - np.sqrt(
      1 / tab["alphas_cumprod"] - 1
  )[np.asarray(t), None, None, None] * np.asarray(eps)
  np.testing.assert_allclose(np.asarray(pred.pred_xstart), x0, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="channels"):
    dif.p_mean_variance(chain, jnp.concatenate([eps, eps], -1), x, t)


def test_learned_range_interpolates_log_variance(seed):
  chain = dif.create_gaussian_diffusion()
  x, eps = _rand(seed, 5, (2, 3, 4)), _rand(seed, 6, (2, 3, 4))
  t = jnp.array([5, 600])
  lo = dif.p_mean_variance(chain, jnp.concatenate([eps, -jnp.ones_like(x)], -1), x, t)
  hi = dif.p_mean_variance(chain, jnp.concatenate([eps, jnp.ones_like(x)], -1), x, t)
  np.testing.assert_allclose(np.asarray(lo.log_variance[:, 0, 0]), np.asarray(chain.posterior_log_variance_clipped[t]))
  np.testing.assert_allclose(np.asarray(hi.log_variance[:, 0, 0]), np.log(np.asarray(chain.betas[t])), rtol=1e-6)


def test_training_loss_gradients_split_between_mean_and_variance(seed):
  """mse trains only the eps channels, vb only the variance channels (stop-gradient on eps)."""
  chain = dif.create_gaussian_diffusion()
  key = _key(seed, 7)
  x0, noise = _rand(seed, 8, (4, 4, 4, 3), 0.5), _rand(seed, 9, (4, 4, 4, 3))
  t = jax.random.randint(key, (4,), 1, 1000)
  x_t = dif.q_sample(chain, x0, t, noise)
  out = jnp.concatenate([_rand(seed, 10, x0.shape), jax.random.uniform(key, x0.shape, minval=-1.0)], -1)
  g_vb = jax.grad(lambda o: jnp.sum(dif.training_losses(chain, o, x0, x_t, noise, t)["vb"]))(out)
  g_mse = jax.grad(lambda o: jnp.sum(dif.training_losses(chain, o, x0, x_t, noise, t)["mse"]))(out)
  assert np.all(np.asarray(g_vb[..., :3]) == 0) and np.any(np.asarray(g_vb[..., 3:]) != 0)
  assert np.all(np.asarray(g_mse[..., 3:]) == 0) and np.any(np.asarray(g_mse[..., :3]) != 0)
  terms = dif.training_losses(chain, out, x0, x_t, noise, t)
  expected_mse = np.mean((np.asarray(noise) - np.asarray(out[..., :3])) ** 2, (1, 2, 3))
  np.testing.assert_allclose(np.asarray(terms["mse"]), expected_mse, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(terms["loss"]), np.asarray(terms["mse"] + terms["vb"]))


def test_vb_is_zero_for_the_true_posterior_and_positive_otherwise(seed):
  """With the exact eps and the posterior variance (v = -1 at t where it is the lower end)."""
  chain = dif.create_gaussian_diffusion()
  x0, noise = _rand(seed, 11, (3, 8, 2), 0.5), _rand(seed, 12, (3, 8, 2))
  t = jnp.array([2, 300, 999])
  x_t = dif.q_sample(chain, x0, t, noise)
  exact = jnp.concatenate([noise, -jnp.ones_like(noise)], -1)
  vb = dif.vb_terms_bpd(chain, exact, x0, x_t, t)
  assert np.all(np.abs(np.asarray(vb)) < 1e-4)
  off = dif.vb_terms_bpd(chain, exact + 0.3 * _rand(seed, 13, exact.shape), x0, x_t, t)
  assert np.all(np.asarray(off) > 1e-4)


def test_decoder_nll_at_t0_is_a_probability():
  """At t == 0 the bound is -log2 P(bin): summing P over all 256 bins of one pixel gives 1."""
  bins = jnp.linspace(-1.0, 1.0, 256)
  mean, log_scale = jnp.float32(0.13), jnp.float32(np.log(0.05))
  logp = dif.discretized_gaussian_log_likelihood(bins, mean, log_scale)
  assert float(jnp.sum(jnp.exp(logp))) == pytest.approx(1.0, abs=2e-3)


def test_predict_xstart_objective_targets_x0(seed):
  chain = dif.create_gaussian_diffusion(learn_sigma=False, predict_xstart=True)
  x0, noise = _rand(seed, 14, (2, 6, 2)), _rand(seed, 15, (2, 6, 2))
  t = jnp.array([10, 700])
  x_t = dif.q_sample(chain, x0, t, noise)
  terms = dif.training_losses(chain, x0, x0, x_t, noise, t)
  assert set(terms) == {"loss", "mse"} and np.all(np.asarray(terms["loss"]) == 0)
  pred = dif.p_mean_variance(chain, x0, x_t, t)
  np.testing.assert_allclose(np.asarray(pred.eps), np.asarray(noise), rtol=1e-3, atol=2e-3)


@pytest.mark.parametrize("predict_xstart", [False, True])
def test_min_snr_weighting_counts_each_step_as_clipped_snr_times_the_x0_error(predict_xstart, seed):
  """Min-SNR-gamma: the weighted mse of step t is min(SNR_t, gamma) x |x0 - x0_pred|^2.

  SNR from float64 linear betas here; the x_0 error from the eps prediction through the
  chain's own inversion. The vb term (variance channels) is left as it was.
  """
  gamma = 5.0
  chain = dif.create_gaussian_diffusion(learn_sigma=True, predict_xstart=predict_xstart)
  ac = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))
  t = jnp.array([0, 3, 40, 150, 400, 999])  # SNR from ~1e4 down to ~4e-5: both sides of gamma
  snr = ac[np.asarray(t)] / (1.0 - ac[np.asarray(t)])
  assert (snr > gamma).any() and (snr < gamma).any()
  x0, noise = _rand(seed, 16, (6, 4, 4, 2), 0.5), _rand(seed, 17, (6, 4, 4, 2))
  x_t = dif.q_sample(chain, x0, t, noise)
  out = jnp.concatenate([_rand(seed, 18, x0.shape), jax.random.uniform(_key(seed, 19), x0.shape, minval=-1.0)], -1)
  plain = dif.training_losses(chain, out, x0, x_t, noise, t)
  weighted = dif.training_losses(chain, out, x0, x_t, noise, t, min_snr_gamma=gamma)
  x0_pred = out[..., :2] if predict_xstart else dif.predict_xstart_from_eps(chain, x_t, t, out[..., :2])
  x0_mse = np.mean((np.asarray(x0_pred, np.float64) - np.asarray(x0)) ** 2, (1, 2, 3))
  np.testing.assert_allclose(np.asarray(weighted["loss"] - weighted["vb"]), np.minimum(snr, gamma) * x0_mse, rtol=2e-3)
  np.testing.assert_allclose(
      np.asarray(dif.min_snr_weight(chain, t, gamma)),
      np.minimum(snr, gamma) / (1.0 if predict_xstart else snr),
      rtol=1e-4,
  )
  for k in ("mse", "vb"):  # the reported terms stay the official, unweighted ones
    np.testing.assert_array_equal(np.asarray(weighted[k]), np.asarray(plain[k]))
  g = jax.grad(lambda o: jnp.sum(dif.training_losses(chain, o, x0, x_t, noise, t, min_snr_gamma=gamma)["loss"]))(out)
  g_plain = jax.grad(lambda o: jnp.sum(dif.training_losses(chain, o, x0, x_t, noise, t)["loss"]))(out)
  np.testing.assert_allclose(np.asarray(g[..., 2:]), np.asarray(g_plain[..., 2:]), rtol=1e-6)


def test_min_snr_objective_option(seed):
  obj = dif.make_objective("gaussian", min_snr_gamma=5.0)
  assert obj.min_snr_gamma == 5.0 and dif.make_objective("gaussian").min_snr_gamma == 0.0
  x0, noise = _rand(seed, 20, (3, 4, 1), 0.5), _rand(seed, 21, (3, 4, 1))
  t = jnp.array([5, 200, 900])
  x_t = obj.add_noise(x0, noise, t)
  out = _rand(seed, 22, (3, 4, 2))
  np.testing.assert_allclose(
      np.asarray(obj.loss(out, x0, x_t, noise, t)["loss"]),
      np.asarray(dif.training_losses(obj.diffusion, out, x0, x_t, noise, t, 5.0)["loss"]),
  )
  with pytest.raises(ValueError, match="min_snr_gamma"):
    dif.make_objective("gaussian", min_snr_gamma=-1.0)
