"""Diffusion objectives of MonoFormer: the official IDDPM Gaussian diffusion and rectified flow.

Channels-last layout: x is (B, ..., C); a learn_sigma model outputs 2C channels (eps, then v).
"""

from monoformer_jax.diffusion.flow import (FLOW_SAMPLERS, flow_add_noise, flow_loss, flow_sample_loop)
from monoformer_jax.diffusion.gaussian import (
    GaussianDiffusion,
    ModelPrediction,
    Posterior,
    create_gaussian_diffusion,
    float64_tables,
    model_timesteps,
    p_mean_variance,
    predict_eps_from_xstart,
    predict_xstart_from_eps,
    q_mean_variance,
    q_posterior,
    q_sample,
    respaced_float64,
)
from monoformer_jax.diffusion.guidance import (
    CFG_MODES,
    cfg_denoise_fn,
    forward_with_cfg,
    guided_denoise_fn,
    guided_output,
)
from monoformer_jax.diffusion.losses import (
    discretized_gaussian_log_likelihood,
    min_snr_weight,
    normal_kl,
    training_losses,
    vb_terms_bpd,
)
from monoformer_jax.diffusion.noise import per_sample_noise_fn, sample_noise, step_noise
from monoformer_jax.diffusion.objective import (OBJECTIVE_KINDS, FlowObjective, GaussianObjective, make_objective)
from monoformer_jax.diffusion.options import OFFICIAL, ImageSampling, SamplingOptionError
from monoformer_jax.diffusion.samplers import (
    ddim_reverse_loop,
    ddim_sample_loop,
    ddim_step,
    ddpm_sample_loop,
    ddpm_step,
    dpm_solver_pp_2m_loop,
)
from monoformer_jax.diffusion.schedules import (
    BETA_SCHEDULES,
    cosine_betas,
    linear_betas,
    named_betas,
    spaced_timesteps,
)

__all__ = [
    "BETA_SCHEDULES",
    "CFG_MODES",
    "FLOW_SAMPLERS",
    "OBJECTIVE_KINDS",
    "FlowObjective",
    "GaussianDiffusion",
    "GaussianObjective",
    "ImageSampling",
    "ModelPrediction",
    "OFFICIAL",
    "Posterior",
    "SamplingOptionError",
    "cfg_denoise_fn",
    "cosine_betas",
    "create_gaussian_diffusion",
    "ddim_reverse_loop",
    "ddim_sample_loop",
    "ddim_step",
    "ddpm_sample_loop",
    "ddpm_step",
    "discretized_gaussian_log_likelihood",
    "dpm_solver_pp_2m_loop",
    "float64_tables",
    "flow_add_noise",
    "flow_loss",
    "flow_sample_loop",
    "forward_with_cfg",
    "guided_denoise_fn",
    "guided_output",
    "linear_betas",
    "make_objective",
    "min_snr_weight",
    "model_timesteps",
    "named_betas",
    "normal_kl",
    "p_mean_variance",
    "per_sample_noise_fn",
    "predict_eps_from_xstart",
    "predict_xstart_from_eps",
    "q_mean_variance",
    "q_posterior",
    "q_sample",
    "respaced_float64",
    "sample_noise",
    "spaced_timesteps",
    "step_noise",
    "training_losses",
    "vb_terms_bpd",
]
