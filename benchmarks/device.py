"""Every benchmark's accelerator rows in one command, each beside its anchors, with the targets.

Run it through ``benchmarks/device.sh`` (see its header for what the machine needs)::

    bash benchmarks/device.sh                           # on a GPU/TPU machine, < 8 min on an H100
    bash benchmarks/device.sh --dry-run --out /tmp/dry  # the same code paths, tiny shapes, CPU

Sections, most important first, each with a time budget (a section stops starting new cases once
its budget or the whole run's is spent, and records the cases it skipped; a section that fails is
recorded and the next one runs):

- batchnorm: one training step (x, dy -> y, dx, dscale, dbias) in float32 and bfloat16, and BN+ReLU,
  against flax (default and ``use_fast_variance=False``), PyTorch on CUDA when torch has CUDA,
  flax + ``jax.nn.relu``, and the memory floor (a read+write copy of x). Target: at most 3.85
  copies of x's bytes (the floor is 3.5), and faster than every anchor.
- activations: jaxnorm against jax.nn and the copy floor, forward and forward+backward.
  Target: at most 1.1x jax.nn.
- training: a vmapped 64-trial ``random_search`` against the same 64 trials run one after the
  other (a sequential loop of one jitted trial), and ``train_ensemble`` against a loop.
  Target: the vmapped search at least 8x faster than the loop.
- preprocessing: PCA/whitening fits against scikit-learn (on the host), apply against a matmul.
- gradcheck: ``check_grad`` against the lecture's per-coordinate loop.

Each section writes ``<platform>-<section>.md`` (``gpu-batchnorm.md``, ...) into ``--out`` as
soon as it ends, so that a run cut short keeps what it measured, and ``<platform>-summary.md``
lists every target with its verdict, the skipped cases and the time each section took.
"""

from __future__ import annotations

import os

# JAX otherwise takes 75% of the GPU's memory at start-up, which leaves torch's CUDA anchor
# too little; allocate on demand instead (set before jax is imported).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse
import datetime
import importlib
import math
import pathlib
import platform
import sys
import time
import traceback

import jax

from benchmarks import harness

# (section, module, registered benchmark, packages it needs, budget in seconds on an accelerator)
SECTIONS = [
    ("batchnorm", "benchmarks.bench_batchnorm", "batchnorm", ("flax",), 170.0),
    ("activations", "benchmarks.bench_activations", "activations", (), 70.0),
    ("training", "benchmarks.bench_training", "training", ("optax", "sklearn"), 120.0),
    ("preprocessing", "benchmarks.bench_preprocessing", "preprocessing", ("sklearn",), 45.0),
    ("gradcheck", "benchmarks.bench_gradcheck", "gradcheck", (), 35.0),
]
RESULTS = pathlib.Path(__file__).parent / "results"
# The whole run's budget: device.sh's hard limit is 480 s (8 minutes), start-up included.
TOTAL_S = 440.0
# Targets (issue 19).
BN_MAX_COPIES = 3.85
BN_FLOOR_COPIES = 3.5
ACTIVATION_MAX_VS_JAX_NN = 1.1
SEARCH_MIN_SPEEDUP = 8.0


def _verdict(row: harness.Row) -> str:
    """The targets this row is judged by, each with ok or MISSED."""
    if math.isnan(row.candidate_s):
        return ""
    checks = []
    if row.group in ("batchnorm", "batchnorm+relu") and row.floor_s:
        copies = BN_FLOOR_COPIES * row.candidate_s / row.floor_s
        ok = copies <= BN_MAX_COPIES
        checks.append(f"{copies:.2f} copies of x (<= {BN_MAX_COPIES}): {'ok' if ok else 'MISSED'}")
    if row.group == "activations" and row.vs_anchor is not None:
        ok = row.vs_anchor <= ACTIVATION_MAX_VS_JAX_NN
        checks.append(f"<= {ACTIVATION_MAX_VS_JAX_NN}x jax.nn: {'ok' if ok else 'MISSED'}")
    if row.group == "training" and row.case.startswith("search ") and row.vs_anchor:
        speedup = 1.0 / row.vs_anchor
        ok = speedup >= SEARCH_MIN_SPEEDUP
        checks.append(
            f"{speedup:.1f}x the loop (>= {SEARCH_MIN_SPEEDUP:g}x): {'ok' if ok else 'MISSED'}"
        )
    if row.vs_anchor is not None:
        checks.append(f"faster than {row.anchor}: {'ok' if row.vs_anchor < 1 else 'MISSED'}")
    return "; ".join(checks)


def _table(rows: list[harness.Row]) -> str:
    lines = harness.table(rows).splitlines()
    lines[0] += " targets |"
    lines[1] += "---|"
    return "\n".join(
        [*lines[:2], *(f"{ln} {_verdict(r)} |" for ln, r in zip(lines[2:], rows, strict=True))]
    )


