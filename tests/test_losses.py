"""Tests for jvdm.losses against independent float64 / high-precision / Monte Carlo answers."""

import decimal
import math

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

from jvdm import decoder as dec
from jvdm import losses as L
from jvdm import schedules as S
from references import random_s_t, rel_err

RTOL_F32 = 1e-4
_D = decimal.Decimal


def _kl64(mq, vq, mp, vp):
    """The textbook formula, float64."""
    mq, vq, mp, vp = (np.float64(a) for a in (mq, vq, mp, vp))
    return 0.5 * (np.log(vp / vq) - 1 + vq / vp + (mq - mp) ** 2 / vp)


def _kl_exact(mq, vq, mp, vp) -> float:
    """The same formula in 40-digit decimal arithmetic on the exact float32 inputs (for
    var_q ~ var_p, where even float64 cancels)."""
    with decimal.localcontext() as ctx:
        ctx.prec = 40
        mq, vq, mp, vp = (_D(float(a)) for a in (mq, vq, mp, vp))
        return float(_D(0.5) * ((vp / vq).ln() - 1 + vq / vp + (mq - mp) ** 2 / vp))


# --- gaussian_kl -------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(), (7,), (3, 4, 2)])
def test_gaussian_kl_closed_form(shape):
    rng = np.random.default_rng(0)
    mq, mp = rng.normal(size=(2,) + shape).astype(np.float32)
    vq, vp = rng.uniform(0.05, 3.0, (2,) + shape).astype(np.float32)
    for fn in (L.gaussian_kl, jax.jit(L.gaussian_kl)):
        got = fn(mq, vq, mp, vp)
        assert got.shape == shape
        np.testing.assert_allclose(got, _kl64(mq, vq, mp, vp), rtol=1e-5, atol=1e-7)


def test_gaussian_kl_monte_carlo():
    """E_q[log q(x) - log p(x)] from 10^6 samples, within 5 standard errors."""
    rng = np.random.default_rng(1)
    mq, vq = np.array([0.0, 1.0, -2.0]), np.array([1.0, 0.5, 2.0])
    mp, vp = np.array([0.5, 1.0, 0.0]), np.array([1.0, 1.5, 0.7])
    x = mq + np.sqrt(vq) * rng.normal(size=(1_000_000, 3))
    logq = -0.5 * (np.log(2 * np.pi * vq) + (x - mq) ** 2 / vq)
    logp = -0.5 * (np.log(2 * np.pi * vp) + (x - mp) ** 2 / vp)
    est, se = (logq - logp).mean(0), (logq - logp).std(0) / 1000.0
    got = jax.jit(L.gaussian_kl)(*(a.astype(np.float32) for a in (mq, vq, mp, vp)))
    assert np.all(np.abs(np.float64(got) - est) < 5 * se), (got, est, se)


_pos = st.floats(1e-6, 1e6).map(np.float32)
_real = st.floats(-1e3, 1e3).map(np.float32)
_kl_jit = jax.jit(L.gaussian_kl)


def _jit(fn):
    """Compile once per function (op-by-op dispatch of these graphs is slow on CPU)."""
    return jax.jit(fn)


@settings(max_examples=200, deadline=None)
@given(m=_real, v=_pos)
def test_gaussian_kl_of_identical_gaussians_is_zero(m, v):
    assert float(_kl_jit(m, v, m, v)) == 0.0


@settings(max_examples=300, deadline=None)
@given(mq=_real, vq=_pos, mp=_real, vp=_pos)
def test_gaussian_kl_is_nonnegative(mq, vq, mp, vp):
    kl = float(_kl_jit(mq, vq, mp, vp))
    assert kl >= 0.0 and math.isfinite(kl)


def test_gaussian_kl_shape_mismatch():
    a, b = jnp.ones((2, 3)), jnp.ones((2, 1))
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 1\)"):
        jax.jit(L.gaussian_kl)(a, a, a, b)


