r"""Reference denoisers: the exact posterior means ``E[x | z]`` of two known data distributions.

For a latent ``z = alpha x + sigma eps`` at noise level ``gamma`` (``alpha^2 = sigmoid(-gamma)``,
``sigma^2 = sigmoid(gamma)``, ``eps ~ N(0, I)``), the denoiser that minimises the expected squared
error of ``x`` is the posterior mean. For two distributions it has a closed form:

- **Gaussian data** ``x ~ N(mu, C)`` (:func:`gaussian_denoiser`):

  .. math:: E[x | z] = \mu + \alpha\, C\, (\alpha^2 C + \sigma^2 I)^{-1} (z - \alpha \mu),

  computed in the eigenbasis of ``C``. Fitted to a dataset's mean and covariance
  (:func:`fit_gaussian`), it is the best *linear* denoiser of that dataset (the Wiener filter):
  no function of ``z`` that is affine does better in expected squared error, whatever the data.

- **A mixture of probabilistic PCA components** ``x ~ sum_k pi_k N(mu_k, C_k)`` with
  ``C_k = U_k diag(lambda_k) U_k^T + tau_k^2 (I - U_k U_k^T)`` (``U_k``: ``r`` orthonormal
  columns; Tipping & Bishop 1999) (:func:`fit_mixture`, :class:`MixtureFit`): the posterior mean
  is the components' own, each weighted by its posterior probability given ``z``,

  .. math:: E[x | z] = \sum_k p(k | z)\, E_k[x | z], \qquad
            p(k | z) \propto \pi_k\, N(z;\ \alpha \mu_k,\ \alpha^2 C_k + \sigma^2 I).

  Fitted by k-means and each cluster's maximum-likelihood PPCA, it is a nonlinear denoiser that
  knows the data's clusters (on MNIST, digit shapes) at high noise, where one Gaussian averages
  them, and holds ``K (D r + D)`` numbers instead of ``D^2``.

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
the batch (:func:`gaussian_prediction`'s and :func:`mixture_prediction`'s may also be one per
latent). Computation is float32 in JAX except the fits (float64 NumPy, once), which live in
:mod:`jvdm.reference_fits` and are re-exported here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jvdm import schedules
from jvdm.errors import JvdmUserError
from jvdm.reference_fits import (
    GaussianFit,
    MixtureFit,
    fit_dim,
    fit_gaussian,
    fit_mixture,
    fit_split,
    is_mixture,
)

__all__ = [
    "GaussianFit",
    "MixtureFit",
    "effective_support",
    "empirical_denoiser",
    "fit_gaussian",
    "fit_mixture",
    "fit_dim",
    "fit_split",
    "gaussian_denoiser",
    "gaussian_prediction",
    "is_mixture",
    "mixture_prediction",
]


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


def gaussian_prediction(
    z, gamma, fit: GaussianFit | MixtureFit, prediction: str = "x0"
) -> jax.Array:
    r"""The Gaussian's posterior estimate of ``x``, ``eps`` or ``v = alpha eps - sigma x`` given
    ``z = alpha x + sigma eps``: ``[batch, dim]``, for ``x ~ N(fit)`` (or for a mixture,
    :class:`MixtureFit`: :func:`mixture_prediction`).

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
    if isinstance(fit, MixtureFit):
        return mixture_prediction(z, gamma, fit, prediction)
    _check_prediction(prediction)
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


def _check_prediction(prediction: str) -> None:
    if prediction not in ("eps", "x0", "v"):
        raise JvdmUserError(f"prediction={prediction!r}; expected 'eps', 'x0' or 'v'")


