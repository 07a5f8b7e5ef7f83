"""Checks our model against golden vectors of the official MonoFormer code.

    python -m monoformer_jax.tools.check_official DIR [--dump FILE.npz]

DIR has the layout of tests/testdata/model_adaln (config.json, model.safetensors, cases.npz; see
its README.txt). Every case found (text, train, mixed, cfg, sample) is run through our port and
EVERY output array of cases.npz (anything that is not one of the inputs in `INPUTS`) is computed
and compared with |ours - ref| <= 1e-4 * max(1, max|ref|), integer and boolean arrays exactly;
padding positions (outside `*_merged_attention_mask`) are not scored. An output we do not compute
counts as a failure. Exit status 1 if any array misses, 2 if DIR cannot be read.
Nothing is specialised to the golden sizes: the model is built from DIR/config.json.
"""

from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from monoformer_jax import cli
from monoformer_jax import diffusion
from monoformer_jax.convert import golden_cases as gc
from monoformer_jax.diffusion.samplers import ddpm_step
from monoformer_jax import batch as batch_lib
from monoformer_jax.model.config import ModelConfig
from monoformer_jax.model.image import FinalLayer, sincos_pos_embed_2d
from monoformer_jax.model.mask import attention_mask, token_meta
from monoformer_jax.model.monoformer import MonoFormer
from monoformer_jax.model.losses import lm_loss

TOLERANCE = 1e-4

# Jitted once per process (eager dispatch would compile every primitive separately).
_q_sample_jit = jax.jit(diffusion.q_sample)
_training_losses_jit = jax.jit(diffusion.training_losses)
_ddpm_step_jit = jax.jit(ddpm_step)

# The arrays of each case that are given to the model (or to the loss / the sampling loop); every
# other array of cases.npz is an output we must reproduce. train/mixed x_t = q_sample(x0, t, noise)
# is an output (we recompute it); cfg_x_t is a free input.
INPUTS = {
    "": ("special_token_ids",),
    "text": ("input_ids", "attention_mask", "labels", "t"),
    "train": ("input_ids", "attention_mask", "labels", "t", "x0", "noise"),
    "mixed": ("input_ids", "attention_mask", "labels", "t", "x0", "noise", "is_image"),
    "cfg": ("input_ids", "attention_mask", "t", "x_t", "scale"),
    "sample": ("input_ids", "attention_mask", "seed", "z", "noise"),
}
INPUT_NAMES = frozenset(f"{p}_{k}" if p else k for p, keys in INPUTS.items() for k in keys)
# Extra arrays we compute and score against another reference array.
ALIASES = {"sample_model_out_teacher_forced": "sample_model_out"}


def output_names(cases: dict) -> set:
  """The arrays of cases.npz that are outputs (what the port must reproduce)."""
  return set(cases) - INPUT_NAMES


# Inputs a case reads from another case's arrays.
_SHARED_INPUTS = {"sample": ("cfg_scale",)}


def check_inputs(cases: dict) -> None:
  """One ValueError naming every input array that a case present in cases.npz lacks."""
  missing: dict = {}
  for prefix in gc.case_names(cases):
    for name in [f"{prefix}_{k}" for k in INPUTS[prefix]] + list(_SHARED_INPUTS.get(prefix, ())):
      if name not in cases:
        missing.setdefault(name, []).append(prefix)
  if missing:
    raise ValueError(
        "cases.npz lacks input array(s): "
        + "; ".join(
            f"{name!r} (needed by the {' and '.join(p)} case{'s' if len(p) > 1 else ''})"
            for name, p in sorted(missing.items())
        )
    )


def _need(cases: dict, name: str, case: str) -> np.ndarray:
  if name not in cases:
    raise ValueError(f"cases.npz has no array {name!r} (needed by the {case} case)")
  return cases[name]


@functools.lru_cache(maxsize=None)
def _apply_fn(config: ModelConfig, with_images: bool):
  """One jitted forward per config (cases are padded to one shape, so it compiles once):
  (outputs, intermediates + the attention mask and, with images, the all-position head)."""
  model = MonoFormer(config)

  def run(params, batch, images, timesteps):
    out, state = model.apply({"params": params}, batch, images, timesteps, mutable=["intermediates"])
    inter = {k: v[0] for k, v in state["intermediates"].items()}
    inter["attn_allowed"] = _attn_allowed(config, batch)
    if images is not None:
      inter["final_layer_out_everywhere"] = final_layer_everywhere(
          config,
          params["final_layer"],
          inter["final_hidden"],
          inter["t_emb"][:, 0],
          batch["kinds"] == batch_lib.KIND_IMAGE,
      )
    return out, inter

  if with_images:
    return jax.jit(run)
  return jax.jit(lambda params, batch: run(params, batch, None, None))


