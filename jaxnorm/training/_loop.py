"""The training loop: optax does the updates; jaxnorm batches, records and watches for NaN."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxnorm import diagnostics
from jaxnorm.training._model import Model, _check_label_values, classification_loss


class DivergenceWarning(RuntimeWarning):
    """Training met a NaN or infinite value (the loss, a gradient, the parameters, ...)."""


# What each training step checks for NaN/Inf, in the order of the bits of History.nonfinite:
# the loss and metrics it computed, its gradients, the parameters and optimizer state after its
# update, the model state (batch-norm running statistics) it returned, the minibatch it read
# (floating arrays only).
_NONFINITE_PARTS: tuple[str, ...] = (
    "loss",
    "metrics",
    "gradients",
    "parameters",
    "optimizer state",
    "model state",
    "batch",
)


def _nonfinite_names(code) -> tuple[str, ...]:
    """The parts a ``History.nonfinite`` code names: 5 -> ("loss", "gradients")."""
    code = int(code)
    return tuple(name for i, name in enumerate(_NONFINITE_PARTS) if code >> i & 1)


class History(NamedTuple):
    """What a training run recorded, one entry per optimisation step (a pytree).

    Attributes:
      loss: ``[T]`` the training loss of each step's minibatch (before that step's update).
      metrics: ``{name: [T]}`` the other per-step metrics the loss returned (``"accuracy"`` for a
        :class:`Model`).
      update_ratio: per-leaf ``[T]`` arrays of :math:`\\|\\Delta\\theta\\| / \\|\\theta\\|`
        (a tree shaped like the params), or None when not tracked.
      nan_step: the first step at which something was NaN or infinite: the step's loss, a
        metric, a gradient, the parameters or optimizer state after its update, the model state
        it returned (batch-norm statistics), or its minibatch; -1 when everything stayed finite.
      eval_step: ``[E]`` the steps after which ``eval_fn`` ran (:func:`train` only).
      eval_metrics: ``{name: [E]}`` what ``eval_fn`` returned.
      state: the final model state (batch-norm statistics; ``()`` when there is none).
      ema_params: the Polyak/EMA average of the parameters when ``ema_decay`` was given, else None.
      nonfinite: ``[T]`` int32, per step, the parts that held a NaN or Inf as bits, in the
        order loss (1), metrics (2), gradients (4), parameters (8), optimizer state (16), model
        state (32), batch (64); 0 for a clean step. :attr:`nonfinite_parts` names those of
        ``nan_step``.
    """

    loss: Any
    metrics: dict
    update_ratio: Any
    nan_step: Any
    eval_step: Any
    eval_metrics: dict
    state: Any
    ema_params: Any
    nonfinite: Any = None

    @property
    def accuracy(self):
        """The per-step training accuracy, or None when the loss reports none."""
        return self.metrics.get("accuracy")

    @property
    def diverged(self):
        """True when something was NaN or infinite at some step (an array under ``vmap``)."""
        return self.nan_step >= 0

    @property
    def nonfinite_parts(self) -> tuple[str, ...]:
        """What was NaN or infinite at ``nan_step`` (``()`` when nothing was), e.g.
        ``("loss", "gradients")``. For one run; index a stacked History first."""
        if self.nonfinite is None:
            return ()
        if np.ndim(self.nan_step) != 0:
            raise ValueError(
                f"nonfinite_parts names one run's parts, but this History holds several "
                f"(nan_step has shape {np.shape(self.nan_step)}); take run k first, e.g. "
                f"jax.tree.map(lambda a: a[k], history)"
            )
        step = int(self.nan_step)
        return () if step < 0 else _nonfinite_names(np.asarray(self.nonfinite)[step])


class _Plan(NamedTuple):
    n: int
    batch_size: int
    steps_per_epoch: int
    num_steps: int
    num_epochs: int


def _check_int(value, name, who, minimum):
    if isinstance(value, jax.core.Tracer):
        raise TypeError(
            f"{who}: {name} must be a Python int known at trace time, got a traced value "
            f"{value!r}; in a random_search, search it with choice(..., static=True)"
        )
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{who}: {name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{who}: {name} must be at least {minimum}, got {value}")
    return int(value)


def _check_key(key, name, who):
    """A PRNG key: a typed key (``jax.random.key``) or raw uint32 key data (``PRNGKey``)."""
    dtype = getattr(key, "dtype", None)
    ok = dtype is not None and (
        jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
        or (dtype == np.uint32 and np.ndim(key) == 1)
    )
    if not ok:
        raise TypeError(f"{who}: {name} must be a PRNG key such as jax.random.key(0), got {key!r}")
    return key


def _plan(data, batch_size, num_steps, epochs, who) -> _Plan:
    leaves = jax.tree.leaves(data)
    if not leaves:
        raise ValueError(f"{who}: data is empty; pass arrays such as (x, y) with a leading axis N")
    sizes = {np.shape(a)[0] if np.ndim(a) else None for a in leaves}
    if len(sizes) != 1 or None in sizes:
        shapes = [np.shape(a) for a in leaves]
        raise ValueError(
            f"{who}: every data array needs the same leading size N (examples), got shapes {shapes}"
        )
    (n,) = sizes
    if n < 1:
        raise ValueError(f"{who}: data has no examples")
    bs = n if batch_size is None else _check_int(batch_size, "batch_size", who, 1)
    if bs > n:
        raise ValueError(f"{who}: batch_size={bs} is larger than the {n} examples in data")
    spe = n // bs
    if (num_steps is None) == (epochs is None):
        raise ValueError(f"{who}: pass exactly one of num_steps and epochs")
    if num_steps is not None:
        total = _check_int(num_steps, "num_steps", who, 1)
    else:
        total = _check_int(epochs, "epochs", who, 1) * spe
    return _Plan(n, bs, spe, total, math.ceil(total / spe))


def _adapt_loss(loss_fn, state, who):
    """A loss of the stateful form ``(params, state, batch, key) -> (loss, (state, metrics))``."""
    if isinstance(loss_fn, Model):
        return classification_loss(loss_fn), (() if state is None else state)
    if not callable(loss_fn):
        raise TypeError(f"{who}: loss_fn must be a callable or a Model, got {loss_fn!r}")
    if state is not None:
        return loss_fn, state

    def stateless(params, state, batch, key):
        out = loss_fn(params, batch, key)
        if isinstance(out, tuple):
            if len(out) != 2 or not isinstance(out[1], dict):
                raise TypeError(
                    f"{who}: loss_fn(params, batch, key) must return a scalar loss or "
                    f"(loss, dict of metrics), got a tuple of {len(out)} values"
                )
            return out[0], (state, out[1])
        return out, (state, {})

    return stateless, ()


# Indices up to 2**_MAX_INDEX_BITS are shuffled with packed one-operand sorts; above that the
# random part of a packed key would be too short, and jax.random.permutation is used instead.
_MAX_INDEX_BITS = 20


def shuffled_indices(key: jax.Array, n: int, num: int | None = None) -> jax.Array:
    """Uniformly random permutations of ``range(n)``: shape ``(n,)``, or ``(num, n)``.

    What :func:`fit` and :func:`train` draw their minibatch order from. It is
    ``jax.random.permutation``'s algorithm, random sort keys applied in rounds (Rao-Sandelius),
    but each round sorts a single uint32 array whose high bits are random and whose low bits hold
    the position. XLA's sort of one primitive array is several times faster than the key-value
    sort ``jax.random.permutation`` runs, which under ``vmap`` over 64 trials on CPU took a third
    of a search's time. Ties of the random part keep the previous order, so each round has
    ``32 - ceil(log2 n)`` random bits, and the number of rounds is chosen, as JAX does for its
    32 bits, so that ties are rare: 1 round for n up to 2**9, 2 up to 2**12, 5 at 2**20.
    Larger n falls back to ``jax.random.permutation``.

    Args:
      key: PRNG key.
      n: the number of items (a Python int, known at trace time).
      num: how many independent permutations (None: one, without the leading axis).

    Returns:
      int32 ``[n]`` or ``[num, n]``.

    Raises:
      TypeError, ValueError: ``n`` is not an int >= 0, or ``num`` not an int >= 1; ``key`` is
        not a PRNG key (TypeError).

    Example:
      >>> import jax
      >>> from jaxnorm import training
      >>> sorted(training.shuffled_indices(jax.random.key(0), 5).tolist())
      [0, 1, 2, 3, 4]
    """
    _check_key(key, "key", "shuffled_indices")
    n = _check_int(n, "n", "shuffled_indices", 0)
    if num is not None:
        num = _check_int(num, "num", "shuffled_indices", 1)
    shape = (n,) if num is None else (num, n)
    if n <= 1:
        return jnp.zeros(shape, jnp.int32)
    index_bits = max(1, math.ceil(math.log2(n)))
    if index_bits > _MAX_INDEX_BITS:
        keys = jax.random.split(key, 1 if num is None else num)
        perms = jax.vmap(lambda k: jax.random.permutation(k, n))(keys).astype(jnp.int32)
        return perms.reshape(shape)
    random_bits = 32 - index_bits
    rounds = max(1, math.ceil(3 * math.log(n) / (random_bits * math.log(2))))
    low = jnp.uint32((1 << index_bits) - 1)
    position = jnp.broadcast_to(jnp.arange(n, dtype=jnp.uint32), shape)
    perm = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), shape)
    for k in jax.random.split(key, rounds):
        high = jax.random.bits(k, shape, jnp.uint32) << index_bits
        order = (jnp.sort(high | position, axis=-1) & low).astype(jnp.int32)
        perm = jnp.take_along_axis(perm, order, axis=-1)
    return perm


def _permutations(key, plan: _Plan):
    if plan.batch_size == plan.n:
        return None  # full batch: every step sees all of data, in order
    return shuffled_indices(key, plan.n, plan.num_epochs)


def _minibatch_order(key, data_key, plan: _Plan, who):
    """``(permutations, step key)``: the order from ``data_key``, else from key's first split."""
    own_data_key, step_key = jax.random.split(_check_key(key, "key", who))
    if data_key is not None:
        own_data_key = _check_key(data_key, "data_key", who)
    return _permutations(own_data_key, plan), step_key


