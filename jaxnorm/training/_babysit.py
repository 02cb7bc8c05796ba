"""Babysitting checks: the first loss, overfitting a tiny subset, a coarse learning-rate scan."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxnorm import diagnostics
from jaxnorm.training._loop import (
    DivergenceWarning,
    _adapt_loss,
    _check_int,
    _check_model_labels,
    _has_nonfinite,
    _nonfinite_names,
    fit,
)
from jaxnorm.training._model import Model


def check_initial_loss(
    loss_fn: Callable | Model,
    params: Any,
    batch: Any,
    *,
    num_classes: int,
    state: Any = None,
    key: jax.Array | None = None,
    rtol: float = 0.1,
) -> diagnostics.InitialLossCheck:
    r"""Compare a freshly initialised classifier's loss with chance, :math:`\log C`.

    With small random weights the softmax is close to uniform, so the cross-entropy starts at
    :math:`-\log(1/C) = \log C` (2.303 for 10 classes). A loss far from it points at a wrong
    scale of initialisation, labels or loss (the lecture's first sanity check; switch off
    regularisation, which adds to the loss, before checking).

    Use this one when you have the model and a batch (a :class:`Model` or a loss as in
    :func:`fit`): it computes the loss and compares it. When you already hold the loss value
    (a flax model, your own loop), or for a hinge or binary loss, use
    :func:`jaxnorm.diagnostics.check_initial_loss` ``(loss, num_classes)``, which this function
    calls; the two share a name but not a signature.

    Args:
      loss_fn: a :class:`Model` or a loss as in :func:`fit`.
      params: the initial parameters.
      batch: the data to evaluate, e.g. ``(x, y)``.
      num_classes: C.
      state: model state (batch norm), as in :func:`fit`.
      key: the key passed to the loss (default ``jax.random.key(0)``).
      rtol: passes when :math:`|L - \log C| \le \mathrm{rtol} \cdot \log C`.

    Returns:
      :class:`jaxnorm.diagnostics.InitialLossCheck` (``ok``, ``loss``, ``expected``, ``message``),
      from :func:`jaxnorm.diagnostics.check_initial_loss` on the computed loss; not ``ok``, with
      a message naming them, when the parameters, the batch or the model state hold a NaN or
      Inf, even if the loss is finite.

    Raises:
      ValueError: if num_classes < 2 (as :func:`jaxnorm.diagnostics.check_initial_loss`).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxnorm import training
      >>> model = training.mlp([64, 32, 10], init="small_normal")
      >>> params, state = model.init(jax.random.key(0))
      >>> x = jax.random.normal(jax.random.key(1), (128, 64)); y = jnp.arange(128) % 10
      >>> training.check_initial_loss(model, params, (x, y), num_classes=10).ok
      True
    """
    who = "check_initial_loss"
    loss, state = _adapt_loss(loss_fn, state, who)
    _check_model_labels(loss_fn, batch, who)  # while they are concrete
    # One compiled program: run op by op, a CNN's first loss took 2-3x as long (each operation
    # compiled on its own).
    value, _ = jax.jit(loss)(params, state, batch, jax.random.key(0) if key is None else key)
    check = diagnostics.check_initial_loss(value, num_classes, rtol=rtol)
    parts = {"parameters": params, "batch": batch, "model state": state}
    bad = [name for name, tree in parts.items() if bool(_has_nonfinite(tree))]
    if bad:
        return check._replace(
            ok=False,
            message=f"the {' and the '.join(bad)} hold NaN or Inf (loss {check.loss:.4g}); "
            f"fix them before training. {check.message}",
        )
    return check


@dataclasses.dataclass(frozen=True)
class OverfitResult:
    """Outcome of :func:`overfit_small_subset`.

    Attributes:
      passed: the training accuracy reached ``target``.
      accuracy: the final training accuracy on the subset.
      loss: the final loss.
      steps_to_target: the first step whose accuracy reached ``target`` (None if never).
      loss_curve: ``[T]`` per-step loss.
      accuracy_curve: ``[T]`` per-step accuracy.
      nan_step: the first step at which something was NaN or infinite (the loss, a gradient,
        the parameters, ...: see :class:`History`), None when everything stayed finite; a run
        with one does not pass.
      nonfinite: what was NaN or infinite at ``nan_step``, e.g. ``("loss", "gradients")``.
    """

    passed: bool
    accuracy: float
    loss: float
    steps_to_target: int | None
    loss_curve: np.ndarray
    accuracy_curve: np.ndarray
    nan_step: int | None = None
    nonfinite: tuple = ()

    def __str__(self) -> str:
        if self.nan_step is not None:
            return (
                f"overfit check FAILED: NaN/Inf at step {self.nan_step} "
                f"({', '.join(self.nonfinite)}); the model, the data or the update produce "
                "non-finite values"
            )
        if self.passed:
            return (
                f"overfit check passed: accuracy {self.accuracy:.0%} at step "
                f"{self.steps_to_target}, final loss {self.loss:.3g}"
            )
        return (
            f"overfit check FAILED: accuracy {self.accuracy:.0%} after {len(self.loss_curve)} "
            f"steps (loss {self.loss:.3g}); the model or the training code cannot fit 20 examples"
        )


def overfit_small_subset(
    loss_fn: Callable | Model,
    params: Any,
    optimizer: optax.GradientTransformation,
    data: Any,
    *,
    key: jax.Array,
    num_examples: int = 20,
    num_steps: int = 200,
    state: Any = None,
    target: float = 1.0,
) -> OverfitResult:
    """The lecture's sanity check: a model must overfit a tiny subset (train accuracy 100%).

    Trains full-batch on the first ``num_examples`` examples of ``data`` (use the optimizer
    without weight decay or other regularisation). If the accuracy does not reach ``target``,
    something is broken (the model, the loss, or the update).

    Args:
      loss_fn: a :class:`Model`, or a loss as in :func:`fit` that returns ``{"accuracy": ...}``.
      params: the initial parameters.
      optimizer: any optax ``GradientTransformation``.
      data: ``(x, y)`` (any pytree with a leading axis N >= num_examples).
      key: PRNG key passed to the loss.
      num_examples: the subset size (20 in the lecture).
      num_steps: full-batch steps.
      state: model state (batch norm), as in :func:`fit`.
      target: the accuracy to reach.

    Returns:
      An :class:`OverfitResult` (``passed``, the final accuracy and loss, the curves, the first
      NaN/Inf step). A run that met a NaN or Inf anywhere (see :func:`fit`) does not pass.

    Raises:
      TypeError: if target is not a number.
      ValueError: if the loss reports no accuracy, data has fewer than num_examples examples, or
        target is outside (0, 1].

    Warns:
      DivergenceWarning: when the run met a NaN or Inf, naming the step and what held it.

    Example:
      >>> import jax, optax
      >>> from jaxnorm import training
      >>> x = jax.random.normal(jax.random.key(0), (20, 8)); y = jax.numpy.arange(20) % 4
      >>> model = training.mlp([8, 32, 4])
      >>> params, _ = model.init(jax.random.key(1))
      >>> training.overfit_small_subset(model, params, optax.adam(1e-2), (x, y),
      ...                               key=jax.random.key(2)).passed
      True
    """
    who = "overfit_small_subset"
    num_examples = _check_int(num_examples, "num_examples", who, 1)
    # An accuracy is in [0, 1]: a target above 1 (or NaN) would train and fail by construction.
    if isinstance(target, bool) or not isinstance(target, int | float | np.integer | np.floating):
        raise TypeError(f"{who}: target must be an accuracy in (0, 1], got {target!r}")
    if not 0 < target <= 1:
        raise ValueError(f"{who}: target must be an accuracy in (0, 1], got {target!r}")
    n = jax.tree.leaves(data)[0].shape[0]
    if n < num_examples:
        raise ValueError(f"{who}: data has {n} examples, fewer than num_examples={num_examples}")
    subset = jax.tree.map(lambda a: jnp.asarray(a)[:num_examples], data)
    _, hist = jax.jit(
        lambda p, s, k: fit(loss_fn, p, optimizer, subset, key=k, num_steps=num_steps, state=s)
    )(params, state, key)
    if hist.accuracy is None:
        raise ValueError(
            f"{who}: the loss reports no accuracy; return (loss, {{'accuracy': acc}}) from it, "
            "or pass a Model"
        )
    acc = np.asarray(hist.accuracy)
    reached = np.flatnonzero(acc >= target)
    nan_step = int(hist.nan_step)
    nonfinite = hist.nonfinite_parts
    if nan_step >= 0:
        warnings.warn(
            f"{who}: NaN/Inf at step {nan_step} ({', '.join(nonfinite)}); the check fails",
            DivergenceWarning,
            stacklevel=2,
        )
    return OverfitResult(
        passed=bool(reached.size) and nan_step < 0,
        accuracy=float(acc[-1]),
        loss=float(hist.loss[-1]),
        steps_to_target=int(reached[0]) if reached.size else None,
        loss_curve=np.asarray(hist.loss),
        accuracy_curve=acc,
        nan_step=nan_step if nan_step >= 0 else None,
        nonfinite=nonfinite,
    )


@dataclasses.dataclass(frozen=True)
class LearningRateScan:
    """Outcome of :func:`learning_rate_scan`.

    Attributes:
      learning_rates: ``[L]`` the rates tried, increasing.
      loss_ratio: ``[L]`` final loss / first loss (NaN when the run diverged).
      status: per rate, ``"too_low"`` (loss not going down), ``"ok"``, or ``"too_high"``
        (loss exploding or NaN, or not going down above the best rate).
      too_low: ``(lo, hi)`` range of rates where the loss did not go down, or None.
      too_high: ``(lo, hi)`` range where it exploded or became NaN, or None.
      suggested: ``(lo, hi)`` the rates that worked, or None; search inside it.
      best: the rate with the lowest final loss.
      losses: ``[L, T]`` the loss curves.
      nan_step: ``[L]`` per rate, the first step at which something was NaN or infinite (the
        loss, a gradient, the parameters, ...: see :class:`History`), -1 when nothing was; such
        a rate is ``"too_high"``.
    """

    learning_rates: np.ndarray
    loss_ratio: np.ndarray
    status: tuple
    too_low: tuple | None
    too_high: tuple | None
    suggested: tuple | None
    best: float | None
    losses: np.ndarray
    nan_step: np.ndarray | None = None

    def __str__(self) -> str:
        rows = ["learning rate   final/initial loss   status"]
        for lr, r, s in zip(self.learning_rates, self.loss_ratio, self.status, strict=True):
            rows.append(f"{lr:13.3g}   {r:18.4g}   {s}")

        def rng(r):
            if r is None:
                return "none"
            lo, hi = f"{r[0]:.3g}", f"{r[1]:.3g}"
            return lo if lo == hi else f"[{lo}, {hi}]"  # a range of one learning rate: that rate

        rows.append(
            f"loss not going down (too low): {rng(self.too_low)}; exploding / NaN (too high): "
            f"{rng(self.too_high)}; suggested range: {rng(self.suggested)}"
        )
        return "\n".join(rows)


def learning_rate_scan(
    loss_fn: Callable | Model,
    params: Any,
    data: Any,
    *,
    key: jax.Array,
    make_optimizer: Callable[[Any], optax.GradientTransformation] = optax.sgd,
    learning_rates: Any = None,
    num_steps: int = 100,
    batch_size: int | None = None,
    state: Any = None,
    min_decrease: float = 0.1,
    explode_ratio: float = 1.5,
) -> LearningRateScan:
    """A coarse scan over log-spaced learning rates, all trained at once with ``vmap``.

    Every rate starts from the same ``params`` and minibatch order and trains ``num_steps``
    steps. With ``r`` = (mean loss of the last tenth of the steps) / (first loss): a rate whose
    run met a NaN or Inf anywhere (loss, gradients, parameters, optimizer or model state: see
    :func:`fit`) or whose loss grew (``r > explode_ratio``) is too high; one whose loss went down by
    less than ``min_decrease`` (``r > 1 - min_decrease``) is too low when below the best rate
    and too high above it (the loss bounces); the rest are ok. The lecture's picture: too low,
    the loss barely moves; too high, it explodes.

    Args:
      loss_fn: a :class:`Model` or a loss as in :func:`fit`.
      params: the initial parameters (shared by every rate).
      data: the training data, e.g. ``(x, y)``.
      key: PRNG key (the same minibatches for every rate).
      make_optimizer: ``make_optimizer(learning_rate) -> GradientTransformation``; it receives a
        traced scalar (optax's optimizers accept one), e.g. ``optax.sgd`` or
        ``lambda lr: optax.adam(lr)``.
      learning_rates: the rates (default ``10 ** arange(-6, 2)``: 1e-6 ... 10).
      num_steps: steps per rate.
      batch_size: minibatch size (None: full batch).
      state: model state (batch norm), as in :func:`fit`.
      min_decrease: the relative decrease below which the loss is "not going down".
      explode_ratio: the growth above which the loss is "exploding".

    Returns:
      A :class:`LearningRateScan` (ranges, suggested range, curves, a printable table).

    Raises:
      ValueError: if a rate is not positive and finite, or none is given.

    Warns:
      DivergenceWarning: when even the smallest rate's run met a NaN or Inf: then the data,
        the initial parameters or the model, not the rate, produce it.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxnorm import training
      >>> x = jax.random.normal(jax.random.key(0), (64, 4)); y = (x[:, 0] > 0).astype(jnp.int32)
      >>> model = training.mlp([4, 16, 2])
      >>> params, _ = model.init(jax.random.key(1))
      >>> scan = training.learning_rate_scan(model, params, (x, y), key=jax.random.key(2),
      ...                                    learning_rates=[1e-5, 1e-1, 1e4], num_steps=50)
      >>> scan.status
      ('too_low', 'ok', 'too_high')
    """
    who = "learning_rate_scan"
    lrs = np.asarray(
        10.0 ** np.arange(-6, 2) if learning_rates is None else learning_rates, np.float64
    )
    if lrs.ndim != 1 or lrs.size == 0 or not np.all(np.isfinite(lrs)) or np.any(lrs <= 0):
        raise ValueError(
            f"{who}: learning_rates must be a non-empty 1-D list of positive finite numbers, "
            f"got {learning_rates!r}"
        )
    lrs = np.sort(lrs)

    def one(lr):
        _, hist = fit(
            loss_fn,
            params,
            make_optimizer(lr),
            data,
            key=key,
            num_steps=num_steps,
            batch_size=batch_size,
            state=state,
        )
        return hist.loss, hist.nan_step, hist.nonfinite

    losses, nan_step, codes = jax.jit(jax.vmap(one))(jnp.asarray(lrs, jnp.float32))
    losses = np.asarray(losses, np.float64)
    nan_step, codes = np.asarray(nan_step), np.asarray(codes)
    if nan_step[0] >= 0:
        parts = ", ".join(_nonfinite_names(codes[0, nan_step[0]]))
        warnings.warn(
            f"{who}: even the smallest rate, {lrs[0]:.3g}, met NaN/Inf at step {nan_step[0]} "
            f"({parts}): the data, the initial parameters or the model give non-finite values "
            "whatever the rate",
            DivergenceWarning,
            stacklevel=2,
        )
    tail = max(1, losses.shape[1] // 10)
    finite = np.all(np.isfinite(losses), axis=1) & (nan_step < 0)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        ratio = np.where(finite, losses[:, -tail:].mean(axis=1) / losses[:, 0], np.nan)
    ok_ratio = finite & (ratio <= explode_ratio)
    best_i = int(np.nanargmin(np.where(ok_ratio, ratio, np.nan))) if ok_ratio.any() else None
    status = []
    for i in range(len(lrs)):
        if not ok_ratio[i]:
            status.append("too_high")
        elif ratio[i] > 1.0 - min_decrease:
            status.append("too_low" if best_i is None or i < best_i else "too_high")
        else:
            status.append("ok")

    def span(name):
        sel = lrs[[s == name for s in status]]
        return (float(sel.min()), float(sel.max())) if sel.size else None

    return LearningRateScan(
        learning_rates=lrs,
        loss_ratio=ratio,
        status=tuple(status),
        too_low=span("too_low"),
        too_high=span("too_high"),
        suggested=span("ok"),
        best=None if best_i is None else float(lrs[best_i]),
        losses=losses,
        nan_step=nan_step,
    )
