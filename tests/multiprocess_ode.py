"""One process of a multi-process ODE-likelihood run on localhost (used by tests/test_ode.py).

    python tests/multiprocess_ode.py --process-id 0 --num-processes 2 --port 12345 --out F.npz

With ``--num-processes 1`` it is a plain single process. Every process passes the same inputs (the
fixed problem of ``tests/test_ode.py``); process 0 writes the replicated answers to ``--out``.
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


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = processes.join_job(parser)
    import numpy as np

    import ode_problem

    answers = ode_problem.answers()
    if jax.process_index() == 0:
        np.savez(args.out, **answers)
    processes.leave_job()
    return 0


if __name__ == "__main__":
    sys.exit(main())
