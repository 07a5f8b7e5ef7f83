"""Flax AutoencoderKL against diffusers.AutoencoderKL (PyTorch, CPU, fp32) on tiny random configs."""

import json

import diffusers
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from monoformer_jax import vae
from monoformer_jax.vae import convert

TINY = dict(block_out_channels=(8, 16, 16), layers_per_block=2, latent_channels=4, norm_num_groups=4)


def make_tiny_vae(folder, seed=0, safe_serialization=True, **overrides):
  """A random diffusers AutoencoderKL saved with save_pretrained; returns the torch module.

  The default init (unit norms, zero-ish biases) gives small, smooth outputs that would hide
  layout mistakes, so every parameter is re-drawn at a scale that keeps activations O(1).
  """
  fields = {**TINY, **overrides}
  levels = len(fields["block_out_channels"])
  torch.manual_seed(seed)
  model = diffusers.AutoencoderKL(
      in_channels=3,
      out_channels=3,
      down_block_types=("DownEncoderBlock2D",) * levels,
      up_block_types=("UpDecoderBlock2D",) * levels,
      **fields,
  )
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1 and "norm" in name and name.endswith("weight"):
        p.copy_(1 + 0.3 * torch.randn_like(p))
      elif p.ndim == 1:
        p.copy_(0.3 * torch.randn_like(p))
      else:
        p.copy_(torch.randn_like(p) / np.sqrt(p[0].numel()))  # unit gain per output
  model.eval()
  model.save_pretrained(folder, safe_serialization=safe_serialization)
  return model


def torch_reference(model, images_nhwc):
  """diffusers' moments and decode(mean), moved to NHWC NumPy."""
  with torch.no_grad():
    dist = model.encode(torch.from_numpy(images_nhwc).permute(0, 3, 1, 2)).latent_dist
    decoded = model.decode(dist.mean).sample
  to_nhwc = lambda t: t.permute(0, 2, 3, 1).numpy()
  return to_nhwc(dist.mean), to_nhwc(dist.logvar), to_nhwc(decoded)


def random_images(seed, shape):
  return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


FP32_ATOL = 1e-4  # the bar: absolute, on outputs of magnitude O(1) (see the tests)
BF16_ATOL = 1e-1  # bf16 compute (8-bit mantissa) on the same O(1) outputs: 2x the worst of 30 seeds (0.0496)


def assert_close(got, want, atol=FP32_ATOL):
  """Elementwise |got - want| <= atol (absolute: no rtol, no scaling by the outputs' size)."""
  got = np.asarray(got)
  assert got.shape == want.shape, (got.shape, want.shape)
  np.testing.assert_allclose(got, want, rtol=0, atol=atol)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, module_seed):
  folder = tmp_path_factory.mktemp("tiny_vae")
  model = make_tiny_vae(folder, seed=module_seed("vae weights"))
  images = random_images(module_seed("images"), (2, 16, 24, 3))  # non-square, so H/W mix-ups fail
  config, params = convert.load_diffusers_vae(str(folder))
  return dict(
      folder=folder, model=model, images=images, config=config, params=params, reference=torch_reference(model, images)
  )


def test_moments_and_decoder_match_diffusers(tiny):
  mean, logvar, decoded = tiny["reference"]
  assert np.abs(mean).max() > 0.3 and np.abs(decoded).max() > 0.3  # not trivially small
  got_mean, got_logvar = vae.encode_moments(tiny["params"], tiny["images"], config=tiny["config"])
  assert got_mean.shape == (2, 4, 6, 4)
  assert_close(got_mean, mean)
  assert_close(got_logvar, logvar)
  # Decoder fed diffusers' own mean, so decoder error is measured alone.
  assert_close(vae.decode_latents(tiny["params"], mean, scale=1.0, config=tiny["config"]), decoded)


def test_scaled_latents_api(tiny, seed):
  cfg, params, images = tiny["config"], tiny["params"], tiny["images"]
  mean, logvar, _ = tiny["reference"]
  assert cfg.scaling_factor == 0.18215
  latents = vae.encode_to_latents(params, images, sample=False, config=cfg)
  assert_close(latents, mean * 0.18215)
  with torch.no_grad():
    want = tiny["model"].decode(torch.from_numpy(mean).permute(0, 3, 1, 2)).sample
  assert_close(vae.decode_latents(params, latents, config=cfg), want.permute(0, 2, 3, 1).numpy())
  rng = jax.random.key(seed)
  sampled = vae.encode_to_latents(params, images, rng, config=cfg)
  np.testing.assert_allclose(sampled, vae.sample_latents(mean, logvar, rng), rtol=1e-4, atol=1e-5)
  eps = (np.asarray(sampled) / 0.18215 - mean) / np.exp(0.5 * logvar)
  assert abs(eps.mean()) < 0.3 and 0.7 < eps.std() < 1.3  # a standard-normal draw, not the mean
  other = vae.encode_to_latents(params, images, jax.random.key(seed + 1), config=cfg)
  assert not np.allclose(sampled, other)
  with pytest.raises(ValueError, match="rng"):
    vae.encode_to_latents(params, images, config=cfg)
  with pytest.raises(ValueError, match="multiples of 4"):
    vae.encode_to_latents(params, images[:, :10], sample=False, config=cfg)
  with pytest.raises(ValueError, match=r"N x h x w x 4"):
    vae.decode_latents(params, latents[..., :3], config=cfg)


