"""Tests for jaxnorm.activations against independent references.

References: SciPy/NumPy float64 formulas, central finite differences in float64, and PyTorch
(skipped when torch is missing). Nothing is checked against jaxnorm itself.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from jaxnorm import activations as A
from tests.helpers import FLOAT_DTYPES, to_f64, tol

SELU_ALPHA = 1.6732632423543772848170429916717
SELU_SCALE = 1.0507009873554804934193349852946
C = math.sqrt(2 / math.pi)


def _gelu_tanh_np(x):
    return 0.5 * x * (1 + np.tanh(C * (x + 0.044715 * x**3)))


def _gelu_tanh_grad_np(x):
    u = C * (x + 0.044715 * x**3)
    return 0.5 * (1 + np.tanh(u)) + 0.5 * x * (1 - np.tanh(u) ** 2) * C * (1 + 3 * 0.044715 * x**2)


# name -> (jaxnorm function of x, float64 value, float64 derivative): textbook formulas.
REFERENCES = {
    "sigmoid": (A.sigmoid, special.expit, lambda x: special.expit(x) * (1 - special.expit(x))),
    "tanh": (A.tanh, np.tanh, lambda x: 1 - np.tanh(x) ** 2),
    "relu": (A.relu, lambda x: np.maximum(x, 0), lambda x: (x > 0).astype(float)),
    "leaky_relu": (
        lambda x: A.leaky_relu(x, 0.1),
        lambda x: np.where(x > 0, x, 0.1 * x),
        lambda x: np.where(x > 0, 1.0, 0.1),
    ),
    "prelu": (
        lambda x: A.prelu(x, 0.25),
        lambda x: np.where(x > 0, x, 0.25 * x),
        lambda x: np.where(x > 0, 1.0, 0.25),
    ),
    "elu": (
        lambda x: A.elu(x, 1.5),
        lambda x: np.where(x > 0, x, 1.5 * (np.exp(np.minimum(x, 0)) - 1)),
        lambda x: np.where(x > 0, 1.0, 1.5 * np.exp(np.minimum(x, 0))),
    ),
    "selu": (
        A.selu,
        lambda x: SELU_SCALE * np.where(x > 0, x, SELU_ALPHA * np.expm1(np.minimum(x, 0))),
        lambda x: SELU_SCALE * np.where(x > 0, 1.0, SELU_ALPHA * np.exp(np.minimum(x, 0))),
    ),
    "gelu": (
        A.gelu,
        lambda x: x * special.ndtr(x),
        lambda x: special.ndtr(x) + x * np.exp(-(x**2) / 2) / math.sqrt(2 * math.pi),
    ),
    "gelu_tanh": (lambda x: A.gelu(x, approximate=True), _gelu_tanh_np, _gelu_tanh_grad_np),
    "silu": (
        A.silu,
        lambda x: x * special.expit(x),
        lambda x: special.expit(x) + x * special.expit(x) * (1 - special.expit(x)),
    ),
    "softplus": (A.softplus, lambda x: np.log1p(np.exp(x)), special.expit),
}

GRID = np.concatenate([np.linspace(-8, 8, 81), [0.0, -0.3, 0.7]]).astype(np.float32)


def _grad(f):
    """Elementwise derivative of f (the gradient of the sum), jitted to compile once."""
    return jax.jit(jax.grad(lambda x: jnp.sum(f(x))))


def _f_and_df(f, x):
    return f(x), jax.grad(lambda u: jnp.sum(f(u)))(x)


def _value_and_grad(f):
    """f(x) and its elementwise derivative, as one compiled program (one compile, not two)."""
    return jax.jit(functools.partial(_f_and_df, f))


@functools.cache
def _on_grid(dtype):
    """Each function's value and derivative on GRID: all of them in one jitted program per dtype."""
    fns = {name: r[0] for name, r in REFERENCES.items()}
    return jax.jit(lambda x: {n: _f_and_df(f, x) for n, f in fns.items()})(jnp.asarray(GRID, dtype))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_values_and_gradients_match_float64_formulas(name, dtype):
    _, ref, dref = REFERENCES[name]
    x = jnp.asarray(GRID, dtype)
    xr = to_f64(x)  # the reference sees the same rounded inputs
    y, g = _on_grid(dtype)[name]
    assert y.dtype == dtype and y.shape == x.shape
    np.testing.assert_allclose(to_f64(y), ref(xr), **tol(dtype, 2))
    assert g.dtype == dtype
    np.testing.assert_allclose(to_f64(g), dref(xr), **tol(dtype, 4))


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_gradients_match_finite_differences_float64(name):
    f, _, _ = REFERENCES[name]
    pts = np.array([-3.1, -1.3, -0.2, 0.4, 1.7, 4.2])  # away from the kink at 0
    h = 1e-6
    with jax.enable_x64(True):
        x = jnp.asarray(pts, jnp.float64)
        fd = (np.asarray(f(x + h)) - np.asarray(f(x - h))) / (2 * h)
        g = np.asarray(_grad(f)(x))
    np.testing.assert_allclose(g, fd, rtol=1e-7, atol=1e-9)


def test_float64_stays_float64():
    with jax.enable_x64(True):
        x = jnp.linspace(-3, 3, 7, dtype=jnp.float64)
        for name in A.NAMES:
            if name == "maxout":
                y = A.maxout(x[:6], 2)
            elif name == "prelu":
                y = A.prelu(x, 0.25)
            else:
                y = A.get(name)(x)
            assert y.dtype == jnp.float64, name


