r"""The probability-flow ODE likelihood of a VDM (diffrax, Hutchinson or exact divergence).

The forward process ``z = alpha x + sigma eps`` with ``alpha^2 = sigmoid(-gamma)``,
``sigma^2 = sigmoid(gamma)`` has the probability-flow ODE (Song et al. 2021, eq. 13) whose
marginals equal the diffusion's. Written with ``gamma`` itself as the time variable (``gamma(t)`` is
monotone, so this is only a change of variable of the same ODE),

.. math:: \frac{dz}{d\gamma} = \tfrac12\,(\sigma\,\hat\epsilon(z, \gamma) - \sigma^2 z),

since ``d log alpha / d gamma = -sigma^2 / 2`` and ``g^2 = sigma^2 gamma'``, and the score is
``-eps_hat / sigma``. The denoiser is conditioned on ``gamma``, so the ODE needs only the schedule's
end points ``gamma(0), gamma(1)``: the learned interior (trained for low ELBO variance) does not
change the likelihood, nor the solver's work.

The instantaneous change of variables (Chen et al. 2018, theorem 1) gives
``log p_0(z_0) = log N(z_1; 0, I) + \int_{gamma(0)}^{gamma(1)} div f(z, gamma) d gamma``, the
first term being the prior. The divergence is Hutchinson's ``E_v[v^T (df/dz) v]`` with ``probes``
Rademacher vectors per image, fixed along the trajectory and *averaged* (divided by ``probes``), or
exact (``exact=True``: one VJP per dimension, for small images).

The ``t = 0`` end (Zheng et al. 2023, *Improved Techniques for Maximum Likelihood Estimation for
Diffusion ODEs*, ICML, section 4 and remark A.2): the ODE starts at the model's own ``gamma(0)``
from a dequantized latent ``z_0 ~ q(z_0 | x)`` whose support is the bin of ``x`` scaled by
``alpha_0`` (bins of width ``2 / vocab`` in ``[-1, 1]``); disjoint supports make
``log P(x) >= E_q[log p_0(z_0) - log q(z_0 | x)]``:

* ``"uniform"``: ``z_0 = alpha_0 (x + u)``, ``u ~ U(-1/vocab, 1/vocab)^D``, ``log q = -D log(alpha_0
  2/vocab)`` (the usual uniform dequantization; the ``alpha_0`` factor is exact change of
  variables, where score_sde and i-DODE feed ``x + u`` itself, add 7 bits and, for this reason,
  start at a larger ``gamma`` than the model's: here the start stays at ``gamma(0)``);
* ``"truncated_normal"`` (i-DODE, training-free): ``z_0 = alpha_0 x + sigma_0 e`` with ``e`` the
  standard normal truncated to ``|e| <= tau = exp(-gamma(0)/2) / vocab`` (the bin's half-width in
  noise units), so the dequantization noise *is* the diffusion's noise at ``gamma(0)`` up to the
  truncation, and ``log q = sum(-e^2/2 - log(sqrt(2 pi) sigma_0) - log erf(tau / sqrt 2))``.

Data parallel: the state is one global array sharded over the batch axis and the controller's error
norm is the *maximum over the global batch* of each image's RMS error, a global reduction inside the
one compiled program; so every device and every process takes the same steps (no rank can leave the
loop early), and an image's accuracy does not dilute with the batch size. Randomness is per image
(``fold_in(key, index)``), so results do not depend on the device count.

References:
  Song et al., *Score-Based Generative Modeling through SDEs* (arXiv 2011.13456), eq. 13, appx. D.
  Zheng et al., *Improved Techniques for Maximum Likelihood Estimation for Diffusion ODEs*
  (arXiv 2305.03935), sec. 4.
  Hutchinson (1989); Grathwohl et al., *FFJORD* (arXiv 1810.01367).
"""

from __future__ import annotations

import math
import time
from typing import NamedTuple

import jax
import numpy as np

from jvdm import model as model_lib
from jvdm import ode_flow, parallel, validate
from jvdm.errors import JvdmUserError

__all__ = [
    "DEQUANTIZATIONS",
    "SOLVERS",
    "OdeBpd",
    "OdeLogLikelihood",
    "decode",
    "encode",
    "ode_bpd",
    "ode_log_likelihood",
]

DEQUANTIZATIONS = ("truncated_normal", "uniform")
SOLVERS = tuple(ode_flow.SOLVERS)
DEFAULT_BATCH_SIZE = 128


class OdeBpd(NamedTuple):
    """Per-image results of :func:`ode_bpd` (NumPy, on the host).

    Attributes:
      bpd: ``[N]`` bits per dimension (a bound on ``-log2 P(x) / D`` per image).
      nfe: ``[N]`` denoiser evaluations of the solve that image was part of.
    """

    bpd: np.ndarray
    nfe: np.ndarray


