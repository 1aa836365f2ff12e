"""The ``jvdm`` command line: clear one-line errors with exit status 2, and the happy paths."""

import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest

from jvdm import cli
from jvdm.errors import JvdmUserError

ROOT = os.path.join(os.path.dirname(__file__), "..")
TINY = os.path.join(ROOT, "experiments", "tiny.py")


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err  # one line, no traceback, no usage dump
    assert lines[0].startswith("jvdm: error: "), err
    return lines[0]


def test_data_list(capsys):
    assert cli.main(["data", "list"]) == 0
    out = capsys.readouterr().out
    assert "mnist_subset" in out and "digits" in out and "cifar10" in out and "data dir:" in out


def test_data_prepare_unknown_dataset(capsys):
    assert cli.main(["data", "prepare", "imagenet_full"]) == 2
    line = _error_line(capsys)
    assert "imagenet_full" in line and "known datasets" in line


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (["--config.model.chanels=16"], ["unknown config field 'model.chanels'", "channels"]),
        (["modell.channels=16"], ["unknown config section 'modell'"]),
        (["--config.model.channels=sixteen"], ["model.channels"]),
        (["--config.model.dropout=2.0"], ["config.model.dropout=2.0 is invalid"]),
        (["eval.sample_grid=log"], ["config.eval.sample_grid='log'", "time, lambda, karras"]),
        (["eval.sample_gaussian_steps=4"], ["sample_gaussian_steps=4 is invalid", "0..3"]),
        (["eval.sample_gaussian_components=3"], ["sample_gaussian_rank=0 is invalid", "3 comp"]),
        (["--config.model.channels"], ["has no value", "--config.model.channels=VALUE"]),
        (["model.channels"], ["unrecognised argument 'model.channels'", "section.field=value"]),
    ],
)
def test_train_config_errors(tmp_path, capsys, overrides, expected):
    argv = ["train", "--config", TINY, "--workdir", str(tmp_path / "run"), *overrides]
    assert cli.main(argv) == 2
    line = _error_line(capsys)
    for text in expected:
        assert text in line, line


def test_train_unknown_experiment(tmp_path, capsys):
    missing = os.path.join(ROOT, "experiments", "learned_snrr.py")
    assert cli.main(["train", "--config", missing, "--workdir", str(tmp_path)]) == 2
    line = _error_line(capsys)
    assert "learned_snrr.py" in line and "learned_snr" in line and "tiny" in line


def test_train_passes_the_overridden_validated_config(tmp_path, monkeypatch, capsys):
    calls = []
    fake = types.ModuleType("jvdm.train")
    fake.train_and_evaluate = lambda config, workdir: (
        calls.append((config, workdir)) or {"bpd": 1.5}
    )
    monkeypatch.setitem(sys.modules, "jvdm.train", fake)
    argv = [
        "train",
        "--config",
        TINY,
        "--workdir",
        str(tmp_path),
        "--config.train.steps=3",
        "--config.model.channels",
        "16",
        "data.name=digits",
    ]
    assert cli.main(argv) == 0
    ((config, workdir),) = calls
    assert workdir == str(tmp_path)
    assert (config.train.steps, config.model.channels, config.data.name) == (3, 16, "digits")
    assert json.loads(capsys.readouterr().out) == {"bpd": 1.5}


def test_every_user_error_class_is_a_jvdm_user_error():
    from jvdm import checkpoint, datasets, integrity, run, workdir

    kinds = [
        cli.UsageError,
        checkpoint.CheckpointMismatchError,
        datasets.DatasetError,
        datasets.DatasetNotPreparedError,
        run.RunNotFoundError,
        integrity.CorruptCheckpointError,
        workdir.WorkdirError,
    ]
    assert all(issubclass(k, JvdmUserError) for k in kinds)
    # Run failures (exit status 1) are not user errors.
    assert not issubclass(checkpoint.CheckpointSaveError, JvdmUserError)


@pytest.mark.parametrize(
    "error,status",
    [(JvdmUserError("bad input: do this instead"), 2), (ValueError("a bug in jvdm"), None)],
)
def test_only_user_errors_are_one_line(tmp_path, monkeypatch, capsys, error, status):
    def train_and_evaluate(config, workdir):
        raise error

    fake = types.ModuleType("jvdm.train")
    fake.train_and_evaluate = train_and_evaluate
    monkeypatch.setitem(sys.modules, "jvdm.train", fake)
    argv = ["train", "--config", TINY, "--workdir", str(tmp_path)]
    if status is None:  # a bug keeps its traceback
        with pytest.raises(ValueError, match="a bug in jvdm"):
            cli.main(argv)
    else:
        assert cli.main(argv) == status
        assert _error_line(capsys) == "jvdm: error: bad input: do this instead"


@pytest.mark.parametrize(
    "argv,expected",
    [
        (["sample", "--workdir", "{tmp}/nope", "--n", "4"], ["no run directory or checkpoint"]),
        (["sample", "--workdir", "{tmp}", "--n", "4"], ["no checkpoint in", "checkpoints/<step>"]),
        (["sample", "--workdir", "{tmp}", "--n", "0"], ["--n", "expected a positive integer"]),
        (["sample", "--workdir", "{tmp}", "--steps", "-2"], ["--steps", "positive integer"]),
        (["sample", "--workdir", "{tmp}", "--sampler", "euler"], ["euler", "dpm_solver"]),
        (
            ["sample", "--workdir", "{tmp}", "--grid", "log"],
            ["--grid='log'", "time, lambda, karras"],
        ),
        (["eval", "--workdir", "{tmp}/nope"], ["no run directory or checkpoint"]),
        (["eval", "--workdir", "{tmp}", "--draws", "0"], ["--draws", "positive integer"]),
        (["sample"], ["--workdir"]),
        (["frobnicate"], ["invalid choice", "frobnicate"]),
        ([], ["missing command"]),
    ],
)
def test_usage_errors(tmp_path, capsys, argv, expected):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert cli.main(argv) == 2
    line = _error_line(capsys)
    for text in expected:
        assert text in line, line


