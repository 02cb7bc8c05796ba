"""Run by tests/test_search.py with 8 host devices: a sharded search equals a single-device one.

Prints "ALL OK" when every check passed; any mismatch raises.
"""

import warnings

import numpy as np


def main():
    import jax
    import optax

    from jaxnorm import data as jdata
    from jaxnorm import training

    assert jax.device_count() == 8, jax.devices()
    train, val, _ = jdata.digits(seed=0)
    xtr, ytr, xva, yva = train.x[:128], train.y[:128], val.x[:64], val.y[:64]
    model = training.mlp([64, 16, 10])

    def mse(params, batch, key):
        # Squared error overflows to NaN at a high learning rate: some trials diverge.
        x, y = batch
        logits, _ = model.apply(params, (), x, train=True)
        return jax.numpy.mean((logits - jax.nn.one_hot(y, 10)) ** 2)

    traces = []

    def train_fn(hp, key):
        traces.append(1)
        k_init, k_train = jax.random.split(key)
        params, _ = model.init(k_init)
        opt = optax.inject_hyperparams(optax.sgd)(learning_rate=hp["learning_rate"], momentum=0.9)
        params, hist = training.fit(
            mse, params, opt, (xtr, ytr), key=k_train, num_steps=15, batch_size=32
        )
        out = training.evaluate(model, params, (xva, yva))
        return {"val_accuracy": out["accuracy"], "val_loss": out["loss"], "history": hist}

    space = {"learning_rate": training.log_uniform(1e-2, 1e8), "width": training.choice(1, 2)}
    key = jax.random.key(11)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", training.DivergenceWarning)  # trials diverge on purpose
        one = training.random_search(train_fn, space, 12, key, devices=jax.devices()[:1], border=0)
    # 12 trials over 8 devices: chunks of 8 (5 rounded up), the last one padded.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", training.DivergenceWarning)
        many = training.random_search(train_fn, space, 12, key, chunk_size=5, border=0)
    # One trace a search: checking the output's structure first (eval_shape) does not trace
    # the sharded program again.
    assert len(traces) == 2, len(traces)
    assert any(t.status == "diverged" for t in one.trials), one.table()
    for a, b in zip(one.trials, many.trials, strict=True):
        assert a.params == b.params, (a, b)
        assert (a.status, a.diverged_step) == (b.status, b.diverged_step), (a, b)
        if a.status == "ok":
            np.testing.assert_allclose(a.metrics["val_loss"], b.metrics["val_loss"], rtol=1e-4)
            np.testing.assert_allclose(a.metrics["val_accuracy"], b.metrics["val_accuracy"])
    assert one.best.index == many.best.index
    print("ALL OK")


if __name__ == "__main__":
    main()
