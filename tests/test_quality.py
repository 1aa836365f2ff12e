"""Sample-quality metrics against closed forms and Monte Carlo, and the cached classifier."""

import dataclasses
import json
import math

import numpy as np
import pytest

from jvdm import quality
from jvdm import quality_classifier as qc
from jvdm.errors import JvdmUserError


def test_fd_of_a_set_with_itself_is_zero():
    a = np.random.default_rng(0).standard_normal((500, 8)) @ np.diag(np.arange(1.0, 9.0))
    assert abs(quality.frechet_distance(a, a)) < 1e-8


def test_fd_matches_the_gaussian_closed_form_for_a_known_shift_and_scale():
    """For N(mu_1, S_1) and N(mu_2, S_2) with commuting diagonal covariances,
    FD = |mu_1 - mu_2|^2 + sum (sqrt(s_1) - sqrt(s_2))^2; large samples approach it."""
    rng = np.random.default_rng(1)
    d, n = 4, 200_000
    s1, s2 = np.array([1.0, 2.0, 0.5, 1.5]), np.array([1.0, 0.5, 0.5, 3.0])
    for shift in (0.0, 0.5, 2.0):
        a = rng.standard_normal((n, d)) * np.sqrt(s1)
        b = shift + rng.standard_normal((n, d)) * np.sqrt(s2)
        want = d * shift**2 + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
        # Sampling error of the estimate: the mean term's delta-method s.e. plus a covariance
        # term of order sqrt(d / n) (Monte Carlo, so 4 s.e.).
        se = math.sqrt(np.sum(4 * shift**2 * (s1 + s2) / n)) + 2 * math.sqrt(d / n)
        assert quality.frechet_distance(a, b) == pytest.approx(want, abs=4 * se)
    # and it grows with the shift, as the closed form says
    base = rng.standard_normal((5000, d))
    fds = [quality.frechet_distance(base, base + s) for s in (0.1, 0.2, 0.4)]
    np.testing.assert_allclose(fds, [d * s * s for s in (0.1, 0.2, 0.4)], rtol=1e-9)


def test_fd_standard_error_matches_the_spread_of_independent_sets():
    """fd_se, a bootstrap over the scored set, against brute force: the standard deviation of the
    FD over 300 independent sets of 128 from one Gaussian, scored against one fixed reference.
    Measured: 1.11 against 1.11 (the mean of 20 sets' fd_se); the bootstrap's own spread between
    sets is about 11%, the 300 sets' standard deviation has a relative error of about 4%."""
    rng = np.random.default_rng(0)
    d, n = 16, 128
    mix = np.eye(d) + 0.3 * rng.standard_normal((d, d))
    reference = rng.standard_normal((500, d))
    draw = lambda: 0.3 + rng.standard_normal((n, d)) @ mix
    spread = np.std([quality.frechet_distance(draw(), reference) for _ in range(300)], ddof=1)
    ses = [quality.frechet_distance_se(draw(), reference, seed=i) for i in range(20)]
    assert np.mean(ses) == pytest.approx(spread, rel=0.15)
    # A set with no spread of its own has no error from resampling it (but round-off).
    assert quality.frechet_distance_se(np.ones((n, d)), reference) < 1e-12


def test_kid_is_unbiased_zero_for_one_distribution():
    rng = np.random.default_rng(2)
    values = np.array(
        [
            quality.kernel_distance(rng.standard_normal((50, 6)), rng.standard_normal((60, 6)))
            for _ in range(300)
        ]
    )
    sem = values.std(ddof=1) / math.sqrt(len(values))
    assert abs(values.mean()) < 4 * sem
    shifted = quality.kernel_distance(
        rng.standard_normal((50, 6)), rng.standard_normal((60, 6)) + 1
    )
    assert shifted > values.mean() + 10 * values.std()


