"""Regressions found by running flax's own test suites against jaxnorm (docs/peer_suites.md)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jaxnorm import batchnorm as bn
from jaxnorm import nn as jnn

pytestmark = pytest.mark.loose_promotion


def test_linen_bind_stateful_with_a_1d_x_as_flax():
    # flax's tests/linen/linen_module_test.py::ModuleTest::test_bind_stateful: a 1-D x (features
    # only, no example axis) in training mode. jaxnorm's pivot sampling indexed the example axes
    # and raised "multiple indices are not supported for 0d arrays".
    x = jnp.array([0.5, -1.0, 2.0])
    out = []
    for cls in (jnn.BatchNorm, nn.BatchNorm):
        model = cls()
        variables = model.init(jax.random.key(0), x, use_running_average=False)
        out.append(model.apply(variables, x, use_running_average=False, mutable=["batch_stats"]))
    (y, stats), (y_t, stats_t) = out
    np.testing.assert_array_equal(y, y_t)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), stats, stats_t)


def test_functional_1d_x_is_one_example_per_feature():
    x = jnp.array([0.5, -1.0, 2.0])
    bias = jnp.array([1.0, 2.0, 3.0])
    y, s = bn.batch_norm(x, None, bias, bn.init_state(3), train=True, momentum=0.5)
    np.testing.assert_array_equal(y, bias)
    np.testing.assert_allclose(s.mean, 0.5 * np.asarray(x))
    g = jax.grad(lambda x: jnp.sum(bn.batch_norm(x, None, bias, bn.init_state(3), train=True)[0]))
    np.testing.assert_array_equal(g(x), np.zeros(3))


def test_a_fully_masked_feature_is_normalised_with_the_running_statistics():
    # flax's nnx normalization_test (mask [T, F, T, F, T] over 5 features): flax's output is NaN
    # for the masked features; jaxnorm's was x / sqrt(epsilon) (mean 0, var 0: ~600 for unit x).
    # It is now the evaluation-mode result with the running statistics, gradients included.
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)
    mask = np.broadcast_to(np.array([True, False, True, False, True]), (6, 5))
    state = bn.BatchNormState(
        jnp.array([0.0, 1.0, 0.0, -2.0, 0.0]),
        jnp.array([1.0, 4.0, 1.0, 0.25, 1.0]),
        jnp.zeros((), jnp.int32),
    )
    scale = jnp.full(5, 2.0)

    def run(x):
        return bn.batch_norm(x, scale, None, state, train=True, mask=mask, momentum=0.9)

    y, new = run(x)
    xn, m, v = (np.asarray(a, np.float64) for a in (x, state.mean, state.var))
    expect = 2.0 * (xn - m) / np.sqrt(v + 1e-5)
    np.testing.assert_allclose(np.asarray(y)[:, [1, 3]], expect[:, [1, 3]], rtol=1e-6)
    # the valid features are the batch's, and the running statistics of the empty ones stay
    valid = xn[:, [0, 2, 4]]
    yv = 2.0 * (valid - valid.mean(0)) / np.sqrt(valid.var(0) + 1e-5)
    np.testing.assert_allclose(np.asarray(y)[:, [0, 2, 4]], yv, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(new.mean)[[1, 3]], [1.0, -2.0])
    np.testing.assert_array_equal(np.asarray(new.var)[[1, 3]], [4.0, 0.25])
    # d(sum y^2 / 2)/dx for an empty feature: y * 2 / sqrt(v + eps) (constant statistics)
    g = jax.grad(lambda x: jnp.sum(run(x)[0] ** 2) / 2)(x)
    np.testing.assert_allclose(
        np.asarray(g)[:, [1, 3]], expect[:, [1, 3]] * 2.0 / np.sqrt(v[[1, 3]] + 1e-5), rtol=1e-5
    )


def test_modules_with_a_fully_masked_feature_stay_finite_where_flax_gives_nan():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(10, 5)), jnp.float32)
    mask = np.array([True, False, True, False, True])
    out = []
    for cls in (jnn.BatchNorm, nn.BatchNorm):
        model = cls(use_running_average=False)
        variables = model.init(jax.random.key(0), x)
        out.append(model.apply(variables, x, mask=mask, mutable=["batch_stats"])[0])
    y, y_flax = (np.asarray(a) for a in out)
    assert np.isnan(y_flax[:, [1, 3]]).all() and np.isfinite(y).all()
    # fresh running statistics (mean 0, var 1): the empty features are x / sqrt(1 + eps)
    np.testing.assert_allclose(
        y[:, [1, 3]], np.asarray(x)[:, [1, 3]] / np.sqrt(1 + 1e-5), rtol=1e-6
    )
    np.testing.assert_allclose(y[:, [0, 2, 4]], y_flax[:, [0, 2, 4]], rtol=2e-5, atol=1e-5)
