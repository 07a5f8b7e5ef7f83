"""The compiled samplers every caller draws through: cached text decoding, cached-prefix image
sampling, text and images in one call, class prompts to images.

Training's periodic samples, evaluation's FID samples, `InferenceModel`, the sample command and
the notebook all sample here, so what a user sees during training and in FID comes from the
same code as what the API returns.

    from monoformer_jax import sampling
    tokens = sampling.generate_tokens(params, config, [[1, 450, 4799]], max_new_tokens=32)
    options = ImageSampling(sampler="ddpm", num_steps=50, guidance_scale=4.0)
    images = sampling.sample_images(params, config, objective, prompts, uncond_prompt=[bos, ims],
                                    options=options)
"""

from monoformer_jax.diffusion.options import ImageSampling
from monoformer_jax.sampling.cache import (cache_logical_axes, cache_shardings, constrain_cache, init_cache)
from monoformer_jax.sampling.decode import decode_until, generate_tokens, pad_prompts, prefill
from monoformer_jax.sampling.image import (cached_model_fn, sample_images, sample_images_full_recompute, span_length)
from monoformer_jax.sampling.interleaved import (draw_pending, generate_interleaved, run_interleaved)
from monoformer_jax.sampling.tokens import TokenSampling, choose_tokens, filter_logits

__all__ = [
    "ImageSampling",
    "TokenSampling",
    "cache_logical_axes",
    "cache_shardings",
    "cached_model_fn",
    "choose_tokens",
    "constrain_cache",
    "decode_until",
    "draw_pending",
    "filter_logits",
    "generate_interleaved",
    "generate_tokens",
    "init_cache",
    "pad_prompts",
    "prefill",
    "run_interleaved",
    "sample_images",
    "sample_images_full_recompute",
    "span_length",
]
