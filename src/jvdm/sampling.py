r"""Samplers for a trained VDM: ancestral, DDIM and DPM-Solver++(2M), each one compiled program.

All three walk a grid of noise levels from ``t = 1`` down to ``t = 0`` and then decode ``z_0`` into
8-bit pixels through the model's 256-value decoder. They are written in ``gamma = -log SNR`` form
(``alpha^2 = sigmoid(-gamma)``, ``sigma^2 = sigmoid(gamma)``), which is all a VDM exposes: the
denoiser is conditioned on ``gamma`` (not on ``t``), so any noise level in
``[gamma(0), gamma(1)]`` can be visited directly, whatever the (learned, monotone) schedule.

* ``"ancestral"`` -- the model's own generative process: ``z_s ~ p(z_s | z_t) =
  q(z_s | z_t, x = x0_hat)`` on the time grid ``t_i = i / steps`` (``steps = T`` by default for a
  discrete-time model, whose bound is exactly this process). With ``c = 1 - SNR(t)/SNR(s) =
  -expm1(gamma_s - gamma_t)`` the posterior is
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

DDIM and DPM-Solver use a grid uniform in ``lambda`` between the schedule's end points (Lu et al.
2022a, sec. 3.3). Because the denoiser takes ``gamma``, the samplers never need the times of that
grid; :func:`sampling_grid` recovers them by bisection on the monotone ``gamma(t)``
(:func:`time_from_gamma`), for plots and diagnostics.

Randomness is per image: image ``i`` of ``sample(params, key, n)`` uses ``fold_in(key, i)`` only, so
it does not depend on ``n``, ``batch_size`` or the number of devices (``sample(key, 8)[:4] ==
sample(key, 4)``). Large ``n`` is drawn in chunks of ``batch_size`` (the last chunk padded, so one
program serves every chunk), each sharded over the local devices on the batch axis when it holds
at least one image per device (rounded up to a multiple of the device count).

The final decode *samples* from ``p(x | z_0)`` (the model's distribution, so that sample statistics
are the model's); at VDM's ``gamma(0) ~ -13`` that distribution is nearly a point mass anyway. It
is drawn by the inverse CDF within the likelihood's proven 17-value window
(:mod:`jvdm.decoder`), in memory of the data's size.

References:
  Kingma et al., *Variational Diffusion Models* (arXiv 2107.00630), appendix A.4 (ancestral step).
  Song, Meng, Ermon, *Denoising Diffusion Implicit Models* (arXiv 2010.02502), eq. 12.
  Lu et al., *DPM-Solver++* (arXiv 2211.01095), Algorithm 2; *DPM-Solver* (arXiv 2206.00927).
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jvdm import decoder, parallel, validate
from jvdm import model as model_lib
from jvdm.errors import JvdmUserError

__all__ = [
    "SAMPLERS",
    "Sampler",
    "default_steps",
    "sample",
    "sample_latents",
    "sampling_grid",
    "solve",
    "time_from_gamma",
]

DEFAULT_CONTINUOUS_STEPS = 1000
DEFAULT_FAST_STEPS = 50
DEFAULT_BATCH_SIZE = 256
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
      grid: ``"time"`` (uniform in ``t``) or ``"lambda"`` (uniform in ``lambda = -gamma/2``).
      init: ``z_1 -> state``, a pytree whose first leaf is the latent.
      step: ``(params, state, StepInput, steps) -> state``; ``steps`` is static.
    """

    name: str
    order: int
    is_deterministic: bool
    uses_noise: bool
    grid: str
    init: Callable[[jax.Array], Any]
    step: Callable[..., Any]


def default_steps(model: model_lib.VDM, sampler: str) -> int:
    """The step count used when ``steps=None``: ``T`` for ancestral sampling of a discrete-time
    model, 1000 for continuous-time ancestral sampling, 50 for DDIM and DPM-Solver."""
    if SAMPLERS[validate.check_sampler(sampler)].grid == "time":
        return model.timesteps if model.timesteps > 0 else DEFAULT_CONTINUOUS_STEPS
    return DEFAULT_FAST_STEPS


def _check_params(params) -> None:
    if not isinstance(params, model_lib.VDMParams):
        raise JvdmUserError(
            f"params must be a jvdm VDMParams (from jvdm.load or model.init); got {type(params)}"
        )


