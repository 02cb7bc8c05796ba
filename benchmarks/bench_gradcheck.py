"""Gradient checking: jaxnorm's sampled check against the lecture's per-coordinate loop.

The anchor is the loop a user writes from the lecture's notes, in JAX: for each sampled coordinate,
copy the parameters with ``x[i] + h``, call the jitted loss, copy with ``x[i] - h``, call it again,
take the centred difference. Both sides evaluate the loss in float64. The loop is timed on a few
coordinates and scaled to the full count (it is linear in the count); jaxnorm's ``check_grad`` runs
all of them and also computes the analytic gradient and the report.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import harness
from jaxnorm import gradcheck

_SIZES = {
    # (input, hidden, classes, batch, checks, loop coordinates timed)
    "small": (300, 300, 10, 8, 1000, 20),
    "large": (1000, 1000, 10, 8, 1000, 50),
}


def _loss(params, x, y):
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    logits = h @ params["w2"] + params["b2"]
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))


def _model(d, hidden, classes, batch):
    k = jax.random.split(jax.random.key(0), 4)
    params = {
        "w1": jax.random.normal(k[0], (d, hidden)) / np.sqrt(d),
        "b1": jnp.zeros(hidden),
        "w2": jax.random.normal(k[1], (hidden, classes)) / np.sqrt(hidden),
        "b2": jnp.zeros(classes),
    }
    x = jax.random.normal(k[2], (batch, d))
    y = jax.random.randint(k[3], (batch,), 0, classes)
    return params, x, y


def _lecture_loop(params, x, y, coords):
    """The lecture's loop, as a JAX user writes it: a copy and two jitted calls per coordinate."""
    with jax.enable_x64(True):
        params = {k: jnp.asarray(np.asarray(v, np.float64)) for k, v in params.items()}
        x = jnp.asarray(np.asarray(x, np.float64))
        loss = jax.jit(_loss)
        out = []
        for name, i in coords:
            old = params[name][i]
            h = gradcheck.DEFAULT_EPS * max(abs(float(old)), 1.0)
            plus = dict(params, **{name: params[name].at[i].set(old + h)})
            minus = dict(params, **{name: params[name].at[i].set(old - h)})
            out.append((float(loss(plus, x, y)) - float(loss(minus, x, y))) / (2 * h))
        return out


@harness.benchmark("gradcheck")
def bench(size: str) -> list[harness.Row]:
    d, hidden, classes, batch, checks, looped = _SIZES[size]
    params, x, y = _model(d, hidden, classes, batch)
    n_params = sum(v.size for v in params.values())
    rng = np.random.default_rng(0)
    coords = [("w1", (int(rng.integers(d)), int(rng.integers(hidden)))) for _ in range(looped)]

    candidate = lambda: gradcheck.check_grad(_loss, params, x, y, num_checks=checks).passed
    anchor = lambda: _lecture_loop(params, x, y, coords)

    # First call: traces and compiles the evaluators (cached by the jaxpr's structure afterwards).
    gradcheck._EVALUATORS.clear()
    t0 = time.perf_counter()
    candidate()
    cold_s = time.perf_counter() - t0

    times = harness.interleaved({"jaxnorm": candidate, "loop": anchor}, warmup=1, reps=5)
    loop_s = times["loop"] * checks / looped
    case = f"{checks} sampled checks, MLP {d}-{hidden}-{classes} ({n_params / 1e6:.2f}M params)"
    note = (
        f"loop timed on {looped} coordinates, scaled x{checks // looped}; "
        f"loop/jaxnorm = {loop_s / times['jaxnorm']:.0f}x"
    )
    return [
        harness.Row("gradcheck", case, times["jaxnorm"], "lecture loop", loop_s, None, note),
        harness.Row(
            "gradcheck",
            case + ", first call (compiles)",
            cold_s,
            "lecture loop",
            loop_s,
            None,
            f"includes tracing and XLA compilation; loop/jaxnorm = {loop_s / cold_s:.1f}x",
        ),
    ]
