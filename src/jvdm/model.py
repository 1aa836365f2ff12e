"""The Variational Diffusion Model: a denoiser and a noise schedule composed into the bound.

The negative ELBO of an 8-bit image ``x`` (VDM eq. 11; Luo eq. 33) has three terms, each returned
per example, in bits per dimension:

* reconstruction ``-log p(x | z_0)`` through the 256-value decoder
  (:func:`jvdm.losses.decoder_log_likelihood`);
* prior ``KL(q(z_1 | x) || N(0, I))`` (:func:`jvdm.losses.prior_kl_from_gamma`);
* diffusion: in continuous time ``E_t[0.5 gamma'(t) ||eps - eps_hat||^2]`` (VDM eq. 17,
  :func:`jvdm.losses.continuous_diffusion_loss`), in discrete time with ``T`` steps
  ``T E_i[KL(q(z_s | z_t, x) || p(z_s | z_t))]`` with ``s = (i-1)/T, t = i/T`` (VDM eq. 14,
  :func:`jvdm.losses.discrete_diffusion_loss`).

The maths lives in :mod:`jvdm.losses`; this module only composes it. The diffusion term is a
one-sample Monte Carlo estimate over ``t`` and ``eps``; with ``use_antithetic_time`` the batch's
times are stratified, ``t_i = (u + i / B) mod 1``, which works for every batch size. Training
may weight the diffusion term (:mod:`jvdm.weighting`) and draw the noise level from a histogram
or a band (:mod:`jvdm.noise_sampling`; the draws are made in :mod:`jvdm.noise_draws`);
:func:`loss_terms` is always the ELBO with uniform times, whatever the training objective. The
gradients used to train are in :mod:`jvdm.objective`; building a model from a config is
:mod:`jvdm.build`.

Parameterisations: the denoiser may predict ``eps``, ``x0`` or ``v = alpha eps - sigma x``. All
three are turned into the same eps-space residual without dividing by a small ``sigma`` or
``alpha``:
``||eps - eps_hat||^2 = SNR ||x - x0_hat||^2 = alpha^2 ||v - v_hat||^2``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from jvdm import losses, validate, weighting
from jvdm.errors import JvdmUserError
from jvdm.nn.gaussian_base import COLLECTION as GAUSSIAN_BASE
from jvdm.noise_draws import NoiseDraws, ScheduleValues, draw_noise, schedule_values
from jvdm.validate import NOISE_SAMPLINGS, PREDICTIONS, VARIANCE_GRADIENTS

ENDPOINT_NAMES = ("gamma_min", "gamma_max")


@dataclasses.dataclass(frozen=True)
class VDM:
    """The static definition of a model: which networks, which image shape, which bound.

    Attributes:
      denoiser: a Linen module ``(z [B,H,W,C], gamma [B], *, train) -> [B,H,W,C]``.
      schedule: a Linen module ``t -> gamma(t)``, increasing in ``t`` (see :mod:`jvdm.nn.gamma`).
      image_shape: ``(H, W, C)`` of the 8-bit images.
      timesteps: ``0`` for continuous time, else the number ``T`` of discrete steps.
      prediction: what the denoiser outputs: ``"eps"``, ``"x0"`` or ``"v"``.
      vocab_size: number of pixel values (256 for 8-bit data).
      use_antithetic_time: stratify the batch's diffusion times (lower-variance estimate).
      use_variance_gradient: train the schedule's interior on the loss variance (continuous time).
      variance_gradient: how that gradient is estimated (:mod:`jvdm.objective`): ``"density"``
        (through the density of the noise level; no derivative of the denoiser) or
        ``"pathwise"`` (VDM appendix I.2: through the loss at the drawn level).
      weighting: the training loss's weighting of noise levels, one of
        :data:`jvdm.weighting.WEIGHTINGS` (``"elbo"``: the bound itself).
      sigmoid_bias: ``b`` of the ``sigmoid`` weighting ``w = sigmoid(b - lambda)`` (and of
        ``elbo_sigmoid``, ``w = 1 + c sigmoid(b - lambda)``).
      sigmoid_scale: ``c`` of the ``elbo_sigmoid`` weighting.
      noise_sampling: ``"uniform_t"`` (``t`` uniform, ``gamma = gamma(t)``), ``"adaptive"``
        (``gamma`` drawn from a histogram of the loss, :mod:`jvdm.noise_sampling`) or ``"band"``
        (a fixed share of the draws uniform in a band of ``log SNR``, the rest uniform between the
        end points; importance-weighted, so the objective is the same).
      histogram_bins: bins of the loss histogram over ``lambda``.
      histogram_decay: the histogram's EMA decay per step.
      histogram_uniform_fraction: weight of the uniform density mixed into the adaptive one.
      band_log_snr: ``(lo, hi)``, the band of ``log SNR = -gamma`` of ``"band"`` sampling.
      band_fraction: the share of ``"band"`` draws made in the band, in ``[0, 1)``.
    """

    denoiser: nn.Module
    schedule: nn.Module
    image_shape: tuple[int, int, int]
    timesteps: int = 0
    prediction: str = "eps"
    vocab_size: int = 256
    use_antithetic_time: bool = True
    use_variance_gradient: bool = True
    variance_gradient: str = "density"
    weighting: str = "elbo"
    sigmoid_bias: float = 2.0
    sigmoid_scale: float = 1.0
    noise_sampling: str = "uniform_t"
    histogram_bins: int = 100
    histogram_decay: float = 0.99
    histogram_uniform_fraction: float = 0.1
    band_log_snr: tuple[float, float] = (-4.0, 0.0)
    band_fraction: float = 0.4

    def __post_init__(self):
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction={self.prediction!r}; expected one of {PREDICTIONS}")
        if self.timesteps < 0:
            raise ValueError(f"timesteps={self.timesteps}; expected 0 (continuous) or T >= 1")
        if len(self.image_shape) != 3 or min(self.image_shape) < 1:
            raise ValueError(f"image_shape={self.image_shape}; expected (H, W, C)")
        if self.weighting not in weighting.WEIGHTINGS:
            raise ValueError(
                f"weighting={self.weighting!r}; expected one of {weighting.WEIGHTINGS}"
            )
        if not 0.0 < self.sigmoid_scale < math.inf:
            raise ValueError(f"sigmoid_scale={self.sigmoid_scale}; expected positive and finite")
        if self.variance_gradient not in VARIANCE_GRADIENTS:
            raise ValueError(
                f"variance_gradient={self.variance_gradient!r}; expected one of "
                f"{VARIANCE_GRADIENTS}"
            )
        if self.noise_sampling not in NOISE_SAMPLINGS:
            raise ValueError(f"noise_sampling={self.noise_sampling!r}; one of {NOISE_SAMPLINGS}")
        if self.timesteps and (self.weighting != "elbo" or self.noise_sampling != "uniform_t"):
            raise ValueError("weightings and adaptive or band noise sampling need continuous time")
        if not (self.histogram_bins >= 1 and 0.0 <= self.histogram_decay < 1.0):
            raise ValueError(f"{self.histogram_bins=}, {self.histogram_decay=}")
        if not 0.0 < self.histogram_uniform_fraction <= 1.0:
            raise ValueError(f"{self.histogram_uniform_fraction=}; expected in (0, 1]")
        lo, hi = self.band_log_snr
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(f"band_log_snr={self.band_log_snr}; expected finite lo < hi")
        if not 0.0 <= self.band_fraction < 1.0:
            raise ValueError(f"band_fraction={self.band_fraction}; expected in [0, 1)")

    @property
    def num_dims(self) -> int:
        h, w, c = self.image_shape
        return h * w * c


class VDMParams(struct.PyTreeNode):
    """Parameters of a :class:`VDM`, carrying the (static) model definition with them.

    Because ``model`` is static pytree metadata, ``jvdm.sample(params, key, n)`` needs nothing else,
    and optax/orbax see only the arrays in ``denoiser`` and ``schedule``.
    """

    model: VDM = struct.field(pytree_node=False)
    denoiser: Any
    schedule: Any


def init(model: VDM, key: jax.Array, *, gaussian_fit=None) -> VDMParams:
    """Initialises the denoiser and the schedule.

    A denoiser with a Gaussian base (:class:`jvdm.nn.gaussian_base.GaussianBase`) gets
    ``gaussian_fit`` (a :class:`jvdm.reference_denoisers.GaussianFit` of the training images) as
    its base, or ``N(0, I)`` without one; see :func:`with_gaussian_fit`.
    """
    k_den, k_drop, k_sched = jax.random.split(key, 3)
    z = jnp.zeros((1, *model.image_shape), jnp.float32)
    den = model.denoiser.init({"params": k_den, "dropout": k_drop}, z, jnp.zeros((1,)), train=False)
    sched = model.schedule.init(k_sched, jnp.zeros((1,), jnp.float32))
    params = VDMParams(model=model, denoiser=den, schedule=sched)
    return params if gaussian_fit is None else with_gaussian_fit(params, gaussian_fit)


def has_gaussian_base(params: VDMParams) -> bool:
    """Whether the denoiser adds a Gaussian's prediction to its network's (a ``gaussian_base``
    variable collection)."""
    return GAUSSIAN_BASE in params.denoiser


def with_gaussian_fit(params: VDMParams, fit) -> VDMParams:
    """``params`` whose denoiser's Gaussian base is ``fit`` (``mean [D]``, ``values [D]``,
    ``vectors [D, D]`` for ``D`` pixel values, or a :class:`jvdm.reference_denoisers.MixtureFit`
    for a mixture base; :func:`jvdm.reference_denoisers.fit_split`).

    Raises:
      JvdmUserError: the denoiser has no Gaussian base, or ``fit`` has other shapes than its.
    """
    if not has_gaussian_base(params):
        raise JvdmUserError(
            "this model's denoiser has no Gaussian base to fit (build it with "
            "model.gaussian_base=True, or wrap it in jvdm.nn.gaussian_base.GaussianBase)"
        )
    old = params.denoiser[GAUSSIAN_BASE]
    fit = fit._asdict() if hasattr(fit, "_asdict") else fit  # a GaussianFit or a dict
    if set(fit) != set(old):
        raise JvdmUserError(
            f"the fit has {sorted(fit)}, the model's base {sorted(old)}: a mixture base takes a "
            "MixtureFit and a full one a GaussianFit (model.gaussian_base_components/_rank)"
        )
    new = {name: jnp.asarray(fit[name], jnp.float32) for name in old}
    for name, value in new.items():
        if value.shape != old[name].shape:
            raise JvdmUserError(
                f"the Gaussian fit's {name} has shape {value.shape}, the model's base "
                f"{old[name].shape}: fit the images the model is for ({params.model.image_shape})"
            )
    return params.replace(denoiser={**params.denoiser, GAUSSIAN_BASE: new})


def is_constant(path) -> bool:
    """Whether a leaf (by its pytree path, from the denoiser's variables or from the whole
    :class:`VDMParams`) is a constant rather than a trained parameter: the Gaussian base's fit."""
    return any(getattr(p, "key", None) == GAUSSIAN_BASE for p in path)