# --- kinks ----------------------------------------------------------------------------------------

KINK_DERIVATIVES = {  # jaxnorm's convention: the negative side's derivative at x = 0
    "relu": (A.relu, 0.0),
    "leaky_relu": (lambda x: A.leaky_relu(x, 0.1), 0.1),
    "prelu": (lambda x: A.prelu(x, 0.3), 0.3),
    "elu": (lambda x: A.elu(x, 2.0), 2.0),
    "selu": (A.selu, SELU_SCALE * SELU_ALPHA),
}


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("name", sorted(KINK_DERIVATIVES))
def test_derivative_at_zero_is_negative_side(name, dtype):
    f, expected = KINK_DERIVATIVES[name]
    g = jax.grad(lambda x: f(x).sum())(jnp.zeros((1,), dtype))
    np.testing.assert_allclose(to_f64(g), [expected], **tol(dtype))


def test_jax_nn_kinks_are_as_the_docs_say():
    # The docs' table quotes these; if jax changes them the table must change too.
    assert float(jax.grad(jax.nn.relu)(0.0)) == 0.0
    assert float(jax.grad(lambda x: jax.nn.leaky_relu(x, 0.1))(0.0)) == 1.0
    assert float(jax.grad(lambda x: jax.nn.elu(x, 2.0))(0.0)) == 2.0
    np.testing.assert_allclose(float(jax.grad(jax.nn.selu)(0.0)), SELU_SCALE * SELU_ALPHA, 1e-6)
    # Second derivatives (the docs' f''(0) table).
    assert float(jax.hessian(lambda x: jax.nn.elu(x, 2.0))(0.0)) == 2.0
    np.testing.assert_allclose(float(jax.hessian(jax.nn.selu)(0.0)), SELU_SCALE * SELU_ALPHA, 1e-6)


# Second derivatives, float64 formulas of the two sides: elu''(x) = alpha exp(x) for x <= 0 (the
# negative side, taken at 0 as for the first derivative), 0 for x > 0.
SECOND_DERIVATIVES = {
    "elu_1": (lambda x: A.elu(x), lambda x: np.where(x > 0, 0.0, np.exp(np.minimum(x, 0)))),
    "elu_2": (
        lambda x: A.elu(x, 2.0),
        lambda x: np.where(x > 0, 0.0, 2.0 * np.exp(np.minimum(x, 0))),
    ),
    "elu_0.5": (
        lambda x: A.elu(x, 0.5),
        lambda x: np.where(x > 0, 0.0, 0.5 * np.exp(np.minimum(x, 0))),
    ),
    "selu": (
        A.selu,
        lambda x: np.where(x > 0, 0.0, SELU_SCALE * SELU_ALPHA * np.exp(np.minimum(x, 0))),
    ),
}


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("name", sorted(SECOND_DERIVATIVES))
def test_second_derivative_at_zero_is_negative_side(name, dtype):
    f, ref = SECOND_DERIVATIVES[name]
    xs = np.array([-1.0, -1e-3, -0.0, 0.0, 1e-3, 1.0])
    x = jnp.asarray(xs, dtype)
    # Both second derivatives as one compiled program (eagerly: some 12 programs).
    h, h2 = jax.jit(lambda v: (jax.vmap(jax.hessian(f))(v), jax.vmap(jax.grad(jax.grad(f)))(v)))(x)
    assert h.dtype == dtype
    np.testing.assert_allclose(to_f64(h), ref(to_f64(x)), **tol(dtype))
    # Forward-over-reverse and reverse-over-reverse agree at the kink.
    np.testing.assert_allclose(to_f64(h2), ref(to_f64(x)), **tol(dtype))


def test_torch_second_derivative_at_zero_is_as_the_docs_say():
    # The docs' f''(0) table: torch's double backward takes the positive side (0) at x = 0.
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    for f in (lambda t: F.elu(t, 2.0), F.selu):
        t = torch.tensor(0.0, dtype=torch.float64, requires_grad=True)
        (g,) = torch.autograd.grad(f(t), t, create_graph=True)
        (h,) = torch.autograd.grad(g, t)
        assert h.item() == 0.0


# --- PyTorch --------------------------------------------------------------------------------------


def _torch_cases(torch):
    F = torch.nn.functional
    return {
        "sigmoid": (A.sigmoid, torch.sigmoid),
        "tanh": (A.tanh, torch.tanh),
        "relu": (A.relu, torch.relu),
        "leaky_relu": (lambda x: A.leaky_relu(x, 0.1), lambda t: F.leaky_relu(t, 0.1)),
        "prelu": (
            lambda x: A.prelu(x, 0.25),
            lambda t: F.prelu(t, torch.tensor([0.25], dtype=t.dtype)),
        ),
        "elu": (lambda x: A.elu(x, 1.5), lambda t: F.elu(t, 1.5)),
        "selu": (A.selu, F.selu),
        "gelu": (A.gelu, F.gelu),
        "gelu_tanh": (lambda x: A.gelu(x, True), lambda t: F.gelu(t, approximate="tanh")),
        "silu": (A.silu, F.silu),
        "softplus": (A.softplus, F.softplus),
    }


