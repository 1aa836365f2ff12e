"""Where do the grey backgrounds of the samples come from? Ancestral sampling from real images.

Issue 17: the trained default model's ancestral samples have about a third of their pixels exactly
0, against 80% in real digits; the rest of the background lies in 1..15. This script localises the
noise level at which the model loses the background. For real *training* images ``x`` (never the
test split) and a start time ``t_s``, it draws ``z_{t_s} ~ q(z_{t_s} | x)``, runs the model's own
ancestral chain from ``t_s`` down to 0 (``round(250 t_s)`` steps, at least 1, the default
sampler's step size) and decodes. ``t_s = 0`` is the decoder alone; ``t_s = 1`` is sampling from
(nearly) the prior. Between them, the chain keeps the information about ``x`` that survives at
``gamma(t_s)``, so the first start level at which the zero share falls says where the model's
denoiser stops putting background pixels exactly on -1.

For each start level it reports the share of exactly-zero pixels, of pixels in 1..15, the share of
the real image's zero pixels that come back as 0, and one denoiser call's accuracy at that level:
the share of the real zero pixels whose ``x0_hat`` rounds to the zero bin.

With ``--lifts K ...`` it also asks whether the chain *repairs* a wrong background: the real
images' zero pixels are set to ``k`` (a background lifted by ``k`` bins, as in the grey samples),
noised to ``--lift-start`` and run down to 0; the shares of them that come back as 0 and that stay
at ``k`` are reported. (With VDM's Fourier features, n = 6, 7, a lift of 4 or 8 bins stays put: it
has the features of -1.)
Prints one JSON record (appended to bench/results.jsonl):

    python bench/sample_defect.py --workdir runs/learned_snr [--n 128] [--steps-full 250]
        [--lifts 0 1 2 3 4 6 8 --lift-start 0.2]
"""

from __future__ import annotations

import argparse
import sys

import _common

DEFAULT_STARTS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def _clipped_ancestral(params, state, inp, steps):
    """The ancestral step with ``x0_hat`` clipped to [-1, 1] and ``eps_hat`` recomputed from it
    (DDPM's ``clip_denoised``): the same posterior, with the denoiser's overshoot removed."""
    import jax
    import jax.numpy as jnp

    from jvdm import model as model_lib

    del steps
    (z,) = state
    g_t, g_s = inp.g_t, inp.g_s
    _, x0_hat = model_lib.predict_eps_x0(params, z, g_t)
    x0_c = jnp.clip(x0_hat, -1.0, 1.0)
    # q(z_s | z_t, x = x0_c), written as jvdm.samplers' ancestral step with eps_c for eps_hat.
    alpha_t, sigma_t = jnp.sqrt(jax.nn.sigmoid(-g_t)), jnp.sqrt(jax.nn.sigmoid(g_t))
    eps_c = (z - alpha_t * x0_c) / sigma_t
    c = -jnp.expm1(g_s - g_t)
    ratio = jnp.exp(0.5 * (jax.nn.log_sigmoid(-g_s) - jax.nn.log_sigmoid(-g_t)))
    return (ratio * (z - c * sigma_t * eps_c) + jnp.sqrt(c * jax.nn.sigmoid(g_s)) * inp.noise,)


def _programs(steps_full: int, clip: bool):
    import functools

    import jax
    import jax.numpy as jnp

    from jvdm import decoder
    from jvdm import model as model_lib
    from jvdm.samplers import SAMPLERS, run

    @functools.partial(jax.jit, static_argnames=("steps",))
    def restart(params, pixels, key, t_s, *, steps):
        """Noise real pixels to ``t_s``, run ancestral to 0, decode; plus x0_hat at ``t_s``."""
        x = decoder.scale_pixels(pixels, params.model.vocab_size)
        k_eps, k_chain, k_dec = jax.random.split(key, 3)
        g_s = model_lib.gamma(params, t_s)
        alpha, sigma = jnp.sqrt(jax.nn.sigmoid(-g_s)), jnp.sqrt(jax.nn.sigmoid(g_s))
        z = alpha * x + sigma * jax.random.normal(k_eps, x.shape)
        _, x0_hat = model_lib.predict_eps_x0(params, z, g_s)
        if steps:
            i = jnp.arange(steps + 1, dtype=jnp.float32)
            g = model_lib.gamma(params, t_s * (steps - i) / steps)
            noise = lambda j: jax.random.normal(jax.random.fold_in(k_chain, j), x.shape)
            spec = SAMPLERS["ancestral"]
            if clip:
                spec = spec._replace(step=_clipped_ancestral)
            z = run(params, spec, z, g, 0.0, noise)
        g_0 = model_lib.gamma(params, jnp.zeros((), jnp.float32))
        u = jax.random.uniform(k_dec, x.shape)
        out = decoder.decoder_sample(u, z, g_0, params.model.vocab_size)
        bin_width = 2.0 / params.model.vocab_size
        x0_is_zero = jnp.abs(x0_hat + 1.0 - 0.5 * bin_width) < 0.5 * bin_width
        return out, x0_is_zero

    def steps_for(t_s: float) -> int:
        return 0 if t_s == 0.0 else max(1, round(steps_full * t_s))

    return restart, steps_for