def _nonfinite_rows(data) -> jax.Array:
    """``[N]`` bool: whether example n holds a NaN/Inf in some floating array of ``data``.

    Computed once per run, so a step finds whether its minibatch holds one by gathering
    ``batch_size`` flags instead of reading the minibatch again.
    """
    leaves = _floating_leaves(data)
    rows = jnp.zeros(jnp.shape(jax.tree.leaves(data)[0])[:1], bool)
    for leaf in leaves:
        rows = rows | ~jnp.all(jnp.isfinite(leaf), axis=tuple(range(1, leaf.ndim)))
    return rows


def _make_step(loss, optimizer, plan: _Plan, ema_decay, track_ratio, who):
    def step(carry, i, data, bad_rows, perms, step_key):
        params, state, opt_state, ema = carry
        if perms is None:
            batch = data
            bad_batch = jnp.any(bad_rows)
        else:
            order = perms[i // plan.steps_per_epoch]
            start = (i % plan.steps_per_epoch) * plan.batch_size
            idx = jax.lax.dynamic_slice(order, (start,), (plan.batch_size,))
            batch = jax.tree.map(lambda a: jnp.take(a, idx, axis=0), data)
            bad_batch = jnp.any(jnp.take(bad_rows, idx))
        key = jax.random.fold_in(step_key, i)
        shape = jax.eval_shape(loss, params, state, batch, key)[0].shape
        if shape != ():
            raise ValueError(f"{who}: the loss must be a scalar, got shape {shape}")
        (value, (new_state, metrics)), grads = jax.value_and_grad(loss, has_aux=True)(
            params, state, batch, key
        )
        updates, opt_state = optimizer.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        if ema is not None:
            ema = optax.incremental_update(new_params, ema, 1.0 - ema_decay)
        checked = (value, metrics, grads, new_params, opt_state, new_state, bad_batch)
        out = {"loss": value, "metrics": metrics, "nonfinite": _nonfinite_code(checked)}
        if track_ratio:
            out["update_ratio"] = diagnostics.update_ratio(params, updates)
        return (new_params, new_state, opt_state, ema), out

    return step


def _check_decay(ema_decay, who, name="ema_decay"):
    if ema_decay is None:
        return None
    # NumPy scalars are numbers (np.float32(-0.5) is a bad value, not a bad type).
    if isinstance(ema_decay, bool | np.bool_) or not isinstance(
        ema_decay, int | float | np.integer | np.floating
    ):
        raise TypeError(f"{who}: {name} must be a float in [0, 1), got {ema_decay!r}")
    if not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"{who}: {name} must be in [0, 1), got {ema_decay}")
    return float(ema_decay)


