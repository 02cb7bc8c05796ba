"""Helpers shared by batch norm and preprocessing statistics (not API).

Both compute moments about a *pivot*, one valid example of the data (any valid value of a feature
is within a few standard deviations of its mean, which is all a one-pass or shifted two-pass
variance needs, and for a constant feature it is the constant itself), and both merge per-device
statistics with one collective whose result is the same on every device.
"""

from __future__ import annotations

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
