"""Tests for the PReLU modules (jaxnorm.nn, jaxnorm.nnx) and weight_decay_mask.

References: torch.nn.PReLU (skipped without torch), flax.linen.PReLU and flax.nnx.PReLU, NumPy.
"""

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxnorm import nn as jnn
from jaxnorm import nnx as jnnx

pytestmark = pytest.mark.loose_promotion  # flax and optax use standard promotion internally


def _x(shape, seed=0):
    x = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    x.flat[0] = 0.0  # a kink
    return x


def test_linen_shared_slope_has_flax_variables_and_outputs():
    x = jnp.asarray(_x((4, 5)))
    ours = jnn.PReLU()
    theirs = linen.PReLU(negative_slope_init=0.25)
    v_ours = ours.init(jax.random.key(0), x)
    v_theirs = theirs.init(jax.random.key(0), x)
    assert jax.tree.structure(v_ours) == jax.tree.structure(v_theirs)
    assert v_ours["params"]["negative_slope"].shape == ()
    np.testing.assert_array_equal(v_ours["params"]["negative_slope"], 0.25)
    # A flax checkpoint loads unchanged and gives the same outputs.
    v_theirs = {"params": {"negative_slope": jnp.asarray(0.1)}}
    np.testing.assert_allclose(ours.apply(v_theirs, x), theirs.apply(v_theirs, x), rtol=1e-7)


def test_nnx_shared_slope_matches_flax_nnx():
    x = jnp.asarray(_x((4, 5)))
    ours, theirs = jnnx.PReLU(), nnx.PReLU(negative_slope_init=0.25)
    assert ours.negative_slope[...].shape == theirs.negative_slope[...].shape == ()
    np.testing.assert_allclose(ours(x), theirs(x), rtol=1e-7)


def _torch_prelu(torch, x, weight):
    """torch.nn.PReLU on x (channels on axis 1), with its output and the input/weight grads."""
    m = torch.nn.PReLU(num_parameters=weight.size).double()
    with torch.no_grad():
        m.weight.copy_(torch.tensor(weight))
    xt = torch.tensor(x.astype(np.float64), requires_grad=True)
    y = m(xt)
    dy = np.random.default_rng(5).normal(size=x.shape)
    y.backward(torch.tensor(dy))
    return y.detach().numpy(), xt.grad.numpy(), m.weight.grad.numpy(), dy


@pytest.mark.parametrize("num_parameters", [1, 3])
def test_linen_per_channel_matches_torch_nchw(num_parameters):
    torch = pytest.importorskip("torch")
    x = _x((2, 3, 4, 4))
    weight = np.array([0.1, 0.25, -0.3][:num_parameters])
    y_t, gx_t, gw_t, dy = _torch_prelu(torch, x, weight)
    layer = jnn.PReLU(num_parameters=num_parameters, channel_axis=1)
    variables = layer.init(jax.random.key(0), jnp.asarray(x))
    np.testing.assert_array_equal(
        variables["params"]["negative_slope"], np.full(weight.shape, 0.25).squeeze()
    )
    params = {"negative_slope": jnp.asarray(weight.squeeze(), jnp.float32)}
    y, vjp = jax.vjp(lambda p, x: layer.apply({"params": p}, x), params, jnp.asarray(x))
    gp, gx = vjp(jnp.asarray(dy, jnp.float32))
    np.testing.assert_allclose(y, y_t, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(gx, gx_t, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.ravel(gp["negative_slope"]), gw_t, rtol=1e-5, atol=1e-5)


def test_nnx_per_channel_matches_torch_nchw():
    torch = pytest.importorskip("torch")
    x = _x((2, 3, 4, 4), seed=1)
    weight = np.array([0.1, 0.25, -0.3])
    y_t, _, gw_t, dy = _torch_prelu(torch, x, weight)
    layer = jnnx.PReLU(3, channel_axis=1)
    layer.negative_slope[...] = jnp.asarray(weight, jnp.float32)

    def loss(model, x):
        return jnp.sum(model(x) * jnp.asarray(dy, jnp.float32))

    np.testing.assert_allclose(layer(jnp.asarray(x)), y_t, rtol=1e-6, atol=1e-7)
    grads = nnx.grad(loss)(layer, jnp.asarray(x))
    np.testing.assert_allclose(grads.negative_slope[...], gw_t, rtol=1e-5, atol=1e-5)


def test_channels_last_default_and_dtype():
    x = -jnp.ones((2, 4), jnp.bfloat16)
    layer = jnn.PReLU(num_parameters=4)
    v = layer.init(jax.random.key(0), x)
    y = layer.apply(v, x)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32), -0.25 * np.ones((2, 4)))
    assert jnnx.PReLU(4)(x).dtype == jnp.bfloat16


