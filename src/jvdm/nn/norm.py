"""Group normalisation laid out for vector units: statistics per channel first, groups after.

``flax.linen.GroupNorm`` reshapes ``[B, H, W, C]`` to ``[B, H, W, G, C/G]`` and reduces over
``(H, W, C/G)``. The minor dimension of that view is ``C/G`` (4 for 32 channels in 8 groups), so
XLA:CPU's reduction and broadcast loops run on vectors of 4 floats instead of 16; and XLA fuses the
small per-group arithmetic (group index by integer division, rsqrt, products) into the full-size
loops, where it runs once per element. Here every full-size operation keeps C minor: per-channel
sums over space -> ``[B, C]``, group statistics on that small array, then one per-channel affine
map ``x * a[b, c] + d[b, c]`` whose coefficients are materialised first; the gradient is written
out (a custom VJP) in the same form: one reduction pass and one elementwise pass over full-size
arrays.

Same function (tested against a float64 reference and against flax, values and gradients), same
parameters (``scale``, ``bias``; the class is named ``GroupNorm`` so parameter trees keep their
names). Measured in the default model on 2 CPU cores: the norms alone 2x faster, the U-Net forward
pass 12% and the train step 5-6% (``bench/RESULTS.md``).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["GroupNorm", "group_norm"]


def group_norm(
    x: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    *,
    num_groups: int,
    epsilon: float = 1e-6,
) -> jax.Array:
    """Group normalisation of ``x`` [B, ..., C] over its spatial axes and channel groups.

    Args:
      x: [B, *spatial, C]; any float dtype (statistics are computed in float32).
      scale, bias: [C] per-channel affine parameters.
      num_groups: G, which must divide C; channels ``g*C/G .. (g+1)*C/G - 1`` form group g.
      epsilon: added to the variance.

    Returns:
      float32 array of ``x``'s shape: ``(x - mean_g) / sqrt(var_g + epsilon) * scale + bias``.

    References:
      Wu & He, *Group Normalization* (arXiv 1803.08494), eq. 1-3. Like ``flax.linen.GroupNorm``
      (``use_fast_variance=True``) the variance is ``E[x^2] - E[x]^2`` clipped at 0.
    """
    c = x.shape[-1]
    if c % num_groups:
        raise ValueError(f"num_groups must divide the channels: {num_groups=}, {x.shape=}")
    if scale.shape != (c,) or bias.shape != (c,):
        raise ValueError(f"scale and bias must be [C]: {scale.shape=}, {bias.shape=}, {x.shape=}")
    return _group_norm(num_groups, epsilon, x, scale, bias)


def _per_channel_sums(*arrays: jax.Array) -> list[jax.Array]:
    """``sum over the spatial axes`` of each ``[B, *spatial, C]`` array: ``[B, C]`` each."""
    axes = tuple(range(1, arrays[0].ndim - 1))
    return [jnp.sum(a, axis=axes) for a in arrays]


def _group_sum(v: jax.Array, num_groups: int) -> jax.Array:
    """``[B, C] -> [B, G]``: the sum over each group's channels."""
    return v.reshape(v.shape[0], num_groups, -1).sum(-1)


