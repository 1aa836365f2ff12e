"""`learned_snr` with its noise levels drawn from an online histogram of the loss (VDM++ section 5).

The objective is still the ELBO (``weighting="elbo"``), estimated by importance sampling of
``lambda``: each example is weighted by the inverse of the density it was drawn from, so the
estimate is unbiased and its variance lower (jvdm.noise_sampling). The base config otherwise: the
data and model of `learned_snr`, 1,800 fixed steps rather than its time budget.
"""

from jvdm.config import base_config


def get_config():
    config = base_config()
    config.model.noise_sampling = "adaptive"
    return config