@pytest.mark.parametrize(
    "name",
    ["sigmoid", "tanh", "relu", "leaky_relu", "prelu", "elu", "selu", "gelu", "gelu_tanh",
     "silu", "softplus"],
)  # fmt: skip
def test_matches_torch_values_and_gradients_including_kinks(name):
    torch = pytest.importorskip("torch")
    ours, theirs = _torch_cases(torch)[name]
    xs = np.concatenate([np.linspace(-6, 6, 49), [0.0]])  # 0 is a kink for the piecewise ones
    t = torch.tensor(xs, dtype=torch.float64, requires_grad=True)
    yt = theirs(t)
    yt.sum().backward()
    with jax.enable_x64(True):
        y, g = map(np.asarray, _value_and_grad(ours)(jnp.asarray(xs)))
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(g, t.grad.numpy(), rtol=1e-12, atol=1e-14)


def test_prelu_per_channel_matches_torch_including_alpha_gradient():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 4, 5))
    x[0, :, 0, 0] = 0.0  # a kink
    alpha = np.array([0.1, 0.25, -0.5])
    xt = torch.tensor(x, requires_grad=True)
    at = torch.tensor(alpha, requires_grad=True)
    yt = torch.nn.functional.prelu(xt, at)  # torch puts channels on axis 1
    dy = rng.normal(size=x.shape)
    yt.backward(torch.tensor(dy))
    with jax.enable_x64(True):
        f = lambda x, a: A.prelu(x, a, channel_axis=1)
        y, vjp = jax.vjp(f, jnp.asarray(x), jnp.asarray(alpha))
        gx, ga = vjp(jnp.asarray(dy))
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-12)
    np.testing.assert_allclose(gx, xt.grad.numpy(), rtol=1e-12)
    np.testing.assert_allclose(ga, at.grad.numpy(), rtol=1e-12)


# --- extremes and tails ---------------------------------------------------------------------------

ALL_ELEMENTWISE = {
    **{n: r[0] for n, r in REFERENCES.items()},
    "maxout": lambda x: A.maxout(x, 2),
}


def _extremes(name, dtype):
    big = float(jnp.finfo(dtype).max)
    if name == "selu":
        big /= 1.06  # selu multiplies by 1.0507: beyond this the exact result overflows
    return jnp.asarray([-big, -1e4, -100.0, -0.0, 0.0, 100.0, 1e4, big], dtype)


@functools.cache
def _at_extremes(dtype):
    """Each function's value and derivative at its _extremes: one jitted program per dtype."""
    xs = {name: _extremes(name, dtype) for name in ALL_ELEMENTWISE}
    return jax.jit(lambda xs: {n: _f_and_df(ALL_ELEMENTWISE[n], x) for n, x in xs.items()})(xs)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("name", sorted(ALL_ELEMENTWISE))
def test_values_and_gradients_finite_at_extremes(name, dtype):
    y, g = _at_extremes(dtype)[name]
    assert y.dtype == dtype and g.dtype == dtype
    assert np.all(np.isfinite(to_f64(y))), (name, y)
    assert np.all(np.isfinite(to_f64(g))), (name, g)


def test_saturated_values():
    x = jnp.asarray([-1e4, 1e4])
    np.testing.assert_array_equal(A.sigmoid(x), [0.0, 1.0])
    np.testing.assert_array_equal(A.softplus(x), [0.0, 1e4])
    np.testing.assert_array_equal(A.elu(x), [-1.0, 1e4])
    np.testing.assert_array_equal(A.gelu(x), [0.0, 1e4])
    np.testing.assert_array_equal(A.gelu(x, approximate=True), [0.0, 1e4])
    np.testing.assert_array_equal(_grad(A.sigmoid)(x), [0.0, 0.0])
    np.testing.assert_array_equal(_grad(A.softplus)(x), [0.0, 1.0])
    np.testing.assert_array_equal(_grad(A.elu)(x), [0.0, 1.0])


def _sigmoid_grad_exact(x):
    e = np.exp(-abs(x))
    return e / (1 + e) ** 2


def _tanh_grad_exact(x):
    e = np.exp(-2 * abs(x))
    return 4 * e / (1 + e) ** 2


def _gelu_grad_exact(x):
    return special.ndtr(x) + x * np.exp(-x * x / 2) / math.sqrt(2 * math.pi)


# float64 derivatives in the tails: points, exact derivative from a direct float64 formula.
TAILS = {
    "sigmoid": (A.sigmoid, [37.43, -37.43, 200.0, -700.0], _sigmoid_grad_exact),
    "tanh": (A.tanh, [20.0, -25.0, 300.0], _tanh_grad_exact),
    "elu": (A.elu, [-40.0, -300.0], np.exp),
    "selu": (A.selu, [-40.0, -300.0], lambda x: SELU_SCALE * SELU_ALPHA * np.exp(x)),
    "softplus": (A.softplus, [-40.0, -700.0], np.exp),
    "silu": (A.silu, [-40.0, -700.0], lambda x: np.exp(x) * (1 + x)),
    "gelu": (A.gelu, [-10.0, -30.0], _gelu_grad_exact),
}