def test_module_errors():
    x = jnp.ones((2, 5))
    with pytest.raises(ValueError, match=r"one entry per channel \(5, the size of x's axis 1\)"):
        jnn.PReLU(num_parameters=3).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"one entry per channel \(5"):
        jnnx.PReLU(3)(x)
    with pytest.raises(ValueError, match="num_parameters must be at least 1, got 0"):
        jnnx.PReLU(0)
    with pytest.raises(TypeError, match="num_parameters must be an int"):
        jnn.PReLU(num_parameters=2.0).init(jax.random.key(0), x)


def test_num_parameters_accepts_numpy_ints():
    x = -jnp.ones((2, 3))
    layer = jnnx.PReLU(np.int64(3))
    assert layer.num_parameters == 3 and type(layer.num_parameters) is int
    np.testing.assert_array_equal(layer.negative_slope[...], np.full(3, 0.25, np.float32))
    np.testing.assert_array_equal(layer(x), np.full((2, 3), -0.25, np.float32))
    v = jnn.PReLU(num_parameters=np.int32(3)).init(jax.random.key(0), x)
    np.testing.assert_array_equal(v["params"]["negative_slope"], np.full(3, 0.25, np.float32))
    # np.int64(1) is the shared scalar slope, with flax's variables.
    assert jnnx.PReLU(np.int64(1)).negative_slope[...].shape == ()
    with pytest.raises(TypeError, match="num_parameters must be an int"):
        jnnx.PReLU(np.True_)
    with pytest.raises(TypeError, match="num_parameters must be an int"):
        jnnx.PReLU(True)


@pytest.mark.parametrize(("slope", "shown"), [(0.1, "0.1"), (1.0, "1.0"), (np.float32(0.2), "0.2")])
def test_float_first_argument_says_to_pass_the_slope_by_keyword(slope, shown):
    # flax.nnx.PReLU(0.1) is a slope; jaxnorm's first argument is torch's num_parameters.
    match = rf"not the initial slope.*pass it by keyword: PReLU\(negative_slope_init={shown}\)"
    with pytest.raises(TypeError, match=match):
        jnnx.PReLU(slope)
    with pytest.raises(TypeError, match=match):
        jnn.PReLU(slope).init(jax.random.key(0), jnp.ones((2, 3)))


def test_differences_from_flax_prelu_as_documented():
    # flax: default slope 0.01, the first positional argument is the slope, derivative 1 at 0.
    x = jnp.asarray([-2.0, 0.0, 3.0])
    assert float(nnx.PReLU().negative_slope[...]) == pytest.approx(0.01)
    assert float(nnx.PReLU(1).negative_slope[...]) == 1.0
    assert float(jnnx.PReLU(1).negative_slope[...]) == 0.25
    assert float(jax.grad(lambda v: nnx.PReLU(0.3)(v))(0.0)) == 1.0
    assert float(jax.grad(lambda v: jnnx.PReLU(negative_slope_init=0.3)(v))(0.0)) == pytest.approx(
        0.3
    )
    np.testing.assert_allclose(jnnx.PReLU(negative_slope_init=0.3)(x), nnx.PReLU(0.3)(x), rtol=1e-7)
    assert [f for f in linen.PReLU.__dataclass_fields__ if f not in ("parent", "name")][:1] == [
        "param_dtype"
    ]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_param_dtype_as_flax(dtype):
    x = -jnp.ones((2, 3), jnp.float32)
    ours = jnnx.PReLU(3, param_dtype=dtype)
    theirs = nnx.PReLU(param_dtype=dtype)
    assert ours.negative_slope[...].dtype == theirs.negative_slope[...].dtype == dtype
    v = jnn.PReLU(num_parameters=3, param_dtype=dtype).init(jax.random.key(0), x)
    v_flax = linen.PReLU(param_dtype=dtype).init(jax.random.key(0), x)
    assert v["params"]["negative_slope"].dtype == v_flax["params"]["negative_slope"].dtype == dtype
    assert ours(x).dtype == jnp.float32


# --- weight_decay_mask ----------------------------------------------------------------------------


class _LinenNet(linen.Module):
    @linen.compact
    def __call__(self, x):
        x = linen.Dense(4)(x)
        x = linen.BatchNorm(use_running_average=True)(x)
        x = jnn.PReLU(num_parameters=4)(x)
        return linen.Conv(2, (1,))(x[..., None, :])


