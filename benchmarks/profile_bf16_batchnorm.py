"""Where a bfloat16 batch-norm training step spends its time on CPU, against PyTorch (issue 19).

    python -m benchmarks.profile_bf16_batchnorm [--rounds 20] [--threads 2] [--save]

For each shape it compiles the step (x, dy -> y, dx, dscale, dbias, new statistics under one
``jax.jit``) in float32 and bfloat16 and counts, in the optimised HLO's entry computation, the
kernels, the kernels that touch x-sized data, the x-sized bytes they read and write (in units of
x's own bytes: the floor is 7, i.e. 3.5 read+write copies) and the temporaries XLA allocates.
It then times, interleaved round by round (the order reversed every other round; medians):

- ``jaxnorm``: ``jaxnorm.batchnorm.batch_norm`` as it is, forward + ``jax.vjp``;
- ``no refinement``: the same with ``_MAX_REFINE = 0`` (no ``lax.cond`` for the refinement pass:
  what the accurate variance costs when it is not needed);
- ``separate conversions``: a prototype with the same forward and a hand-written backward
  (``jax.custom_vjp``) in which each of the two backward reductions converts dy to float32
  itself, through its own ``optimization_barrier`` view of dy (as ``_moments`` does for x);
- ``forward``: y and the statistics only (no backward), jaxnorm and torch;
- ``copy``: one read+write of x (the memory floor's unit);
- ``torch``: ``torch.nn.BatchNorm2d``/``1d`` in training mode, forward + backward, NCHW
  contiguous, ``torch.set_num_threads(--threads)``.

``--threads 1`` also limits XLA:CPU to one thread (set before JAX starts). ``--save`` writes
benchmarks/results/cpu-bf16-batchnorm-profile.md (``-1thread`` appended for one thread).
"""

from __future__ import annotations

import argparse
import os
import sys

# torch's OpenMP threads sleep at their barriers instead of spinning: on the shared 2-core
# machine a spinning thread waited for a descheduled partner and torch's step ran 20-60x slower
# than on a quiet machine (set before torch is imported; export another value to override).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

if __name__ == "__main__" and "--threads" in sys.argv:
    if sys.argv[sys.argv.index("--threads") + 1] == "1":
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "")
            + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        )

import datetime
import functools
import pathlib
import platform
import re
import statistics
import subprocess
import time
import types

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import bench_batchnorm as bb
from benchmarks import harness

SHAPES = [(32, 28, 28, 64), (16, 14, 14, 256), (8192, 512)]
SOURCE = pathlib.Path(__file__).resolve().parents[1] / "jaxnorm" / "batchnorm.py"


def _module(name: str, patch=None):
    """jaxnorm/batchnorm.py loaded afresh as its own module, its source optionally patched."""
    src = SOURCE.read_text()
    if patch is not None:
        old, new = patch
        if src.count(old) != 1:
            raise RuntimeError(f"cannot patch batchnorm.py for {name}: {old!r} not found once")
        src = src.replace(old, new)
    module = types.ModuleType(name)
    sys.modules[name] = module
    exec(compile(src, f"batchnorm.py<{name}>", "exec"), module.__dict__)
    return module


def _step(mod):
    def step(x, dy, scale, bias, mean, var, count):
        def f(x, scale, bias):
            state = mod.BatchNormState(mean, var, count)
            return mod.batch_norm(x, scale, bias, state, train=True)

        y, vjp, new_state = jax.vjp(f, x, scale, bias, has_aux=True)
        return (y, *vjp(dy), new_state)

    return jax.jit(step)


def _forward(mod):
    def fwd(x, dy, scale, bias, mean, var, count):
        del dy
        return mod.batch_norm(x, scale, bias, mod.BatchNormState(mean, var, count), train=True)

    return jax.jit(fwd)


