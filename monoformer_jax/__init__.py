"""monoformer_jax: MonoFormer (arXiv 2409.16280) in JAX/Flax.

One LLaMA-style transformer, one parameter tree, two objectives: next-token prediction on text
(causal attention) and latent diffusion on images (bidirectional attention among the image tokens).
"""

__version__ = "0.1.0"

# Imported first: it points gcsfs at a GCS emulator named by STORAGE_EMULATOR_HOST before any
# gs:// path (ours or orbax's) creates a file system (see paths.py).
from monoformer_jax import paths as _paths  # noqa: F401,E402  pylint: disable=wrong-import-position
