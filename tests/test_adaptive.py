"""Importance-sampled noise levels (jvdm.noise_sampling) and the weighted training objective.

On Gaussian data x ~ N(m, s^2 I) with the exact denoiser (tests/gaussian_models.py) the weighted
diffusion loss is a one-dimensional integral, ``L_w = 1/2 int w(lam) D s^2 e^lam / (1 + s^2 e^lam)
dlam``, computed here by float64 quadrature; the estimators are checked against it by Monte Carlo
with stated standard errors. The histogram's life in the TrainState (resume, devices) is checked
on a tiny denoiser with parameters.
"""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gaussian_models import GaussianDenoiser
from jvdm import checkpoint as ckpt
from jvdm import config as config_lib
from jvdm import model as model_lib
from jvdm import noise_sampling, objective, parallel, weighting
from jvdm import train as train_lib
from jvdm import train_state as state_lib
from jvdm.nn import gamma as gamma_lib

M, S = 0.3, 0.5
SHAPE = (4, 4, 1)
D = int(np.prod(SHAPE))
G_MIN, G_MAX = -10.0, 4.0
BIAS = 2.0


def _exact_weighted_loss(name):
    lam = np.linspace(-G_MAX, -G_MIN, 400001)
    w = np.exp(np.asarray(weighting.log_diffusion_weight(lam, weighting=name, sigmoid_bias=BIAS)))
    mse = D * S**2 * np.exp(lam) / (1 + S**2 * np.exp(lam))
    return 0.5 * np.trapezoid(w * mse, lam)


def _model(name, sampling, bins=50, **band):
    return model_lib.VDM(
        denoiser=GaussianDenoiser(M, S),
        schedule=gamma_lib.FixedLinearGamma(gamma_min=G_MIN, gamma_max=G_MAX),
        image_shape=SHAPE,
        weighting=name,
        sigmoid_bias=BIAS,
        noise_sampling=sampling,
        histogram_bins=bins,
        **band,
    )


def _per_example(params, hist, key, batch):
    """One batch of per-example weighted diffusion estimates (nats) and the histogram after it."""
    model = params.model
    adaptive = model.noise_sampling == "adaptive"
    band = None
    if model.noise_sampling == "band":
        band = noise_sampling.band_interval(G_MIN, G_MAX, model.band_log_snr)
    kx, kn = jax.random.split(key)
    x = M + S * jax.random.normal(kx, (batch, *SHAPE))
    noise = model_lib.draw_noise(model, kn, x.shape, hist if adaptive else None, band=band)
    positional = model.noise_sampling != "uniform_t"
    sv = model_lib.schedule_values(model, noise, adaptive=positional)(params.schedule)
    diff = model_lib._diffusion_term(
        model, params.denoiser, x, noise.eps, sv, noise.key_dropout, train=False
    )
    loss = weighting.weighted_diffusion_loss(
        diff, sv.g_t, weighting=model.weighting, sigmoid_bias=BIAS
    )
    hist = objective._updated_histogram(model, hist, noise, sv, loss, positional)
    return loss, hist


def _monte_carlo(params, key, *, warmup=150, batches=200, batch=64):
    """``(per-example estimates [batches * batch], histogram)``: the histogram is first learned
    online for ``warmup`` batches, then frozen while the estimates are drawn."""
    hist = noise_sampling.init_histogram(params.model.histogram_bins)
    k_warm, k_est = jax.random.split(key)

    def learn(hist, k):
        return _per_example(params, hist, k, batch)[1], None

    hist, _ = jax.lax.scan(learn, hist, jax.random.split(k_warm, warmup))
    losses = jax.lax.map(
        lambda k: _per_example(params, hist, k, batch)[0], jax.random.split(k_est, batches)
    )
    return np.asarray(losses, np.float64).reshape(-1), hist


