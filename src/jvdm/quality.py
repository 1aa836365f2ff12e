r"""Sample quality measured offline, in the features of a classifier trained on the dataset.

:func:`sample_quality` embeds ``N`` samples, ``N`` real *training* images and the *test* split in
the penultimate features of the dataset's own classifier (:mod:`jvdm.quality_classifier`) and
reports, for the samples and for the real images side by side (the real images give the floor a
perfect sampler would reach at that ``N``; every metric here is biased at finite ``N``):

* ``fd`` -- the Fréchet distance between Gaussians fitted to the two feature sets,
  ``||mu_1 - mu_2||^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2})`` (Heusel et al. 2017, eq. 6, here in
  the classifier's features rather than Inception's), and ``fd_se``, its standard error over sets
  of ``N`` samples: the standard deviation of the FD of bootstrap resamples of the scored set
  (:func:`frechet_distance_se`; against the spread of independent sets in
  ``tests/test_quality.py``). At ``N = 256`` two sample sets of one model can differ by 10 or more;
  compare FDs with their errors;
* ``kid`` -- the unbiased estimate of the squared MMD with the polynomial kernel
  ``k(a, b) = (a.b / d + 1)^3`` (Binkowski et al. 2018, *Demystifying MMD GANs*, sec. 4);
* ``precision``, ``recall`` -- Kynkäänniemi et al. 2019 (*Improved Precision and Recall Metric*,
  eqs. 1-3): the share of samples inside the union of the real images' k-NN balls (k = 3), and
  the share of real images inside the samples' ones;
* ``confidence`` -- the classifier's mean top-class probability on the samples, and
  ``confidence_se``, its standard error over images;
* ``label_entropy`` -- the entropy (nats) of the distribution of predicted labels; ``log K`` for
  a sampler that covers the ``K`` classes evenly;
* ``nn_distance`` -- in pixels, not features: the median L2 distance (pixels scaled to [0, 1])
  from each image to its nearest *training* image, and ``memorised``, the share of images whose
  nearest training image is under a third as far as the second nearest (Gu et al. 2023, *On
  Memorization in Diffusion Models*, after Yoon et al. 2023): a sampler that copies training
  images scores 1 there. For the real column these two are of ``N`` *test* images (a training
  image's nearest training image is itself), the held-out floor a generalising sampler matches.

No Inception network: its weights cannot be fetched or verified offline, so these numbers compare
samplers and models of one dataset with each other, not with published FIDs.
"""

from __future__ import annotations

import math

import numpy as np

from jvdm.errors import JvdmUserError
from jvdm.quality_classifier import Recipe, get_classifier

__all__ = [
    "METRICS",
    "frechet_distance",
    "frechet_distance_se",
    "kernel_distance",
    "nearest_training_distances",
    "precision_recall",
    "sample_quality",
]

METRICS = (
    "fd",
    "fd_se",
    "kid",
    "precision",
    "recall",
    "confidence",
    "confidence_se",
    "label_entropy",
    "nn_distance",
    "memorised",
)
NEAREST_K = 3  # Kynkäänniemi et al. use k = 3
MEMORISED_RATIO = 1.0 / 3.0  # Gu et al. 2023: nearest under a third of the second nearest
_NN_CANDIDATES = 8  # float32 shortlist per image, re-measured exactly in float64
FD_RESAMPLES = 200  # bootstrap resamples for fd_se: its own relative noise is about 5%


def _as_features(a) -> np.ndarray:
    a = np.asarray(a, np.float64)
    if a.ndim != 2 or len(a) < 2:
        raise JvdmUserError(f"features have shape {a.shape}; expected [N >= 2, D]")
    return a


def frechet_distance(a, b) -> float:
    """Fréchet distance between Gaussians fitted to features ``a [N, D]`` and ``b [M, D]``.

    ``tr (S_a S_b)^{1/2}`` is computed as the sum of square roots of the eigenvalues of the
    symmetric ``S_b^{1/2} S_a S_b^{1/2}`` (the same spectrum), which stays real and stable where
    a general matrix square root (scipy's ``sqrtm``) returns complex round-off.
    """
    a, b = _as_features(a), _as_features(b)
    return _FrechetReference(b)(a)


class _FrechetReference:
    """The FD to one fixed feature set ``b``, whose statistics and ``S_b^{1/2}`` are computed
    once (``S_b^{1/2} S_a S_b^{1/2}`` has the spectrum of ``S_a^{1/2} S_b S_a^{1/2}``)."""

    def __init__(self, b: np.ndarray):
        self.mu = b.mean(0)
        s_b = np.cov(b, rowvar=False)
        w, v = np.linalg.eigh(s_b)
        self.root = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
        self.trace = np.trace(s_b)

    def __call__(self, a: np.ndarray) -> float:
        mu = a.mean(0) - self.mu
        s_a = np.cov(a, rowvar=False)
        middle = np.linalg.eigvalsh(self.root @ s_a @ self.root)
        tr_root = np.sum(np.sqrt(np.clip(middle, 0.0, None)))
        return float(mu @ mu + np.trace(s_a) + self.trace - 2.0 * tr_root)


