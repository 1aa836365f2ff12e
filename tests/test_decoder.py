"""The decoder sampler (jvdm.decoder) against a float64 NumPy inverse CDF and by Monte Carlo."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jvdm import decoder

V = 256


def _np_probs(z, gamma_0):
    """float64 probabilities ``[..., V]`` of the decoder, straight from its definition."""
    z = np.asarray(z, np.float64)[..., None]
    alpha = np.sqrt(1.0 / (1.0 + np.exp(gamma_0)))
    v = 2.0 * (np.arange(V) + 0.5) / V - 1.0
    logits = -0.5 * np.exp(-gamma_0) * (z / alpha - v) ** 2
    logits -= logits.max(axis=-1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(axis=-1, keepdims=True)


def _np_inverse_cdf(u, z, gamma_0):
    cdf = np.cumsum(_np_probs(z, gamma_0), axis=-1)
    draw = (cdf <= np.asarray(u, np.float64)[..., None]).sum(axis=-1)
    return np.minimum(draw, V - 1)


def _latents(rng, n, gamma_0):
    """z_0 = alpha x + sigma eps for random pixel values, the edge values included."""
    x = rng.integers(0, V, size=n)
    x[:64] = 0
    x[64:128] = V - 1
    alpha = np.sqrt(1.0 / (1.0 + np.exp(gamma_0)))
    sigma = np.sqrt(1.0 / (1.0 + np.exp(-gamma_0)))
    z = alpha * (2.0 * (x + 0.5) / V - 1.0) + sigma * rng.standard_normal(n)
    return z.astype(np.float32).reshape(4, -1)


@functools.partial(jax.jit, static_argnames="window")
def _sample(u, z, gamma_0, *, window):
    return decoder.decoder_sample(u, z, gamma_0, window=window)


def test_window_equals_full_with_the_same_uniforms():
    """Where the window bound holds (gamma_0 = -13.3, VDM's), the 17-value inverse CDF gives the
    same draws as the 256-value one for the same uniforms: they can differ only where u lies
    within the dropped mass (< 4e-9) or a rounding (~1e-7) of a CDF boundary."""
    gamma_0 = -13.3
    assert bool(decoder._window_is_exact(jnp.exp(-jnp.float32(gamma_0)), V))
    rng = np.random.default_rng(0)
    z = _latents(rng, 200_000, gamma_0)
    u = rng.random(z.shape, dtype=np.float32)
    full = np.asarray(_sample(u, z, gamma_0, window=False))
    win = np.asarray(_sample(u, z, gamma_0, window=True))
    auto = np.asarray(_sample(u, z, gamma_0, window=None))
    assert np.array_equal(win, auto)
    assert np.count_nonzero(win != full) == 0


@pytest.mark.parametrize("gamma_0", [-13.3, -9.5, -6.0, -2.0, 1.0])
def test_inverse_cdf_matches_float64(gamma_0):
    """The draws equal the float64 inverse CDF of the decoder's definition at the same uniforms,
    inside the window regime (gamma_0 <= -9.13) and in the full 256-value fallback; a mismatch
    needs u within ~1e-6 of a CDF boundary, so at most a few in 1e5 (measured: 0 of 40,000 for
    gamma_0 <= -6, 1 for gamma_0 = -2 and 1)."""
    rng = np.random.default_rng(1)
    z = _latents(rng, 40_000, gamma_0)
    u = rng.random(z.shape, dtype=np.float32)
    got = np.asarray(_sample(u, z, jnp.float32(gamma_0), window=None))
    want = _np_inverse_cdf(u, z, gamma_0)
    assert got.dtype == np.int32 and got.min() >= 0 and got.max() <= V - 1
    assert np.mean(got != want) <= 5e-5, np.count_nonzero(got != want)


def test_monte_carlo_frequencies_match_probabilities():
    """Draws from jax.random uniforms at a spread-out decoder (gamma_0 = -4, 256-value fallback):
    the chi-square statistic over the values with expected count >= 5 stays below the 99.9%
    quantile of its distribution (mean k, sd sqrt(2k): bound k + 4.5 sqrt(2k))."""
    gamma_0, n = -4.0, 200_000
    z = np.full((n,), 0.3, np.float32)
    u = jax.random.uniform(jax.random.key(3), (n,))
    got = np.asarray(_sample(u, z, jnp.float32(gamma_0), window=None))
    p = _np_probs(np.float32(0.3), gamma_0)
    counts = np.bincount(got, minlength=V)
    expected = n * p
    keep = expected >= 5
    assert keep.sum() > 20  # a spread-out distribution, not a point mass
    chi2 = float(np.sum((counts[keep] - expected[keep]) ** 2 / expected[keep]))
    k = int(keep.sum()) - 1
    assert chi2 < k + 4.5 * np.sqrt(2 * k), (chi2, k)
    assert counts[~keep].sum() <= max(5 * expected[~keep].sum(), 20)


def test_decode_memory_is_of_the_data_size():
    """The compiled sampler of a [64, 16, 16, 3] batch allocates at most a few copies of the data
    (XLA's memory analysis), not the 256 times the data that the log-probabilities would take."""
    shape = (64, 16, 16, 3)
    data_bytes = int(np.prod(shape)) * 4
    spec = jax.ShapeDtypeStruct(shape, jnp.float32)
    compiled = _sample.lower(spec, spec, jnp.float32(-13.3), window=None).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp <= 16 * data_bytes, (temp, data_bytes)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="u has shape"):
        decoder.decoder_sample(np.zeros((2, 3)), np.zeros((2, 4)), -13.0)
