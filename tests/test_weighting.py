"""The VDM++ weightings (jvdm.weighting) against float64 NumPy, and the VDM++ identity.

References are written out independently here in float64 (and, for the monotone EDM weighting,
found as the running maximum on a grid rather than from the library's mode).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jvdm import config as config_lib
from jvdm import weighting

LAM = np.concatenate([np.linspace(-5.0, 13.3, 2001), [-1e4, -300.0, -90.0, 90.0, 300.0, 1e4]])
BIAS = 2.0
SCALE = 3.0  # c of elbo_sigmoid
KW = {"sigmoid_bias": BIAS, "sigmoid_scale": SCALE}  # the library's weighting parameters


def _np_log_weight(name, lam):
    lam = np.asarray(lam, np.float64)
    if name == "elbo":
        return np.zeros_like(lam)
    if name == "sigmoid":
        return -np.logaddexp(0.0, lam - BIAS)  # log sigmoid(b - lam)
    if name == "elbo_sigmoid":
        # log(1 + c sigmoid(b - lam)), the sigmoid as exp(-log(1 + e^(lam - b))): no overflow
        return np.log1p(SCALE * np.exp(-np.logaddexp(0.0, lam - BIAS)))
    if name == "v_mse":
        return -0.5 * lam
    gauss = -0.5 * ((lam - 2.4) / 2.4) ** 2 - np.log(2.4 * np.sqrt(2 * np.pi))
    edm = gauss + np.logaddexp(-lam, np.log(0.25)) - np.log(0.25)
    if name == "edm":
        return edm
    raise AssertionError(name)


def _np_edm_monotone(lam):
    """The smallest non-increasing majorant of w_edm: the running maximum from the right, on a
    fine grid that contains ``lam``."""
    grid = np.union1d(np.linspace(-30.0, 30.0, 600001), lam)
    w = np.exp(_np_log_weight("edm", grid))
    majorant = np.maximum.accumulate(w[::-1])[::-1]
    return np.interp(lam, grid, majorant)


def _np_weight(name, lam):
    if name == "edm_monotone":
        return _np_edm_monotone(lam)
    with np.errstate(over="ignore"):  # v_mse beyond float64 at lambda = -1e4: inf, not compared
        return np.exp(_np_log_weight(name, lam))


def test_names_agree_with_the_config():
    assert weighting.WEIGHTINGS == config_lib.WEIGHTINGS


@pytest.mark.parametrize("name", weighting.WEIGHTINGS)
def test_weights_match_float64_and_never_overflow(name):
    lam = jnp.asarray(LAM, jnp.float32)
    fn = jax.jit(
        lambda x: (
            weighting.log_diffusion_weight(x, weighting=name, **KW),
            weighting.diffusion_weight(x, weighting=name, **KW),
        )
    )
    log_w, w = (np.asarray(v, np.float64) for v in fn(lam))
    assert np.all(np.isfinite(log_w)), name
    lam64 = np.asarray(lam, np.float64)  # the float32 inputs, evaluated exactly
    in_range = (lam64 >= -5.0) & (lam64 <= 13.3)
    ref = _np_weight(name, lam64)
    # Relative accuracy where the weight is a normal float32 number; no inf or NaN anywhere
    # (v_mse's weight e^{-lambda/2} exceeds float32 itself below lambda = -177: only its log is
    # finite there, as documented).
    normal = (ref > 1e-30) & (ref < 1e30)
    assert np.all(np.isfinite(w[normal])) and np.all(~np.isnan(w)), name
    np.testing.assert_allclose(w[normal & in_range], ref[normal & in_range], rtol=2e-5)
    np.testing.assert_allclose(w[normal], ref[normal], rtol=2e-3)
    if name != "edm_monotone":
        ref_log = _np_log_weight(name, lam64)
        np.testing.assert_allclose(log_w, ref_log, rtol=1e-6, atol=2e-5)
    if name != "v_mse":
        assert np.all(np.isfinite(w)) and np.all(w >= 0.0), name


def test_monotone_weightings_do_not_increase_with_lambda():
    lam = jnp.linspace(-20.0, 30.0, 5001)
    for name in ("elbo", "sigmoid", "elbo_sigmoid", "edm_monotone", "v_mse"):
        w = np.asarray(weighting.diffusion_weight(lam, weighting=name, **KW))
        assert np.all(np.diff(w) <= 1e-7 * np.maximum(w[:-1], 1e-30)), name
    w = np.asarray(weighting.diffusion_weight(lam, weighting="edm"))
    assert np.any(np.diff(w) > 0)  # EDM's own weighting rises towards its mode
    assert abs(lam[np.argmax(w)] - weighting.EDM_MODE) < 0.02


def test_elbo_weighting_returns_the_diffusion_term_unchanged():
    d = jax.random.uniform(jax.random.key(0), (7,)) * 100
    g = jnp.linspace(-13.3, 5.0, 7)
    out = jax.jit(lambda d, g: weighting.weighted_diffusion_loss(d, g, weighting="elbo"))(d, g)
    assert np.array_equal(np.asarray(out), np.asarray(d))
    out = weighting.weighted_diffusion_loss(d, g, weighting="sigmoid", sigmoid_bias=BIAS)
    np.testing.assert_allclose(out, np.asarray(d) / (1 + np.exp(-(BIAS + np.asarray(g)))), 1e-6)
    with pytest.raises(ValueError, match="weighting='nope'"):
        weighting.log_diffusion_weight(g, weighting="nope")


@pytest.mark.parametrize("name", ["sigmoid", "elbo_sigmoid", "edm_monotone", "v_mse"])
def test_vdmpp_identity_weighted_loss_is_a_mixture_of_noise_augmented_elbos(name):
    """VDM++ section 4, on Gaussian data x ~ N(m, s^2 I_D) with the exact denoiser, whose
    ``E||eps - eps_hat||^2 = D s^2 e^lam / (1 + s^2 e^lam)`` per unit lambda. The diffusion term of
    the ELBO of the data noise-augmented to level ``lam`` (the levels noisier than ``lam``) is
    ``E(lam) = D/2 log((1 + s^2 e^lam) / (1 + s^2 e^lam_min))``, and integration by parts gives
    ``L_w = w(lam_max) E(lam_max) + int (-dw/dlam) E(lam) dlam``: for a non-increasing ``w``, a
    positive mixture of ELBOs. Left side with jvdm's float32 weights, right side with float64
    NumPy weights and their derivative by central differences; trapezoid quadrature on 200,001
    points."""
    d, s2 = 16, 0.25
    lam_min, lam_max = -5.0, 13.3
    lam = np.linspace(lam_min, lam_max, 200001)
    mse = d * s2 * np.exp(lam) / (1 + s2 * np.exp(lam))
    w32 = np.asarray(
        weighting.diffusion_weight(jnp.asarray(lam, jnp.float32), weighting=name, **KW)
    )
    lhs = 0.5 * np.trapezoid(w32.astype(np.float64) * mse, lam)
    elbo = 0.5 * d * np.log((1 + s2 * np.exp(lam)) / (1 + s2 * np.exp(lam_min)))
    h = 1e-4
    dw = (_np_weight(name, lam + h) - _np_weight(name, lam - h)) / (2 * h)
    # Monotone: the mixture's weights -dw/dlam are >= 0 (up to the grid majorant's rounding).
    assert np.all(dw <= 1e-6 * _np_weight(name, lam))
    rhs = _np_weight(name, lam_max) * elbo[-1] + np.trapezoid(-dw * elbo, lam)
    print(f"{name}: L_w = {lhs:.8g}, mixture of ELBOs = {rhs:.8g}")
    assert math.isclose(lhs, rhs, rel_tol=2e-5)


def test_public_names():
    import jvdm
    from jvdm import noise_sampling, objective

    assert jvdm.weighted_diffusion_loss is weighting.weighted_diffusion_loss
    assert jvdm.diffusion_weight is weighting.diffusion_weight
    assert jvdm.sample_positions is noise_sampling.sample_positions
    assert jvdm.loss_and_grads is objective.loss_and_grads
