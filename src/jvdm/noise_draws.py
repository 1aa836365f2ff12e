"""The randomness of one estimate of the bound, and the schedule's values at it.

:func:`draw_noise` draws a batch's :class:`NoiseDraws`: the noise levels (uniform times, stratified
with ``use_antithetic_time``; or positions ``u`` between the schedule's end points from the loss
histogram or the band density of :mod:`jvdm.noise_sampling`), the noise of ``z_t`` and of
``z_0``, and the dropout key. :func:`schedule_values` turns them into the :class:`ScheduleValues`
the bound uses, as a function of the schedule's parameters, so that one VJP gives the gradients
of both the end points and the interior (:mod:`jvdm.objective`).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp

from jvdm import noise_sampling
from jvdm.nn import gamma as gamma_lib

if TYPE_CHECKING:
    from jvdm.model import VDM

__all__ = ["NoiseDraws", "ScheduleValues", "draw_noise", "schedule_values"]


class NoiseDraws(NamedTuple):
    """The randomness of one estimate of the bound, drawn for the whole batch.

    Attributes:
      t: ``[B]`` diffusion times, or with ``noise_sampling="adaptive"`` or ``"band"`` positions
        ``u`` in ``[0, 1]`` of ``gamma = gamma_0 + u (gamma_1 - gamma_0)``.
      s: ``[B]`` the previous times ``t - 1/T`` in discrete time (``t`` in continuous time).
      density: ``[B]`` the density ``q(u)`` that ``t`` was drawn from (ones for uniform times).
      eps: ``[B, H, W, C]`` the noise of ``z_t``.
      eps0: ``[B, H, W, C]`` the noise of ``z_0`` (reconstruction term).
      key_dropout: the dropout key.
    """

    t: jax.Array
    s: jax.Array
    density: jax.Array
    eps: jax.Array
    eps0: jax.Array
    key_dropout: jax.Array


class ScheduleValues(NamedTuple):
    """Every value of the schedule the bound uses: ``g_t, dg_t, g_s`` ``[B]``, ``g_0, g_1`` ``[]``.

    ``dg_t`` is the Jacobian ``dgamma/dt`` of the estimator: ``gamma'(t)`` for uniform times,
    ``(gamma_1 - gamma_0) / q(u)`` for adaptive draws.
    """

    g_t: jax.Array
    dg_t: jax.Array
    g_s: jax.Array
    g_0: jax.Array
    g_1: jax.Array


def _sample_times(model: VDM, key: jax.Array, batch: int):
    """Diffusion times ``t`` (and ``s = t - 1/T`` in discrete time), shape ``[B]``."""
    if model.use_antithetic_time:
        u = jax.random.uniform(key, ())
        t = jnp.mod(u + jnp.arange(batch, dtype=jnp.float32) / batch, 1.0)
    else:
        t = jax.random.uniform(key, (batch,))
    T = model.timesteps
    if T == 0:
        return t, t
    i = jnp.clip(jnp.floor(t * T) + 1.0, 1.0, T)
    return i / T, (i - 1.0) / T


def draw_noise(model: VDM, key: jax.Array, batch_shape, histogram=None, band=None) -> NoiseDraws:
    """The batch's :class:`NoiseDraws`: positions drawn from ``histogram`` (``[2, K]``, see
    :mod:`jvdm.noise_sampling`) or from the band density on the interval ``band`` of ``u``
    (:func:`jvdm.noise_sampling.band_positions`) when one is given, else uniform times (as
    evaluation uses)."""
    k_t, k_eps, k_eps0, k_drop = jax.random.split(key, 4)
    batch = batch_shape[0]
    if histogram is not None and band is not None:
        raise ValueError("draw_noise takes a histogram or a band, not both")
    if band is not None or histogram is not None:
        draw = (
            functools.partial(
                noise_sampling.band_positions, interval=band, fraction=model.band_fraction
            )
            if band is not None
            else functools.partial(
                noise_sampling.sample_positions,
                histogram=histogram,
                uniform_fraction=model.histogram_uniform_fraction,
            )
        )
        t, density = draw(k_t, batch, use_antithetic=model.use_antithetic_time)
        s = t
    else:
        (t, s), density = _sample_times(model, k_t, batch), jnp.ones((batch,), jnp.float32)
    eps = jax.random.normal(k_eps, batch_shape, jnp.float32)
    eps0 = jax.random.normal(k_eps0, batch_shape, jnp.float32)
    return NoiseDraws(t, s, density, eps, eps0, k_drop)


def schedule_values(model: VDM, noise: NoiseDraws, *, adaptive: bool = False):
    """A function of the schedule's parameters giving the :class:`ScheduleValues` of ``noise``.

    For ``adaptive`` draws (positions ``u`` from a density ``q``: the loss histogram's, or the
    band's) ``gamma = gamma_0 + u (gamma_1 - gamma_0)`` with Jacobian
    ``(gamma_1 - gamma_0) / q(u)``: only the end points of the schedule enter.
    """

    def values(sched_params) -> ScheduleValues:
        fn = lambda u: model.schedule.apply(sched_params, u)
        ends = lambda: fn(jnp.array([0.0, 1.0], jnp.float32))
        if adaptive:
            g_0, g_1 = ends()
            g_t = g_0 + noise.t * (g_1 - g_0)
            return ScheduleValues(g_t, (g_1 - g_0) / noise.density, g_t, g_0, g_1)
        # This order of evaluation fixes the order in which the VJP sums the end points' gradients.
        g_t, dg_t = gamma_lib.gamma_and_derivative(fn, noise.t)
        g_s = fn(noise.s) if model.timesteps else g_t
        g_0, g_1 = ends()
        return ScheduleValues(g_t, dg_t, g_s, g_0, g_1)

    return values
