"""The lab's experiments on training: convergence, batch norm, babysitting, search, ensembles.

Every experiment trains small MLPs (:func:`jaxnorm.training.mlp`) on scikit-learn's digits
(:func:`jaxnorm.data.digits`, normalised with :func:`jaxnorm.preprocessing.normalize` fitted on
the training split). As in :mod:`jaxnorm.lab.setup_experiments`, each is
``f(key, *, quick=False) -> NamedTuple`` of host numbers and NumPy arrays, with a ``*_verdict``
and a ``*_table``; plots live in :mod:`jaxnorm.lab.plots`. Hyperparameters are common defaults
fixed in advance (SGD with momentum 0.9, learning rate 0.01, batch 32, ...), never tuned to make
a result agree with the lecture.

References:
  CS231n, "Training Neural Networks, Part 1" and "Part 2" (Stanford, 2016-2017).
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxnorm import diagnostics, initializers, preprocessing, training
from jaxnorm.lab._util import (
    TIE,
    Stopwatch,
    Verdict,
    as_key,
    beats,
    block,
    compile_all,
    fmt_floor,
    fmt_number,
    init_label,
    jit,
    verdict_from_checks,
)

_NUM_CLASSES = 10


@functools.lru_cache(maxsize=4)
def _digits(seed: int = 0):
    """Normalised digits ``(train, val, test)`` as NumPy ``(x, y)`` pairs (fitted on train)."""
    from jaxnorm import data  # scikit-learn (the lab extra), imported when the digits are needed

    splits = data.digits(seed=seed)
    t = preprocessing.normalize()
    state = t.fit(splits.train.x)
    return tuple((np.asarray(t.apply(state, s.x)), np.asarray(s.y)) for s in splits)


def _median_or_none(values):
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if len(finite) <= len(values) // 2:  # most runs never got there: the median is "never"
        return None
    padded = sorted(finite) + [math.inf] * (len(values) - len(finite))
    m = float(np.median(padded))
    return m if math.isfinite(m) else None


# ---------------------------------------------------------------------------------------------
# 2. ReLU against sigmoid and tanh


class Convergence(NamedTuple):
    """Result of :func:`relu_convergence`.

    Attributes:
      activations: ``("relu", "tanh", "sigmoid")``.
      init: the jaxnorm initializer of each, the recommended one: ``"he_normal"`` (He) for
        ReLU, ``"xavier_normal"`` (Glorot, sqrt(2 / (fan_in + fan_out)), not the
        lecture's "Xavier" 1/sqrt(fan_in), which is ``lecun_normal``) for tanh and sigmoid.
      epoch_accuracy: ``[A, S, E]`` training accuracy per epoch (mean over the epoch's
        minibatches) for each activation and seed.
      target: the training accuracy to reach.
      epochs_to_target: per activation, the median over seeds of the first epoch (1-based) whose
        accuracy reaches ``target``; None when most seeds never reach it.
      seconds_per_epoch: per activation, the measured wall time of one epoch: the compiled
        program, all seeds at once, after one untimed call (compilation and the first call's
        one-time costs excluded), best of 3 runs, divided by the number of seeds. Quick mode
        compiles without XLA optimisations and times one run, so its timings mean less.
      seconds_to_target: ``epochs_to_target * seconds_per_epoch`` (None when not reached).
      epoch_ratio_to_tanh: epochs_to_target over tanh's (None when either is None).
      time_ratio_to_tanh: seconds_to_target over tanh's.
      widths, learning_rate, batch_size, epochs, num_seeds: the set-up.
      depths: the numbers of hidden layers of the depth sweep (ReLU + He against tanh +
        Glorot, no batch norm, ``depth_width`` units a layer, ``depth_epochs`` epochs,
        ``depth_seeds`` seeds, the same optimizer and target); empty in quick mode (not run).
      depth_epoch_accuracy: ``[2, D, S, E]`` training accuracy per epoch (ReLU first).
      depth_epochs_to_target: ``[2, D]`` median epochs to the target (None: most seeds never).
      depth_width, depth_epochs, depth_seeds: the sweep's set-up.
    """

    activations: tuple
    init: tuple
    epoch_accuracy: np.ndarray
    target: float
    epochs_to_target: tuple
    seconds_per_epoch: tuple
    seconds_to_target: tuple
    epoch_ratio_to_tanh: tuple
    time_ratio_to_tanh: tuple
    widths: tuple
    learning_rate: float
    batch_size: int
    epochs: int
    num_seeds: int
    depths: tuple
    depth_epoch_accuracy: np.ndarray
    depth_epochs_to_target: tuple
    depth_width: int
    depth_epochs: int
    depth_seeds: int


_CONVERGENCE_ACTS = (("relu", "he_normal"), ("tanh", "xavier_normal"), ("sigmoid", "xavier_normal"))


def _sgd_accuracy(model, key, x, y, lr, epochs, batch):
    """Per-step training accuracy of ``model`` initialised and trained (SGD, momentum 0.9) from
    one key, as the convergence experiments run every activation and depth."""
    k_init, k_fit = jax.random.split(key)
    params, state = model.init(k_init)
    _, hist = training.fit(
        model,
        params,
        optax.sgd(lr, momentum=0.9),
        (x, y),
        key=k_fit,
        epochs=epochs,
        batch_size=batch,
        state=state,
    )
    return hist.accuracy


def relu_convergence(key: Any = 0, *, quick: bool = False) -> Convergence:
    """The same MLP on digits with ReLU, tanh and sigmoid: epochs and time to a training accuracy.

    ``mlp([64, H, H, 10])`` trained with SGD (momentum 0.9, learning rate 0.01, batch 32) from the
    same seeds; only the activation (and its recommended initializer: He, ``he_normal``, for
    ReLU; Glorot, ``xavier_normal``, for tanh and sigmoid) changes. The target is 95%
    training accuracy. The time per epoch is measured on the compiled program, so the time ratio
    includes the cost of each nonlinearity (sigmoid's and tanh's exp).

    Args:
      key: PRNG key or int seed.
      quick: one hidden layer of 32 units, 5 epochs, 1 seed (instead of two of 100 units, 25
        epochs, 3 seeds).

    Returns:
      A :class:`Convergence`.

    References:
      Krizhevsky, Sutskever & Hinton 2012 (ReLU reaches 25% training error six times faster than
      tanh on CIFAR-10).
    """
    key = as_key(key)
    (x, y), _, _ = _digits(0)
    hidden, depth, epochs, seeds = (32, 1, 5, 1) if quick else (100, 2, 25, 3)
    widths = (x.shape[1], *([hidden] * depth), _NUM_CLASSES)
    lr, batch, target = 0.01, 32, 0.95
    steps_per_epoch = x.shape[0] // batch
    keys = jax.random.split(key, seeds)
    lowered = []
    for act, init in _CONVERGENCE_ACTS:
        model = training.mlp(widths, activation=act, init=init)

        def run(k, model=model):
            return _sgd_accuracy(model, k, x, y, lr, epochs, batch)

        lowered.append(jit(jax.vmap(run), quick=quick).lower(keys))
    accs, secs = [], []
    for compiled in compile_all(lowered):
        # The first call of a compiled program pays one-time costs (in quick mode about 4x a
        # run): it is not timed. Then the best of a few timed runs, since one run of a small
        # program is at the mercy of other work.
        acc = np.asarray(block(compiled(keys)))
        timings = []
        for _ in range(1 if quick else 3):
            clock = Stopwatch()
            block(compiled(keys))
            timings.append(clock())
        secs.append(min(timings) / (epochs * seeds))
        accs.append(acc.reshape(seeds, epochs, steps_per_epoch).mean(axis=-1))
    epoch_acc = np.stack(accs)
    to_target = []
    for a in epoch_acc:
        firsts = [(int(np.argmax(s >= target)) + 1) if np.any(s >= target) else None for s in a]
        to_target.append(_median_or_none(firsts))
    t_secs = tuple(None if e is None else e * s for e, s in zip(to_target, secs, strict=True))
    depth = _depth_sweep(key, x, y, lr, batch, target, quick)
    i_tanh = 1

    def ratio(v):
        return tuple(None if a is None or v[i_tanh] is None else a / v[i_tanh] for a in v)

    return Convergence(
        activations=tuple(a for a, _ in _CONVERGENCE_ACTS),
        init=tuple(i for _, i in _CONVERGENCE_ACTS),
        epoch_accuracy=epoch_acc,
        target=target,
        epochs_to_target=tuple(to_target),
        seconds_per_epoch=tuple(secs),
        seconds_to_target=t_secs,
        epoch_ratio_to_tanh=ratio(tuple(to_target)),
        time_ratio_to_tanh=ratio(t_secs),
        widths=widths,
        learning_rate=lr,
        batch_size=batch,
        epochs=epochs,
        num_seeds=seeds,
        **depth,
    )


def _epochs_to(acc, target):
    firsts = [(int(np.argmax(s >= target)) + 1) if np.any(s >= target) else None for s in acc]
    return _median_or_none(firsts)


def _stacked_mlp(width, max_depth, num_in):
    """An MLP whose hidden layers past the first are one ``[max_depth - 1, W, W]`` stack run by
    ``lax.scan``, the depth and the activation traced: ``init(key, is_relu)`` draws He
    (``he_normal``) weights for ReLU and Glorot (``xavier_normal``) for tanh; ``apply`` runs
    ``depth - 1`` stacked layers and passes the rest through unchanged. One compiled program
    trains every depth and both activations (compile time, not depth, is what a small run
    pays for)."""
    he, glorot = initializers.he_normal(), initializers.xavier_normal()

    def draw(key, shape, is_relu):
        return jnp.where(is_relu, he(key, shape), glorot(key, shape))

    def init(key, is_relu):
        k_in, k_h, k_out = jax.random.split(key, 3)
        hidden = jax.vmap(lambda k: draw(k, (width, width), is_relu))(
            jax.random.split(k_h, max_depth - 1)
        )
        return {
            "w_in": draw(k_in, (num_in, width), is_relu),
            "b_in": jnp.zeros(width),
            "w_h": hidden,
            "b_h": jnp.zeros((max_depth - 1, width)),
            "w_out": draw(k_out, (width, _NUM_CLASSES), is_relu),
            "b_out": jnp.zeros(_NUM_CLASSES),
        }

    def make(depth, is_relu):
        def act(z):
            return jnp.where(is_relu, jnp.maximum(z, 0.0), jnp.tanh(z))

        def apply(params, state, x, *, train, key=None):
            del train, key
            h = act(x @ params["w_in"] + params["b_in"][None, :])

            def layer(h, wb):
                (w, b), i = wb
                out = act(h @ w + b[None, :])
                return jnp.where(i < depth - 1, out, h), None

            h, _ = jax.lax.scan(
                layer, h, ((params["w_h"], params["b_h"]), jnp.arange(max_depth - 1))
            )
            return h @ params["w_out"] + params["b_out"][None, :], state

        return training.Model(
            init=lambda k: (init(k, is_relu), ()), apply=apply, num_classes=_NUM_CLASSES
        )

    return make


def _depth_sweep(key, x, y, lr, batch, target, quick):
    """ReLU + He against tanh + Glorot, without batch norm, over several depths."""
    depths, width, epochs, seeds = ((), 16, 3, 1) if quick else ((2, 5, 8), 64, 10, 2)
    if not depths:  # quick mode: not run (its checks read "not checked")
        return {
            "depths": (),
            "depth_epoch_accuracy": np.zeros((2, 0, seeds, epochs)),
            "depth_epochs_to_target": ((), ()),
            "depth_width": width,
            "depth_epochs": epochs,
            "depth_seeds": seeds,
        }
    keys = jax.random.split(jax.random.fold_in(key, 7), seeds)
    steps_per_epoch = x.shape[0] // batch
    make = _stacked_mlp(width, max(depths), x.shape[1])

    def run(is_relu, depth, k):
        return _sgd_accuracy(make(depth, is_relu), k, x, y, lr, epochs, batch)

    grid = jax.vmap(jax.vmap(jax.vmap(run, (None, None, 0)), (None, 0, None)), (0, None, None))
    acc = jit(grid, quick=quick)(jnp.asarray([True, False]), jnp.asarray(depths, jnp.int32), keys)
    acc = np.asarray(acc).reshape(2, len(depths), seeds, epochs, steps_per_epoch).mean(axis=-1)
    return {
        "depths": depths,
        "depth_epoch_accuracy": acc,
        "depth_epochs_to_target": tuple(
            tuple(_epochs_to(acc[a, i], target) for i in range(len(depths))) for a in range(2)
        ),
        "depth_width": width,
        "depth_epochs": epochs,
        "depth_seeds": seeds,
    }


def _fewer_epochs(relu, tanh):
    """ReLU reaches the target in fewer epochs than tanh (never = infinitely many)."""
    if relu is None and tanh is None:
        return TIE
    if relu is None:
        return False
    if tanh is None:
        return True
    return beats(relu, tanh, higher_is_better=False)


def _advantage(relu, tanh, cap):
    """tanh's epochs over ReLU's; "never" counts as one epoch past the run."""
    r = cap + 1 if relu is None else relu
    t = cap + 1 if tanh is None else tanh
    return t / r


def relu_convergence_verdict(r: Convergence) -> Verdict:
    """Agrees when ReLU reaches the target in at most half of tanh's and of sigmoid's epochs."""
    e = dict(zip(r.activations, r.epochs_to_target, strict=True))
    relu, tanh, sig = e["relu"], e["tanh"], e["sigmoid"]
    claim = (
        "ReLU converges much faster than sigmoid/tanh in practice (about 6x in Krizhevsky et "
        "al. 2012)."
    )

    def faster(other):
        if relu is None:
            return None if other is None else False
        return True if other is None else relu < other

    def much_faster(other):
        if relu is None:
            return None if other is None else False
        return True if other is None else relu <= 0.5 * other

    d_relu, d_tanh = r.depth_epochs_to_target
    adv = [_advantage(a, b, r.depth_epochs) for a, b in zip(d_relu, d_tanh, strict=True)]
    checks = {
        "ReLU reaches the target in fewer epochs than tanh": faster(tanh),
        "ReLU reaches the target in fewer epochs than sigmoid": faster(sig),
        'ReLU needs at most half of tanh\'s epochs ("much faster")': much_faster(tanh),
        "without batch norm, ReLU reaches the target in fewer epochs than tanh at the "
        "deepest depth": _fewer_epochs(d_relu[-1], d_tanh[-1]) if r.depths else None,
        "ReLU's advantage over tanh grows with depth (deepest > shallowest)": None
        if len(r.depths) < 2
        else beats(adv[-1], adv[0]),
    }

    def fmt(v):
        return "never" if v is None else f"{v:g}"

    text = (
        f"epochs to {r.target:.0%} training accuracy (median of {r.num_seeds} seed(s), at most "
        f"{r.epochs}): relu {fmt(relu)}, tanh {fmt(tanh)}, sigmoid {fmt(sig)}; ratio to tanh: "
        + ", ".join(
            f"{a} {fmt(None if q is None else round(q, 3))}"
            for a, q in zip(r.activations, r.epoch_ratio_to_tanh, strict=True)
        )
        + (
            f". Depth sweep without batch norm ({r.depth_width} units a layer, at most "
            f"{r.depth_epochs} epochs, {r.depth_seeds} seed(s)), epochs to the target relu / "
            "tanh: "
            + ", ".join(
                f"{d} layers {fmt(a)} / {fmt(b)} (advantage {q:.2g}x)"
                for d, a, b, q in zip(r.depths, d_relu, d_tanh, adv, strict=True)
            )
            if r.depths
            else ". Depth sweep: not run (quick mode)"
        )
        + "."
    )
    return verdict_from_checks(claim, checks, text)


def relu_convergence_table(r: Convergence):
    columns = [
        "activation",
        "init",
        "final train acc",
        "epochs to target",
        "ratio to tanh",
        "s / epoch",
        "s to target",
        "time ratio to tanh",
    ]

    def fmt(v, spec="g"):
        return "never" if v is None else format(v, spec)

    rows = [
        [
            a,
            init_label(i),
            f"{float(np.mean(acc[:, -1])):.3f}",
            fmt(e),
            fmt(er, ".3g"),
            f"{s:.3g}",
            fmt(ts, ".3g"),
            fmt(tr, ".3g"),
        ]
        for a, i, acc, e, er, s, ts, tr in zip(
            r.activations,
            r.init,
            r.epoch_accuracy,
            r.epochs_to_target,
            r.epoch_ratio_to_tanh,
            r.seconds_per_epoch,
            r.seconds_to_target,
            r.time_ratio_to_tanh,
            strict=True,
        )
    ]
    d_relu, d_tanh = r.depth_epochs_to_target
    for d, a, b in zip(r.depths, d_relu, d_tanh, strict=True):
        rows.append(
            [
                f"depth {d} (no BN): relu vs tanh",
                f"{r.depth_width} units/layer",
                "",
                f"{fmt(a)} vs {fmt(b)}",
                fmt(_advantage(a, b, r.depth_epochs) ** -1, ".3g"),
                "",
                "",
                "",
            ]
        )
    return columns, rows


# ---------------------------------------------------------------------------------------------
# 5. Batch norm over learning rates and init scales


class BatchNormGrid(NamedTuple):
    """Result of :func:`batchnorm_grid`.

    Attributes:
      learning_rates: ``[R]`` the SGD learning rates.
      init_stds: ``[I]`` the standard deviations of the initial weights.
      accuracy: ``[2, R, I]`` final validation accuracy without (index 0) and with (1) batch norm;
        NaN where training diverged.
      diverged: ``[2, R, I]`` the loss became NaN or infinite.
      threshold: the validation accuracy that counts as "trains".
      max_good_lr: ``(without, with)`` the largest learning rate whose median accuracy over the
        init scales reaches ``threshold`` (None if none does).
      init_spread: ``(without, with)`` the mean over learning rates of the range (max - min) of
        accuracy across init scales (diverged runs count as chance, 0.1).
      num_good: ``(without, with)`` the number of grid cells reaching ``threshold``.
      widths, num_steps, batch_size: the set-up.
    """

    learning_rates: np.ndarray
    init_stds: np.ndarray
    accuracy: np.ndarray
    diverged: np.ndarray
    threshold: float
    max_good_lr: tuple
    init_spread: tuple
    num_good: tuple
    widths: tuple
    num_steps: int
    batch_size: int


def batchnorm_grid(key: Any = 0, *, quick: bool = False) -> BatchNormGrid:
    """A deep ReLU MLP with and without batch norm over learning rates and init scales.

    Weights start as ``N(0, s^2)`` for each ``s`` in ``init_stds``; plain SGD (no momentum) with
    each learning rate, the same minibatches for every cell; the final validation accuracy uses
    the running statistics (inference mode). Every cell of a grid trains at once with ``vmap``.

    Args:
      key: PRNG key or int seed (weights and minibatch order, shared by every cell).
      quick: 2 hidden layers of 32 units, 40 steps (instead of 4 of 100 units, 600 steps).

    Returns:
      A :class:`BatchNormGrid`.

    References:
      Ioffe & Szegedy 2015, "Batch normalization: accelerating deep network training by reducing
      internal covariate shift".
    """
    key = as_key(key)
    train, val, _ = _digits(0)
    hidden, depth, steps = (32, 2, 40) if quick else (100, 4, 600)
    widths = (train[0].shape[1], *([hidden] * depth), _NUM_CLASSES)
    lrs = np.asarray([1e-3, 1e-2, 1e-1, 1.0, 3.0])
    stds = np.asarray([1e-3, 1e-2, 1e-1, 1.0])
    batch = 64
    lr_grid, std_grid = (a.ravel() for a in np.meshgrid(lrs, stds, indexing="ij"))
    k_init, k_fit = jax.random.split(key)
    grid_args = (jnp.asarray(lr_grid, jnp.float32), jnp.asarray(std_grid, jnp.float32))
    lowered = []
    for use_bn in (False, True):
        model = training.mlp(widths, activation="relu", init="small_normal", batch_norm=use_bn)

        def run(lr, std, model=model):
            params, state = model.init(k_init)
            # small_normal draws N(0, 0.01^2): rescale to the cell's std.
            params = [{**p, "w": p["w"] * (std / 0.01)} for p in params]
            params, hist = training.fit(
                model,
                params,
                optax.sgd(lr),
                train,
                key=k_fit,
                num_steps=steps,
                batch_size=batch,
                state=state,
            )
            return training.evaluate(model, params, val, state=hist.state)["accuracy"], (
                hist.nan_step >= 0
            )

        lowered.append(jit(jax.vmap(run), quick=quick).lower(*grid_args))
    accs, divs = [], []
    for compiled in compile_all(lowered):
        acc, div = compiled(*grid_args)
        acc = np.where(np.asarray(div), np.nan, np.asarray(acc, np.float64))
        accs.append(acc.reshape(len(lrs), len(stds)))
        divs.append(np.asarray(div).reshape(len(lrs), len(stds)))
    accuracy, diverged = np.stack(accs), np.stack(divs)
    threshold = 0.9
    as_chance = np.where(np.isfinite(accuracy), accuracy, 1.0 / _NUM_CLASSES)
    max_good, spread, num_good = [], [], []
    for a in as_chance:
        good = np.median(a, axis=1) >= threshold
        max_good.append(float(lrs[good].max()) if good.any() else None)
        spread.append(float(np.mean(a.max(axis=1) - a.min(axis=1))))
        num_good.append(int(np.sum(a >= threshold)))
    return BatchNormGrid(
        learning_rates=lrs,
        init_stds=stds,
        accuracy=accuracy,
        diverged=diverged,
        threshold=threshold,
        max_good_lr=tuple(max_good),
        init_spread=tuple(spread),
        num_good=tuple(num_good),
        widths=widths,
        num_steps=steps,
        batch_size=batch,
    )


def batchnorm_grid_verdict(r: BatchNormGrid) -> Verdict:
    """BN trains at a higher learning rate and depends less on the init scale."""
    (lr0, lr1), (s0, s1), (n0, n1) = r.max_good_lr, r.init_spread, r.num_good
    if lr1 is None:
        higher = TIE if lr0 is None else False
    else:
        higher = True if lr0 is None else beats(lr1, lr0)
    checks = {
        "BN reaches the threshold at a higher learning rate": higher,
        "BN's accuracy varies less across init scales": beats(s1, s0, higher_is_better=False),
        "BN trains in more cells of the grid": beats(n1, n0),
    }

    def lr_text(lr):
        return "none (no learning rate reaches it)" if lr is None else f"{lr:g}"

    text = (
        f"largest learning rate with median accuracy >= {r.threshold:.0%}: without BN "
        f"{lr_text(lr0)}, with BN {lr_text(lr1)}; mean spread over init scales: {s0:.3f} "
        f"without, {s1:.3f} with; cells reaching {r.threshold:.0%}: {n0} without, {n1} with (of "
        f"{r.accuracy[0].size})."
    )
    claim = (
        "Batch norm allows higher learning rates and reduces the strong dependence on "
        "initialisation."
    )
    return verdict_from_checks(claim, checks, text)


def batchnorm_grid_table(r: BatchNormGrid):
    columns = ["learning rate"] + [
        f"{tag} std {s:g}" for tag in ("no BN", "BN") for s in r.init_stds
    ]
    rows = []
    for i, lr in enumerate(r.learning_rates):
        cells = []
        for b in range(2):
            for j in range(len(r.init_stds)):
                a = r.accuracy[b, i, j]
                # Truncated: a cell shows 0.900 only when it reaches 90% (the counts' rule).
                cells.append("diverged" if r.diverged[b, i, j] else fmt_floor(a, 3))
        rows.append([f"{lr:g}", *cells])
    return columns, rows


# ---------------------------------------------------------------------------------------------
# 7. Babysitting the learning process


class Babysitting(NamedTuple):
    """Result of :func:`babysitting`.

    Attributes:
      initial_loss: the loss of the freshly initialised net (small_normal weights, no
        regularisation) on the training set.
      expected_loss: log(10), :func:`jaxnorm.diagnostics.expected_initial_loss`.
      initial_loss_ok: within 10% of log(10) (:func:`jaxnorm.training.check_initial_loss`).
      loss_with_regularisation: the initial loss plus ``0.5 * 1e3 * sum(w^2)`` (it must go up).
      overfit_passed: 20 training examples reach 100% training accuracy.
      overfit_steps: the step that reached it (None if never).
      overfit_loss: ``[T]`` the overfit run's loss curve.
      overfit_accuracy: ``[T]`` its accuracy curve.
      learning_rates: ``[R]`` SGD (momentum 0.9) learning rates of the update-ratio runs.
      update_ratio: ``[R, T]`` per-step ||update|| / ||W|| of the first layer's weights.
      median_ratio: ``[R]`` its median over training.
      final_loss: ``[R]`` validation loss after training (NaN when diverged).
      best_lr: the learning rate with the lowest validation loss (diverged runs excluded).
      best_median_ratio: its median update ratio.
      diverged: ``[R]`` the run produced a NaN or Inf, or its validation loss exceeds 10 x
        log(10) (a loss like 2.3e+28 is a blow-up, not a number to compare).
      trains: ``[R]`` its validation loss ended below half of log(10) (fixed before the runs).
      ratio_band: ``(lo, hi)`` the update/weight ratios counted as "about 1e-3", a decade on
        either side.
    """

    initial_loss: float
    expected_loss: float
    initial_loss_ok: bool
    loss_with_regularisation: float
    overfit_passed: bool
    overfit_steps: int | None
    overfit_loss: np.ndarray
    overfit_accuracy: np.ndarray
    learning_rates: np.ndarray
    update_ratio: np.ndarray
    median_ratio: np.ndarray
    final_loss: np.ndarray
    best_lr: float | None
    best_median_ratio: float | None
    diverged: np.ndarray
    trains: np.ndarray
    ratio_band: tuple


# Fixed before the runs: a validation loss above 10 x log(C) is a blow-up; below half of log(C)
# the net has learned something (log(C) is the loss of a uniform guess).
_DIVERGED_LOSS_FACTOR = 10.0
_TRAINS_LOSS_FACTOR = 0.5
_RATIO_BAND = (1e-4, 1e-2)


def _run_status(final_loss) -> tuple[np.ndarray, np.ndarray]:
    """``(diverged, trains)`` per run from its final validation loss (the fixed rules above)."""
    final = np.asarray(final_loss, np.float64)
    chance = math.log(_NUM_CLASSES)
    with np.errstate(invalid="ignore"):
        diverged = ~np.isfinite(final) | (final > _DIVERGED_LOSS_FACTOR * chance)
        trains = ~diverged & (final < _TRAINS_LOSS_FACTOR * chance)
    return diverged, trains


def babysitting(key: Any = 0, *, quick: bool = False) -> Babysitting:
    """The lecture's checks on a 2-layer net (50 hidden ReLU units, small_normal init) on digits.

    1. The initial loss against :math:`\\log 10 \\approx 2.303`, and that adding a strong L2
       penalty raises it. 2. Overfitting 20 examples (Adam, learning rate 0.01, no
       regularisation) to 100% training accuracy. 3. The update/weight ratio of the first layer
       over training for log-spaced learning rates (SGD, momentum 0.9), all trained at once with
       ``vmap``; the rule of thumb is about 1e-3 for a good learning rate.

    Args:
      key: PRNG key or int seed.
      quick: 60 overfit steps and 50 training steps over 3 learning rates (instead of 200, 400
        and 5).

    Returns:
      A :class:`Babysitting`.
    """
    key = as_key(key)
    train, val, _ = _digits(0)
    k_init, k_over, k_fit = jax.random.split(key, 3)
    model = training.mlp((train[0].shape[1], 50, _NUM_CLASSES), init="small_normal")
    params, state = model.init(k_init)
    check = training.check_initial_loss(model, params, train, num_classes=_NUM_CLASSES)
    l2 = sum(float(jnp.sum(p["w"] ** 2)) for p in params)
    over = training.overfit_small_subset(
        model,
        params,
        optax.adam(1e-2),
        train,
        key=k_over,
        num_examples=20,
        num_steps=60 if quick else 200,
    )
    lrs = np.asarray([1e-3, 1e-2, 1e-1] if quick else [1e-4, 1e-3, 1e-2, 1e-1, 1.0])
    steps = 50 if quick else 400

    def run(lr):
        p, hist = training.fit(
            model,
            params,
            optax.sgd(lr, momentum=0.9),
            train,
            key=k_fit,
            num_steps=steps,
            batch_size=64,
            state=state,
            update_ratios=True,
        )
        val_loss = training.evaluate(model, p, val, state=hist.state)["loss"]
        return hist.update_ratio[0]["w"], jnp.where(hist.nan_step >= 0, jnp.nan, val_loss)

    ratios, final = (
        np.asarray(a, np.float64)
        for a in jit(jax.vmap(run), quick=quick)(jnp.asarray(lrs, jnp.float32))
    )
    median = np.asarray(
        [np.median(r[np.isfinite(r)]) if np.isfinite(r).any() else np.nan for r in ratios]
    )
    diverged, trains = _run_status(final)
    kept = np.where(diverged, np.nan, final)
    best = int(np.nanargmin(kept)) if np.isfinite(kept).any() else None
    return Babysitting(
        initial_loss=check.loss,
        expected_loss=float(diagnostics.expected_initial_loss(_NUM_CLASSES)),
        initial_loss_ok=bool(check.ok),
        loss_with_regularisation=float(check.loss + 0.5 * 1e3 * l2),
        overfit_passed=bool(over.passed),
        overfit_steps=over.steps_to_target,
        overfit_loss=np.asarray(over.loss_curve),
        overfit_accuracy=np.asarray(over.accuracy_curve),
        learning_rates=lrs,
        update_ratio=ratios,
        median_ratio=median,
        final_loss=final,
        best_lr=None if best is None else float(lrs[best]),
        best_median_ratio=None if best is None else float(median[best]),
        diverged=diverged,
        trains=trains,
        ratio_band=_RATIO_BAND,
    )


def babysitting_verdict(r: Babysitting) -> Verdict:
    """Initial loss ~ log 10, reg raises it, 20 examples overfit, best LR has ratio ~1e-3."""
    ratio = r.best_median_ratio
    lo, hi = r.ratio_band
    diverged, trains = _run_status(r.final_loss)
    in_band = (r.median_ratio >= lo) & (r.median_ratio <= hi)
    wrong = [
        f"{lr:g}"
        for lr, b, t in zip(r.learning_rates, in_band, trains, strict=True)
        if bool(b) != bool(t)
    ]
    checks = {
        "initial loss within 10% of log(10)": r.initial_loss_ok,
        "a strong L2 penalty raises the initial loss": r.loss_with_regularisation > r.initial_loss,
        "20 examples overfit to 100% training accuracy": r.overfit_passed,
        "the best learning rate's update/weight ratio is within a decade of 1e-3": None
        if ratio is None
        else lo <= ratio <= hi,
        f"the ratio separates the rates that train from those that do not (in [{lo:g}, "
        f"{hi:g}] exactly for the rates that train)": not wrong,
    }
    text = (
        f"initial loss {fmt_number(r.initial_loss)} vs log(10) = {r.expected_loss:.4f}; with L2 "
        f"1e3: {r.loss_with_regularisation:.4g}; overfit: "
        + (f"100% at step {r.overfit_steps}" if r.overfit_passed else "FAILED")
        + (
            "; no best learning rate (every run diverged)"
            if r.best_lr is None
            else f"; best learning rate {r.best_lr:g} (lowest validation loss) has median "
            "update ratio " + ("n/a" if ratio is None else f"{ratio:.2g}")
        )
        + "; rates that train (validation loss < "
        + f"{_TRAINS_LOSS_FACTOR:g} log 10): "
        + (
            ", ".join(f"{lr:g}" for lr, t in zip(r.learning_rates, trains, strict=True) if t)
            or "none"
        )
        + "; diverged: "
        + (
            ", ".join(f"{lr:g}" for lr, d in zip(r.learning_rates, diverged, strict=True) if d)
            or "none"
        )
        + (
            "; the ratio misclassifies learning rate(s) " + ", ".join(wrong)
            if wrong
            else "; the ratio band holds exactly the rates that train"
        )
        + "."
    )
    claim = (
        "A fresh softmax classifier starts at loss log(C); regularisation raises it; a correct "
        "model overfits a tiny subset; a good learning rate gives update/weight ratios ~1e-3."
    )
    return verdict_from_checks(claim, checks, text)


def babysitting_table(r: Babysitting):
    columns = [
        "learning rate",
        "median update/weight ratio (layer 1)",
        f"ratio in [{r.ratio_band[0]:g}, {r.ratio_band[1]:g}]",
        "validation loss",
        "trains",
    ]
    rows = [
        [
            f"{lr:g}",
            f"{m:.3g}",
            "yes" if r.ratio_band[0] <= m <= r.ratio_band[1] else "no",
            "diverged" if d else fmt_number(f),
            "diverged" if d else ("yes" if t else "no"),
        ]
        for lr, m, f, d, t in zip(
            r.learning_rates, r.median_ratio, r.final_loss, *_run_status(r.final_loss), strict=True
        )
    ]
    return columns, rows


# ---------------------------------------------------------------------------------------------
# 8. Coarse-to-fine random search


class Search(NamedTuple):
    """Result of :func:`hyperparameter_search`.

    Attributes:
      learning_rate: ``[T]`` every trial's learning rate.
      weight_decay: ``[T]`` every trial's weight decay.
      val_accuracy: ``[T]`` its validation accuracy (NaN when diverged).
      round: ``[T]`` its coarse-to-fine round (0 = coarse).
      diverged: ``[T]`` whether it diverged.
      spaces: per round ``{name: [lo, hi]}`` the ranges searched.
      best: ``{learning_rate, weight_decay, val_accuracy, round}`` of the best trial.
      round_median: ``[rounds]`` median validation accuracy of each round (diverged = 0.1).
      round_best: ``[rounds]`` best validation accuracy of each round.
      at_border: ``{name: "low" | "high"}`` where the best value lies near the range's border.
      notes: the search's warnings.
      num_steps: training steps per trial.
    """

    learning_rate: np.ndarray
    weight_decay: np.ndarray
    val_accuracy: np.ndarray
    round: np.ndarray
    diverged: np.ndarray
    spaces: tuple
    best: dict
    round_median: np.ndarray
    round_best: np.ndarray
    at_border: dict
    notes: tuple
    num_steps: int


def hyperparameter_search(key: Any = 0, *, quick: bool = False) -> Search:
    """Coarse-to-fine random search over learning rate and weight decay, on log scales.

    Each trial trains ``mlp([64, 64, 10])`` with SGD (momentum 0.9) and decoupled weight decay
    (``optax.add_decayed_weights``) and reports the validation accuracy; the trials of a round
    train at once in one vmapped program (:func:`jaxnorm.training.coarse_to_fine`). Ranges:
    learning rate 1e-4..1, weight decay 1e-6..1e-1.

    Args:
      key: PRNG key or int seed.
      quick: 2 rounds of 6 trials, 40 steps (instead of 3 rounds of 24, 300 steps).

    Returns:
      A :class:`Search`.

    References:
      Bergstra & Bengio 2012, "Random search for hyper-parameter optimization".
    """
    key = as_key(key)
    train, val, _ = _digits(0)
    rounds, trials, steps = (2, 6, 40) if quick else (3, 24, 300)
    model = training.mlp((train[0].shape[1], 64, _NUM_CLASSES))

    def train_fn(hp, k):
        k_init, k_fit = jax.random.split(k)
        params, state = model.init(k_init)
        opt = optax.chain(
            optax.add_decayed_weights(hp["weight_decay"]),
            optax.sgd(hp["learning_rate"], momentum=0.9),
        )
        params, hist = training.fit(
            model, params, opt, train, key=k_fit, num_steps=steps, batch_size=64, state=state
        )
        metrics = training.evaluate(model, params, val, state=hist.state)
        return {"val_accuracy": metrics["accuracy"], "val_loss": metrics["loss"], "history": hist}

    space = {
        "learning_rate": training.log_uniform(1e-4, 1.0),
        "weight_decay": training.log_uniform(1e-6, 1e-1),
    }
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = training.coarse_to_fine(train_fn, space, trials, key, rounds=rounds, top_k=5)
    ts = result.trials
    acc = np.asarray([t.metrics.get("val_accuracy", np.nan) for t in ts], np.float64)
    div = np.asarray([t.status != "ok" for t in ts])
    acc = np.where(div, np.nan, acc)
    rnd = np.asarray([t.round for t in ts])
    as_chance = np.where(np.isfinite(acc), acc, 1.0 / _NUM_CLASSES)
    best = result.best
    return Search(
        learning_rate=np.asarray([t.params["learning_rate"] for t in ts], np.float64),
        weight_decay=np.asarray([t.params["weight_decay"] for t in ts], np.float64),
        val_accuracy=acc,
        round=rnd,
        diverged=div,
        spaces=tuple(
            {name: [float(d.lo), float(d.hi)] for name, d in s.items()} for s in result.spaces
        ),
        best={}
        if best is None
        else {
            "learning_rate": float(best.params["learning_rate"]),
            "weight_decay": float(best.params["weight_decay"]),
            "val_accuracy": float(best.metrics["val_accuracy"]),
            "round": int(best.round),
        },
        round_median=np.asarray([np.median(as_chance[rnd == i]) for i in range(rounds)]),
        round_best=np.asarray([np.max(as_chance[rnd == i]) for i in range(rounds)]),
        at_border=dict(result.at_border),
        notes=tuple(dict.fromkeys(str(w.message) for w in caught)),
        num_steps=steps,
    )


def hyperparameter_search_verdict(r: Search) -> Verdict:
    """Later (finer) rounds concentrate on better configurations."""
    first, last = r.round_median[0], r.round_median[-1]
    checks = {
        "the last round's median accuracy beats the coarse round's": beats(last, first),
        "the last round's best beats the coarse round's best": beats(
            r.round_best[-1], r.round_best[0]
        ),
    }
    text = (
        "median validation accuracy per round: "
        + ", ".join(fmt_floor(v, 4) for v in r.round_median)
        + "; best per round: "
        + ", ".join(fmt_floor(v, 4) for v in r.round_best)
        + (
            " (the last round's best ties the coarse round's: not counted as support)"
            if checks["the last round's best beats the coarse round's best"] == TIE
            else ""
        )
        + (
            f"; best: learning rate {r.best['learning_rate']:.3g}, weight decay "
            f"{r.best['weight_decay']:.3g}, accuracy {r.best['val_accuracy']:.3f}"
            if r.best
            else "; every trial diverged"
        )
        + (
            "; the best value lies at the border of its range ("
            + ", ".join(f"{k}: {v}" for k, v in r.at_border.items())
            + "): the lecture advises widening the range"
            if r.at_border
            else ""
        )
        + "."
    )
    claim = (
        "Random search on log scales, coarse to fine: later rounds search narrower ranges "
        "around the best trials and find good configurations more often."
    )
    return verdict_from_checks(claim, checks, text)


def hyperparameter_search_table(r: Search):
    columns = [
        "round",
        "learning rate range",
        "weight decay range",
        "trials",
        "diverged",
        "median val acc",
        "best val acc",
    ]
    rows = []
    for i, s in enumerate(r.spaces):
        sel = r.round == i
        rows.append(
            [
                str(i),
                f"{s['learning_rate'][0]:.3g} .. {s['learning_rate'][1]:.3g}",
                f"{s['weight_decay'][0]:.3g} .. {s['weight_decay'][1]:.3g}",
                str(int(sel.sum())),
                str(int(r.diverged[sel].sum())),
                fmt_floor(r.round_median[i], 4),
                fmt_floor(r.round_best[i], 4),
            ]
        )
    return columns, rows


# ---------------------------------------------------------------------------------------------
# 9. Ensembles and Polyak averaging


class Ensembles(NamedTuple):
    """Result of :func:`ensembles`.

    Attributes:
      member_accuracy: ``[K]`` test accuracy of each member (its final parameters).
      member_loss: ``[K]`` test cross-entropy of each member.
      ensemble_accuracy: test accuracy of the averaged probabilities.
      ensemble_loss: test cross-entropy of the averaged probabilities.
      ensemble_gain: ensemble accuracy minus the mean member's, in percentage points.
      lecture_gain: the lecture's "typically ~2%", in points (2.0).
      polyak_accuracy: ``[K]`` test accuracy of each member's Polyak (EMA) averaged parameters,
        with batch-norm statistics recomputed for them by
        :func:`jaxnorm.training.update_batch_stats` (one pass over the training split).
      polyak_loss: ``[K]`` their test cross-entropy.
      polyak_stale_accuracy: ``[K]`` the same averaged parameters evaluated with the running
        statistics of the final parameters (what one gets without recomputing them).
      polyak_stale_loss: ``[K]`` their test cross-entropy.
      ema_decay: the averaging decay.
      train_loss: ``[K, T]`` per-step training loss of each member.
      num_members, num_steps, learning_rate: the set-up.
    """

    member_accuracy: np.ndarray
    member_loss: np.ndarray
    ensemble_accuracy: float
    ensemble_loss: float
    ensemble_gain: float
    lecture_gain: float
    polyak_accuracy: np.ndarray
    polyak_loss: np.ndarray
    polyak_stale_accuracy: np.ndarray
    polyak_stale_loss: np.ndarray
    ema_decay: float
    train_loss: np.ndarray
    num_members: int
    num_steps: int
    learning_rate: float


_LECTURE_ENSEMBLE_GAIN = 2.0  # points: "ensembles ... typically ~2%"


def ensembles(key: Any = 0, *, quick: bool = False) -> Ensembles:
    """K members trained at once with ``vmap`` over seeds; their average; Polyak averaging.

    ``mlp([64, 64, 10], batch_norm=True)`` trained with SGD (momentum 0.9, constant learning
    rate 0.05, batch 32) by :func:`jaxnorm.training.train_ensemble`, which also keeps an EMA of
    each member's parameters (decay 0.99). The averaged parameters never produced the running
    batch-norm statistics, so :func:`jaxnorm.training.update_batch_stats` recomputes them in one
    pass over the training split (19 batches of 64); the stale statistics are scored too.
    Scored on the test split.

    Args:
      key: PRNG key or int seed.
      quick: 3 members, 80 steps, decay 0.9 (instead of 5 members, 800 steps).

    Returns:
      An :class:`Ensembles`.

    References:
      Dietterich 2000, "Ensemble methods in machine learning"; Polyak & Juditsky 1992;
      Izmailov et al. 2018 (batch-norm statistics after averaging).
    """
    key = as_key(key)
    train, _, test = _digits(0)
    k, steps, decay = (3, 80, 0.9) if quick else (5, 800, 0.99)
    lr = 0.05
    model = training.mlp((train[0].shape[1], 64, _NUM_CLASSES), batch_norm=True)
    bs = 64
    nb = train[0].shape[0] // bs
    batches = jnp.asarray(train[0][: nb * bs]).reshape(nb, bs, -1)

    @functools.partial(jit, quick=quick)
    def run(keys):
        params, hist = training.train_ensemble(
            model,
            model.init,
            optax.sgd(lr, momentum=0.9),
            train,
            keys,
            num_steps=steps,
            batch_size=32,
            ema_decay=decay,
        )
        states = hist.state

        def score(p, s):
            return training.evaluate(model, p, test, state=s)

        members = jax.vmap(score)(params, states)
        fresh = jax.vmap(lambda p, s: training.update_batch_stats(model, p, s, batches))(
            hist.ema_params, states
        )
        averaged = jax.vmap(score)(hist.ema_params, fresh)
        stale = jax.vmap(score)(hist.ema_params, states)
        probs = training.ensemble_predict(
            lambda ps, x: model.apply(ps[0], ps[1], x, train=False)[0], (params, states), test[0]
        )
        y = jnp.asarray(test[1])
        picked = jnp.take_along_axis(probs, y[:, None], axis=-1)[:, 0]
        ens_loss = -jnp.mean(jnp.log(jnp.maximum(picked, jnp.finfo(probs.dtype).tiny)))
        ens_acc = jnp.mean((jnp.argmax(probs, axis=-1) == y).astype(jnp.float32))
        return members, averaged, stale, ens_acc, ens_loss, hist.loss

    members, averaged, stale, ens_acc, ens_loss, loss = run(jax.random.split(key, k))
    member_acc = np.asarray(members["accuracy"], np.float64)
    return Ensembles(
        member_accuracy=member_acc,
        member_loss=np.asarray(members["loss"], np.float64),
        ensemble_accuracy=float(ens_acc),
        ensemble_loss=float(ens_loss),
        ensemble_gain=100.0 * (float(ens_acc) - float(np.mean(member_acc))),
        lecture_gain=_LECTURE_ENSEMBLE_GAIN,
        polyak_accuracy=np.asarray(averaged["accuracy"], np.float64),
        polyak_loss=np.asarray(averaged["loss"], np.float64),
        polyak_stale_accuracy=np.asarray(stale["accuracy"], np.float64),
        polyak_stale_loss=np.asarray(stale["loss"], np.float64),
        ema_decay=decay,
        train_loss=np.asarray(loss, np.float64),
        num_members=k,
        num_steps=steps,
        learning_rate=lr,
    )


def ensembles_verdict(r: Ensembles) -> Verdict:
    """The ensemble beats its average member; Polyak averages (with recomputed batch-norm
    statistics) beat the final parameters; equal numbers are ties, never support."""
    m_acc, m_loss = float(np.mean(r.member_accuracy)), float(np.mean(r.member_loss))
    p_acc, p_loss = float(np.mean(r.polyak_accuracy)), float(np.mean(r.polyak_loss))
    s_acc, s_loss = float(np.mean(r.polyak_stale_accuracy)), float(np.mean(r.polyak_stale_loss))
    checks = {
        "the ensemble's accuracy beats the mean member's": beats(r.ensemble_accuracy, m_acc),
        "the ensemble's loss is below the mean member's": beats(
            r.ensemble_loss, m_loss, higher_is_better=False
        ),
        "Polyak-averaged parameters are more accurate than the final ones": beats(p_acc, m_acc),
        "Polyak-averaged parameters have lower loss": beats(p_loss, m_loss, higher_is_better=False),
    }
    gain, target = r.ensemble_gain, r.lecture_gain
    errors = 100.0 * (1.0 - m_acc)
    text = (
        f"test accuracy: ensemble of {r.num_members} {r.ensemble_accuracy:.4f} vs members "
        f"{m_acc:.4f} on average (best {float(np.max(r.member_accuracy)):.4f}): a gain of "
        f"{gain:+.2f} points against the lecture's ~{target:g}, {abs(target - gain):.2f} points "
        f"{'short of' if gain < target else 'beyond'} it (the members err on {errors:.2f}% of "
        f"the test set, so at most {errors:.2f} points can be gained); test loss "
        f"{fmt_number(r.ensemble_loss)} vs {fmt_number(m_loss)}. Polyak (decay {r.ema_decay}), "
        f"batch-norm statistics recomputed by update_batch_stats: accuracy {p_acc:.4f}, loss "
        f"{fmt_number(p_loss)}; with the final parameters' stale statistics: accuracy "
        f"{s_acc:.4f}, loss {fmt_number(s_loss)}."
        + (
            " Polyak's accuracy equals the members': a tie, not support."
            if checks["Polyak-averaged parameters are more accurate than the final ones"] == TIE
            else ""
        )
    )
    claim = (
        "An ensemble of independently trained models improves on its members (typically ~2%); "
        "a running average of the parameters (Polyak averaging) almost always helps."
    )
    return verdict_from_checks(claim, checks, text)


def ensembles_table(r: Ensembles):
    columns = [
        "model",
        "test accuracy",
        "test loss",
        "Polyak accuracy (fresh BN stats)",
        "Polyak loss (fresh)",
        "Polyak accuracy (stale BN stats)",
        "Polyak loss (stale)",
    ]
    rows = [
        [
            f"member {i}",
            f"{a:.4f}",
            fmt_number(lo),
            f"{pa:.4f}",
            fmt_number(pl),
            f"{sa:.4f}",
            fmt_number(sl),
        ]
        for i, (a, lo, pa, pl, sa, sl) in enumerate(
            zip(
                r.member_accuracy,
                r.member_loss,
                r.polyak_accuracy,
                r.polyak_loss,
                r.polyak_stale_accuracy,
                r.polyak_stale_loss,
                strict=True,
            )
        )
    ]
    rows.append(
        ["ensemble", f"{r.ensemble_accuracy:.4f}", fmt_number(r.ensemble_loss), "", "", "", ""]
    )
    rows.append(
        [
            "ensemble gain (points)",
            f"{r.ensemble_gain:+.2f}",
            f"lecture ~{r.lecture_gain:g}",
            f"distance {r.lecture_gain - r.ensemble_gain:+.2f}",
            "",
            "",
            "",
        ]
    )
    return columns, rows
