"""Samplers: exact on Gaussian data, one compilation, deterministic by key, strict arguments.

With data ``x ~ N(M, S^2 I)`` the optimal denoiser is known in closed form,
``eps_hat = sigma (z - alpha M) / (alpha^2 S^2 + sigma^2)``, and every sampler step is an affine map
of ``z`` plus Gaussian noise. So the mean and variance of each sampler's output ``z_0`` can be
computed *exactly* in NumPy float64 by propagating the moments through the same grid
(``_exact_moments``, written independently of the JAX code from the papers' update rules). The
sampled moments must match those within 4 standard errors, and the exact moments must approach the
data's as the steps grow: for the converged settings (ancestral with 1000 steps, DPM-Solver++ with
50) the samples match the data's moments within 4 standard errors directly.

For reference, the exact discretisation biases of the variance on this problem (gamma in
[-10, 12], S = 0.5), on the grid uniform in lambda (DDIM's and DPM-Solver++'s default), and so the
same for every schedule with these end points: ancestral 50 / 250 / 1000 steps -19% / -4.3% /
-1.1%, DDIM (eta = 0) 20 steps -24%, 500 steps -1.1%, DPM-Solver++(2M) 20 steps +3.4%, 50 steps
+0.6%. On the karras grid (the ancestral sampler's default), whose steps are shorter at the noisy
end and longer at the clean end, where this problem's variance is lost: ancestral -25% / -6.0% /
-1.5%. On the grid uniform in t the steep learned schedule concentrates the change of gamma in a
few steps: ancestral -48% / -13% / -3.5%
(test_the_lambda_grid_frees_ancestral_sampling_from_the_interior). DDIM is a
first-order method; that it needs many steps here is a property of DDIM, not of this
implementation.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gaussian_models import GaussianDenoiser, perturbed_learned
from jvdm import model as model_lib
from jvdm import reference_denoisers as ref
from jvdm import run as run_lib
from jvdm import samplers, sampling
from jvdm.errors import JvdmUserError
from jvdm.nn import gamma as gamma_lib

M, S = 0.3, 0.5
SHAPE = (4, 4, 2)
G_MIN, G_MAX = -10.0, 12.0  # gamma_max large: the prior N(0, I) matches q(z_1) to ~1e-5
N_IMAGES = 1024


def _gaussian_params(schedule_kind: str, *, timesteps=0):
    if schedule_kind == "linear":
        sched, sched_params = gamma_lib.FixedLinearGamma(gamma_min=G_MIN, gamma_max=G_MAX), None
    else:
        sched, sched_params = perturbed_learned(jax.random.key(7), gamma_min=G_MIN, gamma_max=G_MAX)
    model = model_lib.VDM(
        denoiser=GaussianDenoiser(M, S), schedule=sched, image_shape=SHAPE, timesteps=timesteps
    )
    params = model_lib.init(model, jax.random.key(0))
    return params if sched_params is None else params.replace(schedule=sched_params)


# ------------------------------------------------------------------------------------------------
# The exact moments, in float64.


def _coef(g):
    return np.sqrt(1.0 / (1.0 + np.exp(g))), np.sqrt(1.0 / (1.0 + np.exp(-g)))  # alpha, sigma


def _x0_affine(g, mean=M, var=S**2):
    """x0_hat = A z + B for the Gaussian denoiser (the posterior mean E[x | z]) of N(mean, var)."""
    a, s = _coef(g)
    k = a * var / (a * a * var + s * s)
    return k, mean - k * a * mean


def _data_moments():
    a0, s0 = _coef(G_MIN)
    return a0 * M, a0 * a0 * S**2 + s0 * s0  # z_0 = alpha_0 x + sigma_0 eps


def _exact_moments(sampler: str, grid, eta: float = 0.0, affine=None):
    """Mean and variance (per element) of z_0 after running ``sampler`` on ``grid`` (t=1 -> 0)
    from the prior; step ``i``'s denoiser is ``affine(i, gamma)`` (default the data's).

    State: the joint Gaussian of (z_i, z_{i-1}), which DPM-Solver's two-step update needs.
    """
    grid = np.asarray(grid, np.float64)
    steps = len(grid) - 1
    mean, cov = np.zeros(2), np.diag([1.0, 0.0])
    prev = None
    for i in range(steps):
        gt, gs = grid[i], grid[i + 1]
        (at, st), (as_, ss) = _coef(gt), _coef(gs)
        a0, b0 = _x0_affine(gt) if affine is None else affine(i, gt)
        # DDIM/ancestral in x0 form: z_s = alpha_s x0 + sigma_s sqrt(1 - eta^2 c) eps_hat + noise,
        # with eps_hat = (z - alpha_t x0) / sigma_t and c = 1 - SNR(t)/SNR(s).
        c = 1.0 - np.exp(gs - gt)
        if sampler in ("ancestral", "ddim"):
            e = 1.0 if sampler == "ancestral" else eta
            keep = np.sqrt(1.0 - e * e * c)
            lz = as_ * a0 + ss * keep * (1.0 - at * a0) / st
            lp, const = 0.0, as_ * b0 - ss * keep * at * b0 / st
            noise_var = e * e * ss * ss * c
        else:  # DPM-Solver++(2M), Lu et al. 2022b Algorithm 2
            h = 0.5 * (gt - gs)
            first = i == 0 or (steps < 15 and i == steps - 1)
            w1, w2 = (1.0, 0.0) if first else (1.0 + 0.5 * h / prev[2], 0.5 * h / prev[2])
            phi = as_ * (1.0 - np.exp(-h))
            lz = ss / st + phi * w1 * a0
            lp = -phi * w2 * prev[0] if not first else 0.0
            const = phi * (w1 * b0 - (w2 * prev[1] if not first else 0.0))
            noise_var = 0.0
        lin = np.array([[lz, lp], [1.0, 0.0]])
        mean = lin @ mean + np.array([const, 0.0])
        cov = lin @ cov @ lin.T + np.diag([noise_var, 0.0])
        prev = (a0, b0, 0.5 * (gt - gs))
    return mean[0], cov[0, 0]


def _assert_moments(z, mean, var, what):
    z = np.asarray(z, np.float64).reshape(-1)
    n = z.size
    se_mean, se_var = np.sqrt(var / n), var * np.sqrt(2.0 / (n - 1))
    assert abs(z.mean() - mean) < 4 * se_mean, (what, z.mean(), mean, se_mean)
    assert abs(z.var(ddof=1) - var) < 4 * se_var, (what, z.var(ddof=1), var, se_var)


# ------------------------------------------------------------------------------------------------
# Exactness on Gaussian data.

FEW_STEP_CASES = [
    ("linear", "ddim", 20, 0.0, None),
    ("learned", "ancestral", 50, 0.0, None),
    ("learned", "ancestral", 50, 0.0, "time"),
    ("learned", "ddim", 20, 0.5, None),
    ("learned", "dpm_solver", 10, 0.0, None),  # < 15 steps: first-order last step
    ("learned", "dpm_solver", 10, 0.0, "time"),
    ("learned", "ancestral", 50, 0.0, "karras"),
    ("learned", "dpm_solver", 10, 0.0, "karras"),
]


@pytest.mark.parametrize("schedule,sampler,steps,eta,grid", FEW_STEP_CASES)
def test_samplers_match_exact_moments_on_gaussian_data(schedule, sampler, steps, eta, grid):
    params = _gaussian_params(schedule)
    _, gammas = sampling.sampling_grid(params, steps, sampler, grid=grid)
    z = sampling.sample_latents(
        params, jax.random.key(1), N_IMAGES, steps=steps, sampler=sampler, eta=eta, grid=grid
    )
    assert z.shape == (N_IMAGES, *SHAPE) and z.dtype == np.float32
    mean, var = _exact_moments(sampler, gammas, eta)
    _assert_moments(z, mean, var, (schedule, sampler, steps, eta, grid))


def _fit(mean, var):
    dim = int(np.prod(SHAPE))
    return ref.GaussianFit(
        jnp.full((dim,), mean, jnp.float32), jnp.full((dim,), var, jnp.float32), jnp.eye(dim)
    )


@pytest.mark.parametrize(
    "sampler,steps,k", [("ancestral", 50, 30), ("ddim", 20, 5), ("dpm_solver", 20, 6)]
)
def test_gaussian_steps_take_the_first_k_predictions_from_the_fit(sampler, steps, k):
    """With a Gaussian far from the data's (mean 6, variance 2), z_0 has the moments of the chain
    whose first ``k`` steps use that Gaussian's posterior mean and the rest the model's, and
    they differ from the model's own by more than the test resolves (8 standard errors)."""
    params = _gaussian_params("learned")
    _, gammas = sampling.sampling_grid(params, steps, sampler)
    eta = 0.5 if sampler == "ddim" else 0.0
    z = sampling.sample_latents(
        params,
        jax.random.key(2),
        N_IMAGES,
        steps=steps,
        sampler=sampler,
        eta=eta,
        gaussian_fit=_fit(6.0, 2.0),
        gaussian_steps=k,
    )

    def affine(i, g):
        return _x0_affine(g, *((6.0, 2.0) if i < k else (M, S**2)))

    mean, var = _exact_moments(sampler, gammas, eta, affine=affine)
    _assert_moments(z, mean, var, (sampler, k))
    plain_mean, _ = _exact_moments(sampler, gammas, eta)
    assert abs(plain_mean - mean) > 8 * np.sqrt(var / z.size), (plain_mean, mean)


