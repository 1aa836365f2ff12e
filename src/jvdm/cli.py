"""The ``jvdm`` command: ``train``, ``sample``, ``eval`` and ``data {prepare,list}``.

Examples::

  jvdm train --config experiments/learned_snr.py --workdir runs/learned_snr --config.train.steps=100
  jvdm train --config experiments/tiny.py --workdir /tmp/tiny train.steps=2
  jvdm sample --workdir runs/learned_snr --n 64 --out grid.png --sampler dpm_solver --steps 20
  jvdm eval --workdir runs/learned_snr --split test --draws 4
  jvdm data prepare mnist_subset
  jvdm data list

A user error (missing file, config typo, bad argument, unprepared dataset, a work directory that
is unwritable or in use, a corrupt checkpoint: a :class:`jvdm.errors.JvdmUserError`) prints one
line ``jvdm: error: ...`` and exits with status 2; a run that fails for a reason it explains (a
full disk, a diverged loss) does the same with status 1. Anything else is a bug in jvdm and shows
its traceback. Set ``JVDM_DEBUG=1`` to see the traceback of the first two kinds as well.
jax and tfds are imported only by the subcommands that need them, so ``--help`` answers at once;
the subcommands that compute apply jvdm's CPU runtime defaults (``jvdm.configure_cpu_runtime``)
before they import JAX.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from jvdm.errors import JvdmUserError

__all__ = ["main"]

EXIT_USAGE = 2
EXIT_FAILURE = 1


class UsageError(JvdmUserError):
    """A mistake on the command line, reported in one line with exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's usage dump
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _build_parser() -> _Parser:
    parser = _Parser(prog="jvdm", description="Variational Diffusion Models in JAX/Flax.")
    sub = parser.add_subparsers(
        dest="command", metavar="{train,sample,eval,score,data}", parser_class=_Parser
    )

    p = sub.add_parser(
        "train",
        help="train a model",
        description="Train (or resume) an experiment. Overrides: --config.section.field=value or "
        "section.field=value, e.g. --config.train.steps=100 model.channels=16.",
    )
    p.add_argument(
        "--config",
        required=True,
        help="experiment file, e.g. experiments/tiny.py (append :ARG to pass ARG to get_config)",
    )
    p.add_argument("--workdir", required=True, help="run directory (checkpoints, metrics)")

    p = sub.add_parser("sample", help="draw samples from a trained model into a PNG grid")
    p.add_argument("--workdir", required=True, help="run directory or one checkpoint directory")
    p.add_argument("--n", type=_positive_int, default=64, help="number of images (default 64)")
    p.add_argument("--out", default=None, help="PNG path (default WORKDIR/samples.png)")
    p.add_argument("--sampler", default="ancestral", help="ancestral | ddim | dpm_solver")
    p.add_argument("--steps", type=_positive_int, default=None, help="sampling steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eta", type=float, default=0.0, help="DDIM stochasticity in [0, 1]")
    p.add_argument("--batch-size", type=_positive_int, default=None)
    p.add_argument("--save-npy", default=None, help="also save the uint8 images as .npy here")

    p = sub.add_parser("eval", help="bits per dimension over a dataset split")
    p.add_argument("--workdir", required=True, help="run directory or one checkpoint directory")
    p.add_argument("--split", default=None, help="split (default: the config's data.eval_split)")
    p.add_argument("--draws", type=_positive_int, default=None, help="noise draws per image")
    p.add_argument(
        "--steps",
        type=_positive_int,
        default=None,
        help="discrete-time bound with T=STEPS (default: the model's own bound)",
    )
    p.add_argument("--batch-size", type=_positive_int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None, help="tfds data dir (default: the config's)")
    p.add_argument("--ode", action="store_true", help="also the probability-flow ODE bpd")
    p.add_argument("--images", type=_positive_int, default=None, help="only the first N images")
    p.add_argument("--probes", type=_positive_int, default=1, help="Hutchinson probes (--ode)")
    p.add_argument("--rtol", type=float, default=1e-5, help="ODE solver rtol (--ode)")
    p.add_argument("--atol", type=float, default=1e-5, help="ODE solver atol (--ode)")
    p.add_argument("--dequantization", default="truncated_normal", help="or uniform (--ode)")

    p = sub.add_parser("score", help="sample quality in the features of a dataset classifier")
    p.add_argument("--workdir", required=True, help="run directory or one checkpoint directory")
    p.add_argument("--n", type=_positive_int, default=256, help="number of samples (default 256)")
    p.add_argument("--sampler", default="ancestral", help="ancestral | ddim | dpm_solver")
    p.add_argument("--steps", type=_positive_int, default=None, help="sampling steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None, help="tfds data dir (default: the config's)")

    _add_data_parser(sub)
    return parser


def _configure_runtime() -> None:
    """jvdm's measured CPU runtime defaults, for the subcommands that compute; called before they
    import JAX (``import jvdm`` itself changes no process state)."""
    from jvdm._xla_defaults import configure_cpu_runtime

    configure_cpu_runtime()


def _split_overrides(extra: Sequence[str]) -> list[str]:
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


def _load_config(spec: str, overrides: Sequence[str]):
    from jvdm import config as config_lib

    path, arg = spec, None
    if not os.path.exists(spec) and ":" in spec:
        path, arg = spec.rsplit(":", 1)
    # An unknown file is a ValueError whose message lists the experiments of that directory.
    config = config_lib.load_config_file(path, arg)
    config = config_lib.apply_overrides(config, overrides)
    return config_lib.validate(config)


def _cmd_train(args, extra) -> int:
    config = _load_config(args.config, _split_overrides(extra))
    _configure_runtime()
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


def _cmd_sample(args) -> int:
    _configure_runtime()
    import jax

    from jvdm import run, sampling, viz

    if args.sampler not in sampling.SAMPLERS:
        raise UsageError(
            f"--sampler {args.sampler!r}: expected one of {', '.join(sampling.SAMPLERS)}"
        )
    params = run.load(args.workdir)
    images = sampling.sample(
        params,
        jax.random.key(args.seed),
        args.n,
        steps=args.steps,
        sampler=args.sampler,
        eta=args.eta,
        batch_size=args.batch_size,
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
            }
        )
    )
    return 0


