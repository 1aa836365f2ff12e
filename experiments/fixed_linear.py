"""Same data and budget as `learned_snr`, with a fixed schedule linear in gamma = -log SNR."""

from jvdm.config import base_config


def get_config():
    config = base_config()
    config.gamma.schedule = "linear"
    return config
