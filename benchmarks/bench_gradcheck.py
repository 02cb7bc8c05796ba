"""Gradient checking: jaxnorm's sampled check against the lecture's per-coordinate loop.

The anchor is the loop a user writes from the lecture's notes, in JAX: for each sampled coordinate,
copy the parameters with ``x[i] + h``, call the jitted loss, copy with ``x[i] - h``, call it again,
take the centred difference. Both sides evaluate the loss in float64. The loop is timed on a few
coordinates and scaled to the full count (it is linear in the count); jaxnorm's ``check_grad`` runs
all of them and also computes the analytic gradient and the report.

``gradcheck_versions`` times this check_grad against an earlier one (git revision
``$JAXNORM_GRADCHECK_BASELINE``, default: the last commit before issue 16) in the same run.
``python -m benchmarks.bench_gradcheck --power --save`` writes the power table (detection and
false-alarm rates of jaxnorm.check_grad, jax.test_util.check_grads and torch.autograd.gradcheck
on the battery in benchmarks/gradcheck_battery.py) to benchmarks/results/cpu-gradcheck-power.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import platform
import subprocess
import sys
import time
import types
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import gradcheck_battery, harness
from jaxnorm import gradcheck

_SIZES = {
    # (input, hidden, classes, batch, checks, loop coordinates timed)
    "small": (300, 300, 10, 8, 1000, 20),
    "large": (1000, 1000, 10, 8, 1000, 50),
    "gpu": (1000, 1000, 10, 8, 1000, 50),
    "tiny": (20, 20, 5, 4, 50, 5),
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

    # First call: traces and compiles the programs (reused for the same function afterwards).
    gradcheck._GRADS.clear()
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


# --------------------------------------------------------------------------------------------------
# The checker's speed against a previous version of itself (the same run, interleaved)


def _baseline_module(rev: str):
    """jaxnorm/gradcheck.py at git revision ``rev``, loaded as a separate module."""
    source = subprocess.run(
        ["git", "show", f"{rev}:jaxnorm/gradcheck.py"],
        cwd=pathlib.Path(__file__).resolve().parents[1],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    name = f"_gradcheck_{rev.replace('~', '_').replace('^', '_')}"
    module = types.ModuleType(name)
    sys.modules[name] = module  # dataclasses look their module up
    exec(compile(source, f"gradcheck.py@{rev}", "exec"), module.__dict__)
    return module


# The last commit before issue 16's changes to the checker (program keys, refinement, float64
# evaluation, lifting): the baseline the results file compares with.
_BEFORE_ISSUE_16 = "83aef88"


@harness.benchmark("gradcheck_versions")
def bench_versions(size: str) -> list[harness.Row]:
    """This check_grad against the one at $JAXNORM_GRADCHECK_BASELINE (default: before issue 16).

    Re-checks of the same model (the compiled programs reused) and first calls (the caches
    cleared), alternated so that the machine's drift falls on both; plus what the caches buy.
    """
    rev = os.environ.get("JAXNORM_GRADCHECK_BASELINE", _BEFORE_ISSUE_16)
    try:
        old = _baseline_module(rev)
    except (OSError, subprocess.CalledProcessError) as e:  # not a git checkout, unknown revision
        print(
            f"gradcheck_versions skipped: no jaxnorm/gradcheck.py at {rev} ({e})", file=sys.stderr
        )
        return []
    d, hidden, classes, batch, checks, _ = _SIZES[size]
    params, x, y = _model(d, hidden, classes, batch)
    case = f"{checks} sampled checks, MLP {d}-{hidden}-{classes}"

    def warm(m):
        return lambda: m.check_grad(_loss, params, x, y, num_checks=checks).passed

    def cold(m):
        def run():
            m._GRADS.clear()
            m._EVALUATORS.clear()
            return m.check_grad(_loss, params, x, y, num_checks=checks).passed

        return run

    times = harness.interleaved({"new": warm(gradcheck), "old": warm(old)}, warmup=2, reps=9)
    first = harness.interleaved({"new": cold(gradcheck), "old": cold(old)}, warmup=0, reps=3)
    what = f"jaxnorm @ {rev}"
    return [
        harness.Row("gradcheck", case + ", re-check", times["new"], what, times["old"], None, ""),
        harness.Row(
            "gradcheck",
            case + ", first call (compiles)",
            first["new"],
            what,
            first["old"],
            None,
            "program caches cleared before each call",
        ),
        harness.Row(
            "gradcheck",
            case + ", re-check vs first call",
            times["new"],
            "same, caches cleared",
            first["new"],
            None,
            f"what the program caches buy: {first['new'] / times['new']:.0f}x",
        ),
    ]


# --------------------------------------------------------------------------------------------------
# Power: detection and false-alarm rates on the battery of planted errors and correct functions


def _flag_jaxnorm(case) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return "fail" if not gradcheck_battery.run_jaxnorm(case).passed else "pass"


def _flag_check_grads(case) -> str:
    """jax.test_util.check_grads(f, args, order=1, modes=("rev",)) with its default tolerances."""
    from jax.test_util import check_grads

    with jax.enable_x64(case.x64), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        f, args = case.make()
        try:
            check_grads(lambda p: f(p, *args[1:]), (args[0],), order=1, modes=("rev",))
        except AssertionError:
            return "fail"
        except Exception as e:  # an error is a failed check to its user
            return f"error ({type(e).__name__})"
    return "pass"


def _flag_torch(case) -> str:
    """torch.autograd.gradcheck (float64, its default tolerances) of f wrapped as a Function.

    The forward evaluates f in JAX on float64 copies; the backward is the case's own JAX gradient
    in the case's dtypes (so the planted backward pass is what torch checks), as jaxnorm's is. Both
    run with x64 enabled, as jaxnorm's do, so a key draws the same dropout mask in both.
    """
    import torch

    with jax.enable_x64(case.x64), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        f, args = case.make()
        leaves, treedef = jax.tree_util.tree_flatten(args[0])
        pos = [i for i, a in enumerate(leaves) if jnp.issubdtype(jnp.result_type(a), jnp.floating)]
        dtypes = [jnp.result_type(leaves[i]) for i in pos]
        grad = jax.jit(jax.grad(lambda p: f(p, *args[1:])))  # in the leaves' own dtypes

        def with_leaves(values, cast):
            full = list(leaves)
            for i, v, dt in zip(pos, values, dtypes, strict=True):
                full[i] = jnp.asarray(v, dt if cast else jnp.float64)
            return jax.tree_util.tree_unflatten(treedef, full)

        def up(a):
            return (
                np.asarray(a, np.float64)
                if hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.floating)
                else a
            )

        with jax.enable_x64(True), jax.numpy_dtype_promotion("standard"):
            rest64 = jax.tree_util.tree_map(up, args[1:])
            f64 = jax.jit(lambda p: f(p, *rest64))

        class Wrapped(torch.autograd.Function):
            @staticmethod
            def forward(ctx, *ts):
                ctx.save_for_backward(*ts)
                with jax.enable_x64(True), jax.numpy_dtype_promotion("standard"):
                    value = f64(with_leaves([t.detach().numpy() for t in ts], cast=False))
                return torch.tensor(float(value), dtype=torch.float64)

            @staticmethod
            def backward(ctx, g):
                values = [t.detach().numpy() for t in ctx.saved_tensors]
                # x64 on, as for the forward: a dropout mask drawn from a key follows the flag.
                with jax.enable_x64(True):
                    gs = jax.tree_util.tree_leaves(grad(with_leaves(values, cast=True)))
                floating = [gs[k] for k in range(len(pos))] if len(gs) == len(pos) else None
                if floating is None:  # integer leaves give float0 entries: keep the floating ones
                    floating = [x for x in gs if jnp.issubdtype(x.dtype, jnp.floating)]
                return tuple(
                    g * torch.from_numpy(np.asarray(x, np.float64).copy()) for x in floating
                )

        inputs = tuple(
            torch.tensor(np.asarray(leaves[i], np.float64), requires_grad=True) for i in pos
        )
        try:
            ok = torch.autograd.gradcheck(Wrapped.apply, inputs, raise_exception=False)
        except Exception as e:  # an error is a failed check to its user
            return f"error ({type(e).__name__})"
    return "pass" if ok else "fail"


CHECKERS = {
    "jaxnorm.check_grad": _flag_jaxnorm,
    "jax check_grads": _flag_check_grads,
    "torch gradcheck": _flag_torch,
}


def power_table() -> str:
    """The Markdown power table: per case and checker, and the rates."""
    results = {}
    for case in gradcheck_battery.CASES:
        print(f"  {case.name}", file=sys.stderr, flush=True)
        results[case.name] = {name: flag(case) for name, flag in CHECKERS.items()}
    planted = [c for c in gradcheck_battery.PLANTED if c.detectable]
    below = [c for c in gradcheck_battery.PLANTED if not c.detectable]
    correct = gradcheck_battery.CORRECT
    flagged = lambda r: r != "pass"

    def rate(cases, name):
        return sum(flagged(results[c.name][name]) for c in cases)

    lines = [
        "# Gradient checkers' power: planted errors found, correct functions passed",
        "",
        f"- device: {harness.device_name()}, jax {jax.__version__}, "
        f"python {platform.python_version()}; date: {datetime.date.today().isoformat()}",
        "- regenerate: `python -m benchmarks.bench_gradcheck --power --save` (the battery is "
        "`benchmarks/gradcheck_battery.py`, also run by `tests/test_gradcheck_power.py`)",
        "- jaxnorm.check_grad with its defaults (every coordinate); jax.test_util.check_grads(f, "
        "args, order=1, modes=('rev',)) with its default tolerances, on the case's dtypes; "
        "torch.autograd.gradcheck (float64, its defaults eps=1e-6, atol=1e-5, rtol=1e-3) of f "
        "wrapped as a torch.autograd.Function whose forward is f in float64 and whose backward "
        "is the case's JAX gradient in the case's dtypes (the planted error lives there).",
        "- Errors are planted in custom_vjp/custom_jvp backward passes (or a stop_gradient "
        "misuse); the forward pass is the true function. An error raised by a checker counts "
        "as a flag (its user sees a failure).",
        "",
        "| checker | planted errors detected (above jaxnorm's tolerance) | below it | "
        "false alarms on correct functions |",
        "|---|---:|---:|---:|",
    ]
    for name in CHECKERS:
        lines.append(
            f"| {name} | {rate(planted, name)}/{len(planted)} | {rate(below, name)}/{len(below)} "
            f"| {rate(correct, name)}/{len(correct)} |"
        )
    lines += ["", "| case | dtype | planted error | " + " | ".join(CHECKERS) + " |"]
    lines.append("|---|---|---|" + "---|" * len(CHECKERS))
    for case in gradcheck_battery.CASES:
        cells = []
        for name in CHECKERS:
            r = results[case.name][name]
            if case.correct:
                cells.append("pass" if r == "pass" else f"**false alarm** ({r})")
            else:
                cells.append("detected" if flagged(r) else "**missed**")
                if flagged(r) and r != "fail":
                    cells[-1] += f" ({r})"
        what = case.planted or "none (correct)"
        if case.low_precision:
            what += f", computes in {case.low_precision}"
        if not case.detectable:
            what += ", below jaxnorm's tolerance"
        lines.append(f"| {case.name} | {case.dtype} | {what} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_gradcheck")
    p.add_argument("--power", action="store_true", help="the detection / false-alarm table")
    p.add_argument("--save", action="store_true", help="write benchmarks/results/<platform>-...md")
    args = p.parse_args(argv)
    if not args.power:
        p.error("only --power runs from here; timings: python -m benchmarks.run gradcheck")
    text = power_table()
    print(text)
    if args.save:
        path = (
            pathlib.Path(__file__).parent
            / "results"
            / (f"{jax.devices()[0].platform}-gradcheck-power.md")
        )
        path.write_text(text)
        print(f"saved {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
