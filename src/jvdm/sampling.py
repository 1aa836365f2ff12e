r"""Drawing images from a trained VDM: ``sample`` and ``sample_latents``, each one compiled program.

The samplers themselves (ancestral, DDIM, DPM-Solver++(2M): their maths, grids and orders) are
:mod:`jvdm.samplers`; this module runs one over a batch of per-image keys and decodes the result.
Each walks a grid uniform in ``lambda`` by default, except ancestral sampling of a discrete-time
model, which walks its own ``T`` steps in ``t`` (:func:`default_grid`; ``grid=`` chooses).

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
  Kingma et al., *Variational Diffusion Models* (arXiv 2107.00630), appendix A.4 and eq. 3.
"""

from __future__ import annotations

import functools
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from jvdm import decoder, parallel, validate
from jvdm import model as model_lib
from jvdm import reference_denoisers as ref
from jvdm.errors import JvdmUserError
from jvdm.samplers import SAMPLERS, _alpha_sigma, gamma_grid, run, time_from_gamma

__all__ = [
    "default_grid",
    "default_steps",
    "sample",
    "sample_latents",
    "sampling_grid",
    "switched_predict",
]

DEFAULT_CONTINUOUS_STEPS = 1000
DEFAULT_FAST_STEPS = 50
DEFAULT_BATCH_SIZE = 256


def default_steps(model: model_lib.VDM, sampler: str) -> int:
    """The step count used when ``steps=None``: ``T`` for ancestral sampling of a discrete-time
    model, 1000 for continuous-time ancestral sampling, 50 for DDIM and DPM-Solver (the
    sampler's :attr:`~jvdm.samplers.Sampler.is_model_chain`)."""
    if SAMPLERS[validate.check_sampler(sampler)].is_model_chain:
        return model.timesteps if model.timesteps > 0 else DEFAULT_CONTINUOUS_STEPS
    return DEFAULT_FAST_STEPS


def default_grid(model: model_lib.VDM, sampler: str) -> str:
    """The grid used when ``grid=None``: ``"time"`` (the model's own ``t_i = i / T``) for ancestral
    sampling of a discrete-time model, whose bound is that chain; ``"karras"`` for ancestral
    sampling of a continuous-time model, whose digits it drew best on the validation slice; and
    ``"lambda"`` for DDIM and DPM-Solver++. The last two depend on the schedule's end points only,
    not on the interior that a learned schedule shapes for the loss's variance
    (:mod:`jvdm.samplers`)."""
    if SAMPLERS[validate.check_sampler(sampler)].is_model_chain:
        return "time" if model.timesteps > 0 else "karras"
    return "lambda"


def _check_args(params, n, steps, sampler, eta, batch_size, grid) -> tuple[int, int, str]:
    validate.check_params(params, model_lib.VDMParams)
    validate.check_sampler(sampler)
    validate.check_sampler_grid(grid)
    validate.positive_int(n, "n", " number of images")
    if grid is None:
        grid = default_grid(params.model, sampler)
    if steps is None:
        steps = default_steps(params.model, sampler)
    steps = validate.positive_int(steps, "steps", " (or None for the default)")
    is_real = isinstance(eta, numbers.Real) and not isinstance(eta, bool)
    if not (is_real and math.isfinite(eta) and 0.0 <= eta <= 1.0):
        raise JvdmUserError(f"eta={eta!r}; expected a number with 0 <= eta <= 1")
    if eta != 0.0 and sampler != "ddim":
        raise JvdmUserError(f"eta={eta!r} applies only to sampler='ddim'; got sampler={sampler!r}")
    batch_size = DEFAULT_BATCH_SIZE if batch_size is None else batch_size
    return steps, validate.positive_int(batch_size, "batch_size", " (or None)"), grid


# ------------------------------------------------------------------------------------------------
# Grids.


@functools.partial(jax.jit, static_argnames=("steps", "grid"))
def _grid_jit(params, *, steps: int, grid: str):
    g = gamma_grid(params, steps, grid)
    if grid == "time":
        i = jnp.arange(steps + 1, dtype=jnp.float32)
        return (steps - i) / steps, g
    t = time_from_gamma(params, g)
    return t.at[0].set(1.0).at[-1].set(0.0), g