def final_layer_everywhere(
    config: ModelConfig, final_layer_params: dict, hidden: jax.Array, cond: jax.Array, gen_mask: jax.Array
) -> jax.Array:
  """The official diffusion head at EVERY position: (B, L, p*p*C_out).

  The official code runs its final layer on all merged tokens and modulates only the generated
  image tokens; our model runs it on image tokens only. This applies our FinalLayer to the final
  hidden states `hidden` (B, L, H) with the per-row conditioning `cond` (B, H), and with a zero
  modulation (x * (1 + 0) + 0, exactly the unmodulated head) where `gen_mask` is False.
  """
  layer = FinalLayer(config)
  modulated = layer.apply({"params": final_layer_params}, hidden, cond[:, None, :])
  plain_params = dict(final_layer_params)
  plain_params["adaln_modulation"] = jax.tree.map(jnp.zeros_like, final_layer_params["adaln_modulation"])
  plain = layer.apply({"params": plain_params}, hidden, cond[:, None, :])
  return jnp.where(gen_mask[..., None], modulated, plain)


def _attn_allowed(config: ModelConfig, batch: dict) -> jax.Array:
  """The (B, L, L) mask every layer uses, [b, query, key] (the official merged positions)."""
  b, length = batch["tokens"].shape
  order = jnp.broadcast_to(jnp.arange(length), (b, length))
  meta = token_meta(batch["segment_ids"], batch["kinds"], batch["patch_index"], config.num_patches, order)
  return attention_mask(meta, meta, config.bidirectional_image)


def _case_batch(config, cases, special, prefix, shape):
  """(our batch padded to `shape` = (rows, length), the case's x_t NCHW, its merged length)."""
  ids = _need(cases, f"{prefix}_input_ids", prefix)
  mask = _need(cases, f"{prefix}_attention_mask", prefix)
  length = gc.merged_length(config, ids, mask, special)
  b = len(ids)
  if f"{prefix}_x_t" in cases:
    x_t = cases[f"{prefix}_x_t"]
    if prefix == "cfg":
      # Official forward_with_cfg: the second half of x_t is replaced by the first half.
      half = len(x_t) // 2
      x_t = np.concatenate([x_t[:half], x_t[:half]])
  else:  # text rows: the images are never looked at (no image tokens)
    x_t = (
        np.random.default_rng(0)
        .normal(size=(b, config.image_channels, config.image_height, config.image_width))
        .astype(np.float32)
    )
  batch = gc.build_batch(config, ids, mask, shape[1], special, x_t)
  return gc.pad_rows(batch, shape[0]), x_t, length


