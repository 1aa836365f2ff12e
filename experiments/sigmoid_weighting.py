"""`learned_snr` trained on the VDM++ sigmoid-weighted loss, ``w(lambda) = sigmoid(b - lambda)``.

Same data, model, schedule and budget as `learned_snr`; only the training objective's weighting of
the noise levels changes (Kingma & Gao 2023, eq. 10). Evaluation still reports the ELBO in bpd.
"""

from jvdm.config import base_config


def get_config():
    config = base_config()
    config.model.weighting = "sigmoid"
    config.model.sigmoid_bias = 2.0
    return config