# --- the denoising matching term, Luo eq. 84 = eq. 95, and its eps form --------------------


def test_denoising_matching_kl_equals_snr_weighted_loss():
    rng = np.random.default_rng(2)
    B = 24
    ab_t, ab_s = random_s_t(rng, B)
    x0, x0_hat, x_t = rng.normal(size=(3, B, 4, 4, 2)).astype(np.float32)
    # Independent reference: the literal KL of Luo eq. 84 in float64, x_t terms included.
    t64, s64 = np.float64(ab_t)[:, None, None, None], np.float64(ab_s)[:, None, None, None]
    a = t64 / s64
    c_t, c_0 = np.sqrt(a) * (1 - s64) / (1 - t64), np.sqrt(s64) * (1 - a) / (1 - t64)
    var = (1 - a) * (1 - s64) / (1 - t64)
    mq, mp = c_t * x_t + c_0 * x0, c_t * x_t + c_0 * x0_hat
    want = _kl64(mq, var, mp, var).sum((1, 2, 3))
    kl = jax.jit(L.denoising_matching_kl)(x0, x0_hat, x_t, ab_t, ab_s)
    weighted = jax.jit(L.snr_weighted_loss)(x0, x0_hat, S.snr(ab_s), S.snr(ab_t))
    assert kl.shape == weighted.shape == (B,)
    np.testing.assert_allclose(kl, want, rtol=2e-5)
    np.testing.assert_allclose(weighted, want, rtol=2e-5)
    # Luo eq. 95 in float64 too.
    snr64 = lambda ab: ab / (1 - ab)  # noqa: E731
    w95 = 0.5 * (snr64(s64) - snr64(t64)) * (np.float64(x0_hat) - x0) ** 2
    np.testing.assert_allclose(want, w95.sum((1, 2, 3)), rtol=1e-9)
    # Scalar schedule arguments.
    kl0 = jax.jit(L.denoising_matching_kl)(x0, x0_hat, x_t, ab_t[0], ab_s[0])
    np.testing.assert_allclose(kl0[0], kl[0], rtol=1e-6)


def test_discrete_diffusion_loss_equals_snr_weighted_loss():
    """eps form = x0 form under x0_hat = (x_t - sigma_t eps_hat) / alpha_t."""
    rng = np.random.default_rng(3)
    B = 16
    gamma_t = rng.uniform(-10, 8, B)
    gamma_s = gamma_t - rng.uniform(1e-3, 3, B)
    x0, eps, eps_hat = rng.normal(size=(3, B, 5))
    alpha_t = np.sqrt(1 / (1 + np.exp(gamma_t)))[:, None]
    sigma_t = np.sqrt(1 / (1 + np.exp(-gamma_t)))[:, None]
    x_t = alpha_t * x0 + sigma_t * eps
    x0_hat = (x_t - sigma_t * eps_hat) / alpha_t
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    f64 = lambda a: np.float64(f32(a))  # noqa: E731  (the float32 inputs, exactly)
    # The identity itself, in float64.
    want = 0.5 * (np.exp(-gamma_s) - np.exp(-gamma_t)) * ((x0_hat - x0) ** 2).sum(1)
    want_eps = 0.5 * np.expm1(gamma_t - gamma_s) * ((eps - eps_hat) ** 2).sum(1)
    np.testing.assert_allclose(want_eps, want, rtol=1e-9)
    # Each float32 form against float64 on its own float32 inputs (x0_hat - x0 ~ sigma/alpha can
    # be small, so rounding x0_hat to float32 perturbs the x0 form's input by more than 1e-5).
    got_eps = jax.jit(L.discrete_diffusion_loss)(f32(eps), f32(eps_hat), f32(gamma_s), f32(gamma_t))
    want_eps = 0.5 * np.expm1(f64(gamma_t) - f64(gamma_s)) * ((f64(eps) - f64(eps_hat)) ** 2).sum(1)
    np.testing.assert_allclose(got_eps, want_eps, rtol=1e-5)
    snr_s, snr_t = f32(np.exp(-gamma_s)), f32(np.exp(-gamma_t))
    got_x0 = jax.jit(L.snr_weighted_loss)(f32(x0), f32(x0_hat), snr_s, snr_t)
    want_x0 = 0.5 * (f64(snr_s) - f64(snr_t)) * ((f64(x0_hat) - f64(x0)) ** 2).sum(1)
    np.testing.assert_allclose(got_x0, want_x0, rtol=1e-5)
    np.testing.assert_allclose(got_x0, got_eps, rtol=1e-3)


