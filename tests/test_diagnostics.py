"""Tests for jaxnorm.diagnostics against hand-computed values, NumPy and manual forward passes."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxnorm import diagnostics, initializers
from tests.helpers import to_f64, tol

# ---------------------------------------------------------------------------------------------
# layer_stats / activation_stats
# ---------------------------------------------------------------------------------------------


def test_layer_stats_hand_computed():
    # Unit 0 fires, unit 1 is always negative, unit 2 always exactly 0: two of three are dead.
    y = jnp.array([[1.0, -1.0, 0.0], [2.0, -3.0, 0.0]])
    s = diagnostics.layer_stats(y, kind="relu")
    assert float(s.dead_fraction) == pytest.approx(2 / 3)
    assert float(s.mean) == pytest.approx(-1 / 6)
    ref = np.array([[1.0, -1.0, 0.0], [2.0, -3.0, 0.0]])
    assert float(s.std) == pytest.approx(np.std(ref), rel=1e-6)
    assert math.isnan(float(s.saturated_fraction))


def test_layer_stats_dead_units_over_spatial_positions():
    # NHWC: channel c is dead only if it is <= 0 at every example and position.
    y = -np.ones((2, 3, 3, 4), np.float32)
    y[1, 2, 0, 1] = 0.5  # channel 1 fires once
    y[0, 0, 0, 3] = 1e-3  # channel 3 fires once
    s = diagnostics.layer_stats(jnp.asarray(y))
    assert float(s.dead_fraction) == pytest.approx(0.5)


def test_layer_stats_saturation_tanh_and_sigmoid():
    t = diagnostics.layer_stats(jnp.array([0.995, -0.999, 0.5, 0.99]), kind="tanh")
    assert float(t.saturated_fraction) == pytest.approx(0.5)  # 0.99 itself is not > 0.99
    t2 = diagnostics.layer_stats(
        jnp.array([0.995, -0.999, 0.5, 0.99]), kind="tanh", tanh_threshold=0.9
    )
    assert float(t2.saturated_fraction) == pytest.approx(0.75)
    sig = diagnostics.layer_stats(jnp.array([0.005, 0.995, 0.5, 0.01]), kind="sigmoid")
    assert float(sig.saturated_fraction) == pytest.approx(0.5)
    sig2 = diagnostics.layer_stats(
        jnp.array([0.005, 0.995, 0.5, 0.01]), kind="sigmoid", sigmoid_threshold=0.1
    )
    assert float(sig2.saturated_fraction) == pytest.approx(0.75)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_layer_stats_vs_numpy(dtype):
    y = jax.random.normal(jax.random.key(0), (64, 8), jnp.float32).astype(dtype)
    ref = to_f64(y)
    s = diagnostics.layer_stats(y, bins=7)
    np.testing.assert_allclose(float(s.mean), ref.mean(), **tol(jnp.float32, 10))
    np.testing.assert_allclose(float(s.std), ref.std(), **tol(jnp.float32, 10))
    counts, edges = np.histogram(ref.ravel(), bins=7)
    np.testing.assert_array_equal(s.hist_counts, counts)
    np.testing.assert_allclose(s.hist_edges, edges, rtol=1e-6, atol=1e-6)
    assert s.hist_counts.dtype == jnp.int32
    assert s.mean.dtype == jnp.float32
    dead = np.mean(~np.any(ref > 0, axis=0))
    assert float(s.dead_fraction) == pytest.approx(dead)


def test_layer_stats_fixed_range_and_jit():
    y = jnp.array([[-0.5, 0.25], [0.75, 2.0]])
    s = diagnostics.layer_stats(y, bins=4, hist_range=(-1.0, 1.0))
    counts, edges = np.histogram(np.asarray(y), bins=4, range=(-1.0, 1.0))
    np.testing.assert_array_equal(s.hist_counts, counts)  # 2.0 falls outside the range
    np.testing.assert_allclose(s.hist_edges, edges)
    jitted = jax.jit(lambda a: diagnostics.layer_stats(a, kind="tanh", bins=4))(y)
    eager = diagnostics.layer_stats(y, kind="tanh", bins=4)
    for a, b in zip(jitted, eager, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_activation_stats_per_layer_kinds_and_table():
    acts = {
        "h1": jnp.array([[0.995, 0.2]]),
        "h2": jnp.array([[0.0, 0.999]]),
        "out": jnp.ones((1, 2)),
    }
    stats = diagnostics.activation_stats(acts, kind={"h1": "tanh", "h2": "sigmoid"})
    assert list(stats) == ["h1", "h2", "out"]
    assert float(stats["h1"].saturated_fraction) == pytest.approx(0.5)
    assert float(stats["h2"].saturated_fraction) == pytest.approx(1.0)
    assert math.isnan(float(stats["out"].saturated_fraction))
    table = diagnostics.stats_table(stats)
    lines = table.splitlines()
    assert len(lines) == 4 and lines[0].split()[:5] == ["layer", "mean", "std", "dead", "saturated"]
    assert lines[1].startswith("h1") and "50.0%" in lines[1]
    assert "n/a" in lines[3]


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: diagnostics.layer_stats(jnp.arange(3)), TypeError, "floating dtype"),
        (lambda: diagnostics.layer_stats(jnp.float32(1.0)), ValueError, "at least 1 dimension"),
        (lambda: diagnostics.layer_stats(jnp.zeros((0, 3))), ValueError, "at least 1 dimension"),
        (lambda: diagnostics.layer_stats(jnp.ones(3), bins=0), ValueError, "bins must be"),
        (lambda: diagnostics.layer_stats(jnp.ones(3), kind="tahn"), ValueError, "unknown kind"),
        (lambda: diagnostics.layer_stats(jnp.ones(3), kind=1), TypeError, "kind must be"),
        (
            lambda: diagnostics.layer_stats(jnp.ones(3), tanh_threshold=1.5),
            ValueError,
            "tanh_threshold must be in",
        ),
        (
            lambda: diagnostics.layer_stats(jnp.ones(3), hist_range=(1, 0)),
            ValueError,
            "lo < hi",
        ),
        (lambda: diagnostics.activation_stats([jnp.ones(3)]), TypeError, "mapping"),
        (
            lambda: diagnostics.activation_stats({"a": jnp.ones(3)}, kind={"b": "tanh"}),
            ValueError,
            "does not have",
        ),
    ],
)
def test_stats_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


# ---------------------------------------------------------------------------------------------
# update_ratio and the optax monitor
# ---------------------------------------------------------------------------------------------


def _tree(key, scale=1.0):
    k1, k2 = jax.random.split(key)
    return {
        "dense": {
            "kernel": scale * jax.random.normal(k1, (4, 3)),
            "bias": scale * jax.random.normal(k2, (3,)),
        },
        "scale": jnp.full((2,), 2.0 * scale),
    }


def test_update_ratio_vs_numpy_norms():
    params, updates = _tree(jax.random.key(0)), _tree(jax.random.key(1), 1e-3)
    ratios = diagnostics.update_ratio(params, updates)
    assert jax.tree_util.tree_structure(ratios) == jax.tree_util.tree_structure(params)
    for r, p, u in zip(
        jax.tree_util.tree_leaves(ratios),
        jax.tree_util.tree_leaves(params),
        jax.tree_util.tree_leaves(updates),
        strict=True,
    ):
        expected = np.linalg.norm(to_f64(u).ravel()) / np.linalg.norm(to_f64(p).ravel())
        assert r.shape == ()
        np.testing.assert_allclose(float(r), expected, rtol=1e-5)


def test_update_ratio_zero_safe_and_low_precision():
    params = {"a": jnp.zeros(3), "b": jnp.zeros(3), "c": jnp.array([3.0, 4.0], jnp.bfloat16)}
    updates = {"a": jnp.zeros(3), "b": jnp.ones(3), "c": jnp.array([0.03, 0.04], jnp.bfloat16)}
    r = diagnostics.update_ratio(params, updates)
    assert float(r["a"]) == 0.0
    assert float(r["b"]) == math.inf
    assert r["c"].dtype == jnp.float32
    ref = np.linalg.norm(to_f64(updates["c"])) / 5.0
    np.testing.assert_allclose(float(r["c"]), ref, rtol=1e-6)


def test_update_ratio_mismatched_trees():
    with pytest.raises(ValueError, match="same tree structure"):
        diagnostics.update_ratio({"w": jnp.ones(2)}, {"v": jnp.ones(2)})
    with pytest.raises(ValueError, match=r"has shape \(3,\) but the parameter has shape \(2,\)"):
        diagnostics.update_ratio({"w": jnp.ones(2)}, {"w": jnp.ones(3)})


@pytest.mark.loose_promotion  # optax's adam mixes weak-typed scalars with bfloat16-free floats
def test_monitor_under_jit_in_chain_equals_update_ratio():
    params = _tree(jax.random.key(0))
    grads = _tree(jax.random.key(1))
    opt = optax.chain(optax.adam(1e-2), diagnostics.update_ratio_monitor())
    plain = optax.adam(1e-2)
    state, plain_state = opt.init(params), plain.init(params)
    zeros = diagnostics.latest_update_ratios(state)
    assert all(float(z) == 0.0 for z in jax.tree_util.tree_leaves(zeros))

    @jax.jit
    def step(params, state):
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, updates

    for _ in range(2):
        old = params
        params, state, updates = step(params, state)
        ref_updates, plain_state = plain.update(grads, plain_state, old)
        # Passes the updates through unchanged.
        for a, b in zip(
            jax.tree_util.tree_leaves(updates), jax.tree_util.tree_leaves(ref_updates), strict=True
        ):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
        got = diagnostics.latest_update_ratios(state)
        for r, p, u in zip(
            jax.tree_util.tree_leaves(got),
            jax.tree_util.tree_leaves(old),
            jax.tree_util.tree_leaves(ref_updates),
            strict=True,
        ):
            expected = np.linalg.norm(to_f64(u)) / np.linalg.norm(to_f64(p))
            np.testing.assert_allclose(float(r), expected, rtol=1e-5)


@pytest.mark.loose_promotion
def test_monitor_inside_inject_hyperparams_and_vmap():
    params = {"w": jnp.array([3.0, 4.0])}
    grads = {"w": jnp.array([3.0, 4.0])}

    def make(lr):
        return optax.chain(optax.sgd(lr), diagnostics.update_ratio_monitor())

    opt = optax.inject_hyperparams(make)(lr=1e-3)
    _, state = opt.update(grads, opt.init(params), params)
    np.testing.assert_allclose(float(diagnostics.latest_update_ratios(state)["w"]), 1e-3, 1e-5)

    def ratio_for(lr):
        o = make(lr)
        _, s = o.update(grads, o.init(params), params)
        return diagnostics.latest_update_ratios(s)["w"]

    got = jax.vmap(ratio_for)(jnp.array([1e-3, 1e-2]))
    np.testing.assert_allclose(got, [1e-3, 1e-2], rtol=1e-5)


def test_monitor_errors():
    opt = diagnostics.update_ratio_monitor()
    params = {"w": jnp.ones(2)}
    with pytest.raises(ValueError, match="needs the parameters"):
        opt.update(params, opt.init(params))
    with pytest.raises(ValueError, match="no UpdateRatioState"):
        diagnostics.latest_update_ratios((optax.EmptyState(),))


def test_check_update_ratios_by_hand():
    # Ratios worked out by hand: ||[[0.003, 0.004]]|| / ||[[3, 4]]|| = 0.005 / 5 = 1e-3 (healthy);
    # a 2x2 kernel of ones (norm 2) moved by 1e-6 everywhere (norm 2e-6): 1e-6, too low; a bias
    # [1, 0] moved by [0.5, 0]: 0.5, "too high" by the rule, but a bias is not judged; a zero
    # bias that moved: inf.
    params = {
        "dense": {"kernel": jnp.array([[3.0, 4.0]]), "bias": jnp.array([1.0, 0.0])},
        "out": {"kernel": jnp.ones((2, 2)), "bias": jnp.zeros(2)},
    }
    updates = {
        "dense": {"kernel": jnp.array([[0.003, 0.004]]), "bias": jnp.array([0.5, 0.0])},
        "out": {"kernel": jnp.full((2, 2), 1e-6), "bias": jnp.array([0.1, 0.0])},
    }
    ratios = diagnostics.update_ratio(params, updates)
    hand = {"dense/kernel": 1e-3, "dense/bias": 0.5, "out/kernel": 1e-6, "out/bias": math.inf}
    got = {
        "/".join(str(k.key) for k in p): float(r)
        for p, r in jax.tree_util.tree_leaves_with_path(ratios)
    }
    np.testing.assert_allclose([got[k] for k in hand], list(hand.values()), rtol=1e-5)

    check = diagnostics.check_update_ratios(ratios, params)
    assert not check.ok
    assert list(check.flagged) == ["out/kernel"]  # too low; dense/kernel is healthy
    np.testing.assert_allclose(check.flagged["out/kernel"], 1e-6, rtol=1e-5)
    assert set(check.not_judged) == {"dense/bias", "out/bias"}
    np.testing.assert_allclose(check.not_judged["dense/bias"], 0.5, rtol=1e-6)
    assert check.not_judged["out/bias"] == math.inf and check.skipped == ()
    assert check.message.startswith("1 of 2 update ratios outside [0.0001, 0.01]: out/kernel=1e-06")
    assert "too low" in check.message and "too high" not in check.message
    assert "not judged (fewer than 2 dimensions): dense/bias=0.5, out/bias=inf" in check.message
    assert str(check) == check.message

    # Every leaf judged (the old behaviour, on request): the bias is now "too high".
    every = diagnostics.check_update_ratios(ratios, min_ndim=0)
    assert set(every.flagged) == {"out/kernel", "dense/bias"} and every.skipped == ("out/bias",)
    assert every.not_judged == {}
    assert every.message.startswith("2 of 3 update ratios outside")
    assert "too high" in every.message and "all zeros" in every.message
    assert diagnostics.check_update_ratios(ratios, params, min_ndim=0).flagged == every.flagged

    # Healthy kernels pass however large the biases' ratios are.
    healthy = {**ratios, "out": {**ratios["out"], "kernel": jnp.float32(2e-3)}}
    ok = diagnostics.check_update_ratios(healthy, params)
    assert ok.ok and ok.flagged == {} and ok.message.startswith("all 2 update ratios within")


def test_check_update_ratios_edge_cases():
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
    zero_w = diagnostics.check_update_ratios({"w": jnp.float32(jnp.inf), "b": 1e-3}, params)
    assert zero_w.ok and zero_w.skipped == ("w",) and "all zeros" in zero_w.message
    # A NaN is flagged on any leaf, judged or not: the loss or the gradients broke.
    nan = diagnostics.check_update_ratios({"w": 1e-3, "b": jnp.float32(jnp.nan)}, params)
    assert not nan.ok and set(nan.flagged) == {"b"} and "NaN" in nan.message
    assert nan.message.startswith("1 of 2 update ratios outside")
    # min_ndim=1 judges the biases too (vectors), not scalars.
    scalar = {"w": jnp.ones((2, 2)), "b": jnp.ones(2), "s": jnp.float32(1.0)}
    r = {"w": 1e-3, "b": 0.5, "s": 0.5}
    one = diagnostics.check_update_ratios(r, scalar, min_ndim=1)
    assert set(one.flagged) == {"b"} and set(one.not_judged) == {"s"}
    # Parameters as shapes are enough (eval_shape's ShapeDtypeStruct).
    shapes = jax.eval_shape(lambda: params)
    assert diagnostics.check_update_ratios({"w": 1e-3, "b": 0.5}, shapes).not_judged == {"b": 0.5}
    with pytest.raises(TypeError, match=r"check_update_ratios\(ratios, params\).*min_ndim=0"):
        diagnostics.check_update_ratios({"w": 1e-3})
    with pytest.raises(ValueError, match="ratios and params must have the same tree structure"):
        diagnostics.check_update_ratios({"w": 1e-3}, {"v": jnp.ones((2, 2))})
    with pytest.raises(ValueError, match="low < high"):
        diagnostics.check_update_ratios({"w": 1.0}, params, low=1.0, high=0.5)
    with pytest.raises(ValueError, match="min_ndim must be >= 0"):
        diagnostics.check_update_ratios({"w": 1.0}, min_ndim=-1)
    with pytest.raises(TypeError, match="min_ndim must be an int"):
        diagnostics.check_update_ratios({"w": 1.0}, min_ndim=2.0)


def test_check_update_ratios_names_nnx_variables_as_linen_does():
    """An nnx.State flattens each Variable to its array under the attribute "value"; the check
    names the variable, as for the same layer in linen."""
    params = nnx.state(_NnxMLP(nnx.Rngs(0)), nnx.Param)
    ratios = jax.tree_util.tree_map(lambda p: jnp.float32(0.5), params)
    check = diagnostics.check_update_ratios(ratios, params)
    assert set(check.flagged) == {"first/kernel", "layers/0/kernel", "layers/1/kernel"}
    assert set(check.not_judged) == {
        "first/bias", "layers/0/bias", "layers/1/bias", "bn/scale", "bn/bias"
    }  # fmt: skip
    assert "first/kernel=0.5 (too high" in check.message and "/value" not in check.message
    linen_params = {"first": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones(4)}}
    linen = diagnostics.check_update_ratios(jax.tree.map(lambda p: 0.5, linen_params), linen_params)
    assert set(linen.flagged) == {"first/kernel"} and set(linen.not_judged) == {"first/bias"}


# ---------------------------------------------------------------------------------------------
# Initial loss
# ---------------------------------------------------------------------------------------------


def test_expected_initial_loss_values():
    assert diagnostics.expected_initial_loss(10) == math.log(10)
    assert diagnostics.expected_initial_loss(10, kind="multiclass_svm") == 9.0
    assert diagnostics.expected_initial_loss(3, kind="multiclass_svm", margin=2.0) == 4.0
    assert diagnostics.expected_initial_loss(5, kind="sigmoid_binary_cross_entropy") == math.log(2)


def test_multiclass_svm_at_zero_scores_by_hand():
    # CS231n's SVM loss with all scores 0: every wrong class contributes max(0, 0 - 0 + 1) = 1.
    scores, label = np.zeros(7), 3
    margins = np.maximum(0, scores - scores[label] + 1.0)
    margins[label] = 0
    assert margins.sum() == diagnostics.expected_initial_loss(7, kind="multiclass_svm")


@pytest.mark.loose_promotion  # flax's Dense
@pytest.mark.parametrize(("stddev", "ok"), [(1e-3, True), (3.0, False)])
def test_fresh_model_initial_loss(stddev, ok):
    x = jax.random.normal(jax.random.key(0), (256, 20))
    labels = jax.random.randint(jax.random.key(1), (256,), 0, 10)
    model = nn.Sequential(
        [
            nn.Dense(32, kernel_init=initializers.small_normal(stddev)),
            nn.relu,
            nn.Dense(10, kernel_init=initializers.small_normal(stddev)),
        ]
    )
    variables = jax.jit(model.init)(jax.random.key(2), x)
    logits = jax.jit(model.apply)(variables, x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    check = diagnostics.check_initial_loss(loss, 10)
    assert check.ok is ok
    assert check.expected == math.log(10)
    if ok:
        assert abs(float(loss) - math.log(10)) < 1e-3
        assert check.message.startswith("ok")
    else:
        assert "too high" in check.message and "too large" in check.message


def test_check_initial_loss_messages_and_errors():
    low = diagnostics.check_initial_loss(1.0, 10)
    assert not low.ok and "too low" in low.message
    nan = diagnostics.check_initial_loss(float("nan"), 10)
    assert not nan.ok and "NaN" in nan.message
    assert diagnostics.check_initial_loss(2.5, 10, rtol=0.1).ok
    assert not diagnostics.check_initial_loss(2.6, 10, rtol=0.1).ok
    with pytest.raises(ValueError, match="num_classes must be at least 2"):
        diagnostics.check_initial_loss(1.0, 1)
    with pytest.raises(ValueError, match="num_classes must be at least 2"):
        diagnostics.expected_initial_loss(0)
    with pytest.raises(TypeError, match="num_classes must be an int"):
        diagnostics.expected_initial_loss(True)
    with pytest.raises(ValueError, match="unknown kind"):
        diagnostics.expected_initial_loss(3, kind="mse")
    with pytest.raises(ValueError, match="scalar"):
        diagnostics.check_initial_loss(jnp.ones(2), 3)
    with pytest.raises(ValueError, match="rtol"):
        diagnostics.check_initial_loss(1.0, 3, rtol=-1.0)
    with pytest.raises(TypeError, match=r"outside jax\.jit"):
        jax.jit(lambda v: diagnostics.check_initial_loss(v, 3).loss)(1.0)


# ---------------------------------------------------------------------------------------------
# capture_activations
# ---------------------------------------------------------------------------------------------


class _LinenBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(5)(x)
        self.sow("intermediates", "tanh", jnp.tanh(h))
        return jnp.tanh(h)


class _LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(4, name="first")(x))
        x = _LinenBlock(name="block")(x)
        return nn.Dense(2, name="last")(x)


def _dense(p, x):
    return np.asarray(x, np.float64) @ to_f64(p["kernel"]) + to_f64(p["bias"])


@pytest.mark.loose_promotion  # flax's Dense
def test_capture_linen_order_shapes_and_values():
    model = _LinenMLP()
    x = jax.random.normal(jax.random.key(0), (6, 3))
    variables = jax.jit(model.init)(jax.random.key(1), x)
    acts = diagnostics.capture_activations(model, variables, x)
    assert list(acts) == ["first", "block/Dense_0", "block/tanh", "block", "last"]
    p = variables["params"]
    h1 = _dense(p["first"], x)
    h2 = _dense(p["block"]["Dense_0"], np.maximum(h1, 0))
    out = _dense(p["last"], np.tanh(h2))
    for name, ref in [
        ("first", h1),
        ("block/Dense_0", h2),
        ("block/tanh", np.tanh(h2)),
        ("block", np.tanh(h2)),
        ("last", out),
    ]:
        np.testing.assert_allclose(to_f64(acts[name]), ref, rtol=1e-5, atol=1e-5)
    only_dense = diagnostics.capture_activations(
        model, variables, x, include=lambda m: isinstance(m, nn.Dense)
    )
    assert list(only_dense) == ["first", "block/Dense_0", "block/tanh", "last"]  # + the sow
    jitted = jax.jit(lambda v, a: diagnostics.capture_activations(model, v, a))(variables, x)
    assert list(jitted) == list(acts)
    for k in acts:
        np.testing.assert_allclose(jitted[k], acts[k], rtol=1e-6, atol=1e-6)


@pytest.mark.loose_promotion
def test_capture_linen_train_mode_batch_norm_and_repeated_calls():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            shared = nn.Dense(3, name="shared")
            x = nn.BatchNorm(use_running_average=not train)(shared(x))
            return shared(x)

    model = Net()
    x = jax.random.normal(jax.random.key(0), (8, 3))
    variables = model.init(jax.random.key(1), x, train=False)
    acts = diagnostics.capture_activations(model, variables, x, train=True)
    assert list(acts) == ["shared", "shared:1", "BatchNorm_0"]
    xm = np.asarray(x, np.float64)
    h = _dense(variables["params"]["shared"], xm)
    bn = (h - h.mean(0)) / np.sqrt(h.var(0) + 1e-5)
    np.testing.assert_allclose(to_f64(acts["BatchNorm_0"]), bn, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        to_f64(acts["shared:1"]), _dense(variables["params"]["shared"], bn), rtol=1e-4, atol=1e-4
    )


class _NnxMLP(nnx.Module):
    def __init__(self, rngs):
        self.first = nnx.Linear(3, 4, rngs=rngs)
        self.layers = nnx.List([nnx.Linear(4, 5, rngs=rngs), nnx.Linear(5, 2, rngs=rngs)])
        self.bn = nnx.BatchNorm(2, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.first(x))
        h = jnp.tanh(self.layers[0](h))
        self.sow(nnx.Intermediate, "tanh_out", h)
        return self.bn(self.layers[1](h))


def _nnx_dense(layer, x):
    return np.asarray(x, np.float64) @ to_f64(layer.kernel.get_value()) + to_f64(
        layer.bias.get_value()
    )


@pytest.mark.loose_promotion  # flax's Linear
def test_capture_nnx_order_values_and_no_side_effects():
    model = _NnxMLP(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (6, 3))
    before = jax.tree_util.tree_map(np.asarray, nnx.state(model))
    linear_call = nnx.Linear.__call__
    acts = diagnostics.capture_activations(model, None, x)
    assert list(acts) == ["first", "layers/0", "tanh_out", "layers/1", "bn"]  # call order
    h1 = _nnx_dense(model.first, x)
    h2 = _nnx_dense(model.layers[0], np.maximum(h1, 0))
    h3 = _nnx_dense(model.layers[1], np.tanh(h2))
    bn = (h3 - h3.mean(0)) / np.sqrt(h3.var(0) + 1e-5)  # train mode: batch statistics
    for name, ref in [
        ("first", h1),
        ("layers/0", h2),
        ("layers/1", h3),
        ("bn", bn),
        ("tanh_out", np.tanh(h2)),
    ]:
        np.testing.assert_allclose(to_f64(acts[name]), ref, rtol=1e-4, atol=1e-4)
    # The model is untouched: same state (batch statistics included), no sown variables, and the
    # classes' __call__ restored.
    after = jax.tree_util.tree_map(np.asarray, nnx.state(model))
    assert jax.tree_util.tree_structure(after) == jax.tree_util.tree_structure(before)
    for a, b in zip(
        jax.tree_util.tree_leaves(after), jax.tree_util.tree_leaves(before), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    assert nnx.Linear.__call__ is linear_call
    assert "__call__" not in nnx.BatchNorm.__dict__ or nnx.BatchNorm.__call__ is not None
    only = diagnostics.capture_activations(
        model, None, x, include=lambda m: isinstance(m, nnx.Linear)
    )
    assert list(only) == ["first", "layers/0", "tanh_out", "layers/1"]


@pytest.mark.loose_promotion
def test_capture_nnx_with_given_state_and_subclass():
    class Scaled(nnx.Linear):  # inherits __call__: still captured, once
        pass

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.a = Scaled(2, 2, rngs=rngs)
            self.b = nnx.Linear(2, 1, rngs=rngs)

        def __call__(self, x):
            return self.b(self.a(x))

    model = Net(nnx.Rngs(0))
    x = jnp.ones((3, 2))
    state = nnx.state(model)
    state = jax.tree_util.tree_map(lambda v: v * 0 + 1, state)
    acts = diagnostics.capture_activations(model, state, x)
    assert list(acts) == ["a", "b"]
    np.testing.assert_allclose(acts["a"], np.full((3, 2), 3.0))  # ones @ ones(2,2) + 1
    np.testing.assert_allclose(acts["b"], np.full((3, 1), 7.0))
    assert "__call__" not in Scaled.__dict__
    assert float(model.a.kernel.get_value().sum()) != 4.0  # the model kept its own weights


@pytest.mark.loose_promotion
def test_capture_nnx_sows_and_repeated_calls_in_call_order():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.l = nnx.Linear(3, 3, rngs=rngs)
            self.out = nnx.Linear(3, 2, rngs=rngs)

        def __call__(self, x):
            self.sow(nnx.Intermediate, "z_first", x)
            h = self.l(self.l(x))  # called twice: "l", then "l:1"
            for i in range(11):  # names that sort differently from their order
                self.sow(nnx.Intermediate, f"tanh_{i}", jnp.tanh(h) * i)
            self.sow(nnx.Intermediate, "a_second", h)
            self.sow(nnx.Intermediate, "a_second", 2 * h)  # a second sow: "a_second:1"
            return self.out(h)

    model = Net(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (4, 3))
    sow = nnx.Module.__dict__["sow"]
    acts = diagnostics.capture_activations(model, None, x)
    tanh = [f"tanh_{i}" for i in range(11)]
    assert list(acts) == ["z_first", "l", "l:1", *tanh, "a_second", "a_second:1", "out"]
    h1 = _nnx_dense(model.l, x)
    h2 = _nnx_dense(model.l, h1)
    refs = {"z_first": x, "l": h1, "l:1": h2, "a_second": h2, "a_second:1": 2 * h2}
    refs |= {f"tanh_{i}": np.tanh(h2) * i for i in range(11)}
    refs["out"] = _nnx_dense(model.out, h2)
    for name, ref in refs.items():
        np.testing.assert_allclose(to_f64(acts[name]), ref, rtol=1e-4, atol=1e-4)
    assert nnx.Module.__dict__["sow"] is sow  # the hook is removed


def test_capture_bad_input():
    with pytest.raises(TypeError, match=r"flax\.linen\.Module or a flax\.nnx\.Module"):
        diagnostics.capture_activations(lambda x: x, None, jnp.ones(2))
    with pytest.raises(TypeError, match="'params'"):
        diagnostics.capture_activations(nn.Dense(2), {"w": 1}, jnp.ones((1, 2)))


# ---------------------------------------------------------------------------------------------
# LSUV
# ---------------------------------------------------------------------------------------------


@pytest.mark.loose_promotion
def test_lsuv_linen_mlp_unit_variance_by_manual_forward():
    model = nn.Sequential([nn.Dense(32), nn.tanh, nn.Dense(32), nn.relu, nn.Dense(10)])
    x = 3.0 * jax.random.normal(jax.random.key(0), (128, 16))
    variables = jax.jit(model.init)(jax.random.key(1), x)
    new = diagnostics.lsuv(model, variables, x, key=jax.random.key(2), tol=0.05)
    assert jax.tree_util.tree_structure(new) == jax.tree_util.tree_structure(variables)
    p = new["params"]
    h = np.asarray(x, np.float64)
    for i, act in ((0, np.tanh), (2, lambda a: np.maximum(a, 0)), (4, None)):
        h = _dense(p[f"layers_{i}"], h)
        assert abs(h.var() - 1.0) < 0.05, (i, h.var())
        if act is not None:
            h = act(h)
    # The orthogonal pre-initialisation survives the rescaling: W^T W is a multiple of I.
    w = to_f64(p["layers_2"]["kernel"])  # square: orthogonal both ways
    gram = w.T @ w
    np.testing.assert_allclose(gram / gram[0, 0], np.eye(32), atol=1e-4)
    # The input variables are not changed.
    assert not np.allclose(variables["params"]["layers_0"]["kernel"], p["layers_0"]["kernel"])


@pytest.mark.loose_promotion
def test_lsuv_linen_conv_without_key_keeps_directions():
    model = nn.Sequential(
        [nn.Conv(4, (3, 3)), nn.relu, lambda a: a.reshape(a.shape[0], -1), nn.Dense(3)]
    )
    x = jax.random.uniform(jax.random.key(0), (16, 6, 6, 2))
    variables = jax.jit(model.init)(jax.random.key(1), x)
    new = diagnostics.lsuv(model, variables, x)
    acts = diagnostics.capture_activations(model, new, x)
    assert list(acts) == ["layers_0", "layers_3"]
    for a in acts.values():
        assert abs(float(jnp.var(a)) - 1.0) < 0.1
    old_k = to_f64(variables["params"]["layers_0"]["kernel"])
    new_k = to_f64(new["params"]["layers_0"]["kernel"])
    ratio = new_k / old_k
    np.testing.assert_allclose(ratio, ratio.flat[0], rtol=1e-4)  # only rescaled


@pytest.mark.loose_promotion
def test_lsuv_under_its_design_name_in_initializers():
    from jaxnorm import initializers

    model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(4)])
    x = 5.0 * jax.random.normal(jax.random.key(0), (64, 6))
    variables = jax.jit(model.init)(jax.random.key(1), x)
    new = initializers.lsuv(model, variables, x, key=jax.random.key(2), tol=0.05)
    h = np.asarray(x, np.float64)
    for i, act in ((0, lambda a: np.maximum(a, 0)), (2, None)):
        h = _dense(new["params"][f"layers_{i}"], h)
        assert abs(h.var() - 1.0) < 0.05, (i, h.var())
        if act is not None:
            h = act(h)


@pytest.mark.loose_promotion
def test_lsuv_nnx():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(8, 16, rngs=rngs)
            self.l2 = nnx.Linear(16, 4, rngs=rngs)

        def __call__(self, x):
            h = nnx.relu(self.l1(x))
            self.sow(nnx.Intermediate, "h", h)  # a sown value is not a layer to scale
            return self.l2(h)

    model = Net(nnx.Rngs(0))
    x = 5.0 * jax.random.normal(jax.random.key(0), (64, 8))
    old_kernel = np.asarray(model.l1.kernel.get_value())
    state = diagnostics.lsuv(model, None, x, key=jax.random.key(1))
    np.testing.assert_array_equal(model.l1.kernel.get_value(), old_kernel)  # model unchanged
    nnx.update(model, state)
    h1 = _nnx_dense(model.l1, x)
    h2 = _nnx_dense(model.l2, np.maximum(h1, 0))
    assert abs(h1.var() - 1) < 0.1 and abs(h2.var() - 1) < 0.1


@pytest.mark.loose_promotion
def test_lsuv_errors():
    class BiasOnly(nn.Module):
        @nn.compact
        def __call__(self, x):
            return x + self.param("b", nn.initializers.zeros, (1, x.shape[-1]))

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return BiasOnly()(x)

    x = jnp.ones((4, 3))
    with pytest.raises(ValueError, match="no submodule with a 'kernel'"):
        diagnostics.lsuv(Net(), Net().init(jax.random.key(0), x), x)
    dense = nn.Sequential([nn.Dense(3)])
    zeros = jnp.zeros((4, 3))
    with pytest.raises(ValueError, match=r"variance 0\.0"):
        diagnostics.lsuv(dense, dense.init(jax.random.key(0), zeros), zeros)
    with pytest.raises(ValueError, match="tol must be"):
        diagnostics.lsuv(dense, {}, x, tol=0.0)
    with pytest.raises(ValueError, match="max_iter must be"):
        diagnostics.lsuv(dense, {}, x, max_iter=0)
    with pytest.raises(TypeError, match=r"flax\.linen\.Module or a flax\.nnx\.Module"):
        diagnostics.lsuv(object(), {}, x)