def frechet_distance_se(a, b, *, resamples: int = FD_RESAMPLES, seed: int = 0) -> float:
    """The standard error of :func:`frechet_distance` ``(a, b)`` over sets of ``len(a)`` images.

    The standard deviation of the FD of ``resamples`` bootstrap resamples of the rows of ``a``
    (``b``, the reference, is held fixed, as it is in every comparison against it). On Gaussian
    features it matches the spread of the FD over independent sets of ``len(a)`` to a few percent
    (``tests/test_quality.py``).
    """
    a, b = _as_features(a), _as_features(b)
    fd = _FrechetReference(b)
    rng = np.random.default_rng(seed)
    n = len(a)
    values = [fd(a[rng.integers(0, n, n)]) for _ in range(resamples)]
    return float(np.std(values, ddof=1))


def kernel_distance(a, b) -> float:
    """Unbiased squared MMD with the cubic polynomial kernel (KID; Binkowski et al. 2018)."""
    a, b = _as_features(a), _as_features(b)
    d = a.shape[1]
    k = lambda x, y: (x @ y.T / d + 1.0) ** 3
    k_aa, k_bb, k_ab = k(a, a), k(b, b), k(a, b)
    n, m = len(a), len(b)
    # The unbiased estimator leaves out the diagonal k(x_i, x_i) of each within-set sum.
    within_a = (k_aa.sum() - np.trace(k_aa)) / (n * (n - 1))
    within_b = (k_bb.sum() - np.trace(k_bb)) / (m * (m - 1))
    return float(within_a + within_b - 2.0 * k_ab.mean())


def _pairwise(x, y) -> np.ndarray:
    sq = np.sum(x * x, 1)[:, None] + np.sum(y * y, 1)[None, :] - 2.0 * x @ y.T
    return np.sqrt(np.clip(sq, 0.0, None))


def _coverage(centres, queries, k: int) -> float:
    """Share of ``queries`` inside some ball around ``centres`` of radius its k-th neighbour."""
    radii = np.sort(_pairwise(centres, centres), axis=1)[:, k]  # column 0 is the centre itself
    return float(np.mean(np.any(_pairwise(queries, centres) <= radii[None, :], axis=1)))


def precision_recall(real, fake, *, k: int = NEAREST_K) -> tuple[float, float]:
    """``(precision, recall)`` of ``fake`` features against ``real`` (Kynkäänniemi et al. 2019)."""
    real, fake = _as_features(real), _as_features(fake)
    if min(len(real), len(fake)) <= k:
        raise JvdmUserError(f"precision/recall with k={k} needs more than {k} images per set")
    return _coverage(real, fake, k), _coverage(fake, real, k)


def nearest_training_distances(images, train, *, scale: float = 1.0, chunk: int = 256):
    """``[N, 2]``: each image's L2 distance to its nearest and second-nearest rows of ``train``.

    ``images [N, ...]`` and ``train [M, ...]`` (``M >= 2``) are compared flattened, both multiplied
    by ``scale`` (:func:`sample_quality` passes uint8 pixels and ``1 / 255``). A float32 product
    shortlists each image's closest ``8`` rows, whose distances are then computed exactly in
    float64, so a near-copy (where ``|x|^2 + |y|^2 - 2 x.y`` cancels) is measured as closely as a
    far image. ``train`` is held once in float32 (CIFAR-10's 50,000 images: 0.6 GB).
    """
    return _NearestTraining(train, scale).distances(images, chunk)


class _NearestTraining:
    """:func:`nearest_training_distances` to one fixed training set, whose float32 copy and
    squared norms are made once for every set of images measured against it."""

    def __init__(self, train, scale: float = 1.0):
        self.train = np.asarray(train).reshape(len(train), -1)
        if len(self.train) < 2:
            raise JvdmUserError(
                f"nearest_training_distances: {len(self.train)} training images; need at least 2"
            )
        self.scale = scale
        self.t32 = self.train.astype(np.float32)
        self.t_sq = np.sum(self.t32 * self.t32, axis=1)

    def distances(self, images, chunk: int = 256) -> np.ndarray:
        x = np.asarray(images).reshape(len(images), -1)
        if x.shape[1] != self.train.shape[1] or len(x) < 1:
            raise JvdmUserError(
                f"nearest_training_distances: images {x.shape} and training images "
                f"{self.train.shape} must have the same size"
            )
        keep = min(_NN_CANDIDATES, len(self.train))
        out = np.empty((len(x), 2))
        for start in range(0, len(x), chunk):
            q = x[start : start + chunk].astype(np.float64)
            approx = self.t_sq[None, :] - 2.0 * (q.astype(np.float32) @ self.t32.T)  # less |q|^2
            near = np.argpartition(approx, keep - 1, axis=1)[:, :keep]
            diff = q[:, None, :] - self.train[near].astype(np.float64)
            exact = self.scale * np.sqrt(np.sum(diff * diff, axis=-1))
            out[start : start + len(q)] = np.sort(exact, axis=1)[:, :2]
        return out

    def scores(self, images) -> dict[str, float]:
        """``nn_distance`` (the median nearest distance) and ``memorised`` of ``images``."""
        d = self.distances(images)
        return {
            "nn_distance": float(np.median(d[:, 0])),
            "memorised": float(np.mean(d[:, 0] < MEMORISED_RATIO * d[:, 1])),
        }