def _check_optimizer(optimizer, who):
    if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        raise TypeError(
            f"{who}: optimizer must be an optax GradientTransformation (e.g. optax.sgd(0.1)), "
            f"got {optimizer!r}"
        )


def _floating_leaves(tree):
    leaves = (jnp.asarray(leaf) for leaf in jax.tree.leaves(tree))
    return [leaf for leaf in leaves if jnp.issubdtype(leaf.dtype, jnp.inexact)]


def _has_nonfinite(tree) -> jax.Array:
    """Whether any floating (or complex) leaf of ``tree`` holds a NaN or an Inf."""
    found = jnp.zeros((), bool)
    for leaf in _floating_leaves(tree):
        found = found | ~jnp.all(jnp.isfinite(leaf))
    return found


def _nonfinite_code(parts) -> jax.Array:
    """int32: bit i set when ``parts[i]`` (in _NONFINITE_PARTS order) has a NaN/Inf.

    One reduction per distinct leaf shape, not per leaf: the parameters, their gradients, the
    updated parameters and the optimizer's moments share shapes, so each group's flags are
    or-ed elementwise (bit i for part i) and reduced together. Every reduction is a kernel that
    XLA:CPU runs on its own, and a small model's step is a few microseconds: one per leaf made
    the step up to 30% slower.
    """
    groups: dict = {}
    for i, part in enumerate(parts):
        if isinstance(part, jax.Array) and part.dtype == bool:
            leaves = [part]  # a flag found beforehand (the minibatch's)
        else:
            leaves = [~jnp.isfinite(leaf) for leaf in _floating_leaves(part)]
        for bad in leaves:
            flag = bad.astype(jnp.int32) << i
            groups[bad.shape] = groups[bad.shape] | flag if bad.shape in groups else flag
    code = jnp.zeros((), jnp.int32)
    for flags in groups.values():
        axes = tuple(range(flags.ndim))
        code = code | jax.lax.reduce(flags, np.int32(0), jax.lax.bitwise_or, axes)
    return code


