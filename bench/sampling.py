"""Sampling speed: images/s at 1000, 100 and 20 steps, compile time, and step vs forward cost.

Times :func:`jvdm.sampling.sample` (a ``lax.scan`` over the steps, one compiled program per
``(sampler, steps, chunk)``) on freshly initialised parameters of the config (speed does not
depend on the weights). ``n`` is small on CPU (default 16 images). The first call's extra time
over the second is the compile time. One sampling step is compared with one jitted denoiser
forward pass at the same batch: ``step_ms = (t(steps_max) - t(steps_min)) / (steps_max -
steps_min)``, which removes the fixed cost (prior draw, decoder, dispatch).

Usage: ``python bench/sampling.py [--n 16] [--steps 1000 100 20] [--sampler ancestral]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

import _common  # noqa: E402


def time_sample(params, n: int, steps: int, sampler: str, reps: int) -> dict:
    import jax

    from jvdm import sampling

    key = jax.random.key(1)
    t0 = time.perf_counter()
    sampling.sample(params, key, n, steps=steps, sampler=sampler)  # compiles, then runs
    first = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        sampling.sample(params, key, n, steps=steps, sampler=sampler)  # returns NumPy: synced
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {
        "steps": steps,
        "seconds": med,
        "images_per_s": n / med,
        "ms_per_step": 1e3 * med / steps,
        "compile_s": max(first - med, 0.0),
    }


def forward_ms(params, n: int, reps: int = 10) -> float:
    """Median ms of one jitted eval-mode denoiser forward pass on ``n`` images."""
    import jax
    import jax.numpy as jnp

    from jvdm import model as model_lib

    z = jax.random.normal(jax.random.key(0), (n, *params.model.image_shape))
    g = jnp.full((n,), -2.0, jnp.float32)
    fwd = jax.jit(lambda p, z, g: model_lib.denoise(p, z, g))
    times = _common.time_calls(lambda: fwd(params, z, g).block_until_ready(), reps=reps)
    return 1e3 * statistics.median(times)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="learned_snr")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--n", type=int, default=16, help="images per call (small on CPU)")
    p.add_argument("--steps", type=int, nargs="+", default=[1000, 100, 20])
    p.add_argument("--sampler", default="ancestral")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)

    import jax

    from jvdm import build as build_lib

    load = _common.loadavg()
    _common.allow_unprepared_datasets()
    config = _common.load_config(args.config, args.set)
    params = build_lib.init_params(config, jax.random.key(0))
    rows = [time_sample(params, args.n, s, args.sampler, args.reps) for s in args.steps]
    fwd = forward_ms(params, args.n)
    by_steps = sorted(rows, key=lambda r: r["steps"])
    lo, hi = by_steps[0], by_steps[-1]
    step_ms = None
    if hi["steps"] > lo["steps"]:
        step_ms = 1e3 * (hi["seconds"] - lo["seconds"]) / (hi["steps"] - lo["steps"])
    res = {
        "config": args.config,
        "overrides": args.set,
        "sampler": args.sampler,
        "n": args.n,
        "rows": rows,
        "forward_ms": fwd,
        "marginal_step_ms": step_ms,
        "step_over_forward": step_ms / fwd if step_ms else None,
        "peak_rss_mb": _common.peak_rss_mb(),
    }
    return _common.emit("sampling", res, load_before=load, write=not args.no_write)


if __name__ == "__main__":
    main()