def _check_args(params, n, steps, sampler, eta, batch_size) -> tuple[int, int]:
    _check_params(params)
    validate.check_sampler(sampler)
    validate.positive_int(n, "n", " number of images")
    if steps is None:
        steps = default_steps(params.model, sampler)
    steps = validate.positive_int(steps, "steps", " (or None for the default)")
    is_real = isinstance(eta, numbers.Real) and not isinstance(eta, bool)
    if not (is_real and math.isfinite(eta) and 0.0 <= eta <= 1.0):
        raise JvdmUserError(f"eta={eta!r}; expected a number with 0 <= eta <= 1")
    if eta != 0.0 and sampler != "ddim":
        raise JvdmUserError(f"eta={eta!r} applies only to sampler='ddim'; got sampler={sampler!r}")
    batch_size = DEFAULT_BATCH_SIZE if batch_size is None else batch_size
    return steps, validate.positive_int(batch_size, "batch_size", " (or None)")


# ------------------------------------------------------------------------------------------------
# Grids.


def _gamma_grid(params, steps: int, grid: str) -> jax.Array:
    """``gamma`` at the ``steps + 1`` grid points, from ``t = 1`` (first) to ``t = 0`` (last)."""
    i = jnp.arange(steps + 1, dtype=jnp.float32)
    if grid == "time":
        # t_i = 1 - i/steps, written so that the end points are exactly 1 and 0.
        t = (steps - i) / steps
        return model_lib.gamma(params, t)
    # Uniform in lambda = -gamma/2 between the end points, which pins them exactly.
    g_ends = model_lib.gamma(params, jnp.array([0.0, 1.0], jnp.float32))
    u = i / steps
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


@functools.partial(jax.jit, static_argnames=("steps", "grid"))
def _grid_jit(params, *, steps: int, grid: str):
    g = _gamma_grid(params, steps, grid)
    if grid == "time":
        i = jnp.arange(steps + 1, dtype=jnp.float32)
        return (steps - i) / steps, g
    t = time_from_gamma(params, g)
    return t.at[0].set(1.0).at[-1].set(0.0), g


def sampling_grid(params, steps: int | None = None, sampler: str = "ancestral"):
    """The ``(t, gamma)`` grid a sampler visits, each ``[steps + 1]``, from ``t = 1`` to ``t = 0``.

    For DDIM and DPM-Solver the grid is uniform in ``lambda = -gamma/2`` and ``t`` comes from
    :func:`time_from_gamma`; the samplers themselves use only ``gamma``.
    """
    steps, _ = _check_args(params, 1, steps, sampler, 0.0, None)
    t, g = _grid_jit(params, steps=steps, grid=SAMPLERS[sampler].grid)
    return np.asarray(t), np.asarray(g)


# ------------------------------------------------------------------------------------------------
# Steps. z: [B, H, W, C]; gamma values are scalars shared by the batch.


def _alpha_sigma(g):
    # sigmoid(-g) and sigmoid(g) are each accurate to full relative precision; 1 - sigmoid is not.
    return jnp.sqrt(jax.nn.sigmoid(-g)), jnp.sqrt(jax.nn.sigmoid(g))


def _latent_only(z):
    return (z,)


def _ancestral_step(params, state, inp: StepInput, steps: int):
    """``z_s ~ q(z_s | z_t, x = x0_hat)``: VDM's sampler, in the stable gamma form."""
    del steps
    (z,) = state
    g_t, g_s = inp.g_t, inp.g_s
    eps_hat, _ = model_lib.predict_eps_x0(params, z, g_t)
    _, sigma_t = _alpha_sigma(g_t)
    c = -jnp.expm1(g_s - g_t)  # 1 - SNR(t)/SNR(s), exact even when g_s ~ g_t
    # alpha_s / alpha_t as exp of a log-ratio: both factors are accurate, their ratio is too.
    ratio = jnp.exp(0.5 * (jax.nn.log_sigmoid(-g_s) - jax.nn.log_sigmoid(-g_t)))
    std = jnp.sqrt(c * jax.nn.sigmoid(g_s))
    return (ratio * (z - c * sigma_t * eps_hat) + std * inp.noise,)


