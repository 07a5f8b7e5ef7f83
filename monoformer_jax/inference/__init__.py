"""Inference for users: `InferenceModel` (a run or a converted checkpoint; strings in, images and
text out). The compiled samplers it draws through are `monoformer_jax.sampling`.

    from monoformer_jax.inference import InferenceModel
    model = InferenceModel.from_workdir("runs/mnist_tiny")
    images, labels = model.sample_classes(["seven", 3], num_per_class=4)
"""

from monoformer_jax.inference.api import InferenceError, InferenceModel, check_params

__all__ = ["InferenceError", "InferenceModel", "check_params"]
