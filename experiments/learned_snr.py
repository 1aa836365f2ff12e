"""The default experiment: a continuous-time VDM with a learned noise schedule on mnist_subset.

Sized for at most 15 minutes on a 2-core CPU, install included (`make train EXP=learned_snr`): 1,800
steps of batch 16, with the model, its prediction and input features, batch, steps and learning
rate chosen on the validation slice (bench/RESULTS.md).
"""

from jvdm.config import base_config


def get_config():
    return base_config()
