"""Checks of an experiment config's values: :func:`validate` names the first bad field in one line.

:mod:`jvdm.config` holds the defaults and how configs are read; this module holds what a valid
config is. Checks shared with code that takes no config (sampler names, the order of the
schedule's end points) live in :mod:`jvdm.validate`.
"""

from __future__ import annotations

import math

import ml_collections

from jvdm import validate as checks
from jvdm.errors import JvdmUserError
from jvdm.validate import NOISE_SAMPLINGS, PREDICTIONS, VARIANCE_GRADIENTS, WEIGHTINGS

__all__ = ["SCHEDULES", "WEIGHTINGS", "validate"]

SCHEDULES = ("learned", "linear", "cosine", "ddpm")


def _need_fit(need, prefix: str, components: int, rank: int) -> None:
    """``{prefix}_components`` and ``{prefix}_rank``: one Gaussian of full covariance (1 and 0)
    or a mixture of rank >= 1 (:func:`jvdm.reference_denoisers.is_mixture`'s rule)."""
    need(
        components >= 1,
        f"{prefix}_components",
        components,
        f"must be >= 1 (1: one Gaussian; more: a mixture of rank {prefix}_rank)",
    )
    need(
        rank >= 1 or (rank == 0 and components == 1),
        f"{prefix}_rank",
        rank,
        f"must be >= 1 with {components} components (0, full covariance, is for one component "
        "only)",
    )


def _validate_objective(m: ml_collections.ConfigDict, need) -> None:
    """The training objective's fields of ``config.model`` (see :func:`validate`)."""
    need(m.weighting in WEIGHTINGS, "model.weighting", m.weighting, f"one of {WEIGHTINGS}")
    need(
        m.noise_sampling in NOISE_SAMPLINGS,
        "model.noise_sampling",
        m.noise_sampling,
        f"one of {NOISE_SAMPLINGS}",
    )
    need(
        m.timesteps == 0 or m.weighting == "elbo",
        "model.weighting",
        m.weighting,
        "weightings are defined in continuous time: set model.timesteps=0 or model.weighting=elbo",
    )
    need(
        m.timesteps == 0 or m.noise_sampling == "uniform_t",
        "model.noise_sampling",
        m.noise_sampling,
        "adaptive and band sampling are continuous-time: set model.timesteps=0 or "
        "noise_sampling=uniform_t",
    )
    need(
        0.0 < m.sigmoid_scale < float("inf"),
        "model.sigmoid_scale",
        m.sigmoid_scale,
        "must be positive and finite",
    )
    need(m.histogram_bins > 0, "model.histogram_bins", m.histogram_bins, "must be positive")
    need(
        0.0 <= m.histogram_decay < 1.0,
        "model.histogram_decay",
        m.histogram_decay,
        "must lie in [0, 1)",
    )
    need(
        0.0 < m.histogram_uniform_fraction <= 1.0,
        "model.histogram_uniform_fraction",
        m.histogram_uniform_fraction,
        "must lie in (0, 1] (the floor that keeps the sampling density positive)",
    )
    band = tuple(m.band_log_snr)
    need(
        len(band) == 2 and all(math.isfinite(v) for v in band) and band[0] < band[1],
        "model.band_log_snr",
        band,
        "must be (lo, hi) with finite lo < hi, in log SNR = -gamma",
    )
    need(
        0.0 <= m.band_fraction < 1.0,
        "model.band_fraction",
        m.band_fraction,
        "must lie in [0, 1) (the rest of the draws keep the density positive everywhere)",
    )


