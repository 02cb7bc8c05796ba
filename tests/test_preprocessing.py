"""Tests for jaxnorm.preprocessing against NumPy float64 and scikit-learn."""

import io
import itertools
import json
import sys
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnorm import preprocessing as pp
from tests.helpers import to_f64, tol

sklearn_pca = pytest.importorskip("sklearn.decomposition")
sklearn_pre = pytest.importorskip("sklearn.preprocessing")


def _data(n=300, d=6, offset=0.0, seed=0, dtype=np.float32):
    """Correlated data with distinct variances: x = offset + g @ A, A upper triangular."""
    rng = np.random.default_rng(seed)
    a = np.triu(rng.normal(size=(d, d))) + np.diag(np.linspace(3.0, 0.5, d))
    return (offset + rng.normal(size=(n, d)) @ a).astype(dtype)


# -------------------------------------------------------------------------------------------------
# moments and merge


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_moments_diag_vs_numpy(dtype):
    x = jnp.asarray(_data(200, 5, offset=2.0), dtype)
    m = pp.moments(x)
    xr = to_f64(x)
    assert m.mean.dtype == jnp.float32  # low precision reduces in float32
    np.testing.assert_allclose(m.count, 200)
    np.testing.assert_allclose(m.mean, xr.mean(0), **tol(jnp.float32, 10))
    np.testing.assert_allclose(m.m2, ((xr - xr.mean(0)) ** 2).sum(0), **tol(jnp.float32, 10))


def test_moments_full_vs_numpy():
    x = _data(200, 5, offset=-3.0)
    m = pp.moments(x, full_covariance=True)
    xr = x.astype(np.float64)
    xc = xr - xr.mean(0)
    np.testing.assert_allclose(m.m2, xc.T @ xc, rtol=1e-5, atol=1e-3)
    np.testing.assert_array_equal(m.m2, m.m2.T)


