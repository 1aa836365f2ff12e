"""The mixture base: a mixture of probabilistic PCA Gaussians, its three predictions against float64
linear solves, its fit against an independent eigendecomposition, and the module's placeholder,
shapes and config checks (the untrained model and the trainer run are in test_gaussian_base.py,
with the one Gaussian's)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gaussian_models import gaussian_base_model
from jvdm import config as config_lib
from jvdm import model as model_lib
from jvdm import reference_denoisers as ref
from jvdm.errors import JvdmUserError
from jvdm.nn.gaussian_base import COLLECTION

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _alpha_sigma(gamma):
    a2 = 1.0 / (1.0 + np.exp(gamma))
    return np.sqrt(a2), np.sqrt(1.0 - a2)


def _clusters(rng, sizes=(300, 500, 200), d=6, gap=6.0):
    """Three anisotropic clusters ``gap`` apart, one coordinate constant in all of them."""
    parts, labels = [], []
    for j, n in enumerate(sizes):
        scale = np.linspace(1.0, 0.1, d) * (1.0 + 0.3 * j)
        rot = np.linalg.qr(rng.standard_normal((d, d)))[0]
        centre = np.zeros(d)
        centre[j % d] = gap * (j + 1)
        parts.append(rng.standard_normal((n, d)) * scale @ rot + centre)
        labels.append(np.full(n, j))
    x = np.concatenate(parts)
    x[:, 4] = 0.5
    return x, np.concatenate(labels)


def _float64(fit, z, gamma):
    """``(x_hat, eps_hat, v_hat)`` of the mixture by float64 linear solves with each component's
    full covariance and the log-determinant of its marginal: no eigenbasis, no softmax trick."""
    w, means, values, vectors, residual = (np.asarray(t, np.float64) for t in fit)
    a, s = _alpha_sigma(gamma)
    d = means.shape[1]
    log_p, x_hats = [], []
    for k in range(len(w)):
        u = vectors[k]
        cov = u @ np.diag(values[k]) @ u.T + residual[k] * (np.eye(d) - u @ u.T)
        marg = a * a * cov + s * s * np.eye(d)
        y = z - a * means[k]
        sol = np.linalg.solve(marg, y.T).T
        x_hats.append(means[k] + a * sol @ cov)
        log_p.append(w[k] - 0.5 * (np.sum(y * sol, axis=1) + np.linalg.slogdet(marg)[1]))
    log_p = np.array(log_p)
    post = np.exp(log_p - log_p.max(0))
    post /= post.sum(0)
    x_hat = np.einsum("kb,kbd->bd", post, np.array(x_hats))
    eps_hat = (z - a * x_hat) / s
    return {"x0": x_hat, "eps": eps_hat, "v": a * eps_hat - s * x_hat}


@pytest.mark.parametrize("gamma", [-13.3, -4.0, 0.0, 5.0])
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_mixture_prediction_matches_float64(prediction, gamma):
    """Each parameterisation against float64 at latents of every cluster and between them (where
    the components share the posterior), at the schedule's ends too."""
    rng = np.random.default_rng(0)
    x, _ = _clusters(rng)
    fit = ref.fit_mixture(x, 3, 2)
    a, s = _alpha_sigma(gamma)
    clean = np.concatenate([x[[0, 400, 900]], 0.5 * (x[[0]] + x[[400]])])
    z = a * clean + s * rng.standard_normal(clean.shape)
    want = _float64(fit, z, gamma)[prediction]
    got = np.asarray(ref.gaussian_prediction(z, gamma, fit, prediction), np.float64)
    # float32 rounding of z (|z| <= 16: 1e-6) through eps_hat's 1/sigma; else ~1e-6 of the scale.
    atol = 2e-5 * (1 + np.abs(want).max()) + (16 * 1.2e-7 / s if prediction != "x0" else 0)
    np.testing.assert_allclose(got, want, atol=atol)


