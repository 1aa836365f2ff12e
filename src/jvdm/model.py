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
times are stratified, ``t_i = (u + i / B) mod 1``, which works for every batch size.

Parameterisations: the denoiser may predict ``eps``, ``x0`` or ``v = alpha eps - sigma x``. All
three are turned into the same eps-space residual without dividing by a small ``sigma`` or
``alpha``:
``||eps - eps_hat||^2 = SNR ||x - x0_hat||^2 = alpha^2 ||v - v_hat||^2``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from jvdm import accumulate, losses
from jvdm.config import PREDICTIONS
from jvdm.nn import gamma as gamma_lib

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
    """

    denoiser: nn.Module
    schedule: nn.Module
    image_shape: tuple[int, int, int]
    timesteps: int = 0
    prediction: str = "eps"
    vocab_size: int = 256
    use_antithetic_time: bool = True
    use_variance_gradient: bool = True

    def __post_init__(self):
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction={self.prediction!r}; expected one of {PREDICTIONS}")
        if self.timesteps < 0:
            raise ValueError(f"timesteps={self.timesteps}; expected 0 (continuous) or T >= 1")
        if len(self.image_shape) != 3 or min(self.image_shape) < 1:
            raise ValueError(f"image_shape={self.image_shape}; expected (H, W, C)")

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


def init(model: VDM, key: jax.Array) -> VDMParams:
    """Initialises the denoiser and the schedule."""
    k_den, k_drop, k_sched = jax.random.split(key, 3)
    z = jnp.zeros((1, *model.image_shape), jnp.float32)
    den = model.denoiser.init({"params": k_den, "dropout": k_drop}, z, jnp.zeros((1,)), train=False)
    sched = model.schedule.init(k_sched, jnp.zeros((1,), jnp.float32))
    return VDMParams(model=model, denoiser=den, schedule=sched)


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


def _sample_times(model: VDM, key: jax.Array, batch: int, timesteps: int):
    """Diffusion times ``t`` (and ``s = t - 1/T`` in discrete time), shape ``[B]``."""
    if model.use_antithetic_time:
        u = jax.random.uniform(key, ())
        t = jnp.mod(u + jnp.arange(batch, dtype=jnp.float32) / batch, 1.0)
    else:
        t = jax.random.uniform(key, (batch,))
    if timesteps == 0:
        return t, t
    i = jnp.clip(jnp.floor(t * timesteps) + 1.0, 1.0, timesteps)
    return i / timesteps, (i - 1.0) / timesteps


def _noise(model: VDM, key: jax.Array, images: jax.Array, timesteps: int):
    k_t, k_eps, k_eps0, k_drop = jax.random.split(key, 4)
    t, s = _sample_times(model, k_t, images.shape[0], timesteps)
    shape = images.shape
    eps = jax.random.normal(k_eps, shape, jnp.float32)
    eps0 = jax.random.normal(k_eps0, shape, jnp.float32)
    return t, s, eps, eps0, k_drop


def _check_images(model: VDM, images: jax.Array) -> None:
    if images.ndim != 4 or tuple(images.shape[1:]) != tuple(model.image_shape):
        raise ValueError(
            f"images have shape {images.shape}; this model expects [B, H, W, C] = "
            f"[B, {', '.join(map(str, model.image_shape))}]"
        )
    if images.dtype != jnp.uint8:
        raise ValueError(f"images have dtype {images.dtype}; expected uint8 pixel values 0..255")


def _diffusion_term(model: VDM, den_params, x, eps, g_t, dg_t, g_s, k_drop, *, train, timesteps):
    """The diffusion term per example in nats, for continuous data ``x`` in model space."""
    alpha_t, sigma_t = (_bcast(a, x) for a in _alpha_sigma(g_t))
    z_t = alpha_t * x + sigma_t * eps
    rngs = {"dropout": k_drop} if train else None
    out = model.denoiser.apply(den_params, z_t, g_t, train=train, rngs=rngs)
    target, estimate = _eps_residual_pair(model.prediction, out, x, eps, g_t)
    if timesteps == 0:
        return losses.continuous_diffusion_loss(target, estimate, dg_t)
    return timesteps * losses.discrete_diffusion_loss(target, estimate, g_s, g_t)


def _bound_terms(
    model: VDM, den_params, images, g_t, dg_t, g_s, g_0, g_1, noise, *, train, timesteps
) -> dict[str, jax.Array]:
    """The three bound terms per example in nats, given the schedule's values as plain inputs.

    Taking ``gamma`` values as inputs (not the schedule's parameters) lets one backward pass give
    the per-example derivatives ``dL_i/dgamma_t`` that the variance gradient needs.
    """
    _, _, eps, eps0, k_drop = noise
    x = losses.scale_pixels(images, model.vocab_size)
    alpha_0, sigma_0 = _alpha_sigma(g_0)
    z_0 = alpha_0 * x + sigma_0 * eps0
    recon = -losses.decoder_log_likelihood(images, z_0, g_0, model.vocab_size)
    prior = losses.prior_kl_from_gamma(x, g_1)
    diffusion = _diffusion_term(
        model, den_params, x, eps, g_t, dg_t, g_s, k_drop, train=train, timesteps=timesteps
    )
    return {"recon": recon, "prior": prior, "diffusion": diffusion}


def diffusion_loss(
    params: VDMParams,
    x: jax.Array,
    key: jax.Array,
    *,
    train: bool = False,
    timesteps: int | None = None,
) -> jax.Array:
    """A one-sample estimate of the diffusion term, per example, in nats, for continuous data.

    Args:
      params: the model's parameters.
      x: float data ``[B, H, W, C]`` in model space (8-bit images map to ``[-1, 1]`` by
        :func:`jvdm.losses.scale_pixels`).
      key: randomness for ``t``, ``eps`` and dropout.
      train: apply dropout.
      timesteps: override the model's ``T`` (``0`` = continuous time).

    References: VDM eq. 14 (discrete) and eq. 17 (continuous).
    """
    model = params.model
    if x.ndim != 4 or tuple(x.shape[1:]) != tuple(model.image_shape):
        raise ValueError(f"x has shape {x.shape}; expected [B, {model.image_shape}]")
    T = model.timesteps if timesteps is None else int(timesteps)
    t, s, eps, _, k_drop = _noise(model, key, x, T)
    g_t, dg_t, g_s, _, _ = _schedule_values(model, T, t, s)(params.schedule)
    return _diffusion_term(
        model,
        params.denoiser,
        x.astype(jnp.float32),
        eps,
        g_t,
        dg_t,
        g_s,
        k_drop,
        train=train,
        timesteps=T,
    )


def _schedule_values(model: VDM, timesteps: int, t, s):
    """A function of the schedule's parameters giving every gamma value the bound uses."""

    def values(sched_params):
        fn = lambda u: model.schedule.apply(sched_params, u)
        g_t, dg_t = gamma_lib.gamma_and_derivative(fn, t)
        g_s = fn(s) if timesteps else g_t
        g_ends = fn(jnp.array([0.0, 1.0], jnp.float32))
        return g_t, dg_t, g_s, g_ends[0], g_ends[1]

    return values


def _to_bpd(model: VDM, terms: dict[str, jax.Array]) -> dict[str, jax.Array]:
    out = {f"{k}_bpd": losses.bpd_from_nats(v, model.num_dims) for k, v in terms.items()}
    out["bpd"] = out["recon_bpd"] + out["prior_bpd"] + out["diffusion_bpd"]
    return out


def loss_terms(
    params: VDMParams,
    images: jax.Array,
    key: jax.Array,
    *,
    train: bool = False,
    timesteps: int | None = None,
) -> dict[str, jax.Array]:
    """Per-example bound terms in bits per dimension: ``bpd``, ``recon_bpd``, ``prior_bpd``,
    ``diffusion_bpd``, each of shape ``[B]``.

    Args:
      params: the model's parameters.
      images: uint8 ``[B, H, W, C]``.
      key: randomness for ``t``, ``eps`` and dropout.
      train: apply dropout.
      timesteps: override the model's ``T`` (``0`` = continuous time); by default the model's own.
    """
    model = params.model
    _check_images(model, images)
    T = model.timesteps if timesteps is None else int(timesteps)
    noise = _noise(model, key, images, T)
    g_t, dg_t, g_s, g_0, g_1 = _schedule_values(model, T, noise[0], noise[1])(params.schedule)
    terms = _bound_terms(
        model, params.denoiser, images, g_t, dg_t, g_s, g_0, g_1, noise, train=train, timesteps=T
    )
    return _to_bpd(model, terms)


def is_endpoint(path) -> bool:
    """Whether a schedule parameter (by its pytree path) is an end point gamma_min/gamma_max."""
    return any(getattr(p, "key", None) in ENDPOINT_NAMES for p in path)


def _bound_grads(model: VDM, den_params, images, per_example, g_0, g_1, noise, *, train, k):
    """``((mean bpd, per-example bpd terms), cotangents)`` of the bound, in ``k`` micro-batches.

    The cotangents are the gradients of the batch-mean bound with respect to the denoiser's
    parameters, the per-example ``gamma_t, gamma'_t, gamma_s`` and the end points. With ``k > 1``
    a ``lax.scan`` runs forward and backward on one micro-batch at a time (peak memory of
    ``B / k`` examples) and sums the gradients of ``sum(bpd_i) / B``: the batch's mean, with the
    same times and noise as the whole batch would use.
    """
    T = model.timesteps

    def objective(den_params, g_t, dg_t, g_s, g_0, g_1, images, noise, scale):
        terms = _bound_terms(
            model, den_params, images, g_t, dg_t, g_s, g_0, g_1, noise, train=train, timesteps=T
        )
        bpd = _to_bpd(model, terms)
        return scale(bpd["bpd"]), bpd

    grad_fn = jax.value_and_grad(objective, argnums=(0, 1, 2, 3, 4, 5), has_aux=True)
    if k == 1:
        return grad_fn(den_params, *per_example, g_0, g_1, images, noise, jnp.mean)
    t, s, eps, eps0, k_drop = noise
    batch = images.shape[0]
    scale = lambda v: jnp.sum(v) / batch  # sums over the micro-batches to the batch's mean

    def micro(i, xs):
        images_i, eps_i, eps0_i, per_example_i = xs
        noise_i = (t, s, eps_i, eps0_i, jax.random.fold_in(k_drop, i))
        (loss_i, bpd_i), (g_den, c_t, c_dt, c_s, c_0, c_1) = grad_fn(
            den_params, *per_example_i, g_0, g_1, images_i, noise_i, scale
        )
        return (loss_i, g_den, c_0, c_1), (bpd_i, c_t, c_dt, c_s)

    summed_like = (jnp.zeros((), jnp.float32), den_params, g_0, g_1)
    (loss, g_den, c_0, c_1), (bpd, c_t, c_dt, c_s) = accumulate.scan_micro_batches(
        micro, (images, eps, eps0, tuple(per_example)), k, summed_like
    )
    return (loss, bpd), (g_den, c_t, c_dt, c_s, c_0, c_1)


def loss_and_grads(
    params: VDMParams,
    images: jax.Array,
    key: jax.Array,
    *,
    train: bool = True,
    micro_batches: int = 1,
) -> tuple[jax.Array, dict[str, jax.Array], VDMParams]:
    """The mean bound (bpd) over the batch, metrics, and the gradients used to train.

    The denoiser and the schedule's end points get the gradient of the bound. In continuous time
    with ``use_variance_gradient``, the schedule's interior instead gets the gradient of the mean
    *squared* diffusion loss ``E[L_diff^2]`` (VDM appendix I.2): by the chain rule
    ``d E[L^2] / d eta = E[2 L dL/d gamma  d gamma / d eta]``, so one backward pass that yields the
    per-example ``dL_i/d gamma_t`` and ``dL_i/d gamma'_t`` serves both gradients, and a second,
    cheap VJP through the small schedule network applies the weights ``2 L_i``.

    Why the bound is unchanged: in continuous time the bound depends on the schedule only through
    ``gamma(0)`` and ``gamma(1)`` (VDM eq. 18), which are separate parameters kept out of the
    interior; moving the interior changes only the variance of the estimator, never its mean, and
    since ``E[L]`` is then fixed, minimising ``E[L^2]`` is minimising ``Var[L]``. In discrete time
    the bound does depend on the interior, so there every schedule parameter follows the bound.

    Gradient accumulation: with ``micro_batches = k > 1`` the denoiser runs on ``B / k`` examples
    at a time (:func:`_bound_grads`). The times (stratified over the whole batch), the noise and
    the schedule's values are drawn for the whole batch first, so the result is the whole batch's,
    up to the order of floating-point sums (and dropout masks, drawn per micro-batch).

    Returns:
      ``(loss, metrics, grads)`` where ``grads`` has the structure of ``params``.
    """
    model = params.model
    _check_images(model, images)
    if images.shape[0] % micro_batches:
        raise ValueError(
            f"a batch of {images.shape[0]} images does not split into {micro_batches=}"
        )
    T = model.timesteps
    noise = _noise(model, key, images, T)
    sched_values = _schedule_values(model, T, noise[0], noise[1])
    (g_t, dg_t, g_s, g_0, g_1), sched_vjp = jax.vjp(sched_values, params.schedule)
    (loss, bpd), (g_den, c_t, c_dt, c_s, c_0, c_1) = _bound_grads(
        model,
        params.denoiser,
        images,
        (g_t, dg_t, g_s),
        g_0,
        g_1,
        noise,
        train=train,
        k=micro_batches,
    )
    (g_sched,) = sched_vjp((c_t, c_dt, c_s, c_0, c_1))
    if T == 0 and model.use_variance_gradient:
        # d mean(L_i^2)/d gamma_t[i] = 2 L_i * d mean(L)/d gamma_t[i]: reweight the cotangents.
        two_l = 2.0 * jax.lax.stop_gradient(bpd["diffusion_bpd"])
        zero = jnp.zeros_like
        (g_var,) = sched_vjp((two_l * c_t, two_l * c_dt, zero(c_s), zero(c_0), zero(c_1)))
        g_sched = jax.tree_util.tree_map_with_path(
            lambda path, g_elbo, g_v: g_elbo if is_endpoint(path) else g_v, g_sched, g_var
        )
    grads = params.replace(denoiser=g_den, schedule=g_sched)
    metrics = {k: jnp.mean(v) for k, v in bpd.items()}
    metrics["diffusion_bpd_var"] = jnp.var(bpd["diffusion_bpd"])
    metrics["gamma_min"] = g_0
    metrics["gamma_max"] = g_1
    return loss, metrics, grads


def from_config(config) -> VDM:
    """Builds the :class:`VDM` that an experiment config describes."""
    from jvdm.datasets import image_shape as dataset_shape  # the catalogue: no tfds, no data
    from jvdm.nn import unet as unet_lib

    image_shape = dataset_shape(config.data.name, config.data.data_dir)
    m, g = config.model, config.gamma
    denoiser = unet_lib.UNet(
        channels=m.channels,
        channel_mult=tuple(m.channel_mult),
        num_res_blocks=m.num_res_blocks,
        attention_resolutions=tuple(m.attention_resolutions),
        num_heads=m.num_heads,
        num_groups=m.num_groups,
        dropout=m.dropout,
        use_fourier_features=m.use_fourier_features,
        gamma_min=g.gamma_min,
        gamma_max=g.gamma_max,
        dtype=jnp.bfloat16 if m.dtype == "bfloat16" else jnp.float32,
        use_remat=m.use_remat,
    )
    if g.schedule == "learned":
        schedule = gamma_lib.LearnedGamma(
            gamma_min_init=g.gamma_min, gamma_max_init=g.gamma_max, hidden=g.hidden
        )
    elif g.schedule == "linear":
        schedule = gamma_lib.FixedLinearGamma(gamma_min=g.gamma_min, gamma_max=g.gamma_max)
    elif g.schedule == "cosine":
        schedule = gamma_lib.CosineGamma(gamma_min=g.gamma_min, gamma_max=g.gamma_max)
    else:
        schedule = gamma_lib.DDPMGamma(timesteps=g.ddpm_timesteps)
    return VDM(
        denoiser=denoiser,
        schedule=schedule,
        image_shape=tuple(image_shape),
        timesteps=m.timesteps,
        prediction=m.prediction,
        use_antithetic_time=m.use_antithetic_time,
        use_variance_gradient=g.use_variance_gradient,
    )


def init_params(config, key: jax.Array) -> VDMParams:
    """The model of ``config``, initialised."""
    return init(from_config(config), key)
