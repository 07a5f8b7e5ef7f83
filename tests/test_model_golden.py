"""Parity with the official MonoFormer code: every golden array within 1e-4 * max(1, max|ref|).

The golden directories come from the official PyTorch code; a third directory, of other sizes, is
written here from an independent reference (tests/official_reference.py: transformers'
LlamaForCausalLM for the decoder, float64 re-derivations of the image path and the sampler).
"""

import io
import json
import re
import shutil

import numpy as np
import pytest

from monoformer_jax.convert import golden_cases
from monoformer_jax.tools import check_official
from tests import official_reference

# The inputs of each case, as the golden README describes them; every other array of cases.npz is
# an output the port must reproduce.
GOLDEN_INPUTS = {
    "special_token_ids",
    "text_input_ids",
    "text_attention_mask",
    "text_labels",
    "text_t",
    "train_input_ids",
    "train_attention_mask",
    "train_labels",
    "train_t",
    "train_x0",
    "train_noise",
    "mixed_input_ids",
    "mixed_attention_mask",
    "mixed_labels",
    "mixed_t",
    "mixed_x0",
    "mixed_noise",
    "mixed_is_image",
    "cfg_input_ids",
    "cfg_attention_mask",
    "cfg_t",
    "cfg_x_t",
    "cfg_scale",
    "sample_input_ids",
    "sample_attention_mask",
    "sample_seed",
    "sample_z",
    "sample_noise",
}
TOL = 1e-4


def _run_tool(path, dump):
  out = io.StringIO()
  rc, ours, masks, refs, rows = check_official.run(str(path), str(dump), out=out)
  return rc, out.getvalue(), rows, ours, masks, refs


def _printed(text):
  """{array name: 'ok' | 'FAIL'} from the tool's table."""
  return {
      m.group(1): m.group(2) for m in re.finditer(r"^(\S+)\s+max\|err\|=\S+\s+allowed=\S+\s+" r"(ok|FAIL)", text, re.M)
  }


def _valid(name, refs):
  """Our own padding mask for re-scoring a dump: (B, L_merged) prefixes of sequence arrays."""
  prefix = name.split("_")[0]
  merged = refs.get(f"{prefix}_merged_attention_mask")
  ref = refs[name]
  if merged is not None and ref.ndim >= 2 and ref.shape[:2] == merged.shape:
    return np.broadcast_to(merged.reshape(merged.shape + (1,) * (ref.ndim - 2)), ref.shape)
  return np.ones(ref.shape, bool)


@pytest.fixture(scope="module", params=["model_adaln", "model_tok"])
def golden(request, testdata, tmp_path_factory):
  dump = tmp_path_factory.mktemp(request.param) / "ours.npz"
  rc, text, rows, ours, masks, refs = _run_tool(testdata / request.param, dump)
  with np.load(dump) as z:
    dumped = {k: z[k] for k in z.files}
  return request.param, rc, text, rows, ours, masks, refs, dumped


def test_every_golden_output_matches(golden):
  name, rc, text, rows, *_ = golden
  failed = [(r[0], r[1], r[2]) for r in rows if not r[3]]
  assert not failed, f"{name}: {failed}"
  assert rc == 0 and "FAIL" not in text


def test_every_output_is_computed_and_scored(golden):
  """FULL coverage: the golden arrays minus the README's inputs are exactly what was scored."""
  name, _, text, rows, _, _, refs, _ = golden
  outputs = set(refs) - GOLDEN_INPUTS
  assert GOLDEN_INPUTS <= set(refs), sorted(GOLDEN_INPUTS - set(refs))
  assert check_official.output_names(refs) == outputs
  assert check_official.scored_references(rows) == outputs, name
  printed = _printed(text)
  assert outputs <= set(printed)
  for must in (
      "train_merged_labels",
      "mixed_image_spans",
      "text_image_spans",
      "text_lm_loss_wo_image",
      "pos_embed",
      "train_x_t",
      "sample_t_index",
      "cfg_final_layer_out",
      "text_final_layer_out",
  ):
    assert must in outputs and printed[must] == "ok", must


def test_final_layer_out_is_scored_at_every_merged_position(golden):
  _, _, _, _, ours, masks, refs, _ = golden
  for prefix in ("text", "train", "mixed", "cfg"):
    name = f"{prefix}_final_layer_out"
    mask = np.broadcast_to(masks[name], refs[name].shape)
    np.testing.assert_array_equal(mask, _valid(name, refs))
    text_pos = refs[f"{prefix}_merged_attention_mask"] & ~refs[f"{prefix}_gen_mask"]
    assert text_pos.any()
    err = np.abs(ours[name] - refs[name])[text_pos].max()
    assert err <= TOL * max(1.0, np.abs(refs[name][text_pos]).max())


