"""Likelihood evaluation against closed forms, a whole split, and loading a trained run.

For the Gaussian denoiser ``eps_hat = sigma (z - alpha m) / (alpha^2 s^2 + sigma^2)`` -- linear in
``z`` -- the expected squared error ``E||eps - eps_hat||^2`` depends on the data only through their
mean and variance. So on *any* batch of uint8 images, with ``m`` and ``s^2`` set to the batch's
empirical mean and (pooled, ddof=0) variance in model space, the batch mean of the expected
diffusion term is exactly
``D/2 log((1 + s^2 SNR(0)) / (1 + s^2 SNR(1)))`` nats in continuous time (VDM eq. 17 integrated;
it depends on the schedule only through its end points), and
``sum_i 0.5 D (SNR(s_i) - SNR(t_i)) s^2 / (1 + s^2 SNR(t_i))`` with ``T`` discrete steps (VDM
eq. 13 with the posterior variance ``s^2 / (1 + s^2 SNR)``). The Monte Carlo estimate must match
within 4 standard errors.
"""

import dataclasses
import json
import math
import os
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gaussian_models import GaussianDenoiser, perturbed_learned
from jvdm import build, evaluate, run_config
from jvdm import checkpoint as ckpt
from jvdm import config as config_lib
from jvdm import model as model_lib
from jvdm import run as run_lib
from jvdm.nn import gamma as gamma_lib

SHAPE = (4, 4, 1)
D = int(np.prod(SHAPE))
G_MIN, G_MAX = -10.0, 6.0


def _images(key, n, shape=SHAPE):
    x = 0.3 + 0.5 * jax.random.normal(key, (n, *shape))
    return np.asarray(jnp.clip(jnp.round((x + 1.0) * 128.0 - 0.5), 0, 255), np.uint8)


def _moments(images):
    x = 2.0 * (images.astype(np.float64) + 0.5) / 256.0 - 1.0  # scale_pixels, in float64
    m = x.mean()
    return m, np.mean((x - m) ** 2)


def _params(images, schedule_kind="linear", *, shape=SHAPE, timesteps=0):
    m, s2 = _moments(images)
    if schedule_kind == "linear":
        sched, sched_params = gamma_lib.FixedLinearGamma(gamma_min=G_MIN, gamma_max=G_MAX), None
    else:
        sched, sched_params = perturbed_learned(jax.random.key(3), gamma_min=G_MIN, gamma_max=G_MAX)
    model = model_lib.VDM(
        denoiser=GaussianDenoiser(m=float(m), s=float(math.sqrt(s2))),
        schedule=sched,
        image_shape=shape,
        timesteps=timesteps,
    )
    params = model_lib.init(model, jax.random.key(0))
    return params if sched_params is None else params.replace(schedule=sched_params)


def _assert_within_4_se(per_image, expected):
    per_image = np.asarray(per_image, np.float64)
    se = per_image.std(ddof=1) / math.sqrt(per_image.size)
    assert abs(per_image.mean() - expected) < 4 * se, (per_image.mean(), expected, se)


def _bpd_signature(params, images, key, *, timesteps, draws):
    return images.shape, timesteps, draws, params.model


def test_continuous_diffusion_bpd_matches_the_closed_form(key, count_traces):
    # A learned schedule with a randomly perturbed interior: only its end points matter.
    images = _images(jax.random.key(1), 512)
    params = _params(images, "learned")
    _, s2 = _moments(images)
    nats = 0.5 * D * np.log((1 + s2 * np.exp(-G_MIN)) / (1 + s2 * np.exp(-G_MAX)))
    traces = count_traces(evaluate, "_bpd_draws", _bpd_signature)
    out = evaluate.bpd(params, images, key, draws=2)
    # Deterministic by key, different for another key, and compiled once.
    again = evaluate.bpd(params, images, key, draws=2)
    other = evaluate.bpd(params, images, jax.random.key(9), draws=2)
    np.testing.assert_array_equal(out["bpd"], again["bpd"])
    assert not np.array_equal(out["bpd"], other["bpd"])
    new = dict(traces)
    assert list(new.values()) == [1], new
    assert set(out) == {"bpd", "recon_bpd", "prior_bpd", "diffusion_bpd", "bpd_sem_per_image"}
    assert all(v.shape == (512,) for v in out.values())
    _assert_within_4_se(out["diffusion_bpd"], nats / (D * math.log(2)))
    np.testing.assert_allclose(
        out["bpd"], out["recon_bpd"] + out["prior_bpd"] + out["diffusion_bpd"], rtol=1e-5
    )
    # The prior term is deterministic: KL(N(alpha_1 x, sigma_1^2) || N(0, 1)) summed, in float64.
    x = 2.0 * (images.astype(np.float64) + 0.5) / 256.0 - 1.0
    ab = 1.0 / (1.0 + np.exp(G_MAX))
    prior = 0.5 * np.sum(ab * x**2 - ab - np.log1p(-ab), axis=(1, 2, 3)) / (D * math.log(2))
    np.testing.assert_allclose(out["prior_bpd"], prior, rtol=1e-4)


