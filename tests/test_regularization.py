"""Tests for jaxnorm.regularization: penalties, dropout, DropConnect (function, modules), max-norm.

References are independent of the code under test: NumPy float64 formulas, optax's
add_decayed_weights, flax's Dropout classes, torch's abs gradient, Keras's MaxNorm formula.
"""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxnorm import nn as jnn
from jaxnorm import nnx as jnnx
from jaxnorm import regularization as R
from tests.helpers import FLOAT_DTYPES, to_f64

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _mlp_params(dtype=jnp.float32, key=0):
    """An MLP's params as training.mlp lays them out, with batch norm: w, b, scale, bias."""
    k = jax.random.split(jax.random.key(key), 4)
    return [
        {
            "w": jax.random.normal(k[0], (5, 4)).astype(dtype),
            "b": jax.random.normal(k[1], (4,)).astype(dtype),
            "scale": (1 + jax.random.normal(k[2], (4,))).astype(dtype),
            "bias": jax.random.normal(k[3], (4,)).astype(dtype),
        },
        {"w": jax.random.normal(k[3], (4, 3)).astype(dtype), "b": jnp.ones(3, dtype)},
    ]


def _np_kernels(params):
    return [to_f64(layer["w"]) for layer in params]


# --------------------------------------------------------------------------- penalties


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_penalties_match_numpy_and_skip_biases_and_norm_parameters(dtype):
    params = _mlp_params(dtype)
    ws = _np_kernels(params)
    lam1, lam2 = 0.3, 0.7
    l2 = 0.5 * lam2 * sum((w**2).sum() for w in ws)
    l1 = lam1 * sum(np.abs(w).sum() for w in ws)
    out = R.l2_penalty(params, lam2)
    assert out.dtype == jnp.float32  # low precision reduces and returns in float32
    np.testing.assert_allclose(out, l2, rtol=1e-6)
    np.testing.assert_allclose(R.l1_penalty(params, lam1), l1, rtol=1e-6)
    np.testing.assert_allclose(R.elastic_net_penalty(params, lam1, lam2), l1 + l2, rtol=1e-6)


def test_penalties_in_float64():
    with jax.enable_x64(True):
        params = _mlp_params(jnp.float64)
        ws = _np_kernels(params)
        out = R.l2_penalty(params, 1e-3)
        assert out.dtype == jnp.float64
        np.testing.assert_allclose(out, 0.5e-3 * sum((w**2).sum() for w in ws), rtol=1e-14)
        np.testing.assert_allclose(
            R.l1_penalty(params, 2.0), 2.0 * sum(np.abs(w).sum() for w in ws), rtol=1e-14
        )


def test_low_precision_leaves_are_summed_in_float32():
    # 4096 bfloat16 weights of 1 + 2**-7 (exact in bfloat16): a bfloat16 running sum stalls at
    # 256 or so; the float32 reduction is exact.
    w = jnp.full((64, 64), 1 + 2**-7, jnp.bfloat16)
    expected = 0.5 * 4096 * (1 + 2**-7) ** 2
    np.testing.assert_allclose(R.l2_penalty({"w": w}, 1.0), expected, rtol=1e-6)
    np.testing.assert_allclose(R.l1_penalty({"w": w}, 1.0), 4096 * (1 + 2**-7), rtol=1e-6)


@pytest.mark.parametrize(
    ("dtype", "value", "lam"),
    [(jnp.float32, 1e20, 1e-30), (jnp.float32, 1e-25, 1e30), (jnp.float16, 300.0, 1e-3)],
)
def test_no_overflow_or_underflow_for_finite_weights(dtype, value, lam):
    # w**2 overflows float32 above 1.8e19 and underflows below 1e-23; float16 overflows above 256.
    w = jnp.full((8, 8), value, dtype)
    expected = 0.5 * lam * 64 * float(to_f64(w)[0, 0]) ** 2
    out = R.l2_penalty({"w": w}, lam)
    assert np.isfinite(out)
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    g = jax.grad(R.l2_penalty)({"w": w}, lam)["w"]
    assert np.all(np.isfinite(to_f64(g)))