def sampling_grid(
    params, steps: int | None = None, sampler: str = "ancestral", grid: str | None = None
):
    """The ``(t, gamma)`` grid a sampler visits, each ``[steps + 1]``, from ``t = 1`` to ``t = 0``.

    ``steps`` and ``grid`` as in :func:`sample`. On a grid uniform in ``lambda = -gamma/2``, ``t``
    comes from :func:`time_from_gamma`; the samplers themselves use only ``gamma``.
    """
    steps, _, grid = _check_args(params, 1, steps, sampler, 0.0, None, grid)
    t, g = _grid_jit(params, steps=steps, grid=grid)
    return np.asarray(t), np.asarray(g)


# ------------------------------------------------------------------------------------------------
# The compiled program.


def _per_image_normal(keys, shape, tag):
    """One standard normal draw of ``shape`` per image key, distinct for each integer ``tag``."""
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, tag), shape))(keys)


def _run_chain(params, keys, eta, fit, *, steps, sampler, grid, gaussian_steps=0):
    """``z_0`` for a batch of per-image keys ``[B]``; with ``gaussian_steps = k > 0`` the first
    ``k`` steps take their ``x0_hat`` from the Gaussian ``fit``'s posterior mean."""
    shape = params.model.image_shape
    spec = SAMPLERS[sampler]
    g = gamma_grid(params, steps, grid)
    z = _per_image_normal(keys, shape, 0)  # z_1 ~ N(0, I), the prior
    noise_fn = (lambda i: _per_image_normal(keys, shape, i + 1)) if spec.uses_noise else None
    predict = None
    if gaussian_steps:
        gaussian = functools.partial(ref.gaussian_denoiser, fit=fit)
        predict = switched_predict(params, gaussian, switch=g[gaussian_steps])
    return run(params, spec, z, g, eta, noise_fn, predict=predict)


def switched_predict(params, reference, *, switch):
    """A sampler's ``predict(z, gamma) -> (eps_hat, x0_hat)``: ``reference(z_flat, gamma) ->
    x0_flat`` (a :mod:`jvdm.reference_denoisers` function on flattened images) at ``gamma >
    switch``, the grid's first and noisiest steps, and the model's
    (:func:`jvdm.model.predict_eps_x0`) elsewhere."""

    def from_reference(z, g):
        x0_hat = reference(z.reshape(z.shape[0], -1), g).reshape(z.shape)
        alpha, sigma = _alpha_sigma(g)
        return (z - alpha * x0_hat) / sigma, x0_hat

    def model(z, g):
        return model_lib.predict_eps_x0(params, z, g)

    return lambda z, g: jax.lax.cond(g > switch, from_reference, model, z, g)


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


def _generate(params, keys, eta, fit, *, decode, **chain):
    """The traced body of one chunk: the chain, then the decoder (or the latents)."""
    z_0 = _run_chain(params, keys, eta, fit, **chain)
    return _decode(params, z_0, keys, chain["steps"]) if decode else z_0


_STATIC = ("steps", "sampler", "grid", "gaussian_steps", "decode", "sharding")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _sample_chunk(params, key, indices, eta, fit, *, sharding, **static):
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, indices)
    if sharding is not None:
        keys = jax.lax.with_sharding_constraint(keys, sharding)
    return _generate(params, keys, eta, fit, **static)


def _check_gaussian(params, steps: int, fit, gaussian_steps) -> int:
    if isinstance(gaussian_steps, numbers.Integral) and gaussian_steps == 0:
        return 0
    k = validate.positive_int(gaussian_steps, "gaussian_steps", " (or 0: the model all the way)")
    if k >= steps:
        raise JvdmUserError(
            f"gaussian_steps={k} must be below steps={steps}: the model takes the steps after it"
        )
    dim = math.prod(params.model.image_shape)
    kinds = (ref.GaussianFit, ref.MixtureFit)
    if not isinstance(fit, kinds) or ref.fit_dim(fit) != dim:
        got = f"{ref.fit_dim(fit)} values" if isinstance(fit, kinds) else type(fit).__name__
        raise JvdmUserError(
            f"gaussian_steps={k} needs gaussian_fit, a GaussianFit or MixtureFit of the training "
            f"images flattened to {dim} values (jvdm.reference_denoisers.fit_split); got {got}"
        )
    return k


