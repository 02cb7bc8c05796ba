"""Fresh batch-norm running statistics for averaged parameters (PyTorch's ``update_bn``).

Parameters averaged by Polyak/EMA, or across snapshots, were never the parameters the running
statistics were gathered with: the statistics must be recomputed with one pass over data.
:func:`update_batch_stats` does it for a :class:`~jaxnorm.training.Model` (or any
``apply(params, state, x, *, train)``), a ``flax.linen`` module and a ``flax.nnx`` module.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxnorm import _checks
from jaxnorm.training._model import Model

# The probe that finds layers the training pass leaves alone: statistics fed this value come back
# with it exactly only when the layer does not update them (m = 1, or an eval-mode layer).
_FROZEN_PROBE = 2.0**64
# The probe that reads each statistic's momentum m: fed 2**(e + 40), with |(1 - m) batch| < 2**e,
# the update m * old + (1 - m) * batch rounds to m * 2**(e + 40) exactly (for m >= 2**-15).
_MOMENTUM_PROBE_BITS = 40


def _is_linen(obj) -> bool:
    linen = sys.modules.get("flax.linen")  # a linen module exists only if flax.linen was imported
    return linen is not None and isinstance(obj, linen.Module)


def _is_nnx(obj) -> bool:
    nnx = sys.modules.get("flax.nnx")
    return nnx is not None and isinstance(obj, nnx.Module)


def _input_of(batch):
    """The model's input in a batch: the batch itself, or its first element as PyTorch reads it."""
    return batch[0] if isinstance(batch, list | tuple) else batch


class _Layout:
    """The state's leaves: floating (statistics), integer (counts) and the rest (kept)."""

    def __init__(self, state, who):
        self.leaves, self.treedef = jax.tree.flatten(state)
        self.kinds = []
        for leaf in self.leaves:
            dtype = jnp.result_type(leaf)
            if jnp.issubdtype(dtype, jnp.floating):
                self.kinds.append("float")
            elif jnp.issubdtype(dtype, jnp.integer):
                self.kinds.append("int")
            else:
                self.kinds.append("other")
        if "float" not in self.kinds:
            raise ValueError(
                f"{who}: the state holds no floating running statistics (its structure is "
                f"{self.treedef}); pass the batch-norm state (BatchNormState leaves, linen's "
                f"'batch_stats' collection)"
            )
        # Statistics are recomputed in at least float32: a float16 running variance cannot hold
        # the probes, and a cumulative average in bfloat16 would round away most batches.
        self.dtypes = [jnp.result_type(leaf) for leaf in self.leaves]
        self.work = [
            _checks.compute_dtype(d) if k == "float" else d
            for d, k in zip(self.dtypes, self.kinds, strict=True)
        ]

    def build(self, floats, ints):
        out, fi, ii = [], iter(floats), iter(ints)
        for leaf, kind in zip(self.leaves, self.kinds, strict=True):
            out.append(next(fi) if kind == "float" else next(ii) if kind == "int" else leaf)
        return jax.tree.unflatten(self.treedef, out)

    def split(self, state, who):
        leaves, treedef = jax.tree.flatten(state)
        if treedef != self.treedef:
            raise ValueError(
                f"{who}: the training pass returned a state of structure {treedef}, not the "
                f"structure given ({self.treedef})"
            )
        floats = [
            jnp.asarray(v).astype(w)
            for v, k, w in zip(leaves, self.kinds, self.work, strict=True)
            if k == "float"
        ]
        ints = [jnp.asarray(v) for v, k in zip(leaves, self.kinds, strict=True) if k == "int"]
        return floats, ints

    def originals(self):
        floats = [
            jnp.asarray(v).astype(w)
            for v, k, w in zip(self.leaves, self.kinds, self.work, strict=True)
            if k == "float"
        ]
        ints = [jnp.asarray(v) for v, k in zip(self.leaves, self.kinds, strict=True) if k == "int"]
        return floats, ints

    def zero_ints(self):
        return [
            jnp.zeros(np.shape(v), d)
            for v, k, d in zip(self.leaves, self.kinds, self.dtypes, strict=True)
            if k == "int"
        ]


