"""`learned_snr` trained on the VDM++ sigmoid-weighted loss, ``w(lambda) = sigmoid(b - lambda)``.

The base config otherwise (the data, model and schedule of `learned_snr`, 1,800 fixed steps rather
than its time budget); the training objective's weighting of the noise levels is the sigmoid alone
(Kingma & Gao 2023, eq. 10). Evaluation still reports the ELBO in bpd.
"""

from jvdm.config import base_config


def get_config():
    config = base_config()
    config.model.weighting = "sigmoid"
    config.model.sigmoid_bias = 2.0
    return config
