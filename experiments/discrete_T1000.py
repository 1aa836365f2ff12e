"""Same data and budget as `learned_snr`, in discrete time with T = 1000 steps.

The learned schedule is kept; in discrete time the bound depends on the whole schedule, so it is
trained on the bound itself (the variance gradient applies to continuous time only).
"""

from jvdm.config import base_config


def get_config():
    config = base_config()
    config.model.timesteps = 1000
    return config
