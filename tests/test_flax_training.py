"""Flax models (linen and nnx) in jaxnorm.training, through from_linen and from_nnx.

A small CNN, Conv(8, 3x3) -> BatchNorm -> relu -> max pool -> Dropout -> Dense(10), on the digits
as 8x8 images, in linen (with jaxnorm.nn.BatchNorm, the mode an argument of __call__) and in nnx
(with flax's nnx.BatchNorm, the mode set by model.train()/model.eval()); the swapped BatchNorm
classes are checked too. The references are flax's own API (module.apply with rngs= and
mutable=, nnx.update and nnx.reseed), NumPy float64 norms and the lecture's expectations
(log 10, 100% on 20 examples).

The models and their runs are module-scoped fixtures, so each program compiles once.
"""

import copy
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.errors import InvalidRngError

import jaxnorm.nn as jnn
import jaxnorm.nnx as jnnx
from jaxnorm import data as jdata
from jaxnorm import diagnostics, training

STEPS = 12
NNX_NAMES = ("conv", "bn", "head")
BATCH = 16
RATE = 0.2


class LinenCNN(nn.Module):
    batch_norm: type = jnn.BatchNorm
    rate: float = RATE

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(8, (3, 3))(x)
        x = self.batch_norm(use_running_average=not train, momentum=0.9)(x)
        x = nn.relu(x)
        # Dropout on the flattened features: XLA:CPU compiles the random bits of a rank-4 array
        # (threefry, partitionable) in about 1.7 s, of a rank-2 one in 0.2 s, in every program.
        x = nn.max_pool(x, (2, 2), strides=(2, 2)).reshape((x.shape[0], -1))
        x = nn.Dropout(self.rate, deterministic=not train)(x)
        # Small last-layer weights: the first loss is log 10 (the lecture's check).
        return nn.Dense(10, kernel_init=nn.initializers.normal(0.01))(x)


class NnxCNN(nnx.Module):
    def __init__(self, rngs, batch_norm=nnx.BatchNorm, rate=RATE):
        self.conv = nnx.Conv(1, 8, (3, 3), rngs=rngs)
        self.bn = batch_norm(8, momentum=0.9, rngs=rngs)
        self.drop = nnx.Dropout(rate, rngs=rngs)
        self.head = nnx.Linear(32 * 4, 10, kernel_init=nnx.initializers.normal(0.01), rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn(self.conv(x)))
        x = nnx.max_pool(x, (2, 2), strides=(2, 2)).reshape((x.shape[0], -1))
        return self.head(self.drop(x))


@pytest.fixture(scope="module")
def digits():
    train, val, _ = jdata.digits(seed=0, flatten=False)
    return (train.x[:64], train.y[:64]), (val.x[:128], val.y[:128])


def rkey(seed):
    """An "rbg" key. XLA:CPU compiles the default (threefry, partitionable) random bits of a
    rank-4 array, such as a conv kernel's initial weights, in about 1.7 s, in every program that
    draws them; rbg's in 0.1 s. The models do not depend on the implementation (one test uses
    the default keys)."""
    return jax.random.key(seed, impl="rbg")


# One optimizer object: train_ensemble caches its program per optimizer (and model, plan), so
# the same object lets a second call reuse the compiled program.
OPT = optax.sgd(0.1, momentum=0.9)


class Case:
    """One framework's model, its initial parameters and one jitted fit of it."""

    def __init__(self, kind, digits):
        (x, y), val = digits
        self.kind, self.data, self.val = kind, (x, y), val
        if kind == "linen":
            self.module = LinenCNN()
            self.model = training.from_linen(self.module, x[:1])
            self.factory_model = self.model
        else:
            # fit, train and the babysitting checks take the constructed model; the ensemble
            # and the search need the factory.
            self.module = NnxCNN(nnx.Rngs(0))
            self.model = training.from_nnx(self.module, x[:1])
            self.factory_model = training.from_nnx(lambda rngs: NnxCNN(rngs), x[:1])
        init = self.model.init if kind == "nnx" else jax.jit(self.model.init)
        self.params, self.state = init(rkey(0))  # nnx: the constructed model's
        model = self.model
        self.fit_kw = dict(key=rkey(1), num_steps=STEPS, batch_size=BATCH)
        self.fitted, self.hist = jax.jit(
            lambda p, s: training.fit(
                model, p, OPT, (x, y), state=s, update_ratios=True, **self.fit_kw
            )
        )(self.params, self.state)


@pytest.fixture(scope="module", params=["linen", "nnx"])
def case(request, digits):
    return Case(request.param, digits)


