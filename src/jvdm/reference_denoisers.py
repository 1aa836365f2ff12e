r"""Reference denoisers: the exact posterior means ``E[x | z]`` of two known data distributions.

For a latent ``z = alpha x + sigma eps`` at noise level ``gamma`` (``alpha^2 = sigmoid(-gamma)``,
``sigma^2 = sigmoid(gamma)``, ``eps ~ N(0, I)``), the denoiser that minimises the expected squared
error of ``x`` is the posterior mean. For two distributions it has a closed form:

- **Gaussian data** ``x ~ N(mu, C)`` (:func:`gaussian_denoiser`):

  .. math:: E[x | z] = \mu + \alpha\, C\, (\alpha^2 C + \sigma^2 I)^{-1} (z - \alpha \mu),

  computed in the eigenbasis of ``C``. Fitted to a dataset's mean and covariance
  (:func:`fit_gaussian`), it is the best *linear* denoiser of that dataset (the Wiener filter):
  no function of ``z`` that is affine does better in expected squared error, whatever the data.

- **The empirical distribution** of a finite support ``{x_i}`` (:func:`empirical_denoiser`):

  .. math:: E[x | z] = \sum_i w_i x_i, \qquad
            w = \mathrm{softmax}_i\big(-\|z - \alpha x_i\|^2 / 2\sigma^2\big),

  the denoiser of the distribution that puts mass ``1/N`` on each training image. It is the optimum
  of the training loss itself, and it memorises: its ancestral chain reproduces training images.
  On held-out images at high noise (many ``x_i`` share the weight: :func:`effective_support`) it
  is a strong nonparametric estimate of the data's own posterior mean.

A trained model's ``x0_hat`` can be measured against both at each noise level
(``bench/denoiser_oracle.py``): beating the Gaussian one is the least a nonlinear network should
do, and the empirical one shows what the data's own neighbours reveal at that level.

Every function works on flattened images, ``[batch, dim]``; its ``gamma`` is a scalar shared by
the batch (:func:`gaussian_prediction`'s may also be one per latent). Computation is float32 in
JAX except :func:`fit_gaussian` (float64 NumPy, once).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jvdm import schedules
from jvdm.errors import JvdmUserError

__all__ = [
    "GaussianFit",
    "effective_support",
    "empirical_denoiser",
    "fit_gaussian",
    "fit_split",
    "gaussian_denoiser",
    "gaussian_prediction",
]


class GaussianFit(NamedTuple):
    """``N(mean, vectors diag(values) vectors^T)``: ``[dim]``, ``[dim]``, ``[dim, dim]``."""

    mean: jax.Array
    values: jax.Array
    vectors: jax.Array


def fit_gaussian(x) -> GaussianFit:
    """The mean and covariance (``1/N``, the maximum-likelihood fit) of ``x`` ``[N, dim]``, with
    the covariance's eigendecomposition done in float64 and negative round-off clipped to 0."""
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise JvdmUserError(
            f"fit_gaussian needs data of shape [N >= 2, dim], got {x.shape}: flatten the images"
        )
    mean = x.mean(axis=0)
    values, vectors = np.linalg.eigh(np.cov(x, rowvar=False, bias=True))
    return GaussianFit(
        jnp.asarray(mean, jnp.float32),
        jnp.asarray(np.maximum(values, 0.0), jnp.float32),
        jnp.asarray(vectors, jnp.float32),
    )


@functools.lru_cache(maxsize=4)
def fit_split(dataset: str, split: str, data_dir: str | None = None, vocab_size: int = 256):
    """:func:`fit_gaussian` of a prepared dataset split's images, scaled to the model's [-1, 1]
    (:func:`jvdm.decoder.scale_pixels`) and flattened; the last few are kept in memory.

    It holds a ``dim x dim`` matrix (2.4 MB for 28x28x1, 38 MB for 32x32x3) and its float64
    eigendecomposition costs ``O(dim^3)``: meant for images up to about 64x64x1 or 32x32x3.
    """
    from jvdm import data, decoder

    images = data.load_split_array(dataset, split, data_dir)
    flat = np.asarray(decoder.scale_pixels(images, vocab_size)).reshape(len(images), -1)
    return fit_gaussian(flat)


def _check(z, dim: int, name: str) -> None:
    if z.ndim != 2 or z.shape[1] != dim:
        raise JvdmUserError(
            f"{name}: z must have shape [batch, {dim}] (flattened like the reference data), "
            f"got {tuple(z.shape)}"
        )


def _alpha2_sigma2(gamma):
    gamma = jnp.asarray(gamma, jnp.float32)
    return schedules.alpha_bar_from_gamma(gamma), schedules.sigma_sq_from_gamma(gamma)


