"""Checks our diffusion module against golden vectors of the official diffusion code.

    python -m monoformer_jax.tools.check_diffusion DIR [--dump FILE.npz]

DIR holds cases.npz in the format of tests/testdata/diffusion (see its README.txt): float64
tables, q_sample, the training-loss terms, p_mean_variance on the full and on a respaced chain
(prefixes pmv_ / pmv<N>_ / resp<N>_), and an N-step respaced p_sample_loop driven by the
documented toy model with the recorded per-step noise (loop_*). Every array we compute is compared
with |ours - ref| <= 1e-4 * max(1, max|ref|). Exit status: 0 all within tolerance, 1 otherwise,
2 when DIR or an array it needs is missing. The golden arrays are NCHW; we run NHWC.
"""

from __future__ import annotations

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from monoformer_jax import cli
from monoformer_jax import diffusion as dif

TOLERANCE = 1e-4
TABLES = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)
PMV_OUTPUTS = ("mean", "variance", "log_variance", "pred_xstart", "clip_mean", "clip_pred_xstart")


class GoldenError(ValueError):
  """The directory or one of its arrays is missing or malformed."""


def to_nhwc(x):
  return np.moveaxis(np.asarray(x), -3, -1)


def to_nchw(x):
  return np.moveaxis(np.asarray(x), -1, -3)


def toy_model(x_t, model_t):
  """The README's deterministic loop model, channels-last: out = [eps, v] on the channel axis."""
  tt = expand(model_t.astype(jnp.float32) / 1000.0, x_t)
  eps = 0.8 * x_t + 0.1 * jnp.roll(x_t, 1, axis=-1) + 0.2 * (tt - 0.5)
  v = 0.3 * x_t + (2.0 * tt - 1.0) * 0.5
  return jnp.concatenate([eps, v], axis=-1)


def expand(values, x):
  return values.reshape(values.shape + (1,) * (x.ndim - values.ndim))


def _need(cases, name):
  if name not in cases:
    raise GoldenError(f"array {name!r} is missing from cases.npz")
  return cases[name]


def _respaced_count(cases) -> int | None:
  counts = {int(m.group(1)) for k in cases for m in [re.match(r"(?:resp|pmv)(\d+)_", k)] if m}
  if len(counts) > 1:
    raise GoldenError(f"several respacings in one directory: {sorted(counts)}")
  return counts.pop() if counts else None


def _tables(cases, out, num_timesteps, count):
  tables = dif.float64_tables(dif.linear_betas(num_timesteps))
  for name in TABLES:
    out[name] = tables[name]
  if count is not None:
    betas, timestep_map = dif.respaced_float64(num_timesteps, "linear", str(count))
    for name, value in dif.float64_tables(betas).items():
      if f"resp{count}_{name}" in cases:
        out[f"resp{count}_{name}"] = value
    out[f"resp{count}_timestep_map"] = timestep_map


def _q_sample(cases, out, full):
  for prefix in ("qs", "loss"):
    if f"{prefix}_x0" in cases:
      x0, noise = (to_nhwc(_need(cases, f"{prefix}_{k}")) for k in ("x0", "noise"))
      t = jnp.asarray(_need(cases, f"{prefix}_t"), jnp.int32)
      out[f"{prefix}_x_t"] = to_nchw(dif.q_sample(full, jnp.asarray(x0), t, jnp.asarray(noise)))


def _loss(cases, out, full):
  if "loss_model_output" not in cases:
    return
  x0, noise, x_t, model_output = (to_nhwc(_need(cases, f"loss_{k}")) for k in ("x0", "noise", "x_t", "model_output"))
  t = jnp.asarray(_need(cases, "loss_t"), jnp.int32)
  terms = jax.jit(dif.training_losses)(
      full, jnp.asarray(model_output), jnp.asarray(x0), jnp.asarray(x_t), jnp.asarray(noise), t
  )
  for name in ("loss", "mse", "vb"):
    out[f"loss_{name}"] = np.asarray(terms[name])


def _p_mean_variance(cases, out, prefix, chain):
  if f"{prefix}_model_output" not in cases:
    return
  x, model_output = (jnp.asarray(to_nhwc(_need(cases, f"{prefix}_{k}"))) for k in ("x", "model_output"))
  t = jnp.asarray(_need(cases, f"{prefix}_t"), jnp.int32)
  plain = dif.p_mean_variance(chain, model_output, x, t, clip_denoised=False)
  clipped = dif.p_mean_variance(chain, model_output, x, t, clip_denoised=True)
  values = dict(
      mean=plain.mean,
      variance=plain.variance,
      log_variance=plain.log_variance,
      pred_xstart=plain.pred_xstart,
      clip_mean=clipped.mean,
      clip_pred_xstart=clipped.pred_xstart,
  )
  for name in PMV_OUTPUTS:
    out[f"{prefix}_{name}"] = to_nchw(values[name])
  out[f"{prefix}_t_model"] = np.asarray(dif.model_timesteps(chain, t)).astype(np.int64)


