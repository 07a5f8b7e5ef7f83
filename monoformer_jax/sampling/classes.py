"""Class-conditional images, the one path every caller takes: training's periodic grids,
evaluation's FID samples, `InferenceModel.sample_classes` and the sample command.

A class becomes the official prompt `<s>Please generate an image of {name}.<|im_start|>`, guided
against the official unconditional `<s><|im_start|>`, drawn by the cached-prefix sampler. Sample
i's noise comes from fold_in(key(seed), sample_ids[i]) and every prompt is padded to the longest
of the class list, so an image depends on its seed, class and sample id only: not on the batch it
is drawn in, nor on which caller draws it.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import numpy as np

from monoformer_jax.diffusion.options import ImageSampling
from monoformer_jax.sampling.image import sample_images

DEFAULT_CLASS_TEMPLATE = "Please generate an image of {}."


def image_prompt(tokenizer, text: str) -> list[int]:
  """`<s>{text}<|im_start|>` (the official conditional prefix)."""
  return [tokenizer.bos_id, *tokenizer.encode(text), tokenizer.im_start_id]


def unconditional_prompt(tokenizer) -> list[int]:
  """`<s><|im_start|>` (the official unconditional prefix: prompt "")."""
  return [tokenizer.bos_id, tokenizer.im_start_id]


def sample_classes(  # pylint: disable=too-many-arguments  # public: a keyword per sampling option
    params,
    model_config,
    objective,
    tokenizer,
    class_names: Sequence[str],
    labels,
    *,
    options: ImageSampling,
    seed: int,
    sample_ids=None,
    template: str = DEFAULT_CLASS_TEMPLATE,
    use_label_embedding: Optional[bool] = None,
    batch_size: int = 64,
    mesh=None,
    rules=None,
) -> np.ndarray:
  """Images (N, H, W, C) in model space for class ids `labels` (N,), drawn with `options`.
  `sample_ids` default to 0..N-1."""
  labels = np.asarray(labels, np.int32).reshape(-1)
  sample_ids = np.arange(len(labels)) if sample_ids is None else np.asarray(sample_ids)
  if len(sample_ids) != len(labels):
    raise ValueError(f"{len(labels)} labels but {len(sample_ids)} sample ids")
  prompts = [image_prompt(tokenizer, template.format(class_names[y])) for y in labels]
  pad_to = max(len(image_prompt(tokenizer, template.format(n))) for n in class_names)
  if use_label_embedding is None:
    use_label_embedding = model_config.num_classes > 0
  rng = jax.random.key(seed)
  chunks = []
  for start in range(0, len(labels), batch_size):
    stop = min(start + batch_size, len(labels))
    chunks.append(
        sample_images(
            params,
            model_config,
            objective,
            prompts[start:stop],
            uncond_prompt=unconditional_prompt(tokenizer),
            labels=labels[start:stop] if use_label_embedding else None,
            rng=rng,
            sample_ids=sample_ids[start:stop],
            pad_to=pad_to,
            options=options,
            mesh=mesh,
            rules=rules,
        )
    )
  return np.concatenate(chunks)