def _pixel_copies(train) -> _NearestTraining:
    """Distances between uint8 images on pixels scaled to [0, 1]."""
    return _NearestTraining(train, 1.0 / 255.0)


def _metrics(logits, feats, ref_feats, num_classes: int) -> dict[str, float]:
    z = logits - logits.max(1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    counts = np.bincount(np.argmax(logits, 1), minlength=num_classes) / len(logits)
    nz = counts[counts > 0]
    precision, recall = precision_recall(ref_feats, feats)
    top = probs.max(1)
    return {
        "fd": frechet_distance(feats, ref_feats),
        "fd_se": frechet_distance_se(feats, ref_feats),
        "kid": kernel_distance(feats, ref_feats),
        "precision": precision,
        "recall": recall,
        "confidence": float(top.mean()),
        "confidence_se": float(top.std(ddof=1) / np.sqrt(len(top))),
        "label_entropy": float(-(nz * np.log(nz)).sum()),
    }


def sample_quality(
    samples: np.ndarray,
    *,
    dataset: str,
    data_dir=None,
    seed: int = 0,
    recipe: Recipe | None = None,
) -> dict:
    """Scores ``samples`` (uint8 ``[N, H, W, C]``) against the test split of ``dataset``.

    Args:
      samples: the images to score, N >= 4.
      dataset: a labelled dataset jvdm knows (``mnist_subset``, ``digits``, ``mnist``,
        ``cifar10``); its classifier is trained on first use and cached in the data directory.
      data_dir: the tfds data directory (default as :func:`jvdm.data.get_data_dir`).
      seed: which N real training images form the floor.
      recipe: the classifier's recipe (default ``Recipe(dataset)``).

    Returns:
      a dict with ``samples`` and ``real_train`` (each a dict of :data:`METRICS`; the latter's
      ``nn_distance`` and ``memorised`` are of ``N`` test images), ``n``, the
      classifier's ``classifier_test_accuracy``, its ``classifier_path``, and ``num_classes``.
    """
    from jvdm import data as data_lib

    samples = np.asarray(samples)
    shape = tuple(data_lib.image_shape(dataset))
    if samples.ndim != 4 or samples.shape[1:] != shape or samples.dtype != np.uint8:
        raise JvdmUserError(
            f"samples are {samples.dtype} {samples.shape}; expected uint8 [N, {shape}] for "
            f"dataset {dataset!r}"
        )
    clf = get_classifier(recipe or Recipe(dataset), data_dir)
    test = data_lib.load_split_array(dataset, "test", data_dir)
    train = data_lib.load_split_array(dataset, "train", data_dir)
    n = len(samples)
    if n > len(train):
        raise JvdmUserError(f"n={n} samples but only {len(train)} training images for the floor")
    real = train[np.random.default_rng(seed).choice(len(train), n, replace=False)]
    _, ref_feats = clf.apply(test)
    num_classes = clf.module.num_classes
    out = {"n": n, "num_test_images": len(test)}
    held_out = test[np.random.default_rng(seed).choice(len(test), min(n, len(test)), False)]
    copies = _pixel_copies(train)
    for name, images, copy_probe in (
        ("samples", samples, samples),
        ("real_train", real, held_out),
    ):
        logits, feats = clf.apply(images)
        out[name] = {
            **_metrics(logits, feats, ref_feats, num_classes),
            **copies.scores(copy_probe),
        }
    out.update(
        classifier_test_accuracy=clf.test_accuracy,
        classifier_path=clf.path,
        classifier_trained_now=clf.trained_now,
        num_classes=num_classes,
        max_label_entropy=math.log(num_classes),
    )
    return out


def format_table(result: dict) -> str:
    """The scores as a two-column text table (samples | real training images)."""
    rows = [f"{'':<14}{'samples':>12}{'real train':>12}   (N={result['n']})"]
    for k in METRICS:
        rows.append(f"{k:<14}{result['samples'][k]:>12.4g}{result['real_train'][k]:>12.4g}")
    rows.append(f"classifier test accuracy {result['classifier_test_accuracy']:.4f}")
    return "\n".join(rows)