def keep_constants(new: VDMParams, old: VDMParams) -> VDMParams:
    """``new`` with the denoiser's constants (:func:`is_constant`) of ``old``: a training update or
    an EMA leaves a Gaussian base's fit exactly as it was, whatever its arithmetic."""
    if not has_gaussian_base(old):
        return new
    return new.replace(denoiser={**new.denoiser, GAUSSIAN_BASE: old.denoiser[GAUSSIAN_BASE]})


def gamma(params: VDMParams, t: jax.Array) -> jax.Array:
    """``gamma(t) = -log SNR(t)``, elementwise."""
    return params.model.schedule.apply(params.schedule, t)


def _bcast(v: jax.Array, x: jax.Array) -> jax.Array:
    """Reshapes a per-example ``[B]`` (or scalar) to broadcast against ``x`` ``[B, ...]``."""
    v = jnp.asarray(v, x.dtype)
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def _alpha_sigma(g: jax.Array) -> tuple[jax.Array, jax.Array]:
    # sigmoid(-g) and sigmoid(g) are each accurate to full relative precision; 1 - sigmoid is not.
    return jnp.sqrt(jax.nn.sigmoid(-g)), jnp.sqrt(jax.nn.sigmoid(g))


def denoise(
    params: VDMParams,
    z: jax.Array,
    g: jax.Array,
    *,
    train: bool = False,
    key: jax.Array | None = None,
) -> jax.Array:
    """The denoiser's raw output (``eps``, ``x0`` or ``v``, per ``model.prediction``)."""
    g = jnp.broadcast_to(jnp.asarray(g, jnp.float32), z.shape[:1])
    rngs = {"dropout": key} if (train and key is not None) else None
    return params.model.denoiser.apply(params.denoiser, z, g, train=train, rngs=rngs)