def test_gaussian_steps_with_the_datas_own_gaussian_change_nothing():
    """Two routes to one denoiser: the test model's is the posterior mean of N(M, S^2), so
    taking every step but the last from that Gaussian's fit gives the model's own samples."""
    params = _gaussian_params("learned")
    key = jax.random.key(3)
    plain = sampling.sample_latents(params, key, 64, steps=20)
    switched = sampling.sample_latents(
        params, key, 64, steps=20, gaussian_fit=_fit(M, S**2), gaussian_steps=19
    )
    np.testing.assert_allclose(switched, plain, atol=2e-4)


def test_gaussian_steps_take_a_mixture_of_the_datas_gaussian_as_that_gaussian():
    """A mixture fit is taken too: two components that are both the data's N(M, S^2) (rank 3,
    the rest isotropic at S^2) are that Gaussian, so the samples are the model's own."""
    params = _gaussian_params("learned")
    dim = int(np.prod(SHAPE))
    vectors = jnp.tile(jnp.eye(dim)[:, :3], (2, 1, 1))
    fit = ref.MixtureFit(
        jnp.log(jnp.array([0.25, 0.75])),
        jnp.full((2, dim), M),
        jnp.full((2, 3), S**2),
        vectors,
        jnp.full((2,), S**2),
    )
    key = jax.random.key(3)
    plain = sampling.sample_latents(params, key, 64, steps=20)
    switched = sampling.sample_latents(
        params, key, 64, steps=20, gaussian_fit=fit, gaussian_steps=19
    )
    np.testing.assert_allclose(switched, plain, atol=2e-4)