@pytest.mark.parametrize("name", sorted(TAILS))
def test_tail_gradients_keep_relative_accuracy_float64(name):
    f, xs, exact = TAILS[name]
    xs = np.asarray(xs)
    with jax.enable_x64(True):
        g = np.asarray(_grad(f)(jnp.asarray(xs)))
    want = exact(xs)
    assert np.all(want != 0)
    np.testing.assert_allclose(g, want, rtol=1e-9)


def test_issue_tail_numbers():
    with jax.enable_x64(True):
        s = float(jax.grad(A.sigmoid)(jnp.float64(37.43)))
        e = float(jax.grad(A.elu)(jnp.float64(-40.0)))
    np.testing.assert_allclose(s, 5.55e-17, rtol=2e-3)
    np.testing.assert_allclose(e, 4.25e-18, rtol=2e-3)


def test_gelu_negative_tail_value_keeps_relative_accuracy():
    with jax.enable_x64(True):
        y = np.asarray(A.gelu(jnp.asarray([-10.0, -20.0])))
    np.testing.assert_allclose(
        y, [-10 * special.ndtr(-10.0), -20 * special.ndtr(-20.0)], rtol=1e-12
    )


# --- NaN, infinities and subnormals ---------------------------------------------------------------

# x with NaNs of both signs among numbers; maxout's groups of 2 are (nan, 1), (-2, 3),
# (-nan, -1), (0, 2), (-0.5, 4).
_NAN_X = np.array([np.nan, 1.0, -2.0, 3.0, np.copysign(np.nan, -1.0), -1.0, 0.0, 2.0, -0.5, 4.0])
ALL_DTYPES = (*FLOAT_DTYPES, jnp.float64)


def _nan_masks(name):
    """Where the value and the derivatives must be NaN: at the NaNs, or their maxout groups."""
    nan = np.isnan(_NAN_X)
    if name == "maxout":
        group = nan.reshape(-1, 2).any(axis=1)
        return group, np.repeat(group, 2)
    return nan, nan


def _value_and_derivatives(f, v):
    """f(v), its derivative by vjp and by jvp, and its second derivative both ways."""

    def grad(u):
        return jax.grad(lambda w: jnp.sum(f(w).astype(jnp.float32)))(u)

    ones = jnp.ones_like(v)
    return {
        "value": f(v),
        "vjp": grad(v),
        "jvp": jax.jvp(f, (v,), (ones,))[1],
        "d2 reverse-over-reverse": jax.grad(lambda u: jnp.sum(grad(u).astype(jnp.float32)))(v),
        "d2 forward-over-reverse": jax.jvp(grad, (v,), (ones,))[1],
    }


@functools.cache
def _nan_outputs(dtype):
    """Where each function's value and derivatives at _NAN_X are NaN: every function, jitted, in
    one program per dtype (one compile instead of five per function)."""
    with jax.enable_x64(dtype == jnp.float64):
        x = jnp.asarray(_NAN_X, dtype)
        fns = ALL_ELEMENTWISE
        out = jax.jit(lambda v: {n: _value_and_derivatives(f, v) for n, f in fns.items()})(x)
        return jax.tree.map(lambda a: np.isnan(to_f64(a)), out)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("name", sorted(ALL_ELEMENTWISE))
def test_nan_propagates_to_values_and_derivatives(name, dtype):
    # jax.nn.relu and torch.relu return NaN for NaN; jaxnorm's relu returned 0, and the
    # derivatives of relu, leaky_relu, prelu (all), maxout (jitted) were numbers at NaN.
    y_nan, d_nan = _nan_masks(name)
    for what, got in _nan_outputs(dtype)[name].items():
        want = y_nan if what in ("value", "jvp") and name == "maxout" else d_nan
        if what == "value":
            want = y_nan
        np.testing.assert_array_equal(got, want, err_msg=f"{name} {what}")


def test_nan_values_agree_with_jax_nn_and_torch():
    torch = pytest.importorskip("torch")
    x = np.array([np.nan, np.copysign(np.nan, -1.0)], np.float32)
    for ours, theirs in _torch_cases(torch).values():
        assert np.all(np.isnan(np.asarray(ours(jnp.asarray(x)))))
        assert np.all(np.isnan(theirs(torch.tensor(x)).numpy()))
    for fn in (A.relu, jax.nn.relu, lambda v: A.leaky_relu(v, 0.1), jax.nn.leaky_relu):
        assert np.all(np.isnan(np.asarray(fn(jnp.asarray(x)))))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_parameter_gradients_are_nan_where_x_is_nan(dtype):
    # The slope's and alpha's gradients, per element and summed: NaN x makes them NaN.
    nan = np.isnan(_NAN_X)
    with jax.enable_x64(dtype == jnp.float64):
        x = jnp.asarray(_NAN_X, dtype)
        a = jnp.full(x.shape, 0.3, dtype)
        for name, f in {
            "leaky_relu": A.leaky_relu,
            "prelu": A.prelu,
            "elu": A.elu,
        }.items():
            per_element = jax.jit(jax.grad(lambda a, f=f: jnp.sum(f(x, a)), argnums=0))(a)
            np.testing.assert_array_equal(np.isnan(per_element), nan, err_msg=name)
            shared = jax.grad(lambda s, f=f: jnp.sum(f(x, s)))(jnp.asarray(0.3, dtype))
            assert np.isnan(shared), name
            finite = jax.grad(lambda s, f=f: jnp.sum(f(x[~nan], s)))(jnp.asarray(0.3, dtype))
            assert np.isfinite(finite), name