def _sample(
    params, key, n, *, steps, sampler, eta, batch_size, grid, decode, gaussian_fit, gaussian_steps
) -> np.ndarray:
    steps, batch_size, grid = _check_args(params, n, steps, sampler, eta, batch_size, grid)
    gaussian_steps = _check_gaussian(params, steps, gaussian_fit, gaussian_steps)
    fit = gaussian_fit if gaussian_steps else None
    # A chunk of at least one image per device is rounded up to a multiple of the device count (at
    # most ``devices - 1`` extra images, discarded) and sharded on the batch axis.
    chunk, sharding = parallel.local_batch_layout(min(n, batch_size))
    if sharding is not None:
        # Replicate the parameters on the mesh once, not per chunk.
        replicated = parallel.replicated_sharding(sharding.mesh)
        params, key, fit = jax.device_put((params, key, fit), replicated)
    else:
        # One local device; parameters replicated over a mesh would run the program on each.
        params, key, fit = jax.device_put((params, key, fit), jax.local_devices()[0])
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
            fit,
            steps=steps,
            sampler=sampler,
            grid=grid,
            gaussian_steps=gaussian_steps,
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
    grid: str | None = None,
    gaussian_fit=None,
    gaussian_steps: int = 0,
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
      grid: the noise levels visited, ``"lambda"`` (uniform in ``lambda = -gamma/2`` between the
        schedule's end points), ``"karras"`` (uniform in ``(sigma / alpha)^(1/7)`` between them,
        Karras et al. 2022: shorter steps at the noisy end) or ``"time"`` (``t_i = i / steps``);
        default ``"time"`` for ancestral sampling of a discrete-time model (its bound's own
        chain), ``"karras"`` for ancestral sampling of a continuous-time one, else ``"lambda"``
        (:func:`default_grid`). On a linear schedule ``"lambda"`` and ``"time"`` coincide.
      gaussian_fit: a :class:`jvdm.reference_denoisers.GaussianFit` of the training images
        (:func:`jvdm.reference_denoisers.fit_gaussian`), used with ``gaussian_steps``.
      gaussian_steps: ``k > 0``: the first ``k`` of the ``steps`` steps (the noisiest) take their
        prediction ``x0_hat`` from the posterior mean of data distributed as that Gaussian, the
        best linear denoiser of the training images, instead of the model; the rest of the
        chain, its noise and grid are unchanged. At high noise a trained denoiser is close to
        the Gaussian one (Wang & Vastola 2024) or, trained briefly, worse
        (``bench/denoiser_oracle.py``). 0 (default): the model throughout.

    Returns:
      uint8 ``[n, H, W, C]`` (a NumPy array on the host).

    Raises:
      ValueError: for ``n <= 0``, ``steps <= 0``, an unknown sampler or grid, ``eta`` outside
        ``[0, 1]``, or ``gaussian_steps`` not below ``steps`` or without a ``gaussian_fit`` of the
        model's image size.
    """
    opts = dict(steps=steps, sampler=sampler, eta=eta, batch_size=batch_size, grid=grid)
    opts.update(gaussian_fit=gaussian_fit, gaussian_steps=gaussian_steps)
    return _sample(params, key, n, decode=True, **opts)


def sample_latents(
    params: model_lib.VDMParams,
    key: jax.Array,
    n: int,
    *,
    steps: int | None = None,
    sampler: str = "ancestral",
    eta: float = 0.0,
    batch_size: int | None = None,
    grid: str | None = None,
    gaussian_fit=None,
    gaussian_steps: int = 0,
) -> np.ndarray:
    """Like :func:`sample` but returns the continuous latent ``z_0`` (float32 ``[n, H, W, C]``),
    before the decoder: ``z_0 ~ alpha_0 x + sigma_0 eps`` with ``x`` in model space ``[-1, 1]``.

    With the same arguments, ``sample`` decodes exactly these latents.
    """
    opts = dict(steps=steps, sampler=sampler, eta=eta, batch_size=batch_size, grid=grid)
    opts.update(gaussian_fit=gaussian_fit, gaussian_steps=gaussian_steps)
    return _sample(params, key, n, decode=False, **opts)