def _cmd_eval(args) -> int:
    _configure_runtime()
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


def _cmd_score(args) -> int:
    _configure_runtime()
    from jvdm import quality

    opts = {k: getattr(args, k) for k in ("n", "sampler", "steps", "seed", "data_dir")}
    print(json.dumps(quality.score_run(args.workdir, **opts), indent=2, ensure_ascii=False))
    return 0


def _add_data_parser(sub) -> None:
    p = sub.add_parser("data", help="prepare or list datasets")
    data_sub = p.add_subparsers(dest="data_command", metavar="{prepare,list}", parser_class=_Parser)
    q = data_sub.add_parser(
        "prepare",
        help="prepare a dataset in array_record format",
        description="Prepare a dataset: download it (checking the published sha256), or parse a "
        "local copy (--from), or make one from a folder of images (--images).",
    )
    q.add_argument(
        "name", help="a known dataset (see `jvdm data list`), or a new name for --images"
    )
    q.add_argument("--data-dir", default=None)
    q.add_argument(
        "--from",
        dest="source",
        default=None,
        metavar="PATH",
        help="the published archive, or a folder holding the published files",
    )
    q.add_argument(
        "--skip-checksum",
        action="store_true",
        help="use files that differ from the published ones, with a warning",
    )
    q.add_argument(
        "--images",
        default=None,
        metavar="DIR",
        help="a folder of PNG/JPEG images (one sub-folder per class, if any)",
    )
    q.add_argument("--size", type=_positive_int, default=32, help="--images: pixels (default 32)")
    q.add_argument("--grayscale", action="store_true", help="--images: one channel")
    q.add_argument(
        "--test-fraction",
        type=float,
        default=0.1,
        help="--images: share of the files in the test split (default 0.1)",
    )
    q = data_sub.add_parser("list", help="list known datasets and whether they are prepared")
    q.add_argument("--data-dir", default=None)


def _cmd_data(args) -> int:
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


def _run(argv: Sequence[str]) -> int:
    parser = _build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        raise UsageError(
            "missing command: one of train, sample, eval, score, data (see `jvdm --help`)"
        )
    if args.command != "train" and extra:
        raise UsageError(
            f"unrecognised arguments: {' '.join(extra)} (see `jvdm {args.command} --help`)"
        )
    if args.command == "train":
        return _cmd_train(args, extra)
    if args.command == "sample":
        return _cmd_sample(args)
    if args.command == "eval":
        return _cmd_eval(args)
    if args.command == "score":
        return _cmd_score(args)
    return _cmd_data(args)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = bool(os.environ.get("JVDM_DEBUG"))
    try:
        return _run(argv)
    except SystemExit as exit_:  # --help
        return exit_.code if isinstance(exit_.code, int) else 0
    except JvdmUserError as err:
        # Every user error derives from it (jvdm.errors): config typos and invalid values, unknown
        # or unprepared datasets, a missing run or checkpoint, a work directory in use, bad
        # arguments. Any other ValueError is a bug and keeps its traceback.
        if debug:
            raise
        print(f"jvdm: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_USAGE
    except (RuntimeError, OSError) as err:
        # A run that failed for a reason it explains (a full disk, a diverged loss): one line
        # and status 1. Anything else is a bug, and keeps its traceback.
        if debug or not _is_run_failure(err):
            raise
        print(f"jvdm: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("jvdm: interrupted", file=sys.stderr)
        return 130


def _is_run_failure(err: BaseException) -> bool:
    if isinstance(err, OSError):
        return True
    # Only modules already imported can have raised their errors: no import on this path.
    train_mod, ckpt_mod = sys.modules.get("jvdm.train"), sys.modules.get("jvdm.checkpoint")
    kinds = (getattr(train_mod, "NonFiniteError", ()), getattr(ckpt_mod, "CheckpointSaveError", ()))
    return any(isinstance(err, k) for k in kinds if k)
