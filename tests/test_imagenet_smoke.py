"""The paper's recipe end to end at toy size (`configs/imagenet256.py:smoke`), by the commands of
its docstring: an ImageNet-style folder (WordNet-id class folders + the synset mapping) through
extract_latents, training on 2 processes (FSDP over both, periodic samples drawn on that mesh),
sampling from the run and FID of fid_samples; and the full config's own command on small
stand-ins of TinyLlama's folder, as far as loading its files."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from monoformer_jax import main as train_main
from monoformer_jax.convert.checkpoints import save_hf_llama
from monoformer_jax.data import tokenizer as tok_lib
from monoformer_jax.tools import extract_latents
from tests.helpers import (
    ROOT,
    launch_local_processes,
    random_fid_state_dict,
    random_params,
    tiny_config,
    write_tiny_diffusers_vae,
)
from tests.helpers_env import subprocess_env

WNIDS = ("n01440764", "n01443537")
SYNSETS = "n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius auratus\nn99999999 unused, other\n"


def _imagenet_folder(root, rng, per_class=8):
  """Smooth random colour images, 20x24 (centre-cropped to 16), in WordNet-id class folders."""
  for wnid in WNIDS:
    os.makedirs(root / wnid)
    for i in range(per_class):
      cells = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
      Image.fromarray(cells).resize((24, 20), Image.BILINEAR).save(root / wnid / f"{wnid}_{i}.JPEG", quality=95)
  return root


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory, module_seed):
  """Extracted latents (human class names) and the VAE, by the docstring's extraction command."""
  base = tmp_path_factory.mktemp("imagenet_smoke")
  rng = np.random.default_rng(module_seed("images"))
  folder = _imagenet_folder(base / "train", rng)
  write_tiny_diffusers_vae(base / "vae", module_seed("vae"), 16)
  (base / "LOC_synset_mapping.txt").write_text(SYNSETS)
  code = extract_latents.main(
      [
          f"--vae={base / 'vae'}",
          "--source=image_folder",
          f"--input={folder}",
          "--image_size=16",
          f"--class_names={base / 'LOC_synset_mapping.txt'}",
          f"--out={base / 'latents'}",
          "--no_progress",
      ]
  )
  assert code == 0
  return base


def test_extraction_writes_human_class_names(stand_ins):
  table = json.loads((stand_ins / "latents" / "class_names.json").read_text())
  assert table == {"0": ["n01440764", "tench"], "1": ["n01443537", "goldfish"]}


@pytest.mark.slow
def test_smoke_variant_end_to_end_on_two_processes(stand_ins, tmp_path, seed):
  work = tmp_path / "run"
  flags = [
      "--config=configs/imagenet256.py:smoke",
      f"--workdir={work}",
      f"--config.data.image_path={stand_ins / 'latents'}",
      f"--config.vae.path={stand_ins / 'vae'}",
      "--config.vae.scale=0.37",
  ]
  logs = launch_local_processes(2, flags, tmp_path)
  assert "process 1 of 2" in logs[1]
  config = json.loads((work / "config.json").read_text())
  assert config["mesh"]["fsdp"] == -1 and config["data"]["latent_scale"] == 0.37
  assert sorted(os.listdir(work / "checkpoints")) == ["2", "4"]
  grid = np.asarray(Image.open(work / "samples" / "step_4.png"))
  assert grid.shape == (2 * 16, 2 * 16, 3)  # grid_classes x num_per_class images of 16x16 pixels
  assert grid.std() > 0

  torch.save(random_fid_state_dict(seed), tmp_path / "inception.pth")
  real = np.stack(
      [np.asarray(Image.open(p).convert("RGB").resize((16, 16))) for p in sorted((stand_ins / "train").rglob("*.JPEG"))]
  )
  np.savez(tmp_path / "reference.npz", arr_0=real)
  out = subprocess.run(
      [
          sys.executable,
          "-m",
          "monoformer_jax.evaluation.fid_samples",
          f"--workdir={work}",
          f"--out_dir={tmp_path / 'fid'}",
          "--num_samples=10",
          "--chunk=10",
          f"--inception_weights={tmp_path / 'inception.pth'}",
          f"--reference={tmp_path / 'reference.npz'}",
          "--inception_batch_size=8",
      ],
      cwd=ROOT,
      env=subprocess_env(),
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  report = json.loads(out.stdout[out.stdout.index("{") :])
  assert np.isfinite(report["fid"]["fid"]) and report["fid"]["fid"] > 0


def _tiny_llama_folder(path, seed):
  """What a TinyLlama download holds (config.json, model.safetensors, tokenizer.model), small."""
  config = tiny_config()
  save_hf_llama(random_params(config, seed), config, str(path))
  texts = [f"an image of {name}, number {i}." for i in range(50) for name in ("tench", "goldfish", "a dog")]
  tok_lib.train_sentencepiece(texts, 300, str(path))
  return path


def test_full_config_command_loads_its_files(stand_ins, tmp_path, seed, capsys):
  """The docstring's training command with small stand-ins of TinyLlama's folder: it finds the
  tokenizer in the init_from folder and the class names beside the latents, loads both, and
  stops at the first real difference (a 2-layer stand-in is not TinyLlama) before any state is
  built."""
  llama = _tiny_llama_folder(tmp_path / "TinyLlama", seed)
  code = train_main.main(
      [
          "--config=configs/imagenet256.py",
          f"--workdir={tmp_path / 'run'}",
          f"--config.init_from=hf:{llama}",
          f"--config.data.image_path={stand_ins / 'latents'}",
          f"--config.vae.path={stand_ins / 'vae'}",
          "--config.vae.scale=0.37",  # the stand-in VAE's scaling_factor (SD-VAE's is the default)
      ]
  )
  err = capsys.readouterr().err
  assert code == 2, err
  assert "init_from" in err and "holds a different model: hidden_size: checkpoint 32 vs config 2048" in err, err
  assert "Traceback" not in err
