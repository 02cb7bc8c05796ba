"""The multi-core CPU path of random_search and train_ensemble: groups of models run at once."""

import threading

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxnorm import training
from jaxnorm.training import _parallel


class _FakeDevice:
    def __init__(self, platform):
        self.platform = platform


def test_cpu_workers_counts_usable_cores_on_one_cpu_device(monkeypatch):
    monkeypatch.setattr(_parallel.os, "sched_getaffinity", lambda pid: {0, 3, 5}, raising=False)
    assert _parallel.cpu_workers([_FakeDevice("cpu")]) == 3
    assert _parallel.cpu_workers([_FakeDevice("gpu")]) == 1
    assert _parallel.cpu_workers([_FakeDevice("cpu"), _FakeDevice("cpu")]) == 1


def test_at_top_level_only_outside_transformations():
    x = jnp.ones(2)
    assert _parallel.at_top_level()
    seen = []
    jax.jit(lambda v: seen.append(_parallel.at_top_level()) or v)(x)
    jax.vmap(lambda v: seen.append(_parallel.at_top_level()) or v)(x)
    jax.grad(lambda v: seen.append(_parallel.at_top_level()) or v.sum())(x)
    assert seen == [False, False, False]


def _spy_run(monkeypatch, workers):
    """Force ``workers`` cores and record each run's (number of calls, workers)."""
    monkeypatch.setattr(_parallel, "cpu_workers", lambda devices=None: workers)
    real = _parallel.run
    log = []

    def run(program, calls, workers, **static):
        out = real(program, calls, workers, **static)
        log.append((len(calls), workers))
        return out

    monkeypatch.setattr(_parallel, "run", run)
    return log


def test_run_uses_threads_and_keeps_the_order():
    seen = set()
    barrier = threading.Barrier(3, timeout=30)

    def wait(x):
        seen.add(threading.get_ident())
        barrier.wait()  # returns only when three calls are running at once
        return x

    @jax.jit
    def program(x):
        return jax.pure_callback(wait, jax.ShapeDtypeStruct(x.shape, x.dtype), x) * 2

    outs = _parallel.run(program, [(jnp.full(2, float(i)),) for i in range(3)], 3)
    assert [float(o[0]) for o in outs] == [0.0, 2.0, 4.0]
    assert len(seen) == 3


def _train_fn(hp, key):
    x = jax.random.normal(jax.random.key(0), (64, 4))
    y = (x[:, 0] > 0).astype(jnp.int32)
    model = training.mlp([4, 8, 2])
    k_init, k_train = jax.random.split(key)
    params, _ = model.init(k_init)
    opt = optax.inject_hyperparams(optax.sgd)(learning_rate=hp["learning_rate"])
    params, hist = training.fit(
        model, params, opt, (x, y), key=k_train, num_steps=10, batch_size=16
    )
    out = training.evaluate(model, params, (x, y))
    return {"val_loss": out["loss"], "history": hist}


def test_search_in_per_core_groups_equals_one_group(monkeypatch):
    space = {"learning_rate": training.log_uniform(1e-2, 1.0)}
    key = jax.random.key(1)
    log = _spy_run(monkeypatch, 1)
    one = training.random_search(
        _train_fn, space, 7, key, metric="val_loss", mode="min", border=0.0
    )
    assert log == [(1, 1)]
    log = _spy_run(monkeypatch, 3)
    # 7 trials over 3 cores: groups of 3 (the last padded); chunk_size bounds the trials in
    # flight, so 6 of them in groups of 2.
    three = training.random_search(
        _train_fn, space, 7, key, metric="val_loss", mode="min", border=0.0
    )
    bounded = training.random_search(
        _train_fn, space, 7, key, metric="val_loss", mode="min", chunk_size=6, border=0.0
    )
    assert log == [(3, 3), (4, 3)]
    for r in (three, bounded):
        assert [t.params for t in r.trials] == [t.params for t in one.trials]
        np.testing.assert_allclose(
            [t.metrics["val_loss"] for t in r.trials],
            [t.metrics["val_loss"] for t in one.trials],
            rtol=1e-5,
        )


@pytest.mark.parametrize("members", [1, 5])
def test_eager_ensemble_in_groups_equals_the_traced_one(monkeypatch, members):
    model = training.mlp([4, 8, 2])
    x = jax.random.normal(jax.random.key(0), (64, 4))
    data = (x, (x[:, 1] > 0).astype(jnp.int32))
    opt = optax.sgd(0.1, momentum=0.9)
    keys = jax.random.split(jax.random.key(2), members)
    kw = dict(num_steps=8, batch_size=16, ema_decay=0.9)
    log = _spy_run(monkeypatch, 3)
    eager = training.train_ensemble(model, model.init, opt, data, keys, **kw)
    assert log == [(min(members, 3), min(members, 3))]
    traced = jax.jit(lambda k: training.train_ensemble(model, model.init, opt, data, k, **kw))(keys)
    assert log == [(min(members, 3), min(members, 3))]  # under jit: one vmap, no groups
    assert jax.tree.structure(eager) == jax.tree.structure(traced)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(traced), strict=True):
        assert a.shape == b.shape and a.shape[0] == members
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