def test_python_dash_m_help():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-m", "jvdm", "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    for command in ("train", "sample", "eval", "data"):
        assert command in result.stdout


def test_sample_a_saved_run(tmp_path, capsys):
    from test_evaluate import write_run

    write_run(str(tmp_path), steps=(1,))
    out = tmp_path / "grid.png"
    # 8 images, 3 steps: the program test_sampling's tiny-model test uses (compiled once for both).
    argv = ["sample", "--workdir", str(tmp_path), "--n", "8", "--steps", "3", "--out", str(out)]
    assert cli.main(argv + ["--save-npy", str(tmp_path / "x.npy")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["out"] == str(out) and printed["grid"] == "karras"
    from PIL import Image

    with Image.open(out) as picture:  # 3 x 3 grid of 8 x 8 digits with 2 pixels of padding
        assert picture.size == (3 * 10 + 2, 3 * 10 + 2) and picture.mode == "L"
    x = np.load(tmp_path / "x.npy")
    assert x.shape == (8, 8, 8, 1) and x.dtype == np.uint8


@pytest.mark.slow
def test_eval_a_saved_run(tmp_path, capsys):
    from test_evaluate import write_run

    write_run(str(tmp_path), steps=(1,))
    assert cli.main(["eval", "--workdir", str(tmp_path), "--batch-size", "100"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["num_images"] == 297 and result["split"] == "test"
    assert np.isfinite(result["bpd_mean"]) and "±" in result["summary"]


@pytest.mark.slow
def test_eval_ode_prints_elbo_and_ode_side_by_side(tmp_path, capsys):
    from test_evaluate import write_run

    write_run(str(tmp_path), steps=(1,))
    argv = ["eval", "--workdir", str(tmp_path), "--ode", "--images", "4", "--rtol", "1e-3"]
    assert cli.main(argv + ["--atol", "1e-3", "--probes", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["num_images"] == result["ode_num_images"] == 4
    assert result["split"] == "test[:4]" and result["ode_probes"] == 2
    assert np.isfinite(result["ode_bpd_mean"]) and result["ode_nfe_mean"] > 6
    assert result["summary"].startswith("ELBO ") and "| ODE " in result["summary"]


@pytest.mark.slow
def test_score_a_saved_run(tmp_path, capsys):
    from test_evaluate import write_run

    write_run(str(tmp_path), steps=(1,))
    argv = ["score", "--workdir", str(tmp_path), "--n", "8", "--sampler", "ddim", "--steps", "3"]
    assert cli.main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 8 and result["steps"] == 3 and result["sampler"] == "ddim"
    assert set(result["samples"]) == set(result["real_train"]) >= {"fd", "kid", "precision"}
    assert 0.5 < result["classifier_test_accuracy"] <= 1.0


def test_sample_with_a_gaussian_start(tmp_path, capsys, monkeypatch):
    """``--gaussian-steps K``: the Gaussian of the run's own training split starts the chain."""
    from jvdm import reference_denoisers as ref
    from test_evaluate import write_run

    write_run(str(tmp_path), steps=(1,))
    fitted = []
    real_fit = ref.fit_split

    def recording(*args, **kw):
        fitted.append((*args[:2], kw.get("components", 1), kw.get("rank", 0)))
        return real_fit(*args, **kw)

    monkeypatch.setattr(ref, "fit_split", recording)
    base = ["sample", "--workdir", str(tmp_path), "--n", "8", "--steps", "3"]
    arrays = {}
    for k in (0, 2):
        npy = tmp_path / f"x{k}.npy"
        argv = base + ["--gaussian-steps", str(k), "--save-npy", str(npy)]
        argv += ["--out", str(tmp_path / f"g{k}.png")]
        assert cli.main(argv) == 0
        assert json.loads(capsys.readouterr().out)["gaussian_steps"] == k
        arrays[k] = np.load(npy)
    # A mixture of the same split: its own fit, and a chain apart from the one Gaussian's.
    npy = tmp_path / "mix.npy"
    argv = base + ["--gaussian-steps", "2", "--gaussian-components", "2", "--gaussian-rank", "3"]
    assert cli.main(argv + ["--save-npy", str(npy), "--out", str(tmp_path / "mix.png")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["gaussian_components"], out["gaussian_rank"]) == (2, 3)
    assert not np.array_equal(np.load(npy), arrays[2])
    # the saved config's dataset and training split, with each fit's components and rank
    assert fitted == [("digits", "train", 1, 0), ("digits", "train", 2, 3)]
    assert arrays[2].shape == arrays[0].shape and not np.array_equal(arrays[2], arrays[0])
    assert cli.main(base + ["--gaussian-steps", "3"]) == 2
    assert "gaussian_steps=3 must be below steps=3" in _error_line(capsys)
    assert cli.main(base + ["--gaussian-steps", "1", "--gaussian-components", "4"]) == 2
    assert "--gaussian-rank 0 with --gaussian-components 4" in _error_line(capsys)
    assert cli.main(base + ["--gaussian-components", "4", "--gaussian-rank", "2"]) == 2
    assert "give --gaussian-steps K >= 1 too" in _error_line(capsys)
