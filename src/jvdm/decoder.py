r"""VDM's 256-value decoder ``p(x | z_0)``: its likelihood, and sampling it, in memory of the data.

The decoder is a categorical over the pixel values (:func:`decoder_log_probs`), ``log p_k = d_k -
log1p(S)`` against the nearest bin ``m``. :func:`decoder_log_likelihood` is what the bound uses: the
data's own value and the normaliser in one fused pass, and, at VDM's ``gamma(0)``, only the values
within ``_WINDOW`` bins of ``m`` (:func:`_window_is_exact` proves every other one below float32
resolution).

Sampling. Forming the ``[..., 256]`` probabilities for a chunk of samples costs 256 times the data
(2.4 GB for 256 CIFAR-10 images). :func:`decoder_sample` therefore draws by the inverse CDF with one
uniform per element: a first pass sums the unnormalised ``e_k = exp(d_k)`` over the values, a second
finds the first value whose running sum exceeds ``u`` times the total. Both passes are elementwise
loops over the values (17 of them inside the window, all 256 where the bound does not hold), so
nothing of size ``[..., 256]`` is ever stored. With the same ``u`` the windowed and full draws agree
except where ``u`` falls within the dropped mass (< 4e-9) or the rounding of the sums of a CDF
boundary.

References:
  Kingma et al. 2021 appendix C (the decoder); Devroye 1986 ch. III.2 (inverse-CDF sampling).
"""

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Integer

from jvdm.diffusion import _check_same_shape, _expand

__all__ = ["decoder_log_likelihood", "decoder_log_probs", "decoder_sample", "scale_pixels"]


def _sum_per_example(v: Array) -> Array:
    return jnp.sum(v, axis=tuple(range(1, v.ndim)))


def scale_pixels(
    x: Integer[ArrayLike, "..."] | Float[ArrayLike, "..."], vocab_size: int = 256
) -> Float[Array, "..."]:
    """Map integer pixel values ``0..vocab_size-1`` to bin centres in [-1, 1] (float32).

    ``2 (x + 0.5) / vocab_size - 1``.

    References:
      Kingma et al. 2021, appendix C (and the reference code's ``vocab_size`` decoder).
    """
    return 2.0 * ((jnp.asarray(x, dtype=jnp.float32) + 0.5) / vocab_size) - 1.0


def decoder_log_probs(
    z_0: Float[ArrayLike, "B ..."],
    gamma_0: Float[ArrayLike, " B"] | float,
    vocab_size: int = 256,
) -> Float[Array, "B ... V"]:
    """Log-probabilities ``log p(x = k | z_0)`` of every value k for every element.

    VDM's categorical decoder: ``logits_k = -0.5 exp(-gamma_0) (z_0 / alpha_0 - scale(k))^2``, the
    log Gaussian likelihood ``log q(z_0 | x = k)`` up to a constant in k, normalised over k. It is
    the paper's choice; it is exactly normalised by construction (a softmax), needs no special
    cases for the edge bins, and is elementwise, so it is right for any channel count (the
    reference code hard-codes 3 channels and triples the term for grayscale).

    Numerics: a plain ``log_softmax`` returns ``log(1 + S)`` for the nearest bin, where
    ``S = sum_{k != m} exp(l_k - l_m)`` is ~1e-8 at gamma_0 ~ -13; float32 rounds ``1 + S`` to 1 and
    the term to 0. We normalise against the nearest bin m instead: ``log p_k = d_k - log1p(S)``
    with ``d_k = l_k - l_m = -0.5 SNR (v_m - v_k)(2 delta + (v_m - v_k))``,
    ``delta = z_0 / alpha_0 - v_m``: a product form that also avoids subtracting two large logits.
    Result: within ~1e-6 relative of float64 on the same inputs for gamma_0 in [-13.3, 5].

    Memory: the output is ``vocab_size`` times the data (``[B, H, W, C, 256]`` float32). The
    training loss does not need it: :func:`decoder_log_likelihood` forms only the data's own
    value and the normaliser, in one fused pass forward and backward.

    Args:
      z_0: latent at t = 0, ``[B, ...]``.
      gamma_0: scalar or ``[B]``.
      vocab_size: number of values (256 for 8-bit data).

    Returns:
      ``[B, ..., vocab_size]`` log-probabilities; ``exp`` sums to 1 over the last axis.

    References:
      Kingma et al. 2021 appendix C (eq. 29 ff.) and the reference ``VDM.decode`` / ``logprob``.
    """
    z = jnp.asarray(z_0)
    m, delta, snr = _decoder_nearest(z, gamma_0, vocab_size)
    # Explicit trailing value axis: [1, ..., 1, V] against [B, ..., 1].
    k = jnp.arange(vocab_size, dtype=jnp.float32).reshape((1,) * z.ndim + (vocab_size,))
    w = 2.0 * (m[..., None] - k) / vocab_size  # v_m - v_k, exact for vocab_size a power of 2
    d = -0.5 * snr[..., None] * w * (2.0 * delta[..., None] + w)
    return d - _log1p_others(delta, snr, m, vocab_size)[..., None]