def _model_case(config, params, cases, special, prefix, shape, with_images=True):
  """Runs one case padded to `shape`; returns ({name: our array}, {name: valid-position mask})."""
  batch, x_t, length = _case_batch(config, cases, special, prefix, shape)
  b = len(x_t)
  t = _need(cases, f"{prefix}_t", prefix)
  images = np.zeros(batch["images"].shape, np.float32)
  images[:b, 0] = gc.nchw_to_nhwc(x_t)
  timesteps = np.zeros(batch["image_mask"].shape, np.float32)
  timesteps[:b, 0] = t
  jbatch = jax.tree.map(jnp.asarray, batch)
  if with_images:
    out, inter = _apply_fn(config, True)(params, jbatch, jnp.asarray(images), jnp.asarray(timesteps))
  else:
    out, inter = _apply_fn(config, False)(params, jbatch)

  def seq(a):  # back to the case's (B, L_merged, ...)
    return np.asarray(a)[:b, :length]

  batch = {k: v[:b, :length] if k in batch_lib.SEQUENCE_KEYS else v[:b] for k, v in batch.items()}
  valid = batch["segment_ids"] > 0
  res, masks = {}, {}
  res["logits"] = seq(out["logits"])
  for name in ["final_hidden"] + [f"layer{i}_output" for i in range(config.num_layers)]:
    res[name] = seq(inter[name])
  if with_images:
    res["merged_embeds"] = seq(inter["merged_embeds"])
    res["layer0_input"] = seq(inter["layer0_input"])
  for name in list(res):
    masks[name] = valid[..., None]
  res["gen_mask"] = batch["kinds"] == batch_lib.KIND_IMAGE
  res["text_mask"] = (batch["kinds"] == batch_lib.KIND_TEXT) & valid
  res["merged_attention_mask"] = valid
  res["image_spans"] = gc.image_spans(batch)
  res["attn_allowed"] = np.asarray(inter["attn_allowed"])[:b, :length, :length]
  masks["attn_allowed"] = valid[:, :, None]  # pad query rows are meaningless
  if f"{prefix}_labels" in cases:
    res["merged_labels"] = gc.merged_labels(
        batch, cases[f"{prefix}_labels"], cases[f"{prefix}_attention_mask"], cases[f"{prefix}_input_ids"], special
    )
  loss, _ = lm_loss(out["logits"][:b, :length], jnp.asarray(batch["targets"]), jnp.asarray(batch["loss_mask"]))
  res["lm_loss"] = np.asarray(loss)[None]
  if with_images:
    res["t_emb"] = np.asarray(inter["t_emb"])[:b, 0]
    res["c_embeds"] = np.asarray(inter["c_embeds"])[:b, 0]
    res["final_layer_out"] = seq(inter["final_layer_out_everywhere"])
    masks["final_layer_out"] = valid[..., None]
    rows = np.nonzero(batch["image_mask"][:, 0])[0]
    if len(rows):
      res["x_indices"] = rows.astype(np.int64)
      res["x_out"] = gc.nhwc_to_nchw(np.asarray(out["image"])[rows, 0])
      if prefix == "cfg":
        res["x_out_unguided"] = res["x_out"]
        scale = float(_need(cases, "cfg_scale", "cfg")[0])
        res["x_out"] = official_cfg_nchw(res["x_out"], scale)
  return res, masks


def official_cfg_nchw(x_out: np.ndarray, scale: float) -> np.ndarray:
  """The official forward_with_cfg mix on NCHW [cond; uncond] outputs (3 guided channels)."""
  nhwc = jnp.asarray(gc.nchw_to_nhwc(x_out))
  out = diffusion.forward_with_cfg(lambda x, t: nhwc, nhwc, None, scale, mode="official_first3")
  return gc.nhwc_to_nchw(np.asarray(out))


def _q_sample(cases, prefix) -> np.ndarray:
  """x_t = q_sample(x0, t, noise) on the 1000-step chain, NCHW (text rows: zeros in, zeros out)."""
  x0 = _need(cases, f"{prefix}_x0", prefix)
  noise = _need(cases, f"{prefix}_noise", prefix)
  x = _q_sample_jit(
      diffusion.create_gaussian_diffusion(),
      jnp.asarray(gc.nchw_to_nhwc(x0)),
      jnp.asarray(cases[f"{prefix}_t"]),
      jnp.asarray(gc.nchw_to_nhwc(noise)),
  )
  return gc.nhwc_to_nchw(np.asarray(x))


def _loss_terms(cases, prefix, res):
  """Official diffusion.training_losses on our x_out, and the train.py total loss."""
  rows = res["x_indices"]  # res["x_out"] already holds only these rows

  def image_rows(a):
    return jnp.asarray(gc.nchw_to_nhwc(a[rows]))

  terms = _training_losses_jit(
      diffusion.create_gaussian_diffusion(),
      jnp.asarray(gc.nchw_to_nhwc(res["x_out"])),
      image_rows(cases[f"{prefix}_x0"]),
      image_rows(cases[f"{prefix}_x_t"]),
      image_rows(cases[f"{prefix}_noise"]),
      jnp.asarray(cases[f"{prefix}_t"][rows]),
  )
  out = {
      "loss_mse": np.asarray(terms["mse"]),
      "loss_vb": np.asarray(terms["vb"]),
      "loss_terms": np.asarray(terms["loss"]),
  }
  out["total_loss"] = np.asarray(np.mean(out["loss_terms"]) + 0.01 * float(res["lm_loss"][0]))[None]
  return out


