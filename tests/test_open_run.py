"""Opening a run reads what the job uses: the weights alone (never the optimizer's arrays), in the
dtype asked, sharded over a mesh when asked; and a run exports to weights-only folders (ours,
the official layout, a transformers LLaMA) that open and draw the same images."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from orbax.checkpoint._src.serialization import jax_array_handlers

from monoformer_jax import sample
from monoformer_jax.convert import checkpoints as convert_checkpoints
from monoformer_jax.inference import InferenceError, InferenceModel
from monoformer_jax.model.monoformer import MonoFormer
from monoformer_jax.run import checkpoints as ckpt_lib
from monoformer_jax.run import open as open_lib
from monoformer_jax.run import sharding as sharding_lib
from monoformer_jax.run import state as state_lib
from monoformer_jax.run.config import model_config_from, read_run_config
from monoformer_jax.sampling.decode import text_batch
from monoformer_jax.tools import export as export_tool
from monoformer_jax.train.init_from import load_init_params
from tests.helpers import random_params, shared_tiny_run

OPTIONS = dict(num_steps=3, guidance_scale=2.0, seed=0)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  return str(shared_tiny_run(tmp_path_factory))


@pytest.fixture(scope="module")
def drawn(run_dir):
  """The run's images and greedy text on one device, float32: what every other form must give."""
  model = InferenceModel.from_workdir(run_dir)
  images, _ = model.sample_classes([0, 3, 7], 1, **OPTIONS)
  text = model.generate_text(["The"], max_new_tokens=6, greedy=True)
  return images, text


@pytest.fixture
def reads(monkeypatch):
  """The names of the arrays orbax reads from storage while the test runs."""
  names = []
  original = jax_array_handlers.ArrayHandler.deserialize

  async def spy(self, infos, args=None):
    names.extend(str(info.name) for info in infos)
    return await original(self, infos, args)

  monkeypatch.setattr(jax_array_handlers.ArrayHandler, "deserialize", spy)
  return names


def _files(folder) -> dict:
  return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns for d, _, names in os.walk(folder) for f in names}


def test_a_sampling_open_reads_the_weights_alone(run_dir, reads):
  before = _files(run_dir)
  config = read_run_config(run_dir)
  tokenizer = open_lib.load_run_tokenizer(run_dir)
  model_config = model_config_from(config, tokenizer)
  mesh = open_lib.one_device_mesh()
  rules = sharding_lib.rules_from_config(config.logical_axis_rules)
  abstract, shardings = state_lib.state_shardings(model_config, state_lib.make_optimizer(config.optimizer), mesh, rules)
  full = ckpt_lib.Checkpointer(run_dir, async_save=False, read_only=True)
  _, state, _ = full.restore_latest(ckpt_lib.abstract_with_shardings(abstract, shardings))
  full.close()
  assert any(n.startswith("opt_state.") for n in reads)  # the spy sees what a resume reads
  for use_ema, name in ((None, "ema_params"), (False, "params")):
    reads.clear()
    run = open_lib.open_run(run_dir, use_ema=use_ema)
    assert reads and {n.split(".")[0] for n in reads} == {name}, sorted(set(reads))[:5]
    want = state.ema_params if name == "ema_params" else state.params
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), run.params, want)
    assert run.weights == ("raw" if use_ema is False else "ema")
  reads.clear()
  half = open_lib.open_run(run_dir, dtype="bfloat16")
  assert {n.split(".")[0] for n in reads} == {"ema_params"}
  jax.tree.map(
      lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b).astype(jnp.bfloat16)),
      half.params,
      state.ema_params,
  )
  assert _files(run_dir) == before  # reading wrote nothing


