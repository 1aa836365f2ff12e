"""The VDM composed from its parts, checked against closed forms on Gaussian data.

For data x ~ N(m, s^2 I) the optimal denoiser is known exactly:
``E[eps | z_t] = sigma (z - alpha m) / (alpha^2 s^2 + sigma^2)``, and the continuous-time diffusion
loss of that denoiser is ``D/2 log((1 + s^2 SNR(0)) / (1 + s^2 SNR(1)))`` (VDM appendix; it depends
on the schedule only through its end points). These tests plug that denoiser into the model in place
of the U-Net.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gaussian_models import GaussianDenoiser
from jvdm import model as model_lib
from jvdm import noise_draws, objective
from jvdm.nn import gamma as gamma_lib

M, S = 0.3, 0.5
SHAPE = (4, 4, 1)
D = int(np.prod(SHAPE))
G_MIN, G_MAX = -10.0, 4.0


def _analytic_diffusion_nats():
    snr0, snr1 = np.exp(-G_MIN), np.exp(-G_MAX)
    return 0.5 * D * np.log((1 + S**2 * snr0) / (1 + S**2 * snr1))


def _perturbed_learned(key):
    sched = gamma_lib.LearnedGamma(gamma_min_init=G_MIN, gamma_max_init=G_MAX, hidden=32)
    params = sched.init(key, jnp.zeros((1,)))
    leaves, tree = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(key, len(leaves))
    new = [
        v if model_lib.is_endpoint(p) else v + jax.random.normal(k, v.shape)
        for (p, v), k in zip(leaves, keys, strict=True)
    ]
    return sched, jax.tree_util.tree_unflatten(tree, new)


def _params(schedule, sched_params=None, *, prediction="eps", timesteps=0, key=None):
    model = model_lib.VDM(
        denoiser=GaussianDenoiser(M, S, prediction),
        schedule=schedule,
        image_shape=SHAPE,
        timesteps=timesteps,
        prediction=prediction,
    )
    params = model_lib.init(model, jax.random.key(0) if key is None else key)
    if sched_params is not None:
        params = params.replace(schedule=sched_params)
    return params


def _gaussian_data(key, n):
    return M + S * jax.random.normal(key, (n, *SHAPE))


@pytest.mark.parametrize("kind", ["linear", "cosine", "learned"])
def test_continuous_diffusion_loss_matches_closed_form_for_any_schedule(kind):
    """VDM's invariance: same end points -> same diffusion loss, equal to the analytic value."""
    if kind == "linear":
        params = _params(gamma_lib.FixedLinearGamma(gamma_min=G_MIN, gamma_max=G_MAX))
    elif kind == "cosine":
        params = _params(gamma_lib.CosineGamma(gamma_min=G_MIN, gamma_max=G_MAX))
    else:
        sched, sp = _perturbed_learned(jax.random.key(3))
        params = _params(sched, sp)
    n = 100_000
    x = _gaussian_data(jax.random.key(1), n)
    loss = jax.jit(model_lib.diffusion_loss)(params, x, jax.random.key(2))
    loss = np.asarray(loss, np.float64)
    mean, sem = loss.mean(), loss.std(ddof=1) / np.sqrt(n)
    expected = _analytic_diffusion_nats()
    # 4 standard errors: a false alarm in about 1 run in 16,000.
    assert abs(mean - expected) < 4 * sem, (kind, mean, expected, sem)
    # The test has power: the error bar is a few percent of the value (the cosine schedule gives
    # the noisiest estimator of the three, about 1%).
    assert sem < 0.03 * expected


def _discrete_expected_nats(T, gamma_fn):
    """The discrete-time diffusion loss of the optimal denoiser, as an exact sum over steps."""
    t = np.arange(1, T + 1) / T
    s = t - 1.0 / T
    snr_t, snr_s = np.exp(-gamma_fn(t)), np.exp(-gamma_fn(s))
    # E||x - x0_hat||^2 = D s^2 / (1 + s^2 SNR_t); each step weighs it by 0.5 (SNR_s - SNR_t).
    return np.sum(0.5 * (snr_s - snr_t) * D * S**2 / (1 + S**2 * snr_t))


def test_discrete_bound_matches_exact_sum_and_approaches_continuous():
    lin = lambda t: G_MIN + (G_MAX - G_MIN) * t
    cont = _analytic_diffusion_nats()
    gaps = []
    for T in (100, 1000, 10_000):
        gaps.append(_discrete_expected_nats(T, lin) - cont)
    # The discrete bound is looser and converges like 1/T.
    assert all(g > 0 for g in gaps)
    rates = np.log(np.array(gaps[:-1]) / np.array(gaps[1:])) / np.log(10.0)
    np.testing.assert_allclose(rates, 1.0, atol=0.1)

    T, n = 100, 20_000
    params = _params(gamma_lib.FixedLinearGamma(gamma_min=G_MIN, gamma_max=G_MAX), timesteps=T)
    x = _gaussian_data(jax.random.key(4), n)
    loss = np.asarray(jax.jit(model_lib.diffusion_loss)(params, x, jax.random.key(5)), np.float64)
    mean, sem = loss.mean(), loss.std(ddof=1) / np.sqrt(n)
    assert abs(mean - _discrete_expected_nats(T, lin)) < 4 * sem


