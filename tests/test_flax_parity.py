"""jaxnorm's BatchNorm modules as drop-ins for flax's, case by case (issue 17).

Each case is one that flax's own test suites exercise (docs/peer_suites.md has the table): the
reference is always flax's real class (``flax.linen.BatchNorm``, ``flax.nnx.BatchNorm``) or
flax's own tool (``nnx.view_info``, ``nnx.tabulate``, ``nnx.EMA``, ``nnx.bridge``) run on the same
variables and input. flax's code needs standard dtype promotion, so every test is marked
``loose_promotion``.

Tests marked ``xfail(strict=True)`` need a change in the functional core
(``jaxnorm/batchnorm.py``); they state flax's behaviour and start passing (and must then be
unmarked) when the core has it.
"""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.nnx import bridge
from flax.nnx.nn import dtypes as nnx_dtypes

from jaxnorm import nn as jnn
from jaxnorm import nnx as jnnx
from tests.helpers import to_f64, tol

pytestmark = pytest.mark.loose_promotion


def _core_change(what: str):
    return pytest.mark.xfail(strict=True, reason=f"needs batchnorm core change: {what}")


def _close(actual, desired, dtype=jnp.float32, scale=1.0):
    np.testing.assert_allclose(to_f64(actual), to_f64(desired), **tol(dtype, scale))


def _data(shape, *, seed=0, offset=0.5, std=2.0, dtype=jnp.float32):
    # NumPy's generator: jax.random compiles a program per shape, which dominates these tests.
    return jnp.asarray(offset + std * np.random.default_rng(seed).normal(size=shape), dtype)


def _complex(shape, seed=0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.normal(size=shape) + 1j * rng.normal(size=shape), jnp.complex64)


def _mask(shape, seed, p=0.7):
    return jnp.asarray(np.random.default_rng(seed).random(shape) < p)


def _linen_train(cls, x, *, mask=None, init_x=None, **kw):
    """flax's recipe: init, then one training apply; returns (y, batch_stats, init variables)."""
    model = cls(use_running_average=False, **kw)
    if init_x is None:
        # flax's default initial values (scale, var 1; bias, mean 0), shapes and dtypes traced
        # from init: cheaper than compiling init.
        shapes = jax.eval_shape(model.init, jax.random.key(1), x)
        variables = jax.tree.map_with_path(
            lambda path, s: (jnp.ones if path[-1].key in ("scale", "var") else jnp.zeros)(
                s.shape, s.dtype
            ),
            shapes,
        )
    else:
        variables = model.init(jax.random.key(1), init_x)
    # One compile: op-by-op eager dispatch costs seconds per call on a small CPU.
    apply = jax.jit(lambda v, x, mask: model.apply(v, x, mask=mask, mutable=["batch_stats"]))
    y, updates = apply(variables, x, mask)
    return y, updates["batch_stats"], variables


def _run(module, *args, **kw):
    """``module(*args, **kw)`` under one compile (nnx.jit carries the state updates out)."""
    return nnx.jit(lambda m, *a: m(*a, **kw))(module, *args)


def _nnx_train(cls, x, num_features, *, mask=None, **kw):
    bn = cls(num_features, use_running_average=False, rngs=nnx.Rngs(0), **kw)
    y = _run(bn, x, mask=mask)
    return y, {"mean": bn.mean[...], "var": bn.var[...]}, bn


# --------------------------------------------------------------------------------------------
# Item 2: promote_dtype, flax.nnx's hook.


