"""Validation helpers shared by the public functions (not API).

They run on static information (shapes and dtypes), so they raise at trace time under ``jit``.
``TypeError`` for a wrong type or dtype, ``ValueError`` for a wrong shape or value, as optax does.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def check_floating(x, name: str = "x") -> None:
    """Raise TypeError unless ``x`` has a floating dtype."""
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"{name} must have a floating dtype (float16, bfloat16, float32 or float64), "
            f"but it has dtype {dtype}; cast it first, e.g. {name}.astype(jnp.float32)"
        )


def compute_dtype(dtype) -> np.dtype:
    """The dtype to reduce in: float32 for low-precision floats, the input dtype otherwise.

    Written without ``jnp.promote_types``, which obeys ``jax.numpy_dtype_promotion("strict")`` and
    would refuse bfloat16 -> float32 inside a caller's strict-promotion context.
    """
    dtype = np.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32:
        return np.dtype(np.float32)
    return dtype


def normalize_axes(axis: int | Sequence[int], ndim: int, name: str = "axis") -> tuple[int, ...]:
    """Turn ``axis`` (an int or a sequence, negatives allowed) into sorted non-negative axes.

    Raises TypeError for anything but an int or a list/tuple of ints (a float, a str, a bool),
    which ``int()`` would otherwise take silently (``axis="1"``, ``axis=1.0``).
    """
    if isinstance(axis, list | tuple):
        axes = tuple(axis)
    else:
        axes = (axis,)
    for a in axes:
        if isinstance(a, bool | np.bool_) or not isinstance(a, int | np.integer):
            raise TypeError(
                f"{name} must be an int or a tuple of ints, got {axis!r} "
                f"(of type {type(axis).__name__})"
            )
    out = []
    for a in axes:
        if not -ndim <= int(a) < ndim:
            raise ValueError(f"{name}={axis!r} is out of range for an array with {ndim} dimensions")
        out.append(int(a) % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"{name}={axis!r} names the same axis twice")
    return tuple(sorted(out))


def check_array(x, name: str) -> None:
    """Raise TypeError unless ``x`` is an array or a number (JAX, NumPy or Python).

    Lists, tuples, dicts, strings and None are refused, as jax.numpy refuses lists: a dict of
    arrays is a pytree, which a function of one array does not map over by itself.
    """
    if isinstance(x, jax.Array | np.ndarray | np.generic | int | float) or hasattr(
        x, "__jax_array__"
    ):
        return
    if isinstance(x, list | tuple):
        hint = f"; convert it first, e.g. jnp.asarray({name})"
    elif isinstance(x, dict):
        hint = "; for a pytree of arrays, call the function on each leaf (e.g. with jax.tree.map)"
    else:
        hint = ""
    raise TypeError(f"{name} must be an array (JAX or NumPy), got {type(x).__name__}{hint}")


def is_tracer(x) -> bool:
    """True when ``x`` is an abstract value inside a transformation (its contents are unknown)."""
    return isinstance(x, jax.core.Tracer)