def test_l2_gradient_is_optax_add_decayed_weights():
    params = _mlp_params()
    lam = 0.37
    grads = jax.grad(R.l2_penalty)(params, lam)
    for mask in (None, True):
        optax_mask = R.weight_decay_mask(params) if mask is None else None
        tx = optax.add_decayed_weights(lam, mask=optax_mask)
        zeros = jax.tree.map(jnp.zeros_like, params)
        decayed, _ = tx.update(zeros, tx.init(params), params)
        ours = jax.grad(R.l2_penalty)(params, lam, mask)
        jax.tree.map(np.testing.assert_array_equal, ours, decayed)
    # the default leaves biases, batch-norm scales and offsets alone; kernels get lam * w
    for layer, g in zip(params, grads, strict=True):
        np.testing.assert_array_equal(g["w"], jnp.float32(lam) * layer["w"])
        for name in ("b", "scale", "bias"):
            if name in layer:
                assert not np.any(g[name])


def test_l1_gradient_matches_torch_including_zero():
    torch = pytest.importorskip("torch")
    w = np.array([[-2.0, 0.0, 3.0], [0.0, -0.5, 1e-30]], np.float32)
    tw = torch.tensor(w, requires_grad=True)
    (0.25 * tw.abs().sum()).backward()
    ours = jax.grad(R.l1_penalty)({"kernel": jnp.asarray(w)}, 0.25)["kernel"]
    np.testing.assert_array_equal(ours, tw.grad.numpy())
    assert ours[0, 1] == 0.0  # jax.grad(jnp.abs)(0.) is 1


def test_masks_true_false_pytree_prefix_callable():
    params = _mlp_params()
    everything = sum((to_f64(v) ** 2).sum() for v in jax.tree.leaves(params))
    np.testing.assert_allclose(R.l2_penalty(params, 2.0, mask=True), everything, rtol=1e-6)
    assert R.l2_penalty(params, 2.0, mask=False) == 0.0
    only_first = [{"w": True, "b": True, "scale": False, "bias": False}, False]  # prefix: False
    ref = (to_f64(params[0]["w"]) ** 2).sum() + (to_f64(params[0]["b"]) ** 2).sum()
    np.testing.assert_allclose(R.l2_penalty(params, 2.0, mask=only_first), ref, rtol=1e-6)
    by_name = lambda p: jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key == "b", p)
    ref = sum((to_f64(layer["b"]) ** 2).sum() for layer in params)
    np.testing.assert_allclose(R.l2_penalty(params, 2.0, mask=by_name), ref, rtol=1e-6)


def test_non_floating_leaves():
    params = {"kernel": jnp.ones((2, 2)), "steps": jnp.ones((2, 2), jnp.int32)}
    # the default and mask=True skip them: an integer is not a weight
    assert R.l2_penalty(params, 2.0) == 4.0
    assert R.l2_penalty(params, 2.0, mask=True) == 4.0
    with pytest.raises(
        TypeError, match=r"l2_penalty: the mask selects \['steps'\], of dtype int32"
    ):
        R.l2_penalty(params, 2.0, mask={"kernel": True, "steps": True})


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"lam": -1.0}, ValueError, "lam must be a finite number >= 0, got -1.0"),
        ({"lam": float("nan")}, ValueError, "lam must be a finite number >= 0, got nan"),
        ({"lam": np.inf}, ValueError, "lam must be a finite number >= 0"),
        ({"lam": "0.1"}, TypeError, "lam must be a non-negative real number"),
        ({"lam": True}, TypeError, "lam must be a non-negative real number"),
        ({"lam": jnp.ones(2)}, ValueError, r"lam must be a scalar, got shape \(2,\)"),
        ({"lam": 1.0, "mask": {"w": True}}, ValueError, "mask must have the structure of params"),
        ({"lam": 1.0, "mask": {"kernel": 1, "b": 0}}, TypeError, "mask leaves must be bools"),
    ],
)
def test_penalty_arguments_are_checked(kwargs, error, match):
    params = {"kernel": jnp.ones((2, 2)), "b": jnp.ones(2)}
    with pytest.raises(error, match=f"l2_penalty: {match}"):
        R.l2_penalty(params, **kwargs)


def test_elastic_net_names_its_argument():
    with pytest.raises(ValueError, match="elastic_net_penalty: l2 must be a finite number"):
        R.elastic_net_penalty({"k": jnp.ones((2, 2))}, 0.1, -0.1)