@pytest.mark.parametrize(
    "fn", [L.snr_weighted_loss, L.discrete_diffusion_loss, L.continuous_diffusion_loss]
)
def test_losses_shapes_and_mismatch(fn):
    x = jnp.ones((4, 3, 3, 1))
    n_sched = 1 if fn is L.continuous_diffusion_loss else 2
    jitted = jax.jit(fn)
    assert jitted(x, 2 * x, *([0.5] * n_sched)).shape == (4,)
    assert jitted(x, 2 * x, *([jnp.full((4,), 0.5)] * n_sched)).shape == (4,)
    with pytest.raises(ValueError, match=r"\(4, 3, 3, 1\).*\(4, 3, 3, 2\)"):
        jitted(x, jnp.ones((4, 3, 3, 2)), *([0.5] * n_sched))
    with pytest.raises(ValueError, match=r"\(3,\).*\(4, 3, 3, 1\)"):
        jitted(x, x, *([jnp.full((3,), 0.5)] * n_sched))


def test_continuous_diffusion_loss_formula():
    rng = np.random.default_rng(4)
    eps, eps_hat = rng.normal(size=(2, 6, 10)).astype(np.float32)
    dg = rng.uniform(1, 20, 6).astype(np.float32)
    want = 0.5 * np.float64(dg) * ((np.float64(eps) - eps_hat) ** 2).sum(1)
    np.testing.assert_allclose(
        jax.jit(L.continuous_diffusion_loss)(eps, eps_hat, dg), want, rtol=1e-5
    )


@pytest.mark.parametrize("gamma_min, gamma_max, t_min", [(-3.0, 3.0, 8), (-13.3, 5.0, 64)])
def test_discrete_loss_converges_to_continuous_loss(gamma_min, gamma_max, t_min):
    """sum_i L_i over T steps -> integral of the continuous loss, with error ~ 1/T.

    gamma(t) = gamma_min + (gamma_max - gamma_min) t and eps_hat(t) = eps + exp(t) delta, so the
    continuous loss is 0.5 (gamma_max - gamma_min) |delta|^2 (e^2 - 1) / 2 in closed form.
    """
    span = gamma_max - gamma_min
    delta = np.float32([0.3, -0.2, 0.5])
    closed = 0.5 * span * np.sum(np.float64(delta) ** 2) * (math.e**2 - 1) / 2
    # The continuous loss integrated by 20-point Gauss-Legendre agrees with the closed form.
    nodes, weights = np.polynomial.legendre.leggauss(20)
    tq = (nodes + 1) / 2
    per_t = jax.jit(L.continuous_diffusion_loss)(
        np.zeros((20, 3), np.float32),
        np.float32(np.exp(tq)[:, None] * delta),
        np.float32(np.full(20, span)),
    )
    np.testing.assert_allclose(np.dot(weights / 2, np.float64(per_t)), closed, rtol=1e-6)

    Ts = 2 ** np.arange(int(math.log2(t_min)), 11)
    errs = []
    loss = jax.jit(L.discrete_diffusion_loss)
    for T in Ts:
        t = np.arange(1, T + 1) / T
        gamma = lambda u: gamma_min + span * u  # noqa: E731
        per_step = loss(
            np.zeros((T, 3), np.float32),
            np.float32(np.exp(t)[:, None] * delta),
            np.float32(gamma(t - 1 / T)),
            np.float32(gamma(t)),
        )
        errs.append(abs(np.sum(np.float64(per_step)) - closed))
    rate = np.polyfit(np.log(Ts), np.log(errs), 1)[0]
    print(
        f"convergence rate over T={Ts[0]}..{Ts[-1]} (gamma in [{gamma_min}, {gamma_max}]): {rate}"
    )
    assert abs(rate + 1) < 0.1, rate


