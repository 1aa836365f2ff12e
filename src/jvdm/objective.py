"""The training objective of a :class:`jvdm.model.VDM` and the gradients used to train it.

The objective is the bound (bpd) with its diffusion term weighted by ``w(lambda)``
(:mod:`jvdm.weighting`; ``"elbo"`` leaves it the bound), its noise levels drawn uniformly in time
or from the loss histogram (:mod:`jvdm.noise_sampling`). The denoiser and the schedule's end
points follow the objective; in continuous time with ``use_variance_gradient`` the schedule's
interior follows the objective's second moment (VDM appendix I.2), estimated through the density
of the noise level (``variance_gradient="density"``, the default) or, as VDM does, through the
loss at the drawn level (``"pathwise"``).

The two estimators of ``d E[L^2] / d eta``. With ``t`` uniform, the noise level
``gamma = gamma_eta(t)`` has density ``p_eta(gamma) = 1 / gamma'(t)`` between the fixed end points,
and the one-sample term is ``L = w(gamma) 0.5 gamma'(t) f(gamma, eps)`` with
``f = ||eps - eps_hat||^2`` (in bpd), so ``E[L^2] = int G(gamma) / p_eta(gamma) dgamma`` with
``G = E_eps[(0.5 w f)^2]``: the interior ``eta`` enters only through the density. Hence

* ``pathwise`` (VDM): differentiate each term at fixed ``t`` and ``eps``,
  ``2 L dL/d eta``, which passes through ``w'(lambda)`` and through the denoiser's derivative with
  respect to its input and its noise level;
* ``density``: differentiate the density at fixed ``gamma``,
  ``d E[L^2] / d eta = E[L^2 d/d eta (log gamma'(t) - gamma''(t) / gamma'(t)^2 sg(gamma(t)))]``
  (``sg``: the value is held, its derivative in ``eta`` taken), which needs only ``L^2`` and the
  schedule's own derivatives.

Both are exact in expectation (``tests/test_variance_gradient.py`` checks each against the
derivative of a float64 closed form). Their noise differs: under the sigmoid-weighted objective of
the default experiment the pathwise one's two parts (through ``w'`` and through the denoiser)
nearly cancel in the mean and not in the noise, and training could not move the interior at batch
16. On a trained model (``bench/variance_gradient.py``) the density estimate's coordinates lay 25
standard errors from 0 on average against 1.3 for the pathwise one, and 58 against 16.5 under the
plain bound.

Adaptive sampling and the learned schedule's variance gradient minimise the same variance, that of
the one-sample estimate of ``int f(gamma) dgamma`` over ``[gamma_0, gamma_1]``: each chooses the
density of the noise level, the schedule through ``gamma(t)`` with ``t`` uniform (density
``1 / gamma'(t)``), trained by gradient; the histogram directly (density ``q(u) / Delta``), set
from the loss it measured. They can be used apart or together. Together (``adaptive`` with a
learned schedule) the histogram replaces the schedule as the training proposal: the estimate no
longer passes through the schedule's interior, whose variance gradient is then exactly zero (its
end points still follow the objective), so the interior keeps its shape and serves only the
samplers' time grid. The variances are measured in ``README.md`` ("Objectives").
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jvdm import accumulate, noise_sampling, weighting
from jvdm import model as model_lib
from jvdm.model import ScheduleValues, VDMParams
from jvdm.nn import gamma as gamma_lib

__all__ = ["TrainingLoss", "loss_and_grads"]


class TrainingLoss(NamedTuple):
    """What :func:`loss_and_grads` returns.

    Attributes:
      loss: ``[]`` the batch-mean training objective in bpd (the ELBO for ``weighting="elbo"``).
      metrics: scalar metrics: the ELBO estimate ``bpd`` and its terms, ``diffusion_bpd_var``,
        ``weighted_diffusion_bpd`` (with a weighting), ``gamma_min``, ``gamma_max``.
      grads: the gradients, with the structure of the parameters.
      histogram: ``[2, K]`` the loss histogram updated with this batch.
    """

    loss: jax.Array
    metrics: dict[str, jax.Array]
    grads: VDMParams
    histogram: jax.Array


def _objective(model, train):
    """``f(den_params, g_t, dg_t, g_s, g_0, g_1, images, noise, scale) -> (loss, per-example)``."""

    def objective(den_params, g_t, dg_t, g_s, g_0, g_1, images, noise, scale):
        sv = ScheduleValues(g_t, dg_t, g_s, g_0, g_1)
        terms = model_lib.bound_terms(model, den_params, images, sv, noise, train=train)
        bpd = model_lib.to_bpd(model, terms)
        if model.weighting == "elbo":
            return scale(bpd["bpd"]), bpd
        weighted = weighting.weighted_diffusion_loss(
            bpd["diffusion_bpd"],
            g_t,
            weighting=model.weighting,
            sigmoid_bias=model.sigmoid_bias,
            sigmoid_scale=model.sigmoid_scale,
        )
        bpd["weighted_diffusion_bpd"] = weighted
        return scale(bpd["recon_bpd"] + bpd["prior_bpd"] + weighted), bpd

    return objective


def _bound_grads(model, den_params, images, sv: ScheduleValues, noise, *, train, k):
    """``((mean objective, per-example bpd terms), cotangents)``, in ``k`` micro-batches.

    The cotangents are the gradients of the batch-mean objective with respect to the denoiser's
    parameters, the per-example ``gamma_t, gamma'_t, gamma_s`` and the end points. With ``k > 1``
    a ``lax.scan`` runs forward and backward on one micro-batch at a time (peak memory of
    ``B / k`` examples) and sums the gradients of ``sum(loss_i) / B``: the batch's mean, with the
    same noise levels (and histogram draws) as the whole batch would use.
    """
    grad_fn = jax.value_and_grad(_objective(model, train), argnums=tuple(range(6)), has_aux=True)
    per_example = (sv.g_t, sv.dg_t, sv.g_s)
    if k == 1:
        return grad_fn(den_params, *per_example, sv.g_0, sv.g_1, images, noise, jnp.mean)
    batch = images.shape[0]
    scale = lambda v: jnp.sum(v) / batch  # sums over the micro-batches to the batch's mean

    def micro(i, xs):
        images_i, eps_i, eps0_i, per_example_i = xs
        noise_i = noise._replace(
            eps=eps_i, eps0=eps0_i, key_dropout=jax.random.fold_in(noise.key_dropout, i)
        )
        (loss_i, bpd_i), (g_den, c_t, c_dt, c_s, c_0, c_1) = grad_fn(
            den_params, *per_example_i, sv.g_0, sv.g_1, images_i, noise_i, scale
        )
        return (loss_i, g_den, c_0, c_1), (bpd_i, c_t, c_dt, c_s)

    summed_like = (jnp.zeros((), jnp.float32), den_params, sv.g_0, sv.g_1)
    (loss, g_den, c_0, c_1), (bpd, c_t, c_dt, c_s) = accumulate.scan_micro_batches(
        micro, (images, noise.eps, noise.eps0, per_example), k, summed_like
    )
    return (loss, bpd), (g_den, c_t, c_dt, c_s, c_0, c_1)


def _updated_histogram(model, histogram, noise, sv: ScheduleValues, train_diffusion, positional):
    """The histogram after this batch: each example's loss per unit ``gamma`` at its position."""
    if model.timesteps:  # no density over gamma in discrete time: the histogram stays as it is
        return histogram
    if positional:  # drawn as positions u between the end points
        u = noise.t
    else:  # where gamma(t) lies between the end points
        u = jnp.clip((sv.g_t - sv.g_0) / (sv.g_1 - sv.g_0), 0.0, 1.0)
    density = train_diffusion / sv.dg_t  # (0.5 w ||eps - eps_hat||^2) per unit of gamma
    return noise_sampling.update_histogram(
        histogram,
        jax.lax.stop_gradient(u),
        jax.lax.stop_gradient(density),
        decay=model.histogram_decay,
    )


