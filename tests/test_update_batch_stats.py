"""update_batch_stats against NumPy's cumulative average and torch.optim.swa_utils.update_bn.

The same small MLP (Dense, BN, ReLU, Dense, BN, ReLU, Dense) is built as jaxnorm's functional
mlp, as a linen module, as an nnx module and as a torch module with ported weights.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxnorm import batchnorm, training
from jaxnorm import nn as jnn
from jaxnorm import nnx as jnnx

WIDTHS = [4, 8, 6, 3]


def _batches(num=5, size=16, offset=3.0, seed=1):
    x = jax.random.normal(jax.random.key(seed), (num, size, WIDTHS[0])) * 2.0 + offset
    return np.asarray(x)


def _np_stats(layers, batches, *, unbiased=False, frozen=None):
    """NumPy float64: per-batch statistics of each BN layer in training mode, averaged.

    ``layers``: [(w, b, scale, bias)] for the hidden layers; ``frozen``: {i: (mean, var)} for a
    layer that normalises with its running statistics instead.
    """
    frozen = frozen or {}
    sums = [[0.0, 0.0] for _ in layers]
    for x in batches:
        h = np.asarray(x, np.float64)
        for i, (w, b, scale, bias) in enumerate(layers):
            z = h @ np.asarray(w, np.float64) + np.asarray(b, np.float64)
            if i in frozen:
                mean, var = (np.asarray(v, np.float64) for v in frozen[i])
            else:
                mean, var = z.mean(0), z.var(0)
                n = z.shape[0]
                sums[i][0] = sums[i][0] + mean
                sums[i][1] = sums[i][1] + (var * n / (n - 1) if unbiased else var)
            z = (z - mean) / np.sqrt(var + 1e-5) * np.asarray(scale) + np.asarray(bias)
            h = np.maximum(z, 0)
    return [(m / len(batches), v / len(batches)) for m, v in sums]


def _mlp_layers(params):
    return [(p["w"], p["b"], p["scale"], p["bias"]) for p in params[:-1]]


def _stale(state):
    # running statistics far from the data's, as after training with other parameters
    return jax.tree.map(lambda a: a + 7 if jnp.issubdtype(a.dtype, jnp.floating) else a + 3, state)


# --------------------------------------------------------------------------- functional core


@pytest.mark.parametrize("momentum", [0.9, 0.99, 0.999])
def test_functional_mlp_matches_numpy(momentum):
    model = training.mlp(WIDTHS, batch_norm=True, momentum=momentum)
    params, state = model.init(jax.random.key(0))
    batches = _batches()
    new = training.update_batch_stats(model, params, _stale(state), batches)
    expected = _np_stats(_mlp_layers(params), batches)
    # relative error up to 2**-25 / (1 - m) from reading m off the update (the docstring's bound)
    rtol = max(2e-6, 2.0**-25 / (1 - momentum) * 1.5)
    for s, (mean, var) in zip(new, expected, strict=True):
        assert isinstance(s, batchnorm.BatchNormState) and s.mean.dtype == jnp.float32
        np.testing.assert_allclose(s.mean, mean, rtol=rtol, atol=1e-6)
        np.testing.assert_allclose(s.var, var, rtol=rtol)
        assert int(s.count) == len(batches)


def test_stacked_iterable_and_jit_agree():
    model = training.mlp(WIDTHS, batch_norm=True)
    params, state = model.init(jax.random.key(0))
    batches = _batches()
    labels = np.zeros((16,), np.int32)
    stacked = training.update_batch_stats(model, params, state, batches)
    listed = training.update_batch_stats(model, params, state, [jnp.asarray(b) for b in batches])
    pairs = training.update_batch_stats(model, params, state, ((b, labels) for b in batches))
    jitted = jax.jit(lambda p, s, x: training.update_batch_stats(model, p, s, x))(
        params, state, batches
    )
    for other in (listed, pairs, jitted):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), stacked, other)


def test_the_old_statistics_do_not_matter_and_a_plain_apply_works():
    model = training.mlp(WIDTHS, batch_norm=True)
    params, state = model.init(jax.random.key(0))
    batches = _batches(num=3)
    a = training.update_batch_stats(model.apply, params, state, batches)
    b = training.update_batch_stats(model, params, _stale(state), batches)
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-6), a, b)


def test_a_single_batch_gives_its_own_statistics():
    model = training.mlp(WIDTHS, batch_norm=True, momentum=0.9)
    params, state = model.init(jax.random.key(0))
    x = _batches(num=1)
    new = training.update_batch_stats(model, params, state, x)
    expected = _np_stats(_mlp_layers(params), x)
    for s, (mean, var) in zip(new, expected, strict=True):
        np.testing.assert_allclose(s.var, var, rtol=1e-6)
        np.testing.assert_allclose(s.mean, mean, rtol=1e-6, atol=1e-6)


def test_bfloat16_state_is_averaged_in_float32():
    model = training.mlp(WIDTHS, batch_norm=True, momentum=0.9)
    params, state = model.init(jax.random.key(0))
    state = jax.tree.map(
        lambda a: a.astype(jnp.bfloat16) if jnp.issubdtype(a.dtype, jnp.floating) else a, state
    )
    batches = _batches(num=40, size=8)
    new = training.update_batch_stats(model, params, state, batches)
    expected = _np_stats(_mlp_layers(params), batches)
    for s, (_mean, var) in zip(new, expected, strict=True):
        assert s.var.dtype == jnp.bfloat16
        # one bfloat16 rounding of the float32 average (a bfloat16 running average of 40
        # batches would be off by several of them)
        np.testing.assert_allclose(np.asarray(s.var, np.float32), var, rtol=2**-8)


# --------------------------------------------------------------------------- torch's update_bn


def _torch_mlp(torch, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 8),
        torch.nn.BatchNorm1d(8),
        torch.nn.ReLU(),
        torch.nn.Linear(8, 6),
        torch.nn.BatchNorm1d(6),
        torch.nn.ReLU(),
        torch.nn.Linear(6, 3),
    )


def _ported_layers(torch, tm):
    """(w [in, out], b, scale, bias) of the torch model's hidden layers, and its last layer."""
    lin = [m for m in tm if isinstance(m, torch.nn.Linear)]
    bns = [m for m in tm if isinstance(m, torch.nn.BatchNorm1d)]
    with torch.no_grad():
        for bn in bns:  # scales and offsets that are not 1 and 0
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    f = lambda t: t.detach().numpy()
    hidden = [
        (f(li.weight).T, f(li.bias), f(bn.weight), f(bn.bias))
        for li, bn in zip(lin[:-1], bns, strict=True)
    ]
    return hidden, (f(lin[-1].weight).T, f(lin[-1].bias)), bns


