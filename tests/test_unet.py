"""Tests of the U-Net denoiser: shapes, zero init, conditioning, one compilation, dropout, dtypes.

Shapes are checked abstractly (``jax.eval_shape``: no compilation); numerics run on one tiny
configuration, initialised once per module. Parameter initialisation is compiled with
non-partitionable threefry, which XLA:CPU compiles several times faster (see ``_init``).
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jvdm.nn import UNet, count_params, forward_flops

TINY = dict(channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=())
SHAPE = (3, 8, 8, 2)  # [B, H, W, C]


def _init(model, shape, seed=0):
    # Each parameter's random init is a separate threefry call, and with the default
    # partitionable threefry XLA:CPU takes ~0.5 s to compile each; this is ~6x faster.
    with jax.threefry_partitionable(False):
        fn = jax.jit(
            lambda key: model.init(key, jnp.zeros(shape), jnp.zeros(shape[0]), train=False)
        )
        return fn(jax.random.key(seed))


def _perturb(params, scale=0.1, seed=0):
    """Adds NumPy noise to every parameter, so that the zero-initialised layers become active."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda p: p + scale * rng.standard_normal(p.shape).astype(p.dtype), params
    )


@pytest.fixture(scope="module")
def tiny():
    """The tiny model, its initial and perturbed params, and ONE jitted eval-mode apply.

    Every test that calls ``apply`` shares its compilation, and ``assert_max_traces`` checks that
    they all (different params, z and gamma values of the same shapes) reuse it.
    """
    model = UNet(dropout=0.5, **TINY)
    params = _init(model, SHAPE)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def apply(p, z, g):
        return model.apply(p, z, g, train=False)

    return model, params, _perturb(params), apply


@pytest.mark.parametrize(
    "shape, kwargs",
    [
        ((2, 28, 28, 1), dict(channels=8)),  # defaults: channel_mult (1, 2, 2), attention at 7
        ((2, 28, 28, 1), dict(channels=16, num_res_blocks=1, num_heads=2)),
        ((2, 32, 32, 3), dict(channels=16, channel_mult=(1, 2, 2), attention_resolutions=(8, 16))),
        ((2, 32, 32, 3), dict(channels=8, channel_mult=(1,), num_res_blocks=3)),  # VDM-like
        ((1, 8, 8, 1), dict(channels=8, channel_mult=(1, 2, 2, 2), attention_resolutions=(2,))),
        ((2, 8, 8, 1), dict(channels=12, num_groups=4, channel_mult=(1, 2), out_channels=2)),
        ((2, 16, 8, 4), dict(channels=8, use_fourier_features=False, use_remat=True)),
    ],
)
def test_output_shape(shape, kwargs):
    model = UNet(**kwargs)
    z = jax.ShapeDtypeStruct(shape, jnp.float32)
    params = jax.eval_shape(lambda z: model.init(jax.random.key(0), z, 0.0, train=False), z)
    out = jax.eval_shape(
        lambda p, z: model.apply(p, z, jnp.zeros(shape[0]), train=False), params, z
    )
    expected = (*shape[:3], kwargs.get("out_channels", shape[3]))
    assert out.shape == expected and out.dtype == jnp.float32
    train = jax.eval_shape(
        lambda p, z: model.apply(p, z, 0.0, train=True, rngs={"dropout": jax.random.key(0)}),
        params,
        z,
    )
    assert train.shape == expected and train.dtype == jnp.float32
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))


def _gammas(*values):
    return jnp.broadcast_to(jnp.asarray(values, jnp.float32), (SHAPE[0],))


def test_zero_at_init(tiny):
    _, params, _, apply = tiny
    z = jax.random.normal(jax.random.key(1), SHAPE)
    np.testing.assert_array_equal(apply(params, z, _gammas(0.5)), np.zeros(SHAPE, np.float32))