def test_nnx_promote_dtype_is_called_as_flax_calls_it():
    calls = []

    def recording(args, *, dtype=None):
        calls.append((tuple(None if a is None else (a.shape, a.dtype) for a in args), dtype))
        return args

    x = _data((6, 3))
    bn = jnnx.BatchNorm(3, dtype=jnp.float32, promote_dtype=recording, rngs=nnx.Rngs(0))
    _run(bn, x)
    f32 = jnp.dtype(jnp.float32)
    assert calls == [((((6, 3), f32), ((3,), f32), ((3,), f32), ((3,), f32), ((3,), f32)), f32)]
    # None passes through, as flax's promote_dtype allows
    _run(jnnx.BatchNorm(3, use_scale=False, promote_dtype=recording, rngs=nnx.Rngs(0)), x)
    assert calls[-1][0][3] is None


@pytest.mark.parametrize("train", [True, False])
def test_nnx_flax_promote_dtype_rounds_x_to_dtype_first_as_flax(train):
    # flax.nnx's default promote_dtype casts x, the statistics and the parameters to dtype.
    x = _data((16, 4))
    ours = jnnx.BatchNorm(
        4, dtype=jnp.float16, promote_dtype=nnx_dtypes.promote_dtype, rngs=nnx.Rngs(0)
    )
    theirs = nnx.BatchNorm(4, dtype=jnp.float16, rngs=nnx.Rngs(0))
    for bn in (ours, theirs):  # running statistics away from (0, 1) for the evaluation
        bn.mean[...] = jnp.array([0.3, -0.2, 0.1, 1.0])
        bn.var[...] = jnp.array([2.0, 0.5, 1.5, 4.0])
    y_o = _run(ours, x, use_running_average=not train)
    y_t = _run(theirs, x, use_running_average=not train)
    assert y_o.dtype == y_t.dtype == jnp.float16
    _close(y_o, y_t, jnp.float16)
    _close(ours.mean[...], theirs.mean[...])
    _close(ours.var[...], theirs.var[...])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16])
def test_nnx_identity_promote_dtype_matches_linen_as_in_flax_equivalence_test(dtype):
    # flax's tests/nnx/nn/normalization_test.py pairs nnx (identity promote_dtype) with linen.
    x = _data((10, 5))
    y_l, stats_l, variables = _linen_train(nn.BatchNorm, x, dtype=dtype, param_dtype=dtype)
    bn = jnnx.BatchNorm(
        5, dtype=dtype, param_dtype=dtype, promote_dtype=lambda a, **kw: a, rngs=nnx.Rngs(0)
    )
    bn.scale[...] = variables["params"]["scale"]
    bn.bias[...] = variables["params"]["bias"]
    y = _run(bn, x)
    assert y.dtype == y_l.dtype
    _close(y, y_l, dtype)
    _close(bn.mean[...], stats_l["mean"])
    _close(bn.var[...], stats_l["var"])


@pytest.mark.parametrize("bad", ["float16", jnp.float16, np.dtype(np.float16)])
def test_nnx_promote_dtype_must_be_a_function(bad):
    # jnp.float16 is callable, but it is a dtype: the output dtype is the dtype argument.
    with pytest.raises(TypeError, match="promote_dtype must be None or a function"):
        jnnx.BatchNorm(3, promote_dtype=bad, rngs=nnx.Rngs(0))


# --------------------------------------------------------------------------------------------
# Item 4: nnx's tools on jaxnorm's modules.


class _Net(nnx.Module):
    def __init__(self, norm, *, rngs, din=4, dout=3):
        self.lin = nnx.Linear(din, dout, rngs=rngs)
        self.bn = norm(dout, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, x):
        return self.drop(nnx.relu(self.bn(self.lin(x))))


def test_nnx_view_info_reads_set_view_docstring_as_for_flax():
    assert nnx.view_info(jnnx.BatchNorm(3, rngs=nnx.Rngs(0))) == nnx.view_info(
        nnx.BatchNorm(3, rngs=nnx.Rngs(0))
    )
    assert nnx.view_info(_Net(jnnx.BatchNorm, rngs=nnx.Rngs(0))) == nnx.view_info(
        _Net(nnx.BatchNorm, rngs=nnx.Rngs(0))
    )