def _second_derivative(model, sched_params, t):
    """``gamma''(t)`` elementwise, by forward mode over :func:`gamma_lib.gamma_and_derivative`."""
    fn = lambda u: model.schedule.apply(sched_params, u)
    slope = lambda u: gamma_lib.gamma_and_derivative(fn, u)[1]
    return jax.jvp(slope, (t,), (jnp.ones_like(t),))[1]


def _interior_variance_grads(
    model, g_sched, sched_params, noise, sv, sched_vjp, train_diffusion, cot
):
    """The schedule's gradient with the interior's replaced by an estimate of
    ``d mean(L_i^2) / d eta`` (the module docstring derives both estimators)."""
    c_t, c_dt, c_s, c_0, c_1 = cot
    loss = jax.lax.stop_gradient(train_diffusion)
    zero = jnp.zeros_like
    if model.variance_gradient == "pathwise":
        # d mean(L_i^2)/d gamma_t[i] = 2 L_i * d mean(L)/d gamma_t[i]: reweight the cotangents.
        two_l = 2.0 * loss
        var_cot = ScheduleValues(two_l * c_t, two_l * c_dt, zero(c_s), zero(c_0), zero(c_1))
    else:
        # mean_i L_i^2 (d log gamma'(t_i) - gamma''(t_i) / gamma'(t_i)^2 d gamma(t_i)): cotangents
        # L_i^2 / (B gamma') for gamma' and -L_i^2 gamma'' / (B gamma'^2) for gamma.
        dg = jax.lax.stop_gradient(sv.dg_t)
        d2 = jax.lax.stop_gradient(_second_derivative(model, sched_params, noise.t))
        a = jnp.square(loss) / (loss.shape[0] * dg)
        var_cot = ScheduleValues(-a * d2 / dg, a, zero(c_s), zero(c_0), zero(c_1))
    (g_var,) = sched_vjp(var_cot)
    return jax.tree_util.tree_map_with_path(
        lambda path, g_obj, g_v: g_obj if model_lib.is_endpoint(path) else g_v, g_sched, g_var
    )


