"""jaxnorm.training: the loop (fit/train), the MLP, Polyak averaging and the babysitting checks.

References are independent: NumPy float64 gradient descent on a least-squares problem, NumPy
softmax cross-entropy, and the EMA recursion written out in NumPy.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxnorm import data as jdata
from jaxnorm import training


def _lsq_problem():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 5)).astype(np.float32)
    y = rng.normal(size=(32,)).astype(np.float32)
    return x, y


def _lsq_loss(w, batch, key):
    del key
    x, y = batch
    return jnp.mean((x @ w - y) ** 2)


def _numpy_gd(x, y, lr, steps):
    x, y = x.astype(np.float64), y.astype(np.float64)
    w = np.zeros(x.shape[1])
    ws = []
    for _ in range(steps):
        g = 2.0 / len(y) * x.T @ (x @ w - y)
        w = w - lr * g
        ws.append(w.copy())
    return np.asarray(ws)


@pytest.fixture(scope="module")
def digits_small():
    train, val, _ = jdata.digits(seed=0)
    return (train.x[:256], train.y[:256]), (val.x[:128], val.y[:128])


def test_fit_full_batch_equals_numpy_gradient_descent():
    x, y = _lsq_problem()
    w, hist = training.fit(
        _lsq_loss, jnp.zeros(5), optax.sgd(0.1), (x, y), key=jax.random.key(0), num_steps=30
    )
    ref = _numpy_gd(x, y, 0.1, 30)
    np.testing.assert_allclose(w, ref[-1], rtol=1e-4, atol=1e-5)
    ref_loss = [np.mean((x @ np.r_[np.zeros(5)] - y) ** 2)] + [
        np.mean((x.astype(np.float64) @ wi - y) ** 2) for wi in ref[:-1]
    ]
    np.testing.assert_allclose(hist.loss, ref_loss, rtol=1e-4)
    assert int(hist.nan_step) == -1 and not bool(hist.diverged)


def test_minibatches_cover_each_epoch_once():
    n, bs = 12, 4
    ids = jnp.arange(n, dtype=jnp.float32)

    def loss(w, batch, key):
        (b,) = batch
        return jnp.sum(w * b), {"ids": b}

    _, hist = training.fit(
        loss, jnp.zeros(()), optax.sgd(0.0), (ids,), key=jax.random.key(3), epochs=3, batch_size=bs
    )
    seen = np.asarray(hist.metrics["ids"]).reshape(3, n)
    for epoch in seen:
        assert sorted(epoch.tolist()) == list(range(n))
    assert not np.array_equal(seen[0], seen[1])  # a fresh order each epoch


def _batch_ids(key, data_key=None, n=12, bs=4, epochs=2):
    def loss(w, batch, key):
        (b,) = batch
        return jnp.sum(w * b), {"ids": b}

    ids = jnp.arange(n, dtype=jnp.float32)
    _, hist = training.fit(
        loss,
        jnp.zeros(()),
        optax.sgd(0.0),
        (ids,),
        key=key,
        epochs=epochs,
        batch_size=bs,
        data_key=data_key,
    )
    return np.asarray(hist.metrics["ids"])


def test_data_key_sets_the_minibatch_order_alone():
    k1, k2 = jax.random.key(1), jax.random.key(2)
    shared = jax.random.key(9)
    # The default is the order drawn from key's first split, as before data_key existed.
    np.testing.assert_array_equal(_batch_ids(k1), _batch_ids(k1, jax.random.split(k1)[0]))
    assert not np.array_equal(_batch_ids(k1), _batch_ids(k2))
    np.testing.assert_array_equal(_batch_ids(k1, shared), _batch_ids(k2, shared))
    assert not np.array_equal(_batch_ids(k1, shared), _batch_ids(k1, jax.random.key(10)))


@pytest.mark.parametrize("n", [1, 2, 3, 37, 1078, 5000])
def test_shuffled_indices_are_permutations(n):
    p = np.asarray(training.shuffled_indices(jax.random.key(n), n, 3))
    assert p.shape == (3, n) and p.dtype == np.int32
    for row in p:
        np.testing.assert_array_equal(np.sort(row), np.arange(n))
    assert training.shuffled_indices(jax.random.key(0), n).shape == (n,)
    if n > 3:
        assert not np.array_equal(p[0], p[1])


def test_shuffled_indices_are_uniform():
    from scipy import stats

    # All 24 orders of 4 items equally often (chi-square), over 24000 keys.
    keys = jax.random.split(jax.random.key(0), 24000)
    perms = np.asarray(jax.jit(jax.vmap(lambda k: training.shuffled_indices(k, 4)))(keys))
    codes = perms @ np.array([64, 16, 4, 1])
    _, counts = np.unique(codes, return_counts=True)
    assert counts.size == 24
    assert stats.chisquare(counts).pvalue > 1e-3
    # For n = 1078 (two packed rounds) every item lands in each tenth of the order equally often.
    n, m = 1078, 2000
    perms = np.asarray(training.shuffled_indices(jax.random.key(1), n, m))
    decile = np.argsort(perms, axis=1)[:, :10] * 10 // n  # where items 0..9 went
    for item in range(10):
        counts = np.bincount(decile[:, item], minlength=10)
        assert stats.chisquare(counts).pvalue > 1e-4, counts


def test_keys_must_be_prng_keys():
    loss = lambda w, batch, key: jnp.sum(w * batch[0])
    args = (loss, jnp.zeros(()), optax.sgd(0.1), (jnp.arange(4.0),))
    with pytest.raises(TypeError, match=r"fit: data_key must be a PRNG key .*got 0"):
        training.fit(*args, key=jax.random.key(0), data_key=0, num_steps=2, batch_size=2)
    with pytest.raises(TypeError, match=r"train: key must be a PRNG key .*got 3"):
        training.train(*args, key=3, num_steps=2, batch_size=2, progress=False)
    # Raw uint32 keys (jax.random.PRNGKey) work as they do in jax.random.
    w, _ = training.fit(
        *args, key=jax.random.PRNGKey(0), data_key=jax.random.PRNGKey(1), num_steps=2, batch_size=2
    )
    assert w.shape == ()


def test_shuffled_indices_errors():
    with pytest.raises(TypeError, match=r"n must be an int, got 5\.0"):
        training.shuffled_indices(jax.random.key(0), 5.0)
    with pytest.raises(ValueError, match="num must be at least 1, got 0"):
        training.shuffled_indices(jax.random.key(0), 5, 0)
    assert training.shuffled_indices(jax.random.key(0), 0).shape == (0,)


def test_shuffled_indices_large_n_falls_back(monkeypatch):
    from jaxnorm.training import _loop

    monkeypatch.setattr(_loop, "_MAX_INDEX_BITS", 4)  # n = 37 > 2**4 takes the fallback
    p = np.asarray(training.shuffled_indices(jax.random.key(0), 37, 2))
    for row in p:
        np.testing.assert_array_equal(np.sort(row), np.arange(37))


def test_train_equals_fit_and_logs(digits_small):
    (xtr, ytr), (xva, yva) = digits_small
    model = training.mlp([64, 16, 10])
    params, _ = model.init(jax.random.key(0))
    opt = optax.sgd(0.1, momentum=0.9)
    kw = dict(key=jax.random.key(1), num_steps=20, batch_size=32)
    p_fit, h_fit = training.fit(model, params, opt, (xtr, ytr), **kw)
    evals = []

    def eval_fn(p):
        evals.append(1)
        return training.evaluate(model, p, (xva, yva))

    p_tr, h_tr = training.train(
        model, params, opt, (xtr, ytr), eval_fn=eval_fn, log_every=10, progress=False, **kw
    )
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), p_fit, p_tr)
    np.testing.assert_allclose(h_fit.loss, h_tr.loss, rtol=1e-5)
    assert h_tr.accuracy.shape == (20,)
    assert h_tr.eval_step.tolist() == [10, 20] and len(evals) == 2
    assert set(h_tr.eval_metrics) == {"loss", "accuracy"}
    # update ratios: a tree shaped like params, one value per step
    assert jax.tree.structure(h_tr.update_ratio) == jax.tree.structure(params)
    assert h_tr.update_ratio[0]["w"].shape == (20,)


def test_update_ratio_first_step_by_hand():
    x, y = _lsq_problem()
    w0 = jnp.ones(5)
    _, hist = training.fit(
        _lsq_loss,
        w0,
        optax.sgd(0.01),
        (x, y),
        key=jax.random.key(0),
        num_steps=1,
        update_ratios=True,
    )
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    g = 2.0 / len(y) * x64.T @ (x64 @ np.ones(5) - y64)
    expected = np.linalg.norm(0.01 * g) / np.linalg.norm(np.ones(5))
    np.testing.assert_allclose(hist.update_ratio[0], expected, rtol=1e-4)


def test_train_reports_nan_step_and_stops():
    x, y = _lsq_problem()
    with pytest.warns(training.DivergenceWarning, match=r"at step \d+; training stopped"):
        _, hist = training.train(
            _lsq_loss,
            jnp.zeros(5),
            optax.sgd(1e3),
            (x, y),
            key=jax.random.key(0),
            num_steps=200,
            log_every=5,
            progress=False,
        )
    assert hist.diverged and hist.nan_step > 0
    assert len(hist.loss) == hist.nan_step + 1 < 200
    assert not np.isfinite(hist.loss[-1]) and np.all(np.isfinite(hist.loss[:-1]))
    _, h_fit = training.fit(
        _lsq_loss, jnp.zeros(5), optax.sgd(1e3), (x, y), key=jax.random.key(0), num_steps=200
    )
    assert int(h_fit.nan_step) == hist.nan_step


@pytest.mark.parametrize("log_every", [1, 4, 1000])
def test_train_stopped_on_nan_returns_the_last_finite_steps_params(log_every):
    # sum(w ** 2) with sgd(1e3): w multiplies by -1999 a step, so the loss overflows float32
    # after a few steps. The params returned are those after the last step whose loss was
    # finite: the ones whose loss is history.loss[-1], as a plain optax loop gives them.
    def loss(w, batch, key):
        return jnp.sum(w**2)

    w0, opt = jnp.array([1.0, -0.5]), optax.sgd(1e3)
    with pytest.warns(training.DivergenceWarning, match="training stopped"):
        w, hist = training.train(
            loss,
            w0,
            opt,
            (jnp.zeros(4),),
            key=jax.random.key(0),
            num_steps=50,
            log_every=log_every,
            progress=False,
            ema_decay=0.5,
        )
    assert hist.nan_step == 6 and len(hist.loss) == 7
    ref, state, ema = w0, opt.init(w0), w0
    for _ in range(hist.nan_step):
        updates, state = opt.update(jax.grad(loss)(ref, None, None), state, ref)
        ref = optax.apply_updates(ref, updates)
        ema = 0.5 * ema + 0.5 * ref
    assert np.all(np.isfinite(w))
    np.testing.assert_allclose(w, ref, rtol=1e-6)
    np.testing.assert_allclose(hist.ema_params, ema, rtol=1e-6)
    assert not np.isfinite(float(loss(w, None, None))) and not np.isfinite(hist.loss[-1])


def test_train_progress_bar_stays(monkeypatch):
    import tqdm.auto

    made = []

    class Bar:
        def __init__(self, **kwargs):
            made.append(kwargs)
            self.n = 0

        def update(self, n):
            self.n += n

        def set_postfix(self, **kwargs):
            pass

        def close(self):
            made.append(self.n)

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    x, y = _lsq_problem()
    training.train(
        _lsq_loss,
        jnp.zeros(5),
        optax.sgd(0.01),
        (x, y),
        key=jax.random.key(0),
        num_steps=6,
        log_every=4,
    )
    (kwargs, done) = made
    assert kwargs["total"] == 6 and kwargs.get("leave", True) is True and done == 6


# optax's adam and schedules raise an int count to a float power.
@pytest.mark.loose_promotion
def test_train_progress_bar_and_optax_schedules():
    x, y = _lsq_problem()
    schedule = optax.cosine_decay_schedule(0.1, 20)
    for opt in (
        optax.adam(schedule),
        optax.inject_hyperparams(optax.rmsprop)(learning_rate=1e-2),
        optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.05, momentum=0.9, nesterov=True)),
    ):
        _, hist = training.train(
            _lsq_loss, jnp.zeros(5), opt, (x, y), key=jax.random.key(1), num_steps=20, batch_size=16
        )
        assert hist.loss.shape == (20,) and hist.loss[-5:].mean() < hist.loss[:5].mean()


def test_ema_params_follow_the_numpy_recursion():
    x, y = _lsq_problem()
    decay = 0.8
    _, hist = training.fit(
        _lsq_loss,
        jnp.zeros(5),
        optax.sgd(0.1),
        (x, y),
        key=jax.random.key(0),
        num_steps=10,
        ema_decay=decay,
    )
    ema = np.zeros(5)
    for w in _numpy_gd(x, y, 0.1, 10):
        ema = decay * ema + (1 - decay) * w
    np.testing.assert_allclose(hist.ema_params, ema, rtol=1e-4, atol=1e-6)


def test_polyak_average_transform():
    x, y = _lsq_problem()
    decay = 0.7
    opt = optax.chain(optax.sgd(0.1), training.polyak_average(decay))
    w = jnp.zeros(5)
    state = opt.init(w)
    for _ in range(6):
        g = jax.grad(_lsq_loss)(w, (x, y), None)
        u, state = opt.update(g, state, w)
        w = optax.apply_updates(w, u)
    ema = np.zeros(5)
    for wi in _numpy_gd(x, y, 0.1, 6):
        ema = decay * ema + (1 - decay) * wi
    np.testing.assert_allclose(training.polyak_params(state), ema, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(w, _numpy_gd(x, y, 0.1, 6)[-1], rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="needs the params"):
        opt.update(g, state)
    with pytest.raises(ValueError, match="one PolyakState"):
        training.polyak_params(optax.sgd(0.1).init(w))
    with pytest.raises(ValueError, match=r"polyak_average: decay must be in \[0, 1\)"):
        training.polyak_average(1.0)


def test_classification_loss_matches_numpy():
    model = training.mlp([6, 5, 4])
    params, state = model.init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (9, 6))
    y = jnp.arange(9) % 4
    loss, (_, metrics) = training.classification_loss(model)(params, state, (x, y), None)
    p = [{k: np.asarray(v, np.float64) for k, v in layer.items()} for layer in params]
    h = np.maximum(np.asarray(x, np.float64) @ p[0]["w"] + p[0]["b"], 0)
    z = h @ p[1]["w"] + p[1]["b"]
    logp = z - z.max(1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
    np.testing.assert_allclose(loss, -logp[np.arange(9), np.asarray(y)].mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["accuracy"], np.mean(z.argmax(1) == np.asarray(y)))


def _identity_head_mlp(width, rate):
    """An mlp [D, H, H] whose last layer is the identity: its logits are the dropped units."""
    model = training.mlp([12, width, width], dropout=rate)
    params, state = model.init(jax.random.key(0))
    params[1] = {"w": jnp.eye(width), "b": jnp.zeros(width)}
    x = jax.random.normal(jax.random.key(1), (64, 12))
    p = params[0]
    w, b = np.asarray(p["w"], np.float64), np.asarray(p["b"], np.float64)
    hidden = np.maximum(np.asarray(x, np.float64) @ w + b, 0)
    return model, params, state, x, hidden


@pytest.mark.parametrize("rate", [0.2, 0.5])
def test_mlp_dropout_is_inverted_dropout(rate):
    model, params, state, x, hidden = _identity_head_mlp(256, rate)
    keep = 1.0 - rate
    out = np.asarray(model.apply(params, state, x, train=True, key=jax.random.key(2))[0])
    dropped = out == 0
    # Every unit is 0 or its value scaled by 1 / keep (NumPy float64 forward pass).
    np.testing.assert_allclose(out[~dropped], hidden[~dropped] / keep, rtol=2e-5, atol=1e-6)
    live = hidden > 0
    frac = dropped[live].mean()  # binomial over ~8000 live units: std < 0.006
    assert abs(frac - rate) < 0.03, frac
    # Inference: no dropout, no rescaling, no key needed.
    ev = model.apply(params, state, x, train=False)[0]
    np.testing.assert_allclose(ev, hidden, rtol=2e-5, atol=1e-6)
    # The masks are a function of the key.
    again = model.apply(params, state, x, train=True, key=jax.random.key(2))[0]
    other = model.apply(params, state, x, train=True, key=jax.random.key(3))[0]
    np.testing.assert_array_equal(again, out)
    assert not np.array_equal(np.asarray(other) == 0, dropped)


def test_mlp_dropout_rate_can_be_traced():
    """A searched rate (a traced scalar under vmap) drops its share of units in one program."""
    _, params, state, x, hidden = _identity_head_mlp(256, 0.0)

    def dropped(rate):
        model = training.mlp([12, 256, 256], dropout=rate)
        out = model.apply(params, state, x, train=True, key=jax.random.key(2))[0]
        return jnp.mean((out == 0)[hidden > 0])

    fracs = jax.jit(jax.vmap(dropped))(jnp.array([0.1, 0.3, 0.6]))
    np.testing.assert_allclose(fracs, [0.1, 0.3, 0.6], atol=0.03)


def test_mlp_dropout_errors():
    with pytest.raises(ValueError, match=r"dropout .* must be in \[0, 1\), got 1.0"):
        training.mlp([4, 8, 2], dropout=1.0)
    with pytest.raises(ValueError, match=r"must be in \[0, 1\), got -0.1"):
        training.mlp([4, 8, 2], dropout=-0.1)
    for bad in ("0.5", True, None):
        with pytest.raises(TypeError, match="dropout must be a rate in"):
            training.mlp([4, 8, 2], dropout=bad)
    model = training.mlp([4, 8, 2], dropout=0.5)
    params, state = model.init(jax.random.key(0))
    with pytest.raises(
        TypeError, match=r"has dropout \(rate 0.5\): apply\(..., train=True\) needs"
    ):
        model.apply(params, state, jnp.ones((3, 4)), train=True)
    # Without dropout (rate 0 or no hidden layer) no key is needed.
    plain = training.mlp([4, 8, 2])
    p, s = plain.init(jax.random.key(0))
    plain.apply(p, s, jnp.ones((3, 4)), train=True)


def test_fit_passes_every_step_a_fresh_key_for_dropout():
    """With a learning rate of 0 every full-batch step sees the same params and batch: the loss
    changes from step to step only through the dropout masks, drawn from each step's key."""
    x = jax.random.normal(jax.random.key(0), (32, 6))
    y = jnp.arange(32) % 3
    losses = {}
    for rate in (0.0, 0.5):
        model = training.mlp([6, 32, 3], dropout=rate)
        params, _ = model.init(jax.random.key(1))
        _, hist = training.fit(
            model, params, optax.sgd(0.0), (x, y), key=jax.random.key(2), num_steps=4
        )
        losses[rate] = np.asarray(hist.loss)
    np.testing.assert_array_equal(losses[0.0], losses[0.0][0])
    assert len(set(losses[0.5].tolist())) == 4
    ev = training.evaluate(model, params, (x, y))["loss"]  # inference: no dropout
    np.testing.assert_allclose(ev, losses[0.0][0], rtol=1e-6)


