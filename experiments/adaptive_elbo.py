"""`learned_snr` with its noise levels drawn from an online histogram of the loss (VDM++ section 5).

The objective is still the ELBO (``weighting="elbo"``), estimated by importance sampling of
``lambda``: each example is weighted by the inverse of the density it was drawn from, so the
estimate is unbiased and its variance lower (jvdm.noise_sampling). Same data, model and budget as
`learned_snr`.
"""

from jvdm.config import base_config


def get_config():
    config = base_config()
    config.model.noise_sampling = "adaptive"
    return config