def predict_eps_x0(
    params: VDMParams, z: jax.Array, g: jax.Array, *, train: bool = False, key=None
) -> tuple[jax.Array, jax.Array]:
    """``(eps_hat, x0_hat)`` from any parameterisation, for samplers.

    Uses ``alpha^2 + sigma^2 = 1``: for v-prediction ``x0 = alpha z - sigma v`` and
    ``eps = sigma z + alpha v``.
    """
    out = denoise(params, z, g, train=train, key=key)
    g = jnp.broadcast_to(jnp.asarray(g, jnp.float32), z.shape[:1])
    alpha, sigma = (_bcast(a, z) for a in _alpha_sigma(g))
    pred = params.model.prediction
    if pred == "eps":
        return out, (z - sigma * out) / alpha
    if pred == "x0":
        return (z - alpha * out) / sigma, out
    return sigma * z + alpha * out, alpha * z - sigma * out


def _eps_residual_pair(pred: str, out, x, eps, g):
    """Two arrays whose difference is ``eps - eps_hat``, formed without unstable divisions."""
    if pred == "eps":
        return eps, out
    alpha, sigma = (_bcast(a, x) for a in _alpha_sigma(g))
    if pred == "x0":
        root_snr = _bcast(jnp.exp(-0.5 * g), x)  # ||eps - eps_hat|| = sqrt(SNR) ||x - x0_hat||
        return root_snr * x, root_snr * out
    v = alpha * eps - sigma * x  # ||eps - eps_hat|| = alpha ||v - v_hat||
    return alpha * v, alpha * out