# name -> (f, f(+inf), f(-inf), f'(+inf), f'(-inf)): the limits.
INF_LIMITS = {
    "sigmoid": (A.sigmoid, 1.0, 0.0, 0.0, 0.0),
    "tanh": (A.tanh, 1.0, -1.0, 0.0, 0.0),
    "relu": (A.relu, np.inf, 0.0, 1.0, 0.0),
    "leaky_relu": (lambda x: A.leaky_relu(x, 0.1), np.inf, -np.inf, 1.0, 0.1),
    "prelu": (lambda x: A.prelu(x, 0.25), np.inf, -np.inf, 1.0, 0.25),
    "elu": (lambda x: A.elu(x, 1.5), np.inf, -1.5, 1.0, 0.0),
    "selu": (A.selu, np.inf, -SELU_SCALE * SELU_ALPHA, SELU_SCALE, 0.0),
    "gelu": (A.gelu, np.inf, 0.0, 1.0, 0.0),
    "gelu_tanh": (lambda x: A.gelu(x, approximate=True), np.inf, 0.0, 1.0, 0.0),
    "silu": (A.silu, np.inf, 0.0, 1.0, 0.0),
    "softplus": (A.softplus, np.inf, 0.0, 1.0, 0.0),
}


def _value_d1_d2(f, v):
    d1 = jax.grad(lambda u: jnp.sum(f(u)))
    return f(v), d1(v), jax.grad(lambda u: jnp.sum(d1(u)))(v)


@functools.cache
def _at_infinities(dtype):
    """Each function's value, derivative and second derivative at +inf and -inf in float64: every
    function, jitted, in one program per dtype (one compile instead of three per function)."""
    with jax.enable_x64(dtype == jnp.float64):
        x = jnp.asarray([np.inf, -np.inf], dtype)
        fns = {n: limits[0] for n, limits in INF_LIMITS.items()}
        out = jax.jit(lambda v: {n: _value_d1_d2(f, v) for n, f in fns.items()})(x)
        return jax.tree.map(to_f64, out)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("name", sorted(INF_LIMITS))
def test_infinities_give_the_limits_and_finite_derivatives(name, dtype):
    # gelu, gelu_tanh and silu gave NaN at -inf (-inf * 0) and NaN derivatives at +-inf.
    _, y_pos, y_neg, d_pos, d_neg = INF_LIMITS[name]
    y, g, d2 = _at_infinities(dtype)[name]
    np.testing.assert_allclose(y, [y_pos, y_neg], **tol(dtype))
    np.testing.assert_allclose(g, [d_pos, d_neg], **tol(dtype))
    assert np.all(np.isfinite(d2)), d2


def _subnormals(dtype):
    tiny = np.finfo(dtype).tiny
    smallest = np.finfo(dtype).smallest_subnormal
    return np.array([smallest, tiny / 3, tiny * 0.999, -smallest, -tiny / 3, -tiny * 0.999], dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "name",
    ["sigmoid", "tanh", "relu", "leaky_relu", "prelu", "elu", "selu", "gelu", "gelu_tanh",
     "silu", "softplus"],
)  # fmt: skip
def test_subnormal_inputs_match_torch(name, dtype):
    # XLA:CPU compares with denormals taken as 0, so x > 0 was False at x = 1e-40 and relu,
    # leaky_relu, prelu, elu and selu took their negative side's derivative there.
    torch = pytest.importorskip("torch")
    ours, theirs = _torch_cases(torch)[name]
    x = _subnormals(dtype)
    t = torch.tensor(x, requires_grad=True)
    yt = theirs(t)
    yt.sum().backward()
    with jax.enable_x64(dtype == np.float64):
        y, g = map(np.asarray, _value_and_grad(ours)(jnp.asarray(x)))
    np.testing.assert_allclose(g, t.grad.numpy(), rtol=4 * np.finfo(dtype).eps, atol=0)
    # XLA:CPU takes subnormal inputs of arithmetic as 0 and flushes subnormal results to 0
    # (torch keeps both): a value computed from a subnormal x is that of x = 0, off by at most
    # the slope times the smallest normal number. The positive side passes x through unchanged.
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=4 * np.finfo(dtype).eps,
                               atol=2 * np.finfo(dtype).tiny)  # fmt: skip
    if name in ("relu", "leaky_relu", "prelu", "elu"):
        np.testing.assert_array_equal(y[:3], x[:3])


def test_relu_of_a_positive_subnormal_is_itself_as_in_torch():
    torch = pytest.importorskip("torch")
    x = np.array([1e-40, -1e-40], np.float32)
    want = np.array([x[0], 0.0], np.float32)
    np.testing.assert_array_equal(np.asarray(A.relu(jnp.asarray(x))), want)
    np.testing.assert_array_equal(torch.relu(torch.tensor(x)).numpy(), want)
    with jax.enable_x64(True):
        x64 = jnp.asarray([5e-324, -5e-324])
        np.testing.assert_array_equal(np.asarray(_grad(A.relu)(x64)), [1.0, 0.0])
        np.testing.assert_array_equal(
            np.asarray(_grad(A.selu)(x64)), [SELU_SCALE, SELU_SCALE * SELU_ALPHA]
        )


