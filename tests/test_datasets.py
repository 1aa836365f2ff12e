"""jvdm.datasets: the original archive formats parsed without TensorFlow, their failures, atomic
prepares, offline downloads and image folders. Every archive is written by the test
(tests/synthetic_archives.py) in the published layout; no network is used."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import synthetic_archives as sa
from jvdm import cli, data, datasets
from jvdm.errors import JvdmUserError

ENV = {**os.environ, "PYTHONPATH": os.path.dirname(__file__)}


def _pairs(images, labels) -> list[tuple[str, int]]:
    """The multiset of (image hash, label) pairs: what a dataset holds, in any order."""
    labels = [-1] * len(images) if labels is None else labels
    return sorted(
        (hashlib.sha1(np.ascontiguousarray(x).tobytes()).hexdigest(), int(y))
        for x, y in zip(images, labels, strict=True)
    )


def _read_back(name, split, data_dir):
    batch = data.make_eval_loader(
        name,
        split=split,
        batch_size=len(datasets.open_split(name, split, data_dir)),
        data_dir=data_dir,
        num_threads=0,
    ).batch(0)
    return batch["image"], batch["label"]


def _assert_holds(name, data_dir, content):
    _, counts = datasets.dataset_info(name, data_dir)
    assert counts == {split: len(images) for split, (images, _) in content.items()}
    for split, (images, labels) in content.items():
        got_images, got_labels = _read_back(name, split, data_dir)
        assert got_images.dtype == np.uint8 and got_images.shape[1:] == datasets.image_shape(name)
        assert _pairs(got_images, got_labels) == _pairs(images, labels), split


def _write(name: str, folder: Path):
    if name == "mnist":
        return sa.write_mnist(folder)
    if name == "cifar10":
        folder.mkdir(parents=True)
        return sa.write_cifar10(folder / "cifar-10-binary.tar.gz")
    size = int(name[8:10])
    if name.endswith("_npz"):
        return sa.write_imagenet_npz(folder, size)
    return sa.write_imagenet_png(folder, size)


ALL = ["mnist", "cifar10", "imagenet32", "imagenet64", "imagenet32_npz", "imagenet64_npz"]


@pytest.mark.parametrize("name", ALL)
def test_original_layout_is_read_back_exactly(tmp_path, name, capsys):
    content = _write(name, tmp_path / "src")
    start = time.perf_counter()
    datasets.prepare(name, tmp_path / "dd", source=tmp_path / "src", skip_checksum=True)
    elapsed = time.perf_counter() - start
    assert "unverified (--skip-checksum)" in capsys.readouterr().err
    with capsys.disabled():  # the preparation time, in the test log
        print(f"\n{name}: prepared in {elapsed:.2f} s")
    _assert_holds(name, tmp_path / "dd", content)
    assert (name, True, datasets.image_shape(name)) in datasets.list_datasets(tmp_path / "dd")


def test_unpacked_folders_are_read_too(tmp_path):
    import tarfile

    content = sa.write_cifar10(tmp_path / "cifar-10-binary.tar.gz")
    with tarfile.open(tmp_path / "cifar-10-binary.tar.gz") as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
    (tmp_path / "cifar-10-binary.tar.gz").unlink()
    with pytest.raises(datasets.ArchiveError, match="cannot be checked.*--skip-checksum"):
        datasets.prepare("cifar10", tmp_path / "dd", source=tmp_path / "unpacked")
    datasets.prepare("cifar10", tmp_path / "dd", source=tmp_path / "unpacked", skip_checksum=True)
    _assert_holds("cifar10", tmp_path / "dd", content)


def test_prepare_and_read_never_import_tensorflow(tmp_path):
    for name in ALL:
        _write(name, tmp_path / name)
    from PIL import Image

    (tmp_path / "imgs").mkdir()
    for i in range(4):
        Image.new("RGB", (40 + i, 33)).save(tmp_path / "imgs" / f"{i}.png")
    script = textwrap.dedent(
        f"""
        import sys
        from jvdm import data, datasets
        for name in {ALL!r}:
            datasets.prepare(name, {str(tmp_path)!r} + "/dd", source={str(tmp_path)!r} + "/" + name,
                             skip_checksum=True)
            split = "test" if name in ("mnist", "cifar10") else "validation"
            loader = data.make_eval_loader(name, split=split, batch_size=4,
                                           data_dir={str(tmp_path)!r} + "/dd")
            assert next(iter(loader))["image"].dtype.name == "uint8"
        datasets.prepare_images("mine", {str(tmp_path)!r} + "/imgs", {str(tmp_path)!r} + "/dd")
        assert len(data.load_split_array("mine", "train", {str(tmp_path)!r} + "/dd")) == 3
        assert "tensorflow" not in sys.modules, "tensorflow was imported"
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=ENV, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def _assert_nothing_prepared(name, data_dir):
    assert (name, False, datasets.image_shape(name)) in datasets.list_datasets(data_dir)
    with pytest.raises(datasets.DatasetNotPreparedError):
        datasets.open_split(name, "train", data_dir)
    assert not list((data_dir / name).glob("*/*.array_record-*"))


