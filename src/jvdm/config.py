"""The experiment configuration: one locked ``ml_collections.ConfigDict`` with nested sections.

Every experiment in ``experiments/`` starts from :func:`base_config` and overrides a few fields;
none copies it. The config is locked, so a typo (``config.optimizer.lrr = 1``) or a value of the
wrong type is an error at once, and :func:`validate` (:mod:`jvdm.config_checks`) checks the values
once, naming the bad field.

Sections: ``data``, ``model`` (the denoiser), ``gamma`` (the noise schedule), ``optimizer``,
``train`` and ``eval``. Only the entry points (``cli``, ``train``) and ``build.from_config`` read
it; everything below them takes explicit keyword arguments.
"""

from __future__ import annotations

import ast
import importlib.util
import pathlib
from collections.abc import Sequence
from typing import Any

import ml_collections
from ml_collections import config_dict

from jvdm.config_checks import SCHEDULES, WEIGHTINGS, validate
from jvdm.errors import JvdmUserError

__all__ = [
    "SCHEDULES",
    "WEIGHTINGS",
    "apply_overrides",
    "base_config",
    "from_dict",
    "load_config_file",
    "validate",
]


def _model_section() -> ml_collections.ConfigDict:
    """``config.model``: the denoiser and the training objective."""
    m = ml_collections.ConfigDict()
    m.channels = 32
    m.channel_mult = (1, 2, 2)
    m.num_res_blocks = 1
    m.attention_resolutions = (7,)
    m.num_heads = 1
    m.num_groups = 8
    m.dropout = 0.0
    m.use_fourier_features = True
    # sin/cos(2^n pi z) for n in [fourier_min, fourier_max) beside z. VDM's 6..7 repeat every 4
    # pixel bins, so a background lifted by 4 or 8 bins looked to the network like a clean one and
    # the sampler never pulled it back (issue 17, bench/RESULTS.md); from n = 0 no two pixel values
    # share their features: on the validation slice, 1.136 bpd against 1.212 at 3,600 steps, and
    # 80% exactly-zero pixels in samples (real digits: 81%) against 44%. Runs saved before these
    # fields existed used 6, 8 (jvdm.run.LEGACY_FIELDS).
    m.fourier_min = 0
    m.fourier_max = 8
    # v = alpha eps - sigma x (Salimans & Ho 2022): on the validation slice 1.212 bpd against eps's
    # 1.229 at 3,600 steps, and cleaner samples (bench/RESULTS.md, issue 17). The bound is the
    # same function of the network's output whatever it predicts.
    m.prediction = "v"
    # Add the training images' best linear denoiser (a Gaussian fitted to data.train_split) to the
    # network's output at high noise, weighted by sigmoid(gaussian_base_log_snr - log SNR), so the
    # network learns the residual there (jvdm.nn.gaussian_base). The fit is saved with the
    # parameters; for images of at most 4,096 values (32x32x3). A higher centre trades bound for
    # samples (validation slice, seed 0, issue 17): -4, -2, 0, 2 gave 1.122, 1.125, 1.132, 1.140
    # bpd and FD 54, 49, 43, 41 (without the base: 1.131, FD 65).
    m.gaussian_base = False
    m.gaussian_base_log_snr = 0.0
    # The base's fit: one Gaussian of full covariance (components 1, rank 0: D x D values, for
    # images of at most 4,096 values), or a mixture of `components` probabilistic PCA Gaussians
    # of rank `rank` fitted by k-means (jvdm.reference_denoisers.fit_mixture: K D (r + 1) values).
    m.gaussian_base_components = 1
    m.gaussian_base_rank = 0
    # 0 means continuous time (VDM eq. 17); T > 0 gives the discrete-time bound with T steps.
    m.timesteps = 0
    m.use_antithetic_time = True
    m.dtype = "float32"  # compute dtype of the denoiser; parameters stay float32
    m.use_remat = False
    # The training loss's weighting w(lambda) of noise levels (VDM++; jvdm.weighting): "elbo" is
    # the bound itself. Evaluation always reports the ELBO.
    m.weighting = "elbo"
    m.sigmoid_bias = 2.0  # b of the "sigmoid" weighting, w = sigmoid(b - lambda)
    m.sigmoid_scale = 1.0  # c of "elbo_sigmoid", w = 1 + c sigmoid(b - lambda)
    # "uniform_t": t ~ U(0, 1) (stratified), gamma = gamma(t). "adaptive": gamma drawn from an EMA
    # histogram of the loss over lambda, importance-weighted (jvdm.noise_sampling). "band": a share
    # band_fraction of the draws uniform in log SNR within band_log_snr, the rest uniform between
    # the end points, importance-weighted (the same objective; more training draws where a
    # sample's shape is decided, bench/RESULTS.md, issue 17).
    m.noise_sampling = "uniform_t"
    m.histogram_bins = 100
    m.histogram_decay = 0.99
    m.histogram_uniform_fraction = 0.1
    m.band_log_snr = (-4.0, 0.0)
    m.band_fraction = 0.4
    return m


