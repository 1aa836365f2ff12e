"""Peak device memory of ``sample`` and ``evaluate_split`` programs, from XLA's memory analysis.

Lowers and compiles (never runs) the program of one sampling chunk (``jvdm.sampling``) and one
evaluation batch (``jvdm.evaluate``) for big configs, with abstract parameters (no allocation),
and reports ``compiled.memory_analysis()``: argument, output, temporary (the working set XLA
allocates) and alias bytes, and ``peak = argument + output + temp - alias``. Configs:

* ``cifar10``: experiments/cifar10_learned_snr.py (32 ResNet blocks, 128 channels, 32x32x3);
* ``imagenet64``: the same network on downsampled_imagenet/64x64 (64x64x3).

The sampler's memory does not depend on its number of steps (a ``lax.scan`` reuses one step's
buffers), so a 2-step chain is compiled. ``decode_only`` is the final decode ``z_0 -> x`` alone.

Usage: ``python bench/memory.py [--configs cifar10 imagenet64] [--chunk 256] [--eval-batch 500]``.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import _common  # noqa: E402

CONFIGS = {
    "cifar10": ("cifar10_learned_snr", []),
    "imagenet64": ("cifar10_learned_snr", ["data.name='downsampled_imagenet/64x64'"]),
}


def _memory(compiled) -> dict:
    m = compiled.memory_analysis()
    out = {
        "argument_bytes": int(m.argument_size_in_bytes),
        "output_bytes": int(m.output_size_in_bytes),
        "temp_bytes": int(m.temp_size_in_bytes),
        "alias_bytes": int(m.alias_size_in_bytes),
    }
    out["peak_bytes"] = (
        out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"] - out["alias_bytes"]
    )
    out["peak_gib"] = out["peak_bytes"] / 2**30
    return out


def measure(name: str, chunk: int, eval_batch: int) -> dict:
    import jax
    import jax.numpy as jnp

    from jvdm import build as build_lib
    from jvdm import evaluate, sampling
    from jvdm import model as model_lib

    config = _common.load_config(*CONFIGS[name])
    model = build_lib.from_config(config)
    params = jax.eval_shape(functools.partial(model_lib.init, model), jax.random.key(0))
    key = jax.eval_shape(lambda: jax.random.key(0))
    indices = jax.ShapeDtypeStruct((chunk,), jnp.uint32)
    eta = jax.ShapeDtypeStruct((), jnp.float32)
    kw = dict(steps=2, sampler="ancestral", grid="lambda", gaussian_steps=0, sharding=None)
    out = {"config": name, "image_shape": list(model.image_shape), "chunk": chunk}
    sample = sampling._sample_chunk.lower(params, key, indices, eta, None, decode=True, **kw)
    out["sample"] = _memory(sample.compile())
    z_0 = jax.ShapeDtypeStruct((chunk, *model.image_shape), jnp.float32)
    keys = jax.ShapeDtypeStruct((chunk,), key.dtype)
    decode = jax.jit(sampling._decode, static_argnums=3).lower(params, z_0, keys, 2)
    out["decode_only"] = _memory(decode.compile())
    images = jax.ShapeDtypeStruct((eval_batch, *model.image_shape), jnp.uint8)
    ev = evaluate._bpd_batch.lower(params, images, key, timesteps=None, draws=1)
    out["evaluate_batch"] = eval_batch
    out["evaluate"] = _memory(ev.compile())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--eval-batch", type=int, default=500)
    parser.add_argument("--label", default="", help="a note stored with the record")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    _common.allow_unprepared_datasets()
    load = _common.loadavg()
    results = [measure(name, args.chunk, args.eval_batch) for name in args.configs]
    _common.emit(
        "memory",
        {"label": args.label, "results": results},
        load_before=load,
        write=not args.no_write,
    )


if __name__ == "__main__":
    main()
