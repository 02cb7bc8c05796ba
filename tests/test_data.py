"""Tests for jaxnorm.data: digits splits against scikit-learn's copy, synthetic sets by hand."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnorm import data

sklearn_datasets = pytest.importorskip("sklearn.datasets")


@pytest.fixture(scope="module")
def raw_digits():
    d = sklearn_datasets.load_digits()
    return np.asarray(d.data, np.float64), np.asarray(d.target, np.int64)


@pytest.fixture(scope="module")
def splits():
    return data.digits(seed=0)


def _rows(x, y):
    """Examples as sorted tuples (pixels 0..16 as ints, label), for multiset comparisons."""
    pix = np.rint(np.asarray(x, np.float64).reshape(len(x), -1) * 16).astype(np.int64)
    return sorted(map(tuple, np.concatenate([pix, np.asarray(y)[:, None]], axis=1).tolist()))


def test_digits_shapes_and_types(splits):
    assert isinstance(splits, data.Splits)
    total = sum(s.x.shape[0] for s in splits)
    assert total == 1797
    for s in splits:
        assert isinstance(s, data.Dataset)
        assert s.x.ndim == 2 and s.x.shape[1] == 64
        assert s.y.shape == (s.x.shape[0],)
        assert s.x.dtype == jnp.float32 and s.y.dtype == jnp.int32
        assert float(s.x.min()) >= 0.0 and float(s.x.max()) <= 1.0
        assert set(np.unique(np.asarray(s.y)).tolist()) == set(range(10))
    assert float(splits.train.x.max()) == 1.0  # a raw 16


def test_digits_is_a_partition_of_sklearn_data(splits, raw_digits):
    # The union of the three splits, as a multiset of (pixels, label), is the whole data set:
    # nothing duplicated across splits, nothing lost, pixels scaled by exactly 1/16.
    x, y = raw_digits
    xs = np.concatenate([np.asarray(s.x) for s in splits])
    ys = np.concatenate([np.asarray(s.y) for s in splits])
    np.testing.assert_array_equal(np.asarray(xs * 16, np.float64), np.rint(xs * 16))
    assert _rows(xs, ys) == _rows(x / 16, y)


def test_digits_stratified(splits, raw_digits):
    _, y = raw_digits
    for s, frac in ((splits.val, 0.15), (splits.test, 0.15), (splits.train, 0.70)):
        counts = np.bincount(np.asarray(s.y), minlength=10)
        expected = np.bincount(y, minlength=10) * frac
        # round() per class for val and test; train gets the rest, off by at most 2.
        assert np.all(np.abs(counts - expected) <= 2), (counts, expected)


def test_digits_deterministic_per_seed():
    a, b, c = data.digits(seed=3), data.digits(seed=3), data.digits(seed=4)
    for s, t in zip(a, b, strict=True):
        np.testing.assert_array_equal(s.x, t.x)
        np.testing.assert_array_equal(s.y, t.y)
    assert not np.array_equal(a.train.y, c.train.y)


def test_digits_fractions_and_layout(raw_digits):
    s = data.digits(val_fraction=0.0, test_fraction=0.5, flatten=False, dtype=jnp.bfloat16)
    assert s.val.x.shape == (0, 8, 8, 1)
    assert s.train.x.shape[1:] == (8, 8, 1) and s.train.x.dtype == jnp.bfloat16
    assert abs(s.test.x.shape[0] - 1797 / 2) <= 10
    flat = data.digits(val_fraction=0.0, test_fraction=0.5)
    np.testing.assert_array_equal(
        np.asarray(s.train.x, np.float32).reshape(-1, 64), np.asarray(flat.train.x)
    )


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"val_fraction": -0.1}, ValueError, "val_fraction must be in"),
        ({"test_fraction": 1.0}, ValueError, "test_fraction must be in"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, ValueError, "below 1"),
        ({"val_fraction": 0.499, "test_fraction": 0.5}, ValueError, "no training example"),
        ({"seed": -1}, ValueError, "seed must be at least 0"),
        ({"seed": 1.5}, TypeError, "seed must be a Python int"),
        ({"val_fraction": "0.1"}, TypeError, "must be a number"),
        ({"dtype": jnp.int32}, TypeError, "floating dtype"),
    ],
)
def test_digits_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        data.digits(**kwargs)


def test_digits_without_sklearn_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r'pip install "jaxnorm\[lab\]"'):
        data.digits()


# ---------------------------------------------------------------------------------------------
# Synthetic sets
# ---------------------------------------------------------------------------------------------


def test_gaussian_clouds_shapes_balance_and_centres():
    n, c = 3001, 3
    ds = data.gaussian_clouds(jax.random.key(0), n, num_classes=c, separation=5.0, stddev=0.5)
    assert ds.x.shape == (n, 2) and ds.x.dtype == jnp.float32
    assert ds.y.shape == (n,) and ds.y.dtype == jnp.int32
    np.testing.assert_array_equal(np.bincount(np.asarray(ds.y)), [1001, 1000, 1000])
    x, y = np.asarray(ds.x, np.float64), np.asarray(ds.y)
    for k in range(c):
        angle = 2 * np.pi * k / 3
        centre = 5.0 * np.array([np.cos(angle), np.sin(angle)])
        np.testing.assert_allclose(x[y == k].mean(0), centre, atol=0.06)
        np.testing.assert_allclose(x[y == k].std(0), [0.5, 0.5], atol=0.05)
    # Random order: the labels are not the sorted or the round-robin sequence.
    assert not np.array_equal(y, np.arange(n) % c)


def test_gaussian_clouds_dims_and_dtype():
    ds = data.gaussian_clouds(jax.random.key(1), 40, num_classes=4, dim=5, dtype=jnp.bfloat16)
    assert ds.x.shape == (40, 5) and ds.x.dtype == jnp.bfloat16
    ds1 = data.gaussian_clouds(jax.random.key(1), 4000, num_classes=2, dim=1, separation=4.0)
    x, y = np.asarray(ds1.x[:, 0]), np.asarray(ds1.y)
    np.testing.assert_allclose([x[y == 0].mean(), x[y == 1].mean()], [-2.0, 2.0], atol=0.1)


def test_gaussian_clouds_deterministic_and_jittable():
    k = jax.random.key(7)
    a = data.gaussian_clouds(k, 50)
    b = jax.jit(lambda key: data.gaussian_clouds(key, 50))(k)
    np.testing.assert_allclose(a.x, b.x, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(a.y, b.y)
    c = data.gaussian_clouds(jax.random.key(8), 50)
    assert not np.array_equal(a.x, c.x)


def _cs231n_spiral(m, c):
    """The CS231n notes' code for class c with m points, noise 0."""
    r = np.linspace(0.0, 1, m)
    t = np.linspace(c * 4, (c + 1) * 4, m)
    return np.c_[r * np.sin(t), r * np.cos(t)]