def test_relu_and_leaky_relu_keep_their_identity_for_the_batch_norm_fusion():
    # batch_norm fuses these two functions, recognised by identity.
    from jaxnorm import batchnorm

    assert A.get("relu") is A.relu and A.get("leaky_relu") is A.leaky_relu
    assert batchnorm._rectifier_slope(A.relu) == 0.0
    assert batchnorm._rectifier_slope(A.leaky_relu) == 0.01


def _silu_mp(x, derivative=False):
    """silu(x) or silu'(x) to 50 digits (mpmath), rounded to float64."""
    mpmath = pytest.importorskip("mpmath")
    with mpmath.workdps(50):
        v = mpmath.mpf(float(x))
        s = 1 / (1 + mpmath.exp(-v))
        return float(s * (1 + v * (1 - s)) if derivative else v * s)


# The far negative tail: float32 (and the narrower dtypes, computed in float32) from -87 (where
# e^x stops being a normal number) past -108 (where x e^x stops being a subnormal one).
SILU_TAILS = {np.float32: (-115.0, -80.0), np.float64: (-760.0, -700.0)}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_silu_far_negative_tail_is_accurate(dtype):
    # silu(x) = x e^x / (1 + e^x) is a normal number down to x = -91.86 in float32 (-714.97 in
    # float64); jaxnorm (like jax.nn) flushed it to 0 from -87.3 (-708.4), with its derivative.
    lo, hi = SILU_TAILS[dtype]
    xs = np.linspace(lo, hi, 351).astype(dtype)
    ref = np.array([_silu_mp(v) for v in xs])
    dref = np.array([_silu_mp(v, derivative=True) for v in xs])
    tiny, eps = np.finfo(dtype).tiny, np.finfo(dtype).eps
    with jax.enable_x64(dtype == np.float64):
        x = jnp.asarray(xs)
        outs = {
            "value": jax.jit(A.silu)(x),
            "value under vjp": jax.jit(lambda v: jax.vjp(A.silu, v)[0])(x),
            "derivative": _grad(A.silu)(x),
        }
    for what, out in outs.items():
        want = dref if what == "derivative" else ref
        got = np.asarray(out, np.float64)
        normal = np.abs(want) >= tiny
        assert normal.sum() > 50 and (~normal).sum() > 50
        np.testing.assert_allclose(got[normal], want[normal], rtol=2 * eps, atol=0, err_msg=what)
        # Subnormal results: representable on a platform that keeps them, 0 on XLA:CPU.
        np.testing.assert_allclose(got[~normal], want[~normal], rtol=0, atol=tiny, err_msg=what)
        assert np.all(np.signbit(got[xs < -2]) | (got[xs < -2] == 0)), what
    # Where the true value is normal, nothing is flushed.
    assert np.all(np.asarray(outs["value"])[np.abs(ref) >= tiny] != 0)


def _silu_mp_second_derivative(x):
    mpmath = pytest.importorskip("mpmath")
    with mpmath.workdps(50):
        return float(mpmath.diff(lambda v: v / (1 + mpmath.exp(-v)), mpmath.mpf(x), 2))


def test_silu_tail_second_derivative_is_accurate_float64():
    xs = np.array([-100.0, -200.0, -707.0, -709.0, -712.0])
    with jax.enable_x64(True):
        d2 = np.asarray(jax.vmap(jax.grad(jax.grad(A.silu)))(jnp.asarray(xs)))
    want = [_silu_mp_second_derivative(v) for v in xs]
    np.testing.assert_allclose(d2, want, rtol=1e-13)


# --- parameters and dtypes ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_parameters_are_cast_to_the_input_dtype(dtype):
    x = jnp.linspace(-2, 2, 8, dtype=dtype)
    slope = jnp.asarray(0.2, jnp.float32)
    assert A.leaky_relu(x, slope).dtype == dtype
    assert A.elu(x, slope).dtype == dtype
    alpha = jnp.full((8,), 0.2, jnp.float32)
    assert A.prelu(x, alpha).dtype == dtype
    ga = jax.grad(lambda a: A.prelu(x, a).astype(jnp.float32).sum())(alpha)
    assert ga.dtype == jnp.float32


def test_elu_is_differentiable_in_alpha():
    x = jnp.asarray([-2.0, -0.5, 0.0, 1.0])
    g = jax.grad(lambda a: A.elu(x, a).sum())(1.3)
    np.testing.assert_allclose(g, np.sum(np.expm1(np.minimum(to_f64(x), 0))), rtol=1e-6)


@pytest.mark.parametrize("name", A.NAMES)
def test_integer_input_raises_type_error(name):
    args = {"prelu": (0.25,), "maxout": (2,)}.get(name, ())
    with pytest.raises(TypeError, match=rf"{name} expects a floating x .* int32"):
        A.get(name)(jnp.arange(4), *args)


def test_gelu_approximate_must_be_bool():
    with pytest.raises(TypeError, match="approximate must be True or False, got 'tanh'"):
        A.gelu(jnp.ones(3), approximate="tanh")
    with pytest.raises(TypeError, match="approximate must be True or False, got 1"):
        A.gelu(jnp.ones(3), approximate=1)