def test_sharded_draws_equal_the_one_device_draw(run_dir, drawn):
  model = InferenceModel.from_workdir(run_dir, mesh="fsdp=4,tensor=2")
  assert model.mesh.shape == {"data": 1, "fsdp": 4, "tensor": 2}
  kernel = model.params["layers_0"]["mlp"]["gate_proj"]["kernel"]
  assert kernel.sharding.shard_shape(kernel.shape) == (kernel.shape[0] // 4, kernel.shape[1] // 2)
  images, _ = model.sample_classes([0, 3, 7], 1, **OPTIONS)
  # Sharded matmuls add their partial sums in another order: float32 rounding, no more.
  np.testing.assert_allclose(images, drawn[0], rtol=0, atol=1e-5 * np.abs(drawn[0]).max())
  assert model.generate_text(["The"], max_new_tokens=6, greedy=True) == drawn[1]
  with pytest.raises(InferenceError, match="tensor=3 does not divide the model's 4 attention heads"):
    InferenceModel.from_workdir(run_dir, mesh="data=2,tensor=3")


def test_export_round_trip_draws_the_same_images(run_dir, drawn, tmp_path, capsys):
  out = tmp_path / "exported"
  assert export_tool.main([f"--workdir={run_dir}", f"--out={out}"]) == 0
  record = json.loads((out / "export.json").read_text())
  assert record["weights"] == "ema" and record["dtype"] == "float32" and record["step"] == 6
  assert sorted(os.listdir(out)) == [
      "class_names.json",
      "config.json",
      "export.json",
      "tokenizer",
      "weights.safetensors",
  ]
  # The folder is the weights plus the tokenizer plus a few KB.
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(InferenceModel.from_workdir(str(out)).params))
  sizes = {name: os.path.getsize(out / name) for name in os.listdir(out) if name != "tokenizer"}
  tokenizer_bytes = os.path.getsize(out / "tokenizer" / "tokenizer.model")
  assert record["weight_bytes"] == 4 * n_params
  assert sum(sizes.values()) - record["weight_bytes"] < 24_000, sizes
  # Bit for bit in float32, through the command and through the API.
  model = InferenceModel.from_workdir(str(out))
  images, _ = model.sample_classes([0, 3, 7], 1, **OPTIONS)
  np.testing.assert_array_equal(images, drawn[0])
  assert model.generate_text(["The"], max_new_tokens=6, greedy=True) == drawn[1]
  capsys.readouterr()
  for source, name in ((run_dir, "run"), (str(out), "export")):
    flags = ["--classes=0,3", "--num_per_class=1", "--num_steps=3", f"--out={tmp_path}/{name}.npz"]
    assert sample.main([f"--workdir={source}", *flags]) == 0
  np.testing.assert_array_equal(np.load(tmp_path / "run.npz")["images"], np.load(tmp_path / "export.npz")["images"])
  # init_from=run:EXPORT starts from those weights.
  config = ml_collections.ConfigDict({"init_from": f"run:{out}"})
  loaded_config, params = load_init_params(config, model.config, jax.random.key(0))
  assert loaded_config == model.config
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, model.params)
  assert tokenizer_bytes > 0
  # In bfloat16 the folder holds half the bytes and draws within bf16 rounding.
  half = tmp_path / "half"
  assert export_tool.main([f"--workdir={run_dir}", f"--out={half}", "--dtype=bfloat16"]) == 0
  assert json.loads((half / "export.json").read_text())["weight_bytes"] == 2 * n_params
  half_images, _ = InferenceModel.from_workdir(str(half)).sample_classes([0, 3, 7], 1, **OPTIONS)
  scale = np.abs(drawn[0]).max()
  error = np.abs(half_images - drawn[0]).max()
  assert 0 < error < 3e-2 * scale, error / scale


def _latent_run(run_dir, path, seed):
  """A run of a latent model (8x8x4 SD-VAE-like latents, no label embedding) at step 0, written
  as training writes one: config.json, the tokenizer, a checkpoint of random weights."""
  shutil.copytree(os.path.join(run_dir, "tokenizer"), path / "tokenizer")
  config = read_run_config(run_dir)
  config.model.update(dict(image_height=8, image_width=8, image_channels=4, patch_size=2))
  config.vae.update(dict(path=str(path / "vae"), scale=0.5))
  (path / "vae").mkdir()
  (path / "vae" / "config.json").write_text(json.dumps({"scaling_factor": 0.5}))
  (path / "config.json").write_text(config.to_json(indent=2))
  model_config = model_config_from(config)
  mesh = open_lib.one_device_mesh()
  optimizer = state_lib.make_optimizer(config.optimizer)
  rules = sharding_lib.rules_from_config(config.logical_axis_rules)
  state, _, shardings = state_lib.create_train_state(model_config, optimizer, jax.random.key(seed), mesh, rules)
  weights = state_lib.place_params(random_params(model_config, seed), shardings.params)
  state = state.replace(params=weights, ema_params=jax.tree.map(jnp.copy, weights))
  writer = ckpt_lib.Checkpointer(str(path), async_save=False)
  writer.save(0, state, {"scheduler": {}}, force=True)
  writer.close()
  return model_config