def test_checksum_mismatch_is_refused(tmp_path, capsys):
    sa.write_cifar10(tmp_path / "cifar-10-binary.tar.gz")
    dd = tmp_path / "dd"
    argv = ["data", "prepare", "cifar10", "--from", str(tmp_path), "--data-dir", str(dd)]
    assert cli.main(argv) == 2
    line = capsys.readouterr().err.strip()
    assert line.count("\n") == 0 and "cifar-10-binary.tar.gz" in line
    assert "170052171" in line and "--skip-checksum" in line
    _assert_nothing_prepared("cifar10", dd)


def test_truncated_archives_are_one_line_errors(tmp_path):
    for name, path in (
        ("cifar10", tmp_path / "c" / "cifar-10-binary.tar.gz"),
        ("mnist", tmp_path / "m" / "train-images-idx3-ubyte.gz"),
        ("imagenet32_npz", tmp_path / "n" / "Imagenet32_train_npz.zip"),
        ("imagenet32", tmp_path / "p" / "train_32x32.tar"),
    ):
        _write(name, path.parent)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        with pytest.raises(datasets.ArchiveError, match=str(path.name)) as err:
            datasets.prepare(name, tmp_path / "dd", source=path.parent, skip_checksum=True)
        assert isinstance(err.value, JvdmUserError) and "\n" not in str(err.value)
        _assert_nothing_prepared(name, tmp_path / "dd")


