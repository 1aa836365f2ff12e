"""Terms of the VDM variational bound: KLs, diffusion losses, the prior, bpd (the decoder's
likelihood is :mod:`jvdm.decoder`, re-exported here).

Every loss returns one value per example (summed over the non-batch axes of ``[B, ...]`` data);
the caller reduces over the batch. Schedule arguments are scalars or ``[B]`` (see
``jvdm.diffusion``). Numerically delicate terms use forms that keep float32 results within about
1e-6 relative of a float64 evaluation of the same inputs; each is commented where it is used.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from jvdm.decoder import decoder_log_likelihood, decoder_log_probs, scale_pixels
from jvdm.diffusion import _check_same_shape, _expand, posterior_mean_var

__all__ = [
    "bpd_from_nats",
    "continuous_diffusion_loss",
    "decoder_log_likelihood",
    "decoder_log_probs",
    "denoising_matching_kl",
    "discrete_diffusion_loss",
    "gaussian_kl",
    "prior_kl",
    "prior_kl_from_gamma",
    "scale_pixels",
    "snr_weighted_loss",
]

# Below this |x|, x - log1p(x) is summed from its Taylor series; above it the direct form loses
# about 2 eps / x^2 <~ 4e-6 relative (float32).
_SERIES_CUTOFF = 0.25
_SERIES_TERMS = 14  # truncation error ~ 0.25**14 < 1e-8 relative


def _x_minus_log1p_x(x: Array, log1p_x: Array) -> Array:
    """``x - log(1 + x) >= 0`` without catastrophic cancellation.

    For small ``|x|`` the two terms agree to ``x^2 / 2``; subtracting them directly leaves
    ~``2 eps / |x|`` relative error (1e-3 at |x| = 1e-4, the regime of adjacent diffusion steps).
    There we sum ``x^2 (1/2 - x/3 + x^2/4 - ...)`` instead. ``log1p_x`` is the caller's accurate
    value of ``log(1 + x)``, used away from 0 (it may be computed from other inputs, e.g. as a log
    ratio, when ``1 + x`` itself is inaccurate).
    """
    xs = jnp.clip(x, -_SERIES_CUTOFF, _SERIES_CUTOFF)  # keeps the unused branch finite
    poly = jnp.zeros_like(xs)
    for n in range(_SERIES_TERMS + 1, 1, -1):  # Horner on sum_{n>=2} (-1)^n x^(n-2) / n
        poly = (-1) ** n / n + xs * poly
    series = xs * xs * poly
    return jnp.where(jnp.abs(x) < _SERIES_CUTOFF, series, x - log1p_x)


def _sum_per_example(v: Array) -> Array:
    return jnp.sum(v, axis=tuple(range(1, v.ndim)))


def gaussian_kl(
    mean_q: Float[ArrayLike, "*shape"],
    var_q: Float[ArrayLike, "*shape"],
    mean_p: Float[ArrayLike, "*shape"],
    var_p: Float[ArrayLike, "*shape"],
) -> Float[Array, "*shape"]:
    r"""Elementwise ``KL(N(mean_q, var_q) || N(mean_p, var_p))`` of diagonal Gaussians.

    .. math::
      \tfrac12\left[\log\frac{\sigma_p^2}{\sigma_q^2} - 1 + \frac{\sigma_q^2}{\sigma_p^2}
      + \frac{(\mu_q - \mu_p)^2}{\sigma_p^2}\right]

    Written as ``0.5 [(r - 1 - log r) + (mean_q - mean_p)^2 / var_p]`` with ``r = var_q / var_p``:
    both parts are >= 0, so the sum has no cancellation. ``r - 1 - log r`` does cancel for
    ``r ~ 1``; it is evaluated as ``d - log1p(d)`` with ``d = (var_q - var_p) / var_p`` (one exact
    subtraction) by a Taylor series for ``|d| < 0.25`` (see ``_x_minus_log1p_x``).

    Args:
      mean_q, var_q, mean_p, var_p: arrays of one common shape; variances > 0.

    Returns:
      The KL per element, same shape.

    Raises:
      ValueError: if the four shapes differ.

    References:
      Luo 2022 (arXiv 2208.11970) eq. 71 (for a Gaussian pair).
    """
    mean_q, var_q = jnp.asarray(mean_q), jnp.asarray(var_q)
    mean_p, var_p = jnp.asarray(mean_p), jnp.asarray(var_p)
    _check_same_shape(mean_q=mean_q, var_q=var_q, mean_p=mean_p, var_p=var_p)
    d = (var_q - var_p) / var_p
    # Away from r = 1, log of the ratio (one rounding) beats log1p(d) when var_q << var_p.
    var_term = _x_minus_log1p_x(d, jnp.log(var_q / var_p))
    return 0.5 * (var_term + jnp.square(mean_q - mean_p) / var_p)


def denoising_matching_kl(
    x0: Float[ArrayLike, "B ..."],
    x0_hat: Float[ArrayLike, "B ..."],
    x_t: Float[ArrayLike, "B ..."],
    alpha_bar_t: Float[ArrayLike, " B"] | float,
    alpha_bar_s: Float[ArrayLike, " B"] | float,
) -> Float[Array, " B"]:
    """``KL(q(x_s | x_t, x_0) || p(x_s | x_t))`` per example, computed literally.

    ``p`` is the posterior with ``x0_hat`` in place of ``x0`` and the same (posterior) variance.
    Both means share the term ``c_t x_t``; a KL is unchanged by translating both Gaussians by the
    same vector, so both are evaluated at ``x_t = 0``. Otherwise, for adjacent steps, float32
    would have to resolve a difference ``c_0 (x0 - x0_hat)`` ~ 1e-4 between two O(1) means and
    would keep only ~3 digits. So the value does not depend on ``x_t`` (that is Luo's point from
    eq. 84 to 95); ``x_t`` is taken to mirror the distributions and is shape-checked.

    Args:
      x0, x0_hat, x_t: ``[B, ...]``, one shape.
      alpha_bar_t, alpha_bar_s: scalars or ``[B]``, with ``alpha_bar_s > alpha_bar_t``.

    Returns:
      ``[B]``; equals ``snr_weighted_loss(x0, x0_hat, snr(alpha_bar_s), snr(alpha_bar_t))``.

    References:
      Luo 2022 eqs. 84-92; Kingma et al. 2021 (arXiv 2107.00630) eq. 13.
    """
    x0, x0_hat, x_t = jnp.asarray(x0), jnp.asarray(x0_hat), jnp.asarray(x_t)
    _check_same_shape(x0=x0, x0_hat=x0_hat, x_t=x_t)
    origin = jnp.zeros_like(x_t)
    mean_q, var = posterior_mean_var(origin, x0, alpha_bar_t, alpha_bar_s)
    mean_p, _ = posterior_mean_var(origin, x0_hat, alpha_bar_t, alpha_bar_s)
    return _sum_per_example(gaussian_kl(mean_q, var, mean_p, var))


def snr_weighted_loss(
    x0: Float[ArrayLike, "B ..."],
    x0_hat: Float[ArrayLike, "B ..."],
    snr_s: Float[ArrayLike, " B"] | float,
    snr_t: Float[ArrayLike, " B"] | float,
) -> Float[Array, " B"]:
    """``0.5 (SNR(s) - SNR(t)) ||x0_hat - x0||^2`` per example (the denoising term in x0 form).

    References:
      Luo 2022 eq. 95 (there s = t - 1); Kingma et al. 2021 eq. 13.
    """
    x0, x0_hat = jnp.asarray(x0), jnp.asarray(x0_hat)
    _check_same_shape(x0=x0, x0_hat=x0_hat)
    weight = _expand(snr_s, x0) - _expand(snr_t, x0)
    return 0.5 * _sum_per_example(weight * jnp.square(x0_hat - x0))


def discrete_diffusion_loss(
    eps: Float[ArrayLike, "B ..."],
    eps_hat: Float[ArrayLike, "B ..."],
    gamma_s: Float[ArrayLike, " B"] | float,
    gamma_t: Float[ArrayLike, " B"] | float,
) -> Float[Array, " B"]:
    r"""One step's denoising term in eps form: ``0.5 expm1(gamma_t - gamma_s) ||eps - eps_hat||^2``.

    Derivation from ``snr_weighted_loss``: with ``x_t = alpha_t x0 + sigma_t eps`` and the model's
    ``x0_hat = (x_t - sigma_t eps_hat) / alpha_t``, ``x0_hat - x0 = (sigma_t / alpha_t)
    (eps - eps_hat)``, so ``||x0_hat - x0||^2 = ||eps - eps_hat||^2 / SNR(t)``, and
    ``(SNR(s) - SNR(t)) / SNR(t) = SNR(s)/SNR(t) - 1 = exp(gamma_t - gamma_s) - 1``.
    ``expm1`` keeps full relative precision when s and t are adjacent (gamma_t - gamma_s small),
    where ``exp(.) - 1`` would cancel. The full discrete loss is T times the expectation of this
    over uniform t (the caller multiplies by T).

    Returns:
      ``[B]``.

    References:
      Kingma et al. 2021 eq. 14; Luo 2022 eq. 95.
    """
    eps, eps_hat = jnp.asarray(eps), jnp.asarray(eps_hat)
    _check_same_shape(eps=eps, eps_hat=eps_hat)
    weight = jnp.expm1(_expand(gamma_t, eps) - _expand(gamma_s, eps))
    return 0.5 * _sum_per_example(weight * jnp.square(eps - eps_hat))


def continuous_diffusion_loss(
    eps: Float[ArrayLike, "B ..."],
    eps_hat: Float[ArrayLike, "B ..."],
    dgamma_dt: Float[ArrayLike, " B"] | float,
) -> Float[Array, " B"]:
    """Continuous-time (T -> inf) denoising loss ``0.5 gamma'(t) ||eps - eps_hat||^2`` per example.

    References:
      Kingma et al. 2021 eq. 17.
    """
    eps, eps_hat = jnp.asarray(eps), jnp.asarray(eps_hat)
    _check_same_shape(eps=eps, eps_hat=eps_hat)
    return 0.5 * _sum_per_example(_expand(dgamma_dt, eps) * jnp.square(eps - eps_hat))


def prior_kl(
    x0: Float[ArrayLike, "B ..."], alpha_bar_1: Float[ArrayLike, " B"] | float
) -> Float[Array, " B"]:
    """``KL(N(sqrt(ab) x0, (1 - ab) I) || N(0, I))`` per example, ``ab = alpha_bar_1``.

    Per element ``0.5 [ab x0^2 + (-ab - log(1 - ab))]``. The second part is ``x - log1p(x)`` at
    ``x = -ab``, which is ~``ab^2/2`` for the tiny ``ab`` of a good prior and cancels if
    subtracted directly; see ``_x_minus_log1p_x``.

    References:
      Kingma et al. 2021 eq. 10 (prior term); Luo 2022 eq. 58.
    """
    x0 = jnp.asarray(x0)
    ab = _expand(alpha_bar_1, x0)
    var_term = _x_minus_log1p_x(-ab, jnp.log1p(-ab))
    return 0.5 * _sum_per_example(ab * jnp.square(x0) + var_term)


def prior_kl_from_gamma(
    x0: Float[ArrayLike, "B ..."], gamma_1: Float[ArrayLike, " B"] | float
) -> Float[Array, " B"]:
    """``prior_kl`` with the schedule given as ``gamma_1 = gamma(1)``.

    ``alpha_bar = sigmoid(-gamma)`` and ``log(sigma^2) = log(1 - alpha_bar) = -softplus(-gamma)``:
    exact-range forms that stay finite even where float32 rounds alpha_bar to 1.

    References:
      Kingma et al. 2021 eqs. 4 and 10.
    """
    x0 = jnp.asarray(x0)
    g = _expand(gamma_1, x0)
    ab = jax.nn.sigmoid(-g)
    var_term = _x_minus_log1p_x(-ab, -jax.nn.softplus(-g))
    return 0.5 * _sum_per_example(ab * jnp.square(x0) + var_term)


def bpd_from_nats(nats: Float[ArrayLike, "..."], num_dims: int | ArrayLike) -> Float[Array, "..."]:
    """Convert a negative log-likelihood in nats to bits per dimension: ``nats / (D ln 2)``.

    References:
      Kingma et al. 2021 section 5 (bpd); Ho et al. 2020 section 4.2.
    """
    if not isinstance(num_dims, jax.core.Tracer) and np.any(np.asarray(num_dims) <= 0):
        raise ValueError(f"num_dims={num_dims} must be positive: the number of dimensions D")
    nats = jnp.asarray(nats)
    if not jnp.issubdtype(nats.dtype, jnp.floating):
        nats = nats.astype(jnp.float32)
    # num_dims * ln 2 rounded once in the dtype of nats, so nats = D ln 256 (= 8 D ln 2) gives 8.0.
    return nats / (jnp.asarray(num_dims, dtype=nats.dtype) * math.log(2.0))