def _loop(cases, out, chain):
  if "loop_z" not in cases:
    return
  z = jnp.asarray(to_nhwc(_need(cases, "loop_z")))
  recorded = jnp.asarray(to_nhwc(_need(cases, "loop_noise")))
  if recorded.shape[0] != chain.num_timesteps:
    raise GoldenError(f"loop_noise has {recorded.shape[0]} steps, the chain {chain.num_timesteps}")

  def run(z, recorded):
    return dif.ddpm_sample_loop(
        chain, toy_model, z, lambda k, x: recorded[k], clip_denoised=False, return_trajectory=True
    )

  final, traj = jax.jit(run)(z, recorded)
  out["loop_final"] = to_nchw(final)
  out["loop_sample"] = to_nchw(traj["sample"])
  out["loop_pred_xstart"] = to_nchw(traj["pred_xstart"])
  out["loop_model_output"] = to_nchw(traj["model_output"])
  steps = np.arange(chain.num_timesteps - 1, -1, -1)
  out["loop_t_index"] = steps.astype(np.int64)
  t_model = np.asarray(chain.timestep_map)[steps].astype(np.int64)
  out["loop_t_model"] = np.repeat(t_model[:, None], z.shape[0], axis=1)


def compute_all(cases) -> dict[str, np.ndarray]:
  """Every array of the golden format we can compute from the inputs in `cases`, golden names."""
  num_timesteps = int(_need(cases, "betas").shape[0])
  count = _respaced_count(cases)
  out: dict[str, np.ndarray] = {}
  _tables(cases, out, num_timesteps, count)
  full = dif.create_gaussian_diffusion(num_timesteps, "linear", "")
  _q_sample(cases, out, full)
  _loss(cases, out, full)
  _p_mean_variance(cases, out, "pmv", full)
  if count is not None:
    chain = dif.create_gaussian_diffusion(num_timesteps, "linear", str(count))
    _p_mean_variance(cases, out, f"pmv{count}", chain)
    _loop(cases, out, chain)
  elif "loop_z" in cases:
    raise GoldenError("loop_* arrays need the resp<N>_ tables that name the respacing")
  return {k: np.asarray(v) for k, v in out.items()}


def compare(ours: dict, cases) -> list[tuple[str, float, float, bool]]:
  rows = []
  for name in sorted(ours):
    if name not in cases:
      continue
    ref = np.asarray(cases[name], dtype=np.float64)
    mine = np.asarray(ours[name], dtype=np.float64)
    tol = TOLERANCE * max(1.0, float(np.max(np.abs(ref)))) if ref.size else TOLERANCE
    if mine.shape != ref.shape:
      rows.append((name, float("inf"), tol, False))
      continue
    err = float(np.max(np.abs(mine - ref))) if ref.size else 0.0
    rows.append((name, err, tol, bool(err <= tol)))
  return rows


def load_cases(directory) -> dict[str, np.ndarray]:
  path = pathlib.Path(directory)
  if not path.is_dir():
    raise GoldenError(f"{path} is not a directory")
  npz = path / "cases.npz"
  if not npz.is_file():
    raise GoldenError(f"{npz} does not exist")
  try:
    with np.load(npz, allow_pickle=False) as data:
      return {k: data[k] for k in data.files}
  except (OSError, ValueError) as e:
    raise GoldenError(f"cannot read {npz}: {e}") from e


def define_flags(fv, argv=()):
  del argv  # no config file: the flags alone
  flags.DEFINE_string("dump", None, "Write every computed array to this .npz.", flag_values=fv)


def run(fv, args) -> int:
  if len(args) != 1:
    raise cli.UsageError(
        "give one golden directory (holding cases.npz): "
        "python -m monoformer_jax.tools.check_diffusion DIR [--dump FILE.npz]"
    )
  cases = load_cases(args[0])
  ours = compute_all(cases)
  if fv.dump:
    np.savez(fv.dump, **ours)
  rows = compare(ours, cases)
  for name, err, tol, ok in rows:
    print(f"{name:40s} max_abs_err={err:.3e} tol={tol:.3e} {'ok' if ok else 'FAIL'}")
  unchecked = sorted(set(cases) - set(ours))
  print(f"inputs (not computed): {', '.join(unchecked)}")
  failed = [r[0] for r in rows if not r[3]]
  worst = max(rows, key=lambda r: r[1] / r[2]) if rows else None
  if worst:
    print(f"{len(rows)} arrays checked, worst {worst[0]} err/tol={worst[1] / worst[2]:.3g}")
  if failed:
    print(f"FAILED: {', '.join(failed)}")
    return 1
  return 0


main = cli.entry_point(__doc__, define_flags, run)


if __name__ == "__main__":
  cli.run_as_script(main)
