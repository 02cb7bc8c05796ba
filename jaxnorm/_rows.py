"""Helpers shared by batch norm and preprocessing statistics (not API).

Both compute moments about a *pivot*, a value near each feature's mean taken from the data
(:func:`first_row`, the first valid example, or the mean of :func:`sample_rows`; for a constant
feature it is the constant itself), and both merge per-device statistics with one collective
whose result is the same on every device. A pivot c standard deviations from the mean costs a
one-pass variance a factor of about 1 + c^2 in accuracy (a corrected two-pass far less), and one
example can be an outlier arbitrarily far out, so batch norm pivots on a sample's mean and checks.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def first_row(x, valid, raxes: tuple[int, ...]):
    """``(row, has)``: x at its first valid example, keepdims (size 1 on ``raxes``), one gather.

    Args:
      x: the data; ``raxes`` are its example axes, the others its features.
      valid: None (every example is valid) or a bool array of x's rank, of x's sizes on
        ``raxes`` and size 1 on the other axes.
      raxes: the example axes.

    Returns:
      The row at the smallest valid example index (in row-major order over ``raxes``), and
      whether there is one. With none, the row at index 0 (or zeros when x has no example at
      all): the caller decides what a pivot of nothing should be.
    """
    keep = tuple(1 if a in raxes else d for a, d in enumerate(x.shape))
    if any(x.shape[a] == 0 for a in raxes):
        return jnp.zeros(keep, x.dtype), jnp.zeros((), bool)
    index = {a: jnp.zeros((), jnp.int32) for a in raxes}
    has = jnp.ones((), bool)
    if valid is not None:
        flat = jnp.zeros((), jnp.int32)
        strides = {}
        total = 1
        for a in reversed(raxes):
            strides[a] = total
            flat = flat + jax.lax.broadcasted_iota(jnp.int32, valid.shape, a) * total
            total *= x.shape[a]
        # The smallest flat index of a valid example (total when there is none).
        first = jnp.min(jnp.where(valid, flat, jnp.int32(total)))
        has = first < total
        first = jnp.where(has, first, jnp.int32(0))
        index = {a: (first // strides[a]) % x.shape[a] for a in raxes}
    sharding = getattr(jax.typeof(x), "sharding", None)
    spec = tuple(getattr(sharding, "spec", ()) or ())
    if any(a < len(spec) and spec[a] is not None for a in raxes):
        # Explicitly sharded example axes (sharding in types, jax.make_mesh's default): a one-row
        # slice of a sharded axis is not defined there, a gather with a replicated result is.
        out_spec = jax.sharding.PartitionSpec(
            *(None if a in raxes else (spec[a] if a < len(spec) else None) for a in range(x.ndim))
        )
        at = tuple(
            jnp.reshape(index[a], (1,)) if a in raxes else slice(None) for a in range(x.ndim)
        )
        row = x.at[at].get(out_sharding=jax.sharding.NamedSharding(sharding.mesh, out_spec))
        return row.reshape(keep), has
    if valid is None:
        return x[tuple(slice(0, 1) if a in raxes else slice(None) for a in range(x.ndim))], has
    starts = [index[a] if a in raxes else jnp.zeros((), jnp.int32) for a in range(x.ndim)]
    return jax.lax.dynamic_slice(x, starts, keep), has


def check_axis_name_bound(axis_name, who: str) -> None:
    """NameError naming ``axis_name`` and ``who`` when a mapped axis it names is not bound.

    JAX's own error comes from the first collective and speaks of ``axis_index``, which the
    caller never called. The type stays NameError, as JAX's and flax's, for code that catches it.
    """
    names = axis_name if isinstance(axis_name, tuple | list) else (axis_name,)
    for name in names:
        try:
            jax.lax.axis_size(name)
        except NameError:
            raise NameError(
                f"{who}: axis_name={axis_name!r} names a mapped axis, but no axis {name!r} is "
                f"bound here; call it inside jax.shard_map over a mesh with an axis {name!r} "
                f"(or jax.vmap/jax.pmap(..., axis_name={name!r})), or pass axis_name=None"
            ) from None


def gather_by_psum(v, axis_name, groups=None):
    """``[D, *v.shape]``: v of each of the D devices of the group, identical on all of them.

    ``lax.all_gather``'s result counts as device-varying under ``shard_map``'s replication
    checks, so statistics built from it could not leave a shard_map as replicated; a psum of
    one-hot slots is the same single collective and is invariant.
    """
    index = jax.lax.axis_index(axis_name)
    if groups is None:
        size = jax.lax.axis_size(axis_name)
    else:
        size = len(groups[0])
        position = np.zeros(sum(len(g) for g in groups), np.int32)
        for g in groups:
            for i, d in enumerate(g):
                position[d] = i
        index = jnp.asarray(position)[index]
    slots = jnp.arange(size) == index
    onehot = jnp.where(slots.reshape((size,) + (1,) * v.ndim), v[None], jnp.zeros((), v.dtype))
    return jax.lax.psum(onehot, axis_name, axis_index_groups=groups)


def sample_rows(x, raxes: tuple[int, ...], size: int):
    """``(rows, axis)``: ``size`` examples of x spread evenly over the examples, one small gather.

    Examples are numbered in row-major order over ``raxes``; the sample takes numbers
    ``floor((2j + 1) R / (2 size))`` for ``j < size``, the middles of ``size`` equal runs (R the
    number of examples; all of them when R <= size). A flat stride that is usually not a
    multiple of an image's width or height keeps the sample from seeing only one phase of a
    periodic feature map.

    Returns:
      The gathered values, with the sampled examples on one axis (``axis``) and x's other axes
      (the features) in their order, and that axis: ``raxes[0]`` when ``raxes`` are adjacent,
      else 0 (NumPy's rule for advanced indices).
    """
    if not raxes:
        # No example axes (a 1-D x of features, as flax allows): x is the one example.
        return x[None], 0
    sizes = tuple(x.shape[a] for a in raxes)
    total = math.prod(sizes)
    size = max(1, min(size, total))
    flat = ((2 * np.arange(size, dtype=np.int64) + 1) * total) // (2 * size)
    index = np.unravel_index(flat, sizes) if total else tuple(np.zeros((0,), int) for _ in sizes)
    at = tuple(
        jnp.asarray(index[raxes.index(a)], jnp.int32) if a in raxes else slice(None)
        for a in range(x.ndim)
    )
    adjacent = raxes == tuple(range(raxes[0], raxes[0] + len(raxes)))
    axis = raxes[0] if adjacent else 0
    sharding = getattr(jax.typeof(x), "sharding", None)
    spec = tuple(getattr(sharding, "spec", ()) or ())
    if any(a < len(spec) and spec[a] is not None for a in raxes):
        # Explicitly sharded example axes: a gather with a replicated sample axis (see first_row).
        rest = [spec[a] if a < len(spec) else None for a in range(x.ndim) if a not in raxes]
        out_spec = jax.sharding.PartitionSpec(*rest[:axis], None, *rest[axis:])
        out = jax.sharding.NamedSharding(sharding.mesh, out_spec)
        return x.at[at].get(out_sharding=out), axis
    return x[at], axis