class _LinenMLP(nn.Module):
    bn: type = jnn.BatchNorm
    bn_kwargs: tuple = ()

    @nn.compact
    def __call__(self, x, train: bool):
        for width in WIDTHS[1:-1]:
            x = nn.Dense(width)(x)
            x = self.bn(use_running_average=not train, momentum=0.9, **dict(self.bn_kwargs))(x)
            x = nn.relu(x)
        return nn.Dense(WIDTHS[-1])(x)


def _linen_params(hidden, last):
    params, stats = {}, {}
    for i, (w, b, scale, bias) in enumerate(hidden):
        params[f"Dense_{i}"] = {"kernel": jnp.asarray(w), "bias": jnp.asarray(b)}
        params[f"BatchNorm_{i}"] = {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)}
        stats[f"BatchNorm_{i}"] = {
            "mean": jnp.full(w.shape[1], 5.0),
            "var": jnp.full(w.shape[1], 9.0),
        }
    params[f"Dense_{len(hidden)}"] = {"kernel": jnp.asarray(last[0]), "bias": jnp.asarray(last[1])}
    return params, stats


@pytest.mark.parametrize("ragged", [False, True])
def test_linen_unbiased_matches_torch_update_bn(ragged):
    torch = pytest.importorskip("torch")
    from torch.optim.swa_utils import update_bn

    tm = _torch_mlp(torch)
    hidden, last, bns = _ported_layers(torch, tm)
    batches = [b for b in _batches()]
    if ragged:
        batches[-1] = batches[-1][:5]  # a smaller last batch weighs as much as the others
    loader = [(torch.tensor(b), torch.zeros(len(b))) for b in batches]
    update_bn(loader, tm)
    module = _LinenMLP(bn_kwargs=(("unbiased_running_var", True),))
    params, stats = _linen_params(hidden, last)
    new = training.update_batch_stats(
        module,
        params,
        stats,
        [(jnp.asarray(b), None) for b in batches],
        apply_kwargs={"train": True},
    )
    for i, bn in enumerate(bns):
        np.testing.assert_allclose(
            new[f"BatchNorm_{i}"]["mean"], bn.running_mean.numpy(), rtol=1e-5, atol=1e-6
        )
        np.testing.assert_allclose(new[f"BatchNorm_{i}"]["var"], bn.running_var.numpy(), rtol=1e-5)
    # jaxnorm's default, flax's convention: the biased variances, averaged
    expected = _np_stats(hidden, batches)
    flax_bn = training.update_batch_stats(
        _LinenMLP(bn=nn.BatchNorm),
        params,
        stats,
        [jnp.asarray(b) for b in batches],
        apply_kwargs={"train": True},
    )
    for i, (mean, var) in enumerate(expected):
        np.testing.assert_allclose(flax_bn[f"BatchNorm_{i}"]["var"], var, rtol=1e-5)
        np.testing.assert_allclose(flax_bn[f"BatchNorm_{i}"]["mean"], mean, rtol=1e-5, atol=1e-6)


