r"""The samplers as a protocol: ancestral, DDIM, DPM-Solver++(2M), each a small object in one table.

All three walk a grid of noise levels from ``t = 1`` down to ``t = 0``; :mod:`jvdm.sampling` then
decodes ``z_0`` into 8-bit pixels through the model's 256-value decoder. They are written in
``gamma = -log SNR`` form (``alpha^2 = sigmoid(-gamma)``, ``sigma^2 = sigmoid(gamma)``), which is
all a VDM exposes: the denoiser is conditioned on ``gamma`` (not on ``t``), so any noise level in
``[gamma(0), gamma(1)]`` can be visited directly, whatever the (learned, monotone) schedule.

* ``"ancestral"`` -- the model's own generative process: ``z_s ~ p(z_s | z_t) =
  q(z_s | z_t, x = x0_hat)``. With ``c = 1 - SNR(t)/SNR(s) = -expm1(gamma_s - gamma_t)`` the
  posterior is
  ``mean = (alpha_s / alpha_t)(z_t - c sigma_t eps_hat)``, ``var = c sigma_s^2`` (VDM eq. 32-33,
  appendix A.4). ``-expm1`` keeps ``c`` exact for adjacent steps, where ``1 - ratio`` would cancel.
* ``"ddim"`` -- ``z_s = alpha_s x0_hat + sigma_s sqrt(1 - eta^2 c) eps_hat + eta sigma_s sqrt(c) n``
  (Song et al. 2021, eq. 12 in VDM notation): ``eta = 0`` is deterministic (the first-order
  exponential integrator of the probability-flow ODE), ``eta = 1`` is the ancestral step.
* ``"dpm_solver"`` -- DPM-Solver++(2M), data prediction, multistep (Lu et al. 2022b, Algorithm 2):
  with ``lambda = -gamma / 2 = log(alpha / sigma)`` and ``h_i = lambda_i - lambda_{i-1}``,
  ``z_i = (sigma_i / sigma_{i-1}) z_{i-1} - alpha_i expm1(-h_i) D_i`` where ``D_1 = x0_hat_0`` and
  ``D_i = (1 + 1/(2 r_i)) x0_hat_{i-1} - 1/(2 r_i) x0_hat_{i-2}``, ``r_i = h_{i-1} / h_i``. As in
  the reference implementation, the last step is first order when ``steps < 15``.

Every sampler walks one of three grids (:data:`jvdm.validate.SAMPLER_GRIDS`, :func:`gamma_grid`):
``"lambda"``, uniform in ``lambda = -gamma/2`` between the schedule's end points (Lu et al. 2022a,
sec. 3.3); ``"karras"``, uniform in ``(sigma / alpha)^(1/rho)``, ``rho = 7``, between the same end
points (Karras et al. 2022, eq. 5), whose steps in ``lambda`` are shortest at the noisy end and
longest at the clean end; or ``"time"``, ``t_i = i / steps``. The default
(:func:`jvdm.sampling.default_grid`) is ``"lambda"`` for DDIM and DPM-Solver++ and ``"karras"``
for ancestral sampling, except ancestral sampling of a discrete-time model, whose bound is exactly
the ``T``-step chain on its own time grid. For a continuous-time model the bound depends on the
schedule only through its end points; its interior is free, and a learned one is trained to cut
the variance of the loss (:mod:`jvdm.objective`), not to place a sampler's steps. On the time grid
that interior would decide where the steps go; on the lambda and karras grids the samples depend
on the end points alone (on a linear schedule the lambda and time grids coincide).

Which of those two is closer depends on where the data's structure is made. On Gaussian data the
variance is lost at the clean end, and there the lambda grid is the more exact: 1000 ancestral
steps leave -1.1% of variance, the karras grid -1.5%, the time grid of a steep learned schedule
-3.5% (``tests/test_sampling.py``). Digits take their shapes at the noisy end: on the validation
slice (three seeds of the default, 256 ancestral-50 samples each, paired keys; issue 17,
bench/RESULTS.md) the karras grid gave the classifier's confidence 0.946 / 0.947 / 0.944 against
0.931 / 0.925 / 0.920 on the lambda grid (+0.020 +- 0.003) and Frechet distance -1.4 +- 0.6, at
the same share of zero pixels; for DDIM and DPM-Solver++ it changed nothing that one seed could
resolve, so they keep the lambda grid. Because the denoiser takes ``gamma``, the samplers never
need the times of these grids; :func:`jvdm.sampling.sampling_grid` recovers them by bisection on
the monotone ``gamma(t)`` (:func:`time_from_gamma`), for plots and diagnostics.

Each sampler is a :class:`Sampler` (name, order, init, step) in :data:`SAMPLERS`, the one place that
knows what a name does; :func:`run` walks any of them over a grid, and :func:`solve` is the
deterministic map ``z_1 -> z_0`` of DDIM (``eta = 0``) and DPM-Solver++(2M), whose orders (1 and 2)
``tests/test_sampling.py`` measures. Drawing images (keys, chunks, devices, the decoder) is
:mod:`jvdm.sampling`.

References:
  Kingma et al., *Variational Diffusion Models* (arXiv 2107.00630), appendix A.4 (ancestral step).
  Song, Meng, Ermon, *Denoising Diffusion Implicit Models* (arXiv 2010.02502), eq. 12.
  Lu et al., *DPM-Solver++* (arXiv 2211.01095), Algorithm 2; *DPM-Solver* (arXiv 2206.00927).
  Karras et al., *Elucidating the Design Space of Diffusion-Based Generative Models* (arXiv
  2206.00364), eq. 5 (the grid).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jvdm import model as model_lib
from jvdm import validate
from jvdm.errors import JvdmUserError

__all__ = [
    "KARRAS_RHO",
    "SAMPLERS",
    "Sampler",
    "StepInput",
    "gamma_grid",
    "run",
    "solve",
    "time_from_gamma",
]

#: Karras et al.'s (2022) rho: their grid is uniform in ``(sigma / alpha)^(1 / rho)``.
KARRAS_RHO = 7.0
_BISECTION_ITERS = 40  # halves [0, 1] to 1e-12, below float32 resolution
_LOWER_ORDER_FINAL_BELOW = 15  # DPM-Solver++ reference: first-order last step for short runs

# ------------------------------------------------------------------------------------------------
# The samplers: one small object each, in one table.


class StepInput(NamedTuple):
    """What one step sees besides the state: scalars shared by the batch, and the noise.

    ``i`` is the step's index (0 first, at ``t = 1``); ``g_t -> g_s`` the step's ``gamma`` values
    (``g_s < g_t``); ``g_prev`` the ``gamma`` one point before ``g_t`` (DPM-Solver's multistep
    ratio; equal to ``g_t`` at ``i = 0``); ``noise`` a standard normal ``[B, H, W, C]`` (zeros when
    the caller is deterministic); ``eta`` DDIM's stochasticity.
    """

    i: jax.Array
    g_t: jax.Array
    g_s: jax.Array
    g_prev: jax.Array
    noise: jax.Array
    eta: jax.Array


class Sampler(NamedTuple):
    """A sampler as the chain runs it: ``state = init(z_1)``, then ``state = step(params, state,
    inp, steps)`` once per grid interval; ``state[0]`` is the latent.

    Attributes:
      name: the name users pass (one of :data:`jvdm.validate.SAMPLER_NAMES`).
      order: the order of convergence of the deterministic map to the probability-flow ODE's
        solution (global error ``O(steps^-order)``), as tested in ``tests/test_sampling.py``; 0 for
        a sampler that is not a discretisation of the ODE (ancestral).
      is_deterministic: whether the map ``z_1 -> z_0`` uses no noise (DDIM only with ``eta = 0``,
        which :func:`solve` fixes).
      uses_noise: whether the chain draws a normal per step for it.
      is_model_chain: whether the chain is the model's own generative process ``p(z_s | z_t)``,
        the chain the bound is written for (ancestral only): :func:`jvdm.sampling.default_steps`
        and :func:`jvdm.sampling.default_grid` then follow the model (a discrete-time model's
        own ``T`` steps in ``t``; 1000 steps in continuous time), where the solvers of the ODE
        take 50 steps uniform in ``lambda``.
      init: ``z_1 -> state``, a pytree whose first leaf is the latent.
      step: ``(predict, state, StepInput, steps) -> state``, ``predict(z, gamma) -> (eps_hat,
        x0_hat)`` the denoiser; ``steps`` is static.
    """

    name: str
    order: int
    is_deterministic: bool
    uses_noise: bool
    is_model_chain: bool
    init: Callable[[jax.Array], Any]
    step: Callable[..., Any]


# ------------------------------------------------------------------------------------------------
# Grids.


def gamma_grid(params, steps: int, grid: str) -> jax.Array:
    """``gamma`` at the ``steps + 1`` grid points, from ``t = 1`` (first) to ``t = 0`` (last).

    ``grid`` is ``"time"`` (``t_i = 1 - i / steps``), ``"lambda"`` (uniform in
    ``lambda = -gamma/2`` between ``gamma(1)`` and ``gamma(0)``) or ``"karras"`` (uniform in
    ``s^(1/rho)``, ``s = sigma / alpha = exp(gamma / 2)``, ``rho =`` :data:`KARRAS_RHO`, between the
    same end points; Karras et al. 2022, eq. 5). The last two depend on the end points only.
    """
    i = jnp.arange(steps + 1, dtype=jnp.float32)
    if grid == "time":
        # t_i = 1 - i/steps, written so that the end points are exactly 1 and 0.
        t = (steps - i) / steps
        return model_lib.gamma(params, t)
    g_ends = model_lib.gamma(params, jnp.array([0.0, 1.0], jnp.float32))
    u = i / steps
    if grid == "karras":
        # s^(1/rho) = exp(gamma / (2 rho)), linear in u; the end points are then set exactly.
        k = 0.5 / KARRAS_RHO
        g = jnp.log((1.0 - u) * jnp.exp(k * g_ends[1]) + u * jnp.exp(k * g_ends[0])) / k
        return g.at[0].set(g_ends[1]).at[-1].set(g_ends[0])
    # Uniform in lambda = -gamma/2 between the end points, which pins them exactly.
    return (1.0 - u) * g_ends[1] + u * g_ends[0]


def time_from_gamma(params, g: jax.Array, *, iters: int = _BISECTION_ITERS) -> jax.Array:
    """``t = gamma^{-1}(g)`` elementwise, by bisection on the increasing schedule.

    A fixed number of vectorised iterations (a ``fori_loop``, so it compiles into the caller's
    program). Values outside ``[gamma(0), gamma(1)]`` clip to ``t = 0`` or ``1``.

    Args:
      params: the model's parameters.
      g: target values of ``gamma``, any shape.
      iters: bisection steps; the bracket shrinks to ``2^-iters``.
    """
    g = jnp.asarray(g, jnp.float32)
    lo, hi = jnp.zeros_like(g), jnp.ones_like(g)

    def body(_, bracket):
        lo, hi = bracket
        mid = 0.5 * (lo + hi)
        below = model_lib.gamma(params, mid) < g
        return jnp.where(below, mid, lo), jnp.where(below, hi, mid)

    lo, hi = jax.lax.fori_loop(0, iters, body, (lo, hi))
    return 0.5 * (lo + hi)


# ------------------------------------------------------------------------------------------------
# Steps. z: [B, H, W, C]; gamma values are scalars shared by the batch.


def _alpha_sigma(g):
    # sigmoid(-g) and sigmoid(g) are each accurate to full relative precision; 1 - sigmoid is not.
    return jnp.sqrt(jax.nn.sigmoid(-g)), jnp.sqrt(jax.nn.sigmoid(g))


def _latent_only(z):
    return (z,)


def _ancestral_step(predict, state, inp: StepInput, steps: int):
    """``z_s ~ q(z_s | z_t, x = x0_hat)``: VDM's sampler, in the stable gamma form."""
    del steps
    (z,) = state
    g_t, g_s = inp.g_t, inp.g_s
    eps_hat, _ = predict(z, g_t)
    _, sigma_t = _alpha_sigma(g_t)
    c = -jnp.expm1(g_s - g_t)  # 1 - SNR(t)/SNR(s), exact even when g_s ~ g_t
    # alpha_s / alpha_t as exp of a log-ratio: both factors are accurate, their ratio is too.
    ratio = jnp.exp(0.5 * (jax.nn.log_sigmoid(-g_s) - jax.nn.log_sigmoid(-g_t)))
    std = jnp.sqrt(c * jax.nn.sigmoid(g_s))
    return (ratio * (z - c * sigma_t * eps_hat) + std * inp.noise,)


