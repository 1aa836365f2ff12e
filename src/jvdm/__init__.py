"""jvdm: Variational Diffusion Models in JAX/Flax.

``import jvdm`` imports nothing but this file and changes no process state: each public name is
imported from its module on first use (PEP 562). The CPU runtime defaults that jvdm measured
(``XLA_FLAGS``, host memory reuse, synchronous CPU dispatch) are applied by the ``jvdm`` command
before JAX starts; a script that wants them calls :func:`jvdm.configure_cpu_runtime` first thing.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public name -> the module that defines it.
_SOURCES: dict[str, str] = {
    # runtime
    "configure_cpu_runtime": "jvdm._xla_defaults",
    # errors
    "JvdmUserError": "jvdm.errors",
    # schedules
    "alpha_bar": "jvdm.schedules",
    "alpha_bar_from_gamma": "jvdm.schedules",
    "cosine_alpha_bar": "jvdm.schedules",
    "gamma_from_alpha_bar": "jvdm.schedules",
    "linear_betas": "jvdm.schedules",
    "sigma_sq_from_gamma": "jvdm.schedules",
    "snr": "jvdm.schedules",
    "snr_from_gamma": "jvdm.schedules",
    # diffusion
    "posterior_mean_var": "jvdm.diffusion",
    "q_sample": "jvdm.diffusion",
    # losses
    "bpd_from_nats": "jvdm.losses",
    "continuous_diffusion_loss": "jvdm.losses",
    "decoder_log_likelihood": "jvdm.decoder",
    "decoder_log_probs": "jvdm.decoder",
    "denoising_matching_kl": "jvdm.losses",
    "discrete_diffusion_loss": "jvdm.losses",
    "gaussian_kl": "jvdm.losses",
    "prior_kl": "jvdm.losses",
    "prior_kl_from_gamma": "jvdm.losses",
    "scale_pixels": "jvdm.decoder",
    "snr_weighted_loss": "jvdm.losses",
    # weighted losses (VDM++) and importance-sampled noise levels
    "diffusion_weight": "jvdm.weighting",
    "log_diffusion_weight": "jvdm.weighting",
    "weighted_diffusion_loss": "jvdm.weighting",
    "WEIGHTINGS": "jvdm.weighting",
    "band_density": "jvdm.noise_sampling",
    "band_interval": "jvdm.noise_sampling",
    "band_positions": "jvdm.noise_sampling",
    "bin_probabilities": "jvdm.noise_sampling",
    "init_histogram": "jvdm.noise_sampling",
    "sample_positions": "jvdm.noise_sampling",
    "update_histogram": "jvdm.noise_sampling",
    # reference denoisers: exact posterior means of a Gaussian, a mixture and a finite support
    "GaussianFit": "jvdm.reference_denoisers",
    "MixtureFit": "jvdm.reference_denoisers",
    "effective_support": "jvdm.reference_denoisers",
    "empirical_denoiser": "jvdm.reference_denoisers",
    "fit_gaussian": "jvdm.reference_denoisers",
    "fit_mixture": "jvdm.reference_denoisers",
    "fit_split": "jvdm.reference_denoisers",
    "gaussian_denoiser": "jvdm.reference_denoisers",
    "gaussian_prediction": "jvdm.reference_denoisers",
    "mixture_prediction": "jvdm.reference_denoisers",
    # sampling and likelihood
    "bpd": "jvdm.evaluate",
    "load": "jvdm.run",
    "ode_bpd": "jvdm.ode",
    "ode_log_likelihood": "jvdm.ode",
    "sample": "jvdm.sampling",
    "sample_quality": "jvdm.quality",
    # training
    "StateSpec": "jvdm.train_state",
    "TrainState": "jvdm.train_state",
    "create_train_state": "jvdm.train_state",
    "loss_and_grads": "jvdm.objective",
    "state_spec": "jvdm.train",
    "train_and_evaluate": "jvdm.train",
    "train_step": "jvdm.train_state",
}

__all__ = ["__version__", *_SOURCES]


def __getattr__(name: str) -> Any:
    # A submodule (`jvdm.model`, `jvdm.train`) is not in the table: `from jvdm import model` finds
    # no attribute here and imports it as a submodule.
    module = _SOURCES.get(name)
    if module is None:
        raise AttributeError(f"module 'jvdm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_SOURCES})