def test_models_whose_apply_takes_no_key_still_train():
    """A Model written before apply had a key keeps working; one with **kwargs receives it."""
    base = training.mlp([5, 3])
    seen = []

    def old_apply(params, state, x, *, train):
        return base.apply(params, state, x, train=train)

    def kw_apply(params, state, x, *, train, **kw):
        seen.append(sorted(kw))
        return base.apply(params, state, x, train=train)

    x = jax.random.normal(jax.random.key(0), (8, 5))
    y = jnp.arange(8) % 3
    params, _ = base.init(jax.random.key(1))
    results = []
    for apply in (old_apply, kw_apply):
        model = training.Model(base.init, apply, 3)
        results.append(
            training.fit(model, params, optax.sgd(0.1), (x, y), key=jax.random.key(2), num_steps=3)
        )
    _close = np.testing.assert_allclose
    jax.tree.map(_close, results[0][0], results[1][0])
    assert seen and all(names == ["key"] for names in seen)


@pytest.mark.parametrize(
    ("init", "std"),
    [
        ("he_normal", math.sqrt(2 / 400)),
        ("xavier_normal", math.sqrt(2 / 800)),
        ("small_normal", 0.01),
    ],
)
def test_mlp_initial_scale(init, std):
    model = training.mlp([400, 400, 10], init=init)
    params, state = model.init(jax.random.key(0))
    assert state == ()
    np.testing.assert_allclose(np.std(np.asarray(params[0]["w"])), std, rtol=0.03)
    assert np.all(np.asarray(params[0]["b"]) == 0)