def _close(a, b, **kw):
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, **kw), a, b)


def _f64(tree):
    return [np.asarray(a, np.float64) for a in jax.tree.leaves(tree)]


# ---------------------------------------------------------------------------------------------
# The adapters against flax's own API
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_norm", ["jaxnorm", "flax"])
def test_linen_apply_is_module_apply_with_rngs_and_mutable(batch_norm, digits):
    (x, _), _ = digits
    x = x[:8]
    bn = jnn.BatchNorm if batch_norm == "jaxnorm" else nn.BatchNorm
    module = LinenCNN(batch_norm=bn)
    model = training.from_linen(module, x[:1])
    assert model.num_classes == 10 and model.flax_model is module
    key = rkey(3)

    @jax.jit
    def both(k):
        params, state = model.init(k)
        ours = (
            model.apply(params, state, x, train=True, key=key),
            model.apply(params, state, x, train=False),
            model.apply(params, state, x, train=True, key=rkey(4))[0],
        )
        variables = {"params": params, **state}
        theirs = (
            module.apply(
                variables,
                x,
                train=True,
                rngs={"dropout": jax.random.fold_in(key, 0)},
                mutable=["batch_stats"],
            ),
            module.apply(variables, x, train=False),
        )
        return params, state, ours, theirs

    params, state, (train_out, eval_out, other), (train_ref, eval_ref) = both(rkey(0))
    assert set(state) == {"batch_stats"}
    assert set(params) == {"Conv_0", "BatchNorm_0", "Dense_0"}
    reference = jax.eval_shape(lambda k: module.init(k, x[:1], train=False), rkey(0))
    assert jax.tree.structure(params) == jax.tree.structure(reference["params"])
    _close(train_out[0], train_ref[0], rtol=1e-6, atol=1e-7)
    _close(train_out[1], dict(train_ref[1]), rtol=1e-6, atol=1e-7)
    _close(eval_out[0], eval_ref, rtol=1e-6, atol=1e-7)
    _close(eval_out[1], state)  # inference leaves the statistics alone
    assert not np.allclose(other, train_out[0])  # the masks follow the key
    with pytest.raises(InvalidRngError, match="dropout"):  # flax: no key, no dropout stream
        model.apply(params, state, x, train=True)


@pytest.mark.parametrize("batch_norm", ["flax", "jaxnorm"])
def test_nnx_apply_is_the_model_in_train_and_eval_mode(batch_norm, digits):
    (x, _), _ = digits
    x = x[:8]
    bn = nnx.BatchNorm if batch_norm == "flax" else jnnx.BatchNorm
    model = training.from_nnx(lambda rngs: NnxCNN(rngs, batch_norm=bn), x[:1])
    params, state = model.init(rkey(0))
    # init(key) is factory(nnx.Rngs(key)): the weights such a model is built with.
    reference = NnxCNN(nnx.Rngs(rkey(0)), batch_norm=bn)
    _close(params, nnx.state(reference, nnx.Param))
    _close(state, nnx.state(reference, nnx.BatchStat))
    key = rkey(3)
    logits, new_state = model.apply(params, state, x, train=True, key=key)
    # flax's own training call: model.train(), its one dropout stream reseeded from the key.
    reference.train()
    nnx.reseed(reference, default=key)  # the stream key fold_in(key, 0), as the adapter sets it
    _close(logits, reference(x), rtol=1e-6, atol=1e-7)
    _close(new_state, nnx.state(reference, nnx.BatchStat), rtol=1e-6, atol=1e-7)
    reference.eval()
    eval_logits, same = model.apply(params, new_state, x, train=False)
    _close(eval_logits, reference(x), rtol=1e-6, atol=1e-7)
    _close(same, new_state)
    assert not np.allclose(model.apply(params, state, x, train=True, key=rkey(4))[0], logits)
    # Raw uint32 keys (jax.random.PRNGKey) are the default implementation's keys.
    typed = model.apply(params, state, x, train=True, key=jax.random.key(3))[0]
    raw = model.apply(params, state, x, train=True, key=jax.random.PRNGKey(3))[0]
    _close(raw, typed)
    with pytest.raises(
        TypeError, match=r"draws random numbers \(dropout\): apply\(\.\.\., train=True\) needs key="
    ):
        model.apply(params, state, x, train=True)


# ---------------------------------------------------------------------------------------------
# Every training entry point
# ---------------------------------------------------------------------------------------------


