"""Checks our model against golden vectors of the official MonoFormer code.

    python -m monoformer_jax.tools.check_official DIR [--dump FILE.npz]

DIR has the layout of tests/testdata/model_adaln (config.json, model.safetensors, cases.npz; see
its README.txt). Every case found (text, train, mixed, cfg, sample) is run through our port and
every output compared with |ours - ref| <= 1e-4 * max(1, max|ref|); padding positions (outside
`*_merged_attention_mask`) are not scored. Exit status 1 if any array misses the tolerance.
Nothing is specialised to the golden sizes: the model is built from DIR/config.json.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

from monoformer_jax.convert import golden_cases as gc
from monoformer_jax.model import inputs as inputs_lib
from monoformer_jax.model.monoformer import MonoFormer
from monoformer_jax.train.losses import lm_loss

TOLERANCE = 1e-4


def _run_model(config, params, batch, images, timesteps):
  model = MonoFormer(config)
  out, state = model.apply({"params": params}, batch, images, timesteps,
                           mutable=["intermediates"])
  inter = {k: v[0] for k, v in state["intermediates"].items()}
  return out, inter


def _model_case(config, params, cases, special, prefix, with_images=True):
  """Runs one case; returns ({golden name: our array}, {golden name: valid-position mask})."""
  merged_mask = cases[f"{prefix}_merged_attention_mask"]
  b, length = merged_mask.shape
  x_t = cases.get(f"{prefix}_x_t")
  if prefix == "cfg":
    # Official forward_with_cfg: the second half of x_t is replaced by the first half.
    half = len(x_t) // 2
    x_t = np.concatenate([x_t[:half], x_t[:half]])
  if x_t is None:
    x_t = np.random.default_rng(0).normal(size=(b, config.image_channels, config.image_height,
                                                config.image_width)).astype(np.float32)
  batch = gc.build_batch(config, cases[f"{prefix}_input_ids"], cases[f"{prefix}_attention_mask"],
                         length, special, x_t)
  images = gc.nchw_to_nhwc(x_t)[:, None].astype(np.float32)
  timesteps = cases[f"{prefix}_t"].astype(np.float32)[:, None]
  out, inter = _run_model(config, params, jax.tree.map(jnp.asarray, batch),
                          jnp.asarray(images) if with_images else None,
                          jnp.asarray(timesteps) if with_images else None)
  res, valid = {}, {}
  seq_mask = merged_mask[..., None]
  for name, key in (("merged_embeds", "merged_embeds"), ("layer0_input", "layer0_input"),
                    ("final_hidden", "final_hidden"), ("logits", "logits")):
    if key == "logits" or key in inter:
      res[name] = np.asarray(out["logits"] if key == "logits" else inter[key])
      valid[name] = seq_mask
  for i in range(config.num_layers):
    res[f"layer{i}_output"] = np.asarray(inter[f"layer{i}_output"])
    valid[f"layer{i}_output"] = seq_mask
  res["gen_mask"] = batch["kinds"] == inputs_lib.KIND_IMAGE
  res["text_mask"] = (batch["kinds"] == inputs_lib.KIND_TEXT) & (batch["segment_ids"] > 0)
  res["merged_attention_mask"] = batch["segment_ids"] > 0
  from monoformer_jax.model.mask import attention_mask, token_meta
  order = np.broadcast_to(np.arange(length), (b, length))
  meta = token_meta(batch["segment_ids"], batch["kinds"], batch["patch_index"],
                    config.num_patches, order)
  res["attn_allowed"] = np.asarray(attention_mask(meta, meta, config.bidirectional_image))
  valid["attn_allowed"] = merged_mask[:, :, None]
  if with_images:
    res["t_emb"] = np.asarray(inter["t_emb"])[:, 0]
    res["c_embeds"] = np.asarray(inter["c_embeds"])[:, 0]
    rows = np.nonzero(batch["image_mask"][:, 0])[0]
    res["x_indices"] = rows
    res["x_out"] = gc.nhwc_to_nchw(np.asarray(out["image"])[rows, 0])
    if prefix == "cfg":
      res["x_out_unguided"] = res["x_out"]
      res["x_out"] = official_cfg_nchw(res["x_out"], float(cases["cfg_scale"][0]))
    # final_layer_out is scored on image positions (the head's output elsewhere is never used).
    ref_shape = cases[f"{prefix}_final_layer_out"].shape
    flo = np.zeros(ref_shape, np.float32)
    fmask = np.zeros(ref_shape[:2] + (1,), bool)
    ours = np.asarray(inter["final_layer_out"])
    pos = gc.image_positions(batch)
    for r in rows:
      flo[r, pos[r]] = ours[r, :config.num_patches]
      fmask[r, pos[r]] = True
    res["final_layer_out"], valid["final_layer_out"] = flo, fmask
  targets = jnp.asarray(batch["targets"])
  loss, _ = lm_loss(out["logits"], targets, jnp.asarray(batch["loss_mask"]))
  if f"{prefix}_lm_loss" in cases:
    res["lm_loss"] = np.asarray(loss)[None]
  return res, valid, out


def official_cfg_nchw(x_out: np.ndarray, scale: float) -> np.ndarray:
  """The official forward_with_cfg mix on NCHW [cond; uncond] outputs (3 guided channels)."""
  from monoformer_jax.diffusion import forward_with_cfg  # pylint: disable=import-outside-toplevel
  nhwc = jnp.asarray(gc.nchw_to_nhwc(x_out))
  out = forward_with_cfg(lambda x, t: nhwc, nhwc, None, scale, mode="official_first3")
  return gc.nhwc_to_nchw(np.asarray(out))


def _loss_terms(cases, prefix, res, lm_loss_value):
  """Official diffusion.training_losses on our x_out, and the train.py total loss."""
  from monoformer_jax import diffusion  # pylint: disable=import-outside-toplevel
  rows = res["x_indices"]  # res["x_out"] already holds only these rows

  def image_rows(a):
    return jnp.asarray(gc.nchw_to_nhwc(a[rows]))

  terms = diffusion.training_losses(
      diffusion.create_gaussian_diffusion(), jnp.asarray(gc.nchw_to_nhwc(res["x_out"])),
      image_rows(cases[f"{prefix}_x0"]), image_rows(cases[f"{prefix}_x_t"]),
      image_rows(cases[f"{prefix}_noise"]), jnp.asarray(cases[f"{prefix}_t"][rows]))
  out = {"loss_mse": np.asarray(terms["mse"]), "loss_vb": np.asarray(terms["vb"]),
         "loss_terms": np.asarray(terms["loss"])}
  out["total_loss"] = np.asarray(np.mean(out["loss_terms"]) + 0.01 * lm_loss_value)[None]
  return out


def _sample_case(config, params, cases, special) -> dict:
  """The official 20-step respaced DDPM loop with forward_with_cfg, on the recorded noise.

  Two checks: the free-running loop from sample_z (errors compound with |x| ~ 1e3 on random
  weights, so scored relative to max|ref|) and, teacher-forced, each step's model output from the
  official trajectory's previous sample.
  """
  from monoformer_jax import diffusion  # pylint: disable=import-outside-toplevel
  from monoformer_jax.diffusion.samplers import ddpm_step  # pylint: disable=import-outside-toplevel
  steps = len(cases["sample_t_index"])
  chain = diffusion.create_gaussian_diffusion(respacing=str(steps))
  ids, mask = cases["sample_input_ids"], cases["sample_attention_mask"]
  length = int(mask.sum(1).max()) + config.num_patches + int(config.has_t_token) - 1
  z = cases["sample_z"]
  batch = gc.build_batch(config, ids, mask, length, special, z)
  batch = jax.tree.map(jnp.asarray, batch)
  model = MonoFormer(config)
  scale = float(cases.get("cfg_scale", np.array([4.0]))[0])

  @jax.jit
  def guided(x_nhwc, i):
    t_model = diffusion.model_timesteps(chain, jnp.full((x_nhwc.shape[0],), i, jnp.int32))

    def model_fn(x, t):
      out = model.apply({"params": params}, batch, x[:, None], t[:, None], return_logits=False)
      return out["image"][:, 0]
    return diffusion.forward_with_cfg(model_fn, x_nhwc, t_model, scale), t_model

  x = jnp.asarray(gc.nchw_to_nhwc(z))
  traj, outs, preds, forced, t_models = [], [], [], [], []
  for k in range(steps):
    i = steps - 1 - k
    out, t_model = guided(x, i)
    t_vec = jnp.full((x.shape[0],), i, jnp.int32)
    x, pred = ddpm_step(chain, out, x, t_vec, jnp.asarray(gc.nchw_to_nhwc(cases["sample_noise"][k])))
    traj.append(gc.nhwc_to_nchw(np.asarray(x)))
    outs.append(gc.nhwc_to_nchw(np.asarray(out)))
    preds.append(gc.nhwc_to_nchw(np.asarray(pred.pred_xstart)))
    t_models.append(np.asarray(t_model))
    prev = z if k == 0 else cases["sample_traj"][k - 1]
    forced.append(gc.nhwc_to_nchw(np.asarray(guided(jnp.asarray(gc.nchw_to_nhwc(prev)), i)[0])))
  return {"sample_traj": np.stack(traj), "sample_model_out": np.stack(outs),
          "sample_pred_xstart": np.stack(preds), "sample_final": traj[-1],
          "sample_t_model": np.stack(t_models).astype(np.int64),
          "sample_timestep_map": np.asarray(chain.timestep_map).astype(np.int64),
          "sample_model_out_teacher_forced": np.stack(forced)}


def compute_all(path: str) -> tuple[dict, dict, dict]:
  """Runs every case of a golden dir: (ours by golden name, valid masks, refs)."""
  config, params, cases, special = gc.load_golden_dir(path)
  ours, masks = {}, {}
  for prefix in gc.case_names(cases):
    if prefix == "sample":
      ours.update(_sample_case(config, params, cases, special))
      continue
    res, valid, _ = _model_case(config, params, cases, special, prefix)
    if f"{prefix}_loss_terms" in cases:
      res.update(_loss_terms(cases, prefix, res, float(res.get("lm_loss", [0.0])[0])))
    for k, v in res.items():
      ours[f"{prefix}_{k}"] = v
      if k in valid:
        masks[f"{prefix}_{k}"] = valid[k]
  if "text_logits_wo_image" in cases:
    res, valid, _ = _model_case(config, params, cases, special, "text", with_images=False)
    ours["text_logits_wo_image"] = res["logits"]
    masks["text_logits_wo_image"] = valid["logits"]
  if "sample_model_out" in cases:
    cases["sample_model_out_teacher_forced"] = cases["sample_model_out"]
  return ours, masks, cases


def compare(ours: dict, masks: dict, refs: dict, tolerance: float = TOLERANCE) -> list[tuple]:
  """[(name, max abs err, allowed, ok)] for every array we computed that has a reference."""
  rows = []
  for name in sorted(ours):
    if name not in refs:
      continue
    ref = np.asarray(refs[name])
    got = np.asarray(ours[name])
    if got.shape != ref.shape:
      rows.append((name, float("inf"), 0.0, False))
      continue
    if ref.dtype == bool or np.issubdtype(ref.dtype, np.integer):
      if name in masks:
        m = np.broadcast_to(masks[name], ref.shape)
        ok = bool(np.all((got == ref) | ~m))
      else:
        ok = bool(np.array_equal(got.astype(np.int64), ref.astype(np.int64)))
      rows.append((name, 0.0 if ok else 1.0, 0.0, ok))
      continue
    m = np.broadcast_to(masks[name], ref.shape) if name in masks else np.ones(ref.shape, bool)
    err = float(np.max(np.abs(got - ref) * m)) if ref.size else 0.0
    allowed = tolerance * max(1.0, float(np.max(np.abs(ref) * m)) if ref.size else 0.0)
    rows.append((name, err, allowed, err <= allowed))
  return rows


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
  parser.add_argument("dir", help="golden directory (config.json, model.safetensors, cases.npz)")
  parser.add_argument("--dump", help="write every array we computed to this .npz")
  parser.add_argument("--tolerance", type=float, default=TOLERANCE)
  args = parser.parse_args(argv)
  try:
    ours, masks, refs = compute_all(args.dir)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  rows = compare(ours, masks, refs, args.tolerance)
  width = max(len(r[0]) for r in rows)
  for name, err, allowed, ok in rows:
    print(f"{name:<{width}}  max|err|={err:.3e}  allowed={allowed:.3e}  {'ok' if ok else 'FAIL'}")
  failed = [r[0] for r in rows if not r[3]]
  print(f"{len(rows) - len(failed)}/{len(rows)} arrays within tolerance")
  if args.dump:
    np.savez(args.dump, **ours)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
