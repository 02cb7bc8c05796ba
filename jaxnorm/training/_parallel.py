"""Many small models on a multi-core CPU: one compiled program, one call per core at once.

XLA:CPU runs the operations of one program one after another, and the small matmuls of a search
trial or an ensemble member each use one core, so a ``vmap`` over 64 models leaves the other
cores idle. Two calls of one compiled program from two threads run side by side (JAX releases
the GIL while a program runs). :func:`random_search` and an eager :func:`train_ensemble` split
their models into one group per core and run the groups that way. GPUs and TPUs run one group:
the device is already parallel. Several devices are used by sharding instead.
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax


def cpu_workers(devices: Sequence[jax.Device] | None = None) -> int:
    """How many groups run at once: the usable cores on one CPU device, else 1."""
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) != 1 or devices[0].platform != "cpu":
        return 1
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS and Windows
        return os.cpu_count() or 1


def at_top_level() -> bool:
    """True when nothing is being traced: no jit, vmap or grad around the caller.

    JAX has no public test for an enclosing transformation, so the private one is used when it
    exists; without it (another JAX version) the answer is False and the caller stays pure.
    """
    try:
        from jax._src import core
    except ImportError:  # pragma: no cover - another JAX layout
        return False
    clean = getattr(core, "trace_state_clean", None)
    return bool(clean()) if clean is not None else False


def run(program: Callable, calls: Sequence[tuple], workers: int, **static: Any) -> list:
    """``program(*args, **static)`` for every ``args`` in ``calls``, ``workers`` at once.

    ``program`` is a jitted function and ``static`` its static keyword arguments. It is compiled
    once for the first call's arguments (every call must have the same shapes), so the threads
    share one executable. The outputs come back in order.
    """
    compiled = program.lower(*calls[0], **static).compile()
    if workers <= 1 or len(calls) <= 1:
        return [compiled(*args) for args in calls]

    def one(args):
        return jax.block_until_ready(compiled(*args))

    pool = _pool(min(workers, len(calls)))
    return [f.result() for f in [pool.submit(one, args) for args in calls]]


@functools.cache
def _pool(threads: int) -> concurrent.futures.ThreadPoolExecutor:
    # Kept for the process, its threads started once: starting threads at every call costs
    # milliseconds, much of a short ensemble's time.
    return concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="jaxnorm")
