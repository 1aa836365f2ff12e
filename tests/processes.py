"""Running the ranks of a jax.distributed test job as subprocesses, never hanging the suite."""

import os
import socket
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env(devices: int) -> dict[str, str]:
    """This environment with ``devices`` forced CPU devices and no inherited cluster settings."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(var, None)
    return env


def run_ranks(script: str, num_processes: int, args: list[str], env, timeout: float = 300):
    """Starts ``script --process-id i --num-processes n --port P *args`` for every rank, waits for
    all of them (killing every one still running after ``timeout`` seconds in all) and returns
    their outputs, asserting that each exited with status 0."""
    common = ["--num-processes", str(num_processes), "--port", str(free_port()), *args]
    procs = [
        subprocess.Popen(
            [sys.executable, os.path.join(REPO, "tests", script), "--process-id", str(i), *common],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(num_processes)
    ]
    deadline = time.monotonic() + timeout
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