@functools.lru_cache(maxsize=None)
def _guided_fn(config: ModelConfig):
  """jit(params, batch, chain, x NHWC, respaced index i, scale) -> (guided output, model t)."""
  model = MonoFormer(config)

  def guided(params, batch, chain, x_nhwc, i, scale):
    t_model = diffusion.model_timesteps(chain, jnp.full((x_nhwc.shape[0],), i, jnp.int32))

    def model_fn(x, t):
      out = model.apply({"params": params}, batch, x[:, None], t[:, None], return_logits=False)
      return out["image"][:, 0]

    return diffusion.forward_with_cfg(model_fn, x_nhwc, t_model, scale), t_model

  return jax.jit(guided)


def _sample_guided(config, params, cases, special, chain):
  """(x, i) -> (guided model output, model t) of the recorded sample prompts at step i."""
  ids = _need(cases, "sample_input_ids", "sample")
  mask = _need(cases, "sample_attention_mask", "sample")
  z = _need(cases, "sample_z", "sample")
  scale = jnp.float32(_need(cases, "cfg_scale", "sample")[0])
  length = gc.merged_length(config, ids, mask, special)
  batch = jax.tree.map(jnp.asarray, gc.build_batch(config, ids, mask, length, special, z))
  guided = functools.partial(_guided_fn(config), params, batch, chain)
  return lambda x, i: guided(x, i, scale)


def _sample_case(config, params, cases, special) -> dict:
  """The official respaced DDPM loop with forward_with_cfg, on the recorded noise.

  Two checks: the free-running loop from sample_z (errors compound with |x| ~ 1e3 on random
  weights, so scored relative to max|ref|) and, teacher-forced, each step's model output from the
  official trajectory's previous sample. The step count is that of the recorded noise.
  """
  step_noise = _need(cases, "sample_noise", "sample")
  steps = len(step_noise)
  chain = diffusion.create_gaussian_diffusion(respacing=str(steps))
  guided = _sample_guided(config, params, cases, special, chain)
  z = cases["sample_z"]
  traj_ref = cases.get("sample_traj")

  x = jnp.asarray(gc.nchw_to_nhwc(z))
  traj, outs, preds, forced, t_models = [], [], [], [], []
  for k in range(steps):
    i = steps - 1 - k
    out, t_model = guided(x, i)
    t_vec = jnp.full((x.shape[0],), i, jnp.int32)
    x, pred = _ddpm_step_jit(chain, out, x, t_vec, jnp.asarray(gc.nchw_to_nhwc(step_noise[k])))
    traj.append(gc.nhwc_to_nchw(np.asarray(x)))
    outs.append(gc.nhwc_to_nchw(np.asarray(out)))
    preds.append(gc.nhwc_to_nchw(np.asarray(pred.pred_xstart)))
    t_models.append(np.asarray(t_model))
    if traj_ref is not None:
      prev = z if k == 0 else traj_ref[k - 1]
      forced.append(gc.nhwc_to_nchw(np.asarray(guided(jnp.asarray(gc.nchw_to_nhwc(prev)), i)[0])))
  res = {
      "sample_traj": np.stack(traj),
      "sample_model_out": np.stack(outs),
      "sample_pred_xstart": np.stack(preds),
      "sample_final": traj[-1],
      "sample_t_model": np.stack(t_models).astype(np.int64),
      "sample_t_index": np.arange(steps - 1, -1, -1, dtype=np.int64),
      "sample_timestep_map": np.asarray(chain.timestep_map).astype(np.int64),
  }
  if forced:
    res["sample_model_out_teacher_forced"] = np.stack(forced)
  return res


def compute_all(path: str) -> tuple[dict, dict, dict]:
  """Runs every case of a golden dir: (ours by golden name, valid masks, refs as loaded)."""
  config, params, cases, special = gc.load_golden_dir(path)
  check_inputs(cases)
  ours, masks = {}, {}
  prefixes = [p for p in gc.case_names(cases) if p != "sample"]
  # One padded shape for every case: the forward compiles once.
  shape = (
      max([len(cases[f"{p}_input_ids"]) for p in prefixes] or [1]),
      max(
          [
              gc.merged_length(config, cases[f"{p}_input_ids"], _need(cases, f"{p}_attention_mask", p), special)
              for p in prefixes
          ]
          or [1]
      ),
  )

  def add(prefix, res, valid):
    for k, v in res.items():
      ours[f"{prefix}_{k}"] = v
      if k in valid:
        masks[f"{prefix}_{k}"] = valid[k]

  for prefix in prefixes:
    res, valid = _model_case(config, params, cases, special, prefix, shape)
    if f"{prefix}_x0" in cases:
      res["x_t"] = _q_sample(cases, prefix)
    if "x_indices" in res and f"{prefix}_x0" in cases:
      res.update(_loss_terms(cases, prefix, res))
    add(prefix, res, valid)
  if "text" in prefixes:
    # The official forward_wo_image: the text-only path (no image arguments at all).
    res, valid = _model_case(config, params, cases, special, "text", shape, with_images=False)
    add(
        "text",
        {"logits_wo_image": res["logits"], "lm_loss_wo_image": res["lm_loss"]},
        {"logits_wo_image": valid["logits"]},
    )
  if "sample" in gc.case_names(cases):
    ours.update(_sample_case(config, params, cases, special))
  if config.use_pos_embed:
    ours["pos_embed"] = sincos_pos_embed_2d(config.hidden_size, *config.grid_size)
  return ours, masks, cases