def _background_levels(images) -> dict[int, int]:
    """``{v: number of images whose background sits at v}``: the median of each image's pixels
    below 64. A grey sample is seldom speckled: its whole background sits at one level (issue 17:
    1, 3 or 4 with VDM's Fourier features), so this tells a lifted background from noise."""
    import numpy as np

    levels = [int(np.median(im[im < 64])) if np.any(im < 64) else -1 for im in images]
    values, counts = np.unique(levels, return_counts=True)
    return {int(v): int(c) for v, c in zip(values, counts, strict=True)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--steps-full", type=int, default=250)
    parser.add_argument("--starts", type=float, nargs="+", default=list(DEFAULT_STARTS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clip", action="store_true", help="clip x0_hat to [-1, 1] in each step")
    parser.add_argument("--lifts", type=int, nargs="*", default=[], help="background lifts (bins)")
    parser.add_argument("--lift-start", type=float, default=0.2, help="t_s of the lift rows")
    args = parser.parse_args()
    load_before = _common.loadavg()

    import jax
    import numpy as np

    from jvdm import data, run
    from jvdm import model as model_lib

    params, config = run.load_with_config(args.workdir)
    train = data.load_split_array(config.data.name, "train", config.data.data_dir)
    pixels = train[np.random.default_rng(args.seed).choice(len(train), args.n, replace=False)]
    real_zero = pixels == 0
    restart, steps_for = _programs(args.steps_full, args.clip)
    rows = []
    for t_s in args.starts:
        steps = steps_for(t_s)
        key = jax.random.fold_in(jax.random.key(args.seed), round(t_s * 1000))
        out, x0_zero = restart(params, pixels, key, np.float32(t_s), steps=steps)
        out, x0_zero = np.asarray(out), np.asarray(x0_zero)
        g_s = float(model_lib.gamma(params, jax.numpy.float32(t_s)))
        rows.append(
            {
                "t_start": t_s,
                "gamma_start": g_s,
                "steps": steps,
                "zero_share": float(np.mean(out == 0)),
                "low_share_1_15": float(np.mean((out >= 1) & (out <= 15))),
                "real_zero_kept": float(np.mean(out[real_zero] == 0)),
                "x0_hat_zero_of_real_zero": float(np.mean(x0_zero[real_zero])),
                "background_levels": _background_levels(out),
            }
        )
        print(rows[-1], file=sys.stderr, flush=True)
    lifts = []
    for k in args.lifts:
        lifted = np.where(real_zero, k, pixels).astype(pixels.dtype)
        key = jax.random.fold_in(jax.random.key(args.seed + 1), k)
        t_s = args.lift_start
        out, _ = restart(params, lifted, key, np.float32(t_s), steps=steps_for(t_s))
        back = np.asarray(out)[real_zero]
        lifts.append(
            {
                "lift": k,
                "t_start": t_s,
                "back_to_zero": float(np.mean(back == 0)),
                "stays_at_lift": float(np.mean(back == k)),
                "mean_value": float(np.mean(back)),
            }
        )
        print(lifts[-1], file=sys.stderr, flush=True)
    result = {
        "workdir": args.workdir,
        "n": args.n,
        "steps_full": args.steps_full,
        "clip_x0": args.clip,
        "real_zero_share": float(np.mean(real_zero)),
        "real_low_share_1_15": float(np.mean((pixels >= 1) & (pixels <= 15))),
        "rows": rows,
        "lifts": lifts,
    }
    _common.emit("sample_defect", result, load_before=load_before)
    return 0


if __name__ == "__main__":
    sys.exit(main())