def base_config() -> ml_collections.ConfigDict:
    """The defaults shared by every experiment (a small VDM on ``mnist_subset``)."""
    c = ml_collections.ConfigDict()

    c.data = ml_collections.ConfigDict()
    c.data.name = "mnist_subset"
    c.data.train_split = "train"
    c.data.eval_split = "test"
    c.data.data_dir = config_dict.placeholder(str)
    c.data.random_flip = False

    c.model = _model_section()
    c.gamma = ml_collections.ConfigDict()
    c.gamma.schedule = "learned"
    c.gamma.gamma_min = -13.3
    c.gamma.gamma_max = 5.0
    c.gamma.hidden = 1024
    # Train the schedule's interior on the variance of the loss (VDM appendix I.2).
    c.gamma.use_variance_gradient = True
    # Its estimator: "density" (through the density of the noise level, no derivative of the
    # denoiser: the quiet one, see jvdm.objective) or "pathwise" (VDM's, through the loss itself).
    c.gamma.variance_gradient = "density"
    # Learning-rate multipliers of the learned schedule's end points (gamma_min, gamma_max: they
    # set the bound) and of its interior (its shape: trained on the variance; 0 freezes it).
    c.gamma.endpoint_lr_scale = 1.0
    c.gamma.interior_lr_scale = 1.0
    c.gamma.ddpm_timesteps = 1000

    _add_training_sections(c)
    c.lock()
    return c


def _add_training_sections(c: ml_collections.ConfigDict) -> None:
    """The ``optimizer``, ``train`` and ``eval`` sections of :func:`base_config`."""
    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.learning_rate = 4e-3
    c.optimizer.warmup_steps = 100
    c.optimizer.decay = "cosine"  # "cosine" or "constant" after warm-up
    c.optimizer.final_lr_fraction = 0.05
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.99
    c.optimizer.eps = 1e-8
    c.optimizer.weight_decay = 0.01
    c.optimizer.grad_clip = 1.0
    c.optimizer.ema_decay = 0.999

    c.train = ml_collections.ConfigDict()
    c.train.seed = 0
    # 1,800 steps of 16 images (28,800 images, about 9 minutes of training on the slower of our
    # 2-core CPUs), chosen with the learning rate, the prediction and the Fourier features on the
    # validation slice train[:4000] / train[4000:] (bench/RESULTS.md, issue 17): 1.172 bpd there,
    # against 1.136 for twice the steps.
    c.train.batch_size = 16
    # Micro-batches per step: gradients of batch_size / k images at a time, summed, one update.
    c.train.grad_accum_steps = 1
    c.train.steps = 1800
    # Seconds of training steps (0: off). With a budget the run times its own step first and trains
    # for as many steps as fit, a multiple of 100 and at most train.steps (jvdm.time_budget).
    c.train.time_budget_s = 0.0
    c.train.log_every = 50
    c.train.eval_every = 1800
    c.train.checkpoint_every = 500
    c.train.keep_checkpoints = 3
    c.train.max_consecutive_nonfinite = 10
    # Evaluate the whole eval split (eval.final_draws draws per image), sample and plot at the end.
    c.train.use_final_eval = True
    # The per-example variance of the diffusion-loss estimate under the model's schedule, the
    # linear and cosine ones, the adaptive histogram and the optimal density (jvdm.loss_variance),
    # every variance_every steps and at the end (0: never), on the first variance_images images of
    # the training split (the same ones all run), variance_grid noise levels each: the cost is
    # variance_images * variance_grid forward passes (2,048 here, three times a run: about 1/14 of
    # the training's).
    c.train.variance_every = 600
    c.train.variance_images = 32
    c.train.variance_grid = 64

    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 250
    c.eval.draws = 1
    c.eval.num_samples = 64
    c.eval.sampler = "ancestral"
    c.eval.sample_steps = 250
    # "lambda" (uniform in lambda = -gamma/2), "karras" (uniform in (sigma/alpha)^(1/7)) or
    # "time" (uniform in t); unset: the sampler's default (jvdm.sampling.default_grid): "karras"
    # for ancestral sampling, "time" for that of a discrete-time model, "lambda" for the others.
    c.eval.sample_grid = config_dict.placeholder(str)
    # The first k of the sample_steps steps take x0_hat from the Gaussian fitted to the training
    # split, its best linear denoiser (jvdm.sample's gaussian_steps; 0: the model throughout).
    c.eval.sample_gaussian_steps = 0
    # ... or from a mixture of this many PPCA Gaussians of this rank (jvdm.fit_mixture; 1 and 0:
    # one Gaussian of full covariance).
    c.eval.sample_gaussian_components = 1
    c.eval.sample_gaussian_rank = 0
    c.eval.final_draws = 4
    # Score each evaluation's samples in a dataset classifier's features (jvdm.quality; the
    # classifier is trained once per dataset and cached in the data directory).
    c.eval.use_quality = True


