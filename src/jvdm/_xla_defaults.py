"""CPU runtime defaults that jvdm measured to be faster: :func:`configure_cpu_runtime`.

XLA reads ``XLA_FLAGS`` once, when the first backend is created, and JAX reads
``jax_cpu_enable_async_dispatch`` at the same moment, so the function must run before any
computation. ``import jvdm`` never calls it: the ``jvdm`` command does (for the subcommands that
compute, before they import JAX), and so may a user's script, first thing
(``jvdm.configure_cpu_runtime()``). It only *adds* settings that the user has not made; anything in
the user's ``XLA_FLAGS`` or ``JAX_CPU_ENABLE_ASYNC_DISPATCH`` wins.

* ``--xla_cpu_experimental_ynn_fusion_type=-individual_convolution,-individual_dot``: in jaxlib
  0.10.2, XLA:CPU hands single convolutions and matmuls to YNNPACK, which is slower than XLA's own
  Eigen kernels for the small-image U-Net. Convolutions: the default train step went from 1625 to
  1043 ms per step at batch 32 on a 2-core AVX-512 Xeon; matmuls as well: a further 8-10%
  (375/399 -> 353/336 ms, two interleaved pairs). On a 2-core AMD EPYC (Zen 5) the same flag
  gives 313 -> 218 ms. See ``bench/flags.py`` and ``bench/RESULTS.md``. GPU and TPU runs ignore it.
* Host memory reuse (Linux with glibc only). XLA:CPU allocates each execution's temporary buffers
  (225 MB for the default train step) with ``malloc`` and frees them at the end. glibc serves
  blocks that large with a fresh ``mmap`` and returns them with ``munmap``, so every step faulted
  in 55,000 new zeroed pages: 93 ms of kernel time per 220 ms step on 2 cores. With
  ``mallopt(M_MMAP_MAX, 0)`` and a high ``M_TRIM_THRESHOLD`` the blocks come from the heap and
  are reused by the next step. That only works for allocations made on the main thread (glibc's
  per-thread arenas cannot hold blocks above 64 MB), so asynchronous dispatch on the CPU backend
  is turned off too (``jax_cpu_enable_async_dispatch=False``): a CPU computation then runs on the
  calling thread and the call returns when it is done, which changes no result. Together: 220 ->
  159 ms per default train step (kernel time 93 -> 2 ms). The cost is that the process keeps the
  freed memory for reuse instead of returning it to the system, so this is done only where JAX
  will compute on the CPU (``JAX_PLATFORMS`` starts with ``cpu``, or no accelerator plugin is
  installed).

Set ``JVDM_NO_XLA_DEFAULTS=1`` to leave all of this untouched.
"""

import ctypes
import ctypes.util
import importlib.util
import os
import sys

__all__ = ["configure_cpu_runtime"]

_DEFAULTS = {
    "--xla_cpu_experimental_ynn_fusion_type": "-individual_convolution,-individual_dot",
}

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
# Keep up to 2 GiB of freed memory at the top of the heap (mallopt takes an int).
_TRIM_THRESHOLD = 2**31 - 1


def _cpu_backend_expected() -> bool:
    """Whether JAX will compute on the CPU: ``JAX_PLATFORMS`` says so, or names nothing and no
    accelerator plugin (CUDA/ROCm plugins live in ``jax_plugins``; TPUs need ``libtpu``) is
    installed. Elsewhere the host-memory setting would only keep memory and gain nothing."""
    platforms = [p.strip() for p in os.environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    if platforms:
        return platforms[0] == "cpu"
    return not any(importlib.util.find_spec(m) for m in ("jax_plugins", "libtpu"))


def _keep_freed_memory() -> bool:
    """Makes glibc serve large blocks from the heap and keep them after ``free``."""
    if not sys.platform.startswith("linux") or not _cpu_backend_expected():
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt): nothing to tune
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))


def configure_cpu_runtime() -> bool:
    """Adds jvdm's default flags to ``XLA_FLAGS`` and tunes the CPU runtime (host memory reuse and
    synchronous CPU dispatch, where JAX computes on the CPU); returns whether anything was changed.

    Call it before the first JAX computation. If a JAX backend was already created, the flags and
    the dispatch mode have no effect on it: nothing breaks, that process simply runs without them.
    Set ``JVDM_NO_XLA_DEFAULTS=1`` to make it a no-op. See the module docstring for the figures.
    """
    if os.environ.get("JVDM_NO_XLA_DEFAULTS"):
        return False
    flags = os.environ.get("XLA_FLAGS", "")
    added = [f"{k}={v}" for k, v in _DEFAULTS.items() if k not in flags]
    if added:
        os.environ["XLA_FLAGS"] = " ".join([flags, *added]).strip()
    changed = bool(added)
    # The memory setting helps only with synchronous dispatch (see the module docstring), so a
    # user who chose the dispatch mode gets neither.
    if "JAX_CPU_ENABLE_ASYNC_DISPATCH" not in os.environ and _keep_freed_memory():
        import jax

        jax.config.update("jax_cpu_enable_async_dispatch", False)
        changed = True
    return changed