def _calibrate(run, layout, x, aux, who):
    """On the first batch: which statistics the pass updates, their momentum, the first batch's.

    Returns ``(frozen, weight, batch_stats, counts, aux)``: per floating leaf, where the pass
    leaves the value alone, the weight 1 - m it gives the batch, and the batch's own statistic
    (the update of a zero state divided by 1 - m).
    """
    orig, _ = layout.originals()
    zero_ints = layout.zero_ints()
    # 1. Layers that do not update (eval mode, momentum 1) return the probe exactly.
    big = [jnp.full(o.shape, _FROZEN_PROBE, o.dtype) for o in orig]
    out, _ = run(layout.build(big, zero_ints), x, aux)
    frozen = [n == b for n, b in zip(layout.split(out, who)[0], big, strict=True)]
    # 2. From a zero state (a frozen layer keeps its own values): m * 0 + (1 - m) * batch.
    base = [jnp.where(f, o, jnp.zeros_like(o)) for f, o in zip(frozen, orig, strict=True)]
    out, new_aux = run(layout.build(base, zero_ints), x, aux)
    scaled, counts = layout.split(out, who)
    # 3. From 2**(e + 40), same batch (same aux, so the same dropout masks): m * 2**(e + 40).
    probes = []
    for f, o, s in zip(frozen, orig, scaled, strict=True):
        _, e = jnp.frexp(jnp.abs(s))
        e = jnp.where(s == 0, jnp.zeros_like(e), e)
        p = jnp.ldexp(jnp.ones_like(s), e + _MOMENTUM_PROBE_BITS)
        probes.append(jnp.where(f, o, p))
    out, _ = run(layout.build(probes, zero_ints), x, aux)
    weights, batch = [], []
    for f, p, n, s in zip(frozen, probes, layout.split(out, who)[0], scaled, strict=True):
        keep = jnp.where(f, jnp.ones_like(p), n / jnp.where(f, jnp.ones_like(p), p))
        w = 1 - keep
        safe_w = jnp.where(f, jnp.ones_like(w), w)
        weights.append(w)
        batch.append(jnp.where(f, jnp.zeros_like(s), s / safe_w))
    return frozen, weights, batch, counts, new_aux


def _one_batch(run, layout, x, aux, frozen, weights, who):
    orig, _ = layout.originals()
    base = [jnp.where(f, o, jnp.zeros_like(o)) for f, o in zip(frozen, orig, strict=True)]
    out, new_aux = run(layout.build(base, layout.zero_ints()), x, aux)
    scaled, counts = layout.split(out, who)
    batch = [
        jnp.where(f, jnp.zeros_like(s), s / jnp.where(f, jnp.ones_like(w), w))
        for f, w, s in zip(frozen, weights, scaled, strict=True)
    ]
    return batch, counts, new_aux


def _average(avg, batch, k):
    # PyTorch's momentum=None: running = (1 - 1/k) running + (1/k) batch, k = batches so far.
    out = []
    for a, b in zip(avg, batch, strict=True):
        f = 1 / k.astype(a.dtype)
        out.append((1 - f) * a + f * b)
    return out


def _finish(layout, frozen, avg, counts, who):
    orig_f, orig_i = layout.originals()
    floats = [jnp.where(f, o, a) for f, o, a in zip(frozen, orig_f, avg, strict=True)]
    # A count the pass never moved (a frozen layer's) keeps its value; others count the batches.
    ints = [jnp.where(c == 0, o, c) for c, o in zip(counts, orig_i, strict=True)]
    out = []
    fi, ii = iter(floats), iter(ints)
    for leaf, kind, dtype in zip(layout.leaves, layout.kinds, layout.dtypes, strict=True):
        if kind == "float":
            out.append(next(fi).astype(dtype))
        elif kind == "int":
            out.append(next(ii).astype(dtype))
        else:
            out.append(leaf)
    return jax.tree.unflatten(layout.treedef, out)


def _check_something_updates(frozen, who):
    if any(_checks.is_tracer(f) for f in frozen):
        return
    if all(bool(np.all(np.asarray(f))) for f in frozen):
        raise ValueError(
            f"{who}: the training-mode pass updated none of the running statistics; call the "
            f"model in training mode (train=True, use_running_average=False: for a linen "
            f"module, e.g. apply_kwargs={{'train': True}})"
        )