@pytest.mark.parametrize("gamma", [-4.0, -1.0, 0.0, 2.0])
def test_mixture_prediction_moves_with_the_data(gamma):
    """Two routes to one estimate: data shifted by ``m`` gives latents shifted by ``alpha m`` and
    estimates of ``x`` shifted by ``m`` (``eps`` unchanged). A common offset as large as 20 in
    every coordinate (MNIST's backgrounds are a common -1) must cost no more than float32
    rounding of ``|z|``: the squared norms are formed about the mixture's own mean, not about 0,
    where they would be differences of sums ~ ``D alpha^2 m^2``."""
    rng = np.random.default_rng(3)
    x, _ = _clusters(rng, d=40, gap=3.0)
    shift = np.full(x.shape[1], 20.0)
    fit, moved = ref.fit_mixture(x, 3, 4), ref.fit_mixture(x + shift, 3, 4)
    a, s = _alpha_sigma(gamma)
    clean = np.concatenate([x[[0, 400, 900]], 0.5 * (x[:3] + x[300:303])])
    z = a * clean + s * rng.standard_normal(clean.shape)
    for prediction, offset in (("x0", shift), ("eps", 0.0)):
        want = np.asarray(ref.gaussian_prediction(z, gamma, fit, prediction)) + offset
        got = np.asarray(ref.gaussian_prediction(z + a * shift, gamma, moved, prediction))
        # float32 rounding of z + alpha m (|.| <= 30: 2e-6) through x_hat's gain or 1 / sigma.
        tol = 4e-6 * 30 * (1.0 if prediction == "x0" else 1.0 / s) + 1e-5
        assert np.abs(got - want).max() <= tol, (prediction, np.abs(got - want).max(), tol)


def test_one_component_of_rank_d_minus_1_is_the_full_gaussian():
    """Two routes to one denoiser: PPCA of rank D - 1 keeps the smallest eigenvalue as the rest's
    variance, so it is the full covariance, and the mixture of one is fit_gaussian's Gaussian."""
    rng = np.random.default_rng(1)
    x, _ = _clusters(rng)
    one, full = ref.fit_mixture(x, 1, x.shape[1] - 1), ref.fit_gaussian(x)
    assert float(one.log_weights[0]) == 0.0
    z = rng.standard_normal((5, x.shape[1])) * 4
    gammas = np.array([-9.0, -2.0, 0.0, 2.0, 6.0], np.float32)  # one per latent
    for prediction in ("eps", "x0", "v"):
        got = np.asarray(ref.gaussian_prediction(z, gammas, one, prediction))
        want = np.asarray(ref.gaussian_prediction(z, gammas, full, prediction))
        # float32 rounding of each latent's output scale (eps_hat reaches 122 at gamma = -9 along
        # the constant coordinate).
        scale = 1.0 + np.abs(want).max(axis=1, keepdims=True)
        assert np.all(np.abs(got - want) <= 2e-6 * scale), (prediction, got - want)


def test_fit_mixture_matches_each_clusters_own_eigendecomposition():
    """On well-separated clusters k-means finds them; each component is then its cluster's share,
    mean, ``rank`` largest covariance eigenpairs (here by numpy's eigh, the fit uses an SVD) and
    the mean of the other eigenvalues."""
    rng = np.random.default_rng(2)
    x, labels = _clusters(rng, gap=40.0)
    rank = 3
    fit = ref.fit_mixture(x, 3, rank)
    means = np.asarray(fit.means, np.float64)
    for j in range(3):
        members = x[labels == j]
        k = int(np.argmin(np.sum(np.square(means - members.mean(0)), axis=1)))
        np.testing.assert_allclose(means[k], members.mean(0), atol=1e-5)
        assert float(np.exp(fit.log_weights[k])) == pytest.approx(len(members) / len(x), 1e-6)
        vals, vecs = np.linalg.eigh(np.cov(members, rowvar=False, bias=True))
        vals, vecs = vals[::-1], vecs[:, ::-1]
        np.testing.assert_allclose(np.asarray(fit.values[k]), vals[:rank], rtol=1e-5)
        assert float(fit.residual[k]) == pytest.approx(vals[rank:].mean(), rel=1e-5, abs=1e-7)
        overlap = np.abs(np.asarray(fit.vectors[k], np.float64).T @ vecs[:, :rank])
        np.testing.assert_allclose(overlap, np.eye(rank), atol=1e-4)


