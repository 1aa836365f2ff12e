"""The learned schedule's variance gradient (:mod:`jvdm.objective`): both estimators of
``d E[L^2] / d eta`` (``density`` and VDM's ``pathwise``) against the derivative of the float64
closed form, on Gaussian data with the exact denoiser (``tests/gaussian_models.py``).

For that denoiser ``||eps - eps_hat||^2`` given ``x`` and ``gamma`` has known first and second
moments (see ``tests/test_loss_variance.py``), so the second moment of the one-sample term
``L = w(gamma) 0.5 gamma'(t) ||eps - eps_hat||^2`` (bpd) with ``t`` uniform is the integral
``int_0^1 gamma'(t)^2 E[(0.5 w f)^2 | gamma(t)] dt``. Here the learned schedule itself is
re-implemented in NumPy (float64), the integral is taken by the trapezoidal rule, and its derivative
along random directions of the interior parameters by central differences: no autodiff, no
sampling. The model's estimates, averaged over independent batches, must agree with it within 4
standard errors of their mean, and be precise enough (each standard error under 10% of the largest
projection) that a wrong estimator could not pass.

Measured standard errors at 40 batches (plain bound / elbo_sigmoid), density: 0.9-2.3 / 5.6-17;
pathwise: 1.7-9.6 / 12-35, for projections of size 2-78 / 218-451.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gaussian_models import GaussianDenoiser, perturbed_learned
from jvdm import losses, objective
from jvdm import model as model_lib

M, S = 0.3, 0.5
SHAPE = (4, 4, 1)
D = int(np.prod(SHAPE))
G_MIN, G_MAX = -10.0, 4.0
BITS = 1.0 / (D * np.log(2.0))  # nats -> bpd
MIN_SLOPE = 1e-3  # jvdm.nn.gamma._MonotoneNet's
SIGMOID_SCALE, SIGMOID_BIAS = 3.0, 2.0  # the default experiment's elbo_sigmoid weighting
EXAMPLES, ROWS = 4, 500
# Batches averaged per estimator: the pathwise one is the noisier (measured below).
BATCHES = {"density": 40, "pathwise": 120}
DIRECTIONS = 3


def _sigmoid(u):
    return 1.0 / (1.0 + np.exp(-u))


def _np_gamma(net, t):
    """``(gamma(t), gamma'(t))`` of :class:`jvdm.nn.gamma.LearnedGamma` in float64."""
    k1, k2, b2, k3 = (
        np.asarray(net[k], np.float64) for k in ("l1", "l2_kernel", "l2_bias", "l3_kernel")
    )
    slope = np.abs(k1) + MIN_SLOPE

    def h(t):
        u = (2.0 * t[:, None] - 1.0) * np.abs(k2) + b2
        return slope * t + np.sum(2.0 * (_sigmoid(u) - 0.5) * np.abs(k3), axis=-1) / len(k2)

    def dh(t):
        sig = _sigmoid((2.0 * t[:, None] - 1.0) * np.abs(k2) + b2)
        return slope + np.sum(4.0 * sig * (1.0 - sig) * np.abs(k2) * np.abs(k3), axis=-1) / len(k2)

    h0, h1 = h(np.zeros(1))[0], h(np.ones(1))[0]
    span = (G_MAX - G_MIN) / (h1 - h0)
    return G_MIN + span * (h(t) - h0), span * dh(t)


def _second_moment(net, x, weighted, n=40001):
    """``mean_x E[L^2 | x]`` in bpd^2 (float64 quadrature over ``t``)."""
    t = np.linspace(0.0, 1.0, n)
    gam, dgam = _np_gamma(net, t)
    a2, s2 = _sigmoid(-gam), _sigmoid(gam)
    c = a2 * S**2 + s2
    a, b = a2 * S**2 / c, np.sqrt(a2 * s2) / c
    dd = np.sum((np.asarray(x, np.float64).reshape(len(x), -1) - M) ** 2, axis=1)[:, None]
    mean = D * a**2 + b**2 * dd  # E ||eps - eps_hat||^2 given x and gamma
    second = 2 * D * a**4 + 4 * a**2 * b**2 * dd + mean**2
    w = 1.0 + SIGMOID_SCALE * _sigmoid(SIGMOID_BIAS + gam) if weighted else 1.0
    integrand = (0.5 * BITS * w * dgam) ** 2 * second
    return float(np.mean(np.trapezoid(integrand, t, axis=1)))


def _flat_interior(tree):
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return np.concatenate(
        [np.ravel(np.asarray(v)) for p, v in leaves if not model_lib.is_endpoint(p)]
    )


def _shifted(net, direction, h):
    """``net + h direction`` (direction flat, in the order of :func:`_flat_interior`)."""
    out, i = {}, 0
    for name in sorted(net):  # tree_leaves visits a dict's keys in sorted order
        v = np.asarray(net[name], np.float64)
        out[name] = v + h * direction[i : i + v.size].reshape(v.shape)
        i += v.size
    return out


@pytest.fixture(scope="module")
def problem():
    sched, sp = perturbed_learned(jax.random.key(3), gamma_min=G_MIN, gamma_max=G_MAX)
    images = jax.random.randint(jax.random.key(4), (EXAMPLES, *SHAPE), 0, 256).astype(jnp.uint8)
    x = np.asarray(losses.scale_pixels(images, 256), np.float64)
    dirs = np.asarray(jax.random.normal(jax.random.key(5), (DIRECTIONS, _flat_interior(sp).size)))
    return sched, sp, images, x, dirs


@pytest.mark.parametrize("weighting", ["elbo", "elbo_sigmoid"])
# VDM's pathwise estimator is checked draw by draw in tests/test_model.py; here in the slow tier.
@pytest.mark.parametrize("estimator", ["density", pytest.param("pathwise", marks=pytest.mark.slow)])
def test_variance_gradient_is_the_derivative_of_the_closed_form(problem, estimator, weighting):
    """The interior's gradient from :func:`jvdm.objective.loss_and_grads`, projected on random
    directions and averaged over 40 (density) or 120 (pathwise) batches of 2,000 rows (4 examples
    x 500), against central
    differences of the float64 closed form of ``mean_x E[L^2 | x]``; under the plain bound and
    under the default experiment's ``elbo_sigmoid`` weighting (whose slope ``w'`` enters the
    pathwise estimator and not the density one)."""
    sched, sp, images, x, dirs = problem
    model = model_lib.VDM(
        denoiser=GaussianDenoiser(M, S),
        schedule=sched,
        image_shape=SHAPE,
        variance_gradient=estimator,
        weighting=weighting,
        sigmoid_scale=SIGMOID_SCALE,
        sigmoid_bias=SIGMOID_BIAS,
    )
    params = model_lib.init(model, jax.random.key(0)).replace(schedule=sp)
    rows = jnp.repeat(images, ROWS, axis=0)
    grads = jax.jit(lambda p, k: objective.loss_and_grads(p, rows, k, train=False).grads.schedule)
    draws = np.stack(
        [_flat_interior(grads(params, jax.random.key(100 + i))) for i in range(BATCHES[estimator])]
    )
    projections = draws.astype(np.float64) @ dirs.T  # [BATCHES, DIRECTIONS]
    mean = projections.mean(0)
    se = projections.std(0, ddof=1) / np.sqrt(BATCHES[estimator])

    net = sp["params"]["net"]
    weighted = weighting != "elbo"
    step = 1e-5
    exact = np.array(
        [
            (
                _second_moment(_shifted(net, d, step), x, weighted)
                - _second_moment(_shifted(net, d, -step), x, weighted)
            )
            / (2 * step)
            for d in dirs
        ]
    )
    print(f"{estimator}/{weighting}: estimate {mean} +- {se}, closed form {exact}")
    assert np.all(np.abs(mean - exact) < 4 * se), (mean, se, exact)
    assert np.all(se < 0.1 * np.max(np.abs(exact))), (se, exact)


def test_the_estimator_is_validated(problem):
    sched, sp, *_ = problem
    with pytest.raises(ValueError, match="variance_gradient='score'; expected one of"):
        model_lib.VDM(
            denoiser=GaussianDenoiser(M, S),
            schedule=sched,
            image_shape=SHAPE,
            variance_gradient="score",
        )
    model = model_lib.VDM(denoiser=GaussianDenoiser(M, S), schedule=sched, image_shape=SHAPE)
    assert model.variance_gradient == "density"
    assert dataclasses.replace(model, variance_gradient="pathwise").variance_gradient == "pathwise"