def test_nnx_view_switches_mode_as_for_flax():
    x = _data((8, 4))
    outs = []
    for norm in (jnnx.BatchNorm, nnx.BatchNorm):
        model = _Net(norm, rngs=nnx.Rngs(0))
        view = nnx.view(model, use_running_average=True, deterministic=True)
        assert view.bn.use_running_average is True and model.bn.use_running_average is False
        outs.append(_run(view, x))
        assert np.all(model.bn.mean[...] == 0)  # an evaluation view updates nothing
    _close(outs[0], outs[1])


def test_nnx_eval_shape_gives_flax_state():
    def shapes(norm):
        model = nnx.eval_shape(lambda: _Net(norm, rngs=nnx.Rngs(0)))
        return jax.tree.map(lambda v: (v.shape, v.dtype), nnx.state(model))

    assert shapes(jnnx.BatchNorm) == shapes(nnx.BatchNorm)


def test_nnx_tabulate_prints_flax_table():
    x = jnp.ones((2, 4))
    assert nnx.tabulate(_Net(jnnx.BatchNorm, rngs=nnx.Rngs(0)), x) == nnx.tabulate(
        _Net(nnx.BatchNorm, rngs=nnx.Rngs(0)), x
    )


def test_nnx_ema_of_a_model_with_batchnorm_matches_flax():
    x = _data((8, 4))
    averages = []
    for norm in (jnnx.BatchNorm, nnx.BatchNorm):
        model = _Net(norm, rngs=nnx.Rngs(0))
        ema = nnx.EMA(model, decay=0.9, only=nnx.Any(nnx.Param, nnx.BatchStat))
        for step in range(2):
            _run(model.bn, model.lin(x + step))  # the running statistics move
            ema.update(model)
        averages.append(nnx.state(ema.apply_to(model), nnx.Param, nnx.BatchStat))
    jax.tree.map(_close, averages[0], averages[1])


def test_bridge_to_linen_of_jaxnorm_nnx_batchnorm_matches_flax():
    x = _data((8, 3))
    results = []
    for norm in (jnnx.BatchNorm, nnx.BatchNorm):
        model = bridge.to_linen(norm, 3)
        variables = model.init(jax.random.key(0), x)
        y, updates = jax.jit(functools.partial(model.apply, mutable=["batch_stats"]))(variables, x)
        results.append((jax.tree.map(jnp.shape, variables), y, updates))
    assert results[0][0] == results[1][0]
    _close(results[0][1], results[1][1])
    jax.tree.map(_close, results[0][2], results[1][2])


def test_bridge_to_nnx_of_jaxnorm_linen_batchnorm_matches_flax():
    x = _data((8, 3))
    results = []
    for norm in (jnn.BatchNorm, nn.BatchNorm):
        model = bridge.ToNNX(norm(use_running_average=True), rngs=nnx.Rngs(0))
        bridge.lazy_init(model, x)
        results.append((_run(model, x), nnx.state(model, nnx.Param, nnx.BatchStat)))
    _close(results[0][0], results[1][0])
    jax.tree.map(_close, results[0][1], results[1][1])


# --------------------------------------------------------------------------------------------
# Item 5: masks, read as flax reads them (NumPy broadcasting to x).


@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_spatial_padding_mask_shared_by_the_batch_matches_flax(api):
    x = _data((3, 5, 4, 2))
    mask = ((jnp.arange(5)[:, None] < 4) & (jnp.arange(4)[None, :] < 3))[..., None]  # (H, W, 1)
    if api == "linen":
        y, stats, _ = _linen_train(jnn.BatchNorm, x, mask=mask)
        y_t, stats_t, _ = _linen_train(nn.BatchNorm, x, mask=mask)
    else:
        y, stats, _ = _nnx_train(jnnx.BatchNorm, x, 2, mask=mask)
        y_t, stats_t, _ = _nnx_train(nnx.BatchNorm, x, 2, mask=mask)
    _close(y, y_t)
    jax.tree.map(_close, stats, stats_t)


