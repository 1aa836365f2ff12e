"""Devices, meshes and shardings: the same code on one CPU, eight GPUs or a TPU pod.

One :class:`jax.sharding.Mesh` spans every device of every process, with a single axis ``'data'``.
Batches are sharded along it and the training state is replicated, so a data-parallel step is a
plain ``jax.jit`` whose inputs carry their shardings (XLA inserts the gradient all-reduce); ``pmap``
is not used.

Multi-process start-up goes through :func:`initialize_distributed`, which wraps
``jax.distributed.initialize`` and must run before any other JAX call. Each process then loads only
its own rows of every global batch and :func:`shard_batch` assembles the global array with
``jax.make_array_from_process_local_data``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jvdm.errors import JvdmUserError

__all__ = [
    "DATA_AXIS",
    "batch_sharding",
    "check_batch_size",
    "initialize_distributed",
    "local_batch_layout",
    "local_copy",
    "make_mesh",
    "replicate",
    "replicated_sharding",
    "shard_batch",
]

DATA_AXIS = "data"


@functools.cache
def jit_run_once(fn, static_argnums: tuple[int, ...] = ()):
    """``jax.jit(fn)`` for a program that runs once, such as an initialisation.

    On CPU it compiles at LLVM's level 0: an initialisation (a threefry stream per parameter) takes
    LLVM ~4x longer to optimise at the default level (15 s vs 4 s for the tests' tiny model), for
    no benefit to a program that runs once. Accelerators keep their defaults. One jitted function
    per ``(fn, static_argnums)``, so its compilations are cached as ``jax.jit``'s are.
    """
    options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
    return jax.jit(fn, static_argnums=static_argnums, compiler_options=options)


# Environment variables read when initialize_distributed() gets no arguments. JAX itself reads
# JAX_COORDINATOR_ADDRESS; the other two follow the same convention.
_ENV_ADDRESS = "JAX_COORDINATOR_ADDRESS"
_ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
_ENV_PROCESS_ID = "JAX_PROCESS_ID"


def _cluster_detected() -> bool:
    """Whether a multi-process launcher jax can auto-detect (SLURM, Open MPI, GKE TPU) is set."""
    env = os.environ
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in env:
        return True
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
        return True
    return len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Starts JAX's multi-process runtime, or does nothing for a single process.

    Arguments left ``None`` are read from ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and
    ``JAX_PROCESS_ID``. With none of them set, a SLURM, Open MPI or GKE TPU job of several
    processes is auto-detected by ``jax.distributed.initialize()``; anything else is one process
    and this is a no-op. Must be called before any other JAX computation.

    Returns:
      whether ``jax.distributed`` is now initialised (``False`` for a single process).
    """
    if jax.distributed.is_initialized():
        return True
    env = os.environ
    address = coordinator_address or env.get(_ENV_ADDRESS) or None
    if num_processes is None and env.get(_ENV_NUM_PROCESSES):
        num_processes = int(env[_ENV_NUM_PROCESSES])
    if process_id is None and env.get(_ENV_PROCESS_ID):
        process_id = int(env[_ENV_PROCESS_ID])
    if num_processes == 1:
        return False
    if address is None and num_processes is None and process_id is None:
        if not _cluster_detected():
            return False
        jax.distributed.initialize()  # the cluster's own variables say who is who
        return True
    if None in (address, num_processes, process_id):
        raise JvdmUserError(
            "multi-process start-up needs a coordinator address, the number of processes and this "
            f"process's id (flags or {_ENV_ADDRESS}, {_ENV_NUM_PROCESSES}, {_ENV_PROCESS_ID}); "
            f"got coordinator_address={address!r}, {num_processes=}, {process_id=}"
        )
    jax.distributed.initialize(
        coordinator_address=address, num_processes=num_processes, process_id=process_id
    )
    return True


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A one-axis (``'data'``) mesh over ``devices``; by default every device of every process.

    The devices keep ``jax.devices()`` order, which groups them by process, so that process ``p``
    owns a contiguous block of each global batch: the rows its data loader reads.
    """
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise JvdmUserError("a mesh needs at least one device")
    return Mesh(np.asarray(devices, dtype=object), (DATA_AXIS,))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (parameters, optimizer state, keys)."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The leading (batch) axis split over ``'data'``."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def local_batch_layout(batch_size: int) -> tuple[int, NamedSharding | None]:
    """``(padded, sharding)`` for a per-process batch of ``batch_size`` on this process's devices.

    A batch of at least one row per local device is padded up to a multiple of their count (at most
    ``devices - 1`` extra rows, which the caller masks or drops) and sharded on the batch axis of a
    mesh of the local devices; a smaller one (or a single device) runs unsharded (``None``).
    """
    devices = jax.local_devices()
    if len(devices) < 2 or batch_size < len(devices):
        return batch_size, None
    padded = -(-batch_size // len(devices)) * len(devices)
    return padded, batch_sharding(make_mesh(devices))


def check_batch_size(global_batch_size: int, mesh: Mesh, *, grad_accum_steps: int = 1) -> None:
    """Raises ``ValueError`` unless the global batch divides evenly among the mesh's devices, and
    each device's share into ``grad_accum_steps`` micro-batches."""
    n = mesh.devices.size
    if global_batch_size % n:
        raise JvdmUserError(
            f"the global batch size must divide by the number of devices: "
            f"{global_batch_size=} is not a multiple of {n} devices"
        )
    per_device = global_batch_size // n
    if per_device % grad_accum_steps:
        divisors = [k for k in range(1, per_device + 1) if per_device % k == 0]
        raise JvdmUserError(
            f"config.train.grad_accum_steps={grad_accum_steps} must divide the per-device batch "
            f"of {per_device} images (train.batch_size={global_batch_size} over {n} devices): "
            f"use one of {divisors}, or change train.batch_size"
        )


def shard_batch(local: Any, mesh: Mesh) -> Any:
    """Process-local NumPy rows -> global arrays sharded along ``'data'``.

    Args:
      local: a pytree of arrays ``[B / P, ...]`` holding this process's contiguous block of the
        global batch (P processes take part in ``mesh``).
      mesh: the mesh.

    Returns:
      the same pytree of global ``jax.Array`` of shape ``[B, ...]``.
    """
    sharding = batch_sharding(mesh)
    processes = {d.process_index for d in mesh.devices.flat}
    scale = len(processes)

    def one(x):
        x = np.asarray(x)
        check_batch_size(x.shape[0] * scale, mesh)
        global_shape = (x.shape[0] * scale, *x.shape[1:])
        return jax.make_array_from_process_local_data(sharding, x, global_shape)

    return jax.tree.map(one, local)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Copies a pytree of arrays (identical in every process) onto every device of ``mesh``.

    Single-process meshes use a device-to-device ``device_put``; across processes each process
    contributes its host copy (``make_array_from_callback``), which is valid because the values
    agree everywhere. PRNG key arrays are carried through their raw ``key_data``.
    """
    sharding = replicated_sharding(mesh)
    if mesh.is_multi_process:

        def one(x):
            if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
                data = one(jax.random.key_data(x))
                return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
            host = np.asarray(jax.device_get(x))
            return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

        return jax.tree.map(one, tree)
    return jax.device_put(tree, sharding)


def local_copy(tree: Any) -> Any:
    """A single-device copy of a pytree of replicated global arrays (for per-process work)."""
    return jax.tree.map(lambda x: x.addressable_data(0) if isinstance(x, jax.Array) else x, tree)
