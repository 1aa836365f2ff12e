"""XLA:CPU defaults that jvdm measured to be faster, applied before JAX starts its backend.

XLA reads ``XLA_FLAGS`` once, when the first backend is created, so this module must be imported
before any computation runs (``jvdm/__init__.py`` imports it first). It only *adds* a flag that the
user has not set; anything in the user's ``XLA_FLAGS`` wins.

* ``--xla_cpu_experimental_ynn_fusion_type=-individual_convolution,-individual_dot``: in jaxlib
  0.10.2, XLA:CPU hands single convolutions and matmuls to YNNPACK, which is slower than XLA's own
  Eigen kernels for the small-image U-Net. Convolutions: the default train step went from 1625 to
  1043 ms per step at batch 32 on a 2-core AVX-512 Xeon; matmuls as well: a further 8-10%
  (375/399 -> 353/336 ms, two interleaved pairs), and Eigen's 2048^2 matmul is also the faster one
  there (~305 vs ~287 GFLOP/s). See ``bench/flags.py`` and ``bench/RESULTS.md``. The flag affects
  only the CPU backend; GPU and TPU runs ignore it.

Set ``JVDM_NO_XLA_DEFAULTS=1`` to leave ``XLA_FLAGS`` untouched.
"""

import os

_DEFAULTS = {
    "--xla_cpu_experimental_ynn_fusion_type": "-individual_convolution,-individual_dot",
}


def apply() -> bool:
    """Adds the default flags to ``XLA_FLAGS``; returns whether anything was added.

    If a JAX backend was already created (jax used before ``import jvdm``), the flags have no
    effect on it: nothing breaks, that process simply runs without them.
    """
    if os.environ.get("JVDM_NO_XLA_DEFAULTS"):
        return False
    flags = os.environ.get("XLA_FLAGS", "")
    added = [f"{k}={v}" for k, v in _DEFAULTS.items() if k not in flags]
    if added:
        os.environ["XLA_FLAGS"] = " ".join([flags, *added]).strip()
    return bool(added)


apply()
