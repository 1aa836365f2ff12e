"""The data loader's share of the step: time to produce a batch vs the train step's time.

Measures :func:`jvdm.data.make_train_loader` two ways: the prefetching iterator consumed as fast as
possible (its throughput when nothing else runs), and ``loader.batch(step)`` called synchronously
(the cost one batch puts on the cores, wherever it runs). The step time comes from ``--step-ms``,
else from the latest ``train_step`` record of the same config and batch in ``results.jsonl``, else
it is measured here. On a 2-core machine the loader's threads compete with XLA's for the same
cores, so the synchronous cost is the honest share.

Usage: ``python bench/data.py [--batch 64] [--batches 50] [--step-ms 3000]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

import _common  # noqa: E402


def _recorded_step_ms(config_name: str, batch: int) -> float | None:
    if not _common.RESULTS.exists():
        return None
    # _common applied jvdm's CPU runtime defaults (XLA_FLAGS), which a train_step record has.
    # Only a record taken with this process's XLA flags (and so this code's defaults) will do.
    flags = os.environ.get("XLA_FLAGS", "")
    best = None
    for line in _common.RESULTS.read_text().splitlines():
        rec = json.loads(line)
        if (
            rec.get("bench") == "train_step"
            and rec.get("config") == config_name
            and rec.get("batch") == batch
            and not rec.get("overrides")
            and rec["machine"].get("xla_flags", "") == flags
        ):
            best = rec["median_ms"]  # the latest such record wins
    return best


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="learned_snr")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--batches", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--step-ms", type=float, default=None)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)

    from jvdm import data

    load = _common.loadavg()
    config = _common.load_config(args.config)
    batch = args.batch or int(config.train.batch_size)
    loader = data.make_train_loader(
        config.data.name,
        split=config.data.train_split,
        global_batch_size=batch,
        seed=0,
        data_dir=config.data.data_dir,
        num_threads=args.threads,
    )
    it = iter(loader)
    next(it)  # start the threads, open the files
    t0 = time.perf_counter()
    for _ in range(args.batches):
        next(it)
    iter_ms = 1e3 * (time.perf_counter() - t0) / args.batches
    sync = _common.time_calls(lambda: loader.batch(7), reps=args.batches)
    sync_ms = 1e3 * statistics.median(sync)

    step_ms, source = args.step_ms, "--step-ms"
    if step_ms is None:
        step_ms, source = _recorded_step_ms(args.config, batch), "results.jsonl"
    if step_ms is None:
        import train_step

        cfg = _common.load_config(args.config)
        step_ms = train_step.measure(cfg, batch, steps=3, peak_flops=None)["median_ms"]
        source = "measured"
    res = {
        "config": args.config,
        "batch": batch,
        "loader_threads": args.threads,
        "iterator_ms_per_batch": iter_ms,
        "sync_ms_per_batch": sync_ms,
        "step_ms": step_ms,
        "step_ms_source": source,
        "loader_share_of_step": sync_ms / step_ms,
    }
    return _common.emit("data", res, load_before=load, write=not args.no_write)


if __name__ == "__main__":
    main()
