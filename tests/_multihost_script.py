"""Run by tests/test_multihost.py: every entry point on a mesh of 4 CPU devices.

Usage: ``python _multihost_script.py OUT PROCESS_ID NUM_PROCESSES PORT``. With NUM_PROCESSES=2
(2 host devices each) the processes join with ``jax.distributed`` over gloo; with 1, one process
has the 4 devices. Each process loads only its own rows of the data
(``jax.make_array_from_process_local_data``), runs the preprocessing fits and ``fit_stream``,
batch norm with ``axis_name``, a sharded train step of the linen and nnx modules,
``train_ensemble``, ``random_search`` and ``coarse_to_fine``, and writes what it got back to
``OUT`` (an npz) for the test to compare across the runs.
"""

import functools
import sys
import warnings


def main():
    out, pid, nproc, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    import jax

    if nproc > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=f"127.0.0.1:{port}",
            num_processes=nproc,
            process_id=pid,
            initialization_timeout=60,
        )
    import flax.linen as linen
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import jaxnorm as jn
    from jaxnorm import preprocessing as pp
    from jaxnorm import training

    assert jax.process_count() == nproc and jax.device_count() == 4, jax.devices()
    mesh = jax.make_mesh((4,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    rows, replicated = NamedSharding(mesh, P("d")), NamedSharding(mesh, P())
    results = {}

    def host(tree):
        # Every process gets the whole of each result.
        if all(a.is_fully_addressable for a in jax.tree.leaves(tree)):
            return jax.tree.map(np.asarray, tree)
        return multihost_utils.process_allgather(tree, tiled=True)

    def save(name, tree):
        for path, leaf in jax.tree_util.tree_flatten_with_path(host(tree))[0]:
            results[name + jax.tree_util.keystr(path)] = np.asarray(leaf)

    def load(a):
        # The global array's rows in order, this process's share only.
        n = len(a) // nproc
        return jax.make_array_from_process_local_data(rows, a[pid * n : (pid + 1) * n])

    rng = np.random.default_rng(0)
    x = (3.0 + rng.normal(size=(64, 6)) @ rng.normal(size=(6, 6))).astype(np.float32)
    y = (np.arange(64) % 3).astype(np.int32)
    mask = rng.random(64) < 0.8  # padding rows of an uneven last batch
    xg, yg, mg = load(x), load(y), load(mask)
    np.testing.assert_array_equal(host(xg), x)  # the rows are laid out as in one process

    # Preprocessing: moments, every transform's fit and apply, fit_stream.
    save("moments", pp.moments(xg, full_covariance=True, mask=mg))
    for name in ("zero_center", "normalize", "pca_whiten", "zca_whiten"):
        t = getattr(pp, name)()
        state = t.fit(xg)
        save(name, state)
        save(name + "_apply", t.apply(state, xg))
    stream = [load(x[i : i + 16 * nproc]) for i in range(0, 64, 16 * nproc)]
    save("fit_stream", pp.fit_stream(pp.zca_whiten(), stream, progress=False))

    # Batch norm with axis_name: each device normalises its rows with the statistics of all.
    bn_state = jn.batchnorm.init_state(6)
    scale, bias = jnp.linspace(0.5, 1.5, 6), jnp.linspace(-1.0, 1.0, 6)

    def bn_loss(x, m, scale, bias, axis_name):
        y, new = jn.batchnorm.batch_norm(
            x, scale, bias, bn_state, train=True, axis_name=axis_name, mask=m
        )
        return jnp.sum(jnp.where(m[:, None], y**3 * jnp.arange(6.0), 0.0)), (y, new)

    def bn_step(x, m, scale, bias, axis_name=None):
        grad = jax.value_and_grad(bn_loss, argnums=(0, 2, 3), has_aux=True)
        (loss, (y, new)), grads = grad(x, m, scale, bias, axis_name)
        if axis_name is not None:  # each device's loss is its rows' share
            loss = jax.lax.psum(loss, axis_name)
        return loss, y, new, grads

    # With the vma check, the gradients of the replicated scale and bias are summed over devices.
    bn = jax.jit(
        jax.shard_map(
            functools.partial(bn_step, axis_name="d"),
            mesh=mesh,
            in_specs=(P("d"), P("d"), P(), P()),
            out_specs=(P(), P("d"), P(), (P("d"), P(), P())),
        )
    )
    save("batch_norm", bn(xg, mg, scale, bias))
    save("batch_norm_full_batch", jax.jit(bn_step)(x, mask, scale, bias))

    # The linen and nnx modules in a sharded train step (data over the mesh, params replicated).
    class Linen(linen.Module):
        @linen.compact
        def __call__(self, x, train):
            x = jn.nn.BatchNorm(use_running_average=not train)(linen.Dense(8)(x))
            return linen.Dense(3)(jn.relu(x))

    lin = Linen()
    variables = lin.init(jax.random.key(0), x, train=False)
    variables = jax.device_put(jax.tree.map(np.asarray, variables), replicated)
    opt = optax.sgd(0.1)

    @jax.jit
    def linen_step(variables, opt_state, x, y):
        def loss(params):
            logits, upd = lin.apply(
                {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
            )
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd

        (lv, upd), g = jax.value_and_grad(loss, has_aux=True)(variables["params"])
        u, opt_state = opt.update(g, opt_state)
        return {"params": optax.apply_updates(variables["params"], u), **upd}, opt_state, lv

    opt_state = opt.init(variables["params"])
    for _ in range(3):
        variables, opt_state, lv = linen_step(variables, opt_state, xg, yg)
    save("linen", (variables, lv))

    class Nnx(nnx.Module):
        def __init__(self, rngs):
            self.dense1 = nnx.Linear(6, 8, rngs=rngs)
            self.bn = jn.nnx.BatchNorm(8, rngs=rngs)
            self.dense2 = nnx.Linear(8, 3, rngs=rngs)

        def __call__(self, x):
            return self.dense2(jn.relu(self.bn(self.dense1(x))))

    graphdef, nstate = nnx.split(Nnx(nnx.Rngs(0)))
    nstate = jax.device_put(jax.tree.map(np.asarray, nstate), replicated)

    @jax.jit
    def nnx_step(nstate, x, y):
        def loss(nstate):
            model = nnx.merge(graphdef, nstate)
            logits = model(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), nnx.state(
                model
            )

        (lv, new), g = jax.value_and_grad(loss, has_aux=True)(nstate)
        new = jax.tree.map(
            lambda a, b, gb: a - 0.1 * gb if gb.dtype == a.dtype else a, new, nstate, g
        )
        return new, lv

    for _ in range(3):
        nstate, lv = nnx_step(nstate, xg, yg)
    save("nnx", (nstate, lv))

    # train_ensemble over the sharded data, and the searches.
    model = training.mlp([6, 8, 3], batch_norm=True)
    keys = jax.random.split(jax.random.key(1), 4)
    save("ensemble", training.train_ensemble(model, model.init, opt, (xg, yg), keys, num_steps=4))

    # The searches' train_fn closes over the global training rows and over validation rows that
    # every process loaded whole (a local array).
    xv = jnp.asarray(x[:16])

    def train_fn(hp, key):
        params, state = model.init(key)
        o = optax.inject_hyperparams(optax.sgd)(learning_rate=hp["lr"])
        params, hist = training.fit(model, params, o, (xg, yg), key=key, num_steps=4, state=state)
        logits, _ = model.apply(params, hist.state, xv, train=False)
        return {"loss": hist.loss[-1], "val_logits": jnp.mean(logits**2), "history": hist}

    space = {"lr": training.log_uniform(1e-3, 1e3)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", training.SearchWarning)
        warnings.simplefilter("ignore", training.DivergenceWarning)
        for name, r in (
            (
                "search",
                training.random_search(
                    train_fn, space, 6, jax.random.key(2), metric="loss", mode="min"
                ),
            ),
            (
                "coarse_to_fine",
                training.coarse_to_fine(
                    train_fn,
                    space,
                    4,
                    jax.random.key(3),
                    rounds=2,
                    top_k=2,
                    metric="loss",
                    mode="min",
                ),
            ),
        ):
            results[name + "_params"] = np.array([t.params["lr"] for t in r.trials])
            results[name + "_loss"] = np.array([t.metrics["loss"] for t in r.trials])
            results[name + "_status"] = np.array([t.status for t in r.trials])
            results[name + "_val"] = np.array([t.metrics["val_logits"] for t in r.trials])
    np.savez(out, **results)
    print("OK", pid, flush=True)


if __name__ == "__main__":
    main()