@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_vector_mask_on_a_square_batch_flags_features_as_in_flax(api):
    # x is (N, N): flax broadcasts a (N,) mask along the last axis, so it flags features.
    x = _data((4, 4))
    mask = jnp.array([True, True, False, True])
    run = (
        (lambda cls: _linen_train(cls, x, mask=mask)[:2])
        if api == "linen"
        else (lambda cls: _nnx_train(cls, x, 4, mask=mask)[:2])
    )
    (y, stats), (y_t, stats_t) = (
        run(jnn.BatchNorm if api == "linen" else jnnx.BatchNorm),
        run(nn.BatchNorm if api == "linen" else nnx.BatchNorm),
    )
    keep = np.asarray(mask)
    _close(np.asarray(y)[:, keep], np.asarray(y_t)[:, keep])
    for k in ("mean", "var"):
        _close(np.asarray(stats[k])[keep], np.asarray(stats_t[k])[keep])
    # The fully masked feature: flax's statistics are NaN; jaxnorm leaves the running ones as
    # they were and its output is finite.
    assert np.isnan(np.asarray(stats_t["mean"])[2])
    assert np.asarray(stats["mean"])[2] == 0 and np.asarray(stats["var"])[2] == 1
    assert np.all(np.isfinite(np.asarray(y)))


def test_batch_shape_mask_is_still_accepted_where_flax_would_not_broadcast():
    # (N, H, W) on an NHWC batch does not broadcast to x: jaxnorm's own batch-shape form.
    x = _data((2, 3, 4, 5))
    rows = _mask((2, 3, 4), seed=3)
    y, stats, _ = _linen_train(jnn.BatchNorm, x, mask=rows)
    y_t, stats_t, _ = _linen_train(nn.BatchNorm, x, mask=rows[..., None])
    _close(y, y_t)
    jax.tree.map(_close, stats, stats_t)


# --------------------------------------------------------------------------------------------
# Item 7: running statistics agree with flax's to float32 rounding (not bit for bit).


@pytest.mark.parametrize("shape", [(32, 8), (4, 6, 6, 5)])
def test_running_statistics_agree_with_flax_to_float32_rounding(shape):
    # Zero-mean data, where flax's default one-pass variance loses nothing: the remaining
    # difference is the order of the float32 sums (docs/batchnorm_modules.md).
    x = _data(shape, offset=0.0, std=1.5)
    _, stats, _ = _linen_train(jnn.BatchNorm, x)
    _, stats_t, _ = _linen_train(nn.BatchNorm, x)
    for k in ("mean", "var"):
        np.testing.assert_allclose(stats[k], stats_t[k], rtol=2e-6, atol=1e-8)


# --------------------------------------------------------------------------------------------
# Item 3 (core): complex inputs, as flax.linen supports and tests them.


@pytest.mark.parametrize("masked", [False, True])
def test_linen_complex_input_matches_flax(masked):
    x = _complex((4, 3, 2))
    mask = _mask((4, 3, 1), seed=1) if masked else None
    y, stats, _ = _linen_train(jnn.BatchNorm, x, mask=mask, dtype=jnp.complex64)
    y_t, stats_t, _ = _linen_train(nn.BatchNorm, x, mask=mask, dtype=jnp.complex64)
    assert y.dtype == jnp.complex64 and stats["mean"].dtype == stats_t["mean"].dtype
    assert stats["var"].dtype == stats_t["var"].dtype == jnp.float32
    np.testing.assert_allclose(y, y_t, rtol=2e-5, atol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6), stats, stats_t
    )


