"""Parameter updates: the notes' rules against NumPy, optax's conventions against the notes'.

Each rule runs several steps on a fixed sequence of gradients, with a learning rate that changes
(a schedule), and is compared with a NumPy float64 transcription of the formula as the notes
write it (or, for optax's own conventions, as optax's source computes it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxnorm import training

STEPS = 8
GRADS = np.random.default_rng(0).normal(size=(STEPS, 2, 3)) * np.array([1.0, 1e-2, 3.0])
LR = lambda t: 0.1 * 0.5 ** (t // 3)  # halves every 3 steps
MU = lambda t: min(0.5 + 0.1 * t, 0.95)


def _jax_schedule(f):
    # the same piecewise values as a traceable optax schedule
    # (the default float dtype: float64 under x64)
    return lambda count: jnp.asarray([f(t) for t in range(STEPS)])[count]


def _run(tx, dtype=jnp.float32):
    """The parameters after each update, starting from zeros; gradients from GRADS."""
    params = {"w": jnp.zeros((2, 3), dtype)}
    state = tx.init(params)
    update = jax.jit(tx.update)
    out = []
    for g in GRADS:
        updates, state = update({"w": jnp.asarray(g, dtype)}, state, params)
        params = optax.apply_updates(params, updates)
        out.append(np.asarray(params["w"], np.float64))
    return np.stack(out)


# NumPy transcriptions of the notes (CS231n, "Parameter updates").


def _np_sgd(lr):
    x, out = np.zeros((2, 3)), []
    for t, dx in enumerate(GRADS):
        x = x + -lr(t) * dx
        out.append(x)
    return np.stack(out)


def _np_momentum(lr, mu):
    x, v, out = np.zeros((2, 3)), np.zeros((2, 3)), []
    for t, dx in enumerate(GRADS):
        v = mu(t) * v - lr(t) * dx  # integrate velocity
        x = x + v  # integrate position
        out.append(x)
    return np.stack(out)


def _np_nesterov(lr, mu):
    x, v, out = np.zeros((2, 3)), np.zeros((2, 3)), []
    for t, dx in enumerate(GRADS):
        v_prev = v
        v = mu(t) * v - lr(t) * dx
        x = x + (-mu(t) * v_prev + (1 + mu(t)) * v)
        out.append(x)
    return np.stack(out)


def _np_adagrad(lr, eps):
    x, cache, out = np.zeros((2, 3)), np.zeros((2, 3)), []
    for t, dx in enumerate(GRADS):
        cache = cache + dx**2
        x = x + -lr(t) * dx / (np.sqrt(cache) + eps)
        out.append(x)
    return np.stack(out)


def _np_rmsprop(lr, decay, eps):
    x, cache, out = np.zeros((2, 3)), np.zeros((2, 3)), []
    for t, dx in enumerate(GRADS):
        cache = decay * cache + (1 - decay) * dx**2
        x = x + -lr(t) * dx / (np.sqrt(cache) + eps)
        out.append(x)
    return np.stack(out)


def _np_adam(lr, beta1, beta2, eps):
    x, m, v, out = np.zeros((2, 3)), np.zeros((2, 3)), np.zeros((2, 3)), []
    for t0, dx in enumerate(GRADS):
        t = t0 + 1
        m = beta1 * m + (1 - beta1) * dx
        mt = m / (1 - beta1**t)
        v = beta2 * v + (1 - beta2) * (dx**2)
        vt = v / (1 - beta2**t)
        x = x + -lr(t0) * mt / (np.sqrt(vt) + eps)
        out.append(x)
    return np.stack(out)


# optax's own conventions, transcribed from its source (optax 0.2.8: transform.trace, scale_by_rss).


def _np_optax_trace(lr, mu, nesterov=False):
    x, tr, out = np.zeros((2, 3)), np.zeros((2, 3)), []
    for t, dx in enumerate(GRADS):
        tr = dx + mu(t) * tr
        step = dx + mu(t) * tr if nesterov else tr
        x = x - lr(t) * step
        out.append(x)
    return np.stack(out)


RTOL = {"rtol": 2e-6, "atol": 1e-7}


# --------------------------------------------------------------------------- the notes' rules


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_notes_momentum_and_nesterov_match_the_notes_with_schedules(dtype):
    with jax.enable_x64(dtype == jnp.float64):
        tol = RTOL if dtype == jnp.float32 else {"rtol": 1e-12}
        lr, mu = _jax_schedule(LR), _jax_schedule(MU)
        np.testing.assert_allclose(
            _run(training.notes_momentum(lr, mu), dtype), _np_momentum(LR, MU), **tol
        )
        np.testing.assert_allclose(
            _run(training.notes_nesterov(lr, mu), dtype), _np_nesterov(LR, MU), **tol
        )
        # constant hyperparameters too
        const = lambda v: lambda t: v
        np.testing.assert_allclose(
            _run(training.notes_momentum(0.05, 0.9), dtype),
            _np_momentum(const(0.05), const(0.9)),
            **tol,
        )


def test_notes_adagrad_matches_the_notes():
    np.testing.assert_allclose(
        _run(training.notes_adagrad(_jax_schedule(LR), eps=1e-8)), _np_adagrad(LR, 1e-8), **RTOL
    )
    np.testing.assert_allclose(
        _run(training.notes_adagrad(0.5, eps=1e-4)), _np_adagrad(lambda t: 0.5, 1e-4), **RTOL
    )


def test_notes_rules_keep_structure_and_dtype():
    # a params tuple of two leaves (a pair must not be taken for an (update, velocity) pair)
    params = (jnp.ones((2, 2), jnp.bfloat16), jnp.ones(3, jnp.bfloat16))
    grads = (jnp.full((2, 2), 0.5, jnp.bfloat16), jnp.full(3, -1.0, jnp.bfloat16))
    for tx in (
        training.notes_momentum(0.1),
        training.notes_nesterov(0.1),
        training.notes_adagrad(0.1),
    ):
        updates, _ = tx.update(grads, tx.init(params))
        assert jax.tree.structure(updates) == jax.tree.structure(params)
        assert all(u.dtype == jnp.bfloat16 for u in updates)
        assert updates[0].shape == (2, 2) and updates[1].shape == (3,)


def test_inject_hyperparams_schedules_the_notes_rules():
    tx = optax.inject_hyperparams(training.notes_momentum)(
        learning_rate=_jax_schedule(LR), momentum=_jax_schedule(MU)
    )
    np.testing.assert_allclose(_run(tx), _np_momentum(LR, MU), **RTOL)


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: training.notes_momentum(-0.1), ValueError, "learning_rate must be finite and >="),
        (lambda: training.notes_momentum(0.1, 1.5), ValueError, "momentum must be finite and >= 0"),
        (lambda: training.notes_nesterov("0.1"), TypeError, "learning_rate must be a number"),
        (lambda: training.notes_adagrad(0.1, eps=0.0), ValueError, "eps must be finite and > 0"),
        (lambda: training.notes_adagrad(0.1, eps=np.nan), ValueError, "eps must be finite"),
    ],
)
def test_notes_rules_check_their_hyperparameters(make, error, match):
    with pytest.raises(error, match=match):
        make()


# --------------------------------------------------------------------------- optax vs the notes


def test_optax_sgd_is_the_notes_sgd():
    np.testing.assert_allclose(_run(optax.sgd(_jax_schedule(LR))), _np_sgd(LR), **RTOL)


@pytest.mark.parametrize("nesterov", [False, True])
def test_optax_momentum_equals_the_notes_only_for_a_constant_learning_rate(nesterov):
    notes = _np_nesterov if nesterov else _np_momentum
    const_lr, mu = (lambda t: 0.1), (lambda t: 0.9)
    # constant learning rate: the same updates (v = -lr * trace)
    np.testing.assert_allclose(
        _run(optax.sgd(0.1, momentum=0.9, nesterov=nesterov)), notes(const_lr, mu), **RTOL
    )
    # a changing one: optax applies the current rate to the whole trace
    ours = _run(optax.sgd(_jax_schedule(LR), momentum=0.9, nesterov=nesterov))
    np.testing.assert_allclose(ours, _np_optax_trace(LR, mu, nesterov), **RTOL)
    gap = np.abs(ours - notes(LR, mu)).max() / np.abs(notes(LR, mu)).max()
    assert gap > 0.05, gap


@pytest.mark.loose_promotion  # optax's internals mix int32 counts with floats
def test_the_docs_momentum_table():
    # docs/training.md: a gradient of 1 at every step, mu = 0.9, lr 0.1 for 3 steps then 0.01.
    lr = lambda t: 0.1 if t < 3 else 0.01
    g = np.ones(5)
    v, tr, notes_steps, optax_steps = 0.0, 0.0, [], []
    for t in range(5):
        v = 0.9 * v - lr(t) * g[t]
        tr = g[t] + 0.9 * tr
        notes_steps.append(v)
        optax_steps.append(-lr(t) * tr)
    np.testing.assert_allclose(notes_steps, [-0.1, -0.19, -0.271, -0.2539, -0.23851], rtol=1e-12)
    np.testing.assert_allclose(optax_steps, [-0.1, -0.19, -0.271, -0.03439, -0.040951], rtol=1e-12)
    sched = optax.piecewise_constant_schedule(0.1, {3: 0.1})
    for tx, expected in (
        (optax.sgd(sched, momentum=0.9), optax_steps),
        (training.notes_momentum(sched, 0.9), notes_steps),
    ):
        state, steps = tx.init(jnp.zeros(())), []
        for _ in range(5):
            u, state = tx.update(jnp.ones(()), state)
            steps.append(float(u))
        np.testing.assert_allclose(steps, expected, rtol=1e-6)


def test_optax_adagrad_differs_from_the_notes():
    # optax: the sum starts at 0.1 and eps (1e-7) is inside the square root
    g = np.array([0.01, 1e-4, 3.0])
    tx = optax.adagrad(1.0)
    u, _ = tx.update(jnp.asarray(g, jnp.float32), tx.init(jnp.zeros(3)))
    np.testing.assert_allclose(u, -g / np.sqrt(0.1 + g**2 + 1e-7), rtol=1e-6)
    notes = -g / (np.abs(g) + 1e-8)
    assert abs(u[0] / notes[0]) < 0.04  # 0.0316 of the notes' step for a gradient of 0.01
    # even with no initial accumulator, eps inside the root changes small gradients' steps
    tx = optax.adagrad(1.0, initial_accumulator_value=0.0, eps=1e-8)
    u, _ = tx.update(jnp.asarray(g, jnp.float32), tx.init(jnp.zeros(3)))
    np.testing.assert_allclose(u, -g / np.sqrt(g**2 + 1e-8), rtol=1e-6)
    assert abs(u[1] / notes[1]) < 0.71  # 1/sqrt(2) for a gradient of 1e-4
    tx = training.notes_adagrad(1.0)
    ours, _ = tx.update(jnp.asarray(g, jnp.float32), tx.init(jnp.zeros(3)))
    np.testing.assert_allclose(ours, notes, rtol=1e-6)


def test_optax_rmsprop_is_the_notes_only_with_eps_outside_the_root():
    sched = _jax_schedule(LR)
    notes = _np_rmsprop(LR, 0.9, 1e-8)
    np.testing.assert_allclose(
        _run(optax.rmsprop(sched, decay=0.9, eps=1e-8, eps_in_sqrt=False)), notes, **RTOL
    )
    # optax's default puts eps inside the root: the small-gradient coordinates move less
    default = _run(optax.rmsprop(sched, decay=0.9, eps=1e-8))
    assert np.abs(default - notes).max() > 1e-4
    # docs/training.md: a first gradient of 1e-4 steps 0.953 (optax's default) against 3.161
    g = jnp.array([1e-4])
    for eps_in_sqrt, expected in ((True, 0.9534626), (False, 3.1612778)):
        tx = optax.rmsprop(1.0, decay=0.9, eps=1e-8, eps_in_sqrt=eps_in_sqrt)
        u, _ = tx.update(g, tx.init(jnp.zeros(1)))
        np.testing.assert_allclose(-u, [expected], rtol=1e-6)


@pytest.mark.loose_promotion  # optax's internals mix int32 counts with floats
def test_optax_adam_is_the_notes_adam():
    # float64: the same rule (float32 rounds 1 - 0.999 to 9.9998713e-4, 1.3e-5 off, in both)
    with jax.enable_x64(True):
        np.testing.assert_allclose(
            _run(optax.adam(_jax_schedule(LR)), jnp.float64),
            _np_adam(LR, 0.9, 0.999, 1e-8),
            rtol=1e-10,
        )
    np.testing.assert_allclose(
        _run(optax.adam(_jax_schedule(LR))), _np_adam(LR, 0.9, 0.999, 1e-8), rtol=1e-4
    )


# --------------------------------------------------------------------------- schedules


@pytest.mark.parametrize(("decay_steps", "staircase"), [(1, False), (4, False), (4, True)])
def test_inverse_time_decay_matches_the_formula_and_keras(decay_steps, staircase):
    t = np.arange(0, 40)
    sched = training.inverse_time_decay(0.3, 0.25, decay_steps=decay_steps, staircase=staircase)
    # keras.optimizers.schedules.InverseTimeDecay.__call__:
    # initial_learning_rate / (1 + decay_rate * p), p = step / decay_steps (floored if staircase)
    p = t / decay_steps
    if staircase:
        p = np.floor(p)
    expected = 0.3 / (1 + 0.25 * p)
    np.testing.assert_allclose(jax.vmap(sched)(jnp.asarray(t)), expected, rtol=1e-6)
    np.testing.assert_allclose(jax.jit(sched)(7), expected[7], rtol=1e-6)
    if decay_steps == 1:
        # the notes' alpha0 / (1 + k t) as the learning rate of optax.sgd
        tx = optax.sgd(sched)
        state = tx.init(jnp.zeros(()))
        for step in range(5):
            u, state = tx.update(jnp.ones(()), state)
            np.testing.assert_allclose(float(u), -0.3 / (1 + 0.25 * step), rtol=1e-6)


def test_inverse_time_decay_checks_its_arguments():
    with pytest.raises(ValueError, match="inverse_time_decay: decay_rate must be finite and >= 0"):
        training.inverse_time_decay(0.1, -1.0)
    with pytest.raises(ValueError, match="decay_steps must be at least 1"):
        training.inverse_time_decay(0.1, 1.0, decay_steps=0)
    with pytest.raises(TypeError, match="decay_steps must be an int"):
        training.inverse_time_decay(0.1, 1.0, decay_steps=2.5)
    with pytest.raises(ValueError, match="init_value must be finite"):
        training.inverse_time_decay(np.inf, 1.0)


def test_sutskever_momentum_matches_the_paper():
    t = np.arange(0, 20000, 37)
    expected = np.minimum(1 - 2.0 ** (-1 - np.log2(np.floor(t / 250) + 1)), 0.99)
    sched = training.sutskever_momentum(0.99)
    np.testing.assert_allclose(jax.vmap(sched)(jnp.asarray(t)), expected, rtol=1e-6)
    assert float(sched(0)) == 0.5 and float(sched(10**6)) == pytest.approx(0.99)
    with pytest.raises(ValueError, match="max_momentum must be"):
        training.sutskever_momentum(1.0)
    with pytest.raises(ValueError, match=r"max_momentum must be finite and >= 0\.5"):
        training.sutskever_momentum(0.3)


def test_a_momentum_schedule_through_inject_hyperparams():
    # optax.sgd's momentum is the decay of a trace that takes an array: inject_hyperparams
    # schedules it. A short stage length makes the schedule change within the run.
    mu = training.sutskever_momentum(0.99, steps_per_stage=2)
    mu_np = lambda t: min(1 - 0.5 / (t // 2 + 1), 0.99)
    tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=mu)
    np.testing.assert_allclose(_run(tx), _np_optax_trace(lambda t: 0.1, mu_np), **RTOL)
    linear = optax.linear_schedule(0.5, 0.99, transition_steps=STEPS)
    tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=linear)
    lin_np = lambda t: 0.5 + (0.99 - 0.5) * min(t, STEPS) / STEPS
    np.testing.assert_allclose(_run(tx), _np_optax_trace(lambda t: 0.1, lin_np), **RTOL)
    # and directly in the notes' rule
    np.testing.assert_allclose(
        _run(training.notes_momentum(0.1, mu)), _np_momentum(lambda t: 0.1, mu_np), **RTOL
    )
