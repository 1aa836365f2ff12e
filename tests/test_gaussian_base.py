"""The Gaussian base: the Gaussian's three predictions against float64 closed forms, the module
that adds one to a network, and a training run that keeps the fit as a constant and saves it."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gaussian_models import gaussian_base_model
from jvdm import build, optimizer
from jvdm import config as config_lib
from jvdm import model as model_lib
from jvdm import reference_denoisers as ref
from jvdm import run as run_lib
from jvdm import train as train_lib
from jvdm.errors import JvdmUserError
from jvdm.nn.gaussian_base import COLLECTION, GaussianBase

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _alpha_sigma(gamma):
    a2 = 1.0 / (1.0 + np.exp(gamma))
    return np.sqrt(a2), np.sqrt(1.0 - a2)


def _data(rng, n=80, d=6):
    """Correlated data with one coordinate that never varies (a zero eigenvalue, like MNIST's
    corner pixels)."""
    m = rng.standard_normal((d, d))
    x = rng.standard_normal((n, d)) @ m / np.sqrt(d) + rng.standard_normal(d)
    x[:, 2] = 0.25
    return x


def _float64(x, z, gamma):
    """``(x_hat, eps_hat, v_hat)`` of N(mean, cov of x) by a float64 linear solve."""
    mu, cov = x.mean(0), np.cov(x, rowvar=False, bias=True)
    a, s = _alpha_sigma(gamma)
    d = len(mu)
    x_hat = mu + a * np.linalg.solve(a * a * cov + s * s * np.eye(d), (z - a * mu).T).T @ cov.T
    eps_hat = (z - a * x_hat) / s
    return {"x0": x_hat, "eps": eps_hat, "v": a * eps_hat - s * x_hat}


@pytest.mark.parametrize("gamma", [-13.3, -4.0, 0.0, 5.0])
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_gaussian_prediction_matches_float64(prediction, gamma):
    """Each parameterisation against float64, at the schedule's ends too: at gamma = -13.3
    (sigma = 1.1e-3) eps_hat = (z - alpha x_hat) / sigma, formed in float64, is what the float32
    formula must give without that division (including the noise of the constant coordinate)."""
    rng = np.random.default_rng(0)
    x = _data(rng)
    fit = ref.fit_gaussian(x)
    a, s = _alpha_sigma(gamma)
    z = a * x[:5] + s * rng.standard_normal((5, x.shape[1]))
    want = _float64(x, z, gamma)[prediction]
    got = np.asarray(ref.gaussian_prediction(z, gamma, fit, prediction), np.float64)
    # float32 rounding of z (|z| <= 4: 2.4e-7) seen through eps_hat's 1/sigma where the data does
    # not vary; elsewhere ~1e-6 of the output's scale.
    atol = 1e-5 * (1 + np.abs(want).max()) + (4 * 2.4e-7 / s if prediction != "x0" else 0)
    np.testing.assert_allclose(got, want, atol=atol)


def test_gaussian_prediction_takes_one_gamma_per_latent():
    rng = np.random.default_rng(1)
    fit = ref.fit_gaussian(_data(rng))
    z = rng.standard_normal((3, 6))
    gammas = np.array([-6.0, 0.5, 3.0], np.float32)
    got = np.asarray(ref.gaussian_prediction(z, gammas, fit, "v"))
    for i, g in enumerate(gammas):
        row = np.asarray(ref.gaussian_prediction(z[i : i + 1], g, fit, "v"))[0]
        np.testing.assert_allclose(got[i], row, rtol=1e-6, atol=1e-6)
    with pytest.raises(JvdmUserError, match=r"scalar or have shape \[3\]"):
        ref.gaussian_prediction(z, np.zeros(2), fit)
    with pytest.raises(JvdmUserError, match="expected 'eps', 'x0' or 'v'"):
        ref.gaussian_prediction(z, 0.0, fit, "score")


class _Conv(nn.Module):
    """A network with a non-zero output, to see that the base adds to it."""

    @nn.compact
    def __call__(self, z, gamma, *, train):
        del train
        return nn.Conv(z.shape[-1], (3, 3))(z) * gamma[:, None, None, None]


def _image_fit(rng, shape=(8, 8, 1), n=200):
    x = rng.uniform(-1, 1, size=(n, int(np.prod(shape))))
    x[:, :5] = -1.0  # a border that never varies
    return ref.fit_gaussian(x)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_module_adds_the_weighted_gaussian_prediction_to_the_network(prediction):
    """net + sigmoid(c - log SNR) x the Gaussian's prediction, at c = -2."""
    rng = np.random.default_rng(2)
    fit = _image_fit(rng)
    module = GaussianBase(net=_Conv(), prediction=prediction, log_snr_center=-2.0)
    z = jnp.asarray(rng.standard_normal((4, 8, 8, 1)), jnp.float32)
    gamma = jnp.array([-10.0, -2.0, 1.0, 4.0])
    variables = module.init(jax.random.key(0), z, gamma, train=False)
    variables = {**variables, COLLECTION: fit._asdict()}
    got = module.apply(variables, z, gamma, train=False)
    net = _Conv().apply({"params": variables["params"]["net"]}, z, gamma, train=False)
    base = ref.gaussian_prediction(z.reshape(4, -1), gamma, fit, prediction).reshape(z.shape)
    weight = 1.0 / (1.0 + np.exp(2.0 - np.asarray(gamma)))  # sigmoid(-2 + gamma)
    assert float(jnp.max(jnp.abs(net))) > 0.1
    want = net + weight[:, None, None, None] * base
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def _image_mixture(rng, n=300, dim=64):
    x = rng.uniform(-1, 1, size=(n, dim))
    x[: n // 2, : dim // 2] = -1.0  # two kinds of image: half with a blank top
    return ref.fit_mixture(x, 3, 2)


@pytest.mark.parametrize("kind", ["full", "mixture"])
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_an_untrained_model_is_the_gaussian_denoiser_and_its_fit_gets_no_gradient(prediction, kind):
    """The U-Net's last layer starts at zero, so the model starts as the fit's denoiser where the
    base has its whole weight (here everywhere: c = 40); the bound's gradient reaches the network
    but not the fit. For one full Gaussian and for a mixture of 3 components of rank 2."""
    rng = np.random.default_rng(3)
    fit = _image_fit(rng) if kind == "full" else _image_mixture(rng)
    sizes = {} if kind == "full" else {"components": 3, "rank": 2}
    whole = model_lib.init(
        gaussian_base_model(prediction, center=40.0, **sizes), jax.random.key(0), gaussian_fit=fit
    )
    z = jnp.asarray(rng.standard_normal((4, 8, 8, 1)), jnp.float32)
    gamma = jnp.array([-12.0, -3.0, 0.0, 4.0])
    eps_hat, x0_hat = model_lib.predict_eps_x0(whole, z, gamma)
    want = ref.gaussian_prediction(z.reshape(4, -1), gamma, fit, "x0")
    np.testing.assert_allclose(np.asarray(x0_hat).reshape(4, -1), np.asarray(want), atol=2e-5)

    params = model_lib.init(
        gaussian_base_model(prediction, **sizes), jax.random.key(0), gaussian_fit=fit
    )
    for name, value in fit._asdict().items():
        np.testing.assert_array_equal(np.asarray(params.denoiser[COLLECTION][name]), value)

    images = jnp.asarray(rng.integers(0, 256, size=(4, 8, 8, 1)), jnp.uint8)

    def loss(den):
        terms = model_lib.loss_terms(params.replace(denoiser=den), images, jax.random.key(1))
        return jnp.mean(terms["bpd"])

    grads = jax.grad(loss)(params.denoiser)
    assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(grads[COLLECTION]))
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads["params"])) > 0.0
    decay = optimizer.weight_decay_mask(params)
    assert not any(jax.tree.leaves(decay.denoiser[COLLECTION]))
    assert any(jax.tree.leaves(decay.denoiser["params"]))


