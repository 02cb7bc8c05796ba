"""Batch norm: one training step as a layer sees it, against flax, PyTorch and the memory floor.

A step takes the input x and the upstream gradient dy and produces y, dx, dscale, dbias and the
updated running statistics (forward and ``jax.vjp`` under one ``jax.jit``). The memory floor is 7
passes over x-sized data (forward: read x for the statistics, read x and write y to normalise;
backward: read x and dy for the two reductions, read x and dy and write dx) = 3.5 read+write
copies of x, timed with the harness copy interleaved with the candidates.

Anchors: ``flax.linen.BatchNorm`` with its default (fast, one-pass variance) and with
``use_fast_variance=False`` (the accurate two-pass variance), ``torch.nn.BatchNorm2d``/``1d`` in
training mode (forward + backward, autograd on, NCHW contiguous: torch's default layout) when
torch is installed, and BN+ReLU (jaxnorm's fused ``activation="relu"``) against flax's BatchNorm
followed by ``jax.nn.relu``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from benchmarks import harness
from jaxnorm import batchnorm

SHAPES = {
    "large": [(256, 56, 56, 64), (128, 28, 28, 256), (65536, 1024)],
    "small": [(32, 28, 28, 64), (16, 14, 14, 256), (8192, 512)],
}
DTYPES = (jnp.float32, jnp.bfloat16)
# Passes over x-sized data a training step must make, counted in read+write copies (7 / 2).
FLOOR_COPIES = 3.5


def _jaxnorm_step(activation=None):
    def step(x, dy, scale, bias, state):
        def f(x, scale, bias):
            y, new_state = batchnorm.batch_norm(
                x, scale, bias, state, train=True, activation=activation
            )
            return y, new_state

        y, vjp, new_state = jax.vjp(f, x, scale, bias, has_aux=True)
        dx, dscale, dbias = vjp(dy)
        return y, dx, dscale, dbias, new_state

    return jax.jit(step)


def _flax_step(use_fast_variance: bool, relu: bool = False):
    import flax.linen as nn

    module = nn.BatchNorm(use_running_average=False, use_fast_variance=use_fast_variance)

    def step(x, dy, scale, bias, state):
        def f(x, scale, bias):
            variables = {
                "params": {"scale": scale, "bias": bias},
                "batch_stats": {"mean": state.mean, "var": state.var},
            }
            y, updates = module.apply(variables, x, mutable=["batch_stats"])
            # flax returns y in float32 for bfloat16 x with float32 params; cast back so that
            # both sides write the same bytes.
            y = y.astype(x.dtype)
            if relu:
                y = jax.nn.relu(y)
            return y, updates["batch_stats"]

        y, vjp, new_stats = jax.vjp(f, x, scale, bias, has_aux=True)
        dx, dscale, dbias = vjp(dy)
        return y, dx, dscale, dbias, new_stats

    return jax.jit(step)


def _torch_step(shape, dtype):
    """A torch training step on the same data, or None when torch is missing or lacks the dtype."""
    try:
        import torch
    except ImportError:
        return None
    tdtype = {jnp.float32: torch.float32, jnp.bfloat16: torch.bfloat16}[dtype]
    c = shape[-1]
    torch.manual_seed(0)
    if len(shape) == 4:
        # NCHW, contiguous: torch's default layout, the one its CPU and cuDNN kernels expect.
        n, h, w, _ = shape
        bn = torch.nn.BatchNorm2d(c, momentum=0.01, dtype=tdtype)
        x = torch.randn((n, c, h, w), dtype=tdtype)
    else:
        bn = torch.nn.BatchNorm1d(c, momentum=0.01, dtype=tdtype)
        x = torch.randn(shape, dtype=tdtype)
    x.requires_grad_(True)
    dy = torch.randn_like(x)

    def step():
        x.grad = None
        bn.weight.grad = None
        bn.bias.grad = None
        y = bn(x)
        y.backward(dy)
        return y

    try:
        step()
    except RuntimeError:
        return None
    return step


def _inputs(shape, dtype):
    kx, kd = jax.random.split(jax.random.key(0))
    x = (3.0 + 2.0 * jax.random.normal(kx, shape, jnp.float32)).astype(dtype)
    dy = jax.random.normal(kd, shape, jnp.float32).astype(dtype)
    c = shape[-1]
    scale = jnp.ones((c,), jnp.float32)
    bias = jnp.zeros((c,), jnp.float32)
    return x, dy, scale, bias, batchnorm.init_state(c)


def _name(dtype) -> str:
    return jnp.dtype(dtype).name


@harness.benchmark("batchnorm")
def bench(size: str) -> list[harness.Row]:
    rows = []
    ours = _jaxnorm_step()
    ours_relu = _jaxnorm_step("relu")
    flax_fast = _flax_step(True)
    flax_exact = _flax_step(False)
    flax_relu = _flax_step(True, relu=True)
    copy, _, _ = harness.floor_fns((1,))
    for shape in SHAPES[size]:
        for dtype in DTYPES:
            args = _inputs(shape, dtype)
            x = args[0]
            fns = {
                "jaxnorm": functools.partial(ours, *args),
                "jaxnorm_relu": functools.partial(ours_relu, *args),
                "flax": functools.partial(flax_fast, *args),
                "flax_exact": functools.partial(flax_exact, *args),
                "flax_relu": functools.partial(flax_relu, *args),
                "copy": functools.partial(copy, x),
            }
            reps = 9 if size == "large" else 15
            t = harness.interleaved(fns, reps=reps)
            torch_step = _torch_step(shape, dtype)
            if torch_step is not None:
                # Timed on its own, after the JAX functions: torch's OpenMP workers keep spinning
                # for a while after each op, which slowed whichever JAX function ran next when
                # torch was interleaved with them (jaxnorm, first in each round, read 1.4-1.5x
                # flax that way and 0.9-1.0x with torch left out).
                t["torch"] = harness.timeit(torch_step, reps=reps)
            floor = FLOOR_COPIES * t["copy"]
            case = f"{shape} {_name(dtype)}"
            layout = "NCHW" if len(shape) == 4 else "NC"
            row = functools.partial(harness.Row, case=case, floor_s=floor)
            rows.append(
                row("batchnorm", candidate_s=t["jaxnorm"], anchor="flax", anchor_s=t["flax"])
            )
            rows.append(
                row(
                    "batchnorm",
                    candidate_s=t["jaxnorm"],
                    anchor="flax exact var",
                    anchor_s=t["flax_exact"],
                    note="flax use_fast_variance=False",
                )
            )
            if "torch" in t:
                rows.append(
                    row(
                        "batchnorm",
                        candidate_s=t["jaxnorm"],
                        anchor="torch",
                        anchor_s=t["torch"],
                        note=f"torch train fwd+bwd, {layout} contiguous",
                    )
                )
            rows.append(
                row(
                    "batchnorm+relu",
                    candidate_s=t["jaxnorm_relu"],
                    anchor="flax+relu",
                    anchor_s=t["flax_relu"],
                    note="activation='relu' vs flax BatchNorm then jax.nn.relu",
                )
            )
    return rows
