"""Tests of the noise schedules gamma(t): monotonicity, end points, derivatives, the DDPM table."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jvdm.nn import (
    CosineGamma,
    DDPMGamma,
    FixedLinearGamma,
    LearnedGamma,
    endpoints,
    gamma_and_derivative,
)

GRID = np.linspace(0.0, 1.0, 2001, dtype=np.float32)


@pytest.fixture(scope="module")
def learned():
    model = LearnedGamma()
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros(3))
    return model, params


def _perturbed(params, seed, scale=3.0):
    """Large random interior and random (ordered) end points."""
    rng = np.random.default_rng(seed)
    p = jax.tree_util.tree_map(
        lambda x: x + scale * rng.standard_normal(x.shape).astype(x.dtype), params
    )["params"]
    g0 = rng.uniform(-20.0, 2.0)
    p = {**p, "gamma_min": jnp.float32(g0), "gamma_max": jnp.float32(g0 + rng.uniform(0.5, 25))}
    if seed % 2:  # the linear term at its floor: monotonicity must not rely on it being large
        p["net"] = {**p["net"], "l1": jnp.float32(0.0)}
    return {"params": p}


def _schedules(model, params):
    """(module, [params, ...]): LearnedGamma at init and randomly perturbed, then the others."""
    yield model, [params] + [_perturbed(params, seed) for seed in range(4)]
    for m in [FixedLinearGamma(), CosineGamma(), CosineGamma(-5.0, 12.0), DDPMGamma()]:
        yield m, [{}]


def _with_derivative(model):
    """One jitted (params, t) -> (gamma, dgamma/dt) per module: params are arguments, not closed
    over, so that differently perturbed params reuse one compilation."""
    return jax.jit(lambda p, t: gamma_and_derivative(lambda s: model.apply(p, s), t))


def test_learned_params_layout(learned):
    model, params = learned
    p = params["params"]
    assert set(p) == {"gamma_min", "gamma_max", "net"}
    assert p["gamma_min"].shape == p["gamma_max"].shape == ()
    assert float(p["gamma_min"]) == np.float32(-13.3) and float(p["gamma_max"]) == 5.0
    assert FixedLinearGamma().init(jax.random.key(0), jnp.zeros(2)) == {}
    with pytest.raises(ValueError, match="gamma_max_init"):
        LearnedGamma(gamma_min_init=1.0, gamma_max_init=-1.0).init(jax.random.key(0), 0.5)


def test_strictly_increasing_with_positive_derivative(learned):
    for model, all_params in _schedules(*learned):
        fn = _with_derivative(model)
        for params in all_params:
            gamma, dgamma = fn(params, jnp.asarray(GRID))
            assert np.all(np.diff(np.asarray(gamma)) > 0), model
            assert np.all(np.asarray(dgamma) > 0), model


def test_learned_endpoints_exact(learned):
    model, params = learned
    apply = jax.jit(model.apply)
    for p in [params, _perturbed(params, 0), _perturbed(params, 1)]:
        g0, g1 = p["params"]["gamma_min"], p["params"]["gamma_max"]
        e0, e1 = endpoints(model, p)
        assert e0 == g0 and e1 == g1
        for t in [jnp.asarray(GRID), jnp.array([[1.0, 0.5], [0.0, 0.25]]), jnp.float32(0.0)]:
            gamma = np.asarray(apply(p, t))
            assert gamma.shape == t.shape
            np.testing.assert_array_equal(gamma[np.asarray(t) == 0.0], g0)
            np.testing.assert_array_equal(gamma[np.asarray(t) == 1.0], g1)


def test_endpoint_gradients(learned):
    """gamma(0) and gamma(1) depend on gamma_min and gamma_max only (to rounding), the interior
    on the network too: the split the training step relies on."""
    model, params = learned
    grad = jax.jit(jax.grad(lambda p, t: model.apply(p, t).sum()))
    grads = grad(params, jnp.array([0.0, 1.0]))["params"]
    assert grads["gamma_min"] == 1.0 and grads["gamma_max"] == 1.0
    inner = grad(params, jnp.array([0.3, 0.6]))["params"]
    scale = max(np.abs(g).max() for g in jax.tree_util.tree_leaves(inner["net"]))
    assert scale > 1e-3
    for g in jax.tree_util.tree_leaves(grads["net"]):
        assert np.abs(g).max() <= 1e-6  # float32 rounding of the cancelling terms


@pytest.mark.parametrize("cls", [FixedLinearGamma, CosineGamma])
@pytest.mark.parametrize("g_min, g_max", [(-13.3, 5.0), (-5.0, 12.0), (-20.0, -10.0)])
def test_fixed_endpoints(cls, g_min, g_max):
    model = cls(g_min, g_max)
    gamma = model.apply({}, jnp.array([0.0, 1.0]))
    np.testing.assert_allclose(gamma, [g_min, g_max], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(endpoints(model, {}), [g_min, g_max], rtol=1e-6)


def test_cosine_against_alpha_bar():
    """gamma = -log(alpha_bar / (1 - alpha_bar)) with alpha_bar = cos^2(a t + b), in float64."""
    g_min, g_max = -13.3, 5.0
    b = math.atan(math.exp(g_min / 2))
    a = math.atan(math.exp(g_max / 2)) - b
    t = GRID.astype(np.float64)
    alpha_bar = np.cos(a * t + b) ** 2
    expected = -np.log(alpha_bar / np.sin(a * t + b) ** 2)
    np.testing.assert_allclose(CosineGamma(g_min, g_max).apply({}, GRID), expected, atol=1e-4)


def test_derivative_matches_finite_differences(learned):
    model, params = learned
    h = 1e-6
    t = np.linspace(0.02, 0.98, 49)

    def jvp_and_fd(m, p, t):
        gamma, dgamma = gamma_and_derivative(lambda s: m.apply(p, s), t)
        return gamma, dgamma, (m.apply(p, t + h) - m.apply(p, t - h)) / (2 * h)

    with jax.enable_x64(True):
        learned_fn = jax.jit(lambda p, t: jvp_and_fd(model, p, t))
        cases = [(learned_fn, _perturbed(params, seed)) for seed in (2, 3)]
        for m in (FixedLinearGamma(), CosineGamma(), CosineGamma(-5.0, 12.0)):
            cases.append((jax.jit(lambda p, t, m=m: jvp_and_fd(m, p, t)), {}))
        for fn, p in cases:
            gamma, dgamma, fd = fn(p, jnp.asarray(t))
            assert gamma.dtype == dgamma.dtype == jnp.float64
            np.testing.assert_allclose(dgamma, fd, rtol=1e-6)


def _ddpm_table_numpy(timesteps, beta_1, beta_T):
    betas = np.linspace(beta_1, beta_T, timesteps + 1)
    alpha_bar, prod = [], 1.0
    for beta in betas:
        prod *= 1.0 - beta
        alpha_bar.append(prod)
    alpha_bar = np.array(alpha_bar)
    return np.log((1.0 - alpha_bar) / alpha_bar)


@pytest.mark.parametrize("timesteps, beta_1, beta_T", [(1000, 1e-4, 0.02), (10, 1e-3, 0.2)])
def test_ddpm_table(timesteps, beta_1, beta_T):
    model = DDPMGamma(timesteps, beta_1, beta_T)
    table = _ddpm_table_numpy(timesteps, beta_1, beta_T)
    t = np.arange(timesteps + 1) / timesteps
    apply = jax.jit(model.apply)
    np.testing.assert_allclose(apply({}, jnp.asarray(t, jnp.float32)), table, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(endpoints(model, {}), table[[0, -1]], rtol=1e-6)
    # Linear in between: the midpoint is the mean, the slope the table's difference quotient.
    mid = (t[:-1] + t[1:]) / 2
    gamma, dgamma = gamma_and_derivative(
        lambda s: model.apply({}, s), jnp.asarray(mid, jnp.float32)
    )
    np.testing.assert_allclose(gamma, (table[:-1] + table[1:]) / 2, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dgamma, np.diff(table) * timesteps, rtol=2e-3)
    with jax.enable_x64(True):
        _, dgamma = gamma_and_derivative(lambda s: model.apply({}, s), jnp.asarray(mid))
        np.testing.assert_allclose(dgamma, np.diff(table) * timesteps, rtol=1e-9)


def test_ddpm_matches_schedules_module():
    """Cross-check with jvdm.schedules (float32, so loosely), when that module exists."""
    schedules = pytest.importorskip("jvdm.schedules")
    ab = schedules.alpha_bar(schedules.linear_betas(1001, beta_1=1e-4, beta_T=0.02))
    expected = np.asarray(schedules.gamma_from_alpha_bar(ab), np.float64)
    gamma = jax.jit(DDPMGamma().apply)({}, jnp.arange(1001, dtype=jnp.float32) / 1000)
    np.testing.assert_allclose(gamma, expected, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("cls", [FixedLinearGamma, CosineGamma])
def test_fixed_reversed_endpoints_raise(cls):
    with pytest.raises(ValueError, match="gamma_max > gamma_min"):
        cls(5.0, -5.0).apply({}, jnp.zeros(2))