# optax's adam and schedules raise an int count to a float power.
@pytest.mark.loose_promotion
def test_mlp_batch_norm_trains_and_updates_state(digits_small):
    (xtr, ytr), (xva, yva) = digits_small
    model = training.mlp([64, 32, 32, 10], batch_norm=True)
    params, state = model.init(jax.random.key(0))
    assert len(state) == 2 and "scale" in params[0] and "scale" not in params[-1]
    _, hist = training.train(
        model,
        params,
        optax.adam(1e-2),
        (xtr, ytr),
        key=jax.random.key(1),
        num_steps=30,
        batch_size=64,
        state=state,
        eval_fn=lambda p, s: training.evaluate(model, p, (xva, yva), state=s),
        progress=False,
    )
    assert not np.allclose(hist.state[0].mean, 0)
    assert hist.eval_metrics["accuracy"][-1] > 0.5
    with pytest.raises(ValueError, match="has batch norm: pass the state"):
        training.fit(model, params, optax.sgd(0.1), (xtr, ytr), key=jax.random.key(0), num_steps=1)


def test_check_initial_loss(digits_small):
    (xtr, ytr), _ = digits_small
    model = training.mlp([64, 32, 10], init="small_normal")
    params, _ = model.init(jax.random.key(0))
    check = training.check_initial_loss(model, params, (xtr, ytr), num_classes=10)
    assert check.ok and abs(check.expected - math.log(10)) < 1e-12
    big = jax.tree.map(lambda a: 30.0 * a + 1.0, params)
    bad = training.check_initial_loss(model, big, (xtr, ytr), num_classes=10)
    assert not bad.ok and "too high" in bad.message


