"""The machine's measured float32 matmul peak: best FLOP/s of a jitted ``jnp.dot`` of squares.

This is the yardstick of every other benchmark ("% of peak"): what XLA:CPU's own GEMM reaches on
this machine, in this process, with the threads it has. ``FLOP/s = 2 n^3 / t`` for n x n by n x n,
best of several repetitions at each size (the best, not the median: we want the machine's limit,
and on a shared machine interference only ever slows a run down).

Usage: ``python bench/matmul_peak.py [--sizes 2048 3072 4096] [--reps 5]``; other scripts import
:func:`measure_peak`.
"""

from __future__ import annotations

import argparse
import sys
import time

sys.path.insert(0, __import__("os").path.dirname(__file__))  # run as a script from anywhere

import _common  # noqa: E402

# XLA:CPU has two matmul libraries (YNNPACK and Eigen); which one is faster depends on the shape
# and the moment, and the process's XLA_FLAGS pick one. The machine's peak is the better of both.
_CPU_DOT_LIBRARIES = (
    {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"},  # YNNPACK
    {"xla_cpu_experimental_ynn_fusion_type": ""},  # Eigen
)


def compiled_dots(a, b) -> list:
    """``a @ b`` compiled once per available matmul library (one program on GPU and TPU)."""
    import jax
    import jax.numpy as jnp

    lowered = jax.jit(jnp.dot).lower(a, b)
    if jax.default_backend() != "cpu":
        return [lowered.compile()]
    return [lowered.compile(options) for options in _CPU_DOT_LIBRARIES]


def measure_peak(sizes=(2048, 3072, 4096), reps: int = 5, dtype: str = "float32") -> dict:
    """Best measured matmul FLOP/s over ``sizes`` (each the best of ``reps`` timed calls per
    matmul library: on CPU both YNNPACK and Eigen, see ``compiled_dots``).

    Returns:
      ``{'peak_flops': float, 'best_n': int, 'by_size': {n: {'best_s', 'median_s', 'flops'}}}``.
    """
    import jax

    by_size = {}
    for n in sizes:
        ka, kb = jax.random.split(jax.random.key(n))
        a = jax.random.normal(ka, (n, n), dtype)
        b = jax.random.normal(kb, (n, n), dtype)
        times = []
        for dot in compiled_dots(a, b):
            dot(a, b).block_until_ready()  # warm the caches
            for _ in range(reps):
                t0 = time.perf_counter()
                dot(a, b).block_until_ready()
                times.append(time.perf_counter() - t0)
        best = min(times)
        by_size[n] = {
            "best_s": best,
            "median_s": sorted(times)[len(times) // 2],
            "flops": 2.0 * n**3 / best,
        }
    best_n = max(by_size, key=lambda n: by_size[n]["flops"])
    return {"peak_flops": by_size[best_n]["flops"], "best_n": best_n, "by_size": by_size}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[2048, 3072, 4096])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--no-write", action="store_true", help="do not append to results.jsonl")
    args = p.parse_args(argv)
    load = _common.loadavg()
    res = measure_peak(tuple(args.sizes), args.reps)
    res["peak_gflops"] = res["peak_flops"] / 1e9
    res["by_size"] = {str(k): v for k, v in res["by_size"].items()}
    return _common.emit("matmul_peak", res, load_before=load, write=not args.no_write)


if __name__ == "__main__":
    main()
