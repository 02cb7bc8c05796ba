"""jaxnorm.training's random search: samplers, vmapped trials, divergence, borders, CSV, errors."""

import json
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxnorm import data as jdata
from jaxnorm import training
from tests.helpers import run_on_8_cpu_devices


def _echo(hp, key):
    # Returns its hyperparameters, so the samples can be read back from the trials.
    out = {k: jnp.asarray(v, jnp.float32) for k, v in hp.items() if not isinstance(v, str)}
    out["score"] = jnp.asarray(0.0)
    return out


@pytest.fixture(scope="module")
def digits_tiny():
    train, val, _ = jdata.digits(seed=0)
    return (train.x[:128], train.y[:128]), (val.x[:64], val.y[:64])


def _mlp_train_fn(digits_tiny, num_steps=15, loss="cross_entropy"):
    (xtr, ytr), (xva, yva) = digits_tiny
    model = training.mlp([64, 16, 10])

    def mse(params, batch, key):
        # Squared error on one-hot targets grows without bound at a high learning rate, so a
        # large one reliably overflows to NaN (cross-entropy of a ReLU net only grows linearly).
        x, y = batch
        logits, _ = model.apply(params, (), x, train=True)
        return jnp.mean((logits - jax.nn.one_hot(y, 10)) ** 2)

    def train_fn(hp, key):
        k_init, k_train = jax.random.split(key)
        params, _ = model.init(k_init)
        opt = optax.inject_hyperparams(optax.sgd)(learning_rate=hp["learning_rate"], momentum=0.9)
        params, hist = training.fit(
            model if loss == "cross_entropy" else mse,
            params,
            opt,
            (xtr, ytr),
            key=k_train,
            num_steps=num_steps,
            batch_size=32,
        )
        val = training.evaluate(model, params, (xva, yva))
        return {"val_accuracy": val["accuracy"], "val_loss": val["loss"], "history": hist}

    return train_fn


def _ks_uniform(u):
    """Kolmogorov-Smirnov distance of samples u from U(0, 1)."""
    u = np.sort(u)
    n = len(u)
    return max(np.max(np.arange(1, n + 1) / n - u), np.max(u - np.arange(n) / n))


def test_sampler_distributions():
    n = 2000
    space = {
        "lr": training.log_uniform(1e-5, 1e-1),
        "dropout": training.uniform(0.2, 0.7),
        "width": training.choice(16, 32, 64, 128),
    }
    result = training.random_search(_echo, space, n, jax.random.key(0), metric="score")
    lr = np.array([t.params["lr"] for t in result.trials])
    dropout = np.array([t.params["dropout"] for t in result.trials])
    width = np.array([t.params["width"] for t in result.trials])
    # KS test at about the 1% level: 1.63 / sqrt(n).
    bound = 1.63 / math.sqrt(n)
    assert lr.min() >= 1e-5 and lr.max() <= 1e-1
    assert _ks_uniform((np.log10(lr) + 5) / 4) < bound
    assert _ks_uniform((dropout - 0.2) / 0.5) < bound
    assert set(width.tolist()) == {16, 32, 64, 128}
    counts = np.array([(width == w).sum() for w in (16, 32, 64, 128)])
    assert np.all(np.abs(counts - n / 4) < 4 * math.sqrt(n * 3 / 16))  # binomial, 4 sigma
    # The traced values reach train_fn as the recorded ones.
    np.testing.assert_allclose([t.metrics["lr"] for t in result.trials], lr, rtol=1e-7)
    assert isinstance(result.trials[0].params["width"], int)


def test_documented_key_and_sample_streams():
    # Trial i trains with jax.random.split(jax.random.split(key)[1], num_trials)[i]; a range's
    # values come from the stream fold_in(split(key)[0], crc32(name)), so they do not depend on
    # the other names in the space.
    import zlib

    key = jax.random.key(3)
    seen = {}

    def record(hp, k):
        return {"score": hp["x"], "k": jax.random.uniform(k)}

    result = training.random_search(
        record, {"x": training.uniform(0.0, 1.0)}, 5, key, metric="score", border=0
    )
    for t in result.trials:
        seen[t.index] = t
    sample_key, trial_key = jax.random.split(key)
    keys = jax.random.split(trial_key, 5)
    u = jax.random.uniform(jax.random.fold_in(sample_key, zlib.crc32(b"x") & 0x7FFFFFFF), (5,))
    for i in range(5):
        np.testing.assert_allclose(seen[i].metrics["k"], float(jax.random.uniform(keys[i])))
        np.testing.assert_allclose(seen[i].params["x"], float(u[i]), rtol=1e-6)
    more = training.random_search(
        record,
        {"x": training.uniform(0.0, 1.0), "y": training.choice(1, 2)},
        5,
        key,
        metric="score",
        border=0,
    )
    assert [t.params["x"] for t in more.trials] == [t.params["x"] for t in result.trials]


