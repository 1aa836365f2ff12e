"""The U-Net denoiser of DDPM/VDM: eps_hat = UNet(z_t, gamma_t).

The network is pure architecture: it maps a noisy image and its noise level gamma = -log SNR to a
prediction with the image's shape, and knows nothing of the diffusion maths. Layout is NHWC
throughout, attention is a jnp einsum, and everything is static-shape so one compilation serves a
whole training run.

References:
  Ho, Jain, Abbeel, *Denoising Diffusion Probabilistic Models* (arXiv 2006.11239), appendix B.
  Kingma et al., *Variational Diffusion Models* (arXiv 2107.00630), appendix B and C (Fourier
  features of the input, conditioning on the normalised gamma).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jvdm import validate
from jvdm.nn.norm import GroupNorm

__all__ = ["UNet", "count_params", "forward_flops"]

_zeros = nn.initializers.zeros


def _timestep_embedding(t: jax.Array, dim: int) -> jax.Array:
    """Sinusoidal embedding [B] -> [B, dim] of DDPM/Transformer (computed in float32)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(10_000.0) * jnp.arange(half, dtype=jnp.float32) / max(half - 1, 1))
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def _fourier_features(z: jax.Array, n_min: int, n_max: int) -> jax.Array:
    """sin/cos(2^n pi z) for n in [n_min, n_max), per channel: [B,H,W,C] -> [B,H,W,2C(n_max-n_min)].

    Computed in float32 whatever the compute dtype: at n = 7 the argument reaches ~400, where bf16
    cannot even resolve the period.
    """
    z = z.astype(jnp.float32)
    freqs = (2.0 ** jnp.arange(n_min, n_max, dtype=jnp.float32)) * jnp.pi  # [F]
    h = (z[..., None] * freqs[None, None, None, None, :]).reshape(*z.shape[:-1], -1)
    return jnp.concatenate([jnp.sin(h), jnp.cos(h)], axis=-1)


class _ResBlock(nn.Module):
    """GroupNorm-swish-conv, + conditioning, GroupNorm-swish-dropout-conv(zero), + skip."""

    out_channels: int
    num_groups: int
    dropout: float
    deterministic: bool
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array, cond: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=jnp.float32)
        h = nn.swish(GroupNorm(self.num_groups, **kw)(x))
        h = nn.Conv(self.out_channels, (3, 3), **kw)(h)
        h = h + nn.Dense(self.out_channels, **kw)(cond)[:, None, None, :]
        h = nn.swish(GroupNorm(self.num_groups, **kw)(h))
        h = nn.Dropout(self.dropout, deterministic=self.deterministic)(h)
        # Zero-init: each block starts as the identity, which keeps a deep U-Net trainable.
        h = nn.Conv(self.out_channels, (3, 3), kernel_init=_zeros, **kw)(h)
        if x.shape[-1] != self.out_channels:
            x = nn.Conv(self.out_channels, (1, 1), **kw)(x)
        return x + h