def _first_nonfinite(codes):
    """The first step whose code is not 0 (along the last axis), -1 when there is none."""
    bad = codes != 0
    return jnp.where(jnp.any(bad, axis=-1), jnp.argmax(bad, axis=-1), -1).astype(jnp.int32)


def _describe_nonfinite(code, loss) -> str:
    """'loss = nan, gradients, parameters': what a step's code names, for the warnings."""
    names = [f"loss = {float(loss)}" if n == "loss" else n for n in _nonfinite_names(code)]
    return ", ".join(names)


def _check_model_labels(loss_fn, data, who):
    """For a Model, concrete labels outside [0, C) raise before training starts."""
    if isinstance(loss_fn, Model) and isinstance(data, tuple | list) and len(data) == 2:
        _check_label_values(data[1], loss_fn.num_classes, who)


def fit(
    loss_fn: Callable | Model,
    params: Any,
    optimizer: optax.GradientTransformation,
    data: Any,
    *,
    key: jax.Array,
    num_steps: int | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    data_key: jax.Array | None = None,
    state: Any = None,
    ema_decay: float | None = None,
    update_ratios: bool = False,
) -> tuple[Any, History]:
    r"""Train in one ``lax.scan``: pure, so it runs under ``jit`` and ``vmap`` (search, ensembles).

    Each step draws a minibatch, computes :math:`g = \nabla_\theta L`, asks optax for the update
    (``optimizer.update(g, opt_state, params)``) and applies it. Minibatches follow a fresh
    permutation of ``data`` each epoch (the last ``N mod batch_size`` examples of a permutation
    are skipped); with ``batch_size=None`` every step uses all of ``data``.

    Every step checks what it computed and read for NaN and Inf (the loss, the metrics, the
    gradients, the updated parameters and optimizer state, the model state such as batch-norm
    running statistics, the minibatch), so a NaN that leaves the loss finite (one only in the
    running statistics, or in data the loss ignores) is caught too. A diverging run keeps going
    (a traced loop can neither stop nor warn) and reports the first such step in
    ``History.nan_step`` (``History.diverged``), and what was non-finite in
    ``History.nonfinite`` (``History.nonfinite_parts``); :func:`train` warns and stops instead.
    Same results as :func:`train` for the same arguments.

    Args:
      loss_fn: a :class:`Model` (softmax cross-entropy on ``data = (x, y)``, accuracy recorded), or
        ``loss_fn(params, batch, key) -> loss | (loss, metrics)``, or, when ``state`` is given,
        ``loss_fn(params, state, batch, key) -> (loss, (new_state, metrics))``.
      params: the initial parameters (any pytree).
      optimizer: any optax ``GradientTransformation`` (schedules and
        ``optax.inject_hyperparams`` included; a traced learning rate works under ``vmap``).
      data: a pytree of arrays with a common leading axis N, e.g. ``(x, y)``.
      key: PRNG key for the minibatch order and the per-step keys passed to the loss.
      num_steps: number of steps (exactly one of num_steps and epochs).
      epochs: number of passes over data (``N // batch_size`` steps each).
      batch_size: minibatch size (None: full batch).
      data_key: PRNG key for the minibatch order alone (default: one split from ``key``).
        Give every trial of a search, or every member of an ensemble, the same ``data_key``
        and they see the same minibatches in the same order (common random numbers: trials
        then differ only by their hyperparameters and initialisation, which makes their
        comparison less noisy). Under ``vmap`` the shared minibatch also lets XLA merge the
        first layer's matmuls of all models into one, which is faster.
      state: model state such as batch-norm statistics, threaded through the loss.
      ema_decay: keep a Polyak/EMA copy of the parameters,
        :math:`\bar\theta \leftarrow d\,\bar\theta + (1-d)\,\theta` (``optax.incremental_update``),
        returned in ``History.ema_params``.
      update_ratios: record the per-leaf update/parameter norm ratios.

    Returns:
      ``(params, history)``: the final parameters and a :class:`History` of JAX arrays.

    Raises:
      TypeError: a non-callable loss_fn, a non-optax optimizer, non-int counts, a key or
        data_key that is not a PRNG key.
      ValueError: empty or ragged data, both or neither of num_steps/epochs, a batch larger than
        data, a non-scalar loss; for a :class:`Model`, labels outside ``[0, num_classes)``
        (when data is concrete; traced labels out of range make the loss NaN instead).

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from jaxnorm import training
      >>> loss = lambda w, batch, key: jnp.mean((batch[0] @ w - batch[1]) ** 2)
      >>> x = jnp.eye(3); y = jnp.array([1.0, 2.0, 3.0])
      >>> w, hist = training.fit(loss, jnp.zeros(3), optax.sgd(1.0), (x, y),
      ...                        key=jax.random.key(0), num_steps=100)
      >>> [round(float(v), 3) for v in w], int(hist.nan_step)
      ([1.0, 2.0, 3.0], -1)
    """
    who = "fit"
    _check_optimizer(optimizer, who)
    loss, state = _adapt_loss(loss_fn, state, who)
    plan = _plan(data, batch_size, num_steps, epochs, who)
    _check_model_labels(loss_fn, data, who)
    decay = _check_decay(ema_decay, who)
    data = jax.tree.map(jnp.asarray, data)
    perms, step_key = _minibatch_order(key, data_key, plan, who)
    step = _make_step(loss, optimizer, plan, decay, update_ratios, who)
    bad_rows = _nonfinite_rows(data)
    ema = params if decay is not None else None
    carry = (params, state, optimizer.init(params), ema)
    carry, outs = jax.lax.scan(
        lambda c, i: step(c, i, data, bad_rows, perms, step_key),
        carry,
        jnp.arange(plan.num_steps),
    )
    params, state, _, ema = carry
    history = History(
        loss=outs["loss"],
        metrics=outs["metrics"],
        update_ratio=outs.get("update_ratio"),
        nan_step=_first_nonfinite(outs["nonfinite"]),
        eval_step=jnp.zeros(0, jnp.int32),
        eval_metrics={},
        state=state,
        ema_params=ema,
        nonfinite=outs["nonfinite"],
    )
    return params, history


