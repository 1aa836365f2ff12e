"""Running the ranks of a jax.distributed test job as subprocesses, never hanging the suite; and,
inside each rank's script, joining and leaving the job (:func:`join_job`, :func:`leave_job`)."""

import argparse
import json
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


def join_job(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """A rank script's arguments, after it has joined its job: adds the ``--process-id``,
    ``--num-processes`` and ``--port`` that :func:`run_ranks` passes to ``parser`` (which holds the
    script's own arguments), parses the command line and starts ``jax.distributed`` with the
    coordinator at ``127.0.0.1:PORT`` (a no-op for a job of one process)."""
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--num-processes", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    from jvdm import parallel  # imports JAX: after the script has configured it

    parallel.initialize_distributed(
        coordinator_address=f"127.0.0.1:{args.port}",
        num_processes=args.num_processes,
        process_id=args.process_id,
    )
    return args


def leave_job(result: dict | None = None, *, default=str) -> None:
    """Ends a rank script: prints ``process i/n done`` and, given a ``result``, the line
    ``RESULT <json>`` that the tests read back (``default`` encodes what JSON cannot), then shuts
    ``jax.distributed`` down (a no-op for a job of one process)."""
    import jax

    print(f"process {jax.process_index()}/{jax.process_count()} done", flush=True)
    if result is not None:
        print("RESULT " + json.dumps(result, default=default), flush=True)
    jax.distributed.shutdown()
