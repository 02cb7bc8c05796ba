"""Model ensembles: K members trained at once with vmap over seeds, or snapshots of one run."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxnorm import _checks
from jaxnorm.training import _loop, _parallel
from jaxnorm.training._loop import History, fit
from jaxnorm.training._model import Model


def train_ensemble(
    loss_fn: Callable | Model,
    init_fn: Callable[[jax.Array], Any],
    optimizer: optax.GradientTransformation,
    data: Any,
    keys: jax.Array,
    *,
    num_steps: int | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    data_key: jax.Array | None = None,
    ema_decay: float | None = None,
) -> tuple[Any, History]:
    """Train K ensemble members at once: one :func:`fit` vmapped over K keys.

    Member ``k`` initialises from ``init_fn(k_init)`` and trains with its own minibatch order,
    where ``k_init, k_train = jax.random.split(keys[k])``. Members differ only through their keys,
    the lecture's "same model, different initialisations"; identical keys give identical members.
    With ``data_key`` every member sees the same minibatch order and they differ by their
    initialisation alone.

    Inside ``jit``, ``vmap`` or ``grad`` this is one pure ``vmap``. Called eagerly it compiles
    its program itself (cached per model, ``init_fn``, optimizer and plan) and, on a CPU with
    several cores, trains the members in one group per core, the groups at once (XLA:CPU runs a
    program's operations one after another, and a small model's matmuls use one core); the
    members are the same either way.

    Args:
      loss_fn: as in :func:`fit` (a :class:`Model`, or a stateless ``loss_fn(params, batch, key)``).
      init_fn: ``init_fn(key) -> params``. For a :class:`Model`, ``init_fn(key) -> (params,
        state)`` as ``model.init`` returns them (``init_fn=model.init``); a Model without state
        (no batch norm) also accepts the params alone, ``lambda k: model.init(k)[0]``. The
        output's structure is checked against ``model.init``'s when the members are traced.
      optimizer: any optax ``GradientTransformation``.
      data: a pytree of arrays with a common leading axis N, shared by every member.
      keys: ``[K]`` PRNG keys, e.g. ``jax.random.split(key, K)``.
      num_steps, epochs, batch_size, ema_decay: as in :func:`fit`.
      data_key: one PRNG key for the minibatch order of every member (default: each member's
        own, from its key).

    Returns:
      ``(params, history)`` stacked along a leading member axis of size K (``history.state``
      holds the members' batch-norm statistics).

    Raises:
      TypeError: if ``init_fn`` is not callable.
      ValueError: if keys is not a 1-D array of keys; if, for a :class:`Model`, ``init_fn``'s
        output is neither ``(params, state)`` nor (for a model without state) the params, with
        ``model.init``'s structure; or anything :func:`fit` rejects.

    References:
      Dietterich 2000, "Ensemble methods in machine learning".

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from jaxnorm import training
      >>> model = training.mlp([2, 4, 2])
      >>> x = jnp.array([[0.0, 1.0], [1.0, 0.0]]); y = jnp.array([0, 1])
      >>> params, hist = training.train_ensemble(
      ...     model, model.init, optax.sgd(0.1), (x, y), jax.random.split(jax.random.key(0), 3),
      ...     num_steps=5)
      >>> params[0]["w"].shape, hist.loss.shape
      ((3, 2, 4), (3, 5))
    """
    if not callable(init_fn):
        raise TypeError(f"train_ensemble: init_fn must be callable, got {type(init_fn).__name__}")
    keys = jnp.asarray(keys)
    typed = jax.dtypes.issubdtype(keys.dtype, jax.dtypes.prng_key)
    # Typed keys are [K]; raw uint32 keys (jax.random.PRNGKey) are [K, 2].
    if keys.ndim != (1 if typed else 2) or keys.shape[0] < 1:
        raise ValueError(
            "train_ensemble: keys must hold K >= 1 keys, e.g. jax.random.split(key, K), "
            f"got an array of shape {keys.shape}"
        )

    static = dict(
        loss_fn=loss_fn,
        init_fn=init_fn,
        optimizer=optimizer,
        num_steps=num_steps,
        epochs=epochs,
        batch_size=batch_size,
        ema_decay=ema_decay,
    )
    if _parallel.at_top_level():
        # Called eagerly: compiled here, the members in one group per CPU core (one on GPU).
        workers = min(_parallel.cpu_workers(), keys.shape[0])
        return _members_in_groups(static, data, keys, data_key, workers)
    return _members(keys, data, data_key, **static)


def _members(keys, data, data_key, *, loss_fn, init_fn, optimizer, ema_decay, **plan):
    """``fit`` vmapped over the members' keys: the ensemble as one pure function."""

    def member(key):
        k_init, k_train = jax.random.split(key)
        init = init_fn(k_init)
        if isinstance(loss_fn, Model):
            params, state = _model_init(loss_fn, init, k_init)
        else:
            params, state = init, None
        return fit(
            loss_fn,
            params,
            optimizer,
            data,
            key=k_train,
            data_key=data_key,
            state=state,
            ema_decay=ema_decay,
            **plan,
        )

    return jax.vmap(member)(keys)


def _group(keys, group, data, data_key, *, size, **static):
    """Group ``group`` of the members: keys ``[group * size, (group + 1) * size)``, the ones past
    the end repeating the last key (padding, dropped afterwards)."""
    idx = jnp.minimum(group * size + jnp.arange(size), keys.shape[0] - 1)
    return _members(keys[idx], data, data_key, **static)


_STATIC = ("loss_fn", "init_fn", "optimizer", "num_steps", "epochs", "batch_size", "ema_decay")
# Compiled once per (model, init_fn, optimizer, plan, group size): calling train_ensemble again
# with the same objects reuses the program, as a jitted function would.
_group_program = jax.jit(_group, static_argnames=("size", *_STATIC))


@functools.partial(jax.jit, static_argnums=1)
def _concat(parts, k):
    return jax.tree.map(lambda *p: jnp.concatenate(p)[:k], *parts)


def _members_in_groups(static, data, keys, data_key, workers):
    """The members in ``workers`` equal groups, one compiled program, the groups run at once."""
    k = keys.shape[0]
    size = -(-k // workers)
    calls = [(keys, np.int32(g), data, data_key) for g in range(workers)]
    try:
        hash(tuple(static.values()))
    except TypeError:  # unhashable options (an array ema_decay...): compiled for this call only
        program = jax.jit(functools.partial(_group, size=size, **static))
        outs = _parallel.run(program, calls, workers)
    else:
        outs = _parallel.run(_group_program, calls, workers, size=size, **static)
    return outs[0] if workers == 1 else _concat(outs, k)


def _shapes(tree: Any) -> tuple:
    return jax.tree.structure(tree), [jnp.shape(a) for a in jax.tree.leaves(tree)]


def _model_init(model: Model, init: Any, key: jax.Array) -> tuple[Any, Any]:
    """``(params, state)`` from what ``init_fn`` returned for a :class:`Model`.

    ``init`` must have the structure of ``model.init(key)``; a model without state (no batch
    norm: its state has no arrays) may also return the params alone. Checked at trace time
    against ``jax.eval_shape(model.init, key)``, so a wrong structure is reported here rather
    than as a cryptic error inside ``apply``.
    """
    expected_params, expected_state = jax.eval_shape(model.init, key)
    if _shapes(init) == _shapes((expected_params, expected_state)):
        return init
    stateless = not jax.tree.leaves(expected_state)
    if _shapes(init) == _shapes(expected_params):
        if stateless:
            # eval_shape's state has no arrays, so it is the state itself (e.g. ``()``).
            return init, expected_state
        raise ValueError(
            "train_ensemble: init_fn returned only the params, but this Model has state "
            "(batch-norm statistics); for a Model, init_fn must return (params, state), e.g. "
            "init_fn=model.init"
        )
    what = f"a {type(init).__name__}"
    if isinstance(init, tuple | list):
        what += f" of {len(init)} items"
    raise ValueError(
        "train_ensemble: for a Model, init_fn must return (params, state), e.g. "
        "init_fn=model.init"
        + ("" if not stateless else " (or the params alone: this Model has no state)")
        + f"; got {what} whose structure or shapes match neither model.init's (params, state) "
        "nor its params"
    )


def ensemble_predict(
    apply_fn: Callable[[Any, jax.Array], jax.Array],
    stacked_params: Any,
    x: jax.Array,
    *,
    return_members: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    r"""The ensemble's class probabilities: the members' softmax outputs averaged.

    .. math:: p(y \mid x) = \frac{1}{K} \sum_{k=1}^{K} \mathrm{softmax}(f_k(x))

    Averaging probabilities (not logits) is the usual ensemble of classifiers; the members run
    with ``vmap`` over the leading axis of ``stacked_params``.

    Args:
      apply_fn: ``apply_fn(params, x) -> logits [N, C]`` for one member. For a :class:`Model`
        with batch norm, stack ``(params, state)`` and pass
        ``lambda ps, x: model.apply(ps[0], ps[1], x, train=False)[0]``.
      stacked_params: the members' parameters stacked on a leading axis K (as
        :func:`train_ensemble` returns them).
      x: ``[N, D]`` inputs.
      return_members: also return every member's probabilities.

    Returns:
      ``[N, C]`` averaged probabilities (float32 or wider), and ``[K, N, C]`` member
      probabilities when ``return_members``.

    Raises:
      TypeError: if ``apply_fn`` is not callable or ``x`` is not an array (a list, a dict).
      ValueError: if the stacked parameters have no common leading axis.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxnorm import training
      >>> apply = lambda w, x: x @ w
      >>> ws = jnp.stack([jnp.eye(2), -jnp.eye(2)])  # two members that disagree
      >>> training.ensemble_predict(apply, ws, jnp.array([[5.0, 0.0]]))
      Array([[0.5, 0.5]], dtype=float32)
    """
    if not callable(apply_fn):
        raise TypeError(
            f"ensemble_predict: apply_fn must be callable, got {type(apply_fn).__name__}"
        )
    _checks.check_array(x, "x")
    sizes = {jnp.shape(a)[0] if jnp.ndim(a) else None for a in jax.tree.leaves(stacked_params)}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            "ensemble_predict: stacked_params must have one leading member axis K on every leaf, "
            f"got leading sizes {sorted(map(str, sizes))}"
        )

    def member(params):
        logits = apply_fn(params, x)
        return jax.nn.softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), axis=-1)

    members = jax.vmap(member)(stacked_params)
    mean = jnp.mean(members, axis=0)
    return (mean, members) if return_members else mean


