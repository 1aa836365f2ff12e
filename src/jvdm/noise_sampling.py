r"""Importance sampling of the noise level from an online histogram of the loss (VDM++ section 5).

Derivation. In continuous time the (weighted) diffusion term is an integral over the noise level
``gamma = -lambda`` that does not involve the schedule's interior (VDM eq. 17 with
``dt = dgamma / gamma'(t)``):

.. math::
  L_w = \tfrac12 \int_0^1 w(\lambda_t)\, \gamma'(t)\, E\|\epsilon - \hat\epsilon(z_t,\gamma_t)\|^2dt
      = \int_{\gamma_0}^{\gamma_1} f(\gamma)\, d\gamma, \qquad
  f(\gamma) = \tfrac12 w(-\gamma)\, E_{x, \epsilon} \|\epsilon - \hat\epsilon(z_\gamma, \gamma)\|^2,

with ``gamma_0 = gamma(0)``, ``gamma_1 = gamma(1)``. Write ``gamma = gamma_0 + u Delta``,
``Delta = gamma_1 - gamma_0``, ``u`` in ``[0, 1]``. For any density ``q(u) > 0`` on ``[0, 1]``,

.. math::
  L_w = E_{u \sim q}\Big[\frac{\Delta}{q(u)}\, \tfrac12 w(-\gamma_u)\,
        \|\epsilon - \hat\epsilon(z_{\gamma_u}, \gamma_u)\|^2\Big]

exactly: the estimator is that of VDM eq. 17 with ``gamma'(t)`` replaced by the Jacobian
``dgamma/du / q(u) = Delta / q(u)``. (Equivalently, ``u = F_q^{-1}(t)`` with ``t`` uniform is a
piecewise-linear schedule ``t -> gamma`` with slope ``Delta / q``: the same estimator as a learned
schedule's, with a schedule read off the histogram.) Reparameterised this way, the gradients
with respect to the end points ``gamma_0, gamma_1`` are those of the integral's limits, and no
schedule has to be inverted: ``gamma`` is sampled directly.

Its variance is ``int E[(Delta f_eps(u))^2] / q(u) du - L_w^2``, minimised by
``q* ∝ sqrt(E[f_eps(u)^2])``. VDM++ takes ``q ∝ E[f_eps(u)] = Delta f(gamma_u)``, the same
density when the per-level loss is concentrated about its mean (``||eps - eps_hat||^2`` is a sum
over ``D`` pixels, so its relative spread at one level is about ``1 / sqrt(D)``). Here ``q`` is
piecewise constant over ``K`` equal bins of ``u`` (equal bins of ``lambda`` between the current
end points), each bin's value an EMA of the per-unit-``gamma`` loss density ``f`` of the examples
that fell in it, mixed with the uniform density so that ``q >= uniform_fraction`` never vanishes
(a bin the estimate missed is still visited, and ``Delta / q`` stays bounded). Draws are
stratified like the antithetic times: ``t_i = (t_0 + i / B) mod 1``, ``u_i = F_q^{-1}(t_i)``.

The histogram is the state ``[2, K]``: row 0 the EMA values, row 1 how many updates each bin had
(a bin's first update sets its value, so nothing is biased towards an initial guess; unvisited
bins count as the mean of the visited ones).

The same estimator serves a *fixed* density (``noise_sampling="band"``): a share ``f`` of the
draws uniform on the interval ``[a, b)`` of ``u`` that a band of ``log SNR = -gamma`` occupies
between the current end points, the rest uniform on ``[0, 1]``,
``q(u) = (1 - f) + f 1[a <= u < b] / (b - a)``, drawn by its exact inverse CDF
(:func:`band_positions`). Its use: more training draws at the noise levels where a sample's shape
is decided (``bench/shape_origin.py``), with the objective unchanged.

References: Kingma & Gao 2023 (arXiv 2303.00848) section 5; VDM (arXiv 2107.00630) eq. 17.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

__all__ = [
    "band_density",
    "band_interval",
    "band_positions",
    "bin_probabilities",
    "init_histogram",
    "sample_positions",
    "update_histogram",
]


def init_histogram(bins: int) -> Float[Array, "2 K"]:
    """An empty histogram of ``bins`` bins (sampling from it is uniform)."""
    if bins < 1:
        raise ValueError(f"{bins=}; expected at least 1 bin")
    return jnp.zeros((2, bins), jnp.float32)


def bin_probabilities(histogram: Float[Array, "2 K"], *, uniform_fraction: float) -> Array:
    """Probability ``q_k`` of each bin ``[K]``: ``(1 - m) h_k / sum(h) + m / K``, sums to 1."""
    values, counts = histogram[0], histogram[1]
    k = values.shape[0]
    seen = counts > 0
    n_seen = jnp.sum(seen)
    mean_seen = jnp.sum(jnp.where(seen, values, 0.0)) / jnp.maximum(n_seen, 1)
    h = jnp.maximum(jnp.where(seen, values, mean_seen), 0.0)
    total = jnp.sum(h)
    # No information yet (or all zero): the uniform density.
    shape = jnp.where(total > 0, h / jnp.where(total > 0, total, 1.0), 1.0 / k)
    return (1.0 - uniform_fraction) * shape + uniform_fraction / k


def sample_positions(
    key: jax.Array,
    batch: int,
    histogram: Float[Array, "2 K"],
    *,
    uniform_fraction: float,
    use_antithetic: bool = True,
) -> tuple[Float[Array, " B"], Float[Array, " B"]]:
    """``(u, q(u))``: positions in ``[0, 1]`` drawn from the histogram's density, and the density.

    Inverse CDF of the piecewise-constant density: with ``t`` uniform (stratified over the batch
    with ``use_antithetic``), bin ``k`` is the first whose cumulative probability exceeds ``t``,
    and ``u = (k + (t - C_{k-1}) / q_k) / K``; the density there is ``K q_k``.
    """
    probs = bin_probabilities(histogram, uniform_fraction=uniform_fraction)
    k = probs.shape[0]
    t = _stratified(key, batch, use_antithetic)
    cdf = jnp.cumsum(probs)
    idx = jnp.clip(jnp.searchsorted(cdf, t, side="right"), 0, k - 1)
    below = jnp.where(idx > 0, cdf[jnp.maximum(idx - 1, 0)], 0.0)
    frac = jnp.clip((t - below) / probs[idx], 0.0, 1.0)
    u = (idx.astype(jnp.float32) + frac) / k
    return u, k * probs[idx]


def _stratified(key: jax.Array, batch: int, use_antithetic: bool) -> Array:
    if use_antithetic:
        t0 = jax.random.uniform(key, ())
        return jnp.mod(t0 + jnp.arange(batch, dtype=jnp.float32) / batch, 1.0)
    return jax.random.uniform(key, (batch,))


def band_interval(g_0, g_1, band_log_snr: tuple[float, float]) -> tuple[Array, Array]:
    """``(a, b)``: where the band ``lo <= log SNR < hi`` lies in ``u``, ``gamma = g_0 + u (g_1 -
    g_0)``, clipped to ``[0, 1]`` (``a = b`` for a band outside the end points' range)."""
    lo, hi = band_log_snr
    delta = g_1 - g_0
    a = jnp.clip((-hi - g_0) / delta, 0.0, 1.0)
    b = jnp.clip((-lo - g_0) / delta, 0.0, 1.0)
    return a, b


def band_density(u, interval: tuple[Array, Array], *, fraction: float) -> Array:
    """``q(u) = (1 - f) + f 1[a <= u < b] / (b - a)`` at positions ``u``; the uniform density
    for an empty interval (``a = b``)."""
    a, b = interval
    width = b - a
    f = jnp.where(width > 0.0, jnp.float32(fraction), 0.0)
    return (1.0 - f) + jnp.where((u >= a) & (u < b), f / jnp.where(width > 0.0, width, 1.0), 0.0)


def band_positions(
    key: jax.Array,
    batch: int,
    interval: tuple[Array, Array],
    *,
    fraction: float,
    use_antithetic: bool = True,
) -> tuple[Float[Array, " B"], Float[Array, " B"]]:
    """``(u, q(u))`` from ``q(u) = (1 - f) + f 1[a <= u < b] / (b - a)`` on ``[0, 1]``.

    The exact inverse of the piecewise-linear CDF ``F(u) = (1 - f) u + f clip((u - a) / (b - a),
    0, 1)``, applied to uniform ``t`` (stratified over the batch with ``use_antithetic``), and
    :func:`band_density` at the draws. An empty interval (``a = b``) gives the uniform density.
    """
    a, b = (jnp.asarray(v, jnp.float32) for v in interval)
    width = b - a
    f = jnp.where(width > 0.0, jnp.float32(fraction), 0.0)
    t = _stratified(key, batch, use_antithetic)
    keep = 1.0 - f  # density outside the band
    inside = keep + f / jnp.where(width > 0.0, width, 1.0)  # the density in the band
    f_a, f_b = keep * a, keep * b + f  # F(a), F(b)
    u = jnp.where(t < f_a, t / keep, jnp.where(t < f_b, a + (t - f_a) / inside, (t - f) / keep))
    u = jnp.clip(u, 0.0, 1.0)
    return u, band_density(u, (a, b), fraction=fraction)


def update_histogram(
    histogram: Float[Array, "2 K"],
    u: Float[Array, " B"],
    density: Float[Array, " B"],
    *,
    decay: float,
) -> Float[Array, "2 K"]:
    """The histogram after one batch: each bin's EMA moves towards the mean ``density`` of the
    examples at positions ``u`` in it (a bin's first update sets it; bins without examples keep
    their value). Inside ``jit`` with the batch sharded, the sums over the batch are all-reduced by
    XLA, so every device and process holds the same histogram."""
    values, counts = histogram[0], histogram[1]
    k = values.shape[0]
    idx = jnp.clip(jnp.floor(u * k).astype(jnp.int32), 0, k - 1)
    onehot = jax.nn.one_hot(idx, k, dtype=jnp.float32)  # [B, K]
    n = jnp.sum(onehot, axis=0)
    mean = jnp.sum(onehot * density.astype(jnp.float32)[:, None], axis=0) / jnp.maximum(n, 1.0)
    ema = jnp.where(counts > 0, decay * values + (1.0 - decay) * mean, mean)
    new_values = jnp.where(n > 0, ema, values)
    return jnp.stack([new_values, counts + (n > 0)])
