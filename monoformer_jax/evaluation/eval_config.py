"""The config of `python -m monoformer_jax.evaluate`: what to evaluate lives under `config.eval`.

    python -m monoformer_jax.evaluate --workdir DIR --config.eval.suite=mc,perplexity \\
        --config.eval.tasks_dir=~/commonsense --config.eval.text_file=held_out.txt

This file is the default `--config`; `--config=my_eval.py` loads any file with a `get_config()` of the
same shape. The flag locks the config, so a misspelt field is refused by name before anything runs.
Empty strings and zeros mean "not given" / "the default", because a locked ConfigDict cannot take a
value of another type than its default (None fields could not be overridden from the command line).
This file is loaded by path as well as imported, so it imports nothing but ml_collections.
"""

import ml_collections


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  del arg  # no variants
  c = ml_collections.ConfigDict()
  c.eval = ml_collections.ConfigDict(
      dict(
          # Comma-separated suites: mc, perplexity, mnist, fid, clip_score. Empty: every suite whose
          # input is given (mc: tasks_dir; perplexity: text_file; fid: inception_weights; mnist:
          # samples without inception_weights; clip_score: prompts). `--suite` and `--prompts` set
          # suite and prompts too.
          suite="",
          # mc: a directory of <task>.jsonl files; tasks: comma-separated (empty: every task file).
          tasks_dir="",
          tasks="",
          limit=0,  # at most this many examples per task (0: all)
          add_bos=True,  # start every context with the BOS token
          # perplexity: UTF-8 text, sliding windows of max_len advancing by stride (0: max_len).
          text_file="",
          stride=0,
          max_chars=0,  # score only the text's first characters (0: all)
          # Language suites: the run's EMA weights (or not), rows per batch, positions per request
          # (0: the model's max_position_embeddings), row length that short requests are packed into.
          use_ema=True,
          batch_size=16,
          max_len=0,
          pack_len=256,
          # mnist and fid: generated images, an .npz with `images` (or `arr_0`) uint8 (N, H, W, C) and
          # optionally `labels`, or a directory written by `monoformer_jax.evaluation.fid_samples`.
          samples="",
          # mnist: real digits (.npz with `images`) for the digit FID (empty: the MNIST-5k digits), and
          # where the digit classifier is cached (empty: ~/.cache/monoformer_jax).
          digit_reference="",
          classifier_cache="",
          # fid: the FID Inception weights (pytorch-fid's pt_inception-2015-12-05-*.pth) and the
          # reference: an ADM-style .npz (`mu`/`sigma`, else uint8 images in `arr_0`) or an image folder.
          inception_weights="",
          reference="",
          inception_batch_size=100,
          is_splits=10,  # Inception Score: mean and std over this many splits of the samples
          # clip_score: text-to-image samples of the prompts file (the official sampler's
          # parti_prompts.json: a JSON list of {"prompt"}; or JSONL, a TSV with a Prompt column, or
          # one a line), prompt i mod P for sample i, scored by the CLIPModel folder clip_model.
          # Drawn into sample_dir (empty: WORKDIR/eval/clip_score_samples, resumable; a later fid
          # suite without samples scores them) with the run's config.sampling, or sampler /
          # num_steps / guidance_scale when given (""/0: the run's).
          prompts="",
          clip_model="",
          samples_per_prompt=1,
          num_prompts=0,  # only the file's first prompts (0: all)
          sample_dir="",
          seed=0,
          chunk=64,
          sampler="",
          num_steps=0,
          guidance_scale=0.0,
          clip_batch_size=64,
      )
  )
  return c