# --- prior, bpd --------------------------------------------------------------------------


@pytest.mark.parametrize("batched", [False, True])
def test_prior_kl(batched):
    rng = np.random.default_rng(5)
    x0 = rng.uniform(-1, 1, (4, 3, 3, 2)).astype(np.float32)
    ab = rng.uniform(1e-5, 0.3, 4).astype(np.float32) if batched else np.float32(4e-5)
    ab64 = np.float64(ab).reshape((-1, 1, 1, 1) if batched else ())
    want = (0.5 * (ab64 * np.float64(x0) ** 2 - ab64 - np.log1p(-ab64))).sum((1, 2, 3))
    got = jax.jit(L.prior_kl)(x0, ab)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    ab_full = np.broadcast_to(ab64, x0.shape)
    via_kl = jax.jit(L.gaussian_kl)(
        np.float32(np.sqrt(ab_full) * x0),
        np.float32(1 - ab_full),
        np.zeros_like(x0),
        np.ones_like(x0),
    )
    np.testing.assert_allclose(got, np.float64(via_kl).sum((1, 2, 3)), rtol=1e-5)
    gamma = S.gamma_from_alpha_bar(ab)
    np.testing.assert_allclose(jax.jit(L.prior_kl_from_gamma)(x0, gamma), want, rtol=1e-5)


def test_bpd_of_uniform_8bit_is_exactly_8():
    for D in (1, 3, 784, 3072, 12288):
        nats = jnp.float32(D) * jnp.log(jnp.float32(256.0))
        assert float(jax.jit(L.bpd_from_nats, static_argnums=1)(nats, D)) == 8.0
        assert float(L.bpd_from_nats(jnp.full((2,), nats), jnp.float32(D))[1]) == 8.0
    np.testing.assert_allclose(
        L.bpd_from_nats(np.float32(784 * math.log(256)), 784), 8.0, rtol=1e-7
    )


# --- the decoder -------------------------------------------------------------------------


def _decoder_ref(z, gamma, vocab=256):
    """Normalised Gaussian likelihood of z_0 under each x = k, float64 (no rescaling)."""
    z, g = np.float64(z)[..., None], np.float64(gamma)
    g = g.reshape(g.shape + (1,) * (z.ndim - g.ndim))
    alpha, sigma_sq = np.sqrt(1 / (1 + np.exp(g))), 1 / (1 + np.exp(-g))
    v = 2 * (np.arange(vocab) + 0.5) / vocab - 1
    log_lik = -0.5 * (z - alpha * v) ** 2 / sigma_sq - 0.5 * np.log(2 * np.pi * sigma_sq)
    top = log_lik.max(-1, keepdims=True)
    return log_lik - top - np.log(np.exp(log_lik - top).sum(-1, keepdims=True))


@pytest.mark.parametrize("C", [1, 3, 4])
def test_decoder_normalised_for_any_noise_and_channels(C):
    rng = np.random.default_rng(6)
    gamma_0 = np.float32(np.linspace(-13.3, 5.0, 8))
    z = rng.normal(0, 1.3, (8, 3, 3, C)).astype(np.float32)
    lp = jax.jit(L.decoder_log_probs)(z, gamma_0)
    assert lp.shape == (8, 3, 3, C, 256)
    np.testing.assert_allclose(np.exp(np.float64(lp)).sum(-1), 1.0, rtol=1e-6)