def test_positions_follow_the_histogram_and_are_stratified():
    hist = jnp.stack([jnp.asarray([0.0, 1.0, 5.0, 2.0]), jnp.asarray([0.0, 3.0, 1.0, 2.0])])
    probs = np.asarray(noise_sampling.bin_probabilities(hist, uniform_fraction=0.2))
    # The unvisited bin counts as the mean (8/3) of the visited ones; the floor is 0.2 / 4.
    h = np.array([8 / 3, 1.0, 5.0, 2.0])
    np.testing.assert_allclose(probs, 0.8 * h / h.sum() + 0.05, rtol=1e-6)
    fn = jax.jit(lambda k: noise_sampling.sample_positions(k, 1000, hist, uniform_fraction=0.2))
    u, q = (np.asarray(v) for v in fn(jax.random.key(0)))
    assert np.all((u >= 0) & (u <= 1))
    np.testing.assert_allclose(q, 4 * probs[np.minimum((u * 4).astype(int), 3)], rtol=1e-6)
    # Stratified: exactly the expected number of the 1000 draws per bin, up to one.
    counts = np.bincount(np.minimum((u * 4).astype(int), 3), minlength=4)
    assert np.all(np.abs(counts - 1000 * probs) <= 1.0 + 1e-6), (counts, 1000 * probs)
    # An empty histogram samples uniformly.
    empty = noise_sampling.init_histogram(4)
    np.testing.assert_allclose(noise_sampling.bin_probabilities(empty, uniform_fraction=0.1), 0.25)


def _band_cdf(u, a, b, f):
    """float64 CDF of ``q(u) = (1 - f) + f 1[a <= u < b] / (b - a)``."""
    return (1 - f) * u + f * np.clip((u - a) / (b - a), 0.0, 1.0)


def test_band_positions_follow_their_density_and_are_stratified():
    a, b, f, n = 0.3, 0.5, 0.4, 1000
    fn = jax.jit(lambda k: noise_sampling.band_positions(k, n, (a, b), fraction=f))
    u, q = (np.asarray(v, np.float64) for v in fn(jax.random.key(0)))
    assert np.all((u >= 0) & (u <= 1))
    inside = (u >= a) & (u < b)
    # The density of each draw: 1 - f outside, 1 - f + f / (b - a) = 2.6 inside (up to the
    # float32 rounding of a draw that lands on an edge).
    edge = np.minimum(np.abs(u - a), np.abs(u - b)) < 1e-6
    np.testing.assert_allclose(q[~edge], np.where(inside, 2.6, 0.6)[~edge], rtol=1e-6)
    # Stratified: F(u) of the n draws are t0 + i / n, so each region holds n x its mass, up to one.
    counts = [np.sum(u < a), np.sum(inside), np.sum(u >= b)]
    masses = [0.6 * a, 0.6 * (b - a) + f, 0.6 * (1 - b)]
    assert np.all(np.abs(np.array(counts) - n * np.array(masses)) <= 1.0 + 1e-9), counts
    spacing = np.diff(np.sort(_band_cdf(u, a, b, f)))
    np.testing.assert_allclose(spacing, 1.0 / n, atol=1e-5)
    # Independent draws: the CDF values are uniform (Kolmogorov-Smirnov, n = 20000: the 1%
    # critical value is 1.63 / sqrt(n) = 0.0115).
    fn = jax.jit(
        lambda k: noise_sampling.band_positions(k, 20000, (a, b), fraction=f, use_antithetic=False)
    )
    c = np.sort(_band_cdf(np.asarray(fn(jax.random.key(1))[0], np.float64), a, b, f))
    ks = np.max(np.abs(c - (np.arange(1, c.size + 1) - 0.5) / c.size))
    assert ks < 0.0115, ks
    # An empty interval (a band outside the end points' range) is the uniform density.
    u1, q1 = noise_sampling.band_positions(
        jax.random.key(2), 20000, (0.7, 0.7), fraction=f, use_antithetic=False
    )
    np.testing.assert_array_equal(q1, 1.0)
    np.testing.assert_allclose(u1, jax.random.uniform(jax.random.key(2), (20000,)), rtol=1e-6)


def test_band_interval_is_the_band_in_positions_between_the_end_points():
    # gamma = -10 + 14 u; log SNR in [-2, 1) is gamma in (-1, 2]: u in (9/14, 12/14].
    a, b = noise_sampling.band_interval(-10.0, 4.0, (-2.0, 1.0))
    np.testing.assert_allclose([a, b], [9 / 14, 12 / 14], rtol=1e-6)
    # Partly outside the range: clipped to [0, 1]; wholly outside: empty.
    np.testing.assert_allclose(noise_sampling.band_interval(-10.0, 4.0, (-9.0, 0.0)), [10 / 14, 1])
    a, b = noise_sampling.band_interval(-10.0, 4.0, (11.0, 12.0))
    assert a == b == 0.0