# optax's adam and schedules raise an int count to a float power.
@pytest.mark.loose_promotion
def test_overfit_small_subset(digits_small):
    (xtr, ytr), _ = digits_small
    model = training.mlp([64, 50, 10])
    params, _ = model.init(jax.random.key(0))
    result = training.overfit_small_subset(
        model, params, optax.adam(1e-2), (xtr, ytr), key=jax.random.key(1), num_steps=150
    )
    assert result.passed and result.accuracy == 1.0 and result.steps_to_target < 150
    assert result.loss_curve.shape == (150,) and result.loss_curve[-1] < result.loss_curve[0]
    assert "passed" in str(result)
    stuck = training.overfit_small_subset(
        model, params, optax.sgd(0.0), (xtr, ytr), key=jax.random.key(1), num_steps=5
    )
    assert not stuck.passed and "FAILED" in str(stuck)
    with pytest.raises(ValueError, match="reports no accuracy"):
        training.overfit_small_subset(
            _lsq_loss, jnp.zeros(5), optax.sgd(0.1), _lsq_problem(), key=jax.random.key(0)
        )
    with pytest.raises(ValueError, match="fewer than num_examples=20"):
        training.overfit_small_subset(
            model, params, optax.sgd(0.1), (xtr[:5], ytr[:5]), key=jax.random.key(0)
        )