def test_fit_trains_and_updates_the_running_statistics(case):
    hist = case.hist
    assert int(hist.nan_step) == -1
    loss = np.asarray(hist.loss)
    assert loss[-3:].mean() < 0.7 * loss[0], loss
    before, after = _f64(case.state), _f64(hist.state)
    assert len(before) == 2 and all(
        not np.allclose(a, b) for a, b in zip(before, after, strict=True)
    )
    val = training.evaluate(case.model, case.fitted, case.val, state=hist.state)
    assert float(val["accuracy"]) > 0.4  # 10 classes: chance is 0.1


def test_train_equals_fit_and_update_ratios_are_the_parameter_steps(case):
    seen = [_f64(case.params)]

    def record(params, state):
        seen.append(_f64(params))
        return {}

    params, hist = training.train(
        case.model,
        case.params,
        OPT,
        case.data,
        state=case.state,
        eval_fn=record,
        log_every=1,
        progress=False,
        **case.fit_kw,
    )
    _close(params, case.fitted, rtol=2e-5, atol=2e-6)
    _close(hist.state, case.hist.state, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(hist.loss, case.hist.loss, rtol=2e-5)
    # update ratio of step t: ||p[t+1] - p[t]|| / ||p[t]|| per leaf (NumPy float64).
    for t in (0, STEPS - 1):
        with np.errstate(divide="ignore"):  # a bias at its initial 0 moved: inf, as documented
            want = [
                np.linalg.norm(b - a) / np.linalg.norm(a)
                for a, b in zip(seen[t], seen[t + 1], strict=True)
            ]
        got = [float(r[t]) for r in jax.tree.leaves(hist.update_ratio)]
        np.testing.assert_allclose(got, want, rtol=1e-4)
    # The kernels are judged; the biases and batch norm's scale and bias are listed.
    last = jax.tree.map(lambda r: r[-1], case.hist.update_ratio)
    check = diagnostics.check_update_ratios(last, case.fitted)
    conv, bn, head = ("Conv_0", "BatchNorm_0", "Dense_0") if case.kind == "linen" else NNX_NAMES
    assert set(check.not_judged) == {f"{conv}/bias", f"{bn}/scale", f"{bn}/bias", f"{head}/bias"}
    assert set(check.flagged) <= {f"{conv}/kernel", f"{head}/kernel"}


def test_check_initial_loss_is_log_10(case):
    check = training.check_initial_loss(
        case.model, case.params, case.data, num_classes=10, state=case.state
    )
    assert check.ok, check.message
    assert abs(check.loss - math.log(10)) < 0.05 * math.log(10)


def test_overfit_small_subset(case):
    result = training.overfit_small_subset(
        case.model, case.params, OPT, case.data, key=rkey(2), state=case.state,
        num_steps=40,
    )  # fmt: skip
    assert result.passed, str(result)
    assert result.loss < 0.2 * result.loss_curve[0]


def test_learning_rate_scan(case):
    scan = training.learning_rate_scan(
        case.model,
        case.params,
        case.data,
        key=rkey(2),
        state=case.state,
        learning_rates=[1e-6, 0.1, 1e4],
        num_steps=STEPS,
        batch_size=BATCH,
    )
    assert scan.status == ("too_low", "ok", "too_high"), str(scan)


def test_train_ensemble_members_differ_by_their_keys(case):
    model = case.factory_model
    kw = dict(num_steps=STEPS, batch_size=BATCH)
    keys = jax.random.split(rkey(4), 2)
    params, hist = training.train_ensemble(model, model.init, OPT, case.data, keys, **kw)
    assert hist.loss.shape == (2, STEPS) and not np.any(np.asarray(hist.nan_step) >= 0)
    first = jax.tree.leaves(params)[0]
    assert first.shape[0] == 2 and not np.allclose(first[0], first[1])
    # Identical keys: identical members (the same compiled program, run again).
    same, _ = training.train_ensemble(
        model, model.init, OPT, case.data, jnp.stack([keys[0]] * 2), **kw
    )
    _close(jax.tree.map(lambda a: a[0], same), jax.tree.map(lambda a: a[1], same))
    _close(jax.tree.map(lambda a: a[0], same), jax.tree.map(lambda a: a[0], params), rtol=1e-5)
    probs = training.ensemble_predict(
        lambda ps, x: model.apply(ps[0], ps[1], x, train=False)[0],
        (params, hist.state),
        case.val[0],
    )
    assert float(np.mean(np.argmax(probs, -1) == np.asarray(case.val[1]))) > 0.4


def test_random_search_over_the_learning_rate(case):
    model = case.factory_model
    (x, y), val = case.data, case.val

    def train_fn(hp, key):
        k_init, k_train = jax.random.split(key)
        params, state = model.init(k_init)
        opt = optax.inject_hyperparams(optax.sgd)(learning_rate=hp["lr"], momentum=0.9)
        params, hist = training.fit(
            model, params, opt, (x, y), key=k_train, num_steps=STEPS, batch_size=BATCH, state=state
        )
        metrics = training.evaluate(model, params, val, state=hist.state)
        return {"val_accuracy": metrics["accuracy"], "val_loss": metrics["loss"], "history": hist}

    space = {"lr": training.log_uniform(1e-3, 0.1)}
    result = training.random_search(train_fn, space, 2, rkey(5), border=0.0)
    assert [t.status for t in result.trials] == ["ok", "ok"]
    lrs = [t.params["lr"] for t in result.trials]
    losses = [t.metrics["val_loss"] for t in result.trials]
    assert lrs[0] != lrs[1] and losses[0] != losses[1]
    assert result.best.metrics["val_accuracy"] > 0.2


def test_a_constructed_nnx_model_asks_for_a_factory_where_keys_must_differ(digits):
    (x, y), _ = digits
    module = NnxCNN(nnx.Rngs(0))
    model = training.from_nnx(module, x[:1])
    params, state = model.init(rkey(7))  # the model's own weights, whatever the key
    _close(params, nnx.state(module, nnx.Param))
    _close(state, nnx.state(module, nnx.BatchStat))
    msg = r"constructed NnxCNN, so init\(key\) returns its one set of weights .* Pass a factory"
    keys = jax.random.split(rkey(0), 2)
    with pytest.raises(ValueError, match=msg):
        training.train_ensemble(model, model.init, OPT, (x, y), keys, num_steps=2)

    def train_fn(hp, key):
        model.init(key)
        return {"val_accuracy": hp["lr"]}

    with pytest.raises(ValueError, match=msg):
        training.random_search(train_fn, {"lr": training.uniform(0.0, 1.0)}, 2, rkey(0), border=0.0)


# ---------------------------------------------------------------------------------------------
# Diagnostics on the same models
# ---------------------------------------------------------------------------------------------


def test_activation_statistics_of_the_trained_model(case):
    merged = case.model.merge(case.fitted, case.hist.state)
    x = case.val[0]
    logits = case.model.apply(case.fitted, case.hist.state, x, train=False)[0]
    if case.kind == "linen":
        assert set(merged) == {"params", "batch_stats"}
        acts = diagnostics.capture_activations(case.module, merged, x, train=False)
        names = ["Conv_0", "BatchNorm_0", "Dropout_0", "Dense_0"]
    else:
        merged.eval()
        acts = diagnostics.capture_activations(merged, None, x)
        names = ["conv", "bn", "drop", "head"]
    assert list(acts) == names
    _close(acts[names[-1]], logits, rtol=1e-5, atol=1e-6)  # the last layer's output: the logits
    stats = diagnostics.activation_stats(acts)
    assert list(stats) == names and "mean" in diagnostics.stats_table(stats)
    # Inference mode: dropout passes the pooled relu units unchanged (none negative).
    assert float(stats[names[2]].dead_fraction) < 0.9 and np.min(acts[names[2]]) >= 0


def test_activation_statistics_in_training_mode_see_batch_norm_normalise(case):
    """At initialisation (scale 1, bias 0) batch norm's training output has per-channel mean 0
    and variance 1 over the batch."""
    merged = case.model.merge(case.params, case.state)
    x = case.val[0]
    if case.kind == "linen":
        kw = dict(train=True, rngs={"dropout": rkey(0)})
        acts = diagnostics.capture_activations(case.module, merged, x, **kw)
        bn = acts["BatchNorm_0"]
    else:
        merged.train()
        bn = diagnostics.capture_activations(merged, None, x)["bn"]
    bn = np.asarray(bn, np.float64).reshape(-1, 8)
    np.testing.assert_allclose(bn.mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(bn.var(0), 1.0, rtol=1e-3)
    stats = diagnostics.layer_stats(jnp.asarray(bn, jnp.float32))
    np.testing.assert_allclose(float(stats.std), 1.0, rtol=1e-3)


# ---------------------------------------------------------------------------------------------
# Modes, merging and errors
# ---------------------------------------------------------------------------------------------


class _Deterministic(nn.Module):
    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        return nn.Dense(3)(nn.Dropout(0.5, deterministic=deterministic)(x))


class _IsEval(nn.Module):
    @nn.compact
    def __call__(self, x, is_eval: bool):
        return nn.Dense(3)(nn.Dropout(0.5, deterministic=is_eval)(x))


@pytest.mark.parametrize(
    ("module", "kw"),
    [
        (_Deterministic(), {}),
        (_IsEval(), {"mode_kwargs": lambda train: {"is_eval": not train}}),
    ],
)
def test_linen_mode_arguments(module, kw):
    x = jnp.ones((4, 6))
    model = training.from_linen(module, x, **kw)
    params, state = model.init(jax.random.key(0))
    assert state == {}
    ev = model.apply(params, state, x, train=False)[0]
    tr = model.apply(params, state, x, train=True, key=jax.random.key(1))[0]
    variables = {"params": params}
    name = "deterministic" if isinstance(module, _Deterministic) else "is_eval"
    _close(ev, module.apply(variables, x, **{name: True}))
    rngs = {"dropout": jax.random.fold_in(jax.random.key(1), 0)}
    _close(tr, module.apply(variables, x, rngs=rngs, **{name: False}))
    assert not np.allclose(ev, tr)


def test_merge_puts_trained_weights_back(digits):
    (x, _), _ = digits
    module = NnxCNN(nnx.Rngs(0))
    model = training.from_nnx(lambda rngs: NnxCNN(rngs), x[:1])
    params, state = model.init(rkey(1))
    nnx.update(module, params, state)  # flax's way, in place
    _close(nnx.state(module, nnx.Param), params)
    merged = model.merge(params, state)  # a new model
    assert isinstance(merged, NnxCNN)
    module.eval()
    merged.eval()
    _close(merged(x[:4]), module(x[:4]))
    # A FlaxModel is a Model, and keeps its merge through _replace and copy.
    assert isinstance(model, training.Model) and isinstance(model, training.FlaxModel)
    for other in (model._replace(num_classes=10), copy.copy(model)):
        assert isinstance(other, training.FlaxModel)
        _close(nnx.state(other.merge(params, state), nnx.Param), params)
    init, apply, classes = model
    assert classes == 10 and init is model.init and apply is model.apply


class _Features(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        return nn.Conv(4, (3, 3))(x)  # [N, H, W, 4]: not logits


class _NoMode(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(x)


def test_errors(digits):
    (x, _), _ = digits
    with pytest.raises(TypeError, match=r"module must be a flax\.linen\.Module.*use from_nnx"):
        training.from_linen(NnxCNN(nnx.Rngs(0)), x[:1])
    with pytest.raises(TypeError, match=r"(?s)model must be an nnx\.Module .*use from_linen"):
        training.from_nnx(LinenCNN(), x[:1])
    with pytest.raises(TypeError, match="the factory returned LinenCNN"):
        training.from_nnx(lambda rngs: LinenCNN(), x[:1])
    with pytest.raises(ValueError, match=r"cannot tell how to switch _NoMode.*mode_kwargs="):
        training.from_linen(_NoMode(), jnp.ones((1, 5)))
    ok = training.from_linen(_NoMode(), jnp.ones((1, 5)), mode_kwargs=lambda train: {})
    assert ok.num_classes == 3
    with pytest.raises(TypeError, match=r"mode_kwargs gives \['training'\], but _NoMode"):
        training.from_linen(_NoMode(), jnp.ones((1, 5)), mode_kwargs=lambda t: {"training": t})
    with pytest.raises(TypeError, match="mode_kwargs must be a function"):
        training.from_linen(_NoMode(), jnp.ones((1, 5)), mode_kwargs={"train": True})
    with pytest.raises(ValueError, match=r"logits of shape \[N, C\].*shape \(1, 8, 8, 4\)"):
        training.from_linen(_Features(), x[:1])
    with pytest.raises(ValueError, match="num_classes=5, but the model returns 10 logits"):
        training.from_linen(LinenCNN(), x[:1], num_classes=5)
    with pytest.raises(ValueError, match="leading batch axis"):
        training.from_linen(LinenCNN(), jnp.float32(1.0))
    with pytest.raises(TypeError, match="rng_collections must be a sequence"):
        training.from_linen(LinenCNN(), x[:1], rng_collections="dropout")
    # An error of the model itself on sample_x says where it came from.
    with pytest.raises(Exception) as info:  # flax's own error: 3 channels for a Conv(1, 8)
        training.from_nnx(lambda rngs: NnxCNN(rngs), jnp.ones((1, 8, 8, 3)))
    assert any(
        "from_nnx: raised while running NnxCNN on sample_x" in n for n in info.value.__notes__
    )
    constructed = training.from_nnx(NnxCNN(nnx.Rngs(0)), x[:1])
    with pytest.raises(ValueError, match="Pass a factory"):
        jax.jit(constructed.init)(rkey(0))
