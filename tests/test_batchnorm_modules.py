"""Tests for the Flax BatchNorm modules, jaxnorm.nn.BatchNorm (linen) and jaxnorm.nnx.BatchNorm.

References are flax's own modules (same variables in, same outputs and batch_stats out), NumPy
float64 formulas and torch.nn.BatchNorm{1,2}d. flax's code needs standard dtype promotion, so the
tests that run it are marked ``loose_promotion``.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxnorm import nn as jnn
from jaxnorm import nnx as jnnx
from tests.helpers import to_f64, tol

loose = pytest.mark.loose_promotion


def _close(actual, desired, dtype=jnp.float32, scale=1.0):
    np.testing.assert_allclose(to_f64(actual), to_f64(desired), **tol(dtype, scale))


def _trees_close(actual, desired, dtype=jnp.float32, scale=1.0):
    assert jax.tree.structure(actual) == jax.tree.structure(desired)
    for a, d in zip(jax.tree.leaves(actual), jax.tree.leaves(desired), strict=True):
        assert a.shape == d.shape and a.dtype == d.dtype, (a.shape, a.dtype, d.shape, d.dtype)
        _close(a, d, dtype, scale)


def _data(shape, *, offset=0.5, std=2.0, seed=0, dtype=jnp.float32):
    # NumPy's generator, not jax.random.normal: that compiles a program per shape (~20 shapes
    # here, 0.3 s to 1.3 s each on CPU) for data that is only an input.
    g = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
    return jnp.asarray((np.float32(offset) + np.float32(std) * g).astype(dtype))


# --------------------------------------------------------------------------------------------
# linen: a model written against flax.linen.BatchNorm, with the class swapped.


class _CNN(nn.Module):
    norm: type
    kw: dict

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(8, (3, 3))(x)
        x = self.norm(use_running_average=not train, **self.kw)(x)
        x = nn.relu(x)
        x = nn.Conv(4, (3, 3), strides=2)(x)
        x = self.norm(use_running_average=not train, **self.kw)(x)
        x = x.mean(axis=(1, 2))
        return nn.Dense(3)(x)


class _MLP(nn.Module):
    norm: type
    kw: dict

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(16)(x)
        x = self.norm(**self.kw)(x, use_running_average=not train)
        return nn.Dense(2)(nn.relu(x))


LINEN_CONFIGS = {
    "default": {},
    "momentum_eps_init": {
        "momentum": 0.9,
        "epsilon": 1e-3,
        "scale_init": nn.initializers.normal(0.5),
        "bias_init": nn.initializers.normal(0.5),
    },
    "no_scale_bias": {"use_scale": False, "use_bias": False},
    "no_scale": {"use_scale": False},
    "dtype_bf16": {"dtype": jnp.bfloat16},
    "param_bf16": {"param_dtype": jnp.bfloat16},
}


def _jit_apply(model, **kw):
    # One compile per model and mode: op-by-op eager dispatch of a CNN is far slower on CPU.
    return jax.jit(functools.partial(model.apply, **kw))


def _shapes_dtypes(tree):
    return jax.tree.map(lambda a: (a.shape, a.dtype), tree)


def _swap_check(model_cls, kw, x, dtype=jnp.float32):
    """Init flax's model, apply it and the jaxnorm-swapped model to the same variables."""
    theirs = model_cls(nn.BatchNorm, kw)
    ours = model_cls(jnn.BatchNorm, kw)
    variables = theirs.init(jax.random.key(1), x, train=False)
    assert _shapes_dtypes(
        jax.eval_shape(functools.partial(ours.init, train=False), jax.random.key(1), x)
    ) == _shapes_dtypes(variables)
    train_t = _jit_apply(theirs, train=True, mutable=["batch_stats"])
    train_o = _jit_apply(ours, train=True, mutable=["batch_stats"])
    # a few steps from the same checkpoint, feeding each model's stats back in
    v_theirs, v_ours = variables, variables
    for step in range(2):
        xs = x + step
        y_t, up_t = train_t(v_theirs, xs)
        y_o, up_o = train_o(v_ours, xs)
        assert y_o.dtype == y_t.dtype
        _close(y_o, y_t, dtype, 4)
        _trees_close(up_o, up_t, dtype)
        v_theirs = {**v_theirs, **up_t}
        v_ours = {**v_ours, **up_o}
    y_t = _jit_apply(theirs, train=False)(v_theirs, x)
    y_o = _jit_apply(ours, train=False)(v_ours, x)
    assert y_o.dtype == y_t.dtype
    _close(y_o, y_t, dtype, 4)