class _AttnBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, residual, zero-init output projection."""

    num_heads: int
    num_groups: int
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, hgt, wid, c = x.shape
        kw = dict(dtype=self.dtype, param_dtype=jnp.float32)
        h = GroupNorm(self.num_groups, **kw)(x).reshape(b, hgt * wid, c)
        qkv = nn.DenseGeneral((3, self.num_heads, c // self.num_heads), **kw)(h)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, N, heads, d]
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(c // self.num_heads)
        # Softmax in float32: bf16 logits over hundreds of positions lose the small weights.
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        h = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
        h = nn.DenseGeneral(c, axis=(-2, -1), kernel_init=_zeros, **kw)(h)
        return x + h.reshape(b, hgt, wid, c)


class UNet(nn.Module):
    """U-Net noise predictor eps_hat(z_t, gamma_t) for images [B, H, W, C].

    Architecture of DDPM (Ho et al. 2020, appendix B) with VDM's changes (Kingma et al. 2021,
    appendix B): input Fourier features, conditioning on the normalised gamma, zero-initialised
    output. ``len(channel_mult)`` resolution levels, each with ``num_res_blocks`` ResNet blocks
    (followed by self-attention where the spatial size is in ``attention_resolutions``) and a
    stride-2 conv down-sampling between levels; the middle is ResNet-attention-ResNet; the up path
    mirrors it with ``num_res_blocks + 1`` blocks per level, each taking the concatenated skip
    connection, and nearest-neighbour up-sampling followed by a conv.

    VDM's CIFAR-10 network (no down-sampling, 32 blocks, attention only in the middle) is
    ``UNet(channels=128, channel_mult=(1,), num_res_blocks=32, attention_resolutions=())``.

    Attributes:
      out_channels: output channels; ``None`` means the input's C.
      channels: base channel count; level i has ``channels * channel_mult[i]``.
      channel_mult: per-level channel multipliers; H and W must divide by
        ``2 ** (len(channel_mult) - 1)``.
      num_res_blocks: ResNet blocks per level on the down path (one more on the up path).
      attention_resolutions: spatial sizes (of the H axis) after whose ResNet blocks self-attention
        is applied. The middle block always has attention.
      num_heads: attention heads; must divide every channel count.
      dropout: dropout rate inside the ResNet blocks (active only when ``train=True``; rng
        stream ``'dropout'``).
      num_groups: GroupNorm groups; must divide every channel count.
      use_fourier_features: concatenate sin/cos(2^n pi z), n in [fourier_min, fourier_max), to z.
      fourier_min, fourier_max: range of Fourier frequencies. VDM used 6, 8, whose features are
        periodic in z with period 2 / 2**6, i.e. 4 pixel bins: a background lifted by 4 or 8 bins
        looks to them exactly like one at -1 (the grey backgrounds of issue 17). From
        ``fourier_min=0`` no two pixel values in [-1, 1] share their features.
      gamma_min, gamma_max: only normalise the conditioning, t = (gamma - gamma_min) /
        (gamma_max - gamma_min); they are not parameters.
      dtype: compute dtype (e.g. ``jnp.bfloat16``); parameters and the output stay float32.
      use_remat: rematerialise the ResNet blocks (less memory, ~30% more compute).
    """

    out_channels: int | None = None
    channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (7,)
    num_heads: int = 1
    dropout: float = 0.1
    num_groups: int = 8
    use_fourier_features: bool = True
    fourier_min: int = 0
    fourier_max: int = 8
    gamma_min: float = -13.3
    gamma_max: float = 5.0
    dtype: Any = jnp.float32
    use_remat: bool = False

    def _validate(self, z: jax.Array) -> None:
        if z.ndim != 4:
            raise ValueError(f"UNet expects z of shape [B, H, W, C], got {z.shape=}")
        widths = sorted({self.channels * m for m in self.channel_mult})
        bad = [w for w in widths if w % self.num_groups]
        if bad:
            raise ValueError(
                f"num_groups must divide every channel count: {self.num_groups=} does not divide "
                f"{bad} (channels={self.channels}, channel_mult={tuple(self.channel_mult)})"
            )
        bad = [w for w in widths if w % self.num_heads]
        if bad:
            raise ValueError(f"num_heads must divide every channel count: {self.num_heads=}, {bad}")
        validate.check_sides_divide(z.shape, self.channel_mult, "the denoiser's input")
        validate.check_gamma_order(self.gamma_min, self.gamma_max, "UNet.")

    @nn.compact
    def __call__(self, z: jax.Array, gamma: jax.Array | float, *, train: bool) -> jax.Array:
        """Predicts eps from z_t.

        Args:
          z: noisy images [B, H, W, C].
          gamma: noise level -log SNR, a scalar or [B].
          train: enables dropout (needs the ``'dropout'`` rng).

        Returns:
          [B, H, W, C_out] float32, C_out = ``out_channels`` or C; exactly zero at initialisation.
        """
        self._validate(z)
        b, _, _, c_in = z.shape
        gamma = jnp.asarray(gamma, jnp.float32)
        if gamma.ndim > 1 or (gamma.ndim == 1 and gamma.shape[0] not in (1, b)):
            raise ValueError(f"gamma must be a scalar or [B]: got {gamma.shape=} for {z.shape=}")
        gamma = jnp.broadcast_to(gamma.reshape(-1), (b,))
        kw = dict(dtype=self.dtype, param_dtype=jnp.float32)
        ch = self.channels

        # Conditioning (VDM): t in [0, 1] from gamma, sinusoidal embedding of 1000 t, 2-layer MLP.
        t = (gamma - self.gamma_min) / (self.gamma_max - self.gamma_min)
        cond = _timestep_embedding(t * 1000.0, ch)
        # Both layers end in swish (VDM); each ResNet block then applies its own Dense.
        cond = nn.swish(nn.Dense(4 * ch, name="cond_0", **kw)(cond))
        cond = nn.swish(nn.Dense(4 * ch, name="cond_1", **kw)(cond))

        h = z.astype(jnp.float32)
        if self.use_fourier_features:
            h = jnp.concatenate([h, _fourier_features(h, self.fourier_min, self.fourier_max)], -1)
        h = nn.Conv(ch, (3, 3), name="conv_in", **kw)(h.astype(self.dtype))

        block_cls = nn.remat(_ResBlock) if self.use_remat else _ResBlock

        # Explicit names: the parameter tree is the same with and without remat.
        def res(h, width, name):
            block = block_cls(
                width, self.num_groups, self.dropout, not train, self.dtype, name=name
            )
            return block(h, cond)

        def attn(h, name):
            return _AttnBlock(self.num_heads, self.num_groups, self.dtype, name=name)(h)

        hs = [h]
        last = len(self.channel_mult) - 1
        for level, mult in enumerate(self.channel_mult):
            for i in range(self.num_res_blocks):
                h = res(h, ch * mult, f"down_{level}_{i}")
                if h.shape[1] in self.attention_resolutions:
                    h = attn(h, f"down_{level}_{i}_attn")
                hs.append(h)
            if level != last:
                down = nn.Conv(
                    h.shape[-1], (3, 3), strides=(2, 2), name=f"downsample_{level}", **kw
                )
                h = down(h)
                hs.append(h)

        h = attn(res(h, h.shape[-1], "mid_0"), "mid_attn")
        h = res(h, h.shape[-1], "mid_1")

        for level, mult in reversed(list(enumerate(self.channel_mult))):
            for i in range(self.num_res_blocks + 1):
                h = res(jnp.concatenate([h, hs.pop()], axis=-1), ch * mult, f"up_{level}_{i}")
                if h.shape[1] in self.attention_resolutions:
                    h = attn(h, f"up_{level}_{i}_attn")
            if level != 0:
                bb, hh, ww, cc = h.shape
                # Nearest-neighbour x2 as a broadcast + reshape: no gather.
                h = jnp.broadcast_to(h[:, :, None, :, None, :], (bb, hh, 2, ww, 2, cc))
                h = h.reshape(bb, 2 * hh, 2 * ww, cc)
                h = nn.Conv(cc, (3, 3), name=f"upsample_{level}", **kw)(h)
        assert not hs

        h = nn.swish(GroupNorm(self.num_groups, name="norm_out", **kw)(h))
        c_out = self.out_channels or c_in
        out = nn.Conv(c_out, (3, 3), kernel_init=_zeros, name="conv_out", **kw)(h)
        return out.astype(jnp.float32)


def count_params(params: Any) -> int:
    """Total number of scalars in a params pytree."""
    return int(sum(x.size for x in jax.tree_util.tree_leaves(params)))


def forward_flops(
    module: nn.Module, params: Any, input_shape: Sequence[int], batch_size: int = 1
) -> float:
    """FLOPs of one (eval-mode) forward pass, from XLA's cost analysis of the compiled program.

    Args:
      module: a ``UNet`` (anything called as ``module.apply(params, z, gamma, train=False)``).
      params: its parameters (only shapes and dtypes are used).
      input_shape: ``(H, W, C)`` of one image.
      batch_size: B.

    Returns:
      The ``'flops'`` entry of ``compiled.cost_analysis()`` (a multiply-add counts as 2).
    """
    z = jax.ShapeDtypeStruct((batch_size, *input_shape), jnp.float32)
    gamma = jax.ShapeDtypeStruct((batch_size,), jnp.float32)
    fn = lambda p, z, g: module.apply(p, z, g, train=False)
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    cost = jax.jit(fn).lower(abstract, z, gamma).compile().cost_analysis()
    # Older jax versions return a list with one dict per program; jax 0.10 returns the dict.
    if isinstance(cost, (list, tuple)):
        return float(sum(c.get("flops", 0.0) for c in cost))
    return float(cost["flops"])
