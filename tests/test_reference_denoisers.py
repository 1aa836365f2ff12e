"""The reference denoisers against float64 closed forms, brute force and least squares."""

import numpy as np
import pytest

from jvdm import reference_denoisers as ref
from jvdm.errors import JvdmUserError


def _alpha_sigma(gamma):
    a2 = 1.0 / (1.0 + np.exp(gamma))
    return np.sqrt(a2), np.sqrt(1.0 - a2)


def _random_cov(rng, d):
    m = rng.standard_normal((d, d))
    return m @ m.T / d + 0.05 * np.eye(d)


@pytest.mark.parametrize("gamma", [-4.0, 0.0, 3.0])
def test_gaussian_denoiser_matches_the_float64_solve(gamma):
    """mu + a C (a^2 C + s^2 I)^{-1} (z - a mu) by a linear solve, not the eigenbasis."""
    rng = np.random.default_rng(0)
    d = 6
    x = rng.multivariate_normal(rng.standard_normal(d), _random_cov(rng, d), size=50)
    fit = ref.fit_gaussian(x)
    mu, cov = x.mean(0), np.cov(x, rowvar=False, bias=True)
    a, s = _alpha_sigma(gamma)
    z = rng.standard_normal((5, d))
    want = mu + a * np.linalg.solve(a * a * cov + s * s * np.eye(d), (z - a * mu).T).T @ cov.T
    got = np.asarray(ref.gaussian_denoiser(z, gamma, fit), np.float64)
    np.testing.assert_allclose(got, want, atol=2e-5 * (1 + np.abs(want).max()))


def test_gaussian_denoiser_is_the_least_squares_regression_of_non_gaussian_data():
    """For any data, the affine map of z with least squared error of x (fitted by lstsq on a
    large sample of a two-component mixture) is the Gaussian denoiser of the data's moments."""
    rng = np.random.default_rng(1)
    n, d, gamma = 400_000, 3, -0.5
    sign = rng.integers(0, 2, size=(n, 1)) * 2 - 1
    x = sign * np.array([1.5, -0.5, 0.8]) + 0.3 * rng.standard_normal((n, d))
    a, s = _alpha_sigma(gamma)
    z = a * x + s * rng.standard_normal((n, d))
    design = np.concatenate([z, np.ones((n, 1))], axis=1)
    coef, *_ = np.linalg.lstsq(design, x, rcond=None)
    fit = ref.fit_gaussian(x)
    probe = rng.standard_normal((8, d))
    want = np.concatenate([probe, np.ones((8, 1))], axis=1) @ coef
    got = np.asarray(ref.gaussian_denoiser(probe, gamma, fit), np.float64)
    # Sampling error of the regression's coefficients at n = 4e5 is about 2e-3 here.
    np.testing.assert_allclose(got, want, atol=1e-2)


@pytest.mark.parametrize("gamma", [-3.0, 0.0, 2.0])
def test_empirical_denoiser_matches_brute_force_bayes_in_float64(gamma):
    rng = np.random.default_rng(2)
    support = rng.standard_normal((7, 3))
    z = rng.standard_normal((4, 3))
    a, s = _alpha_sigma(gamma)
    like = np.exp(-np.sum((z[:, None, :] - a * support[None]) ** 2, -1) / (2 * s * s))
    post = like / like.sum(1, keepdims=True)
    np.testing.assert_allclose(
        np.asarray(ref.empirical_denoiser(z, gamma, support), np.float64),
        post @ support,
        atol=1e-5,
    )
    np.testing.assert_allclose(
        np.asarray(ref.effective_support(z, gamma, support), np.float64),
        1.0 / np.sum(post**2, 1),
        rtol=1e-4,
    )


def test_empirical_denoiser_approaches_the_gaussian_one_for_a_large_gaussian_support():
    """Two routes to E[x | z] for Gaussian data: the empirical posterior over 200,000 draws
    agrees with the closed form within five Monte Carlo standard errors."""
    rng = np.random.default_rng(3)
    d, n, gamma = 2, 200_000, 0.0
    mu, cov = np.array([0.5, -1.0]), np.array([[1.0, 0.6], [0.6, 0.8]])
    support = rng.multivariate_normal(mu, cov, size=n)
    fit = ref.fit_gaussian(support)
    z = rng.standard_normal((6, d))
    got = np.asarray(ref.empirical_denoiser(z, gamma, support), np.float64)
    want = np.asarray(ref.gaussian_denoiser(z, gamma, fit), np.float64)
    a, s = _alpha_sigma(gamma)
    post_var = np.diag(cov - a * a * cov @ np.linalg.solve(a * a * cov + s * s * np.eye(d), cov))
    ess = np.asarray(ref.effective_support(z, gamma, support), np.float64)
    se = np.sqrt(post_var[None, :] / ess[:, None])
    assert np.all(np.abs(got - want) < 5 * se), (got - want) / se


def test_empirical_denoiser_at_its_ends_stays_finite():
    support = np.array([[0.0, 0.0], [1.0, 1.0], [-1.0, 2.0]])
    z = np.array([[0.9, 1.2], [-50.0, 80.0]])  # the second far from every point
    near = ref.empirical_denoiser(z, -25.0, support)  # sigma^2 ~ 1e-11: the nearest point
    np.testing.assert_allclose(np.asarray(near), support[[1, 2]], atol=1e-6)
    np.testing.assert_allclose(np.asarray(ref.effective_support(z, -25.0, support)), 1.0)
    far = ref.effective_support(z, 25.0, support)  # alpha^2 ~ 1e-11: every point alike
    np.testing.assert_allclose(np.asarray(far), 3.0, rtol=1e-4)
    # Even there the far z tilts the weights by about alpha |z| |x_i| / sigma^2 ~ 6e-4.
    np.testing.assert_allclose(
        np.asarray(ref.empirical_denoiser(z, 25.0, support)),
        support.mean(0)[None].repeat(2, 0),
        atol=1e-3,
    )


def test_wrong_shapes_say_what_to_do():
    fit = ref.fit_gaussian(np.random.default_rng(4).standard_normal((10, 4)))
    with pytest.raises(JvdmUserError, match=r"\[batch, 4\]"):
        ref.gaussian_denoiser(np.zeros((2, 5)), 0.0, fit)
    with pytest.raises(JvdmUserError, match=r"\[batch, 4\]"):
        ref.empirical_denoiser(np.zeros((2, 2, 2)), 0.0, np.zeros((3, 4)))
    with pytest.raises(JvdmUserError, match="flatten"):
        ref.fit_gaussian(np.zeros((10, 2, 2)))
