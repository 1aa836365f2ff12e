r"""Sampling the 256-value decoder ``p(x | z_0)`` in memory of the data's size.

The decoder is the categorical of :func:`jvdm.losses.decoder_log_probs`, ``log p_k = d_k -
log1p(S)`` against the nearest bin ``m``. Forming its ``[..., 256]`` probabilities for a chunk of
samples costs 256 times the data (2.4 GB for 256 CIFAR-10 images), though at VDM's ``gamma(0)``
every value beyond ``_WINDOW`` bins of ``m`` has a probability below float32 resolution (the bound
of :func:`jvdm.losses._window_is_exact`, the one the likelihood uses).

:func:`decoder_sample` therefore draws by the inverse CDF with one uniform per element: a first
pass sums the unnormalised ``e_k = exp(d_k)`` over the values, a second finds the first value whose
running sum exceeds ``u`` times the total. Both passes are elementwise loops over the values (17
of them inside the window, all 256 where the bound does not hold), so nothing of size
``[..., 256]`` is ever stored. With the same ``u`` the windowed and full draws agree except where
``u`` falls within the dropped mass (< 4e-9) or the rounding of the sums of a CDF boundary.

References:
  Kingma et al. 2021 appendix C (the decoder); Devroye 1986 ch. III.2 (inverse-CDF sampling).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

from jvdm import losses

__all__ = ["decoder_sample"]


def _terms_at(k, delta, snr, m, vocab_size: int):
    """``exp(d_k)`` for value(s) ``k`` (any shape broadcasting with ``m``), 0 outside ``0..V-1``."""
    w = 2.0 * (m - k) / vocab_size  # v_m - v_k, exact for vocab_size a power of 2
    d = -0.5 * snr * w * (2.0 * delta + w)  # <= 0 up to rounding: m is the most likely value
    valid = (k >= 0) & (k <= vocab_size - 1)
    return jnp.where(valid, jnp.exp(d), 0.0)


def _inverse_cdf(u, delta, snr, m, vocab_size: int, *, window: bool):
    """The first value whose cumulative unnormalised mass exceeds ``u * total``, elementwise."""
    if window:
        first = m - losses._WINDOW
        count = 2 * losses._WINDOW + 1
    else:
        first = jnp.zeros_like(m)
        count = vocab_size

    def mass(i):
        return _terms_at(first + i, delta, snr, m, vocab_size)

    def total_body(i, acc):
        return acc + mass(i)

    zero = jnp.zeros_like(delta)
    total = jax.lax.fori_loop(0, count, total_body, zero, unroll=window)
    target = u * total

    def find_body(i, carry):
        cum, below, last = carry
        e = mass(i)
        cum = cum + e
        # Values whose running sum is still <= target lie before the draw; zero-mass values
        # never end a run, so they are never drawn.
        below = below + (cum <= target).astype(below.dtype)
        last = jnp.where(e > 0, i, last)
        return cum, below, last

    init = (zero, jnp.zeros(m.shape, jnp.int32), jnp.zeros(m.shape, jnp.int32))
    _, below, last = jax.lax.fori_loop(0, count, find_body, init, unroll=window)
    # Rounding can make u * total reach the total (u within 2^-24 of 1): take the last value with
    # mass then, never one beyond it.
    index = jnp.minimum(below, last)
    return (first + index.astype(first.dtype)).astype(jnp.int32)


def decoder_sample(
    u: Float[ArrayLike, "B ..."],
    z_0: Float[ArrayLike, "B ..."],
    gamma_0: Float[ArrayLike, " B"] | float,
    vocab_size: int = 256,
    *,
    window: bool | None = None,
) -> Array:
    """Draws ``x ~ p(x | z_0)`` elementwise from uniforms ``u``: int32 values in ``0..V-1``.

    Args:
      u: uniforms in ``[0, 1)``, the shape of ``z_0`` (e.g. ``jax.random.uniform``).
      z_0: latent at t = 0, ``[B, ...]``.
      gamma_0: scalar or ``[B]``.
      vocab_size: number of values (256 for 8-bit data).
      window: ``None`` (default) visits only the ``2 * _WINDOW + 1`` values around the nearest bin
        where :func:`jvdm.losses._window_is_exact` proves the rest below float32 resolution, and
        all values otherwise; ``True`` or ``False`` forces one of the two (for tests).

    Returns:
      int32 ``[B, ...]``, the inverse CDF of the decoder's categorical at ``u``.
    """
    u = jnp.asarray(u, jnp.float32)
    z = jnp.asarray(z_0, jnp.float32)
    if u.shape != z.shape:
        raise ValueError(f"u has shape {u.shape} but z_0 has shape {z.shape}; they must match")
    m, delta, snr = losses._decoder_nearest(z, gamma_0, vocab_size)

    def draw(use_window: bool):
        return lambda u, delta, snr, m: _inverse_cdf(
            u, delta, snr, m, vocab_size, window=use_window
        )

    if 2 * losses._WINDOW + 1 >= vocab_size or window is False:
        return draw(False)(u, delta, snr, m)
    if window is True:
        return draw(True)(u, delta, snr, m)
    exact = losses._window_is_exact(jnp.min(snr), vocab_size)
    return jax.lax.cond(exact, draw(True), draw(False), u, delta, snr, m)