def test_discrete_diffusion_bpd_matches_the_closed_form(key):
    T = 10
    images = _images(jax.random.key(2), 512)
    params = _params(images, "linear")
    _, s2 = _moments(images)
    g = G_MIN + (G_MAX - G_MIN) * np.arange(T + 1) / T
    snr = np.exp(-g)
    nats = np.sum(0.5 * D * (snr[:-1] - snr[1:]) * s2 / (1 + s2 * snr[1:]))
    out = evaluate.bpd(params, images, key, steps=T, draws=4)
    _assert_within_4_se(out["diffusion_bpd"], nats / (D * math.log(2)))


@pytest.mark.parametrize(
    "images,match",
    [
        (np.zeros((2, 4, 4, 3), np.uint8), r"shape \(2, 4, 4, 3\); expected uint8 \[B, 4, 4, 1\]"),
        (np.zeros((4, 4, 1), np.uint8), r"expected uint8 \[B, 4, 4, 1\]"),
        (np.zeros((2, 4, 4, 1), np.float32), "dtype float32; expected uint8"),
        (np.zeros((2, 4, 4, 1), np.int32), "dtype int32; expected uint8"),
        ([[0]], "must be an array"),
    ],
)
def test_bpd_rejects_bad_images(images, match, key):
    params = _params(_images(key, 4))
    with pytest.raises(ValueError, match=match):
        evaluate.bpd(params, images, key)


@pytest.mark.parametrize(
    "kwargs,match",
    [(dict(steps=0), "steps=0; expected a positive"), (dict(draws=0), "draws=0; expected")],
)
def test_bpd_rejects_bad_arguments(kwargs, match, key):
    images = _images(key, 4)
    with pytest.raises(ValueError, match=match):
        evaluate.bpd(_params(images), images, key, **kwargs)


