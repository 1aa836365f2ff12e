r"""The per-example variance of the diffusion-loss estimate under several densities of the noise
level, for one denoiser, from one set of its evaluations.

Derivation. The denoiser is conditioned on ``gamma``, not on ``t``, so in continuous time the
ELBO's diffusion term (VDM eq. 17 with ``dt = dgamma / gamma'(t)``) involves the schedule only
through its end points ``gamma_0 = gamma(0)``, ``gamma_1 = gamma(1)``:

.. math::
  L(x) = \int_{\gamma_0}^{\gamma_1} f_x(\gamma)\, d\gamma, \qquad
  f_x(\gamma) = \tfrac12 E_\epsilon \|\epsilon - \hat\epsilon(z_\gamma, \gamma)\|^2 .

With ``gamma = gamma_0 + u Delta``, ``Delta = gamma_1 - gamma_0``, a schedule ``S`` with these end
points and ``t`` uniform is the density ``q_S(u) = Delta / gamma_S'(t_S(u))`` of ``u`` on
``[0, 1]``, and its one-sample estimator ``0.5 gamma_S'(t) ||eps - eps_hat||^2`` is
``g(u) / q_S(u)`` with ``g(u) = Delta 0.5 ||eps - eps_hat||^2`` (the change of variables of
:mod:`jvdm.noise_sampling`; VDM++ section 5), of variance, for the example ``x``,

.. math::
  V_q(x) = \int_0^1 E_\epsilon[g(u)^2] / q(u)\, du - L(x)^2 .

So the same values ``g(u_j)`` give ``L`` and ``V_q`` for every density at once, for the same
denoiser: the variance that VDM's variance gradient (appendix I.2) and the adaptive histogram
(VDM++ section 5) each minimise over ``q``.

Points. Each example gets ``G`` levels on two lattices of ``K = G / 2`` points,
``u = (k + r_l) / K``, ``k < K``, with shifts ``r_0, r_1 ~ U(0, 1)`` of its own and one ``eps``
per point. Each lattice's mean ``L_l`` of ``g`` is an unbiased, stratified estimate of ``L``; the
two are independent, so ``L_0 L_1`` is unbiased for ``L^2`` (the square of one mean is not), and
``mean(g^2 / q) - L_0 L_1`` over the ``G`` points is unbiased for ``V_q``. The shifts are drawn per
example rather than shared: the denoiser takes one ``gamma`` per image anyway, so this costs
nothing, and the examples' discretisation errors are independent and average out over the batch
instead of adding up (a shared lattice would miss the same structure of ``f`` in every example).

Densities (values of ``q`` at the points; every one integrates to 1 over ``[0, 1]``):

* ``"learned"``: the model's own schedule (learned, linear, cosine or DDPM's; named after the
  default run's), inverted on 8,193 times by piecewise-linear, monotone interpolation of
  ``t(gamma)``, with ``gamma'`` by forward mode at the inverted time.
* ``"linear"``: ``q = 1``, ``gamma`` linear in ``t`` (:class:`jvdm.nn.gamma.FixedLinearGamma`).
* ``"cosine"``: :class:`jvdm.nn.gamma.CosineGamma` with the model's end points, i.e.
  ``gamma(t) = 2 log tan(theta)`` with ``theta = a t + b``, ``b = arctan(e^{gamma_0 / 2})``,
  ``a = pi/2 - b - arctan(e^{-gamma_1 / 2})``: Nichol & Dhariwal's cosine in log-SNR cut at
  ``gamma_0`` and ``gamma_1`` and stretched over ``t`` in ``[0, 1]``. Since
  ``sin^2 theta = sigmoid(gamma) = sigma^2``, ``gamma'(t) = 4 a / sin(2 theta)`` gives
  ``q(u) = Delta alpha sigma / (2 a)`` in closed form.
* ``"adaptive"`` (only with a ``histogram``): the piecewise-constant density that
  ``noise_sampling="adaptive"`` draws from, ``K_h p_k`` on bin ``k``
  (:func:`jvdm.noise_sampling.bin_probabilities`).
* ``"band"`` (only for a model with ``noise_sampling="band"``): the density it draws from,
  ``(1 - f) + f 1[a <= u < b] / (b - a)`` (:func:`jvdm.noise_sampling.band_positions`).
* ``"optimal"``: ``q* ∝ sqrt(E[g^2])``, the minimiser of ``E_x V_q(x)`` over densities that do not
  depend on the example, piecewise constant on the ``K`` strata and fitted to the batch's points
  it is then evaluated on. A lower bound for every schedule and histogram, optimistic by
  construction (fitted in-sample; a batch of one example gives that example's own optimum).

What is measured: the ELBO's estimator (``w = 1``) in continuous time, whatever the model's
training weighting or ``T`` (evaluation always reports the ELBO; for a discrete-time model this is
the ``T -> infinity`` bound of its denoiser), in bits per dimension (variances in bpd^2). With
``objective=True``, the estimator of the training objective's weighted diffusion term instead
(:mod:`jvdm.weighting`, VDM++ eq. 7): ``g`` times the model's weighting ``w(lambda)``,
``lambda = -gamma``, at the same points. That is the variance the learned schedule's interior is
trained to lower (the variance gradient of a run that trains on a weighting differentiates the
weighted estimate, :mod:`jvdm.objective`), so for such a run the ELBO's variance alone says little
about the schedule.

These are variances of the one-sample, unstratified estimator of one example. The batch's
antithetic times do not change them (each example's ``t`` is still uniform); they lower only the
variance of the batch mean, through correlations between examples that are not measured here.

References: Kingma et al., *Variational Diffusion Models* (arXiv 2107.00630) eq. 17 and appendix
I.2; Kingma & Gao 2023 (arXiv 2303.00848) section 5; Nichol & Dhariwal (arXiv 2102.09672).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jvdm import losses, noise_sampling, validate, weighting
from jvdm import model as model_lib
from jvdm.errors import JvdmUserError
from jvdm.nn import gamma as gamma_lib

__all__ = [
    "DEFAULT_GRID",
    "DENSITIES",
    "LossVariance",
    "Points",
    "combine",
    "cosine_density",
    "per_example",
    "points",
]

DENSITIES = ("learned", "linear", "cosine", "adaptive", "band", "optimal")
DEFAULT_GRID = 128
_INVERSE_GRID = 8192  # intervals of the time grid on which the model's schedule is inverted


class Points(NamedTuple):
    """The per-example values behind :class:`LossVariance`.

    Attributes:
      g: ``[B, 2, K]`` ``g(u) = Delta 0.5 ||eps - eps_hat||^2`` in bpd at ``u = (k + r_l) / K``.
      density: ``{name: [B, 2, K]}`` each density's ``q(u)`` at the same points (not the optimal
        one, which depends on the whole batch: :func:`combine`).
      weight: ``[B, 2, K]`` the model's training weighting ``w(lambda)`` at the same points (1
        for the ELBO).
    """

    g: jax.Array
    density: dict[str, jax.Array]
    weight: jax.Array


class LossVariance(NamedTuple):
    """``diffusion_bpd`` ``[B]``: each example's estimate of its diffusion term ``L`` in bpd;
    ``variance``: ``{density: [B]}`` the variance (bpd^2) of the one-sample estimate of ``L``
    with ``u`` drawn from that density."""

    diffusion_bpd: jax.Array
    variance: dict[str, jax.Array]


def _check_grid(grid) -> int:
    grid = validate.positive_int(grid, "grid", " number of noise levels per image")
    if grid < 2 or grid % 2:
        raise JvdmUserError(
            f"grid={grid!r}; expected an even number >= 2 of noise levels per image (two "
            "shifted lattices of grid / 2 levels each)"
        )
    return grid


def _model_space(model: model_lib.VDM, images) -> jax.Array:
    """uint8 images -> ``[-1, 1]`` (as the bound sees them); float data is taken as model space."""
    if jnp.issubdtype(getattr(images, "dtype", np.uint8), jnp.floating):
        if images.ndim != 4 or tuple(images.shape[1:]) != tuple(model.image_shape):
            raise JvdmUserError(
                f"images have shape {tuple(images.shape)}; expected uint8 [B, "
                f"{', '.join(map(str, model.image_shape))}], or float data of that shape"
            )
        return jnp.asarray(images, jnp.float32)
    validate.check_images(images, model.image_shape)
    return losses.scale_pixels(images, model.vocab_size)


def cosine_density(gamma: jax.Array, gamma_0, gamma_1) -> jax.Array:
    """``q(u) = Delta alpha sigma / (2 a)`` of :class:`jvdm.nn.gamma.CosineGamma` with end points
    ``gamma_0, gamma_1``, at ``gamma = gamma_0 + u Delta`` (see the module's docstring)."""
    b = jnp.arctan(jnp.exp(0.5 * gamma_0))
    a = 0.5 * math.pi - b - jnp.arctan(jnp.exp(-0.5 * gamma_1))
    alpha_sigma = jnp.sqrt(jax.nn.sigmoid(-gamma) * jax.nn.sigmoid(gamma))
    return (gamma_1 - gamma_0) * alpha_sigma / (2.0 * a)


def _densities(params, gamma, ends, histogram) -> dict[str, jax.Array]:
    """Each density's ``q`` at the levels ``gamma`` (any shape) between ``ends``."""
    model = params.model
    fn = lambda t: model.schedule.apply(params.schedule, t)
    g_0, g_1 = ends
    delta = g_1 - g_0
    t_grid = jnp.linspace(0.0, 1.0, _INVERSE_GRID + 1, dtype=jnp.float32)
    t = jnp.interp(gamma, fn(t_grid), t_grid)  # t(gamma), monotone: gamma(t) increases
    _, dgamma_dt = gamma_lib.gamma_and_derivative(fn, t)
    out = {
        "learned": delta / dgamma_dt,
        "linear": jnp.ones_like(gamma),
        "cosine": cosine_density(gamma, g_0, g_1),
    }
    if histogram is not None:
        probs = noise_sampling.bin_probabilities(
            histogram, uniform_fraction=model.histogram_uniform_fraction
        )
        k = probs.shape[0]
        u = (gamma - g_0) / delta
        out["adaptive"] = k * probs[jnp.clip(jnp.floor(u * k).astype(jnp.int32), 0, k - 1)]
    if model.noise_sampling == "band":
        interval = noise_sampling.band_interval(g_0, g_1, model.band_log_snr)
        u = (gamma - g_0) / delta
        out["band"] = noise_sampling.band_density(u, interval, fraction=model.band_fraction)
    return out


def points(params: model_lib.VDMParams, images, key, *, grid: int = DEFAULT_GRID, histogram=None):
    """The :class:`Points` of a batch: ``grid`` denoiser evaluations per example (pure, jittable;
    ``grid`` static). Each example's randomness is ``fold_in(key, row)``, so a row's values do not
    depend on the batch around it (padding, sharding)."""
    validate.check_params(params, model_lib.VDMParams)
    bins = _check_grid(grid) // 2
    x = _model_space(params.model, images)
    batch = x.shape[0]
    model = model_lib.with_timesteps(params, 0).model  # the continuous-time ELBO's estimator
    g_0, g_1 = model.schedule.apply(params.schedule, jnp.array([0.0, 1.0], jnp.float32))
    delta = g_1 - g_0
    keys = jax.vmap(lambda i: jax.random.split(jax.random.fold_in(key, i)))(jnp.arange(batch))
    shifts = jax.vmap(lambda k: jax.random.uniform(k, (2,)))(keys[:, 0])  # [B, 2]
    x2 = jnp.repeat(x, 2, axis=0)  # rows (example, lattice)

    def at(k):  # point k of both lattices of every example: one denoiser call on 2B images
        g_t = (g_0 + (k + shifts) / bins * delta).reshape(-1)
        normal = lambda kk: jax.random.normal(jax.random.fold_in(kk, k), (2, *x.shape[1:]))
        eps = jax.vmap(normal)(keys[:, 1]).reshape(x2.shape)
        sv = model_lib.ScheduleValues(g_t, jnp.full_like(g_t, delta), g_t, g_0, g_1)
        nats = model_lib._diffusion_term(model, params.denoiser, x2, eps, sv, None, train=False)
        return losses.bpd_from_nats(nats, model.num_dims).reshape(batch, 2)

    g = jnp.moveaxis(jax.lax.map(at, jnp.arange(bins)), 0, -1)  # [B, 2, K]
    u = (jnp.arange(bins, dtype=jnp.float32)[None, None, :] + shifts[:, :, None]) / bins
    gamma = g_0 + u * delta
    trained = params.model  # its weighting (model above is the ELBO's estimator)
    weight = weighting.diffusion_weight(
        -gamma,
        weighting=trained.weighting,
        sigmoid_bias=trained.sigmoid_bias,
        sigmoid_scale=trained.sigmoid_scale,
    )
    return Points(g, _densities(params, gamma, (g_0, g_1), histogram), weight.astype(g.dtype))


def _optimal_density(g2: jax.Array) -> jax.Array:
    """``q*`` ``[K]`` on the strata, ``∝ sqrt(mean g^2)`` over the batch, with mean 1."""
    root = jnp.sqrt(jnp.mean(g2, axis=(0, 1)))
    total = jnp.mean(root)
    return jnp.where(total > 0, root / jnp.where(total > 0, total, 1.0), 1.0)


def combine(pts: Points, *, objective: bool = False) -> LossVariance:
    """Per-example ``L`` and variances from :class:`Points` (jittable; ``objective`` static). Only
    ``"optimal"`` mixes the examples (its density is fitted to the batch). ``objective=True``:
    those of the training objective's weighted diffusion term, ``w g`` (the module's docstring).

    ``V = mean(g^2 / q) - L_0 L_1`` (lattice means ``L_l``) is computed without its terms of size
    ``L^2``, which cancel to float32 rounding when ``V << L^2``: with each lattice's ``g`` centred
    on the other's mean, ``mean((g - L_other q)^2 / q) - (L_0 - L_1)^2 / 2``, less
    ``L_other^2 (mean_l(q) - 1) / 2`` per lattice, is the same estimator in exact arithmetic.
    """
    g = pts.g * pts.weight if objective else pts.g
    means = jnp.mean(g, axis=-1)  # [B, 2]: one unbiased estimate of L per lattice
    other = means[:, ::-1]
    spread = 0.5 * jnp.square(means[:, 0] - means[:, 1])
    density = {**pts.density, "optimal": _optimal_density(jnp.square(g))[None, None, :]}

    def variance(name):
        q = density[name]
        centred = jnp.mean(jnp.square(g - other[:, :, None] * q) / q, axis=(1, 2)) - spread
        if name == "optimal":  # its mean over the strata is 1 by construction
            return centred
        drift = jnp.mean(q - 1.0, axis=-1)  # [B, 2]: each lattice's error in int q = 1
        return centred - 0.5 * jnp.sum(jnp.square(other) * drift, axis=-1)

    names = [name for name in DENSITIES if name in density]
    return LossVariance(jnp.mean(means, axis=-1), {k: variance(k) for k in names})


def per_example(
    params: model_lib.VDMParams,
    images,
    key,
    *,
    grid: int = DEFAULT_GRID,
    histogram=None,
    objective: bool = False,
) -> LossVariance:
    """Per-example diffusion term and its estimator's variance under each density (pure,
    jittable with ``grid`` static).

    Args:
      params: the model's parameters (any schedule; any weighting: the ELBO is measured unless
        ``objective``).
      images: uint8 ``[B, H, W, C]``, or float data ``[B, H, W, C]`` in model space.
      key: randomness of the levels' shifts and of ``eps``.
      grid: noise levels per example (even, >= 2): ``B * grid`` denoiser evaluations.
      histogram: ``[2, K_h]`` a loss histogram (:mod:`jvdm.noise_sampling`), for ``"adaptive"``.
      objective: measure the training objective's weighted diffusion term instead of the ELBO's
        (static; the same for a model trained on the ELBO).

    Returns:
      :class:`LossVariance`, in bpd and bpd^2, with the densities of :data:`DENSITIES`
      (``"adaptive"`` only with a histogram, ``"band"`` only for a model that draws from it).
    """
    return combine(points(params, images, key, grid=grid, histogram=histogram), objective=objective)
