"""The data loader's share of the step: time to produce a batch vs the train step's time.

Measures :func:`jvdm.data.make_train_loader` two ways: the prefetching iterator consumed as fast as
possible (its throughput when nothing else runs), and ``loader.batch(step)`` called synchronously
(the cost one batch puts on the cores, wherever it runs). The step time comes from ``--step-ms``,
else from the latest ``train_step`` record of the same config and batch in ``results.jsonl``, else
it is measured here. On a 2-core machine the loader's threads compete with XLA's for the same
cores, so the synchronous cost is the honest share.

``--synthetic-cifar10 N`` measures CIFAR-10 without the real archive: it writes a
``cifar-10-binary``-format tar of N random train images (50,000 = the real size; 10,000 test),
prepares it with ``jvdm data prepare cifar10 --from ... --skip-checksum`` into a temporary data dir
(timed: ``prepare_s``) and loads from there. The pixels are random, so the record is labelled
``synthetic``; the loader's cost does not depend on the pixel values (uint8 tensors, no
compression). ``--step-from-batch B`` takes the step time of a recorded batch-B run and scales it
linearly to ``--batch`` (labelled in ``step_ms_source``), for a step too slow to time on a CPU.

Usage: ``python bench/data.py [--batch 64] [--batches 50] [--step-ms 3000]``;
``python bench/data.py --config cifar10_learned_snr --synthetic-cifar10 50000 --step-from-batch 4``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import tarfile
import tempfile
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


def _synthetic_cifar10(num_train: int, root: pathlib.Path) -> float:
    """Writes a CIFAR-10-binary-format tar of random images and prepares it; returns seconds."""
    import numpy as np

    from jvdm import datasets

    rng = np.random.default_rng(0)
    archive = root / "synthetic-cifar-10-binary.tar"
    sizes = [num_train // 5] * 5 + [10_000]
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    with tarfile.open(archive, "w") as tar:
        for name, n in zip(names, sizes, strict=True):
            path = root / name
            records = rng.integers(0, 256, (n, 3073), dtype=np.uint8)
            records[:, 0] %= 10  # the label byte
            path.write_bytes(records.tobytes())
            tar.add(path, arcname=f"cifar-10-batches-bin/{name}")
            path.unlink()
    start = time.perf_counter()
    datasets.prepare("cifar10", root / "data", source=archive, skip_checksum=True)
    return time.perf_counter() - start


def _step_ms(args, batch: int) -> tuple[float, str]:
    if args.step_ms is not None:
        return args.step_ms, "--step-ms"
    if args.step_from_batch:
        recorded = _recorded_step_ms(args.config, args.step_from_batch)
        if recorded is None:
            raise SystemExit(
                f"no train_step record of {args.config} at batch {args.step_from_batch}"
            )
        scale = batch / args.step_from_batch
        return (
            recorded * scale,
            f"results.jsonl at batch {args.step_from_batch}, x{scale:g} (linear)",
        )
    recorded = _recorded_step_ms(args.config, batch)
    if recorded is not None:
        return recorded, "results.jsonl"
    import train_step

    cfg = _common.load_config(args.config)
    return train_step.measure(cfg, batch, steps=3, peak_flops=None)["median_ms"], "measured"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="learned_snr")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--batches", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--step-ms", type=float, default=None)
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--synthetic-cifar10", type=int, default=None, metavar="N")
    p.add_argument("--step-from-batch", type=int, default=None, metavar="B")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        return _measure(args, pathlib.Path(tmp))


def _measure(args, tmp: pathlib.Path) -> dict:
    from jvdm import data

    load = _common.loadavg()
    config = _common.load_config(args.config)
    batch = args.batch or int(config.train.batch_size)
    data_dir, prepare_s = config.data.data_dir, None
    if args.synthetic_cifar10:
        if config.data.name != "cifar10":
            raise SystemExit(f"--synthetic-cifar10 needs a cifar10 config, not {args.config}")
        prepare_s, data_dir = _synthetic_cifar10(args.synthetic_cifar10, tmp), tmp / "data"
    loader = data.make_train_loader(
        config.data.name,
        split=config.data.train_split,
        global_batch_size=batch,
        seed=0,
        data_dir=data_dir,
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

    step_ms, source = _step_ms(args, batch)
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
    if args.synthetic_cifar10:
        res["synthetic"] = (
            f"random pixels in the cifar-10-binary layout, {args.synthetic_cifar10} train"
        )
        res["prepare_s"] = prepare_s
    return _common.emit("data", res, load_before=load, write=not args.no_write)


if __name__ == "__main__":
    main()