def test_a_gaussian_start_without_a_fitting_fit_says_what_to_do():
    params = _gaussian_params("linear")
    key = jax.random.key(0)
    with pytest.raises(JvdmUserError, match="needs gaussian_fit"):
        sampling.sample(params, key, 2, steps=10, gaussian_steps=3)
    wrong = ref.fit_gaussian(np.random.default_rng(0).standard_normal((10, 5)))
    with pytest.raises(JvdmUserError, match="flattened to 32 values"):
        sampling.sample(params, key, 2, steps=10, gaussian_fit=wrong, gaussian_steps=3)
    with pytest.raises(JvdmUserError, match="below steps=10"):
        sampling.sample(params, key, 2, steps=10, gaussian_fit=wrong, gaussian_steps=10)
    with pytest.raises(JvdmUserError, match="gaussian_steps=-1"):
        sampling.sample(params, key, 2, steps=10, gaussian_steps=-1)


def test_the_lambda_grid_frees_ancestral_sampling_from_the_interior():
    """Exact moments (no sampling): on the lambda grid the ancestral chain's variance bias
    on the steep learned schedule is the linear schedule's to 1e-6 (the grid depends on the end
    points only, here float32), and 2.5 to 3.5 times smaller than on the grid uniform in t."""
    linear, learned = _gaussian_params("linear"), _gaussian_params("learned")
    _, data_var = _data_moments()
    for steps in (50, 250, 1000):
        bias = {}
        for name, params, grid in [
            ("linear", linear, "lambda"),
            ("lambda", learned, "lambda"),
            ("time", learned, "time"),
        ]:
            _, gammas = sampling.sampling_grid(params, steps, "ancestral", grid=grid)
            bias[name] = _exact_moments("ancestral", gammas)[1] / data_var - 1.0
        assert abs(bias["lambda"] - bias["linear"]) < 1e-6, (steps, bias)
        assert 2.5 < bias["time"] / bias["lambda"] < 3.5, (steps, bias)