def test_init_without_a_fit_is_the_standard_normal_and_bad_fits_are_refused():
    model = gaussian_base_model("v")
    params = model_lib.init(model, jax.random.key(0))
    base = params.denoiser[COLLECTION]
    np.testing.assert_array_equal(np.asarray(base["mean"]), 0.0)
    np.testing.assert_array_equal(np.asarray(base["values"]), 1.0)
    np.testing.assert_array_equal(np.asarray(base["vectors"]), np.eye(64))
    other = ref.fit_gaussian(np.random.default_rng(4).standard_normal((20, 49)))
    with pytest.raises(JvdmUserError, match=r"mean has shape \(49,\).*\(8, 8, 1\)"):
        model_lib.with_gaussian_fit(params, other)
    plain = model_lib.VDM(
        denoiser=model.denoiser.net, schedule=model.schedule, image_shape=(8, 8, 1)
    )
    with pytest.raises(JvdmUserError, match="no Gaussian base"):
        model_lib.with_gaussian_fit(model_lib.init(plain, jax.random.key(0)), other)
    with pytest.raises(JvdmUserError, match="model.gaussian_base=False"):
        model_lib.init(gaussian_base_model("v", shape=(40, 40, 3)), jax.random.key(0))


@pytest.mark.parametrize("components,rank", [(1, 0), (4, 8)])
def test_training_keeps_the_fit_of_the_training_split_and_saves_it(tmp_path, components, rank):
    """A run with model.gaussian_base fits data.train_split (one Gaussian, or a mixture of 4
    components of rank 8), trains the network only (the fit in the parameters and in their EMA
    stays bit for bit what was fitted), and its checkpoint gives the fit back to
    jvdm.run.load."""
    config = config_lib.load_config_file(os.path.join(REPO, "experiments", "tiny.py"))
    config = config_lib.apply_overrides(
        config,
        [
            "model.gaussian_base=True",
            f"model.gaussian_base_components={components}",
            f"model.gaussian_base_rank={rank}",
            "model.channel_mult=(1,)",
            "model.attention_resolutions=()",
            "train.use_final_eval=False",
            "train.eval_every=1000",
        ],
    )
    workdir = str(tmp_path / "run")
    train_lib.train_and_evaluate(config, workdir)
    d = config.data
    fit = ref.fit_split(d.name, d.train_split, d.data_dir, 256, components, rank)
    want = {k: np.asarray(v) for k, v in fit._asdict().items()}
    start = build.init_params(config, train_lib.run_keys(0)[0])
    for raw in (True, False):
        params, _ = run_lib.load_with_config(workdir, raw=raw)
        assert model_lib.has_gaussian_base(params)
        for name, value in want.items():
            np.testing.assert_array_equal(np.asarray(params.denoiser[COLLECTION][name]), value)
        moved = jax.tree.map(
            lambda a, b: float(jnp.max(jnp.abs(a - b))),
            params.denoiser["params"],
            start.denoiser["params"],
        )
        assert max(jax.tree.leaves(moved)) > 0.0


def test_the_base_weight_must_be_finite():
    config = config_lib.load_config_file(os.path.join(REPO, "experiments", "tiny.py"))
    config.model.gaussian_base_log_snr = float("nan")
    with pytest.raises(JvdmUserError, match=r"config.model.gaussian_base_log_snr=nan.*finite"):
        config_lib.validate(config)