def _ddim_step(predict, state, inp: StepInput, steps: int):
    """DDIM with stochasticity ``eta``; ``eta = 1`` reproduces :func:`_ancestral_step`."""
    del steps
    (z,) = state
    eps_hat, x0_hat = predict(z, inp.g_t)
    alpha_s, sigma_s = _alpha_sigma(inp.g_s)
    c = -jnp.expm1(inp.g_s - inp.g_t)
    eta = inp.eta
    keep = jnp.sqrt(jnp.maximum(1.0 - eta * eta * c, 0.0))
    return (
        alpha_s * x0_hat + sigma_s * keep * eps_hat + (eta * sigma_s * jnp.sqrt(c)) * inp.noise,
    )


def _dpm_init(z):
    return (z, jnp.zeros_like(z))  # (z, x0_hat of the step before; unused at i = 0)


def _dpm_step(predict, state, inp: StepInput, steps: int):
    """One DPM-Solver++(2M) step from ``g_t`` to ``g_s``; the state carries the step before's
    ``x0_hat``. Returns ``(z_s, x0_hat_t)``."""
    z, x0_prev = state
    g_t, g_s, i = inp.g_t, inp.g_s, inp.i
    _, x0_hat = predict(z, g_t)
    h = 0.5 * (g_t - g_s)  # lambda_s - lambda_t > 0
    h_prev = 0.5 * (inp.g_prev - g_t)
    r = h_prev / h
    use_first_order = i == 0
    if steps < _LOWER_ORDER_FINAL_BELOW:
        use_first_order = use_first_order | (i == steps - 1)
    # r > 0 everywhere it is used; the where() keeps the unused branch finite at i = 0.
    safe_r = jnp.where(use_first_order, 1.0, r)
    d2 = (1.0 + 0.5 / safe_r) * x0_hat - (0.5 / safe_r) * x0_prev
    d = jnp.where(use_first_order, x0_hat, d2)
    alpha_s, _ = _alpha_sigma(g_s)
    sigma_ratio = jnp.exp(0.5 * (jax.nn.log_sigmoid(g_s) - jax.nn.log_sigmoid(g_t)))
    # -alpha_s (e^{-h} - 1) = -alpha_s expm1(-h): accurate for the small h of many steps.
    return sigma_ratio * z - (alpha_s * jnp.expm1(-h)) * d, x0_hat


