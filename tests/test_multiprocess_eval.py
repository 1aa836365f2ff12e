"""evaluate_split, sample and ode_bpd on 2 processes x 2 CPU devices (jax.distributed, gloo)
against this process (1 process x 4 devices), in one pair of processes.

The samples are per-image functions of the key, so every process draws the same images as one
process does. The evaluation splits the images among the processes and gives each process its own
noise (fold_in of the process index), so the bound agrees to Monte Carlo precision, over exactly
the same 500 images. The ODE problem puts the same 2 images on each device as 4 local devices do,
and its controller decides on the global batch: the same solver steps, the same numbers up to the
collectives' rounding.
"""

import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))

import multiprocess_eval  # noqa: E402
import processes  # noqa: E402


@pytest.mark.slow  # two processes through jax.distributed
@pytest.mark.multiprocess
def test_two_processes_evaluate_sample_and_solve_the_ode_like_one():
    # The same LLVM optimisation as this process: level 0 would round differently (no vector
    # code), and at the ODE's tolerance that can move an accept/reject decision of the solver.
    outputs = processes.run_ranks("multiprocess_eval.py", 2, [], processes.cpu_env(2))
    two = [json.loads(out.split("RESULT ", 1)[1].splitlines()[0]) for out in outputs]
    one = multiprocess_eval.run()  # this process: 1 process x 4 devices

    # Both processes hold the gathered result of all 500 images.
    assert two[0] == two[1]
    assert two[0]["num_images"] == one["num_images"] == 500
    # Independent Monte Carlo draws on the same images: the difference of the means has a
    # variance below the sum of the two squared SEMs (which also count the images' spread).
    bound = 4.0 * np.hypot(two[0]["bpd_sem"], one["bpd_sem"])
    assert abs(two[0]["bpd_mean"] - one["bpd_mean"]) < bound, (two[0]["bpd_mean"], one["bpd_mean"])
    # The same samples, pixel for pixel.
    assert np.array_equal(np.asarray(two[0]["samples"]), np.asarray(one["samples"]))
    # The ODE: the same solver steps on every image, the same bpd up to reduction order.
    np.testing.assert_array_equal(two[0]["ode_nfe"], one["ode_nfe"])
    np.testing.assert_allclose(two[0]["ode_bpd"], one["ode_bpd"], rtol=1e-5, atol=1e-6)