@loose
@pytest.mark.parametrize("config", ["default", "no_scale", "dtype_bf16"])
def test_linen_swap_cnn_nhwc(config):
    kw = LINEN_CONFIGS[config]
    dtype = jnp.bfloat16 if "bf16" in config else jnp.float32
    _swap_check(_CNN, kw, _data((4, 8, 8, 3)), dtype)


@loose
@pytest.mark.parametrize("config", sorted(LINEN_CONFIGS))
def test_linen_swap_dense(config):
    kw = LINEN_CONFIGS[config]
    dtype = jnp.bfloat16 if "bf16" in config else jnp.float32
    _swap_check(_MLP, kw, _data((16, 5)), dtype)


@loose
def test_linen_swap_bfloat16_input():
    # flax keeps float32 params, so a bfloat16 x gives a float32 y; ours gives the same dtype.
    _swap_check(_CNN, {}, _data((4, 8, 8, 3), dtype=jnp.bfloat16), jnp.bfloat16)


@loose
@pytest.mark.parametrize("axis", [1, -2, (1, 2), (-1, 1)])
def test_linen_axis_settings(axis):
    x = _data((6, 3, 4, 5))
    theirs = nn.BatchNorm(axis=axis, momentum=0.8)
    ours = jnn.BatchNorm(axis=axis, momentum=0.8)
    variables = theirs.init(jax.random.key(0), x, use_running_average=True)
    variables = jax.tree.map(lambda a: a + 0.1 * jnp.arange(a.size).reshape(a.shape), variables)
    for train in (True, False):
        y_t, up_t = _jit_apply(theirs, use_running_average=not train, mutable=["batch_stats"])(
            variables, x
        )
        y_o, up_o = _jit_apply(ours, use_running_average=not train, mutable=["batch_stats"])(
            variables, x
        )
        _close(y_o, y_t, scale=4)
        _trees_close(up_o, up_t)


@loose
def test_linen_mask_matches_flax():
    x = _data((12, 4))
    mask = jnp.arange(12)[:, None] < 9
    theirs = nn.BatchNorm(use_running_average=False, momentum=0.5)
    ours = jnn.BatchNorm(use_running_average=False, momentum=0.5)
    variables = theirs.init(jax.random.key(0), x)
    y_t, up_t = theirs.apply(variables, x, mask=mask, mutable=["batch_stats"])
    y_o, up_o = ours.apply(variables, x, mask=mask, mutable=["batch_stats"])
    _close(y_o, y_t, scale=4)
    _trees_close(up_o, up_t)
    # the padded rows do not move the statistics: the same as normalising the valid rows alone
    _, up_valid = ours.apply(variables, x[:9], mutable=["batch_stats"])
    _trees_close(up_o, up_valid)


def test_linen_init_does_not_update_and_needs_no_axis_name():
    # As in flax: init computes batch statistics for the output but leaves the running averages at
    # their initial values, and the named axis need not exist during init.
    bn = jnn.BatchNorm(use_running_average=False, axis_name="batch")
    variables = bn.init(jax.random.key(0), _data((8, 3)))
    np.testing.assert_array_equal(variables["batch_stats"]["mean"], np.zeros(3))
    np.testing.assert_array_equal(variables["batch_stats"]["var"], np.ones(3))


def test_linen_use_running_average_must_be_given_once():
    bn = jnn.BatchNorm()
    x = _data((8, 3))
    variables = jnn.BatchNorm(use_running_average=True).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="use_running_average"):
        bn.apply(variables, x)
    with pytest.raises(ValueError, match="use_running_average"):
        jnn.BatchNorm(use_running_average=True).apply(variables, x, use_running_average=False)