def _per_example(gamma, batch: int) -> jax.Array:
    gamma = jnp.asarray(gamma, jnp.float32)
    if gamma.ndim > 1 or (gamma.ndim == 1 and gamma.shape[0] not in (1, batch)):
        raise JvdmUserError(
            f"gamma must be a scalar or have shape [{batch}] (one per latent), got {gamma.shape}"
        )
    return jnp.broadcast_to(gamma.reshape(-1, 1) if gamma.ndim else gamma, (batch, 1))


def gaussian_prediction(z, gamma, fit: GaussianFit, prediction: str = "x0") -> jax.Array:
    r"""The Gaussian's posterior estimate of ``x``, ``eps`` or ``v = alpha eps - sigma x`` given
    ``z = alpha x + sigma eps``: ``[batch, dim]``, for ``x ~ N(fit)``.

    In the eigenbasis ``C = U diag(lambda) U^T``, with ``c = U^T (z - alpha mu)`` and
    ``d = alpha^2 lambda + sigma^2``,

    .. math:: \hat x = \mu + U (c \cdot \alpha\lambda / d), \quad
              \hat\epsilon = U (c \cdot \sigma / d), \quad
              \hat v = -\sigma\mu + U (c \cdot \alpha\sigma(1 - \lambda) / d),

    so no prediction divides by a small ``alpha`` or ``sigma`` (``d >= sigma^2``): each is exact
    at every noise level, including for directions the data never varies in (``lambda = 0``,
    where ``eps_hat`` is the latent's own noise). ``gamma`` is a scalar or one per latent
    ``[batch]``. The projections run at full float32 precision on every backend.
    """
    if prediction not in ("eps", "x0", "v"):
        raise JvdmUserError(f"prediction={prediction!r}; expected 'eps', 'x0' or 'v'")
    z = jnp.asarray(z, jnp.float32)
    _check(z, fit.mean.shape[0], "gaussian_prediction")
    a2, s2 = _alpha2_sigma2(_per_example(gamma, z.shape[0]))
    a, s = jnp.sqrt(a2), jnp.sqrt(s2)
    hi = jax.lax.Precision.HIGHEST
    mean, values = fit.mean[None, :], fit.values[None, :]
    coords = jnp.matmul(z - a * mean, fit.vectors, precision=hi)
    inv = 1.0 / (a2 * values + s2)
    if prediction == "x0":
        gain, offset = a * values * inv, mean
    elif prediction == "eps":
        gain, offset = s * inv, jnp.zeros_like(mean)
    else:
        gain, offset = a * s * (1.0 - values) * inv, -s * mean
    return offset + jnp.matmul(coords * gain, fit.vectors.T, precision=hi)


def gaussian_denoiser(z, gamma, fit: GaussianFit) -> jax.Array:
    """``E[x | z]`` for ``x ~ N(fit)``: ``[batch, dim]``; the best linear denoiser of the data
    ``fit`` was fitted to (:func:`gaussian_prediction` of ``x``)."""
    z = jnp.asarray(z, jnp.float32)
    _check(z, fit.mean.shape[0], "gaussian_denoiser")
    return gaussian_prediction(z, gamma, fit, "x0")


def _log_weights(z, gamma, support):
    # -|z - a x_i|^2 / (2 s2), less the part that is the same for every i (|z|^2).
    a2, s2 = _alpha2_sigma2(gamma)
    cross = z @ support.T
    sq = jnp.sum(jnp.square(support), axis=1)
    return (jnp.sqrt(a2) * cross - 0.5 * a2 * sq[None, :]) / s2


def _support(support, z, name):
    support = jnp.asarray(support, jnp.float32)
    if support.ndim != 2 or support.shape[0] < 1:
        raise JvdmUserError(f"{name}: support must have shape [N >= 1, dim], got {support.shape}")
    z = jnp.asarray(z, jnp.float32)
    _check(z, support.shape[1], name)
    return z, support


def empirical_denoiser(z, gamma, support) -> jax.Array:
    """``E[x | z]`` for ``x`` uniform over the rows of ``support`` ``[N, dim]``: ``[batch, dim]``.

    The weights are a softmax of log-likelihoods, so no distance overflows or underflows however
    small the noise: at ``sigma -> 0`` it returns the nearest ``alpha x_i``'s ``x_i``.
    """
    z, support = _support(support, z, "empirical_denoiser")
    return jax.nn.softmax(_log_weights(z, gamma, support), axis=1) @ support


def effective_support(z, gamma, support) -> jax.Array:
    """``1 / sum_i w_i^2`` per latent ``[batch]``: how many support points share the posterior
    (1: one training image decides; ``N``: the noise hides them all)."""
    z, support = _support(support, z, "effective_support")
    w = jax.nn.softmax(_log_weights(z, gamma, support), axis=1)
    return 1.0 / jnp.sum(jnp.square(w), axis=1)