def test_a_latent_run_exports_to_the_official_layout(run_dir, tmp_path, seed):
  import transformers  # pylint: disable=import-outside-toplevel  # the reference, tests only
  from tests.official_reference import random_state_dict  # pylint: disable=import-outside-toplevel
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel

  run = tmp_path / "latent"
  run.mkdir()
  model_config = _latent_run(run_dir, run, seed)
  out = tmp_path / "official"
  assert export_tool.main([f"--workdir={run}", f"--out={out}", "--format=official"]) == 0
  config = json.loads((out / "config.json").read_text())
  # What the official loader reads: its config fields (LlamaConfig's own and MonoFormer's) ...
  assert set(convert_checkpoints.OFFICIAL_CONFIG_FIELDS) <= set(config)
  assert config["image_token_index"] == open_lib.load_run_tokenizer(str(run)).image_id
  hf = transformers.LlamaConfig.from_pretrained(out / "ema")
  assert (hf.hidden_size, hf.num_hidden_layers, hf.image_size) == (
      model_config.hidden_size,
      model_config.num_layers,
      64,
  )
  # ... and its strict state-dict keys, every shape included.
  stored = load_file(out / "ema" / "model.safetensors")
  want = random_state_dict(config, 0)
  assert {k: v.shape for k, v in stored.items()} == {k: tuple(v.shape) for k, v in want.items()}
  # transformers' tokenizer, as the official scripts load it, gives our ids.
  hf_tok = transformers.AutoTokenizer.from_pretrained(out)
  ours = open_lib.load_run_tokenizer(str(run))
  text = "Please generate an image of seven.<|im_start|>"
  assert hf_tok(text)["input_ids"] == [ours.bos_id, *ours.encode(text)]
  # The same images from the official folder as from the run.
  options = dict(num_steps=3, guidance_scale=2.0, cfg_mode="eps", sampler="ddpm")
  mine = InferenceModel.from_workdir(str(run)).text_to_image(["a seven"], **options)
  theirs = InferenceModel.from_official(str(out), tokenizer=str(out / "tokenizer.model")).text_to_image(
      ["a seven"], **options
  )
  np.testing.assert_array_equal(mine, theirs)


def test_the_language_model_exports_for_transformers(run_dir, tmp_path):
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel

  out = tmp_path / "hf"
  assert export_tool.main([f"--workdir={run_dir}", f"--out={out}", "--format=hf_llama"]) == 0
  model = InferenceModel.from_workdir(run_dir)
  ids = [model.tokenizer.bos_id, *model.tokenizer.encode("The class of a digit")]
  logits = jax.jit(lambda p, b: model_logits(model, p, b))(model.params, np.asarray([ids], np.int32))
  hf = transformers.LlamaForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
  with torch.no_grad():
    want = hf(torch.tensor([ids])).logits.numpy()
  np.testing.assert_allclose(np.asarray(logits), want, rtol=0, atol=1e-4 * np.abs(want).max())


def model_logits(model, params, ids):
  positions = jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape)
  batch = text_batch(jnp.asarray(ids), jnp.ones_like(ids), positions)
  return MonoFormer(model.config).apply({"params": params}, batch)["logits"]


def test_what_cannot_open_or_export_is_named(run_dir, tmp_path, capsys):
  # An export over a folder that holds something: refused, the folder untouched.
  busy = tmp_path / "busy"
  busy.mkdir()
  (busy / "keep.txt").write_text("mine")
  assert export_tool.main([f"--workdir={run_dir}", f"--out={busy}"]) == 2
  assert "exists and is not an empty folder" in capsys.readouterr().err
  assert os.listdir(busy) == ["keep.txt"]
  # A pixel-space model has no official layout: refused, nothing written.
  assert export_tool.main([f"--workdir={run_dir}", f"--out={tmp_path}/o", "--format=official"]) == 2
  assert "draws pixels" in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "o") and not [p for p in os.listdir(tmp_path) if "partial" in p]
  assert export_tool.main([f"--workdir={run_dir}", f"--out={tmp_path}/d", "--dtype=float8"]) == 2
  assert "--dtype" in capsys.readouterr().err
  # Sampling: a mesh that does not divide the model, an unknown dtype.
  flags = [f"--workdir={run_dir}", "--classes=1", f"--out={tmp_path}/x.npz"]
  assert sample.main([*flags, "--mesh=data=2,fsdp=3"]) == 2
  assert "fsdp=3 does not divide the model width 32" in capsys.readouterr().err
  assert sample.main([*flags, "--mesh=fsdp:2"]) == 2
  assert "give axis=size pairs" in capsys.readouterr().err
  # An export holds one set of weights: asking for the other is named.
  out = tmp_path / "e"
  assert export_tool.main([f"--workdir={run_dir}", f"--out={out}"]) == 0
  with pytest.raises(open_lib.RunError, match="holds the ema weights only"):
    open_lib.open_run(str(out), use_ema=False)
  # A checkpoint without EMA weights, asked for them.
  bare = tmp_path / "bare"
  shutil.copytree(out, bare, ignore=shutil.ignore_patterns("weights.safetensors", "export.json"))
  params = InferenceModel.from_workdir(str(out)).params
  writer = ckpt_lib.Checkpointer(str(bare), async_save=False)
  writer.save(0, {"step": jnp.zeros((), jnp.int32), "params": params}, {"scheduler": {}}, force=True)
  writer.close()
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match="holds no ema_params .* --nouse_ema"):
    open_lib.open_run(str(bare))
  assert open_lib.open_run(str(bare), use_ema=False).weights == "raw"
  with pytest.raises(open_lib.RunError, match="no shipped weights named 'nope'"):
    open_lib.open_run("pretrained:nope")