def test_spirals_noise_free_matches_cs231n():
    ds = data.spirals(jax.random.key(0), 301, num_classes=3, noise=0.0)
    assert ds.x.shape == (301, 2) and ds.y.shape == (301,)
    x, y = np.asarray(ds.x, np.float64), np.asarray(ds.y)
    np.testing.assert_array_equal(np.bincount(y), [101, 100, 100])
    for c, m in enumerate((101, 100, 100)):
        pts = x[y == c]
        pts = pts[np.argsort(np.hypot(pts[:, 0], pts[:, 1]), kind="stable")]
        np.testing.assert_allclose(pts, _cs231n_spiral(m, c), atol=2e-6)


def test_spirals_noise_deterministic_and_bounded():
    k = jax.random.key(3)
    a, b = data.spirals(k, 60, noise=0.3), data.spirals(k, 60, noise=0.3)
    np.testing.assert_array_equal(a.x, b.x)
    assert float(jnp.max(jnp.linalg.norm(a.x, axis=1))) <= 1.0 + 1e-6
    assert not np.array_equal(a.x, data.spirals(jax.random.key(4), 60, noise=0.3).x)
    assert data.spirals(k, 20, num_classes=5, dtype=jnp.float16).x.dtype == jnp.float16


@pytest.mark.parametrize(
    ("fn", "kwargs", "error", "match"),
    [
        (data.gaussian_clouds, {"n": 10, "num_classes": 1}, ValueError, "num_classes must be at"),
        (data.gaussian_clouds, {"n": 2, "num_classes": 3}, ValueError, "n must be at least 3"),
        (data.gaussian_clouds, {"n": 10, "dim": 0}, ValueError, "dim must be at least 1"),
        (data.gaussian_clouds, {"n": 10, "stddev": 0.0}, ValueError, "stddev must be finite"),
        (data.gaussian_clouds, {"n": 10.0}, TypeError, "n must be a Python int"),
        (data.gaussian_clouds, {"n": 10, "dtype": jnp.int32}, TypeError, "floating dtype"),
        (data.spirals, {"n": 10, "num_classes": 1}, ValueError, "num_classes must be at"),
        (data.spirals, {"n": 5, "num_classes": 3}, ValueError, "n must be at least 6"),
        (data.spirals, {"n": 10, "noise": -1.0}, ValueError, "noise must be finite"),
    ],
)
def test_synthetic_bad_arguments(fn, kwargs, error, match):
    with pytest.raises(error, match=match):
        fn(jax.random.key(0), **kwargs)
