"""Training: many models in one vmapped program against the same code run model by model.

- search: 64 trials of an MLP on scikit-learn's digits (per-trial learning rate and momentum
  through ``optax.inject_hyperparams``, per-trial init and minibatch keys) as the one
  ``jax.jit(jax.vmap(train_fn))`` program that :func:`jaxnorm.training.random_search` runs (with its
  CPU compiler options), against
  64 calls of ``jax.jit(train_fn)`` (compiled once) in a Python loop. Steady state (compiled) and
  end to end (``random_search`` itself, compilation included, against the loop with its one
  compilation).
- ensemble: 8 members with :func:`jaxnorm.training.train_ensemble` against 8 sequential
  :func:`jaxnorm.training.fit` calls (jitted once).
- both timed twice: each trial (member) with its own minibatch order, and every one with the
  same ``data_key`` (common random numbers; the minibatch is then shared under ``vmap``).
- memory: the peak memory of one vmapped chunk from XLA's ``memory_analysis()`` of the compiled
  program (arguments + outputs + temporaries), and the device's ``memory_stats()`` peak where the
  backend reports one (GPU/TPU).

The anchor is the sequential run; ``x anchor`` below 1 means the vmapped program is faster.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import optax

from benchmarks import harness
from jaxnorm import data as jdata
from jaxnorm import training
from jaxnorm.training import _parallel

# Per size, the MLPs timed: a lecture-sized one whose steps are dominated by per-step overhead
# on CPU, and a wider one whose steps are dominated by the matmuls.
CONFIG = {
    "small": [
        {"trials": 64, "members": 8, "widths": [64, 32, 10], "steps": 100, "batch": 32},
        {"trials": 64, "members": 8, "widths": [64, 64, 10], "steps": 100, "batch": 64},
    ],
    "large": [
        {"trials": 64, "members": 8, "widths": [64, 32, 10], "steps": 500, "batch": 32},
        {"trials": 64, "members": 8, "widths": [64, 256, 256, 10], "steps": 500, "batch": 128},
    ],
    # benchmarks.device: an accelerator (the lecture-sized MLP first: its 64-trial search is the
    # GPU target), and its CPU dry run.
    "gpu": [
        {"trials": 64, "members": 8, "widths": [64, 32, 10], "steps": 100, "batch": 32},
        {"trials": 64, "members": 8, "widths": [64, 256, 256, 10], "steps": 100, "batch": 128},
    ],
    # The dry run times one minibatch order ("orders"): the other is the same code on other keys.
    "tiny": [
        {
            "trials": 8,
            "members": 2,
            "widths": [64, 8, 10],
            "steps": 3,
            "batch": 8,
            "orders": ["own"],
        }
    ],
}


def _orders(cfg):
    """Which minibatch orders to time: "own" (each trial its own) and "shared" (one data_key)."""
    return cfg.get("orders", ("own", "shared"))


def _problem(cfg, data_key=None):
    train, val, _ = jdata.digits(seed=0)
    model = training.mlp(cfg["widths"])

    def train_fn(hp, key):
        k_init, k_train = jax.random.split(key)
        params, _ = model.init(k_init)
        opt = optax.inject_hyperparams(optax.sgd)(
            learning_rate=hp["learning_rate"], momentum=hp["momentum"]
        )
        params, hist = training.fit(
            model,
            params,
            opt,
            tuple(train),
            key=k_train,
            num_steps=cfg["steps"],
            batch_size=cfg["batch"],
            data_key=data_key,
        )
        out = training.evaluate(model, params, tuple(val))
        return {"val_accuracy": out["accuracy"], "val_loss": out["loss"], "history": hist}

    space = {
        "learning_rate": training.log_uniform(1e-3, 1.0),
        "momentum": training.uniform(0.5, 0.95),
    }
    return model, train, train_fn, space


def _search_options():
    from jaxnorm.training import _search

    on_cpu = jax.default_backend() == "cpu"
    return dict(_search._CPU_COMPILER_OPTIONS) if on_cpu else None


def _mb(n):
    return f"{n / 2**20:.1f} MiB"


def _search_rows(cfg):
    _, _, train_fn, space = _problem(cfg)
    # The same train_fn with one data_key for every trial (common random numbers).
    shared_fn = _problem(cfg, data_key=jax.random.key(4))[2]
    n = cfg["trials"]
    key = jax.random.key(0)
    # random_search's own trials (the first call compiles), and the keys it documents, so the
    # loop trains the same configurations.
    first = training.random_search(train_fn, space, n, key, border=0.0)
    hp = {name: jnp.asarray([t.params[name] for t in first.trials], jnp.float32) for name in space}
    keys = jax.random.split(jax.random.split(key)[1], n)
    fns = {}
    for name, fn in [(o, {"own": train_fn, "shared": shared_fn}[o]) for o in _orders(cfg)]:
        single = jax.jit(fn)
        fns[f"search {name}"] = lambda hp, keys, fn=fn: training.random_search(
            fn, space, n, key, border=0.0
        )
        # One call of the vmapped program over every trial, compiled as random_search compiles
        # it (on CPU, at XLA backend optimisation level 1).
        fns[f"vmap {name}"] = jax.jit(jax.vmap(fn), compiler_options=_search_options())
        fns[f"loop {name}"] = lambda hp, keys, single=single: [
            single({k: v[i] for k, v in hp.items()}, keys[i]) for i in range(n)
        ]
    vmapped = fns["vmap own"]
    workers = _parallel.cpu_workers()
    t = harness.interleaved(fns, hp, keys, warmup=1, reps=5)
    order = {"own": "each trial its own minibatch order", "shared": "one data_key"}
    rows = []
    for name in _orders(cfg):
        for kind, what in (
            ("search", f"random_search, compiled ({workers} per-core group(s) at once)"),
            ("vmap", "one jax.jit(jax.vmap) call"),
        ):
            rows.append(
                harness.Row(
                    "training",
                    f"search {n} trials, MLP {cfg['widths']}, {cfg['steps']} steps, {what}, "
                    + order[name],
                    t[f"{kind} {name}"],
                    f"{n} sequential jit calls",
                    t[f"loop {name}"],
                    None,
                    f"{t[f'loop {name}'] / t[f'{kind} {name}']:.1f}x faster",
                )
            )

    # End to end: random_search (sampling, compile, run, table) vs the loop with its compile.
    t0 = time.perf_counter()
    result = training.random_search(lambda hp, k: train_fn(hp, k), space, n, key, border=0.0)
    t_search = time.perf_counter() - t0
    # A new function object, so jit compiles it afresh (its cache is keyed by the function).
    single_fresh = jax.jit(lambda hp, key: train_fn(hp, key))
    t0 = time.perf_counter()
    harness.block([single_fresh({k: v[i] for k, v in hp.items()}, keys[i]) for i in range(n)])
    t_loop = time.perf_counter() - t0
    rows.append(
        harness.Row(
            "training",
            f"random_search {n} trials, MLP {cfg['widths']}, end to end (compile included)",
            t_search,
            f"{n} sequential calls + 1 compile",
            t_loop,
            None,
            f"best val acc {result.best.metrics['val_accuracy']:.3f}, "
            f"{len(result.diverged)} diverged",
        )
    )

    compiled = vmapped.lower(hp, keys).compile()
    mem = compiled.memory_analysis()
    note = "n/a"
    if mem is not None:
        peak = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
        note = (
            f"XLA peak {_mb(peak)} = args {_mb(mem.argument_size_in_bytes)} + out "
            f"{_mb(mem.output_size_in_bytes)} + temp {_mb(mem.temp_size_in_bytes)} "
            f"({_mb(peak / n)} a trial)"
        )
    stats = jax.devices()[0].memory_stats()
    if stats and "peak_bytes_in_use" in stats:
        note += f"; device peak_bytes_in_use {_mb(stats['peak_bytes_in_use'])}"
    rows.append(
        harness.Row(
            "training",
            f"memory of one {n}-trial chunk, MLP {cfg['widths']}",
            t["vmap own"],
            note=note,
        )
    )
    return rows


def _ensemble_rows(cfg):
    model, train, _, _ = _problem(cfg)
    k = cfg["members"]
    opt = optax.sgd(0.05, momentum=0.9)
    kw = dict(num_steps=cfg["steps"], batch_size=cfg["batch"])
    data = tuple(train)
    keys = jax.random.split(jax.random.key(3), k)

    fns = {}
    for name, data_key in [
        (o, {"own": None, "shared": jax.random.key(4)}[o]) for o in _orders(cfg)
    ]:
        # Called eagerly, as users call it: train_ensemble compiles its program and, on a
        # multi-core CPU, trains one group of members per core at once.
        fns[f"vmap {name}"] = lambda keys, data_key=data_key: training.train_ensemble(
            model, model.init, opt, data, keys, data_key=data_key, **kw
        )

        @jax.jit
        def one(key, data_key=data_key):
            k_init, k_train = jax.random.split(key)
            params = model.init(k_init)[0]
            return training.fit(model, params, opt, data, key=k_train, data_key=data_key, **kw)

        fns[f"loop {name}"] = lambda keys, one=one: [one(keys[i]) for i in range(k)]

    t = harness.interleaved(fns, keys, warmup=1, reps=15)
    workers = min(_parallel.cpu_workers(), k)
    return [
        harness.Row(
            "training",
            f"ensemble of {k}, MLP {cfg['widths']}, {cfg['steps']} steps, train_ensemble "
            f"({workers} per-core group(s) at once), "
            + ("each member its own minibatch order" if name == "own" else "one data_key"),
            t[f"vmap {name}"],
            f"{k} sequential jit calls",
            t[f"loop {name}"],
            None,
            f"{t[f'loop {name}'] / t[f'vmap {name}']:.1f}x faster",
        )
        for name in _orders(cfg)
    ]


@harness.benchmark("training")
def bench(size: str) -> list[harness.Row]:
    rows = []
    for cfg in CONFIG[size]:
        what = f"MLP {cfg['widths']}, {cfg['trials']} trials, {cfg['members']} members"
        if harness.out_of_time():
            rows.append(harness.skipped("training", what, "time budget spent"))
            continue
        harness.progress(f"training search {what}")
        rows += harness.guarded("training", f"search, {what}", _search_rows, cfg)
        if harness.out_of_time():
            rows.append(harness.skipped("training", f"ensemble, {what}", "time budget spent"))
            continue
        harness.progress(f"training ensemble {what}")
        rows += harness.guarded("training", f"ensemble, {what}", _ensemble_rows, cfg)
    return rows