def test_fast_samplers_with_20_steps_are_close_to_the_data():
    """DPM-Solver++ with 20 steps is within 4% of the data's variance (exact moments, no noise)."""
    params = _gaussian_params("learned")
    data_mean, data_var = _data_moments()
    _, grid = sampling.sampling_grid(params, 20, "dpm_solver")
    mean, var = _exact_moments("dpm_solver", grid)
    assert abs(mean - data_mean) < 2e-3 and abs(var / data_var - 1) < 0.04


@pytest.mark.parametrize(
    "schedule,sampler,steps", [("learned", "ancestral", 1000), ("learned", "dpm_solver", 50)]
)
def test_converged_samplers_match_the_data(schedule, sampler, steps):
    # Both walk their default grid (ancestral the karras grid, DPM-Solver++ the lambda grid), on
    # which the steep learned schedule's interior does not matter: 1000 ancestral steps leave
    # -1.5% of variance bias (-1.1% on the lambda grid, -3.5% on the grid uniform in t).
    params = _gaussian_params(schedule)
    z = sampling.sample_latents(params, jax.random.key(2), N_IMAGES, steps=steps, sampler=sampler)
    _assert_moments(z, *_data_moments(), (schedule, sampler, steps))


def test_ddim_with_eta_one_is_the_ancestral_sampler():
    # The same step on the same grid (the ancestral sampler's default, karras), here on the steep
    # learned schedule; on the grid uniform in t the ancestral chain is a different one.
    params = _gaussian_params("learned")
    key = jax.random.key(3)
    anc = sampling.sample_latents(params, key, 8, steps=10, sampler="ancestral")
    ddim = sampling.sample_latents(params, key, 8, steps=10, sampler="ddim", eta=1.0, grid="karras")
    np.testing.assert_allclose(ddim, anc, rtol=1e-4, atol=1e-5)
    on_t = sampling.sample_latents(params, key, 8, steps=10, sampler="ancestral", grid="time")
    assert np.abs(on_t - anc).max() > 0.1


