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