@pytest.mark.parametrize("timesteps", [0, pytest.param(50, marks=pytest.mark.slow)])
def test_parameterisations_give_the_same_bound(timesteps):
    sched = gamma_lib.FixedLinearGamma(gamma_min=G_MIN, gamma_max=G_MAX)
    images = jax.random.randint(jax.random.key(6), (16, *SHAPE), 0, 256).astype(jnp.uint8)
    out = {}
    for pred in ("eps", "x0", "v"):
        params = _params(sched, prediction=pred, timesteps=timesteps)
        out[pred] = jax.jit(model_lib.loss_terms)(params, images, jax.random.key(7))
    for pred in ("x0", "v"):
        for k in ("bpd", "diffusion_bpd", "recon_bpd", "prior_bpd"):
            np.testing.assert_allclose(out[pred][k], out["eps"][k], rtol=2e-4, err_msg=(pred, k))


def test_bound_terms_shapes_and_uniform_reference():
    params = _params(gamma_lib.FixedLinearGamma(gamma_min=G_MIN, gamma_max=G_MAX))
    images = jax.random.randint(jax.random.key(8), (5, *SHAPE), 0, 256).astype(jnp.uint8)
    terms = jax.jit(model_lib.loss_terms)(params, images, jax.random.key(9))
    for k in ("bpd", "recon_bpd", "prior_bpd", "diffusion_bpd"):
        assert terms[k].shape == (5,)
        assert np.all(np.isfinite(terms[k]))
    np.testing.assert_allclose(
        terms["bpd"], terms["recon_bpd"] + terms["prior_bpd"] + terms["diffusion_bpd"], rtol=1e-6
    )
    assert np.all(terms["prior_bpd"] >= 0)


def test_bad_images_are_rejected():
    params = _params(gamma_lib.FixedLinearGamma(gamma_min=G_MIN, gamma_max=G_MAX))
    with pytest.raises(ValueError, match=r"expected uint8 \[B, 4, 4, 1\]"):
        model_lib.loss_terms(params, jnp.zeros((2, 4, 4, 3), jnp.uint8), jax.random.key(0))
    with pytest.raises(ValueError, match="uint8"):
        model_lib.loss_terms(params, jnp.zeros((2, *SHAPE), jnp.float32), jax.random.key(0))


def test_antithetic_times_cover_unit_interval_for_any_batch():
    model = model_lib.VDM(
        denoiser=GaussianDenoiser(M, S), schedule=gamma_lib.FixedLinearGamma(), image_shape=SHAPE
    )
    for b in (1, 3, 7, 64):
        t, _ = noise_draws._sample_times(model, jax.random.key(b), b)
        t = np.sort(np.asarray(t))
        assert t.shape == (b,) and np.all((t >= 0) & (t < 1))
        np.testing.assert_allclose(np.diff(t), 1.0 / b, atol=1e-5)
    t, s = noise_draws._sample_times(dataclasses.replace(model, timesteps=10), jax.random.key(0), 9)
    np.testing.assert_allclose(np.asarray(t) - np.asarray(s), 0.1, atol=1e-6)
    assert np.all(np.asarray(s) >= 0) and np.all(np.asarray(t) <= 1)