def test_decoder_against_float64_gaussian_likelihood():
    rng = np.random.default_rng(7)
    x = rng.integers(0, 256, (12, 4, 4, 3))
    gamma_0 = np.float32(np.linspace(-13.3, 5.0, 12))
    alpha = np.sqrt(1 / (1 + np.exp(np.float64(gamma_0))))[:, None, None, None]
    sigma = np.sqrt(1 / (1 + np.exp(-np.float64(gamma_0))))[:, None, None, None]
    z = np.float32(alpha * (2 * (x + 0.5) / 256 - 1) + sigma * rng.normal(size=x.shape))
    want = _decoder_ref(z, gamma_0)
    got = jax.jit(L.decoder_log_probs)(z, gamma_0)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    ll = jax.jit(L.decoder_log_likelihood)(np.uint8(x), z, gamma_0)
    want_ll = np.take_along_axis(want, x[..., None], -1)[..., 0].sum((1, 2, 3))
    np.testing.assert_allclose(ll, want_ll, rtol=1e-5)


def test_gradients_are_finite():
    # jnp.where branches are clipped so that the unused one never produces inf/nan gradients.
    grad = jax.jit(jax.vmap(jax.grad(lambda vq: L.gaussian_kl(0.0, vq, 0.0, 1.0))))
    assert np.all(np.isfinite(grad(jnp.array([1.0, 1.01, 1e-6, 50.0]))))
    prior = lambda g: L.prior_kl_from_gamma(jnp.ones((1, 2)), g)[0]  # noqa: E731
    assert np.all(np.isfinite(jax.jit(jax.vmap(jax.grad(prior)))(jnp.array([-20.0, 0.0, 20.0]))))
    x = jnp.zeros((2, 6), jnp.uint8)
    ll = lambda z, g: L.decoder_log_likelihood(x, z, g).sum()  # noqa: E731
    z = jnp.linspace(-1.5, 1.5, 12).reshape(2, 6)
    dz, dg = jax.jit(jax.grad(ll, (0, 1)))(z, -13.3)
    assert np.all(np.isfinite(dz)) and np.isfinite(dg)


def test_decoder_grayscale_is_one_third_of_rgb_repeat():
    # The reference VDM code repeats to 3 channels and so triples a grayscale image's term.
    rng = np.random.default_rng(8)
    x = rng.integers(0, 256, (2, 5, 5, 1)).astype(np.uint8)
    z = np.float32(2 * (x + 0.5) / 256 - 1 + 0.01 * rng.normal(size=x.shape))
    ll1 = jax.jit(L.decoder_log_likelihood)(x, z, -6.0)
    ll3 = jax.jit(L.decoder_log_likelihood)(np.repeat(x, 3, -1), np.repeat(z, 3, -1), -6.0)
    np.testing.assert_allclose(ll1, ll3 / 3, rtol=1e-6)


def test_decoder_low_noise_puts_mass_on_the_right_value():
    rng = np.random.default_rng(9)
    x = rng.integers(0, 256, (3, 6, 6, 3)).astype(np.uint8)
    gamma_0 = -13.3
    alpha, sigma = math.sqrt(1 / (1 + math.exp(gamma_0))), math.sqrt(1 / (1 + math.exp(-gamma_0)))
    # Within one sigma of the bin centre, i.e. >= 2 sigma from the bin edges.
    z = np.float32(alpha * (2 * (x + 0.5) / 256 - 1) + sigma * rng.uniform(-1, 1, x.shape))
    lp = _jit(L.decoder_log_probs)(z, gamma_0)
    assert np.all(np.argmax(lp, -1) == x)
    assert np.exp(np.float64(lp)).max(-1).min() > 0.99
    ll = _jit(L.decoder_log_likelihood)(x, z, jnp.full((3,), gamma_0))
    assert np.all(ll <= 0) and np.all(ll > -1.0)
    # ...yet not rounded to zero: the nearest bin's log-probability keeps its tiny value.
    want = np.take_along_axis(_decoder_ref(z, np.float32(gamma_0)), x[..., None], -1)[..., 0]
    np.testing.assert_allclose(ll, want.sum((1, 2, 3)), rtol=1e-5)