def _progress_bar(total, enabled):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="step")


def train(
    loss_fn: Callable | Model,
    params: Any,
    optimizer: optax.GradientTransformation,
    data: Any,
    *,
    key: jax.Array,
    num_steps: int | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    data_key: jax.Array | None = None,
    state: Any = None,
    eval_fn: Callable[[Any], dict] | None = None,
    log_every: int = 100,
    progress: bool = True,
    ema_decay: float | None = None,
    update_ratios: bool = True,
    stop_on_nan: bool = True,
) -> tuple[Any, History]:
    """Train with a jitted step, a progress bar and NaN detection: the interactive loop.

    The steps run in jitted ``lax.scan`` blocks of ``log_every`` steps (one dispatch per block).
    After each block the losses come back to the host: the tqdm bar (when ``progress`` and tqdm,
    from the ``lab`` extra, is installed; otherwise silently none) shows the latest loss,
    ``eval_fn(params)`` runs, and a NaN or Inf anywhere (the loss, a metric, a gradient, the
    parameters, the optimizer or model state, the minibatch: as in :func:`fit`) stops training
    with a :class:`DivergenceWarning` naming the step (``History.nan_step``) and what was
    non-finite (``History.nonfinite_parts``); the history then ends at that step. The minibatch
    order and the results are those of :func:`fit` for the same arguments.

    Args:
      loss_fn, params, optimizer, data, key, num_steps, epochs, batch_size, data_key, state,
        ema_decay: as in :func:`fit`.
      eval_fn: ``eval_fn(params) -> {name: scalar}`` (e.g. validation accuracy, with
        :func:`evaluate`), called after every block; recorded in ``History.eval_metrics``.
        When ``state`` is used, ``eval_fn(params, state)`` is called instead.
      log_every: steps per block.
      progress: show a tqdm progress bar.
      update_ratios: record the per-leaf update/parameter norm ratios (the lecture's ~1e-3).
      stop_on_nan: stop at the first step with a NaN/Inf (else run on, still recording it and
        warning once).

    Returns:
      ``(params, history)`` with NumPy arrays in the history. ``params`` are those after the last
      step run. When ``stop_on_nan`` stopped training at step ``s = history.nan_step``, they are
      the parameters after step ``s - 1``, the last step at which everything was finite (the
      parameters whose loss is ``history.loss[-1]``); ``history.state`` and
      ``history.ema_params`` are those of the same step.

    Raises:
      As :func:`fit`; ValueError if log_every < 1.

    Warns:
      DivergenceWarning: at the first step with a NaN or Inf, naming it and what held it.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from jaxnorm import training
      >>> model = training.mlp([2, 8, 2])
      >>> params, state = model.init(jax.random.key(0))
      >>> x = jnp.array([[0.0, 1.0], [1.0, 0.0]]); y = jnp.array([0, 1])
      >>> params, hist = training.train(model, params, optax.adam(0.05), (x, y),
      ...                               key=jax.random.key(1), num_steps=50, progress=False)
      >>> float(hist.accuracy[-1])
      1.0
    """
    who = "train"
    _check_optimizer(optimizer, who)
    stateful = state is not None
    loss, state = _adapt_loss(loss_fn, state, who)
    plan = _plan(data, batch_size, num_steps, epochs, who)
    _check_model_labels(loss_fn, data, who)
    log_every = _check_int(log_every, "log_every", who, 1)
    decay = _check_decay(ema_decay, who)
    data = jax.tree.map(jnp.asarray, data)
    perms, step_key = _minibatch_order(key, data_key, plan, who)
    step = _make_step(loss, optimizer, plan, decay, update_ratios, who)

    @jax.jit
    def run_block(carry, steps, data, bad_rows, perms, step_key):
        return jax.lax.scan(lambda c, i: step(c, i, data, bad_rows, perms, step_key), carry, steps)

    bad_rows = _nonfinite_rows(data)

    carry = (params, state, optimizer.init(params), (params if decay is not None else None))
    blocks, evals, eval_steps = [], [], []
    nan_step = -1
    bar = _progress_bar(plan.num_steps, progress)
    try:
        for start in range(0, plan.num_steps, log_every):
            steps = jnp.arange(start, min(start + log_every, plan.num_steps))
            block_start = carry
            carry, outs = run_block(carry, steps, data, bad_rows, perms, step_key)
            outs = jax.tree.map(np.asarray, outs)
            blocks.append(outs)
            bad = np.flatnonzero(outs["nonfinite"])
            if bar is not None:
                bar.update(len(steps))
                bar.set_postfix(loss=f"{outs['loss'][-1]:.4g}")
            if bad.size and nan_step < 0:
                nan_step = start + int(bad[0])
                code, value = outs["nonfinite"][bad[0]], outs["loss"][bad[0]]
                warnings.warn(
                    f"train: NaN/Inf at step {nan_step}"
                    + ("; training stopped" if stop_on_nan else "")
                    + f" (non-finite at that step: {_describe_nonfinite(code, value)})",
                    DivergenceWarning,
                    stacklevel=2,
                )
                if stop_on_nan:
                    # Back to the state before step nan_step: a scan keeps no intermediate
                    # carries, so the block's finite steps are rerun (they are deterministic).
                    carry = block_start
                    if nan_step > start:
                        finite = jnp.arange(start, nan_step)
                        carry, _ = run_block(carry, finite, data, bad_rows, perms, step_key)
                    break
            if eval_fn is not None:
                p, s = carry[0], carry[1]
                result = eval_fn(p, s) if stateful else eval_fn(p)
                if not isinstance(result, dict):
                    raise TypeError(
                        f"train: eval_fn must return a dict of scalar metrics, got "
                        f"{type(result).__name__}"
                    )
                evals.append({k: float(v) for k, v in result.items()})
                eval_steps.append(int(steps[-1]) + 1)
    finally:
        if bar is not None:
            bar.close()
    outs = jax.tree.map(lambda *xs: np.concatenate(xs), *blocks)
    if stop_on_nan and nan_step >= 0:
        outs = jax.tree.map(lambda a: a[: nan_step + 1], outs)
    params, state, _, ema = carry
    names = list(evals[0]) if evals else []
    history = History(
        loss=outs["loss"],
        metrics=outs["metrics"],
        update_ratio=outs.get("update_ratio"),
        nan_step=nan_step,
        eval_step=np.asarray(eval_steps, np.int64),
        eval_metrics={k: np.asarray([e[k] for e in evals]) for k in names},
        state=state,
        ema_params=ema,
        nonfinite=outs["nonfinite"],
    )
    return params, history


