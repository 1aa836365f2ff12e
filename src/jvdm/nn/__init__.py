"""Flax Linen modules: the U-Net denoiser, its group norm and the noise schedules gamma(t)."""

from jvdm.nn.gamma import (
    CosineGamma,
    DDPMGamma,
    FixedLinearGamma,
    LearnedGamma,
    endpoints,
    gamma_and_derivative,
)
from jvdm.nn.norm import GroupNorm, group_norm
from jvdm.nn.unet import UNet, count_params, forward_flops

__all__ = [
    "CosineGamma",
    "DDPMGamma",
    "FixedLinearGamma",
    "GroupNorm",
    "LearnedGamma",
    "UNet",
    "count_params",
    "endpoints",
    "forward_flops",
    "gamma_and_derivative",
    "group_norm",
]
