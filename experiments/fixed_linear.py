"""`learned_snr` with a fixed schedule linear in gamma = -log SNR.

The same data, model, objective (the bound plus 3x the sigmoid weighting) and budget: only the
schedule differs, so `make train EXP=fixed_linear` against `make train EXP=learned_snr` is the
learned-against-fixed comparison of issue 17 (README).
"""

import pathlib

from jvdm.config import load_config_file


def get_config():
    config = load_config_file(pathlib.Path(__file__).with_name("learned_snr.py"))
    config.gamma.schedule = "linear"
    return config
