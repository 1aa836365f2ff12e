"""Micro-benchmark of one 3x3 'SAME' convolution, forward + backward, by implementation.

Compares ``lax.conv_general_dilated`` (what ``nn.Conv`` calls) with an im2col formulation (nine
shifted views concatenated on channels, then one matmul), whose backward pass is two large GEMMs
instead of XLA:CPU's weight-gradient convolution (a conv with a 28x28 window over the batch). The
loss is ``sum(conv(x, w) * g)`` so the timed program is exactly fwd + d/dx + d/dw.

Usage: ``python bench/conv_micro.py [--shapes 64x28x28x32x32 ...] [--reps 5]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

import _common  # noqa: E402


def conv_lax(x, w):
    import jax

    return jax.lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def conv_im2col(x, w):
    import jax.numpy as jnp

    kh, kw, cin, cout = w.shape
    b, h, wd, _ = x.shape
    xp = jnp.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
    cols = [xp[:, i : i + h, j : j + wd, :] for i in range(kh) for j in range(kw)]
    patches = jnp.concatenate(cols, axis=-1)  # [B, H, W, kh*kw*cin], (i, j, c) order = HWIO
    return jnp.dot(patches, w.reshape(kh * kw * cin, cout))


IMPLS = {"lax": conv_lax, "im2col": conv_im2col}


def bench_one(shape: tuple[int, ...], impl: str, reps: int) -> dict:
    import jax
    import jax.numpy as jnp

    b, h, wd, cin, cout = shape
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (b, h, wd, cin))
    w = jax.random.normal(kw, (3, 3, cin, cout)) * 0.1
    g = jax.random.normal(kg, (b, h, wd, cout))
    fn = IMPLS[impl]
    step = jax.jit(jax.grad(lambda x, w: jnp.sum(fn(x, w) * g), argnums=(0, 1)))
    compiled = step.lower(x, w).compile()
    jax.block_until_ready(compiled(x, w))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(x, w))
        times.append(time.perf_counter() - t0)
    useful = 3 * 2 * b * h * wd * 9 * cin * cout  # fwd + two backward products
    return {
        "shape": "x".join(map(str, shape)),
        "impl": impl,
        "median_ms": 1e3 * statistics.median(times),
        "min_ms": 1e3 * min(times),
        "gflops_at_min": useful / min(times) / 1e9,
        "xla_flops": _common.flops_of(compiled),
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--shapes", nargs="+", default=["64x28x28x32x32", "64x28x28x64x64", "64x14x14x64x64"]
    )
    p.add_argument("--impls", nargs="+", default=list(IMPLS))
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    load = _common.loadavg()
    rows = [
        bench_one(tuple(int(v) for v in s.split("x")), impl, args.reps)
        for s in args.shapes
        for impl in args.impls
    ]
    return _common.emit("conv_micro", {"rows": rows}, load_before=load, write=not args.no_write)


if __name__ == "__main__":
    main()