def test_kid_equals_a_brute_force_loop():
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((7, 3)), rng.standard_normal((5, 3))
    k = lambda x, y: (np.dot(x, y) / 3 + 1) ** 3
    aa = sum(k(a[i], a[j]) for i in range(7) for j in range(7) if i != j) / (7 * 6)
    bb = sum(k(b[i], b[j]) for i in range(5) for j in range(5) if i != j) / (5 * 4)
    ab = sum(k(x, y) for x in a for y in b) / 35
    assert quality.kernel_distance(a, b) == pytest.approx(aa + bb - 2 * ab, rel=1e-12)


def test_precision_and_recall_follow_a_known_overlap():
    """Real: two far-apart clusters. Fakes on one cluster only: precision as for a perfect
    sampler, recall halved. Fakes half on the real clusters, half far away: precision halved."""
    rng = np.random.default_rng(4)
    n, d = 1000, 2
    cluster = lambda c, m: c + rng.standard_normal((m, d))
    real = np.concatenate([cluster(0.0, n // 2), cluster(100.0, n // 2)])
    same = np.concatenate([cluster(0.0, n // 2), cluster(100.0, n // 2)])
    p_same, r_same = quality.precision_recall(real, same)
    p_one, r_one = quality.precision_recall(real, cluster(0.0, n))
    half_far = np.concatenate([cluster(0.0, n // 4), cluster(100.0, n // 4), cluster(-100, n // 2)])
    p_far, r_far = quality.precision_recall(real, half_far)
    assert p_same > 0.9 and r_same > 0.9
    assert p_one == pytest.approx(p_same, abs=0.04) and r_one == pytest.approx(r_same / 2, abs=0.04)
    assert p_far == pytest.approx(p_same / 2, abs=0.04)


def test_nearest_training_distances_match_a_brute_force_loop():
    """Nearest and second-nearest distances against every pair, exact copies and near-copies
    (1e-7 off, where the float32 shortlist's expansion cancels) included."""
    rng = np.random.default_rng(0)
    train = rng.uniform(0, 1, (300, 50))
    images = np.concatenate(
        [rng.uniform(0, 1, (20, 50)), train[:5], train[5:10] + 1e-7, 0.5 * (train[10:15] + 1)]
    )
    got = quality.nearest_training_distances(images, train, chunk=7)
    for i, x in enumerate(images):
        want = np.sort([np.sqrt(np.sum((x - y) ** 2)) for y in train])[:2]
        np.testing.assert_allclose(got[i], want, rtol=1e-12, atol=1e-15)
    assert np.all(got[20:25, 0] == 0.0)
    np.testing.assert_allclose(got[25:30, 0], 1e-7 * np.sqrt(50), rtol=1e-6)
    with pytest.raises(JvdmUserError, match="same size"):
        quality.nearest_training_distances(images[:, :10], train)
    # uint8 pixels with a scale, as sample_quality passes them, against scaled floats.
    pixels = (train * 255).astype(np.uint8)
    scaled = quality.nearest_training_distances(pixels[:9], pixels, scale=1 / 255)
    np.testing.assert_allclose(
        scaled, quality.nearest_training_distances(pixels[:9] / 255, pixels / 255), rtol=1e-12
    )
    assert np.all(scaled[:, 0] == 0.0) and np.all(scaled[:, 1] > 0.0)


def test_copies_of_training_images_count_as_memorised():
    """Gu et al.'s rule: a copy's nearest training image is 0 away, so it is memorised; a new
    image between two training images is not; one near a training image is, by the ratio."""
    rng = np.random.default_rng(1)
    train = rng.integers(0, 256, (200, 8, 8, 1)).astype(np.uint8)
    pixels = quality._pixel_copies(train)
    copies = pixels.scores(train[:50])
    assert copies == {"nn_distance": 0.0, "memorised": 1.0}
    between = (train[:50].astype(np.int32) + train[50:100]) // 2
    assert pixels.scores(between.astype(np.uint8))["memorised"] == 0.0
    # A training image moved by a share f of the distance d to its nearest other training image:
    # its nearest is itself, f d away, its second between (1 - f) d and (1 + f) d, by the
    # triangle inequality. So f = 0.2 is memorised (ratio <= 1/4) and f = 0.6 is not (>= 3/8).
    d = quality.nearest_training_distances(train[:1] / 255.0, train[1:] / 255.0)[0, 0]
    for share, memorised in ((0.2, True), (0.6, False)):
        moved = train[:1] / 255.0 + share * d * np.eye(64)[0].reshape(1, 8, 8, 1)
        near = quality.nearest_training_distances(moved, train / 255.0)[0]
        assert near[0] == pytest.approx(share * d)
        assert (near[0] < quality.MEMORISED_RATIO * near[1]) == memorised


def test_bad_inputs_say_what_is_wrong():
    with pytest.raises(JvdmUserError, match="expected"):
        quality.frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))
    with pytest.raises(JvdmUserError, match="uint8"):
        quality.sample_quality(np.zeros((8, 8, 8, 1), np.float32), dataset="digits")


def _digits(tmp_path):
    """A data directory of its own (the classifier cache lives there) with digits prepared."""
    from jvdm import datasets

    datasets.prepare("digits", tmp_path / "data")
    return tmp_path / "data"


FAST = dict(channels=(8, 16), features=16, steps=150)


@pytest.mark.slow  # trains the classifier twice
def test_classifier_is_cached_reused_and_retrained_when_its_recipe_changes(tmp_path, monkeypatch):
    data_dir = _digits(tmp_path)
    recipe = qc.Recipe("digits", **FAST)
    first = qc.get_classifier(recipe, data_dir)
    assert first.trained_now and 0.5 < first.test_accuracy <= 1.0
    meta = json.loads((qc.cache_dir(recipe, data_dir) / "meta.json").read_text())
    assert meta["digest"] == recipe.digest() and meta["test_accuracy"] == first.test_accuracy

    calls = []
    monkeypatch.setattr(qc, "_train", lambda *a: calls.append(a) or pytest.fail("retrained"))
    again = qc.get_classifier(recipe, data_dir)
    assert not again.trained_now and again.test_accuracy == first.test_accuracy
    images = np.random.default_rng(0).integers(0, 17, (5, 8, 8, 1)).astype(np.uint8)
    np.testing.assert_array_equal(again.apply(images)[1], first.apply(images)[1])
    monkeypatch.undo()

    changed = dataclasses.replace(recipe, steps=151)
    assert changed.digest() != recipe.digest()
    assert qc.get_classifier(changed, data_dir).trained_now


def test_sample_quality_of_real_images_is_near_its_floor(tmp_path):
    from jvdm import data as data_lib

    data_dir = _digits(tmp_path)

    train = data_lib.load_split_array("digits", "train", data_dir)
    recipe = qc.Recipe("digits", **FAST)
    real = quality.sample_quality(train[-100:], dataset="digits", data_dir=data_dir, recipe=recipe)
    noise = np.random.default_rng(0).integers(0, 17, (100, 8, 8, 1)).astype(np.uint8)
    bad = quality.sample_quality(noise, dataset="digits", data_dir=data_dir, recipe=recipe)
    assert set(real["samples"]) == set(quality.METRICS) and real["n"] == 100
    for result in (real, bad):
        assert 0 < result["samples"]["fd_se"] < result["samples"]["fd"]
        assert 0 < result["samples"]["confidence_se"] < 0.1
    floor = real["real_train"]
    assert real["samples"]["fd"] < 2 * floor["fd"] + 1e-3 < bad["samples"]["fd"]
    assert bad["samples"]["precision"] < floor["precision"]
    # Training images as samples are copies; held-out test images and noise are not.
    assert real["samples"]["memorised"] == 1.0 and real["samples"]["nn_distance"] == 0.0
    assert bad["samples"]["memorised"] == 0.0 and floor["memorised"] < 0.2
    assert 0 < floor["nn_distance"] < bad["samples"]["nn_distance"]
    assert "real train" in quality.format_table(bad)
