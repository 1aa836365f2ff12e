"""Probability-flow ODE likelihood against closed forms for Gaussian data with the exact denoiser.

For x ~ N(m, Sigma) every marginal is Gaussian, ``C(gamma) = alpha^2 Sigma + sigma^2 I``, and the
ODE is affine in Sigma's eigenbasis: ``z_1 - alpha_1 m = U diag(sqrt(c_1 / c_0)) U^T (z_0 - alpha_0
m)``. So the model's ODE density is ``log p(z_0) = log N(z_1; 0, I) + log|det dz_1/dz_0|``, all in
float64 NumPy, independent of the code under test.
"""

import math
import os

import jax
import numpy as np
import pytest
from scipy import special, stats

import ode_problem as prob
from gaussian_models import GaussianDenoiser
from jvdm import model as model_lib
from jvdm import ode, ode_flow
from jvdm.errors import JvdmUserError
from jvdm.nn import gamma as gamma_lib
from processes import cpu_env, run_ranks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sig(x):
    return 1.0 / (1.0 + np.exp(-x))


def closed_form(z0):
    """``(log p_ode(z_0) [N], z_1 [N, 4])`` in float64."""
    u, lam = prob.sigma_eig()
    z0 = np.asarray(z0, np.float64).reshape(len(z0), -1)
    c = [_sig(-g) * lam + _sig(g) for g in (prob.GAMMA_MIN, prob.GAMMA_MAX)]
    mu = [np.sqrt(_sig(-g)) * prob.M for g in (prob.GAMMA_MIN, prob.GAMMA_MAX)]
    ratio = np.sqrt(c[1] / c[0])
    z1 = mu[1] + ((z0 - mu[0]) @ u * ratio) @ u.T
    log_p = -0.5 * np.sum(z1**2 + math.log(2 * math.pi), 1) + np.sum(np.log(ratio))
    return log_p, z1


def test_exact_divergence_equals_the_closed_form_density():
    params = prob.params()
    z0 = prob.latents(8)
    got = ode.ode_log_likelihood(params, z0, jax.random.key(0), exact=True, rtol=1e-6, atol=1e-6)
    want, z1 = closed_form(z0)
    np.testing.assert_allclose(got.log_p, want, atol=2e-4)
    np.testing.assert_allclose(got.z_1.reshape(8, -1), z1, atol=2e-5)