def _recompute(run, state, batches, aux, who):
    """The cumulative average of every batch's statistics (the core; see update_batch_stats)."""
    layout = _Layout(state, who)
    if isinstance(batches, jax.Array | np.ndarray):
        xs = jnp.asarray(batches)
        if xs.ndim < 1 or xs.shape[0] < 1:
            raise ValueError(
                f"{who}: stacked batches need a leading batch axis with at least one batch, "
                f"got an array of shape {xs.shape}"
            )
        calibrate = jax.jit(lambda x, aux: _calibrate(run, layout, x, aux, who))
        frozen, weights, avg, counts, aux = calibrate(xs[0], aux)
        _check_something_updates(frozen, who)

        def body(carry, x):
            avg, counts, aux, k = carry
            batch, new_counts, aux = _one_batch(run, layout, x, aux, frozen, weights, who)
            k = k + 1
            counts = [c + n for c, n in zip(counts, new_counts, strict=True)]
            return (_average(avg, batch, k), counts, aux, k), None

        k0 = jnp.ones((), jnp.int32)
        (avg, counts, _, _), _ = jax.lax.scan(body, (avg, counts, aux, k0), xs[1:])
        return _finish(layout, frozen, avg, counts, who)

    if isinstance(batches, str | bytes | Mapping) or not isinstance(batches, Iterable):
        raise TypeError(
            f"{who}: batches must be an array of stacked batches [K, B, ...] or an iterable of "
            f"batches (arrays, or (x, y) tuples whose first element is the input), got "
            f"{type(batches).__name__}"
        )
    iterator = iter(batches)
    try:
        first = next(iterator)
    except StopIteration:
        raise ValueError(f"{who}: batches is empty; give at least one batch") from None
    calibrate = jax.jit(lambda x, aux: _calibrate(run, layout, x, aux, who))
    frozen, weights, avg, counts, aux = calibrate(jnp.asarray(_input_of(first)), aux)
    _check_something_updates(frozen, who)

    @jax.jit
    def step(avg, counts, aux, k, x):
        batch, new_counts, aux = _one_batch(run, layout, x, aux, frozen, weights, who)
        counts = [c + n for c, n in zip(counts, new_counts, strict=True)]
        return _average(avg, batch, k), counts, aux

    k = 1
    for batch in iterator:
        k += 1
        avg, counts, aux = step(avg, counts, aux, jnp.asarray(k, jnp.int32), _input_of(batch))
    return _finish(layout, frozen, avg, counts, who)


