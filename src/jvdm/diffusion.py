"""Forward process q(x_t | x_0) and the Gaussian posterior q(x_s | x_t, x_0), s < t.

Conventions: data have shape ``[B, ...]``; schedule arguments (``alpha_bar_t``, ...) are scalars
(shared by the batch) or ``[B]`` (one per example), broadcast against the data by appending
trailing axes. Shape checks are on static shapes, so they also run under ``jax.jit``.
"""

import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

__all__ = ["posterior_mean_var", "q_sample"]


def _expand(v: ArrayLike, x: Array) -> Array:
    """Reshape a scalar or ``[B]`` schedule value to broadcast against ``x`` of shape ``[B, ...]``.

    Raises:
      ValueError: if ``v`` is neither a scalar nor ``[B]`` with the batch size of ``x``.
    """
    v = jnp.asarray(v)
    if v.ndim == 0:
        return v
    if v.ndim == 1 and x.ndim >= 1 and v.shape[0] == x.shape[0]:
        return v.reshape(v.shape + (1,) * (x.ndim - 1))
    raise ValueError(
        "a schedule argument must be a scalar or have shape [B] matching the data's batch axis; "
        f"got {v.shape=} for data of shape {x.shape}"
    )


def _check_same_shape(**arrays: Array) -> None:
    """Raise a ValueError naming every shape unless all arrays share one shape."""
    shapes = {name: tuple(jnp.shape(a)) for name, a in arrays.items()}
    if len(set(shapes.values())) > 1:
        desc = ", ".join(f"{name}.shape={s}" for name, s in shapes.items())
        raise ValueError(f"arrays must have the same shape; got {desc}")


def q_sample(
    x0: Float[ArrayLike, "B ..."],
    alpha_bar_t: Float[ArrayLike, " B"] | float,
    eps: Float[ArrayLike, "B ..."],
) -> Float[Array, "B ..."]:
    """Sample ``x_t ~ q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)``.

    Args:
      x0: clean data ``[B, ...]``.
      alpha_bar_t: scalar or ``[B]``.
      eps: standard normal noise, same shape as ``x0``.

    Returns:
      ``x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps``, shape ``[B, ...]``.

    References:
      Luo 2022 (arXiv 2208.11970) eq. 55 (and 61); Ho et al. 2020 eq. 4.
    """
    x0, eps = jnp.asarray(x0), jnp.asarray(eps)
    _check_same_shape(x0=x0, eps=eps)
    ab = _expand(alpha_bar_t, x0)
    # 1 - ab is one correctly rounded subtraction of the input (exact for ab >= 1/2).
    return jnp.sqrt(ab) * x0 + jnp.sqrt(1.0 - ab) * eps


def posterior_mean_var(
    x_t: Float[ArrayLike, "B ..."],
    x0: Float[ArrayLike, "B ..."],
    alpha_bar_t: Float[ArrayLike, " B"] | float,
    alpha_bar_s: Float[ArrayLike, " B"] | float,
) -> tuple[Float[Array, "B ..."], Float[Array, "B ..."]]:
    r"""Mean and variance of the posterior ``q(x_s | x_t, x_0)`` for any ``s < t``.

    With ``a = alpha_bar_t / alpha_bar_s`` (the product of the alphas between s and t):

    .. math::
      \mu = \frac{\sqrt{a}(1 - \bar\alpha_s) x_t
                  + \sqrt{\bar\alpha_s}(1 - a) x_0}{1 - \bar\alpha_t},
      \qquad \sigma^2 = \frac{(1 - a)(1 - \bar\alpha_s)}{1 - \bar\alpha_t}.

    Numerics: ``1 - a`` is computed as ``(alpha_bar_s - alpha_bar_t) / alpha_bar_s``. For adjacent
    steps ``a`` is within 1e-4 of 1, and forming ``a`` first would round it and then lose ~4 digits
    in ``1 - a``; the difference of the two given inputs is instead a single correctly rounded
    subtraction (exact when they are within a factor 2, by Sterbenz's lemma). Likewise
    ``1 - alpha_bar`` is one rounding of the input. Each factor is then accurate to a few ulp for
    every alpha_bar in (0, 1), so mean and variance are accurate to ~1e-6 relative (the mean
    relative to ``|c_t x_t| + |c_0 x_0|``, as for any sum).

    Args:
      x_t: noisy data ``[B, ...]``.
      x0: clean data, same shape as ``x_t``.
      alpha_bar_t: scalar or ``[B]``.
      alpha_bar_s: scalar or ``[B]``, with ``alpha_bar_s > alpha_bar_t`` (i.e. s < t).

    Returns:
      ``(mean, var)``, both of shape ``[B, ...]`` (the variance is broadcast to the data's shape,
      so the pair plugs straight into the elementwise ``gaussian_kl``; under jit the broadcast is
      fused and costs no memory).

    References:
      Luo 2022 eqs. 69-70 (there s = t - 1; the same derivation holds for any s < t);
      Kingma et al. 2021 (arXiv 2107.00630) eqs. 6-8.
    """
    x_t, x0 = jnp.asarray(x_t), jnp.asarray(x0)
    _check_same_shape(x_t=x_t, x0=x0)
    ab_t = _expand(alpha_bar_t, x0)
    ab_s = _expand(alpha_bar_s, x0)
    one_minus_a = (ab_s - ab_t) / ab_s  # = 1 - ab_t / ab_s, without cancellation
    one_minus_ab_s = 1.0 - ab_s
    one_minus_ab_t = 1.0 - ab_t
    coef_t = jnp.sqrt(ab_t / ab_s) * one_minus_ab_s / one_minus_ab_t
    # sqrt(ab_s) (1 - a) = (ab_s - ab_t) / sqrt(ab_s)
    coef_0 = (ab_s - ab_t) / (jnp.sqrt(ab_s) * one_minus_ab_t)
    mean = coef_t * x_t + coef_0 * x0
    var = one_minus_a * one_minus_ab_s / one_minus_ab_t
    return mean, jnp.broadcast_to(var, mean.shape)