def test_traced_strength_under_jit_and_vmap():
    params = _mlp_params()
    lams = jnp.array([0.0, 0.1, 1.0])
    ref = np.array([float(R.l2_penalty(params, float(v))) for v in lams])
    np.testing.assert_allclose(jax.vmap(lambda v: R.l2_penalty(params, v))(lams), ref, rtol=1e-6)
    f = jax.jit(lambda v: R.elastic_net_penalty(params, v, v))
    np.testing.assert_allclose(
        f(0.5), R.l1_penalty(params, 0.5) + R.l2_penalty(params, 0.5), rtol=1e-6
    )


def test_nnx_state_and_linen_params():
    model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), jnnx.PReLU(4))
    state = nnx.state(model, nnx.Param)
    kernel = to_f64(model.layers[0].kernel[...])
    np.testing.assert_allclose(R.l2_penalty(state, 1.0), 0.5 * (kernel**2).sum(), rtol=1e-6)
    variables = nn.Dense(4).init(jax.random.key(0), jnp.ones((1, 3)))
    kernel = to_f64(variables["params"]["kernel"])
    np.testing.assert_allclose(
        R.l1_penalty(variables["params"], 1.0), np.abs(kernel).sum(), rtol=1e-6
    )


def test_weight_decay_mask_is_the_same_object_in_nn():
    assert jnn.weight_decay_mask is R.weight_decay_mask
    assert jnn.DEFAULT_NO_DECAY == R.DEFAULT_NO_DECAY == ("bias", "scale", "negative_slope")


def test_import_jaxnorm_does_not_import_optax():
    code = "import sys, jaxnorm; jaxnorm.regularization.l2_penalty; print('optax' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert out.stdout.strip() == "False"


# --------------------------------------------------------------------------- dropout


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("rate", [0.1, 0.75])
@pytest.mark.parametrize("broadcast_dims", [(), (1, 2)])
@pytest.mark.loose_promotion  # flax's Dropout divides with standard promotion
def test_dropout_is_flax_dropout_bit_for_bit(dtype, rate, broadcast_dims):
    key = jax.random.key(3)
    x = jax.random.normal(jax.random.key(1), (4, 5, 6)).astype(dtype)
    ours = R.dropout(key, x, rate, broadcast_dims=broadcast_dims)
    linen = nn.Dropout(rate, broadcast_dims=broadcast_dims).apply(
        {}, x, deterministic=False, rng=key
    )
    nnx_out = nnx.Dropout(rate, broadcast_dims=broadcast_dims)(x, rngs=key)
    assert ours.dtype == x.dtype
    np.testing.assert_array_equal(to_f64(ours), to_f64(linen))
    np.testing.assert_array_equal(to_f64(ours), to_f64(nnx_out))
    # through the linen rng collection as a model passes it
    via_rngs = nn.Dropout(rate, broadcast_dims=broadcast_dims).apply(
        {}, x, deterministic=False, rngs={"dropout": key}
    )
    assert via_rngs.shape == ours.shape


def test_dropout_traced_rate_draws_the_same_mask():
    key = jax.random.key(0)
    x = jax.random.normal(jax.random.key(1), (64, 32))
    for rate in (0.0, 0.3, 1.0):
        traced = jax.jit(lambda r: R.dropout(key, x, r))(jnp.float32(rate))
        np.testing.assert_array_equal(traced, R.dropout(key, x, rate))
    # a vmapped search over rates
    rates = jnp.array([0.2, 0.5])
    out = jax.vmap(lambda r: R.dropout(key, x, r))(rates)
    np.testing.assert_array_equal(out[1], R.dropout(key, x, 0.5))


def test_dropout_rate_zero_one_and_deterministic():
    x = jax.random.normal(jax.random.key(1), (8, 8))
    assert R.dropout(None, x, 0.0) is x
    np.testing.assert_array_equal(R.dropout(None, x, 1.0), np.zeros((8, 8)))
    assert R.dropout(None, x, 0.5, deterministic=True) is x
    # rate 1: no NaN in the gradient, traced or not
    for f in (
        lambda x: R.dropout(jax.random.key(0), x, 1.0).sum(),
        lambda x: R.dropout(jax.random.key(0), x, jnp.float32(1.0)).sum(),
    ):
        np.testing.assert_array_equal(jax.grad(f)(x), np.zeros((8, 8)))


