"""The paper's ablations at the embedded default's scale (configs/mnist_tiny.py): LLM init against
training from scratch, a bidirectional against a causal mask among an image's tokens, and the LM
loss kept or dropped during image training. Our own text-only pretraining stands in for TinyLlama.

    python -m monoformer_jax.main --config=configs/mnist_ablations.py:text_pretrain \
        --workdir=runs/ablations/text_pretrain
    python -m monoformer_jax.main --config=configs/mnist_ablations.py:llm_init \
        --config.init_from=run:runs/ablations/text_pretrain --workdir=runs/ablations/llm_init

`python benchmarks/ablations.py` runs every arm on several seeds and evaluates them (the command
to use: it also hands every arm of a seed the pretraining run's tokenizer, so that they all read
the same token ids).

Variants (`--config=configs/mnist_ablations.py:VARIANT`):
  text_pretrain  the default's transformer trained on its prose only (AR steps, no images): the
          "pretrained LLM" the init arms start from. The image source stays set, so the tokenizer
          is trained on the same corpus (prose + the digit prompts) as the other arms'.
  scratch       the default, from a fresh initialisation (the paper's "w/o LLM init").
  llm_init      the default, initialised from the text_pretrain run (`init_from`, default
                run:runs/ablations/text_pretrain; the benchmark passes each seed's own).
  causal_image  llm_init with a causal mask among an image's tokens (model.bidirectional_image).
  no_lm_loss    llm_init with diffusion steps only: no text steps, no LM loss while images train.
  ARM,test      each of the above shrunk as mnist_tiny.py:test (what tests/test_ablations.py runs).

The arms run 1,800 steps of 32 digits with Min-SNR-5, sampled at guidance 4 (the scale
benchmarks/ablations/ reports), and differ only in what they name (the same batches, learning
rate and schedule), so that each differs from llm_init in one thing. no_lm_loss takes as many
image steps as the others, which spend a tenth of theirs on text (1,620 steps in all against
their 1,800). Every run keeps a checkpoint every 300 steps (270 for no_lm_loss: the same image
steps), all of them, so that quality can be measured over training afterwards.
"""

import importlib.util
import os

from monoformer_jax.train.scheduler import StepScheduler


def _mnist_tiny():
  """configs/mnist_tiny.py, loaded by path: config files are read by path (config_flags), so the
  repository root need not be importable."""
  spec = importlib.util.spec_from_file_location("mnist_tiny", os.path.join(os.path.dirname(__file__), "mnist_tiny.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


PRETRAIN = "text_pretrain"
ARMS = ("scratch", "llm_init", "causal_image", "no_lm_loss")
VARIANTS = (PRETRAIN,) + ARMS
DEFAULT_INIT = "run:runs/ablations/text_pretrain"


def get_config(arg: str = ""):
  parts = [p.strip() for p in arg.split(",") if p.strip()]
  test = "test" in parts
  named = [p for p in parts if p != "test"]
  if len(named) != 1 or named[0] not in VARIANTS:
    raise ValueError(
        f"unknown variant {arg!r} of mnist_ablations: one of {', '.join(VARIANTS)}, optionally with ',test'"
    )
  variant = named[0]
  c = _mnist_tiny().get_config("test" if test else "")
  # Every interval's checkpoint is kept: the benchmark evaluates each one after training.
  c.keep_checkpoints = 10_000
  if test:
    # No digit grid at the end of a run: the benchmark draws its own digits, and the grid's own
    # sampler compile would be a good part of the smoke test's time.
    c.sampling.grid_classes = 0
  else:
    c.checkpoint_every_steps = 300
    c.num_train_steps = 1800
    c.data.image_batch_size = 32
    c.objective.min_snr_gamma = 5.0
    c.sampling.guidance_scale = 4.0
  if variant == PRETRAIN:
    # As many steps as an image arm (a text step costs about what a diffusion step does), at the
    # default's text batch (~18 passes over pydoc's training tokens).
    c.schedule.update(dict(diffusion=0.0, ar=1.0, mixed=0.0))
  elif variant != "scratch":
    c.init_from = DEFAULT_INIT
    if variant == "causal_image":
      c.model.bidirectional_image = False
    elif variant == "no_lm_loss":
      # As many image steps as the other arms take (they spend a tenth of theirs on text), so that
      # only the LM loss differs; its checkpoints fall on the same image-step counts as theirs.
      c.num_train_steps = image_steps(c, c.num_train_steps)
      c.checkpoint_every_steps = image_steps(c, c.checkpoint_every_steps)
      c.schedule.update(dict(diffusion=1.0, ar=0.0, mixed=0.0))
      c.data.lm_loss_on_image_prompts = False  # the default already: no LM loss on image prompts
  # The cosine schedule ends where the run does, also when --config.num_train_steps changes it.
  c.optimizer.decay_steps = c.get_ref("num_train_steps")
  return c


def image_steps(config, steps: int) -> int:
  """How many of the first `steps` steps of `config`'s schedule are diffusion steps (the
  scheduler is a deterministic round-robin: train/scheduler.py)."""
  schedule = config.schedule
  scheduler = StepScheduler(
      {k: schedule[k] for k in ("diffusion", "ar", "mixed", "understand")}, schedule.text_warmup_steps
  )
  return sum(scheduler.next(s) in ("diffusion", "mixed") for s in range(steps))