#: Every sampler, by the name users pass. The only place that knows what each name does.
SAMPLERS: dict[str, Sampler] = {
    s.name: s
    for s in (
        Sampler("ancestral", 0, False, True, True, _latent_only, _ancestral_step),
        Sampler("ddim", 1, True, True, False, _latent_only, _ddim_step),
        Sampler("dpm_solver", 2, True, False, False, _dpm_init, _dpm_step),
    )
}
assert tuple(SAMPLERS) == validate.SAMPLER_NAMES, "the table and the checked names must agree"


def run(params, sampler: Sampler, z_1, g, eta, noise_fn, *, predict=None):
    """Runs ``sampler`` over the gamma grid ``g`` ``[steps + 1]`` from ``z_1``; returns ``z_0``.

    ``noise_fn(i)`` gives step ``i``'s standard normal, or is ``None`` (zeros: deterministic).
    ``predict(z, gamma) -> (eps_hat, x0_hat)`` is the denoiser the steps call; default the
    model's, :func:`jvdm.model.predict_eps_x0` with ``params``.
    """
    if predict is None:
        predict = functools.partial(model_lib.predict_eps_x0, params)
    steps = g.shape[0] - 1
    g_prev = jnp.concatenate([g[:1], g[:-2]])  # g_prev[i] = g[i - 1]; g[0] at i = 0 (unused)
    xs = (jnp.arange(steps), g[:-1], g[1:], g_prev)

    def body(state, x):
        i, g_t, g_s, g_p = x
        noise = jnp.zeros_like(state[0]) if noise_fn is None else noise_fn(i)
        return sampler.step(predict, state, StepInput(i, g_t, g_s, g_p, noise, eta), steps), None

    state, _ = jax.lax.scan(body, sampler.init(z_1), xs)
    return state[0]


