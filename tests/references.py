"""Helpers of the maths tests that compare float32 results with independent float64 answers."""

import numpy as np

from jvdm import schedules as S


def rel_err(got, want) -> np.ndarray:
    """Elementwise |got - want| / |want| (and |got| where want == 0), in float64."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = np.where(want == 0, 1.0, np.abs(want))
    return np.abs(got - want) / scale


def random_s_t(rng, n, T=1000):
    """``(alpha_bar_t, alpha_bar_s)`` of ``n`` random pairs s < t of the linear schedule (float32
    alpha_bar); a third of them adjacent (s = t - 1)."""
    ab = np.asarray(S.alpha_bar(S.linear_betas(T)))
    t = rng.integers(2, T + 1, n)
    s = rng.integers(1, t)
    s[: n // 3] = t[: n // 3] - 1
    return ab[t - 1], ab[s - 1]