def _header(title: str, dry_run: bool) -> str:
    warn = (
        "\n**DRY RUN on CPU, tiny shapes: these numbers are NOT accelerator figures; the run only "
        "checks that every code path works.**\n"
        if dry_run
        else ""
    )
    return (
        f"# jaxnorm device benchmarks: {title}\n{warn}\n"
        f"- device: {harness.device_name()} ({jax.device_count()} device(s)), "
        f"jax {jax.__version__}, python {platform.python_version()}, {platform.machine()}\n"
        f"- date: {datetime.datetime.now(datetime.UTC).isoformat(timespec='minutes')}\n"
        "- command: `bash benchmarks/device.sh"
        + (" --dry-run" if dry_run else "")
        + "`; times are medians after warm-up, several back-to-back calls a sample on an "
        "accelerator; `x anchor` and `x floor` are jaxnorm time / other time (below 1 means "
        "jaxnorm is faster); batch norm's floor is 3.5 read+write copies of x.\n"
    )


def _missing(packages) -> list[str]:
    out = []
    for name in packages:
        try:
            importlib.import_module(name)
        except ImportError:
            out.append(name)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/device.sh", description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU, same code paths")
    p.add_argument(
        "--out",
        type=pathlib.Path,
        help="folder for the tables (default benchmarks/results, or /tmp/jaxnorm-device-dry-run)",
    )
    p.add_argument("--only", nargs="+", choices=[s[0] for s in SECTIONS], help="these sections")
    p.add_argument(
        "--budget-scale", type=float, default=1.0, help="multiply every time budget (default 1)"
    )
    args = p.parse_args(argv)

    backend = jax.default_backend()
    if backend == "cpu" and not args.dry_run:
        print(
            "benchmarks/device.sh: jax.default_backend() is 'cpu' (devices: "
            f"{jax.devices()}): no accelerator. Install jax with its GPU or TPU plugin "
            "(e.g. pip install 'jax[cuda12]') on a machine with one, or pass --dry-run to check "
            "the code paths on CPU with tiny shapes.",
            file=sys.stderr,
        )
        return 2
    harness.KEEP_GOING = True
    if args.dry_run:
        # The accelerator's timing path (pipelined samples) on CPU too.
        harness.PIPELINE = True
    size = "tiny" if args.dry_run else "gpu"
    prefix = "gpu" if args.dry_run else backend
    # A dry run's tables are not figures: by default they stay out of benchmarks/results/.
    default = pathlib.Path("/tmp/jaxnorm-device-dry-run") if args.dry_run else RESULTS
    out = args.out or default
    out.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    run_end = start + TOTAL_S * args.budget_scale
    harness.progress(
        f"device.sh: backend {backend}, {harness.device_name()}, size {size}, tables -> {out}"
        + (" (dry run)" if args.dry_run else "")
    )
    summary = []  # (section, status, seconds)
    all_rows = []
    interrupted = False
    for section, module, name, needs, budget in SECTIONS:
        if args.only and section not in args.only:
            continue
        if interrupted:
            summary.append((section, "not run: interrupted", 0.0))
            continue
        t0 = time.perf_counter()
        rows: list[harness.Row] = []
        status = "ok"
        missing = _missing(needs)
        if missing:
            status = f"skipped: {', '.join(missing)} not installed"
        elif t0 > run_end:
            status = "skipped: the run's time budget was spent"
        else:
            harness.DEADLINE = min(t0 + budget * args.budget_scale, run_end)
            harness.progress(f"{section}: start (budget {budget * args.budget_scale:.0f}s)")
            try:
                importlib.import_module(module)
                rows = harness.REGISTRY[name](size)
            except KeyboardInterrupt:
                # device.sh's hard limit (SIGINT): write the summary of what finished, then stop.
                status = "interrupted at device.sh's time limit"
                interrupted = True
            except Exception as e:  # record it, run the next section
                traceback.print_exc()
                status = f"failed: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
            finally:
                harness.DEADLINE = None
        spent = time.perf_counter() - t0
        skipped = sum(math.isnan(r.candidate_s) for r in rows)
        if skipped and status == "ok":
            status = f"ok, {skipped} case(s) skipped (time budget or failure: see the notes)"
        summary.append((section, status, spent))
        harness.progress(f"{section}: {status} in {spent:.1f}s")
        all_rows += rows
        text = _header(section, args.dry_run) + f"- section status: {status}, {spent:.0f} s\n"
        if rows:
            text += "\n" + _table(rows) + "\n"
        (out / f"{prefix}-{section}.md").write_text(text)

    missed = [r for r in all_rows if "MISSED" in _verdict(r)]
    lines = [
        _header("summary", args.dry_run),
        "| section | status | seconds |",
        "|---|---|---:|",
        *(f"| {s} | {st} | {sec:.1f} |" for s, st, sec in summary),
        "",
        f"Total {time.perf_counter() - start:.1f} s. Rows missing a target: {len(missed)} of "
        f"{sum(not math.isnan(r.candidate_s) for r in all_rows)} measured.",
    ]
    if missed:
        lines += ["", _table(missed)]
    (out / f"{prefix}-summary.md").write_text("\n".join(lines) + "\n")
    harness.progress(f"done in {time.perf_counter() - start:.1f}s; tables in {out}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