def test_learning_rate_scan_finds_ranges(digits_small):
    (xtr, ytr), _ = digits_small
    model = training.mlp([64, 32, 10])
    params, _ = model.init(jax.random.key(0))
    scan = training.learning_rate_scan(
        model,
        params,
        (xtr, ytr),
        key=jax.random.key(1),
        learning_rates=10.0 ** np.arange(-6, 5),
        num_steps=40,
        batch_size=64,
    )
    assert scan.status[0] == "too_low" and scan.status[-1] == "too_high"
    assert scan.too_low[0] == 1e-6 and scan.too_high[1] == 1e4
    assert scan.too_high[0] > scan.best > scan.too_low[1]
    lo, hi = scan.suggested
    assert scan.too_low[1] < lo <= scan.best <= hi < scan.too_high[0]
    assert "exploding / NaN (too high)" in str(scan)
    with pytest.raises(ValueError, match="positive finite"):
        training.learning_rate_scan(
            model, params, (xtr, ytr), key=jax.random.key(0), learning_rates=[0.1, -1.0]
        )


def test_errors():
    x, y = _lsq_problem()
    key = jax.random.key(0)
    w = jnp.zeros(5)
    opt = optax.sgd(0.1)
    with pytest.raises(ValueError, match="exactly one of num_steps and epochs"):
        training.fit(_lsq_loss, w, opt, (x, y), key=key)
    with pytest.raises(ValueError, match="exactly one of num_steps and epochs"):
        training.fit(_lsq_loss, w, opt, (x, y), key=key, num_steps=1, epochs=1)
    with pytest.raises(ValueError, match="batch_size=64 is larger than the 32 examples"):
        training.fit(_lsq_loss, w, opt, (x, y), key=key, num_steps=1, batch_size=64)
    with pytest.raises(ValueError, match="same leading size N"):
        training.fit(_lsq_loss, w, opt, (x, y[:3]), key=key, num_steps=1)
    with pytest.raises(ValueError, match="data is empty"):
        training.fit(_lsq_loss, w, opt, (), key=key, num_steps=1)
    with pytest.raises(TypeError, match="optax GradientTransformation"):
        training.fit(_lsq_loss, w, 0.1, (x, y), key=key, num_steps=1)
    with pytest.raises(TypeError, match="must be a callable or a Model"):
        training.fit("mse", w, opt, (x, y), key=key, num_steps=1)
    with pytest.raises(ValueError, match="num_steps must be at least 1"):
        training.fit(_lsq_loss, w, opt, (x, y), key=key, num_steps=0)
    with pytest.raises(ValueError, match="loss must be a scalar"):
        training.fit(lambda w, b, k: b[0] @ w, w, opt, (x, y), key=key, num_steps=1)
    with pytest.raises(TypeError, match=r"\(loss, dict of metrics\)"):
        training.fit(lambda w, b, k: (1.0, 2.0, 3.0), w, opt, (x, y), key=key, num_steps=1)
    with pytest.raises(ValueError, match="log_every must be at least 1"):
        training.train(_lsq_loss, w, opt, (x, y), key=key, num_steps=1, log_every=0)
    with pytest.raises(TypeError, match="eval_fn must return a dict"):
        training.train(
            _lsq_loss, w, opt, (x, y), key=key, num_steps=1, eval_fn=lambda p: 1.0, progress=False
        )
    with pytest.raises(ValueError, match=r"ema_decay must be in \[0, 1\)"):
        training.fit(_lsq_loss, w, opt, (x, y), key=key, num_steps=1, ema_decay=1.5)
    with pytest.raises(ValueError, match="at least an input and an output"):
        training.mlp([3])
    with pytest.raises(ValueError, match="every width must be at least 1"):
        training.mlp([3, 0, 2])
    with pytest.raises(TypeError, match="widths must be ints"):
        training.mlp([3, 2.5, 2])
    with pytest.raises(ValueError, match="unknown init 'glorot'"):
        training.mlp([3, 2], init="glorot")
    with pytest.raises(ValueError, match="unknown activation"):
        training.mlp([3, 2], activation="relux")
    model = training.mlp([3, 2])
    params, state = model.init(key)
    with pytest.raises(ValueError, match=r"expects x of shape \[N, 3\]"):
        model.apply(params, state, jnp.ones((2, 4)), train=False)
    with pytest.raises(TypeError, match="labels must be integers"):
        training.evaluate(model, params, (jnp.ones((2, 3)), jnp.ones(2)))
    with pytest.raises(ValueError, match=r"integer labels of shape \[2\]"):
        training.evaluate(model, params, (jnp.ones((2, 3)), jnp.ones((2, 1), jnp.int32)))