def test_histogram_update_is_an_ema_of_the_bin_means():
    hist = noise_sampling.init_histogram(2)
    u = jnp.asarray([0.1, 0.2, 0.7])
    hist = noise_sampling.update_histogram(hist, u, jnp.asarray([1.0, 3.0, 10.0]), decay=0.9)
    np.testing.assert_allclose(hist, [[2.0, 10.0], [1.0, 1.0]])  # first visits set the value
    hist = noise_sampling.update_histogram(hist, u[:1], jnp.asarray([4.0]), decay=0.9)
    np.testing.assert_allclose(hist, [[0.9 * 2 + 0.1 * 4, 10.0], [2.0, 1.0]], rtol=1e-6)


@pytest.mark.parametrize("name", ["elbo", pytest.param("sigmoid", marks=pytest.mark.slow)])
def test_adaptive_estimate_is_unbiased_and_has_lower_variance(name):
    """Monte Carlo means of the uniform-t and the adaptive estimators against the quadrature, each
    within 4 standard errors (12,800 examples each), and the ratio of their per-example variances.
    Measured: variance ratio adaptive / uniform 0.24 (elbo), 0.10 (sigmoid)."""
    exact = _exact_weighted_loss(name)
    stats = {}
    for sampling in ("uniform_t", "adaptive"):
        params = model_lib.init(_model(name, sampling), jax.random.key(0))
        est, hist = _monte_carlo(params, jax.random.key(1))
        mean, se = est.mean(), est.std(ddof=1) / np.sqrt(est.size)
        stats[sampling] = (mean, se, est.var(ddof=1))
        print(f"{name} {sampling}: mean {mean:.5f} +- {se:.5f} (exact {exact:.5f})")
        assert abs(mean - exact) < 4 * se, (sampling, mean, se, exact)
    (m_u, se_u, v_u), (m_a, se_a, v_a) = stats["uniform_t"], stats["adaptive"]
    assert abs(m_u - m_a) < 4 * np.hypot(se_u, se_a)
    ratio = v_a / v_u
    print(f"{name}: per-example variance uniform {v_u:.4g}, adaptive {v_a:.4g}, ratio {ratio:.3f}")
    assert ratio < 1.0


@pytest.mark.parametrize("name", ["elbo", "elbo_sigmoid"])
def test_band_estimate_is_unbiased(name):
    """The band density (40% of the draws in log SNR [-3, 0], a fifth of the range) gives the
    quadrature's value within 4 standard errors (12,800 examples): the Jacobian Delta / q(u)
    undoes the density, whatever the weighting."""
    exact = _exact_weighted_loss(name)
    model = _model(name, "band", band_log_snr=(-3.0, 0.0), band_fraction=0.4)
    params = model_lib.init(model, jax.random.key(0))
    est, _ = _monte_carlo(params, jax.random.key(1), warmup=1)
    mean, se = est.mean(), est.std(ddof=1) / np.sqrt(est.size)
    print(f"{name} band: mean {mean:.5f} +- {se:.5f} (exact {exact:.5f})")
    assert abs(mean - exact) < 4 * se, (mean, se, exact)


def test_the_objective_draws_the_band_between_the_schedules_end_points():
    """Two routes to one band draw: ``objective.loss_and_grads`` (which reads the end points off
    the schedule) and the draws made here from the known end points give the same ELBO terms."""
    model = _model("elbo", "band", band_log_snr=(-3.0, 0.0), band_fraction=0.4)
    params = model_lib.init(model, jax.random.key(0))
    images = jax.random.randint(jax.random.key(1), (16, *SHAPE), 0, 256).astype(jnp.uint8)
    key = jax.random.key(2)
    metrics = objective.loss_and_grads(params, images, key, train=False).metrics
    band = noise_sampling.band_interval(G_MIN, G_MAX, (-3.0, 0.0))
    noise = model_lib.draw_noise(model, key, images.shape, band=band)
    assert np.mean((np.asarray(noise.t) >= band[0]) & (np.asarray(noise.t) < band[1])) > 0.4
    sv = model_lib.schedule_values(model, noise, adaptive=True)(params.schedule)
    terms = model_lib.bound_terms(model, params.denoiser, images, sv, noise, train=False)
    bpd = model_lib.to_bpd(model, terms)
    for name in ("diffusion_bpd", "bpd"):
        np.testing.assert_allclose(metrics[name], np.mean(bpd[name]), rtol=1e-6)
    # Uniform times through the same (linear) schedule draw other levels: a different estimate.
    uniform = model_lib.draw_noise(model, key, images.shape)
    assert not np.allclose(np.asarray(uniform.t), np.asarray(noise.t))


