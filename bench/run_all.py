"""Runs every benchmark (``make bench``) and prints a summary; ``--quick`` for a short smoke run.

Each script runs in its own subprocess (XLA flags and device counts are per process) and appends
its JSON record to ``bench/results.jsonl``; this script collects the records and prints one
summary line per benchmark, then the summary as one JSON object on the last line.

Usage: ``python bench/run_all.py [--quick] [--only train_step sampling ...]``; the model-sizing
sweep ``configs`` runs only with ``--only configs``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import _common

# script -> (full arguments, quick arguments)
PLAN = {
    "matmul_peak": ([], ["--sizes", "1024", "2048", "--reps", "2"]),
    "train_step": ([], ["--steps", "2", "--peak-sizes", "1024"]),
    "train_step_cifar": (
        ["--config", "cifar10_learned_snr", "--batch", "4", "--steps", "3"],
        ["--config", "cifar10_learned_snr", "--batch", "1", "--steps", "1", "--no-peak"],
    ),
    "sampling": ([], ["--n", "2", "--steps", "20", "5", "--reps", "1"]),
    "scaling": (
        [],
        [
            "--min-batch",
            "4",
            "--max-batch",
            "8",
            "--steps",
            "1",
            "--sample-steps",
            "5",
            "10",
            "--sample-n",
            "2",
        ],
    ),  # fmt: skip
    "devices": ([], ["--counts", "1", "2", "--batch", "8", "--steps", "1"]),
    "data": ([], ["--batches", "5"]),
    "mixture_base": ([], ["--shapes", "mnist", "--reps", "1"]),
    "profile_step": ([], ["--batch", "8", "--steps", "1", "--top", "10"]),
    "step_ceiling": ([], ["--batch", "8", "--rounds", "1", "--top", "5"]),
    "configs": ([], ["--only", "c16_r1_noattn_b128", "--steps", "1"]),
}
# Run only when named with --only: the sizing sweep takes more than 8 minutes on 2 cores.
OPT_IN = ("configs",)


def run(name: str, args: list[str]) -> dict:
    script = name.removesuffix("_cifar")
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(_common.BENCH_DIR / f"{script}.py"), *args],
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"bench": name, "error": proc.stderr.strip()[-600:], "wall_s": wall}
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "wall_s": wall}


def _line(name: str, rec: dict) -> str:
    if "error" in rec:
        return f"{name:18s} FAILED: {rec['error'][-200:]}"
    pick = {
        "matmul_peak": ("peak_gflops",),
        "train_step": ("median_ms", "images_per_s", "compile_s", "fraction_of_peak"),
        "train_step_cifar": ("median_ms", "images_per_s", "compile_s", "flops_per_image"),
        "sampling": ("forward_ms", "marginal_step_ms", "step_over_forward"),
        "scaling": ("slope_log_time_vs_log_batch_from_8", "slope_log_time_vs_log_steps"),
        "data": ("sync_ms_per_batch", "step_ms", "loader_share_of_step"),
        "profile_step": ("wall_ms_per_step", "categories_ms_per_step"),
        "step_ceiling": (
            "step_fraction_of_peak",
            "ceiling_fraction_of_peak",
            "products_ms",
            "other_ms",
        ),
    }.get(name, ())
    fields = {k: rec.get(k) for k in pick} if pick else {"rows": len(rec.get("rows", []))}
    return f"{name:18s} {json.dumps(fields, default=str)[:300]}  (load {rec.get('loadavg_before')})"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="short smoke run of every script")
    default = [name for name in PLAN if name not in OPT_IN]
    p.add_argument("--only", nargs="+", default=default, choices=list(PLAN))
    args = p.parse_args(argv)
    summary = {}
    for name in args.only:
        full, quick = PLAN[name]
        rec = run(name, quick if args.quick else full)
        summary[name] = rec
        print(_line(name, rec), file=sys.stderr, flush=True)
    ok = all("error" not in r for r in summary.values())
    out = {"quick": args.quick, "ok": ok, "loadavg": _common.loadavg()}
    out["benches"] = {
        k: {kk: v[kk] for kk in ("wall_s", "error") if kk in v} for k, v in summary.items()
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
