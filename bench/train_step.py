"""Speed of the compiled training step: ms/step, images/s, compile time, FLOPs and % of peak.

The step is :func:`jvdm.train_state.train_step` compiled ahead of time
(``train_step.lower(state, batch, key).compile()``), so its FLOPs are XLA's own cost analysis of
the exact program that is timed. Batches are synthetic uint8 images of the model's shape (the
loader is measured separately by ``bench/data.py``). The float32 matmul peak is measured in the
same process, right before, so the ratio compares like with like on a shared machine.

Usage::

  python bench/train_step.py                                  # experiments/learned_snr.py
  python bench/train_step.py --config cifar10_learned_snr --batch 4 --steps 3
  python bench/train_step.py --set model.channels=16 --set model.num_res_blocks=1
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

import _common  # noqa: E402
import matmul_peak  # noqa: E402


def parse_options(items: list[str]) -> dict[str, str]:
    """``['k=v', ...]`` -> ``{'k': 'v'}``: XLA options for ``.compile(compiler_options=...)``."""
    return dict(item.split("=", 1) for item in items)


def build(config, batch_size: int, *, seed: int = 0, compiler_options: dict | None = None):
    """``(step_fn, state, batch, key, compile_s, flops)`` for ``config`` at ``batch_size``.

    ``step_fn(state, batch, key)`` is the AOT-compiled train step (state donated); ``flops`` is
    the cost analysis of that program, per step.
    """
    import jax
    import numpy as np

    from jvdm import parallel
    from jvdm import train as train_lib
    from jvdm import train_state as ts

    _common.allow_unprepared_datasets()
    key = jax.random.key(seed)
    mesh = parallel.make_mesh()
    spec = train_lib.state_spec(config)
    state = ts.create_train_state(spec, key, mesh=mesh)
    shape = spec.model.image_shape
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (batch_size, *shape), dtype=np.uint8)
    batch = {"image": parallel.shard_batch(images, mesh)}
    key = parallel.replicate(key, mesh)
    t0 = time.perf_counter()
    compiled = ts.train_step.lower(state, batch, key).compile(compiler_options or None)
    compile_s = time.perf_counter() - t0
    return compiled, state, batch, key, compile_s, _common.flops_of(compiled)


def time_steps(step_fn, state, batch, key, *, steps: int, warmup: int = 2, between=None):
    """Runs ``warmup + steps`` steps; returns ``(final state, the timed steps' seconds, probes)``.

    ``between()``, if given, runs (untimed) after every timed step and ``probes`` holds its
    results (empty otherwise): used to measure the matmul peak interleaved with the steps.
    """
    import jax

    for _ in range(warmup):
        state, metrics = step_fn(state, batch, key)
    jax.block_until_ready(state)
    times, probes = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, metrics = step_fn(state, batch, key)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
        if between is not None:
            probes.append(between())
    return state, times, probes


def process_costs(step_fn, state, batch, key, *, steps: int):
    """``(final state, costs)``: CPU time in user and kernel mode and minor page faults per step.

    A high kernel share with ~1 fault per 4 KiB of the program's temporaries means the allocator
    hands every step fresh pages (see ``jvdm/_xla_defaults.py``). Measured over ``steps`` steps
    of their own (no peak probes in between), after the timed ones.
    """
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    state, times, _ = time_steps(step_fn, state, batch, key, steps=steps, warmup=0)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return state, {
        "wall_ms_per_step": 1e3 * sum(times) / steps,
        "user_cpu_ms_per_step": 1e3 * (r1.ru_utime - r0.ru_utime) / steps,
        "kernel_cpu_ms_per_step": 1e3 * (r1.ru_stime - r0.ru_stime) / steps,
        "page_faults_per_step": (r1.ru_minflt - r0.ru_minflt) / steps,
        "steps": steps,
    }


def peak_probe(n: int = 2048, reps: int = 2):
    """A function returning the f32 matmul FLOP/s right now (best of ``reps`` n x n products
    with each matmul library)."""
    import jax

    ka, kb = jax.random.split(jax.random.key(n))
    a, b = jax.random.normal(ka, (n, n)), jax.random.normal(kb, (n, n))
    dots = matmul_peak.compiled_dots(a, b)
    for dot in dots:
        dot(a, b).block_until_ready()

    def probe() -> float:
        best = float("inf")
        for dot in dots:
            for _ in range(reps):
                t0 = time.perf_counter()
                dot(a, b).block_until_ready()
                best = min(best, time.perf_counter() - t0)
        return 2.0 * n**3 / best

    return probe


def measure(
    config, batch_size: int, *, steps: int, peak_flops: float | None, options: dict | None = None
) -> dict:
    """The train step's figures for one config and batch size (no peak measured here)."""
    from jvdm import build as build_lib
    from jvdm.nn import unet

    step_fn, state, batch, key, compile_s, flops = build(
        config, batch_size, compiler_options=options
    )
    # The machine is shared: its speed moves within seconds. Measuring the matmul peak between
    # the steps gives each step its own yardstick, and the median of those ratios is robust.
    probe = peak_probe() if peak_flops else None
    state, times, probes = time_steps(step_fn, state, batch, key, steps=steps, between=probe)
    state, costs = process_costs(step_fn, state, batch, key, steps=max(2, steps // 2))
    med = statistics.median(times)
    model = build_lib.from_config(config)
    out = {
        "batch": batch_size,
        "image_shape": list(model.image_shape),
        "params": unet.count_params(state.params.denoiser),
        "compile_s": compile_s,
        **_common.summary(times),
        "images_per_s": batch_size / med,
        "flops_per_step": flops,
        "flops_per_image": flops / batch_size,
        "achieved_gflops": flops / med / 1e9,
        "process_costs": costs,
        "peak_rss_mb": _common.peak_rss_mb(),
        "device_memory": _common.device_memory(),
    }
    if peak_flops:
        # Three readings of one ratio; the interleaved median is the one the target is judged on.
        out["fraction_of_peak"] = flops / med / peak_flops  # median step / best peak before
        out["min_time_fraction_of_peak"] = flops / min(times) / peak_flops
        ratios = [flops / t / p for t, p in zip(times, probes, strict=True)]
        out["interleaved_peak_gflops"] = [p / 1e9 for p in probes]
        out["fraction_of_interleaved_peak"] = statistics.median(ratios)
        out["fraction_best_step_best_peak"] = flops / min(times) / max(peak_flops, *probes)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="learned_snr", help="experiment name or path")
    p.add_argument("--batch", type=int, default=None, help="default: the config's batch size")
    p.add_argument("--steps", type=int, default=10, help="timed steps after 2 warm-up steps")
    p.add_argument("--set", action="append", default=[], help="config override a.b=value")
    p.add_argument(
        "--option",
        action="append",
        default=[],
        help="XLA compiler option k=v for this compile only, e.g. "
        "xla_cpu_experimental_ynn_fusion_type=-individual_convolution",
    )
    p.add_argument("--peak-sizes", type=int, nargs="+", default=[2048, 3072])
    p.add_argument("--peak-reps", type=int, default=5)
    p.add_argument("--no-peak", action="store_true", help="skip the matmul peak measurement")
    p.add_argument("--no-write", action="store_true", help="do not append to results.jsonl")
    args = p.parse_args(argv)

    load = _common.loadavg()
    config = _common.load_config(args.config, args.set)
    batch = args.batch or int(config.train.batch_size)
    peak = (
        None if args.no_peak else matmul_peak.measure_peak(tuple(args.peak_sizes), args.peak_reps)
    )
    options = parse_options(args.option)
    peak_flops = peak and peak["peak_flops"]
    res = measure(config, batch, steps=args.steps, peak_flops=peak_flops, options=options)
    head = {"config": args.config, "overrides": args.set, "compiler_options": options}
    if peak:
        head["peak_gflops"] = peak["peak_flops"] / 1e9
    return _common.emit("train_step", {**head, **res}, load_before=load, write=not args.no_write)


if __name__ == "__main__":
    main()
