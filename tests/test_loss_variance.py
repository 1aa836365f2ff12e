"""The per-example variance of the diffusion-loss estimate (jvdm.loss_variance), checked on
Gaussian data x ~ N(m, s^2 I) with the exact denoiser (tests/gaussian_models.py).

For that denoiser the residual is known per example: ``eps - eps_hat = a eps - b (x - m)`` with
``a = alpha^2 s^2 / c``, ``b = alpha sigma / c``, ``c = alpha^2 s^2 + sigma^2``, so
``||eps - eps_hat||^2`` given ``x`` has mean ``D a^2 + b^2 ||x - m||^2`` and variance
``2 D a^4 + 4 a^2 b^2 ||x - m||^2``. The per-example ``L(x)`` and ``V_q(x) = int E[g^2] / q du -
L^2`` are then one-dimensional integrals, computed here by float64 quadrature; the estimates are
compared with them, and with a Monte Carlo run of the model's own estimator, within stated
standard errors.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gaussian_models import GaussianDenoiser, perturbed_learned
from jvdm import loss_variance, losses, noise_sampling, train_log
from jvdm import model as model_lib
from jvdm.nn import gamma as gamma_lib

M, S = 0.3, 0.5
SHAPE = (4, 4, 1)
D = int(np.prod(SHAPE))
G_MIN, G_MAX = -10.0, 4.0
DELTA = G_MAX - G_MIN
BITS = 1.0 / (D * np.log(2.0))  # nats -> bpd
EXAMPLES = 4  # fixed examples whose variances are measured
REPEATS = 500  # independent estimates of each (rows of one batch)
BINS = 10  # of the test's loss histogram


def _model(schedule, *, antithetic=True):
    return model_lib.VDM(
        denoiser=GaussianDenoiser(M, S),
        schedule=schedule,
        image_shape=SHAPE,
        use_antithetic_time=antithetic,
        histogram_bins=BINS,
    )


def _params(schedule, sched_params=None, **kw):
    params = model_lib.init(_model(schedule, **kw), jax.random.key(0))
    return params if sched_params is None else params.replace(schedule=sched_params)


def _histogram():
    """A histogram with uneven, partly unvisited bins (the unvisited count as the mean)."""
    values = np.linspace(3.0, 0.5, BINS)
    counts = np.where(np.arange(BINS) == 3, 0.0, 5.0)
    return jnp.asarray(np.stack([values, counts]), jnp.float32)


def _moments(x, n=20001):
    """``(u [n], E[g] [B, n], E[g^2] [B, n])`` in bpd given each example of ``x``, on ``n``
    levels: ``g = Delta 0.5 ||eps - eps_hat||^2``."""
    u = np.linspace(0.0, 1.0, n)
    gam = G_MIN + u * DELTA
    a2, s2 = 1 / (1 + np.exp(gam)), 1 / (1 + np.exp(-gam))
    c = a2 * S**2 + s2
    a, b = a2 * S**2 / c, np.sqrt(a2 * s2) / c
    dd = np.sum((np.asarray(x, np.float64).reshape(len(x), -1) - M) ** 2, axis=1)[:, None]
    mean = D * a**2 + b**2 * dd  # E ||eps - eps_hat||^2 given x
    second = 2 * D * a**4 + 4 * a**2 * b**2 * dd + mean**2
    g = 0.5 * DELTA * BITS
    return u, g * mean, g**2 * second


def _exact(x, density, weight=None):
    """``(L [B], V [B])`` in bpd and bpd^2 for examples ``x`` and a density ``q(u)`` (a NumPy
    function of ``u``), by the trapezoidal rule; with ``weight`` (a function of ``u``), those of
    the weighted term ``w g``."""
    u, m1, m2 = _moments(x)
    if weight is not None:
        w = weight(u)
        m1, m2 = m1 * w, m2 * w**2
    L = np.trapezoid(m1, u, axis=1)
    return L, np.trapezoid(m2 / density(u), u, axis=1) - L**2


def _cosine(u):
    b = np.arctan(np.exp(G_MIN / 2))
    a = np.pi / 2 - b - np.arctan(np.exp(-G_MAX / 2))
    gam = G_MIN + u * DELTA
    return DELTA * np.sqrt(1 / (1 + np.exp(gam)) / (1 + np.exp(-gam))) / (2 * a)


def _adaptive(u):
    probs = np.asarray(noise_sampling.bin_probabilities(_histogram(), uniform_fraction=0.1))
    return BINS * probs[np.minimum((u * BINS).astype(int), BINS - 1)]


_per_example = jax.jit(loss_variance.per_example, static_argnames="grid")


@pytest.fixture(scope="module")
def repeated():
    """The perturbed learned schedule; ``EXAMPLES`` examples, each in ``REPEATS`` rows of one
    batch (independent estimates, as every row draws its own levels and noise)."""
    sched, sp = perturbed_learned(jax.random.key(3), gamma_min=G_MIN, gamma_max=G_MAX)
    params = _params(sched, sp, antithetic=False)
    x = M + S * jax.random.normal(jax.random.key(1), (EXAMPLES, *SHAPE))
    rows = jnp.repeat(x, REPEATS, axis=0)
    out = _per_example(params, rows, jax.random.key(2), histogram=_histogram())
    per_row = {
        k: np.asarray(v, np.float64).reshape(EXAMPLES, REPEATS) for k, v in out.variance.items()
    }
    stats = {k: (v.mean(1), v.std(1, ddof=1) / np.sqrt(REPEATS)) for k, v in per_row.items()}
    return dict(params=params, x=x, out=out, stats=stats)


def test_quadrature_variance_equals_the_monte_carlo_variance_of_the_model_estimator(repeated):
    """Uniform t under a strongly non-linear learned schedule: the quadrature route's ``learned``
    variance against the sample variance of 100,000 draws of ``0.5 gamma'(t) ||eps - eps_hat||^2``
    (model.diffusion_loss, t i.i.d. uniform) for each example, within 4 combined standard errors
    (each the s.e. of a mean of per-row values; the s.e. of a sample variance is that of the mean
    of squared deviations)."""
    params, x = repeated["params"], repeated["x"]
    draws = 100_000
    rows = jnp.repeat(x, draws, axis=0)
    nats = jax.jit(model_lib.diffusion_loss)(params, rows, jax.random.key(4))
    g = np.asarray(nats, np.float64).reshape(EXAMPLES, draws) * BITS
    dev2 = (g - g.mean(1, keepdims=True)) ** 2
    mc, mc_se = dev2.mean(1) * draws / (draws - 1), dev2.std(1, ddof=1) / np.sqrt(draws)
    quad, quad_se = repeated["stats"]["learned"]
    print(f"Monte Carlo {mc} +- {mc_se}\nquadrature  {quad} +- {quad_se}")
    assert np.all(np.abs(quad - mc) < 4 * np.hypot(quad_se, mc_se))
    assert np.all(np.hypot(quad_se, mc_se) < 0.05 * mc)  # the comparison has power


@pytest.mark.parametrize("name", ["linear", "cosine", "adaptive"])
def test_variances_match_their_closed_forms(repeated, name):
    """Per example, the variance under the linear (q = 1), cosine and histogram densities against
    the float64 quadrature of the closed form, within 4 standard errors of the mean of 500
    independent estimates; and the diffusion term itself."""
    density = {"linear": np.ones_like, "cosine": _cosine, "adaptive": _adaptive}[name]
    exact_l, exact_v = _exact(repeated["x"], density)
    mean, se = repeated["stats"][name]
    print(f"{name}: estimate {mean} +- {se}, exact {exact_v}")
    assert np.all(np.abs(mean - exact_v) < 4 * se) and np.all(se < 0.05 * exact_v)
    per_row = np.asarray(repeated["out"].diffusion_bpd, np.float64).reshape(EXAMPLES, REPEATS)
    l_se = per_row.std(1, ddof=1) / np.sqrt(REPEATS)
    assert np.all(np.abs(per_row.mean(1) - exact_l) < 4 * l_se)


BAND, BAND_FRACTION = (-3.0, 0.0), 0.4  # log SNR in [-3, 0): u in [6/14, 9/14)


def _band(u):
    a, b = (-BAND[1] - G_MIN) / DELTA, (-BAND[0] - G_MIN) / DELTA
    return (1 - BAND_FRACTION) + BAND_FRACTION * ((u >= a) & (u < b)) / (b - a)


def test_band_variance_matches_its_closed_form(repeated):
    """A model that draws from the band density gets its ``"band"`` variance, which matches the
    float64 quadrature of the closed form like the other densities (4 standard errors of the mean
    of 500 estimates); a model that does not, gets none."""
    assert "band" not in repeated["out"].variance
    params = repeated["params"]
    params = params.replace(
        model=dataclasses.replace(
            params.model, noise_sampling="band", band_log_snr=BAND, band_fraction=BAND_FRACTION
        )
    )
    rows = jnp.repeat(repeated["x"], REPEATS, axis=0)
    out = _per_example(params, rows, jax.random.key(2))
    v = np.asarray(out.variance["band"], np.float64).reshape(EXAMPLES, REPEATS)
    mean, se = v.mean(1), v.std(1, ddof=1) / np.sqrt(REPEATS)
    _, exact_v = _exact(repeated["x"], _band)
    print(f"band: estimate {mean} +- {se}, exact {exact_v}")
    assert np.all(np.abs(mean - exact_v) < 4 * se) and np.all(se < 0.05 * exact_v)


SIGMOID_SCALE, SIGMOID_BIAS = 3.0, 2.0  # the default experiment's elbo_sigmoid weighting


def _elbo_sigmoid(u):
    """``w = 1 + c sigmoid(b - lambda)`` at ``lambda = -gamma(u)``, in float64."""
    lam = -(G_MIN + u * DELTA)
    return 1.0 + SIGMOID_SCALE / (1.0 + np.exp(-(SIGMOID_BIAS - lam)))


def test_objective_variance_is_that_of_the_weighted_term(repeated):
    """For a model trained on ``elbo_sigmoid``, ``objective=True`` measures the weighted term
    ``w g`` (what its schedule's interior is trained on): its mean and its variance under the
    linear and cosine densities against the float64 closed forms with ``w``, within 4 standard
    errors of the mean of 500 estimates; the same points with ``objective=False`` still give the
    ELBO's values, those of the unweighted model (the weighting changes no draw; to float32
    rounding, as the fixture's are from the one fused program of ``per_example``)."""
    params = repeated["params"]
    weighted = params.replace(
        model=dataclasses.replace(
            params.model,
            weighting="elbo_sigmoid",
            sigmoid_scale=SIGMOID_SCALE,
            sigmoid_bias=SIGMOID_BIAS,
        )
    )
    rows = jnp.repeat(repeated["x"], REPEATS, axis=0)
    pts = jax.jit(loss_variance.points, static_argnames="grid")(
        weighted, rows, jax.random.key(2), histogram=_histogram()
    )
    combine = jax.jit(loss_variance.combine, static_argnames="objective")
    elbo, objective = combine(pts), combine(pts, objective=True)
    for name, ref in repeated["out"].variance.items():
        np.testing.assert_allclose(elbo.variance[name], ref, rtol=1e-6, err_msg=name)
    reshape = lambda v: np.asarray(v, np.float64).reshape(EXAMPLES, REPEATS)
    stats = lambda v: (reshape(v).mean(1), reshape(v).std(1, ddof=1) / np.sqrt(REPEATS))
    for name, density in (("linear", np.ones_like), ("cosine", _cosine)):
        exact_l, exact_v = _exact(repeated["x"], density, _elbo_sigmoid)
        mean, se = stats(objective.variance[name])
        print(f"{name}: weighted estimate {mean} +- {se}, exact {exact_v}")
        assert np.all(np.abs(mean - exact_v) < 4 * se) and np.all(se < 0.05 * exact_v)
    mean, se = stats(objective.diffusion_bpd)
    assert np.all(np.abs(mean - exact_l) < 4 * se)
    # w > 1 everywhere (1 to 4 here), so the weighted term is above the ELBO's.
    assert np.all(mean - 4 * se > _exact(repeated["x"], np.ones_like)[0])


def test_variance_record_adds_the_objective_for_a_weighted_model(key):
    """``train_log.variance_record``: ``variance/*`` alone for a model trained on the ELBO;
    ``objective_variance/*`` beside it, from the same evaluations, for a weighted one."""
    params = _params(gamma_lib.FixedLinearGamma(gamma_min=G_MIN, gamma_max=G_MAX))
    images = np.asarray(jax.random.randint(key, (4, *SHAPE), 0, 256), np.uint8)
    names = [k for k in loss_variance.DENSITIES if k not in ("adaptive", "band")]
    names.append("diffusion_bpd")
    plain = train_log.variance_record(params, images, jax.random.key(8), grid=16)
    assert set(plain) == {f"variance/{k}" for k in names}
    weighted = params.replace(
        model=dataclasses.replace(params.model, weighting="sigmoid", sigmoid_bias=SIGMOID_BIAS)
    )
    both = train_log.variance_record(weighted, images, jax.random.key(8), grid=16)
    assert set(both) == set(plain) | {f"objective_variance/{k}" for k in names}
    assert all(both[k] == plain[k] for k in plain)
    # sigmoid(b - lambda) < 1 everywhere: the weighted term is below the ELBO's.
    assert both["objective_variance/diffusion_bpd"] < plain["variance/diffusion_bpd"]


def test_the_plot_draws_both_the_elbo_and_the_objective(tmp_path):
    """``loss_variance.png`` of a weighted run: both families of series, read from the metrics
    file the trainer writes (a file without any gives an empty, labelled plot)."""
    from jvdm import viz

    metrics = tmp_path / "metrics.jsonl"
    rows = [
        {"step": s, "variance/linear": 0.7 / s, "objective_variance/linear": 3.0 / s}
        for s in (1, 2, 3)
    ]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name in ("both.png", "none.png"):
        out = viz.plot_loss_variance(metrics, tmp_path / name)
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        metrics.write_text(json.dumps({"step": 1, "train/bpd": 1.0}) + "\n")


def test_optimal_density_has_the_lowest_variance(repeated):
    """The fitted ``q* ∝ sqrt(E g^2)`` is below every other density on the batch's mean, and
    within 4 standard errors (plus 1% for its 64 piecewise-constant strata) of each example's
    variance under the closed-form optimum, ``q*`` from ``E[g^2]`` averaged over the batch."""
    means = {k: float(np.mean(v)) for k, v in repeated["out"].variance.items()}
    print(means)
    assert set(means) == set(loss_variance.DENSITIES) - {"band"}  # not a band model
    assert means["optimal"] < min(v for k, v in means.items() if k != "optimal")
    u, _, m2 = _moments(repeated["x"])
    root = np.sqrt(m2.mean(0))
    best = lambda v: np.interp(v, u, root / np.trapezoid(root, u))
    _, exact_v = _exact(repeated["x"], best)
    mean, se = repeated["stats"]["optimal"]
    print(f"optimal: estimate {mean} +- {se}, closed form {exact_v}")
    assert np.all(np.abs(mean - exact_v) < 4 * se + 0.01 * exact_v)


@pytest.mark.parametrize(
    "schedule,name",
    [
        (gamma_lib.FixedLinearGamma(gamma_min=G_MIN, gamma_max=G_MAX), "linear"),
        pytest.param(
            gamma_lib.CosineGamma(gamma_min=G_MIN, gamma_max=G_MAX),
            "cosine",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_the_model_schedule_density_is_the_named_one_for_fixed_schedules(schedule, name):
    """The ``learned`` density (the model's own schedule, inverted numerically) equals the
    ``linear`` one for FixedLinearGamma (exactly) and the closed-form ``cosine`` one for
    CosineGamma (to the inversion's float32 accuracy): the same points, so the same variance."""
    params = _params(schedule)
    images = jax.random.randint(jax.random.key(5), (8, *SHAPE), 0, 256).astype(jnp.uint8)
    pts = jax.jit(loss_variance.points, static_argnames="grid")(
        params, images, jax.random.key(6), grid=16
    )
    q, ref = np.asarray(pts.density["learned"]), np.asarray(pts.density[name])
    if name == "linear":
        np.testing.assert_array_equal(q, ref)
    else:
        np.testing.assert_allclose(q, ref, rtol=2e-4)
    # Images as uint8 and as the same data in model space give the same values.
    x = losses.scale_pixels(images)
    same = jax.jit(loss_variance.points, static_argnames="grid")(
        params, x, jax.random.key(6), grid=16
    )
    np.testing.assert_allclose(same.g, pts.g, rtol=1e-6)


@pytest.mark.slow  # a second route: 1 device against 4
def test_measure_on_four_devices_is_the_one_device_result(key):
    """``train_log.measure`` pads 6 examples to 8, shards them over the 4 test devices and
    combines on the host: bit for bit what its two programs give on one device, unpadded (and the
    one fused program of ``per_example`` to float32 rounding)."""
    params = _params(gamma_lib.CosineGamma(gamma_min=G_MIN, gamma_max=G_MAX))
    images = np.asarray(jax.random.randint(key, (6, *SHAPE), 0, 256), np.uint8)
    assert len(jax.local_devices()) == 4
    hist, k = _histogram(), jax.random.key(7)
    got = train_log.measure(params, images, k, grid=16, histogram=hist)
    on_one = jax.device_put((params, images, hist), jax.devices()[0])
    pts = jax.jit(loss_variance.points, static_argnames="grid")(
        *on_one[:2], k, grid=16, histogram=hist
    )
    one = jax.jit(loss_variance.combine)(pts)
    fused = jax.jit(loss_variance.per_example, static_argnames="grid")(
        *on_one[:2], k, grid=16, histogram=hist
    )
    assert set(got.variance) == set(loss_variance.DENSITIES) - {"band"}  # not a band model
    for name, ref in (("diffusion_bpd", one.diffusion_bpd), *one.variance.items()):
        value = got.diffusion_bpd if name == "diffusion_bpd" else got.variance[name]
        np.testing.assert_array_equal(value, ref, err_msg=name)
        again = fused.diffusion_bpd if name == "diffusion_bpd" else fused.variance[name]
        np.testing.assert_allclose(value, again, rtol=1e-6, err_msg=name)


@pytest.mark.parametrize(
    "images,grid,match",
    [
        (np.zeros((2, 5, 4, 1), np.uint8), 8, r"built for \(4, 4, 1\)"),
        (np.zeros((2, 4, 4), np.float32), 8, r"shape \(2, 4, 4\); expected uint8 \[B, 4, 4, 1\]"),
        (np.zeros((2, 4, 4, 1), np.int32), 8, "dtype int32"),
        (np.zeros((2, 4, 4, 1), np.uint8), 0, "grid=0; expected a positive integer"),
        (np.zeros((2, 4, 4, 1), np.uint8), 1, r"grid=1; expected an even number >= 2"),
        (np.zeros((2, 4, 4, 1), np.uint8), 7, r"grid=7; expected an even number >= 2"),
    ],
)
def test_bad_inputs_are_user_errors(images, grid, match):
    params = _params(gamma_lib.FixedLinearGamma(gamma_min=G_MIN, gamma_max=G_MAX))
    with pytest.raises(ValueError, match=match):
        loss_variance.per_example(params, images, jax.random.key(0), grid=grid)
    with pytest.raises(ValueError, match="VDMParams"):
        train_log.measure({}, images, jax.random.key(0), grid=grid)


@pytest.mark.parametrize(
    "override,match",
    [
        ("train.variance_every=-1", r"config\.train\.variance_every=-1 is invalid: must be >= 0"),
        ("train.variance_images=0", r"config\.train\.variance_images=0 is invalid: must be posi"),
        ("train.variance_grid=7", r"config\.train\.variance_grid=7 is invalid: must be an even"),
    ],
)
def test_config_fields_are_validated(override, match):
    from jvdm import config as config_lib
    from jvdm.errors import JvdmUserError

    config = config_lib.apply_overrides(config_lib.base_config(), [override])
    with pytest.raises(JvdmUserError, match=match):
        config_lib.validate(config)
    # The default run measures three times, the last at its end, at 32 x 64 forward passes each.
    t = config_lib.base_config().train
    steps = [s for s in range(1, t.steps + 1) if s % t.variance_every == 0 or s == t.steps]
    assert steps == [600, 1200, 1800] and (t.variance_images, t.variance_grid) == (32, 64)