def test_sampling_grid_inverts_a_learned_schedule():
    params = _gaussian_params("learned")
    assert sampling.default_grid(params.model, "ancestral") == "karras"
    for sampler in ("ancestral", "ddim", "dpm_solver"):
        if sampler != "ancestral":
            assert sampling.default_grid(params.model, sampler) == "lambda"
        t, g = sampling.sampling_grid(params, 16, sampler, grid="lambda")
        assert t[0] == 1.0 and t[-1] == 0.0 and np.all(np.diff(t) < 0)
        # Uniform in lambda = -gamma/2 between the end points.
        np.testing.assert_allclose(np.diff(g), (G_MIN - G_MAX) / 16, rtol=1e-4)
        np.testing.assert_allclose(model_lib.gamma(params, jnp.asarray(t)), g, atol=1e-4)
        t, g = sampling.sampling_grid(params, 8, sampler, grid="time")
        np.testing.assert_allclose(t, np.linspace(1, 0, 9), atol=1e-7)
        np.testing.assert_allclose(g, model_lib.gamma(params, jnp.asarray(t)), atol=1e-6)
        assert np.abs(np.diff(g) - (G_MIN - G_MAX) / 8).max() > 0.5  # the interior's shape


def test_the_karras_grid_is_uniform_in_a_root_of_the_noise_to_signal_ratio():
    """Karras et al.'s grid (eq. 5, rho = 7) against float64 NumPy: uniform in ``s^(1/7)``,
    ``s = sigma / alpha = exp(gamma / 2)``, between the schedule's exact end points, so the same
    for every schedule with those end points; its steps in ``lambda`` are shortest at the noisy
    end."""
    assert samplers.KARRAS_RHO == 7.0
    linear, learned = _gaussian_params("linear"), _gaussian_params("learned")
    root = np.linspace(np.exp(G_MAX / 14.0), np.exp(G_MIN / 14.0), 17)
    expected = 14.0 * np.log(root)
    grids = {}
    for name, params in (("linear", linear), ("learned", learned)):
        t, g = sampling.sampling_grid(params, 16, "ancestral", grid="karras")
        ends = model_lib.gamma(params, jnp.array([1.0, 0.0]))
        assert g[0] == ends[0] and g[-1] == ends[1]  # exactly the schedule's end points
        np.testing.assert_allclose(g, expected, rtol=2e-6, atol=2e-5)
        np.testing.assert_allclose(model_lib.gamma(params, jnp.asarray(t)), g, atol=1e-4)
        grids[name] = g
    np.testing.assert_allclose(grids["learned"], grids["linear"], atol=1e-5)
    steps = -np.diff(grids["learned"])
    # d gamma = 2 rho d(s^(1/rho)) / s^(1/rho): the steps grow towards the clean end, where the
    # lambda grid's are all (G_MAX - G_MIN) / 16.
    assert np.all(steps > 0) and np.all(np.diff(steps) > 0)
    assert steps[0] < (G_MAX - G_MIN) / 16 < steps[-1]


def test_discrete_time_model_samples_with_its_own_T():
    params = _gaussian_params("linear", timesteps=7)
    assert sampling.default_steps(params.model, "ancestral") == 7
    assert sampling.default_grid(params.model, "ancestral") == "time"
    assert sampling.default_grid(params.model, "ddim") == "lambda"
    t, _ = sampling.sampling_grid(params, None, "ancestral")
    np.testing.assert_allclose(t, np.arange(7, -1, -1) / 7, atol=1e-7)
    x = sampling.sample(params, jax.random.key(0), 4)
    assert x.shape == (4, *SHAPE) and x.dtype == np.uint8


# ------------------------------------------------------------------------------------------------
# The deterministic samplers' order of convergence (diffrax's test_ode_order, exactly).


def _exact_flow_map(g_start, g_end):
    """The probability-flow ODE's map from ``gamma = g_start`` to ``g_end`` for N(M, S^2) data:
    ``z -> alpha_e M + sqrt(v_e / v_s) (z - alpha_s M)`` with ``v = alpha^2 S^2 + sigma^2`` (the
    ODE is linear here and keeps each marginal's standardised value). Returns ``(A, b)``."""
    (a_s, s_s), (a_e, s_e) = _coef(g_start), _coef(g_end)
    gain = np.sqrt((a_e * a_e * S**2 + s_e * s_e) / (a_s * a_s * S**2 + s_s * s_s))
    return gain, a_e * M - gain * a_s * M


