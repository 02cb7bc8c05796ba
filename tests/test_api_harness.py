"""One harness for every public pure function, as optax runs every optimizer through one test file.

Each entry of :data:`CASES` names a function and builds example arguments. For every case:

- eager equals ``jit``;
- ``vmap`` equals a Python loop over the batch;
- the output has the documented shape and dtype (by default: the first argument's);
- gradients with respect to ``argnums`` are finite;
- a second ``jit`` call with new values of the same shapes does not trace again.

To add a module, append :class:`Case` entries to :data:`CASES` (or extend it with a list built in
a helper). Arguments must be arrays; bind static options (``num_pieces``, ``train=True``) into
``fn`` with a lambda or ``functools.partial``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnorm import activations as A
from jaxnorm import batchnorm as BN
from jaxnorm import preprocessing as P
from tests.helpers import FLOAT_DTYPES, to_f64, tol


class Case(NamedTuple):
    """A public function and how to call it.

    Attributes:
      name: test id.
      fn: the function; takes the arrays built by ``make_args`` positionally.
      make_args: ``(key, dtype) -> tuple`` of example arrays for one (unbatched) call.
      in_axes: ``vmap`` axes per argument (``None``: shared across the batch).
      argnums: the arguments to differentiate.
      out_shape: ``args -> pytree of jax.ShapeDtypeStruct``; default: the first argument's.
      dtypes: the dtypes to run.
    """

    name: str
    fn: Callable[..., Any]
    make_args: Callable[[jax.Array, Any], tuple]
    in_axes: tuple = (0,)
    argnums: tuple[int, ...] = (0,)
    out_shape: Callable[..., Any] | None = None
    dtypes: tuple = FLOAT_DTYPES


def _normal(shape):
    def make(key, dtype):
        return (jax.random.normal(key, shape, jnp.float32).astype(dtype) * 3,)

    return make


def _with_param(shape, param_shape, value=0.2):
    def make(key, dtype):
        x = (jax.random.normal(key, shape, jnp.float32) * 3).astype(dtype)
        return x, jnp.full(param_shape, value, dtype)

    return make


def _elementwise(name, fn):
    return Case(name, fn, _normal((4, 6)))


ACTIVATION_CASES = [
    _elementwise("sigmoid", A.sigmoid),
    _elementwise("tanh", A.tanh),
    _elementwise("relu", A.relu),
    _elementwise("leaky_relu", A.leaky_relu),
    _elementwise("elu", A.elu),
    _elementwise("selu", A.selu),
    _elementwise("gelu", A.gelu),
    _elementwise("gelu_approximate", lambda x: A.gelu(x, approximate=True)),
    _elementwise("silu", A.silu),
    _elementwise("softplus", A.softplus),
    Case("leaky_relu_slope", A.leaky_relu, _with_param((4, 6), ()), (0, None), (0, 1)),
    Case("elu_alpha", A.elu, _with_param((4, 6), (), 1.3), (0, None), (0, 1)),
    Case("prelu_per_channel", A.prelu, _with_param((4, 6), (6,)), (0, None), (0, 1)),
    Case(
        "prelu_channel_axis",
        lambda x, a: A.prelu(x, a, channel_axis=0),
        _with_param((4, 6), (4,)),
        (0, None),
        (0, 1),
    ),
    Case(
        "maxout",
        lambda x: A.maxout(x, 3),
        _normal((4, 6)),
        out_shape=lambda x: jax.ShapeDtypeStruct((4, 2), x.dtype),
    ),
    Case(
        "maxout_axis0",
        lambda x: A.maxout(x, 2, axis=0),
        _normal((4, 6)),
        out_shape=lambda x: jax.ShapeDtypeStruct((2, 6), x.dtype),
    ),
]


def _bn_args(key, dtype):
    kx, ks = jax.random.split(key)
    x = (jax.random.normal(kx, (8, 5), jnp.float32) * 3 + 1).astype(dtype)
    scale = 1 + 0.1 * jax.random.normal(ks, (5,), jnp.float32)
    return x, scale, jnp.full((5,), 0.3, jnp.float32)


_BN_STATE = BN.BatchNormState(jnp.full((5,), 0.5), jnp.full((5,), 2.0), jnp.zeros(()))


def _bn_out(x, scale, bias):
    f32 = lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    return (
        jax.ShapeDtypeStruct(x.shape, x.dtype),
        BN.BatchNormState(f32((5,)), f32((5,)), f32(())),
    )


BATCHNORM_CASES = [
    Case(
        f"batch_norm_{mode}",
        functools.partial(lambda x, s, b, **kw: BN.batch_norm(x, s, b, _BN_STATE, **kw), **kw),
        _bn_args,
        (0, None, None),
        (0, 1, 2),
        _bn_out,
    )
    for mode, kw in [
        ("train", {"train": True}),
        ("eval", {"train": False}),
        ("train_relu", {"train": True, "activation": "relu"}),
        ("train_mask", {"train": True, "mask": jnp.arange(8) < 6}),
    ]
]

# Transforms fitted once on fixed float32 data; apply and inverse are the pure functions.
_FIT_X = jax.random.normal(jax.random.key(7), (64, 5)) @ jnp.diag(jnp.arange(1.0, 6.0)) + 10.0
_TRANSFORMS = {
    "normalize": P.chain(P.zero_center(), P.normalize()),
    "pca_whiten": P.pca_whiten(),
    "zca_whiten": P.zca_whiten(),
}
_STATES = {name: t.fit(_FIT_X) for name, t in _TRANSFORMS.items()}


def _shifted(key, dtype):
    return ((jax.random.normal(key, (6, 5), jnp.float32) + 10.0).astype(dtype),)


PREPROCESSING_CASES = [
    Case(
        f"{name}_{direction}",
        functools.partial(lambda x, t, st, d: getattr(t, d)(st, x), t=t, st=_STATES[name], d=d),
        _shifted,
    )
    for name, t in _TRANSFORMS.items()
    for direction, d in (("apply", "apply"), ("inverse", "inverse"))
]

CASES: list[Case] = [*ACTIVATION_CASES, *BATCHNORM_CASES, *PREPROCESSING_CASES]

_BY_DTYPE = [
    pytest.param(c, d, id=f"{c.name}-{jnp.dtype(d).name}") for c in CASES for d in c.dtypes
]
_FLOAT32 = [pytest.param(c, id=c.name) for c in CASES if jnp.float32 in c.dtypes]


def _args(case, dtype, seed=0):
    return case.make_args(jax.random.key(seed), dtype)


def _assert_trees_close(a, b, dtype, scale=1.0):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_allclose(to_f64(x), to_f64(y), **tol(dtype, scale))


def test_every_public_activation_has_a_case():
    covered = {c.name.split("_")[0] for c in CASES} | {c.name for c in CASES}
    assert set(A.NAMES) <= covered, set(A.NAMES) - covered


@pytest.mark.parametrize(("case", "dtype"), _BY_DTYPE)
def test_eager_equals_jit_and_shape_dtype(case, dtype):
    args = _args(case, dtype)
    eager = case.fn(*args)
    jitted = jax.jit(case.fn)(*args)
    want = case.out_shape(*args) if case.out_shape else jax.ShapeDtypeStruct(args[0].shape, dtype)
    got = jax.tree.map(lambda y: jax.ShapeDtypeStruct(y.shape, y.dtype), eager)
    assert got == want, f"{case.name}: expected {want}, got {got}"
    assert jax.tree.map(lambda y: (y.shape, y.dtype), jitted) == jax.tree.map(
        lambda y: (y.shape, y.dtype), eager
    )
    # Fusion under jit may reorder float operations: allow a few ulps.
    _assert_trees_close(eager, jitted, dtype, scale=2.0)


@pytest.mark.parametrize("case", _FLOAT32)
def test_vmap_equals_loop(case):
    batch = [_args(case, jnp.float32, seed) for seed in range(3)]
    stacked = tuple(
        args_0 if axis is None else jnp.stack([b[i] for b in batch], axis=axis)
        for i, (args_0, axis) in enumerate(zip(batch[0], case.in_axes, strict=True))
    )
    # Unbatched (in_axes None) arguments take the first example's value in every call.
    shared = [i for i, axis in enumerate(case.in_axes) if axis is None]
    loop = [case.fn(*(batch[0][i] if i in shared else b[i] for i in range(len(b)))) for b in batch]
    want = jax.tree.map(lambda *ys: jnp.stack(ys), *loop)
    got = jax.vmap(case.fn, in_axes=case.in_axes)(*stacked)
    _assert_trees_close(got, want, jnp.float32, scale=2.0)


@pytest.mark.parametrize(("case", "dtype"), _BY_DTYPE)
def test_gradients_are_finite(case, dtype):
    args = _args(case, dtype)

    def loss(*a):
        out = case.fn(*a)
        return sum(jnp.sum(y.astype(jnp.float32)) for y in jax.tree.leaves(out))

    grads = jax.grad(loss, argnums=case.argnums)(*args)
    for i, g in zip(case.argnums, grads, strict=True):
        assert g.shape == args[i].shape and g.dtype == args[i].dtype, case.name
        assert np.all(np.isfinite(to_f64(g))), (case.name, i)


@pytest.mark.parametrize("case", _FLOAT32)
def test_second_call_does_not_retrace(case):
    traces = 0

    def counted(*a):
        nonlocal traces
        traces += 1  # runs only while tracing
        return case.fn(*a)

    f = jax.jit(counted)
    jax.block_until_ready(f(*_args(case, jnp.float32, 0)))
    jax.block_until_ready(f(*_args(case, jnp.float32, 1)))
    assert traces == 1, f"{case.name} traced {traces} times for two calls of the same shapes"