def test_gelu_accepts_numpy_bools_as_jax_nn_does():
    x = np.linspace(-4, 4, 17)
    y_tanh = np.asarray(A.gelu(jnp.asarray(x, jnp.float32), approximate=np.True_))
    y_exact = np.asarray(A.gelu(jnp.asarray(x, jnp.float32), approximate=np.False_))
    np.testing.assert_allclose(y_tanh, _gelu_tanh_np(x), **tol(jnp.float32))
    np.testing.assert_allclose(y_exact, x * special.ndtr(x), **tol(jnp.float32))
    ref = jax.nn.gelu(jnp.asarray(x, jnp.float32), approximate=np.True_)
    np.testing.assert_allclose(y_tanh, np.asarray(ref), **tol(jnp.float32))


def test_complex_parameter_raises_type_error():
    with pytest.raises(TypeError, match=r"alpha must be a real number or array.*complex"):
        A.prelu(jnp.ones(3), jnp.asarray(1j))


# --- prelu ----------------------------------------------------------------------------------------


def test_prelu_per_channel_last_axis_and_alpha_gradient():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(5, 3)).astype(np.float32)
    alpha = np.array([0.1, 0.2, 0.3], np.float32)
    y, vjp = jax.vjp(A.prelu, jnp.asarray(x), jnp.asarray(alpha))
    dy = rng.normal(size=x.shape).astype(np.float32)
    gx, ga = vjp(jnp.asarray(dy))
    x64, a64, dy64 = (v.astype(np.float64) for v in (x, alpha, dy))
    np.testing.assert_allclose(y, np.where(x64 > 0, x64, a64 * x64), **tol(jnp.float32))
    np.testing.assert_allclose(gx, dy64 * np.where(x64 > 0, 1, a64), **tol(jnp.float32))
    np.testing.assert_allclose(ga, (dy64 * np.minimum(x64, 0)).sum(0), **tol(jnp.float32))


def test_prelu_channel_axis_accepts_scalar_and_negative_axis():
    x = -jnp.ones((2, 3, 4))
    np.testing.assert_allclose(
        A.prelu(x, jnp.asarray([0.5]), channel_axis=1), -0.5 * np.ones((2, 3, 4))
    )
    y = A.prelu(x, jnp.asarray([1.0, 2.0, 3.0, 4.0]), channel_axis=-1)
    np.testing.assert_allclose(y[0, 0], [-1.0, -2.0, -3.0, -4.0])


def test_prelu_alpha_that_does_not_broadcast_raises():
    with pytest.raises(
        ValueError, match=r"alpha of shape \(4,\) does not broadcast to x's shape \(2, 3\)"
    ):
        A.prelu(jnp.ones((2, 3)), jnp.ones(4))
    with pytest.raises(ValueError, match=r"alpha of shape \(2, 3, 1\) does not broadcast"):
        A.prelu(jnp.ones((2, 3)), jnp.ones((2, 3, 1)))  # would enlarge x
    with pytest.raises(
        ValueError, match=r"one entry per channel \(3, the size of x's axis 1\).*\(4,\)"
    ):
        A.prelu(jnp.ones((2, 3, 5)), jnp.ones(4), channel_axis=1)
    with pytest.raises(ValueError, match="channel_axis=3 is out of range"):
        A.prelu(jnp.ones((2, 3, 5)), jnp.ones(3), channel_axis=3)


@pytest.mark.parametrize("channel_axis", [(1, 2), [1], 1.0, True, "1"])
def test_prelu_channel_axis_must_be_one_int(channel_axis):
    with pytest.raises(TypeError, match=r"prelu: channel_axis must be an int .* or None, but got"):
        A.prelu(jnp.ones((2, 3, 3)), jnp.ones(3), channel_axis=channel_axis)


def test_prelu_channel_axis_accepts_numpy_int():
    x = -np.ones((2, 3, 4), np.float32)
    alpha = np.array([0.1, 0.2, 0.3], np.float32)
    y = A.prelu(jnp.asarray(x), jnp.asarray(alpha), channel_axis=np.int64(1))
    np.testing.assert_allclose(y, alpha[None, :, None] * x, **tol(jnp.float32))


def test_leaky_relu_and_elu_parameter_shape_errors():
    with pytest.raises(ValueError, match="leaky_relu: negative_slope of shape"):
        A.leaky_relu(jnp.ones((2, 3)), jnp.ones(2))
    with pytest.raises(ValueError, match="elu: alpha of shape"):
        A.elu(jnp.ones((2, 3)), jnp.ones(2))


