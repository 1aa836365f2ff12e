"""One home for the argument checks that several modules share, each with one message.

Every check raises :class:`jvdm.errors.JvdmUserError` (a ``ValueError``) whose one line names the
argument, the value it got and what it should be. This module imports nothing but the standard
library, so the config, the networks, the samplers and the CLI (whose ``--help`` must stay fast) can
all use it: it sits below them all.

The *names* that a config may choose from live here, the lowest layer, because the config checks
them without importing JAX; the modules that implement them import them from here. The samplers
themselves (name, order, init, step) are one table in :mod:`jvdm.samplers`, which asserts that its
keys are exactly :data:`SAMPLER_NAMES`; :mod:`jvdm.weighting` dispatches on :data:`WEIGHTINGS`, and
:class:`jvdm.model.VDM` checks :data:`PREDICTIONS`, :data:`NOISE_SAMPLINGS` and
:data:`VARIANCE_GRADIENTS`.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

from jvdm.errors import JvdmUserError

__all__ = [
    "NOISE_SAMPLINGS",
    "PREDICTIONS",
    "SAMPLER_GRIDS",
    "SAMPLER_NAMES",
    "VARIANCE_GRADIENTS",
    "WEIGHTINGS",
    "check_params",
    "check_gamma_order",
    "check_images",
    "check_sampler",
    "check_sampler_grid",
    "check_sides_divide",
    "positive_int",
]

SAMPLER_NAMES = ("ancestral", "ddim", "dpm_solver")
# the grids a sampler can walk: uniform in t, in lambda = -gamma/2, or in (sigma/alpha)^(1/7)
# (Karras et al. 2022; jvdm.samplers.gamma_grid)
SAMPLER_GRIDS = ("time", "lambda", "karras")
PREDICTIONS = ("eps", "x0", "v")  # what the denoiser outputs
# w(lambda) of the training loss
WEIGHTINGS = ("elbo", "sigmoid", "elbo_sigmoid", "edm", "edm_monotone", "v_mse")
NOISE_SAMPLINGS = ("uniform_t", "adaptive", "band")  # how training draws the noise levels
# how the learned schedule's interior estimates the gradient of the loss variance
VARIANCE_GRADIENTS = ("density", "pathwise")


def positive_int(value, name: str, what: str = "") -> int:
    """``int(value)`` if it is an integer > 0 (not a bool), else a one-line error.

    Args:
      value: the argument to check.
      name: its name, as the caller wrote it (``"steps"``, ``"config.train.steps"``).
      what: an optional noun phrase appended to "a positive integer" (``" number of images"``).
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise JvdmUserError(f"{name}={value!r}; expected a positive integer{what}")
    return int(value)


def check_params(params, params_type: type) -> None:
    """Requires a model's parameters; ``params_type`` is :class:`jvdm.model.VDMParams` (passed in,
    so that this module stays below the model)."""
    if not isinstance(params, params_type):
        raise JvdmUserError(
            f"params must be a jvdm VDMParams (from jvdm.load or model.init); got {type(params)}"
        )


def check_sampler(name, where: str = "sampler") -> str:
    """``name`` if it names a sampler (:data:`SAMPLER_NAMES`), else a one-line error."""
    if name not in SAMPLER_NAMES:
        raise JvdmUserError(f"{where}={name!r}; expected one of {', '.join(SAMPLER_NAMES)}")
    return name


def check_sampler_grid(grid, where: str = "grid") -> str | None:
    """``grid`` if it names a sampler grid (:data:`SAMPLER_GRIDS`) or is ``None`` (the sampler's
    default), else a one-line error."""
    if grid is not None and grid not in SAMPLER_GRIDS:
        raise JvdmUserError(
            f"{where}={grid!r}; expected one of {', '.join(SAMPLER_GRIDS)} (or none: the default)"
        )
    return grid


def check_gamma_order(gamma_min, gamma_max, prefix: str = "", suffix: str = "") -> None:
    """Requires ``gamma_max > gamma_min`` (the schedule increases from ``t = 0`` to ``t = 1``).

    Args:
      gamma_min, gamma_max: the end points (Python or NumPy scalars; not traced values).
      prefix, suffix: around the names in the message, so that it names the caller's fields
        (``prefix="config.gamma."``, ``suffix="_init"``).
    """
    if not gamma_max > gamma_min:
        lo, hi = f"{prefix}gamma_min{suffix}", f"{prefix}gamma_max{suffix}"
        raise JvdmUserError(
            f"need {hi} > {lo} (the noise level rises with t); got {lo}={gamma_min!r}, "
            f"{hi}={gamma_max!r}"
        )


def check_sides_divide(image_shape: Sequence[int], channel_mult: Sequence[int], what: str) -> None:
    """Requires H and W to be multiples of ``2 ** (len(channel_mult) - 1)``: the U-Net halves them
    once per extra resolution level and must return to the input's shape.

    Args:
      image_shape: ``(H, W, C)`` (or ``[B, H, W, C]``; the last three are used).
      channel_mult: the U-Net's channel multipliers, one per resolution.
      what: where the shape comes from (``"dataset 'mnist'"``, ``"the denoiser's input"``).
    """
    h, w, c = tuple(image_shape)[-3:]
    factor = 2 ** (len(channel_mult) - 1)
    if h % factor or w % factor:
        raise JvdmUserError(
            f"{what}: H and W must be multiples of {factor}, as channel_mult={tuple(channel_mult)} "
            f"halves them {len(channel_mult) - 1} times; got (H, W, C) = {(h, w, c)}: resize to "
            f"multiples of {factor} or use fewer resolution levels"
        )


def check_images(images, image_shape: Sequence[int], what: str = "images") -> None:
    """Requires raw 8-bit images: uint8 ``[B, H, W, C]`` with ``B >= 1`` and the model's shape.

    Args:
      images: anything with ``shape`` and ``dtype`` (a NumPy or JAX array).
      image_shape: the expected ``(H, W, C)``.
      what: how to name the array in the message (``"images"``, ``"dataset 'mnist' gives images"``).
    """
    shape = getattr(images, "shape", None)
    dtype = getattr(images, "dtype", None)
    expected = f"uint8 [B, {', '.join(map(str, image_shape))}] (pixel values 0..255)"
    if shape is None or dtype is None:
        raise JvdmUserError(f"{what} must be an array, {expected}; got {type(images)}")
    if len(shape) != 4 or tuple(shape[1:]) != tuple(image_shape) or shape[0] < 1:
        mismatch = ""
        if len(shape) == 4 and tuple(shape[1:]) != tuple(image_shape):
            mismatch = (
                f": images of {tuple(shape[1:])}, but the model was built for {tuple(image_shape)}"
            )
        raise JvdmUserError(f"{what} have shape {tuple(shape)}; expected {expected}{mismatch}")
    if dtype != "uint8":  # NumPy and JAX dtypes compare equal to their names
        raise JvdmUserError(
            f"{what} have dtype {dtype}; expected {expected}. Pass the raw 8-bit images, not "
            "scaled floats"
        )