def test_elbo_with_uniform_times_is_the_default_objective_to_the_bit(key):
    """``weighting="elbo"`` with ``noise_sampling="uniform_t"`` is the model's bound: the training
    loss and the gradients equal those of ``loss_terms`` composed by hand (same draws), bit for bit,
    and an adaptive model's evaluation (``loss_terms``) is the same ELBO too."""
    model = _model("elbo", "uniform_t")
    params = model_lib.init(model, key)
    images = jax.random.randint(jax.random.key(3), (8, *SHAPE), 0, 256).astype(jnp.uint8)
    out = jax.jit(objective.loss_and_grads, static_argnames="train")(
        params, images, key, train=False
    )
    terms = jax.jit(model_lib.loss_terms)(params, images, key)
    assert np.array_equal(np.asarray(out.loss), np.asarray(jnp.mean(terms["bpd"])))
    assert np.array_equal(np.asarray(out.metrics["bpd"]), np.asarray(jnp.mean(terms["bpd"])))
    assert "weighted_diffusion_bpd" not in out.metrics
    adaptive = params.replace(model=_model("sigmoid", "adaptive"))
    terms_a = jax.jit(model_lib.loss_terms)(adaptive, images, key)
    for k, v in terms.items():
        assert np.array_equal(np.asarray(v), np.asarray(terms_a[k])), k


class _TinyDenoiser(nn.Module):
    @nn.compact
    def __call__(self, z, gamma, *, train=False):
        del train
        h = nn.Conv(4, (3, 3))(z) + nn.Dense(4)(jnp.sin(gamma[:, None] / 4))[:, None, None, :]
        return nn.Conv(z.shape[-1], (3, 3))(jax.nn.swish(h))


def _state_and_batches(mesh):
    model = model_lib.VDM(
        denoiser=_TinyDenoiser(),
        schedule=gamma_lib.LearnedGamma(gamma_min_init=G_MIN, gamma_max_init=G_MAX, hidden=8),
        image_shape=SHAPE,
        weighting="sigmoid",
        noise_sampling="adaptive",
        histogram_bins=16,
    )
    # The base config's optimizer, for this model.
    spec = train_lib.state_spec(config_lib.base_config())._replace(model=model, ema_decay=0.999)
    state = state_lib.create_train_state(spec, jax.random.key(0), mesh=mesh)
    imgs = jax.random.randint(jax.random.key(5), (6, 8, *SHAPE), 0, 256).astype(jnp.uint8)
    batches = [parallel.shard_batch({"image": np.asarray(b)}, mesh) for b in imgs]
    return spec, state, batches, parallel.replicate(jax.random.key(1), mesh)


def _train(state, batches, key):
    for batch in batches:
        state, metrics = state_lib.train_step(state, batch, key)
    return state, metrics