def _assert_close_in_norm(a, b, rtol=1e-4):
    """Two float32 gradients computed by differently fused programs: equal up to rounding.

    Gradients sum many per-example terms that cancel, so elementwise relative error is dominated by
    the near-zero elements; the error relative to the whole array's norm is the meaningful measure.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.linalg.norm(a - b) <= rtol * np.linalg.norm(b), (
        np.linalg.norm(a - b),
        np.linalg.norm(b),
    )


class TinyDenoiser(nn.Module):
    """A small learnable denoiser whose output depends on both z and gamma (compiles fast)."""

    @nn.compact
    def __call__(self, z, gamma, *, train):
        del train
        h = nn.Conv(8, (3, 3))(z)
        h = (
            h
            + nn.Dense(8)(jnp.sin(gamma[:, None] * jnp.arange(1.0, 5.0)[None, :] / 4))[
                :, None, None, :
            ]
        )
        return nn.Conv(z.shape[-1], (3, 3))(jax.nn.swish(h))


def _second_moment(params, images, key):
    terms = model_lib.loss_terms(params, images, key)
    return jnp.mean(terms["diffusion_bpd"] ** 2), jnp.mean(terms["bpd"])


def test_gradients_bound_for_denoiser_and_end_points_variance_for_interior():
    sched, sp = _perturbed_learned(jax.random.key(10))
    # VDM's pathwise estimator: at fixed noise it is exactly d L^2 / d eta, so it can be checked
    # draw by draw (the density estimator agrees only in expectation, which
    # tests/test_variance_gradient.py checks).
    model = model_lib.VDM(
        denoiser=TinyDenoiser(), schedule=sched, image_shape=SHAPE, variance_gradient="pathwise"
    )
    params = model_lib.init(model, jax.random.key(11)).replace(schedule=sp)
    images = jax.random.randint(jax.random.key(13), (8, *SHAPE), 0, 256).astype(jnp.uint8)
    key = jax.random.key(14)

    grads = jax.jit(objective.loss_and_grads, static_argnames="train")(
        params, images, key, train=False
    ).grads
    mean_bpd = lambda p: _second_moment(p, images, key)[1]
    elbo_grads = jax.jit(jax.grad(mean_bpd))(params)
    # Denoiser and end points follow the bound exactly.
    for a, b in zip(
        jax.tree_util.tree_leaves(grads.denoiser),
        jax.tree_util.tree_leaves(elbo_grads.denoiser),
        strict=True,
    ):
        _assert_close_in_norm(a, b)
    flat = jax.tree_util.tree_flatten_with_path(grads.schedule)[0]
    flat_elbo = dict(jax.tree_util.tree_flatten_with_path(elbo_grads.schedule)[0])
    ends = [(p, g) for p, g in flat if model_lib.is_endpoint(p)]
    assert len(ends) == 2
    for p, g in ends:
        _assert_close_in_norm(g, flat_elbo[p])

    # The interior follows d E[L_diff^2]/d eta: compare with central finite differences along a
    # random direction of the interior parameters, at fixed noise (same key).
    interior = [(p, v) for p, v in jax.tree_util.tree_flatten_with_path(params.schedule)[0]]
    dirs = {
        p: (0.0 if model_lib.is_endpoint(p) else 1.0)
        * jax.random.normal(jax.random.key(i), v.shape)
        for i, (p, v) in enumerate(interior)
    }
    st = jax.tree_util.tree_structure(params.schedule)
    dvec = jax.tree_util.tree_unflatten(st, [dirs[p] for p, _ in interior])
    second = jax.jit(lambda sp_: _second_moment(params.replace(schedule=sp_), images, key)[0])
    h = 1e-3
    plus = jax.tree_util.tree_map(lambda v, d: v + h * d, params.schedule, dvec)
    minus = jax.tree_util.tree_map(lambda v, d: v - h * d, params.schedule, dvec)
    fd = (float(second(plus)) - float(second(minus))) / (2 * h)
    analytic = sum(float(jnp.sum(g * dirs[p])) for p, g in flat if not model_lib.is_endpoint(p))
    assert abs(analytic) > 1e-6
    np.testing.assert_allclose(analytic, fd, rtol=2e-2)
    # ...and it differs from the bound's gradient (which averages to zero over noise).
    elbo_dir = sum(float(jnp.sum(g * dirs[p])) for p, g in flat_elbo.items())
    assert not np.isclose(analytic, elbo_dir, rtol=1e-2)


def test_discrete_time_schedule_follows_the_bound():
    sched, sp = _perturbed_learned(jax.random.key(15))
    params = _params(sched, sp, timesteps=20)
    images = jax.random.randint(jax.random.key(16), (8, *SHAPE), 0, 256).astype(jnp.uint8)
    key = jax.random.key(17)
    grads = jax.jit(objective.loss_and_grads, static_argnames="train")(
        params, images, key, train=False
    ).grads
    elbo = jax.jit(jax.grad(lambda p: jnp.mean(model_lib.loss_terms(p, images, key)["bpd"])))(
        params
    )
    for a, b in zip(
        jax.tree_util.tree_leaves(grads.schedule),
        jax.tree_util.tree_leaves(elbo.schedule),
        strict=True,
    ):
        _assert_close_in_norm(a, b)


def test_predict_eps_x0_consistent_across_parameterisations():
    sched = gamma_lib.FixedLinearGamma(gamma_min=G_MIN, gamma_max=G_MAX)
    z = jax.random.normal(jax.random.key(18), (6, *SHAPE))
    g = jnp.linspace(-8.0, 3.0, 6)
    ref = model_lib.predict_eps_x0(_params(sched, prediction="eps"), z, g)
    for pred in ("x0", "v"):
        out = model_lib.predict_eps_x0(_params(sched, prediction=pred), z, g)
        np.testing.assert_allclose(out[0], ref[0], rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(out[1], ref[1], rtol=1e-3, atol=1e-4)


def test_model_definition_validates():
    with pytest.raises(ValueError, match="prediction"):
        model_lib.VDM(
            denoiser=GaussianDenoiser(M, S),
            schedule=gamma_lib.FixedLinearGamma(),
            image_shape=SHAPE,
            prediction="score",
        )
    with pytest.raises(ValueError, match="timesteps"):
        model_lib.VDM(
            denoiser=GaussianDenoiser(M, S),
            schedule=gamma_lib.FixedLinearGamma(),
            image_shape=SHAPE,
            timesteps=-1,
        )
