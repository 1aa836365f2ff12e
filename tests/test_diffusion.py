"""Tests for jvdm.diffusion: forward marginal and posterior, against independent float64 answers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jvdm import diffusion as D
from references import random_s_t, rel_err

RTOL_F32 = 1e-4


# --- q_sample ----------------------------------------------------------------------------


@pytest.mark.parametrize("batched", [False, True])
def test_q_sample(batched):
    rng = np.random.default_rng(0)
    x0, eps = rng.normal(size=(2, 4, 3, 3, 2)).astype(np.float32)
    ab = rng.uniform(0.01, 0.99, 4).astype(np.float32) if batched else np.float32(0.3)
    ab64 = np.float64(ab).reshape((-1, 1, 1, 1) if batched else ())
    want = np.sqrt(ab64) * x0 + np.sqrt(1 - ab64) * eps
    for fn in (D.q_sample, jax.jit(D.q_sample)):
        np.testing.assert_allclose(fn(x0, ab, eps), want, rtol=1e-5, atol=1e-6)


def test_q_sample_marginal_moments():
    # Monte Carlo: x_t ~ N(sqrt(ab) x0, (1 - ab)).
    key = jax.random.key(1)
    n, ab, x0 = 100_000, 0.36, 1.5
    eps = jax.random.normal(key, (n,))
    x_t = np.float64(jax.jit(D.q_sample)(jnp.full((n,), x0), ab, eps))
    se_mean = np.sqrt((1 - ab) / n)
    assert abs(x_t.mean() - 0.6 * x0) < 5 * se_mean
    assert abs(x_t.var() - (1 - ab)) < 5 * (1 - ab) * np.sqrt(2 / n)


@pytest.mark.parametrize(
    "x_shape, other_shape, ab_shape",
    [
        ((4, 3), (4, 3), (5,)),  # [B] arg with the wrong B
        ((4, 3), (4, 3), (4, 1)),  # not [B]
        ((4, 3), (4, 3), (4, 3)),  # a full-shape schedule is not accepted either
        ((4, 3), (4, 2), ()),  # data shapes differ
    ],
)
def test_shape_mismatch_raises_naming_both_shapes(x_shape, other_shape, ab_shape):
    x, other = jnp.zeros(x_shape), jnp.zeros(other_shape)
    ab = jnp.full(ab_shape, 0.5)
    shapes = {str(ab_shape), str(x_shape)} if x_shape == other_shape else {str(other_shape)}
    for fn in (D.q_sample, jax.jit(D.q_sample)):
        with pytest.raises(ValueError) as err:
            fn(x, ab, other)
        assert all(s in str(err.value) for s in shapes | {str(x_shape)})
    with pytest.raises(ValueError):
        jax.jit(D.posterior_mean_var)(other, x, ab, jnp.full(ab_shape, 0.6))


# --- posterior ---------------------------------------------------------------------------


def test_posterior_matches_generic_gaussian_conditioning():
    """Condition the joint Gaussian of (x_s, x_t) | x0 with the textbook formula."""
    rng = np.random.default_rng(2)
    B, Dim = 64, 5
    ab_t, ab_s = random_s_t(rng, B)
    x0 = rng.normal(size=(B, Dim)).astype(np.float32)
    x_t = rng.normal(size=(B, Dim)).astype(np.float32)
    # Forward chain: x_s = sqrt(ab_s) x0 + sqrt(1-ab_s) e1, x_t = sqrt(a) x_s + sqrt(1-a) e2.
    s64, t64 = np.float64(ab_s), np.float64(ab_t)
    a = t64 / s64
    mu = np.stack([np.sqrt(s64), np.sqrt(t64)], -1)[:, :, None] * np.float64(x0)[:, None, :]
    cov = np.empty((B, 2, 2))
    cov[:, 0, 0] = 1 - s64
    cov[:, 0, 1] = cov[:, 1, 0] = np.sqrt(a) * (1 - s64)
    cov[:, 1, 1] = a * (1 - s64) + (1 - a)
    gain = cov[:, 0, 1] / cov[:, 1, 1]  # S12 S22^-1
    want_mean = mu[:, 0] + gain[:, None] * (x_t - mu[:, 1])
    want_var = cov[:, 0, 0] - gain * cov[:, 1, 0]  # S11 - S12 S22^-1 S21
    for fn in (D.posterior_mean_var, jax.jit(D.posterior_mean_var)):
        mean, var = fn(x_t, x0, ab_t, ab_s)
        assert mean.shape == var.shape == (B, Dim)
        np.testing.assert_allclose(mean, want_mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(var, np.broadcast_to(want_var[:, None], (B, Dim)), rtol=1e-5)
    # Scalar schedule arguments broadcast to every example.
    mean, var = D.posterior_mean_var(x_t, x0, ab_t[0], ab_s[0])
    mean0, var0 = D.posterior_mean_var(x_t[:1], x0[:1], ab_t[:1], ab_s[:1])
    np.testing.assert_allclose(mean[:1], mean0, rtol=1e-6)
    np.testing.assert_allclose(var[:1], var0, rtol=1e-6)


@pytest.mark.parametrize("ab_t, ab_s", [(0.3, 0.9), (0.5, 0.52), (0.05, 0.06)])
def test_posterior_matches_monte_carlo_regression(ab_t, ab_s):
    """Regress x_s on x_t over samples of the forward chain (fixed x0, fixed seed).

    For jointly Gaussian (x_s, x_t), E[x_s | x_t] is linear: slope, intercept and residual
    variance must match the posterior within 5 standard errors.
    """
    rng = np.random.default_rng(3)
    n, x0 = 200_000, 0.7
    a = ab_t / ab_s
    x_s = np.sqrt(ab_s) * x0 + np.sqrt(1 - ab_s) * rng.normal(size=n)
    x_t = np.sqrt(a) * x_s + np.sqrt(1 - a) * rng.normal(size=n)
    xc = x_t - x_t.mean()
    slope = np.dot(xc, x_s - x_s.mean()) / np.dot(xc, xc)
    intercept = x_s.mean() - slope * x_t.mean()
    resid_var = np.sum((x_s - intercept - slope * x_t) ** 2) / (n - 2)
    se_slope = np.sqrt(resid_var / np.dot(xc, xc))
    se_intercept = np.sqrt(resid_var * (1 / n + x_t.mean() ** 2 / np.dot(xc, xc)))
    se_var = resid_var * np.sqrt(2 / (n - 2))

    fn = jax.jit(D.posterior_mean_var)
    m, var = fn(jnp.array([0.0, 1.0]), jnp.full((2,), x0), ab_t, ab_s)
    got_intercept, got_slope = float(m[0]), float(m[1] - m[0])
    assert abs(got_slope - slope) < 5 * se_slope
    assert abs(got_intercept - intercept) < 5 * se_intercept
    assert abs(float(var[0]) - resid_var) < 5 * se_var


def _adjacent_pairs():
    """float32 (ab_t, ab_s) over the whole range, s adjacent (ab_s/ab_t - 1 <= 1e-4) or far."""
    g = np.linspace(-12, 14, 300)
    ab_t = 1 / (1 + np.exp(g))
    ab_t = np.concatenate([ab_t, [1e-4, 5e-5, 1 - 1e-4, 1 - 2e-4]])
    ab_s = np.concatenate(
        [
            ab_t + np.minimum(1e-4 * ab_t, (1 - ab_t) / 2),
            ab_t + np.minimum(1e-6 * ab_t, (1 - ab_t) / 2),
            ab_t + (1 - ab_t) / 2,
        ]
    )
    ab_t = np.tile(ab_t, 3).astype(np.float32)
    ab_s = ab_s.astype(np.float32)
    keep = ab_s > ab_t
    return ab_t[keep], ab_s[keep]


def test_float32_accuracy_sweep():
    ab_t, ab_s = _adjacent_pairs()
    rng = np.random.default_rng(4)
    # Positive data so that the mean, a sum of two terms, has no cancellation of its own.
    x0 = rng.uniform(0.1, 1.0, (ab_t.size, 2)).astype(np.float32)
    x_t = rng.uniform(0.1, 1.0, (ab_t.size, 2)).astype(np.float32)
    eps = rng.uniform(0.1, 1.0, (ab_t.size, 2)).astype(np.float32)
    t64, s64 = np.float64(ab_t)[:, None], np.float64(ab_s)[:, None]
    a = t64 / s64
    want_mean = (np.sqrt(a) * (1 - s64) * x_t + np.sqrt(s64) * (1 - a) * x0) / (1 - t64)
    want_var = (1 - a) * (1 - s64) / (1 - t64)
    mean, var = jax.jit(D.posterior_mean_var)(x_t, x0, ab_t, ab_s)
    xt_got = jax.jit(D.q_sample)(x0, ab_t, eps)
    worst = {
        "q_sample": float(rel_err(xt_got, np.sqrt(t64) * x0 + np.sqrt(1 - t64) * eps).max()),
        "posterior mean": float(rel_err(mean, want_mean).max()),
        "posterior var": float(rel_err(var, np.broadcast_to(want_var, var.shape)).max()),
    }
    print("diffusion worst float32 relative error:", worst)
    for name, err in worst.items():
        assert err < RTOL_F32, (name, err)