def test_missing_members_are_named(tmp_path):
    sa.write_cifar10(tmp_path / "cifar-10-binary.tar.gz", skip=("data_batch_3.bin",))
    with pytest.raises(datasets.ArchiveError, match="lacks data_batch_3.bin"):
        datasets.prepare("cifar10", tmp_path / "dd", source=tmp_path, skip_checksum=True)
    sa.write_imagenet_npz(tmp_path / "npz", 32, skip=(4,))
    with pytest.raises(datasets.ArchiveError, match=r"missing \[4\]"):
        datasets.prepare(
            "imagenet32_npz", tmp_path / "dd", source=tmp_path / "npz", skip_checksum=True
        )
    sa.write_mnist(tmp_path / "m")
    (tmp_path / "m" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(datasets.ArchiveError, match="t10k-labels-idx1-ubyte.gz"):
        datasets.prepare("mnist", tmp_path / "dd", source=tmp_path / "m", skip_checksum=True)
    for name in ("cifar10", "imagenet32_npz", "mnist"):
        _assert_nothing_prepared(name, tmp_path / "dd")


def test_a_killed_prepare_leaves_nothing_and_a_rerun_completes(tmp_path):
    content = sa.write_cifar10(tmp_path / "cifar-10-binary.tar.gz")
    dd, marker = tmp_path / "dd", tmp_path / "half_way"
    # The child writes half the train split, says so, and waits to be killed.
    script = textwrap.dedent(
        f"""
        import pathlib, time
        from jvdm import datasets
        from jvdm.datasets import formats
        parse = formats.parse
        def slow_parse(*args, **kwargs):
            splits = parse(*args, **kwargs)
            inner = splits["train"]
            def train():
                for i, example in enumerate(inner()):
                    if i == 15:
                        pathlib.Path({str(marker)!r}).touch()
                        time.sleep(120)
                    yield example
            return {{**splits, "train": train}}
        formats.parse = slow_parse
        datasets.prepare("cifar10", {str(dd)!r}, source={str(tmp_path)!r}, skip_checksum=True)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], env=ENV, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "child ended early"
            time.sleep(0.1)
        assert any((dd / ".jvdm-staging").rglob("*")), "nothing was being written"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    _assert_nothing_prepared("cifar10", dd)
    datasets.prepare("cifar10", dd, source=tmp_path, skip_checksum=True)
    _assert_holds("cifar10", dd, content)
    assert not any((dd / ".jvdm-staging").rglob("*"))  # The leftovers are gone.


def test_offline_download_fails_fast_naming_from(tmp_path, monkeypatch, capsys):
    with socket.socket() as s:  # A port that nothing listens on: the connection is refused.
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("JVDM_DATA_MIRROR", f"http://127.0.0.1:{port}/mnist")
    start = time.perf_counter()
    assert cli.main(["data", "prepare", "mnist", "--data-dir", str(tmp_path)]) == 2
    elapsed = time.perf_counter() - start
    line = capsys.readouterr().err.strip()
    assert elapsed < 10.0, elapsed
    assert f"127.0.0.1:{port}/mnist/train-images-idx3-ubyte.gz" in line and "--from DIR" in line
    assert "storage.googleapis.com/cvdf-datasets/mnist/train-images-idx3-ubyte.gz" in line
    assert "\n" not in line
    assert not list(tmp_path.rglob("*.part"))
    _assert_nothing_prepared("mnist", tmp_path)
    # ImageNet's files need a login: no attempt at all, the same hint.
    monkeypatch.delenv("JVDM_DATA_MIRROR")
    with pytest.raises(datasets.DatasetError, match="image-net.org.*--from DIR"):
        datasets.prepare("imagenet64", tmp_path)


def test_unknown_names_and_sources_are_user_errors(tmp_path):
    with pytest.raises(JvdmUserError, match="known datasets: mnist_subset"):
        datasets.prepare("imagenet_full", tmp_path)
    with pytest.raises(JvdmUserError, match="no such file"):
        datasets.prepare("cifar10", tmp_path, source=tmp_path / "nope")
    with pytest.raises(JvdmUserError, match="needs 4 files"):
        (tmp_path / "x.gz").write_bytes(b"")
        datasets.prepare("mnist", tmp_path, source=tmp_path / "x.gz")


def _block_mean(image: np.ndarray, size: int) -> np.ndarray:
    """Independent route: the centred square, then block means over k pixels along rows, rounded
    half up to 8 bits, then along columns, rounded again (Pillow's BOX resize makes the two
    passes in this order for whole factors k)."""
    h, w, c = image.shape
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    square = image[top : top + s, left : left + s].astype(np.float64)
    k = s // size
    rows = np.floor(square.reshape(s, size, k, c).mean(axis=2) + 0.5)
    return np.floor(rows.reshape(size, k, size, c).mean(axis=1) + 0.5).astype(np.uint8)


def test_image_folder_becomes_a_dataset(tmp_path, capsys):
    from PIL import Image

    rng = np.random.default_rng(1)
    root, size = tmp_path / "photos", 8
    # Odd sizes whose centred squares are whole multiples of 8, so the BOX resize is a block mean.
    shapes = [(24, 40), (56, 16), (8, 8), (32, 32), (40, 24), (16, 72)]
    expected = []
    for i, (h, w) in enumerate(shapes * 2):
        label, sub = ("cats", "") if i % 2 else ("dogs", "puppies/deep/")
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        path = root / label / sub / f"img{i}.{'png' if i % 3 else 'jpg'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".png":
            Image.fromarray(image).save(path)
            expected.append((_block_mean(image, size), ["cats", "dogs"].index(label)))
        else:  # JPEG is lossy: compare against what Pillow decodes.
            Image.fromarray(image).save(path, quality=95)
            decoded = np.asarray(Image.open(path).convert("RGB"))
            expected.append((_block_mean(decoded, size), ["cats", "dogs"].index(label)))
    good = root / "cats" / "img1.png"
    (root / "cats" / "broken.png").write_bytes(good.read_bytes()[:60])  # a corrupt PNG
    (root / "dogs" / "notes.txt").write_text("not an image")
    (root / "stray.png").write_bytes(good.read_bytes())  # outside the class folders
    dd = tmp_path / "dd"
    argv = ["data", "prepare", "pets", "--images", str(root), "--size", "8", "--data-dir", str(dd)]
    assert cli.main([*argv, "--test-fraction", "0.25"]) == 0
    assert "'not_decodable': 2, 'outside_class_folders': 1" in capsys.readouterr().err
    assert datasets.image_shape("pets", dd) == (8, 8, 3)
    assert ("pets", True, (8, 8, 3)) in datasets.list_datasets(dd)
    _, counts = datasets.dataset_info("pets", dd)
    got = [_read_back("pets", split, dd) for split in ("train", "test")]
    images = np.concatenate([g[0] for g in got])
    labels = np.concatenate([g[1] for g in got])
    assert sum(counts.values()) == 12
    assert _pairs(images, labels) == _pairs([e[0] for e in expected], [e[1] for e in expected])
    assert cli.main(["data", "list", "--data-dir", str(dd)]) == 0
    listing = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert "pets" in listing and "2 classes" in listing["pets"]
    assert "the one the VDM paper reports" in listing["imagenet32"]
    assert "NOT the one of the VDM paper" in listing["imagenet32_npz"]
    # Grayscale, and errors that are one line.
    datasets.prepare_images("pets_grey", root, dd, size=4, grayscale=True)
    assert data.load_split_array("pets_grey", "train", dd).shape[1:] == (4, 4, 1)
    for bad in (["--size", "8"], ["--test-fraction", "1.5"]):
        assert cli.main(["data", "prepare", "cifar10", "--images", str(root), *bad]) == 2
    assert cli.main(["data", "prepare", "Bad-Name", "--images", str(root)]) == 2


def test_download_from_a_local_mirror_is_verified(tmp_path, monkeypatch, capsys):
    """The download path end to end against an HTTP server on 127.0.0.1 serving synthetic files:
    they differ from the published ones, so they are refused (and deleted), or with
    --skip-checksum used, and then read back."""
    import functools
    import http.server
    import threading

    content = sa.write_mnist(tmp_path / "served")
    handler = functools.partial(
        http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "served")
    )
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("JVDM_DATA_MIRROR", f"http://127.0.0.1:{server.server_port}")
        dd = tmp_path / "dd"
        with pytest.raises(datasets.ArchiveError, match="9912422.*--skip-checksum"):
            datasets.prepare("mnist", dd)
        assert not list((dd / "downloads").iterdir())  # the bad download is not kept
        datasets.prepare("mnist", dd, skip_checksum=True)
    finally:
        server.shutdown()
        thread.join()
    served = sorted(p.name for p in (tmp_path / "served").iterdir())
    assert sorted(p.name for p in (dd / "downloads").iterdir()) == served
    _assert_holds("mnist", dd, content)


def test_sha256_check_against_an_independent_digest(tmp_path):
    from jvdm.datasets import catalog, download

    path = tmp_path / "f.bin"
    path.write_bytes(np.random.default_rng(0).bytes(3 << 20))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    good = catalog.RemoteFile("f.bin", "http://x/f.bin", 3 << 20, digest, "f")
    assert download.mismatch(path, good) is None
    bad_sha = catalog.RemoteFile("f.bin", "http://x/f.bin", 3 << 20, "0" * 64, "f")
    assert f"has sha256 {digest}" in download.mismatch(path, bad_sha)
    bad_size = catalog.RemoteFile("f.bin", "http://x/f.bin", 5, digest, "f")
    assert "has 3145728 bytes" in download.mismatch(path, bad_size)


def test_catalog_checksums_are_the_ones_tfds_publishes():
    """Every size and sha256 in the catalogue equals the checksum files of the installed
    tensorflow-datasets (read here as text, independently of the catalogue)."""
    import importlib.util

    from jvdm.datasets import catalog

    root = Path(importlib.util.find_spec("tensorflow_datasets").submodule_search_locations[0])
    published = {}
    for path in [
        root / "url_checksums" / "mnist.txt",
        root / "url_checksums" / "cifar10.txt",
        root / "datasets" / "downsampled_imagenet" / "checksums.tsv",
        root / "datasets" / "imagenet_resized" / "checksums.tsv",
    ]:
        for line in path.read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                url, size, sha256 = line.split("\t")[:3]
                published[url.rsplit("/", 1)[-1]] = (int(size), sha256)
    files = [f for spec in catalog.STANDARD.values() for f in spec.all_files()]
    assert len(files) == 4 + 1 + 4 + 5
    for f in files:
        assert published[f.name] == (f.size, f.sha256), f.name


def test_grey_and_palette_pngs_become_rgb_and_other_shapes_are_refused():
    import io

    from PIL import Image

    from jvdm.datasets import formats

    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (32, 32), dtype=np.uint8)
    palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
    pal_image = Image.frombytes("P", (32, 32), grey.tobytes())
    pal_image.putpalette(palette.tobytes())
    for im, expected in (
        (Image.fromarray(grey), np.repeat(grey[..., None], 3, axis=2)),
        (pal_image, palette[grey]),
    ):
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        image = formats._decode_png(buf.getvalue(), "x.png", Path("t.tar"), (32, 32, 3), "")
        np.testing.assert_array_equal(image, expected)
    buf = io.BytesIO()
    Image.fromarray(grey[:16]).save(buf, format="PNG")
    with pytest.raises(datasets.ArchiveError, match=r"x.png in t.tar is uint8 \(16, 32, 3\)"):
        formats._decode_png(buf.getvalue(), "x.png", Path("t.tar"), (32, 32, 3), "")
