"""The lab's experiments on regularization and parameter updates (the lecture's missing parts).

``regularization`` (set-up, between batch norm and gradient checking) trains a small MLP on a
small training split of the digits, where it overfits, with L2 penalties, dropout and max-norm
constraints of several strengths; ``updates`` (training dynamics, between babysitting and the
hyperparameter search) compares SGD, momentum, Nesterov, Adagrad, RMSProp and Adam on the digits,
on a 2-D ravine and on a saddle, and learning-rate decay schedules. As the other experiments,
each is ``f(key, *, quick=False) -> NamedTuple`` with a ``*_verdict`` (rules and thresholds fixed
in this file before the runs) and a ``*_table``; plots live in :mod:`jaxnorm.lab.plots`.

References:
  CS231n notes, "Neural Networks Part 2" (regularization) and "Part 3" (parameter updates);
  Srivastava et al. 2014 (dropout, max-norm); Sutskever et al. 2013 (momentum, Nesterov);
  Duchi et al. 2011 (Adagrad); Tieleman & Hinton 2012 (RMSProp); Kingma & Ba 2015 (Adam).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxnorm import regularization as reg
from jaxnorm import training
from jaxnorm.lab._util import (
    TIE,
    Verdict,
    as_key,
    beats,
    check_mark,
    fmt_floor,
    fmt_number,
    jit,
    verdict_from_checks,
)
from jaxnorm.lab.training_experiments import _NUM_CLASSES, _digits

# ---------------------------------------------------------------------------------------------
# Regularization

# Fixed before the runs. Two validation accuracies closer than this (one validation example in
# two seeds' mean, 1/269 / 2 ~ 0.2 points) are a tie.
_ACC_TIE = 0.002
# A run "trains" when its median validation accuracy over seeds reaches this; it "fails" below
# _FAILS (chance is 10%).
_TRAINS = 0.8
_FAILS = 0.5
# What "no max-norm" means inside one vmapped program: a radius no weight column reaches.
_NO_MAX_NORM = 1e6


class Regularization(NamedTuple):
    """Result of :func:`regularization`.

    Attributes:
      num_train: the size of the small training split (the first examples of the digits'
        training split; validation is the full validation split).
      l2_strengths: ``[A]`` the L2 strengths lambda of ``0.5 * lam * sum(w**2)``
        (:func:`jaxnorm.regularization.l2_penalty`; kernels only), the first 0 (no
        regularization, the baseline of every sweep).
      l2_train, l2_val: ``[A, S]`` final training and validation accuracy per strength and seed.
      dropout_rates: ``[B]`` the dropout rates (flax's ``rate``, the probability of dropping a
        hidden unit; the notes' keep probability is ``p = 1 - rate``), the first 0.
      dropout_train, dropout_val: ``[B, S]``.
      max_norms: ``[C]`` the max-norm radii c (:func:`jaxnorm.regularization.max_norm`, per
        unit, on every kernel), at the base learning rate.
      max_norm_train, max_norm_val: ``[C, S]``.
      learning_rate: the base learning rate of every sweep (SGD, momentum 0.9).
      high_learning_rates: ``[H]`` the learning rates of the survival test.
      chosen_max_norm: the radius used in the survival test: the one with the best median
        validation accuracy at the base learning rate (chosen from the sweep, not from the
        survival test).
      high_lr_val: ``[2, H, S]`` validation accuracy at each high learning rate without (0) and
        with (1) the chosen max-norm; NaN where the run diverged (a NaN or Inf).
      high_lr_diverged: ``[2, H, S]`` the run produced a NaN or Inf.
      gap: ``{"none", "l2", "dropout", "max_norm"}`` the train - validation accuracy gap (medians
        over seeds) without regularization and at each method's best validation strength.
      best: ``{"l2", "dropout", "max_norm"}`` each method's best strength by median validation
        accuracy.
      best_val: ``{"none", "l2", "dropout", "max_norm"}`` the median validation accuracies.
      widths, num_steps, batch_size, num_seeds: the set-up.
    """

    num_train: int
    l2_strengths: np.ndarray
    l2_train: np.ndarray
    l2_val: np.ndarray
    dropout_rates: np.ndarray
    dropout_train: np.ndarray
    dropout_val: np.ndarray
    max_norms: np.ndarray
    max_norm_train: np.ndarray
    max_norm_val: np.ndarray
    learning_rate: float
    high_learning_rates: np.ndarray
    chosen_max_norm: float
    high_lr_val: np.ndarray
    high_lr_diverged: np.ndarray
    gap: dict
    best: dict
    best_val: dict
    widths: tuple
    num_steps: int
    batch_size: int
    num_seeds: int


def regularization(key: Any = 0, *, quick: bool = False) -> Regularization:
    """L2, dropout and max-norm on a small split of the digits where an MLP overfits.

    ``mlp([64, 256, 10])`` (ReLU, He init) trained on the first 150 training examples with SGD
    (momentum 0.9, learning rate 0.05, batch 50, 300 steps) reaches 100% training accuracy and
    about 91% validation accuracy: it overfits. The same net is trained with an L2 penalty
    (lambda 1e-4..1e-1), dropout (rate 0.2..0.8) and a max-norm constraint (c 4..0.5), every
    strength and seed in one vmapped program. Then learning rates too high for the plain net
    (1 to 30) are tried without and with the max-norm radius that was best at the base rate.

    Args:
      key: PRNG key or int seed (initialisation and minibatch order, one per seed).
      quick: 64 hidden units, 1 seed, 120 steps, fewer strengths.

    Returns:
      A :class:`Regularization`.

    References:
      Srivastava, Hinton, Krizhevsky, Sutskever & Salakhutdinov 2014, "Dropout: a simple way to
      prevent neural networks from overfitting" (dropout; max-norm, section 5.1).
    """
    key = as_key(key)
    (x, y), (xv, yv), _ = _digits(0)
    n = 150
    x, y = x[:n], y[:n]
    if quick:
        hidden, steps, seeds = 64, 120, 1
        l2s = np.asarray([0.0, 1e-3, 1e-2, 1e-1])
        rates = np.asarray([0.0, 0.3, 0.6])
        norms = np.asarray([3.0, 1.0])
        high = np.asarray([3.0, 30.0])
    else:
        hidden, steps, seeds = 256, 300, 3
        l2s = np.asarray([0.0, 1e-4, 1e-3, 1e-2, 3e-2, 1e-1])
        rates = np.asarray([0.0, 0.2, 0.4, 0.6, 0.8])
        norms = np.asarray([4.0, 2.0, 1.0, 0.5])
        high = np.asarray([1.0, 3.0, 10.0, 30.0])
    lr, batch = 0.05, 50
    widths = (x.shape[1], hidden, _NUM_CLASSES)
    model = training.mlp(widths, dropout=0.0)
    seed_keys = jax.random.split(key, seeds)

    def run(lam, rate, c, lr_, k):
        # One program for every configuration: the strengths are traced, a rate of 0 keeps
        # every unit (scale 1) and a radius of 1e6 is never reached.
        m = training.mlp(widths, dropout=rate)
        k_init, k_fit = jax.random.split(k)
        params, state = m.init(k_init)
        base = training.classification_loss(m)

        def loss(p, s, b, kk):
            value, aux = base(p, s, b, kk)
            return value + reg.l2_penalty(p, lam), aux

        opt = optax.chain(optax.sgd(lr_, momentum=0.9), reg.max_norm(c))
        params, hist = training.fit(
            loss, params, opt, (x, y), key=k_fit, num_steps=steps, batch_size=batch, state=state
        )
        tr = training.evaluate(model, params, (x, y))["accuracy"]
        va = training.evaluate(model, params, (xv, yv))["accuracy"]
        return tr, va, hist.nan_step >= 0

    over_seeds = jax.vmap(run, (None, None, None, None, 0))
    configs = jax.vmap(over_seeds, (0, 0, 0, 0, None))
    program = jit(configs, quick=quick)

    # One call for everything: the sweeps at the base learning rate ([L2..., dropout...,
    # max-norm...]) and the high learning rates without and with each radius (the radius used
    # is chosen afterwards from the sweep, never from the high-rate runs).
    sweep = [(lam, 0.0, _NO_MAX_NORM, lr) for lam in l2s]
    sweep += [(0.0, r, _NO_MAX_NORM, lr) for r in rates[1:]]
    sweep += [(0.0, 0.0, c, lr) for c in norms]
    survival = [(0.0, 0.0, c, h) for c in (_NO_MAX_NORM, *norms) for h in high]
    tr, va, dv = (np.asarray(a) for a in program(*_columns(sweep + survival), seed_keys))
    tr, va = tr.astype(np.float64), va.astype(np.float64)
    a, b, c_ = len(l2s), len(rates) - 1, len(norms)
    l2_train, l2_val = tr[:a], va[:a]
    drop_train = np.concatenate([tr[:1], tr[a : a + b]])
    drop_val = np.concatenate([va[:1], va[a : a + b]])
    mn_train, mn_val = tr[a + b : a + b + c_], va[a + b : a + b + c_]
    chosen_index = int(np.argmax(np.median(mn_val, axis=1)))
    chosen = float(norms[chosen_index])
    hv_all = va[a + b + c_ :].reshape(1 + c_, len(high), seeds)
    hd_all = dv[a + b + c_ :].reshape(1 + c_, len(high), seeds)
    pick = np.asarray([0, 1 + chosen_index])
    hd = hd_all[pick]
    hv = np.where(hd, np.nan, hv_all[pick])

    def med(v):
        return float(np.median(v))

    best, gap, best_val = {}, {"none": med(l2_train[0]) - med(l2_val[0])}, {}
    best_val["none"] = med(l2_val[0])
    for name, strengths, t, v in (
        ("l2", l2s[1:], l2_train[1:], l2_val[1:]),
        ("dropout", rates[1:], drop_train[1:], drop_val[1:]),
        ("max_norm", norms, mn_train, mn_val),
    ):
        i = int(np.argmax(np.median(v, axis=1)))
        best[name] = float(strengths[i])
        best_val[name] = med(v[i])
        gap[name] = med(t[i]) - med(v[i])
    return Regularization(
        num_train=n,
        l2_strengths=l2s,
        l2_train=l2_train,
        l2_val=l2_val,
        dropout_rates=rates,
        dropout_train=drop_train,
        dropout_val=drop_val,
        max_norms=norms,
        max_norm_train=mn_train,
        max_norm_val=mn_val,
        learning_rate=lr,
        high_learning_rates=high,
        chosen_max_norm=chosen,
        high_lr_val=hv,
        high_lr_diverged=hd,
        gap=gap,
        best=best,
        best_val=best_val,
        widths=widths,
        num_steps=steps,
        batch_size=batch,
        num_seeds=seeds,
    )


def _columns(rows):
    return tuple(jnp.asarray([r[i] for r in rows], jnp.float32) for i in range(4))


def _high_lr_summary(r: Regularization):
    """Per high learning rate: median validation accuracy without/with max-norm (NaN: diverged
    in most seeds), and whether the plain net fails there."""
    out = []
    for j, h in enumerate(r.high_learning_rates):
        plain, mn = r.high_lr_val[0, j], r.high_lr_val[1, j]
        # A diverged seed counts as chance for the median.
        p = float(np.median(np.where(np.isfinite(plain), plain, 1.0 / _NUM_CLASSES)))
        m = float(np.median(np.where(np.isfinite(mn), mn, 1.0 / _NUM_CLASSES)))
        out.append((float(h), p, m, p < _FAILS))
    return out


def regularization_verdict(r: Regularization) -> Verdict:
    """Each method narrows the gap and beats no regularization on validation at its best
    strength (ties within 0.2 points are ties); max-norm trains (>= 80%) at a learning rate
    where the plain net fails (< 50%)."""
    methods = ("l2", "dropout", "max_norm")
    label = {"l2": "L2", "dropout": "dropout", "max_norm": "max-norm"}
    checks = {}
    for m in methods:
        # A narrower gap: lower is better.
        checks[f"{label[m]} at its best strength narrows the train/validation gap"] = beats(
            r.gap[m], r.gap["none"], higher_is_better=False, tol=_ACC_TIE
        )
    for m in methods:
        checks[f"{label[m]} at its best strength beats no regularization on validation"] = beats(
            r.best_val[m], r.best_val["none"], tol=_ACC_TIE
        )
    rows = _high_lr_summary(r)
    failing = [row for row in rows if row[3]]
    if not failing:
        survives = None  # no learning rate was too high for the plain net: nothing to show
    else:
        survives = any(m >= _TRAINS for _, _, m, _ in failing)
    checks[
        f"max-norm (c = {r.chosen_max_norm:g}) trains (>= {_TRAINS:.0%}) at a learning rate where "
        f"the plain net fails (< {_FAILS:.0%})"
    ] = survives
    text = (
        f"{r.num_train} training examples, median of {r.num_seeds} seed(s). Without "
        f"regularization: train {fmt_floor(r.best_val['none'] + r.gap['none'])}, validation "
        f"{fmt_floor(r.best_val['none'])} (gap {r.gap['none']:.3f}). At the best strength: "
        + "; ".join(
            f"{label[m]} {r.best[m]:g}: validation {fmt_floor(r.best_val[m])}, gap {r.gap[m]:.3f}"
            for m in methods
        )
        + f". Differences within {_ACC_TIE} count as ties. High learning rates (validation, "
        "plain / max-norm): "
        + ", ".join(f"{h:g}: {fmt_floor(p)} / {fmt_floor(m)}" for h, p, m, _ in rows)
        + "."
    )
    claim = (
        "Regularization (L2, dropout, max-norm) narrows the gap between training and validation "
        "accuracy, improves validation accuracy at the right strength, and max-norm lets a "
        "too-high learning rate train without blowing up."
    )
    return verdict_from_checks(claim, checks, text)


def regularization_table(r: Regularization):
    columns = ["method", "strength", "train acc (median)", "val acc (median)", "gap"]
    rows = []

    def add(method, strengths, tr, va, fmt):
        for s, t, v in zip(strengths, tr, va, strict=True):
            mt, mv = float(np.median(t)), float(np.median(v))
            rows.append([method, fmt(s), fmt_floor(mt), fmt_floor(mv), f"{mt - mv:.3f}"])

    add("L2 (lambda)", r.l2_strengths, r.l2_train, r.l2_val, lambda s: f"{s:g}")
    add("dropout (rate)", r.dropout_rates, r.dropout_train, r.dropout_val, lambda s: f"{s:g}")
    add("max-norm (c)", r.max_norms, r.max_norm_train, r.max_norm_val, lambda s: f"{s:g}")
    for j, (h, p, m, _) in enumerate(_high_lr_summary(r)):
        div = r.high_lr_diverged[:, j].any(axis=-1)
        rows.append(
            [
                f"learning rate {h:g}",
                f"none / max-norm {r.chosen_max_norm:g}",
                "",
                ("diverged" if div[0] else fmt_floor(p))
                + " / "
                + ("diverged" if div[1] else fmt_floor(m)),
                "",
            ]
        )
    return columns, rows


# ---------------------------------------------------------------------------------------------
# Parameter updates

# The methods and their settings, fixed before the runs: each at its common default learning
# rate on the digits (the notes': SGD/momentum 1e-2, Adam 1e-3 "or 5e-4"), the notes' rules
# where they differ from optax's (jaxnorm.training.notes_*), optax's otherwise; on the 2-D
# surfaces (unit scale) every method takes the same learning rate.
UPDATE_METHODS = ("sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam")
_DIGITS_LR = {
    "sgd": 1e-2,
    "momentum": 1e-2,
    "nesterov": 1e-2,
    "adagrad": 1e-2,
    "rmsprop": 1e-3,
    "adam": 1e-3,
}
_SURFACE_LR = 0.1
_SCHEDULES = ("constant", "step (x0.5 every 1/3 of the run)", "exponential (to 1%)", "1/t")
# A loss (or distance) lower by less than this fraction is a tie.
_REL_TIE = 0.01
# Adam is "a good default" within this many points of the best method's validation accuracy.
_ADAM_MARGIN = 0.02
# Escaping the saddle: |y| reaches this.
_ESCAPE = 0.5


def _optimizer(name: str, lr) -> optax.GradientTransformation:
    if name == "sgd":
        return optax.sgd(lr)
    if name == "momentum":
        return training.notes_momentum(lr, 0.9)
    if name == "nesterov":
        return training.notes_nesterov(lr, 0.9)
    if name == "adagrad":
        return training.notes_adagrad(lr, eps=1e-8)
    if name == "rmsprop":
        # The notes' RMSProp: decay 0.99, eps outside the root.
        return optax.rmsprop(lr, decay=0.99, eps=1e-8, eps_in_sqrt=False)
    if name == "adam":
        return optax.adam(lr, b1=0.9, b2=0.999, eps=1e-8)
    raise ValueError(f"unknown update method {name!r}")


def _switch(opts, index) -> optax.GradientTransformation:
    """The optimizer ``opts[index]`` for a traced ``index``: every one runs, one is applied.

    Each keeps its own state (the others' states follow along and are never used).
    """

    def init(params):
        return tuple(o.init(params) for o in opts)

    def update(updates, state, params=None):
        outs = [o.update(updates, s, params) for o, s in zip(opts, state, strict=True)]
        chosen = jax.tree.map(lambda *us: jnp.stack(us)[index], *[u for u, _ in outs])
        return chosen, tuple(s for _, s in outs)

    return optax.GradientTransformation(init, update)


def _ravine(p):
    # An elongated bowl: curvature 0.1 along x, 10 along y (condition number 100). With the
    # surfaces' learning rate 0.1, plain SGD's y step is exact (lr x 10 = 1: no zig-zag in y);
    # its slow progress along x is what the ravine shows.
    return 0.5 * (0.1 * p[0] ** 2 + 10.0 * p[1] ** 2)


def _saddle(p):
    # A saddle at the origin between two minima at y = +-1: f = x^2 + y^4/4 - y^2/2.
    return p[0] ** 2 + 0.25 * p[1] ** 4 - 0.5 * p[1] ** 2


_RAVINE_START = (-8.0, 1.0)
_SADDLE_START = (1.0, 1e-3)


def _trajectory(f, start, opt, steps):
    p0 = jnp.asarray(start, jnp.float32)
    grad = jax.grad(f)

    def step(carry, _):
        p, s = carry
        u, s = opt.update(grad(p), s, p)
        p = optax.apply_updates(p, u)
        return (p, s), p

    _, path = jax.lax.scan(step, (p0, opt.init(p0)), None, length=steps)
    return jnp.concatenate([p0[None], path])


class Updates(NamedTuple):
    """Result of :func:`updates`.

    Attributes:
      methods: ``("sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam")``: plain SGD,
        the notes' momentum and Nesterov (:func:`jaxnorm.training.notes_momentum`,
        :func:`~jaxnorm.training.notes_nesterov`, mu 0.9), the notes' Adagrad
        (:func:`~jaxnorm.training.notes_adagrad`), RMSProp (decay 0.99, eps outside the root)
        and Adam (0.9, 0.999, 1e-8).
      digits_learning_rates: each method's learning rate on the digits (its common default).
      loss: ``[M, S, T]`` training loss per step on the digits, per method and seed.
      final_loss: ``[M]`` median over seeds of the mean loss over the last 10% of steps.
      val_accuracy: ``[M, S]`` final validation accuracy.
      surface_learning_rate: the learning rate of every method on the 2-D surfaces.
      ravine_path: ``[M, T2 + 1, 2]`` each method's trajectory on the ravine
        ``f = 0.5 (0.1 x^2 + 10 y^2)`` from (-8, 1).
      ravine_final: ``[M]`` f at the end of the ravine run.
      saddle_path: ``[M, T2 + 1, 2]`` trajectories on ``f = x^2 + y^4/4 - y^2/2`` from
        (1, 1e-3), next to the saddle point at the origin.
      saddle_escape: ``[M]`` the first step with ``|y| >= 0.5`` (None: never).
      schedules: the learning-rate schedules compared (SGD, momentum 0.9, from 0.1).
      schedule_loss: ``[K, S, T]`` training loss per step for each schedule.
      schedule_final: ``[K]`` final loss (as ``final_loss``).
      schedule_val_accuracy: ``[K, S]``.
      widths, num_steps, surface_steps, batch_size, num_seeds: the set-up.
    """

    methods: tuple
    digits_learning_rates: tuple
    loss: np.ndarray
    final_loss: np.ndarray
    val_accuracy: np.ndarray
    surface_learning_rate: float
    ravine_path: np.ndarray
    ravine_final: np.ndarray
    saddle_path: np.ndarray
    saddle_escape: tuple
    schedules: tuple
    schedule_loss: np.ndarray
    schedule_final: np.ndarray
    schedule_val_accuracy: np.ndarray
    widths: tuple
    num_steps: int
    surface_steps: int
    batch_size: int
    num_seeds: int


def _final(loss):
    tail = max(1, loss.shape[-1] // 10)
    return np.median(np.mean(loss[..., -tail:], axis=-1), axis=-1)


def updates(key: Any = 0, *, quick: bool = False) -> Updates:
    """SGD, momentum, Nesterov, Adagrad, RMSProp and Adam on the digits, a ravine and a saddle.

    On the digits ``mlp([64, 64, 10])`` trains with each method at its common default learning
    rate (SGD and the momentum methods 1e-2, Adagrad 1e-2, RMSProp and Adam 1e-3; batch 32, 300
    steps, 3 seeds; every seed of a method in one vmapped program). On two 2-D surfaces every
    method takes learning rate 0.1 for 100 steps. Learning-rate decay: SGD with momentum 0.9
    from 0.1, constant, halved every third of the run (step), exponential down to 1% at the
    end, and 1/t (:func:`jaxnorm.training.inverse_time_decay`, k = 0.01), the four schedules in
    one vmapped program.

    Args:
      key: PRNG key or int seed.
      quick: 1 seed, 100 steps on the digits, 60 on the surfaces.

    Returns:
      An :class:`Updates`.

    References:
      Sutskever, Martens, Dahl & Hinton 2013; Duchi, Hazan & Singer 2011; Tieleman & Hinton
      2012; Kingma & Ba 2015.
    """
    key = as_key(key)
    (x, y), (xv, yv), _ = _digits(0)
    steps, seeds, surface_steps = (100, 1, 60) if quick else (300, 3, 100)
    batch = 32
    widths = (x.shape[1], 64, _NUM_CLASSES)
    model = training.mlp(widths)
    keys = jax.random.split(key, seeds)

    def schedules():
        return (
            optax.constant_schedule(0.1),
            optax.exponential_decay(0.1, max(1, steps // 3), 0.5, staircase=True),
            optax.exponential_decay(0.1, steps, 0.01),
            training.inverse_time_decay(0.1, 0.01),
        )

    # Every method and schedule in one training program: an optimizer that runs all of them
    # and applies the update of the run's (traced) index, vmapped over index and seed. One
    # compiled scan instead of ten, which is what a small run pays for.
    digits_opts = [_optimizer(m, _DIGITS_LR[m]) for m in UPDATE_METHODS]
    digits_opts += [optax.sgd(f, momentum=0.9) for f in schedules()]
    surface_opts = [_optimizer(m, _SURFACE_LR) for m in UPDATE_METHODS]

    def one(index, k):
        k_init, k_fit = jax.random.split(k)
        params, state = model.init(k_init)
        params, hist = training.fit(
            model,
            params,
            _switch(digits_opts, index),
            (x, y),
            key=k_fit,
            num_steps=steps,
            batch_size=batch,
            state=state,
        )
        return hist.loss, training.evaluate(model, params, (xv, yv))["accuracy"]

    def program(keys):
        runs = jax.vmap(jax.vmap(one, (None, 0)), (0, None))(jnp.arange(len(digits_opts)), keys)
        paths = [
            jax.vmap(
                lambda i, f=f, s0=s0: _trajectory(f, s0, _switch(surface_opts, i), surface_steps)
            )(jnp.arange(len(surface_opts)))
            for f, s0 in ((_ravine, _RAVINE_START), (_saddle, _SADDLE_START))
        ]
        return runs, paths

    (all_loss, all_val), (ravine, saddle) = jit(program, quick=quick)(keys)
    all_loss = np.asarray(all_loss, np.float64)
    all_val = np.asarray(all_val, np.float64)
    m = len(UPDATE_METHODS)
    loss, val = all_loss[:m], all_val[:m]
    ravine_path = np.asarray(ravine, np.float64)
    saddle_path = np.asarray(saddle, np.float64)
    escape = []
    for path in saddle_path:
        out = np.abs(path[:, 1]) >= _ESCAPE
        escape.append(int(np.argmax(out)) if out.any() else None)
    ravine_final = np.asarray([float(_ravine(p[-1])) for p in ravine_path])
    s_loss = all_loss[m:]
    return Updates(
        methods=UPDATE_METHODS,
        digits_learning_rates=tuple(_DIGITS_LR[m] for m in UPDATE_METHODS),
        loss=loss,
        final_loss=_final(loss),
        val_accuracy=val,
        surface_learning_rate=_SURFACE_LR,
        ravine_path=ravine_path,
        ravine_final=ravine_final,
        saddle_path=saddle_path,
        saddle_escape=tuple(escape),
        schedules=_SCHEDULES,
        schedule_loss=s_loss,
        schedule_final=_final(s_loss),
        schedule_val_accuracy=all_val[m:],
        widths=widths,
        num_steps=steps,
        surface_steps=surface_steps,
        batch_size=batch,
        num_seeds=seeds,
    )


def _escape_beats(a, b):
    """Escaping the saddle sooner (None: never escaped, the worst)."""
    if a is None and b is None:
        return TIE
    if a is None:
        return False
    if b is None:
        return True
    return beats(a, b, higher_is_better=False)


def updates_verdict(r: Updates) -> Verdict:
    """Momentum, Nesterov and the adaptive methods beat SGD on the digits' final training loss
    (ties within 1%), on the ravine and on the saddle; Adam beats SGD on all three and is
    within 2 points of the best validation accuracy on the digits."""
    i = {m: k for k, m in enumerate(r.methods)}
    sgd = i["sgd"]

    def loss_beats(m):
        a, b = r.final_loss[i[m]], r.final_loss[sgd]
        return beats(a, b, higher_is_better=False, tol=_REL_TIE * abs(b))

    def ravine_beats(m):
        a, b = r.ravine_final[i[m]], r.ravine_final[sgd]
        return beats(a, b, higher_is_better=False, tol=_REL_TIE * abs(b))

    def all_of(values):
        if any(v is None for v in values):
            return None
        if all(v is True for v in values):
            return True
        return TIE if all(v is True or v == TIE for v in values) else False

    others = [m for m in r.methods if m != "sgd"]
    val = np.median(r.val_accuracy, axis=1)
    best_val = float(np.max(val))
    adam_val = float(val[i["adam"]])
    checks = {
        "momentum and Nesterov reach a lower training loss than SGD on the digits": all_of(
            [loss_beats("momentum"), loss_beats("nesterov")]
        ),
        "Adagrad, RMSProp and Adam reach a lower training loss than SGD on the digits": all_of(
            [loss_beats(m) for m in ("adagrad", "rmsprop", "adam")]
        ),
        "every other method ends closer to the ravine's minimum than SGD": all_of(
            [ravine_beats(m) for m in others]
        ),
        "every other method escapes the saddle sooner than SGD": all_of(
            [_escape_beats(r.saddle_escape[i[m]], r.saddle_escape[sgd]) for m in others]
        ),
        f"Adam (default settings) is within {_ADAM_MARGIN:.0%} points of the best validation "
        "accuracy on the digits": adam_val >= best_val - _ADAM_MARGIN,
    }

    def esc(v):
        return "never" if v is None else str(v)

    text = (
        f"digits, final training loss (median of {r.num_seeds} seed(s), last 10% of "
        f"{r.num_steps} steps): "
        + ", ".join(f"{m} {fmt_number(v)}" for m, v in zip(r.methods, r.final_loss, strict=True))
        + "; validation accuracy: "
        + ", ".join(f"{m} {fmt_floor(v)}" for m, v in zip(r.methods, val, strict=True))
        + f". Ravine, f after {r.surface_steps} steps (lr {r.surface_learning_rate:g}): "
        + ", ".join(f"{m} {fmt_number(v)}" for m, v in zip(r.methods, r.ravine_final, strict=True))
        + "; saddle, steps to |y| >= 0.5: "
        + ", ".join(f"{m} {esc(v)}" for m, v in zip(r.methods, r.saddle_escape, strict=True))
        + ". Learning-rate schedules, final loss: "
        + ", ".join(
            f"{s} {fmt_number(v)}" for s, v in zip(r.schedules, r.schedule_final, strict=True)
        )
        + f". Losses within {_REL_TIE:.0%} of each other are ties; each check reads "
        + ", ".join(f"{check_mark(v)}" for v in checks.values())
        + "."
    )
    claim = (
        "Momentum (and Nesterov's) and the per-parameter adaptive methods (Adagrad, RMSProp, "
        "Adam) converge faster than plain SGD; Adam is a good default."
    )
    return verdict_from_checks(claim, checks, text)


def updates_table(r: Updates):
    columns = [
        "method / schedule",
        "learning rate",
        "final train loss (digits)",
        "val acc (digits)",
        "ravine f (end)",
        "saddle escape step",
    ]
    rows = []
    for k, m in enumerate(r.methods):
        esc = r.saddle_escape[k]
        rows.append(
            [
                m,
                f"{r.digits_learning_rates[k]:g} (surfaces {r.surface_learning_rate:g})",
                fmt_number(r.final_loss[k]),
                fmt_floor(np.median(r.val_accuracy[k])),
                fmt_number(r.ravine_final[k]),
                "never" if esc is None else str(esc),
            ]
        )
    for k, s in enumerate(r.schedules):
        rows.append(
            [
                f"SGD+momentum, {s}",
                "0.1 at step 0",
                fmt_number(r.schedule_final[k]),
                fmt_floor(np.median(r.schedule_val_accuracy[k])),
                "",
                "",
            ]
        )
    return columns, rows
