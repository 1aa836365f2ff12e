"""jvdm.nn.norm: group normalisation against float64 NumPy and against flax.linen.GroupNorm."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jvdm.nn import unet
from jvdm.nn.norm import GroupNorm, group_norm


def _reference(x, scale, bias, groups, eps=1e-6):
    """Group norm in float64 NumPy, written from the definition (Wu & He 2018, eq. 1-3)."""
    x = np.asarray(x, np.float64)
    b, c = x.shape[0], x.shape[-1]
    xg = x.reshape(b, -1, groups, c // groups)
    mean = xg.mean(axis=(1, 3), keepdims=True)
    var = ((xg - mean) ** 2).mean(axis=(1, 3), keepdims=True)
    y = ((xg - mean) / np.sqrt(var + eps)).reshape(x.shape)
    return y * np.asarray(scale, np.float64) + np.asarray(bias, np.float64)


def _inputs(shape, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    c = shape[-1]
    # A non-zero mean per channel, so that E[x^2] - E[x]^2 is really exercised.
    x = 1.5 * jax.random.normal(k1, shape) + jnp.broadcast_to(jnp.linspace(-1.0, 2.0, c), shape)
    return x, 1.0 + 0.3 * jax.random.normal(k2, (c,)), 0.2 * jax.random.normal(k3, (c,))


@pytest.mark.parametrize(
    "shape, groups",
    [((4, 28, 28, 32), 8), ((3, 14, 14, 96), 8), ((2, 7, 7, 64), 32), ((5, 49, 64), 8)],
)
def test_matches_the_float64_definition(shape, groups):
    x, scale, bias = _inputs(shape)
    got = jax.jit(lambda x, s, b: group_norm(x, s, b, num_groups=groups))(x, scale, bias)
    assert got.shape == shape and got.dtype == jnp.float32
    np.testing.assert_allclose(got, _reference(x, scale, bias, groups), rtol=0, atol=2e-5)


def test_module_equals_flax_group_norm_values_and_gradients():
    x, scale, bias = _inputs((4, 14, 14, 96), seed=1)
    params = {"params": {"scale": scale, "bias": bias}}
    ours, theirs = GroupNorm(8), nn.GroupNorm(8)
    ct = jax.random.normal(jax.random.key(2), x.shape)

    def loss(module):
        return lambda p, x: jnp.sum(module.apply(p, x) * ct)

    np.testing.assert_allclose(ours.apply(params, x), theirs.apply(params, x), atol=2e-5)
    g_ours = jax.jit(jax.grad(loss(ours), argnums=(0, 1)))(params, x)
    g_theirs = jax.jit(jax.grad(loss(theirs), argnums=(0, 1)))(params, x)
    for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_theirs), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(b))))
    # Same parameters, same shapes and initial values: flax's and ours are interchangeable.
    p_ours, p_theirs = ours.init(jax.random.key(0), x), theirs.init(jax.random.key(0), x)
    assert jax.tree.structure(p_ours) == jax.tree.structure(p_theirs)
    for a, b in zip(jax.tree.leaves(p_ours), jax.tree.leaves(p_theirs), strict=True):
        np.testing.assert_array_equal(a, b)


def test_low_precision_input_keeps_float32_statistics():
    x, scale, bias = _inputs((2, 8, 8, 32), seed=3)
    params = {"params": {"scale": scale, "bias": bias}}
    y = GroupNorm(8, dtype=jnp.bfloat16).apply(params, x.astype(jnp.bfloat16))
    assert y.dtype == jnp.bfloat16
    ref = _reference(np.asarray(x.astype(jnp.bfloat16), np.float64), scale, bias, 8)
    np.testing.assert_allclose(np.asarray(y, np.float64), ref, atol=3e-2)


def test_bad_groups_and_parameter_shapes_are_errors():
    x, scale, bias = _inputs((2, 4, 4, 12))
    with pytest.raises(ValueError, match="num_groups"):
        group_norm(x, scale, bias, num_groups=5)
    with pytest.raises(ValueError, match="scale and bias"):
        group_norm(x, scale[:6], bias, num_groups=4)


def test_unet_parameter_tree_is_unchanged_by_the_norm_implementation(monkeypatch):
    """Checkpoints written with flax's GroupNorm restore into the U-Net (same names and shapes)."""
    net = unet.UNet(channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,))
    z, g = jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,))
    ours = jax.eval_shape(lambda: net.init(jax.random.key(0), z, g, train=False))
    monkeypatch.setattr(unet, "GroupNorm", nn.GroupNorm)
    theirs = jax.eval_shape(lambda: net.init(jax.random.key(0), z, g, train=False))
    assert jax.tree_util.tree_structure(ours) == jax.tree_util.tree_structure(theirs)
    assert jax.tree.map(lambda a: a.shape, ours) == jax.tree.map(lambda a: a.shape, theirs)