def test_dropout_statistics_and_gradient():
    x = jnp.full((200, 500), 2.0)
    y = R.dropout(jax.random.key(5), x, 0.3)
    kept = np.asarray(y) != 0
    # 100,000 Bernoulli(0.7) draws: the kept fraction within 5 standard deviations
    assert abs(kept.mean() - 0.7) < 5 * np.sqrt(0.7 * 0.3 / kept.size)
    np.testing.assert_allclose(np.asarray(y)[kept], 2.0 / 0.7, rtol=1e-6)
    assert abs(float(y.mean()) - 2.0) < 0.02  # inverted: E[y] = x
    g = jax.grad(lambda x: R.dropout(jax.random.key(5), x, 0.3).sum())(x)
    np.testing.assert_allclose(g, kept / np.float32(0.7), rtol=1e-6)


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        ((jax.random.key(0), jnp.ones(3), 1.5), {}, ValueError, r"rate .* must be in \[0, 1\]"),
        ((jax.random.key(0), jnp.ones(3), -0.1), {}, ValueError, r"must be in \[0, 1\], got -0.1"),
        ((jax.random.key(0), jnp.ones(3), float("nan")), {}, ValueError, "got nan"),
        ((jax.random.key(0), jnp.ones(3), "0.5"), {}, TypeError, "rate must be the drop prob"),
        ((None, jnp.ones(3), 0.5), {}, TypeError, "key must be a PRNG key"),
        ((jax.random.key(0), jnp.ones(3, jnp.int32), 0.5), {}, TypeError, "floating dtype"),
        ((jax.random.key(0), jnp.ones(3), 0.5), {"deterministic": 1}, TypeError, "bool"),
        ((jax.random.key(0), jnp.ones(3), 0.5), {"broadcast_dims": (1,)}, ValueError, "range"),
        ((jax.random.split(jax.random.key(0)), jnp.ones(3), 0.5), {}, ValueError, "single key"),
    ],
)
def test_dropout_arguments_are_checked(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        R.dropout(*args, **kwargs)


# --------------------------------------------------------------------------- DropConnect


@pytest.mark.loose_promotion
def test_drop_connect_draws_as_flax_dropout_and_is_unbiased():
    key = jax.random.key(2)
    w = jax.random.normal(jax.random.key(1), (6, 4))
    out = R.drop_connect(key, w, 0.4)
    np.testing.assert_array_equal(out, nn.Dropout(0.4).apply({}, w, deterministic=False, rng=key))
    keys = jax.random.split(jax.random.key(7), 4000)
    mean = jax.vmap(lambda k: R.drop_connect(k, w, 0.4))(keys).mean(0)
    # E[W~] = W: each entry's mean of 4000 draws is within 5 standard errors
    se = np.abs(np.asarray(w)) * np.sqrt(0.4 / 0.6 / 4000)
    assert np.all(np.abs(mean - w) <= 5 * se + 1e-6)
    with pytest.raises(ValueError, match=r"drop_connect: rate .* must be in \[0, 1\]"):
        R.drop_connect(key, w, 2.0)


def _drop_connect_reference(key, x, kernel, bias, rate):
    """NumPy: the mask drawn as jax.random.bernoulli draws it, then x @ (mask * W / keep) + b."""
    mask = np.asarray(jax.random.bernoulli(key, 1 - rate, kernel.shape))
    wd = np.where(mask, to_f64(kernel) / (1 - rate), 0.0)
    return to_f64(x) @ wd + to_f64(bias)


@pytest.mark.loose_promotion  # flax's Dense promotes with standard promotion
def test_linen_drop_connect_dense_is_dense_when_deterministic():
    x = jax.random.normal(jax.random.key(0), (3, 5))
    ours = jnn.DropConnectDense(4, rate=0.5)
    dense = nn.Dense(4)
    v = ours.init(jax.random.key(1), x, deterministic=True)
    v_dense = dense.init(jax.random.key(1), x)
    jax.tree.map(np.testing.assert_array_equal, v, v_dense)
    np.testing.assert_array_equal(ours.apply(v, x, deterministic=True), dense.apply(v_dense, x))
    # bfloat16 inputs promote as nn.Dense promotes them
    xb = x.astype(jnp.bfloat16)
    np.testing.assert_array_equal(ours.apply(v, xb, deterministic=True), dense.apply(v_dense, xb))
    # a model that uses it: the layer's variables sit where nn.Dense's would
    no_bias = jnn.DropConnectDense(4, use_bias=False, deterministic=True)
    assert set(no_bias.init(jax.random.key(1), x)["params"]) == {"kernel"}


def test_linen_drop_connect_dense_training():
    x = jax.random.normal(jax.random.key(0), (3, 5))
    layer = jnn.DropConnectDense(4, rate=0.3)
    v = layer.init(jax.random.key(1), x, deterministic=True)
    key = jax.random.key(9)
    y = layer.apply(v, x, deterministic=False, rng=key)
    ref = _drop_connect_reference(key, x, v["params"]["kernel"], v["params"]["bias"], 0.3)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)
    # from the 'dropout' collection: the same key gives the same mask, another key another
    a = layer.apply(v, x, deterministic=False, rngs={"dropout": jax.random.key(1)})
    b = layer.apply(v, x, deterministic=False, rngs={"dropout": jax.random.key(1)})
    c = layer.apply(v, x, deterministic=False, rngs={"dropout": jax.random.key(2)})
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    # the kernel's gradient is zero where a weight was dropped
    g = jax.grad(lambda p: layer.apply({"params": p}, x, deterministic=False, rng=key).sum())(
        v["params"]
    )
    mask = np.asarray(jax.random.bernoulli(key, 0.7, (5, 4)))
    assert np.all(np.asarray(g["kernel"])[~mask] == 0)
    with pytest.raises(ValueError, match="DropConnectDense: rate"):
        jnn.DropConnectDense(4, rate=1.5).apply(v, x, deterministic=False, rng=key)


