"""`ImageSampling`: how an image is drawn (sampler, steps, guidance, eta, x0 clipping), in one object.

Built once from a run's `config.sampling` block (`from_config`) or from the official settings
(`OFFICIAL`), overridden field by field (`replace`), validated on construction: every caller
(periodic samples, FID samples, `InferenceModel`, the sample command) passes one of these down to
the compiled sampler, where it is a static argument (hashable: one compile per setting).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from monoformer_jax.diffusion.flow import FLOW_SAMPLERS
from monoformer_jax.diffusion.guidance import CFG_MODES
from monoformer_jax.diffusion.objective import GAUSSIAN_SAMPLERS


class SamplingOptionError(ValueError):
  """An image-sampling option that cannot work; `field` names it."""

  def __init__(self, field: str, message: str):
    super().__init__(f"{field} {message}")
    self.field = field
    self.reason = message


@dataclasses.dataclass(frozen=True)
class ImageSampling:
  """The image sampler's settings. Defaults are the base config's; `OFFICIAL` the official code's.

  guidance_scale: classifier-free guidance (1 = none; the unconditional rows are then skipped).
  cfg_mode: 'eps' guides every eps channel, 'official_first3' the first three (the official quirk).
  clip_denoised: clamp the predicted x0 to [-1, 1] at every Gaussian step (pixel-space models).
  """

  sampler: str = "ddpm"
  num_steps: int = 250
  guidance_scale: float = 1.5
  cfg_mode: str = "eps"
  eta: float = 0.0
  clip_denoised: bool = False

  def __post_init__(self):
    if self.sampler not in GAUSSIAN_SAMPLERS + FLOW_SAMPLERS:
      raise SamplingOptionError(
          "sampler", f"{self.sampler!r} is unknown: gaussian {GAUSSIAN_SAMPLERS}, flow {FLOW_SAMPLERS}"
      )
    if not isinstance(self.num_steps, int) or isinstance(self.num_steps, bool) or self.num_steps < 1:
      raise SamplingOptionError("num_steps", f"must be an integer >= 1, got {self.num_steps!r}")
    if not self.guidance_scale >= 1.0:  # also refuses NaN
      raise SamplingOptionError("guidance_scale", f"must be >= 1 (1 = no guidance), got {self.guidance_scale}")
    if self.cfg_mode not in CFG_MODES:
      raise SamplingOptionError("cfg_mode", f"{self.cfg_mode!r} is not one of {CFG_MODES}")
    if not self.eta >= 0.0:
      raise SamplingOptionError("eta", f"must be >= 0 (0 = deterministic DDIM), got {self.eta}")
    # Plain Python types: the object is a static argument of jitted samplers (hash, equality).
    object.__setattr__(self, "guidance_scale", float(self.guidance_scale))
    object.__setattr__(self, "eta", float(self.eta))
    object.__setattr__(self, "clip_denoised", bool(self.clip_denoised))

  @property
  def guided(self) -> bool:
    return self.guidance_scale > 1.0

  @classmethod
  def from_config(cls, sampling: Mapping[str, Any]) -> "ImageSampling":
    """The image options of a run's `config.sampling` (its text options are ignored)."""
    return cls(**{f.name: sampling[f.name] for f in dataclasses.fields(cls) if f.name in sampling})

  def replace(self, **overrides) -> "ImageSampling":
    """A copy with `overrides` (None values keep the current setting); unknown names are named."""
    names = {f.name for f in dataclasses.fields(self)}
    unknown = sorted(set(overrides) - names)
    if unknown:
      raise SamplingOptionError(unknown[0], f"is not an image-sampling option (options: {', '.join(sorted(names))})")
    return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

  def check_objective(self, kind: str, latent: bool = False) -> None:
    """Raises SamplingOptionError if these options cannot sample a `kind` objective (in latent
    space when `latent`): the sampler must belong to it, and x0 clipping bounds Gaussian pixels."""
    samplers = FLOW_SAMPLERS if kind == "flow" else GAUSSIAN_SAMPLERS
    if self.sampler not in samplers:
      raise SamplingOptionError(
          "sampler", f"{self.sampler!r} does not sample a {kind!r} objective; use one of {samplers}"
      )
    if self.clip_denoised and (kind != "gaussian" or latent):
      raise SamplingOptionError(
          "clip_denoised",
          "clamps the predicted x0 to [-1, 1]: only for the gaussian objective in pixel space "
          f"(this is a {kind!r} objective{' on latents' if latent else ''})",
      )


# The official code's sampling (its sample scripts and notebook): 50 respaced DDPM steps, CFG 4.
OFFICIAL = ImageSampling(sampler="ddpm", num_steps=50, guidance_scale=4.0, cfg_mode="eps", eta=0.0)
