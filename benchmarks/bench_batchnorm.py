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

``batchnorm_versions`` times this batch_norm against an earlier one (git revision
``$JAXNORM_BATCHNORM_BASELINE``, default: the last commit before issue 16) in the same run, on
the same shapes: the plain step, the BN+ReLU step, the fused BN+ReLU step relative to BN alone
(for both versions), a batch whose pivot is an outlier (the refinement pass runs), and a vmapped
ensemble. ``python -m benchmarks.run batchnorm_versions --save`` writes
benchmarks/results/<platform>-<size>-batchnorm_versions.md.
"""

from __future__ import annotations

import functools
import os
import pathlib
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import harness
from jaxnorm import batchnorm

SHAPES = {
    "large": [(256, 56, 56, 64), (128, 28, 28, 256), (65536, 1024)],
    "small": [(32, 28, 28, 64), (16, 14, 14, 256), (8192, 512)],
    # benchmarks.device: an accelerator's shapes, and its CPU dry run's.
    "gpu": [(256, 56, 56, 64), (128, 28, 28, 256), (65536, 1024)],
    "tiny": [(4, 6, 6, 8), (64, 32)],
}
# Rounds per ordering in `bench` (each round times every candidate once).
REPS = {"large": 9, "small": 15, "gpu": 15, "tiny": 2}
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


def torch_device() -> str | None:
    """Where torch runs as the anchor: JAX's CPU -> "cpu", JAX's GPU -> "cuda" when torch has
    CUDA; None when torch is missing or cannot run where JAX runs (torch on the host is no anchor
    for an accelerator)."""
    try:
        import torch
    except ImportError:
        return None
    backend = jax.default_backend()
    if backend == "cpu":
        return "cpu"
    if backend == "gpu" and torch.cuda.is_available():
        return "cuda"
    return None


class _CudaDone:
    """What a CUDA torch step returns: ``block_until_ready`` waits for the device, as a JAX
    array's does, so that the harness times torch's kernels, not only their launch."""

    def block_until_ready(self):
        import torch

        torch.cuda.synchronize()
        return self


def _torch_step(shape, dtype):
    """A torch training step on the same data (on the device of :func:`torch_device`), or None
    when torch is missing, cannot run there, or lacks the dtype."""
    device = torch_device()
    if device is None:
        return None
    import torch

    tdtype = {jnp.float32: torch.float32, jnp.bfloat16: torch.bfloat16}[dtype]
    c = shape[-1]
    torch.manual_seed(0)
    if len(shape) == 4:
        # NCHW, contiguous: torch's default layout, the one its CPU and cuDNN kernels expect.
        n, h, w, _ = shape
        bn = torch.nn.BatchNorm2d(c, momentum=0.01, dtype=tdtype, device=device)
        x = torch.randn((n, c, h, w), dtype=tdtype, device=device)
    else:
        bn = torch.nn.BatchNorm1d(c, momentum=0.01, dtype=tdtype, device=device)
        x = torch.randn(shape, dtype=tdtype, device=device)
    x.requires_grad_(True)
    dy = torch.randn_like(x)
    done = _CudaDone() if device == "cuda" else None

    def step():
        x.grad = None
        bn.weight.grad = None
        bn.bias.grad = None
        y = bn(x)
        y.backward(dy)
        return y if done is None else done

    try:
        harness.block(step())
    except RuntimeError:
        if device != "cuda" or tdtype == torch.float32:
            return None
        # Mixed precision as torch's autocast runs it: float32 parameters, bfloat16 data.
        bn.float()
        try:
            harness.block(step())
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


def _both_orders(fns: dict, reps: int) -> dict:
    """harness.interleaved, half the rounds in each order, the two medians averaged.

    On this CPU the first function of a round ran up to 5-10% slower than the same function
    later in the round (measured with the two versions swapped), which a fixed order puts on
    one version only.
    """
    half = max(1, reps // 2)
    a = harness.interleaved(fns, reps=half)
    b = harness.interleaved(dict(reversed(list(fns.items()))), reps=half)
    return {k: (a[k] + b[k]) / 2 for k in fns}


@harness.benchmark("batchnorm")
def bench(size: str) -> list[harness.Row]:
    rows = []
    ours = _jaxnorm_step()
    ours_relu = _jaxnorm_step("relu")
    flax_fast = _flax_step(True)
    flax_exact = _flax_step(False)
    flax_relu = _flax_step(True, relu=True)
    copy, _, _ = harness.floor_fns((1,))

    def case_rows(shape, dtype, case):
        rows = []
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
        reps = REPS[size]
        t = _both_orders(fns, reps=2 * reps)
        torch_step = _torch_step(shape, dtype)
        if torch_step is not None:
            # Timed on its own, after the JAX functions: torch's OpenMP workers keep spinning
            # for a while after each op, which slowed whichever JAX function ran next when
            # torch was interleaved with them (jaxnorm, first in each round, read 1.4-1.5x
            # flax that way and 0.9-1.0x with torch left out).
            t["torch"] = harness.timeit(torch_step, reps=reps)
        floor = FLOOR_COPIES * t["copy"]
        layout = "NCHW" if len(shape) == 4 else "NC"
        row = functools.partial(harness.Row, case=case, floor_s=floor)
        rows.append(row("batchnorm", candidate_s=t["jaxnorm"], anchor="flax", anchor_s=t["flax"]))
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
                    note=f"torch {torch_device()} train fwd+bwd, {layout} contiguous",
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

    for shape in SHAPES[size]:
        for dtype in DTYPES:
            case = f"{shape} {_name(dtype)}"
            if harness.out_of_time():
                rows.append(harness.skipped("batchnorm", case, "time budget spent"))
                continue
            harness.progress(f"batchnorm {case}")
            rows += harness.guarded("batchnorm", case, case_rows, shape, dtype, case)
    return rows


# --------------------------------------------------------------------------------------------------
# This batch_norm against an earlier one


def _baseline_module(rev: str):
    """jaxnorm/batchnorm.py at git revision ``rev``, loaded as a separate module."""
    source = subprocess.run(
        ["git", "show", f"{rev}:jaxnorm/batchnorm.py"],
        cwd=pathlib.Path(__file__).resolve().parents[1],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    name = f"_batchnorm_{rev.replace('~', '_').replace('^', '_')}"
    module = types.ModuleType(name)
    sys.modules[name] = module
    exec(compile(source, f"batchnorm.py@{rev}", "exec"), module.__dict__)
    return module


# The last commit before issue 16's changes to batch norm (sampled pivot and refinement,
# validation): the baseline the results file compares with.
_BEFORE_ISSUE_16 = "f5dc384"
# Members of the vmapped ensemble case, and its per-member batch.
_ENSEMBLE = {"small": (8, (1024, 256)), "large": (8, (8192, 1024))}


def _module_step(module, activation=None, vmapped=False):
    def step(x, dy, scale, bias, mean, var, count):
        state = module.BatchNormState(mean, var, count)

        def f(x, scale, bias):
            return module.batch_norm(x, scale, bias, state, train=True, activation=activation)

        y, vjp, new_state = jax.vjp(f, x, scale, bias, has_aux=True)
        dx, dscale, dbias = vjp(dy)
        return y, dx, dscale, dbias, new_state

    return jax.jit(jax.vmap(step) if vmapped else step)


def _outlier_inputs(shape, dtype):
    """Sparse post-ReLU features whose sampled rows are outliers: the refinement pass runs."""
    x, dy, scale, bias, state = _inputs(shape, dtype)
    rows = jnp.maximum(x.astype(jnp.float32) - 7.0, 0.0).reshape(-1, shape[-1])
    # The rows the pivot samples (the middles of 64 equal runs, see _rows.sample_rows) large.
    n = rows.shape[0]
    sampled = ((2 * np.arange(64) + 1) * n) // 128
    rows = rows.at[sampled].set(3.0)
    return (rows.reshape(shape).astype(dtype), dy, scale, bias, state)


@harness.benchmark("batchnorm_versions")
def bench_versions(size: str) -> list[harness.Row]:
    """This batch_norm against the one at $JAXNORM_BATCHNORM_BASELINE (default: before issue 16)."""
    rev = os.environ.get("JAXNORM_BATCHNORM_BASELINE", _BEFORE_ISSUE_16)
    try:
        old = _baseline_module(rev)
    except (OSError, subprocess.CalledProcessError) as e:  # not a git checkout, unknown revision
        print(
            f"batchnorm_versions skipped: no jaxnorm/batchnorm.py at {rev} ({e})", file=sys.stderr
        )
        return []
    before = f"jaxnorm @ {rev}"
    reps = 10 if size == "large" else 30
    steps = {
        "new": _module_step(batchnorm),
        "old": _module_step(old),
        "new_relu": _module_step(batchnorm, "relu"),
        "old_relu": _module_step(old, "relu"),
    }
    rows = []
    for shape in SHAPES[size]:
        for dtype in DTYPES:
            x, dy, scale, bias, state = _inputs(shape, dtype)
            args = (x, dy, scale, bias, *state)
            t = _both_orders({k: functools.partial(f, *args) for k, f in steps.items()}, reps=reps)
            case = f"{shape} {_name(dtype)}"
            row = functools.partial(harness.Row, case=case)
            rows += [
                row("batchnorm step", candidate_s=t["new"], anchor=before, anchor_s=t["old"]),
                row(
                    "batchnorm+relu step",
                    candidate_s=t["new_relu"],
                    anchor=before,
                    anchor_s=t["old_relu"],
                ),
                row(
                    "fused relu cost",
                    candidate_s=t["new_relu"],
                    anchor="batchnorm alone",
                    anchor_s=t["new"],
                    note=f"{before}: {t['old_relu'] / t['old']:.2f}x",
                ),
            ]
    # Worst case for the new code: every feature's sampled pivot is off, the refinement runs.
    shape = SHAPES[size][0]
    x, dy, scale, bias, state = _outlier_inputs(shape, jnp.float32)
    args = (x, dy, scale, bias, *state)
    t = _both_orders({k: functools.partial(steps[k], *args) for k in ("new", "old")}, reps=reps)
    rows.append(
        harness.Row(
            "batchnorm step",
            f"{shape} float32, refinement runs",
            t["new"],
            before,
            t["old"],
            note="sparse features whose sampled rows are outliers: one more pass over x",
        )
    )
    members, mshape = _ENSEMBLE[size]
    x, dy, scale, bias, state = _inputs((members, *mshape), jnp.float32)
    c = mshape[-1]
    stack = lambda a: jnp.broadcast_to(a, (members, *a.shape))
    args = (x, dy, stack(scale[:c]), stack(bias[:c]), *map(stack, batchnorm.init_state(c)))
    vsteps = {"new": _module_step(batchnorm, vmapped=True), "old": _module_step(old, vmapped=True)}
    t = _both_orders({k: functools.partial(f, *args) for k, f in vsteps.items()}, reps=reps)
    rows.append(
        harness.Row(
            "batchnorm step",
            f"vmap over {members} members of {mshape} float32",
            t["new"],
            before,
            t["old"],
            note="an ensemble or vmapped search",
        )
    )
    return rows