def _separate_conversions_step(mod):
    """Prototype: jaxnorm's forward, a custom_vjp backward whose reductions convert dy apart."""
    f32 = jnp.float32

    def step(x, dy, scale, bias, mean, var, count):
        del mean, var, count
        raxes = tuple(range(x.ndim - 1))
        cfg = mod._Config(
            raxes=raxes,
            axis_name=None,
            groups=None,
            activation=None,
            renorm=False,
            ghost=False,
            out_dtype=x.dtype,
        )
        pshape = (1,) * (x.ndim - 1) + (x.shape[-1],)
        eps = jnp.asarray(1e-5, f32)

        def fwd(x, scale, bias):
            xc, _, mean, var, n, inv_std, gain, shift, _ = mod._forward_parts(
                cfg, x, scale, bias, eps, None, (), ()
            )
            y = ((xc - mean) * (inv_std * gain) + shift).astype(x.dtype)
            return (y, (mean, var, n)), (x, mean, inv_std, n, gain)

        def bwd(res, cts):
            x, mean, inv_std, n, gain = res
            gy = cts[0]
            # Each sum reads dy (and x) through its own barrier view and converts it itself.
            g1, _ = mod._apart(gy, f32, mean)
            sdy = jnp.sum(g1, axis=raxes, keepdims=True)
            (g2, x2), (m2, i2) = jax.lax.optimization_barrier(((gy, x), (mean, inv_std)))
            sdyx = jnp.sum(g2.astype(f32) * ((x2.astype(f32) - m2) * i2), axis=raxes, keepdims=True)
            xhat = (x.astype(f32) - mean) * inv_std
            dx = (gain * inv_std / n * (n * gy.astype(f32) - sdy - xhat * sdyx)).astype(x.dtype)
            return dx, sdyx, sdy

        op = jax.custom_vjp(lambda x, s, b: fwd(x, s, b)[0])
        op.defvjp(fwd, bwd)
        f = lambda x, s, b: op(x, s.reshape(pshape), b.reshape(pshape))
        y, vjp, stats = jax.vjp(f, x, scale, bias, has_aux=True)
        return (y, *vjp(dy), stats)

    return jax.jit(step)


_ITEMSIZE = {"bf16": 2, "f16": 2, "f32": 4, "f64": 8, "s32": 4, "u32": 4, "pred": 1, "s8": 1}
_NOT_KERNELS = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast"}


def hlo_profile(fn, args, x) -> dict:
    """Counts from the compiled program's entry computation (see the module docstring)."""
    compiled = fn.lower(*args).compile()
    text = compiled.as_text()
    entry = text[text.index("\nENTRY") :]
    entry = entry[: entry.index("\n}")]
    xbytes = x.size * x.dtype.itemsize
    sizes, kernels, big, moved, converts = {}, 0, [], 0, 0
    for line in entry.splitlines()[1:]:
        m = re.match(r"\s*(?:ROOT )?%(\S+) = (\w+)\[([\d,]*)\]\S* ([\w-]+)\((.*?)\)", line)
        if not m:
            continue
        name, ty, dims, op, operands = m.groups()
        n = int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
        sizes[name] = _ITEMSIZE.get(ty, 4) * n
        if op in _NOT_KERNELS:
            continue
        kernels += 1
        # x-sized: at least half of x's bytes (an x-sized float32 copy of bfloat16 x is 2).
        is_big = lambda b: b >= xbytes // 2
        io = sizes[name] if is_big(sizes[name]) else 0
        # A gather (the pivot's 64-row sample) reads only the rows it takes.
        io += (
            0
            if "gather" in name
            else sum(
                sizes.get(o, 0)
                for o in re.findall(r"%([\w.\-]+)", operands)
                if is_big(sizes.get(o, 0))
            )
        )
        if io:
            calls = re.search(r"calls=%(\S+?)[,\s]", line)
            big.append(f"{name}({calls.group(1) if calls else op}): {io / xbytes:g}")
            moved += io
            if "convert" in name and sizes[name] >= xbytes and ty == "f32":
                converts += 1
    mem = compiled.memory_analysis()
    return {
        "kernels": kernels,
        "x_kernels": len(big),
        "moved": moved / xbytes,
        "f32_converts": converts,
        "temp": mem.temp_size_in_bytes / xbytes,
        "detail": big,
    }


def _interleave(fns: dict, rounds: int) -> dict:
    """Times of ``rounds`` rounds of one blocked call each, the order reversed every round.

    Returns the list of times of each function (round i at index i): compare two functions by
    :func:`_ratio`, the median of their per-round ratios, which a slow drift of the shared
    machine's load moves less than a ratio of medians.
    """
    for fn in fns.values():
        for _ in range(2):
            harness.block(fn())
    times = {k: [] for k in fns}
    names = list(fns)
    for r in range(rounds):
        for k in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            harness.block(fns[k]())
            times[k].append(time.perf_counter() - t0)
    return times


def _ratio(t: dict, a: str, b: str) -> float:
    return statistics.median(x / y for x, y in zip(t[a], t[b], strict=True))