class OdeLogLikelihood(NamedTuple):
    """Per-example results of :func:`ode_log_likelihood`.

    Attributes:
      log_p: ``[N]`` log-density of ``z_0`` at ``gamma(0)`` in nats.
      z_1: ``[N, H, W, C]`` the ODE's end point at ``gamma(1)``.
      nfe: ``[N]`` denoiser evaluations.
    """

    log_p: np.ndarray
    z_1: np.ndarray
    nfe: np.ndarray


# ------------------------------------------------------------------------------------------------
# Host side: checks, chunks of one shape, global arrays.


def _check_solve(params, solver, rtol, atol, max_steps) -> dict:
    validate.check_params(params, model_lib.VDMParams)
    if solver not in SOLVERS:
        raise JvdmUserError(f"solver={solver!r}; expected one of {SOLVERS}")
    for name, tol in (("rtol", rtol), ("atol", atol)):
        if not (isinstance(tol, int | float) and math.isfinite(tol) and 0.0 < tol < 1.0):
            raise JvdmUserError(f"{name}={tol!r}; expected a tolerance with 0 < {name} < 1")
    max_steps = validate.positive_int(max_steps, "max_steps")
    return {"solver": solver, "rtol": float(rtol), "atol": float(atol), "max_steps": max_steps}


def _check_latents(params, z) -> np.ndarray:
    z = np.asarray(z, np.float32)
    shape = tuple(params.model.image_shape)
    if z.ndim != 4 or z.shape[1:] != shape or z.shape[0] < 1:
        raise JvdmUserError(f"latents have shape {z.shape}; expected float [N, {shape}]")
    return z