def _to_channels(v: jax.Array, c: int) -> jax.Array:
    """``[B, G] -> [B, C]``: each group's value repeated for its channels."""
    return jnp.repeat(v, c // v.shape[1], axis=1)


def _materialised(x: jax.Array, *coeffs: jax.Array) -> list[jax.Array]:
    """``[B, C]`` coefficients, computed before and reshaped to broadcast against ``x``.

    The optimisation barrier keeps them out of the full-size loops that use them: left to itself
    XLA fuses their computation (group index by integer division, rsqrt, products) into those
    loops, where it runs once per element; measured 2x slower forward and backward.
    """
    coeffs = jax.lax.optimization_barrier(coeffs)
    shape = (x.shape[0],) + (1,) * (x.ndim - 2) + (x.shape[-1],)
    return [v.reshape(shape) for v in coeffs]


def _group_count(x: jax.Array, num_groups: int) -> int:
    """Elements per (example, group): spatial size times channels per group."""
    return x.size // (x.shape[0] * num_groups)


def _statistics(num_groups, epsilon, xf):
    """Per-group mean and ``1 / sqrt(var + epsilon)``, both ``[B, G]``."""
    count = _group_count(xf, num_groups)
    s1, s2 = _per_channel_sums(xf, xf * xf)
    mean = _group_sum(s1, num_groups) / count
    var = jnp.maximum(_group_sum(s2, num_groups) / count - mean * mean, 0.0)
    return mean, jax.lax.rsqrt(var + epsilon)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _group_norm(num_groups, epsilon, x, scale, bias):
    return _group_norm_fwd(num_groups, epsilon, x, scale, bias)[0]


def _group_norm_fwd(num_groups, epsilon, x, scale, bias):
    xf = x.astype(jnp.float32)
    c = xf.shape[-1]
    mean, inv = _statistics(num_groups, epsilon, xf)
    a = _to_channels(inv, c) * scale.astype(jnp.float32)[None, :]  # [B, C]
    d = bias.astype(jnp.float32)[None, :] - _to_channels(mean, c) * a
    a_, d_ = _materialised(xf, a, d)
    return xf * a_ + d_, (x, scale, bias, mean, inv)


def _group_norm_bwd(num_groups, epsilon, res, dy):
    """The gradient in two passes over full-size arrays: one multi-output reduction for the
    per-channel sums of ``dy`` and ``dy * x``, one elementwise map for ``dx``; everything else is on
    ``[B, C]``.

    With ``x_hat = (x - mean) inv`` and ``g = dy * scale``:
    ``dx = inv (g - mean_group(g) - x_hat mean_group(g x_hat))``, which is
    ``dx = a dy + k1 x + k0`` with ``a = inv scale``, ``k1 = -inv^2 M2``,
    ``k0 = inv^2 mean M2 - inv M1``, ``M1 = mean_group(g)``, ``M2 = mean_group(g x_hat)``.
    (The clip of the variance at 0, active only for constant groups, is not differentiated.)
    """
    x, scale, bias, mean, inv = res
    xf = x.astype(jnp.float32)
    dy = dy.astype(jnp.float32)
    c = xf.shape[-1]
    count = _group_count(xf, num_groups)
    s_dy, s_dyx = _per_channel_sums(dy, dy * xf)  # [B, C]
    mean_c, inv_c = _to_channels(mean, c), _to_channels(inv, c)
    s_dy_xhat = inv_c * (s_dyx - mean_c * s_dy)  # sum over space of dy * x_hat, [B, C]
    scale_f = scale.astype(jnp.float32)[None, :]
    m1 = _group_sum(scale_f * s_dy, num_groups) / count  # [B, G]
    m2 = _group_sum(scale_f * s_dy_xhat, num_groups) / count
    k1 = -inv * inv * m2
    k0 = inv * inv * mean * m2 - inv * m1
    a_, k1_, k0_ = _materialised(xf, inv_c * scale_f, _to_channels(k1, c), _to_channels(k0, c))
    dx = dy * a_ + xf * k1_ + k0_
    dscale = jnp.sum(s_dy_xhat, axis=0).astype(scale.dtype)
    dbias = jnp.sum(s_dy, axis=0).astype(bias.dtype)
    return dx.astype(x.dtype), dscale, dbias


_group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


class GroupNorm(nn.Module):
    """Drop-in for ``flax.linen.GroupNorm(num_groups)`` on channel-last inputs (see module doc).

    Attributes:
      num_groups: G; must divide the channel count.
      epsilon: added to the variance.
      dtype: output dtype (statistics and the affine map are computed in float32).
      param_dtype: dtype of ``scale`` and ``bias``.
    """

    num_groups: int = 32
    epsilon: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
        y = group_norm(x, scale, bias, num_groups=self.num_groups, epsilon=self.epsilon)
        return y.astype(self.dtype)
