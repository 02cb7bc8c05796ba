"""Tests for jaxnorm.batchnorm: NumPy float64 references, finite differences, flax and torch."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import ad_checkpoint

from jaxnorm import activations
from jaxnorm import batchnorm as bn
from tests.helpers import to_f64, tol

# --------------------------------------------------------------------------- NumPy references


def _np_relu(v):
    return np.maximum(v, 0.0)


def np_batch_norm_train(
    x,
    scale,
    bias,
    mean0,
    var0,
    faxes,
    *,
    momentum=0.99,
    eps=1e-5,
    mask=None,
    act=None,
    unbiased=False,
):
    """Float64 batch norm in training mode: (y, new_mean, new_var, batch_mean, batch_var)."""
    x = to_f64(x)
    raxes = tuple(a for a in range(x.ndim) if a not in faxes)
    pshape = tuple(x.shape[a] if a in faxes else 1 for a in range(x.ndim))
    m = np.ones(x.shape) if mask is None else np.broadcast_to(np.asarray(mask, np.float64), x.shape)
    n = m.sum(axis=raxes, keepdims=True)
    mu = (m * x).sum(axis=raxes, keepdims=True) / n
    var = (m * (x - mu) ** 2).sum(axis=raxes, keepdims=True) / n
    y = (x - mu) / np.sqrt(var + eps)
    if scale is not None:
        y = y * to_f64(scale).reshape(pshape)
    if bias is not None:
        y = y + to_f64(bias).reshape(pshape)
    if act is not None:
        y = act(y)
    fshape = tuple(x.shape[a] for a in faxes)
    bvar = var * n / (n - 1) if unbiased else var
    new_mean = momentum * to_f64(mean0) + (1 - momentum) * mu.reshape(fshape)
    new_var = momentum * to_f64(var0) + (1 - momentum) * bvar.reshape(fshape)
    return y, new_mean, new_var, mu.reshape(fshape), var.reshape(fshape)


def np_batch_norm_eval(x, scale, bias, mean, var, faxes, eps=1e-5):
    x = to_f64(x)
    pshape = tuple(x.shape[a] if a in faxes else 1 for a in range(x.ndim))
    y = (x - to_f64(mean).reshape(pshape)) / np.sqrt(to_f64(var).reshape(pshape) + eps)
    if scale is not None:
        y = y * to_f64(scale).reshape(pshape)
    if bias is not None:
        y = y + to_f64(bias).reshape(pshape)
    return y


def _params(fshape, seed=0):
    rng = np.random.default_rng(seed)
    scale = jnp.asarray(rng.uniform(0.5, 2.0, fshape), jnp.float32)
    bias = jnp.asarray(rng.normal(size=fshape), jnp.float32)
    state = bn.BatchNormState(
        jnp.asarray(rng.normal(size=fshape), jnp.float32),
        jnp.asarray(rng.uniform(0.5, 2.0, fshape), jnp.float32),
        jnp.asarray(3.0, jnp.float32),
    )
    return scale, bias, state


def _x(shape, dtype=jnp.float32, seed=1, loc=0.5, std=2.0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(loc + std * rng.normal(size=shape), dtype)


LAYOUTS = [
    pytest.param((16, 5), -1, id="dense"),
    pytest.param((4, 3, 3, 6), -1, id="nhwc"),
    pytest.param((4, 6, 3, 2), 1, id="nchw"),
    pytest.param((4, 3, 5), (-2, -1), id="two-feature-axes"),
    pytest.param((3, 4, 5), (0, 2), id="non-adjacent-features"),
]


def _faxes(axis, ndim):
    axes = (axis,) if isinstance(axis, int) else axis
    return tuple(sorted(a % ndim for a in axes))


# --------------------------------------------------------------------------- state and helpers


def test_init_state():
    s = bn.init_state((3, 4))
    assert s.mean.shape == s.var.shape == (3, 4) and s.count.shape == ()
    assert s.mean.dtype == jnp.float32
    np.testing.assert_array_equal(s.mean, 0.0)
    np.testing.assert_array_equal(s.var, 1.0)
    assert s.count.dtype == jnp.int32 and int(s.count) == 0
    s16 = bn.init_state(2, dtype=jnp.bfloat16)
    assert s16.var.dtype == jnp.bfloat16 and s16.count.dtype == jnp.int32


def test_count_keeps_counting_past_float_precision():
    # A bfloat16 count would stop at 256 (256 + 1 rounds to 256), a float32 one at 2**24.
    x = _x((4, 2))
    for start in (256, 2**24):
        state = bn.init_state(2, dtype=jnp.bfloat16)._replace(count=jnp.asarray(start, jnp.int32))
        _, new = bn.batch_norm(x, None, None, state, train=True, cumulative=True)
        assert int(new.count) == start + 1


@pytest.mark.parametrize("bad", [0, -3, (2, 0)])
def test_init_state_rejects_non_positive(bad):
    with pytest.raises(ValueError, match="positive"):
        bn.init_state(bad)


def test_init_state_rejects_bad_type():
    with pytest.raises(TypeError, match="num_features"):
        bn.init_state(2.5)
    with pytest.raises(TypeError, match="floating"):
        bn.init_state(2, dtype=jnp.int32)


def test_state_is_a_pytree():
    s = bn.init_state(3)
    leaves, tree = jax.tree_util.tree_flatten(s)
    assert len(leaves) == 3
    assert jax.tree_util.tree_unflatten(tree, leaves) == s


def test_momentum_conversions():
    assert bn.momentum_from_torch(0.1) == pytest.approx(0.9)
    assert bn.momentum_to_torch(0.99) == pytest.approx(0.01)
    assert bn.momentum_from_torch(bn.momentum_to_torch(0.9)) == pytest.approx(0.9)
    with pytest.raises(ValueError, match="cumulative=True"):
        bn.momentum_from_torch(None)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        bn.momentum_from_torch(1.5)


def test_torch_state_round_trip():
    s = bn.from_torch_state(np.arange(3.0), np.ones(3) * 2, np.int64(5))
    assert s.count.dtype == jnp.int32 and int(s.count) == 5
    d = bn.to_torch_state(s)
    np.testing.assert_array_equal(d["running_mean"], np.arange(3.0))
    assert d["num_batches_tracked"].dtype == np.int64 and int(d["num_batches_tracked"]) == 5
    with pytest.raises(ValueError, match="running_var"):
        bn.from_torch_state(np.zeros(3), np.ones(2))


# --------------------------------------------------------------------------- forward against NumPy


@pytest.mark.parametrize(("shape", "axis"), LAYOUTS)
@pytest.mark.parametrize("affine", [True, False])
def test_train_matches_numpy(shape, axis, affine):
    faxes = _faxes(axis, len(shape))
    fshape = tuple(shape[a] for a in faxes)
    scale, bias, state = _params(fshape)
    if not affine:
        scale = bias = None
    x = _x(shape)
    y, new = bn.batch_norm(x, scale, bias, state, train=True, axis=axis, momentum=0.9)
    y_ref, m_ref, v_ref, _, _ = np_batch_norm_train(
        x, scale, bias, state.mean, state.var, faxes, momentum=0.9
    )
    assert y.shape == x.shape and y.dtype == x.dtype
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(new.mean, m_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new.var, v_ref, rtol=1e-5, atol=1e-6)
    assert float(new.count) == float(state.count) + 1


@pytest.mark.parametrize(("shape", "axis"), LAYOUTS)
def test_eval_matches_numpy_and_keeps_state(shape, axis):
    faxes = _faxes(axis, len(shape))
    fshape = tuple(shape[a] for a in faxes)
    scale, bias, state = _params(fshape)
    x = _x(shape)
    y, new = bn.batch_norm(x, scale, bias, state, train=False, axis=axis)
    ref = np_batch_norm_eval(x, scale, bias, state.mean, state.var, faxes)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    assert new is state


def test_jit_equals_eager_and_does_not_recompile():
    scale, bias, state = _params((5,))
    x = _x((16, 5))
    traces = []

    def f(x, scale, bias, state):
        traces.append(1)
        return bn.batch_norm(x, scale, bias, state, train=True)

    jf = jax.jit(f)
    y1, s1 = jf(x, scale, bias, state)
    y2, _ = jf(x + 1.0, scale, bias, s1)
    assert len(traces) == 1
    y0, s0 = bn.batch_norm(x, scale, bias, state, train=True)
    np.testing.assert_allclose(y1, y0, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(s1.var, s0.var, rtol=1e-6)
    assert y2.shape == x.shape


def test_epsilon_and_momentum_extremes():
    scale, bias, state = _params((5,))
    x = _x((16, 5))
    _, same = bn.batch_norm(x, scale, bias, state, train=True, momentum=1.0)
    np.testing.assert_allclose(same.mean, state.mean)
    _, batch = bn.batch_norm(x, scale, bias, state, train=True, momentum=0.0, epsilon=0.1)
    np.testing.assert_allclose(batch.mean, to_f64(x).mean(0), rtol=1e-5, atol=1e-6)
    y, _ = bn.batch_norm(x, None, None, state, train=True, epsilon=0.1)
    ref, *_ = np_batch_norm_train(x, None, None, state.mean, state.var, (1,), eps=0.1)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- numerics


def test_large_offset_is_accurate():
    x = _x((512, 8), loc=1e4, std=1.0)
    state = bn.init_state(8)
    y, new = bn.batch_norm(x, None, None, state, train=True, momentum=0.0)
    y64 = to_f64(y)
    np.testing.assert_allclose(y64.std(0), 1.0, rtol=1e-2)
    np.testing.assert_allclose(new.var, to_f64(x).var(0), rtol=1e-2)
    np.testing.assert_allclose(new.mean, to_f64(x).mean(0), rtol=1e-6)


@pytest.mark.loose_promotion
def test_flax_default_fails_on_large_offset():
    """Documents the failure jaxnorm avoids: flax's fast variance cancels catastrophically."""
    nn = pytest.importorskip("flax.linen")
    x = _x((512, 8), loc=1e4, std=1.0)
    m = nn.BatchNorm(use_running_average=False, momentum=0.0)
    variables = m.init(jax.random.key(0), x)
    _, upd = m.apply(variables, x, mutable=["batch_stats"])
    true_var = to_f64(x).var(0)
    flax_err = np.abs(np.asarray(upd["batch_stats"]["var"]) - true_var) / true_var
    assert flax_err.max() > 0.5  # flax gets the variance badly wrong (often exactly 0) ...
    _, new = bn.batch_norm(x, None, None, bn.init_state(8), train=True, momentum=0.0)
    ours = np.abs(np.asarray(new.var) - true_var) / true_var
    assert ours.max() < 1e-2  # ... where jaxnorm's one-pass pivoted variance does not.


def test_large_offset_with_masked_first_rows():
    # The pivot must come from a valid row: padding rows of zeros would make a bad one.
    x = np.array(_x((256, 4), loc=1e4, std=1.0))
    x[:8] = 0.0
    mask = np.arange(256) >= 8
    y, new = bn.batch_norm(
        jnp.asarray(x),
        None,
        None,
        bn.init_state(4),
        train=True,
        momentum=0.0,
        mask=jnp.asarray(mask),
    )
    np.testing.assert_allclose(new.var, x[8:].astype(np.float64).var(0), rtol=1e-2)
    np.testing.assert_allclose(to_f64(y)[8:].std(0), 1.0, rtol=1e-2)


# --------------------------------------------------------------------------- accuracy: any batch
# Reference: NumPy float64. Yardstick: a float32 two-pass computation, mean(x) then
# mean((x - mean)^2) (flax's use_fast_variance=False), whose error y's must stay within
# _WITHIN of (floored at one float32 ulp of max|y|, where both are at rounding level).
_WITHIN = 4.0


