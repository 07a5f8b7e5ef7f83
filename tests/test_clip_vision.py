"""Flax CLIP vision tower against transformers' CLIPVisionModel / CLIPModel (PyTorch, CPU, fp32) on tiny
random configs, and clip_preprocess against transformers' CLIPImageProcessor (both backends)."""

import json

import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from monoformer_jax import vision
from monoformer_jax.vision import clip, convert

# image_size 30 is not a multiple of patch 7: the convolution drops the 2-pixel remainder (4x4 patches).
TINY = dict(
    hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, image_size=30, patch_size=7
)
TINY_TEXT = dict(
    vocab_size=40,
    hidden_size=16,
    intermediate_size=24,
    num_hidden_layers=1,
    num_attention_heads=2,
    max_position_embeddings=8,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=1,
)
FP32_ATOL = 1e-4  # the bar: absolute, on hidden states of magnitude O(1..10) (checked below)


def _redraw(model):
  """transformers' init (unit norms, zero biases, 0.02 weights) would hide a swapped norm scale and
  bias or a transposed projection, so every parameter is redrawn at a scale that keeps activations O(1)."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name and name.endswith("weight"):
        p.copy_(1 + 0.2 * torch.randn_like(p))
      else:
        p.copy_(0.2 * torch.randn_like(p))


def make_tiny_clip(folder, seed, hidden_act="quick_gelu", safe_serialization=True, full=False):
  """A random CLIPVisionModel (or a whole CLIPModel, text tower included) saved with save_pretrained;
  returns the vision tower's torch module. transformers 5 always writes safetensors (it ignores
  safe_serialization=False), so the .bin variant is written as transformers 4 wrote it: torch.save
  of the state dict as pytorch_model.bin."""
  torch.manual_seed(seed)
  vision_config = transformers.CLIPVisionConfig(**TINY, hidden_act=hidden_act)
  if full:
    model = transformers.CLIPModel(
        transformers.CLIPConfig(vision_config=vision_config.to_dict(), text_config=TINY_TEXT, projection_dim=8)
    )
    tower = model.vision_model
  else:
    model = tower = transformers.CLIPVisionModel(vision_config)
  _redraw(model)
  model.eval()
  model.save_pretrained(folder)
  if not safe_serialization:
    (folder / "model.safetensors").unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
  return tower


def torch_reference(tower, pixels_nhwc):
  """(hidden_states, pooler_output) as NumPy: hidden_states[0] is the embeddings after pre_layrnorm."""
  with torch.no_grad():
    out = tower(pixel_values=torch.from_numpy(pixels_nhwc).permute(0, 3, 1, 2), output_hidden_states=True)
  return [h.numpy() for h in out.hidden_states], out.pooler_output.numpy()


def random_pixels(rng, batch=2):
  return rng.standard_normal((batch, TINY["image_size"], TINY["image_size"], 3)).astype(np.float32)


def assert_close(got, want, atol=FP32_ATOL):
  got = np.asarray(got)
  assert got.shape == want.shape, (got.shape, want.shape)
  np.testing.assert_allclose(got, want, rtol=0, atol=atol)


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
def test_features_match_transformers(tmp_path, seed, rng, hidden_act):
  tower = make_tiny_clip(tmp_path, seed, hidden_act)
  config, params = vision.load_clip_vision(tmp_path)
  assert config == clip.CLIPVisionConfig(**TINY, hidden_act=hidden_act)
  assert config.num_patches == 16
  pixels = random_pixels(rng)
  hidden, pooled = torch_reference(tower, pixels)
  assert len(hidden) == 4 and np.abs(hidden[-2]).max() > 1.0  # not trivially small
  # The default: the penultimate layer without CLS, what MonoFormer's im_embedder reads.
  features = clip.clip_image_features(params, config, pixels)
  assert features.shape == (2, 16, 32)
  assert_close(features, hidden[-2][:, 1:])
  for layer in range(-4, 4):  # every hidden_states entry, by both numberings, CLS kept
    assert_close(clip.clip_image_features(params, config, pixels, layer=layer, drop_cls=False), hidden[layer])
  last, got_pooled = clip.clip_vision_outputs(params, config, pixels)
  assert_close(last, hidden[-1])
  assert_close(got_pooled, pooled)
  # A jitted call with the config static (as an encoder runs it).
  jitted = jax.jit(clip.clip_image_features, static_argnums=(1, 3, 4))
  assert_close(jitted(params, config, pixels, -2, True), hidden[-2][:, 1:])


def test_pytorch_bin_folder_loads_the_same(tmp_path, seed, rng):
  tower = make_tiny_clip(tmp_path / "st", seed)
  make_tiny_clip(tmp_path / "bin", seed, safe_serialization=False)
  assert (tmp_path / "bin" / "pytorch_model.bin").is_file()
  config, from_st = vision.load_clip_vision(tmp_path / "st")
  _, from_bin = vision.load_clip_vision(tmp_path / "bin")
  jax.tree.map(np.testing.assert_array_equal, from_st, from_bin)
  pixels = random_pixels(rng)
  hidden, _ = torch_reference(tower, pixels)
  assert_close(clip.clip_image_features(params=from_bin, config=config, pixels_BxHxWxC=pixels), hidden[-2][:, 1:])


def test_full_clip_model_folder(tmp_path, seed, rng):
  """A CLIPModel folder: config.json is a CLIPConfig (vision_config section), keys vision_model.*,
  and the text tower, the projections and logit_scale are ignored."""
  tower = make_tiny_clip(tmp_path, seed, "gelu", full=True)
  fields = json.loads((tmp_path / "config.json").read_text())
  assert "vision_config" in fields and "text_config" in fields
  config, params = vision.load_clip_vision(tmp_path)
  assert config == clip.CLIPVisionConfig(**TINY, hidden_act="gelu")
  pixels = random_pixels(rng)
  hidden, pooled = torch_reference(tower, pixels)
  assert_close(clip.clip_image_features(params, config, pixels), hidden[-2][:, 1:])
  assert_close(clip.clip_vision_outputs(params, config, pixels)[1], pooled)


def test_older_tensor_names(tmp_path, seed):
  """CLIPVisionModel as transformers 4.x saved it: `vision_model.` prefix, and (< 4.31) the
  position_ids buffer; the visual projection of a CLIPVisionModelWithProjection is ignored too."""
  make_tiny_clip(tmp_path, seed)
  config, params = vision.load_clip_vision(tmp_path)
  state = safetensors.numpy.load_file(tmp_path / "model.safetensors")
  old = {f"vision_model.{k}": v for k, v in state.items()}
  old["vision_model.embeddings.position_ids"] = np.arange(17)[None]
  old["visual_projection.weight"] = np.zeros((8, 32), np.float32)
  safetensors.numpy.save_file(old, tmp_path / "model.safetensors")
  _, old_params = vision.load_clip_vision(tmp_path)
  jax.tree.map(np.testing.assert_array_equal, params, old_params)
  # Parameters carry the model's logical axis names; the encoder's are stacked on 'layers'.
  boxed = clip.init_params(config, jax.random.key(0))
  assert boxed["encoder"]["layers"]["self_attn"]["q_proj"]["kernel"].names == ("layers", "embed", "heads", "head_dim")
  assert boxed["encoder"]["layers"]["mlp"]["fc2"]["kernel"].names == ("layers", "mlp", "embed")
  assert params["encoder"]["layers"]["self_attn"]["q_proj"]["kernel"].shape == (3, 32, 4, 8)


def test_conversion_errors(tmp_path, seed):
  with pytest.raises(FileNotFoundError, match="no such CLIP directory"):
    vision.load_clip_vision(tmp_path / "absent")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="no config.json"):
    vision.load_clip_vision(tmp_path / "empty")

  folder = tmp_path / "clip"
  make_tiny_clip(folder, seed)
  weights = folder / "model.safetensors"
  state = safetensors.numpy.load_file(weights)
  missing = dict(state)
  del missing["encoder.layers.1.mlp.fc1.bias"]
  missing["encoder.layers.3.mlp.fc1.bias"] = state["encoder.layers.1.mlp.fc1.bias"]  # a 4th layer: unexpected
  safetensors.numpy.save_file(missing, weights)
  with pytest.raises(convert.ConversionError) as err:
    vision.load_clip_vision(folder)
  assert str(weights) in str(err.value)
  assert "missing encoder.layers.1.mlp.fc1.bias" in str(err.value)
  assert "unexpected key encoder.layers.3.mlp.fc1.bias" in str(err.value)

  safetensors.numpy.save_file(state, weights)
  fields = json.loads((folder / "config.json").read_text())
  (folder / "config.json").write_text(json.dumps({**fields, "intermediate_size": 40}))
  with pytest.raises(
      convert.ConversionError,
      match=r"shape mismatch for encoder.layers.0.mlp.fc1.weight: file has \(48, 32\), the config needs \(40, 32\)",
  ):
    vision.load_clip_vision(folder)
  for bad, message in [
      ({"hidden_act": "relu"}, "hidden_act='relu' unsupported"),
      ({"model_type": "siglip_vision_model"}, "not a CLIP vision model"),
      ({"num_attention_heads": 5}, "not a multiple of num_attention_heads"),
  ]:
    (folder / "config.json").write_text(json.dumps({**fields, **bad}))
    with pytest.raises(ValueError, match=message) as err:
      vision.load_clip_vision(folder)
    assert "config.json" in str(err.value)

  config = clip.CLIPVisionConfig(**TINY)
  params = clip.init_params(config, jax.random.key(seed))
  with pytest.raises(ValueError, match="layer 4 out of range"):
    clip.clip_image_features(params, config, np.zeros((1, 30, 30, 3), np.float32), layer=4)
  with pytest.raises(ValueError, match=r"B x 30 x 30 x 3"):
    clip.clip_image_features(params, config, np.zeros((1, 28, 28, 3), np.float32))


# One uint8 level after normalisation, in the channel with the smallest std (the largest step).
ONE_LEVEL = 1 / (255 * min(clip.CLIP_STD))


def _test_images(rng):
  """Random uint8 images (noise, and a smooth pattern as a photo has) that shrink in either
  orientation, grow, and are grayscale."""
  images = []
  for shape in [(300, 260, 3), (150, 400, 3), (100, 150, 3), (64, 64, 1), (333, 227, 1)]:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    phase = rng.uniform(0, 6, shape[2])
    smooth = 127.5 + 120 * np.sin(xx[..., None] / 17.0 + yy[..., None] / 23.0 + phase)
    images += [rng.integers(0, 256, shape, dtype=np.uint8), smooth.round().astype(np.uint8)]
  return images


def test_preprocess_matches_clip_image_processor(rng):
  """Bicubic resizes differ in their last rounding: PIL (CLIPImageProcessorPil, what transformers 4
  used) and torchvision (CLIPImageProcessor in transformers 5) compute in fixed point, and a value
  landing near x.5 rounds either way; both round to uint8 after each of their two passes, which
  ours does too (without that, overshoot clipped between the passes gave 22 levels on noise).
  Measured on these images (60 seeds): ours vs either <= 2 uint8 levels (0.0300 normalised), the
  two references vs each other also <= 2 levels; the mean difference to either is at most 1.06x
  the two references' own mean difference (2-10% of pixels one level off on the 3.5x upsample,
  <1% elsewhere). So the bar: two levels at most, and a mean within 1.25x of how far the references
  are from each other (or 1/20 level, where they agree more closely than that)."""
  pil, torchvision = transformers.CLIPImageProcessorPil(), transformers.CLIPImageProcessor()
  for image in _test_images(rng):
    ours = np.asarray(clip.clip_preprocess(image, 224))
    assert ours.shape == (224, 224, 3) and ours.dtype == np.float32
    wants = [p(images=image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0) for p in (pil, torchvision)]
    between = 1.25 * max(np.abs(wants[0] - wants[1]).mean(), ONE_LEVEL / 20)
    for name, want in zip(("pil", "torchvision"), wants):
      diff = np.abs(ours - want)
      assert diff.max() <= 2 * ONE_LEVEL + 1e-5, (image.shape, name, diff.max() / ONE_LEVEL)
      assert diff.mean() <= between, (image.shape, name, diff.mean() / between)


def test_preprocess_without_resize_is_exact(rng):
  """Where the short side is already the target, no resize runs: crop, rescale, normalise and the
  grayscale repeat agree with transformers to float rounding (measured 4.8e-7)."""
  processor = transformers.CLIPImageProcessor(size={"shortest_edge": 30}, crop_size={"height": 28, "width": 28})
  for shape in [(30, 47, 3), (61, 30, 3), (30, 30, 1)]:
    image = rng.integers(0, 256, shape, dtype=np.uint8)
    want = processor(images=image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    assert_close(clip.clip_preprocess(image, 30, crop_size=28), want, atol=1e-5)
    # Floats in [0, 1] with max_value=1, and a batch under jit, give the same.
    assert_close(clip.clip_preprocess(image / np.float32(255), 30, 28, max_value=1.0), want, atol=1e-5)
  batch = rng.integers(0, 256, (2, 3, 40, 50, 3), dtype=np.uint8)
  jitted = jax.jit(clip.clip_preprocess, static_argnums=(1,))(batch, 30)
  assert jitted.shape == (2, 3, 30, 30, 3)
  assert_close(jitted[1, 2], np.asarray(clip.clip_preprocess(batch[1, 2], 30)), atol=1e-5)
  with pytest.raises(ValueError, match="1 or 3"):
    clip.clip_preprocess(np.zeros((8, 8, 4), np.uint8))