def test_decoder_shapes():
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 4\)"):
        _jit(L.decoder_log_likelihood)(np.zeros((2, 3), np.uint8), np.zeros((2, 4)), 0.0)
    with pytest.raises(ValueError, match=r"\(3,\)"):
        _jit(L.decoder_log_probs)(np.zeros((2, 4)), np.zeros(3))
    assert _jit(L.scale_pixels)(np.uint8([0, 255])).dtype == jnp.float32
    np.testing.assert_allclose(_jit(L.scale_pixels)(np.uint8([0, 255])), [-255 / 256, 255 / 256])


def _decoder_inputs(rng, gamma_0, shape, spread):
    """Data and z_0 for each gamma_0: z / alpha at bin centres, bin edges (delta = +-1/V) and
    beyond the clipped end bins, plus Gaussian noise of ``spread`` sigmas."""
    x = rng.integers(0, 256, shape)
    g = np.float64(gamma_0).reshape(-1, *(1,) * (len(shape) - 1))
    alpha, sigma = np.sqrt(1 / (1 + np.exp(g))), np.sqrt(1 / (1 + np.exp(-g)))
    v = 2 * (x + 0.5) / 256 - 1
    offset = rng.choice([-1.0, -0.999, 0.0, 0.999, 1.0], shape) / 256  # in units of z / alpha
    z = alpha * (v + offset) + spread * sigma * rng.normal(size=shape)
    z[..., 0, 0, :] = alpha[..., 0, 0, :] * rng.choice([-1.2, 1.2], z[..., 0, 0, :].shape)
    return x, np.float32(z)


def _decoder_grads_ref(x, z, gamma_0, vocab=256):
    """float64 d/dz (closed form) and d/dgamma_0 (central differences) of sum log p(x | z_0)."""
    lp = _decoder_ref(z, gamma_0, vocab)
    g = np.float64(gamma_0).reshape(-1, *(1,) * (z.ndim - 1))
    alpha, sigma_sq = np.sqrt(1 / (1 + np.exp(g))), 1 / (1 + np.exp(-g))
    v = 2 * (np.arange(vocab) + 0.5) / vocab - 1
    mean_v = (np.exp(lp) * v).sum(-1)
    dz = alpha / sigma_sq * (v[x] - mean_v)

    def total(gg):
        picked = np.take_along_axis(_decoder_ref(z, gg, vocab), x[..., None], -1)[..., 0]
        return picked.sum(tuple(range(1, z.ndim)))

    h = 1e-4
    dg = (total(np.float64(gamma_0) + h) - total(np.float64(gamma_0) - h)) / (2 * h)
    return dz, dg


@pytest.mark.parametrize("gammas", [(-13.3, -9.2), (-9.0, 5.0)], ids=["window", "all-values"])
def test_decoder_values_and_gradients_against_float64(gammas):
    # gamma_0 <= -9.13 takes the 16-value window around the nearest bin; above it, all 256.
    rng = np.random.default_rng(17)
    gamma_0 = np.float32(np.linspace(*gammas, 6))
    x, z = _decoder_inputs(rng, gamma_0, (6, 5, 5, 2), spread=1.0)
    want = _decoder_ref(z, gamma_0)
    # atol: the float64 reference's own log(sum exp) rounds at ~1e-16 where log p ~ 0.
    np.testing.assert_allclose(_jit(L.decoder_log_probs)(z, gamma_0), want, rtol=1e-5, atol=1e-14)
    ll = lambda z, g: jnp.sum(L.decoder_log_likelihood(np.uint8(x), z, g))  # noqa: E731
    value = _jit(jax.vmap(L.decoder_log_likelihood))(np.uint8(x)[:, None], z[:, None], gamma_0)
    np.testing.assert_allclose(
        value[:, 0], np.take_along_axis(want, x[..., None], -1)[..., 0].sum((1, 2, 3)), rtol=1e-5
    )
    dz, dg = _jit(jax.grad(ll, (0, 1)))(z, gamma_0)
    want_dz, want_dg = _decoder_grads_ref(x, z, gamma_0)
    # dz is large (alpha / sigma^2 ~ 6e5 at -13.3) and is a difference of two nearly equal
    # means: compare against the largest entry of each example.
    scale = np.abs(want_dz).max(axis=(1, 2, 3), keepdims=True)
    np.testing.assert_array_less(np.abs(dz - want_dz) / scale, 1e-4)
    np.testing.assert_allclose(dg, want_dg, rtol=1e-5)