def test_fit_mixture_is_seeded_and_refuses_what_it_cannot_fit():
    rng = np.random.default_rng(3)
    x, _ = _clusters(rng)
    first, again = ref.fit_mixture(x, 4, 2, seed=5), ref.fit_mixture(x, 4, 2, seed=5)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(JvdmUserError, match=r"cluster has [12] images, not more than rank=2"):
        ref.fit_mixture(x[:30], 20, 2)
    with pytest.raises(JvdmUserError, match=r"rank=6: expected an integer in \[1, 5\]"):
        ref.fit_mixture(x, 2, 6)
    with pytest.raises(JvdmUserError, match=r"fewer distinct images than the 3 mixture"):
        ref.fit_mixture(np.repeat(x[:2], 50, axis=0), 3, 2)
    with pytest.raises(JvdmUserError, match=r"components=0"):
        ref.fit_mixture(x, 0, 2)
    with pytest.raises(JvdmUserError, match=r"shape \[N >= 2, dim\]"):
        ref.fit_mixture(x[0], 2, 2)


def _model(prediction, *, components=3, rank=2):
    return gaussian_base_model(prediction, shape=(4, 4, 1), components=components, rank=rank)


def test_the_mixture_placeholder_is_the_standard_normal_and_fits_must_match():
    model = _model("v")
    params = model_lib.init(model, jax.random.key(0))
    base = ref.MixtureFit(**params.denoiser[COLLECTION])
    assert base.vectors.shape == (3, 16, 2) and base.values.shape == (3, 2)
    z = np.random.default_rng(5).standard_normal((2, 16))
    standard = ref.GaussianFit(jnp.zeros(16), jnp.ones(16), jnp.eye(16))
    for gamma in (-3.0, 2.0):
        np.testing.assert_allclose(
            np.asarray(ref.gaussian_prediction(z, gamma, base, "v")),
            np.asarray(ref.gaussian_prediction(z, gamma, standard, "v")),
            atol=1e-6,
        )
    with pytest.raises(JvdmUserError, match="a mixture base takes a MixtureFit"):
        model_lib.with_gaussian_fit(params, standard)
    other = ref.fit_mixture(np.random.default_rng(6).standard_normal((90, 16)), 3, 4)
    with pytest.raises(JvdmUserError, match=r"values has shape \(3, 4\), the model's base"):
        model_lib.with_gaussian_fit(params, other)
    with pytest.raises(JvdmUserError, match="needs a rank >= 1"):
        model_lib.init(_model("v", rank=0), jax.random.key(0))
    with pytest.raises(JvdmUserError, match="gaussian_base_rank=16 must be below"):
        model_lib.init(_model("v", rank=16), jax.random.key(0))


@pytest.mark.parametrize(
    "override,match",
    [
        ({"gaussian_base_components": 0}, r"gaussian_base_components=0 is invalid"),
        ({"gaussian_base_components": 4}, r"gaussian_base_rank=0 is invalid.*4 components"),
        ({"gaussian_base_rank": -1}, r"gaussian_base_rank=-1 is invalid"),
    ],
)
def test_the_configs_mixture_fields_are_checked(override, match):
    config = config_lib.load_config_file(os.path.join(REPO, "experiments", "tiny.py"))
    for name, value in override.items():
        setattr(config.model, name, value)
    with pytest.raises(JvdmUserError, match=match):
        config_lib.validate(config)
