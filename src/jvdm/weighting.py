r"""Weighted diffusion losses (VDM++): the weightings ``w(lambda)`` of the noise level.

With ``lambda = log SNR = -gamma``, the weighted diffusion loss of Kingma & Gao (2023) is

.. math::
  L_w(x) = \tfrac12\, E_{t \sim U(0,1),\, \epsilon}\Big[w(\lambda_t)\,
           \big(-\tfrac{d\lambda}{dt}\big)\, \|\epsilon - \hat\epsilon(z_t; \lambda_t)\|^2\Big]
         = \tfrac12 \int_{\lambda_{\min}}^{\lambda_{\max}} w(\lambda)\,
           E_\epsilon \|\epsilon - \hat\epsilon\|^2 \, d\lambda,

so ``-dlambda/dt = gamma'(t)`` and ``w = 1`` is the ELBO's diffusion term (VDM eq. 17). For a
``w`` that is non-increasing in ``lambda``, ``L_w`` is the ELBO of noise-augmented data averaged
over noise levels (VDM++ section 4): ``L_w = -int w'(lambda) ELBO_lambda d lambda + const``.

Each weighting is given as its log, finite for every finite ``lambda`` (no overflow however far
the schedule's end points move), and as ``exp`` of it. Table (VDM++ table 1, ``sigma_data = 0.5``):

==============  ===============================================================================
``elbo``        ``w = 1``
``sigmoid``     ``w = sigmoid(b - lambda)`` with bias ``b`` (VDM++ eq. 10)
``elbo_sigmoid`` ``w = 1 + c sigmoid(b - lambda)``: the ELBO plus ``c`` times the sigmoid
                weighting. The low-noise end keeps the ELBO's weight (where most of the bits are),
                the middle and the noisy end get up to ``1 + c`` times it (where the samples'
                shapes are made); non-increasing, so the VDM++ reading applies
``edm``         ``w = N(lambda; 2.4, 2.4^2) (e^{-lambda} + sigma_data^2) / sigma_data^2``
``edm_monotone`` the smallest non-increasing function above ``edm``: ``edm(max(lambda, l*))``
                with ``l*`` its mode, so that VDM++'s ELBO reading applies (section 4)
``v_mse``       ``w = e^{-lambda / 2}``: v-prediction MSE under the cosine schedule
==============  ===============================================================================

``v_mse``'s weight itself exceeds float32 for ``lambda < -177`` (``SNR < 1e-77``): its log does not.

References: Kingma & Gao, *Understanding Diffusion Objectives as the ELBO with Simple Data
Augmentation* (arXiv 2303.00848), eq. 7, table 1 and section 4; Karras et al. 2022 (EDM).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

from jvdm.validate import WEIGHTINGS  # the names, kept where reading a config imports no JAX

__all__ = [
    "EDM_MODE",
    "WEIGHTINGS",
    "diffusion_weight",
    "log_diffusion_weight",
    "weighted_diffusion_loss",
]

# EDM's training distribution of log sigma is N(-1.2, 1.2^2), i.e. lambda = -2 log sigma is
# N(2.4, 2.4^2); its loss weight (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 turns into
# (e^{-lambda} + sigma_data^2) / sigma_data^2 per unit of eps-space loss (Karras et al. 2022).
_EDM_MEAN, _EDM_STD, _EDM_LOG_SIGMA_DATA_SQ = 2.4, 2.4, 2.0 * math.log(0.5)


def _edm_log_slope(lam: float) -> float:
    # d/dlambda log w_edm = -(lambda - mu) / s^2 - e^{-lambda} / (e^{-lambda} + sigma_data^2).
    ratio = 1.0 / (1.0 + math.exp(lam + _EDM_LOG_SIGMA_DATA_SQ))
    return -(lam - _EDM_MEAN) / _EDM_STD**2 - ratio


def _edm_mode() -> float:
    # The slope is positive at -20 and negative at the Gaussian's mean: bisect in float64.
    lo, hi = -20.0, _EDM_MEAN
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _edm_log_slope(mid) > 0 else (lo, mid)
    return 0.5 * (lo + hi)


EDM_MODE = _edm_mode()
"""The ``lambda`` at which the EDM weighting peaks (about -3.3); ``edm_monotone`` is flat below."""


def _log_edm(lam: Array) -> Array:
    log_gauss = -0.5 * jnp.square((lam - _EDM_MEAN) / _EDM_STD) - math.log(
        _EDM_STD * math.sqrt(2.0 * math.pi)
    )
    # log(e^{-lambda} + sigma_data^2) by logaddexp: e^{-lambda} alone overflows for lambda < -88.
    return log_gauss + jnp.logaddexp(-lam, _EDM_LOG_SIGMA_DATA_SQ) - _EDM_LOG_SIGMA_DATA_SQ


def log_diffusion_weight(
    lam: Float[ArrayLike, "*shape"],
    *,
    weighting: str,
    sigmoid_bias: float = 0.0,
    sigmoid_scale: float = 1.0,
) -> Float[Array, "*shape"]:
    """``log w(lambda)``, elementwise, finite for every finite ``lambda``.

    Args:
      lam: ``lambda = log SNR = -gamma``, any shape.
      weighting: one of :data:`WEIGHTINGS`.
      sigmoid_bias: ``b`` of the ``sigmoid`` and ``elbo_sigmoid`` weightings (ignored by the
        others).
      sigmoid_scale: ``c > 0`` of ``elbo_sigmoid`` (ignored by the others).
    """
    lam = jnp.asarray(lam)
    lam = lam if jnp.issubdtype(lam.dtype, jnp.floating) else lam.astype(jnp.float32)
    if weighting == "elbo":
        return jnp.zeros_like(lam)
    if weighting == "sigmoid":
        # log_sigmoid is -softplus(-x): exact for large |x|, where log(sigmoid(x)) would give -inf.
        return jax.nn.log_sigmoid(sigmoid_bias - lam)
    if weighting == "elbo_sigmoid":
        # log(1 + c sigmoid(u)) = softplus(log c + log sigmoid(u)): no overflow, and exact where
        # c sigmoid(u) is tiny (softplus(x) = log1p(e^x)).
        return jax.nn.softplus(math.log(sigmoid_scale) + jax.nn.log_sigmoid(sigmoid_bias - lam))
    if weighting == "edm":
        return _log_edm(lam)
    if weighting == "edm_monotone":
        return _log_edm(jnp.maximum(lam, EDM_MODE))
    if weighting == "v_mse":
        return -0.5 * lam
    raise ValueError(f"{weighting=}; expected one of {WEIGHTINGS}")


def diffusion_weight(
    lam: Float[ArrayLike, "*shape"],
    *,
    weighting: str,
    sigmoid_bias: float = 0.0,
    sigmoid_scale: float = 1.0,
) -> Float[Array, "*shape"]:
    """``w(lambda) = exp(log w(lambda))``, elementwise (see :func:`log_diffusion_weight`)."""
    if weighting == "elbo":
        return jnp.ones_like(jnp.asarray(lam, jnp.result_type(lam, jnp.float32)))
    if weighting == "sigmoid":
        # sigmoid itself is exact in float32 over the whole line (no exp of a large argument).
        return jax.nn.sigmoid(sigmoid_bias - jnp.asarray(lam))
    if weighting == "elbo_sigmoid":
        return 1.0 + sigmoid_scale * jax.nn.sigmoid(sigmoid_bias - jnp.asarray(lam))
    return jnp.exp(log_diffusion_weight(lam, weighting=weighting, sigmoid_bias=sigmoid_bias))


def weighted_diffusion_loss(
    diffusion: Float[ArrayLike, " B"],
    gamma_t: Float[ArrayLike, " B"],
    *,
    weighting: str,
    sigmoid_bias: float = 0.0,
    sigmoid_scale: float = 1.0,
) -> Float[Array, " B"]:
    """``L_w`` per example from the ELBO's per-example diffusion term at the same draws.

    ``diffusion`` is ``0.5 gamma'(t) ||eps - eps_hat||^2`` (or its importance-weighted form, see
    :mod:`jvdm.noise_sampling`); ``w(-gamma_t)`` multiplies it. ``elbo`` returns ``diffusion``
    itself, unchanged to the bit.

    Args:
      diffusion: per-example ELBO diffusion term ``[B]`` (nats).
      gamma_t: the noise level of each example ``[B]`` (``lambda = -gamma_t``).
      weighting, sigmoid_bias, sigmoid_scale: see :func:`log_diffusion_weight`.

    References: VDM++ eq. 7.
    """
    diffusion = jnp.asarray(diffusion)
    if weighting == "elbo":
        return diffusion
    w = diffusion_weight(
        -jnp.asarray(gamma_t),
        weighting=weighting,
        sigmoid_bias=sigmoid_bias,
        sigmoid_scale=sigmoid_scale,
    )
    return w.astype(diffusion.dtype) * diffusion