def test_decoder_window_bound_holds_by_brute_force():
    """The claim behind the 16-value window, checked in float64 over a grid of offsets."""
    V, W = 256, dec._WINDOW
    # The gamma_0 at which _window_is_exact switches, found by bisection on the library's test.
    lo, hi = -30.0, 10.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        exact = bool(dec._window_is_exact(jnp.float32(np.exp(-mid)), V))
        lo, hi = (mid, hi) if exact else (lo, mid)
    assert -9.3 < lo < -9.0
    delta = np.linspace(-1, 1, 2001)[:, None] / V  # |delta| <= 1/V in the interior

    def dropped_over_kept(gamma_0, m=128):
        snr = np.exp(-np.float64(gamma_0))
        k = np.arange(V)
        w = 2 * (m - k) / V
        d = -0.5 * snr * w * (2 * delta + w)
        e = np.where(k == m, 0.0, np.exp(d))
        outside = np.abs(k - m) > W
        return (e * outside).sum(-1).max() / (e * ~outside).sum(-1).min()

    assert dropped_over_kept(lo) < 2 * np.exp(-dec._WINDOW_MARGIN)  # exact where it is used
    assert dropped_over_kept(-5.0) > 1e-4  # and needed: the window would be wrong at high noise


# --- float32 accuracy over the practical range --------------------------------------------


