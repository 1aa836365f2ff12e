"""The ``jvdm`` subcommands' bodies: ``train``, ``sample``, ``eval``, ``score`` and ``data``.

:mod:`jvdm.cli` parses the command line and turns errors into exit statuses; each function here
takes the parsed ``argparse.Namespace``, does the work and returns the exit status. Heavy modules
(JAX, orbax, tfds) are imported inside the function that needs them, after
:func:`configure_runtime` has applied jvdm's CPU runtime defaults, so ``jvdm --help`` stays fast.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from jvdm import validate
from jvdm.errors import JvdmUserError

__all__ = [
    "UsageError",
    "data",
    "eval_",
    "load_config",
    "sample",
    "score",
    "split_overrides",
    "train",
]


class UsageError(JvdmUserError):
    """A mistake on the command line, reported in one line with exit status 2."""


def configure_runtime() -> None:
    """jvdm's measured CPU runtime defaults, for the subcommands that compute; called before they
    import JAX (``import jvdm`` itself changes no process state)."""
    from jvdm._xla_defaults import configure_cpu_runtime

    configure_cpu_runtime()


def split_overrides(extra: Sequence[str]) -> list[str]:
    """``--config.a.b=v``, ``--config.a.b v`` and bare ``a.b=v`` tokens as ``a.b=v`` strings."""
    overrides, i = [], 0
    while i < len(extra):
        token = extra[i]
        if token.startswith("--config."):
            body = token.removeprefix("--config.")
            if "=" not in body:
                if i + 1 >= len(extra) or extra[i + 1].startswith("--"):
                    raise UsageError(f"override {token!r} has no value: use {token}=VALUE")
                body = f"{body}={extra[i + 1]}"
                i += 1
            overrides.append(body)
        elif not token.startswith("-") and "=" in token:
            overrides.append(token)
        else:
            raise UsageError(
                f"unrecognised argument {token!r}; overrides look like "
                "--config.section.field=value or section.field=value"
            )
        i += 1
    return overrides


def load_config(spec: str, overrides: Sequence[str]):
    from jvdm import config as config_lib

    path, arg = spec, None
    if not os.path.exists(spec) and ":" in spec:
        path, arg = spec.rsplit(":", 1)
    # An unknown file is a ValueError whose message lists the experiments of that directory.
    config = config_lib.load_config_file(path, arg)
    config = config_lib.apply_overrides(config, overrides)
    return config_lib.validate(config)


def train(args, extra) -> int:
    config = load_config(args.config, split_overrides(extra))
    configure_runtime()
    from jvdm import parallel
    from jvdm.train import train_and_evaluate

    # Multi-host runs (JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, or a SLURM,
    # Open MPI or TPU cluster) join here, before any computation; a no-op for one process.
    parallel.initialize_distributed()
    result = train_and_evaluate(config, args.workdir)
    if result:
        print(json.dumps(result, indent=2, sort_keys=True, default=_json_default))
    return 0


def _json_default(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def sample(args) -> int:
    configure_runtime()
    import jax

    from jvdm import run, sampling, viz

    validate.check_sampler(args.sampler, "--sampler")
    validate.check_sampler_grid(args.grid, "--grid")
    params, config = run.load_with_config(args.workdir)
    images = sampling.sample(
        params,
        jax.random.key(args.seed),
        args.n,
        steps=args.steps,
        sampler=args.sampler,
        eta=args.eta,
        batch_size=args.batch_size,
        grid=args.grid,
        **_gaussian_start(args, params, config),
    )
    out = args.out or os.path.join(run.resolve_checkpoint(args.workdir)[0], "samples.png")
    viz.save_image_grid(images, out)
    if args.save_npy:
        import numpy as np

        np.save(args.save_npy, images)
    print(
        json.dumps(
            {
                "out": os.fspath(out),
                "n": args.n,
                "sampler": args.sampler,
                "steps": args.steps or sampling.default_steps(params.model, args.sampler),
                "grid": args.grid or sampling.default_grid(params.model, args.sampler),
                "gaussian_steps": args.gaussian_steps,
                "gaussian_components": args.gaussian_components,
                "gaussian_rank": args.gaussian_rank,
            }
        )
    )
    return 0


def eval_(args) -> int:
    configure_runtime()
    import jax

    from jvdm import evaluate, run

    params, config = run.load_with_config(args.workdir)
    split = args.split or config.data.eval_split
    if args.images is not None:
        split = f"{split}[:{args.images}]"  # tfds slicing: the ELBO and the ODE see one subset
    result = evaluate.evaluate_split(
        params,
        dataset=config.data.name,
        split=split,
        key=jax.random.key(args.seed),
        draws=args.draws or config.eval.draws,
        batch_size=args.batch_size or config.eval.batch_size,
        steps=args.steps,
        data_dir=args.data_dir or config.data.data_dir,
    )
    result = {"dataset": config.data.name, "split": split, **result}
    result["summary"] = f"{result['bpd_mean']:.4f} ± {result['bpd_sem']:.4f} bpd (mean ± SEM)"
    if args.ode:
        from jvdm import ode

        opts = {k: getattr(args, k) for k in ("probes", "rtol", "atol", "dequantization")}
        opts.update(split=split, key=jax.random.fold_in(jax.random.key(args.seed), 1))
        kw = {"batch_size": args.batch_size, "data_dir": args.data_dir or config.data.data_dir}
        result.update(ode.evaluate_split_ode(params, dataset=config.data.name, **kw, **opts))
        result["summary"] = ode.side_by_side(result)
    print(json.dumps(result, indent=2, ensure_ascii=False))
    return 0


def _gaussian_start(args, params, config) -> dict:
    """``sample``'s ``gaussian_fit`` and ``gaussian_steps`` for ``--gaussian-steps K``: the
    Gaussian (or, with ``--gaussian-components`` and ``--gaussian-rank``, the mixture) of the
    run's own training split (``config.data``), fitted only when ``K > 0``."""
    from jvdm import reference_denoisers as ref

    k, components, rank = args.gaussian_steps, args.gaussian_components, args.gaussian_rank
    ref.is_mixture(components, rank, names=("--gaussian-components", "--gaussian-rank"))
    if not k and (components, rank) != (1, 0):
        raise JvdmUserError(
            "--gaussian-components and --gaussian-rank choose the fit that --gaussian-steps K "
            "uses: give --gaussian-steps K >= 1 too"
        )
    if not k:
        return {"gaussian_steps": k}

    d = config.data
    fit = ref.fit_split(
        d.name,
        d.train_split,
        args.data_dir or d.data_dir,
        params.model.vocab_size,
        components=components,
        rank=rank,
    )
    return {"gaussian_fit": fit, "gaussian_steps": k}