# --- NaN anywhere is reported ---------------------------------------------------------------------


def _small_classification(n=16, d=4, classes=3):
    x = jax.random.normal(jax.random.key(10), (n, d))
    return x, jnp.arange(n) % classes


def _with_nan_weight(params):
    params = list(params)
    params[0] = {**params[0], "w": params[0]["w"].at[1, 2].set(jnp.nan)}
    return params


def test_fit_and_train_report_an_mlp_with_one_nan_weight():
    # relu(NaN) was 0, so one NaN weight left the loss finite and no step was reported.
    model = training.mlp([4, 8, 3])
    params, _ = model.init(jax.random.key(0))
    params = _with_nan_weight(params)
    data = _small_classification()
    _, hist = training.fit(model, params, optax.sgd(0.1), data, key=jax.random.key(1), num_steps=3)
    assert bool(hist.diverged) and int(hist.nan_step) == 0
    assert {"loss", "parameters"} <= set(hist.nonfinite_parts)
    with pytest.warns(
        training.DivergenceWarning, match=r"NaN/Inf at step 0; training stopped .*loss = nan"
    ):
        _, h = training.train(
            model, params, optax.sgd(0.1), data, key=jax.random.key(1), num_steps=3,
            progress=False,
        )  # fmt: skip
    assert h.diverged and h.nan_step == 0 and h.nonfinite_parts == hist.nonfinite_parts