@pytest.mark.slow  # two more training runs
def test_histogram_resumes_bit_exactly_and_is_the_same_on_one_and_four_devices(tmp_path):
    """6 adaptive, sigmoid-weighted steps straight through vs 3 steps, an orbax save and restore,
    3 more: every leaf of the state (the histogram included) bit-identical. On 1 device vs 4 the
    histogram agrees to float32 rounding of the reductions (measured max relative gap ~1e-7)."""
    mesh4 = parallel.make_mesh()
    spec, state, batches, key = _state_and_batches(mesh4)
    straight, metrics = _train(state, batches, key)
    assert int(straight.skipped_total) == 0
    hist = np.asarray(straight.loss_histogram)
    assert hist.shape == (2, 16) and np.all(hist[1] > 0) and np.ptp(hist[0]) > 0
    assert {"loss", "bpd", "weighted_diffusion_bpd"} <= set(metrics)
    assert float(metrics["weighted_diffusion_bpd"]) < float(metrics["diffusion_bpd"])

    _, state, _, _ = _state_and_batches(mesh4)
    half, _ = _train(state, batches[:3], key)
    manager = ckpt.make_manager(str(tmp_path), keep=2)
    ckpt.save(manager, 3, half)
    ckpt.close(manager)
    manager = ckpt.make_manager(str(tmp_path), keep=2)
    try:
        restored = ckpt.restore(manager, 3, state_lib.abstract_train_state(spec, mesh4))
    finally:
        ckpt.close(manager)
    resumed, _ = _train(restored, batches[3:], key)
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(straight), jax.tree.leaves(resumed), strict=True
    ):
        assert np.array_equal(np.asarray(a), np.asarray(b)), jax.tree_util.keystr(path)

    mesh1 = parallel.make_mesh(jax.devices()[:1])
    _, state1, batches1, key1 = _state_and_batches(mesh1)
    one, _ = _train(state1, batches1, key1)
    h1 = np.asarray(one.loss_histogram)
    gap = np.max(np.abs(h1 - hist) / np.abs(hist).clip(1e-6))
    print(f"histogram 1 vs 4 devices: max relative gap {gap:.2g}")
    np.testing.assert_array_equal(h1[1], hist[1])
    np.testing.assert_allclose(h1[0], hist[0], rtol=1e-5)
    assert os.listdir(tmp_path)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["model.weighting=focal"], r"model\.weighting='focal' is invalid: one of"),
        (["model.noise_sampling=importance"], r"model\.noise_sampling='importance'"),
        (["model.timesteps=10", "model.weighting=sigmoid"], r"set model\.timesteps=0"),
        (["model.timesteps=10", "model.noise_sampling=adaptive"], r"set model\.timesteps=0"),
        (["model.timesteps=10", "model.noise_sampling=band"], r"set model\.timesteps=0"),
        (["model.band_log_snr=(0.0, 0.0)"], r"model\.band_log_snr=\(0\.0, 0\.0\) is invalid"),
        (["model.band_fraction=1.0"], r"model\.band_fraction=1\.0 is invalid"),
        (
            ["model.noise_sampling=band", "model.band_log_snr=(20.0, 30.0)"],
            r"model\.band_log_snr=\(20\.0, 30\.0\) is invalid: must overlap",
        ),
        (["model.histogram_uniform_fraction=0.0"], r"histogram_uniform_fraction=0\.0"),
        (["model.histogram_decay=1.0"], r"model\.histogram_decay=1\.0"),
        (["model.weighting=elbo_sigmoid", "model.sigmoid_scale=0.0"], r"model\.sigmoid_scale=0\.0"),
        (["gamma.variance_gradient=score"], r"gamma\.variance_gradient='score' is invalid: one of"),
    ],
)
def test_objective_fields_are_validated_with_user_errors(overrides, match):
    from jvdm.errors import JvdmUserError

    config = config_lib.apply_overrides(config_lib.base_config(), overrides)
    with pytest.raises(JvdmUserError, match=match):
        config_lib.validate(config)


def test_fixed_schedule_experiments_are_learned_snr_with_another_schedule():
    root = os.path.join(os.path.dirname(__file__), "..", "experiments")
    learned = config_lib.load_config_file(os.path.join(root, "learned_snr.py"))
    for name, schedule in (("fixed_linear", "linear"), ("cosine", "cosine")):
        config = config_lib.validate(config_lib.load_config_file(os.path.join(root, f"{name}.py")))
        assert config.gamma.schedule == schedule
        config.gamma.schedule = learned.gamma.schedule
        assert config == learned, name
    band = config_lib.validate(config_lib.load_config_file(os.path.join(root, "band_draws.py")))
    assert band.model.noise_sampling == "band"
    band.model.noise_sampling = learned.model.noise_sampling
    assert band == learned  # the band's own fields are base_config's


def test_experiments_derive_their_objective_from_the_base_config():
    base = config_lib.base_config()
    root = os.path.join(os.path.dirname(__file__), "..", "experiments")
    for name, field, value in (
        ("sigmoid_weighting", "weighting", "sigmoid"),
        ("adaptive_elbo", "noise_sampling", "adaptive"),
    ):
        config = config_lib.validate(config_lib.load_config_file(os.path.join(root, f"{name}.py")))
        assert config.model[field] == value
        changed = {k for k in base.model if config.model[k] != base.model[k]}
        assert changed <= {field, "sigmoid_bias"}, changed
        assert config.train == base.train and config.data == base.data