def _check_images(model: VDM, images: jax.Array) -> None:
    validate.check_images(images, model.image_shape)


def _diffusion_term(model: VDM, den_params, x, eps, sv: ScheduleValues, k_drop, *, train):
    """The diffusion term per example in nats, for continuous data ``x`` in model space."""
    alpha_t, sigma_t = (_bcast(a, x) for a in _alpha_sigma(sv.g_t))
    z_t = alpha_t * x + sigma_t * eps
    rngs = {"dropout": k_drop} if train else None
    out = model.denoiser.apply(den_params, z_t, sv.g_t, train=train, rngs=rngs)
    target, estimate = _eps_residual_pair(model.prediction, out, x, eps, sv.g_t)
    if model.timesteps == 0:
        return losses.continuous_diffusion_loss(target, estimate, sv.dg_t)
    return model.timesteps * losses.discrete_diffusion_loss(target, estimate, sv.g_s, sv.g_t)


def bound_terms(
    model: VDM, den_params, images, sv: ScheduleValues, noise: NoiseDraws, *, train
) -> dict[str, jax.Array]:
    """The three bound terms per example in nats, given the schedule's values as plain inputs.

    Taking ``gamma`` values as inputs (not the schedule's parameters) lets one backward pass give
    the per-example derivatives ``dL_i/dgamma_t`` that the variance gradient needs.
    """
    x = losses.scale_pixels(images, model.vocab_size)
    alpha_0, sigma_0 = _alpha_sigma(sv.g_0)
    z_0 = alpha_0 * x + sigma_0 * noise.eps0
    recon = -losses.decoder_log_likelihood(images, z_0, sv.g_0, model.vocab_size)
    prior = losses.prior_kl_from_gamma(x, sv.g_1)
    diffusion = _diffusion_term(model, den_params, x, noise.eps, sv, noise.key_dropout, train=train)
    return {"recon": recon, "prior": prior, "diffusion": diffusion}


