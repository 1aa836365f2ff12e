"""Tests for jvdm.schedules against independent float64 NumPy answers."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jvdm import schedules as S
from references import rel_err

RTOL_F32 = 1e-4  # the accuracy requirement for float32 results


def _sigmoid64(x):
    x = np.asarray(x, np.float64)
    return np.where(x >= 0, 1 / (1 + np.exp(-x)), np.exp(x) / (1 + np.exp(x)))


# --- alpha_bar, linear and cosine schedules ------------------------------------------------


@pytest.mark.parametrize("shape", [(50,), (3, 40)])
def test_alpha_bar_matches_product_loop(shape):
    rng = np.random.default_rng(0)
    betas = rng.uniform(1e-4, 0.05, shape).astype(np.float32)
    want = np.empty(shape, np.float64)
    for idx in np.ndindex(shape[:-1]):
        prod = 1.0
        for t in range(shape[-1]):
            prod *= 1.0 - float(betas[idx + (t,)])
            want[idx + (t,)] = prod
    for fn in (S.alpha_bar, jax.jit(S.alpha_bar)):
        got = fn(betas)
        assert got.shape == shape and got.dtype == jnp.float32
        np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("T", [1, 2, 1000])
def test_linear_betas_formula(T):
    t = np.arange(1, T + 1)
    want = 1e-4 + (0.02 - 1e-4) * (t - 1) / max(T - 1, 1)
    for fn in (S.linear_betas, jax.jit(S.linear_betas, static_argnums=0)):
        got = fn(T)
        assert got.shape == (T,) and got.dtype == jnp.float32
        np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("T, s", [(1000, 0.008), (10, 0.008), (100, 0.0)])
def test_cosine_alpha_bar_formula(T, s):
    # Nichol & Dhariwal, in float64: f(t)/f(0), betas clipped at 0.999, cumulative product.
    t = np.arange(T + 1, dtype=np.float64)
    f = np.cos(0.5 * np.pi * (t / T + s) / (1 + s)) ** 2
    ab = f / f[0]
    betas = np.minimum(1 - ab[1:] / ab[:-1], 0.999)
    want = np.cumprod(1 - betas)
    for fn in (S.cosine_alpha_bar, jax.jit(S.cosine_alpha_bar, static_argnums=0)):
        got = np.asarray(fn(T, s))
        assert got.shape == (T,) and got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=2e-5)
    assert np.all(np.diff(got) < 0)
    # The last step is exactly the clipped one.
    np.testing.assert_allclose(got[-1] / got[-2], 1 - 0.999, rtol=1e-4)


# --- conversions -------------------------------------------------------------------------


def _alpha_bar_grid() -> np.ndarray:
    """float32 alpha_bar over the full range, including within 1e-4 of 0 and of 1."""
    g = np.linspace(-16, 20, 721)
    ab = _sigmoid64(-g)
    near = [10.0**-k for k in range(4, 31)] + [1 - 10.0**-k for k in np.arange(4, 7.5, 0.5)]
    ab = np.concatenate([ab, near, [0.25, 0.5, 0.5 + 1e-7, 0.5 - 1e-7, 0.75]]).astype(np.float32)
    return ab[(ab > 0) & (ab < 1)]


def _gamma_grid() -> np.ndarray:
    g = np.linspace(-20, 20, 4001)
    tiny = np.array([1e-6, 1e-4, 1e-2])
    return np.concatenate([g, tiny, -tiny]).astype(np.float32)


def test_gamma_alpha_bar_round_trips():
    ab = _alpha_bar_grid()
    g = jax.jit(S.gamma_from_alpha_bar)(ab)
    assert np.all(np.isfinite(g))
    # alpha_bar -> gamma -> alpha_bar and -> sigma_sq = 1 - alpha_bar (the latter checks that
    # gamma is accurate even where 1 - alpha_bar is a few ulp).
    # (rtol: gamma ~ 69 at alpha_bar = 1e-30 is itself only known to half an ulp, 4e-6 relative.)
    np.testing.assert_allclose(jax.jit(S.alpha_bar_from_gamma)(g), ab, rtol=1e-5)
    one_minus = 1 - ab.astype(np.float64)
    np.testing.assert_allclose(jax.jit(S.sigma_sq_from_gamma)(g), one_minus, rtol=1e-5)
    # gamma -> (alpha_bar, sigma_sq, snr): consistent, and back again. Rounding alpha_bar to
    # float32 (relative 2**-24) moves gamma by up to ~2**-24 (1 + SNR) in absolute terms: that is
    # the tolerance (it grows where alpha_bar -> 1, which is why sigma_sq_from_gamma exists).
    gam = _gamma_grid()
    ab_g, s2_g = S.alpha_bar_from_gamma(gam), S.sigma_sq_from_gamma(gam)
    np.testing.assert_allclose(np.float64(ab_g) + np.float64(s2_g), 1.0, rtol=2e-7)
    np.testing.assert_allclose(S.snr_from_gamma(gam), np.float64(ab_g) / s2_g, rtol=1e-6)
    ok = gam > -12  # beyond, alpha_bar rounds to 1 in float32
    back = np.float64(S.gamma_from_alpha_bar(ab_g))[ok]
    g64 = np.float64(gam[ok])
    tol = 2e-6 * np.abs(g64) + 2 * 2.0**-24 * (1 + np.exp(-g64)) + 1e-7
    assert np.all(np.abs(back - g64) <= tol)
    ok = gam > -3  # same conditioning: the relative error of snr(alpha_bar) is ~2**-24 SNR
    np.testing.assert_allclose(S.snr(ab_g)[ok], S.snr_from_gamma(gam)[ok], rtol=1e-5)


def test_scalar_and_batched_shapes():
    for fn in (
        S.snr,
        S.gamma_from_alpha_bar,
        S.alpha_bar_from_gamma,
        S.sigma_sq_from_gamma,
        S.snr_from_gamma,
    ):
        assert jax.jit(fn)(0.3).shape == ()
        assert jax.jit(fn)(jnp.full((4, 3), 0.3)).shape == (4, 3)


def test_float32_accuracy_sweep():
    """Every conversion within 1e-4 relative of float64 evaluated on the same float32 inputs."""
    ab = _alpha_bar_grid()
    a64 = ab.astype(np.float64)
    gam = _gamma_grid()
    g64 = gam.astype(np.float64)
    cases = {
        "snr": (S.snr(ab), a64 / (1 - a64)),
        "gamma_from_alpha_bar": (S.gamma_from_alpha_bar(ab), np.log(1 - a64) - np.log(a64)),
        "alpha_bar_from_gamma": (S.alpha_bar_from_gamma(gam), _sigmoid64(-g64)),
        "sigma_sq_from_gamma": (S.sigma_sq_from_gamma(gam), _sigmoid64(g64)),
        "snr_from_gamma": (S.snr_from_gamma(gam), np.exp(-g64)),
        "alpha_bar": (
            S.alpha_bar(S.linear_betas(1000)),
            np.cumprod(1 - np.float64(S.linear_betas(1000))),
        ),
    }
    worst = {name: float(rel_err(got, want).max()) for name, (got, want) in cases.items()}
    print("schedules worst float32 relative error:", worst)
    for name, err in worst.items():
        assert err < RTOL_F32, (name, err)


# --- validation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: S.linear_betas(0), "T=0"),
        (lambda: S.linear_betas(-3), "T=-3"),
        (lambda: S.cosine_alpha_bar(0), "T=0"),
        (lambda: S.linear_betas(10, beta_1=0.0), "beta_1=0.0"),
        (lambda: S.linear_betas(10, beta_T=1.5), "beta_T=1.5"),
        (lambda: S.cosine_alpha_bar(10, s=-0.1), "s=-0.1"),
        (lambda: S.alpha_bar(np.array([0.1, 0.2, 0.0, 0.3])), r"betas\[2\]=0.0"),
        (lambda: S.alpha_bar(np.array([[0.1, 0.2], [0.3, -1.0]])), r"betas\[1, 1\]=-1.0"),
        # betas too small for float32: alpha_bar_1 rounds to 1, then stops decreasing.
        (lambda: S.alpha_bar(np.float32([1e-9, 0.5])), r"alpha_bar\[0\]=1.0"),
        (lambda: S.alpha_bar(np.float32([0.5, 1e-9])), r"alpha_bar\[1\]=0.5 >= alpha_bar\[0\]"),
    ],
)
def test_invalid_parameters_raise_naming_the_value(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_validation_is_skipped_under_jit():
    # Traced values cannot be checked, and checking must not break tracing.
    out = jax.jit(S.alpha_bar)(jnp.array([0.1, 0.2]))
    np.testing.assert_allclose(out, [0.9, 0.72], rtol=1e-6)
    out = jax.jit(S.linear_betas, static_argnums=0)(3, 0.1, 0.3)
    np.testing.assert_allclose(out, [0.1, 0.2, 0.3], rtol=1e-6)
    f0, f1 = (math.cos(0.5 * math.pi * (t / 4 + 0.01) / 1.01) ** 2 for t in (0, 1))
    got = jax.jit(S.cosine_alpha_bar, static_argnums=0)(4, 0.01)
    assert math.isclose(float(got[0]), f1 / f0, rel_tol=1e-6)
