"""The default experiment: a continuous-time VDM with a learned noise schedule on mnist_subset.

Sized for about 15 minutes on a 2-core CPU (`make train EXP=learned_snr`): 3,600 steps of batch 16,
with the model, batch, steps and learning rate chosen on the validation slice (bench/RESULTS.md).
"""

from jvdm.config import base_config


def get_config():
    return base_config()
