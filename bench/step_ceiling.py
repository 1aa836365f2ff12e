"""How close to the matmul peak the train step could get: its matrix products, each timed alone.

Every ``conv_general_dilated`` and ``dot_general`` of the default train step's jaxpr (forward,
input gradient and weight gradient alike: after ``jax.grad`` they are all explicit equations) is
compiled as a program of its own, with its exact shapes and parameters, and timed on random
inputs. Their sum is what the step's matrix work costs when nothing else runs and XLA may lay out
each operand as that one product likes; the step's remaining time is everything else (the
normalisations, activations, layout copies between products, the optimizer, dispatch).

The step, every product and the float32 matmul peak are timed in interleaved rounds (the machine
is shared; its speed moves within seconds), and each figure is the median over the rounds. The
headline ``ceiling_fraction_of_peak`` is the step's FLOPs over the products' summed time over the
peak: the fraction of the peak the step would reach if every non-product operation took no time
at all. When it is below a target, no fusion, layout or scheduling change reaches that target;
only faster products (another library, other shapes: batch, channels) can.

Usage: ``python bench/step_ceiling.py [--config learned_snr] [--batch 16] [--rounds 7]``.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(__file__))

import _common  # noqa: E402
import train_step  # noqa: E402

_PRODUCTS = ("conv_general_dilated", "dot_general")


def _sub_jaxprs(eqn):
    """``(jaxpr, times it runs per run of eqn)`` for each jaxpr nested in ``eqn``'s parameters.

    A ``cond`` runs one branch: each branch is counted once (the step's convolutions and dots
    are outside conds; the decoder's fallback cond holds only elementwise work). Loop bodies are
    counted once per trip where the trip count is static (``scan``), once otherwise.
    """
    import jax

    times = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
    for value in eqn.params.values():
        for v in value if isinstance(value, tuple | list) else (value,):
            if isinstance(v, jax.extend.core.ClosedJaxpr):
                yield v.jaxpr, times
            elif isinstance(v, jax.extend.core.Jaxpr):
                yield v, times


def products(jaxpr, times: int = 1, found=None):
    """``{_Key: count}``: every product in ``jaxpr`` (nested jaxprs included), by identity."""
    found = collections.Counter() if found is None else found
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in _PRODUCTS:
            avals = tuple((tuple(v.aval.shape), str(v.aval.dtype)) for v in eqn.invars)
            found[_Key(eqn.primitive, eqn.params, avals)] += times
        for sub, n in _sub_jaxprs(eqn):
            products(sub, times * n, found)
    return found


class _Key:
    """A product up to identity: its primitive, parameters and operand shapes (hashable)."""

    def __init__(self, primitive, params, avals):
        self.primitive, self.params, self.avals = primitive, dict(params), avals
        self._id = (primitive.name, tuple(sorted((k, repr(v)) for k, v in params.items())), avals)

    def __hash__(self):
        return hash(self._id)

    def __eq__(self, other):
        return isinstance(other, _Key) and self._id == other._id

    def describe(self) -> str:
        shapes = " x ".join("x".join(map(str, s)) for s, _ in self.avals)
        if self.primitive.name == "conv_general_dilated":
            dn = self.params["dimension_numbers"]
            # The weight gradient of a convolution is a convolution whose batch and feature axes
            # swap places (lhs spec (3, 0, 1, 2): the images' channels act as the batch) and whose
            # window is the output's spatial size.
            role = "weight grad" if dn.lhs_spec[0] != 0 else "fwd / input grad"
            kind = f"conv ({role}) lhs{dn.lhs_spec} rhs{dn.rhs_spec} out{dn.out_spec}"
            for name in ("window_strides", "lhs_dilation", "rhs_dilation"):
                if any(d != 1 for d in self.params[name]):
                    kind += f" {name}{tuple(self.params[name])}"
            kind += f" padding{tuple(tuple(p) for p in self.params['padding'])}"
            return f"{kind}: {shapes}"
        return f"dot {self.params['dimension_numbers']}: {shapes}"


def compile_product(key: _Key, seed: int):
    """``(call, flops)``: the product alone, compiled, on fixed random operands."""
    import jax
    import numpy as np

    rng = np.random.default_rng(seed)
    args = [jax.numpy.asarray(rng.standard_normal(s).astype(d)) for s, d in key.avals]
    fn = jax.jit(lambda *a: key.primitive.bind(*a, **key.params))
    compiled = fn.lower(*args).compile()
    jax.block_until_ready(compiled(*args))
    return (lambda: jax.block_until_ready(compiled(*args))), _common.flops_of(compiled)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="learned_snr", help="experiment name or path")
    p.add_argument("--batch", type=int, default=None, help="default: the config's batch size")
    p.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds")
    p.add_argument("--set", action="append", default=[], help="config override a.b=value")
    p.add_argument("--top", type=int, default=12, help="slowest products listed")
    p.add_argument("--no-write", action="store_true", help="do not append to results.jsonl")
    args = p.parse_args()
    load_before = _common.loadavg()

    import jax

    from jvdm import train_state as ts

    config = _common.load_config(args.config, args.set)
    batch_size = args.batch or config.train.batch_size
    step_fn, state, batch, key, compile_s, step_flops = train_step.build(config, batch_size)
    found = products(jax.make_jaxpr(ts.train_step)(state, batch, key).jaxpr)
    progs = {k: compile_product(k, i) for i, k in enumerate(found)}
    probe = train_step.peak_probe()
    noop = jax.jit(lambda x: x + 1.0).lower(jax.numpy.zeros(())).compile()

    step_ms, peaks, prod_ms, noop_ms = [], [], collections.defaultdict(list), []
    state, _, _ = train_step.time_steps(step_fn, state, batch, key, steps=1)
    for _ in range(args.rounds):
        peaks.append(probe())
        state, times, _ = train_step.time_steps(step_fn, state, batch, key, steps=3, warmup=0)
        step_ms.append(1e3 * statistics.median(times))
        for k, (call, _) in progs.items():
            prod_ms[k].append(1e3 * statistics.median(_common.time_calls(call, reps=3)))
        noop_ms.append(1e3 * min(_common.time_calls(lambda: noop(1.0).block_until_ready(), reps=5)))

    peak = statistics.median(peaks)
    step = statistics.median(step_ms)
    rows = []
    for k, n in found.items():
        ms, flops = statistics.median(prod_ms[k]), progs[k][1]
        rows.append(
            {
                "op": k.describe(),
                "count": n,
                "ms_each": ms,
                "gflop_each": flops / 1e9,
                "fraction_of_peak": flops / (ms / 1e3) / peak,
                "ms_total": n * ms,
                "kind": "conv" if k.primitive.name == "conv_general_dilated" else "dot",
            }
        )
    by_kind = {}
    for kind in ("conv", "dot"):
        sel = [r for r in rows if r["kind"] == kind]
        ms = sum(r["ms_total"] for r in sel)
        gflop = sum(r["count"] * r["gflop_each"] for r in sel)
        by_kind[kind] = {
            "ops": sum(r["count"] for r in sel),
            "distinct": len(sel),
            "ms": ms,
            "gflop": gflop,
            "fraction_of_peak": gflop * 1e9 / (ms / 1e3) / peak if ms else 0.0,
        }
    products_ms = by_kind["conv"]["ms"] + by_kind["dot"]["ms"]
    products_gflop = by_kind["conv"]["gflop"] + by_kind["dot"]["gflop"]
    result = {
        "config": args.config,
        "overrides": args.set,
        "batch": batch_size,
        "rounds": args.rounds,
        "compile_s": compile_s,
        "peak_gflops": peak / 1e9,
        "peak_gflops_rounds": [x / 1e9 for x in peaks],
        "step_ms": step,
        "step_ms_rounds": step_ms,
        "step_gflop": step_flops / 1e9,
        "step_fraction_of_peak": step_flops / (step / 1e3) / peak,
        "products": by_kind,
        "products_ms": products_ms,
        "products_share_of_step_flops": products_gflop * 1e9 / step_flops,
        "other_ms": step - products_ms,
        # What one call of a compiled program costs with no work in it: each product's time
        # above includes it once (not subtracted; about 0.01 ms here against 0.1-3 ms products).
        "dispatch_ms_per_call": statistics.median(noop_ms),
        "ceiling_fraction_of_peak": step_flops / (products_ms / 1e3) / peak,
        "slowest": sorted(rows, key=lambda r: -r["ms_total"])[: args.top],
    }
    _common.emit("step_ceiling", result, load_before=load_before, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