def diffusion_loss(params: VDMParams, x: jax.Array, key: jax.Array, *, train: bool = False):
    """A one-sample estimate of the diffusion term (ELBO, uniform times), per example, in nats,
    for continuous data.

    Args:
      params: the model's parameters (for another ``T``, pass
        ``params.replace(model=dataclasses.replace(params.model, timesteps=T))``).
      x: float data ``[B, H, W, C]`` in model space (8-bit images map to ``[-1, 1]`` by
        :func:`jvdm.losses.scale_pixels`).
      key: randomness for ``t``, ``eps`` and dropout.
      train: apply dropout.

    References: VDM eq. 14 (discrete) and eq. 17 (continuous).
    """
    model = params.model
    if x.ndim != 4 or tuple(x.shape[1:]) != tuple(model.image_shape):
        raise ValueError(f"x has shape {x.shape}; expected [B, {model.image_shape}]")
    noise = draw_noise(model, key, x.shape)
    sv = schedule_values(model, noise)(params.schedule)
    x = x.astype(jnp.float32)
    return _diffusion_term(model, params.denoiser, x, noise.eps, sv, noise.key_dropout, train=train)


def to_bpd(model: VDM, terms: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Per-example terms in nats -> bpd, with their sum ``bpd`` (the ELBO's three terms)."""
    out = {f"{k}_bpd": losses.bpd_from_nats(v, model.num_dims) for k, v in terms.items()}
    out["bpd"] = out["recon_bpd"] + out["prior_bpd"] + out["diffusion_bpd"]
    return out


def loss_terms(
    params: VDMParams, images: jax.Array, key: jax.Array, *, train: bool = False
) -> dict[str, jax.Array]:
    """Per-example bound terms in bits per dimension: ``bpd``, ``recon_bpd``, ``prior_bpd``,
    ``diffusion_bpd``, each of shape ``[B]``: the ELBO (``w = 1``, uniform times) whatever the
    model's training weighting and noise sampling.

    Args:
      params: the model's parameters; evaluate with another ``T`` (``0`` = continuous time) by
        ``params.replace(model=dataclasses.replace(params.model, timesteps=T))``.
      images: uint8 ``[B, H, W, C]``.
      key: randomness for ``t``, ``eps`` and dropout.
      train: apply dropout.
    """
    model = params.model
    _check_images(model, images)
    noise = draw_noise(model, key, images.shape)
    sv = schedule_values(model, noise)(params.schedule)
    terms = bound_terms(model, params.denoiser, images, sv, noise, train=train)
    return to_bpd(model, terms)


def with_timesteps(params: VDMParams, timesteps: int | None) -> VDMParams:
    """``params`` whose model uses ``timesteps`` steps (``0`` = continuous time, ``None``: as is),
    trained with the ELBO: a :func:`dataclasses.replace` of the frozen :class:`VDM`."""
    model = params.model
    T = model.timesteps if timesteps is None else int(timesteps)
    if T == model.timesteps:
        return params
    new = dataclasses.replace(model, timesteps=T, weighting="elbo", noise_sampling="uniform_t")
    return params.replace(model=new)


def is_endpoint(path) -> bool:
    """Whether a schedule parameter (by its pytree path) is an end point gamma_min/gamma_max."""
    return any(getattr(p, "key", None) in ENDPOINT_NAMES for p in path)
