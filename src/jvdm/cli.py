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
import os
import sys
from collections.abc import Sequence

from jvdm import cli_commands, validate
from jvdm.cli_commands import UsageError
from jvdm.errors import JvdmUserError

__all__ = ["UsageError", "main"]

EXIT_USAGE = 2
EXIT_FAILURE = 1


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's usage dump
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _positive_int(text: str) -> int:
    """An argparse type; argparse prefixes the option's name to the message."""
    try:
        value: object = int(text)
    except ValueError:
        value = text
    try:
        return validate.positive_int(value, "value")
    except JvdmUserError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


_GRID_HELP = (
    "lambda | karras | time (default: karras for ancestral, time for ancestral on a discrete-time"
    " model, lambda for ddim and dpm_solver)"
)


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
    p.add_argument("--grid", default=None, help=_GRID_HELP)
    p.add_argument("--batch-size", type=_positive_int, default=None)
    p.add_argument("--save-npy", default=None, help="also save the uint8 images as .npy here")
    _add_gaussian_steps(p)
    p.add_argument("--data-dir", default=None, help="tfds data dir (default: the config's)")

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
    p.add_argument("--grid", default=None, help=_GRID_HELP)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None, help="tfds data dir (default: the config's)")
    _add_gaussian_steps(p)

    _add_data_parser(sub)
    return parser


def _add_gaussian_steps(p) -> None:
    p.add_argument(
        "--gaussian-steps",
        type=int,
        default=0,
        help="the first K steps take x0_hat from the Gaussian fitted to the run's training split "
        "(its best linear denoiser) instead of the model (default 0: the model throughout)",
    )
    p.add_argument(
        "--gaussian-components",
        type=_positive_int,
        default=1,
        help="with --gaussian-steps: a mixture of this many Gaussians instead of one "
        "(jvdm.fit_mixture; needs --gaussian-rank)",
    )
    p.add_argument(
        "--gaussian-rank",
        type=int,
        default=0,
        help="with --gaussian-steps: each mixture component's rank (default 0: one Gaussian "
        "of full covariance)",
    )


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
        return cli_commands.train(args, extra)
    if args.command == "sample":
        return cli_commands.sample(args)
    if args.command == "eval":
        return cli_commands.eval_(args)
    if args.command == "score":
        return cli_commands.score(args)
    return cli_commands.data(args)


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
