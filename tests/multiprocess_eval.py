"""One process of a multi-process evaluation on localhost (used by tests/test_multiprocess_eval.py).

    python tests/multiprocess_eval.py --process-id 0 --num-processes 2 --port 12345

Each process gets its own CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=N); they
talk through jax.distributed with gloo CPU collectives. Every process builds the same tiny model
from the same key, evaluates the mnist_subset test split together (each its shard, gathered),
draws the same samples and solves the same ODE-likelihood problem (tests/ode_problem.py); process 0
prints the results as one JSON line after ``RESULT ``.
"""

import argparse
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_numpy_rank_promotion", "raise")

import processes  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = ["model.channel_mult=(1,)", "model.attention_resolutions=()"]
N_SAMPLES = 8


def run() -> dict:
    """The evaluation, the samples and the ODE answers (shared with the one-process side)."""
    import numpy as np

    import ode_problem
    from jvdm import build, evaluate, sampling
    from jvdm import config as config_lib

    config = config_lib.load_config_file(os.path.join(REPO, "experiments", "tiny.py"))
    config = config_lib.apply_overrides(config, OVERRIDES)
    params = build.init_params(config, jax.random.key(0))
    result = evaluate.evaluate_split(
        params, dataset="mnist_subset", split="test", key=jax.random.key(1), batch_size=250
    )
    images = sampling.sample(params, jax.random.key(2), N_SAMPLES, steps=3)
    result["samples"] = images.reshape(N_SAMPLES, -1).astype(int).tolist()
    ode = ode_problem.answers()
    result["ode_bpd"] = np.asarray(ode["bpd"]).tolist()
    result["ode_nfe"] = np.asarray(ode["nfe"]).tolist()
    return result


def main() -> int:
    processes.join_job(argparse.ArgumentParser())
    processes.leave_job(run(), default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())
