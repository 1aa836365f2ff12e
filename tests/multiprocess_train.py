"""One process of a multi-process training run on localhost (used by tests/test_train.py).

    python tests/multiprocess_train.py --process-id 0 --num-processes 2 --port 12345 \
        --workdir DIR [config overrides...]

Each process gets its own CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=N in the
environment); the processes talk through jax.distributed with gloo CPU collectives.
"""

import argparse
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jvdm  # noqa: E402

# An entry point, as the `jvdm` command is: jvdm's CPU runtime defaults before JAX starts.
jvdm.configure_cpu_runtime()

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_numpy_rank_promotion", "raise")

import processes  # noqa: E402  (tests/, this script's folder, is first on sys.path)


def slow_measure(seconds: float) -> None:
    """Makes this process's budget measurement slower than the others' (a sleep in each timed
    step), so that the processes must agree on the slowest to decide one step count."""
    import time

    from jvdm import time_budget

    real = time_budget.measure

    def measure(step_fn, make_state, batch, key, **blocks):
        def slowed(*args):
            out = step_fn(*args)
            time.sleep(seconds)
            return out

        return real(slowed, make_state, batch, key, **blocks)

    time_budget.measure = measure


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--config", default="experiments/tiny.py")
    parser.add_argument(
        "--slow-measure",
        type=float,
        default=0.0,
        help="seconds added to each step that process 1 times for a time budget",
    )
    parser.add_argument("overrides", nargs="*")
    args = processes.join_job(parser)
    from jvdm import config as config_lib
    from jvdm import train as train_lib

    if args.slow_measure and jax.process_index() == 1:
        slow_measure(args.slow_measure)

    config = config_lib.apply_overrides(config_lib.load_config_file(args.config), args.overrides)
    processes.leave_job(train_lib.train_and_evaluate(config, args.workdir), default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