def update_batch_stats(
    model: Any,
    *args: Any,
    key: jax.Array | None = None,
    apply_kwargs: Mapping[str, Any] | None = None,
) -> Any:
    r"""Recompute batch-norm running statistics in one pass over data (PyTorch's ``update_bn``).

    .. math::
        \mu = \frac1K\sum_{k=1}^K \mu_{B_k}, \qquad
        \sigma^2 = \frac1K\sum_{k=1}^K \sigma^2_{B_k}

    Parameters averaged by Polyak/EMA (:func:`polyak_average`), or across snapshots, were never
    the parameters that produced the running statistics, and a batch-norm network evaluated with
    the old statistics can be far worse than either end point. As
    ``torch.optim.swa_utils.update_bn`` does (reset the statistics, ``momentum=None``, one pass in
    training mode), this runs the model in training mode over ``batches`` and returns the
    cumulative average of every layer's per-batch statistics, each batch weighted equally (a
    smaller last batch counts as much as a full one, as in PyTorch). Integer leaves (batch
    counts, PyTorch's ``num_batches_tracked``) count the batches.

    Three forms:

    - ``update_batch_stats(model, params, state, batches)`` for a :class:`Model` (from
      :func:`mlp`, :func:`from_linen`, :func:`from_nnx`) or an apply function with the same
      signature, ``apply(params, state, x, *, train) -> (out, new_state)``; returns the new
      ``state``. With ``key`` it is called with ``key=jax.random.fold_in(key, k)`` for batch k
      (the adapters' dropout streams).
    - ``update_batch_stats(module, params, batch_stats, batches)`` for a ``flax.linen.Module``:
      ``params`` is ``variables["params"]``, ``batch_stats`` ``variables["batch_stats"]``; the
      module runs as ``module.apply({"params": params, "batch_stats": s}, x,
      mutable=["batch_stats"], **apply_kwargs)`` (so pass its mode:
      ``apply_kwargs={"train": True}``; with ``key``, ``rngs={"dropout": ...}`` as well). Returns
      the new ``batch_stats``.
    - ``update_batch_stats(model, batches)`` for a ``flax.nnx.Module``: a copy of the model in
      ``train()`` mode is called on each batch (``model(x, **apply_kwargs)``) and the model's
      ``nnx.BatchStat`` variables are updated in place (as PyTorch's function updates its module);
      returns None. The model's mode, parameters and random streams are left as they were.

    ``batches``: an array of stacked batches ``[K, B, ...]``, read in one ``lax.scan``, so the
    whole computation is pure and runs under ``jit`` (the first two forms); or any iterable of
    batches (a list, a generator, a data loader), each an array or an ``(x, y, ...)`` tuple whose
    first element is the input, read by a Python loop over a jitted step (one compile per batch
    shape).

    How the statistics are read. Each layer is only seen through the state its training pass
    returns, ``m * old + (1 - m) * batch`` (Flax's and jaxnorm's update; any momentum, any
    architecture): run from a zero state, it gives ``(1 - m) * batch``; run once more from a
    power of two large enough that the batch term rounds away, it gives ``m`` exactly; the
    batch's statistic is the first divided by ``1 - m``. That costs two extra forward passes (K +
    2 in all). The layer computes ``1 - m`` from its own momentum (a Python float, in flax and
    jaxnorm), which can differ from float32's ``1 - m`` by 2**-25: the result's relative error is
    up to ``2**-25 / (1 - m)``, 2.2e-7 for m = 0.9, 9.3e-7 for 0.99, 1.3e-5 for 0.999, below the
    float32 rounding of the average itself for the first two. Statistics the pass leaves alone (a
    layer in eval mode inside a training pass, momentum 1) are returned unchanged, and the other
    layers see them with their values.

    Biased or unbiased variance: the average is of whatever each layer feeds its running
    variance. Flax's BatchNorm and jaxnorm's (:func:`jaxnorm.batchnorm.batch_norm`, the modules,
    :func:`mlp`) feed the biased batch variance, so the result is the average of biased
    variances; PyTorch's BatchNorm feeds the unbiased one (:math:`\sigma^2_B\,n/(n-1)`), and its
    ``update_bn`` averages those. To reproduce PyTorch's numbers, build the layers with
    ``unbiased_running_var=True`` (``jaxnorm.nn.BatchNorm``, ``jaxnorm.nnx.BatchNorm``,
    ``batch_norm``): the tests check this against ``torch.optim.swa_utils.update_bn``.

    Args:
      model: a :class:`Model` or apply function, a ``flax.linen.Module`` or a
        ``flax.nnx.Module`` (see the three forms).
      *args: ``params, state, batches`` (the first two forms) or ``batches`` (nnx).
      key: a PRNG key for the training pass's randomness (dropout), folded with the batch index;
        None: the model is called without one (nnx: its own streams are used).
      apply_kwargs: keyword arguments for the call (linen's ``apply`` or the nnx model's
        ``__call__``), e.g. ``{"train": True}``.

    Returns:
      The new state (a :class:`Model` or apply function), the new ``batch_stats`` (linen), or
      None (nnx, updated in place), with the dtypes and structure given.

    Raises:
      TypeError: a model of another kind, the wrong number of positional arguments, batches that
        are neither an array nor an iterable.
      ValueError: no batches; a state without floating statistics or a training pass that
        updates none of them (when the statistics are concrete; a model not in training mode,
        e.g. linen without ``apply_kwargs={"train": True}``); a returned state of another
        structure.

    References:
      Izmailov, Podoprikhin, Garipov, Vetrov & Wilson 2018, "Averaging weights leads to wider
      optima and better generalization" (SWA, section 3.2, batch normalization);
      ``torch.optim.swa_utils.update_bn``; Ioffe & Szegedy 2015.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxnorm import training
      >>> model = training.mlp([4, 8, 3], batch_norm=True)
      >>> params, state = model.init(jax.random.key(0))
      >>> batches = jax.random.normal(jax.random.key(1), (5, 32, 4)) + 3.0  # 5 batches of 32
      >>> state = training.update_batch_stats(model, params, state, batches)
      >>> state[0].count  # every batch counted, as PyTorch's num_batches_tracked
      Array(5, dtype=int32)
    """
    who = "update_batch_stats"
    if apply_kwargs is not None and not isinstance(apply_kwargs, Mapping):
        raise TypeError(
            f"{who}: apply_kwargs must be a dict of keyword arguments, got {apply_kwargs!r}"
        )
    kwargs = dict(apply_kwargs or {})
    if key is not None:
        _check_key(key, who)

    if _is_nnx(model):
        if len(args) != 1:
            raise TypeError(
                f"{who}: for an nnx model call update_batch_stats(model, batches) (the model "
                f"holds its parameters and statistics), got {len(args)} positional arguments "
                f"after the model"
            )
        _update_nnx(model, args[0], kwargs, key, who)
        return None
    if len(args) != 3:
        raise TypeError(
            f"{who}: call update_batch_stats(model, params, state, batches) (or "
            f"update_batch_stats(nnx_model, batches)), got {len(args)} positional arguments "
            f"after the model"
        )
    params, state, batches = args
    if _is_linen(model):
        return _update_linen(model, params, state, batches, kwargs, key, who)
    apply = model.apply if isinstance(model, Model) else model
    if not callable(apply):
        raise TypeError(
            f"{who}: model must be a jaxnorm.training.Model, an apply function "
            f"apply(params, state, x, *, train), a flax.linen.Module or a flax.nnx.Module; got "
            f"{type(model).__name__}"
        )

    def run(s, x, k):
        kw = dict(kwargs)
        if key is not None:
            kw["key"] = jax.random.fold_in(key, k)
        _, new_state = apply(params, s, x, train=True, **kw)
        return new_state, k + 1

    return _recompute(run, state, batches, jnp.zeros((), jnp.int32), who)


