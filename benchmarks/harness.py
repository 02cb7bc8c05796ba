"""Timing and reporting shared by every benchmark.

Every figure is a ratio measured side by side in one run: the jaxnorm candidate, its anchor
(jax.nn, flax, PyTorch, scikit-learn, ...) and, where it applies, the memory floor (a read+write
copy of the same bytes). Timing warms up (compiles) first, blocks on the result, repeats and
takes the median. Absolute times mean something only on an accelerator; on CPU read the ratios.

A benchmark module registers functions with :func:`benchmark`; each takes the size name
(``"small"`` or ``"large"`` from ``benchmarks.run``; ``"gpu"`` or ``"tiny"`` from
``benchmarks.device``, the accelerator command and its CPU dry run) and returns a list of
:class:`Row`. A benchmark that loops over cases checks :func:`out_of_time` before each and records
a :func:`skipped` row instead of running it once ``DEADLINE`` has passed.

On an accelerator a jitted call returns before its kernels finish, and blocking after every call
adds the host's round trip (tens of microseconds) to kernels that take about as long; there each
timed sample is a run of calls, blocked on the last, long enough to take ``SAMPLE_S`` (see
``PIPELINE``).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import sys
import time
import traceback
from collections.abc import Callable

import jax
import jax.numpy as jnp

REGISTRY: dict[str, Callable[[str], list[Row]]] = {}

# Pipelined samples: None = on accelerators only; True/False force it (the device dry run sets
# True so that CPU runs the accelerator's code path).
PIPELINE: bool | None = None
# The least time one pipelined sample should take, and the most calls it may make.
SAMPLE_S = 2e-3
MAX_CALLS = 64
# time.perf_counter() after which benchmarks skip their remaining cases (None: no limit).
DEADLINE: float | None = None
# Record a failing case as a skipped row and go on (benchmarks.device), instead of raising.
KEEP_GOING = False
_START = time.perf_counter()


def benchmark(name: str):
    """Register ``fn(size) -> list[Row]`` under ``name``."""

    def register(fn):
        REGISTRY[name] = fn
        return fn

    return register


@dataclasses.dataclass
class Row:
    """One measured case. Times are medians in seconds; ratios are candidate / other."""

    group: str
    case: str
    candidate_s: float
    anchor: str | None = None
    anchor_s: float | None = None
    floor_s: float | None = None
    note: str = ""

    @property
    def vs_anchor(self) -> float | None:
        return None if self.anchor_s is None else self.candidate_s / self.anchor_s

    @property
    def vs_floor(self) -> float | None:
        return None if self.floor_s is None else self.candidate_s / self.floor_s


def block(tree):
    """Wait for every array in ``tree`` (JAX arrays; other leaves pass through)."""
    return jax.tree_util.tree_map(
        lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a, tree
    )


def out_of_time() -> bool:
    """Whether ``DEADLINE`` has passed (benchmarks then record :func:`skipped` rows)."""
    return DEADLINE is not None and time.perf_counter() > DEADLINE


def skipped(group: str, case: str, why: str) -> Row:
    """A row for a case that was not measured, saying why."""
    return Row(group, case, math.nan, note=f"skipped: {why}")


def guarded(group: str, case: str, fn: Callable, *args) -> list[Row]:
    """``fn(*args)``, the rows of one case; with ``KEEP_GOING`` a failure becomes a skipped row.

    The device command sets ``KEEP_GOING`` so that one failing case (a missing kernel, an
    out-of-memory) is recorded and the next case runs; elsewhere the error propagates.
    """
    if not KEEP_GOING:
        return fn(*args)
    try:
        return fn(*args)
    except Exception as e:  # recorded in the table, the traceback printed
        traceback.print_exc()
        first = (str(e).splitlines() or [""])[0][:160]
        return [skipped(group, case, f"failed: {type(e).__name__}: {first}")]


def progress(message: str) -> None:
    """Print ``message`` to stderr with the seconds elapsed since the harness was imported."""
    print(f"[{time.perf_counter() - _START:7.1f}s] {message}", file=sys.stderr, flush=True)


def _pipelined() -> bool:
    return jax.default_backend() != "cpu" if PIPELINE is None else PIPELINE


def _calls_per_sample(fn: Callable, args) -> int:
    """1 on CPU; on an accelerator, enough back-to-back calls to last ``SAMPLE_S``."""
    if not _pipelined():
        return 1
    t0 = time.perf_counter()
    block(fn(*args))
    dt = time.perf_counter() - t0
    return max(1, min(MAX_CALLS, math.ceil(SAMPLE_S / max(dt, 1e-9))))


def _sample(fn: Callable, args, calls: int) -> float:
    """Seconds a call of ``fn(*args)``: ``calls`` calls back to back, blocked on the last.

    One device runs its programs in the order they were launched, so the last result is ready
    only when every earlier call has finished.
    """
    t0 = time.perf_counter()
    for _ in range(calls - 1):
        fn(*args)
    block(fn(*args))
    return (time.perf_counter() - t0) / calls


def timeit(fn: Callable, *args, warmup: int = 2, reps: int = 15, min_time: float = 0.0) -> float:
    """Median wall time of ``fn(*args)`` in seconds, after ``warmup`` calls, blocking each sample.

    ``min_time`` repeats further until that many seconds have been spent, for very fast functions.
    """
    for _ in range(warmup):
        block(fn(*args))
    calls = _calls_per_sample(fn, args)
    times = []
    spent = 0.0
    while len(times) < reps or spent < min_time:
        dt = _sample(fn, args, calls)
        times.append(dt)
        spent += dt * calls
    return statistics.median(times)


def interleaved(fns: dict[str, Callable], *args, warmup: int = 2, reps: int = 15) -> dict:
    """Median times of several functions on the same arguments, run alternately.

    Alternating the candidates round by round keeps slow drifts of the machine (another process,
    frequency changes) out of the ratios.
    """
    for fn in fns.values():
        for _ in range(warmup):
            block(fn(*args))
    calls = {k: _calls_per_sample(fn, args) for k, fn in fns.items()}
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            times[k].append(_sample(fn, args, calls[k]))
    return {k: statistics.median(v) for k, v in times.items()}


@jax.jit
def _copy(x):
    # A read of x and a write of the same number of bytes; negation keeps XLA from eliding it.
    return -x


@jax.jit
def _read2_write1(x, y):
    return x + y


def copy_floor(shape, dtype=jnp.float32, *, reps: int = 15) -> float:
    """Median time of one read+write pass over an array of ``shape``/``dtype``: the memory floor."""
    x = jnp.ones(shape, dtype)
    return timeit(_copy, x, reps=reps)


def floor_fns(shape, dtype=jnp.float32):
    """The floor functions and their argument, to be timed with :func:`interleaved`.

    Returns ``(copy, read2_write1, x)``: ``copy(x)`` reads and writes one array (forward floor),
    ``read2_write1(x, x)`` reads two and writes one (the elementwise backward floor).
    """
    return _copy, _read2_write1, jnp.ones(shape, dtype)


def device_name() -> str:
    d = jax.devices()[0]
    return f"{d.platform}:{getattr(d, 'device_kind', d.platform)}"


def _fmt(v, spec):
    return "" if v is None else format(v, spec)


def _ms(v):
    return "" if v is None else "skipped" if math.isnan(v) else f"{v * 1e3:.3f}"


def table(rows: list[Row]) -> str:
    """A Markdown table of ``rows`` with the ratios against anchor and floor."""
    lines = [
        "| group | case | jaxnorm (ms) | anchor | anchor (ms) | x anchor | floor (ms) | x floor "
        "| note |",
        "|---|---|---:|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.group} | {r.case} | {_ms(r.candidate_s)} | {r.anchor or ''} | "
            f"{_ms(r.anchor_s)} | {_fmt(r.vs_anchor, '.2f')} | "
            f"{_ms(r.floor_s)} | {_fmt(r.vs_floor, '.2f')} | {r.note} |"
        )
    return "\n".join(lines)