def _feature_data(kind, shape, rng):
    """float32 data of one of the fuzz's distributions; features on the last axis."""
    c = shape[-1]
    if kind == "offset":
        x = rng.uniform(-1e6, 1e6, c) + rng.normal(size=shape) * 10 ** rng.uniform(-3, 1, c)
    elif kind == "tiny-variance":
        x = rng.normal(size=c) + 1e-5 * rng.normal(size=shape)
    elif kind == "sparse-relu":  # mostly 0 after a ReLU, a few positive, first row large
        x = np.maximum(rng.normal(size=shape) - rng.uniform(2.0, 3.7, c), 0.0)
        x.reshape(-1, c)[0] = rng.uniform(1.0, 5.0, c)
    elif kind == "outlier-first-row":
        x = rng.normal(size=shape)
        x.reshape(-1, c)[0] = rng.choice([-1.0, 1.0], c) * 10 ** rng.uniform(1, 3, c)
    elif kind == "cauchy":
        x = rng.standard_cauchy(size=shape)
    elif kind == "student-t":
        x = 5.0 + rng.standard_t(2.5, size=shape)
    elif kind == "constant":  # half exactly constant, half constant up to 1e-3 noise
        x = np.broadcast_to(100.0 * rng.normal(size=c), shape).copy()
        x[..., : c // 2] += 1e-3 * rng.normal(size=(*shape[:-1], c // 2))
    elif kind == "relu":
        x = np.maximum(rng.normal(size=shape), 0.0)
    elif kind == "periodic":  # conv feature maps (N, H, W, C): a spike every p columns
        w = shape[2]
        p = rng.integers(2, 9, c)
        spikes = (np.arange(w)[:, None] % p == 0).astype(np.float64)
        x = 1e3 + 10.0 * spikes[None, None] + 0.01 * rng.normal(size=shape)
    else:
        raise ValueError(kind)
    return np.asarray(x, np.float32)


def _y_errors(x, y, axes, mask=None):
    """max |y - y64| of jaxnorm's y and of the float32 two-pass yardstick, and max |y64|."""
    x64 = to_f64(x)
    m = np.ones(x.shape) if mask is None else np.broadcast_to(mask, x.shape).astype(np.float64)
    n = m.sum(axes, keepdims=True)
    mu = (m * x64).sum(axes, keepdims=True) / n
    var = (m * (x64 - mu) ** 2).sum(axes, keepdims=True) / n
    y64 = (x64 - mu) / np.sqrt(var + 1e-5)
    xf = jnp.asarray(x, jnp.float32)
    mf = jnp.asarray(m, jnp.float32)
    nf = jnp.sum(mf, axes, keepdims=True)
    mu2 = jnp.sum(mf * xf, axes, keepdims=True) / nf
    var2 = jnp.sum(mf * jnp.square(xf - mu2), axes, keepdims=True) / nf
    y2 = to_f64((xf - mu2) * jax.lax.rsqrt(var2 + 1e-5))
    sel = m > 0
    ours = np.abs(to_f64(y) - y64)[sel].max()
    yard = np.abs(y2 - y64)[sel].max()
    return ours, yard, np.abs(y64[sel]).max()


def _assert_within_two_pass(x, y, axes, mask=None, what=""):
    ours, yard, scale = _y_errors(x, y, axes, mask)
    floor = np.finfo(np.float32).eps * scale
    assert ours <= _WITHIN * max(yard, floor), (what, ours, yard, floor)


_FUZZ_KINDS = [
    "offset",
    "tiny-variance",
    "sparse-relu",
    "outlier-first-row",
    "cauchy",
    "student-t",
    "constant",
    "relu",
]


@functools.cache
def _train_y():
    return jax.jit(
        lambda x: bn.batch_norm(x, None, None, bn.init_state(x.shape[-1]), train=True)[0]
    )


@pytest.mark.parametrize("kind", [*_FUZZ_KINDS, "periodic"])
def test_y_error_within_a_small_factor_of_two_pass(kind):
    # The one-pass variance about the first row lost up to 1e5x the two-pass accuracy here
    # (sparse-relu, outlier-first-row, cauchy; 4-20x on relu, student-t).
    shapes = [(16, 16, 16, 4), (4, 8, 10, 4)] if kind == "periodic" else [(64, 8), (4096, 8)]
    shapes += [] if kind == "periodic" else [(65536, 2)]
    for seed in range(3):
        rng = np.random.default_rng(seed)
        for shape in shapes:
            x = _feature_data(kind, shape, rng)
            y = _train_y()(jnp.asarray(x))
            _assert_within_two_pass(x, y, tuple(range(x.ndim - 1)), what=(kind, shape, seed))


def test_sparse_post_relu_feature_of_262144_rows():
    # The case: first value 3.0, others mostly 0, a few positive. The pivot at 3.0 made
    # the variance 0.46% off and y off by 0.24; flax's two-pass gets 1.5e-5.
    rng = np.random.default_rng(0)
    x = np.maximum(rng.normal(size=(262144, 1)) - 3.0, 0.0).astype(np.float32)
    x[0] = 3.0
    y, new = bn.batch_norm(jnp.asarray(x), None, None, bn.init_state(1), train=True, momentum=0.0)
    np.testing.assert_allclose(new.var, to_f64(x).var(0), rtol=1e-5)
    _assert_within_two_pass(x, y, (0,))
    assert (
        np.abs(to_f64(y) - (to_f64(x) - to_f64(x).mean()) / np.sqrt(to_f64(x).var() + 1e-5)).max()
        < 1e-4
    )


def _np_grad(x, dy, eps=1e-5):
    """dx of sum(y * dy) for y = (x - mu) / sqrt(var + eps), NumPy float64 (the closed form)."""
    x, dy = to_f64(x), to_f64(dy)
    mu, var = x.mean(0), x.var(0)
    inv = 1 / np.sqrt(var + eps)
    xhat = (x - mu) * inv
    return inv * (dy - dy.mean(0) - xhat * (dy * xhat).mean(0))


@pytest.mark.parametrize(
    "x",
    [
        [[1e19], [-1e19]],
        [[1.5e19], [-1.5e19]],  # the squares sum to 4.5e38 (overflow), the variance is 2.25e38
        [[1.8e19], [-1.8e19]],  # variance 3.24e38, just below float32's largest 3.4e38
        [[1e19], [-1e19], [3e18]],
    ],
    ids=["1e19", "1.5e19", "1.8e19", "three"],
)
def test_finite_inputs_with_a_float32_variance_give_finite_results(x):
    x = np.asarray(x, np.float32)
    dy = np.linspace(-1.0, 1.0, x.shape[0], dtype=np.float32)[:, None]
    f = lambda x: bn.batch_norm(x, None, None, bn.init_state(1), train=True, momentum=0.5)
    (y, new), vjp = jax.vjp(f, jnp.asarray(x))
    (dx,) = vjp((jnp.asarray(dy), jax.tree.map(jnp.zeros_like, new)))
    x64 = to_f64(x)
    np.testing.assert_allclose(y, (x64 - x64.mean()) / x64.std(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new.var, 0.5 + 0.5 * x64.var(0), rtol=1e-5)
    np.testing.assert_allclose(new.mean, 0.5 * x64.mean(0), rtol=1e-5, atol=1e13)
    # dx ~ 1 / std ~ 1e-19: compared relative to its scale.
    ref = _np_grad(x, dy)
    np.testing.assert_allclose(dx, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
    assert np.all(np.isfinite(dx))


def test_huge_random_batch_matches_float64():
    rng = np.random.default_rng(1)
    x = (rng.choice([-1.0, 1.0], (1000, 3)) * rng.uniform(0.5, 1.5, (1000, 3)) * 1e19).astype(
        np.float32
    )
    dy = rng.normal(size=(1000, 3)).astype(np.float32)
    f = lambda x: bn.batch_norm(x, None, None, bn.init_state(3), train=True, momentum=0.0)
    (y, new), vjp = jax.vjp(f, jnp.asarray(x))
    (dx,) = vjp((jnp.asarray(dy), jax.tree.map(jnp.zeros_like, new)))
    np.testing.assert_allclose(new.var, to_f64(x).var(0), rtol=1e-5)
    _assert_within_two_pass(x, y, (0,))
    ref = _np_grad(x, dy)
    np.testing.assert_allclose(dx, ref, rtol=1e-3, atol=1e-4 * np.abs(ref).max())


def test_low_precision_outlier_is_accurate():
    # bfloat16 x reduces in float32: the float32 yardstick applies to the rounded values.
    rng = np.random.default_rng(2)
    x = _feature_data("sparse-relu", (8192, 4), rng)
    xb = jnp.asarray(x, jnp.bfloat16)
    y = bn.batch_norm(xb, None, None, bn.init_state(4), train=True, dtype=jnp.float32)[0]
    _assert_within_two_pass(np.asarray(xb.astype(jnp.float32)), y, (0,))


def test_outlier_with_mask_and_ghost_batches():
    rng = np.random.default_rng(3)
    x = _feature_data("sparse-relu", (4096, 4), rng)
    x[2048] = 4.0  # the second ghost batch's first row is an outlier too
    mask = rng.uniform(size=4096) > 0.2
    mask[0] = True
    x[~mask] = np.nan  # padding may hold anything
    y = bn.batch_norm(jnp.asarray(x), None, None, bn.init_state(4), train=True, mask=mask)[0]
    _assert_within_two_pass(np.where(mask[:, None], x, 0.0), y, (0,), mask[:, None], "mask")
    xg = np.where(mask[:, None], x, 0.0).astype(np.float32)
    yg = bn.batch_norm(
        jnp.asarray(xg), None, None, bn.init_state(4), train=True, virtual_batch_size=2048
    )[0]
    for g in range(2):
        rows = slice(2048 * g, 2048 * (g + 1))
        _assert_within_two_pass(xg[rows], yg[rows], (0,), what=f"ghost {g}")


def test_elementwise_mask_with_nan_padding_in_the_first_row():
    # Row 0 is valid for features 0 and 2 but padding (NaN) for feature 1: feature 1's
    # statistics came out NaN when the pivot was row 0 for every feature.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 3)).astype(np.float32)
    mask = np.ones((8, 3), bool)
    mask[0, 1] = False
    x[0, 1] = np.nan
    y, new = bn.batch_norm(
        jnp.asarray(x), None, None, bn.init_state(3), train=True, mask=mask, momentum=0.0
    )
    np.testing.assert_allclose(new.var[1], to_f64(x[1:, 1]).var(), rtol=1e-5)
    assert np.all(np.isfinite(np.asarray(y)[mask]))


def test_elementwise_mask_that_hides_a_feature_from_the_pivot():
    # Feature 1 is valid only in rows 1-14: none is sampled for the pivot (rows 15, 46, ... of
    # 2000) and the first valid example (row 0) is padding for it, so its pivot is 0, 1e6
    # standard deviations from its mean (c ~ 1e12). The refinement passes recover the float64
    # statistics (the pivot at row 0, the NaN padding, made them NaN before).
    rng = np.random.default_rng(6)
    x = (1e4 + 1e-2 * rng.normal(size=(2000, 2))).astype(np.float32)
    mask = np.zeros((2000, 2), bool)
    mask[:, 0] = True
    mask[1:15, 1] = True
    x[~mask] = np.nan
    y, new = bn.batch_norm(
        jnp.asarray(x), None, None, bn.init_state(2), train=True, mask=mask, momentum=0.0
    )
    valid = to_f64(x[1:15, 1])
    np.testing.assert_allclose(new.mean[1], valid.mean(), rtol=1e-7)
    np.testing.assert_allclose(new.var[1], valid.var(), rtol=1e-3)
    _assert_within_two_pass(x[1:15, 1:], y[1:15, 1:], (0,))


def test_vmapped_members_refine_alone_and_exactly_as_unmapped():
    # An ensemble of 4 members, one with a sparse outlier feature: that member is accurate,
    # every member's output equals its unmapped run bit for bit, and the refinement stays a
    # conditional under vmap (a batched predicate would make it a select that always runs).
    rng = np.random.default_rng(4)
    xs = np.stack([rng.normal(size=(4096, 3)) for _ in range(4)]).astype(np.float32)
    xs[2] = _feature_data("sparse-relu", (4096, 3), rng)
    states = jax.vmap(lambda _: bn.init_state(3))(jnp.arange(4))
    f = lambda x, s: bn.batch_norm(x, None, None, s, train=True)
    ys, new = jax.jit(jax.vmap(f))(jnp.asarray(xs), states)
    for i in range(4):
        y, s = jax.jit(f)(jnp.asarray(xs[i]), bn.init_state(3))
        np.testing.assert_array_equal(ys[i], y)
        np.testing.assert_array_equal(new.var[i], s.var)
        _assert_within_two_pass(xs[i], ys[i], (0,), what=i)
    jaxpr = jax.make_jaxpr(jax.vmap(f))(jnp.asarray(xs), states)

    def prims(jaxpr):
        for eqn in jaxpr.eqns:
            yield eqn.primitive.name
            for v in eqn.params.values():
                for sub in v if isinstance(v, tuple) else (v,):
                    sub = getattr(sub, "jaxpr", sub)
                    if hasattr(sub, "eqns"):
                        yield from prims(sub)

    assert "cond" in set(prims(jaxpr.jaxpr))


@pytest.mark.parametrize("order", ["forward-over-reverse", "reverse-over-reverse"])
def test_refinement_is_differentiable_twice(order, monkeypatch):
    # _MAX_SHIFT = 0 forces the refinement passes (a lax.cond, reverse-differentiable) on
    # ordinary data; the Hessian-vector product of sum(w * y) matches central differences of
    # the NumPy float64 closed-form gradient.
    monkeypatch.setattr(bn, "_MAX_SHIFT", 0.0)
    rng = np.random.default_rng(5)
    x = (1.0 + rng.normal(size=(96, 2))).astype(np.float32)
    w, v = (rng.normal(size=(96, 2)).astype(np.float32) for _ in range(2))
    f = lambda x: jnp.sum(w * bn.batch_norm(x, None, None, bn.init_state(2), train=True)[0])
    if order == "forward-over-reverse":
        hv = jax.jvp(jax.grad(f), (jnp.asarray(x),), (jnp.asarray(v),))[1]
    else:
        hv = jax.grad(lambda x: jnp.vdot(jax.grad(f)(x), v))(jnp.asarray(x))
    h = 1e-4
    ref = (_np_grad(to_f64(x) + h * v, w) - _np_grad(to_f64(x) - h * v, w)) / (2 * h)
    np.testing.assert_allclose(hv, ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max())


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize(("shape", "axis"), LAYOUTS[:3])
def test_low_precision(dtype, shape, axis):
    faxes = _faxes(axis, len(shape))
    fshape = tuple(shape[a] for a in faxes)
    scale, bias, state = _params(fshape)
    x = _x(shape, dtype)
    y, new = bn.batch_norm(x, scale, bias, state, train=True, axis=axis, momentum=0.9)
    assert y.dtype == dtype
    assert new.mean.dtype == new.var.dtype == jnp.float32
    y_ref, m_ref, v_ref, _, _ = np_batch_norm_train(
        x, scale, bias, state.mean, state.var, faxes, momentum=0.9
    )
    np.testing.assert_allclose(to_f64(y), y_ref, **tol(dtype, 4.0))
    # Statistics reduce in float32, so they are float32-accurate from the rounded inputs.
    np.testing.assert_allclose(new.mean, m_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new.var, v_ref, rtol=1e-5, atol=1e-5)
    ye, _ = bn.batch_norm(x, scale, bias, state, train=False, axis=axis)
    assert ye.dtype == dtype
    ref = np_batch_norm_eval(x, scale, bias, state.mean, state.var, faxes)
    np.testing.assert_allclose(to_f64(ye), ref, **tol(dtype, 4.0))


@pytest.mark.parametrize("train", [True, False])
def test_output_dtype_casts_once_from_float32(train):
    # bfloat16 x with float32 parameters: dtype=float32 gives y unrounded (flax's output dtype).
    scale, bias, state = _params((5,))
    state = state._replace(mean=jnp.full((5,), 0.1), var=jnp.full((5,), 2.0))
    x = _x((16, 5), jnp.bfloat16)
    y, _ = bn.batch_norm(x, scale, bias, state, train=train, dtype=jnp.float32)
    assert y.dtype == jnp.float32
    if train:
        ref = np_batch_norm_train(x, scale, bias, state.mean, state.var, (1,))[0]
    else:
        ref = np_batch_norm_eval(x, scale, bias, state.mean, state.var, (1,))
    np.testing.assert_allclose(to_f64(y), ref, **tol(jnp.float32, 10.0))
    g = jax.grad(
        lambda x: jnp.sum(
            bn.batch_norm(x, scale, bias, state, train=train, dtype=jnp.float32)[0] ** 2
        )
    )(x)
    assert g.dtype == jnp.bfloat16
    with pytest.raises(TypeError, match="dtype must be a floating dtype"):
        bn.batch_norm(x, scale, bias, state, train=train, dtype=jnp.int32)


def test_low_precision_gradient_dtypes():
    scale, bias, state = _params((5,))
    x = _x((16, 5), jnp.bfloat16)
    f = lambda x, s, b: jnp.sum(
        bn.batch_norm(x, s, b, state, train=True)[0].astype(jnp.float32) ** 2
    )
    gx, gs, gb = jax.grad(f, argnums=(0, 1, 2))(x, scale, bias)
    assert gx.dtype == jnp.bfloat16 and gs.dtype == gb.dtype == jnp.float32
    assert np.all(np.isfinite(to_f64(gx)))


# --------------------------------------------------------------------------- gradients


def _fd_grad(f, args, argnum, eps=1e-6):
    """Central finite differences of a scalar float64 function."""
    f = jax.jit(f)
    args = [np.array(a, np.float64) for a in args]
    x = args[argnum]
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        xp = x.copy()
        xp[i] += eps
        xm = x.copy()
        xm[i] -= eps
        hi = f(*[xp if k == argnum else a for k, a in enumerate(args)])
        lo = f(*[xm if k == argnum else a for k, a in enumerate(args)])
        g[i] = (float(hi) - float(lo)) / (2 * eps)
    return g


GRAD_CASES = [
    pytest.param(dict(shape=(6, 3), axis=-1), id="dense"),
    pytest.param(dict(shape=(3, 2, 2, 3), axis=-1), id="nhwc"),
    pytest.param(dict(shape=(3, 2, 4), axis=(0, 2)), id="two-feature-axes"),
    pytest.param(dict(shape=(6, 3), axis=-1, mask=[1, 1, 0, 1, 0, 1]), id="mask"),
    pytest.param(dict(shape=(6, 3), axis=-1, activation="tanh"), id="tanh"),
    pytest.param(dict(shape=(6, 3), axis=-1, activation="gelu"), id="gelu"),
    pytest.param(dict(shape=(8, 3), axis=-1, virtual_batch_size=4), id="ghost"),
    pytest.param(
        dict(shape=(6, 3), axis=-1, activation="elu", mask=[0, 1, 1, 1, 1, 0]), id="mask-elu"
    ),
]


@pytest.mark.parametrize("case", GRAD_CASES)
def test_gradients_match_finite_differences(case):
    case = dict(case)
    shape, axis = case.pop("shape"), case.pop("axis")
    mask = case.pop("mask", None)
    faxes = _faxes(axis, len(shape))
    fshape = tuple(shape[a] for a in faxes)
    rng = np.random.default_rng(3)
    x0 = rng.normal(size=shape) * 1.5 + 0.3
    s0 = rng.uniform(0.5, 2.0, fshape)
    b0 = rng.normal(size=fshape)
    w = rng.normal(size=shape)
    with jax.enable_x64(True):
        state = bn.init_state(fshape, dtype=jnp.float64)
        m = None if mask is None else jnp.asarray(np.asarray(mask, bool))

        def loss(x, s, b):
            y, _ = bn.batch_norm(x, s, b, state, train=True, axis=axis, mask=m, **case)
            return jnp.sum(y * w)

        args = [jnp.asarray(a) for a in (x0, s0, b0)]
        grads = jax.grad(loss, argnums=(0, 1, 2))(*args)
        loss_np = lambda *a: loss(*map(jnp.asarray, a))  # one compiled program for all three
        for k in range(3):
            fd = _fd_grad(loss_np, args, k)
            np.testing.assert_allclose(grads[k], fd, rtol=1e-6, atol=1e-7)
        # Forward mode (jacfwd goes through the JVP rule directly) agrees with reverse mode.
        jf = jax.jacfwd(loss, argnums=(0, 1, 2))(*args)
        for a, b in zip(jf, grads, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_masked_rows_gradient_is_scale_over_sigma():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(6, 2)))
    mask = np.array([1, 1, 1, 1, 0, 0], bool)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.normal(size=(6, 2)))
        scale = jnp.asarray([2.0, 0.5])
        state = bn.init_state(2, dtype=jnp.float64)
        dy = jnp.asarray(rng.normal(size=(6, 2)))
        f = lambda x: bn.batch_norm(x, scale, None, state, train=True, mask=mask, epsilon=1e-30)[0]
        _, vjp = jax.vjp(f, x)
        (dx,) = vjp(dy)
        sigma = np.asarray(x)[mask].std(0)
        np.testing.assert_allclose(
            dx[~mask], np.asarray(dy)[~mask] * np.asarray(scale) / sigma, rtol=1e-10
        )


def test_closed_form_backward():
    """dx = scale * inv_std / N * (N dy - sum dy - xhat sum(dy xhat)), Ioffe & Szegedy (2015)."""
    rng = np.random.default_rng(1)
    with jax.enable_x64(True):
        x = rng.normal(size=(10, 3)) + 2.0
        dy = rng.normal(size=(10, 3))
        scale = rng.uniform(0.5, 2.0, 3)
        state = bn.init_state(3, dtype=jnp.float64)
        f = lambda x, s, b: bn.batch_norm(x, s, b, state, train=True, epsilon=1e-3)[0]
        _, vjp = jax.vjp(f, jnp.asarray(x), jnp.asarray(scale), jnp.zeros(3))
        dx, ds, db = vjp(jnp.asarray(dy))
    n = x.shape[0]
    inv_std = 1 / np.sqrt(x.var(0) + 1e-3)
    xhat = (x - x.mean(0)) * inv_std
    ref = scale * inv_std / n * (n * dy - dy.sum(0) - xhat * (dy * xhat).sum(0))
    np.testing.assert_allclose(dx, ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ds, (dy * xhat).sum(0), rtol=1e-10)
    np.testing.assert_allclose(db, dy.sum(0), rtol=1e-10)


def test_relu_fused_gradient_matches_unfused():
    scale, bias, state = _params((4,))
    x = _x((32, 4))
    dy = _x((32, 4), seed=7)

    def fused(x, s, b):
        return bn.batch_norm(x, s, b, state, train=True, activation="relu")[0]

    def unfused(x, s, b):
        return jax.nn.relu(bn.batch_norm(x, s, b, state, train=True)[0])

    y1, vjp1 = jax.vjp(fused, x, scale, bias)
    y2, vjp2 = jax.vjp(unfused, x, scale, bias)
    np.testing.assert_allclose(y1, y2, rtol=1e-6, atol=1e-6)
    for a, b in zip(vjp1(dy), vjp2(dy), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(y1) >= 0, True)


@pytest.mark.parametrize(
    "fused, unfused",
    [
        ("relu", activations.relu),
        (jax.nn.relu, jax.nn.relu),
        ("leaky_relu", activations.leaky_relu),
        (
            functools.partial(activations.leaky_relu, negative_slope=0.25),
            functools.partial(activations.leaky_relu, negative_slope=0.25),
        ),
    ],
    ids=["relu", "jax.nn.relu", "leaky_relu", "leaky_relu-0.25"],
)
def test_rectifier_kinks_match_the_unfused_activation(fused, unfused):
    # Column values symmetric about 0: the middle row is exactly the mean, so its pre-activation
    # is exactly the bias, 0 (relu'(0) = 0, leaky_relu'(0) = s); tiny positive pre too.
    x = np.array([[-2.0, -1.0], [-1.0, -3.0], [0.0, 0.0], [1.0, 3.0], [2.0, 1.0]], np.float32)
    scale = jnp.array([1.0, 2.0])
    dy = jnp.asarray(np.random.default_rng(3).normal(size=x.shape), jnp.float32)
    state = bn.init_state(2)
    for bias in (jnp.zeros(2), jnp.array([1e-30, -1e-30])):
        f1 = lambda x, s, b: bn.batch_norm(x, s, b, state, train=True, activation=fused)[0]
        f2 = lambda x, s, b: unfused(bn.batch_norm(x, s, b, state, train=True)[0])
        (y1, vjp1), (y2, vjp2) = jax.vjp(f1, x, scale, bias), jax.vjp(f2, x, scale, bias)
        np.testing.assert_array_equal(y1, y2)
        for a, b in zip(vjp1(dy), vjp2(dy), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


_RECTIFIERS = [
    ("relu", activations.relu),
    ("leaky_relu", activations.leaky_relu),
    (
        functools.partial(activations.leaky_relu, negative_slope=0.25),
        functools.partial(activations.leaky_relu, negative_slope=0.25),
    ),
]


def _edge_pre(dtype):
    sub = np.finfo(dtype).smallest_subnormal
    return np.array([sub, -sub, 0.0, -0.0, np.nan, -np.nan, np.inf, -np.inf, 1e-30, -2.0], dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("fused, unfused", _RECTIFIERS, ids=["relu", "leaky_relu", "leaky-0.25"])
def test_fused_rectifier_derivative_is_the_activation_s_at_every_edge(fused, unfused, dtype):
    # The fused backward's step at +-smallest subnormal, +-0, NaN, +-inf equals
    # jaxnorm.activations' derivative (1 at a positive subnormal: XLA:CPU takes a subnormal
    # operand as 0, so the arithmetic step gave 0 there).
    with jax.enable_x64(dtype == np.float64):
        pre = jnp.asarray(_edge_pre(dtype))
        t = jnp.asarray(np.linspace(0.5, 2.0, pre.size), dtype)
        act = bn._resolve_activation(fused)
        got = jax.jit(lambda p, t: bn._activation_jvp(act, p, t))(pre, t)
        want = jax.jit(lambda p, t: jax.jvp(unfused, (p,), (t,))[1])(pre, t)
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("fused, unfused", _RECTIFIERS, ids=["relu", "leaky_relu", "leaky-0.25"])
def test_fused_rectifier_at_edge_pre_activations_equals_batch_norm_then_activation(fused, unfused):
    # Each column is symmetric about its mean, so the middle row's pre-activation is exactly
    # the bias: +-smallest subnormal, +-0, NaN, and normal values. Values and all gradients of
    # the fused op equal batch_norm followed by jaxnorm.activations' function.
    pre = _edge_pre(np.float32)[[0, 1, 2, 3, 4, 8, 9]]
    x = np.array([[-1.0] * pre.size, [0.0] * pre.size, [1.0] * pre.size], np.float32)
    scale = jnp.asarray(np.linspace(0.5, 2.0, pre.size), jnp.float32)
    bias = jnp.asarray(pre)
    dy = jnp.asarray(np.random.default_rng(3).normal(size=x.shape), jnp.float32)
    state = bn.init_state(pre.size)
    f1 = lambda x, s, b: bn.batch_norm(x, s, b, state, train=True, activation=fused)
    f2 = lambda x, s, b: (lambda y, st: (unfused(y), st))(
        *bn.batch_norm(x, s, b, state, train=True)
    )
    (y1, s1), vjp1 = jax.vjp(f1, x, scale, bias)
    (y2, s2), vjp2 = jax.vjp(f2, x, scale, bias)
    np.testing.assert_array_equal(y1, y2)
    jax.tree.map(np.testing.assert_array_equal, s1, s2)
    ct = (dy, jax.tree.map(jnp.zeros_like, s1))
    for a, b in zip(vjp1(ct), vjp2(ct), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    assert np.all(np.isnan(np.asarray(y1)[:, 4])) and not np.any(np.isnan(np.asarray(y1)[:, 5:]))


@pytest.mark.parametrize(
    "activation",
    [
        "relu",
        "leaky_relu",
        jax.nn.relu,
        functools.partial(activations.leaky_relu, negative_slope=0.2),
        "elu",
    ],
    ids=["relu", "leaky_relu", "jax.nn.relu", "leaky_relu-0.2", "elu"],
)
def test_fused_activation_propagates_nan(activation):
    # A NaN in x: its feature's statistics, running statistics and outputs are NaN (y stayed
    # finite, 0, with the running statistics NaN), its gradient too; other features are not.
    x = np.array(_x((8, 3)))
    x[2, 0] = np.nan
    f = lambda x, mask=None: bn.batch_norm(
        x, None, None, bn.init_state(3), train=True, activation=activation, mask=mask
    )
    (y, new), vjp = jax.vjp(f, jnp.asarray(x))
    dx = vjp((jnp.ones_like(y), jax.tree.map(jnp.zeros_like, new)))[0]
    for a in (y[:, 0], new.mean[0], new.var[0], dx[:, 0]):
        assert np.all(np.isnan(a)), a
    for a in (y[:, 1:], new.mean[1:], new.var[1:], dx[:, 1:]):
        assert np.all(np.isfinite(a)), a
    # In a masked row the statistics stay finite, and the NaN reaches that row's y and dx
    # (the activation's derivative there is NaN in the fused backward, as unfused).
    mask = np.arange(8) != 2
    (y, new), vjp = jax.vjp(lambda x: f(x, mask), jnp.asarray(x))
    dx = vjp((jnp.ones_like(y), jax.tree.map(jnp.zeros_like, new)))[0]
    assert np.isnan(y[2, 0]) and np.isnan(dx[2, 0])
    assert np.all(np.isfinite(np.asarray(y)[mask])) and np.all(np.isfinite(new.var))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "elu"])
def test_fused_activation_adds_no_x_sized_temporary(activation, dtype):
    # Compiled, a training step with the activation fused holds no more x-sized temporaries
    # than batch norm alone (on CPU the masked dy and x - mean, and for bfloat16 x converted
    # to float32, were written out before).
    x = jnp.asarray(_x((256, 32)), dtype)

    def step(act):
        def f(x, dy, s, b):
            g = lambda x, s, b: bn.batch_norm(
                x, s, b, bn.init_state(32), train=True, activation=act
            )
            y, vjp, _ = jax.vjp(g, x, s, b, has_aux=True)
            return y, vjp(dy)

        mem = jax.jit(f).lower(x, x, jnp.ones(32), jnp.zeros(32)).compile().memory_analysis()
        if mem is None:
            pytest.skip("this backend reports no memory analysis")
        return mem.temp_size_in_bytes

    assert step(activation) < step(None) + x.nbytes // 2


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_training_step_holds_no_x_sized_temporary_but_dy_in_float32(dtype):
    # Compiled, the step (y, dx, dscale, dbias) holds at most one x-sized temporary: dy
    # converted to float32 for a low-precision dy. The refinement branch's sums read x each
    # through their own view (a shared x - mean was an x-sized temporary, allocated with the
    # program even when the branch does not run; on CPU it doubled the step's temporaries).
    x = jnp.asarray(_x((512, 64)), dtype)

    def f(x, dy, s, b):
        g = lambda x, s, b: bn.batch_norm(x, s, b, bn.init_state(64), train=True)
        y, vjp, _ = jax.vjp(g, x, s, b, has_aux=True)
        return y, vjp(dy)

    mem = jax.jit(f).lower(x, x, jnp.ones(64), jnp.zeros(64)).compile().memory_analysis()
    if mem is None:
        pytest.skip("this backend reports no memory analysis")
    dy_f32 = 0 if dtype == jnp.float32 else x.size * 4
    assert mem.temp_size_in_bytes < dy_f32 + x.nbytes // 2, mem.temp_size_in_bytes


@pytest.mark.parametrize("activation", [None, "relu"])
def test_backward_residuals_are_x_and_per_feature_stats(activation, capsys):
    scale, bias, state = _params((8,))
    x = _x((64, 8))
    f = lambda x, s, b: bn.batch_norm(x, s, b, state, train=True, activation=activation)[0]
    ad_checkpoint.print_saved_residuals(f, x, scale, bias)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    big = [ln for ln in lines if "[64,8]" in ln]
    assert len(big) == 1 and "argument" in big[0], lines


def test_state_carries_no_gradient():
    scale, bias, state = _params((5,))
    x = _x((16, 5))
    f = lambda x: jnp.sum(bn.batch_norm(x, scale, bias, state, train=True)[1].var)
    np.testing.assert_array_equal(jax.grad(f)(x), 0.0)


# --------------------------------------------------------------------------- transforms


def test_vmap_over_models_equals_loop():
    models = 3
    x = _x((16, 5))
    params = [_params((5,), seed=s) for s in range(models)]
    stack = lambda *t: jnp.stack(t)
    scales = stack(*[p[0] for p in params])
    biases = stack(*[p[1] for p in params])
    states = jax.tree_util.tree_map(stack, *[p[2] for p in params])
    f = lambda s, b, st: bn.batch_norm(x, s, b, st, train=True, activation="relu")
    ys, new = jax.vmap(f)(scales, biases, states)
    assert new.count.shape == (models,)
    for i, (s, b, st) in enumerate(params):
        y, n = f(s, b, st)
        np.testing.assert_allclose(ys[i], y, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(new.var[i], n.var, rtol=1e-6)
    # ... and gradients of an ensemble loss.
    g = jax.grad(lambda s: jnp.sum(jax.vmap(f)(s, biases, states)[0]))(scales)
    assert g.shape == scales.shape and np.all(np.isfinite(g))


def test_vmap_over_batch_axis_name():
    # vmap with an axis name pools statistics over the mapped axis like devices would.
    x = _x((4, 8, 3))
    state = bn.init_state(3)
    f = lambda xi: bn.batch_norm(xi, None, None, state, train=True, axis_name="d")
    ys, new = jax.vmap(f, axis_name="d")(x)
    y_ref, m_ref, _, _, _ = np_batch_norm_train(
        x.reshape(32, 3), None, None, state.mean, state.var, (1,)
    )
    np.testing.assert_allclose(ys.reshape(32, 3), y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new.mean[0], m_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("axis_name", ["batch", ("data", "batch")])
def test_unbound_axis_name_is_named_at_the_boundary(axis_name):
    # JAX's own error spoke of axis_index, which the caller never called; the type stays
    # NameError (flax's). Raised at trace time, under jit too.
    f = lambda x: bn.batch_norm(x, None, None, bn.init_state(3), train=True, axis_name=axis_name)
    for call in (f, jax.jit(f)):
        with pytest.raises(NameError) as info:
            call(_x((4, 3)))
        message = str(info.value)
        assert f"axis_name={axis_name!r}" in message and "'batch' is bound" in message
        assert "shard_map" in message and "axis_name=None" in message
        assert "axis_index" not in message
        assert info.value.__traceback__ is not None
    # Bound (here by vmap, the outer name of the tuple too), it runs; evaluation needs no axis.
    names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    g = f
    for name in names:
        g = jax.vmap(g, axis_name=name)
    y, _ = g(_x((1, 1, 4, 3)) if len(names) == 2 else _x((1, 4, 3)))
    assert np.all(np.isfinite(y))
    bn.batch_norm(_x((4, 3)), None, None, bn.init_state(3), train=False, axis_name=axis_name)


def test_eval_shape():
    scale, bias, state = _params((6,))
    out = jax.eval_shape(
        functools.partial(bn.batch_norm, train=True, activation="relu"),
        jax.ShapeDtypeStruct((4, 3, 3, 6), jnp.bfloat16),
        scale,
        bias,
        state,
    )
    y, new = out
    assert y.shape == (4, 3, 3, 6) and y.dtype == jnp.bfloat16
    assert new.mean.shape == (6,) and new.mean.dtype == jnp.float32


def test_jacfwd_jacrev_agree():
    scale, bias, state = _params((3,))
    x = _x((5, 3))
    f = lambda x: bn.batch_norm(x, scale, bias, state, train=True, activation="silu")[0]
    jf = jax.jacfwd(f)(x)
    jr = jax.jacrev(f)(x)
    assert jf.shape == (5, 3, 5, 3)
    np.testing.assert_allclose(jf, jr, rtol=1e-5, atol=1e-6)


def test_hessian_vector_product_is_finite():
    scale, bias, state = _params((3,))
    x = _x((6, 3))
    f = lambda x: jnp.sum(bn.batch_norm(x, scale, bias, state, train=True)[0] ** 3)
    h = jax.jacfwd(jax.grad(f))(x)
    assert h.shape == (6, 3, 6, 3) and np.all(np.isfinite(h))
    np.testing.assert_allclose(h.reshape(18, 18), h.reshape(18, 18).T, rtol=1e-3, atol=1e-3)


def test_checkpoint():
    scale, bias, state = _params((5,))
    x = _x((16, 5))
    f = lambda x, s: jnp.sum(jnp.sin(bn.batch_norm(x, s, bias, state, train=True)[0]))
    g1 = jax.grad(f, argnums=(0, 1))(x, scale)
    g2 = jax.grad(jax.checkpoint(f), argnums=(0, 1))(x, scale)
    for a, b in zip(g1, g2, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_traced_momentum_and_renorm_bounds():
    scale, bias, state = _params((5,))
    x = _x((16, 5))

    @jax.jit
    def f(m, rmax, dmax):
        return bn.batch_norm(
            x, scale, bias, state, train=True, momentum=m, renorm=True, r_max=rmax, d_max=dmax
        )

    y, new = f(0.5, 1.0, 0.0)
    # r_max=1, d_max=0 make renorm plain batch norm.
    y_ref, m_ref, *_ = np_batch_norm_train(
        x, scale, bias, state.mean, state.var, (1,), momentum=0.5
    )
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new.mean, m_ref, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- masks


MASK_CASES = [
    pytest.param((12, 4), -1, "batch", id="dense-batch-shape"),
    pytest.param((4, 3, 3, 6), -1, "batch", id="nhwc-batch-shape"),
    pytest.param((4, 3, 3, 6), -1, "rows", id="nhwc-rows-broadcast"),
    pytest.param((4, 6, 3, 2), 1, "batch", id="nchw-batch-shape"),
    pytest.param((12, 4), -1, "elementwise", id="elementwise"),
]


@pytest.mark.parametrize(("shape", "axis", "kind"), MASK_CASES)
def test_mask_matches_numpy(shape, axis, kind):
    faxes = _faxes(axis, len(shape))
    fshape = tuple(shape[a] for a in faxes)
    scale, bias, state = _params(fshape)
    x = _x(shape)
    rng = np.random.default_rng(5)
    batch_shape = tuple(s for a, s in enumerate(shape) if a not in faxes)
    if kind == "batch":
        mask = rng.uniform(size=batch_shape) > 0.3
        full = np.expand_dims(mask, faxes)
    elif kind == "rows":
        mask = (rng.uniform(size=(shape[0],)) > 0.3).reshape((shape[0],) + (1,) * (len(shape) - 1))
        mask[0] = True
        full = mask
    else:
        mask = rng.uniform(size=shape) > 0.3
        full = mask
    y, new = bn.batch_norm(x, scale, bias, state, train=True, axis=axis, mask=mask, momentum=0.8)
    y_ref, m_ref, v_ref, _, _ = np_batch_norm_train(
        x, scale, bias, state.mean, state.var, faxes, momentum=0.8, mask=full
    )
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(new.mean, m_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new.var, v_ref, rtol=1e-5, atol=1e-6)


def test_masked_rows_may_hold_garbage():
    x = np.array(_x((8, 3)))
    x[0] = np.nan
    x[5] = np.inf
    mask = np.ones(8, bool)
    mask[[0, 5]] = False
    state = bn.init_state(3)
    y, new = bn.batch_norm(jnp.asarray(x), None, None, state, train=True, mask=mask, momentum=0.0)
    np.testing.assert_allclose(new.var, x[mask].astype(np.float64).var(0), rtol=1e-5)
    assert np.all(np.isfinite(np.asarray(y)[mask]))


def test_fully_masked_batch_keeps_state():
    scale, bias, state = _params((3,))
    y, new = bn.batch_norm(_x((8, 3)), scale, bias, state, train=True, mask=np.zeros(8, bool))
    np.testing.assert_array_equal(new.mean, state.mean)
    np.testing.assert_array_equal(new.var, state.var)
    assert np.all(np.isfinite(np.asarray(y)))


# --------------------------------------------------------------------------- complex x


def _cx(shape, dtype=jnp.complex64, seed=1):
    rng = np.random.default_rng(seed)
    return jnp.asarray(0.5 - 1j + rng.normal(size=shape) + 1j * rng.normal(size=shape), dtype)


def _np_complex_train(x, scale, bias, mean0, var0, raxes, mask, momentum, eps=1e-5):
    """flax.linen's complex batch norm in NumPy complex128: E[x], E|x - E[x]|^2 (real)."""
    x = np.asarray(x).astype(np.complex128)
    m = np.broadcast_to(np.ones(()) if mask is None else np.asarray(mask, np.float64), x.shape)
    xz = np.where(m > 0, x, 0)
    n = m.sum(axis=raxes, keepdims=True)
    mu = xz.sum(axis=raxes, keepdims=True) / n
    var = (m * np.abs(xz - mu) ** 2).sum(axis=raxes, keepdims=True) / n
    y = (x - mu) / np.sqrt(var + eps) * to_f64(scale) + to_f64(bias)
    fshape = scale.shape
    new_mean = momentum * to_f64(mean0) + (1 - momentum) * mu.reshape(fshape)
    new_var = momentum * to_f64(var0) + (1 - momentum) * var.reshape(fshape)
    return y, new_mean, new_var


@pytest.mark.parametrize("dtype", [jnp.complex64, jnp.complex128])
@pytest.mark.parametrize("masked", [False, True])
def test_complex_train_and_eval_match_numpy(dtype, masked):
    # As flax.linen (its test_batch_norm_complex): complex y and running mean, real variance
    # E|x - mean|^2, masked positions holding NaN padding.
    with jax.enable_x64(dtype == jnp.complex128):
        x = np.array(_cx((4, 3, 2), dtype))
        mask = np.random.default_rng(2).random((4, 3, 1)) < 0.7 if masked else None
        if masked:
            x = np.where(mask, x, np.nan)
        scale, bias, state = _params((2,))
        y, new = bn.batch_norm(x, scale, bias, state, train=True, momentum=0.9, mask=mask)
        y_ref, m_ref, v_ref = _np_complex_train(
            x, scale, bias, state.mean, state.var, (0, 1), mask, 0.9
        )
        # The running mean's dtype is the promotion of the stored float32 with x's (as flax).
        assert y.dtype == dtype and new.mean.dtype == dtype
        assert new.var.dtype == jnp.float32 and int(new.count) == 4
        valid = np.broadcast_to(True if mask is None else mask, x.shape)
        np.testing.assert_allclose(np.asarray(y)[valid], y_ref[valid], rtol=2e-5, atol=2e-5)
        np.testing.assert_allclose(new.mean, m_ref, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(new.var, v_ref, rtol=1e-5, atol=1e-6)
        # Evaluation with the complex running mean and the real running variance.
        y_e, same = bn.batch_norm(x, scale, bias, new, train=False)
        assert y_e.dtype == dtype and same is new
        ref_e = x.astype(np.complex128) - to_f64(new.mean.real) - 1j * to_f64(new.mean.imag)
        ref_e = ref_e / np.sqrt(to_f64(new.var) + 1e-5) * to_f64(scale) + to_f64(bias)
        np.testing.assert_allclose(np.asarray(y_e)[valid], ref_e[valid], rtol=2e-5, atol=2e-5)


def test_complex_large_offset_is_accurate():
    # |mean| >> std: E|x|^2 - |E x|^2 (flax's fast variance) cancels; jaxnorm's does not.
    x = _cx((256, 2), seed=4) + jnp.complex64(1e4 + 1e4j)
    _, new = bn.batch_norm(x, None, None, bn.init_state(2), train=True, momentum=0.0)
    xd = np.asarray(x).astype(np.complex128)
    ref = (np.abs(xd - xd.mean(0)) ** 2).mean(0)
    np.testing.assert_allclose(new.var, ref, rtol=1e-4)


def test_complex_gradient_matches_the_formula_in_float64():
    # The reference: the textbook two-pass formula, differentiated by JAX in complex128.
    with jax.enable_x64(True):
        x = _cx((6, 2), jnp.complex128, seed=5)
        scale = jnp.array([1.5, 0.5])
        bias = jnp.array([0.1, -0.2])
        dy = _cx((6, 2), jnp.complex128, seed=6)
        mask = jnp.array([True, True, False, True, True, True])[:, None]

        def ref(x, scale, bias):
            mu = jnp.sum(jnp.where(mask, x, 0), 0, keepdims=True) / 5
            var = jnp.sum(jnp.where(mask, jnp.abs(x - mu) ** 2, 0), 0, keepdims=True) / 5
            gain = (scale[None] / jnp.sqrt(var + 1e-5)).astype(x.dtype)
            return (x - mu) * gain + bias[None].astype(x.dtype)

        def ours(x, scale, bias):
            state = bn.init_state(2, dtype=jnp.float64)
            return bn.batch_norm(x, scale, bias, state, train=True, mask=mask)[0]

        (y1, vjp1), (y2, vjp2) = jax.vjp(ours, x, scale, bias), jax.vjp(ref, x, scale, bias)
        np.testing.assert_allclose(y1, y2, rtol=1e-12, atol=1e-12)
        for a, b in zip(vjp1(dy), vjp2(dy), strict=True):
            assert a.dtype == b.dtype
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_complex_statistics_over_axis_name_and_ghost_batches():
    x = _cx((4, 6, 3), seed=7)
    state = bn.init_state(3)
    f = lambda xi: bn.batch_norm(xi, None, None, state, train=True, axis_name="d", momentum=0.0)
    ys, new = jax.vmap(f, axis_name="d")(x)
    y1, one = bn.batch_norm(x.reshape(24, 3), None, None, state, train=True, momentum=0.0)
    np.testing.assert_allclose(ys.reshape(24, 3), y1, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new.mean[0], one.mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new.var[0], one.var, rtol=1e-5, atol=1e-6)
    # Ghost batches: each group of 6 rows alone; the running statistics average the groups'.
    y_g, g = bn.batch_norm(
        x.reshape(24, 3), None, None, state, train=True, momentum=0.0, virtual_batch_size=6
    )
    parts = [bn.batch_norm(x[i], None, None, state, train=True, momentum=0.0) for i in range(4)]
    np.testing.assert_allclose(y_g.reshape(4, 6, 3), jnp.stack([p[0] for p in parts]), atol=1e-5)
    np.testing.assert_allclose(g.mean, np.mean([p[1].mean for p in parts], 0), atol=1e-6)
    np.testing.assert_allclose(g.var, np.mean([p[1].var for p in parts], 0), rtol=1e-5)


@pytest.mark.parametrize(
    "kw, error, match",
    [
        ({"activation": "relu"}, TypeError, "activation=.* cannot be fused .* complex x"),
        ({"renorm": True}, TypeError, "renorm=True is not defined for complex x"),
        ({"dtype": jnp.float32}, TypeError, "dtype must be a complex dtype"),
        ({"scale": jnp.ones(3, jnp.complex64)}, TypeError, "scale must have a floating dtype"),
    ],
    ids=["activation", "renorm", "real dtype", "complex scale"],
)
def test_complex_errors(kw, error, match):
    kw = {"scale": None} | kw
    scale = kw.pop("scale")
    with pytest.raises(error, match=match):
        bn.batch_norm(_cx((4, 3)), scale, None, bn.init_state(3), train=True, **kw)


def test_complex_running_mean_folds_and_refuses_real_x_and_torch():
    x = _cx((4, 3))
    scale, bias, _ = _params((3,))
    _, new = bn.batch_norm(x, scale, bias, bn.init_state(3), train=True, momentum=0.5)
    a, b = bn.fold(scale, bias, new)
    y, _ = bn.batch_norm(x, scale, bias, new, train=False)
    assert a.dtype == jnp.float32 and b.dtype == jnp.complex64
    np.testing.assert_allclose(x * a[None].astype(x.dtype) + b[None], y, rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match=r"state\.mean is complex"):
        bn.batch_norm(_x((4, 3)), None, None, new, train=True)
    with pytest.raises(TypeError, match="to_torch_state needs a real running mean"):
        bn.to_torch_state(new)


# --------------------------------------------------------------------------- PyTorch conventions


def _torch_bn(torch, shape, **kw):
    layer = (torch.nn.BatchNorm1d if len(shape) in (2, 3) else torch.nn.BatchNorm2d)(shape[1], **kw)
    with torch.no_grad():
        layer.weight.copy_(torch.linspace(0.5, 1.5, shape[1]))
        layer.bias.copy_(torch.linspace(-1.0, 1.0, shape[1]))
    return layer


@pytest.mark.parametrize("shape", [(16, 4), (4, 3, 5, 5)], ids=["1d", "2d"])
@pytest.mark.parametrize("torch_momentum", [0.1, None], ids=["m0.1", "cumulative"])
def test_torch_parity(shape, torch_momentum):
    torch = pytest.importorskip("torch")
    layer = _torch_bn(torch, shape, momentum=torch_momentum, eps=1e-5)
    layer.train()
    scale = jnp.asarray(layer.weight.detach().numpy())
    bias = jnp.asarray(layer.bias.detach().numpy())
    state = bn.init_state(shape[1])
    kw = (
        dict(cumulative=True)
        if torch_momentum is None
        else dict(momentum=bn.momentum_from_torch(torch_momentum))
    )
    for step in range(3):
        x = np.array(_x(shape, seed=10 + step, loc=step))
        with torch.no_grad():
            yt = layer(torch.from_numpy(x)).numpy()
        y, state = bn.batch_norm(
            jnp.asarray(x), scale, bias, state, train=True, axis=1, unbiased_running_var=True, **kw
        )
        np.testing.assert_allclose(y, yt, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(state.mean, layer.running_mean.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.var, layer.running_var.numpy(), rtol=1e-5, atol=1e-6)
    assert int(state.count) == int(layer.num_batches_tracked)
    # Load torch's buffers and compare inference.
    loaded = bn.from_torch_state(
        layer.running_mean.numpy(), layer.running_var.numpy(), layer.num_batches_tracked.numpy()
    )
    layer.eval()
    x = np.array(_x(shape, seed=99))
    with torch.no_grad():
        yt = layer(torch.from_numpy(x)).numpy()
    y, _ = bn.batch_norm(jnp.asarray(x), scale, bias, loaded, train=False, axis=1)
    np.testing.assert_allclose(y, yt, rtol=1e-4, atol=1e-4)


def test_cumulative_matches_numpy_average():
    state = bn.init_state(3)
    xs = [_x((10, 3), seed=s, loc=s) for s in range(4)]
    for x in xs:
        _, state = bn.batch_norm(x, None, None, state, train=True, cumulative=True)
    np.testing.assert_allclose(state.mean, np.mean([to_f64(x).mean(0) for x in xs], 0), rtol=1e-5)
    np.testing.assert_allclose(state.var, np.mean([to_f64(x).var(0) for x in xs], 0), rtol=1e-5)
    assert float(state.count) == 4


def test_unbiased_running_var():
    x = _x((10, 3))
    _, s = bn.batch_norm(
        x, None, None, bn.init_state(3), train=True, momentum=0.0, unbiased_running_var=True
    )
    np.testing.assert_allclose(s.var, to_f64(x).var(0, ddof=1), rtol=1e-5)


# --------------------------------------------------------------------------- renorm and ghost BN


def np_renorm(x, scale, bias, mean0, var0, r_max, d_max, eps):
    x = to_f64(x)
    mu, var = x.mean(0), x.var(0)
    sb = np.sqrt(var + eps)
    s = np.sqrt(to_f64(var0) + eps)
    r = np.clip(sb / s, 1 / r_max, r_max)
    d = np.clip((mu - to_f64(mean0)) / s, -d_max, d_max)
    xhat = (x - mu) / sb * r + d
    return xhat * to_f64(scale) + to_f64(bias), xhat, r


@pytest.mark.parametrize(("r_max", "d_max"), [(3.0, 5.0), (1.2, 0.3)])
def test_renorm_matches_numpy(r_max, d_max):
    scale, bias, state = _params((4,))
    x = _x((32, 4), loc=1.5, std=3.0)
    y, new = bn.batch_norm(
        x, scale, bias, state, train=True, renorm=True, r_max=r_max, d_max=d_max, momentum=0.9
    )
    ref, xhat, r = np_renorm(x, scale, bias, state.mean, state.var, r_max, d_max, 1e-5)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=2e-5)
    _, m_ref, v_ref, _, _ = np_batch_norm_train(
        x, scale, bias, state.mean, state.var, (1,), momentum=0.9
    )
    np.testing.assert_allclose(new.mean, m_ref, rtol=1e-5)
    np.testing.assert_allclose(new.var, v_ref, rtol=1e-5)
    # The gradient treats r and d as constants (Ioffe 2017): dx is the BN formula scaled by r.
    dy = np.asarray(_x((32, 4), seed=4))
    _, vjp = jax.vjp(
        lambda x, s: bn.batch_norm(
            x, s, bias, state, train=True, renorm=True, r_max=r_max, d_max=d_max
        )[0],
        x,
        scale,
    )
    dx, ds = vjp(jnp.asarray(dy))
    x64 = to_f64(x)
    inv_std = 1 / np.sqrt(x64.var(0) + 1e-5)
    xb = (x64 - x64.mean(0)) * inv_std
    n = x.shape[0]
    ref_dx = to_f64(scale) * r * inv_std / n * (n * dy - dy.sum(0) - xb * (dy * xb).sum(0))
    np.testing.assert_allclose(dx, ref_dx, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ds, (dy * xhat).sum(0), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("shape", "vbs"), [((12, 3), 4), ((8, 2, 2, 3), 2)])
def test_ghost_batch_norm_matches_numpy(shape, vbs):
    scale, bias, state = _params((3,))
    x = _x(shape)
    y, new = bn.batch_norm(
        x,
        scale,
        bias,
        state,
        train=True,
        virtual_batch_size=vbs,
        momentum=0.7,
        unbiased_running_var=True,
    )
    x64 = to_f64(x)
    groups = x64.reshape((shape[0] // vbs, vbs, *shape[1:]))
    raxes = tuple(range(1, groups.ndim - 1))
    mu = groups.mean(raxes, keepdims=True)
    var = groups.var(raxes, keepdims=True)
    ref = ((groups - mu) / np.sqrt(var + 1e-5) * to_f64(scale) + to_f64(bias)).reshape(shape)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=2e-5)
    n = np.prod([groups.shape[a] for a in raxes])
    bm = mu.reshape(-1, 3).mean(0)
    bv = (var * n / (n - 1)).reshape(-1, 3).mean(0)
    np.testing.assert_allclose(new.mean, 0.7 * to_f64(state.mean) + 0.3 * bm, rtol=1e-5)
    np.testing.assert_allclose(new.var, 0.7 * to_f64(state.var) + 0.3 * bv, rtol=1e-5)


def test_ghost_with_mask():
    x = _x((8, 3))
    mask = np.array([1, 1, 0, 1, 1, 1, 1, 0], bool)
    y, _ = bn.batch_norm(
        x, None, None, bn.init_state(3), train=True, virtual_batch_size=4, mask=mask
    )
    x64 = to_f64(x)
    for g in range(2):
        rows = slice(4 * g, 4 * g + 4)
        valid = x64[rows][mask[rows]]
        ref = (x64[rows] - valid.mean(0)) / np.sqrt(valid.var(0) + 1e-5)
        np.testing.assert_allclose(y[rows], ref, rtol=1e-5, atol=2e-5)


# --------------------------------------------------------------------------- folding


def test_fold_equals_eval():
    scale, bias, state = _params((6,))
    x = _x((4, 3, 3, 6))
    a, b = bn.fold(scale, bias, state, 1e-3)
    y, _ = bn.batch_norm(x, scale, bias, state, train=False, epsilon=1e-3)
    ref = np_batch_norm_eval(x, scale, bias, state.mean, state.var, (3,), eps=1e-3)
    np.testing.assert_allclose(to_f64(x) * to_f64(a) + to_f64(b), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    a0, b0 = bn.fold(None, None, state)
    np.testing.assert_allclose(a0, 1 / np.sqrt(to_f64(state.var) + 1e-5), rtol=1e-6)
    np.testing.assert_allclose(b0, -to_f64(state.mean) * to_f64(a0), rtol=1e-6)


@pytest.mark.parametrize("dense_bias", [True, False])
def test_fold_into_dense(dense_bias):
    scale, bias, state = _params((5,))
    rng = np.random.default_rng(2)
    kernel = rng.normal(size=(7, 5))
    c = rng.normal(size=5) if dense_bias else None
    x = rng.normal(size=(9, 7))
    w2, c2 = bn.fold_into_dense(
        jnp.asarray(kernel, jnp.float32),
        None if c is None else jnp.asarray(c, jnp.float32),
        scale,
        bias,
        state,
        1e-5,
    )
    h = x @ kernel + (0 if c is None else c)
    ref = np_batch_norm_eval(h, scale, bias, state.mean, state.var, (1,))
    np.testing.assert_allclose(x @ to_f64(w2) + to_f64(c2), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout", ["flax", "torch"])
def test_fold_into_conv(layout):
    scale, bias, state = _params((4,))
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(2, 6, 6, 3)), jnp.float32)  # NHWC
    k_hwio = rng.normal(size=(3, 3, 3, 4)).astype(np.float32)
    c = rng.normal(size=4).astype(np.float32)

    def conv(k_hwio, b):
        y = jax.lax.conv_general_dilated(
            x, jnp.asarray(k_hwio), (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return y + jnp.asarray(b).reshape(1, 1, 1, -1)

    ref = np_batch_norm_eval(conv(k_hwio, c), scale, bias, state.mean, state.var, (3,))
    if layout == "flax":
        k2, c2 = bn.fold_into_conv(jnp.asarray(k_hwio), jnp.asarray(c), scale, bias, state)
        got = conv(k2, c2)
    else:
        k_oihw = np.transpose(k_hwio, (3, 2, 0, 1))
        k2, c2 = bn.fold_into_conv(
            jnp.asarray(k_oihw), jnp.asarray(c), scale, bias, state, out_axis=0
        )
        got = conv(jnp.transpose(k2, (2, 3, 1, 0)), c2)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_fold_into_conv_matches_torch():
    torch = pytest.importorskip("torch")
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    conv = torch.nn.Conv2d(3, 4, 3)
    layer = _torch_bn(torch, (1, 4, 1, 1))
    with torch.no_grad():
        layer.running_mean.copy_(torch.linspace(-1, 1, 4))
        layer.running_var.copy_(torch.linspace(0.5, 2, 4))
    conv.eval()
    layer.eval()
    fused = fuse_conv_bn_eval(conv, layer)
    state = bn.from_torch_state(layer.running_mean.numpy(), layer.running_var.numpy())
    k, c = bn.fold_into_conv(
        conv.weight.detach().numpy(),
        conv.bias.detach().numpy(),
        layer.weight.detach().numpy(),
        layer.bias.detach().numpy(),
        state,
        layer.eps,
        out_axis=0,
    )
    np.testing.assert_allclose(k, fused.weight.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(c, fused.bias.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_fold_errors():
    scale, bias, state = _params((5,))
    with pytest.raises(ValueError, match="feature shape"):
        bn.fold_into_dense(jnp.ones((3, 4)), None, scale, bias, state)
    with pytest.raises(ValueError, match="4 output channels"):
        bn.fold_into_conv(jnp.ones((4, 3, 3, 3)), None, scale, bias, state, out_axis=0)
    with pytest.raises(ValueError, match="scale has 3 features"):
        bn.fold(jnp.ones(3), None, state)


# --------------------------------------------------------------------------- bad input


def test_error_feature_mismatch_names_both_sizes():
    _, _, state = _params((4,))
    x = _x((8, 4))
    with pytest.raises(ValueError, match=r"scale has 3 features but x's feature shape .* has 4"):
        bn.batch_norm(x, jnp.ones(3), None, state, train=True)
    with pytest.raises(ValueError, match=r"bias has 5 features .* has 4"):
        bn.batch_norm(x, None, jnp.ones(5), state, train=True)
    with pytest.raises(ValueError, match=r"state.mean has 6 features .* has 4"):
        bn.batch_norm(x, None, None, bn.init_state(6), train=False)
    with pytest.raises(ValueError, match=r"scale has shape \(4,\) but .* is \(3, 4\)"):
        bn.batch_norm(
            _x((2, 3, 4)), jnp.ones(4), None, bn.init_state((3, 4)), train=True, axis=(1, 2)
        )


def test_error_integer_x():
    with pytest.raises(TypeError, match="floating dtype"):
        bn.batch_norm(jnp.ones((4, 3), jnp.int32), None, None, bn.init_state(3), train=True)


def test_torch_state_is_copied_both_ways():
    torch = pytest.importorskip("torch")
    layer = torch.nn.BatchNorm1d(3)
    state = bn.from_torch_state(layer.running_mean, layer.running_var, layer.num_batches_tracked)
    layer.train()
    with torch.no_grad():
        layer(torch.randn(8, 3) + 5.0)  # updates torch's buffers in place
    np.testing.assert_array_equal(state.mean, np.zeros(3))
    np.testing.assert_array_equal(state.var, np.ones(3))
    assert int(state.count) == 0
    buffers = bn.to_torch_state(state)
    assert all(a.flags.writeable for a in buffers.values())
    torch.from_numpy(buffers["running_mean"]).add_(100.0)
    np.testing.assert_array_equal(state.mean, np.zeros(3))


@pytest.mark.parametrize("momentum", [0.0, 1.0])
def test_running_update_is_exact_at_the_ends(momentum):
    # The batch variance of small data must survive momentum 0 (weight 1 on the batch) exactly,
    # as flax's m * old + (1 - m) * new keeps it; old + w * (new - old) would round it.
    x = _x((64, 3), std=1e-3)
    _, s = bn.batch_norm(x, None, None, bn.init_state(3), train=True, momentum=momentum)
    want_var = to_f64(x).var(0) if momentum == 0.0 else np.ones(3)
    want_mean = to_f64(x).mean(0) if momentum == 0.0 else np.zeros(3)
    np.testing.assert_allclose(s.var, want_var, rtol=1e-5)
    np.testing.assert_allclose(s.mean, want_mean, rtol=1e-5, atol=1e-9)
    # The first step of the cumulative average weighs the batch by 1 too.
    _, s = bn.batch_norm(x, None, None, bn.init_state(3), train=True, cumulative=True)
    np.testing.assert_allclose(s.var, to_f64(x).var(0), rtol=1e-5)


def test_running_update_is_flax_formula_bit_for_bit():
    # flax: momentum * old + (1 - momentum) * batch, with 1 - momentum taken in Python.
    x = jnp.array([[1.0, 10.0], [3.0, 30.0]])
    old = bn.BatchNormState(jnp.array([0.3, -1.0]), jnp.array([2.0, 0.5]), jnp.array(0))
    _, s = bn.batch_norm(x, None, None, old, train=True, momentum=0.9)
    # Compiled, as batch norm runs (one program, also when called eagerly) and as flax runs in a
    # jitted step: XLA may contract a product and a sum into one fused multiply-add there.
    formula = jax.jit(
        lambda m, v, x: (
            0.9 * m + (1 - 0.9) * jnp.mean(x, axis=0),
            0.9 * v + (1 - 0.9) * jnp.var(x, axis=0),
        )
    )
    want_mean, want_var = formula(old.mean, old.var, x)
    np.testing.assert_array_equal(s.mean, want_mean)
    np.testing.assert_array_equal(s.var, want_var)


def test_torch_parity_small_variance_momentum_one():
    torch = pytest.importorskip("torch")
    layer = torch.nn.BatchNorm1d(3, momentum=1.0)
    layer.train()
    state = bn.init_state(3)
    for step in range(2):
        x = np.array(_x((32, 3), seed=step, std=1e-3))
        with torch.no_grad():
            layer(torch.from_numpy(x))
        _, state = bn.batch_norm(
            jnp.asarray(x),
            None,
            None,
            state,
            train=True,
            momentum=bn.momentum_from_torch(1.0),
            unbiased_running_var=True,
        )
    np.testing.assert_allclose(state.var, layer.running_var.numpy(), rtol=1e-5)


def test_all_masked_batch_is_not_counted():
    x1 = jnp.array([[1.0, 2.0], [3.0, 4.0]])
    _, s = bn.batch_norm(
        x1, None, None, bn.init_state(2), train=True, cumulative=True, mask=np.zeros(2, bool)
    )
    assert int(s.count) == 0
    _, s = bn.batch_norm(x1, None, None, s, train=True, cumulative=True)
    np.testing.assert_allclose(s.mean, [2.0, 3.0])
    np.testing.assert_allclose(s.var, [1.0, 1.0])
    assert int(s.count) == 1


@pytest.mark.parametrize("momentum", [-0.1, 1.5])
def test_error_momentum_range(momentum):
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\]"):
        bn.batch_norm(_x((4, 3)), None, None, bn.init_state(3), train=True, momentum=momentum)


def test_error_momentum_type_and_shape():
    x, state = _x((4, 3)), bn.init_state(3)
    with pytest.raises(
        ValueError,
        match=r"momentum must be a scalar, a number in \[0, 1\], got an array of shape \(3,\)",
    ):
        bn.batch_norm(x, None, None, state, train=True, momentum=np.array([0.5, 0.5, 0.5]))
    with pytest.raises(TypeError, match="momentum must be a number"):
        bn.batch_norm(x, None, None, state, train=True, momentum=True)


def test_error_train_not_bool():
    with pytest.raises(TypeError, match="train must be a Python bool"):
        bn.batch_norm(_x((4, 3)), None, None, bn.init_state(3), train=None)


def test_error_renorm_bounds():
    x, state = _x((4, 3)), bn.init_state(3)
    with pytest.raises(ValueError, match=r"r_max must be >= 1"):
        bn.batch_norm(x, None, None, state, train=True, renorm=True, r_max=0.5)
    with pytest.raises(ValueError, match=r"d_max must be >= 0"):
        bn.batch_norm(x, None, None, state, train=True, renorm=True, d_max=-1.0)


@pytest.mark.parametrize("name", ["prelu", "maxout"])
def test_error_activation_that_cannot_be_fused(name):
    with pytest.raises(ValueError, match=f"activation='{name}' cannot be fused"):
        bn.batch_norm(_x((4, 3)), None, None, bn.init_state(3), train=True, activation=name)


def test_single_value_per_feature_trains_as_flax_or_refuses_on_request():
    # flax: var 0, y = bias, the running variance moves towards 0; PyTorch's error is opt-in.
    x, bias = _x((1, 3)), jnp.array([0.5, -1.0, 2.0])
    y, s = bn.batch_norm(x, None, bias, bn.init_state(3), train=True, momentum=0.9)
    np.testing.assert_array_equal(y, np.broadcast_to(bias, (1, 3)))
    np.testing.assert_allclose(s.mean, 0.1 * np.asarray(x[0]), rtol=1e-6)
    np.testing.assert_allclose(s.var, np.full(3, 0.9), rtol=1e-6)
    y, s = bn.batch_norm(x, None, None, bn.init_state(3), train=True, unbiased_running_var=True)
    assert np.isfinite(np.asarray(s.var)).all() and np.isfinite(np.asarray(y)).all()
    g = jax.grad(lambda x: jnp.sum(bn.batch_norm(x, None, None, bn.init_state(3), train=True)[0]))
    assert np.isfinite(np.asarray(g(x))).all()
    with pytest.raises(ValueError, match="refuse_single_value=True needs more than one value"):
        bn.batch_norm(x, None, None, bn.init_state(3), train=True, refuse_single_value=True)
    with pytest.raises(ValueError, match="more than one value per feature"):
        bn.batch_norm(
            _x((4, 3)),
            None,
            None,
            bn.init_state(3),
            train=True,
            virtual_batch_size=1,
            refuse_single_value=True,
        )
    with pytest.raises(TypeError, match="refuse_single_value"):
        bn.batch_norm(x, None, None, bn.init_state(3), train=True, refuse_single_value="yes")
    # Eval mode with one row is fine.
    bn.batch_norm(_x((1, 3)), None, None, bn.init_state(3), train=False)


def test_error_mask_shape():
    with pytest.raises(ValueError, match=r"mask has shape \(5,\); expected the batch shape \(4,"):
        bn.batch_norm(_x((4, 3)), None, None, bn.init_state(3), train=True, mask=np.ones(5, bool))
    with pytest.raises(ValueError, match="mask has shape"):
        bn.batch_norm(
            _x((4, 2, 3)), None, None, bn.init_state(3), train=True, mask=np.ones((4, 3), bool)
        )


def test_error_virtual_batch_size():
    with pytest.raises(ValueError, match="must divide the batch size"):
        bn.batch_norm(_x((10, 3)), None, None, bn.init_state(3), train=True, virtual_batch_size=4)
    with pytest.raises(ValueError, match="positive int"):
        bn.batch_norm(_x((8, 3)), None, None, bn.init_state(3), train=True, virtual_batch_size=0)


def test_error_bad_state_and_activation():
    with pytest.raises(TypeError, match="BatchNormState"):
        bn.batch_norm(_x((4, 3)), None, None, (jnp.zeros(3), jnp.ones(3)), train=True)
    with pytest.raises(ValueError, match="unknown activation"):
        bn.batch_norm(_x((4, 3)), None, None, bn.init_state(3), train=True, activation="relux")
    with pytest.raises(ValueError, match="out of range"):
        bn.batch_norm(_x((4, 3)), None, None, bn.init_state(3), train=True, axis=2)


def test_errors_raise_under_jit():
    f = jax.jit(lambda x: bn.batch_norm(x, jnp.ones(3), None, bn.init_state(4), train=True))
    with pytest.raises(ValueError, match="scale has 3 features"):
        f(_x((8, 4)))


# --------------------------------------------------------------------------- bad input, named
_S3 = bn.init_state(3)


def _bn(**kw):
    args = {"x": _x((4, 3)), "scale": None, "bias": None, "state": _S3, "train": True} | kw
    x, scale, bias, state = (args.pop(k) for k in ("x", "scale", "bias", "state"))
    return bn.batch_norm(x, scale, bias, state, **args)


def _other_state():
    from jaxnorm import preprocessing

    return preprocessing.zero_center().fit(jnp.ones((4, 3)))


_BAD_INPUTS = {
    # epsilon: NumPy/JAX scalars were taken as they came (only Python numbers were checked)
    "epsilon np negative": (lambda: _bn(epsilon=np.float32(-1.0)), ValueError, "epsilon"),
    "epsilon jnp nan": (lambda: _bn(epsilon=jnp.float32(np.nan)), ValueError, "epsilon"),
    "epsilon inf": (lambda: _bn(epsilon=np.inf), ValueError, "epsilon"),
    "epsilon jnp inf": (lambda: _bn(epsilon=jnp.asarray(np.inf)), ValueError, "epsilon"),
    "epsilon 0": (lambda: _bn(x=jnp.ones((4, 3)), epsilon=0.0), ValueError, "constant feature"),
    "epsilon subnormal": (lambda: _bn(epsilon=1e-40), ValueError, "epsilon"),
    "epsilon 0 eval": (lambda: _bn(train=False, epsilon=0), ValueError, "epsilon"),
    "epsilon vector": (lambda: _bn(epsilon=jnp.ones(3)), ValueError, "epsilon must be a scalar"),
    "epsilon str": (lambda: _bn(epsilon="1e-5"), TypeError, "epsilon"),
    "momentum array 1.5": (lambda: _bn(momentum=jnp.array(1.5)), ValueError, "momentum"),
    "momentum np str": (lambda: _bn(momentum=np.str_("0.5")), TypeError, "momentum"),
    "axis float": (lambda: _bn(axis=1.0), TypeError, "axis must be an int"),
    "axis str": (lambda: _bn(axis="1"), TypeError, "axis must be an int"),
    "axis list of floats": (lambda: _bn(axis=[1.0]), TypeError, "axis must be an int"),
    "x dict": (lambda: _bn(x={"a": _x((4, 3))}), TypeError, "x must be an array"),
    "x list": (lambda: _bn(x=[[1.0, 2.0, 3.0], [2.0, 3.0, 4.0]]), TypeError, "x must be an array"),
    "x None": (lambda: _bn(x=None), TypeError, "x must be an array"),
    "scale dict": (lambda: _bn(scale={"a": jnp.ones(3)}), TypeError, "scale must be an array"),
    "bias dict": (lambda: _bn(bias={"a": jnp.ones(3)}), TypeError, "bias must be an array"),
    "scale list": (lambda: _bn(scale=[1.0, 1.0, 1.0]), TypeError, "scale must be an array"),
    "r_max vector": (
        lambda: _bn(renorm=True, r_max=jnp.full(3, 2.0)),
        ValueError,
        "r_max must be a scalar",
    ),
    "d_max vector": (
        lambda: _bn(renorm=True, d_max=jnp.full(3, 2.0)),
        ValueError,
        "d_max must be a scalar",
    ),
    "activation changes shape": (
        lambda: _bn(activation=lambda v: v[:2]),
        ValueError,
        "activation must be elementwise",
    ),
    "activation returns bools": (
        lambda: _bn(activation=lambda v: v > 0),
        TypeError,
        "activation must return a floating array",
    ),
    "activation eval changes shape": (
        lambda: _bn(train=False, activation=lambda v: jnp.sum(v, axis=0)),
        ValueError,
        "activation must be elementwise",
    ),
    "state None": (lambda: _bn(state=None), TypeError, "state must be a BatchNormState"),
    "state tuple": (
        lambda: _bn(state=(jnp.zeros(3), jnp.ones(3), jnp.array(0))),
        TypeError,
        "state must be a BatchNormState",
    ),
    "state of another transform": (
        lambda: _bn(state=_other_state()),
        TypeError,
        "state must be a BatchNormState",
    ),
    "state count vector": (
        lambda: _bn(state=bn.BatchNormState(jnp.zeros(3), jnp.ones(3), jnp.zeros(3))),
        ValueError,
        "state.count must be a scalar",
    ),
    "mask 0.5": (lambda: _bn(mask=jnp.full((4,), 0.5)), ValueError, "mask must be boolean"),
    "mask 2": (lambda: _bn(mask=np.full((4,), 2)), ValueError, "mask must be boolean"),
    "mask str": (lambda: _bn(mask="abcd"), TypeError, "mask must be an array"),
    "axis_index_groups without axis_name": (
        lambda: _bn(axis_index_groups=[[0]]),
        ValueError,
        "axis_index_groups needs axis_name",
    ),
    "renorm str": (lambda: _bn(renorm="yes"), TypeError, "renorm must be a bool"),
    "cumulative str": (lambda: _bn(cumulative="yes"), TypeError, "cumulative must be a bool"),
    "unbiased_running_var str": (
        lambda: _bn(unbiased_running_var="no"),
        TypeError,
        "unbiased_running_var must be a bool",
    ),
    "dtype unknown": (lambda: _bn(dtype="foo"), TypeError, "dtype must be a floating dtype"),
    "fold state None": (lambda: bn.fold(None, None, None), TypeError, "state must be"),
    "fold state tuple": (
        lambda: bn.fold(None, None, (jnp.zeros(3), jnp.ones(3), 0)),
        TypeError,
        "state must be",
    ),
    "fold other state": (lambda: bn.fold(None, None, _other_state()), TypeError, "state must be"),
    "fold epsilon np negative": (
        lambda: bn.fold(None, None, _S3, np.float32(-1)),
        ValueError,
        "epsilon",
    ),
    "fold epsilon 0": (lambda: bn.fold(None, None, _S3, 0.0), ValueError, "epsilon"),
    "fold scale list": (lambda: bn.fold([1.0, 1.0, 1.0], None, _S3), TypeError, "scale must be"),
    "fold_into_dense epsilon nan": (
        lambda: bn.fold_into_dense(jnp.ones((2, 3)), None, None, None, _S3, jnp.nan),
        ValueError,
        "epsilon",
    ),
    "fold_into_conv state None": (
        lambda: bn.fold_into_conv(jnp.ones((1, 1, 2, 3)), None, None, None, None),
        TypeError,
        "state must be",
    ),
    "fold_into_dense kernel dict": (
        lambda: bn.fold_into_dense({"k": 1}, None, None, None, _S3),
        TypeError,
        "kernel must be an array",
    ),
    "fold_into_conv out_axis float": (
        lambda: bn.fold_into_conv(jnp.ones((3, 2, 1, 1)), None, None, None, _S3, out_axis=0.0),
        TypeError,
        "out_axis must be an int",
    ),
    "to_torch_state None": (lambda: bn.to_torch_state(None), TypeError, "state must be"),
    "to_torch_state tuple": (
        lambda: bn.to_torch_state((jnp.zeros(3), jnp.ones(3), 0)),
        TypeError,
        "state must be",
    ),
    "to_torch_state other state": (
        lambda: bn.to_torch_state(_other_state()),
        TypeError,
        "state must be",
    ),
    "from_torch_state float count": (
        lambda: bn.from_torch_state(np.zeros(3), np.ones(3), 2.5),
        ValueError,
        "num_batches_tracked must be a whole number",
    ),
    "from_torch_state negative count": (
        lambda: bn.from_torch_state(np.zeros(3), np.ones(3), -1),
        ValueError,
        "num_batches_tracked",
    ),
    "from_torch_state vector count": (
        lambda: bn.from_torch_state(np.zeros(3), np.ones(3), np.ones(2)),
        ValueError,
        "num_batches_tracked must be a scalar",
    ),
    "from_torch_state bool count": (
        lambda: bn.from_torch_state(np.zeros(3), np.ones(3), True),
        TypeError,
        "num_batches_tracked",
    ),
    "from_torch_state negative var": (
        lambda: bn.from_torch_state(np.zeros(3), np.array([1.0, -1.0, 1.0]), 1),
        ValueError,
        "running_var must be >= 0",
    ),
    "from_torch_state nan var": (
        lambda: bn.from_torch_state(np.zeros(3), np.full(3, np.nan), 1),
        ValueError,
        "running_var must be finite",
    ),
    "from_torch_state inf mean": (
        lambda: bn.from_torch_state(np.full(3, np.inf), np.ones(3), 1),
        ValueError,
        "running_mean must be finite",
    ),
    "from_torch_state scalar buffers": (
        lambda: bn.from_torch_state(np.float32(0), np.float32(1), 1),
        ValueError,
        "running_mean must have the feature shape",
    ),
    "from_torch_state str": (
        lambda: bn.from_torch_state("a", np.ones(3), 1),
        TypeError,
        "running_mean must be an array",
    ),
    "from_torch_state int dtype": (
        lambda: bn.from_torch_state(np.zeros(3), np.ones(3), 1, dtype=jnp.int32),
        TypeError,
        "dtype must be a floating dtype",
    ),
    "momentum_from_torch array": (
        lambda: bn.momentum_from_torch(jnp.array(1.5)),
        ValueError,
        "torch_momentum must be in",
    ),
    "init_state dtype str": (
        lambda: bn.init_state(3, dtype="foo"),
        TypeError,
        "dtype must be a floating dtype",
    ),
    "from_torch_state dtype str": (
        lambda: bn.from_torch_state(np.zeros(3), np.ones(3), dtype="foo"),
        TypeError,
        "dtype must be a floating dtype",
    ),
    "init_state float": (lambda: bn.init_state(3.0), TypeError, "num_features must be an int"),
    "momentum 1-d jnp": (
        lambda: _bn(momentum=jnp.full((1,), 0.9)),
        ValueError,
        "momentum must be a scalar",
    ),
    "state var negative": (
        lambda: _bn(state=bn.BatchNormState(jnp.zeros(3), jnp.array([1.0, -1.0, 1.0]), 0)),
        ValueError,
        r"state\.var must be >= 0",
    ),
    "state var negative eval": (
        lambda: _bn(
            train=False, state=bn.BatchNormState(jnp.zeros(3), jnp.array([1.0, -1.0, 1.0]), 0)
        ),
        ValueError,
        r"state\.var must be >= 0",
    ),
    "fold state var negative": (
        lambda: bn.fold(None, None, bn.BatchNormState(jnp.zeros(3), -jnp.ones(3), 0)),
        ValueError,
        r"state\.var must be >= 0",
    ),
    "axis np.float32": (lambda: _bn(axis=np.float32(1)), TypeError, "axis must be an int"),
    "axis None": (lambda: _bn(axis=None), TypeError, "axis must be an int"),
    "momentum_to_torch str": (
        lambda: bn.momentum_to_torch("0.5"),
        TypeError,
        "momentum must be a number",
    ),
}


@pytest.mark.parametrize("case", list(_BAD_INPUTS))
def test_bad_input_raises_a_named_error(case):
    call, error, match = _BAD_INPUTS[case]
    with pytest.raises(error, match=match) as info:
        call()
    # Raised by jaxnorm itself, not from inside JAX or NumPy.
    tb = info.tb
    while tb.tb_next is not None:
        tb = tb.tb_next
    assert "/jaxnorm/" in tb.tb_frame.f_code.co_filename, tb.tb_frame.f_code.co_filename


def test_numeric_masks_of_zeros_and_ones_are_accepted():
    x = _x((4, 3))
    y1, s1 = bn.batch_norm(x, None, None, _S3, train=True, mask=np.array([1.0, 0.0, 1.0, 1.0]))
    y2, s2 = bn.batch_norm(x, None, None, _S3, train=True, mask=np.array([True, False, True, True]))
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_array_equal(s1.var, s2.var)
    # Traced, a numeric mask's values are unknown: nonzero counts as True (documented).
    y3, _ = jax.jit(lambda m: bn.batch_norm(x, None, None, _S3, train=True, mask=m))(
        jnp.array([0.5, 0.0, 2.0, 1.0])
    )
    np.testing.assert_allclose(y3, y2, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("train", [True, False])
def test_numpy_and_jax_scalars_are_taken_as_python_numbers(train):
    # epsilon and momentum given as NumPy or JAX scalars (0-d arrays) work as the same Python
    # number does; r_max and d_max likewise.
    x = _x((6, 3))
    ref = _bn(x=x, train=train, epsilon=1e-3, momentum=0.9, renorm=True, r_max=2.0, d_max=1.0)
    for cast in (np.float32, np.float64, jnp.float32, jnp.asarray):
        got = _bn(
            x=x,
            train=train,
            epsilon=cast(1e-3),
            momentum=cast(0.9),
            renorm=True,
            r_max=cast(2.0),
            d_max=cast(1.0),
        )
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), got, ref)
    a, b = bn.fold(None, None, _S3, np.float32(1e-3)), bn.fold(None, None, _S3, 1e-3)
    np.testing.assert_allclose(a, b, rtol=1e-7)


def test_validation_happens_at_trace_time():
    # Under jit the arguments' shapes, types and static values are checked while tracing: the
    # named errors come before anything runs (a traced value itself cannot be checked).
    for kw, error, match in [
        ({"axis": 1.0}, TypeError, "axis must be an int"),
        ({"mask": np.full((4,), 0.5)}, ValueError, "mask must be boolean"),
        ({"axis_index_groups": [[0]]}, ValueError, "axis_index_groups needs axis_name"),
        ({"momentum": np.full((2,), 0.5)}, ValueError, "momentum must be a scalar"),
        ({"renorm": True, "r_max": np.full(3, 2.0)}, ValueError, "r_max must be a scalar"),
        ({"activation": lambda v: v[:2]}, ValueError, "activation must be elementwise"),
    ]:
        f = jax.jit(lambda x, kw=kw: _bn(x=x, **kw)[0])
        with pytest.raises(error, match=match):
            f.lower(_x((4, 3)))


@pytest.mark.parametrize("shape", [(0, 3), (0, 2, 2, 3)])
def test_empty_batch_leaves_the_state_as_it_is(shape):
    # No rows: y is empty, and the state is unchanged and not counted (as an all-masked batch;
    # an IndexError from inside the pivot's sampling before).
    scale, bias, state = _params((3,))
    x = jnp.zeros(shape, jnp.float32)
    for f in (bn.batch_norm, jax.jit(bn.batch_norm, static_argnames="train")):
        y, new = f(x, scale, bias, state, train=True)
        assert y.shape == shape and y.dtype == x.dtype
        jax.tree.map(np.testing.assert_array_equal, new, state)
    g = jax.grad(lambda s: jnp.sum(bn.batch_norm(x, s, bias, state, train=True)[0]))(scale)
    np.testing.assert_array_equal(g, 0.0)


def test_finite_input_gives_finite_output_over_the_options():
    # No NaN or Inf from finite input, with every option that changes the arithmetic, on a
    # batch with a constant feature, a huge one and a tiny one.
    rng = np.random.default_rng(9)
    x = np.stack(
        [np.full(8, 3.0), 1e18 * rng.normal(size=8), 1e-18 * rng.normal(size=8)], axis=1
    ).astype(np.float32)
    scale, bias, state = _params((3,))
    for kw in [
        {},
        {"activation": "relu"},
        {"activation": "elu"},
        {"renorm": True},
        {"virtual_batch_size": 4},
        {"cumulative": True},
        {"unbiased_running_var": True},
        {"mask": np.arange(8) % 3 != 0},
        {"train": False},
    ]:
        kw = {"train": True} | kw
        f = lambda x, s, b, kw=kw: bn.batch_norm(x, s, b, state, **kw)
        (y, new), vjp = jax.vjp(f, jnp.asarray(x), scale, bias)
        grads = vjp((jnp.ones_like(y), jax.tree.map(jnp.zeros_like, new)))
        for leaf in (y, new.mean, new.var, *grads):
            assert np.all(np.isfinite(leaf)), kw


def test_traced_epsilon_and_momentum_are_not_checked():
    # Unknown at trace time: taken as they come (documented); concrete ones are checked.
    f = jax.jit(lambda e, m: _bn(epsilon=e, momentum=m)[1].var)
    assert np.all(np.isfinite(f(1e-3, 0.5)))


def test_smallest_epsilon_keeps_a_constant_feature_finite():
    # epsilon >= float32's smallest normal: a constant feature has var + epsilon > 0 (on CPU a
    # subnormal epsilon is flushed to 0, so it is refused with epsilon = 0).
    x = jnp.concatenate([jnp.full((6, 1), 3.0), _x((6, 1))], axis=1)
    f = lambda x: bn.batch_norm(x, None, None, bn.init_state(2), train=True, epsilon=1.2e-38)[0]
    y, vjp = jax.vjp(f, x)
    (dx,) = vjp(_x((6, 2), seed=3))
    np.testing.assert_array_equal(y[:, 0], 0.0)
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(dx))
