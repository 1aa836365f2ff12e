"""How time scales: train-step time vs batch size, and sampling time vs number of steps.

Batch sizes are powers of two from 1 up to ``--max-batch`` (default 128 on a 2-core CPU: every
size is a separate ~1 minute compile, and 256 takes ~10 s a step; raise it where that is
affordable). The slope of log(step time) vs log(batch) from batch 8 upward says how close the step
is to linear in the batch (slope 1: per-image cost fixed, no more gain from batching; slope < 1:
fixed per-step overheads still matter).

Usage: ``python bench/scaling.py [--max-batch 128] [--sample-steps 10 20 50 100]``.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

import _common  # noqa: E402
import train_step  # noqa: E402


def slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of log(y) against log(x)."""
    if len(xs) < 2:
        return None
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    den = sum((a - mx) ** 2 for a in lx)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / den if den else None


def batch_rows(config, batches: list[int], steps: int) -> list[dict]:
    rows = []
    for b in batches:
        fn, state, data, key, compile_s, flops = train_step.build(config, b)
        _, times, _ = train_step.time_steps(fn, state, data, key, steps=steps)
        med = statistics.median(times)
        rows.append(
            {
                "batch": b,
                "median_ms": 1e3 * med,
                "images_per_s": b / med,
                "compile_s": compile_s,
                "achieved_gflops": flops / med / 1e9,
            }
        )
        print(rows[-1], file=sys.stderr, flush=True)
    return rows


def sampling_rows(config, steps_list: list[int], n: int) -> list[dict]:
    import jax

    from jvdm import build as build_lib
    from jvdm import sampling

    params = build_lib.init_params(config, jax.random.key(0))
    rows = []
    for steps in steps_list:
        sampling.sample(params, jax.random.key(1), n, steps=steps)  # compile
        t0 = time.perf_counter()
        sampling.sample(params, jax.random.key(1), n, steps=steps)
        rows.append({"steps": steps, "n": n, "seconds": time.perf_counter() - t0})
    return rows


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="learned_snr")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--min-batch", type=int, default=1)
    p.add_argument("--max-batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=3, help="timed train steps per batch size")
    p.add_argument("--sample-steps", type=int, nargs="+", default=[10, 20, 50, 100])
    p.add_argument("--sample-n", type=int, default=16)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    load = _common.loadavg()
    _common.allow_unprepared_datasets()
    config = _common.load_config(args.config, args.set)
    batches = [2**i for i in range(12) if args.min_batch <= 2**i <= args.max_batch]
    rows = batch_rows(config, batches, args.steps)
    big = [r for r in rows if r["batch"] >= 8]
    srows = sampling_rows(config, args.sample_steps, args.sample_n)
    res = {
        "config": args.config,
        "overrides": args.set,
        "max_batch_note": f"capped at {args.max_batch} on this CPU (compile ~1 min per size)",
        "batch_rows": rows,
        "slope_log_time_vs_log_batch_from_8": slope(
            [r["batch"] for r in big], [r["median_ms"] for r in big]
        ),
        "sampling_rows": srows,
        "slope_log_time_vs_log_steps": slope(
            [r["steps"] for r in srows], [r["seconds"] for r in srows]
        ),
    }
    return _common.emit("scaling", res, load_before=load, write=not args.no_write)


if __name__ == "__main__":
    main()