def test_reproducible_and_chunking_does_not_change_results(digits_tiny):
    train_fn = _mlp_train_fn(digits_tiny)
    space = {"learning_rate": training.log_uniform(1e-3, 1.0)}
    a = training.random_search(train_fn, space, 6, jax.random.key(7), border=0.0)
    b = training.random_search(train_fn, space, 6, jax.random.key(7), chunk_size=4, border=0.0)
    assert [t.params for t in a.trials] == [t.params for t in b.trials]
    for ta, tb in zip(a.trials, b.trials, strict=True):
        assert ta.status == tb.status
        np.testing.assert_allclose(ta.metrics["val_loss"], tb.metrics["val_loss"], rtol=1e-5)
    c = training.random_search(
        _echo, {"learning_rate": space["learning_rate"]}, 6, jax.random.key(8), metric="score"
    )
    assert [t.params for t in a.trials] != [t.params for t in c.trials]
    assert a.best.metrics["val_accuracy"] == max(
        t.metrics["val_accuracy"] for t in a.trials if t.status == "ok"
    )


def test_vmapped_trials_equal_one_configuration_alone(digits_tiny):
    train_fn = _mlp_train_fn(digits_tiny)
    space = {"learning_rate": training.log_uniform(1e-2, 0.5)}
    key = jax.random.key(3)
    result = training.random_search(train_fn, space, 4, key, border=0.0)
    keys = jax.random.split(jax.random.split(key)[1], 4)
    single = jax.jit(train_fn)
    for i in (0, 3):
        t = result.trials[i]
        out = single({"learning_rate": jnp.float32(t.params["learning_rate"])}, keys[i])
        np.testing.assert_allclose(t.metrics["val_loss"], out["val_loss"], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(t.metrics["val_accuracy"], out["val_accuracy"], atol=1e-6)


def test_divergent_trial_is_reported_not_fatal(digits_tiny):
    train_fn = _mlp_train_fn(digits_tiny, loss="mse")
    space = {"learning_rate": training.log_uniform(1e-2, 1e6)}
    with pytest.warns(training.DivergenceWarning, match=r"of 8 trials diverged") as caught:
        result = training.random_search(train_fn, space, 8, jax.random.key(0), border=0.0)
    diverged = result.diverged
    assert diverged and len(diverged) < 8
    (message,) = [str(w.message) for w in caught]
    for t in diverged:
        assert t.status == "diverged" and t.diverged_step is not None and t.diverged_step >= 0
        assert t.params["learning_rate"] > 50.0
        assert f"diverged@{t.diverged_step}" in result.table()
    # The warning names the trials and their steps (it lists the first five).
    for t in diverged[:5]:
        assert f"trial {t.index} (NaN/Inf from step {t.diverged_step}" in message
    assert result.best.status == "ok" and result.best.params["learning_rate"] < 50.0
    assert f"{len(diverged)} of 8 trials diverged" in str(result)


def test_any_nonfinite_metric_marks_the_trial_diverged_without_a_history():
    # NaN logits give argmax 0, a finite chance accuracy: the ranked metric alone would hide the
    # divergence. Here trials with x > 0.5 report such an accuracy (higher than any healthy
    # trial's) with a NaN or infinite val_loss, and no History.
    def train_fn(hp, key):
        x = hp["x"]
        bad = jnp.where(x > 0.75, jnp.inf, jnp.nan)
        return {
            "val_accuracy": jnp.where(x > 0.5, 0.9, 0.5 - x),
            "val_loss": jnp.where(x > 0.5, bad, x),
        }

    with pytest.warns(training.DivergenceWarning, match="trials diverged") as caught:
        result = training.random_search(
            train_fn, {"x": training.uniform(0.0, 1.0)}, 12, jax.random.key(0), border=0
        )
    xs = [t.params["x"] for t in result.trials]
    bad = [i for i, x in enumerate(xs) if x > 0.5]
    assert 0 < len(bad) < 12
    assert [t.index for t in result.diverged] == bad
    assert all(t.status == "diverged" and t.diverged_step is None for t in result.diverged)
    # Ranked after every finite trial, the finite ones by accuracy (best: smallest x).
    ranked = result.ranked()
    good = sorted((i for i in range(12) if i not in bad), key=lambda i: xs[i])
    assert [t.index for t in ranked] == good + bad
    assert result.best.index == good[0]
    assert f"{len(bad)} of 12 trials diverged" in result.table()
    message = str(caught[0].message)
    for i in bad[:5]:
        want = "inf" if xs[i] > 0.75 else "nan"
        assert f"trial {i} (val_loss={want})" in message


def test_all_trials_diverged():
    def train_fn(hp, key):
        return {"val_accuracy": jnp.float32(jnp.nan) * hp["x"]}

    with pytest.warns(training.DivergenceWarning, match=r"3 of 3 trials diverged: trial 0 \("):
        result = training.random_search(
            train_fn, {"x": training.uniform(0, 1)}, 3, jax.random.key(0)
        )
    assert result.best is None and result.best_params is None
    assert all(t.status == "diverged" and t.diverged_step is None for t in result.trials)
    assert "every trial diverged" in result.table()


def test_border_warning():
    def train_fn(hp, key):
        return {"val_accuracy": hp["lr"] + 0.0 * hp["m"]}  # best at the top of lr's range

    space = {"lr": training.log_uniform(1e-4, 1.0), "m": training.uniform(0.0, 1.0)}
    with pytest.warns(training.BorderWarning, match=r"lr=.*high end of its range"):
        result = training.random_search(train_fn, space, 64, jax.random.key(0))
    assert result.at_border.get("lr") == "high"
    assert "near the border" in str(result)

    def centred(hp, key):
        return {"val_accuracy": -((jnp.log10(hp["lr"]) + 2.0) ** 2)}

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = training.random_search(
            centred, {"lr": training.log_uniform(1e-4, 1.0)}, 64, jax.random.key(0)
        )
    assert result.at_border == {}


def test_static_choices_are_grouped_and_csv_round_trip(tmp_path):
    seen = []

    def train_fn(hp, key):
        seen.append(hp["act"])
        assert isinstance(hp["act"], str) and isinstance(hp["width"], jax.Array)
        bonus = {"relu": 1.0, "tanh": 0.5}[hp["act"]]
        width = hp["width"].astype(jnp.float32)
        return {"val_accuracy": bonus - hp["lr"] + 0.0 * width, "extra": hp["lr"] * 2}

    space = {
        "lr": training.log_uniform(1e-3, 1e-1),
        "act": training.choice("relu", "tanh"),
        "width": training.choice(8, 16),
    }
    result = training.random_search(train_fn, space, 10, jax.random.key(1), chunk_size=3)
    assert set(seen) == {"relu", "tanh"}
    assert result.best.params["act"] == "relu"
    for t in result.trials:
        assert t.metrics["val_accuracy"] == pytest.approx(
            {"relu": 1.0, "tanh": 0.5}[t.params["act"]] - t.params["lr"], rel=1e-6
        )
    path = tmp_path / "trials.csv"
    result.to_csv(path)
    back = training.SearchResult.from_csv(path)
    assert len(back.trials) == 10
    for t, u in zip(result.trials, back.trials, strict=True):
        assert (t.index, t.status, t.diverged_step, t.round) == (u.index, u.status, None, 0)
        assert t.params == u.params and t.metrics == u.metrics
    assert back.best.index == result.best.index
    text = path.read_text().splitlines()
    assert text[0] == (
        "trial,round,status,diverged_step,param:lr,param:act,param:width,"
        "metric(max):val_accuracy,metric:extra"
    )


def test_choice_params_are_the_option_objects():
    # sklearn's ParameterSampler reports the option itself; the traced value train_fn gets is its
    # float32 rounding.
    options = (0.1, 0.3, 0.5)
    result = training.random_search(
        lambda hp, key: {"score": hp["c"]},
        {"c": training.choice(*options)},
        12,
        jax.random.key(0),
        metric="score",
    )
    for t in result.trials:
        assert any(t.params["c"] is o for o in options), t.params
        assert t.metrics["score"] == float(np.float32(t.params["c"]))
    assert result.best_params == {"c": 0.5}
    # The index stream is unchanged: the same draws as jax.random.randint on the documented key.
    import zlib

    sample_key = jax.random.split(jax.random.key(0))[0]
    k = jax.random.fold_in(sample_key, zlib.crc32(b"c") & 0x7FFFFFFF)
    idx = np.asarray(jax.random.randint(k, (12,), 0, 3))
    assert [t.params["c"] for t in result.trials] == [options[i] for i in idx]


def test_coarse_to_fine_narrows_a_float_choice():
    def train_fn(hp, key):
        return {"loss": (hp["c"] - 0.3) ** 2 + 0.0 * hp["lr"]}

    space = {"c": training.choice(0.1, 0.3, 0.5), "lr": training.uniform(0.0, 1.0)}
    result = training.coarse_to_fine(
        train_fn,
        space,
        8,
        jax.random.key(0),
        rounds=2,
        top_k=1,
        metric="loss",
        mode="min",
        border=0,
    )
    assert result.spaces[1]["c"] == training.choice(0.3)
    assert all(t.params["c"] == 0.3 for t in result.trials if t.round == 1)
    assert result.best_params["c"] == 0.3


def test_coarse_to_fine_round_0_is_random_search():
    space = {"x": training.uniform(0.0, 1.0), "c": training.choice(1, 2, 3)}
    key = jax.random.key(5)
    plain = training.random_search(_echo, space, 6, key, metric="score", border=0)
    c2f = training.coarse_to_fine(_echo, space, 6, key, rounds=2, metric="score", border=0)
    assert [t.params for t in c2f.trials[:6]] == [t.params for t in plain.trials]
    assert [t.metrics for t in c2f.trials[:6]] == [t.metrics for t in plain.trials]
    assert [t.params for t in c2f.trials[6:]] != [t.params for t in plain.trials]


def test_choice_takes_one_list_or_tuple_as_the_options():
    assert training.choice([1, 2, 3]) == training.choice(1, 2, 3) == ((1, 2, 3), False)
    assert training.choice(("relu", "tanh")).options == ("relu", "tanh")
    assert training.choice((1, 2), (3, 4)).options == ((1, 2), (3, 4))  # two tuple options
    assert training.choice(((1, 2),)).options == ((1, 2),)  # one tuple option
    assert training.choice("relu", "tanh").static  # non-numeric options are always static
    assert not training.choice(1, 2).static and training.choice([1, 2], static=True).static


@pytest.fixture(scope="module")
def width_search(digits_tiny):
    (xtr, ytr), (xva, yva) = digits_tiny
    widths_seen = []

    def train_fn(hp, key):
        widths_seen.append(hp["width"])
        model = training.mlp([64, hp["width"], 10])
        k_init, k_train = jax.random.split(key)
        params, _ = model.init(k_init)
        opt = optax.inject_hyperparams(optax.sgd)(learning_rate=hp["learning_rate"])
        params, _ = training.fit(
            model, params, opt, (xtr, ytr), key=k_train, num_steps=10, batch_size=32
        )
        ev = training.evaluate(model, params, (xva, yva))
        return {"val_accuracy": ev["accuracy"], "val_loss": ev["loss"]}

    space = {
        "learning_rate": training.log_uniform(1e-2, 0.5),
        "width": training.choice(4, 12, static=True),
    }
    key = jax.random.key(2)
    result = training.random_search(train_fn, space, 5, key, chunk_size=2, border=0)
    return train_fn, key, result, widths_seen


def test_static_choice_searches_widths(width_search):
    train_fn, key, result, widths_seen = width_search
    # Python ints reach train_fn: one program per width.
    assert set(widths_seen) == {4, 12} and all(type(w) is int for w in widths_seen)
    assert {t.params["width"] for t in result.trials} == {4, 12}
    # Each trial equals its configuration trained alone (the documented trial key).
    keys = jax.random.split(jax.random.split(key)[1], 5)
    for i in (0, 4):
        t = result.trials[i]
        width = t.params["width"]
        alone = jax.jit(lambda lr, k, w=width: train_fn({"learning_rate": lr, "width": w}, k))
        out = alone(jnp.float32(t.params["learning_rate"]), keys[i])
        np.testing.assert_allclose(t.metrics["val_loss"], out["val_loss"], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(t.metrics["val_accuracy"], out["val_accuracy"], atol=1e-6)


def test_traced_width_or_batch_size_says_to_use_static():
    key = jax.random.key(0)
    model_fn = lambda hp, k: {"val_accuracy": training.mlp([2, hp["w"], 2]).num_classes * 1.0}
    with pytest.raises(TypeError, match=r"mlp: widths must be Python ints.*static=True"):
        training.random_search(model_fn, {"w": training.choice(4, 8)}, 2, key)

    def fit_fn(hp, k):
        loss = lambda w, batch, key: jnp.mean(batch[0] * w)
        w, _ = training.fit(
            loss, 0.0, optax.sgd(0.1), (jnp.ones(8),), key=k, num_steps=1, batch_size=hp["bs"]
        )
        return {"val_accuracy": w}

    with pytest.raises(TypeError, match=r"fit: batch_size must be a Python int.*static=True"):
        training.random_search(fit_fn, {"bs": training.choice(2, 4)}, 2, key)
    result = training.random_search(fit_fn, {"bs": training.choice(2, 4, static=True)}, 4, key)
    for t in result.trials:  # one step of sgd on mean(w * 1): w = -0.1 whatever the batch
        assert t.metrics["val_accuracy"] == pytest.approx(-0.1)


def test_output_structure_errors_come_before_any_trial_runs():
    key = jax.random.key(0)
    space = {"x": training.uniform(0, 1)}
    hist = training.History(jnp.zeros(2), {}, None, jnp.int32(-1), jnp.zeros(0), {}, (), None)
    cases = [
        (
            {"extra": {"a": 1.0}},
            TypeError,
            r"output 'extra' is a dict; train_fn must return a dict "
            r"of scalar numbers, optionally with one History",
        ),
        ({"note": "x"}, TypeError, r"output 'note' must be a scalar number, got str 'x'"),
        ({"note": None}, TypeError, r"output 'note' must be a scalar number, got None;"),
        (
            {"c": jnp.complex64(1)},
            TypeError,
            r"'c' must be a scalar number, got an array of dtype "
            r"complex64",
        ),
        ({"h1": hist, "h2": hist}, ValueError, r"returned 2 Histories \(keys \['h1', 'h2'\]\)"),
    ]
    for extra, error, match in cases:
        with pytest.raises(error, match=match):
            training.random_search(
                lambda hp, k, extra=extra: {"val_accuracy": hp["x"], **extra}, space, 2, key
            )
    with pytest.raises(
        TypeError,
        match=r"output 'val_accuracy', the metric the search ranks by, "
        r"is a History",
    ):
        training.random_search(lambda hp, k: {"val_accuracy": hist}, space, 2, key)
    # With two static groups, the second group's bad output is reported before the first trains.
    ran = []

    def train_fn(hp, k):
        jax.debug.callback(lambda: ran.append(1))
        out = {"val_accuracy": hp["x"]}
        if hp["act"] == "relu":  # the second group: trial 0 draws tanh
            out["note"] = "relu"
        return out

    space2 = {"x": training.uniform(0, 1), "act": training.choice("relu", "tanh")}
    with pytest.raises(TypeError, match="'note' must be a scalar number"):
        training.random_search(train_fn, space2, 8, key)
    assert ran == []


def test_coarse_to_fine_narrows_around_the_best():
    def train_fn(hp, key):
        return {"loss": (jnp.log10(hp["lr"]) + 2.5) ** 2 + (hp["wd"] - 0.3) ** 2}

    space = {"lr": training.log_uniform(1e-6, 1.0), "wd": training.uniform(0.0, 1.0)}
    result = training.coarse_to_fine(
        train_fn, space, 16, jax.random.key(0), rounds=3, top_k=4, metric="loss", mode="min"
    )
    assert len(result.trials) == 48 and [t.round for t in result.trials[::16]] == [0, 1, 2]
    assert len(result.spaces) == 3 and result.space == space
    last = result.spaces[-1]
    assert isinstance(last["lr"], training.LogUniform)
    assert last["lr"].lo > 1e-6 and last["lr"].hi < 1.0 and last["lr"].lo < 10**-2.5 < last["lr"].hi
    assert last["wd"].hi - last["wd"].lo < 1.0
    best_round0 = min(t.metrics["loss"] for t in result.trials if t.round == 0)
    assert result.best.metrics["loss"] <= best_round0
    assert sorted(t.index for t in result.trials) == list(range(48))


def test_errors():
    key = jax.random.key(0)
    space = {"x": training.uniform(0, 1)}
    for lo, hi in ((0.0, 1.0), (-1.0, 1.0)):
        with pytest.raises(ValueError, match="lo must be > 0"):
            training.log_uniform(lo, hi)
    with pytest.raises(ValueError, match=r"needs lo < hi, got lo=0\.1, hi=0\.01"):
        training.log_uniform(0.1, 0.01)
    with pytest.raises(ValueError, match=r"needs lo < hi, got lo=1\.0, hi=1\.0"):
        training.uniform(1.0, 1.0)
    with pytest.raises(ValueError, match="must be finite"):
        training.uniform(0.0, math.inf)
    with pytest.raises(TypeError, match="hi must be a real number"):
        training.uniform(0.0, "1")
    with pytest.raises(ValueError, match=r"choice needs at least one option.*static=True"):
        training.choice()
    with pytest.raises(TypeError, match="static must be True or False"):
        training.choice(1, 2, static="yes")
    # The distribution classes can be built directly: the space check validates them.
    for dist, error, match in [
        (training.LogUniform(-1.0, 1.0), ValueError, r"space\['a'\] = LogUniform.*lo must be > 0"),
        (training.Uniform(1.0, 0.0), ValueError, r"space\['a'\] = Uniform.*needs lo < hi"),
        (training.Uniform(0.0, math.nan), ValueError, "hi must be finite"),
        (training.LogUniform("1", 2.0), TypeError, "lo must be a real number"),
        (training.Choice(()), ValueError, r"space\['a'\] = Choice.*at least one option"),
        (training.Choice(3), TypeError, "options must be a tuple"),
    ]:
        with pytest.raises(error, match=match):
            training.random_search(_echo, {"a": dist}, 2, key, metric="score")
    # Concrete NumPy and JAX scalars are numbers; arrays and traced values are not.
    assert training.log_uniform(jnp.float32(1e-3), np.float64(1.0)) == (
        float(np.float32(1e-3)),
        1.0,
    )
    assert training.uniform(jnp.array(0), np.int64(2)) == (0.0, 2.0)
    with pytest.raises(TypeError, match="lo must be a real number"):
        training.uniform(jnp.zeros(2), 1.0)
    with pytest.raises(TypeError, match="lo must be a concrete number, got a traced value"):
        jax.jit(lambda v: training.uniform(v, 2.0))(1.0)
    for border in (-0.1, 0.5, math.nan):
        with pytest.raises(ValueError, match=r"border must be in \[0, 0\.5\)"):
            training.random_search(_echo, space, 2, key, metric="score", border=border)
    with pytest.raises(TypeError, match="border must be a number"):
        training.coarse_to_fine(_echo, space, 2, key, metric="score", border="0.1")
    for search in (training.random_search, training.coarse_to_fine):
        with pytest.raises(
            TypeError, match=r"key must be a PRNG key such as jax.random.key\(0\), got 0"
        ):
            search(_echo, space, 2, 0, metric="score")
    with pytest.raises(ValueError, match="the search space is empty"):
        training.random_search(_echo, {}, 2, key)
    with pytest.raises(TypeError, match="space must be a dict"):
        training.random_search(_echo, [training.uniform(0, 1)], 2, key)
    with pytest.raises(TypeError, match=r"space\['x'\] must be log_uniform"):
        training.random_search(_echo, {"x": (0, 1)}, 2, key)
    with pytest.raises(ValueError, match="num_trials must be at least 1, got 0"):
        training.random_search(_echo, space, 0, key, metric="score")
    with pytest.raises(TypeError, match="num_trials must be an int"):
        training.random_search(_echo, space, 2.0, key, metric="score")
    with pytest.raises(ValueError, match="mode must be 'max' or 'min'"):
        training.random_search(_echo, space, 2, key, metric="score", mode="best")
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        training.random_search(_echo, space, 2, key, metric="score", chunk_size=0)
    with pytest.raises(TypeError, match="must return a dict of scalar metrics containing 'acc'"):
        training.random_search(lambda hp, k: hp["x"], space, 2, key, metric="acc")
    with pytest.raises(ValueError, match=r"no metric 'val_accuracy'; it returned keys \['acc'\]"):
        training.random_search(lambda hp, k: {"acc": hp["x"]}, space, 2, key)
    with pytest.raises(ValueError, match=r"'curve' must be a scalar per trial, got shape \(3,\)"):
        training.random_search(
            lambda hp, k: {"val_accuracy": hp["x"], "curve": jnp.ones(3)}, space, 2, key
        )
    with pytest.raises(ValueError, match="rounds must be an int >= 1"):
        training.coarse_to_fine(_echo, space, 2, key, rounds=0, metric="score")
    with pytest.raises(ValueError, match="top_k must be an int >= 1"):
        training.coarse_to_fine(_echo, space, 2, key, top_k=0, metric="score")


@pytest.mark.slow
def test_eight_devices_equal_one():
    proc = run_on_8_cpu_devices("_search_multidevice_script.py", timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ALL OK" in proc.stdout, proc.stdout


# -------------------------------------------------------------------------------------------------
# CSV and JSON: exact round trips


def _same(a, b):
    """Same type and value, recursively; floats bit for bit (NaN equal to NaN)."""
    assert type(a) is type(b), (a, b)
    if isinstance(a, float | np.floating):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes() or (np.isnan(a) and np.isnan(b))
    elif isinstance(a, tuple | list):
        assert len(a) == len(b)
        for u, v in zip(a, b, strict=True):
            _same(u, v)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _same(a[k], b[k])
    else:
        assert a == b


def _same_trials(back, result):
    assert len(back.trials) == len(result.trials)
    for t, u in zip(result.trials, back.trials, strict=True):
        assert (t.index, t.round, t.status, t.diverged_step) == (
            u.index,
            u.round,
            u.status,
            u.diverged_step,
        )
        _same(u.params, t.params)
        _same(u.metrics, t.metrics)
    assert (back.metric, back.mode) == (result.metric, result.mode)


# Every kind of value a hyperparameter may take: the float edge cases, ints beyond float64,
# bool, None, strings CSV must quote, tuples, nested containers, NumPy scalars.
VALUES = [
    0.1,
    float("nan"),
    float("inf"),
    float("-inf"),
    5e-324,  # the smallest subnormal
    -0.0,
    1.0,
    2**70 + 1,
    -3,
    True,
    False,
    None,
    "relu",
    'a, "quoted"\nline',
    "",
    (16, 32),
    (),
    ((1, 2.5), [None, "a"], {"k": (1,), 2: float("nan")}),
    [1, 2],
    np.float32(0.1),
    np.float32("nan"),
    np.int64(-7),
    np.True_,
]


def _hand_made_result():
    trials = [
        training.Trial(
            index=i,
            params={"v": v, "lr": 10.0 ** -(i % 5)} if i % 3 else {"v": v},
            metrics={"score": [0.5, float("nan"), 1e-310, -0.0][i % 4], "loss": i / 7},
            status="ok" if i % 4 != 1 else "diverged",
            diverged_step=None if i % 4 != 1 else i,
            round=i % 2,
        )
        for i, v in enumerate(VALUES)
    ]
    space = {
        "lr": training.log_uniform(1e-4, 1.0),
        "v": training.choice(*VALUES),
        "width": training.choice(16, 32, static=True),
    }
    return training.SearchResult(
        trials=trials,
        metric="score",
        mode="min",
        space=space,
        at_border={"lr": "high"},
        spaces=[space, {"lr": training.uniform(0.0, 1.0)}],
    )


def test_csv_and_json_round_trip_every_kind_of_value_exactly(tmp_path):
    result = _hand_made_result()
    result.to_csv(tmp_path / "r.csv")
    _same_trials(training.SearchResult.from_csv(tmp_path / "r.csv", metric="score"), result)
    result.to_json(tmp_path / "r.json")
    back = training.SearchResult.from_json(tmp_path / "r.json")
    _same_trials(back, result)
    for a, b in [(back.space, result.space), *zip(back.spaces, result.spaces, strict=True)]:
        assert list(a) == list(b)
        for name in a:
            assert type(a[name]) is type(b[name])
            _same(tuple(a[name]), tuple(b[name]))
    assert back.at_border == result.at_border
    assert back.best.index == result.best.index


def test_csv_round_trip_keeps_best_params_of_bool_none_and_tuple_choices(tmp_path):
    def train_fn(hp, key):
        bonus = (0.5 if hp["flag"] else 0.0) + (0.25 if hp["opt"] is None else 0.0)
        return {"score": bonus + 0.1 * hp["shape"][0] * hp["x"], "other": hp["x"]}

    space = {
        "x": training.uniform(0.0, 1.0),
        "flag": training.choice(True, False),
        "opt": training.choice(None, "adam"),
        "shape": training.choice((1, 2), (3, 4)),
    }
    result = training.random_search(train_fn, space, 8, jax.random.key(0), metric="score", border=0)
    result.to_csv(tmp_path / "r.csv")
    back = training.SearchResult.from_csv(tmp_path / "r.csv", metric="score", mode="max")
    _same_trials(back, result)
    assert back.best_params == result.best_params
    _same(back.best_params, result.best_params)
    assert type(back.best_params["flag"]) is bool and type(back.best_params["shape"]) is tuple


def test_from_csv_with_a_wrong_metric_name_names_the_file_and_columns(tmp_path):
    result = _hand_made_result()
    path = tmp_path / "r.csv"
    result.to_csv(path)
    for wrong in ("val_accuracy", "v", "lr"):
        with pytest.raises(ValueError, match=r"has no metric column") as e:
            training.SearchResult.from_csv(path, metric=wrong)
        message = str(e.value)
        assert str(path) in message
        assert "hyperparameters ['v', 'lr']" in message and "metrics ['score', 'loss']" in message
    # Another metric of the file: the columns keep their roles (the ranked metric is not read
    # as a hyperparameter), and the direction must be said.
    with pytest.raises(ValueError, match=r"ranked by 'score' \(min\); to rank by 'loss'.*mode="):
        training.SearchResult.from_csv(path, metric="loss")
    back = training.SearchResult.from_csv(path, metric="loss", mode="max")
    assert back.metric == "loss" and back.mode == "max"
    _same([t.params for t in back.trials], [t.params for t in result.trials])
    _same([t.metrics for t in back.trials], [t.metrics for t in result.trials])
    assert back.best.index == len(VALUES) - 1  # the largest loss, i / 7, of an ok trial
    with pytest.raises(ValueError, match="mode must be 'max' or 'min'"):
        training.SearchResult.from_csv(path, mode="up")


def test_csv_and_json_refuse_values_they_cannot_hold_exactly(tmp_path):
    result = training.SearchResult(
        trials=[training.Trial(0, {"act": jax.nn.relu}, {"score": 1.0}, "ok")],
        metric="score",
        mode="max",
    )
    with pytest.raises(TypeError, match=r"trial 0's param 'act' is .* does not read back"):
        result.to_csv(tmp_path / "r.csv")
    with pytest.raises(TypeError, match=r"trial 0's 'act' holds .* JSON cannot hold exactly"):
        result.to_json(tmp_path / "r.json")


def test_from_csv_and_from_json_refuse_files_they_did_not_write(tmp_path):
    path = tmp_path / "r.csv"
    # The header of the earlier to_csv: no roles, so a metric could be read as a hyperparameter.
    path.write_text("trial,round,status,diverged_step,lr,score,extra\n0,0,ok,,0.1,0.5,1.0\n")
    with pytest.raises(ValueError, match=r"r\.csv.*column 'lr' has no role"):
        training.SearchResult.from_csv(path, metric="score")
    _hand_made_result().to_csv(path)
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], lines[1] + ",1"]) + "\n")
    with pytest.raises(ValueError, match=r"r\.csv', line 2: \d+ cells where the header has"):
        training.SearchResult.from_csv(path)
    path.write_text(lines[0] + "\n0,0,ok,,os.system('x'),0.1,0.5,1.0\n")
    with pytest.raises(ValueError, match=r"line 2: the param 'v' cell .* is no literal"):
        training.SearchResult.from_csv(path)
    path.write_text(lines[0] + "\n0,0,ok,,1,0.1,'high',1.0\n")
    with pytest.raises(ValueError, match=r"line 2: the metric 'score' cell .* is not a number"):
        training.SearchResult.from_csv(path)
    json_path = tmp_path / "r.json"
    json_path.write_text("{not json")
    with pytest.raises(ValueError, match=r"r\.json' is not JSON"):
        training.SearchResult.from_json(json_path)
    _hand_made_result().to_json(json_path)
    doc = json.loads(json_path.read_text())
    json_path.write_text(json.dumps({**doc, "format": "jaxnorm.SearchResult/9"}))
    with pytest.raises(ValueError, match=r"written by a newer jaxnorm"):
        training.SearchResult.from_json(json_path)
    doc["trials"][0]["status"] = "fine"
    json_path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"r\.json' is malformed .*status must be"):
        training.SearchResult.from_json(json_path)