def _check_batch(model, images, micro_batches: int) -> None:
    model_lib._check_images(model, images)
    if images.shape[0] % micro_batches:
        raise ValueError(
            f"a batch of {images.shape[0]} images does not split into {micro_batches=}"
        )


def loss_and_grads(
    params: VDMParams,
    images: jax.Array,
    key: jax.Array,
    *,
    train: bool = True,
    micro_batches: int = 1,
    histogram: Any = None,
) -> TrainingLoss:
    """The mean training objective (bpd) over the batch, metrics, gradients and histogram.

    The denoiser and the schedule's end points get the gradient of the objective. In continuous
    time with ``use_variance_gradient``, the schedule's interior instead gets the gradient of the
    mean *squared* diffusion loss ``E[L_diff^2]`` (VDM appendix I.2): by the chain rule
    ``d E[L^2] / d eta = E[2 L dL/d gamma  d gamma / d eta]``, so one backward pass that yields the
    per-example ``dL_i/d gamma_t`` and ``dL_i/d gamma'_t`` serves both gradients, and a second,
    cheap VJP through the small schedule network applies the weights ``2 L_i``. The default
    estimator (``variance_gradient="density"``) differentiates the density of the noise level
    instead: that VJP gets ``L_i^2`` and the schedule's first and second derivatives at ``t_i``,
    and no derivative of the denoiser (module docstring).

    Why the objective's mean is unchanged: in continuous time it depends on the schedule only
    through ``gamma(0)`` and ``gamma(1)`` (VDM eq. 18; ``L_w`` likewise, VDM++ eq. 7), which are
    separate parameters kept out of the interior; moving the interior changes only the variance
    of the estimator, so minimising ``E[L^2]`` is minimising ``Var[L]``. In discrete time the
    bound does depend on the interior, so there every schedule parameter follows the bound.

    Gradient accumulation: with ``micro_batches = k > 1`` the denoiser runs on ``B / k`` examples
    at a time (:func:`_bound_grads`). The noise levels (stratified over the whole batch, drawn
    from the histogram as it was before the step), the noise and the schedule's values are drawn
    for the whole batch first, so the result is the whole batch's, up to the order of
    floating-point sums (and dropout masks, drawn per micro-batch).

    Args:
      params, images, key, train: the parameters, uint8 ``[B, H, W, C]``, randomness, dropout.
      micro_batches: gradient-accumulation micro-batches; must divide ``B``.
      histogram: ``[2, K]`` the loss histogram (see :mod:`jvdm.noise_sampling`); ``None`` for an
        empty one. Sampling uses it with ``noise_sampling="adaptive"``; it is updated either way.
        With ``noise_sampling="band"`` the draws come from the fixed band density instead
        (:func:`jvdm.noise_sampling.band_positions`), the end points read before the step.
    """
    model = params.model
    _check_batch(model, images, micro_batches)
    if histogram is None:
        histogram = noise_sampling.init_histogram(model.histogram_bins)
    adaptive = model.noise_sampling == "adaptive"
    band = None
    if model.noise_sampling == "band":
        # The band's interval of u between the end points as they are before the step; the draws
        # are constants of the step, as the histogram's are.
        ends = model.schedule.apply(params.schedule, jnp.array([0.0, 1.0], jnp.float32))
        ends = jax.lax.stop_gradient(ends)
        band = noise_sampling.band_interval(ends[0], ends[1], model.band_log_snr)
    noise = model_lib.draw_noise(
        model, key, images.shape, histogram if adaptive else None, band=band
    )
    # Positions u with a density (histogram or band): gamma is read off the end points alone.
    positional = model.noise_sampling != "uniform_t"
    values = model_lib.schedule_values(model, noise, adaptive=positional)
    sv, sched_vjp = jax.vjp(values, params.schedule)
    (loss, bpd), (g_den, *cot) = _bound_grads(
        model, params.denoiser, images, sv, noise, train=train, k=micro_batches
    )
    (g_sched,) = sched_vjp(ScheduleValues(*cot))
    train_diffusion = bpd.get("weighted_diffusion_bpd", bpd["diffusion_bpd"])
    if model.timesteps == 0 and model.use_variance_gradient:
        g_sched = _interior_variance_grads(
            model, g_sched, params.schedule, noise, sv, sched_vjp, train_diffusion, cot
        )
    grads = params.replace(denoiser=g_den, schedule=g_sched)
    metrics = {k: jnp.mean(v) for k, v in bpd.items()}
    metrics["diffusion_bpd_var"] = jnp.var(bpd["diffusion_bpd"])
    metrics["gamma_min"] = sv.g_0
    metrics["gamma_max"] = sv.g_1
    new_histogram = _updated_histogram(model, histogram, noise, sv, train_diffusion, positional)
    return TrainingLoss(loss, metrics, grads, new_histogram)