def validate(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Checks a config's values once; raises ``ValueError`` naming the bad field."""

    def need(ok: bool, field: str, value, what: str) -> None:
        if not ok:
            raise JvdmUserError(f"config.{field}={value!r} is invalid: {what}")

    m, g, o, t, e = c.model, c.gamma, c.optimizer, c.train, c.eval
    need(m.channels > 0, "model.channels", m.channels, "must be positive")
    need(
        len(m.channel_mult) > 0 and all(k > 0 for k in m.channel_mult),
        "model.channel_mult",
        m.channel_mult,
        "must be a non-empty tuple of positive ints",
    )
    need(m.num_res_blocks > 0, "model.num_res_blocks", m.num_res_blocks, "must be positive")
    need(0.0 <= m.dropout < 1.0, "model.dropout", m.dropout, "must lie in [0, 1)")
    need(
        0 <= m.fourier_min < m.fourier_max <= 16,
        "model.fourier_min",
        m.fourier_min,
        f"need 0 <= fourier_min < fourier_max (here {m.fourier_max}) <= 16 (float32 resolves "
        "sin(2^n pi z) only to n ~ 16)",
    )
    need(m.prediction in PREDICTIONS, "model.prediction", m.prediction, f"one of {PREDICTIONS}")
    need(m.timesteps >= 0, "model.timesteps", m.timesteps, "0 (continuous) or a positive T")
    need(m.dtype in ("float32", "bfloat16"), "model.dtype", m.dtype, "float32 or bfloat16")
    need(
        math.isfinite(m.gaussian_base_log_snr),
        "model.gaussian_base_log_snr",
        m.gaussian_base_log_snr,
        "must be finite (the log SNR where the Gaussian base has half its weight)",
    )
    _need_fit(need, "model.gaussian_base", m.gaussian_base_components, m.gaussian_base_rank)
    _validate_objective(m, need)
    need(g.schedule in SCHEDULES, "gamma.schedule", g.schedule, f"one of {SCHEDULES}")
    checks.check_gamma_order(g.gamma_min, g.gamma_max, "config.gamma.")
    need(
        m.noise_sampling != "band"
        or (m.band_log_snr[0] < -g.gamma_min and m.band_log_snr[1] > -g.gamma_max),
        "model.band_log_snr",
        tuple(m.band_log_snr),
        f"must overlap the schedule's range of log SNR = -gamma, ({-g.gamma_max}, "
        f"{-g.gamma_min}), or no draw would fall in it",
    )
    need(g.hidden > 0, "gamma.hidden", g.hidden, "must be positive")
    need(
        g.variance_gradient in VARIANCE_GRADIENTS,
        "gamma.variance_gradient",
        g.variance_gradient,
        f"one of {VARIANCE_GRADIENTS}",
    )
    for name in ("endpoint_lr_scale", "interior_lr_scale"):
        scale = g[name]
        need(0.0 <= scale < float("inf"), f"gamma.{name}", scale, "must be finite and >= 0")
        need(
            scale == 1.0 or g.schedule == "learned",
            f"gamma.{name}",
            scale,
            "only the learned schedule has trained parameters: set gamma.schedule=learned",
        )
    need(o.learning_rate > 0, "optimizer.learning_rate", o.learning_rate, "must be positive")
    need(o.warmup_steps >= 0, "optimizer.warmup_steps", o.warmup_steps, "must be >= 0")
    need(o.decay in ("cosine", "constant"), "optimizer.decay", o.decay, "cosine or constant")
    need(0.0 <= o.ema_decay < 1.0, "optimizer.ema_decay", o.ema_decay, "must lie in [0, 1)")
    need(o.grad_clip > 0, "optimizer.grad_clip", o.grad_clip, "must be positive")
    need(t.batch_size > 0, "train.batch_size", t.batch_size, "must be positive")
    need(t.steps > 0, "train.steps", t.steps, "must be positive")
    need(
        0.0 <= t.time_budget_s < float("inf"),
        "train.time_budget_s",
        t.time_budget_s,
        "must be finite and >= 0 (seconds of training steps; 0: train for train.steps)",
    )
    need(t.grad_accum_steps > 0, "train.grad_accum_steps", t.grad_accum_steps, "must be positive")
    for name in ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
        need(t[name] > 0, f"train.{name}", t[name], "must be positive")
    need(
        t.variance_every >= 0,
        "train.variance_every",
        t.variance_every,
        "must be >= 0 (steps between measurements of the loss variance; 0 turns them off)",
    )
    need(t.variance_images > 0, "train.variance_images", t.variance_images, "must be positive")
    need(
        t.variance_grid >= 2 and t.variance_grid % 2 == 0,
        "train.variance_grid",
        t.variance_grid,
        "must be an even number >= 2 (noise levels per image: two shifted lattices)",
    )
    need(
        t.max_consecutive_nonfinite > 0,
        "train.max_consecutive_nonfinite",
        t.max_consecutive_nonfinite,
        "must be positive",
    )
    need(e.batch_size > 0, "eval.batch_size", e.batch_size, "must be positive")
    need(e.draws > 0, "eval.draws", e.draws, "must be positive")
    checks.check_sampler(e.sampler, "config.eval.sampler")
    checks.check_sampler_grid(e.sample_grid, "config.eval.sample_grid")
    need(e.sample_steps > 0, "eval.sample_steps", e.sample_steps, "must be positive")
    need(
        0 <= e.sample_gaussian_steps < e.sample_steps,
        "eval.sample_gaussian_steps",
        e.sample_gaussian_steps,
        f"must lie in 0..{e.sample_steps - 1} (below eval.sample_steps)",
    )
    _need_fit(need, "eval.sample_gaussian", e.sample_gaussian_components, e.sample_gaussian_rank)
    return c