def _bn_model_with_nan_statistics():
    model = training.mlp([4, 6, 3], batch_norm=True)
    params, state = model.init(jax.random.key(0))
    state = (state[0]._replace(mean=state[0].mean.at[0].set(jnp.nan)),)
    return model, params, state


def test_a_nan_only_in_the_batch_norm_statistics_is_reported():
    # Training mode normalises with the batch's statistics, so the loss and the gradients stay
    # finite while the running mean carries the NaN into inference.
    model, params, state = _bn_model_with_nan_statistics()
    _, hist = training.fit(
        model, params, optax.sgd(0.1), _small_classification(), key=jax.random.key(1),
        num_steps=3, state=state,
    )  # fmt: skip
    assert np.all(np.isfinite(hist.loss))
    assert int(hist.nan_step) == 0 and hist.nonfinite_parts == ("model state",)
    np.testing.assert_array_equal(hist.nonfinite, [32, 32, 32])
    with pytest.warns(training.DivergenceWarning, match=r"at step 0 .*\(non-finite at that "
                      r"step: model state\)"):  # fmt: skip
        training.train(
            model, params, optax.sgd(0.1), _small_classification(), key=jax.random.key(1),
            num_steps=3, state=state, progress=False, stop_on_nan=False,
        )  # fmt: skip


def _loss_on_first_columns(w, batch, key):
    del key
    x, y = batch
    return jnp.mean((x[:, :2] @ w - y) ** 2), {"abs_w": jnp.sum(jnp.abs(w))}


@pytest.mark.parametrize(
    ("case", "parts"),
    [
        ("data", ("batch",)),
        ("metric", ("metrics",)),
        ("gradient", ("gradients", "parameters")),
        ("optimizer", ("parameters", "optimizer state")),
    ],
)
def test_each_nonfinite_part_is_named(case, parts):
    x = jnp.ones((8, 3))
    y = jnp.zeros(8)
    w = jnp.ones(2)
    loss, opt = _loss_on_first_columns, optax.sgd(0.1)
    if case == "data":  # in a column the loss never reads
        x = x.at[5, 2].set(jnp.inf)
    elif case == "metric":

        def loss(w, batch, key):
            value, _ = _loss_on_first_columns(w, batch, key)
            return value, {"ratio": jnp.float32(0.0) / jnp.float32(0.0)}

    elif case == "gradient":  # sqrt(|w|) at w = 0: finite value, NaN slope
        w = jnp.zeros(2)

        def loss(w, batch, key):
            return jnp.sum(jnp.sqrt(jnp.abs(w)))

    else:  # a NaN learning rate, kept in the optimizer state by inject_hyperparams
        opt = optax.inject_hyperparams(optax.sgd)(learning_rate=jnp.nan)
    _, hist = training.fit(loss, w, opt, (x, y), key=jax.random.key(0), num_steps=2)
    assert int(hist.nan_step) == 0 and bool(hist.diverged)
    assert hist.nonfinite_parts == parts
    if case != "gradient":
        assert np.isfinite(hist.loss[0])


def test_a_finite_run_reports_nothing():
    _, hist = training.fit(
        _loss_on_first_columns, jnp.ones(2), optax.sgd(0.1), (jnp.ones((8, 3)), jnp.zeros(8)),
        key=jax.random.key(0), num_steps=4,
    )  # fmt: skip
    assert int(hist.nan_step) == -1 and hist.nonfinite_parts == ()
    np.testing.assert_array_equal(hist.nonfinite, np.zeros(4))


def test_nonfinite_parts_of_stacked_histories_need_one_run():
    model, params, state = _bn_model_with_nan_statistics()

    def run(lr):
        return training.fit(
            model, params, optax.sgd(lr), _small_classification(), key=jax.random.key(1),
            num_steps=2, state=state,
        )[1]  # fmt: skip

    hist = jax.vmap(run)(jnp.array([0.1, 0.2]))
    np.testing.assert_array_equal(hist.nan_step, [0, 0])
    with pytest.raises(ValueError, match="take run k first"):
        _ = hist.nonfinite_parts
    assert jax.tree.map(lambda a: a[1], hist).nonfinite_parts == ("model state",)