def test_functional_mlp_matches_torch_with_the_variance_convention_converted():
    torch = pytest.importorskip("torch")
    from torch.optim.swa_utils import update_bn

    tm = _torch_mlp(torch, seed=1)
    hidden, last, bns = _ported_layers(torch, tm)
    batches = _batches(size=12)
    update_bn([torch.tensor(b) for b in batches], tm)
    model = training.mlp(WIDTHS, batch_norm=True)
    params = [
        {"w": jnp.asarray(w), "b": jnp.asarray(b), "scale": jnp.asarray(s), "bias": jnp.asarray(o)}
        for w, b, s, o in hidden
    ]
    params.append({"w": jnp.asarray(last[0]), "b": jnp.asarray(last[1])})
    _, state = model.init(jax.random.key(0))
    new = training.update_batch_stats(model, params, state, batches)
    for s, bn in zip(new, bns, strict=True):
        np.testing.assert_allclose(s.mean, bn.running_mean.numpy(), rtol=1e-5, atol=1e-6)
        # torch averages unbiased variances: times (n - 1) / n, n = 12, they are the biased ones
        np.testing.assert_allclose(s.var, bn.running_var.numpy() * 11 / 12, rtol=1e-5)
        assert int(s.count) == int(bn.num_batches_tracked) == len(batches)


# --------------------------------------------------------------------------- linen details


def test_linen_frozen_layer_keeps_its_statistics_and_feeds_the_others():
    class Partly(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            x = nn.relu(nn.BatchNorm(use_running_average=True, momentum=0.9)(nn.Dense(8)(x)))
            x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(nn.Dense(6)(x)))
            return nn.Dense(3)(x)

    module = Partly()
    variables = module.init(jax.random.key(0), jnp.ones((2, 4)), train=False)
    stats = {
        "BatchNorm_0": {"mean": jnp.full(8, 0.5), "var": jnp.full(8, 2.0)},
        "BatchNorm_1": {"mean": jnp.zeros(6), "var": jnp.ones(6)},
    }
    batches = _batches(num=3)
    new = training.update_batch_stats(
        module, variables["params"], stats, batches, apply_kwargs={"train": True}
    )
    np.testing.assert_array_equal(new["BatchNorm_0"]["mean"], stats["BatchNorm_0"]["mean"])
    np.testing.assert_array_equal(new["BatchNorm_0"]["var"], stats["BatchNorm_0"]["var"])
    p = variables["params"]
    layers = [
        (
            p[f"Dense_{i}"]["kernel"],
            p[f"Dense_{i}"]["bias"],
            p[f"BatchNorm_{i}"]["scale"],
            p[f"BatchNorm_{i}"]["bias"],
        )
        for i in range(2)
    ]
    expected = _np_stats(layers, batches, frozen={0: (np.full(8, 0.5), np.full(8, 2.0))})
    np.testing.assert_allclose(new["BatchNorm_1"]["var"], expected[1][1], rtol=1e-5)


