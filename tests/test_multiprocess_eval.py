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
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))

import multiprocess_eval  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two_processes() -> list[str]:
    env = dict(os.environ)
    # The same LLVM optimisation as this process: level 0 would round differently (no vector
    # code), and at the ODE's tolerance that can move an accept/reject decision of the solver.
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    env["JAX_PLATFORMS"] = "cpu"
    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(var, None)
    script = os.path.join(REPO, "tests", "multiprocess_eval.py")
    common = ["--num-processes", "2", "--port", str(_free_port())]
    procs = [
        subprocess.Popen(
            [sys.executable, script, "--process-id", str(i), *common],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    deadline = time.monotonic() + 300  # never hang the suite, whatever a process does
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=max(deadline - time.monotonic(), 1))
            outputs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
    return outputs


@pytest.mark.multiprocess
def test_two_processes_evaluate_sample_and_solve_the_ode_like_one():
    outputs = _run_two_processes()
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