def _torch_forward(shape, dtype):
    """Torch's training-mode forward alone (no autograd), as bench_batchnorm builds the step."""
    import torch

    tdtype = {jnp.float32: torch.float32, jnp.bfloat16: torch.bfloat16}[dtype]
    c = shape[-1]
    if len(shape) == 4:
        n, h, w, _ = shape
        bn = torch.nn.BatchNorm2d(c, momentum=0.01, dtype=tdtype)
        x = torch.randn((n, c, h, w), dtype=tdtype)
    else:
        bn = torch.nn.BatchNorm1d(c, momentum=0.01, dtype=tdtype)
        x = torch.randn(shape, dtype=tdtype)

    def fwd():
        with torch.no_grad():
            return bn(x)

    return fwd


def _conversion_row(shape, rounds) -> str:
    import torch

    n = int(np.prod(shape))
    x32 = jnp.asarray(np.random.default_rng(0).normal(size=shape).astype(np.float32))
    x16 = x32.astype(jnp.bfloat16)
    neg = jax.jit(jnp.negative)
    up = jax.jit(lambda v: v.astype(jnp.float32))
    down = jax.jit(lambda v: v.astype(jnp.bfloat16))
    t32 = torch.randn(shape)
    t16 = t32.to(torch.bfloat16)
    t = _interleave(
        {
            "neg32": lambda: neg(x32),
            "neg16": lambda: neg(x16),
            "up": lambda: up(x16),
            "down": lambda: down(x32),
        },
        rounds,
    )
    t.update(
        _interleave(
            {
                "tneg32": lambda: torch.neg(t32),
                "tneg16": lambda: torch.neg(t16),
                "tdown": lambda: t32.to(torch.bfloat16),
            },
            rounds,
        )
    )
    t = {k: statistics.median(v) for k, v in t.items()}
    cells = " | ".join(
        f"{t[k] / n * 1e9:.2f}"
        for k in ("neg32", "neg16", "up", "down", "tneg32", "tneg16", "tdown")
    )
    return f"| {shape} | {cells} |"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--shapes", default="all", help="'all' or an index list like 0,2")
    p.add_argument("--save", action="store_true")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    cur = _module("_bn_profile_current")
    norefine = _module("_bn_profile_norefine", ("_MAX_REFINE = 2\n", "_MAX_REFINE = 0\n"))
    steps = {
        "jaxnorm": _step(cur),
        "no refinement": _step(norefine),
        "separate conversions": _separate_conversions_step(cur),
    }
    fwd = _forward(cur)
    shapes = SHAPES if args.shapes == "all" else [SHAPES[int(i)] for i in args.shapes.split(",")]
    hlo_lines, time_lines, detail_lines, conv_lines = [], [], [], []
    for shape in shapes:
        for dtype in (jnp.float32, jnp.bfloat16):
            name = jnp.dtype(dtype).name
            x, dy, scale, bias, state = bb._inputs(shape, dtype)
            a = (x, dy, scale, bias, *state)
            for k, fn in steps.items():
                if dtype == jnp.float32 and k != "jaxnorm":
                    continue
                h = hlo_profile(fn, a, x)
                hlo_lines.append(
                    f"| {shape} | {name} | {k} | {h['kernels']} | {h['x_kernels']} | "
                    f"{h['moved']:g} | {h['f32_converts']} | {h['temp']:.2f} |"
                )
                detail_lines.append(f"- {shape} {name} {k}: " + ", ".join(h["detail"]))
            # Correctness of the prototype against jaxnorm (same formulas, other rounding).
            ref, proto = steps["jaxnorm"](*a), steps["separate conversions"](*a)
            diff = max(
                float(jnp.max(jnp.abs(u.astype(jnp.float32) - v.astype(jnp.float32))))
                for u, v in zip(ref[:4], proto[:4], strict=True)
            )
            fns = {k: functools.partial(f, *a) for k, f in steps.items()}
            fns["forward"] = functools.partial(fwd, *a)
            fns["copy"] = functools.partial(harness._copy, x)
            print(f"timing {shape} {name} ...", file=sys.stderr, flush=True)
            torch_fns = {
                "torch": bb._torch_step(shape, dtype),
                "torch forward": _torch_forward(shape, dtype),
            }
            if args.threads == 1:
                t = _interleave({**fns, **torch_fns}, args.rounds)
            else:
                # torch in a block of its own right after: interleaved with JAX on the loaded
                # 2-core machine, its OpenMP threads waited on each other (up to 20x slower).
                t = _interleave(fns, args.rounds)
                t.update(_interleave(torch_fns, args.rounds))
            if dtype == jnp.bfloat16:
                conv_lines.append(_conversion_row(shape, args.rounds))
            r = functools.partial(_ratio, t)
            med = {k: statistics.median(v) for k, v in t.items()}
            time_lines.append(
                f"| {shape} | {name} | {med['jaxnorm'] * 1e3:.3f} | {med['torch'] * 1e3:.3f} | "
                f"{r('jaxnorm', 'torch'):.2f} | {r('no refinement', 'torch'):.2f} | "
                f"{r('separate conversions', 'torch'):.2f} | "
                f"{r('separate conversions', 'jaxnorm'):.2f} | "
                f"{r('forward', 'torch forward'):.2f} | {r('jaxnorm', 'copy'):.2f} | "
                f"{r('torch', 'copy'):.2f} | {diff:.1e} |"
            )
            print(time_lines[-1], flush=True)
    load_after = os.getloadavg()
    text = "\n".join(
        [
            "# bfloat16 batch norm on CPU: where the time goes (issue 19)",
            "",
            f"- `python -m benchmarks.profile_bf16_batchnorm --threads {args.threads} "
            f"--rounds {args.rounds}`; {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} CPU(s), jax {jax.__version__}, torch {torch.__version__}, "
            f"torch threads {args.threads}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}",
            f"- date: {datetime.date.today().isoformat()}; load average (1, 5, 15 min) before "
            f"{tuple(round(v, 1) for v in load)}, after {tuple(round(v, 1) for v in load_after)}"
            " (a shared machine: read the ratios, not the times)",
            f"- jaxnorm/batchnorm.py at {_revision()}",
            "",
            "## The compiled step",
            "",
            "Entry computation of the optimised HLO. `x-sized kernels` read or write x-sized "
            "data; `moved` is the x-sized bytes they read and write in units of x's bytes (the "
            "floor is 7: two reads for the statistics, read x + write y, two reads for the "
            "backward's sums, read x and dy + write dx); `f32 copies` counts x-sized float32 "
            "conversions written out; `temp` is XLA's temporary memory in units of x's bytes.",
            "",
            "| shape | dtype | step | kernels | x-sized kernels | moved (x bytes) "
            "| f32 copies | temp (x bytes) |",
            "|---|---|---|---:|---:|---:|---:|---:|",
            *hlo_lines,
            "",
            "## Times, interleaved (medians)",
            "",
            "Ratios are medians of per-round ratios (with 2 threads torch runs in a block of "
            "its own after the JAX functions, round i paired with round i). "
            "`x torch` is time / torch's time (below 1: faster than torch); `sep. conv.` is "
            "the prototype with a custom_vjp backward whose two reductions each convert dy; "
            "`fwd x torch` compares the forward alone (y and statistics, no gradient); `x copy` "
            "is the step in read+write copies of x (the floor is 3.5); `max diff` is the "
            "prototype's largest difference from jaxnorm over y, dx, dscale, dbias.",
            "",
            "| shape | dtype | jaxnorm (ms) | torch (ms) | jaxnorm x torch | no refinement x "
            "torch | sep. conv. x torch | sep. conv. x jaxnorm | fwd x torch | jaxnorm x copy "
            "| torch x copy | max diff |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            *time_lines,
            "",
            "## What one pass costs: conversions (ns per element, medians)",
            "",
            "A jitted `-x` in float32 and bfloat16, the conversions alone (x-sized input, "
            "output written), and torch's `-x` and `.to(torch.bfloat16)`. XLA:CPU rounds "
            "float32 to bfloat16 in integer vector code (256-bit, no AVX512-BF16 "
            "`vcvtneps2bf16` in the object code), so every pass that writes bfloat16 (y, dx) "
            "pays it.",
            "",
            "| shape | -x f32 | -x bf16 | bf16->f32 | f32->bf16 | torch -x f32 | torch -x bf16 "
            "| torch f32->bf16 |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
            *conv_lines,
            "",
            "## x-sized kernels (name(fused computation): x bytes moved)",
            "",
            *detail_lines,
            "",
        ]
    )
    print(text)
    if args.save:
        suffix = "" if args.threads == 2 else f"-{args.threads}thread"
        path = pathlib.Path(__file__).parent / "results" / f"cpu-bf16-batchnorm-profile{suffix}.md"
        path.write_text(text)
        print(f"saved {path}", file=sys.stderr)
    return 0


def _revision() -> str:
    try:
        rev = subprocess.run(
            ["git", "log", "-1", "--format=%h", "--", str(SOURCE)],
            cwd=SOURCE.parent,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "diff", "--quiet", "--", str(SOURCE)], cwd=SOURCE.parent
        ).returncode
        return rev + (" + uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