def test_linen_in_inference_mode_is_refused():
    module = _LinenMLP(bn=nn.BatchNorm)
    variables = module.init(jax.random.key(0), jnp.ones((2, 4)), train=False)
    with pytest.raises(ValueError, match=r"updated none of the running statistics.*train"):
        training.update_batch_stats(
            module,
            variables["params"],
            variables["batch_stats"],
            _batches(num=2),
            apply_kwargs={"train": False},
        )


def test_linen_dropout_uses_the_key():
    class WithDropout(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            x = nn.Dropout(0.5, deterministic=not train)(nn.Dense(8)(x))
            return nn.BatchNorm(use_running_average=not train)(x)

    module = WithDropout()
    v = module.init(jax.random.key(0), jnp.ones((2, 4)), train=False)
    run = lambda key: training.update_batch_stats(
        module,
        v["params"],
        v["batch_stats"],
        _batches(num=2),
        key=key,
        apply_kwargs={"train": True},
    )
    a, b, c = run(jax.random.key(1)), run(jax.random.key(1)), run(jax.random.key(2))
    np.testing.assert_array_equal(a["BatchNorm_0"]["var"], b["BatchNorm_0"]["var"])
    assert not np.allclose(a["BatchNorm_0"]["var"], c["BatchNorm_0"]["var"])


# --------------------------------------------------------------------------- nnx


class _NnxMLP(nnx.Module):
    def __init__(self, rngs, bn=nnx.BatchNorm):
        self.layers = nnx.List(
            [
                nnx.Linear(4, 8, rngs=rngs),
                bn(8, momentum=0.9, rngs=rngs),
                nnx.Linear(8, 6, rngs=rngs),
                bn(6, momentum=0.9, rngs=rngs),
            ]
        )
        self.out = nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x):
        for i in range(0, 4, 2):
            x = nnx.relu(self.layers[i + 1](self.layers[i](x)))
        return self.out(x)


@pytest.mark.parametrize("bn", [nnx.BatchNorm, jnnx.BatchNorm], ids=["flax", "jaxnorm"])
def test_nnx_in_place_matches_numpy_and_keeps_mode_and_parameters(bn):
    model = _NnxMLP(nnx.Rngs(0), bn)
    model.eval()
    params_before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    batches = _batches(num=4)
    assert training.update_batch_stats(model, batches) is None
    layers = [
        (
            model.layers[i].kernel[...],
            model.layers[i].bias[...],
            model.layers[i + 1].scale[...],
            model.layers[i + 1].bias[...],
        )
        for i in (0, 2)
    ]
    for (mean, var), i in zip(_np_stats(layers, batches), (1, 3), strict=True):
        np.testing.assert_allclose(model.layers[i].mean[...], mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(model.layers[i].var[...], var, rtol=1e-5)
    assert model.layers[1].use_running_average is True  # still in eval mode
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model, nnx.Param), params_before)


# --------------------------------------------------------------------------- arguments


def test_arguments_are_checked():
    model = training.mlp(WIDTHS, batch_norm=True)
    params, state = model.init(jax.random.key(0))
    with pytest.raises(ValueError, match="batches is empty"):
        training.update_batch_stats(model, params, state, [])
    with pytest.raises(TypeError, match="batches must be an array of stacked batches"):
        training.update_batch_stats(model, params, state, 3)
    with pytest.raises(TypeError, match=r"update_batch_stats\(model, params, state, batches\)"):
        training.update_batch_stats(model, _batches())
    with pytest.raises(ValueError, match="holds no floating running statistics"):
        training.update_batch_stats(model, params, (), _batches())
    with pytest.raises(TypeError, match=r"for an nnx model call update_batch_stats\(model, batch"):
        training.update_batch_stats(_NnxMLP(nnx.Rngs(0)), None, None, _batches())
    with pytest.raises(TypeError, match=r"model must be a jaxnorm\.training\.Model"):
        training.update_batch_stats(3, params, state, _batches())
    with pytest.raises(TypeError, match="key must be a PRNG key"):
        training.update_batch_stats(model, params, state, _batches(), key=0)
