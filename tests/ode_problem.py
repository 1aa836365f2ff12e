"""The fixed ODE problem that tests/test_ode.py solves in one process and in several."""

import jax
import numpy as np

from gaussian_models import CorrelatedGaussianDenoiser
from jvdm import model as model_lib
from jvdm import ode
from jvdm.nn import gamma as gamma_lib

SHAPE = (2, 2, 1)
M = 0.2
GAMMA_MIN, GAMMA_MAX = -10.0, 10.0


def sigma_eig():
    """``(U, lam)`` of a fixed, strongly correlated covariance of the 4 pixels."""
    a = np.random.default_rng(3).standard_normal((4, 4)) * 0.3
    lam, u = np.linalg.eigh(a @ a.T + 0.05 * np.eye(4))
    return u, lam


def params(gamma_min=GAMMA_MIN, gamma_max=GAMMA_MAX):
    u, lam = sigma_eig()
    den = CorrelatedGaussianDenoiser(m=M, u=tuple(map(tuple, u.tolist())), lam=tuple(lam.tolist()))
    sched = gamma_lib.FixedLinearGamma(gamma_min=gamma_min, gamma_max=gamma_max)
    model = model_lib.VDM(denoiser=den, schedule=sched, image_shape=SHAPE)
    return model_lib.init(model, jax.random.key(0))


def latents(n, seed=0):
    """``n`` draws of ``z_0`` from the data's own marginal at gamma(0), float32 ``[n, 2, 2, 1]``."""
    u, lam = sigma_eig()
    rng = np.random.default_rng(seed)
    a2 = 1.0 / (1.0 + np.exp(GAMMA_MIN))
    x = M + (rng.standard_normal((n, 4)) * np.sqrt(lam)) @ u.T
    z = np.sqrt(a2) * x + np.sqrt(1.0 - a2) * rng.standard_normal((n, 4))
    return z.reshape(n, *SHAPE).astype(np.float32)


def images(n):
    return np.random.default_rng(1).integers(96, 160, (n, *SHAPE)).astype(np.uint8)


def answers():
    """What tests/test_ode.py compares across device and process counts."""
    p = params()
    b = ode.ode_bpd(p, images(6), jax.random.key(6), probes=2, batch_size=6)
    return {"bpd": b.bpd, "nfe": b.nfe}
