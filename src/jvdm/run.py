"""Loading a trained run: its checkpoint, its saved config and its verified EMA parameters.

A work directory (layout: :mod:`jvdm.workdir`) holds ``config.json`` and ``checkpoints/<step>/``.
:func:`load` rebuilds the model from the saved config (its image shape comes from the dataset
catalogue, so neither the data, grain nor tensorflow_datasets are needed) and restores the EMA
parameters of the newest verified checkpoint; loading needs neither the trainer nor its optimizer.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jvdm import build
from jvdm import model as model_lib
from jvdm.errors import JvdmUserError
from jvdm.workdir import CHECKPOINT_DIR, CONFIG_FILE

__all__ = [
    "RunNotFoundError",
    "checkpoint_steps",
    "load",
    "load_config",
    "load_loss_histogram",
    "load_with_config",
    "read_saved_config",
    "resolve_checkpoint",
]


class RunNotFoundError(JvdmUserError, FileNotFoundError):
    """No run, checkpoint or saved config where one was asked for (the message says what was
    looked for)."""


def _step_dirs(checkpoints: pathlib.Path) -> list[pathlib.Path]:
    """Finished step directories ``<step>/`` (orbax's in-progress saves carry a tmp suffix)."""
    if not checkpoints.is_dir():
        return []
    return sorted(
        (p for p in checkpoints.iterdir() if p.is_dir() and p.name.isdigit()),
        key=lambda p: int(p.name),
    )


def checkpoint_steps(workdir: str | os.PathLike) -> list[int]:
    """The steps of a run's finished checkpoints, oldest first (``[]`` if it has none); load one
    with ``load(f"{workdir}/checkpoints/{step}")``."""
    root = pathlib.Path(workdir).expanduser().absolute() / CHECKPOINT_DIR
    return [int(p.name) for p in _step_dirs(root)]


def resolve_checkpoint(path: str | os.PathLike) -> tuple[pathlib.Path, pathlib.Path]:
    """``(workdir, step_dir)`` for a run directory (its latest checkpoint) or one step directory.

    Raises:
      RunNotFoundError (a FileNotFoundError): the path does not exist or holds no checkpoint;
        the message says what was looked for.
    """
    # Absolute: orbax refuses relative checkpoint paths.
    path = pathlib.Path(path).expanduser().absolute()
    if not path.exists():
        raise RunNotFoundError(
            f"no run directory or checkpoint at {str(path)!r}: expected a work directory written "
            f"by `jvdm train` (holding {CHECKPOINT_DIR}/<step>/) or one of its "
            f"{CHECKPOINT_DIR}/<step> directories"
        )
    if path.name.isdigit() and path.parent.name == CHECKPOINT_DIR:
        return path.parent.parent, path
    steps = _step_dirs(path / CHECKPOINT_DIR)
    if not steps:
        raise RunNotFoundError(
            f"no checkpoint in {str(path)!r}: looked for step directories "
            f"{str(path / CHECKPOINT_DIR)}/<step>/ (written by `jvdm train` every "
            "train.checkpoint_every steps); train first, or pass a checkpoint directory"
        )
    return path, steps[-1]


# Config fields added after runs had been saved without them: (section, field) -> the value those
# runs were trained with, where it differs from today's default (VDM's Fourier frequencies 6..7;
# VDM's pathwise estimator of the schedule's variance gradient).
LEGACY_FIELDS = {
    ("model", "fourier_min"): 6,
    ("model", "fourier_max"): 8,
    ("gamma", "variance_gradient"): "pathwise",
}


def read_saved_config(workdir: str | os.PathLike) -> dict[str, Any] | None:
    """The saved ``config.json`` of ``workdir`` (nested JSON), or ``None`` if none.

    A run saved before a field of :data:`LEGACY_FIELDS` existed gets that field's value, so loading
    and resuming both see the network it was trained as.
    """
    file = pathlib.Path(workdir) / CONFIG_FILE
    if not file.is_file():
        return None
    with open(file) as f:
        saved = json.load(f)
    for (section, field), value in LEGACY_FIELDS.items():
        if isinstance(saved.get(section), dict):
            saved[section].setdefault(field, value)
    return saved


def load_config(workdir: str | os.PathLike):
    """The experiment config saved in ``workdir``, decoded onto today's base config, validated.

    Raises:
      RunNotFoundError: ``workdir`` has no ``config.json``.
      JvdmUserError: a saved field is unknown to this version of jvdm or does not fit its type.
    """
    from jvdm import config as config_lib

    saved = read_saved_config(workdir)
    if saved is None:
        raise RunNotFoundError(
            f"no saved config at {str(pathlib.Path(workdir) / CONFIG_FILE)!r}: `jvdm train` writes "
            "it when a run starts; without it the model definition of the checkpoint is unknown"
        )
    return config_lib.validate(config_lib.from_dict(saved))


def _item_dir(step_dir: pathlib.Path) -> pathlib.Path:
    """The orbax item holding the train state inside a step directory."""
    if (step_dir / "_METADATA").is_file():
        return step_dir
    items = sorted(p for p in step_dir.iterdir() if (p / "_METADATA").is_file())
    for preferred in ("state", "default", "train_state"):
        for p in items:
            if p.name == preferred:
                return p
    if len(items) == 1:
        return items[0]
    raise RunNotFoundError(
        f"{str(step_dir)!r} is not a readable checkpoint: expected one orbax item directory "
        f"(with a _METADATA file), found {[p.name for p in items]}"
    )


def _restore_params(
    step_dir: pathlib.Path, model: model_lib.VDM, item: str = "ema_params"
) -> model_lib.VDMParams:
    """One parameter tree of a saved ``TrainState``: ``ema_params`` or the raw ``params``."""
    import orbax.checkpoint as ocp
    from flax import serialization

    abstract = jax.eval_shape(lambda: model_lib.init(model, jax.random.key(0)))
    target = serialization.to_state_dict(abstract)
    # Host NumPy arrays: independent of the device layout the run was saved from.
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
    restored = ocp.PyTreeCheckpointer().restore(
        _item_dir(step_dir),
        args=ocp.args.PyTreeRestore(
            item={item: target}, restore_args={item: restore_args}, partial_restore=True
        ),
    )
    params = serialization.from_state_dict(abstract, restored[item])
    return jax.tree.map(jnp.asarray, params)


def _verified(path, step_dir: pathlib.Path) -> pathlib.Path:
    """The step to load: ``step_dir`` if its checksum matches. A work directory whose newest step
    is unverified (a save not checksummed yet) gives its newest verified step instead; a corrupt
    step is an error, never a fallback to other parameters than those asked for."""
    import warnings

    from jvdm import integrity

    is_run = pathlib.Path(path).expanduser().resolve() != step_dir.resolve()
    candidates = _step_dirs(step_dir.parent)[::-1] if is_run else [step_dir]
    for i, candidate in enumerate(candidates):
        try:
            if integrity.check_step(str(candidate)):
                if i:
                    warnings.warn(
                        f"checkpoint {step_dir} is not verified yet (no "
                        f"{integrity.CHECKSUM_FILE}); loading the newest verified one, "
                        f"{candidate}",
                        stacklevel=3,
                    )
                return candidate
        except integrity.CorruptCheckpointError as err:
            older = [str(p) for p in _step_dirs(step_dir.parent) if p.name != candidate.name]
            raise integrity.CorruptCheckpointError(
                f"{err}. Its parameters would be wrong, so nothing was loaded"
                + (f"; other checkpoints of this run: {', '.join(older[-3:])}" if older else "")
            ) from None
    warnings.warn(
        f"checkpoint {step_dir} has no {integrity.CHECKSUM_FILE} (saved by an older jvdm, or its "
        "run was killed before the save was verified): loading it unverified",
        stacklevel=3,
    )
    return step_dir


def _config_and_verified_step(path) -> tuple[Any, pathlib.Path]:
    """The run's saved config and the checkpoint step to read (:func:`_verified`), in that order:
    a run without its config stops on that alone, before any checksum warning."""
    workdir, step_dir = resolve_checkpoint(path)
    config = load_config(workdir)
    return config, _verified(path, step_dir)


def load_loss_histogram(path: str | os.PathLike) -> jax.Array:
    """The loss histogram over ``lambda`` saved with a checkpoint (``TrainState.loss_histogram``,
    ``[2, model.histogram_bins]``; :mod:`jvdm.noise_sampling`), for a run directory (its latest
    checkpoint) or one checkpoint directory, as :func:`load` resolves it."""
    import orbax.checkpoint as ocp

    from jvdm import integrity

    config, step_dir = _config_and_verified_step(path)
    bins = int(config.model.histogram_bins)
    target = {"loss_histogram": jax.ShapeDtypeStruct((2, bins), jnp.float32)}
    try:
        restored = ocp.PyTreeCheckpointer().restore(
            _item_dir(step_dir),
            args=ocp.args.PyTreeRestore(
                item=target,
                restore_args={"loss_histogram": ocp.RestoreArgs(restore_type=np.ndarray)},
                partial_restore=True,
            ),
        )
    except (OSError, ValueError) as err:
        raise integrity.CorruptCheckpointError(
            f"checkpoint {step_dir} cannot be read: {' '.join(str(err).split())[:300]}"
        ) from err
    return jnp.asarray(restored["loss_histogram"])


def load_with_config(path: str | os.PathLike, *, raw: bool = False):
    """``(params, config)``: :func:`load`'s parameters and the run's experiment config; with
    ``raw=True`` the raw parameters of the same checkpoint instead of their EMA."""
    from jvdm import integrity

    config, step_dir = _config_and_verified_step(path)
    model = build.from_config(config)
    try:
        return _restore_params(step_dir, model, "params" if raw else "ema_params"), config
    except (OSError, ValueError) as err:  # a damaged checkpoint that has no checksum
        raise integrity.CorruptCheckpointError(
            f"checkpoint {step_dir} cannot be read: {' '.join(str(err).split())[:300]}"
        ) from err


def load(path: str | os.PathLike) -> model_lib.VDMParams:
    """The EMA parameters of a run, ready for :func:`jvdm.sample` and :func:`jvdm.bpd`.

    Args:
      path: a work directory written by ``jvdm train`` (its latest checkpoint is used) or one
        checkpoint directory ``WORKDIR/checkpoints/<step>``.

    Returns:
      A :class:`jvdm.model.VDMParams` carrying the static model rebuilt from the saved config.

    Raises:
      RunNotFoundError (a FileNotFoundError): no such path, no checkpoint in it, or no saved
        config.
      jvdm.integrity.CorruptCheckpointError (a ValueError): the checkpoint's files do not match
        their checksum, or cannot be read.
    """
    return load_with_config(path)[0]