def score(args) -> int:
    """Scores ``--n`` samples of a run's EMA model (:func:`jvdm.quality.sample_quality`)."""
    configure_runtime()
    import time

    import jax

    from jvdm import quality, run, sampling

    validate.check_sampler(args.sampler, "--sampler")
    validate.check_sampler_grid(args.grid, "--grid")
    params, config = run.load_with_config(args.workdir)
    start = time.perf_counter()
    images = sampling.sample(
        params,
        jax.random.key(args.seed),
        args.n,
        steps=args.steps,
        sampler=args.sampler,
        grid=args.grid,
        **_gaussian_start(args, params, config),
    )
    seconds = time.perf_counter() - start
    result = quality.sample_quality(
        images,
        dataset=config.data.name,
        data_dir=args.data_dir or config.data.data_dir,
        seed=args.seed,
    )
    steps = args.steps or sampling.default_steps(params.model, args.sampler)
    grid = args.grid or sampling.default_grid(params.model, args.sampler)
    result.update(sampler=args.sampler, steps=steps, grid=grid, sample_seconds=seconds)
    result["gaussian_steps"] = args.gaussian_steps
    result["gaussian_components"] = args.gaussian_components
    result["gaussian_rank"] = args.gaussian_rank
    result["table"] = quality.format_table(result).splitlines()
    print(json.dumps(result, indent=2, ensure_ascii=False))
    return 0


def data(args) -> int:
    # jvdm.datasets, not jvdm.data: listing needs neither grain nor JAX.
    from jvdm import datasets

    if args.data_command == "prepare":
        if args.images is not None:
            if args.source is not None or args.skip_checksum:
                raise UsageError("--images makes a dataset from a folder; it takes no --from")
            path = datasets.prepare_images(
                args.name,
                args.images,
                args.data_dir,
                size=args.size,
                grayscale=args.grayscale,
                test_fraction=args.test_fraction,
            )
        else:
            path = datasets.prepare(
                args.name, args.data_dir, source=args.source, skip_checksum=args.skip_checksum
            )
        print(f"{args.name}: prepared in {path}")
        return 0
    if args.data_command == "list":
        print(f"data dir: {datasets.get_data_dir(args.data_dir)}")
        for name, is_prepared, shape in datasets.list_datasets(args.data_dir):
            status = "prepared" if is_prepared else "not prepared"
            note = datasets.describe(name, args.data_dir)
            print(f"  {name:<15} {'x'.join(map(str, shape)):<8} {status:<13} {note}")
        return 0
    raise UsageError("`jvdm data` needs a subcommand: prepare NAME or list")