@pytest.mark.parametrize(
    "sampler,steps", [("ddim", (64, 128, 256, 512)), ("dpm_solver", (32, 64, 128, 256))]
)
def test_deterministic_samplers_converge_with_their_order(sampler, steps):
    """The error of :func:`samplers.solve` falls as ``steps^-order``: 1 for DDIM (eta = 0), 2 for
    DPM-Solver++(2M), as the sampler table claims.

    With the exact Gaussian denoiser every step is affine in ``z``, so the solver's whole map is
    ``z_0 = A z_1 + b``, read off exactly (no sampling noise) from ``z_1 = 0`` and ``z_1 = 1``.
    Pushed through it, the prior ``N(0, 1)`` at ``gamma_max`` gives mean ``b`` and variance ``A^2``;
    the exact ODE (:func:`_exact_flow_map`) gives the same from its own ``(A, b)``. The error is the
    sum of the two moments' errors, fitted against ``log steps`` in the asymptotic regime (the
    variance error dominates; float32 round-off stays >10x below the smallest error used).
    Measured slopes: DDIM -0.98 (64-512 steps; -0.77 at 8-16, before the asymptotic regime),
    DPM-Solver++(2M) -1.98 (32-256 steps; -1.77 at 16-32).
    """
    params = _gaussian_params("linear")  # the lambda grid makes the schedule's interior irrelevant
    z_1 = np.stack([np.zeros(SHAPE), np.ones(SHAPE)]).astype(np.float32)
    errors = []
    for n in steps:
        grid = np.linspace(G_MAX, G_MIN, n + 1)
        z_0 = np.asarray(samplers.solve(params, z_1, grid, sampler=sampler), np.float64)
        assert np.ptp(z_0[0]) == 0 and np.ptp(z_0[1]) == 0  # elementwise: one (A, b) for all
        b = z_0[0].mean()
        a = z_0[1].mean() - b
        a_exact, b_exact = _exact_flow_map(grid[0], grid[-1])
        errors.append(abs(b - b_exact) + abs(a * a - a_exact * a_exact))
    slope = np.polyfit(np.log(steps), np.log(errors), 1)[0]
    order = samplers.SAMPLERS[sampler].order
    assert abs(slope + order) < 0.1, (sampler, slope, errors)


def test_solve_is_the_samplers_chain():
    """``solve`` on the sampler's grid from each image's prior draw gives ``sample_latents`` (both
    run :func:`samplers.run`; DPM-Solver++(2M), whose state carries the previous ``x0_hat``)."""
    params = _gaussian_params("linear")
    key = jax.random.key(5)
    z = sampling.sample_latents(params, key, 3, steps=6, sampler="dpm_solver")
    _, grid = sampling.sampling_grid(params, 6, "dpm_solver")
    keys = [jax.random.fold_in(jax.random.fold_in(key, i), 0) for i in range(3)]
    z_1 = jnp.stack([jax.random.normal(k, SHAPE) for k in keys])
    np.testing.assert_allclose(samplers.solve(params, z_1, grid), z, atol=1e-6)


def test_solve_rejects_a_stochastic_sampler_and_a_bad_grid():
    params = _gaussian_params("linear")
    z_1 = np.zeros((1, *SHAPE), np.float32)
    with pytest.raises(ValueError, match="sampler='ancestral' draws noise"):
        samplers.solve(params, z_1, np.linspace(G_MAX, G_MIN, 5), sampler="ancestral")
    with pytest.raises(ValueError, match="decreasing gamma values"):
        samplers.solve(params, z_1, np.linspace(G_MIN, G_MAX, 5))


# ------------------------------------------------------------------------------------------------
# A tiny U-Net model: shapes, determinism, one compilation.

TINY_SHAPE = (8, 8, 1)