def test_float32_accuracy_sweep():
    """Each loss within 1e-4 of a float64 (or 40-digit) evaluation of the same float32 inputs."""
    worst = {}
    # gaussian_kl with var_q/var_p from 1 +- 1e-7 up to far apart.
    d = np.concatenate([[0.0], np.geomspace(1e-7, 10, 17), -np.geomspace(1e-7, 0.9, 15)])
    vp = np.float32(np.tile([1.0, 3.7e-4, 250.0], d.size))
    vq = np.float32(np.float64(vp) * (1 + np.repeat(d, 3)))
    mp = np.float32(np.tile([0.0, 0.2, -1.0], d.size))
    for mean_gap in (0.0, 1e-3, 1.0):
        mq = np.float32(mp + mean_gap)
        got = _jit(L.gaussian_kl)(mq, vq, mp, vp)
        want = [_kl_exact(*args) for args in zip(mq, vq, mp, vp, strict=True)]
        worst[f"gaussian_kl (mean gap {mean_gap})"] = float(rel_err(got, want).max())
    # prior_kl near alpha_bar = 0 and 1, and prior_kl_from_gamma over -20..20.
    # (Not below ~1e-19: at x0 = 0 the KL ~ alpha_bar^2 / 2 would fall below float32's smallest
    # normal number, and XLA flushes denormals to zero.)
    ab = np.float32([1e-15, 1e-12, 1e-8, 1e-6, 1e-4, 0.01, 0.5, 0.99, 1 - 1e-4, 1 - 1e-6])
    gam = np.float32(np.linspace(-20, 20, 41))
    with decimal.localcontext() as ctx:
        ctx.prec = 40
        for x0 in (0.0, 0.5):
            x0_d = _D(x0)
            want = [
                float(_D(0.5) * (_D(float(a)) * (x0_d**2 - 1) - (1 - _D(float(a))).ln()))
                for a in ab
            ]
            got = _jit(L.prior_kl)(np.full((ab.size, 1), x0, np.float32), ab)
            worst[f"prior_kl (x0={x0})"] = float(rel_err(got, want).max())
            want = []
            for g in gam:
                a = 1 / (1 + _D(float(g)).exp())
                want.append(float(_D(0.5) * (a * (x0_d**2 - 1) - (1 - a).ln())))
            got = _jit(L.prior_kl_from_gamma)(np.full((gam.size, 1), x0, np.float32), gam)
            worst[f"prior_kl_from_gamma (x0={x0})"] = float(rel_err(got, want).max())
    # Diffusion terms: adjacent and distant steps over the whole range of gamma.
    rng = np.random.default_rng(10)
    g_t = np.float32(np.linspace(-13.3, 20, 200))
    g_s = np.float32(np.concatenate([g_t[:100] - 1e-4, g_t[100:] - 2.0]))
    ab_t, ab_s = S.alpha_bar_from_gamma(g_t), S.alpha_bar_from_gamma(g_s)
    keep = np.asarray(ab_s > ab_t) & np.asarray(ab_s < 1)
    x0 = rng.normal(size=(200, 3)).astype(np.float32)
    x0_hat = np.float32(x0 + rng.choice([-1, 1], x0.shape) * rng.uniform(0.1, 1, x0.shape))
    t64, s64 = np.float64(ab_t)[:, None], np.float64(ab_s)[:, None]
    err2 = ((np.float64(x0_hat) - x0) ** 2).sum(1)
    want = 0.5 * (s64 / (1 - s64) - t64 / (1 - t64))[:, 0] * err2
    got = _jit(L.denoising_matching_kl)(x0, x0_hat, x0, ab_t, ab_s)
    worst["denoising_matching_kl"] = float(rel_err(got, want)[keep].max())
    snr_s, snr_t = np.float32(np.exp(-np.float64(g_s))), np.float32(np.exp(-np.float64(g_t)))
    want = 0.5 * (np.float64(snr_s) - snr_t) * err2
    worst["snr_weighted_loss"] = float(
        rel_err(_jit(L.snr_weighted_loss)(x0, x0_hat, snr_s, snr_t), want).max()
    )
    want = 0.5 * np.expm1(np.float64(g_t) - g_s) * err2
    got = _jit(L.discrete_diffusion_loss)(x0, x0_hat, g_s, g_t)
    worst["discrete_diffusion_loss"] = float(rel_err(got, want).max())
    got = _jit(L.continuous_diffusion_loss)(x0, x0_hat, np.float32(np.abs(g_t) + 1e-3))
    worst["continuous_diffusion_loss"] = float(
        rel_err(got, 0.5 * (np.abs(np.float64(g_t)) + np.float32(1e-3)) * err2).max()
    )
    # The decoder over gamma_0 in [-13.3, 5], including near-zero log p at low noise.
    x = rng.integers(0, 256, (8, 4, 4, 3))
    g0 = np.float32(np.linspace(-13.3, 5.0, 8))
    alpha = np.sqrt(1 / (1 + np.exp(np.float64(g0))))[:, None, None, None]
    sigma = np.sqrt(1 / (1 + np.exp(-np.float64(g0))))[:, None, None, None]
    z = np.float32(alpha * (2 * (x + 0.5) / 256 - 1) + sigma * rng.normal(size=x.shape))
    want = _decoder_ref(z, g0)
    worst["decoder_log_probs"] = float(rel_err(_jit(L.decoder_log_probs)(z, g0), want).max())
    want_ll = np.take_along_axis(want, x[..., None], -1)[..., 0].sum((1, 2, 3))
    got_ll = _jit(L.decoder_log_likelihood)(np.uint8(x), z, g0)
    worst["decoder_log_likelihood"] = float(rel_err(got_ll, want_ll).max())
    print("losses worst float32 relative error:", worst)
    for name, err in worst.items():
        assert err < RTOL_F32, (name, err)