def test_nnx_complex_input_keeps_the_complex_running_mean_as_linen():
    # flax.nnx casts the complex batch mean into its float32 BatchStat (a ComplexWarning, the
    # imaginary part lost); jaxnorm keeps it, as flax.linen does.
    x = _complex((6, 3))
    y_l, stats_l, _ = _linen_train(nn.BatchNorm, x)
    y, stats, bn = _nnx_train(jnnx.BatchNorm, x, 3)
    np.testing.assert_allclose(y, y_l, rtol=2e-5, atol=1e-5)
    assert stats["mean"].dtype == jnp.complex64
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6), stats, stats_l
    )
    bn.eval()
    assert _run(bn, x).dtype == jnp.complex64


# --------------------------------------------------------------------------------------------
# Item 1 (core): training on one value per feature returns flax's result.


def test_linen_train_on_one_value_per_feature_matches_flax():
    x = _data((1, 5))
    y, stats, _ = _linen_train(jnn.BatchNorm, x, init_x=_data((4, 5), seed=1))
    y_t, stats_t, _ = _linen_train(nn.BatchNorm, x, init_x=_data((4, 5), seed=1))
    _close(y, y_t)
    jax.tree.map(_close, stats, stats_t)


class _OneByOne(nn.Module):
    norm: type

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(3, (2, 2), strides=2)(x)  # (N, 2, 2, C) -> (N, 1, 1, 3)
        return self.norm(use_running_average=False)(x)


def test_linen_one_example_init_of_a_model_ending_1x1_matches_flax():
    # nn.BatchNorm's init computes the batch statistics (and discards them) as flax does; the
    # module's fallback to the running statistics goes with the core change.
    x = _data((1, 2, 2, 2))
    y, v = _OneByOne(jnn.BatchNorm).init_with_output(jax.random.key(0), x)
    y_t, v_t = _OneByOne(nn.BatchNorm).init_with_output(jax.random.key(0), x)
    _close(y, y_t)
    jax.tree.map(_close, v, v_t)


def test_nnx_tabulate_with_a_batch_of_one_as_flax():
    x = jnp.ones((1, 4))
    assert nnx.tabulate(_Net(jnnx.BatchNorm, rngs=nnx.Rngs(0)), x) == nnx.tabulate(
        _Net(nnx.BatchNorm, rngs=nnx.Rngs(0)), x
    )


def test_nnx_vmap_of_members_with_a_batch_of_one_matches_flax():
    # flax's tests/nnx/transforms_test.py (TestVmap.test_state_axes_simple): one row per member.
    def members(norm):
        @nnx.split_rngs(splits=4)
        @nnx.vmap(in_axes=0, out_axes=0)
        def create(rngs):
            return _Net(norm, rngs=rngs, din=3)

        return create(nnx.Rngs(0))

    @nnx.jit
    @nnx.vmap(in_axes=(0, 0))
    def forward(model, x):
        return model.bn(model.lin(x))

    outs = []
    for norm in (jnnx.BatchNorm, nnx.BatchNorm):
        model = members(norm)
        y = forward(model, _data((4, 1, 3)))
        outs.append((y, model.bn.mean[...], model.bn.var[...]))
    jax.tree.map(_close, outs[0], outs[1])


# --------------------------------------------------------------------------------------------
# Item 8 (core): an unbound axis_name is named in the error.


@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_unbound_axis_name_error_names_axis_name(api):
    x = _data((4, 3))
    if api == "linen":
        model = jnn.BatchNorm(use_running_average=False, axis_name="batch")
        variables = model.init(jax.random.key(0), x)  # init needs no bound axis, as in flax

        def call():
            model.apply(variables, x, mutable=["batch_stats"])
    else:
        bn = jnnx.BatchNorm(3, axis_name="batch", rngs=nnx.Rngs(0))

        def call():
            bn(x)

    # flax raises NameError("unbound axis name: batch"); the type stays for code that catches it.
    with pytest.raises(NameError) as info:
        call()
    message = str(info.value)
    assert "axis_name" in message and re.search(r"\bbatch\b", message)
    assert "axis_index" not in message