@pytest.mark.loose_promotion
def test_nnx_drop_connect_linear():
    x = jax.random.normal(jax.random.key(0), (3, 5))
    ours = jnnx.DropConnectLinear(5, 4, rate=0.3, rngs=nnx.Rngs(0))
    linear = nnx.Linear(5, 4, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(ours.kernel[...], linear.kernel[...])
    np.testing.assert_array_equal(ours.bias[...], linear.bias[...])
    np.testing.assert_array_equal(ours(x, deterministic=True), linear(x))
    key = jax.random.key(4)
    ref = _drop_connect_reference(key, x, ours.kernel[...], ours.bias[...], 0.3)
    np.testing.assert_allclose(ours(x, rngs=key), ref, rtol=1e-5, atol=1e-6)
    # its own stream: successive calls draw new masks
    assert not np.allclose(ours(x), ours(x))
    ours.eval()
    assert ours.deterministic is True
    np.testing.assert_array_equal(ours(x), linear(x))
    ours.train()
    assert ours.deterministic is False
    view = nnx.view(ours, deterministic=True)
    np.testing.assert_array_equal(view(x), linear(x))
    with pytest.raises(ValueError, match="DropConnectLinear: rate"):
        jnnx.DropConnectLinear(5, 4, rate=-0.5, rngs=nnx.Rngs(0))


# --------------------------------------------------------------------------- max-norm


def _np_project(w, c, axis):
    n = np.sqrt((w**2).sum(axis=axis, keepdims=True))
    return w * np.minimum(1.0, c / np.where(n > 0, n, 1.0))


def _keras_max_norm(w, c, axis):
    # keras.constraints.MaxNorm.__call__ (Keras 3): w * clip(norms, 0, c) / (epsilon + norms)
    norms = np.sqrt((w**2).sum(axis=axis, keepdims=True))
    return w * (np.clip(norms, 0, c) / (1e-7 + norms))


def _params_with_norms():
    k = jax.random.split(jax.random.key(0), 3)
    w = jax.random.normal(k[0], (6, 5)) * jnp.array([[0.1, 0.5, 1.0, 2.0, 4.0]])  # some columns > 2
    conv = jax.random.normal(k[1], (3, 3, 2, 4)) * jnp.array([0.2, 0.5, 1.0, 2.0]).reshape(
        1, 1, 1, 4
    )
    return {"dense": {"kernel": w, "bias": 10 * jnp.ones(5)}, "conv": {"kernel": conv}}


@pytest.mark.parametrize("axis", [0, None])
def test_max_norm_matches_numpy_and_keras(axis):
    params = _params_with_norms()
    updates = jax.tree.map(lambda p: 0.1 * jnp.ones_like(p), params)
    c = 2.0
    tx = (
        R.max_norm(c, axis, mask={"dense": {"kernel": True, "bias": False}, "conv": False})
        if axis == 0
        else R.max_norm(c, axis)
    )
    out, _ = tx.update(updates, tx.init(params), params)
    new = optax.apply_updates(params, out)
    w = to_f64(params["dense"]["kernel"]) + 0.1
    np.testing.assert_allclose(new["dense"]["kernel"], _np_project(w, c, 0), rtol=2e-7, atol=1e-7)
    np.testing.assert_allclose(new["dense"]["kernel"], _keras_max_norm(w, c, 0), rtol=1e-6)
    np.testing.assert_array_equal(new["dense"]["bias"], params["dense"]["bias"] + 0.1)
    wc = to_f64(params["conv"]["kernel"]) + 0.1
    expected = _np_project(wc, c, (0, 1, 2)) if axis is None else wc
    np.testing.assert_allclose(new["conv"]["kernel"], expected, rtol=2e-7, atol=1e-7)


def test_max_norm_leaves_units_inside_the_ball_alone():
    params = _params_with_norms()
    updates = jax.tree.map(lambda p: 1e-3 * jnp.ones_like(p), params)
    tx = R.max_norm(2.0)
    out, _ = tx.update(updates, tx.init(params), params)
    norms = np.sqrt(((to_f64(params["dense"]["kernel"]) + 1e-3) ** 2).sum(0))
    inside = norms <= 2.0
    assert inside.any() and (~inside).any()
    np.testing.assert_array_equal(
        np.asarray(out["dense"]["kernel"])[:, inside],
        np.asarray(updates["dense"]["kernel"])[:, inside],
    )


@pytest.mark.loose_promotion  # optax.adam mixes its int32 count with floats
def test_max_norm_keeps_a_too_high_learning_rate_bounded_with_any_optimizer():
    # a loss that pulls every weight outward: sgd alone grows the norms without bound
    loss = lambda p: (
        -jnp.sum(p["kernel"] * jnp.arange(1.0, 5.0)[None, :]) + 0.0 * jnp.sum(p["bias"])
    )
    params = {"kernel": 0.1 * jnp.ones((3, 4)), "bias": jnp.zeros(4)}
    c = 1.5
    for inner in (optax.sgd(0.5), optax.sgd(0.5, momentum=0.9), optax.adam(1.0)):
        for constrained in (False, True):
            tx = optax.chain(inner, R.max_norm(c)) if constrained else inner
            p, state = params, tx.init(params)
            step = jax.jit(lambda p, s, tx=tx: tx.update(jax.grad(loss)(p), s, p))
            for _ in range(20):
                u, state = step(p, state)
                p = optax.apply_updates(p, u)
                norms = np.sqrt((to_f64(p["kernel"]) ** 2).sum(0))
                if constrained:
                    assert np.all(norms <= c * (1 + 1e-6)), norms
            if not constrained:
                assert norms.max() > 3 * c
            else:
                np.testing.assert_allclose(norms, c, rtol=1e-6)  # pushed onto the sphere


def test_max_norm_numerics():
    # huge finite weights: the norm's square would overflow float32
    params = {"kernel": jnp.full((4, 2), 1e20)}  # column norms 2e20
    tx = R.max_norm(1e20)
    out, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    new = optax.apply_updates(params, out)["kernel"]
    np.testing.assert_allclose(new, np.full((4, 2), 0.5e20), rtol=1e-6)
    tx = R.max_norm(1.0)
    # bfloat16 weights: the norm is computed in float32
    w = jnp.full((256, 1), 1.0, jnp.bfloat16)
    out, _ = tx.update({"kernel": jnp.zeros_like(w)}, tx.init({"kernel": w}), {"kernel": w})
    new = to_f64(optax.apply_updates({"kernel": w}, out)["kernel"])
    np.testing.assert_allclose(new, 1 / 16, rtol=0)  # 1/sqrt(256), exact in bfloat16
    # a zero column stays zero (no 0/0)
    z = {"kernel": jnp.zeros((3, 2))}
    out, _ = tx.update(z, tx.init(z), z)
    np.testing.assert_array_equal(out["kernel"], np.zeros((3, 2)))


def test_max_norm_under_jit_and_on_nnx_state():
    model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)))
    params = nnx.state(model, nnx.Param)
    grads = jax.tree.map(lambda p: -10.0 * jnp.ones_like(p), params)
    tx = optax.chain(optax.sgd(1.0), R.max_norm(0.5))
    state = tx.init(params)
    updates, _ = jax.jit(tx.update)(grads, state, params)
    new = optax.apply_updates(params, updates)
    kernel = to_f64(new["layers"][0]["kernel"][...])
    np.testing.assert_allclose(np.sqrt((kernel**2).sum(0)), 0.5, rtol=1e-6)
    bias = to_f64(new["layers"][0]["bias"][...])
    np.testing.assert_allclose(bias, 10.0)  # the bias is not constrained by default


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: R.max_norm(0.0), ValueError, "max_norm: c must be positive"),
        (lambda: R.max_norm(-1.0), ValueError, "max_norm: c must be a finite number >= 0"),
        (lambda: R.max_norm("3"), TypeError, "max_norm: c must be a non-negative real number"),
        (lambda: R.max_norm(3.0, axis=1.0), TypeError, "max_norm: axis must be an int"),
        (lambda: R.max_norm(3.0, axis=()), TypeError, "max_norm: axis must be an int"),
    ],
)
def test_max_norm_arguments_are_checked(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_max_norm_update_errors():
    params = {"kernel": jnp.ones((2, 3))}
    tx = R.max_norm(1.0)
    with pytest.raises(ValueError, match=r"max_norm needs the parameters .* tx.update\(updates"):
        tx.update(params, tx.init(params), None)
    with pytest.raises(
        ValueError, match=r"max_norm: axis=2 is out of range for \['kernel'\], which has 2 dim"
    ):
        R.max_norm(1.0, axis=2).update(params, optax.EmptyState(), params)
    with pytest.raises(ValueError, match="max_norm: mask must have the structure of params"):
        R.max_norm(1.0, mask={"w": True}).update(params, optax.EmptyState(), params)


# --------------------------------------------------------------------------- one harness


def _harness_cases():
    params = _mlp_params()
    key = jax.random.key(0)
    x = jax.random.normal(jax.random.key(1), (4, 6))
    return [
        ("l2_penalty", lambda p, lam: R.l2_penalty(p, lam), (params, 0.1)),
        ("l1_penalty", lambda p, lam: R.l1_penalty(p, lam), (params, 0.1)),
        ("elastic_net", lambda p, lam: R.elastic_net_penalty(p, lam, lam), (params, 0.1)),
        ("dropout", lambda x, r: R.dropout(key, x, r), (x, 0.25)),
        ("drop_connect", lambda x, r: R.drop_connect(key, x, r), (x, 0.25)),
    ]


@pytest.mark.parametrize(("name", "fn", "args"), _harness_cases(), ids=lambda c: str(c)[:12])
def test_harness_jit_vmap_grad_no_retrace(name, fn, args):
    del name
    a, b = args
    eager = fn(a, b)
    np.testing.assert_allclose(jax.jit(fn)(a, b), eager, rtol=1e-6)
    # vmap over a batch of the first argument equals a loop
    batch = jax.tree.map(lambda v: jnp.stack([v, 2 * v]), a)
    looped = [fn(jax.tree.map(lambda v, i=i: v[i], batch), b) for i in range(2)]
    mapped = jax.vmap(fn, in_axes=(0, None))(batch, b)
    for i in range(2):
        np.testing.assert_allclose(mapped[i], looped[i], rtol=1e-6)
    grads = jax.grad(lambda a: jnp.sum(fn(a, b)))(a)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    traces = []
    counted = jax.jit(lambda a, b: (traces.append(1), fn(a, b))[1])
    counted(a, b)
    counted(jax.tree.map(lambda v: v + 1, a), b)
    assert len(traces) == 1


# --------------------------------------------------------------------------- the docs' example


@pytest.mark.slow  # three gradient checks, compiled
def test_docs_gradient_check_example_runs():
    text = (ROOT / "docs" / "regularization.md").read_text()
    block = re.search(r"## Gradient checks\n.*?```python\n(.*?)```", text, re.S)
    assert block is not None, "docs/regularization.md has no gradient-check example"
    namespace: dict = {}
    # as a user runs it: JAX's default promotion rules, not the suite's strict ones
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        exec(compile(block.group(1), "regularization.md", "exec"), namespace)
    for name in ("data_report", "penalty_report", "total_report"):
        assert namespace[name].passed, str(namespace[name])
    # the penalty's report: the biases' gradient is exactly 0, the kernels' lam * w
    assert "hidden/bias" in str(namespace["penalty_report"])