def test_dump_holds_every_output_in_the_golden_layout(golden):
  """Every output under its golden name, shape and dtype kind; values re-scored here."""
  _, _, _, _, _, _, refs, dumped = golden
  for name in set(refs) - GOLDEN_INPUTS:
    got, ref = dumped[name], refs[name]
    assert got.shape == ref.shape, (name, got.shape, ref.shape)
    valid = _valid(name, refs)
    if ref.dtype == bool or np.issubdtype(ref.dtype, np.integer):
      assert got.dtype == bool or np.issubdtype(got.dtype, np.integer), (name, got.dtype)
      np.testing.assert_array_equal(got.astype(np.int64)[valid], ref.astype(np.int64)[valid], err_msg=name)
    else:
      assert got.dtype == np.float32, (name, got.dtype)
      allowed = TOL * max(1.0, float(np.abs(ref[valid]).max()))
      assert np.abs(got - ref)[valid].max() <= allowed, name


def test_compare_detects_wrong_missing_and_mistyped_arrays(golden):
  _, _, _, _, ours, masks, refs, _ = golden
  bad = dict(ours)
  bad["train_x_out"] = ours["train_x_out"] * (1 + 1e-3) + 1e-3
  bad["mixed_merged_labels"] = ours["mixed_merged_labels"].copy()
  bad["mixed_merged_labels"][0, 1] += 1
  bad["train_image_spans"] = ours["train_image_spans"].astype(np.float32)
  del bad["text_lm_loss_wo_image"]
  rows = {r[0]: r for r in check_official.compare(bad, masks, refs)}
  for name in ("train_x_out", "mixed_merged_labels", "train_image_spans", "text_lm_loss_wo_image"):
    assert not rows[name][3], name
  assert sum(not r[3] for r in rows.values()) == 4


def test_tool_errors_are_named(tmp_path, capsys):
  assert check_official.main([str(tmp_path / "missing")]) == 2
  assert "not a golden model directory" in capsys.readouterr().err


# A directory of other sizes: every size field differs from the golden ones, patch 4 on a 12x12x3
# latent (a 3x3 grid, 9 image tokens), the t-token variant, a guidance scale other than 4.
SIZES = dict(
    layers=3,
    hidden=48,
    ffn=100,
    heads=6,
    kv_heads=3,
    vocab=157,
    eps=1e-6,
    rope_theta=5000.0,
    image_size=96,
    channels=3,
    patch=4,
    t_embed="add_before_image_tokens",
    bidirectional=True,
    cfg_scale=2.5,
)


@pytest.fixture(scope="module")
def resized(tmp_path_factory, module_seed):
  path = tmp_path_factory.mktemp("resized") / "model_resized"
  official_reference.write_golden_dir(str(path), SIZES, seed=module_seed("reference weights"))
  return path


def _copy(src, dst, **changes):
  shutil.copytree(src, dst)
  with np.load(src / "cases.npz") as z:
    cases = {k: z[k] for k in z.files}
  for k, v in changes.items():
    if v is None:
      del cases[k]
    else:
      cases[k] = v
  np.savez(dst / "cases.npz", **cases)
  return dst


def test_other_sizes_end_to_end(resized, testdata, tmp_path, capsys):
  with open(resized / "config.json") as f:
    cfg = json.load(f)
  with open(testdata / "model_adaln" / "config.json") as f:
    gold = json.load(f)
  for key in (
      "num_hidden_layers",
      "hidden_size",
      "intermediate_size",
      "num_attention_heads",
      "num_key_value_heads",
      "vocab_size",
      "image_size",
      "patch_size",
      "in_channels",
  ):
    assert cfg[key] != gold[key], key
  with np.load(resized / "cases.npz") as z:
    refs = {k: z[k] for k in z.files}
  with np.load(testdata / "model_adaln" / "cases.npz") as z:
    gold_names = set(z.files)

  def layerless(names):
    return {re.sub(r"layer\d+_output", "layerN_output", n) for n in names}

  assert layerless(refs) == layerless(gold_names)  # the same format
  assert "text_layer2_output" in refs
  dump = tmp_path / "ours.npz"
  assert check_official.main([str(resized), "--dump", str(dump)]) == 0
  printed = _printed(capsys.readouterr().out)
  outputs = set(refs) - GOLDEN_INPUTS
  assert outputs <= set(printed) and all(printed[n] == "ok" for n in outputs)
  with np.load(dump) as z:
    for name in outputs:
      assert z[name].shape == refs[name].shape, name


