"""Tests for jaxnorm.gradcheck against closed-form gradients derived by hand in NumPy float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnorm import gradcheck


def to_f64(x) -> np.ndarray:
    """NumPy float64 copy; unlike helpers.to_f64 it keeps float64 inputs exact (no float32 hop)."""
    x = np.asarray(x)
    return (x.astype(np.float32) if x.dtype == jnp.bfloat16 else x).astype(np.float64)


# ---------------------------------------------------------------------------------------------
# Models with hand-derived gradients


def _mlp_params(key, d=4, hidden=5, out=3, dtype=jnp.float32):
    k = jax.random.split(key, 4)
    return {
        "dense_0": {
            "kernel": (jax.random.normal(k[0], (d, hidden)) / np.sqrt(d)).astype(dtype),
            "bias": (0.1 * jax.random.normal(k[1], (hidden,))).astype(dtype),
        },
        "dense_1": {
            "kernel": (jax.random.normal(k[2], (hidden, out)) / np.sqrt(hidden)).astype(dtype),
            "bias": (0.1 * jax.random.normal(k[3], (out,))).astype(dtype),
        },
    }


def _mlp_loss(params, x, t):
    h = jnp.tanh(x @ params["dense_0"]["kernel"] + params["dense_0"]["bias"][None])
    y = h @ params["dense_1"]["kernel"] + params["dense_1"]["bias"][None]
    return 0.5 * jnp.sum((y - t) ** 2)


def _mlp_grad_numpy(params, x, t):
    """Backpropagation of _mlp_loss written out in NumPy float64."""
    w1, b1 = to_f64(params["dense_0"]["kernel"]), to_f64(params["dense_0"]["bias"])
    w2, b2 = to_f64(params["dense_1"]["kernel"]), to_f64(params["dense_1"]["bias"])
    x, t = to_f64(x), to_f64(t)
    h = np.tanh(x @ w1 + b1)
    dy = h @ w2 + b2 - t
    dh = dy @ w2.T * (1 - h**2)
    return {
        "dense_0": {"kernel": x.T @ dh, "bias": dh.sum(0)},
        "dense_1": {"kernel": h.T @ dy, "bias": dy.sum(0)},
    }


def _data(key, n=6, d=4, out=3, dtype=jnp.float32):
    kx, kt = jax.random.split(key)
    return jax.random.normal(kx, (n, d), dtype), jax.random.normal(kt, (n, out), dtype)


@jax.custom_vjp
def _add_bias_wrong(h, b):
    return h + b[None]


def _add_bias_fwd(h, b):
    return h + b[None], None


def _add_bias_bwd(_, g):
    # The bias gradient is 1% too large; the kernel's stays right.
    return g, 1.01 * g.sum(0)


_add_bias_wrong.defvjp(_add_bias_fwd, _add_bias_bwd)


def _mlp_loss_wrong_bias(params, x, t):
    h = jnp.tanh(_add_bias_wrong(x @ params["dense_0"]["kernel"], params["dense_0"]["bias"]))
    y = h @ params["dense_1"]["kernel"] + params["dense_1"]["bias"][None]
    return 0.5 * jnp.sum((y - t) ** 2)


@jax.custom_vjp
def _scale_grad_wrong(w):
    return w


_scale_grad_wrong.defvjp(lambda w: (w, None), lambda _, g: (1.01 * g,))


def _mlp_loss_wrong_kernel(params, x, t):
    w = _scale_grad_wrong(params["dense_1"]["kernel"])
    h = jnp.tanh(x @ params["dense_0"]["kernel"] + params["dense_0"]["bias"][None])
    return 0.5 * jnp.sum((h @ w + params["dense_1"]["bias"][None] - t) ** 2)


# ---------------------------------------------------------------------------------------------
# relative_error


def test_relative_error_values():
    a = np.array([1.0, 0.0, -2.0, 3.0])
    b = np.array([1.01, 0.0, 2.0, 0.0])
    np.testing.assert_allclose(
        gradcheck.relative_error(a, b), [0.01 / 1.01, 0.0, 2.0, 1.0], rtol=1e-12
    )


def test_relative_error_pytree_and_low_precision():
    a = {"w": jnp.array([2.0, 4.0], jnp.bfloat16), "b": jnp.zeros(3)}
    b = {"w": jnp.array([1.0, 4.0], jnp.float32), "b": jnp.zeros(3)}
    out = gradcheck.relative_error(a, b)
    np.testing.assert_allclose(out["w"], [0.5, 0.0])
    np.testing.assert_array_equal(out["b"], np.zeros(3))
    assert out["w"].dtype == np.float64


def test_relative_error_mismatch_raises():
    with pytest.raises(ValueError, match=r"equal shapes, got \(2,\) and \(3,\)"):
        gradcheck.relative_error(np.zeros(2), np.zeros(3))
    with pytest.raises(ValueError, match="equal structure"):
        gradcheck.relative_error({"a": np.zeros(2)}, [np.zeros(2)])


# ---------------------------------------------------------------------------------------------
# numerical_grad against closed forms


def test_numerical_grad_polynomial():
    x = jnp.array([-1.5, -0.3, 0.0, 0.7, 2.0, 3.1])
    g = gradcheck.numerical_grad(lambda x: jnp.sum(x**3 - 2 * x**2 + x), x)
    xd = to_f64(x)
    assert isinstance(g, np.ndarray) and g.dtype == np.float64
    np.testing.assert_allclose(g, 3 * xd**2 - 4 * xd + 1, rtol=1e-9, atol=1e-9)


def test_numerical_grad_sin_exp_2d():
    x = jax.random.normal(jax.random.key(1), (3, 4))
    g = gradcheck.numerical_grad(lambda x: jnp.sum(jnp.sin(x) * jnp.exp(0.5 * x)), x)
    xd = to_f64(x)
    expect = np.exp(0.5 * xd) * (np.cos(xd) + 0.5 * np.sin(xd))
    np.testing.assert_allclose(g, expect, rtol=1e-9, atol=1e-10)


def test_numerical_grad_mlp_float64_pytree():
    with jax.enable_x64(True):
        params = _mlp_params(jax.random.key(2), dtype=jnp.float64)
        x, t = _data(jax.random.key(3), dtype=jnp.float64)
        g = gradcheck.numerical_grad(_mlp_loss, params, x, t)
    expect = _mlp_grad_numpy(params, x, t)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-9), g, expect
    )


def test_numerical_grad_argnums_tuple():
    a = jnp.array([1.0, -2.0, 0.5])
    b = jnp.array([3.0, 0.25, -1.0])
    ga, gb = gradcheck.numerical_grad(
        lambda a, b: jnp.sum(a * b) + jnp.sum(a**2), a, b, argnums=(0, 1)
    )
    np.testing.assert_allclose(ga, to_f64(b) + 2 * to_f64(a), rtol=1e-9)
    np.testing.assert_allclose(gb, to_f64(a), rtol=1e-9)
    (gb_only,) = gradcheck.numerical_grad(lambda a, b: jnp.sum(a * b), a, b, argnums=(-1,))
    np.testing.assert_allclose(gb_only, to_f64(a), rtol=1e-9)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_numerical_grad_step_low_precision(dtype):
    # An absolute step of 1e-4 is below half the spacing of these dtypes near 1-100 and would
    # round away; the float64 evaluation with a relative step does not.
    x = jnp.array([0.1, 1.0, 3.0, 50.0, -100.0], dtype)
    g = gradcheck.numerical_grad(lambda x: jnp.sum(x**2), x)
    # Rounding error ~ float64 eps * |f| / h ~ 1e-6 here (|f| ~ 5e4), whatever the coordinate.
    np.testing.assert_allclose(g, 2 * to_f64(x), rtol=1e-8, atol=1e-5)
    assert (x + jnp.asarray(1e-4, dtype))[1:].tolist() == x[1:].tolist()


def test_numerical_grad_step_large_values():
    x = jnp.array([1e4, -2.5e4, 3e4], jnp.float32)
    g = gradcheck.numerical_grad(lambda x: jnp.sum(jnp.sin(x / 1e4) * x), x)
    xd = to_f64(x)
    np.testing.assert_allclose(g, np.sin(xd / 1e4) + xd / 1e4 * np.cos(xd / 1e4), rtol=1e-8)


def test_numerical_grad_through_loops_and_unlisted_ops():
    # cumsum and fori_loop are evaluated on the full perturbed value (no sparse rule).
    w = jnp.array([0.5, -1.0, 2.0, 0.25])
    x = jnp.array([0.3, -0.2, 0.9, 1.4])
    f = lambda x: (
        jnp.sum(jnp.cumsum(x) * w) + jnp.sum(jax.lax.fori_loop(0, 3, lambda i, c: jnp.sin(c), x))
    )
    g = gradcheck.numerical_grad(f, x)
    xd, wd = to_f64(x), to_f64(w)
    s1 = np.sin(xd)
    s2 = np.sin(s1)
    chain = np.cos(xd) * np.cos(s1) * np.cos(s2)
    np.testing.assert_allclose(g, np.cumsum(wd[::-1])[::-1] + chain, rtol=1e-8)


def test_numerical_grad_transpose_and_weight_decay():
    # A transposed kernel and a squared-norm penalty: sparse rules for transpose and reduce_sum.
    w = jax.random.normal(jax.random.key(4), (3, 4))
    x = jax.random.normal(jax.random.key(5), (2, 4))
    f = lambda w: jnp.sum(jnp.tanh(x @ w.T)) + 0.1 * jnp.sum(w**2)
    g = gradcheck.numerical_grad(f, w)
    wd, xd = to_f64(w), to_f64(x)
    dz = 1 - np.tanh(xd @ wd.T) ** 2
    np.testing.assert_allclose(g, dz.T @ xd + 0.2 * wd, rtol=1e-8, atol=1e-10)


def test_numerical_grad_integer_leaves_held_fixed():
    args = {"w": jnp.array([1.0, 2.0]), "n": jnp.array(3)}
    g = gradcheck.numerical_grad(lambda a: jnp.sum(a["w"] ** 2) * a["n"], args)
    np.testing.assert_allclose(g["w"], [6.0, 12.0], rtol=1e-9)
    assert g["n"].dtype == jax.dtypes.float0


def test_x64_flag_unchanged():
    before = jax.config.jax_enable_x64
    gradcheck.numerical_grad(lambda x: jnp.sum(x**2), jnp.ones(3))
    gradcheck.check_grad(lambda x: jnp.sum(x**2), jnp.ones(3))
    assert jax.config.jax_enable_x64 == before
    assert jnp.zeros(1).dtype == (jnp.float64 if before else jnp.float32)


# ---------------------------------------------------------------------------------------------
# check_grad


def test_check_grad_passes_correct_float32_mlp():
    params = _mlp_params(jax.random.key(6))
    x, t = _data(jax.random.key(7))
    report = gradcheck.check_grad(_mlp_loss, params, x, t)
    assert report.passed and bool(report)
    names = [leaf.name for leaf in report.leaves]
    assert names == ["dense_0/bias", "dense_0/kernel", "dense_1/bias", "dense_1/kernel"]
    assert report["dense_0/kernel"].num_checked == 20
    assert all(leaf.max_relative_error < 1e-4 for leaf in report.leaves)
    assert report.leaves[0].rtol == 1e-3 and report.leaves[0].atol == 1e-5


def test_check_grad_fails_one_percent_wrong_bias_and_names_it():
    params = _mlp_params(jax.random.key(6))
    x, t = _data(jax.random.key(7))
    report = gradcheck.check_grad(_mlp_loss_wrong_bias, params, x, t)
    assert not report.passed
    assert report.failed_leaves == ("dense_0/bias",)
    bias = report["dense_0/bias"]
    assert bias.num_failed == 5 and bias.num_kinks == 0
    np.testing.assert_allclose(bias.max_relative_error, 0.01 / 1.01, rtol=2e-2)
    worst = bias.worst[0]
    assert worst.failed
    np.testing.assert_allclose(worst.analytic, 1.01 * worst.numeric, rtol=1e-4)
    text = str(report)
    assert "dense_0/bias" in text and "FAIL" in text
    assert "analytic=" in text and "numeric=" in text


@pytest.mark.loose_promotion
def test_check_grad_flax_linen_model():
    nn = pytest.importorskip("flax.linen")

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            x = nn.tanh(nn.Dense(5)(x))
            x = nn.Dropout(0.3, deterministic=not train)(x)
            return nn.Dense(2)(x)

    model = MLP()
    x = jax.random.normal(jax.random.key(8), (4, 3))
    variables = model.init(jax.random.key(9), x)

    def loss(variables, x, key):
        y = model.apply(variables, x, train=True, rngs={"dropout": key})
        return jnp.mean(y**2)

    report = gradcheck.check_grad(loss, variables, x, jax.random.key(10))
    assert report.passed, str(report)
    assert "params/Dense_0/kernel" in [leaf.name for leaf in report.leaves]
    assert "params/Dense_1/bias" in str(report)


@pytest.mark.parametrize("raw", [False, True])
def test_check_grad_dropout_key_held_fixed(raw):
    key = jax.random.PRNGKey(11) if raw else jax.random.key(11)
    params = _mlp_params(jax.random.key(6))
    x, t = _data(jax.random.key(7))

    def loss(params, x, t, key):
        h = jnp.tanh(x @ params["dense_0"]["kernel"] + params["dense_0"]["bias"][None])
        keep = jax.random.bernoulli(key, 0.7, h.shape)
        h = jnp.where(keep, h / 0.7, 0.0)
        return 0.5 * jnp.sum(
            (h @ params["dense_1"]["kernel"] + params["dense_1"]["bias"][None] - t) ** 2
        )

    report = gradcheck.check_grad(loss, params, x, t, key)
    assert report.passed, str(report)
    # Also as part of the differentiated argument: the key leaf is held fixed and listed.
    report = gradcheck.check_grad(lambda a, x, t: loss(a[0], x, t, a[1]), (params, key), x, t)
    assert report.passed and report.skipped == ("1",)


def test_check_grad_relu_at_zero_is_a_kink():
    w = jnp.array([1.5, -2.0, 0.5, 3.0])
    x = jnp.array([0.0, 0.7, 0.0, -0.4])  # two coordinates exactly on the kink
    report = gradcheck.check_grad(lambda x: jnp.sum(jax.nn.relu(x) * w), x)
    leaf = report["arg0"]
    assert report.passed and leaf.num_kinks == 2 and leaf.num_failed == 0
    kinks = sorted(c.index for c in leaf.worst if c.kink)
    assert kinks == [(0,), (2,)]
    # A real error next to a kink still fails.
    bad = jax.custom_vjp(lambda x: jax.nn.relu(x))
    bad.defvjp(lambda x: (jax.nn.relu(x), x), lambda x, g: (jnp.where(x > 0, 1.02 * g, 0.0),))
    report = gradcheck.check_grad(lambda x: jnp.sum(bad(x) * w), x)
    assert not report.passed and report["arg0"].num_failed == 1 and report["arg0"].num_kinks == 2


def _sin_with_vjp(factor):
    f = jax.custom_vjp(jnp.sin)
    f.defvjp(lambda x: (jnp.sin(x), x), lambda x, g: (g * jnp.cos(x) * factor,))
    return f


def test_check_grad_wrong_smooth_gradient_is_not_a_kink():
    # sin curves, so its one-sided differences differ by h |sin x|: more than float64's rtol.
    # That alone must not turn a 5% error into a "kink".
    x = jnp.array([0.3, -0.7, 1.1, 0.2, -1.5])
    with jax.enable_x64(True):
        x64 = x.astype(jnp.float64)
        good = gradcheck.check_grad(lambda w: _sin_with_vjp(1.0)(w).sum(), x64)
        bad = gradcheck.check_grad(lambda w: _sin_with_vjp(1.05)(w).sum(), x64)
        directions = gradcheck.check_grad(
            lambda w: _sin_with_vjp(1.05)(w).sum(), x64, num_directions=3
        )
    assert good.passed, str(good)
    assert not bad.passed and bad["arg0"].num_failed == 5 and bad["arg0"].num_kinks == 0
    assert not directions.passed and directions["arg0"].num_kinks == 0
    # float32, at a stationary point: x^2 with gradient 2x + 0.5 is wrong by 0.5 at 0.
    sq = jax.custom_vjp(lambda w: w**2)
    sq.defvjp(lambda w: (w**2, w), lambda w, g: (g * (2 * w + 0.5),))
    report = gradcheck.check_grad(lambda w: sq(w).sum(), jnp.zeros(3))
    assert not report.passed and report["arg0"].num_kinks == 0


def test_check_grad_sees_the_closure_as_it_is_now():
    scale = {"value": 1.0}

    def loss(w):
        return scale["value"] * jnp.sum(jnp.sin(w))

    w = jnp.array([0.1, 0.5, -0.3])
    assert gradcheck.check_grad(loss, w).passed
    scale["value"] = 2.0  # a Python scalar the loss reads: a new program, not a cached gradient
    report = gradcheck.check_grad(loss, w)
    assert report.passed, str(report)
    np.testing.assert_allclose(
        [c.analytic for c in report["arg0"].worst], [c.numeric for c in report["arg0"].worst]
    )
    offset = {"value": jnp.zeros(3)}  # an array it closes over: a constant of the same program
    loss2 = lambda w: jnp.sum(jnp.sin(w + offset["value"]) ** 2)
    assert gradcheck.check_grad(loss2, w).passed
    offset["value"] = jnp.full(3, 0.7)
    assert gradcheck.check_grad(loss2, w).passed


def _fresh_caches():
    gradcheck._GRADS.clear()
    gradcheck._EVALUATORS.clear()


def _inner_jit_loss(x):
    # x is closed over inside jax.jit: a constant of the inner program, not of the outer one.
    return jax.jit(lambda w: jnp.sum(jnp.tanh(x @ w) ** 2))


@pytest.mark.parametrize("as_numpy", [True, False])
@pytest.mark.parametrize("nested", [False, True])
def test_check_grad_inner_jit_closure_new_data_is_checked_as_it_is(as_numpy, nested):
    # Issue 16: the cache returned X1's gradient for X2 (a correct loss failed, as X2's data
    # differs). Both orders, so that neither program's gradient can stand in for the other's.
    rng = np.random.default_rng(0)
    xs = [rng.normal(size=(6, 4)).astype(np.float32) for _ in range(2)]
    if not as_numpy:
        xs = [jnp.asarray(x) for x in xs]
    w = jnp.ones(4)
    make = (lambda x: jax.jit(lambda w: _inner_jit_loss(x)(w) * 2.0)) if nested else _inner_jit_loss
    for order in (xs, xs[::-1]):
        _fresh_caches()
        for x in order:
            report = gradcheck.check_grad(make(x), w)
            assert report.passed, str(report)
            expect = (
                2
                * to_f64(x).T
                @ (np.tanh(to_f64(x) @ np.ones(4)) / np.cosh(to_f64(x) @ np.ones(4)) ** 2)
            )
            analytic = {c.index: c.analytic for c in report["arg0"].worst}
            for i, a in analytic.items():
                np.testing.assert_allclose(a, (2.0 if nested else 1.0) * expect[i], rtol=1e-4)


def _scaled_sin_vjp(c):
    c = np.full(4, c, np.float32)

    @jax.custom_vjp
    def g(v):
        return jnp.sum(jnp.sin(v))

    g.defvjp(lambda v: (g(v), v), lambda v, ct: (ct * jnp.cos(v) * c,))
    return jax.jit(g)


def _scaled_sin_jvp(c):
    c = jnp.full(4, c, jnp.float32)

    @jax.custom_jvp
    def g(v):
        return jnp.sum(jnp.sin(v))

    g.defjvp(lambda p, t: (g(p[0]), jnp.sum(jnp.cos(p[0]) * c * t[0])))
    return jax.jit(g)


@pytest.mark.parametrize("make", [_scaled_sin_vjp, _scaled_sin_jvp])
def test_check_grad_custom_rule_closure_wrong_backward_fails(make):
    # Issue 16: a 5%-wrong backward pass closed over data was accepted after a correct one with the
    # same printed program (the data lives in the rule's closure, baked into the inner program).
    w = jnp.linspace(-1.0, 1.0, 4)
    _fresh_caches()
    assert gradcheck.check_grad(make(1.0), w).passed
    bad = gradcheck.check_grad(make(1.05), w)
    assert not bad.passed and bad["arg0"].num_failed == 4
    _fresh_caches()
    assert not gradcheck.check_grad(make(1.05), w).passed
    assert gradcheck.check_grad(make(1.0), w).passed


@pytest.mark.loose_promotion
def test_check_grad_flax_apply_closure_over_data_and_variables():
    nn = pytest.importorskip("flax.linen")
    model = nn.Dense(3)
    rng = np.random.default_rng(1)
    xs = [jnp.asarray(rng.normal(size=(5, 4)), jnp.float32) for _ in range(2)]
    variables = model.init(jax.random.key(0), xs[0])
    _fresh_caches()
    for x in xs:
        loss = jax.jit(lambda v, x=x: jnp.sum(jnp.tanh(model.apply(v, x)) ** 2))
        report = gradcheck.check_grad(loss, variables)
        assert report.passed, str(report)
    # Variables closed over, the input checked: two different models, same printed program.
    other = jax.tree_util.tree_map(lambda a: 1.5 * a + 0.1, variables)
    for v in (variables, other):
        loss = jax.jit(lambda x, v=v: jnp.sum(jnp.sin(model.apply(v, x))))
        report = gradcheck.check_grad(loss, xs[0])
        assert report.passed, str(report)


def test_check_grad_reuses_the_compiled_programs_of_the_same_function():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(6, 4)).astype(np.float32)
    w = jnp.ones(4)
    _fresh_caches()
    assert gradcheck.check_grad(_inner_jit_loss(x), w).passed
    grads, evaluators = dict(gradcheck._GRADS), dict(gradcheck._EVALUATORS)
    # The gradient in the caller's float32 and in float64 (checked against the differences too).
    assert len(grads) == 2 and len(evaluators) == 1
    # A new closure over equal data is the same function: the same compiled programs.
    assert gradcheck.check_grad(_inner_jit_loss(x.copy()), w).passed
    assert gradcheck._GRADS == grads and gradcheck._EVALUATORS == evaluators
    # Other data: new programs beside the old ones.
    assert gradcheck.check_grad(_inner_jit_loss(x + 1.0), w).passed
    assert len(gradcheck._GRADS) == 4 and len(gradcheck._EVALUATORS) == 2


def test_check_grad_does_not_cache_opaque_callbacks():
    # A pure_callback's function is opaque: the program is never reused for another one.
    def loss(scale):
        def f(v):
            y = jax.pure_callback(
                lambda a: np.sin(a) * scale,
                jax.ShapeDtypeStruct(v.shape, v.dtype),
                v,
                vmap_method="sequential",
            )
            return jnp.sum(y)

        f = jax.custom_jvp(f)
        f.defjvp(lambda p, t: (f(p[0]), jnp.sum(jnp.cos(p[0]) * t[0])))
        return f

    w = jnp.array([0.1, -0.5, 0.9])
    _fresh_caches()
    assert gradcheck.check_grad(loss(1.0), w).passed
    assert not gradcheck.check_grad(loss(1.05), w).passed
    assert not gradcheck._EVALUATORS


def test_check_grad_unhashable_callable():
    class Loss:
        __hash__ = None

        def __call__(self, w):
            return jnp.sum(jnp.tanh(w))

    assert gradcheck.check_grad(Loss(), jnp.array([0.2, -0.4])).passed


def test_check_grad_lifts_a_cast_of_the_result_and_warns_where_it_lowers_the_gradient():
    # A cast at the end made the float64 differences float32 noise (a warning, then failures);
    # they are taken with the cast widened now, so a float32 model's check stays exact.
    w = jnp.array([0.2, -0.4, 0.9])
    report = gradcheck.check_grad(lambda w: jnp.sum(jnp.tanh(w)).astype(jnp.float32), w)
    assert report.passed and report["arg0"].max_relative_error < 1e-6, str(report)
    expect = 1 / np.cosh(to_f64(w)) ** 2
    np.testing.assert_allclose(
        [c.numeric for c in report["arg0"].worst],
        [expect[c.index] for c in report["arg0"].worst],
        rtol=1e-9,
    )
    # A float64 model that casts to float32 computes its gradient in float32: said, and judged so.
    with jax.enable_x64(True):
        w64 = w.astype(jnp.float64)
        with pytest.warns(
            gradcheck.LowPrecisionWarning, match="arg0 \\(float64\\) is computed through float32"
        ):
            report = gradcheck.check_grad(lambda w: jnp.sum(jnp.tanh(w.astype(jnp.float32))), w64)
    assert report.passed, str(report)
    assert report["arg0"].precision == "float32" and report["arg0"].rtol == 1e-3


def test_check_grad_sampled_covers_every_leaf():
    params = _mlp_params(jax.random.key(6), d=6, hidden=8, out=2)
    x, t = _data(jax.random.key(7), d=6, out=2)
    report = gradcheck.check_grad(_mlp_loss, params, x, t, num_checks=20, key=jax.random.key(0))
    counts = {leaf.name: leaf.num_checked for leaf in report.leaves}
    assert sum(counts.values()) == 20 and min(counts.values()) >= 1
    assert counts["dense_0/kernel"] > counts["dense_1/bias"]
    assert report.passed and report.mode == "sampled"
    # Fewer checks than leaves: still one in each leaf.
    report = gradcheck.check_grad(_mlp_loss, params, x, t, num_checks=2)
    assert [leaf.num_checked for leaf in report.leaves] == [1, 1, 1, 1]
    # The wrong bias is found by sampling too.
    report = gradcheck.check_grad(_mlp_loss_wrong_bias, params, x, t, num_checks=8, key=3)
    assert report.failed_leaves == ("dense_0/bias",)


def test_check_grad_directions_detects_one_percent():
    params = _mlp_params(jax.random.key(6))
    x, t = _data(jax.random.key(7))
    good = gradcheck.check_grad(_mlp_loss, params, x, t, num_directions=3)
    assert good.passed and good.mode == "directions"
    assert all(leaf.num_checked == 3 for leaf in good.leaves)
    bad = gradcheck.check_grad(_mlp_loss_wrong_kernel, params, x, t, num_directions=3)
    assert bad.failed_leaves == ("dense_1/kernel",)
    assert "direction 0" in str(bad)


def test_check_grad_float64_and_argnums_names():
    with jax.enable_x64(True):
        a = jnp.array([0.3, -1.2], jnp.float64)
        b = {"scale": jnp.array(2.0, jnp.float64)}
        report = gradcheck.check_grad(
            lambda a, b: jnp.sum(jnp.exp(a * b["scale"])), a, b, argnums=(0, 1)
        )
    assert report.passed
    assert [leaf.name for leaf in report.leaves] == ["arg0", "arg1/scale"]
    assert report.leaves[0].rtol == 1e-7 and report.leaves[0].dtype == "float64"
    assert report.leaves[0].rtol64 is None  # float64 arguments: nothing more to check


def test_check_grad_custom_tolerance_and_str_table():
    report = gradcheck.check_grad(_mlp_loss_wrong_bias, *_params_and_data(), rtol=0.05, atol=0.0)
    assert report.passed
    text = str(report)
    for word in ("leaf", "checked", "max rel err", "failures", "kinks", "status", "rtol=0.05"):
        assert word in text


def _params_and_data():
    return (_mlp_params(jax.random.key(6)), *_data(jax.random.key(7)))


# ---------------------------------------------------------------------------------------------
# Errors


def test_error_non_scalar_output():
    with pytest.raises(ValueError, match=r"scalar \(shape \(\)\).*shape \(3,\)"):
        gradcheck.check_grad(lambda x: x**2, jnp.ones(3))
    with pytest.raises(ValueError, match=r"shape \(1,\)"):
        gradcheck.numerical_grad(lambda x: jnp.sum(x, keepdims=True), jnp.ones(3))


def test_error_integer_output_and_inputs():
    with pytest.raises(TypeError, match="real floating scalar"):
        gradcheck.check_grad(lambda x: jnp.sum(x > 0), jnp.ones(3))
    with pytest.raises(TypeError, match="no floating leaves"):
        gradcheck.check_grad(lambda n: jnp.sum(n) * 1.0, jnp.arange(3))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_checks": 0}, ValueError, "num_checks must be a positive integer"),
        ({"num_directions": -1}, ValueError, "num_directions must be a positive integer"),
        ({"num_checks": 2, "num_directions": 2}, ValueError, "not both"),
        ({"argnums": 2}, ValueError, "out of range"),
        ({"argnums": "0"}, TypeError, "argnums must be an int"),
        ({"argnums": (0, 0)}, ValueError, "same argument twice"),
        ({"eps": 0.0}, ValueError, "relative step"),
        ({"chunk_size": 0}, ValueError, "chunk_size"),
        ({"rtol": -1.0}, ValueError, "rtol must be a finite number >= 0"),
        ({"atol": "1e-5"}, TypeError, "atol must be a number"),
    ],
)
def test_error_bad_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        gradcheck.check_grad(lambda x, y: jnp.sum(x * y), jnp.ones(3), jnp.ones(3), **kwargs)


def test_error_not_callable():
    with pytest.raises(TypeError, match="callable"):
        gradcheck.numerical_grad(3.0, jnp.ones(2))
