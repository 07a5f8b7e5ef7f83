"""monoformer_jax: MonoFormer (arXiv 2409.16280) in JAX/Flax.

One LLaMA-style transformer, one parameter tree, two objectives: next-token prediction on text
(causal attention) and latent diffusion on images (bidirectional attention among the image tokens).
"""

__version__ = "0.1.0"
