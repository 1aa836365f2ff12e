"""jvdm: Variational Diffusion Models in JAX/Flax."""

# _xla_defaults must run before JAX creates its backend (it is imported first). `jvdm.train` stays
# the module (so `jvdm.train.train_step` and `import jvdm.train` work); the module is callable, so
# `jvdm.train(config, workdir)` runs `jvdm.train.train` (DESIGN.md).
from jvdm import _xla_defaults, train  # noqa: F401
from jvdm.diffusion import posterior_mean_var, q_sample
from jvdm.evaluate import bpd, load
from jvdm.losses import (
    bpd_from_nats,
    continuous_diffusion_loss,
    decoder_log_likelihood,
    decoder_log_probs,
    denoising_matching_kl,
    discrete_diffusion_loss,
    gaussian_kl,
    prior_kl,
    prior_kl_from_gamma,
    scale_pixels,
    snr_weighted_loss,
)
from jvdm.sampling import sample
from jvdm.schedules import (
    alpha_bar,
    alpha_bar_from_gamma,
    cosine_alpha_bar,
    gamma_from_alpha_bar,
    linear_betas,
    sigma_sq_from_gamma,
    snr,
    snr_from_gamma,
)
from jvdm.train import TrainState, create_train_state, train_step

__version__ = "0.1.0"

__all__: list[str] = []
__all__ += [
    # schedules
    "alpha_bar",
    "alpha_bar_from_gamma",
    "cosine_alpha_bar",
    "gamma_from_alpha_bar",
    "linear_betas",
    "sigma_sq_from_gamma",
    "snr",
    "snr_from_gamma",
    # diffusion
    "posterior_mean_var",
    "q_sample",
    # losses
    "bpd_from_nats",
    "continuous_diffusion_loss",
    "decoder_log_likelihood",
    "decoder_log_probs",
    "denoising_matching_kl",
    "discrete_diffusion_loss",
    "gaussian_kl",
    "prior_kl",
    "prior_kl_from_gamma",
    "scale_pixels",
    "snr_weighted_loss",
]
__all__ += [
    # sampling and likelihood
    "bpd",
    "load",
    "sample",
]
__all__ += [
    # training
    "TrainState",
    "create_train_state",
    "train",
    "train_step",
]