class PolyakState(NamedTuple):
    """State of :func:`polyak_average`: the running average of the parameters."""

    average: Any


def polyak_average(decay: float) -> optax.GradientTransformation:
    r"""An optax transform that keeps an EMA (Polyak average) of the parameters in its state.

    .. math:: \bar\theta_t = d\,\bar\theta_{t-1} + (1 - d)\,\theta_t, \qquad \bar\theta_0 = \theta_0

    ``optax.ema`` averages the *updates*, not the parameters; this transform sees the params, so
    chained last it averages the new parameters :math:`\theta_t = \theta_{t-1} + u_t` and passes
    the updates through unchanged. Read the average with :func:`polyak_params`. (:func:`fit` and
    :func:`train` offer the same average through ``ema_decay``.)

    Args:
      decay: :math:`d` in [0, 1).

    Returns:
      An ``optax.GradientTransformation``; put it last in ``optax.chain``.

    Raises:
      ValueError: if decay is outside [0, 1), or update is called without params.

    References:
      Polyak & Juditsky 1992, "Acceleration of stochastic approximation by averaging".

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from jaxnorm import training
      >>> opt = optax.chain(optax.sgd(1.0), training.polyak_average(0.5))
      >>> p = jnp.array(0.0); s = opt.init(p)
      >>> u, s = opt.update(jnp.array(-2.0), s, p)  # new params: 2.0
      >>> training.polyak_params(s)
      Array(1., dtype=float32)
    """
    decay = _check_decay(decay, "polyak_average", "decay")

    def init_fn(params):
        return PolyakState(average=jax.tree.map(jnp.asarray, params))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("polyak_average needs the params: call update(grads, state, params)")
        new = optax.apply_updates(params, updates)
        return updates, PolyakState(optax.incremental_update(new, state.average, 1.0 - decay))

    return optax.GradientTransformation(init_fn, update_fn)


def polyak_params(opt_state: Any) -> Any:
    """The averaged parameters inside an optimizer state that contains a :func:`polyak_average`.

    Raises:
      ValueError: if the state holds no (or more than one) :class:`PolyakState`.
    """
    found = [
        s
        for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, PolyakState))
        if isinstance(s, PolyakState)
    ]
    if len(found) != 1:
        raise ValueError(
            f"polyak_params: expected one PolyakState in the optimizer state (chain "
            f"polyak_average(decay) into the optimizer), found {len(found)}"
        )
    return found[0].average