def test_evaluate_split_covers_every_image_once(key, count_traces):
    from jvdm import data as data_lib

    images = data_lib.load_split_array("digits", "test")
    n = images.shape[0]
    params = _params(images, shape=(8, 8, 1))
    traces = count_traces(evaluate, "_bpd_draws", _bpd_signature)
    result = evaluate.evaluate_split(
        params, dataset="digits", split="test", key=key, batch_size=126, draws=1
    )
    assert result["num_images"] == n == 297 and result["draws"] == 1
    new = list(traces)
    # One program for all 3 batches of 126, padded to 128 = a multiple of the 4 test devices.
    assert len(new) == 1 and new[0][0] == (128, 8, 8, 1)
    # The same numbers by hand: padded batches, key fold_in(key, b), padding masked out.
    per_image = []
    for b in range(math.ceil(n / 126)):
        batch = np.zeros((128, 8, 8, 1), np.uint8)
        rows = images[b * 126 : (b + 1) * 126]
        batch[: len(rows)] = rows
        out = evaluate.bpd(params, batch, jax.random.fold_in(key, b))
        per_image.append(np.asarray(out["bpd"])[: len(rows)])
    per_image = np.concatenate(per_image).astype(np.float64)
    np.testing.assert_allclose(result["bpd_mean"], per_image.mean(), rtol=1e-5)
    np.testing.assert_allclose(result["bpd_sem"], per_image.std(ddof=1) / math.sqrt(n), rtol=1e-4)
    total = result["recon_bpd"] + result["prior_bpd"] + result["diffusion_bpd"]
    np.testing.assert_allclose(total, result["bpd_mean"], rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# Loading a run written in the trainer's layout.


def _tiny_config():
    config = config_lib.load_config_file(
        os.path.join(os.path.dirname(__file__), "..", "experiments", "tiny.py")
    )
    return config_lib.apply_overrides(config, ["data.name=digits"])


def write_run(workdir, steps=(2, 4)):
    """A work directory as ``jvdm.train`` leaves it: config.json and orbax checkpoints of a
    TrainState (random values, built without compiling anything). Returns {step: state}."""
    from jvdm import parallel
    from jvdm import train as train_lib
    from jvdm import train_state as state_lib

    config = _tiny_config()
    abstract = state_lib.abstract_train_state(train_lib.state_spec(config), parallel.make_mesh())
    run_config.save_config(config, workdir)
    manager = ckpt.make_manager(workdir, keep=5)
    states = {}
    ends = {"gamma_min": config.gamma.gamma_min, "gamma_max": config.gamma.gamma_max}
    for step in steps:
        rng = np.random.default_rng(step)

        def leaf(path, a, rng=rng):
            # Small random weights; the schedule's end points near the config's (a usable model).
            name = getattr(path[-1], "key", None)
            value = 0.1 * rng.standard_normal(a.shape) + ends.get(name, 0.0)
            return jnp.asarray(value.astype(a.dtype))

        state = jax.tree_util.tree_map_with_path(leaf, abstract)
        ckpt.save(manager, step, state)
        states[step] = state
    ckpt.close(manager)
    return states


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    return workdir, write_run(str(workdir))


def test_load_restores_the_latest_ema_parameters(run_dir):
    workdir, states = run_dir
    params = run_lib.load(workdir)
    assert isinstance(params, model_lib.VDMParams)
    assert params.model == build.from_config(_tiny_config())
    jax.tree.map(np.testing.assert_array_equal, params, states[4].ema_params)
    # One checkpoint directory: that step.
    older = run_lib.load(workdir / "checkpoints" / "2")
    jax.tree.map(np.testing.assert_array_equal, older, states[2].ema_params)


def test_load_with_config_gives_the_raw_parameters_on_request(run_dir):
    """``raw=True``: the same checkpoint's raw parameters (which differ from their EMA here)."""
    workdir, states = run_dir
    params, config = run_lib.load_with_config(workdir, raw=True)
    assert params.model == build.from_config(config)
    jax.tree.map(np.testing.assert_array_equal, params, states[4].params)
    ema, _ = run_lib.load_with_config(workdir / "checkpoints" / "2")
    jax.tree.map(np.testing.assert_array_equal, ema, states[2].ema_params)


def test_checkpoint_steps_and_the_saved_loss_histogram(run_dir, tmp_path):
    workdir, states = run_dir
    assert run_lib.checkpoint_steps(workdir) == sorted(states)
    assert run_lib.checkpoint_steps(tmp_path) == []
    for step, state in states.items():
        saved = run_lib.load_loss_histogram(workdir / "checkpoints" / str(step))
        np.testing.assert_array_equal(saved, state.loss_histogram)
    latest = run_lib.load_loss_histogram(workdir)
    np.testing.assert_array_equal(latest, states[max(states)].loss_histogram)


def test_load_needs_neither_grain_nor_tfds(run_dir):
    # A fresh interpreter: this one has imported the loaders already.
    workdir, _ = run_dir
    code = (
        "import sys, jvdm; params = jvdm.load(sys.argv[1]); "
        "print(type(params).__name__, sorted(m for m in ('grain', 'tensorflow_datasets', "
        "'tensorflow', 'jvdm.data', 'jvdm.train') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(workdir)], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["VDMParams", "[]"], out.stdout


def test_load_reports_what_it_looked_for(tmp_path):
    with pytest.raises(FileNotFoundError, match="no run directory or checkpoint at"):
        run_lib.load(tmp_path / "missing")
    with pytest.raises(
        FileNotFoundError, match=r"looked for step directories .*checkpoints/<step>"
    ):
        run_lib.load(tmp_path)
    (tmp_path / "checkpoints" / "7").mkdir(parents=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the missing config is the one thing said, no warning
        with pytest.raises(FileNotFoundError, match="no saved config"):
            run_lib.load(tmp_path)


# ------------------------------------------------------------------------------------------------
# Pictures.


def test_image_grids_are_written_atomically(tmp_path):
    from PIL import Image

    from jvdm import viz

    gray = np.arange(5 * 4 * 3, dtype=np.uint8).reshape(5, 4, 3, 1)
    rgb = np.full((2, 3, 3, 3), 200, np.uint8)
    viz.save_image_grid(gray, tmp_path / "gray.png")
    viz.save_image_grid(rgb, tmp_path / "sub" / "rgb.png")
    with Image.open(tmp_path / "gray.png") as g, Image.open(tmp_path / "sub" / "rgb.png") as c:
        assert g.mode == "L" and g.size == (3 * 5 + 2, 2 * 6 + 2)  # 3 columns, 2 rows, pad 2
        assert c.mode == "RGB" and c.size == (2 * 5 + 2, 5 + 2)
        np.testing.assert_array_equal(np.asarray(g)[2:6, 2:5], gray[0, ..., 0])
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["gray.png", "rgb.png"]
    with pytest.raises(ValueError, match="expected uint8"):
        viz.save_image_grid(gray.astype(np.float32), tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_plots(tmp_path, key):
    from jvdm import viz

    params = _params(_images(key, 4), "learned")
    viz.plot_gamma(params, tmp_path / "gamma.png")
    metrics = tmp_path / "metrics.jsonl"
    records = [
        {"step": 10, "train/bpd": 5.0, "train/diffusion_bpd": 3.0},
        {"step": 20, "train/bpd": 4.0, "eval/bpd_mean": 4.2, "eval/bpd_sem": 0.1},
    ]
    metrics.write_text("\n".join(map(json.dumps, records)) + '\n{"step": 30, "train/b')
    assert set(viz._read_metrics(metrics)) == {"train/bpd", "eval/bpd_mean"}
    viz.plot_metrics(metrics, tmp_path / "bpd.png")
    for name in ("gamma.png", "bpd.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_trainers_samples_take_a_gaussian_start_from_the_training_split(tmp_path, monkeypatch):
    """``eval.sample_gaussian_steps``: evaluate_and_save's samples start from the Gaussian of the
    training split (not the eval split) and differ from the model's own chain."""
    from jvdm import reference_denoisers as ref
    from jvdm import train_log

    state = write_run(str(tmp_path), steps=(1,))[1]
    spec = train_log.EvalSpec(
        dataset="digits",
        split="test",
        data_dir=None,
        batch_size=100,
        num_samples=8,
        sample_steps=4,
        sampler="ancestral",
        use_quality=False,
        train_split="train",
    )
    fitted, real_fit = [], ref.fit_split
    monkeypatch.setattr(
        ref, "fit_split", lambda *a, **kw: fitted.append((a, kw)) or real_fit(*a, **kw)
    )
    key = jax.random.key(0)
    out = {}
    for k, comps, rank in ((0, 1, 0), (3, 1, 0), (3, 2, 3)):
        workdir = tmp_path / f"k{k}_{comps}"
        workdir.mkdir()
        spec_k = dataclasses.replace(
            spec, gaussian_steps=k, gaussian_components=comps, gaussian_rank=rank
        )
        result = train_log.evaluate_and_save(spec_k, state, str(workdir), 1, draws=1, key=key)
        out[k, comps] = result
    # Only for k > 0, of the training split, with the spec's components and rank.
    args = ("digits", "train", None, 256)
    assert fitted == [(args, dict(components=1, rank=0)), (args, dict(components=2, rank=3))]
    # Same evaluation of the bound, different samples.
    assert out[3, 1]["bpd_mean"] == out[0, 1]["bpd_mean"] == out[3, 2]["bpd_mean"]
    assert len({out[key]["samples_bpd"] for key in out}) == 3