def test_output_depends_on_gamma_and_is_per_example(tiny):
    model, _, params, apply = tiny
    z = jax.random.normal(jax.random.key(1), SHAPE)
    low, high = apply(params, z, _gammas(-10.0)), apply(params, z, _gammas(4.0))
    assert np.all(np.isfinite(low)) and np.abs(low).max() > 0
    assert np.abs(low - high).max() > 1e-3 * np.abs(low).max()
    # A [B] gamma conditions each example on its own noise level.
    mixed = apply(params, z, jnp.array([-10.0, 4.0, -10.0]))
    np.testing.assert_allclose(mixed[0], low[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mixed[1], high[1], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="gamma"):
        jax.eval_shape(lambda: model.apply(params, z, jnp.zeros((2,)), train=False))


def test_compiles_once(tiny):
    _, params, perturbed, apply = tiny
    for i in range(3):
        z = jax.random.normal(jax.random.key(i), SHAPE)
        apply(perturbed if i % 2 else params, z, _gammas(-5.0 + i)).block_until_ready()


def test_dropout_only_in_training(tiny):
    model, _, params, apply = tiny
    z = jax.random.normal(jax.random.key(1), SHAPE)
    g = _gammas(0.0)
    with jax.threefry_partitionable(False):  # see _init
        train = jax.jit(lambda p, key: model.apply(p, z, g, train=True, rngs={"dropout": key}))
        k1, k2 = jax.random.key(1), jax.random.key(2)
        train1, train1b, train2 = train(params, k1), train(params, k1), train(params, k2)
    ref = apply(params, z, g)  # train=False needs no 'dropout' rng at all: it is deterministic
    np.testing.assert_array_equal(train1, train1b)
    assert np.abs(train1 - train2).max() > 1e-3 * np.abs(ref).max()
    assert np.abs(train1 - ref).max() > 1e-3 * np.abs(ref).max()


@pytest.mark.parametrize("kwargs", [dict(dtype=jnp.bfloat16), dict(use_remat=True)])
def test_bfloat16_compute_and_remat(tiny, kwargs):
    _, _, params, apply = tiny
    model = UNet(**kwargs, **TINY)
    z = jax.random.normal(jax.random.key(1), SHAPE)
    ref = apply(params, z, _gammas(1.0))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), z, 0.0, train=False))
    # Same parameter tree (so checkpoints move between settings), always float32.
    assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(params)
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(shapes))
    out = jax.jit(lambda p, z: model.apply(p, z, _gammas(1.0), train=False))(params, z)
    assert out.dtype == jnp.float32 and out.shape == SHAPE
    tol = 5e-2 if "dtype" in kwargs else 1e-5
    np.testing.assert_allclose(out, ref, rtol=0, atol=tol * np.abs(ref).max())


@pytest.mark.parametrize(
    "kwargs, shape, match",
    [
        (dict(channels=8, num_groups=3), (1, 28, 28, 1), r"num_groups.*3.*\[8, 16\]"),
        (dict(channels=16, channel_mult=(1, 3), num_groups=32), (1, 8, 8, 1), r"32.*16, 48"),
        (dict(channels=8), (1, 30, 30, 1), r"4.*30, 30"),
        (dict(channels=8, channel_mult=(1, 2, 2, 2)), (1, 28, 28, 1), r"8.*28, 28"),
        (dict(channels=8, num_heads=3), (1, 28, 28, 1), r"num_heads.*3"),
        (dict(channels=8), (28, 28, 1), r"\[B, H, W, C\]"),
    ],
)
def test_invalid_config_raises(kwargs, shape, match):
    model = UNet(**kwargs)
    with pytest.raises(ValueError, match=match):
        jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), 0.0, train=False))


def test_count_params_and_flops(tiny):
    _, params, _, _ = tiny
    sizes = [np.size(p) for p in jax.tree_util.tree_leaves(params)]
    assert count_params(params) == sum(sizes) > 0
    # forward_flops needs only shapes; a one-level model keeps its compilation short.
    model = UNet(channels=8, channel_mult=(1,), num_res_blocks=1)
    z = jax.ShapeDtypeStruct((1, 8, 8, 1), jnp.float32)
    shapes = jax.eval_shape(lambda z: model.init(jax.random.key(0), z, 0.0, train=False), z)
    flops = forward_flops(model, shapes, (8, 8, 1), batch_size=2)
    # At least the 3x3 convs of the 5 ResNet blocks (2 each, >= 8 -> 8 channels), 2 FLOPs per MAC.
    assert flops > 5 * 2 * (2 * 8 * 8) * (9 * 8 * 8) * 2


def _pixel_features(fourier_min, fourier_max):
    """The input features (z and its Fourier features) of the 256 noiseless pixel values."""
    from jvdm.decoder import scale_pixels
    from jvdm.nn.unet import _fourier_features

    z = scale_pixels(jnp.arange(256)).reshape(1, 1, 256, 1)
    return np.asarray(_fourier_features(z, fourier_min, fourier_max))[0, 0]  # [256, F]


def test_fourier_features_tell_every_pixel_value_from_the_background():
    """VDM's frequencies 6..7 repeat every 4 bins: pixel values 4 and 8 have the features of 0
    (up to float32 rounding; the sampler then left whole backgrounds at 4, issue 17). From n = 0
    every value's features differ from value 0's by more than 1, as much as a 4-bin jump does at
    n = 6."""
    old = _pixel_features(6, 8)
    gap_old = np.linalg.norm(old - old[0], axis=-1)
    assert gap_old[4] < 0.05 and gap_old[8] < 0.1 and gap_old[2] > 1.9

    new = _pixel_features(0, 8)
    gap_new = np.linalg.norm(new - new[0], axis=-1)
    assert np.min(gap_new[1:]) > 1.0
    # No two values share their features (the nearest pair still differs clearly).
    dist = np.linalg.norm(new[:, None] - new[None], axis=-1)
    assert np.min(dist[~np.eye(256, dtype=bool)]) > 1.0
