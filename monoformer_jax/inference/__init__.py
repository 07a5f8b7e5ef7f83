"""Inference: cached text generation, cached-prefix image sampling, text and images in one call.

    from monoformer_jax import inference
    tokens = inference.generate_tokens(params, config, [[1, 450, 4799]], max_new_tokens=32)
    images = inference.sample_images(params, config, objective, prompts, uncond_prompt=[bos, ims],
                                     guidance_scale=4.0, sampler="ddpm", num_steps=50)
    model = inference.InferenceModel.from_workdir("runs/mnist_tiny")   # strings in, images out
"""

from monoformer_jax.inference.cache import (cache_logical_axes, cache_shardings, constrain_cache,
                                            init_cache)
from monoformer_jax.inference.decode import decode_until, generate_tokens, pad_prompts, prefill
from monoformer_jax.inference.image import (DEFAULT_CLASS_TEMPLATE, cached_model_fn,
                                            sample_images, sample_images_full_recompute,
                                            span_length)
from monoformer_jax.inference.interleaved import (draw_pending, generate_interleaved,
                                                  run_interleaved)
from monoformer_jax.inference.tokens import TokenSampling, choose_tokens, filter_logits
from monoformer_jax.inference.api import InferenceError, InferenceModel, check_params

__all__ = [
    "DEFAULT_CLASS_TEMPLATE", "InferenceError", "InferenceModel", "TokenSampling", "check_params", "cache_logical_axes", "cache_shardings",
    "cached_model_fn", "choose_tokens", "constrain_cache", "decode_until", "draw_pending",
    "filter_logits", "generate_interleaved", "generate_tokens", "init_cache", "pad_prompts",
    "prefill", "run_interleaved", "sample_images", "sample_images_full_recompute", "span_length",
]
