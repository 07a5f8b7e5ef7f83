"""CLIP score of text-to-image samples: how well each image matches its prompt, by a CLIP model
(a transformers CLIPModel folder, e.g. openai/clip-vit-large-patch14) ported to Flax.

    score = 100 * max(cos(image embedding, text embedding), 0)    per sample, then the mean

(Hessel et al.'s CLIPScore with w = 100, as torchmetrics computes it.) The image goes through
CLIP's own preprocessing (resize the short side, centre crop, normalise); the text is the raw
prompt, without the training prefix. The report carries the settings the samples were drawn
with (t2i_samples.py's manifest) beside the score.
"""

from __future__ import annotations

import numpy as np

from monoformer_jax.evaluation import sample_dirs
from monoformer_jax.vision import clip_model
from monoformer_jax.vision.clip import clip_preprocess

# Settings of the sample directory's manifest reported beside the score.
REPORTED = ("num_prompts", "samples_per_prompt", "seed", "use_ema", "step", "sampling", "prompt_prefix")


def clip_scores(model: clip_model.CLIPModel, images: np.ndarray, texts, batch_size: int = 64) -> np.ndarray:
  """The CLIP score of each (uint8 image (H, W, 1 or 3), text) pair."""
  if len(images) != len(texts):
    raise ValueError(f"{len(images)} images but {len(texts)} texts")
  size, length = model.config.vision.image_size, model.config.text.max_position_embeddings
  unique = sorted(set(texts))
  text_emb = np.concatenate(
      [
          np.asarray(clip_model.text_embeds(model, model.tokenizer.batch(unique[i : i + batch_size], length)))
          for i in range(0, len(unique), batch_size)
      ]
  )
  by_text = dict(zip(unique, text_emb))
  scores = []
  for i in range(0, len(images), batch_size):
    chunk = images[i : i + batch_size]
    image_emb = np.asarray(clip_model.image_embeds(model, clip_preprocess(chunk, size)))
    scores.append(clip_model.clip_scores(image_emb, np.stack([by_text[t] for t in texts[i : i + batch_size]])))
  return np.concatenate(scores)


def clip_score_suite(sample_dir: str, prompts, clip_path: str, batch_size: int = 64) -> dict:
  """The mean CLIP score of a t2i_samples directory (every chunk checked present) and the
  settings it was drawn with."""
  manifest = sample_dirs.read_manifest(sample_dir) or {}
  images, labels = sample_dirs.load_samples(sample_dir)
  if manifest.get("num_prompts") != len(prompts):
    raise ValueError(f"{sample_dir} holds samples of {manifest.get('num_prompts')} prompts, not these {len(prompts)}")
  model = clip_model.load_clip_model(clip_path)
  scores = clip_scores(model, images, [prompts[int(k)] for k in labels], batch_size)
  return {
      "clip_score": float(scores.mean()),
      "clip_score_std": float(scores.std()),
      "num_samples": int(len(scores)),
      "resolution": list(images.shape[1:3]),
      "clip_model": clip_path,
      "sample_dir": sample_dir,
      **{k: manifest.get(k) for k in REPORTED},
  }