def test_perturbed_copy_of_other_sizes_fails(resized, tmp_path, capsys):
  with np.load(resized / "cases.npz") as z:
    layer = z["train_layer2_output"].copy()
    labels = z["mixed_merged_labels"].copy()
    logits = z["text_logits"].copy()
    valid = z["text_merged_attention_mask"]
  # Just over the tolerance at one valid position.
  layer[1, 4, 7] += 3 * TOL * max(1.0, float(np.abs(layer).max()))
  labels[1, 3] += 1
  pad = np.argwhere(~valid)[0]
  logits[pad[0], pad[1]] += 100.0  # a padding position: not scored
  bad = _copy(resized, tmp_path / "bad", train_layer2_output=layer, mixed_merged_labels=labels, text_logits=logits)
  assert check_official.main([str(bad)]) == 1
  printed = _printed(capsys.readouterr().out)
  assert {n for n, s in printed.items() if s == "FAIL"} == {"train_layer2_output", "mixed_merged_labels"}
  assert printed["text_logits"] == "ok"


def test_missing_guidance_scale_is_an_error(resized, tmp_path, capsys):
  no_cfg = _copy(resized, tmp_path / "no_scale", cfg_scale=None)
  assert check_official.main([str(no_cfg)]) == 2
  err = capsys.readouterr().err
  assert "'cfg_scale'" in err and "cfg and sample cases" in err
  config, params, cases, special = golden_cases.load_golden_dir(str(no_cfg))
  with pytest.raises(ValueError, match="no array 'cfg_scale' .*sample case"):
    check_official._sample_case(config, params, cases, special)  # pylint: disable=protected-access


@pytest.mark.parametrize("name", ["model_adaln", "model_tok"])
def test_the_independent_reference_reproduces_the_official_vectors(name, testdata):
  """The reference that writes the other-sizes directory, run on the official inputs."""
  path = testdata / name
  ref = official_reference.Reference(str(path))
  with np.load(path / "cases.npz") as z:
    cases = {k: z[k] for k in z.files}
  checked = set()

  def check(key, got):
    want = cases[key]
    assert got.shape == want.shape, key
    valid = _valid(key, cases)
    if want.dtype == bool or np.issubdtype(want.dtype, np.integer):
      np.testing.assert_array_equal(got[valid], want[valid], err_msg=key)
    else:
      allowed = TOL * max(1.0, float(np.abs(want[valid]).max()))
      assert np.abs(got - want)[valid].max() <= allowed, key
    checked.add(key)

  for prefix in ("text", "train", "mixed", "cfg"):
    x_t = cases.get(f"{prefix}_x_t", np.zeros((len(cases[f"{prefix}_t"]), 4, 8, 8)))
    if prefix == "cfg":
      out, guided = ref.forward_with_cfg(
          cases["cfg_input_ids"], cases["cfg_attention_mask"], x_t, cases["cfg_t"], float(cases["cfg_scale"][0])
      )
      check("cfg_x_out", guided)
      out["x_out_unguided"] = out.pop("x_out")
    else:
      out = ref.forward(
          cases[f"{prefix}_input_ids"],
          cases[f"{prefix}_attention_mask"],
          x_t,
          cases[f"{prefix}_t"],
          cases.get(f"{prefix}_labels"),
      )
    out["lm_loss"] = np.asarray(out.get("lm_loss", 0.0), np.float32)[None]
    for k, v in out.items():
      if f"{prefix}_{k}" in cases:
        check(f"{prefix}_{k}", v)
  logits, loss = ref.forward_wo_image(cases["text_input_ids"], cases["text_attention_mask"])
  check("text_logits_wo_image", logits)
  check("text_lm_loss_wo_image", loss[None])
  check("pos_embed", ref.pos_embed().astype(np.float32))
  chain = official_reference.respaced_chain(len(cases["sample_noise"]))
  check("sample_timestep_map", chain["timestep_map"])
  for k in (0, 7, 19):  # teacher-forced steps of the official loop
    i = len(cases["sample_noise"]) - 1 - k
    x = cases["sample_z"] if k == 0 else cases["sample_traj"][k - 1]
    x_next, pred = official_reference.p_sample(chain, cases["sample_model_out"][k], x, i, cases["sample_noise"][k])
    np.testing.assert_allclose(
        x_next, cases["sample_traj"][k], rtol=0, atol=TOL * max(1.0, np.abs(cases["sample_traj"][k]).max())
    )
    np.testing.assert_allclose(
        pred, cases["sample_pred_xstart"][k], rtol=0, atol=TOL * max(1.0, np.abs(cases["sample_pred_xstart"][k]).max())
    )
  assert len(checked) >= 70, sorted(checked)
