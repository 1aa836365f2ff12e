"""The optimizer of a training run: clipping, AdamW with its weight-decay mask, the learning-rate
schedule, and the learning-rate multipliers of the learned noise schedule.

Everything here takes keyword arguments (no config) and returns optax objects; equal
hyperparameters give the *same* objects (cached), so the static part of a
:class:`jvdm.train_state.TrainState` compares equal across runs in one process and the compiled
step is reused.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import optax

from jvdm import model as model_lib
from jvdm.errors import JvdmUserError

__all__ = [
    "learning_rate_schedule",
    "make_optimizer",
    "schedule_lr_multipliers",
    "weight_decay_mask",
]

# Leaves of the denoiser that never get weight decay: biases and the scales of norm layers.
_NO_DECAY_NAMES = ("bias", "scale")


def _leaf_name(path) -> str | None:
    last = path[-1] if path else None
    return getattr(last, "key", getattr(last, "name", None))


def weight_decay_mask(params: model_lib.VDMParams) -> model_lib.VDMParams:
    """``True`` where AdamW decays a weight: the denoiser's kernels and embeddings only.

    Biases and norm scales are not decayed (decay would pull a GroupNorm's scale towards zero), nor
    are the denoiser's constants (a Gaussian base's fit, :func:`jvdm.model.is_constant`), nor
    is any parameter of the noise schedule, whose end points set the bound and whose interior is
    trained on the loss variance.
    """
    denoiser = jax.tree_util.tree_map_with_path(
        lambda path, _: not model_lib.is_constant(path) and _leaf_name(path) not in _NO_DECAY_NAMES,
        params.denoiser,
    )
    schedule = jax.tree.map(lambda _: False, params.schedule)
    return params.replace(denoiser=denoiser, schedule=schedule)


@functools.lru_cache(maxsize=32)
def learning_rate_schedule(
    *,
    learning_rate: float,
    warmup_steps: int,
    total_steps: int,
    decay: str,
    final_lr_fraction: float,
) -> optax.Schedule:
    """Linear warm-up from 0 to ``learning_rate``, then cosine decay to ``final_lr_fraction`` of it
    at ``total_steps`` (or constant, with ``decay='constant'``)."""
    if decay not in ("cosine", "constant"):
        raise JvdmUserError(f"{decay=}; expected 'cosine' or 'constant'")
    if decay == "cosine":
        after = optax.cosine_decay_schedule(
            learning_rate, max(total_steps - warmup_steps, 1), alpha=final_lr_fraction
        )
    else:
        after = optax.constant_schedule(learning_rate)
    if warmup_steps == 0:
        return after
    warmup = optax.linear_schedule(0.0, learning_rate, warmup_steps)
    return optax.join_schedules([warmup, after], [warmup_steps])


def schedule_lr_multipliers(
    params: model_lib.VDMParams, *, endpoints: float, interior: float
) -> model_lib.VDMParams:
    """Per-leaf learning-rate multipliers: ``endpoints`` for the schedule's ``gamma_min`` and
    ``gamma_max``, ``interior`` for the rest of the schedule (the learned shape under ``'net'``),
    1 for the denoiser.

    The end points set the bound, so their multiplier sets how fast the bound's end terms can
    move (Adam moves a parameter by about the learning rate per step, whatever its gradient's
    scale); the interior is trained on the loss variance, and a multiplier of 0 freezes it at its
    initial, almost linear shape.
    """

    def mult(path, _):
        return endpoints if _leaf_name(path) in ("gamma_min", "gamma_max") else interior

    schedule = jax.tree_util.tree_map_with_path(mult, params.schedule)
    return params.replace(denoiser=jax.tree.map(lambda _: 1.0, params.denoiser), schedule=schedule)


def _scale_by_multipliers(endpoints: float, interior: float) -> optax.GradientTransformation:
    """Multiplies each update by its :func:`schedule_lr_multipliers` entry."""

    def update(updates, state, params=None):
        del params
        mult = schedule_lr_multipliers(updates, endpoints=endpoints, interior=interior)
        return jax.tree.map(lambda u, m: u * jnp.asarray(m, u.dtype), updates, mult), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


@functools.lru_cache(maxsize=32)
def _optimizer(
    *,
    schedule: optax.Schedule,
    b1: float,
    b2: float,
    eps: float,
    weight_decay: float,
    clip: float,
    schedule_lr_scales: tuple[float, float],
) -> optax.GradientTransformation:
    # Cached: equal hyperparameters give the *same* transformation object, so the static part of
    # TrainState compares equal across runs in one process and the compiled step is reused.
    parts = [
        optax.clip_by_global_norm(clip),
        optax.adamw(
            schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=weight_decay_mask
        ),
    ]
    if schedule_lr_scales != (1.0, 1.0):
        # After AdamW, so a multiplier scales that parameter's learning rate exactly (the
        # schedule's parameters get no weight decay).
        parts.append(_scale_by_multipliers(*schedule_lr_scales))
    return optax.chain(*parts)


def make_optimizer(
    *,
    learning_rate: float,
    warmup_steps: int,
    total_steps: int,
    decay: str,
    final_lr_fraction: float,
    b1: float,
    b2: float,
    eps: float,
    weight_decay: float,
    grad_clip: float,
    schedule_lr_scales: tuple[float, float] = (1.0, 1.0),
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """``(tx, lr_schedule)``: clipping by global norm at ``grad_clip``, then AdamW (decaying the
    weights of :func:`weight_decay_mask`) with :func:`learning_rate_schedule`'s schedule.

    ``schedule_lr_scales = (endpoints, interior)`` multiplies the learning rate of the noise
    schedule's end points and of its interior (:func:`schedule_lr_multipliers`); ``(1, 1)`` is
    plain AdamW."""
    endpoints, interior = (float(v) for v in schedule_lr_scales)
    if not (endpoints >= 0.0 and interior >= 0.0 and math.isfinite(endpoints + interior)):
        raise JvdmUserError(
            f"{schedule_lr_scales=}: learning-rate multipliers must be finite and >= 0"
        )
    schedule = learning_rate_schedule(
        learning_rate=learning_rate,
        warmup_steps=warmup_steps,
        total_steps=total_steps,
        decay=decay,
        final_lr_fraction=final_lr_fraction,
    )
    tx = _optimizer(
        schedule=schedule,
        b1=b1,
        b2=b2,
        eps=eps,
        weight_decay=weight_decay,
        clip=grad_clip,
        schedule_lr_scales=(endpoints, interior),
    )
    return tx, schedule
