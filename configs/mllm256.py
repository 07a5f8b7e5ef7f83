"""The paper's understanding recipe (the official main branch): configs/t2i256.py's captions beside
LLaVA-665k instruction data, images read through a frozen CLIP ViT-L/14.

Given t2i256's files, LLaVA's `llava_v1_5_mix665k.json` with its image folders (coco/, gqa/,
ocr_vqa/, textvqa/, vg/ under one root) and `openai/clip-vit-large-patch14` (a transformers
folder):

    # 1. latents with their captions, as configs/t2i256.py step 1
    python -m monoformer_jax.tools.extract_latents --vae /path/to/sd-vae-ft-mse \
        --source image_text_jsonl --input /path/to/JourneyDB/train/train_anno.jsonl \
        --image_root /path/to/JourneyDB/train/images --image_key img_path --image_size 256 \
        --skip_bad_records --out /path/to/journeydb256_latents
    # 2. train (LLaVA's images are read and centre-cropped as the steps need them)
    launch/tpu_pod.sh --config=configs/mllm256.py --workdir=gs://BUCKET/runs/mllm256 \
        --config.init_from=hf:/path/to/TinyLlama-1.1B-Chat-v1.0 \
        --config.data.image_path=/path/to/journeydb256_latents --config.vae.path=/path/to/sd-vae-ft-mse \
        --config.data.understand_path=/path/to/llava_v1_5_mix665k.json \
        --config.data.understand_image_root=/path/to/llava_images \
        --config.input_images.clip_path=/path/to/clip-vit-large-patch14
    # 3. answers about images (free-form), and images from text
    python -m monoformer_jax.sample --workdir=gs://BUCKET/runs/mllm256 \
        --describe=bus.jpg,street.png --question="What is unusual about this image?" --out=answers.json
    python -m monoformer_jax.sample --workdir=gs://BUCKET/runs/mllm256 \
        --t2i_prompt="a red bus in the snow" --out=bus.png

Official settings (MonoFormer's configs/train_llava_journeydb.py, its main branch): t2i256's, with JourneyDB
and LLaVA mixed 1:1, CLIP ViT-L/14 frozen, read at its penultimate layer without CLS (256 tokens
of 1024 for its 224x224 input) through `im_embedder` (Linear, GELU, Linear), the read image's
tokens causal (`bidirectional_input_image` off, as the official mask leaves them), LLaVA rows of
at most 512 tokens without a chat template, loss weights diffusion 1.0 / LM 0.01. Not official:
  * the mix is one diffusion step to one understanding step of the same batch size (the
    scheduler's weights) instead of a per-sample draw within each batch;
  * global batch 256 for each step kind (the official README's; its script is a 2-GPU debug
    run of 16 with a checkpoint every 10 steps);
  * only the answers are trained (the official code trains the questions too, train_on_source);
  * the image stands where its `<image>` placeholder does between `<|im_start|>` and
    `<|im_end|>` (the official multimodal inference's layout; its training put the bare image
    tokens, and a t-token of a random timestep, there);
  * a record whose image is missing is an error naming it, or skipped with
    data.skip_bad_records (the official loader trains on a blank image instead).

Variants: `smoke` (tests/test_recipes.py: a few LLaVA records, a tiny random CLIP and LLaMA in
Hugging Face format, captions through a tiny VAE), `dp`.
"""

import importlib.util
import os

MLLM_VARIANTS = ("smoke", "dp")


def _t2i():
  """configs/t2i256.py, loaded by path (config files are read by path)."""
  spec = importlib.util.spec_from_file_location("t2i256", os.path.join(os.path.dirname(__file__), "t2i256.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg: str = ""):
  t2i = _t2i()
  c = t2i.t2i_config()
  c.model.update(dict(input_embedder="im_embedder", bidirectional_input_image=False))
  c.input_images.update(dict(encoder="clip", clip_layer=-2, image_size=224))  # ViT-L/14's input
  c.data.update(
      dict(
          understand_source="llava",
          understand_batch_size=256,
          understand_seq_len=512,
          # The default question of `sample --describe` (training reads each record's own).
          understand_question="Describe this image.",
          chat_template="none",
      )
  )
  c.schedule.update(dict(diffusion=1.0, understand=1.0))
  for variant in filter(None, arg.split(",")):
    t2i.apply_variant(c, variant, "mllm256", MLLM_VARIANTS)
    if variant == "smoke":
      c.input_images.image_size = 32  # LLaVA's images cropped to 32 px; CLIP resizes them to its own
      c.data.update(dict(understand_batch_size=8, understand_seq_len=96))
  return c