def _ddim_step(params, state, inp: StepInput, steps: int):
    """DDIM with stochasticity ``eta``; ``eta = 1`` reproduces :func:`_ancestral_step`."""
    del steps
    (z,) = state
    eps_hat, x0_hat = model_lib.predict_eps_x0(params, z, inp.g_t)
    alpha_s, sigma_s = _alpha_sigma(inp.g_s)
    c = -jnp.expm1(inp.g_s - inp.g_t)
    eta = inp.eta
    keep = jnp.sqrt(jnp.maximum(1.0 - eta * eta * c, 0.0))
    return (
        alpha_s * x0_hat + sigma_s * keep * eps_hat + (eta * sigma_s * jnp.sqrt(c)) * inp.noise,
    )


def _dpm_init(z):
    return (z, jnp.zeros_like(z))  # (z, x0_hat of the step before; unused at i = 0)


def _dpm_step(params, state, inp: StepInput, steps: int):
    """One DPM-Solver++(2M) step from ``g_t`` to ``g_s``; the state carries the step before's
    ``x0_hat``. Returns ``(z_s, x0_hat_t)``."""
    z, x0_prev = state
    g_t, g_s, i = inp.g_t, inp.g_s, inp.i
    _, x0_hat = model_lib.predict_eps_x0(params, z, g_t)
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
        Sampler("ancestral", 0, False, True, "time", _latent_only, _ancestral_step),
        Sampler("ddim", 1, True, True, "lambda", _latent_only, _ddim_step),
        Sampler("dpm_solver", 2, True, False, "lambda", _dpm_init, _dpm_step),
    )
}
assert tuple(SAMPLERS) == validate.SAMPLER_NAMES, "the table and the checked names must agree"


def _scan(params, sampler: Sampler, z_1, g, eta, noise_fn):
    """Runs ``sampler`` over the gamma grid ``g`` ``[steps + 1]`` from ``z_1``; returns ``z_0``.

    ``noise_fn(i)`` gives step ``i``'s standard normal, or is ``None`` (zeros: deterministic).
    """
    steps = g.shape[0] - 1
    g_prev = jnp.concatenate([g[:1], g[:-2]])  # g_prev[i] = g[i - 1]; g[0] at i = 0 (unused)
    xs = (jnp.arange(steps), g[:-1], g[1:], g_prev)

    def body(state, x):
        i, g_t, g_s, g_p = x
        noise = jnp.zeros_like(state[0]) if noise_fn is None else noise_fn(i)
        return sampler.step(params, state, StepInput(i, g_t, g_s, g_p, noise, eta), steps), None

    state, _ = jax.lax.scan(body, sampler.init(z_1), xs)
    return state[0]


@functools.partial(jax.jit, static_argnames=("sampler",))
def _solve(params, z_1, grid, *, sampler):
    return _scan(params, SAMPLERS[sampler], z_1, grid.astype(jnp.float32), 0.0, None)


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
    _check_params(params)
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


# ------------------------------------------------------------------------------------------------
# The compiled program.


def _per_image_normal(keys, shape, tag):
    """One standard normal draw of ``shape`` per image key, distinct for each integer ``tag``."""
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, tag), shape))(keys)


def _run_chain(params, keys, eta, *, steps, sampler):
    """``z_0`` for a batch of per-image keys ``[B]``."""
    shape = params.model.image_shape
    spec = SAMPLERS[sampler]
    g = _gamma_grid(params, steps, spec.grid)
    z = _per_image_normal(keys, shape, 0)  # z_1 ~ N(0, I), the prior
    noise_fn = (lambda i: _per_image_normal(keys, shape, i + 1)) if spec.uses_noise else None
    return _scan(params, spec, z, g, eta, noise_fn)


def _decode(params, z_0, keys, steps):
    """Samples ``x ~ p(x | z_0)`` from the decoder at ``gamma(0)``: uint8 ``[B, H, W, C]``.

    By the inverse CDF within the likelihood's proven window (:func:`jvdm.decoder.decoder_sample`):
    memory of the data's size, never the ``[B, H, W, C, 256]`` probabilities.
    """
    model = params.model
    g_0 = model_lib.gamma(params, jnp.zeros((), jnp.float32))

    def one(k):
        return jax.random.uniform(jax.random.fold_in(k, steps + 1), model.image_shape)

    u = jax.vmap(one)(keys)
    return decoder.decoder_sample(u, z_0, g_0, model.vocab_size).astype(jnp.uint8)