def _cosine_restarts(learning_rate, period: int) -> optax.Schedule:
    """``optax.sgdr_schedule`` of identical cosine cycles (0 warm-up, end value 0), written so
    that it also runs under ``jax_numpy_dtype_promotion='strict'`` (optax's adds a Python float
    to the int32 step count)."""

    def schedule(count):
        phase = jnp.asarray(count % period, jnp.float32) / jnp.float32(period)
        lr = jnp.asarray(learning_rate, jnp.float32)
        return 0.5 * lr * (1.0 + jnp.cos(jnp.float32(math.pi) * phase))

    return schedule


def _sgd_momentum(schedule):
    return optax.sgd(schedule, momentum=0.9)


def snapshot_ensemble(
    loss_fn: Callable | Model,
    params: Any,
    data: Any,
    *,
    key: jax.Array,
    num_snapshots: int,
    steps_per_snapshot: int,
    learning_rate: float,
    batch_size: int | None = None,
    make_optimizer: Callable[[optax.Schedule], optax.GradientTransformation] | None = None,
    state: Any = None,
    data_key: jax.Array | None = None,
) -> tuple[Any, History]:
    r"""Snapshot ensemble: one training run whose cyclic learning rate leaves M models.

    Huang et al. 2017 ("Snapshot Ensembles: Train 1, get M for free"): the learning rate follows
    ``num_snapshots`` cosine cycles of ``steps_per_snapshot`` steps each (what
    ``optax.sgdr_schedule`` builds from identical ``cosine_decay`` cycles),

    .. math:: \eta(t) = \frac{\eta_0}{2}\left(1 + \cos\frac{\pi\,(t \bmod T)}{T}\right),

    and the parameters at the end of every cycle, where the rate has annealed to 0 and the model
    sits in a minimum, are kept. Each restart jumps to a high rate again, which moves the model to
    another minimum, so the snapshots differ like the members of an ensemble, for the cost of
    one training run. The optimizer state (momentum) carries across the restarts, as in the paper.
    The whole run is one ``lax.scan`` (it runs under ``jit`` and ``vmap``); the minibatch order is
    that of :func:`fit`.

    Args:
      loss_fn: as in :func:`fit` (a :class:`Model`, or a loss function).
      params: the initial parameters.
      data: a pytree of arrays with a common leading axis N.
      key: PRNG key (minibatch order and per-step keys, as in :func:`fit`).
      num_snapshots: M, the number of cycles and of snapshots.
      steps_per_snapshot: T, the steps of one cycle.
      learning_rate: :math:`\eta_0`, the rate at the start of every cycle.
      batch_size: minibatch size (None: full batch).
      make_optimizer: ``make_optimizer(schedule) -> optax optimizer`` (default: SGD with
        momentum 0.9, the paper's choice).
      state: model state (batch-norm statistics) threaded through the loss, as in :func:`fit`.
      data_key: as in :func:`fit`.

    Returns:
      ``(snapshots, history)``: the parameters after each cycle stacked on a leading axis M
      (ready for :func:`ensemble_predict`), and the :class:`History` of all M*T steps, whose
      ``state`` holds the model state after each cycle, stacked the same way.

    Raises:
      TypeError/ValueError: non-int or < 1 counts, a learning rate that is not positive, or
        anything :func:`fit` rejects.

    References:
      Huang et al. 2017, "Snapshot Ensembles: Train 1, get M for free";
      Loshchilov & Hutter 2017, "SGDR: Stochastic Gradient Descent with Warm Restarts".

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxnorm import training
      >>> model = training.mlp([2, 8, 2])
      >>> params, _ = model.init(jax.random.key(0))
      >>> x = jnp.array([[0.0, 1.0], [1.0, 0.0]]); y = jnp.array([0, 1])
      >>> snaps, hist = training.snapshot_ensemble(
      ...     model, params, (x, y), key=jax.random.key(1), num_snapshots=3,
      ...     steps_per_snapshot=20, learning_rate=0.1)
      >>> snaps[0]["w"].shape, hist.loss.shape
      ((3, 2, 8), (60,))
    """
    who = "snapshot_ensemble"
    m = _loop._check_int(num_snapshots, "num_snapshots", who, 1)
    t = _loop._check_int(steps_per_snapshot, "steps_per_snapshot", who, 1)
    if not _checks.is_tracer(learning_rate):
        lr = np.asarray(learning_rate)
        if lr.ndim or not np.isfinite(lr) or lr <= 0:
            raise ValueError(
                f"{who}: learning_rate must be a positive number, got {learning_rate!r}"
            )
    schedule = _cosine_restarts(learning_rate, t)
    optimizer = (make_optimizer or _sgd_momentum)(schedule)
    _loop._check_optimizer(optimizer, who)
    loss, state = _loop._adapt_loss(loss_fn, state, who)
    plan = _loop._plan(data, batch_size, m * t, None, who)
    data = jax.tree.map(jnp.asarray, data)
    perms, step_key = _loop._minibatch_order(key, data_key, plan, who)
    step = _loop._make_step(loss, optimizer, plan, None, False, who)
    bad_rows = _loop._nonfinite_rows(data)

    def run_cycle(carry, c):
        steps = c * t + jnp.arange(t)
        carry, outs = jax.lax.scan(
            lambda cc, i: step(cc, i, data, bad_rows, perms, step_key), carry, steps
        )
        return carry, ((carry[0], carry[1]), outs)

    carry = (params, state, optimizer.init(params), None)
    _, ((snapshots, states), outs) = jax.lax.scan(run_cycle, carry, jnp.arange(m))
    outs = jax.tree.map(lambda a: a.reshape((m * t, *a.shape[2:])), outs)
    history = History(
        loss=outs["loss"],
        metrics=outs["metrics"],
        update_ratio=None,
        nan_step=_loop._first_nonfinite(outs["nonfinite"]),
        eval_step=jnp.zeros(0, jnp.int32),
        eval_metrics={},
        state=states,
        ema_params=None,
        nonfinite=outs["nonfinite"],
    )
    return snapshots, history