def _global(x: np.ndarray, sharding) -> jax.Array:
    """The same host array on every process -> one global array (valid because all agree)."""
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def _chunks(fn, params, data: np.ndarray, key, *, batch_size: int, **kwargs):
    """Runs ``fn`` on chunks of ``batch_size`` (padded to one shape, a multiple of the devices)."""
    mesh = parallel.make_mesh()
    devices = mesh.devices.size
    chunk = -(-min(len(data), batch_size) // devices) * devices
    params = parallel.replicate(params, mesh)
    args = () if key is None else (parallel.replicate(key, mesh),)
    rows, out = parallel.batch_sharding(mesh), parallel.replicated_sharding(mesh)
    results = []
    for start in range(0, len(data), chunk):
        idx = np.arange(start, min(start + chunk, len(data)), dtype=np.uint32)
        # Padding repeats the chunk's first image with its own index: an identical trajectory,
        # so the controller's max-over-images norm, and every answer, are unchanged.
        idx = np.concatenate([idx, np.full(chunk - len(idx), idx[0], np.uint32)])
        x = _global(data[idx], rows)
        extra = (_global(idx, rows),) if key is not None else ()
        result = fn(params, x, *args, *extra, out=out, **kwargs)
        results.append((len(set(idx.tolist())), jax.device_get(result)))
    return results


def _raise_unless_ok(ok, max_steps) -> None:
    if not bool(np.all(ok)):
        raise JvdmUserError(
            f"the ODE solver did not reach the end within max_steps={max_steps}; raise max_steps "
            "or loosen rtol/atol"
        )


def ode_bpd(
    params: model_lib.VDMParams,
    images,
    key: jax.Array,
    *,
    probes: int = 1,
    exact: bool = False,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    dequantization: str = "truncated_normal",
    solver: str = "tsit5",
    max_steps: int = 4096,
    batch_size: int | None = None,
) -> OdeBpd:
    """Per-image bits per dimension of 8-bit images under the probability-flow ODE.

    Args:
      params: the model's parameters (e.g. from :func:`jvdm.load`).
      images: uint8 ``[N, H, W, C]``; in a multi-process run every process passes the same images.
      key: randomness for the dequantization and the probes (image ``i`` uses ``fold_in(key, i)``).
      probes: Rademacher probes per image for Hutchinson's divergence estimate.
      exact: the exact divergence instead (one VJP per dimension; small images only).
      rtol, atol: the adaptive solver's tolerances.
      dequantization: ``"truncated_normal"`` (i-DODE) or ``"uniform"``.
      solver: ``"tsit5"`` or ``"dopri5"``.
      max_steps: the most solver steps per chunk before giving up.
      batch_size: images per solve (one compiled program for every chunk); default 128.

    Returns:
      :class:`OdeBpd` with ``bpd [N]`` and ``nfe [N]``.

    References: Zheng et al. 2023 (arXiv 2305.03935), sec. 4; Song et al. 2021, appendix D.
    """
    solve = _check_solve(params, solver, rtol, atol, max_steps)
    validate.check_images(images, params.model.image_shape)
    if dequantization not in DEQUANTIZATIONS:
        raise JvdmUserError(f"dequantization={dequantization!r}; expected one of {DEQUANTIZATIONS}")
    probes = validate.positive_int(probes, "probes")
    batch_size = validate.positive_int(batch_size or DEFAULT_BATCH_SIZE, "batch_size")
    images = np.asarray(images)
    results = _chunks(
        ode_flow.bpd_chunk,
        params,
        images,
        key,
        batch_size=batch_size,
        probes=probes,
        exact=bool(exact),
        dequantization=dequantization,
        **solve,
    )
    _raise_unless_ok([r[1][2] for r in results], max_steps)
    bpd = np.concatenate([np.asarray(r[0])[:m] for m, r in results])
    nfe = np.concatenate([np.full(m, int(r[1])) for m, r in results])
    return OdeBpd(bpd=bpd, nfe=nfe)


def ode_log_likelihood(
    params: model_lib.VDMParams,
    z_0,
    key: jax.Array,
    *,
    probes: int = 1,
    exact: bool = False,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    solver: str = "tsit5",
    max_steps: int = 4096,
    batch_size: int | None = None,
) -> OdeLogLikelihood:
    """The ODE model's log-density of continuous latents ``z_0`` at ``gamma(0)``, in nats.

    No dequantization: ``z_0`` float ``[N, H, W, C]`` is the state where the ODE starts. Arguments
    as in :func:`ode_bpd`.
    """
    solve = _check_solve(params, solver, rtol, atol, max_steps)
    z_0 = _check_latents(params, z_0)
    solve["probes"] = validate.positive_int(probes, "probes")
    batch_size = validate.positive_int(batch_size or DEFAULT_BATCH_SIZE, "batch_size")
    results = _chunks(
        ode_flow.loglik_chunk, params, z_0, key, batch_size=batch_size, exact=bool(exact), **solve
    )
    _raise_unless_ok([r[1][3] for r in results], max_steps)
    return OdeLogLikelihood(
        log_p=np.concatenate([np.asarray(r[0])[:m] for m, r in results]),
        z_1=np.concatenate([np.asarray(r[1])[:m] for m, r in results]),
        nfe=np.concatenate([np.full(m, int(r[2])) for m, r in results]),
    )


def _flow(params, z, *, up, rtol=1e-5, atol=1e-5, solver="tsit5", max_steps=4096, batch_size=None):
    solve = _check_solve(params, solver, rtol, atol, max_steps)
    z = _check_latents(params, z)
    batch_size = validate.positive_int(batch_size or DEFAULT_BATCH_SIZE, "batch_size")
    results = _chunks(ode_flow.flow_chunk, params, z, None, batch_size=batch_size, up=up, **solve)
    _raise_unless_ok([r[2] for _, r in results], max_steps)
    return np.concatenate([np.asarray(r[0])[:m] for m, r in results])


def encode(params: model_lib.VDMParams, z_0, **solve) -> np.ndarray:
    """``z_1``: the ODE from ``gamma(0)`` to ``gamma(1)`` applied to ``z_0 [N, H, W, C]``.

    Keyword arguments ``rtol, atol, solver, max_steps, batch_size`` as in :func:`ode_bpd`.
    """
    return _flow(params, z_0, up=True, **solve)


def decode(params: model_lib.VDMParams, z_1, **solve) -> np.ndarray:
    """``z_0``: the ODE from ``gamma(1)`` back to ``gamma(0)``; the inverse of :func:`encode`."""
    return _flow(params, z_1, up=False, **solve)


def evaluate_split_ode(
    params: model_lib.VDMParams,
    *,
    dataset: str,
    split: str,
    key: jax.Array,
    data_dir=None,
    **kwargs,
) -> dict:
    """:func:`ode_bpd` over a whole split (tfds slicing allowed: ``'test[:100]'``): the mean and
    its standard error over images, the evaluations per solve and the seconds it took."""
    from jvdm import data as data_lib  # local: the maths never needs tfds

    images = data_lib.load_split_array(dataset, split, data_dir)
    start = time.perf_counter()
    result = ode_bpd(params, images, key, **kwargs)
    seconds = time.perf_counter() - start
    n = len(result.bpd)
    sem = float(np.std(result.bpd, ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    return {
        "ode_bpd_mean": float(np.mean(result.bpd)),
        "ode_bpd_sem": sem,
        "ode_num_images": n,
        "ode_nfe_mean": float(np.mean(result.nfe)),
        "ode_seconds": seconds,
        **{f"ode_{k}": v for k, v in kwargs.items()},
    }


def side_by_side(result: dict) -> str:
    """One line: the ELBO and the ODE bpd of :func:`evaluate_split_ode`, with standard errors."""
    return (
        f"ELBO {result['bpd_mean']:.4f} ± {result['bpd_sem']:.4f} bpd | ODE "
        f"{result['ode_bpd_mean']:.4f} ± {result['ode_bpd_sem']:.4f} bpd (mean ± SEM over "
        f"{result['ode_num_images']} images; {result.get('ode_probes')} probes, "
        f"{result['ode_nfe_mean']:.0f} evaluations, {result['ode_seconds']:.1f} s)"
    )