def test_error_falls_as_rtol_shrinks():
    params = prob.params()
    z0 = prob.latents(8)
    want, _ = closed_form(z0)
    errors, nfes = [], []
    for tol in (1e-2, 1e-3, 1e-4, 1e-5):
        got = ode.ode_log_likelihood(params, z0, jax.random.key(0), exact=True, rtol=tol, atol=tol)
        errors.append(np.max(np.abs(got.log_p - want)))
        nfes.append(int(got.nfe[0]))
    print("max |error| by rtol 1e-2..1e-5:", errors, "nfe:", nfes)
    assert all(b < a for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < errors[0] / 100
    assert nfes == sorted(nfes) and nfes[0] < nfes[-1]


def _hutchinson_runs(params, z0, probes, copies):
    # Copies of one latent with distinct indices: independent probe draws, one solve.
    zs = np.repeat(z0, copies, axis=0)
    return ode.ode_log_likelihood(params, zs, jax.random.key(probes), probes=probes).log_p


def test_hutchinson_is_unbiased_and_its_variance_falls_as_one_over_probes():
    params = prob.params()
    z0 = prob.latents(1, seed=7)
    exact = closed_form(z0)[0][0]
    n = 256
    one = _hutchinson_runs(params, z0, 1, n)
    four = _hutchinson_runs(params, z0, 4, n)
    for est in (one, four):
        sem = est.std(ddof=1) / math.sqrt(n)
        assert abs(est.mean() - exact) < 4 * sem + 1e-4, (est.mean(), exact, sem)
    ratio = one.var(ddof=1) / four.var(ddof=1)
    lo, hi = stats.f.ppf([0.0005, 0.9995], n - 1, n - 1)
    print(f"Var(1 probe) / Var(4 probes) = {ratio:.3f}; 99.9% band [{4 * lo:.2f}, {4 * hi:.2f}]")
    assert 4 * lo < ratio < 4 * hi
    assert one.var() > 1e-3  # the Jacobian is not diagonal: a single probe does vary


def test_encode_then_decode_returns_the_input():
    params = prob.params()
    z0 = prob.latents(16, seed=2)
    z1 = ode.encode(params, z0)
    np.testing.assert_allclose(z1.reshape(16, -1), closed_form(z0)[1], atol=1e-4)
    np.testing.assert_allclose(ode.decode(params, z1), z0, atol=1e-3)


def test_nfe_counts_every_denoiser_evaluation(monkeypatch):
    calls = [0]
    drift = ode_flow._drift

    def counted(params, z, g):
        jax.debug.callback(lambda: calls.__setitem__(0, calls[0] + 1))
        return drift(params, z, g)

    monkeypatch.setattr(ode_flow, "_drift", counted)
    got = ode.ode_log_likelihood(prob.params(), prob.latents(4), jax.random.key(0), rtol=3.3e-4)
    assert calls[0] == got.nfe[0] > 10


def _expected_bound_bits(params, pixel, dequantization):
    """The bound's expectation over the dequantization noise, per dim, for isotropic N(m, s^2)
    data whose ODE is ``z_1 = mu_1 + r (z_0 - mu_0)`` per dimension (float64 closed form)."""
    model = params.model
    m, s = model.denoiser.m, model.denoiser.s
    g0, g1 = (float(model_lib.gamma(params, np.float32(t))) for t in (0.0, 1.0))
    a0, s0 = math.sqrt(_sig(-g0)), math.sqrt(_sig(g0))
    v = [_sig(-g) * s * s + _sig(g) for g in (g0, g1)]
    mu = [math.sqrt(_sig(-g)) * m for g in (g0, g1)]
    r = math.sqrt(v[1] / v[0])
    x = 2 * (pixel + 0.5) / 256 - 1
    half = 1 / 256
    if dequantization == "uniform":
        var_n, e_log_q = (a0 * half) ** 2 / 3, -math.log(a0 * 2 * half)
    else:
        tau = half * a0 / s0
        z = special.erf(tau / math.sqrt(2))
        var_e = 1 - 2 * tau * math.exp(-0.5 * tau * tau) / math.sqrt(2 * math.pi) / z
        var_n = s0 * s0 * var_e
        e_log_q = -0.5 * var_e - 0.5 * math.log(2 * math.pi) - math.log(s0) - math.log(z)
    e_z1_sq = (mu[1] + r * (a0 * x - mu[0])) ** 2 + r * r * var_n
    e_log_p = -0.5 * e_z1_sq - 0.5 * math.log(2 * math.pi) + math.log(r)
    return (e_log_q - e_log_p) / math.log(2)


@pytest.mark.parametrize("dequantization", ["uniform", "truncated_normal"])
def test_bpd_matches_the_closed_form_bound(dequantization):
    model = model_lib.VDM(
        denoiser=GaussianDenoiser(m=0.1, s=0.4),
        schedule=gamma_lib.FixedLinearGamma(gamma_min=-9.0, gamma_max=9.0),
        image_shape=(2, 2, 1),
    )
    params = model_lib.init(model, jax.random.key(0))
    n = 256
    images = np.full((n, 2, 2, 1), 140, np.uint8)
    got = ode.ode_bpd(params, images, jax.random.key(1), dequantization=dequantization)
    want = _expected_bound_bits(params, 140, dequantization)
    sem = got.bpd.std(ddof=1) / math.sqrt(n)
    print(f"{dequantization}: {got.bpd.mean():.5f} ± {sem:.5f} bpd, closed form {want:.5f}")
    assert abs(got.bpd.mean() - want) < 4 * sem + 1e-4


def test_bad_arguments_say_what_is_wrong():
    params = prob.params()
    images = prob.images(2)
    with pytest.raises(JvdmUserError, match="dequantization"):
        ode.ode_bpd(params, images, jax.random.key(0), dequantization="gauss")
    with pytest.raises(JvdmUserError, match="probes"):
        ode.ode_bpd(params, images, jax.random.key(0), probes=0)
    with pytest.raises(JvdmUserError, match="rtol"):
        ode.ode_bpd(params, images, jax.random.key(0), rtol=0.0)
    with pytest.raises(ValueError, match="uint8"):
        ode.ode_bpd(params, images.astype(np.float32), jax.random.key(0))
    with pytest.raises(JvdmUserError, match="max_steps"):
        ode.ode_bpd(params, images, jax.random.key(0), max_steps=2)


@pytest.mark.slow  # 70 s of subprocess compilation
@pytest.mark.multiprocess
def test_same_answers_on_1_and_4_devices_and_2_processes(tmp_path):
    """In-process (4 devices) vs a 1-device process vs 2 processes x 2 devices (jax.distributed)."""
    assert len(jax.devices()) == 4
    here = prob.answers()
    paths = [str(tmp_path / f"ode_{n}.npz") for n in (1, 2)]
    run_ranks("multiprocess_ode.py", 1, ["--out", paths[0]], cpu_env(1))
    run_ranks("multiprocess_ode.py", 2, ["--out", paths[1]], cpu_env(2))
    one, two = (np.load(path) for path in paths)
    # 2 processes x 2 devices hold the same 2 images per device as 4 local devices: the same
    # solver steps and the same numbers up to the collectives' rounding.
    np.testing.assert_array_equal(two["nfe"], here["nfe"])
    np.testing.assert_allclose(two["bpd"], here["bpd"], rtol=1e-5, atol=1e-6)
    # One device rounds differently (other vector widths), and at rtol = 1e-5 in float32 that
    # can move an accept/reject decision, so the step count may differ (measured: 109
    # evaluations on one device, 103 on four); the answers agree to the solver's tolerance.
    print("nfe 1 device / 4 devices:", one["nfe"][0], here["nfe"][0])
    np.testing.assert_allclose(one["bpd"], here["bpd"], rtol=1e-4, atol=1e-4)