def _decoder_nearest(z: Array, gamma_0, vocab_size: int) -> tuple[Array, Array, Array]:
    """``(m, delta, snr)``, each of ``z``'s shape: the nearest bin, the offset from it, the SNR.

    ``m`` is the index of the bin centre nearest to ``z / alpha_0`` (the most likely value,
    clipped to the valid range) and ``delta = z / alpha_0 - v_m``.
    """
    g = _expand(gamma_0, z)
    snr = jnp.broadcast_to(jnp.exp(-g), z.shape)
    alpha = jnp.sqrt(jax.nn.sigmoid(-g))
    m = jnp.round((z / alpha + 1.0) * (vocab_size / 2) - 0.5)
    m = jax.lax.stop_gradient(jnp.clip(m, 0, vocab_size - 1))
    v_m = scale_pixels(m, vocab_size)
    # delta = z / alpha - v_m. At low noise d_k is ~SNR/128 times more sensitive to delta than
    # delta is to its own rounding, so z / alpha (one rounding of z, one of alpha) would cost up
    # to ~1e-4 relative at gamma_0 = -13. Instead: z - v_m is exact there (Sterbenz), and
    # 1 - alpha = sigma^2 / (1 + alpha) is computed without cancellation.
    one_minus_alpha = jax.nn.sigmoid(g) / (1.0 + alpha)
    delta = ((z - v_m) + one_minus_alpha * v_m) / alpha
    return m, delta, snr


# Values within this many bins of the nearest one are summed exactly; the rest are provably
# below float32 resolution once SNR(0) is large enough (see _window_is_exact).
_WINDOW = 8
# Dropped terms are at most 2 exp(-_WINDOW_MARGIN) ~ 4e-9 of the kept sum.
_WINDOW_MARGIN = 20.0


def _window_is_exact(snr_min: Array, vocab_size: int) -> Array:
    """Whether summing ``|k - m| <= _WINDOW`` loses nothing that float32 could represent.

    With ``j = k - m``, ``w_k = -2 j / V`` and ``|delta| <= 1 / V`` (or larger only at the clipped
    edge bins, with the sign that makes every other bin less likely), every term obeys
    ``d_k <= -2 snr |j| (|j| - 1) / V^2``, while the better neighbour has ``d >= -2 snr / V^2``.
    So the terms beyond the window sum to at most ``2 exp(-c (W (W + 1) - 1))`` of ``S``, with
    ``c = 2 snr / V^2`` (geometric tail included for c W >= 1/2, which this condition implies).
    For V = 256 and W = 8 that is exact to float32 when ``gamma_0 <= -9.13``; VDM's schedules
    start at gamma_0 ~ -13.
    """
    c = 2.0 * snr_min / vocab_size**2
    return c * (_WINDOW * (_WINDOW + 1) - 1) >= _WINDOW_MARGIN


def _others_terms(delta, snr, m, vocab_size: int, *, window: bool):
    """``(e_k, w_k, u_k)`` over a leading value axis: all values, or the window around ``m``."""
    if window:
        j = jnp.array([j for j in range(-_WINDOW, _WINDOW + 1) if j], jnp.float32)
        j = j.reshape((-1,) + (1,) * m.ndim)
        w = -2.0 * j / vocab_size  # v_m - v_k, independent of m
        keep = (m[None] + j >= 0) & (m[None] + j <= vocab_size - 1)
    else:
        k = jnp.arange(vocab_size, dtype=jnp.float32).reshape((vocab_size,) + (1,) * m.ndim)
        w = 2.0 * (m[None] - k) / vocab_size  # v_m - v_k, exact for vocab_size a power of 2
        keep = k != m[None]
    u = w * (2.0 * delta[None] + w)
    return jnp.where(keep, jnp.exp(-0.5 * snr[None] * u), 0.0), w, u


def _others_sums(delta: Array, snr: Array, m: Array, vocab_size: int, *, with_partials: bool):
    """``S = sum_{k != m} exp(d_k)``; with partials also ``sum e_k w_k`` and ``sum e_k u_k``.

    Here ``w_k = v_m - v_k`` and ``u_k = w_k (2 delta + w_k)``, so ``d_k = -0.5 snr u_k``.

    One pass that XLA fuses into a single reduction loop: no ``[..., vocab_size]`` tensor is
    stored, in the forward or the backward pass. At low noise (``_window_is_exact``, always the
    case in training with VDM's schedules) only the ``2 * _WINDOW`` values around the nearest bin
    are visited, 16 instead of 255; otherwise all of them.
    """

    def sums(window: bool):
        def fn(delta, snr, m):
            e, w, u = _others_terms(delta, snr, m, vocab_size, window=window)
            if not with_partials:
                return jnp.sum(e, axis=0)
            # One variadic reduce, so exp is evaluated once for the three sums (three jnp.sum
            # calls become three stored [V, ...] tensors and three loops: ~10x slower on XLA:CPU).
            zero = jnp.zeros((), e.dtype)
            return jax.lax.reduce(
                (e, e * w, e * u),
                (zero, zero, zero),
                lambda a, b: (a[0] + b[0], a[1] + b[1], a[2] + b[2]),
                (0,),
            )

        return fn

    if 2 * _WINDOW + 1 >= vocab_size:
        return sums(False)(delta, snr, m)
    exact = _window_is_exact(jnp.min(snr), vocab_size)
    return jax.lax.cond(exact, sums(True), sums(False), delta, snr, m)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def _log1p_others(delta: Array, snr: Array, m: Array, vocab_size: int) -> Array:
    """``log(1 + sum_{k != m} exp(d_k))`` with ``d_k = -0.5 snr w_k (2 delta + w_k)``, elementwise.

    The normaliser of the decoder against its nearest bin. Its derivatives are sums over the
    same ``d_k``, so the JVP computes them in the same fused pass as the value:
    ``dS/d delta = -snr sum e_k w_k`` and ``dS/d snr = -0.5 sum e_k w_k (2 delta + w_k)``. Plain
    autodiff would instead keep the ``[..., vocab_size]`` weights for the backward pass (1 GB at
    CIFAR-10 batch 128) and spend ~13% of the default CPU train step on them.
    """
    return jnp.log1p(_others_sums(delta, snr, m, vocab_size, with_partials=False))


