"""Parameter updates: what optax lacks of the lecture's rules and schedules.

optax does the updates. Where the notes' formulas give the same numbers as an optax optimizer
(SGD, RMSProp with ``eps_in_sqrt=False``, Adam) use optax's; this file adds

- the schedules optax has no equivalent of: :func:`inverse_time_decay` (the notes' 1/t decay) and
  :func:`sutskever_momentum` (momentum annealed from 0.5 towards 0.99);
- the notes' update rules where optax's convention gives different numbers, as
  ``GradientTransformation``s named ``notes_*``: :func:`notes_momentum` and :func:`notes_nesterov`
  (the learning rate inside the velocity, so a changing learning rate acts differently) and
  :func:`notes_adagrad` (eps outside the square root, no initial accumulator).

docs/training.md ("Parameter updates") lists every difference with numbers.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxnorm import _checks

# --------------------------------------------------------------------------- checks


def _check_number(value: Any, name: str, who: str, *, low=None, high=None, open_low=False):
    """A real scalar hyperparameter (a Python/NumPy/JAX number), checked when concrete."""
    if isinstance(value, bool | np.bool_) or not isinstance(
        value, int | float | np.integer | np.floating | np.ndarray | jax.Array
    ):
        raise TypeError(f"{who}: {name} must be a number, got {value!r} of type {type(value)}")
    if np.ndim(value) != 0:
        raise ValueError(f"{who}: {name} must be a scalar, got shape {np.shape(value)}")
    if _checks.is_tracer(value):
        return  # traced (inject_hyperparams under jit, a vmapped search): cannot be read
    v = float(value)
    bad = not np.isfinite(v)
    if low is not None:
        bad = bad or (v <= low if open_low else v < low)
    if high is not None:
        bad = bad or v > high
    if bad:
        lo = "" if low is None else f"{'>' if open_low else '>='} {low}"
        hi = "" if high is None else f"<= {high}"
        rng = " and ".join(s for s in (lo, hi) if s)
        raise ValueError(f"{who}: {name} must be finite{' and ' + rng if rng else ''}, got {v}")


def _check_hyper(value: Any, name: str, who: str, **bounds) -> None:
    """A scalar or a schedule (a callable of the step count)."""
    if callable(value):
        return
    _check_number(value, name, who, **bounds)


def _at(value: Any, count: jax.Array) -> jax.Array:
    return value(count) if callable(value) else value


# --------------------------------------------------------------------------- schedules


def inverse_time_decay(
    init_value: float,
    decay_rate: float,
    *,
    decay_steps: int = 1,
    staircase: bool = False,
) -> optax.Schedule:
    r"""The notes' 1/t decay, :math:`\alpha_t = \alpha_0 / (1 + k\,t)`, as an optax schedule.

    With ``decay_steps`` :math:`s` the step is counted in units of :math:`s` steps,
    :math:`\alpha_t = \alpha_0 / (1 + k\,t/s)` (:math:`\lfloor t/s \rfloor` with
    ``staircase=True``), Keras's ``InverseTimeDecay(initial_learning_rate, decay_steps,
    decay_rate, staircase)`` and TensorFlow's ``inverse_time_decay``. optax 0.2.8 has no
    equivalent: ``polynomial_schedule`` decays as :math:`(1 - t/T)^p` to an end value at a fixed
    step, ``exponential_decay`` as :math:`r^{t/s}`; 1/t decay never reaches 0 and has no end.

    Use it wherever optax takes a learning rate (``optax.sgd(inverse_time_decay(0.1, 1e-3))``)
    or through ``optax.inject_hyperparams``. The step is optax's count, 0 at the first update.

    Args:
      init_value: :math:`\alpha_0`, a finite number.
      decay_rate: :math:`k`, a finite number >= 0.
      decay_steps: :math:`s`, a positive int.
      staircase: decay in whole units of ``decay_steps``.

    Returns:
      ``schedule(count) -> value`` (float32, or the dtype of a float64 ``init_value`` under x64).

    Raises:
      TypeError: if a number is not a number, decay_steps is not an int or staircase not a bool.
      ValueError: if init_value or decay_rate is not finite, decay_rate < 0 or decay_steps < 1.

    References:
      CS231n notes, "Annealing the learning rate"; Keras ``optimizers.schedules.InverseTimeDecay``.

    Example:
      >>> from jaxnorm import training
      >>> schedule = training.inverse_time_decay(0.1, 0.5)
      >>> [round(float(schedule(t)), 4) for t in (0, 1, 2, 10)]  # 0.1 / (1 + 0.5 t)
      [0.1, 0.0667, 0.05, 0.0167]
    """
    who = "inverse_time_decay"
    _check_number(init_value, "init_value", who)
    _check_number(decay_rate, "decay_rate", who, low=0.0)
    if isinstance(decay_steps, bool) or not isinstance(decay_steps, int | np.integer):
        raise TypeError(f"{who}: decay_steps must be an int, got {decay_steps!r}")
    if decay_steps < 1:
        raise ValueError(f"{who}: decay_steps must be at least 1, got {decay_steps}")
    if not isinstance(staircase, bool | np.bool_):
        raise TypeError(f"{who}: staircase must be a bool, got {staircase!r}")
    steps = float(decay_steps)

    def schedule(count):
        t = jnp.asarray(count).astype(jnp.float32) / jnp.float32(steps)
        if staircase:
            t = jnp.floor(t)
        init = jnp.asarray(init_value)
        dtype = init.dtype if jnp.issubdtype(init.dtype, jnp.floating) else jnp.float32
        t = t.astype(dtype)
        return init.astype(dtype) / (1 + jnp.asarray(decay_rate).astype(dtype) * t)

    return schedule


def sutskever_momentum(max_momentum: float = 0.99, *, steps_per_stage: int = 250) -> optax.Schedule:
    r"""Momentum annealed from 0.5 towards ``max_momentum`` (Sutskever et al. 2013).

    .. math:: \mu_t = \min\Big(1 - 2^{-1 - \log_2(\lfloor t/250 \rfloor + 1)},\ \mu_{max}\Big)
              = \min\Big(1 - \frac{1}{2(\lfloor t/250\rfloor + 1)},\ \mu_{max}\Big)

    0.5 for the first 250 steps, then 0.75, 0.833, 0.875, ..., reaching 0.99 after 49 stages:
    the notes' advice, "start with momentum of about 0.5 and anneal it to 0.99 or so over
    multiple epochs", in the form Sutskever et al. trained with (their :math:`\mu_{max}` was
    0.9 to 0.999). For a linear ramp instead, ``optax.linear_schedule(0.5, 0.99, N)`` is that
    schedule already.

    It works wherever optax accepts a schedule for a hyperparameter:
    ``optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=sutskever_momentum())``
    (optax's trace takes the momentum as an array, so injecting it schedules it), and the
    notes' rules :func:`notes_momentum` / :func:`notes_nesterov` take it directly.

    Args:
      max_momentum: :math:`\mu_{max}`, in [0.5, 1).
      steps_per_stage: the steps per stage (250 in the paper), a positive int.

    Returns:
      ``schedule(count) -> momentum`` (float32).

    Raises:
      TypeError: if max_momentum is not a number or steps_per_stage not an int.
      ValueError: if max_momentum is outside [0.5, 1) or steps_per_stage < 1.

    References:
      Sutskever, Martens, Dahl & Hinton 2013, "On the importance of initialization and momentum
      in deep learning", ICML, section 4 (equation 5).

    Example:
      >>> from jaxnorm import training
      >>> mu = training.sutskever_momentum(0.99, steps_per_stage=10)
      >>> [round(float(mu(t)), 4) for t in (0, 9, 10, 20, 30, 1000)]
      [0.5, 0.5, 0.75, 0.8333, 0.875, 0.99]
    """
    who = "sutskever_momentum"
    _check_number(max_momentum, "max_momentum", who, low=0.5, high=1.0)
    if not _checks.is_tracer(max_momentum) and float(max_momentum) >= 1.0:
        raise ValueError(f"{who}: max_momentum must be below 1, got {float(max_momentum)}")
    if isinstance(steps_per_stage, bool) or not isinstance(steps_per_stage, int | np.integer):
        raise TypeError(f"{who}: steps_per_stage must be an int, got {steps_per_stage!r}")
    if steps_per_stage < 1:
        raise ValueError(f"{who}: steps_per_stage must be at least 1, got {steps_per_stage}")

    def schedule(count):
        stage = jnp.floor_divide(jnp.asarray(count).astype(jnp.int32), steps_per_stage)
        mu = 1 - 0.5 / (stage.astype(jnp.float32) + 1)
        return jnp.minimum(mu, jnp.asarray(max_momentum).astype(jnp.float32))

    return schedule


# --------------------------------------------------------------------------- the notes' rules


class NotesMomentumState(NamedTuple):
    """State of :func:`notes_momentum` and :func:`notes_nesterov`.

    Attributes:
      count: the number of updates so far (int32); schedules are evaluated at it.
      velocity: :math:`v`, a pytree like the params (the last update, for notes_momentum).
    """

    count: jax.Array
    velocity: Any


class NotesAdagradState(NamedTuple):
    """State of :func:`notes_adagrad`.

    Attributes:
      count: the number of updates so far (int32).
      cache: the running sum of squared gradients, a pytree like the params.
    """

    count: jax.Array
    cache: Any


def _momentum_rule(learning_rate, momentum, nesterov: bool, who: str):
    _check_hyper(learning_rate, "learning_rate", who, low=0.0)
    _check_hyper(momentum, "momentum", who, low=0.0, high=1.0)

    def init_fn(params):
        return NotesMomentumState(
            count=jnp.zeros([], jnp.int32), velocity=optax.tree.zeros_like(params)
        )

    def update_fn(updates, state, params=None):
        del params
        lr = _at(learning_rate, state.count)
        mu = _at(momentum, state.count)

        flat_g, treedef = jax.tree.flatten(updates)
        flat_v = treedef.flatten_up_to(state.velocity)
        new_u, new_v = [], []
        for g, v in zip(flat_g, flat_v, strict=True):
            lr_, mu_ = jnp.asarray(lr).astype(v.dtype), jnp.asarray(mu).astype(v.dtype)
            v_new = mu_ * v - lr_ * g.astype(v.dtype)
            if nesterov:
                # v_prev = v; v = mu v - lr dx; x += -mu v_prev + (1 + mu) v
                new_u.append((-mu_ * v + (1 + mu_) * v_new).astype(g.dtype))
            else:
                new_u.append(v_new.astype(g.dtype))
            new_v.append(v_new)
        new_updates = treedef.unflatten(new_u)
        velocity = treedef.unflatten(new_v)
        return new_updates, NotesMomentumState(optax.safe_increment(state.count), velocity)

    return optax.GradientTransformation(init_fn, update_fn)


def notes_momentum(
    learning_rate: optax.ScalarOrSchedule, momentum: optax.ScalarOrSchedule = 0.9
) -> optax.GradientTransformation:
    r"""SGD with momentum as the notes write it: ``v = mu * v - lr * dx; x += v``.

    .. math:: v \leftarrow \mu v - \eta_t\,dx, \qquad x \leftarrow x + v

    The learning rate multiplies each gradient as it enters the velocity. optax's
    ``sgd(lr, momentum)`` (and PyTorch's ``SGD``) keep :math:`t \leftarrow dx + \mu t` and apply
    :math:`-\eta_t t`, the current learning rate times the whole trace. With a constant learning
    rate the two are the same update (:math:`v = -\eta t`); when it changes they differ: after a
    drop from :math:`\eta` to :math:`\eta/10`, optax's next step shrinks the momentum built at
    :math:`\eta` tenfold at once, the notes' keeps it and decays it at rate :math:`\mu`
    (docs/training.md has the numbers). Both ``learning_rate`` and ``momentum`` may be
    schedules, evaluated at the step count (0 at the first update), as optax evaluates them.

    Args:
      learning_rate: :math:`\eta`, a number >= 0 or a schedule ``count -> value``.
      momentum: :math:`\mu`, in [0, 1], or a schedule (e.g. :func:`sutskever_momentum`).

    Returns:
      An optax ``GradientTransformation`` (a full optimizer: its updates include the minus sign
      and the learning rate, as ``optax.sgd``'s) with state :class:`NotesMomentumState`.

    Raises:
      TypeError: if a hyperparameter is neither a number nor a callable.
      ValueError: if a concrete learning rate is negative or not finite, or a concrete momentum
        is outside [0, 1].

    References:
      CS231n notes, "Parameter updates: momentum update"; Sutskever, Martens, Dahl & Hinton 2013.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxnorm import training
      >>> tx = training.notes_momentum(0.1, momentum=0.9)
      >>> params = {"w": jnp.zeros(2)}
      >>> state = tx.init(params)
      >>> grads = {"w": jnp.ones(2)}
      >>> u1, state = tx.update(grads, state)
      >>> u2, state = tx.update(grads, state)
      >>> u1["w"], u2["w"]  # v = -0.1, then 0.9 * -0.1 - 0.1
      (Array([-0.1, -0.1], dtype=float32), Array([-0.19, -0.19], dtype=float32))
    """
    return _momentum_rule(learning_rate, momentum, False, "notes_momentum")


def notes_nesterov(
    learning_rate: optax.ScalarOrSchedule, momentum: optax.ScalarOrSchedule = 0.9
) -> optax.GradientTransformation:
    r"""Nesterov momentum in the notes' form: :math:`x \mathrel{+}= -\mu v_{prev} + (1 + \mu) v`.

    .. math::
        v_{prev} = v, \quad v \leftarrow \mu v - \eta_t\,dx, \quad
        x \mathrel{+}= -\mu\,v_{prev} + (1 + \mu)\,v

    (the rewrite of Nesterov's look-ahead gradient in terms of the parameters after the update,
    Bengio et al. 2012). optax's ``sgd(lr, momentum, nesterov=True)`` applies
    :math:`-\eta_t (dx + \mu t)` with :math:`t \leftarrow dx + \mu t`: the same update for a
    constant learning rate and momentum, different when either changes (the notes' keeps the
    learning rate inside :math:`v`).

    Args:
      learning_rate: :math:`\eta`, a number >= 0 or a schedule.
      momentum: :math:`\mu`, in [0, 1], or a schedule.

    Returns:
      An optax ``GradientTransformation`` (a full optimizer) with state
      :class:`NotesMomentumState`.

    Raises:
      TypeError, ValueError: as :func:`notes_momentum`.

    References:
      CS231n notes, "Nesterov momentum"; Nesterov 1983; Bengio, Boulanger-Lewandowski & Pascanu
      2012, "Advances in optimizing recurrent networks", section 3.5; Sutskever et al. 2013.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxnorm import training
      >>> tx = training.notes_nesterov(0.1, momentum=0.9)
      >>> state = tx.init(jnp.zeros(1))
      >>> u, state = tx.update(jnp.ones(1), state)
      >>> u  # -0.9 * 0 + 1.9 * (-0.1)
      Array([-0.19], dtype=float32)
    """
    return _momentum_rule(learning_rate, momentum, True, "notes_nesterov")


def notes_adagrad(
    learning_rate: optax.ScalarOrSchedule, eps: float = 1e-8
) -> optax.GradientTransformation:
    r"""Adagrad as the notes write it: ``cache += dx**2; x += -lr * dx / (sqrt(cache) + eps)``.

    .. math:: c \leftarrow c + dx^2, \qquad x \mathrel{+}= -\eta_t\,\frac{dx}{\sqrt{c} + \epsilon}

    The cache starts at 0 and :math:`\epsilon` is added *outside* the square root (the notes:
    "usually set somewhere in range from 1e-4 to 1e-8"). optax's ``adagrad(lr,
    initial_accumulator_value=0.1, eps=1e-7)`` starts the sum at 0.1 and computes
    :math:`dx / \sqrt{c + \epsilon}`: its first step is :math:`-\eta\,dx/\sqrt{0.1 + dx^2}`, the
    notes' :math:`-\eta\,dx/(|dx| + \epsilon) \approx -\eta\,\mathrm{sign}(dx)`; for a gradient of
    0.01 that is 0.032 against 1.0 (times :math:`\eta`). No optax setting gives the notes' rule
    (``initial_accumulator_value=0`` still puts eps inside the root). A coordinate whose
    gradients have all been 0 does not move.

    Args:
      learning_rate: :math:`\eta`, a number >= 0 or a schedule.
      eps: :math:`\epsilon`, a positive number.

    Returns:
      An optax ``GradientTransformation`` (a full optimizer) with state
      :class:`NotesAdagradState`.

    Raises:
      TypeError: if a hyperparameter is not a number (or a schedule, for the learning rate).
      ValueError: if a concrete learning rate is negative or eps is not positive and finite.

    References:
      Duchi, Hazan & Singer 2011, "Adaptive subgradient methods for online learning and
      stochastic optimization"; CS231n notes, "Per-parameter adaptive learning rate methods".

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxnorm import training
      >>> tx = training.notes_adagrad(1.0)
      >>> state = tx.init(jnp.zeros(2))
      >>> u, state = tx.update(jnp.array([0.01, -4.0]), state)
      >>> u  # -dx / (|dx| + 1e-8): about the sign, whatever the scale
      Array([-0.999999,  1.      ], dtype=float32)
    """
    who = "notes_adagrad"
    _check_hyper(learning_rate, "learning_rate", who, low=0.0)
    _check_number(eps, "eps", who, low=0.0, open_low=True)

    def init_fn(params):
        return NotesAdagradState(
            count=jnp.zeros([], jnp.int32), cache=optax.tree.zeros_like(params)
        )

    def update_fn(updates, state, params=None):
        del params
        lr = _at(learning_rate, state.count)
        flat_g, treedef = jax.tree.flatten(updates)
        flat_c = treedef.flatten_up_to(state.cache)
        new_u, new_c = [], []
        for g, c in zip(flat_g, flat_c, strict=True):
            c = c + jnp.square(g.astype(c.dtype))
            lr_, eps_ = jnp.asarray(lr).astype(c.dtype), jnp.asarray(eps).astype(c.dtype)
            new_u.append((-lr_ * g.astype(c.dtype) / (jnp.sqrt(c) + eps_)).astype(g.dtype))
            new_c.append(c)
        new_updates, cache = treedef.unflatten(new_u), treedef.unflatten(new_c)
        return new_updates, NotesAdagradState(optax.safe_increment(state.count), cache)

    return optax.GradientTransformation(init_fn, update_fn)


__all__ = [
    "NotesAdagradState",
    "NotesMomentumState",
    "inverse_time_decay",
    "notes_adagrad",
    "notes_momentum",
    "notes_nesterov",
    "sutskever_momentum",
]