def mixture_prediction(z, gamma, fit: MixtureFit, prediction: str = "x0") -> jax.Array:
    r"""The mixture's posterior estimate of ``x``, ``eps`` or ``v`` given ``z``: ``[batch, dim]``,
    for ``x ~ fit`` (:class:`MixtureFit`).

    Each is ``sum_k p(k | z)`` times component ``k``'s own, as the three are linear in ``x_hat``
    and the probabilities sum to 1. For component ``k``, with ``y = z - alpha mu_k``, its
    coordinates ``c = U_k^T y``, the rest ``y_perp = y - U_k c``, ``d = alpha^2 lambda_k +
    sigma^2`` and ``e = alpha^2 tau_k^2 + sigma^2``,

    .. math:: \hat x_k = \mu_k + U_k (c \cdot \alpha\lambda_k / d)
                         + y_\perp\, \alpha\tau_k^2 / e,

    and ``eps``, ``v`` likewise with the gains of :func:`gaussian_prediction` (``sigma / d``;
    ``alpha sigma (1 - lambda) / d``, offset ``-sigma mu_k``). The log posterior probabilities are
    ``log pi_k - (|c|^2_{1/d} + sum log d + |y_perp|^2 / e + (D - r) log e) / 2`` (the marginal
    ``N(alpha mu_k, alpha^2 C_k + sigma^2 I)``), normalised by a softmax. ``gamma`` is a scalar or
    one per latent.

    No ``[K, batch, dim]`` array is formed, so memory is ``O(batch (dim + K r))`` whatever ``K``
    (an ImageNet 64 batch of 64 with 30 components would otherwise hold 94 MB per such array):
    writing ``y_perp = y - U_k c`` and summing over components, the estimate is

    .. math:: \big(\textstyle\sum_k p_k \rho_k\big) z
              + \sum_k p_k (o_k - \alpha \rho_k) \mu_k
              + \sum_k U_k \big(p_k c_k (g_k - \rho_k)\big),

    with ``g_k`` the gain along ``U_k``, ``rho_k`` the rest's and ``o_k`` the offset's coefficient
    (1, 0, ``-sigma``): three products of ``[batch, K]`` or ``[batch, K r]`` with the fit. The
    rest's squared norm is then ``|y|^2 - |c|^2``, a difference of sums. Every ``y`` is written
    about the mixture's own mean ``m`` (``y = (z - alpha m) - alpha (mu_k - m)``), so an offset
    that all the data share, such as MNIST's background of -1, does not cancel away float32
    digits (about 0 it cost 40x the error at log SNR 1; ``tests/test_gaussian_mixture.py`` shifts
    the data by 20). The products run at full float32 precision on every backend.
    """
    _check_prediction(prediction)
    z = jnp.asarray(z, jnp.float32)
    dim, rank = fit.vectors.shape[1:]
    comps = fit.means.shape[0]
    _check(z, dim, "mixture_prediction")
    a2, s2 = _alpha2_sigma2(_per_example(gamma, z.shape[0]))  # [B, 1]
    a, s = jnp.sqrt(a2), jnp.sqrt(s2)
    hi = jax.lax.Precision.HIGHEST
    basis = fit.vectors.transpose(1, 0, 2).reshape(dim, comps * rank)  # [D, K r]
    # Everything relative to the mixture's mean m: y = (z - alpha m) - alpha (mu_k - m).
    centre = jnp.dot(jnp.exp(fit.log_weights), fit.means, precision=hi)
    shifts = fit.means - centre[None]  # [K, D]
    zc = z - a * centre[None]
    shift_coords = jnp.einsum("kd,kdr->kr", shifts, fit.vectors, precision=hi)  # [K, r]
    coords = jnp.dot(zc, basis, precision=hi).reshape(-1, comps, rank)
    coords = coords - a[..., None] * shift_coords[None]  # [B, K, r]: U_k^T (z - a mu_k)
    cross = jnp.dot(zc, shifts.T, precision=hi)  # [B, K]
    y2 = (
        jnp.sum(zc * zc, axis=1, keepdims=True)
        - 2.0 * a * cross
        + a2 * jnp.sum(shifts * shifts, axis=1)[None]
    )
    perp2 = jnp.maximum(y2 - jnp.sum(coords * coords, axis=-1), 0.0)  # [B, K]
    values, tau2 = fit.values[None], fit.residual[None]  # [1, K, r], [1, K]
    d = a2[..., None] * values + s2[..., None]  # [B, K, r]
    e = a2 * tau2 + s2  # [B, K]
    log_p = fit.log_weights[None] - 0.5 * (
        jnp.sum(coords * coords / d + jnp.log(d), axis=-1) + perp2 / e + (dim - rank) * jnp.log(e)
    )
    post = jax.nn.softmax(log_p, axis=1)  # [B, K]
    if prediction == "x0":
        gain, rest, offset = a[..., None] * values / d, a * tau2 / e, 1.0
    elif prediction == "eps":
        gain, rest, offset = s[..., None] / d, s / e, 0.0
    else:
        gain = (a * s)[..., None] * (1.0 - values) / d
        rest = a * s * (1.0 - tau2) / e
        offset = -s
    along = (post[..., None] * coords * (gain - rest[..., None])).reshape(-1, comps * rank)
    return (
        jnp.sum(post * rest, axis=1, keepdims=True) * z
        + jnp.dot(post * (offset - a * rest), fit.means, precision=hi)
        + jnp.dot(along, basis.T, precision=hi)
    )


def gaussian_denoiser(z, gamma, fit: GaussianFit | MixtureFit) -> jax.Array:
    """``E[x | z]`` for ``x ~ N(fit)`` (or the mixture ``fit``): ``[batch, dim]``; for one
    Gaussian the best linear denoiser of the data ``fit`` was fitted to
    (:func:`gaussian_prediction` of ``x``)."""
    z = jnp.asarray(z, jnp.float32)
    _check(z, fit_dim(fit), "gaussian_denoiser")
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