def test_linen_large_offset_flax_fails_ours_right():
    # float32 data with mean 1e4 and std 1: flax's default one-pass variance E[x^2] - E[x]^2
    # cancels catastrophically (1e8 - 1e8 in float32, whose spacing there is 8), giving a running
    # var of 0 for most features (multiples of 8 for the rest) and outputs with std in the
    # hundreds (1 / sqrt(epsilon)); jaxnorm's variance is accurate.
    x = _data((256, 8), offset=1e4, std=1.0)
    ref = to_f64(x)
    ref_var = ref.var(axis=0)
    kw = {"use_running_average": False, "momentum": 0.0}
    with jax.numpy_dtype_promotion("standard"):
        variables = nn.BatchNorm(**kw).init(jax.random.key(0), x)
        y_flax, up_flax = nn.BatchNorm(**kw).apply(variables, x, mutable=["batch_stats"])
    flax_var = np.asarray(up_flax["batch_stats"]["var"])
    assert np.mean(flax_var == 0.0) >= 0.5
    assert np.all((flax_var == 0.0) | (np.abs(flax_var - ref_var) > 5.0))
    assert float(np.std(to_f64(y_flax), axis=0).max()) > 100.0
    y, up = jnn.BatchNorm(**kw).apply(variables, x, mutable=["batch_stats"])
    np.testing.assert_allclose(to_f64(up["batch_stats"]["var"]), ref_var, rtol=1e-2)
    np.testing.assert_allclose(to_f64(up["batch_stats"]["mean"]), ref.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(
        np.std(to_f64(y), axis=0), np.sqrt(ref_var / (ref_var + 1e-5)), rtol=1e-2
    )


@loose
def test_linen_activation_fused():
    x = _data((16, 6))
    variables = nn.BatchNorm(use_running_average=False).init(jax.random.key(0), x)
    y_t, up_t = nn.BatchNorm(use_running_average=False).apply(variables, x, mutable=["batch_stats"])
    y_o, up_o = jnn.BatchNorm(use_running_average=False, activation="relu").apply(
        variables, x, mutable=["batch_stats"]
    )
    _close(y_o, jax.nn.relu(y_t), scale=4)
    _trees_close(up_o, up_t)


def _xent(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@loose
def test_linen_optax_train_step_matches_flax():
    x = _data((8, 8, 8, 3))
    labels = jnp.arange(8) % 3
    # sgd, not adam: adam turns the float-noise gradient of a bias feeding a batch norm (exactly 0
    # in exact arithmetic) into full-size steps of random sign.
    tx = optax.sgd(0.1, momentum=0.9)

    def make_step(model):
        @jax.jit
        def step(params, batch_stats, opt_state, x, labels):
            def loss_fn(params):
                logits, updates = model.apply(
                    {"params": params, "batch_stats": batch_stats},
                    x,
                    train=True,
                    mutable=["batch_stats"],
                )
                return _xent(logits, labels), updates["batch_stats"]

            (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), batch_stats, opt_state, loss, grads

        return step

    theirs, ours = _CNN(nn.BatchNorm, {}), _CNN(jnn.BatchNorm, {})
    variables = theirs.init(jax.random.key(2), x, train=False)
    results = []
    for model in (theirs, ours):
        step = make_step(model)
        params, stats = variables["params"], variables["batch_stats"]
        opt_state = tx.init(params)
        for _ in range(3):
            params, stats, opt_state, loss, grads = step(params, stats, opt_state, x, labels)
        results.append((params, stats, loss, grads))
    for a, b in zip(results[1], results[0], strict=True):
        _trees_close(a, b, scale=20)


# --------------------------------------------------------------------------------------------
# torch parity via the porting options


def _torch_bn(c, ndim, **kw):
    torch = pytest.importorskip("torch")
    cls = torch.nn.BatchNorm2d if ndim == 4 else torch.nn.BatchNorm1d
    torch.manual_seed(0)
    bn = cls(c, dtype=torch.float64, **kw)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return torch, bn


def _torch_variables(bn):
    as_np = lambda t: jnp.asarray(t.detach().numpy().astype(np.float32))
    return {
        "params": {"scale": as_np(bn.weight), "bias": as_np(bn.bias)},
        "batch_stats": {"mean": as_np(bn.running_mean), "var": as_np(bn.running_var)},
    }


@pytest.mark.parametrize("cumulative", [False, True])
def test_linen_torch_batchnorm2d_parity(cumulative):
    from jaxnorm import batchnorm

    torch, bn = _torch_bn(3, 4, momentum=None if cumulative else 0.1)
    momentum = 0.0 if cumulative else batchnorm.momentum_from_torch(0.1)
    ours = jnn.BatchNorm(
        axis=1, momentum=momentum, unbiased_running_var=True, cumulative=cumulative
    )
    variables = _torch_variables(bn)
    if cumulative:
        variables["batch_stats"]["count"] = jnp.zeros((), jnp.float32)
    train = _jit_apply(ours, use_running_average=False, mutable=["batch_stats"])
    bn.train()
    for step in range(3):
        x = _data((4, 3, 5, 6), seed=step, offset=step)
        y_t = bn(torch.from_numpy(to_f64(x)))
        y, up = train(variables, x)
        variables = {**variables, **up}
        _close(y, y_t.detach().numpy(), scale=4)
        _close(up["batch_stats"]["mean"], bn.running_mean.numpy())
        _close(up["batch_stats"]["var"], bn.running_var.numpy())
    if cumulative:
        assert float(variables["batch_stats"]["count"]) == bn.num_batches_tracked.item() == 3
    bn.eval()
    x = _data((2, 3, 5, 6), seed=9)
    with torch.no_grad():
        y_t = bn(torch.from_numpy(to_f64(x)))
    _close(ours.apply(variables, x, use_running_average=True), y_t.numpy(), scale=4)


def test_linen_cumulative_adds_count_only_when_asked():
    x = _data((8, 3))
    plain = jnn.BatchNorm(use_running_average=True).init(jax.random.key(0), x)
    assert set(plain["batch_stats"]) == {"mean", "var"}
    cum = jnn.BatchNorm(use_running_average=True, cumulative=True).init(jax.random.key(0), x)
    assert set(cum["batch_stats"]) == {"mean", "var", "count"}


# --------------------------------------------------------------------------------------------
# nnx


NNX_CONFIGS = {
    "default": {},
    "momentum_eps": {"momentum": 0.9, "epsilon": 1e-3},
    "no_scale_bias": {"use_scale": False, "use_bias": False},
    "dtype_bf16": {"dtype": jnp.bfloat16},
    "param_bf16": {"param_dtype": jnp.bfloat16},
}


def _nnx_pair(num_features, **kw):
    theirs = nnx.BatchNorm(num_features, rngs=nnx.Rngs(0), **kw)
    ours = jnnx.BatchNorm(num_features, rngs=nnx.Rngs(0), **kw)
    # a non-trivial checkpoint: perturb flax's variables, then load them into ours
    state = nnx.state(theirs)
    state = jax.tree.map(lambda a: a + (0.1 * jnp.arange(a.size)).astype(a.dtype), state)
    nnx.update(theirs, state)
    nnx.update(ours, state)
    return theirs, ours


def _shapes(module):
    return jax.tree.map(lambda a: (a.shape, a.dtype), nnx.to_pure_dict(nnx.state(module)))


@loose
@pytest.mark.parametrize("config", sorted(NNX_CONFIGS))
def test_nnx_matches_flax(config):
    kw = NNX_CONFIGS[config]
    dtype = jnp.bfloat16 if "bf16" in config else jnp.float32
    theirs, ours = _nnx_pair(5, **kw)
    assert _shapes(ours) == _shapes(theirs)
    for step in range(2):
        x = _data((16, 5), seed=step)
        y_t, y_o = theirs(x), ours(x)
        assert y_o.dtype == y_t.dtype
        _close(y_o, y_t, dtype, 4)
        _trees_close(nnx.state(ours, nnx.BatchStat), nnx.state(theirs, nnx.BatchStat), dtype)
    theirs.eval()
    ours.eval()
    x = _data((3, 5), seed=5)
    _close(ours(x), theirs(x), dtype, 4)
    _trees_close(nnx.state(ours), nnx.state(theirs), dtype)


@loose
@pytest.mark.parametrize("shape,axis", [((4, 6, 6, 3), -1), ((8, 3, 7), 1)])
def test_nnx_matches_flax_images_and_bf16_input(shape, axis):
    theirs, ours = _nnx_pair(3, axis=axis, momentum=0.5)
    x = _data(shape, dtype=jnp.bfloat16)
    y_t, y_o = theirs(x), ours(x)
    assert y_o.dtype == y_t.dtype == jnp.float32
    _close(y_o, y_t, jnp.bfloat16)
    _trees_close(nnx.state(ours), nnx.state(theirs), jnp.bfloat16)


def test_nnx_train_eval_and_view_switch_modes():
    bn = jnnx.BatchNorm(2, rngs=nnx.Rngs(0))
    x = _data((8, 2))
    bn.eval()
    assert bn.use_running_average is True
    bn(x)
    np.testing.assert_array_equal(bn.mean[...], np.zeros(2))
    bn.train()
    bn(x)
    np.testing.assert_allclose(to_f64(bn.mean[...]), 0.01 * to_f64(x).mean(0), rtol=1e-5)
    frozen = nnx.view(bn, use_running_average=True)
    before = np.asarray(bn.mean[...])
    frozen(x)
    np.testing.assert_array_equal(bn.mean[...], before)
    with pytest.raises(ValueError, match="use_running_average"):
        jnnx.BatchNorm(2, use_running_average=None, rngs=nnx.Rngs(0))(x)


def test_nnx_checks_options_when_built():
    # Not at the first call, which may be deep inside a jitted train step.
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\]"):
        jnnx.BatchNorm(2, momentum=1.5, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="unknown activation"):
        jnnx.BatchNorm(2, activation="relux", rngs=nnx.Rngs(0))


def _bn_ref(x, running_mean, running_var, momentum, eps=1e-5):
    """NumPy float64 train-mode batch norm over the rows of x (scale 1, bias 0)."""
    mu, var = x.mean(0), x.var(0)
    y = (x - mu) / np.sqrt(var + eps)
    return (
        y,
        momentum * running_mean + (1 - momentum) * mu,
        momentum * running_var + (1 - momentum) * var,
    )


class _Member(nnx.Module):
    def __init__(self, rngs, **kw):
        self.linear = nnx.Linear(3, 4, rngs=rngs)
        self.bn = jnnx.BatchNorm(4, rngs=rngs, **kw)

    def __call__(self, x):
        return self.bn(self.linear(x))


def test_nnx_vmap_ensemble():
    # A stack of models under nnx.vmap (an ensemble, a hyperparameter sweep), trained with nnx.jit
    # and nnx.grad: each member keeps its own statistics.
    members = 3

    @nnx.split_rngs(splits=members)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
        return _Member(rngs)

    ensemble = create(nnx.Rngs(0))
    xs = _data((members, 10, 3), offset=1.0)

    @nnx.jit
    def step(ensemble, xs):
        @nnx.vmap(in_axes=(0, 0), out_axes=0)
        def member_loss(model, x):
            def loss(model):
                return jnp.mean(model(x) ** 2)

            return nnx.value_and_grad(loss)(model)

        return member_loss(ensemble, xs)

    kernels = np.asarray(ensemble.linear.kernel[...], np.float64)
    biases = np.asarray(ensemble.linear.bias[...], np.float64)
    losses, grads = step(ensemble, xs)
    assert losses.shape == (members,)
    assert grads["linear"]["kernel"][...].shape == (members, 3, 4)
    for i in range(members):
        h = to_f64(xs[i]) @ kernels[i] + biases[i]
        _, mean, var = _bn_ref(h, np.zeros(4), np.ones(4), 0.99)
        _close(ensemble.bn.mean[...][i], mean, scale=4)
        _close(ensemble.bn.var[...][i], var, scale=4)


def test_nnx_vmap_one_model_over_data_with_axis_name():
    # flax issue 4760: nnx.vmap of one model over a data axis in training mode. With axis_name on
    # the vmap and the BatchNorm, the statistics are global over the mapped axis and the single
    # set of running statistics is well defined: that of the whole batch.
    model = _Member(nnx.Rngs(0), axis_name="b")
    data = _data((4, 6, 3), offset=1.0)
    kernel = np.asarray(model.linear.kernel[...], np.float64)
    bias = np.asarray(model.linear.bias[...], np.float64)
    apply = nnx.jit(nnx.vmap(lambda m, x: m(x), in_axes=(None, 0), axis_name="b"))
    for _ in range(2):
        y = apply(model, data)
    # Without axis_name each slice would give the one model different running statistics: nnx
    # refuses the update, for flax.nnx.BatchNorm too (it raises the same error in flax 0.12.8).
    with pytest.raises(ValueError, match="batched"):
        nnx.vmap(lambda m, x: m(x), in_axes=(None, 0))(_Member(nnx.Rngs(0)), data)
    h = to_f64(data).reshape(24, 3) @ kernel + bias
    y_ref, mean, var = _bn_ref(h, np.zeros(4), np.ones(4), 0.99)
    _, mean, var = _bn_ref(h, mean, var, 0.99)
    _close(y.reshape(24, 4), y_ref, scale=10)
    _close(model.bn.mean[...], mean, scale=4)
    _close(model.bn.var[...], var, scale=4)


@loose
def test_nnx_optax_train_step_matches_flax():
    class Net(nnx.Module):
        def __init__(self, norm, rngs):
            self.conv = nnx.Conv(3, 6, kernel_size=(3, 3), rngs=rngs)
            self.bn = norm(6, rngs=rngs)
            self.out = nnx.Linear(6, 3, rngs=rngs)

        def __call__(self, x):
            h = nnx.relu(self.bn(self.conv(x)))
            return self.out(h.mean(axis=(1, 2)))

    x = _data((6, 8, 8, 3))
    labels = jnp.arange(6) % 3

    @nnx.jit
    def train_step(model, optimizer, x, labels):
        def loss_fn(model):
            return _xent(model(x), labels)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss, grads

    results = []
    for norm in (nnx.BatchNorm, jnnx.BatchNorm):
        model = Net(norm, nnx.Rngs(3))
        optimizer = nnx.Optimizer(model, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)
        model.train()
        for _ in range(3):
            loss, grads = train_step(model, optimizer, x, labels)
        model.eval()
        results.append((nnx.state(model), loss, grads, model(x)))
    for a, b in zip(results[1], results[0], strict=True):
        _trees_close(a, b, scale=20)


def test_nnx_torch_batchnorm1d_parity():
    from jaxnorm import batchnorm

    torch, bn = _torch_bn(4, 2, momentum=0.1)
    ours = jnnx.BatchNorm(
        4,
        momentum=batchnorm.momentum_from_torch(0.1),
        unbiased_running_var=True,
        rngs=nnx.Rngs(0),
    )
    v = _torch_variables(bn)
    ours.scale[...], ours.bias[...] = v["params"]["scale"], v["params"]["bias"]
    bn.train()
    for step in range(2):
        x = _data((10, 4), seed=step)
        y_t = bn(torch.from_numpy(to_f64(x)))
        _close(ours(x), y_t.detach().numpy(), scale=4)
        _close(ours.mean[...], bn.running_mean.numpy())
        _close(ours.var[...], bn.running_var.numpy())


def test_ghost_batch_and_activation_pass_through():
    # virtual_batch_size: each group of 4 rows is normalised with its own statistics.
    x = _data((8, 3))
    ref = to_f64(x).reshape(2, 4, 3)
    ref = (ref - ref.mean(1, keepdims=True)) / np.sqrt(ref.var(1, keepdims=True) + 1e-5)
    ref = np.maximum(ref.reshape(8, 3), 0.0)
    linen = jnn.BatchNorm(use_running_average=False, virtual_batch_size=4, activation="relu")
    variables = linen.init(jax.random.key(0), x)
    y, _ = linen.apply(variables, x, mutable=["batch_stats"])
    _close(y, ref, scale=4)
    mod = jnnx.BatchNorm(3, virtual_batch_size=4, activation="relu", rngs=nnx.Rngs(0))
    _close(mod(x), ref, scale=4)


@loose
def test_linen_low_precision_running_stats_keep_their_dtype():
    # force_float32_reductions=False: the statistics variables are created in param_dtype, as in
    # flax. flax's update then silently promotes them to float32 (bfloat16 state * float32 batch
    # statistics); jaxnorm keeps the declared dtype, so a checkpoint's dtypes do not change.
    kw = {"param_dtype": jnp.bfloat16, "force_float32_reductions": False}
    x = _data((16, 4))
    variables = nn.BatchNorm(use_running_average=False, **kw).init(jax.random.key(0), x)
    ours = jnn.BatchNorm(use_running_average=False, **kw)
    assert _shapes_dtypes(ours.init(jax.random.key(0), x)) == _shapes_dtypes(variables)
    _, up_t = nn.BatchNorm(use_running_average=False, **kw).apply(
        variables, x, mutable=["batch_stats"]
    )
    _, up_o = ours.apply(variables, x, mutable=["batch_stats"])
    assert up_t["batch_stats"]["mean"].dtype == jnp.float32
    assert up_o["batch_stats"]["mean"].dtype == jnp.bfloat16
    for name in ("mean", "var"):
        _close(up_o["batch_stats"][name], up_t["batch_stats"][name], jnp.bfloat16)


@loose
def test_linen_jax_vmap_over_stacked_models():
    # An ensemble as jax.vmap over stacked variables: each member equals flax's module alone.
    members, x = 3, _data((3, 12, 4))
    bn_t = nn.BatchNorm(use_running_average=False, momentum=0.8)
    bn_o = jnn.BatchNorm(use_running_average=False, momentum=0.8)
    variables = jax.vmap(bn_t.init)(jax.random.split(jax.random.key(0), members), x)
    variables = jax.tree.map(lambda a: a + 0.1 * jnp.arange(a.size).reshape(a.shape), variables)
    y, up = jax.jit(jax.vmap(functools.partial(bn_o.apply, mutable=["batch_stats"])))(variables, x)
    for i in range(members):
        y_t, up_t = bn_t.apply(
            jax.tree.map(lambda a, i=i: a[i], variables), x[i], mutable=["batch_stats"]
        )
        _close(y[i], y_t, scale=4)
        _trees_close(jax.tree.map(lambda a, i=i: a[i], up), up_t)


def _doc_snippets(name):
    import pathlib
    import re

    text = (pathlib.Path(__file__).parent.parent / "docs" / name).read_text()
    section = text.split("## Data parallel: one pattern", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


@pytest.mark.loose_promotion
def test_data_parallel_snippets_in_the_docs_run():
    # docs/batchnorm_modules.md's recommended pattern (sharded jit, no axis_name) and its
    # shard_map alternative, on the devices at hand; the second gives the first's results.
    blocks = _doc_snippets("batchnorm_modules.md")
    assert len(blocks) == 2
    scope = {}
    exec(blocks[0], scope)
    exec(blocks[1], scope)
    np.testing.assert_allclose(scope["y2"], scope["y"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(scope["batch_stats2"]["var"], scope["batch_stats"]["var"], rtol=1e-6)
    # An unbound axis_name is named (the shard_map model, called outside shard_map).
    with pytest.raises(NameError, match=r"axis_name='batch'.*jax\.shard_map"):
        scope["sm_model"].apply(scope["variables"], scope["x"], mutable=["batch_stats"])