@functools.partial(jax.jit, static_argnames=("sampler",))
def _solve(params, z_1, grid, *, sampler):
    return run(params, SAMPLERS[sampler], z_1, grid.astype(jnp.float32), 0.0, None)


def solve(params: model_lib.VDMParams, z_1, grid, *, sampler: str = "dpm_solver") -> jax.Array:
    """The deterministic map ``z_1 -> z_0`` of a deterministic sampler on a given ``gamma`` grid.

    The probability-flow ODE's discretisation by DDIM (``eta = 0``, first order) or
    DPM-Solver++(2M) (second order), without noise and without the decoder: for a study of the
    solver itself (its order, its error on a grid of one's own), or to map given latents.

    Args:
      params: the model's parameters.
      z_1: float ``[B, H, W, C]`` latents at ``gamma = grid[0]`` (the prior's are ``N(0, I)``).
      grid: ``[steps + 1]`` decreasing ``gamma`` values, from the start (``gamma(1)`` for sampling)
        to the end (``gamma(0)``), e.g. :func:`sampling_grid`'s second output.
      sampler: ``"ddim"`` or ``"dpm_solver"``.

    Returns:
      float32 ``[B, H, W, C]``, the latents at ``gamma = grid[-1]``.
    """
    validate.check_params(params, model_lib.VDMParams)
    if not SAMPLERS[validate.check_sampler(sampler)].is_deterministic:
        raise JvdmUserError(f"sampler={sampler!r} draws noise; solve takes 'ddim' or 'dpm_solver'")
    grid = np.asarray(grid)
    if grid.ndim != 1 or grid.shape[0] < 2 or not np.all(np.diff(grid) < 0):
        raise JvdmUserError(
            f"grid has shape {grid.shape}; expected at least 2 decreasing gamma values"
        )
    z_1 = jnp.asarray(z_1, jnp.float32)
    if z_1.ndim != 4 or tuple(z_1.shape[1:]) != tuple(params.model.image_shape):
        raise JvdmUserError(
            f"z_1 has shape {tuple(z_1.shape)}; expected [B, "
            f"{', '.join(map(str, params.model.image_shape))}]"
        )
    return _solve(params, z_1, jnp.asarray(grid), sampler=sampler)
