"""Timing and reporting shared by every benchmark.

Every figure is a ratio measured side by side in one run: the jaxnorm candidate, its anchor
(jax.nn, flax, PyTorch, scikit-learn, ...) and, where it applies, the memory floor (a read+write
copy of the same bytes). Timing warms up (compiles) first, blocks on the result, repeats and
takes the median. Absolute times mean something only on an accelerator; on CPU read the ratios.

A benchmark module registers functions with :func:`benchmark`; each takes the size name
(``"small"`` or ``"large"``) and returns a list of :class:`Row`.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

REGISTRY: dict[str, Callable[[str], list[Row]]] = {}


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


def timeit(fn: Callable, *args, warmup: int = 2, reps: int = 15, min_time: float = 0.0) -> float:
    """Median wall time of ``fn(*args)`` in seconds, after ``warmup`` calls, blocking each call.

    ``min_time`` repeats further until that many seconds have been spent, for very fast functions.
    """
    for _ in range(warmup):
        block(fn(*args))
    times = []
    spent = 0.0
    while len(times) < reps or spent < min_time:
        t0 = time.perf_counter()
        block(fn(*args))
        dt = time.perf_counter() - t0
        times.append(dt)
        spent += dt
    return statistics.median(times)


def interleaved(fns: dict[str, Callable], *args, warmup: int = 2, reps: int = 15) -> dict:
    """Median times of several functions on the same arguments, run alternately.

    Alternating the candidates round by round keeps slow drifts of the machine (another process,
    frequency changes) out of the ratios.
    """
    for fn in fns.values():
        for _ in range(warmup):
            block(fn(*args))
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            block(fn(*args))
            times[k].append(time.perf_counter() - t0)
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


def table(rows: list[Row]) -> str:
    """A Markdown table of ``rows`` with the ratios against anchor and floor."""
    lines = [
        "| group | case | jaxnorm (ms) | anchor | anchor (ms) | x anchor | floor (ms) | x floor "
        "| note |",
        "|---|---|---:|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.group} | {r.case} | {r.candidate_s * 1e3:.3f} | {r.anchor or ''} | "
            f"{_fmt(r.anchor_s and r.anchor_s * 1e3, '.3f')} | {_fmt(r.vs_anchor, '.2f')} | "
            f"{_fmt(r.floor_s and r.floor_s * 1e3, '.3f')} | {_fmt(r.vs_floor, '.2f')} | {r.note} |"
        )
    return "\n".join(lines)