# --- maxout ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "k", "axis"), [((4, 6), 3, -1), ((6, 4), 2, 0), ((2, 6, 3), 2, 1)]
)
def test_maxout_matches_grouped_max(shape, k, axis):
    x = np.random.default_rng(2).normal(size=shape).astype(np.float32)
    ax = axis % len(shape)
    ref = x.reshape((*shape[:ax], shape[ax] // k, k, *shape[ax + 1 :])).max(ax + 1)
    y = A.maxout(jnp.asarray(x), k, axis=axis)
    assert y.shape == ref.shape
    np.testing.assert_array_equal(y, ref)


def test_maxout_gradient_goes_to_the_maximum():
    x = jnp.asarray([1.0, 3.0, -2.0, -5.0, 4.0, 4.0])
    g = jax.grad(lambda x: A.maxout(x, 2).sum())(x)
    np.testing.assert_array_equal(g, [0.0, 1.0, 1.0, 0.0, 0.5, 0.5])  # a tie shares the gradient


def test_maxout_tie_gradient_matches_torch_amax_not_torch_max():
    # The docs: a tie shares the gradient as torch.amax does; torch.max(dim) gives it to one entry.
    torch = pytest.importorskip("torch")
    xs = np.array([[4.0, 4.0, 1.0, 3.0, 2.0, 2.0, 2.0, 0.0]])  # groups of 2: tie, -, tie, -
    dy = np.array([[1.5, -2.0, 0.5, 3.0]])

    def torch_grad(reduce):
        t = torch.tensor(xs, requires_grad=True)
        reduce(t.reshape(1, 4, 2)).backward(torch.tensor(dy))
        return t.grad.numpy()

    amax = torch_grad(lambda t: t.amax(dim=-1))
    first = torch_grad(lambda t: t.max(dim=-1).values)
    _, vjp = jax.vjp(lambda x: A.maxout(x, 2), jnp.asarray(xs, jnp.float32))
    (g,) = vjp(jnp.asarray(dy, jnp.float32))
    np.testing.assert_array_equal(np.asarray(g, np.float64), amax)
    np.testing.assert_array_equal(amax[0, :2], [0.75, 0.75])
    np.testing.assert_array_equal(first[0, :2], [1.5, 0.0])  # torch.max: the first tied entry


def test_maxout_errors():
    with pytest.raises(
        ValueError, match="x has 5 entries on axis 1, which num_pieces=2 does not divide"
    ):
        A.maxout(jnp.ones((3, 5)), 2)
    with pytest.raises(ValueError, match="num_pieces must be at least 1, got 0"):
        A.maxout(jnp.ones((3, 4)), 0)
    with pytest.raises(TypeError, match=r"num_pieces must be an int, got 2\.0 of type float"):
        A.maxout(jnp.ones((3, 4)), 2.0)
    with pytest.raises(TypeError, match=r"num_pieces must be an int, got True of type bool"):
        A.maxout(jnp.ones((3, 4)), True)
    with pytest.raises(TypeError, match=r"num_pieces must be an int, got np\.True_"):
        A.maxout(jnp.ones((3, 4)), np.True_)
    with pytest.raises(ValueError, match="at least one axis"):
        A.maxout(jnp.ones(()), 1)
    with pytest.raises(ValueError, match="axis=2 is out of range"):
        A.maxout(jnp.ones((3, 4)), 2, axis=2)


# --- get, names, properties -----------------------------------------------------------------------


def test_get_and_names():
    assert A.names() == A.NAMES
    assert set(A.NAMES) == {
        "sigmoid", "tanh", "relu", "leaky_relu", "prelu", "elu", "selu", "gelu", "silu",
        "softplus", "maxout",
    }  # fmt: skip
    for name in A.NAMES:
        assert A.get(name) is getattr(A, name)
    assert A.get("ReLU") is A.relu
    assert A.get("swish") is A.silu
    assert A.get("leaky-relu") is A.leaky_relu


def test_get_unknown_name_lists_the_known_ones():
    with pytest.raises(
        ValueError, match="unknown activation 'relux'; known names: sigmoid, tanh, relu"
    ) as e:
        A.get("relux")
    assert "Did you mean 'relu'?" in str(e.value)
    # The alias is listed too, and suggested for a near miss.
    assert "swish (an alias of silu)" in str(e.value)
    with pytest.raises(ValueError, match="Did you mean 'swish'") as e:
        A.get("swsh")
    assert A.get("Swish") is A.silu
    with pytest.raises(ValueError, match=r"known names:.*maxout"):
        A.properties("nope")
    with pytest.raises(TypeError, match="expects an activation name"):
        A.get(A.relu)


def test_properties_table_is_the_lecture_s():
    p = A.properties
    assert p("sigmoid")[1:6] == ((0.0, 1.0), False, "both", True, True)
    assert p("tanh")[1:6] == ((-1.0, 1.0), True, "both", True, True)
    assert p("relu")[1:6] == ((0.0, math.inf), False, "negative", False, True)
    assert p("leaky_relu").saturates == "none" and not p("leaky_relu").needs_exp
    assert p("elu").needs_exp and p("elu").saturates == "negative"
    assert p("maxout").saturates == "none" and not p("maxout").needs_exp
    assert not p("gelu").monotone and not p("silu").monotone
    for name in A.NAMES:
        assert p(name).name == name and p(name).note


@pytest.mark.parametrize("name", [n for n in A.NAMES if n not in ("maxout",)])
def test_properties_agree_with_the_functions(name):
    # Output range, monotonicity and saturation checked numerically in float64.
    props = A.properties(name)
    f = A.get(name)
    if name == "prelu":
        f = lambda x: A.prelu(x, 0.25)
    with jax.enable_x64(True):
        x = jnp.linspace(-60, 60, 24001)
        y = np.asarray(f(x))
        g = np.asarray(_grad(f)(x))
    lo, hi = props.output_range
    assert y.min() >= lo - 1e-12 and y.max() <= hi + 1e-12
    if math.isfinite(lo):
        np.testing.assert_allclose(y.min(), lo, atol=1e-6)
    assert bool(np.all(np.diff(y) >= -1e-15)) == props.monotone
    left, right = abs(g[0]) < 1e-12, abs(g[-1]) < 1e-12
    expected = {(True, True): "both", (True, False): "negative", (False, False): "none"}
    assert expected[(bool(left), bool(right))] == props.saturates