def test_babysitting_checks_report_nan():
    model = training.mlp([4, 8, 3])
    params, _ = model.init(jax.random.key(0))
    data = _small_classification(n=20)
    with pytest.warns(training.DivergenceWarning, match="NaN/Inf at step 0 .*the check fails"):
        result = training.overfit_small_subset(
            model, _with_nan_weight(params), optax.sgd(0.1), data, key=jax.random.key(1),
            num_steps=5,
        )  # fmt: skip
    assert not result.passed and result.nan_step == 0 and "loss" in result.nonfinite
    assert "FAILED: NaN/Inf at step 0" in str(result)
    with pytest.warns(training.DivergenceWarning, match="even the smallest rate"):
        scan = training.learning_rate_scan(
            model, _with_nan_weight(params), data, key=jax.random.key(2),
            learning_rates=[1e-3, 1e-1], num_steps=3,
        )  # fmt: skip
    assert scan.status == ("too_high", "too_high")
    np.testing.assert_array_equal(scan.nan_step, [0, 0])
    # A NaN in the running statistics leaves the training-mode loss finite, near log(3).
    bn_model, bn_params, bn_state = _bn_model_with_nan_statistics()
    check = training.check_initial_loss(bn_model, bn_params, data, num_classes=3, state=bn_state)
    assert math.isfinite(check.loss) and not check.ok
    assert "model state hold NaN or Inf" in check.message
    clean = training.check_initial_loss(bn_model, bn_params, data, num_classes=3, rtol=0.5,
                                        state=bn_model.init(jax.random.key(0))[1])  # fmt: skip
    assert clean.ok and abs(clean.loss - check.loss) < 1e-6


def test_random_search_marks_a_run_with_nan_statistics_diverged():
    model, params, state = _bn_model_with_nan_statistics()
    clean = model.init(jax.random.key(0))[1]

    def train_fn(hp, key):
        s = jax.tree.map(lambda a, b: jnp.where(hp["x"] > 0.5, a, b), state, clean)
        _, hist = training.fit(
            model, params, optax.sgd(0.1), _small_classification(), key=key, num_steps=2,
            state=s,
        )  # fmt: skip
        return {"score": hp["x"], "history": hist}

    with pytest.warns(training.DivergenceWarning, match="NaN/Inf from step 0"):
        result = training.random_search(
            train_fn, {"x": training.uniform(0.0, 1.0)}, 6, jax.random.key(0), metric="score",
            border=0.0,
        )  # fmt: skip
    for t in result.trials:
        assert (t.status == "diverged") == (t.params["x"] > 0.5), t
    assert 0 < len(result.diverged) < 6


# --- labels outside [0, C) ------------------------------------------------------------------------


def test_labels_out_of_range_raise_when_concrete():
    model = training.mlp([4, 3])
    params, state = model.init(jax.random.key(0))
    x = jnp.ones((5, 4))
    y = jnp.array([0, 2, -1, 3, 1])
    loss_fn = training.classification_loss(model)
    msg = (
        r"labels must be class indices in \[0, 3\) .* 2 of 5 labels .*values -1, 3; "
        r"the first at index 2"
    )
    with pytest.raises(ValueError, match=f"classification_loss: {msg}"):
        loss_fn(params, state, (x, y), None)
    with pytest.raises(ValueError, match=f"evaluate: {msg}"):
        training.evaluate(model, params, (x, y))
    # check_initial_loss compiles the loss, where labels are traced: it reads them first.
    with pytest.raises(ValueError, match=f"check_initial_loss: {msg}"):
        training.check_initial_loss(model, params, (x, y), num_classes=3)
    for run in (training.fit, training.train):
        with pytest.raises(ValueError, match=f"{run.__name__}: {msg}"):
            run(model, params, optax.sgd(0.1), (x, np.asarray(y)), key=jax.random.key(0),
                num_steps=1)  # fmt: skip


@pytest.mark.parametrize("bad_label", [-1, 3, 100])
def test_traced_labels_out_of_range_make_the_loss_nan(bad_label):
    # optax reads label -1 as the last class: a finite loss from a wrong label.
    model = training.mlp([4, 3])
    params, state = model.init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (4, 4))
    y = jnp.array([0, 1, 2, 0])
    loss_fn = jax.jit(training.classification_loss(model))
    assert np.isfinite(loss_fn(params, state, (x, y), None)[0])
    bad = y.at[1].set(bad_label)
    assert np.isnan(loss_fn(params, state, (x, bad), None)[0])
    assert np.isnan(jax.jit(lambda y: training.evaluate(model, params, (x, y)))(bad)["loss"])
    hist = jax.jit(
        lambda y: training.fit(model, params, optax.sgd(0.1), (x, y), key=jax.random.key(0),
                               num_steps=2)[1]
    )(bad)  # fmt: skip
    assert int(hist.nan_step) == 0 and "loss" in hist.nonfinite_parts


def test_learning_rate_scan_prints_a_range_of_one_rate_as_that_rate():
    # A range holding a single learning rate read "[0.1, 0.1]" (the lab's notebook 06 worked
    # around it).
    from jaxnorm.training._babysit import LearningRateScan

    scan = LearningRateScan(
        learning_rates=np.array([1e-3, 0.1, 10.0]),
        loss_ratio=np.array([1.0, 0.2, np.nan]),
        status=("too_low", "ok", "too_high"),
        too_low=(1e-3, 1e-3),
        too_high=(10.0, 10.0),
        suggested=(0.1, 0.1),
        best=0.1,
        losses=np.ones((3, 2)),
        nan_step=np.array([-1, -1, 1]),
    )
    text = str(scan)
    assert "suggested range: 0.1" in text and "[0.1, 0.1]" not in text
    assert "too low): 0.001;" in text and "too high): 10;" in text
