"""Building a :class:`jvdm.model.VDM` from an experiment config, and initialising it.

The only model-level code that reads a config (``ml_collections``): it turns the config's fields
into the explicit arguments of the networks and of :class:`~jvdm.model.VDM`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jvdm import parallel
from jvdm.model import VDM, VDMParams, init
from jvdm.nn import gamma as gamma_lib
from jvdm.nn.gaussian_base import GaussianBase

__all__ = ["from_config", "gaussian_fit", "init_params"]


def from_config(config) -> VDM:
    """Builds the :class:`VDM` that an experiment config describes."""
    from jvdm.datasets import image_shape as dataset_shape  # the catalogue: no tfds, no data
    from jvdm.nn import unet as unet_lib

    image_shape = dataset_shape(config.data.name, config.data.data_dir)
    m, g = config.model, config.gamma
    denoiser = unet_lib.UNet(
        channels=m.channels,
        channel_mult=tuple(m.channel_mult),
        num_res_blocks=m.num_res_blocks,
        attention_resolutions=tuple(m.attention_resolutions),
        num_heads=m.num_heads,
        num_groups=m.num_groups,
        dropout=m.dropout,
        use_fourier_features=m.use_fourier_features,
        fourier_min=m.fourier_min,
        fourier_max=m.fourier_max,
        gamma_min=g.gamma_min,
        gamma_max=g.gamma_max,
        dtype=jnp.bfloat16 if m.dtype == "bfloat16" else jnp.float32,
        use_remat=m.use_remat,
    )
    if m.gaussian_base:
        # The net learns the residual of the training images' best linear denoiser, whose fit
        # the trainer puts in the model's variables (jvdm.nn.gaussian_base).
        denoiser = GaussianBase(
            net=denoiser,
            prediction=m.prediction,
            log_snr_center=m.gaussian_base_log_snr,
            components=m.gaussian_base_components,
            rank=m.gaussian_base_rank,
        )
    if g.schedule == "learned":
        schedule = gamma_lib.LearnedGamma(
            gamma_min_init=g.gamma_min, gamma_max_init=g.gamma_max, hidden=g.hidden
        )
    elif g.schedule == "linear":
        schedule = gamma_lib.FixedLinearGamma(gamma_min=g.gamma_min, gamma_max=g.gamma_max)
    elif g.schedule == "cosine":
        schedule = gamma_lib.CosineGamma(gamma_min=g.gamma_min, gamma_max=g.gamma_max)
    else:
        schedule = gamma_lib.DDPMGamma(timesteps=g.ddpm_timesteps)
    return VDM(
        denoiser=denoiser,
        schedule=schedule,
        image_shape=tuple(image_shape),
        timesteps=m.timesteps,
        prediction=m.prediction,
        use_antithetic_time=m.use_antithetic_time,
        use_variance_gradient=g.use_variance_gradient,
        variance_gradient=g.variance_gradient,
        weighting=m.weighting,
        sigmoid_bias=m.sigmoid_bias,
        sigmoid_scale=m.sigmoid_scale,
        noise_sampling=m.noise_sampling,
        histogram_bins=m.histogram_bins,
        histogram_decay=m.histogram_decay,
        histogram_uniform_fraction=m.histogram_uniform_fraction,
        band_log_snr=tuple(float(v) for v in m.band_log_snr),
        band_fraction=m.band_fraction,
    )


def gaussian_fit(config):
    """The Gaussian (or mixture) fit of ``config.data.train_split`` that a model with
    ``model.gaussian_base`` adds to its network (:func:`jvdm.reference_denoisers.fit_split`,
    cached), else ``None``."""
    m = config.model
    if not m.gaussian_base:
        return None
    from jvdm import reference_denoisers

    d = config.data
    return reference_denoisers.fit_split(
        d.name,
        d.train_split,
        d.data_dir,
        VDM.vocab_size,
        m.gaussian_base_components,
        m.gaussian_base_rank,
    )


def init_params(config, key: jax.Array) -> VDMParams:
    """The model of ``config``, initialised (one compiled program per model), with its Gaussian
    base fitted to the training split if it has one."""
    # Op by op, the U-Net's initialisation dispatches hundreds of small programs (20 s for the
    # tests' tiny model on CPU); compiled, it is one.
    model = from_config(config)
    return parallel.jit_run_once(init, (0,))(model, key, gaussian_fit=gaussian_fit(config))