def test_weight_decay_mask_linen():
    variables = _LinenNet().init(jax.random.key(0), jnp.ones((2, 3)))
    mask = jnn.weight_decay_mask(variables["params"])
    assert mask == {
        "Dense_0": {"kernel": True, "bias": False},
        "BatchNorm_0": {"scale": False, "bias": False},
        "PReLU_0": {"negative_slope": False},
        "Conv_0": {"kernel": True, "bias": False},
    }
    assert jnn.weight_decay_mask({"w": jnp.ones((2, 2))}, exclude=("w",)) == {"w": False}
    assert jnn.weight_decay_mask({"v": jnp.ones(3)}, min_ndim=1) == {"v": True}


def test_weight_decay_mask_refuses_a_single_str_exclude():
    # A str is a collection of characters: exclude="bias" excluded leaves named "b", "i", ...
    # and decayed the biases.
    params = {"bias": jnp.ones((2, 2)), "b": jnp.ones((2, 2)), "kernel": jnp.ones((2, 2))}
    with pytest.raises(TypeError, match=r"exclude must be a collection .*\('bias',\).*'bias'"):
        jnn.weight_decay_mask(params, exclude="bias")
    assert jnn.weight_decay_mask(params, exclude=["bias"]) == {
        "bias": False,
        "b": True,
        "kernel": True,
    }
    assert jnn.weight_decay_mask(params, exclude={"b", "kernel"})["bias"] is True


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"exclude": b"bias"}, TypeError, "exclude must be a collection.*bytes"),
        ({"exclude": 3}, TypeError, "exclude must be a collection.*got 3 of type int"),
        ({"exclude": ("bias", 1)}, TypeError, "exclude must hold leaf names.*1"),
        ({"min_ndim": 1.5}, TypeError, "min_ndim must be an int.*1.5"),
        ({"min_ndim": True}, TypeError, "min_ndim must be an int.*True"),
        ({"min_ndim": "2"}, TypeError, "min_ndim must be an int.*'2'"),
        ({"min_ndim": -1}, ValueError, "min_ndim must be >= 0, got -1"),
    ],
)
def test_weight_decay_mask_checks_its_arguments(kwargs, error, match):
    with pytest.raises(error, match=f"weight_decay_mask: {match}"):
        jnn.weight_decay_mask({"w": jnp.ones((2, 2))}, **kwargs)
    assert jnn.weight_decay_mask({"w": jnp.ones((2, 2))}, min_ndim=np.int64(3)) == {"w": False}


def test_adamw_with_the_mask_leaves_slopes_undecayed_linen():
    params = _LinenNet().init(jax.random.key(0), jnp.ones((2, 3)))["params"]
    tx = optax.adamw(0.1, weight_decay=0.5, mask=jnn.weight_decay_mask(params))
    zero = jax.tree.map(jnp.zeros_like, params)  # only weight decay moves anything
    updates, _ = tx.update(zero, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(
        new["PReLU_0"]["negative_slope"], params["PReLU_0"]["negative_slope"]
    )
    np.testing.assert_array_equal(new["Dense_0"]["bias"], params["Dense_0"]["bias"])
    np.testing.assert_array_equal(new["BatchNorm_0"]["scale"], params["BatchNorm_0"]["scale"])
    np.testing.assert_allclose(
        new["Dense_0"]["kernel"], params["Dense_0"]["kernel"] * (1 - 0.05), rtol=1e-6
    )


class _NnxNet(nnx.Module):
    def __init__(self, rngs):
        self.linear = nnx.Linear(3, 4, rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)
        self.act = jnnx.PReLU(4)

    def __call__(self, x):
        return self.act(self.bn(self.linear(x)))


def test_adamw_with_the_mask_leaves_slopes_undecayed_nnx():
    model = _NnxNet(nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    assert jnn.weight_decay_mask(nnx.to_pure_dict(state)) == {
        "linear": {"kernel": True, "bias": False},
        "bn": {"scale": False, "bias": False},
        "act": {"negative_slope": False},
    }
    kernel, slope = model.linear.kernel[...], model.act.negative_slope[...]
    tx = optax.adamw(0.1, weight_decay=0.5, mask=jnn.weight_decay_mask)  # called on nnx.State
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    opt.update(model, jax.tree.map(jnp.zeros_like, state))
    np.testing.assert_array_equal(model.act.negative_slope[...], slope)
    np.testing.assert_allclose(model.linear.kernel[...], kernel * (1 - 0.05), rtol=1e-6)
