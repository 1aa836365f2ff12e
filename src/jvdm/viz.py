"""Pictures: image grids (PNG via Pillow), the noise schedule, and training curves (matplotlib):
the bound, and the variance of its diffusion term's estimate.

Every file is written atomically (a temporary file in the same directory, then ``os.replace``),
so a reader -- TensorBoard, a browser, a concurrent run -- never sees half a PNG.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pathlib
import tempfile
from collections.abc import Callable, Iterator

import numpy as np

__all__ = ["image_grid", "plot_gamma", "plot_loss_variance", "plot_metrics", "save_image_grid"]


@contextlib.contextmanager
def _atomic_path(path: str | os.PathLike, suffix: str = ".png") -> Iterator[str]:
    """Yields a temporary path next to ``path``; on success it replaces ``path`` atomically."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def image_grid(images: np.ndarray, *, ncols: int | None = None, pad: int = 2) -> np.ndarray:
    """Tiles uint8 ``[n, H, W, C]`` (C = 1 or 3) into one ``[rows*(H+pad)+pad, ..., C]`` image.

    The grid is as square as possible unless ``ncols`` is given; the padding is mid-grey.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.shape[0] < 1:
        raise ValueError(f"images have shape {images.shape}; expected [n, H, W, C] with C 1 or 3")
    if images.dtype != np.uint8:
        raise ValueError(f"images have dtype {images.dtype}; expected uint8")
    n, h, w, c = images.shape
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 128, np.uint8)
    for i in range(n):
        r, k = divmod(i, ncols)
        top, left = pad + r * (h + pad), pad + k * (w + pad)
        grid[top : top + h, left : left + w] = images[i]
    return grid


def save_image_grid(
    images: np.ndarray, path: str | os.PathLike, *, ncols: int | None = None, pad: int = 2
) -> pathlib.Path:
    """Saves uint8 ``[n, H, W, C]`` images as one padded PNG grid (grayscale or RGB).

    Returns:
      The path written.
    """
    from PIL import Image

    grid = image_grid(images, ncols=ncols, pad=pad)
    picture = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    with _atomic_path(path) as tmp:
        picture.save(tmp, format="PNG")
    return pathlib.Path(path)


def _figure():
    import matplotlib

    matplotlib.use("Agg", force=False)  # no display needed; a no-op if a backend is already set
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig, path) -> pathlib.Path:
    plt = _figure()
    try:
        with _atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    finally:
        plt.close(fig)
    return pathlib.Path(path)


def plot_gamma(params, path: str | os.PathLike, *, num_points: int = 201) -> pathlib.Path:
    """Plots the schedule ``gamma(t)`` and ``log10 SNR(t) = -gamma / ln 10`` on ``t`` in [0, 1]."""
    import jax.numpy as jnp

    from jvdm import model as model_lib

    t = np.linspace(0.0, 1.0, num_points, dtype=np.float32)
    g = np.asarray(model_lib.gamma(params, jnp.asarray(t)), np.float64)
    plt = _figure()
    fig, (ax_g, ax_s) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax_g.plot(t, g)
    ax_g.set(xlabel="t", ylabel="gamma(t) = -log SNR", title="noise schedule")
    ax_g.annotate(f"gamma(0) = {g[0]:.2f}", (0.0, g[0]), textcoords="offset points", xytext=(5, 5))
    ax_g.annotate(
        f"gamma(1) = {g[-1]:.2f}", (1.0, g[-1]), textcoords="offset points", xytext=(-80, -12)
    )
    ax_s.plot(t, -g / math.log(10.0))
    ax_s.set(xlabel="t", ylabel="log10 SNR(t)", title="signal-to-noise ratio")
    for ax in (ax_g, ax_s):
        ax.grid(alpha=0.3)
    return _save_figure(fig, path)


def _read_series(path, keep: Callable[[str], bool]) -> dict[str, tuple[list[float], list[float]]]:
    """``{series: (steps, values)}`` of the finite numeric fields ``keep`` selects in a metrics
    JSONL file."""
    series: dict[str, tuple[list[float], list[float]]] = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                # A run killed mid-write leaves a partial last line; skip it, keep the rest.
                continue
            if not isinstance(record, dict) or "step" not in record:
                continue
            for k, v in record.items():
                if keep(k) and isinstance(v, int | float) and math.isfinite(v):
                    steps, values = series.setdefault(k, ([], []))
                    steps.append(float(record["step"]))
                    values.append(float(v))
    return series


def _is_total_bpd(k: str) -> bool:
    """The total bound only (train and eval), not its terms."""
    total = k in ("bpd", "bpd_mean") or k.endswith(("/bpd", "_bpd", "/bpd_mean"))
    is_term = any(t in k for t in ("recon", "prior", "diffusion", "sem", "var"))
    return total and not is_term


def _read_metrics(path) -> dict[str, tuple[list[float], list[float]]]:
    """``{series: (steps, values)}`` of the total-bpd series of a metrics JSONL file."""
    return _read_series(path, _is_total_bpd)


def plot_metrics(metrics_path: str | os.PathLike, path: str | os.PathLike) -> pathlib.Path:
    """Plots every total-bpd series (train and eval) of a metrics JSONL file against the step.

    A record is a JSON object with a ``step`` and numeric fields; series are the fields named
    ``bpd``, ``bpd_mean`` or ending in ``/bpd``, ``_bpd`` (e.g. ``train/bpd``, ``eval/bpd_mean``),
    excluding the per-term ones (recon, prior, diffusion).

    A file without bpd values (a run that has not logged yet) gives an empty, labelled plot.

    Raises:
      FileNotFoundError: no such metrics file.
    """
    series = _read_metrics(metrics_path)
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (steps, values) in sorted(series.items()):
        style = "o-" if "eval" in name or "test" in name else "-"
        ax.plot(steps, values, style, label=name, markersize=3)
    ax.set(xlabel="step", ylabel="bits per dim", title="variational bound")
    ax.grid(alpha=0.3)
    if series:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no bpd values logged yet", ha="center", transform=ax.transAxes)
    return _save_figure(fig, path)


def plot_loss_variance(metrics_path: str | os.PathLike, path: str | os.PathLike) -> pathlib.Path:
    """Plots the logged ``variance/<density>`` series of a metrics JSONL file against the step, one
    line per density of the noise level, on a log axis (:mod:`jvdm.loss_variance`); a run trained
    on a weighting also logs ``objective_variance/<density>``, drawn dashed beside the ELBO's.

    Non-positive values (an estimate's noise around a variance near zero) are left out of the log
    axis. A file without them gives an empty, labelled plot.

    Raises:
      FileNotFoundError: no such metrics file.
    """
    prefixes = ("variance/", "objective_variance/")
    keep = lambda k: k.startswith(prefixes) and not k.endswith("/diffusion_bpd")
    series = _read_series(metrics_path, keep)
    weighted = any(name.startswith("objective_") for name in series)
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (steps, values) in sorted(series.items()):
        points = [(s, v) for s, v in zip(steps, values, strict=True) if v > 0]
        if not points:
            continue
        objective, density = name.startswith("objective_"), name.split("/", 1)[1]
        bound = density == "optimal"
        label = density + (" (lower bound)" if bound else "")
        if weighted:
            label = ("weighted objective: " if objective else "ELBO: ") + label
        style = ("o--" if objective else "o-") if not bound else ("x:" if objective else "o:")
        ax.plot(*zip(*points, strict=True), style, label=label, markersize=3)
    ax.set(xlabel="step", ylabel="per-example variance (bpd$^2$)", yscale="log")
    ax.set_title("variance of the one-sample diffusion-loss estimate")
    ax.grid(alpha=0.3, which="both")
    if series:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no variance measured yet", ha="center", transform=ax.transAxes)
    return _save_figure(fig, path)
