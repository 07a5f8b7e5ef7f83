"""Sample grids and text written during training (WORKDIR/samples/), from the EMA weights.

Drawn through `monoformer_jax.sampling` like every other sampler: the grid holds exactly the
images `InferenceModel.sample_classes(classes, num_per_class, seed=config.sampling.seed)` returns
for that checkpoint. Images: a row per class (at most `sampling.grid_classes` rows: a 1,000-class
run shows its first classes), decoded through the run's VAE. Text: continuations of a few fixed
openings.

At scale the weights stay where training put them: the sampler runs on the training mesh with
its logical axis rules, the sharded (FSDP) EMA weights go in as they are and only the few
finished images / tokens come back to the host (from every process, so a multi-host run samples
collectively; process 0 writes the files).
"""

from __future__ import annotations

import numpy as np
from etils import epath

from monoformer_jax.data import registry
from monoformer_jax.diffusion.options import ImageSampling
from monoformer_jax.run import images as images_lib
from monoformer_jax.sampling import classes as classes_lib
from monoformer_jax.sampling import text as text_lib
from monoformer_jax.sampling.tokens import TokenSampling
from monoformer_jax.train.reporting import report

TEXT_OPENINGS = ("The", "A class", "If the")


class PeriodicSampler:
  """Writes `samples/step_<N>.png` (a row per class) and `samples/step_<N>.txt`."""

  def __init__(
      self,
      config,
      model_config,
      objective,
      tokenizer,
      workdir,
      writer,
      is_main,
      *,
      draws_text: bool,
      mesh=None,
      rules=None,
  ):
    self.config, self.model_config, self.objective = config, model_config, objective
    self.tokenizer, self.writer, self.is_main = tokenizer, writer, is_main
    self.draws_text = draws_text
    self.mesh, self.rules = mesh, rules
    self.dir = epath.Path(workdir) / "samples"
    self.class_names = registry.class_names(config.data)
    self.options = ImageSampling.from_config(config.sampling)

  def discard_after(self, step: int) -> None:
    """Deletes sample files of steps past `step` (written by a killed run after its last
    checkpoint): the resumed run writes its own, and a sample it never reaches must not stay."""
    if not self.is_main or not self.dir.is_dir():
      return
    for path in self.dir.iterdir():
      stem, ext = path.stem, path.suffix
      if ext in (".png", ".txt") and stem.startswith("step_") and stem[5:].isdigit() and int(stem[5:]) > step:
        path.unlink()

  def images(self, params) -> np.ndarray:
    """The grid's images (uint8, a row per class) from `params`."""
    s = self.config.sampling
    labels = np.repeat(np.arange(self.num_rows()), s.num_per_class)
    images = classes_lib.sample_classes(
        params,
        self.model_config,
        self.objective,
        self.tokenizer,
        self.class_names,
        labels,
        options=self.options,
        seed=s.seed,
        mesh=self.mesh,
        rules=self.rules,
    )
    return images_lib.to_uint8(images_lib.decode_images(images, self.config.vae.path, self.config.vae.scale))

  def num_rows(self) -> int:
    return min(len(self.class_names or ()), self.config.sampling.grid_classes)

  def __call__(self, step: int, params) -> None:
    s = self.config.sampling
    if self.objective is not None and self.num_rows():
      picture = images_lib.grid(self.images(params), rows=self.num_rows())
      if self.is_main:
        images_lib.save_png(self.dir / f"step_{step}.png", picture)
        self.writer.write_image(step, "samples", picture if picture.shape[-1] == 3 else np.repeat(picture, 3, axis=-1))
    if self.draws_text:
      texts = text_lib.generate_text(
          params,
          self.model_config,
          self.tokenizer,
          list(TEXT_OPENINGS),
          max_new_tokens=s.max_new_tokens,
          seed=s.seed,
          sampling=TokenSampling(s.temperature, s.top_k, s.top_p),
          mesh=self.mesh,
          rules=self.rules,
      )
      body = "\n\n".join(f"[{p}] {p}{t}" for p, t in zip(TEXT_OPENINGS, texts))
      if self.is_main:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / f"step_{step}.txt").write_text(body + "\n")
        self.writer.write_text(step, "text_samples", body)
    if self.is_main:
      report(f"wrote samples for step {step} to {self.dir}")
