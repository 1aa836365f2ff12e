"""What a training step costs, known before the first step runs: parameters, FLOPs and memory.

The trainer compiles its step once anyway; this module reads the compiled program's own accounts
(XLA's ``cost_analysis`` and ``memory_analysis``, per device for a sharded program) and compares
the memory with what the device reports it can hold (``device.memory_stats()['bytes_limit']``,
which accelerators give and XLA:CPU does not). A step that cannot fit fails here, in one line that
says what to change, instead of with an allocator error after the data pipeline, the checkpoint
manager and the first compile have all started.
"""

from __future__ import annotations

from typing import Any

import jax

from jvdm.errors import JvdmUserError
from jvdm.model import is_constant

__all__ = ["StepMemoryError", "check_fits", "device_bytes_limit", "step_costs"]

_GIB = 2**30


class StepMemoryError(JvdmUserError):
    """The compiled training step needs more memory than a device has."""


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):  # one dict per program on some backends
        return float(sum(c.get("flops", 0.0) for c in cost))
    return float((cost or {}).get("flops", 0.0))


def step_costs(compiled, params: Any) -> dict[str, float]:
    """The parameter count, the FLOPs of one call and its memory per device, in bytes.

    Args:
      compiled: a ``jax.stages.Compiled`` (``jit(f).lower(...).compile()``).
      params: the trained parameters (a pytree of arrays or shape structs).

    Returns:
      ``params`` (trained), ``constants`` (carried but not trained: a Gaussian base's fit),
      ``flops_per_step`` (XLA's count; a multiply-add is 2), and ``memory_*_bytes``
      for arguments, outputs, temporaries and the donated aliases, with
      ``memory_peak_bytes = argument + output + temp - alias`` (buffers an output reuses from a
      donated argument are counted once).
    """
    memory = compiled.memory_analysis()
    leaves = jax.tree_util.tree_leaves_with_path(params)
    constant = sum(x.size for path, x in leaves if is_constant(path))
    out = {
        "params": float(sum(x.size for _, x in leaves) - constant),
        "constants": float(constant),
        "flops_per_step": _flops(compiled),
        "memory_argument_bytes": float(memory.argument_size_in_bytes),
        "memory_output_bytes": float(memory.output_size_in_bytes),
        "memory_temp_bytes": float(memory.temp_size_in_bytes),
        "memory_alias_bytes": float(memory.alias_size_in_bytes),
    }
    out["memory_peak_bytes"] = (
        out["memory_argument_bytes"]
        + out["memory_output_bytes"]
        + out["memory_temp_bytes"]
        - out["memory_alias_bytes"]
    )
    return out


def device_bytes_limit(device: jax.Device) -> int | None:
    """The memory a device says it can allocate (``memory_stats()['bytes_limit']``), or ``None``
    where the backend does not report it (XLA:CPU)."""
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - backends without memory stats raise various errors
        return None
    limit = (stats or {}).get("bytes_limit")
    return int(limit) if limit else None


def check_fits(costs: dict[str, float], device: jax.Device, *, grad_accum_steps: int) -> None:
    """Raises :class:`StepMemoryError` when the step's peak memory exceeds ``device``'s limit."""
    limit = device_bytes_limit(device)
    need = costs["memory_peak_bytes"]
    if limit is None or need <= limit:
        return
    raise StepMemoryError(
        f"the compiled training step needs {need / _GIB:.2f} GiB per device but {device} holds "
        f"{limit / _GIB:.2f} GiB: raise config.train.grad_accum_steps (now {grad_accum_steps}), "
        "set config.model.use_remat=True or config.model.dtype='bfloat16', or lower "
        "config.train.batch_size"
    )


def summary_line(costs: dict[str, float]) -> str:
    """One human line of :func:`step_costs`."""
    constants = costs.get("constants", 0.0)
    extra = f" (+{constants / 1e6:.3g}M constant)" if constants else ""
    return (
        f"train step: {costs['params'] / 1e6:.3g}M parameters{extra}, "
        f"{costs['flops_per_step'] / 1e9:.4g} GFLOP, "
        f"{costs['memory_peak_bytes'] / _GIB:.3g} GiB per device "
        f"({costs['memory_temp_bytes'] / _GIB:.3g} GiB temporaries)"
    )