def compare(ours: dict, masks: dict, refs: dict, tolerance: float = TOLERANCE) -> list[tuple]:
  """[(name, max abs err, allowed, ok)]: every array we computed that has a reference, and every
  output of `refs` we did not compute (a failure, error inf)."""
  rows = []
  for name in sorted(ours):
    ref_name = ALIASES.get(name, name)
    if ref_name not in refs:
      continue
    ref = np.asarray(refs[ref_name])
    got = np.asarray(ours[name])
    if got.shape != ref.shape:
      rows.append((name, float("inf"), 0.0, False))
      continue
    m = np.broadcast_to(masks[name], ref.shape) if name in masks else np.ones(ref.shape, bool)
    if ref.dtype == bool or np.issubdtype(ref.dtype, np.integer):
      if got.dtype != bool and not np.issubdtype(got.dtype, np.integer):
        rows.append((name, float("inf"), 0.0, False))
        continue
      ok = bool(np.all((got.astype(np.int64) == ref.astype(np.int64)) | ~m))
      rows.append((name, 0.0 if ok else 1.0, 0.0, ok))
      continue
    err = float(np.max(np.abs(got - ref) * m)) if ref.size else 0.0
    allowed = tolerance * max(1.0, float(np.max(np.abs(ref) * m)) if ref.size else 0.0)
    rows.append((name, err, allowed, bool(err <= allowed)))
  for name in sorted(output_names(refs) - set(ours)):
    rows.append((name, float("inf"), 0.0, False))
  return rows


def scored_references(rows: list[tuple]) -> set:
  """The reference arrays that `compare` rows scored (computed, whatever the result)."""
  return {ALIASES.get(r[0], r[0]) for r in rows if r[1] != float("inf") or r[3]}


def write_dump(path: str, ours: dict) -> None:
  """Every array we computed, under the golden names, shapes and layouts."""
  np.savez(path, **ours)


def run(
    path: str, dump: str | None = None, tolerance: float = TOLERANCE, out=None
) -> tuple[int, dict, dict, dict, list]:
  """The command: (exit status, ours, masks, refs, rows); prints one line per array to `out`
  (default: stdout)."""
  out = sys.stdout if out is None else out
  ours, masks, refs = compute_all(path)
  rows = compare(ours, masks, refs, tolerance)
  width = max(len(r[0]) for r in rows)
  for name, err, allowed, ok in rows:
    note = "" if np.isfinite(err) else "  (not computed or wrong shape/dtype)"
    print(f"{name:<{width}}  max|err|={err:.3e}  allowed={allowed:.3e}  {'ok' if ok else 'FAIL'}{note}", file=out)
  failed = [r[0] for r in rows if not r[3]]
  print(f"{len(rows) - len(failed)}/{len(rows)} arrays within tolerance", file=out)
  if dump:
    write_dump(dump, ours)
  return (1 if failed else 0), ours, masks, refs, rows


def define_flags(fv, argv=()):
  del argv  # no config file: the flags alone
  flags.DEFINE_string("dump", None, "Write every array we computed to this .npz.", flag_values=fv)
  flags.DEFINE_float("tolerance", TOLERANCE, "|ours - ref| <= tolerance * max(1, max|ref|).", flag_values=fv)


def _run_command(fv, args) -> int:
  if len(args) != 1:
    raise cli.UsageError("give one golden directory (config.json, model.safetensors, cases.npz)")
  return run(args[0], fv.dump, fv.tolerance)[0]


main = cli.entry_point(__doc__, define_flags, _run_command)


if __name__ == "__main__":
  cli.run_as_script(main)