@_log1p_others.defjvp
def _log1p_others_jvp(vocab_size, primals, tangents):
    delta, snr, m = primals
    d_delta, d_snr, _ = tangents  # m is a stop-gradient bin index
    s, s_w, s_u = _others_sums(delta, snr, m, vocab_size, with_partials=True)
    inv = 1.0 / (1.0 + s)
    return jnp.log1p(s), (-snr * s_w * d_delta - 0.5 * s_u * d_snr) * inv


def decoder_log_likelihood(
    x: Integer[ArrayLike, "B ..."],
    z_0: Float[ArrayLike, "B ..."],
    gamma_0: Float[ArrayLike, " B"] | float,
    vocab_size: int = 256,
) -> Float[Array, " B"]:
    """``log p(x | z_0)`` per example: the decoder's log-probability of the data, summed.

    Args:
      x: integer data in ``0..vocab_size-1`` (uint8 images), ``[B, ...]``.
      z_0: latent at t = 0, same shape as ``x``.
      gamma_0: scalar or ``[B]``.
      vocab_size: number of values.

    Returns:
      ``[B]`` log-likelihoods in nats (<= 0).

    References:
      Kingma et al. 2021 eq. 10 (reconstruction term) and appendix C.
    """
    x, z = jnp.asarray(x), jnp.asarray(z_0)
    _check_same_shape(x=x, z_0=z)
    # log p(x | z_0) = d_x - log1p(S): only the data's own value of d is formed; the normaliser
    # is one fused reduction (see _log1p_others), so no [..., vocab_size] tensor is stored.
    m, delta, snr = _decoder_nearest(z.astype(jnp.float32), gamma_0, vocab_size)
    w = 2.0 * (m - x.astype(jnp.float32)) / vocab_size  # v_m - v_x, exact
    d_x = -0.5 * snr * w * (2.0 * delta + w)
    return _sum_per_example(d_x - _log1p_others(delta, snr, m, vocab_size))


def _terms_at(k, delta, snr, m, vocab_size: int):
    """``exp(d_k)`` for value(s) ``k`` (any shape broadcasting with ``m``), 0 outside ``0..V-1``."""
    w = 2.0 * (m - k) / vocab_size  # v_m - v_k, exact for vocab_size a power of 2
    d = -0.5 * snr * w * (2.0 * delta + w)  # <= 0 up to rounding: m is the most likely value
    valid = (k >= 0) & (k <= vocab_size - 1)
    return jnp.where(valid, jnp.exp(d), 0.0)


def _inverse_cdf(u, delta, snr, m, vocab_size: int, *, window: bool):
    """The first value whose cumulative unnormalised mass exceeds ``u * total``, elementwise."""
    if window:
        first = m - _WINDOW
        count = 2 * _WINDOW + 1
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
        where :func:`jvdm._window_is_exact` proves the rest below float32 resolution, and
        all values otherwise; ``True`` or ``False`` forces one of the two (for tests).

    Returns:
      int32 ``[B, ...]``, the inverse CDF of the decoder's categorical at ``u``.
    """
    u = jnp.asarray(u, jnp.float32)
    z = jnp.asarray(z_0, jnp.float32)
    if u.shape != z.shape:
        raise ValueError(f"u has shape {u.shape} but z_0 has shape {z.shape}; they must match")
    m, delta, snr = _decoder_nearest(z, gamma_0, vocab_size)

    def draw(use_window: bool):
        return lambda u, delta, snr, m: _inverse_cdf(
            u, delta, snr, m, vocab_size, window=use_window
        )

    if 2 * _WINDOW + 1 >= vocab_size or window is False:
        return draw(False)(u, delta, snr, m)
    if window is True:
        return draw(True)(u, delta, snr, m)
    exact = _window_is_exact(jnp.min(snr), vocab_size)
    return jax.lax.cond(exact, draw(True), draw(False), u, delta, snr, m)
