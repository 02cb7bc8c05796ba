"""Activations: jaxnorm vs jax.nn vs the memory floor, forward and forward+backward.

Forward times ``jit(f)(x)`` (read x, write y; floor: a copy). Forward+backward times the jitted
``dx = vjp(f, x)[1](dy)`` (read x and dy, write dx; floor: ``x + y``). Elementwise functions are
memory-bound on accelerators, so both ratios should be close to 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from benchmarks import harness
from jaxnorm import activations

SHAPES = {"small": (1024, 1024), "large": (8192, 8192), "gpu": (8192, 8192), "tiny": (64, 64)}
# Sizes that also time bfloat16 (relu, gelu, silu).
BFLOAT16_SIZES = ("large", "gpu", "tiny")

CASES = {
    "relu": (activations.relu, jax.nn.relu),
    "leaky_relu": (activations.leaky_relu, jax.nn.leaky_relu),
    "elu": (activations.elu, jax.nn.elu),
    "selu": (activations.selu, jax.nn.selu),
    "sigmoid": (activations.sigmoid, jax.nn.sigmoid),
    "tanh": (activations.tanh, jnp.tanh),
    # jax.nn.gelu defaults to the tanh approximation; compare like with like.
    "gelu": (activations.gelu, lambda x: jax.nn.gelu(x, approximate=False)),
    "gelu_tanh": (
        lambda x: activations.gelu(x, approximate=True),
        lambda x: jax.nn.gelu(x, approximate=True),
    ),
    "silu": (activations.silu, jax.nn.silu),
    "softplus": (activations.softplus, jax.nn.softplus),
}


def _backward(f):
    @jax.jit
    def dx(x, dy):
        return jax.vjp(f, x)[1](dy)[0]

    return dx


def _rows(name, ours, theirs, shape, dtype) -> list[harness.Row]:
    copy, read2_write1, _ = harness.floor_fns(shape, dtype)
    x = jax.random.normal(jax.random.key(0), shape, dtype)
    dy = jax.random.normal(jax.random.key(1), shape, dtype)
    tag = f"{name} {'x'.join(map(str, shape))} {jnp.dtype(dtype).name}"
    fwd = harness.interleaved({"ours": jax.jit(ours), "anchor": jax.jit(theirs), "floor": copy}, x)
    bwd = harness.interleaved(
        {"ours": _backward(ours), "anchor": _backward(theirs), "floor": read2_write1}, x, dy
    )
    return [
        harness.Row(
            "activations", f"{tag} fwd", fwd["ours"], "jax.nn", fwd["anchor"], fwd["floor"]
        ),
        harness.Row(
            "activations", f"{tag} fwd+bwd", bwd["ours"], "jax.nn", bwd["anchor"], bwd["floor"]
        ),
    ]


@harness.benchmark("activations")
def bench(size: str) -> list[harness.Row]:
    shape = SHAPES[size]
    cases = [(name, jnp.float32) for name in CASES]
    if size in BFLOAT16_SIZES:
        cases += [(name, jnp.bfloat16) for name in ("relu", "gelu", "silu")]
    rows = []
    for name, dtype in cases:
        tag = f"{name} {'x'.join(map(str, shape))} {jnp.dtype(dtype).name}"
        if harness.out_of_time():
            rows.append(harness.skipped("activations", tag, "time budget spent"))
            continue
        harness.progress(f"activations {tag}")
        rows += harness.guarded("activations", tag, _rows, name, *CASES[name], shape, dtype)
    return rows
