"""Flax Linen modules: the U-Net denoiser and the noise schedules gamma(t)."""

from jvdm.nn.gamma import (
    CosineGamma,
    DDPMGamma,
    FixedLinearGamma,
    LearnedGamma,
    endpoints,
    gamma_and_derivative,
)
from jvdm.nn.unet import UNet, count_params, forward_flops

__all__ = [
    "CosineGamma",
    "DDPMGamma",
    "FixedLinearGamma",
    "LearnedGamma",
    "UNet",
    "count_params",
    "endpoints",
    "forward_flops",
    "gamma_and_derivative",
]