def _check_key(key, who):
    dtype = getattr(key, "dtype", None)
    if dtype is None or not (
        jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
        or (dtype == np.uint32 and np.shape(key) == (2,))
    ):
        raise TypeError(f"{who}: key must be a PRNG key such as jax.random.key(0), got {key!r}")


def _update_linen(module, params, batch_stats, batches, kwargs, key, who):
    if not isinstance(batch_stats, Mapping) or not batch_stats:
        raise ValueError(
            f"{who}: for a linen module pass the 'batch_stats' collection as the state "
            f"(variables['batch_stats']), got {type(batch_stats).__name__}"
            + (" (empty)" if isinstance(batch_stats, Mapping) else "")
        )

    def run(s, x, k):
        kw = dict(kwargs)
        if key is not None:
            kw["rngs"] = {"dropout": jax.random.fold_in(key, k)}
        _, mutated = module.apply(
            {"params": params, "batch_stats": s}, x, mutable=["batch_stats"], **kw
        )
        return mutated["batch_stats"], k + 1

    return _recompute(run, batch_stats, batches, jnp.zeros((), jnp.int32), who)


def _update_nnx(model, batches, kwargs, key, who):
    from flax import nnx

    graphdef, stats, rng_state, rest = nnx.split(model, nnx.BatchStat, nnx.RngState, ...)
    if key is not None:
        raise TypeError(
            f"{who}: an nnx model draws from its own random streams (nnx.Rngs); key is for the "
            f"other forms"
        )

    def run(s, x, rngs):
        copy = nnx.merge(graphdef, s, rngs, rest)
        copy.train()
        copy(x, **kwargs)
        _, new_stats, new_rngs, _ = nnx.split(copy, nnx.BatchStat, nnx.RngState, ...)
        return new_stats, new_rngs

    new = _recompute(run, stats, batches, rng_state, who)
    nnx.update(model, new)


__all__ = ["update_batch_stats"]