def _rename_to_old_attention(state):
  old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  renamed = {}
  for key, value in state.items():
    for new_name, old_name in old.items():
      key = key.replace(f"attentions.0.{new_name}.", f"attentions.0.{old_name}.")
    renamed[key] = value
  return renamed


def test_bin_weights_and_old_attention_names(tiny, tmp_path):
  """A .bin folder with pre-0.15 attention names converts to the same parameters."""
  state = {k: v.clone() for k, v in tiny["model"].state_dict().items()}
  old_state = _rename_to_old_attention(state)
  assert "encoder.mid_block.attentions.0.proj_attn.weight" in old_state
  torch.save(old_state, tmp_path / "diffusion_pytorch_model.bin")
  (tmp_path / "config.json").write_text((tiny["folder"] / "config.json").read_text())
  _, params = convert.load_diffusers_vae(str(tmp_path))
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, tiny["params"])
  # ... and back: the inverse mapping reproduces diffusers' state dict exactly.
  back = convert.params_to_state_dict(params)
  assert set(back) == set(state)
  for key, value in state.items():
    np.testing.assert_array_equal(back[key], value.numpy())


def test_conversion_names_the_problem(tiny, tmp_path):
  state = convert.params_to_state_dict(tiny["params"])
  config = tiny["config"]
  broken = dict(state)
  del broken["decoder.up_blocks.1.resnets.2.conv1.weight"]
  broken["encoder.extra.weight"] = np.ones(3, np.float32)
  broken["quant_conv.weight"] = np.ones((8, 8, 3, 3), np.float32)
  with pytest.raises(convert.ConversionError) as err:
    convert.convert_state_dict(broken, config)
  message = str(err.value)
  assert "missing decoder.up_blocks.1.resnets.2.conv1.weight" in message
  assert "unexpected key encoder.extra.weight" in message
  assert "shape mismatch for quant_conv.weight" in message
  with pytest.raises(FileNotFoundError, match="no such VAE directory"):
    convert.load_diffusers_vae(str(tmp_path / "absent"))
  with pytest.raises(FileNotFoundError, match="no config.json"):
    convert.load_diffusers_vae(str(tmp_path))
  fields = json.loads((tiny["folder"] / "config.json").read_text())
  with pytest.raises(ValueError, match="does not divide"):
    convert.config_from_diffusers({**fields, "norm_num_groups": 3})
  with pytest.raises(ValueError, match="block types"):
    convert.config_from_diffusers({**fields, "down_block_types": ["CrossAttnDownBlock2D"] * 3})


def test_variant_without_mid_attention_or_quant_convs(tmp_path, seed):
  model = make_tiny_vae(
      tmp_path,
      seed=seed,
      block_out_channels=(8, 16),
      layers_per_block=1,
      latent_channels=3,
      mid_block_add_attention=False,
      use_quant_conv=False,
      use_post_quant_conv=False,
  )
  images = random_images(seed + 1, (1, 8, 8, 3))
  mean, logvar, decoded = torch_reference(model, images)
  config, params = convert.load_diffusers_vae(str(tmp_path))
  assert "quant_conv" not in params and "attention" not in params["encoder"]["mid_block"]
  got_mean, got_logvar = vae.encode_moments(params, images, config=config)
  assert_close(got_mean, mean)
  assert_close(got_logvar, logvar)
  assert_close(vae.decode_latents(params, mean, scale=1.0, config=config), decoded)


def test_logical_axes_bf16_and_sharded_batch(tiny, seed):
  config, params, images = tiny["config"], tiny["params"], tiny["images"]
  abstract = jax.eval_shape(lambda: vae.init_params(config, jax.random.PRNGKey(0)))
  specs = nn.get_partition_spec(abstract)
  assert abstract["encoder"]["conv_in"]["kernel"].value.shape == (3, 3, 3, 8)
  assert specs["encoder"]["conv_in"]["kernel"] == PartitionSpec("conv_height", "conv_width", "conv_in", "conv_out")
  assert specs["decoder"]["mid_block"]["attention"]["query"]["kernel"] == PartitionSpec("conv_in", "conv_out")
  assert specs["encoder"]["conv_norm_out"]["scale"] == PartitionSpec("norm")
  mean, _, _ = tiny["reference"]
  bf16_mean, _ = vae.encode_moments(params, images, config=config, dtype=jnp.bfloat16)
  assert bf16_mean.dtype == jnp.float32
  assert_close(bf16_mean, mean, atol=BF16_ATOL)  # bf16 compute: close, not exact
  # Batch sharded over the 8 fake devices gives the unsharded result.
  batch = random_images(seed, (8, 8, 8, 3))
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  sharded = jax.device_put(batch, NamedSharding(mesh, PartitionSpec("data")))
  want, _ = vae.encode_moments(params, batch, config=config)
  got, _ = vae.encode_moments(params, sharded, config=config)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