@pytest.fixture(scope="module")
def tiny_params(tmp_path_factory):
    """The tiny experiment's U-Net on digits, loaded from a run directory in the trainer's layout
    (random weights: not the zero-initialised output layer of a fresh model)."""
    from test_evaluate import write_run

    workdir = tmp_path_factory.mktemp("tiny_run")
    write_run(str(workdir), steps=(1,))
    params = run_lib.load(workdir)
    assert params.model.image_shape == TINY_SHAPE
    return params


def test_tiny_model_samples_are_uint8_deterministic_and_compiled_once(
    tiny_params, key, count_traces
):
    traces = count_traces(
        sampling,
        "_generate",
        lambda params, keys, eta, fit, *, steps, sampler, grid, gaussian_steps, decode: (
            sampler,
            grid,
            steps,
            len(keys),
            decode,
            gaussian_steps,
        ),
    )
    # (8 images, 3 steps: the same program as test_cli's, which may have compiled it already.)
    x = sampling.sample(tiny_params, key, 8, steps=3)
    assert x.shape == (8, *TINY_SHAPE) and x.dtype == np.uint8
    assert 0 <= x.min() <= x.max() <= 255 and len(np.unique(x)) > 1
    first = traces.copy()
    assert sum(first.values()) <= 1, first
    # Same key, same images; a different key, different images; new parameters of the same model
    # reuse the compiled program.
    np.testing.assert_array_equal(sampling.sample(tiny_params, key, 8, steps=3), x)
    assert not np.array_equal(sampling.sample(tiny_params, jax.random.key(1), 8, steps=3), x)
    other = jax.tree.map(lambda p: p * 0.5, tiny_params)
    assert not np.array_equal(sampling.sample(other, key, 8, steps=3), x)
    assert traces == first  # no new compilation
    assert set(first) <= {("ancestral", "karras", 3, 8, True, 0)}


def test_images_depend_on_key_and_index_only():
    """Image i depends on (key, i) only: not on n, the chunk size or the device count (chunks of 8
    are sharded over the 4 test devices, chunks of 3 are not; the last chunk of 3 is padded)."""
    params = _gaussian_params("learned")
    key = jax.random.key(11)
    x = sampling.sample_latents(params, key, 8, steps=4)
    y = sampling.sample_latents(params, key, 7, steps=4, batch_size=3)
    np.testing.assert_array_equal(y, x[:7])


@pytest.mark.slow
def test_tiny_model_fast_samplers_run(tiny_params, key):
    for sampler in ("ddim", "dpm_solver"):
        x = sampling.sample(tiny_params, key, 4, steps=2, sampler=sampler)
        assert x.shape == (4, *TINY_SHAPE) and x.dtype == np.uint8


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(n=0), "n=0; expected a positive integer"),
        (dict(n=-3), "expected a positive integer number of images"),
        (dict(n=2.5), "expected a positive integer number of images"),
        (dict(steps=0), "steps=0; expected a positive integer"),
        (dict(steps=-1), "steps=-1; expected a positive integer"),
        (dict(sampler="euler"), "sampler='euler'; expected one of"),
        (dict(sampler="ddim", eta=-0.1), "eta=-0.1; expected a number with 0 <= eta <= 1"),
        (dict(sampler="ddim", eta=1.5), "expected a number with 0 <= eta <= 1"),
        (dict(eta=0.5), "applies only to sampler='ddim'"),
        (dict(grid="log"), "grid='log'; expected one of time, lambda, karras"),
        (dict(batch_size=0), "batch_size=0; expected a positive integer"),
    ],
)
def test_bad_arguments_raise_value_error(tiny_params, key, kwargs, match):
    args = dict(n=2, steps=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(")", r"\)")):
        sampling.sample(tiny_params, key, **args)


def test_params_must_be_vdm_params(key):
    with pytest.raises(ValueError, match="VDMParams"):
        sampling.sample({"denoiser": {}}, key, 2)