def _generate(params, keys, eta, *, steps, sampler, decode):
    """The traced body of one chunk: the chain, then the decoder (or the latents)."""
    z_0 = _run_chain(params, keys, eta, steps=steps, sampler=sampler)
    return _decode(params, z_0, keys, steps) if decode else z_0


@functools.partial(jax.jit, static_argnames=("steps", "sampler", "decode", "sharding"))
def _sample_chunk(params, key, indices, eta, *, steps, sampler, decode, sharding):
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, indices)
    if sharding is not None:
        keys = jax.lax.with_sharding_constraint(keys, sharding)
    return _generate(params, keys, eta, steps=steps, sampler=sampler, decode=decode)


def _sample(params, key, n, *, steps, sampler, eta, batch_size, decode) -> np.ndarray:
    steps, batch_size = _check_args(params, n, steps, sampler, eta, batch_size)
    # A chunk of at least one image per device is rounded up to a multiple of the device count (at
    # most ``devices - 1`` extra images, discarded) and sharded on the batch axis.
    chunk, sharding = parallel.local_batch_layout(min(n, batch_size))
    if sharding is not None:
        # Replicate the parameters on the mesh once, not per chunk.
        replicated = parallel.replicated_sharding(sharding.mesh)
        params = jax.device_put(params, replicated)
        key = jax.device_put(key, replicated)
    else:
        # One local device; parameters replicated over a mesh would run the program on each.
        params = jax.device_put(params, jax.local_devices()[0])
        key = jax.device_put(key, jax.local_devices()[0])
    eta = jnp.float32(float(eta))
    out = []
    for start in range(0, n, chunk):
        # The last chunk is padded to the common size so that one program serves all chunks.
        indices = np.arange(start, start + chunk, dtype=np.uint32)
        if sharding is not None:
            indices = jax.device_put(indices, sharding)
        result = _sample_chunk(
            params,
            key,
            indices,
            eta,
            steps=steps,
            sampler=sampler,
            decode=decode,
            sharding=sharding,
        )
        out.append(result)  # no host sync here: the next chunk is dispatched at once
    return np.concatenate([np.asarray(r) for r in out])[:n]


def sample(
    params: model_lib.VDMParams,
    key: jax.Array,
    n: int,
    *,
    steps: int | None = None,
    sampler: str = "ancestral",
    eta: float = 0.0,
    batch_size: int | None = None,
) -> np.ndarray:
    """Draws ``n`` images from the model.

    Args:
      params: the model's parameters (e.g. from :func:`jvdm.load`); they carry the model.
      key: a ``jax.random.key``; the same key gives the same images.
      n: number of images, > 0.
      steps: number of denoiser evaluations; default ``T`` (discrete-time model, ancestral), 1000
        (continuous-time, ancestral) or 50 (DDIM, DPM-Solver).
      sampler: ``"ancestral"``, ``"ddim"`` or ``"dpm_solver"`` (DPM-Solver++(2M)).
      eta: DDIM's stochasticity in ``[0, 1]``: 0 deterministic, 1 ancestral. Only for ``"ddim"``.
      batch_size: images per compiled call (memory bound); default 256.

    Returns:
      uint8 ``[n, H, W, C]`` (a NumPy array on the host).

    Raises:
      ValueError: for ``n <= 0``, ``steps <= 0``, an unknown sampler or ``eta`` outside ``[0, 1]``.
    """
    return _sample(
        params, key, n, steps=steps, sampler=sampler, eta=eta, batch_size=batch_size, decode=True
    )


def sample_latents(
    params: model_lib.VDMParams,
    key: jax.Array,
    n: int,
    *,
    steps: int | None = None,
    sampler: str = "ancestral",
    eta: float = 0.0,
    batch_size: int | None = None,
) -> np.ndarray:
    """Like :func:`sample` but returns the continuous latent ``z_0`` (float32 ``[n, H, W, C]``),
    before the decoder: ``z_0 ~ alpha_0 x + sigma_0 eps`` with ``x`` in model space ``[-1, 1]``.

    With the same arguments, ``sample`` decodes exactly these latents.
    """
    return _sample(
        params, key, n, steps=steps, sampler=sampler, eta=eta, batch_size=batch_size, decode=False
    )
