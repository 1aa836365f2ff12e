"""Same data and budget as `learned_snr`, with the cosine schedule (same gamma end points)."""

from jvdm.config import base_config


def get_config():
    config = base_config()
    config.gamma.schedule = "cosine"
    return config
