"""jaxnorm.training's ensembles: vmapped members, identical seeds, probability averaging."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxnorm import data as jdata
from jaxnorm import training


@pytest.fixture(scope="module")
def digits_tiny():
    train, val, _ = jdata.digits(seed=0)
    return (train.x[:128], train.y[:128]), (val.x[:64], val.y[:64])


def _close_trees(a, b, **kw):
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, **kw), a, b)


def _member_alone(model, opt, data, **kw):
    """``key -> (params, history)``: one ensemble member trained by itself (compiled once), from
    its key split as train_ensemble splits it."""
    fit = jax.jit(lambda p, k: training.fit(model, p, opt, data, key=k, **kw))

    def run(key):
        k_init, k_train = jax.random.split(key)
        return fit(model.init(k_init)[0], k_train)

    return run


def test_identical_keys_give_one_model_and_vmap_equals_sequential(digits_tiny):
    (xtr, ytr), _ = digits_tiny
    model = training.mlp([64, 16, 10])
    opt = optax.sgd(0.1, momentum=0.9)
    kw = dict(num_steps=12, batch_size=32)
    key = jax.random.key(5)
    same = jnp.stack([key] * 3)
    params, hist = training.train_ensemble(model, model.init, opt, (xtr, ytr), same, **kw)
    k_init, k_train = jax.random.split(key)
    p0, _ = model.init(k_init)
    alone, h_alone = jax.jit(lambda p, k: training.fit(model, p, opt, (xtr, ytr), key=k, **kw))(
        p0, k_train
    )
    for m in range(3):
        _close_trees(jax.tree.map(lambda a, m=m: a[m], params), alone, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(hist.loss[m], h_alone.loss, rtol=1e-5)
    # Different keys: members differ, and each equals its own sequential training.
    keys = jax.random.split(jax.random.key(6), 3)
    params, hist = training.train_ensemble(model, model.init, opt, (xtr, ytr), keys, **kw)
    assert not np.allclose(params[0]["w"][0], params[0]["w"][1])
    p2, _ = _member_alone(model, opt, (xtr, ytr), **kw)(keys[2])
    _close_trees(jax.tree.map(lambda a: a[2], params), p2, rtol=1e-4, atol=1e-5)


def test_shared_data_key_equals_sequential_fits(digits_tiny):
    (xtr, ytr), _ = digits_tiny
    model = training.mlp([64, 16, 10])
    opt = optax.sgd(0.1, momentum=0.9)
    kw = dict(num_steps=12, batch_size=32, data_key=jax.random.key(7))
    keys = jax.random.split(jax.random.key(6), 3)
    params, hist = training.train_ensemble(model, model.init, opt, (xtr, ytr), keys, **kw)
    alone = _member_alone(model, opt, (xtr, ytr), **kw)
    for m in range(3):
        pm, hm = alone(keys[m])
        _close_trees(jax.tree.map(lambda a, m=m: a[m], params), pm, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(hist.loss[m], hm.loss, rtol=1e-5)
    # Without data_key the members' orders differ, and so do their trained weights.
    own, _ = training.train_ensemble(
        model, model.init, opt, (xtr, ytr), keys, num_steps=12, batch_size=32
    )
    assert not np.allclose(own[0]["w"][1], params[0]["w"][1])


# optax's adam and schedules raise an int count to a float power.
@pytest.mark.loose_promotion
def test_ensemble_predict_averages_probabilities(digits_tiny):
    (xtr, ytr), (xva, yva) = digits_tiny
    model = training.mlp([64, 16, 10])
    keys = jax.random.split(jax.random.key(0), 4)
    params, _ = training.train_ensemble(
        model, model.init, optax.adam(1e-2), (xtr, ytr), keys, num_steps=30, batch_size=32
    )
    apply = lambda p, x: model.apply(p, (), x, train=False)[0]
    probs, members = training.ensemble_predict(apply, params, xva, return_members=True)
    assert probs.shape == (64, 10) and members.shape == (4, 64, 10)
    ref = []
    for m in range(4):
        z = np.asarray(apply(jax.tree.map(lambda a, m=m: a[m], params), xva), np.float64)
        e = np.exp(z - z.max(1, keepdims=True))
        ref.append(e / e.sum(1, keepdims=True))
    np.testing.assert_allclose(members, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(probs, np.mean(ref, 0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
    # The ensemble's log-loss is at most the members' mean (Jensen: -log is convex).
    y = np.asarray(yva)
    ens_nll = -np.mean(np.log(np.asarray(probs)[np.arange(64), y]))
    member_nll = np.mean([-np.mean(np.log(r[np.arange(64), y])) for r in ref])
    assert ens_nll <= member_nll + 1e-6


def test_batch_norm_members_and_ema(digits_tiny):
    (xtr, ytr), (xva, _) = digits_tiny
    model = training.mlp([64, 16, 10], batch_norm=True)
    keys = jax.random.split(jax.random.key(1), 2)
    params, hist = training.train_ensemble(
        model, model.init, optax.sgd(0.1), (xtr, ytr), keys, num_steps=5, ema_decay=0.9
    )
    assert hist.state[0].mean.shape == (2, 16)
    assert jax.tree.structure(hist.ema_params) == jax.tree.structure(params)
    apply = lambda ps, x: model.apply(ps[0], ps[1], x, train=False)[0]
    probs = training.ensemble_predict(apply, (params, hist.state), xva)
    assert probs.shape == (64, 10)


def test_errors(digits_tiny):
    (xtr, ytr), _ = digits_tiny
    model = training.mlp([64, 10])
    with pytest.raises(ValueError, match="keys must hold K >= 1 keys"):
        training.train_ensemble(
            model, model.init, optax.sgd(0.1), (xtr, ytr), jax.random.key(0), num_steps=1
        )
    with pytest.raises(ValueError, match="one leading member axis K on every leaf"):
        training.ensemble_predict(
            lambda p, x: x @ p["w"], {"w": jnp.ones((2, 64, 10)), "b": jnp.ones(3)}, xtr
        )


# ---------------------------------------------------------------------------- snapshot ensembles


def test_snapshots_equal_a_hand_written_optax_loop_with_restarts():
    # Full-batch least squares, so the order of minibatches plays no part.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 3)).astype(np.float32)
    y = (x @ np.array([1.0, -2.0, 0.5]) + 0.1 * rng.normal(size=32)).astype(np.float32)
    loss = lambda w, batch, key: jnp.mean((batch[0] @ w - batch[1]) ** 2)
    m, t, lr = 3, 7, 0.2
    snaps, hist = training.snapshot_ensemble(
        loss,
        jnp.zeros(3),
        (x, y),
        key=jax.random.key(0),
        num_snapshots=m,
        steps_per_snapshot=t,
        learning_rate=lr,
    )
    assert snaps.shape == (m, 3) and hist.loss.shape == (m * t,)
    # Reference: optax's SGD with momentum stepped by hand, the rate a cosine from lr to 0 in
    # every cycle of t steps, restarted at lr, the momentum carried over.
    w = np.zeros(3, np.float64)
    velocity = np.zeros(3)
    expected, losses = [], []
    for step in range(m * t):
        eta = 0.5 * lr * (1 + np.cos(np.pi * (step % t) / t))
        r = x.astype(np.float64) @ w - y
        losses.append(np.mean(r**2))
        g = 2 * x.T.astype(np.float64) @ r / len(y)
        velocity = g + 0.9 * velocity  # optax.trace: the momentum of the gradients
        w = w - eta * velocity
        if step % t == t - 1:
            expected.append(w.copy())
    np.testing.assert_allclose(snaps, np.array(expected), rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(hist.loss, losses, rtol=2e-5, atol=1e-6)
    assert int(hist.nan_step) == -1


def test_snapshot_ensemble_of_a_batch_norm_model(digits_tiny):
    (xtr, ytr), (xva, yva) = digits_tiny
    model = training.mlp([64, 32, 10], batch_norm=True)
    params, state = model.init(jax.random.key(0))
    snaps, hist = jax.jit(
        lambda p, s: training.snapshot_ensemble(
            model,
            p,
            (xtr, ytr),
            key=jax.random.key(1),
            num_snapshots=3,
            steps_per_snapshot=40,
            learning_rate=0.2,
            batch_size=32,
            state=s,
        )
    )(params, state)
    assert hist.state[0].mean.shape == (3, 32)
    # The snapshots are different models, each fitted (low loss at the end of its cycle).
    assert not np.allclose(snaps[0]["w"][0], snaps[0]["w"][2])
    loss_at_cycle_end = np.asarray(hist.loss).reshape(3, 40)[:, -5:].mean(1)
    assert np.all(loss_at_cycle_end < 0.5 * np.log(10)), loss_at_cycle_end
    apply = lambda ps, x: model.apply(ps[0], ps[1], x, train=False)[0]
    probs = training.ensemble_predict(apply, (snaps, hist.state), xva)
    assert float(jnp.mean(jnp.argmax(probs, -1) == yva)) > 0.8


def test_snapshot_ensemble_errors(digits_tiny):
    (xtr, ytr), _ = digits_tiny
    model = training.mlp([64, 10])
    params, _ = model.init(jax.random.key(0))
    kw = dict(key=jax.random.key(0), steps_per_snapshot=2, learning_rate=0.1)
    with pytest.raises(ValueError, match="num_snapshots must be at least 1, got 0"):
        training.snapshot_ensemble(model, params, (xtr, ytr), num_snapshots=0, **kw)
    with pytest.raises(ValueError, match="learning_rate must be a positive number, got -1"):
        training.snapshot_ensemble(
            model, params, (xtr, ytr), num_snapshots=2, **{**kw, "learning_rate": -1.0}
        )
    with pytest.raises(TypeError, match="steps_per_snapshot must be an int"):
        training.snapshot_ensemble(
            model, params, (xtr, ytr), num_snapshots=2, **{**kw, "steps_per_snapshot": 2.5}
        )


@pytest.mark.parametrize("widths", [[64, 16, 10], [64, 16, 16, 10]])
def test_params_only_init_fn_for_a_model_without_state(digits_tiny, widths):
    # The documented "member k initialises from init_fn(k_init)" with init_fn returning the
    # params alone: for a model without state it trains exactly as init_fn=model.init does.
    (xtr, ytr), _ = digits_tiny
    model = training.mlp(widths)
    keys = jax.random.split(jax.random.key(2), 2)
    kw = dict(num_steps=4, batch_size=32)
    opt = optax.sgd(0.1)
    only, h_only = training.train_ensemble(
        model, lambda k: model.init(k)[0], opt, (xtr, ytr), keys, **kw
    )
    full, h_full = training.train_ensemble(model, model.init, opt, (xtr, ytr), keys, **kw)
    _close_trees(only, full, rtol=0, atol=0)
    np.testing.assert_array_equal(h_only.loss, h_full.loss)
    # Reference: member 1 trained alone from its own initial params.
    p1, _ = _member_alone(model, opt, (xtr, ytr), **kw)(keys[1])
    _close_trees(jax.tree.map(lambda a: a[1], only), p1, rtol=1e-5, atol=1e-6)


def test_model_init_fn_of_the_wrong_structure_is_a_clear_error(digits_tiny):
    (xtr, ytr), _ = digits_tiny
    keys = jax.random.split(jax.random.key(0), 2)
    bn = training.mlp([64, 16, 10], batch_norm=True)
    msg = r"for a Model, init_fn must return \(params, state\), e\.g\. init_fn=model\.init"
    with pytest.raises(ValueError, match="init_fn returned only the params, but this Model has"):
        training.train_ensemble(
            bn, lambda k: bn.init(k)[0], optax.sgd(0.1), (xtr, ytr), keys, num_steps=1
        )
    with pytest.raises(ValueError, match=msg):
        training.train_ensemble(
            bn, lambda k: bn.init(k)[0], optax.sgd(0.1), (xtr, ytr), keys, num_steps=1
        )
    plain = training.mlp([64, 16, 10])
    other = training.mlp([64, 8, 10])  # another model's parameters: shapes differ
    with pytest.raises(ValueError, match=msg + r".*match neither"):
        training.train_ensemble(plain, other.init, optax.sgd(0.1), (xtr, ytr), keys, num_steps=1)
    with pytest.raises(ValueError, match=msg + r" \(or the params alone"):
        training.train_ensemble(
            plain, lambda k: [plain.init(k)[0]], optax.sgd(0.1), (xtr, ytr), keys, num_steps=1
        )


def _bn_state_with_nan(model, key):
    params, state = model.init(key)
    return params, (state[0]._replace(var=state[0].var.at[0].set(jnp.nan)),)


def test_ensembles_report_a_nan_the_loss_does_not_show():
    # A NaN only in one member's batch-norm running variance: the training-mode loss stays
    # finite, and only that member is reported, with what was non-finite.
    model = training.mlp([4, 6, 3], batch_norm=True)
    x = jax.random.normal(jax.random.key(0), (12, 4))
    data = (x, jnp.arange(12) % 3)
    keys = jax.random.split(jax.random.key(1), 3)
    poisoned = jax.random.split(keys[1])[0]  # member 1's init key, as train_ensemble splits it

    def init_fn(key):
        clean = model.init(key)
        bad = _bn_state_with_nan(model, key)
        same = jnp.all(jax.random.key_data(key) == jax.random.key_data(poisoned))
        return jax.tree.map(lambda a, b: jnp.where(same, b, a), clean, bad)

    _, hist = training.train_ensemble(model, init_fn, optax.sgd(0.1), data, keys, num_steps=3)
    assert np.all(np.isfinite(hist.loss))
    np.testing.assert_array_equal(hist.nan_step, [-1, 0, -1])
    np.testing.assert_array_equal(hist.diverged, [False, True, False])
    assert jax.tree.map(lambda a: a[1], hist).nonfinite_parts == ("model state",)

    params, state = _bn_state_with_nan(model, jax.random.key(2))
    _, snap_hist = training.snapshot_ensemble(
        model, params, data, key=jax.random.key(3), num_snapshots=2, steps_per_snapshot=2,
        learning_rate=0.1, state=state,
    )  # fmt: skip
    assert int(snap_hist.nan_step) == 0 and snap_hist.nonfinite_parts == ("model state",)
