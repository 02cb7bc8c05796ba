"""preprocessing.moments is accurate for every finite batch: a fuzz against NumPy float64.

The yardstick is a float32 two-pass computation (mean, then the sum of squared deviations, or the
product d^T d for the covariance, at HIGHEST precision): moments' error stays within 4x of its.
moments shares batch norm's pivot (the first valid example, _rows.first_row), but it is a
*corrected* two-pass (Chan, Golub & LeVeque 1983): the pivot only shifts the first pass, whose
error the second pass removes to first order, so an outlier pivot costs it nothing measurable
(unlike the one-pass variance batch norm used); these tests hold that, and the limits of m2.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnorm import preprocessing as pp
from tests.helpers import to_f64

_WITHIN = 4.0
_EPS32 = float(np.finfo(np.float32).eps)


def _data(kind, n, d, rng):
    if kind == "offset":
        x = rng.uniform(-1e6, 1e6, d) + rng.normal(size=(n, d)) * 10 ** rng.uniform(-3, 1, d)
    elif kind == "tiny-variance":
        x = rng.normal(size=d) + 1e-5 * rng.normal(size=(n, d))
    elif kind == "sparse-relu":
        x = np.maximum(rng.normal(size=(n, d)) - rng.uniform(2.0, 3.7, d), 0.0)
        x[0] = rng.uniform(1.0, 5.0, d)
    elif kind == "outlier-first-row":
        x = rng.normal(size=(n, d))
        x[0] = rng.choice([-1.0, 1.0], d) * 10 ** rng.uniform(1, 4, d)
    elif kind == "cauchy":
        x = rng.standard_cauchy(size=(n, d))
    elif kind == "student-t":
        x = 5.0 + rng.standard_t(2.5, size=(n, d))
    elif kind == "constant":
        x = np.broadcast_to(100.0 * rng.normal(size=d), (n, d)).copy()
        x[:, : d // 2] += 1e-3 * rng.normal(size=(n, d // 2))
    else:
        raise ValueError(kind)
    return np.asarray(x, np.float32)


@jax.jit
def _two_pass32(x):
    mean = jnp.mean(x, axis=0, keepdims=True)
    d = x - mean
    cov = jax.lax.dot_general(d, d, (((0,), (0,)), ((), ())), precision=jax.lax.Precision.HIGHEST)
    return mean[0], jnp.sum(d * d, axis=0), cov


@pytest.mark.parametrize(
    "kind",
    [
        "offset",
        "tiny-variance",
        "sparse-relu",
        "outlier-first-row",
        "cauchy",
        "student-t",
        "constant",
    ],
)
def test_moments_within_a_small_factor_of_two_pass(kind):
    for seed in range(2):
        rng = np.random.default_rng(seed)
        for n in (64, 4096, 65536):
            x = _data(kind, n, 6, rng)
            x64 = to_f64(x)
            mu = x64.mean(0)
            dev = x64 - mu
            cov = dev.T @ dev
            sd = np.sqrt(np.diag(cov) / n)
            scale = np.sqrt(np.outer(np.diag(cov), np.diag(cov)))
            m = pp.moments(jnp.asarray(x))
            mf = pp.moments(jnp.asarray(x), full_covariance=True)
            mean2, m22, cov2 = (to_f64(a) for a in _two_pass32(jnp.asarray(x)))
            # The mean's error in standard deviations, m2's relative, the covariance's relative
            # to sqrt(m2_i m2_j); each floored at one float32 ulp.
            with np.errstate(divide="ignore", invalid="ignore"):
                pairs = [
                    (np.abs(to_f64(m.mean) - mu) / sd, np.abs(mean2 - mu) / sd),
                    (np.abs(to_f64(m.m2) - np.diag(cov)) / np.diag(cov), None),
                    (np.abs(to_f64(mf.m2) - cov) / scale, np.abs(cov2 - cov) / scale),
                ]
                pairs[1] = (pairs[1][0], np.abs(m22 - np.diag(cov)) / np.diag(cov))
            for what, (ours, yard) in zip(("mean", "m2", "covariance"), pairs, strict=True):
                ok = np.isfinite(yard)  # constant features: exact on both sides (0 / 0)
                if not ok.any():
                    continue
                bound = _WITHIN * max(np.max(yard[ok]), _EPS32)
                assert np.max(ours[ok]) <= bound, (kind, n, seed, what, ours.max(), yard.max())


def test_constant_features_are_exact():
    x = np.broadcast_to(np.float32([3.1, -7e5, 1e-20]), (1000, 3))
    m = pp.moments(jnp.asarray(x))
    np.testing.assert_array_equal(m.mean, x[0])
    np.testing.assert_array_equal(m.m2, 0.0)


def test_sparse_post_relu_feature_of_262144_rows():
    # batch norm's one-pass variance about this first row was 0.46% off; moments' is not.
    rng = np.random.default_rng(0)
    x = np.maximum(rng.normal(size=(262144, 1)) - 3.0, 0.0).astype(np.float32)
    x[0] = 3.0
    m = pp.moments(jnp.asarray(x))
    x64 = to_f64(x)
    np.testing.assert_allclose(m.mean, x64.mean(0), rtol=1e-6)
    np.testing.assert_allclose(m.m2, ((x64 - x64.mean()) ** 2).sum(0), rtol=1e-5)


def test_an_outlier_pivot_costs_nothing_at_a_million_rows():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1 << 20, 2)).astype(np.float32)
    x[0] = 1e5
    x64 = to_f64(x)
    m = pp.moments(jnp.asarray(x))
    np.testing.assert_allclose(m.m2, ((x64 - x64.mean(0)) ** 2).sum(0), rtol=1e-6)


def test_near_float32_max():
    # m2 = sum of squared deviations must itself be a float32: 2e38 is, 4.5e38 is not.
    m = pp.moments(jnp.asarray([[1e19], [-1e19]], jnp.float32))
    np.testing.assert_allclose(m.m2, [2e38], rtol=1e-6)
    assert float(m.mean[0]) == 0.0
    with pytest.raises(ValueError, match="overflow"):
        pp.moments(jnp.asarray([[1.5e19], [-1.5e19]], jnp.float32))


def test_masked_outlier_padding_and_merge_stay_exact():
    rng = np.random.default_rng(2)
    x = _data("sparse-relu", 4096, 3, rng)
    mask = rng.uniform(size=4096) > 0.3
    x[~mask] = np.nan
    m = pp.moments(jnp.asarray(x), mask=jnp.asarray(mask))
    xv = to_f64(x[mask])
    np.testing.assert_allclose(m.mean, xv.mean(0), rtol=1e-5)
    np.testing.assert_allclose(m.m2, ((xv - xv.mean(0)) ** 2).sum(0), rtol=1e-5)
    # Two halves merged exactly (Chan et al.) equal the whole.
    a = pp.moments(jnp.asarray(x[:1000]), mask=jnp.asarray(mask[:1000]))
    b = pp.moments(jnp.asarray(x[1000:]), mask=jnp.asarray(mask[1000:]))
    ab = pp.merge(a, b)
    np.testing.assert_allclose(ab.m2, m.m2, rtol=1e-5)
    np.testing.assert_allclose(ab.mean, m.mean, rtol=1e-6)