@pytest.mark.parametrize("d", [257, 300])
def test_moments_full_split_scatter_vs_numpy(d):
    # From 256 features on, the CPU path computes the scatter matrix in three blocks.
    x = _data(400, d, offset=1e3)
    mask = np.arange(400) % 7 != 3
    for w in (None, mask):
        m = pp.moments(x, full_covariance=True, mask=w)
        xr = x.astype(np.float64)[w if w is not None else slice(None)]
        xc = xr - xr.mean(0)
        ref = xc.T @ xc
        np.testing.assert_allclose(m.mean, xr.mean(0), rtol=1e-6)
        np.testing.assert_allclose(m.m2, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
        np.testing.assert_array_equal(m.m2, m.m2.T)


@pytest.mark.parametrize("n", [400, 384])
def test_moments_full_blocked_scatter_vs_numpy(monkeypatch, n):
    # Above _BLOCK_ROWS rows the CPU path centres and multiplies blocks of rows in a loop (400:
    # six blocks and a tail of 16 rows; 384: six blocks, no tail). Shapes no other test uses, so
    # that the patched block size is traced.
    monkeypatch.setattr(pp, "_BLOCK_ROWS", 64)
    x = _data(n, 261, offset=1e3, seed=3)
    jaxpr = str(jax.make_jaxpr(lambda v: pp._local_moments(v, None, (1,), True))(x))
    assert "scan[" in jaxpr or "while[" in jaxpr
    mask = np.arange(n) % 5 != 2
    for w in (None, mask):
        m = pp.moments(x, full_covariance=True, mask=w)
        xr = x.astype(np.float64)[w if w is not None else slice(None)]
        xc = xr - xr.mean(0)
        ref = xc.T @ xc
        np.testing.assert_allclose(m.count, len(xr))
        np.testing.assert_allclose(m.mean, xr.mean(0), rtol=1e-6)
        np.testing.assert_allclose(m.m2, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
        np.testing.assert_array_equal(m.m2, m.m2.T)


@pytest.mark.parametrize("full", [False, True])
def test_moments_large_offset_float32(full):
    # |mean| / std = 1e4: E[x^2] - E[x]^2 in float32 would lose every digit of the variance.
    x = (1e4 + np.random.default_rng(1).normal(size=(4000, 3))).astype(np.float32)
    m = pp.moments(x, full_covariance=full)
    xr = x.astype(np.float64)
    xc = xr - xr.mean(0)
    ref = xc.T @ xc if full else (xc**2).sum(0)
    np.testing.assert_allclose(m.mean, xr.mean(0), rtol=1e-7)
    np.testing.assert_allclose(m.m2, ref, rtol=1e-4, atol=1e-2 * 4000)


def test_moments_mask_ignores_nan_padding():
    x = _data(50, 4, offset=5.0)
    mask = np.arange(50) < 37
    xp = x.copy()
    xp[37:] = np.nan
    m = pp.moments(xp, mask=mask, full_covariance=True)
    ref = pp.moments(x[:37], full_covariance=True)
    np.testing.assert_allclose(m.count, 37)
    np.testing.assert_allclose(m.mean, ref.mean, rtol=1e-6)
    np.testing.assert_allclose(m.m2, ref.m2, rtol=1e-5, atol=1e-4)


def test_signatures_take_the_issue_positional_order():
    # moments(x, feature_axes, full_covariance, mask, axis_name); fit_stream(t, batches, progress)
    x = _data(40, 3, offset=2.0)
    mask = np.arange(40) < 25
    pos = pp.moments(x, -1, True, mask)
    kw = pp.moments(x, feature_axes=-1, full_covariance=True, mask=mask)
    for a, b in zip(pos, kw, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(pos.mean, x[:25].mean(0), rtol=1e-6)
    streamed = pp.fit_stream(pp.zero_center(), [x[:25], x[25:]], False)
    np.testing.assert_allclose(streamed.mean, x.astype(np.float64).mean(0), rtol=1e-6)


def test_moments_empty_mask_is_merge_identity():
    x = _data(30, 3)  # the shape of the other empty-moments test: its programs are reused
    empty = pp.moments(x, mask=np.zeros(30, bool))
    assert float(empty.count) == 0 and np.all(np.isfinite(empty.mean))
    m = pp.moments(x)
    for got in (pp.merge(empty, m), pp.merge(m, empty)):
        np.testing.assert_allclose(got.mean, m.mean, rtol=1e-6)
        np.testing.assert_allclose(got.m2, m.m2, rtol=1e-6)


# Constants that are not sums of powers of two (0.1), large (1e6 + 0.3, whose float32 mean would
# round), tiny (3e-20) and negative: a float32 mean sum(x) / n misses some of them by an ulp, and
# the centred sums then leave m2 > 0.
CONSTANTS = np.array([0.1, 123.456, -7.3e5, 1e6 + 0.3, 3e-20, 2.7], np.float32)


def _with_constants(n, seed=0):
    """[n, 8]: the CONSTANTS columns, then two ordinary ones (one at offset 1e4)."""
    rng = np.random.default_rng(seed)
    ordinary = rng.normal(size=(n, 2)) * [2.0, 0.5] + [1e4, -3.0]
    return np.concatenate([np.broadcast_to(CONSTANTS, (n, 6)), ordinary], axis=1).astype(np.float32)


def _assert_constant_columns_exact(m, what):
    """mean == the constant and m2 == 0 exactly (every entry of a full m2 that involves them)."""
    c = len(CONSTANTS)
    np.testing.assert_array_equal(np.asarray(m.mean).reshape(-1)[:c], CONSTANTS, err_msg=what)
    m2 = np.asarray(m.m2)
    if m2.ndim == 2:
        np.testing.assert_array_equal(m2[:c], 0.0, err_msg=what)
        np.testing.assert_array_equal(m2[:, :c], 0.0, err_msg=what)
    else:
        np.testing.assert_array_equal(m2[:c], 0.0, err_msg=what)


@pytest.mark.parametrize("full", [False, True])
def test_constant_features_have_exact_moments(full):
    # Unmasked (4099 rows: more than a block of the CPU scatter), masked with NaN padding, and
    # masked with the first rows left out (the shift is the first valid row, not row 0).
    x = _with_constants(4099)
    mask = np.random.default_rng(1).random(4099) < 0.8
    mask[:3] = False
    xp = x.copy()
    xp[~mask] = np.nan
    for w, data, what in ((None, x, "unmasked"), (mask, xp, "masked")):
        m = pp.moments(data, full_covariance=full, mask=w)
        _assert_constant_columns_exact(m, what)
        xr = x.astype(np.float64)[w if w is not None else slice(None)]
        xc = xr - xr.mean(0)
        ref = xc.T @ xc if full else (xc**2).sum(0)
        np.testing.assert_allclose(m.mean, xr.mean(0), rtol=1e-7, atol=1e-30, err_msg=what)
        np.testing.assert_allclose(m.m2, ref, rtol=1e-4, atol=1e-6 * np.abs(ref).max())
    # A constant feature shape [H, W] with a per-pixel mean (several example and feature axes).
    img = np.broadcast_to(CONSTANTS[:4].reshape(2, 2), (33, 5, 2, 2))
    m = pp.moments(img, feature_axes=(2, 3), full_covariance=full)
    np.testing.assert_array_equal(m.mean, CONSTANTS[:4].reshape(2, 2))
    np.testing.assert_array_equal(m.m2, 0.0)


def test_constant_features_exact_through_merge():
    x = _with_constants(1000, seed=2)
    for full in (False, True):
        parts = np.split(x, [3, 100, 500])
        acc = pp.moments(parts[0], full_covariance=full)
        for p in parts[1:]:
            acc = pp.merge(acc, pp.moments(p, full_covariance=full))
        _assert_constant_columns_exact(acc, f"merge full={full}")


def test_moments_of_no_examples_are_zero_and_merge_identity():
    x = _data(30, 3, offset=7.0)
    for full in (False, True):
        m = pp.moments(x, full_covariance=full)
        empty = pp.moments(x[:0], full_covariance=full)
        assert float(empty.count) == 0
        np.testing.assert_array_equal(empty.mean, np.zeros(3))
        np.testing.assert_array_equal(empty.m2, np.zeros(m.m2.shape))
        masked_out = pp.moments(x, full_covariance=full, mask=np.zeros(30, bool))
        # Empty moments carrying any mean (here NaN) are the identity, exactly.
        odd = pp.Moments(empty.count, jnp.full((3,), jnp.nan), empty.m2)
        for e in (empty, masked_out, odd):
            for got in (pp.merge(e, m), pp.merge(m, e)):
                for a, b in zip(got, m, strict=True):
                    np.testing.assert_array_equal(a, b)
    m = pp.moments(np.zeros((0, 2, 3), np.float32), feature_axes=(1, 2))
    assert m.mean.shape == (2, 3) and float(m.count) == 0 and np.all(np.asarray(m.mean) == 0)


@pytest.mark.parametrize("full", [False, True])
def test_merge_equals_concatenated_fit_with_offset(full):
    x = _data(1000, 4, offset=1e4, seed=3)
    parts = np.split(x, [1, 10, 400, 401])
    acc = pp.moments(parts[0], full_covariance=full)
    for p in parts[1:]:
        acc = pp.merge(acc, pp.moments(p, full_covariance=full))
    xr = x.astype(np.float64)
    xc = xr - xr.mean(0)
    ref = xc.T @ xc if full else (xc**2).sum(0)
    np.testing.assert_allclose(acc.count, 1000)
    np.testing.assert_allclose(acc.mean, xr.mean(0), rtol=1e-7)
    np.testing.assert_allclose(acc.m2, ref, rtol=1e-4, atol=1e-3 * np.abs(ref).max())


def test_moments_image_per_channel_and_per_pixel():
    rng = np.random.default_rng(2)
    x = (rng.normal(size=(6, 4, 5, 3)) * [1.0, 2.0, 3.0] + [100.0, 50.0, 0.0]).astype(np.float32)
    xr = x.astype(np.float64)
    per_channel = pp.moments(x, -1)
    assert per_channel.mean.shape == (3,)
    np.testing.assert_allclose(per_channel.count, 6 * 4 * 5)
    # Channel 2's mean is near 0 with std 3: its rounding is relative to the spread.
    np.testing.assert_allclose(per_channel.mean, xr.mean((0, 1, 2)), rtol=1e-6, atol=3e-7)
    np.testing.assert_allclose(per_channel.m2 / 120, xr.var((0, 1, 2)), rtol=1e-5)
    per_pixel = pp.moments(x, (1, 2, 3))
    assert per_pixel.mean.shape == (4, 5, 3)
    np.testing.assert_allclose(per_pixel.mean, xr.mean(0), rtol=1e-6)
    np.testing.assert_allclose(per_pixel.m2 / 6, xr.var(0), rtol=1e-4, atol=1e-5)
    # NCHW layout: the channel axis need not be last for moments.
    nchw = pp.moments(np.moveaxis(x, -1, 1), 1)
    np.testing.assert_allclose(nchw.mean, per_channel.mean, rtol=1e-6)


def test_moments_axis_name_with_vmap_collectives():
    x = _data(64, 3, offset=1e3).reshape(4, 16, 3)
    # Under jit: one program, not each of the vmapped operations compiled alone (82 of them).
    m = jax.jit(
        jax.vmap(lambda s: pp.moments(s, full_covariance=True, axis_name="i"), axis_name="i")
    )(x)
    ref = pp.moments(x.reshape(64, 3), full_covariance=True)
    for i in range(4):  # every member of the axis gets the global moments
        np.testing.assert_allclose(m.count[i], 64)
        np.testing.assert_allclose(m.mean[i], ref.mean, rtol=1e-6)
        np.testing.assert_allclose(m.m2[i], ref.m2, rtol=1e-4, atol=1e-2)


def test_moments_under_jit_equals_eager():
    x = _data(40, 3)
    eager = pp.moments(x, full_covariance=True)
    jitted = jax.jit(lambda x: pp.moments(x, full_covariance=True))(x)
    for a, b in zip(eager, jitted, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)


# -------------------------------------------------------------------------------------------------
# normalize vs StandardScaler


def test_normalize_vs_standard_scaler_with_constant_features():
    rng = np.random.default_rng(4)
    n = 500
    x = np.stack(
        [
            rng.normal(size=n) * 3 + 7,  # ordinary
            np.full(n, 0.1),  # constant, not exactly representable
            np.full(n, 123.456) + rng.normal(size=n) * 1e-12,  # below float32 resolution
            rng.normal(size=n) * 1e-6,  # legitimately tiny variance around 0: kept
        ],
        axis=1,
    ).astype(np.float32)
    ss = sklearn_pre.StandardScaler().fit(x.astype(np.float64))
    t = pp.normalize()
    state = t.fit(x)
    np.testing.assert_allclose(state.mean, ss.mean_, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(state.var, ss.var_, rtol=1e-4, atol=1e-12)
    np.testing.assert_allclose(state.scale, ss.scale_, rtol=1e-4)
    np.testing.assert_array_equal(np.asarray(state.scale)[1:3], [1.0, 1.0])
    z = t.apply(state, x)
    np.testing.assert_allclose(z, ss.transform(x.astype(np.float64)), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(t.inverse(state, z), x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("offset, std", [(1e5, 1.5), (1e6, 10.0), (1e4, 1e-2)])
def test_normalize_keeps_real_features_at_a_large_offset(offset, std):
    # float32 data of spread std around offset: a real feature, which StandardScaler scales. A
    # constant test with sqrt(N) * float32 eps called these constant (scale 1).
    n = 20000
    x = (offset + std * np.random.default_rng(8).normal(size=(n, 2))).astype(np.float32)
    ss = sklearn_pre.StandardScaler().fit(x)
    state = pp.normalize().fit(x)
    np.testing.assert_allclose(state.var, ss.var_, rtol=1e-5)
    np.testing.assert_allclose(state.scale, ss.scale_, rtol=1e-5)
    np.testing.assert_allclose(state.mean, ss.mean_, rtol=0, atol=np.spacing(np.float32(offset)))
    z = pp.normalize().apply(state, x)
    np.testing.assert_allclose(to_f64(z).std(0), 1.0, rtol=1e-3)


def test_normalize_constant_and_near_constant_features_vs_standard_scaler():
    # Exactly constant columns get scale 1; a column of two adjacent float32 values (1e4 and the
    # next float up, a spread of one ulp) has a real, tiny variance, kept as StandardScaler does.
    n = 1000
    rng = np.random.default_rng(9)
    near = np.where(rng.random(n) < 0.3, np.nextafter(np.float32(1e4), np.float32(2e4)), 1e4)
    tiny = rng.normal(size=n) * 1e-6
    x = np.concatenate([_with_constants(n)[:, :6], near[:, None], tiny[:, None]], axis=1).astype(
        np.float32
    )
    ss = sklearn_pre.StandardScaler().fit(x)
    np.testing.assert_array_equal(ss.scale_[:6], 1.0)
    for state in (
        pp.normalize().fit(x),
        pp.fit_stream(pp.normalize(), np.split(x, [10, 500, 501]), progress=False),
    ):
        np.testing.assert_array_equal(state.mean[:6], CONSTANTS)
        np.testing.assert_array_equal(state.var[:6], 0.0)
        np.testing.assert_array_equal(state.scale[:6], 1.0)
        np.testing.assert_allclose(state.var[6:], ss.var_[6:], rtol=1e-4)
        np.testing.assert_allclose(state.scale[6:], ss.scale_[6:], rtol=1e-4)


def test_normalize_eps_is_added_to_variance():
    x = _data(100, 3)
    state = pp.normalize(eps=0.5).fit(x)
    np.testing.assert_allclose(state.scale, np.sqrt(x.astype(np.float64).var(0) + 0.5), rtol=1e-5)


# -------------------------------------------------------------------------------------------------
# PCA and whitening vs scikit-learn and NumPy


def test_pca_vs_sklearn_components_signs_and_variances():
    x = _data(400, 6, offset=50.0)
    ref = sklearn_pca.PCA(svd_solver="full").fit(x.astype(np.float64))
    t = pp.pca()
    state = t.fit(x)
    # Same sign convention as scikit-learn's svd_flip, so no "up to sign" is needed.
    np.testing.assert_allclose(state.components, ref.components_, atol=2e-5)
    np.testing.assert_allclose(state.explained_variance, ref.explained_variance_, rtol=2e-5)
    np.testing.assert_allclose(
        state.explained_variance_ratio, ref.explained_variance_ratio_, rtol=2e-5
    )
    np.testing.assert_allclose(
        t.apply(state, x), ref.transform(x.astype(np.float64)), rtol=1e-4, atol=1e-3
    )
    np.testing.assert_allclose(t.inverse(state, t.apply(state, x)), x, rtol=1e-5, atol=1e-3)


def test_pca_and_zca_with_one_feature_of_shape_1x1():
    # A (1, 1) full matrix and a (1, 1) diagonal are the same numbers: both fit.
    x = _data(50, 1, offset=4.0, seed=12)
    ref = sklearn_pca.PCA(svd_solver="full").fit(x.astype(np.float64))
    xi = x.reshape(50, 1, 1)
    for t in (pp.pca(), pp.pca_whiten(eps=0.0)):
        state = t.fit(xi, feature_axes=(1, 2))
        np.testing.assert_allclose(state.explained_variance, ref.explained_variance_, rtol=1e-5)
        np.testing.assert_array_equal(state.components, [[1.0]])
        np.testing.assert_allclose(t.inverse(state, t.apply(state, xi)), xi, rtol=1e-5)
        diag = pp.moments(xi, feature_axes=(1, 2))
        np.testing.assert_allclose(t.fit_moments(diag).explained_variance, state.explained_variance)
    zca = pp.zca_whiten(eps=0.0)
    state = zca.fit(xi, feature_axes=(1, 2))
    np.testing.assert_allclose(state.whitening, [[ref.explained_variance_[0] ** -0.5]], rtol=1e-5)
    z = zca.apply(state, xi)
    assert z.shape == xi.shape
    np.testing.assert_allclose(to_f64(z).std(ddof=1), 1.0, rtol=1e-5)
    s = pp.fit_stream(zca, [xi[:20], xi[20:]], feature_axes=(1, 2), progress=False)
    np.testing.assert_allclose(s.whitening, state.whitening, rtol=1e-5)


@pytest.mark.parametrize("k", [2, 0.9])
def test_pca_truncated_vs_sklearn(k):
    x = _data(400, 6)
    ref = sklearn_pca.PCA(k, svd_solver="full").fit(x.astype(np.float64))
    t = pp.pca(k)
    state = t.fit(x)
    assert state.components.shape == (ref.n_components_, 6)
    z = t.apply(state, x)
    np.testing.assert_allclose(z, ref.transform(x.astype(np.float64)), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(t.inverse(state, z), ref.inverse_transform(z), rtol=1e-4, atol=1e-3)


def test_pca_whiten_vs_sklearn_and_identity_covariance():
    x = _data(500, 5, offset=-20.0)
    ref = sklearn_pca.PCA(whiten=True, svd_solver="full").fit(x.astype(np.float64))
    t = pp.pca_whiten(eps=0.0)
    state = t.fit(x)
    z = t.apply(state, x)
    np.testing.assert_allclose(z, ref.transform(x.astype(np.float64)), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.cov(to_f64(z).T), np.eye(5), atol=1e-4)
    np.testing.assert_allclose(t.inverse(state, z), x, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("eps_mode", ["absolute", "relative"])
def test_whitening_eps_policy(eps_mode):
    x = _data(300, 4)
    eps = 0.3
    state = pp.pca_whiten(eps=eps, eps_mode=eps_mode).fit(x)
    lam = np.linalg.eigvalsh(np.cov(x.astype(np.float64).T))[::-1]
    e = eps if eps_mode == "absolute" else eps * lam.mean()
    np.testing.assert_allclose(state.scale, 1 / np.sqrt(lam + e), rtol=1e-5)
    z = pp.pca_whiten(eps=eps, eps_mode=eps_mode).apply(state, x)
    np.testing.assert_allclose(np.cov(to_f64(z).T), np.diag(lam / (lam + e)), atol=1e-4)


def test_zca_symmetric_inverse_sqrt_covariance():
    x = _data(500, 5, offset=100.0)
    t = pp.zca_whiten(eps=0.0)
    state = t.fit(x)
    w = np.asarray(state.whitening, np.float64)
    np.testing.assert_array_equal(state.whitening, state.whitening.T)
    lam, u = np.linalg.eigh(np.cov(x.astype(np.float64).T))
    np.testing.assert_allclose(w, u @ np.diag(lam**-0.5) @ u.T, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(state.coloring, u @ np.diag(lam**0.5) @ u.T, rtol=1e-4, atol=1e-4)
    z = t.apply(state, x)
    np.testing.assert_allclose(np.cov(to_f64(z).T), np.eye(5), atol=1e-4)
    np.testing.assert_allclose(t.inverse(state, z), x, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("make", [pp.pca_whiten, pp.zca_whiten])
def test_rank_warning_names_constant_features(make):
    # Many samples, but two features never vary (the digits' corner pixels): the warning must
    # name them, not advise fitting on more samples.
    rng = np.random.default_rng(6)
    x = rng.normal(size=(500, 6)).astype(np.float32)
    x[:, 1] = 0.0
    x[:, 4] = 3.0
    with pytest.warns(RuntimeWarning) as caught:
        make(eps=1e-5).fit(x)
    message = str(caught[0].message)
    assert "rank 4" in message
    assert "2 feature(s) are constant (zero variance: 1, 4)" in message
    assert "more samples" in message and "Fit on more samples" not in message


@pytest.mark.parametrize("make", [pp.pca_whiten, pp.zca_whiten])
def test_fewer_samples_than_features_warns_and_leaves_null_directions(make):
    rng = np.random.default_rng(5)
    x = rng.normal(size=(4, 8)).astype(np.float32)  # rank of the centred data: 3
    t = make(eps=1e-5)
    with pytest.warns(RuntimeWarning, match="rank 3"):
        state = t.fit(x)
    z = t.apply(state, x)
    assert np.all(np.isfinite(z))
    assert np.abs(to_f64(z)).max() < 10  # not blown up by 1 / sqrt(eps) ~ 316
    # A direction orthogonal to the data's span passes through with its length unchanged.
    xc = x.astype(np.float64) - x.mean(0)
    _, _, vt = np.linalg.svd(xc)
    null = vt[-1].astype(np.float32)
    out = t.apply(state, np.asarray(state.mean) + null)
    np.testing.assert_allclose(np.linalg.norm(to_f64(out)), 1.0, rtol=1e-3)
    np.testing.assert_allclose(t.inverse(state, z), x, rtol=1e-4, atol=1e-4)


# -------------------------------------------------------------------------------------------------
# Round trips, jit and vmap, images, chain, streams


ALL = [
    ("zero_center", pp.zero_center),
    ("normalize", pp.normalize),
    ("pca", pp.pca),
    ("pca_whiten", pp.pca_whiten),
    ("zca_whiten", pp.zca_whiten),
]


@pytest.mark.parametrize("name, make", ALL)
def test_apply_inverse_jit_vmap(name, make):
    x = _data(60, 4, offset=10.0)
    t = make()
    state = t.fit(x)
    z = t.apply(state, x)
    z_jit = jax.jit(t.apply)(state, x)
    np.testing.assert_allclose(z_jit, z, rtol=1e-5, atol=1e-5)
    z_vmap = jax.vmap(t.apply, in_axes=(None, 0))(state, x)
    np.testing.assert_allclose(z_vmap, z, rtol=1e-5, atol=1e-5)
    back = jax.jit(t.inverse)(state, z)
    np.testing.assert_allclose(back, x, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(jax.vmap(t.inverse, in_axes=(None, 0))(state, z), back, atol=1e-5)
    assert z.dtype == x.dtype and back.shape == x.shape


@pytest.mark.parametrize("name, make", ALL)
def test_low_precision_apply_keeps_dtype(name, make):
    x = _data(60, 4)
    t = make()
    state = t.fit(x)
    xb = jnp.asarray(x, jnp.bfloat16)
    z = t.apply(state, xb)
    assert z.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        to_f64(z), to_f64(t.apply(state, to_f64(xb).astype(np.float32))), **tol(jnp.bfloat16, 4)
    )


def test_fit_under_jit_equals_eager():
    x = _data(100, 4)
    t = pp.pca_whiten(3)
    eager = t.fit(x)
    jitted = jax.jit(t.fit)(x)
    for a, b in zip(eager, jitted, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_images_pca_on_flattened_features_and_zca_keeps_shape():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(50, 3, 2, 2)).astype(np.float32) + 0.5
    t = pp.pca(5)
    state = t.fit(x, feature_axes=(1, 2, 3))
    assert state.mean.shape == (3, 2, 2) and state.components.shape == (5, 12)
    z = t.apply(state, x)
    ref = sklearn_pca.PCA(5, svd_solver="full").fit(x.reshape(50, 12).astype(np.float64))
    np.testing.assert_allclose(z, ref.transform(x.reshape(50, 12)), rtol=1e-4, atol=1e-4)
    assert t.inverse(state, z).shape == x.shape
    tz = pp.zca_whiten()
    sz = tz.fit(x, feature_axes=(1, 2, 3))
    zz = tz.apply(sz, x)
    assert zz.shape == x.shape
    np.testing.assert_allclose(tz.inverse(sz, zz), x, rtol=1e-4, atol=1e-4)
    # Per-channel mean (VGG) with zero_center on NHWC.
    zc = pp.zero_center()
    sc = zc.fit(x, feature_axes=-1)
    np.testing.assert_allclose(sc.mean, x.astype(np.float64).mean((0, 1, 2)), rtol=1e-5)
    np.testing.assert_allclose(zc.apply(sc, x), x - x.mean((0, 1, 2)), atol=1e-5)


def test_chain_fit_and_fit_moments_agree():
    x = _data(300, 5, offset=30.0)
    t = pp.chain(pp.normalize(), pp.pca(3), pp.zca_whiten(eps=0.0))
    assert t.full_covariance
    s_fit = t.fit(x)
    s_mom = t.fit_moments(pp.moments(x, full_covariance=True))
    for a, b in zip(jax.tree.leaves(s_fit), jax.tree.leaves(s_mom), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    z = t.apply(s_fit, x)
    assert z.shape == (300, 3)
    np.testing.assert_allclose(np.cov(to_f64(z).T), np.eye(3), atol=1e-4)
    # Reference: StandardScaler then PCA(3) then ZCA, all in float64 NumPy.
    xs = sklearn_pre.StandardScaler().fit_transform(x.astype(np.float64))
    xr = sklearn_pca.PCA(3, svd_solver="full").fit_transform(xs)
    lam, u = np.linalg.eigh(np.cov(xr.T))
    np.testing.assert_allclose(z, xr @ u @ np.diag(lam**-0.5) @ u.T, rtol=1e-3, atol=1e-3)
    chain2 = pp.chain(pp.zero_center(), pp.normalize())
    np.testing.assert_allclose(
        chain2.inverse(chain2.fit(x), chain2.apply(chain2.fit(x), x)), x, rtol=1e-5, atol=1e-4
    )


def test_fit_stream_equals_in_memory_fit():
    x = _data(1000, 4, offset=1e4, seed=7)
    t = pp.zca_whiten()
    streamed = pp.fit_stream(t, (x[i : i + 64] for i in range(0, 1000, 64)), progress=False)
    in_memory = t.fit(x)
    for a, b in zip(streamed, in_memory, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)
    s2 = pp.fit_stream(pp.normalize(), [x[:500], x[500:]], progress=False)
    np.testing.assert_allclose(s2.var, x.astype(np.float64).var(0), rtol=1e-4)


def test_fit_stream_groups_small_batches(monkeypatch):
    # Batches are fitted in groups of up to _BLOCK_ROWS rows (a dtype change starts a new group);
    # the result is the fit of the concatenation, and errors still name the batch.
    monkeypatch.setattr(pp, "_BLOCK_ROWS", 100)
    x = _data(390, 7, offset=50.0, seed=11)
    sizes = [30, 50, 40, 70, 10, 120, 5, 65]
    edges = np.cumsum([0, *sizes])
    batches = [x[a:b] for a, b in itertools.pairwise(edges)]
    batches[3] = jnp.asarray(batches[3], jnp.bfloat16)
    xr = np.concatenate([to_f64(b) for b in batches])
    xc = xr - xr.mean(0)
    lam, u = np.linalg.eigh(xc.T @ xc / (len(xc) - 1))  # the sample covariance
    zca = pp.fit_stream(pp.zca_whiten(), batches, progress=False)
    np.testing.assert_allclose(zca.mean, xr.mean(0), rtol=1e-6)
    z = np.asarray(pp.zca_whiten().apply(zca, xr.astype(np.float32)), np.float64)
    # ZCA with eps = 1e-5 leaves covariance U diag(lam / (lam + eps)) U^T.
    np.testing.assert_allclose(z.T @ z / (len(z) - 1), (u * (lam / (lam + 1e-5))) @ u.T, atol=2e-4)
    norm = pp.fit_stream(pp.normalize(), batches, progress=False)
    np.testing.assert_allclose(norm.var, (xc**2).mean(0), rtol=1e-5)
    bad = [np.asarray(b, np.float32).copy() for b in batches]
    bad[2][5, 1] = np.nan
    with pytest.raises(ValueError, match="batch 2 has 1 non-finite"):
        pp.fit_stream(pp.zca_whiten(), bad, progress=False)
    huge = [np.full((30, 2), 3e38, np.float32), np.full((20, 2), -3e38, np.float32)]
    with pytest.raises(
        ValueError, match=r"group of batches 0-1 .* is finite, but its sums overflow"
    ):
        pp.fit_stream(pp.normalize(), huge, progress=False)


def _eigen_data(offset, n=20000, d=16, seed=0):
    """Variances 9 to 0.09 along random orthogonal axes, at ``offset``; float32."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return ((rng.normal(size=(n, d)) * np.linspace(3.0, 0.3, d)) @ q.T + offset).astype(np.float32)


@pytest.mark.parametrize("offset, batch", [(1e5, 4096), (1e6, 500)])
def test_fit_stream_at_a_large_offset_vs_float64_eigenvalues(offset, batch):
    # Merged float32 means of data at 1e6 lose |mean| * 6e-8 each: merging them directly gave
    # eigenvalue errors of 1e-3 (relative to the largest) at 1e6 and 2e-5 at 1e5, where the
    # in-memory fit has 1e-6. The stream's shared shift makes it as accurate as the latter.
    x = _eigen_data(offset)
    xr = x.astype(np.float64)
    lam = np.linalg.eigvalsh(np.cov(xr.T))[::-1]
    batches = (x[i : i + batch] for i in range(0, len(x), batch))
    state = pp.fit_stream(pp.pca(), batches, progress=False)
    np.testing.assert_allclose(state.explained_variance, lam, rtol=0, atol=5e-6 * lam[0])
    np.testing.assert_allclose(state.mean, xr.mean(0), rtol=0, atol=np.spacing(np.float32(offset)))


def test_fit_stream_constant_features_and_custom_transform():
    # A Transform built by hand: fit_moments returns the moments; its full_covariance attribute
    # makes fit_stream compute the full matrix.
    def identity(m):
        return m

    identity.full_covariance = True
    t = pp.Transform(None, None, None, identity)
    assert t.full_covariance
    x = _with_constants(1500, seed=3)
    sizes = [1, 37, 500, 0, 962]
    batches = np.split(x, np.cumsum(sizes)[:-1])
    m = pp.fit_stream(t, batches, progress=False)
    assert m.m2.shape == (8, 8)
    _assert_constant_columns_exact(m, "fit_stream full")
    xr = x.astype(np.float64)
    xc = xr - xr.mean(0)
    np.testing.assert_allclose(m.m2, xc.T @ xc, rtol=1e-4, atol=1e-6 * np.abs(xc.T @ xc).max())
    norm = pp.fit_stream(pp.normalize(), batches, progress=False)
    np.testing.assert_array_equal(norm.var[:6], 0.0)
    np.testing.assert_array_equal(norm.mean[:6], CONSTANTS)


def test_fit_stream_skips_empty_batches():
    x = _data(300, 4, offset=1e3, seed=13)
    t = pp.zca_whiten()
    plain = pp.fit_stream(t, [x[:100], x[100:]], progress=False)
    with_empty = pp.fit_stream(t, [x[:0], x[:100], x[100:100], x[100:]], progress=False)
    for a, b in zip(with_empty, plain, strict=True):
        np.testing.assert_array_equal(a, b)
    assert np.all(np.isfinite(plain.whitening))
    xr = x.astype(np.float64)
    np.testing.assert_allclose(plain.mean, xr.mean(0), rtol=1e-7)
    lam = np.linalg.eigvalsh(np.cov(xr.T))[::-1]
    np.testing.assert_allclose(plain.explained_variance, lam, rtol=1e-5, atol=1e-6 * lam[0])
    # Only empty batches fit nothing: an error, as t.fit(x[:0]) is (not a state of zeros).
    with pytest.raises(ValueError, match=r"2 batch\(es\) of feature shape \(4,\), all empty"):
        pp.fit_stream(pp.normalize(), [x[:0], x[:0]], progress=False)
    with pytest.raises(ValueError, match=r"normalize\.fit needs at least one example.*\(0, 4\)"):
        pp.normalize().fit(x[:0])


def test_fit_stream_progress_tqdm_and_fallback(monkeypatch, capsys):
    x = _data(40, 2)
    batches = [x[:20], x[20:]]
    pytest.importorskip("tqdm")
    pp.fit_stream(pp.zero_center(), batches)
    assert "fit_stream" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    pp.fit_stream(pp.zero_center(), batches)
    assert "fit_stream: 2/2 batches" in capsys.readouterr().err
    # A generator has no length, and updates are throttled: close() still shows the last count
    # (the second update comes within 0.5 s of the first, so only close() writes it). The same
    # two batches as above, so their compiled program is reused.
    pp.fit_stream(pp.zero_center(), (b for b in batches))
    err = capsys.readouterr().err
    assert err.endswith("\n") and err.rstrip("\n").split("\r")[-1] == "fit_stream: 2 batches"


def test_transform_is_four_functions_with_full_covariance_property():
    assert pp.Transform._fields == ("fit", "apply", "inverse", "fit_moments")
    x = _data(40, 3, offset=2.0)
    fit, apply, inverse, fit_moments = pp.pca()
    state = fit(x)
    np.testing.assert_allclose(inverse(state, apply(state, x)), x, rtol=1e-5, atol=1e-4)
    want = {
        pp.zero_center(): False,
        pp.normalize(): False,
        pp.pca(): True,
        pp.pca_whiten(): True,
        pp.zca_whiten(): True,
        pp.chain(pp.zero_center(), pp.normalize()): False,
        pp.chain(pp.normalize(), pp.zca_whiten()): True,
        pp.Transform(fit, apply, inverse, lambda m: m): False,  # no attribute: False
    }
    for t, full in want.items():
        assert len(t) == 4 and t.full_covariance is full
    with pytest.raises(AttributeError):
        pp.pca().full_covariance = False  # read-only
    # A hand-built Transform from a pca's functions keeps the attribute of its fit_moments.
    assert pp.Transform(fit, apply, inverse, fit_moments).full_covariance


# -------------------------------------------------------------------------------------------------
# save / load


def _all_states(x):
    """One state of every kind save takes: each transform, chains (nested too), Moments."""
    img = x[:, :4].reshape(-1, 2, 2)
    states = {
        "zero_center": pp.zero_center().fit(x),
        "normalize": pp.normalize(eps=1e-3).fit(x),
        "pca": pp.pca(2).fit(x),
        "pca_whiten": pp.pca_whiten(3).fit(x),
        "zca_whiten": pp.zca_whiten().fit(x),
        "pca_image": pp.pca(3).fit(img, feature_axes=(1, 2)),
        "chain": pp.chain(pp.normalize(), pp.pca_whiten(3)).fit(x),
        "nested_chain": pp.chain(pp.chain(pp.zero_center(), pp.normalize()), pp.zca_whiten()).fit(
            x
        ),
        "moments": pp.moments(x),
        "moments_full": pp.moments(x, full_covariance=True),
        "moments_bf16": jax.tree.map(
            lambda a: a.astype(jnp.bfloat16), pp.moments(x, full_covariance=True)
        ),
        "normalize_f16": jax.tree.map(lambda a: a.astype(jnp.float16), pp.normalize().fit(x)),
        "moments_numpy_f64": pp.Moments(
            np.float64(len(x)), x.mean(0, dtype=np.float64), x.var(0, dtype=np.float64)
        ),
    }
    return states


def _assert_bit_identical(loaded, state):
    assert jax.tree.structure(loaded) == jax.tree.structure(state)
    assert type(loaded) is type(state)
    if type(state) is tuple:
        for a, b in zip(loaded, state, strict=True):
            assert type(a) is type(b)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(state), strict=True):
        b = np.asarray(b)
        assert isinstance(a, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == np.ascontiguousarray(b).tobytes()


def test_save_load_round_trip_is_bit_exact(tmp_path):
    x = _data(60, 4, offset=3.0)  # the shape of the round-trip tests above: programs are reused
    makers = {
        "zero_center": pp.zero_center(),
        "normalize": pp.normalize(),
        "pca": pp.pca(),
        "pca_whiten": pp.pca_whiten(),
        "zca_whiten": pp.zca_whiten(),
        "pca_image": pp.pca(),
        "chain": pp.chain(pp.normalize(), pp.pca_whiten(3)),
        "nested_chain": pp.chain(pp.chain(pp.zero_center(), pp.normalize()), pp.zca_whiten()),
        "normalize_f16": pp.normalize(),
    }
    for name, state in _all_states(x).items():
        path = tmp_path / f"{name}.npz"
        pp.save(path, state)
        _assert_bit_identical(pp.load(path), state)
        if name in makers:
            _assert_bit_identical(pp.load(path, makers[name]), state)
        if isinstance(state, pp.Moments):
            _assert_bit_identical(pp.load(path, pp.Moments), state)
    with jax.enable_x64(True):
        state = pp.zca_whiten().fit(x.astype(np.float64))
        pp.save(tmp_path / "f64.npz", state)
        _assert_bit_identical(pp.load(tmp_path / "f64.npz", pp.zca_whiten()), state)
    t = pp.chain(pp.normalize(), pp.pca_whiten(3))
    loaded = pp.load(tmp_path / "chain.npz", t)
    np.testing.assert_array_equal(t.apply(loaded, x), t.apply(t.fit(x), x))
    assert not list(tmp_path.glob("*.tmp"))  # written under a temporary name, then renamed


def test_load_takes_the_name_given_to_save(tmp_path):
    # np.savez appends ".npz" to a name without it; load finds that file from the same name.
    state = pp.normalize().fit(_data(30, 3))
    pp.save(tmp_path / "scaler", state)
    assert (tmp_path / "scaler.npz").exists()
    loaded = pp.load(tmp_path / "scaler")
    np.testing.assert_array_equal(loaded.scale, state.scale)
    with pytest.raises(FileNotFoundError):
        pp.load(tmp_path / "missing")


def _members(path):
    with zipfile.ZipFile(path) as zf:
        return {n: zf.read(n) for n in zf.namelist()}


def _write_members(path, members):
    """Rewrite an .npz with these members; zipfile computes fresh CRCs, so only load's own checks
    can notice an edit."""
    with zipfile.ZipFile(path, "w") as zf:
        for n, b in members.items():
            zf.writestr(n, b)


def _header(members):
    return json.loads(str(np.load(io.BytesIO(members["__jaxnorm__.npy"]))))


def _with_header(members, header):
    buf = io.BytesIO()
    np.save(buf, np.array(json.dumps(header)))
    return {**members, "__jaxnorm__.npy": buf.getvalue()}


@pytest.fixture
def saved_normalize(tmp_path):
    """(path, state, x): a NormalizeState saved to path."""
    x = _data(40, 3, offset=2.0)
    state = pp.normalize().fit(x)
    path = tmp_path / "scaler.npz"
    pp.save(path, state)
    return path, state, x


def _load_error(path, match, *args):
    with pytest.raises(ValueError, match=match) as e:
        pp.load(path, *args)
    assert str(path) in str(e.value)  # the message names the file
    return str(e.value)


def test_load_refuses_junk_empty_and_truncated_files(tmp_path, saved_normalize):
    path, _, _ = saved_normalize
    data = path.read_bytes()
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"these bytes are no preprocessing state\n" * 4)
    message = _load_error(junk, r"not an \.npz \(zip\) archive")
    assert "pickle" not in message  # np.load's "pickled data" error said nothing useful
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    _load_error(empty, r"is empty \(0 bytes\)")
    npy = tmp_path / "plain.npy"
    np.save(npy, np.zeros(3))
    _load_error(npy, r"not an \.npz")
    cut = tmp_path / "cut.npz"
    for n in (2, 4, 30, len(data) // 3, len(data) // 2, len(data) - 23, len(data) - 1):
        cut.write_bytes(data[:n])
        _load_error(cut, r"truncated or corrupted|not an \.npz|is corrupted")


def test_load_refuses_an_edited_dtype(saved_normalize):
    path, _, _ = saved_normalize
    members = _members(path)
    # The .npy header of an array member says int32 where float32 was saved: same item size, so
    # NumPy reads the same bytes as integers.
    name = next(n for n in members if n != "__jaxnorm__.npy")
    assert b"'descr': '<f4'" in members[name]
    edited = {**members, name: members[name].replace(b"'descr': '<f4'", b"'descr': '<i4'")}
    _write_members(path, edited)
    _load_error(path, r"holds int32 data, but the header records float32")
    # The JSON header says int32 for a float32 member: refused, not viewed as integers.
    header = _header(members)
    header["state"]["fields"]["var"]["dtype"] = "int32"
    _write_members(path, _with_header(members, header))
    _load_error(path, r"holds float32 data, but the header records int32")
    # An edited shape in the .npy header (same number of bytes) is refused before any read.
    edited = {**members, name: members[name].replace(b"'shape': (3,)", b"'shape': (1,)")}
    _write_members(path, edited)
    _load_error(path, r"has shape \(1,\), but the header records \(3,\)|bytes of data")


def test_load_refuses_swapped_members(saved_normalize):
    path, _, _ = saved_normalize
    members = _members(path)
    a, b = [n for n in members if n != "__jaxnorm__.npy"][:2]
    swapped = {**members, a: members[b], b: members[a]}
    _write_members(path, swapped)
    message = _load_error(path, r"does not hold the data saved under that name")
    assert "swapped" in message


def test_load_refuses_missing_and_extra_members(saved_normalize, tmp_path):
    path, _, _ = saved_normalize
    members = _members(path)
    name = next(n for n in members if n != "__jaxnorm__.npy")
    _write_members(path, {k: v for k, v in members.items() if k != name})
    _load_error(path, r"lacks the member\(s\)")
    _write_members(path, {**members, "extra.npy": members[name]})
    _load_error(path, r"member\(s\) \['extra\.npy'\] that its header does not list")
    _write_members(path, {k: v for k, v in members.items() if k != "__jaxnorm__.npy"})
    _load_error(path, r"not written by preprocessing\.save")


def test_load_refuses_other_format_versions_and_malformed_headers(saved_normalize):
    path, _, _ = saved_normalize
    members = _members(path)
    header = _header(members)
    assert header["format"] == "jaxnorm.preprocessing/2"
    _write_members(path, _with_header(members, {**header, "format": "jaxnorm.preprocessing/99"}))
    _load_error(path, r"written by a newer jaxnorm, in file format version 99")
    _write_members(path, _with_header(members, {**header, "format": "jaxnorm.preprocessing/1"}))
    _load_error(path, r"file format version 1, from an earlier jaxnorm")
    _write_members(path, _with_header(members, {**header, "format": "something else"}))
    _load_error(path, r"not written by preprocessing\.save")
    bad_type = json.loads(json.dumps(header))
    bad_type["state"]["type"] = "WhiteningState"
    _write_members(path, _with_header(members, bad_type))
    _load_error(path, r"malformed header .*unknown state type 'WhiteningState'")
    _write_members(path, _with_header(members, {"format": header["format"]}))
    _load_error(path, r"malformed header")
    buf = io.BytesIO()
    np.save(buf, np.array("{not json"))
    _write_members(path, {**members, "__jaxnorm__.npy": buf.getvalue()})
    _load_error(path, r"malformed header \(not JSON")


def test_load_refuses_another_transforms_state(saved_normalize, tmp_path):
    path, state, x = saved_normalize
    # zero_center's apply would read a NormalizeState's mean and silently only centre.
    _load_error(path, r"holds a NormalizeState .*zero_center\.apply expects", pp.zero_center())
    _load_error(path, r"holds a NormalizeState", pp.pca())
    _load_error(path, r"tuple of 2 states", pp.chain(pp.zero_center(), pp.normalize()))
    _load_error(path, r"holds a NormalizeState .* but a Moments was expected", pp.Moments)
    np.testing.assert_array_equal(
        pp.normalize().apply(pp.load(path, pp.normalize()), x), pp.normalize().apply(state, x)
    )
    with pytest.raises(TypeError, match=r"zero_center\.apply expects state to be a ZeroCenterS"):
        pp.zero_center().apply(pp.load(path), x)
    with pytest.raises(TypeError, match=r"load expects transform as a Transform .* got str"):
        pp.load(path, "normalize")
    pp.save(tmp_path / "m.npz", pp.moments(x))
    _load_error(tmp_path / "m.npz", r"holds Moments, not a fitted state", pp.normalize())


def test_save_refuses_what_it_cannot_store(tmp_path):
    x = _data(20, 3)
    for bad, match in [
        (None, r"state is None"),
        ({"mean": x}, r"state is dict"),
        ((pp.zero_center().fit(x), [1.0]), r"state\[1\] is a plain list"),
        (pp.Moments(20.0, x.mean(0), x.var(0)), r"state\.count is float 20\.0"),
    ]:
        with pytest.raises(TypeError, match=match):
            pp.save(tmp_path / "bad.npz", bad)
    with pytest.raises(ValueError, match=r"state\.var must have shape \(3,\)"):
        pp.save(tmp_path / "bad.npz", pp.NormalizeState(x.mean(0), x.var(0)[:2], x.std(0)))
    with pytest.raises(TypeError, match=r"traced value; call save outside jit"):
        jax.jit(lambda m: pp.save(tmp_path / "bad.npz", pp.ZeroCenterState(m)))(x.mean(0))
    assert not list(tmp_path.iterdir())


# -------------------------------------------------------------------------------------------------
# Errors


def test_nonfinite_fit_data_counts_bad_values():
    x = _data(20, 3)
    x[2, 1] = np.nan
    x[5, 0] = np.inf
    with pytest.raises(ValueError, match=r"2 non-finite value\(s\) \(NaN or Inf\) among 60"):
        pp.pca().fit(x)
    with pytest.raises(ValueError, match="batch 1 has 2 non-finite"):
        pp.fit_stream(pp.normalize(), [x[10:], x[:10]], progress=False)
    # Two NaN in one column and a masked-out NaN row: only the unmasked ones count.
    x[7, 1] = np.nan
    x[19] = np.nan
    mask = np.arange(20) < 19
    with pytest.raises(ValueError, match=r"3 non-finite value\(s\)"):
        pp.moments(x, mask=mask)
    with pytest.raises(ValueError, match=r"3 non-finite value\(s\)"):
        pp.moments(np.moveaxis(x, 1, 0), feature_axes=0, mask=mask)


def test_overflowing_sums_are_an_error_not_inf_statistics():
    # Values 6e38 apart: x - shift overflows in the first pass.
    x = np.array([[3e38, 1.0], [-3e38, 2.0], [3e38, 3.0], [1.0, 4.0]], np.float32)
    with pytest.raises(ValueError, match="finite, but its sums overflow float32"):
        pp.normalize().fit(x)
    # Finite sums whose squares overflow: the second pass flags them.
    x = np.array([[1e20, 1.0], [-1e20, 2.0]], np.float32)
    with pytest.raises(ValueError, match="finite, but its sums overflow float32"):
        pp.moments(x, full_covariance=True)
    # A constant huge feature is no overflow: its statistics are exact.
    m = pp.moments(np.full((4, 2), 3e38, np.float32))
    np.testing.assert_array_equal(m.mean, np.float32(3e38))
    np.testing.assert_array_equal(m.m2, 0.0)


def test_shape_mismatch_messages():
    x = _data(20, 3)
    for t in (pp.zero_center(), pp.normalize(), pp.pca(), pp.zca_whiten()):
        state = t.fit(x)
        with pytest.raises(ValueError, match=r"expects x of shape \[\.\.\., 3\].*\(20, 4\)"):
            t.apply(state, np.zeros((20, 4), np.float32))
    t = pp.pca(2)
    state = t.fit(x)
    with pytest.raises(ValueError, match=r"expects z of shape \[\.\.\., 2\].*\(5, 3\)"):
        t.inverse(state, np.zeros((5, 3), np.float32))


@pytest.mark.parametrize(
    "k, exc, match",
    [
        (0, ValueError, "must be >= 1, but got 0"),
        (1.5, ValueError, r"must be in \(0, 1\), but got 1.5"),
        (True, TypeError, "must be None, an int"),
        ("mle", TypeError, "must be None, an int"),
    ],
)
def test_num_components_out_of_range_at_construction(k, exc, match):
    with pytest.raises(exc, match=match):
        pp.pca(k)


def test_num_components_errors_at_fit():
    x = _data(20, 3)
    with pytest.raises(ValueError, match="between 1 and the number of features 3, but got 4"):
        pp.pca_whiten(4).fit(x)
    with pytest.raises(ValueError, match="which jit cannot do"):
        jax.jit(pp.pca(0.9).fit)(x)


def test_argument_and_type_errors(tmp_path):
    x = _data(20, 3)
    with pytest.raises(TypeError, match="floating dtype"):
        pp.moments(np.ones((4, 3), np.int32))
    with pytest.raises(ValueError, match="eps >= 0"):
        pp.zca_whiten(eps=-1.0)
    with pytest.raises(ValueError, match="eps >= 0"):
        pp.normalize(eps=-1.0)
    with pytest.raises(ValueError, match='eps_mode "absolute" or "relative"'):
        pp.pca_whiten(eps_mode="mean")
    with pytest.raises(ValueError, match=r"needs the full scatter matrix.*full_covariance=True"):
        pp.pca().fit_moments(pp.moments(x))
    with pytest.raises(ValueError, match="same features"):
        pp.merge(pp.moments(x), pp.moments(x, full_covariance=True))
    with pytest.raises(ValueError, match=r"mask must have x's example shape \(20,\)"):
        pp.moments(x, mask=np.ones(19, bool))
    with pytest.raises(ValueError, match="feature axes last"):
        pp.normalize().fit(np.ones((2, 3, 4), np.float32), feature_axes=1)
    with pytest.raises(ValueError, match="out of range"):
        pp.moments(x, feature_axes=2)
    with pytest.raises(ValueError, match="no batches"):
        pp.fit_stream(pp.zero_center(), [], progress=False)
    with pytest.raises(ValueError, match=r"batch 1 has feature shape \(2,\).*\(3,\)"):
        pp.fit_stream(pp.zero_center(), [x, x[:, :2]], progress=False)
    with pytest.raises(TypeError, match="expects Transforms"):
        pp.chain(pp.pca(), "normalize")
    with pytest.raises(TypeError, match="preprocessing state"):
        pp.save(tmp_path / "bad.npz", {"mean": x})
    np.savez(tmp_path / "other.npz", a=x)
    with pytest.raises(ValueError, match=r"not written by preprocessing\.save"):
        pp.load(tmp_path / "other.npz")


@pytest.mark.parametrize(
    "eps, exc, match",
    [
        (float("inf"), ValueError, r"finite eps >= 0, but got eps=inf"),
        (float("nan"), ValueError, r"finite eps >= 0, but got eps=nan"),
        (-1e-3, ValueError, r"finite eps >= 0"),
        (np.float32(-1.0), ValueError, r"finite eps >= 0"),
        ("a", TypeError, r"eps as a real number >= 0 .* but got 'a' of type str"),
        (None, TypeError, r"but got None of type NoneType"),
        (True, TypeError, r"of type bool"),
        (1j, TypeError, r"of type complex"),
        (np.ones(2), TypeError, r"of type ndarray"),
    ],
)
@pytest.mark.parametrize("make", [pp.normalize, pp.pca_whiten, pp.zca_whiten])
def test_eps_must_be_a_finite_real(make, eps, exc, match):
    name = make.__name__
    with pytest.raises(exc, match=f"{name} needs .*{match}"):
        make(eps=eps)


def test_eps_numpy_and_jax_scalars_are_converted():
    x = _data(100, 3, seed=14)
    ref = pp.zca_whiten(eps=1e-5).fit(x)
    for eps in (np.float32(1e-5), np.float64(1e-5), jnp.array(1e-5), np.array(1e-5)):
        for a, b in zip(pp.zca_whiten(eps=eps).fit(x), ref, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6)
    lam = np.linalg.eigvalsh(np.cov(x.astype(np.float64).T))[::-1]
    state = pp.pca_whiten(eps=jnp.array(0.5, jnp.float32)).fit(x)
    np.testing.assert_allclose(state.scale, 1 / np.sqrt(lam + 0.5), rtol=1e-5)
    var = x.astype(np.float64).var(0)
    for eps in (np.int64(2), 2):
        np.testing.assert_allclose(pp.normalize(eps=eps).fit(x).scale, np.sqrt(var + 2), rtol=1e-5)
    with pytest.raises(TypeError, match=r"traced value.*outside jit"):
        jax.jit(lambda e: pp.normalize(eps=e).fit(x).scale)(0.5)


def test_one_dimensional_x_has_no_example_axis():
    x = _data(50, 3)
    msg = r"example axis .* shape \(50,\) .* x\[:, None\].* x\[None\]"
    with pytest.raises(ValueError, match=f"moments needs an {msg}"):
        pp.moments(x[:, 0])
    with pytest.raises(ValueError, match=f"moments needs an {msg}"):
        pp.moments(x[:, 0], feature_axes=0, full_covariance=True)
    with pytest.raises(ValueError, match=r"every axis a feature axis"):
        pp.moments(x.reshape(5, 10, 3), feature_axes=(0, 1, 2))
    for t in (pp.zero_center(), pp.normalize(), pp.pca(), pp.zca_whiten()):
        with pytest.raises(ValueError, match=f"fit needs an {msg}"):
            t.fit(x[:, 0])
    with pytest.raises(ValueError, match=r"chain\.fit needs an example axis"):
        pp.chain(pp.zero_center(), pp.normalize()).fit(x[:, 0])
    with pytest.raises(ValueError, match=r"fit_stream needs an example axis .* batch 1 has shape"):
        pp.fit_stream(pp.normalize(), [x, x[0]], progress=False)
    with pytest.raises(ValueError, match="scalar"):
        pp.moments(np.float32(1.0))
    # The fixes the message names work, and apply takes a single example as before.
    t = pp.normalize()
    state = t.fit(x[:, :1])
    np.testing.assert_allclose(state.var, x[:, :1].astype(np.float64).var(0), rtol=1e-5)
    one = pp.moments(x[0][None])
    assert float(one.count) == 1 and one.mean.shape == (3,)
    np.testing.assert_allclose(t.apply(state, x[0, :1]), t.apply(state, x[:1, :1])[0])


# -------------------------------------------------------------------------------------------------
# Validation at the boundary: states, moments, arguments


def _states_and_transforms(x):
    ts = dict(ALL) | {"chain": lambda: pp.chain(pp.zero_center(), pp.normalize())}
    return {name: (make(), make().fit(x)) for name, make in ts.items()}


def test_apply_and_inverse_refuse_states_of_another_kind():
    x = _data(30, 3)
    fitted = _states_and_transforms(x)
    moments = pp.moments(x)
    for name, (t, state) in fitted.items():
        wrong = {
            "None": None,
            "a plain tuple": tuple(state) if hasattr(state, "_fields") else (1.0, 2.0),
            "Moments": moments,
        }
        for other, (_, s) in fitted.items():
            same_kind = type(s) is type(state) and type(s) is not tuple
            if other != name and not same_kind:  # pca and pca_whiten share PCAState
                wrong[other] = s
        for what, bad in wrong.items():
            for fn in (t.apply, t.inverse, jax.jit(t.apply)):
                with pytest.raises(TypeError, match=r"expects state to be a") as e:
                    fn(bad, x)
                message = str(e.value)
                assert message.startswith(f"{name}.") or name == "chain", (what, message)
                if bad is None:
                    assert "got None" in message
    # A NormalizeState in zero_center's apply would be read as a mean alone.
    with pytest.raises(TypeError, match=r"ZeroCenterState .* got a NormalizeState \(the state of"):
        pp.zero_center().apply(fitted["normalize"][1], x)
    # pca and pca_whiten share PCAState and one apply: either applies either's state alike.
    s = fitted["pca_whiten"][1]
    np.testing.assert_array_equal(pp.pca().apply(s, x), pp.pca_whiten().apply(s, x))


def test_states_whose_fields_do_not_fit_together_are_refused():
    x = _data(30, 4)
    n = pp.normalize().fit(x)
    with pytest.raises(
        ValueError, match=r"state\.scale must have shape \(4,\) .* has shape \(3,\)"
    ):
        pp.normalize().apply(n._replace(scale=n.scale[:3]), x)
    p = pp.pca(2).fit(x)
    with pytest.raises(ValueError, match=r"state\.components must have shape \[k, 4\]"):
        pp.pca().apply(p._replace(components=p.components[:, :3]), x)
    with pytest.raises(ValueError, match=r"state\.scale must have shape \(2,\)"):
        jax.jit(pp.pca().inverse)(p._replace(scale=p.scale[:1]), x[:, :2])
    z = pp.zca_whiten().fit(x)
    with pytest.raises(ValueError, match=r"state\.coloring must have shape \(4, 4\)"):
        pp.zca_whiten().inverse(z._replace(coloring=z.coloring[:3, :3]), x)
    with pytest.raises(TypeError, match=r"state\.mean to be an array, but got None"):
        pp.zero_center().apply(pp.ZeroCenterState(None), x)
    with pytest.raises(TypeError, match=r"state\.mean with a floating dtype.*int32"):
        pp.zero_center().apply(pp.ZeroCenterState(np.zeros(4, np.int32)), x)
    chain = pp.chain(pp.zero_center(), pp.normalize())
    with pytest.raises(TypeError, match=r"chain\.apply expects state to be a tuple of 2 states"):
        chain.apply(chain.fit(x)[:1], x)


@pytest.mark.parametrize("full", [False, True])
def test_merge_and_fit_moments_refuse_what_is_not_moments(full):
    x = _data(30, 3)
    m = pp.moments(x, full_covariance=full)
    for bad, came in [
        (None, "got None"),
        (tuple(m), "got a plain tuple of 3 item"),
        (pp.zero_center().fit(x), "got a ZeroCenterState"),
    ]:
        with pytest.raises(TypeError, match=f"merge expects a to be a Moments.*{came}"):
            pp.merge(bad, m)
        with pytest.raises(TypeError, match=f"merge expects b to be a Moments.*{came}"):
            pp.merge(m, bad)
        for t in (pp.zero_center(), pp.normalize(), pp.pca(), pp.zca_whiten()):
            with pytest.raises(TypeError, match=r"fit_moments expects m to be a Moments"):
                t.fit_moments(bad)
        with pytest.raises(TypeError, match=r"fit_moments expects m to be a Moments"):
            pp.chain(pp.zero_center(), pp.pca()).fit_moments(bad)
    neg_m2 = m._replace(m2=m.m2 - 2 * jnp.diag(jnp.diagonal(m.m2)) if full else -m.m2)
    for bad, match in [
        (m._replace(count=jnp.float32(-1.0)), r"a\.count must be a finite number >= 0.* -1\.0"),
        (m._replace(count=jnp.float32(jnp.nan)), r"a\.count must be a finite number >= 0.* nan"),
        (m._replace(count=jnp.ones(3)), r"a\.count must have shape \(\)"),
        (neg_m2, r"a\.m2 has 3 negative or NaN"),
        (m._replace(m2=jnp.full_like(m.m2, jnp.nan)), r"a\.m2 has 3 negative or NaN"),
    ]:
        with pytest.raises(ValueError, match=match):
            pp.merge(bad, m)
        with pytest.raises(ValueError, match=match.replace("a\\.", "m\\.")):
            (pp.pca() if full else pp.normalize()).fit_moments(bad)
    with pytest.raises(TypeError, match=r"a\.mean with a floating dtype, but it has dtype int32"):
        pp.merge(m._replace(mean=jnp.zeros(3, jnp.int32)), m)
    with pytest.raises(ValueError, match="same features"):
        pp.merge(m, pp.moments(x[:, :2], full_covariance=full))
    with pytest.raises(ValueError, match="same features"):
        pp.merge(m, pp.moments(x, full_covariance=not full))
    # Traced values are unknown when merge is traced: not checked there (documented).
    got = jax.jit(pp.merge)(m._replace(count=jnp.float32(-1.0)), m)
    assert got.count == 29.0
    # A Python int count, as a hand-built Moments may have, is a count like any other.
    np.testing.assert_array_equal(pp.merge(m._replace(count=30), m).count, 60.0)


def test_a_fit_of_no_examples_is_an_error():
    x = _data(30, 3)
    for name, make in ALL:
        with pytest.raises(ValueError, match=rf"{name}\.fit needs at least one example"):
            make().fit(x[:0])
        with pytest.raises(ValueError, match=rf"{name}\.fit needs at least one example"):
            jax.jit(make().fit)(x[:0])  # the shape is static: refused at trace time
        with pytest.raises(ValueError, match=r"fit_moments needs at least one example"):
            make().fit(x, mask=np.zeros(30, bool))
        with pytest.raises(ValueError, match=r"fit_moments needs at least one example"):
            make().fit_moments(pp.moments(x[:0], full_covariance=True))
    with pytest.raises(ValueError, match=r"zero_center\.fit needs at least one example"):
        pp.chain(pp.zero_center(), pp.pca()).fit(x[:0])
    # moments of no examples stay merge's identity.
    assert float(pp.moments(x[:0]).count) == 0


def test_moments_arguments_of_the_wrong_type():
    x = _data(30, 3)
    for bad in ("yes", 1, None, np.array(True)):
        with pytest.raises(TypeError, match=r"moments expects full_covariance as a bool, but got"):
            pp.moments(x, full_covariance=bad)
    np.testing.assert_array_equal(
        pp.moments(x, full_covariance=np.bool_(True)).m2, pp.moments(x, full_covariance=True).m2
    )
    for bad in (0.5, np.full(30, 0.5), np.ones(30, np.int32)):
        with pytest.raises(TypeError, match=r"mask with dtype bool .* but it has dtype"):
            pp.moments(x, mask=bad if np.ndim(bad) else np.full(30, bad))
        with pytest.raises(TypeError, match=r"mask with dtype bool"):
            pp.normalize().fit(x, mask=bad if np.ndim(bad) else np.full(30, bad))
    with pytest.raises(TypeError, match=r"expects mask as an array .* got dict"):
        pp.moments(x, mask={"rows": np.ones(30, bool)})
    for bad in (1.0, "1", (0, 1.5), None):
        with pytest.raises(TypeError, match=r"feature_axes must be an int or a tuple of ints"):
            pp.moments(x, feature_axes=bad)
        with pytest.raises(TypeError, match=r"feature_axes must be an int or a tuple of ints"):
            pp.zero_center().fit(x, feature_axes=bad)


def test_dict_and_other_non_array_inputs_name_the_argument():
    x = _data(30, 3)
    d = {"x": x}
    with pytest.raises(TypeError, match=r"moments expects x as an array .* got dict"):
        pp.moments(d)
    for name, (t, state) in _states_and_transforms(x).items():
        with pytest.raises(TypeError, match=r"fit expects x as an array .* got dict"):
            t.fit(d)
        with pytest.raises(TypeError, match=r"apply expects x as an array .* got dict"):
            t.apply(state, d)
        with pytest.raises(TypeError, match=r"inverse expects z as an array .* got (dict|str)"):
            t.inverse(state, d if name != "pca" else "z")
        with pytest.raises(TypeError, match="floating dtype"):
            t.apply(state, x.astype(np.int32))
    with pytest.raises(TypeError, match=r"fit_stream expects batches as an iterable .* got dict"):
        pp.fit_stream(pp.zero_center(), d, progress=False)
    with pytest.raises(TypeError, match=r"fit_stream expects batches as an iterable .* got None"):
        pp.fit_stream(pp.zero_center(), None, progress=False)
    with pytest.raises(TypeError, match=r"fit_stream expects batch 1 as an array .* got dict"):
        pp.fit_stream(pp.zero_center(), [x, d], progress=False)


def test_num_components_takes_concrete_numpy_and_jax_integers():
    x = _data(50, 4)
    ref = pp.pca(2).fit(x)
    for k in (np.int64(2), jnp.int32(2), np.array(2)):
        for a, b in zip(pp.pca(k).fit(x), ref, strict=True):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(TypeError, match=r"num_components must be None, an int .* shape \(1,\)"):
        pp.pca(jnp.array([2]))
    with pytest.raises(ValueError, match=r"must be in \(0, 1\), but got nan"):
        pp.pca_whiten(float("nan"))
