"""The paper's text-to-image recipe with chat beside it: configs/t2i256.py's captions and UltraChat
dialogues, 9:1, so that the model keeps chatting while it learns to draw.

Given t2i256's files and UltraChat's JSONL (lines {"data": [user, assistant, ...]}, or
ultrachat_200k's {"messages": [...]}):

    # 1. latents with their captions, as configs/t2i256.py step 1
    python -m monoformer_jax.tools.extract_latents --vae /path/to/sd-vae-ft-mse \
        --source image_text_jsonl --input /path/to/JourneyDB/train/train_anno.jsonl \
        --image_root /path/to/JourneyDB/train/images --image_key img_path --image_size 256 \
        --skip_bad_records --out /path/to/journeydb256_latents
    # 2. train (the dialogues: comma-separate several files)
    launch/tpu_pod.sh --config=configs/t2i_chat256.py --workdir=gs://BUCKET/runs/t2i_chat256 \
        --config.init_from=hf:/path/to/TinyLlama-1.1B-Chat-v1.0 \
        --config.data.image_path=/path/to/journeydb256_latents --config.vae.path=/path/to/sd-vae-ft-mse \
        --config.data.text_path=/path/to/ultrachat/train_0.jsonl,/path/to/ultrachat/train_1.jsonl
    # 3. samples: an image, and a dialogue (one question, or a file of them: one turn a line)
    python -m monoformer_jax.sample --workdir=gs://BUCKET/runs/t2i_chat256 \
        --t2i_prompt="a red bus in the snow" --out=bus.png
    python -m monoformer_jax.sample --workdir=gs://BUCKET/runs/t2i_chat256 \
        --chat="Can you briefly introduce Berlin?"
    python -m monoformer_jax.sample --workdir=gs://BUCKET/runs/t2i_chat256 --chat_file=questions.txt

Official settings (MonoFormer's configs/train_journeydb_ultrachat_9_1.py, its script): t2i256's, with
JourneyDB and UltraChat mixed 9:1 by weight, global batch 128 (8 x 8 x 2), loss weights
diffusion 1.0 / LM 0.01, dialogues without a chat template (`<s>{user}{answer}</s>`, the user
turn trained too: `train_on_source`), UltraChat's last user / assistant pair of each dialogue
(the official loader's), rows of at most 512 tokens. Not official: the mix is nine diffusion
steps to one text step (the scheduler's weights; every step's loss is weighted as in the
official mixed batch, the text steps' by 0.01) instead of a per-sample draw within each batch;
text rows are packed (exact: segments never see each other). `--config.data.chat_template=
human_assistant` trains and prompts in the configs' optional template (`### Human: ...
### Assistant: ...</s>`, only the answers trained).

Variants: `smoke` (tests/test_recipes.py: a few dialogues and captions, a tiny LLaMA, six steps
so that a text step runs), `dp`.
"""

import importlib.util
import os

T2I_CHAT_VARIANTS = ("smoke", "dp")


def _t2i():
  """configs/t2i256.py, loaded by path (config files are read by path: the repository root need
  not be importable)."""
  spec = importlib.util.spec_from_file_location("t2i256", os.path.join(os.path.dirname(__file__), "t2i256.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg: str = ""):
  t2i = _t2i()
  c = t2i.t2i_config()
  c.data.update(
      dict(
          image_batch_size=128,
          text_source="chat_jsonl",
          text_batch_size=128,
          text_seq_len=512,
          chat_template="none",
      )
  )
  c.schedule.update(dict(diffusion=9.0, ar=1.0))
  for variant in filter(None, arg.split(",")):
    t2i.apply_variant(c, variant, "t2i_chat256", T2I_CHAT_VARIANTS)
    if variant == "smoke":
      c.num_train_steps = 6  # the 9:1 round-robin's first text step is its sixth
      c.checkpoint_every_steps = c.sample_every_steps = 6
  return c