def load_config_file(path: str | pathlib.Path, arg: str | None = None) -> ml_collections.ConfigDict:
    """Loads ``get_config()`` from an experiment file such as ``experiments/learned_snr.py``."""
    path = pathlib.Path(path)
    if not path.is_file():
        known = sorted(p.stem for p in path.parent.glob("*.py")) if path.parent.is_dir() else []
        hint = f" Known experiments in {path.parent}: {', '.join(known)}." if known else ""
        raise JvdmUserError(f"no experiment config at {str(path)!r}.{hint}")
    spec = importlib.util.spec_from_file_location(f"jvdm_experiment_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise JvdmUserError(f"{path} defines no get_config()")
    config = module.get_config() if arg is None else module.get_config(arg)
    if not isinstance(config, ml_collections.ConfigDict):
        raise JvdmUserError(f"{path}: get_config() must return an ml_collections.ConfigDict")
    config.lock()
    return config


def _sections(node: ml_collections.ConfigDict) -> list[str]:
    return sorted(k for k, v in node.items() if isinstance(v, ml_collections.ConfigDict))


def apply_overrides(
    config: ml_collections.ConfigDict, overrides: Sequence[str]
) -> ml_collections.ConfigDict:
    """Applies ``section.field=value`` overrides (a leading ``--config.`` is allowed).

    Values are parsed as Python literals where possible (``3``, ``1e-3``, ``(1, 2)``, ``None``,
    ``True``) and as plain strings otherwise. An unknown field or a value of the wrong type is a
    ``ValueError`` that names the field.
    """
    for item in overrides:
        text = item.removeprefix("--").removeprefix("config.")
        if "=" not in text:
            raise JvdmUserError(f"malformed override {item!r}: expected section.field=value")
        dotted, raw = text.split("=", 1)
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        *parents, leaf = dotted.split(".")
        node = config
        for i, part in enumerate(parents):
            if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
                raise JvdmUserError(
                    f"unknown config section {'.'.join(parents[: i + 1])!r} in override {item!r}; "
                    f"sections: {_sections(node)}"
                )
            node = node[part]
        if leaf not in node or isinstance(node[leaf], ml_collections.ConfigDict):
            raise JvdmUserError(
                f"unknown config field {dotted!r} in override {item!r}; "
                f"fields here: {sorted(node.keys())}"
            )
        try:
            node[leaf] = _coerce(node[leaf], value)
        except (TypeError, AttributeError) as err:
            raise JvdmUserError(f"bad value in override {item!r}: {err}") from None
    return config


def _coerce(current: Any, value: Any) -> Any:
    """``value`` in the type of the field's ``current`` value where the source format cannot
    say it: JSON and the command line have no tuples (``[1, 2]``, or ``2`` for ``(2,)``), and
    ``1`` for a float field means ``1.0``."""
    if isinstance(current, tuple) and isinstance(value, list | int) and not isinstance(value, bool):
        return tuple(value) if isinstance(value, list) else (value,)
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def from_dict(saved: dict[str, Any]) -> ml_collections.ConfigDict:
    """A config as saved (``config.json``, nested JSON) decoded onto :func:`base_config`.

    Raises:
      JvdmUserError: a saved field is unknown to this version of jvdm, or does not fit its type.
    """
    config = base_config()
    _update(config, saved, prefix="")
    return config


def _update(node: ml_collections.ConfigDict, saved: dict[str, Any], *, prefix: str) -> None:
    for k, v in saved.items():
        name = f"{prefix}{k}"
        if k not in node:
            raise JvdmUserError(f"saved config field {name!r} is unknown to this version of jvdm")
        if isinstance(node[k], ml_collections.ConfigDict):
            if not isinstance(v, dict):
                raise JvdmUserError(f"saved config field {name!r} should be a section, got {v!r}")
            _update(node[k], v, prefix=f"{name}.")
            continue
        try:
            node[k] = _coerce(node[k], v)
        except (TypeError, AttributeError, KeyError) as err:
            raise JvdmUserError(f"saved config field {name!r}={v!r} does not fit: {err}") from None
