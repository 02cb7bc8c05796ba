"""Data preprocessing: mergeable moments and the transforms fitted from them.

The lecture's "Step 1: preprocess the data" for a data matrix X [N, D] (one example a row) and for
images [N, H, W, C]: zero-centring, normalising, PCA and whitening. Every transform is fitted from
sufficient statistics, :class:`Moments` ``(count, mean, m2)``, so the same code fits in memory
(``t.fit(x)``), over a stream of batches (:func:`fit_stream`, memory independent of the number
of batches) or across devices (``axis_name=`` inside ``shard_map``, or a sharded ``jit``), and
all three give the same state up to rounding.

Fit on the training split, apply to every split::

    t = preprocessing.pca_whiten(eps=1e-5)
    state = t.fit(x_train)                  # statistics of the training data only
    z_train = t.apply(state, x_train)
    z_test = t.apply(state, x_test)         # the same mean and matrix: no leak from the test set

A transform is a NamedTuple ``Transform(fit, apply, inverse, fit_moments)`` in the spirit of
optax's ``GradientTransformation`` (``t.full_covariance`` says whether ``fit_moments`` needs the
full scatter matrix); a state is a NamedTuple of arrays (a pytree), so it goes through ``jit``,
``vmap`` and :func:`save` / :func:`load` as it is.

Conventions, and where they differ from the neighbours:

- ``normalize`` divides by the population standard deviation (denominator N), as scikit-learn's
  ``StandardScaler`` and the lecture's ``np.std(X, axis=0)`` do; a constant feature (by
  ``StandardScaler``'s own rounding-error bound) gets scale 1.
- PCA and whitening use the sample covariance (denominator N - 1), as scikit-learn's ``PCA``
  (``explained_variance_``; ``whiten=True`` gives unit sample variance). The lecture writes
  ``X.T @ X / N``; the two differ by the factor N / (N - 1).
- Component signs follow scikit-learn's ``svd_flip(u_based_decision=False)`` (scikit-learn 1.9):
  in each component (a row of ``components``, a column of the lecture's U) the entry of largest
  absolute value is positive.
- ``pca(num_components=None)`` keeps all D components (a rotation, so ``inverse`` undoes ``apply``),
  where scikit-learn keeps min(N, D).
- Whitening ``eps``: ``eps_mode="absolute"`` (the default) divides by ``sqrt(lambda + eps)`` with
  the lecture's ``eps=1e-5``; ``eps_mode="relative"`` uses ``sqrt(lambda + eps * mean(lambda))``,
  which does not depend on the units of the data. scikit-learn's ``PCA(whiten=True)`` uses no eps.
- Directions beyond the rank of the covariance (eigenvalue at most
  ``sqrt(D) * eps_float * lambda_max``, or index at least N - 1) are left unscaled in whitening
  instead of being multiplied by ``1 / sqrt(eps)``; an eager fit warns when that happens.

References:
  Chan, Golub & LeVeque, "Algorithms for computing the sample variance: analysis and
  recommendations", The American Statistician 37(3), 1983 (corrected two-pass algorithm and the
  pairwise merge). Bell & Sejnowski, "The 'independent components' of natural scenes are edge
  filters", Vision Research 1997 (ZCA). Krizhevsky, Sutskever & Hinton 2012 (mean image);
  Simonyan & Zisserman 2015 (per-channel mean).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import sys
import time
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from jaxnorm import _checks, _rows

__all__ = [
    "Moments",
    "NormalizeState",
    "PCAState",
    "Transform",
    "ZCAState",
    "ZeroCenterState",
    "chain",
    "fit_stream",
    "load",
    "merge",
    "moments",
    "normalize",
    "pca",
    "pca_whiten",
    "save",
    "zca_whiten",
    "zero_center",
]

_HIGHEST = lax.Precision.HIGHEST


# --------------------------------------------------------------------------------------------------
# Moments


class Moments(NamedTuple):
    """Sufficient statistics of a set of examples, mergeable exactly with :func:`merge`.

    Attributes:
      count: number of examples (a scalar of the statistics' float dtype).
      mean: per-feature mean, shape = the feature shape (e.g. ``[D]``, ``[C]`` or ``[H, W, C]``).
      m2: centred second moment ``sum_i (x_i - mean)^2`` per feature (same shape as ``mean``), or
        with ``full_covariance=True`` the scatter matrix ``sum_i (x_i - mean)(x_i - mean)^T`` of
        shape ``[D, D]``, D the number of features (``mean.size``). The population variance is
        ``m2 / count``, the sample covariance ``m2 / (count - 1)``.
    """

    count: jax.Array
    mean: jax.Array
    m2: jax.Array


def _feature_axes(feature_axes: int | Sequence[int], ndim: int) -> tuple[int, ...]:
    def is_int(a):
        return isinstance(a, int | np.integer) and not isinstance(a, bool)

    if not (
        is_int(feature_axes)
        or (isinstance(feature_axes, tuple | list) and all(is_int(a) for a in feature_axes))
    ):
        raise TypeError(
            "feature_axes must be an int or a tuple of ints (negative ones count from the end), "
            f"but got {_describe(feature_axes)}"
        )
    return _checks.normalize_axes(feature_axes, ndim, "feature_axes")


@jax.jit
def _count_nonfinite(x, w):
    bad = ~jnp.isfinite(x)
    if w is not None:
        bad = bad & w.reshape(w.shape + (1,) * (x.ndim - w.ndim))
    return jnp.sum(bad)


def _check_finite(flag, x, w, axes, what: str) -> None:
    """Raise if ``flag`` (non-finite column sums, from the statistics pass) is set.

    The statistics pass only flags trouble, through its column sums, which are NaN or Inf exactly
    when a column holds a NaN or Inf (or its finite values overflow the float32 sum): counting
    every non-finite entry there was a whole extra pass over x. The count for the message is
    taken here, on the error path only.
    """
    if not int(flag):
        return
    if w is not None:  # the mask covers x's example axes; move the feature axes last
        example_axes = tuple(a for a in range(x.ndim) if a not in axes)
        x = jnp.transpose(x, example_axes + axes)
    n_bad = int(_count_nonfinite(x, w))
    if n_bad:
        raise ValueError(
            f"{what} has {n_bad} non-finite value(s) (NaN or Inf) among {x.size} values; "
            "preprocessing statistics need finite data: drop or impute those entries first "
            "(e.g. with a mask=, or np.nan_to_num)"
        )
    raise ValueError(
        f"{what} is finite, but its sums overflow {_checks.compute_dtype(x.dtype).name} (largest "
        f"|value| {float(jnp.max(jnp.abs(x)))}); rescale it before computing statistics"
    )


def _safe_div(a, n):
    # 0 / 0 is 0 here: the moments of no examples are (0, 0, 0), merge's identity.
    return jnp.where(n > 0, a / jnp.where(n > 0, n, 1), jnp.zeros_like(a))


def _pivot(x, w, axes: tuple[int, ...]):
    """``(k, has_row)``: x at its first valid example (flattened features), one small gather.

    k is the shift of :func:`_local_moments`: any valid value of a feature is within a few
    standard deviations of its mean, which is all the first pass needs, and for a constant
    feature it is the constant itself. The first example, or with a mask the first whose mask is
    True; zeros when there is none. ``x`` may be fit_stream's tuple of 2-D parts (no mask).
    """
    if isinstance(x, tuple):
        x = next((xi for xi in x if xi.shape[0]), x[0])
        axes = (1,)
    dt = _checks.compute_dtype(x.dtype)
    example_axes = tuple(a for a in range(x.ndim) if a not in axes)
    num_features = math.prod(x.shape[a] for a in axes)
    valid = None if w is None else jnp.expand_dims(w, axes)
    row, has = _rows.first_row(x, valid, example_axes)
    k = jnp.transpose(row, example_axes + axes).reshape(num_features).astype(dt)
    if w is not None:  # no valid example: the row may be NaN padding
        k = jnp.where(has, k, jnp.zeros((), dt))
    return lax.stop_gradient(k), has


def _local_moments(x, w, axes: tuple[int, ...], full_covariance: bool, shift=None):
    """Moments of x over the non-feature axes, flattened features; + a non-finite flag.

    Corrected two-pass algorithm (Chan, Golub & LeVeque 1983) about a shift k: pass 1 sums
    x - k and gives mean0 = k + sum(x - k) / n; pass 2 sums d = x - mean0 and d^2 (or d d^T),
    minus (sum d)^2 / n. No E[x^2] - E[x]^2, so an offset |mean| >> std costs no accuracy; the
    correction removes the first-order error of mean0; and with k a valid example (see
    :func:`_pivot`) the first pass sums values of the order of the spread, not of the offset. A
    constant feature has x - k = 0 exactly, so mean0 = k, d = 0 and m2 = 0 exactly.

    ``shift=None``: k is the pivot of x, and the mean is returned as it is. Otherwise k is
    ``shift`` (fit_stream's shift for the whole stream, or the device-wide shift of
    ``axis_name``) and the mean is returned relative to it, ``mean - shift``, for a merge in
    shifted coordinates (where the merged means are small and lose nothing to the offset).
    ``x`` may also be a tuple of 2-D arrays [rows, features] (fit_stream's groups, no mask): the
    moments of their concatenation, without writing it.
    """
    if isinstance(x, tuple):
        parts = [(xi.astype(_checks.compute_dtype(xi.dtype)), None) for xi in x]
    else:
        example_axes = tuple(a for a in range(x.ndim) if a not in axes)
        num_features = math.prod(x.shape[a] for a in axes)
        x2 = jnp.transpose(x, example_axes + axes).reshape(-1, num_features)
        parts = [(x2.astype(_checks.compute_dtype(x.dtype)), None if w is None else w.reshape(-1))]
    dt = parts[0][0].dtype
    k = _pivot(x, w, axes)[0] if shift is None else shift.astype(dt)
    if w is None:
        n = jnp.asarray(sum(xi.shape[0] for xi, _ in parts), dt)
        # x - k fuses into the column sums: no pass over x beyond the one that sums it.
        total = sum(jnp.sum(xi - k[None, :], axis=0) for xi, _ in parts)
    else:
        x2, w = parts[0]
        n = jnp.sum(w, dtype=dt)
        # where, not multiplication: masked-out rows may hold NaN padding and 0 * NaN is NaN.
        total = jnp.sum(jnp.where(w[:, None], x2 - k[None, :], jnp.zeros((), dt)), axis=0)
    mean0 = k + _safe_div(total, n)
    # A column sum is NaN or Inf exactly when its column holds one (or overflows): the flag for
    # _check_finite, at no extra pass over x.
    n_bad = jnp.sum(~jnp.isfinite(total))
    # Parts stay apart until they are centred (see _centred): concatenated before, they would be
    # written out once more.
    x2 = parts[0][0] if len(parts) == 1 else tuple(xi for xi, _ in parts)
    w = parts[0][1]
    if full_covariance:
        q, s = _scatter(x2, mean0, w)
        m2 = q - _safe_div(s[:, None] * s[None, :], n)
        m2 = 0.5 * (m2 + m2.T)
        diag = jnp.diagonal(m2)
    else:
        d = _centred(x2, mean0, w)
        s = jnp.sum(d, axis=0)
        m2 = jnp.sum(d * d, axis=0) - _safe_div(s * s, n)
        diag = m2
    # Finite data whose squared deviations overflow: flagged too (the [D] diagonal bounds the
    # off-diagonal entries).
    n_bad = n_bad + jnp.sum(~jnp.isfinite(diag))
    if shift is None:
        mean = mean0 + _safe_div(s, n)
    else:
        mean = (mean0 - k) + _safe_div(s, n)
        if k.dtype != shift.dtype:  # a float64 shift rounded to this part's float32
            mean = mean + (k.astype(shift.dtype) - shift).astype(dt)
    m2 = _clip_m2(m2, full_covariance)
    return Moments(n, mean, m2), n_bad


# Below this many features one matmul is as fast as the split in _scatter.
_SPLIT_MIN_FEATURES = 256
# Rows per block of _scatter's CPU loop (and the most rows fit_stream groups): the centred block
# (4 MiB at 256 float32 features) is reused across iterations instead of an x-sized temporary
# whose first touch costs page faults.
_BLOCK_ROWS = 4096


def _centred(x2, mean0, w):
    if isinstance(x2, tuple):  # fit_stream's group of batches, no mask: one pass writes d
        return jnp.concatenate([xi - mean0[None, :] for xi in x2])
    d = x2 - mean0[None, :]
    if w is None:
        return d
    # where, not multiplication: masked-out rows may hold NaN padding and 0 * NaN is NaN.
    return jnp.where(w[:, None], d, jnp.zeros((), d.dtype))


def _gram(a, b, out_sharding):
    return lax.dot_general(
        a, b, (((0,), (0,)), ((), ())), precision=_HIGHEST, out_sharding=out_sharding
    )


def _scatter(x2, mean0, w):
    """``(d^T d, column sums of d)`` for d = x2 - mean0 [N, D] (rows with w False set to 0).

    XLA has no symmetric rank-k update (BLAS's SYRK, which NumPy uses for ``x.T @ x`` and so
    scikit-learn's covariance PCA), so ``d^T d`` costs a full matmul. On CPU the columns are
    split in two halves a, b and only the blocks a^T a, a^T b and b^T b are computed: 3/4 of the
    multiply-adds. The halves are centred and multiplied in blocks of _BLOCK_ROWS rows in a
    loop, so that the centred data is never an x-sized temporary. Other platforms run the
    single matmul on the whole centred d.
    """
    out = _replicated(x2[0] if isinstance(x2, tuple) else x2)
    num_rows = sum(xi.shape[0] for xi in x2) if isinstance(x2, tuple) else x2.shape[0]
    num_features = mean0.shape[0]

    def single(x2, mean0):
        d = _centred(x2, mean0, w)
        return _gram(d, d, out), jnp.sum(d, axis=0)

    if num_features < _SPLIT_MIN_FEATURES or out is not None:
        return single(x2, mean0)
    h = num_features // 2

    def blocks(xb, mean0, wb):
        d = _centred(xb, mean0, wb)
        a, b = d[:, :h], d[:, h:]
        # Sums of the halves, not of d: each then fuses into the pass that writes its half.
        s = jnp.concatenate([jnp.sum(a, axis=0), jnp.sum(b, axis=0)])
        return _gram(a, a, None), _gram(a, b, None), _gram(b, b, None), s

    def split(x2, mean0):
        if num_rows <= _BLOCK_ROWS:
            return assemble(*blocks(x2, mean0, w))
        if isinstance(x2, tuple):
            x2 = jnp.concatenate(x2)
        r = _BLOCK_ROWS
        full = num_rows // r
        tail = num_rows - full * r
        acc = jax.tree.map(jnp.zeros_like, jax.eval_shape(blocks, x2[:r], mean0, None))
        if tail:
            acc = blocks(x2[full * r :], mean0, None if w is None else w[full * r :])

        def body(i, acc):
            xb = lax.dynamic_slice_in_dim(x2, i * r, r)
            wb = None if w is None else lax.dynamic_slice_in_dim(w, i * r, r)
            return jax.tree.map(jnp.add, acc, blocks(xb, mean0, wb))

        return assemble(*lax.fori_loop(0, full, body, acc))

    def assemble(aa, ab, bb, s):
        q = jnp.concatenate(
            [jnp.concatenate([aa, ab], axis=1), jnp.concatenate([ab.T, bb], axis=1)], axis=0
        )
        return q, s

    return lax.platform_dependent(x2, mean0, cpu=split, default=single)


def _replicated(x):
    # With an explicit-sharding mesh (jax.make_mesh's default) a contraction over a sharded axis
    # must name its output sharding; the scatter matrix is small, so replicate it.
    sharding = jax.typeof(x).sharding
    if not any(a is not None for a in getattr(sharding, "spec", ())):
        return None
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())


def _clip_m2(m2, full_covariance):
    if full_covariance:
        diag = jnp.maximum(jnp.diagonal(m2), 0)
        return m2.at[jnp.diag_indices(m2.shape[0])].set(diag)
    return jnp.maximum(m2, 0)


_local_moments_jit = jax.jit(_local_moments, static_argnums=(2, 3))


def _moments_across(x, w, axes, full_covariance: bool, axis_name):
    """Moments of the concatenation of the shards of ``axis_name``, about one shared shift.

    The shift k is the pivot of the lowest-index device that has a valid example (the example
    the single-device fit would pivot on), gathered with one small psum. Each device computes
    its moments relative to k, Chan et al.'s merge combines them with psum in shifted
    coordinates (small means: ``count * mean`` loses nothing to the offset), and k is added
    once at the end. A constant feature stays exact: every shifted mean and m2 is 0.
    """
    k, has = _pivot(x, w, axes)
    g = _rows.gather_by_psum(jnp.concatenate([has.astype(k.dtype)[None], k]), axis_name)
    first = jnp.argmax(g[:, 0] > 0)  # 0 when no device has an example: its pivot is zeros
    k = lax.stop_gradient(g[first, 1:])
    m, n_bad = _local_moments(x, w, axes, full_covariance, k)
    n = lax.psum(m.count, axis_name)
    mean = _safe_div(lax.psum(m.count * m.mean, axis_name), n)
    d = m.mean - mean
    if full_covariance:
        extra = m.count * d[:, None] * d[None, :]
    else:
        extra = m.count * d * d
    m2 = lax.psum(m.m2 + extra, axis_name)
    return Moments(n, k + mean, m2), n_bad


def _no_example_axis_message(name, what, shape, feature_axes) -> str:
    # A 1-D x is ambiguous (N examples of one feature, or one example of N features); scikit-learn
    # refuses it too ("Expected 2D array, got 1D array").
    return (
        f"{name} needs an example axis besides the feature axes, but {what} has shape {shape} "
        f"and feature_axes={feature_axes!r} makes every axis a feature axis; for one feature "
        "per example pass x[:, None], for a single example pass x[None]"
    )


def moments(
    x: ArrayLike,
    feature_axes: int | Sequence[int] = -1,
    full_covariance: bool = False,
    mask: ArrayLike | None = None,
    axis_name: Any = None,
) -> Moments:
    """Per-feature mean and centred second moment of ``x``, exact to merge.

    Every axis not in ``feature_axes`` indexes examples. With F the feature axes and
    d_i = x_i - mean:

        count = N,   mean = (1/N) sum_i x_i,   m2 = sum_i d_i^2   (or sum_i d_i d_i^T)

    computed by the corrected two-pass algorithm about a shift k, the first valid example: the
    first pass sums x_i - k (mean0 = k + sum / N), the second d_i = x_i - mean0. So float32
    keeps its accuracy when |mean| >> std (no E[x^2] - E[x]^2 cancellation), and a constant
    feature gets its constant as the mean and ``m2 == 0`` exactly. The second pass removes the
    first-order error of mean0, so a pivot far from the mean (an outlier first example) costs
    nothing measurable: over a fuzz of offsets to 1e6, tiny variances, sparse post-ReLU
    features, outlier first rows and heavy tails, the mean, m2 and covariance stay within 4x
    a float32 two-pass computation's error (tests/test_moments_accuracy.py). m2 is a sum, so
    it must itself be a finite float: ``[[1e19], [-1e19]]`` gives m2 = 2e38, while
    ``[[1.5e19], [-1.5e19]]`` (m2 = 4.5e38) raises (Raises, below). No examples (N = 0, or a mask
    with no True) give count 0, mean 0 and m2 0, :func:`merge`'s identity. Images
    [N, H, W, C]: ``feature_axes=-1`` gives per-channel statistics (VGG),
    ``feature_axes=(1, 2, 3)`` the per-pixel mean image (AlexNet). Low-precision inputs are
    reduced in float32.

    Args:
      x: data, floating dtype.
      feature_axes: the axis or axes holding the features (default: the last).
      full_covariance: return the full scatter matrix ``[D, D]`` (for PCA and whitening) instead
        of its diagonal.
      mask: optional boolean array with the shape of x's example axes (x's shape without the
        feature axes); False entries are left out (padding in the last batch, for instance).
      axis_name: inside ``shard_map`` / ``pmap``, the mapped axis to reduce over with
        ``lax.psum``; every device then gets the moments of the concatenation of all shards. All
        devices share one shift (the first valid example of the lowest-index device that has
        one, gathered with one small psum) and merge their moments about it, so the result
        equals the single-device one up to the order of the sums, at any offset.

    Returns:
      ``Moments(count, mean, m2)``.

    Raises:
      TypeError: x is not a floating array (a dict, int data); full_covariance is not a bool;
        mask is not boolean (0.5 is no truth value).
      ValueError: bad ``feature_axes`` or ``mask`` shape; x has no example axis (a 1-D x with
        ``feature_axes=-1``: pass ``x[:, None]`` for one feature, ``x[None]`` for one example);
        x has NaN or Inf, or sums that overflow (checked only outside ``jit``, where values are
        known: the message says how many. Under ``jit`` the statistics simply become NaN; check
        with ``jnp.isfinite(state.mean).all()`` or ``checkify``).
      NameError: ``axis_name`` names no bound mapped axis (outside ``shard_map``/``pmap``).

    References:
      Chan, Golub & LeVeque 1983, "Algorithms for computing the sample variance".

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxnorm.preprocessing import moments
      >>> m = moments(jnp.array([[1.0, 2.0], [3.0, 6.0]]))
      >>> m.count, m.mean, m.m2
      (Array(2., dtype=float32), Array([2., 4.], dtype=float32), Array([2., 8.], dtype=float32))
    """
    if not isinstance(full_covariance, bool | np.bool_):
        raise TypeError(
            f"moments expects full_covariance as a bool, but got {_describe(full_covariance)}"
        )
    x = _as_array(x, "x", "moments")
    _checks.check_floating(x)
    if x.ndim == 0:
        raise ValueError("moments expects x with at least one axis, but x is a scalar")
    axes = _feature_axes(feature_axes, x.ndim)
    if len(axes) == x.ndim:
        raise ValueError(_no_example_axis_message("moments", "x", x.shape, feature_axes))
    example_axes = tuple(a for a in range(x.ndim) if a not in axes)
    feature_shape = tuple(x.shape[a] for a in axes)
    example_shape = tuple(x.shape[a] for a in example_axes)
    w = None
    if mask is not None:
        w = _check_mask(mask, example_shape, x.shape, axes, "moments")
    if axis_name is None:
        m, n_bad = _local_moments_jit(x, w, axes, bool(full_covariance))
    else:
        _rows.check_axis_name_bound(axis_name, "moments")
        m, n_bad = _moments_across(x, w, axes, bool(full_covariance), axis_name)
    if not _checks.is_tracer(n_bad):
        _check_finite(n_bad, x, w, axes, "x")
    m2 = m.m2 if full_covariance else m.m2.reshape(feature_shape)
    return Moments(m.count, m.mean.reshape(feature_shape), m2)


def _check_same_kind(a: Moments, b: Moments) -> None:
    for name, m in (("a", a), ("b", b)):
        _check_state(m, Moments, "merge", name)
        _check_moments_values(m, "merge", name)
    if jnp.shape(a.mean) != jnp.shape(b.mean) or jnp.shape(a.m2) != jnp.shape(b.m2):
        raise ValueError(
            "merge needs moments of the same features: got mean shapes "
            f"{a.mean.shape} and {b.mean.shape}, m2 shapes {a.m2.shape} and {b.m2.shape} "
            "(compute both with the same feature_axes and full_covariance)"
        )


def merge(a: Moments, b: Moments) -> Moments:
    """The moments of the union of two sets of examples, from the moments of each.

    With n = n_a + n_b and delta = mean_b - mean_a (Chan, Golub & LeVeque 1983):

        mean = mean_a + delta * n_b / n
        m2 = m2_a + m2_b + delta^2 * n_a * n_b / n       (delta delta^T for a full m2)

    Exact in exact arithmetic and stable in floating point, so moments merged over shards or a
    stream equal the moments of the concatenation up to rounding. Empty moments (count 0) are
    the identity, exactly.

    The inputs are rounded, though: each mean carries a rounding error of about
    ``|mean| * eps`` (eps = 6e-8 in float32), which delta carries into m2, up to about
    ``n_a * n_b / n * (|mean| * eps)^2`` a merge. Negligible for data near 0; for data far from
    0 (|mean| / std of 1e5 to 1e6 in float32) it is a relative error of 1e-4 to 1e-2 in m2 after
    many merges. :func:`fit_stream` and ``moments(..., axis_name=...)`` avoid it: they merge
    moments taken about one shared shift (a data row), whose means are small.

    Args:
      a: moments of the first set.
      b: moments of the second set, with the same feature shape and kind (diagonal or full).

    Returns:
      ``Moments`` of the union.

    Raises:
      TypeError: a or b is not a :class:`Moments` (None, a plain tuple, a transform's state), or
        has fields that are not arrays of a real dtype.
      ValueError: the two have different feature shapes or kinds (diagonal or full); a count
        that is not a scalar; with concrete values, a count that is negative or not finite, or
        an m2 with negative or NaN (diagonal) entries. Traced values (under ``jit``) cannot be
        read when the function is traced, so they are not checked there.

    References:
      Chan, Golub & LeVeque 1983, "Algorithms for computing the sample variance".

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxnorm.preprocessing import merge, moments
      >>> x = jnp.array([[1.0], [2.0], [3.0], [10.0]])
      >>> m = merge(moments(x[:1]), moments(x[1:]))
      >>> m.mean, m.m2
      (Array([4.], dtype=float32), Array([50.], dtype=float32))
    """
    _check_same_kind(a, b)
    return _merge_jit(a, b)


@jax.jit
def _merge_jit(a: Moments, b: Moments) -> Moments:
    """:func:`merge`'s arithmetic, one compiled program (an eager merge dispatched ~15 ops)."""
    dt = jnp.promote_types(jnp.result_type(a.mean), jnp.result_type(b.mean))
    na, nb = jnp.asarray(a.count, dt), jnp.asarray(b.count, dt)
    ma, mb = jnp.asarray(a.mean, dt), jnp.asarray(b.mean, dt)
    n = na + nb
    delta = (mb - ma).reshape(-1)
    mean = (ma.reshape(-1) + delta * _safe_div(nb, n)).reshape(a.mean.shape)
    weight = _safe_div(na * nb, n)
    full = _is_full(a)
    outer = delta[:, None] * delta[None, :] if full else delta * delta
    m2a, m2b = jnp.asarray(a.m2, dt), jnp.asarray(b.m2, dt)
    m2 = m2a + m2b + weight * outer.reshape(a.m2.shape)
    # An empty side returns the other as it is: ma + (mb - ma) need not round to mb, and
    # whatever mean the empty side carries (0 * inf is NaN) stays out.
    mean = jnp.where(na > 0, jnp.where(nb > 0, mean, ma), mb)
    m2 = jnp.where(na > 0, jnp.where(nb > 0, m2, m2a), m2b)
    return Moments(n, mean, m2)


def _is_full(m: Moments) -> bool:
    d = m.mean.size
    # With one feature of shape (1, 1) the full [1, 1] matrix and the diagonal are the same
    # numbers, so either reading is right; read it as full, which PCA and ZCA need.
    return m.m2.ndim == 2 and m.m2.shape == (d, d) and (m.m2.shape != m.mean.shape or d == 1)


# --------------------------------------------------------------------------------------------------
# Transforms and their states


class Transform(NamedTuple):
    """A preprocessing transform: pure functions over an explicit state.

    Attributes:
      fit: ``fit(x, *, feature_axes=-1, mask=None, axis_name=None) -> state``. The feature axes
        must be the trailing axes of x (move others with ``jnp.moveaxis``).
      apply: ``apply(state, x) -> z``, x of shape ``[..., *feature_shape]``; jittable, vmappable.
      inverse: ``inverse(state, z) -> x``; ``inverse(state, apply(state, x)) == x`` up to rounding
        when no component is dropped.
      fit_moments: ``fit_moments(m: Moments) -> state``, for streamed or sharded statistics.

    ``apply`` and ``inverse`` take only their own transform's state: another transform's state,
    :class:`Moments`, None or a plain tuple is a ``TypeError``, and fields whose shapes do not fit
    together a ``ValueError``, raised when the function is traced (so under ``jit`` too).
    ``fit`` and ``fit_moments`` refuse data of no examples (a ``ValueError``): ``x[:0]`` at trace
    time; an all-False mask, or moments with a negative count or m2, only when the values are
    concrete (under ``jit`` they are unknown when the function is traced, and not checked).

    ``t.full_covariance`` (a read-only property, not a field) says whether ``fit_moments`` needs
    the full scatter matrix (``moments(..., full_covariance=True)``); :func:`fit_stream` and
    :func:`chain` read it. It is the ``full_covariance`` attribute of the ``fit_moments``
    function, False when it has none: to build your own Transform whose ``fit_moments`` needs
    the full matrix, set ``fit_moments.full_covariance = True`` on the function first.

    Example:
      >>> from jaxnorm import preprocessing
      >>> fit, apply, inverse, fit_moments = preprocessing.pca()
      >>> preprocessing.pca().full_covariance, preprocessing.normalize().full_covariance
      (True, False)
    """

    fit: Callable[..., Any]
    apply: Callable[[Any, ArrayLike], jax.Array]
    inverse: Callable[[Any, ArrayLike], jax.Array]
    fit_moments: Callable[[Moments], Any]

    @property
    def full_covariance(self) -> bool:
        """Whether ``fit_moments`` needs the full ``[D, D]`` scatter matrix."""
        return bool(getattr(self.fit_moments, "full_covariance", False))


def _transform(fit, apply, inverse, fit_moments, full_covariance: bool) -> Transform:
    # The flag rides on fit_moments, where Transform.full_covariance reads it.
    fit_moments.full_covariance = full_covariance
    return Transform(fit, apply, inverse, fit_moments)


class ZeroCenterState(NamedTuple):
    """State of :func:`zero_center`: the per-feature ``mean`` of the training data."""

    mean: jax.Array


class NormalizeState(NamedTuple):
    """State of :func:`normalize`, as StandardScaler's ``mean_``, ``var_`` and ``scale_``.

    ``var`` is the population variance (denominator N); ``scale`` is ``sqrt(var + eps)``, or 1 for
    a feature found constant.
    """

    mean: jax.Array
    var: jax.Array
    scale: jax.Array


class PCAState(NamedTuple):
    """State of :func:`pca` and :func:`pca_whiten`.

    Attributes:
      mean: per-feature mean, shape = the feature shape.
      components: ``[k, D]`` principal axes, one a row, by decreasing variance (scikit-learn's
        ``components_``; the lecture's ``U[:, :k].T``).
      scale: ``[k]`` factor applied after the rotation: 1 for ``pca``, ``1 / sqrt(lambda + eps)``
        for ``pca_whiten`` (1 for directions beyond the rank).
      explained_variance: ``[k]`` eigenvalues of the sample covariance (denominator N - 1).
      explained_variance_ratio: ``[k]`` each eigenvalue over the sum of all D eigenvalues.
    """

    mean: jax.Array
    components: jax.Array
    scale: jax.Array
    explained_variance: jax.Array
    explained_variance_ratio: jax.Array


class ZCAState(NamedTuple):
    """State of :func:`zca_whiten`.

    Attributes:
      mean: per-feature mean, shape = the feature shape.
      whitening: ``[D, D]`` symmetric matrix W = U diag(1 / sqrt(lambda + eps)) U^T.
      coloring: ``[D, D]`` its inverse U diag(sqrt(lambda + eps)) U^T (used by ``inverse``).
      explained_variance: ``[D]`` eigenvalues of the sample covariance, decreasing.
      explained_variance_ratio: ``[D]`` each eigenvalue over their sum.
    """

    mean: jax.Array
    whitening: jax.Array
    coloring: jax.Array
    explained_variance: jax.Array
    explained_variance_ratio: jax.Array


# Which function makes each state: apply, inverse, merge and load name it when a state is refused.
_MADE_BY = {
    Moments: ("moments",),
    ZeroCenterState: ("zero_center",),
    NormalizeState: ("normalize",),
    PCAState: ("pca", "pca_whiten"),  # one state, one apply: they differ in fit only
    ZCAState: ("zca_whiten",),
}


def _describe(v) -> str:
    """What came, for an error message: the type, and the shape and dtype of an array."""
    if v is None:
        return "None"
    if isinstance(v, jax.Array | np.ndarray | np.generic):
        return f"an array of shape {tuple(v.shape)} and dtype {v.dtype}"
    if isinstance(v, tuple) and hasattr(v, "_fields"):
        made_by = " or ".join(_MADE_BY.get(type(v), ()))
        return f"a {type(v).__name__}" + (f" (the state of {made_by})" if made_by else "")
    if isinstance(v, tuple | list):
        return f"a plain {type(v).__name__} of {len(v)} item(s)"
    text = repr(v)
    return f"{type(v).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _as_array(x, what: str, who: str) -> jax.Array:
    """``jnp.asarray(x)``; a dict, a string, None and the like are a TypeError naming ``what``."""
    if isinstance(x, jax.Array | np.ndarray | np.generic):
        return jnp.asarray(x)
    expected = f"{who} expects {what} as an array (NumPy or JAX, or a nested list of numbers)"
    if x is None or isinstance(x, Mapping | str | bytes):
        raise TypeError(f"{expected}, but got {_describe(x)}")
    try:
        return jnp.asarray(x)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{expected}, but got {_describe(x)}, which is not one ({e})") from None


def _check_mask(mask, example_shape: tuple, x_shape: tuple, axes: tuple, who: str) -> jax.Array:
    """The mask as a boolean array of x's example shape (0.5 is no truth value: refused)."""
    mask = _as_array(mask, "mask", who)
    if mask.dtype != jnp.bool_:
        raise TypeError(
            f"{who} expects mask with dtype bool (True for the examples that count), but it has "
            f"dtype {mask.dtype}; pass a comparison such as `weights > 0`, or mask.astype(bool) "
            "if every nonzero value means True"
        )
    if mask.shape != example_shape:
        raise ValueError(
            f"mask must have x's example shape {example_shape} (x.shape {x_shape} without "
            f"feature_axes {axes}), but it has shape {mask.shape}"
        )
    return mask


def _field(state, f: str, what: str, who: str, *, floating: bool = True):
    """Field f of a state NamedTuple: an array (or a Python number), of a real dtype."""
    v = getattr(state, f)
    # A hand-built Moments may carry its count as a Python number; every other field is an array.
    ok_number = f == "count" and isinstance(v, int | float) and not isinstance(v, bool)
    if not (ok_number or isinstance(v, jax.Array | np.ndarray | np.generic)):
        raise TypeError(f"{who} expects {what}.{f} to be an array, but got {_describe(v)}")
    dtype = jnp.result_type(v)
    real = jnp.issubdtype(dtype, jnp.floating) or (
        not floating and jnp.issubdtype(dtype, jnp.integer)
    )
    if not real:
        want = "a floating" if floating else "an integer or floating"
        raise TypeError(f"{who} expects {what}.{f} with {want} dtype, but it has dtype {dtype}")
    return v


def _check_state(state, cls, who: str, what: str = "state"):
    """Raise unless ``state`` is a ``cls`` whose fields are arrays of matching shapes.

    The type is the transform's identity: a NormalizeState given to zero_center's apply (which
    would only centre), a Moments, None or a plain tuple is a TypeError naming what came. All
    checks read static shapes and dtypes, so they run at trace time under ``jit``.
    """
    if not isinstance(state, cls):
        if cls is Moments:
            origin = "moments(x) or merge"
            fix = "pass the Moments that moments() returned (or build Moments(count, mean, m2))"
        else:
            origin = " or ".join(f"{n}().fit" for n in _MADE_BY[cls])
            fix = "apply a state with the transform that fitted it"
        raise TypeError(
            f"{who} expects {what} to be a {cls.__name__} (from {origin}), but got "
            f"{_describe(state)}; {fix}"
        )
    shapes = {f: jnp.shape(_field(state, f, what, who, floating=f != "count")) for f in cls._fields}
    mean = shapes["mean"]
    d = math.prod(mean)

    def require(f, want, meaning):
        if shapes[f] != want:
            raise ValueError(
                f"{who}: {what}.{f} must have shape {want} ({meaning}), but it has shape "
                f"{shapes[f]}; the state's fields do not fit together"
            )

    if cls is Moments:
        require("count", (), "a scalar: the number of examples")
        if shapes["m2"] != mean:
            require("m2", (d, d), f"mean's shape {mean}, or [D, D] with D = {d} features")
    elif cls is NormalizeState:
        require("var", mean, "mean's shape")
        require("scale", mean, "mean's shape")
    elif cls is PCAState:
        comp = shapes["components"]
        if len(comp) != 2 or comp[1] != d:
            raise ValueError(
                f"{who}: {what}.components must have shape [k, {d}] (one component a row, over "
                f"the {d} features of mean's shape {mean}), but it has shape {comp}"
            )
        for f in ("scale", "explained_variance", "explained_variance_ratio"):
            require(f, (comp[0],), "one entry per component")
    elif cls is ZCAState:
        for f in ("whitening", "coloring"):
            require(f, (d, d), f"[D, D] with D = {d} features")
        for f in ("explained_variance", "explained_variance_ratio"):
            require(f, (d,), f"one entry per feature, D = {d}")
    return state


@functools.partial(jax.jit, static_argnums=1)
def _m2_invalid(m2, full: bool):
    # The diagonal of m2 holds sums of squares: negative or NaN entries are no moments. `~(v >= 0)`
    # counts NaN too.
    diag = jnp.diagonal(m2) if full else m2
    return jnp.sum(~(diag >= 0))


def _check_moments_values(m: Moments, who: str, what: str, *, nonempty: bool = False) -> None:
    """Concrete Moments only: count finite and >= 0 (> 0 with ``nonempty``), m2's diagonal >= 0.

    Traced values cannot be read at trace time; under ``jit`` they are not checked.
    """
    if _checks.is_tracer(m.count) or _checks.is_tracer(m.m2):
        return
    count = float(np.asarray(m.count))
    if not (math.isfinite(count) and count >= 0):
        raise ValueError(
            f"{who}: {what}.count must be a finite number >= 0 (the number of examples), but it "
            f"is {count}"
        )
    if nonempty and count == 0:
        raise ValueError(
            f"{who} needs at least one example, but {what}.count is 0 (x had no rows, or its "
            "mask no True entry); statistics of no data fit nothing"
        )
    n_bad = int(_m2_invalid(jnp.asarray(m.m2), _is_full(m)))
    if n_bad:
        kind = "diagonal entries" if _is_full(m) else "entries"
        raise ValueError(
            f"{who}: {what}.m2 has {n_bad} negative or NaN {kind}, but m2 holds sums of squared "
            "deviations (>= 0); these are not moments of any data"
        )


def _trailing_feature_axes(x, feature_axes, name: str, what: str = "x") -> tuple[int, ...]:
    axes = _feature_axes(feature_axes, x.ndim)
    if len(axes) == x.ndim:
        raise ValueError(_no_example_axis_message(name, what, x.shape, feature_axes))
    want = tuple(range(x.ndim - len(axes), x.ndim))
    if axes != want:
        raise ValueError(
            f"{name} needs the feature axes last, but feature_axes={feature_axes!r} for x of "
            f"shape {x.shape} gives axes {axes}; move them with jnp.moveaxis first (e.g. NCHW -> "
            "NHWC), or compute moments(x, feature_axes=...) for statistics alone"
        )
    return axes


def _make_fit(fit_moments, full_covariance: bool, name: str):
    def fit(x, *, feature_axes=-1, mask=None, axis_name=None):
        x = _as_array(x, "x", f"{name}.fit")
        _checks.check_floating(x)
        axes = _trailing_feature_axes(x, feature_axes, f"{name}.fit")
        _check_has_examples(x, axes, axis_name, f"{name}.fit")
        m = moments(x, axes, full_covariance=full_covariance, mask=mask, axis_name=axis_name)
        return fit_moments(m)

    fit.__doc__ = (
        f"Fit {name} on x (the training split): moments(x, feature_axes, ...) then fit_moments."
    )
    return fit


def _check_has_examples(x, axes, axis_name, who: str) -> None:
    # A transform fitted on no data is no transform (scikit-learn refuses 0 samples too). The
    # shape is static, so this holds under jit; a shard of an axis_name fit may be empty.
    n = math.prod(x.shape[a] for a in range(x.ndim) if a not in axes)
    if n == 0 and axis_name is None:
        raise ValueError(
            f"{who} needs at least one example, but x of shape {x.shape} has none (feature axes "
            f"{axes}); statistics of no data fit nothing"
        )


def _check_moments(m: Moments, full: bool, name: str) -> None:
    who = f"{name}.fit_moments"
    _check_state(m, Moments, who, "m")
    _check_moments_values(m, who, "m", nonempty=True)
    if full and not _is_full(m):
        raise ValueError(
            f"{name} needs the full scatter matrix, but the moments have m2 of shape "
            f"{jnp.shape(m.m2)} for mean of shape {jnp.shape(m.mean)}; compute them with "
            "moments(..., full_covariance=True)"
        )


def _diag_m2(m: Moments):
    return jnp.diagonal(m.m2).reshape(m.mean.shape) if _is_full(m) else m.m2


def _check_input(x, feature_shape, name: str, what: str = "x"):
    x = _as_array(x, what, name)
    _checks.check_floating(x, what)
    k = len(feature_shape)
    if x.ndim < k or tuple(x.shape[x.ndim - k :]) != tuple(feature_shape):
        raise ValueError(
            f"{name} expects {what} of shape [..., {', '.join(map(str, feature_shape))}] "
            f"(the feature shape the state was fitted on), but {what} has shape {x.shape}"
        )
    return x


def _batch_shape(x, feature_shape):
    return x.shape[: x.ndim - len(feature_shape)]


def _bcast(v, x, dt):
    # An explicit reshape: tests (and careful users) run with rank promotion set to raise.
    return v.astype(dt).reshape((1,) * (x.ndim - v.ndim) + v.shape)


def _flat(x, feature_shape):
    return x.reshape((*_batch_shape(x, feature_shape), math.prod(feature_shape)))


def _matmul(a, b):
    return jnp.matmul(a, b, precision=_HIGHEST)


def zero_center() -> Transform:
    """Subtract the per-feature mean of the training data: x - mean.

    Returns:
      A :class:`Transform` with state :class:`ZeroCenterState`.

    References:
      The lecture's ``X -= np.mean(X, axis=0)``; Krizhevsky et al. 2012 (mean image,
      ``feature_axes=(1, 2, 3)``); Simonyan & Zisserman 2015 (per-channel mean,
      ``feature_axes=-1``).

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxnorm import preprocessing
      >>> t = preprocessing.zero_center()
      >>> state = t.fit(jnp.array([[1.0, 2.0], [3.0, 4.0]]))
      >>> t.apply(state, jnp.array([[2.0, 2.0]]))
      Array([[ 0., -1.]], dtype=float32)
    """

    def fit_moments(m):
        _check_moments(m, False, "zero_center")
        return ZeroCenterState(m.mean)

    def apply(state, x):
        _check_state(state, ZeroCenterState, "zero_center.apply")
        x = _check_input(x, state.mean.shape, "zero_center.apply")
        dt = _checks.compute_dtype(x.dtype)
        return (x.astype(dt) - _bcast(state.mean, x, dt)).astype(x.dtype)

    def inverse(state, z):
        _check_state(state, ZeroCenterState, "zero_center.inverse")
        z = _check_input(z, state.mean.shape, "zero_center.inverse", "z")
        dt = _checks.compute_dtype(z.dtype)
        return (z.astype(dt) + _bcast(state.mean, z, dt)).astype(z.dtype)

    return _transform(
        _make_fit(fit_moments, False, "zero_center"), apply, inverse, fit_moments, False
    )


def _constant_features(var, mean, count):
    """scikit-learn's ``_is_constant_feature``: var <= n eps var + (n eps mean)^2, eps of float64.

    The worst-case error of the two-pass variance (Chan, Golub & LeVeque 1983), with float64's
    eps whatever the dtype, as scikit-learn uses for float32 input too. That bound is tiny, and
    safe here because the statistics are exact for a constant feature: :func:`moments` centres
    about a data row, so a constant column has m2 == 0 exactly (var 0 <= bound), while a feature
    with any spread in its values (e.g. std 1 at 1e4) is kept.
    """
    dt = _checks.compute_dtype(jnp.result_type(var))
    var, mean, n = (jnp.asarray(v).astype(dt) for v in (var, mean, count))
    eps = jnp.asarray(np.finfo(np.float64).eps, dt)
    return var <= n * eps * var + (n * mean * eps) ** 2


def normalize(eps: float = 0.0) -> Transform:
    """Zero-centre and divide by the per-feature standard deviation: (x - mean) / scale.

    scale = sqrt(var + eps) with var the population variance (denominator N, as StandardScaler
    and ``np.std``). A constant feature gets scale 1, so it is centred but not blown up. The test
    is scikit-learn's ``_is_constant_feature``, the rounding-error bound of the two-pass variance:

        var <= N eps var + (N eps mean)^2,   eps = 2.2e-16 (float64's, for any input dtype)

    Tiny, and safe because a constant feature's statistics are exact (var == 0, see
    :func:`moments`), so legitimately small variances are kept: std 1e-6 around 0, or std 1
    around 1e4.

    Args:
      eps: added to the variance before the square root (default 0, as StandardScaler): a finite
        real >= 0 (a NumPy or concrete JAX scalar is converted to float).

    Returns:
      A :class:`Transform` with state :class:`NormalizeState`.

    Raises:
      TypeError: eps is not a real number (a string, None, a traced array).
      ValueError: eps is negative, NaN or infinite.

    References:
      The lecture's ``X /= np.std(X, axis=0)``; scikit-learn's StandardScaler.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxnorm import preprocessing
      >>> t = preprocessing.normalize()
      >>> state = t.fit(jnp.array([[1.0, 5.0], [3.0, 5.0]]))
      >>> state.scale
      Array([1., 1.], dtype=float32)
      >>> t.apply(state, jnp.array([[3.0, 5.0]]))
      Array([[1., 0.]], dtype=float32)
    """
    eps = _check_eps(eps, "normalize")

    def fit_moments(m):
        _check_moments(m, False, "normalize")
        var = _safe_div(_diag_m2(m), m.count)
        constant = _constant_features(var, m.mean, m.count)
        scale = jnp.where(constant, jnp.ones_like(var), jnp.sqrt(var + jnp.asarray(eps, var.dtype)))
        return NormalizeState(m.mean, var, scale)

    def apply(state, x):
        _check_state(state, NormalizeState, "normalize.apply")
        x = _check_input(x, state.mean.shape, "normalize.apply")
        dt = _checks.compute_dtype(x.dtype)
        y = (x.astype(dt) - _bcast(state.mean, x, dt)) / _bcast(state.scale, x, dt)
        return y.astype(x.dtype)

    def inverse(state, z):
        _check_state(state, NormalizeState, "normalize.inverse")
        z = _check_input(z, state.mean.shape, "normalize.inverse", "z")
        dt = _checks.compute_dtype(z.dtype)
        y = z.astype(dt) * _bcast(state.scale, z, dt) + _bcast(state.mean, z, dt)
        return y.astype(z.dtype)

    return _transform(
        _make_fit(fit_moments, False, "normalize"), apply, inverse, fit_moments, False
    )


def _eigh_desc(m2, count):
    """Eigenvalues (decreasing, >= 0) and eigenvectors (columns, svd_flip signs) of m2/(n-1)."""
    cov = m2 / jnp.maximum(count - 1, 1).astype(m2.dtype)
    lam, vec = jnp.linalg.eigh(cov, symmetrize_input=True)
    lam, vec = jnp.maximum(lam[::-1], 0), vec[:, ::-1]
    # scikit-learn 1.9's svd_flip(u_based_decision=False): the largest |entry| of each principal
    # axis is positive, so the signs do not depend on the LAPACK build.
    idx = jnp.argmax(jnp.abs(vec), axis=0)
    signs = jnp.sign(vec[idx, jnp.arange(vec.shape[1])])
    vec = vec * jnp.where(signs == 0, 1, signs).astype(vec.dtype)[None, :]
    total = jnp.sum(lam)
    ratio = _safe_div(lam, total)
    return lam, vec, ratio


_eigh_desc_jit = jax.jit(_eigh_desc)


def _in_rank(lam, count):
    """Directions with variance above the rounding level of the covariance, and below N - 1."""
    d = lam.shape[0]
    # eigh's backward error is a few eps * lambda_max, growing like sqrt(D) in practice; below that
    # an eigenvalue is rounding noise, and whitening it would amplify noise, not signal.
    tol = lam[0] * math.sqrt(d) * jnp.finfo(lam.dtype).eps
    return (lam > tol) & (jnp.arange(d, dtype=lam.dtype) < count - 1)


def _eps_abs(lam, eps, eps_mode):
    if eps_mode == "absolute":
        return jnp.asarray(eps, lam.dtype)
    return jnp.asarray(eps, lam.dtype) * jnp.mean(lam)


def _check_eps(eps, name: str) -> float:
    """eps as a Python float: a finite real >= 0 (NumPy and concrete JAX scalars converted).

    A Python float also keeps the fit's compiled kernels hashable (eps is static there).
    """
    if isinstance(eps, jax.Array | np.ndarray | np.generic):
        if _checks.is_tracer(eps):
            raise TypeError(
                f"{name} needs eps as a concrete number, but got a traced value {eps!r}; build "
                "the transform outside jit (its eps is fixed when it is built)"
            )
        if np.ndim(eps) == 0 and np.dtype(eps.dtype).kind in "iuf":
            eps = np.asarray(eps).item()
    if isinstance(eps, bool) or not isinstance(eps, int | float):
        raise TypeError(
            f"{name} needs eps as a real number >= 0 (a Python float, or a NumPy or JAX scalar), "
            f"but got {eps!r} of type {type(eps).__name__}"
        )
    eps = float(eps)
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"{name} needs a finite eps >= 0, but got eps={eps!r}")
    return eps


def _check_eps_mode(eps_mode, name: str) -> None:
    if eps_mode not in ("absolute", "relative"):
        raise ValueError(f'{name} needs eps_mode "absolute" or "relative", but got {eps_mode!r}')


def _check_num_components(num_components, name):
    """None, a Python int >= 1 or a Python float in (0, 1) (NumPy and concrete JAX scalars too)."""
    if num_components is None:
        return None
    if isinstance(num_components, jax.Array | np.ndarray) and not _checks.is_tracer(num_components):
        if num_components.ndim == 0 and num_components.dtype.kind in "iuf":
            num_components = num_components.item()
    if isinstance(num_components, bool) or not isinstance(
        num_components, int | float | np.integer | np.floating
    ):
        raise TypeError(
            f"{name}: num_components must be None, an int (number of components) or a float in "
            f"(0, 1) (fraction of variance to keep), but got {_describe(num_components)}"
        )
    if isinstance(num_components, int | np.integer):
        if num_components < 1:
            raise ValueError(f"{name}: num_components must be >= 1, but got {num_components}")
        return int(num_components)
    if not 0 < num_components < 1:
        raise ValueError(
            f"{name}: a float num_components is a fraction of variance and must be in (0, 1), "
            f"but got {num_components}"
        )
    return float(num_components)


def _resolve_k(num_components, ratio, d, name):
    if num_components is None:
        return d
    if isinstance(num_components, int | np.integer):
        if num_components > d:
            raise ValueError(
                f"{name}: num_components must be between 1 and the number of features {d}, "
                f"but got {num_components}"
            )
        return int(num_components)
    if _checks.is_tracer(ratio):
        raise ValueError(
            f"{name}: num_components={num_components} (a variance fraction) picks the number of "
            "components from the data, which jit cannot do (shapes must be static); fit outside "
            "jit, or pass an int"
        )
    # As scikit-learn: the fewest components whose cumulative ratio exceeds the fraction.
    cum = np.cumsum(np.asarray(ratio, np.float64))
    return int(min(np.searchsorted(cum, num_components, side="right") + 1, d))


def _zero_variance_features(m2) -> list[int]:
    """Indices of the features with zero variance (an exact 0 on the diagonal of m2)."""
    if m2 is None or _checks.is_tracer(m2):
        return []
    a = np.asarray(m2)
    diag = np.diagonal(a) if a.ndim == 2 else a.reshape(-1)
    return [int(i) for i in np.flatnonzero(diag == 0)]


def _warn_rank(ok, k, count, d, name, m2=None):
    if _checks.is_tracer(ok) or _checks.is_tracer(count):
        return
    rank = int(np.sum(np.asarray(ok)[:k]))
    if rank < k:
        full = int(np.sum(np.asarray(ok)))
        constant = _zero_variance_features(m2)
        # Name the cause: constant features (image corners that are always 0) lower the rank
        # however many samples there are; more samples only help when count <= d.
        if constant:
            shown = ", ".join(map(str, constant[:10])) + (", ..." if len(constant) > 10 else "")
            cause = (
                f"{len(constant)} feature(s) are constant (zero variance: {shown}), and more "
                "samples will not change that. Drop the constant features before fitting, or "
                "keep fewer components"
            )
            if int(count) <= d:
                cause += "; there are also no more samples than features"
        else:
            cause = "Fit on more samples than features, or keep fewer components"
        warnings.warn(
            f"{name}: the covariance of {int(count)} samples with {d} features has numerical "
            f"rank {full} < {k} kept components; the {k - rank} "
            "direction(s) beyond the rank are left unscaled (not multiplied by 1/sqrt(eps)). "
            + cause,
            RuntimeWarning,
            stacklevel=4,
        )


def _pca_state(mean, count, lam, vec, ratio, k, whiten, eps, eps_mode):
    ok = _in_rank(lam, count)
    if whiten:
        s = jnp.where(ok, lax.rsqrt(lam + _eps_abs(lam, eps, eps_mode)), 1)[:k]
    else:
        s = jnp.ones((k,), lam.dtype)
    return PCAState(mean, vec[:, :k].T, s.astype(lam.dtype), lam[:k], ratio[:k]), ok


# One compiled program per (k, options) instead of a dozen eager dispatches per fit.
_pca_state_jit = jax.jit(_pca_state, static_argnums=(5, 6, 7, 8))


def _pca_transform(num_components, eps, eps_mode, whiten: bool, name: str) -> Transform:
    num_components = _check_num_components(num_components, name)

    def fit_moments(m):
        _check_moments(m, True, name)
        d = m.mean.size
        lam, vec, ratio = _eigh_desc_jit(m.m2, m.count)
        k = _resolve_k(num_components, ratio, d, name)
        state, ok = _pca_state_jit(m.mean, m.count, lam, vec, ratio, k, whiten, eps, eps_mode)
        if whiten:
            _warn_rank(ok, k, m.count, d, name, m.m2)
        return state

    def apply(state, x):
        _check_state(state, PCAState, f"{name}.apply")
        fs = state.mean.shape
        x = _check_input(x, fs, f"{name}.apply")
        dt = _checks.compute_dtype(x.dtype)
        xc = _flat(x.astype(dt) - _bcast(state.mean, x, dt), fs)
        # The scale folded into the [D, k] matrix: one pass over x, one matmul.
        w = state.components.astype(dt).T * state.scale.astype(dt)[None, :]
        return _matmul(xc, w).astype(x.dtype)

    def inverse(state, z):
        _check_state(state, PCAState, f"{name}.inverse")
        k = state.components.shape[0]
        z = _check_input(z, (k,), f"{name}.inverse", "z")
        dt = _checks.compute_dtype(z.dtype)
        w = state.components.astype(dt) / state.scale.astype(dt)[:, None]
        x = _matmul(z.astype(dt), w).reshape(z.shape[:-1] + state.mean.shape)
        return (x + _bcast(state.mean, x, dt)).astype(z.dtype)

    return _transform(_make_fit(fit_moments, True, name), apply, inverse, fit_moments, True)


def pca(num_components: int | float | None = None) -> Transform:
    """Rotate into the principal axes of the training data, keeping the first k: (x - mean) U_k.

    U holds the eigenvectors of the sample covariance m2 / (N - 1), by decreasing eigenvalue, with
    scikit-learn's signs. Features are flattened: x [..., *feature_shape] -> z [..., k]; ``inverse``
    maps back and unflattens (exact when k = D).

    Args:
      num_components: None for all D components; an int k in [1, D]; or a float in (0, 1): the
        fewest components whose explained variance ratio sums to more than it (as scikit-learn;
        needs an eager fit, not under ``jit``).

    Returns:
      A :class:`Transform` with state :class:`PCAState` (``scale`` all ones).

    Raises:
      TypeError / ValueError: num_components of the wrong type or out of range (at construction,
        or at fit time for k > D).

    References:
      Pearson 1901; the lecture's ``U, S, V = np.linalg.svd(cov); Xrot = X @ U[:, :k]``.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxnorm import preprocessing
      >>> t = preprocessing.pca(1)
      >>> state = t.fit(jnp.array([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]))
      >>> state.explained_variance
      Array([2.], dtype=float32)
    """
    return _pca_transform(num_components, 0.0, "absolute", False, "pca")


def pca_whiten(
    num_components: int | float | None = None,
    eps: float = 1e-5,
    *,
    eps_mode: str = "absolute",
) -> Transform:
    """PCA, then divide each component by its standard deviation: (x - mean) U_k / sqrt(lambda + e).

    e = eps (``eps_mode="absolute"``, the lecture's 1e-5) or eps * mean(lambda)
    (``"relative"``, unit-free). The whitened training data has sample covariance close to the
    identity (exactly lambda / (lambda + e)). Directions beyond the covariance's rank (fewer
    samples than features, or collinear features) keep scale 1 and an eager fit warns.

    Args:
      num_components: as in :func:`pca`.
      eps: regulariser added to each eigenvalue: a finite real >= 0 (a NumPy or concrete JAX
        scalar is converted to float).
      eps_mode: ``"absolute"`` or ``"relative"``.

    Returns:
      A :class:`Transform` with state :class:`PCAState`.

    Raises:
      TypeError / ValueError: bad num_components, eps (not a finite real >= 0) or eps_mode.

    References:
      The lecture's ``Xwhite = Xrot / np.sqrt(S + 1e-5)``; scikit-learn's ``PCA(whiten=True)``.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxnorm import preprocessing
      >>> t = preprocessing.pca_whiten(eps=0.0)
      >>> x = jnp.array([[0.0, 0.0], [2.0, 0.0], [0.0, 1.0], [2.0, 1.0]])
      >>> z = t.apply(t.fit(x), x)
      >>> jnp.allclose(z.T @ z / 3, jnp.eye(2), atol=1e-5)
      Array(True, dtype=bool)
    """
    eps = _check_eps(eps, "pca_whiten")
    _check_eps_mode(eps_mode, "pca_whiten")
    return _pca_transform(num_components, eps, eps_mode, True, "pca_whiten")


def _zca_state(mean, m2, count, eps, eps_mode):
    lam, vec, ratio = _eigh_desc(m2, count)
    ok = _in_rank(lam, count)
    s = jnp.where(ok, lax.rsqrt(lam + _eps_abs(lam, eps, eps_mode)), 1).astype(lam.dtype)
    whitening = _matmul(vec * s[None, :], vec.T)
    coloring = _matmul(vec / s[None, :], vec.T)
    # Symmetric by construction; averaging with the transpose removes the rounding asymmetry.
    whitening = 0.5 * (whitening + whitening.T)
    coloring = 0.5 * (coloring + coloring.T)
    return ZCAState(mean, whitening, coloring, lam, ratio), ok


_zca_state_jit = jax.jit(_zca_state, static_argnums=(3, 4))


def zca_whiten(eps: float = 1e-5, *, eps_mode: str = "absolute") -> Transform:
    """Zero-phase whitening: (x - mean) W with W = U diag(1 / sqrt(lambda + e)) U^T symmetric.

    PCA whitening rotated back to the original axes, so the output stays closest to the input
    (Bell & Sejnowski 1997) and keeps the feature shape (images stay images). e as in
    :func:`pca_whiten`; directions beyond the rank are left unscaled.

    Args:
      eps: regulariser added to each eigenvalue: a finite real >= 0 (a NumPy or concrete JAX
        scalar is converted to float).
      eps_mode: ``"absolute"`` or ``"relative"``.

    Returns:
      A :class:`Transform` with state :class:`ZCAState`.

    Raises:
      TypeError: eps is not a real number.
      ValueError: eps is negative, NaN or infinite; bad eps_mode.

    References:
      Bell & Sejnowski 1997; Krizhevsky 2009, "Learning multiple layers of features from tiny
      images", appendix A.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxnorm import preprocessing
      >>> t = preprocessing.zca_whiten(eps=0.0)
      >>> state = t.fit(jnp.array([[0.0, 0.0], [2.0, 0.0], [0.0, 1.0], [2.0, 1.0]]))
      >>> [round(float(v), 3) for v in jnp.diagonal(state.whitening)]
      [0.866, 1.732]
    """
    name = "zca_whiten"
    eps = _check_eps(eps, name)
    _check_eps_mode(eps_mode, name)

    def fit_moments(m):
        _check_moments(m, True, name)
        d = m.mean.size
        state, ok = _zca_state_jit(m.mean, m.m2, m.count, eps, eps_mode)
        _warn_rank(ok, d, m.count, d, name, m.m2)
        return state

    def _map(state, x, what, sign):
        _check_state(state, ZCAState, f"{name}.{what}")
        mat = state.whitening if sign > 0 else state.coloring
        fs = state.mean.shape
        x = _check_input(x, fs, f"{name}.{what}", "x" if sign > 0 else "z")
        dt = _checks.compute_dtype(x.dtype)
        if sign > 0:
            y = _matmul(_flat(x.astype(dt) - _bcast(state.mean, x, dt), fs), mat.astype(dt))
            return y.reshape(x.shape).astype(x.dtype)
        y = _matmul(_flat(x.astype(dt), fs), mat.astype(dt)).reshape(x.shape)
        return (y + _bcast(state.mean, y, dt)).astype(x.dtype)

    def apply(state, x):
        return _map(state, x, "apply", 1)

    def inverse(state, z):
        return _map(state, z, "inverse", -1)

    return _transform(_make_fit(fit_moments, True, name), apply, inverse, fit_moments, True)


def _push_moments(state, m: Moments) -> Moments:
    """The moments of apply(state, x) from those of x (every transform here is affine)."""
    d = m.mean.reshape(-1) - state.mean.reshape(-1).astype(m.mean.dtype)
    full = _is_full(m)
    if isinstance(state, ZeroCenterState):
        return Moments(m.count, d.reshape(m.mean.shape), m.m2)
    if isinstance(state, NormalizeState):
        s = state.scale.reshape(-1).astype(m.mean.dtype)
        if full:
            m2 = m.m2 / (s[:, None] * s[None, :])
        else:
            m2 = m.m2 / jnp.square(state.scale.astype(m.m2.dtype))
        return Moments(m.count, (d / s).reshape(m.mean.shape), m2)
    if isinstance(state, PCAState):
        w = state.components.T.astype(m.m2.dtype) * state.scale.astype(m.m2.dtype)[None, :]
        out_shape = (w.shape[1],)
    elif isinstance(state, ZCAState):
        w = state.whitening.astype(m.m2.dtype)
        out_shape = state.mean.shape
    else:
        raise TypeError(f"chain cannot carry moments through a state of type {type(state)}")
    return Moments(m.count, _matmul(d, w).reshape(out_shape), _matmul(_matmul(w.T, m.m2), w))


def chain(*transforms: Transform) -> Transform:
    """Compose transforms: apply runs them in order, inverse in reverse order.

    ``fit`` fits the first on x, the second on the first's output, and so on (the feature axes
    after a PCA are its k components). ``fit_moments`` carries the moments through each fitted
    transform exactly (they are all affine: mean' = (mean - mu) W, m2' = W^T m2 W); with diagonal
    moments that is exact only for the diagonal transforms (zero_center, normalize), and a
    transform that needs the full matrix says so.

    Args:
      *transforms: the transforms, first applied first.

    Returns:
      A :class:`Transform` whose state is the tuple of the states.

    Raises:
      TypeError: an argument is not a :class:`Transform`.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxnorm import preprocessing
      >>> t = preprocessing.chain(preprocessing.zero_center(), preprocessing.normalize())
      >>> x = jnp.array([[1.0, 10.0], [3.0, 30.0]])
      >>> t.apply(t.fit(x), x)
      Array([[-1., -1.],
             [ 1.,  1.]], dtype=float32)
    """
    for i, t in enumerate(transforms):
        if not isinstance(t, Transform):
            raise TypeError(f"chain expects Transforms, but argument {i} is {type(t).__name__}")
    full = any(t.full_covariance for t in transforms)

    def fit(x, *, feature_axes=-1, mask=None, axis_name=None):
        x = _as_array(x, "x", "chain.fit")
        _checks.check_floating(x)
        axes = _trailing_feature_axes(x, feature_axes, "chain.fit")
        n_examples = x.ndim - len(axes)
        states = []
        for t in transforms:
            fa = tuple(range(n_examples, x.ndim))
            states.append(t.fit(x, feature_axes=fa, mask=mask, axis_name=axis_name))
            x = t.apply(states[-1], x)
        return tuple(states)

    def fit_moments(m):
        states = []
        for i, t in enumerate(transforms):
            states.append(t.fit_moments(m))
            if i + 1 < len(transforms):
                m = _push_moments(states[-1], m)
        return tuple(states)

    def check(state, who):
        # chain's state is the plain tuple of its members' states (each checked by its member).
        if type(state) is not tuple or len(state) != len(transforms):
            raise TypeError(
                f"{who} expects state to be a tuple of {len(transforms)} states (from this "
                f"chain's fit), but got {_describe(state)}"
            )

    def apply(state, x):
        check(state, "chain.apply")
        for t, s in zip(transforms, state, strict=True):
            x = t.apply(s, x)
        return x

    def inverse(state, z):
        check(state, "chain.inverse")
        for t, s in zip(reversed(transforms), reversed(state), strict=True):
            z = t.inverse(s, z)
        return z

    return _transform(fit, apply, inverse, fit_moments, full)


# --------------------------------------------------------------------------------------------------
# Streaming


class _Counter:
    """A minimal stderr progress line for when tqdm is not installed."""

    def __init__(self, total):
        self.total, self.n, self.shown, self.last = total, 0, 0, 0.0

    def update(self, k=1):
        self.n += k
        now = time.monotonic()
        if now - self.last > 0.5 or self.n == self.total:
            self.last = now
            self._write()

    def _write(self):
        of = f"/{self.total}" if self.total else ""
        sys.stderr.write(f"\rfit_stream: {self.n}{of} batches")
        sys.stderr.flush()
        self.shown = self.n

    def close(self):
        if self.n:
            # Updates are throttled to two a second: a generator (no total) would otherwise end
            # on a stale count.
            if self.shown != self.n:
                self._write()
            sys.stderr.write("\n")
            sys.stderr.flush()


def _progress(total):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _Counter(total)
    return tqdm(total=total, desc="fit_stream", unit="batch")


def fit_stream(
    transform: Transform,
    batches: Iterable[ArrayLike],
    progress: bool = True,
    *,
    feature_axes: int | Sequence[int] = -1,
):
    """Fit ``transform`` on a stream of batches, merging their moments (constant memory).

    Each batch is reduced to :class:`Moments` (a ``[D, D]`` scatter matrix when the transform
    needs it) and merged into a running total with :func:`merge`'s formula, so memory does not
    grow with the number of batches and the data never needs to be on the device at once (ZCA on
    image-sized features from a data loader or a memory-mapped array). The result equals
    ``transform.fit`` on the concatenation up to rounding.

    The whole stream shares one shift k, the first example of the stream: every batch's moments
    are those of x - k and the running total is kept in these shifted coordinates, where the
    means are of the order of the spread, not of the offset; k is added to the mean once, at the
    end. Merging float32 means of data far from 0 (say at 1e6 with std 1) would otherwise lose
    their rounding error, ``|mean| * 6e-8``, to every merge; and a constant feature keeps
    ``m2 == 0`` exactly. Empty batches are skipped; a stream of only empty batches fits nothing
    and is an error, as ``transform.fit(x[:0])`` is.

    Args:
      transform: a :class:`Transform`.
      batches: an iterable of arrays (NumPy or JAX) with the same feature shape, e.g.
        ``(x[i:i + b] for i in range(0, len(x), b))``.
      progress: show a progress bar: tqdm when installed, else a counter on stderr.
      feature_axes: the (trailing) feature axes of each batch.

    Returns:
      The fitted state.

    Raises:
      TypeError: transform is not a :class:`Transform`; batches is not an iterable of arrays (a
        dict, a string, None); a batch is not a floating array.
      ValueError: no batches, or only empty ones; a batch without an example axis (1-D with
        ``feature_axes=-1``); batches with different feature shapes; non-finite values (the
        message names the batch).

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxnorm import preprocessing
      >>> batches = [jnp.array([[1.0], [2.0]]), jnp.array([[3.0], [10.0]])]
      >>> preprocessing.fit_stream(preprocessing.zero_center(), batches, progress=False)
      ZeroCenterState(mean=Array([4.], dtype=float32))
    """
    if not isinstance(transform, Transform):
        raise TypeError(f"fit_stream expects a Transform, but got {type(transform).__name__}")
    if (
        batches is None
        or isinstance(batches, Mapping | str | bytes)
        or not isinstance(batches, Iterable)
    ):
        raise TypeError(
            "fit_stream expects batches as an iterable of arrays (a list, or a generator such as "
            f"(x[i:i + b] for i in range(0, len(x), b))), but got {_describe(batches)}"
        )
    full = transform.full_covariance
    total = len(batches) if hasattr(batches, "__len__") else None
    bar = _progress(total) if progress else None
    acc = None  # the running moments, relative to shift
    shift = None
    pending = None  # the previous group's (non-finite flag, batches), checked one step late
    group = []  # consecutive batches, flattened to [rows, features], fitted together
    feature_shape = None
    num_batches = 0

    def flush():
        nonlocal acc, shift, pending
        # Small batches are fitted in groups of up to _BLOCK_ROWS rows: per-batch moments would
        # pay a dispatch and a thin matmul each (the merge is exact either way).
        x = tuple(g[1] for g in group)
        if acc is None:
            shift = _pivot(x, None, (1,))[0]
            acc, flag = _local_moments_jit(x, None, (1,), full, shift)
        else:
            acc, flag = _merge_batch_jit(acc, x, shift, (1,), full)
        # Checking the previous group lets this one's computation overlap the wait.
        if pending is not None:
            _check_group(*pending)
        pending = (flag, list(group))
        group.clear()

    try:
        for i, batch in enumerate(batches):
            x = _as_array(batch, f"batch {i}", "fit_stream")
            _checks.check_floating(x, f"batch {i}")
            axes = _trailing_feature_axes(x, feature_axes, "fit_stream", f"batch {i}")
            fs = tuple(x.shape[a] for a in axes)
            if feature_shape is None:
                feature_shape = fs
            elif fs != feature_shape:
                raise ValueError(
                    f"fit_stream: batch {i} has feature shape {fs}, but the earlier batches have "
                    f"{feature_shape}"
                )
            if x.ndim != 2:
                x = x.reshape(-1, math.prod(fs))
            num_batches += 1
            if bar is not None:
                bar.update(1)
            if x.shape[0] == 0:  # nothing to merge (and no pivot to take)
                continue
            rows = sum(g[1].shape[0] for g in group)
            if group and (group[0][1].dtype != x.dtype or rows + x.shape[0] > _BLOCK_ROWS):
                flush()
            group.append((i, x))
        if group:
            flush()
        if pending is not None:
            _check_group(*pending)
    finally:
        if bar is not None:
            bar.close()
    if feature_shape is None:
        raise ValueError("fit_stream got no batches; pass a non-empty iterable of arrays")
    if acc is None:  # as t.fit(x[:0]): a transform fitted on no data is no transform
        raise ValueError(
            f"fit_stream got {num_batches} batch(es) of feature shape {feature_shape}, all empty "
            "(0 examples); statistics of no data fit nothing"
        )
    mean = shift.astype(acc.mean.dtype) + acc.mean
    m2 = acc.m2 if full else acc.m2.reshape(feature_shape)
    return transform.fit_moments(Moments(acc.count, mean.reshape(feature_shape), m2))


def _check_group(flag, group) -> None:
    """_check_finite for a group of fit_stream's batches: the message names the batch."""
    if not int(flag):
        return
    for i, xi in group:
        if int(_count_nonfinite(xi, None)):
            _check_finite(flag, xi, None, (1,), f"batch {i}")
    what = f"batch {group[0][0]}"
    if len(group) > 1:
        what = f"the group of batches {group[0][0]}-{group[-1][0]} (fitted together)"
    _check_finite(flag, jnp.concatenate([xi for _, xi in group]), None, (1,), what)


@functools.partial(jax.jit, static_argnums=(3, 4))
def _merge_batch_jit(acc, x, shift, axes, full):
    # One dispatch per group of batches: their moments about the stream's shift, and the merge
    # into the running total (both in shifted coordinates).
    m, n_bad = _local_moments(x, None, axes, full, shift)
    return merge(acc, m), n_bad


# --------------------------------------------------------------------------------------------------
# Save and load (npz, no pickle)

_STATE_TYPES = {cls.__name__: cls for cls in _MADE_BY}
_FORMAT = "jaxnorm.preprocessing"
# Version 2 records each array's dtype, shape and SHA-256 checksum, and each state's transform.
_VERSION = 2
_HEADER = "__jaxnorm__"
_ZIP_MAGIC = b"PK\x03\x04"


# What zipfile raises on a cut or damaged archive: OSError for a seek to a damaged offset,
# RuntimeError for a damaged flag that marks a member encrypted.
_ZIP_ERRORS = (zipfile.BadZipFile, EOFError, OSError, RuntimeError, zlib.error, NotImplementedError)


class _Malformed(Exception):
    """A header that does not describe a state (load reports it as a ValueError naming the file)."""


def _storage_dtype(dtype: np.dtype) -> np.dtype:
    # bfloat16 and the other ml_dtypes have no .npy name: their bits are stored as unsigned ints.
    if dtype.kind == "V" or dtype.name not in np.sctypeDict:
        return np.dtype(f"u{dtype.itemsize}")
    return dtype


def _digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def _path_text(path: tuple) -> str:
    return "state" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path)


def _describe_saved(state) -> str:
    if type(state) is tuple:
        kinds = ", ".join(type(s).__name__ for s in state)
        return f"the state of a chain of {len(state)} transform(s) ({kinds})"
    return _describe(state)


def _encode(node, arrays: dict, path: tuple) -> dict:
    """The JSON description of a state; its arrays go into ``arrays`` under their member names."""
    if type(node) in _MADE_BY:
        _check_state(node, type(node), "save", _path_text(path))
        return {
            "type": type(node).__name__,
            "transform": " or ".join(_MADE_BY[type(node)]),
            "fields": {f: _encode_leaf(getattr(node, f), arrays, (*path, f)) for f in node._fields},
        }
    if type(node) is tuple:  # chain's state: the tuple of its members' states
        items = [_encode(v, arrays, (*path, i)) for i, v in enumerate(node)]
        return {"type": "chain", "items": items}
    raise TypeError(
        "save expects a preprocessing state (a NamedTuple of arrays such as PCAState or Moments, "
        f"or a tuple of them from chain), but {_path_text(path)} is {_describe(node)}"
    )


def _encode_leaf(v, arrays: dict, path: tuple) -> dict:
    if _checks.is_tracer(v):
        raise TypeError(
            f"save needs concrete arrays, but {_path_text(path)} is a traced value; call save "
            "outside jit"
        )
    if not isinstance(v, jax.Array | np.ndarray | np.generic):
        raise TypeError(
            f"save stores arrays, but {_path_text(path)} is {_describe(v)}; pass an array, e.g. "
            "jnp.asarray(...) of it"
        )
    a = np.asarray(v)
    stored = a.view(_storage_dtype(a.dtype))
    member = ".".join(map(str, path))
    arrays[member] = stored
    return {
        "member": member,
        "dtype": a.dtype.name,
        "shape": list(a.shape),
        "sha256": _digest(stored),
    }


def _decode(node, leaf):
    """The state a header describes; ``leaf(spec)`` gives each array. Raises _Malformed."""
    if not isinstance(node, dict):
        raise _Malformed(f"expected a state description, found {node!r:.80}")
    kind = node["type"]
    if kind == "chain":
        if not isinstance(node["items"], list):
            raise _Malformed("a chain's items must be a list")
        return tuple(_decode(v, leaf) for v in node["items"])
    cls = _STATE_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise _Malformed(f"unknown state type {kind!r:.80}; known: {['chain', *_STATE_TYPES]}")
    made_by = " or ".join(_MADE_BY[cls])
    if node["transform"] != made_by:
        raise _Malformed(
            f"a {kind} is recorded as the state of {node['transform']!r:.80}, but it is the state "
            f"of {made_by}"
        )
    fields = node["fields"]
    if not isinstance(fields, dict) or list(fields) != list(cls._fields):
        raise _Malformed(
            f"the saved {kind} has fields {list(fields) if isinstance(fields, dict) else fields}, "
            f"but a {kind} has {list(cls._fields)}"
        )
    return cls(*(leaf(fields[f]) for f in cls._fields))


def _leaf_spec(spec) -> dict:
    if not isinstance(spec, dict) or set(spec) != {"member", "dtype", "shape", "sha256"}:
        raise _Malformed(
            f"expected member, dtype, shape and sha256 for an array, found {spec!r:.80}"
        )
    member, dtype, shape, digest = spec["member"], spec["dtype"], spec["shape"], spec["sha256"]
    ok_shape = isinstance(shape, list) and all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape
    )
    if not (isinstance(member, str) and member and isinstance(digest, str) and ok_shape):
        raise _Malformed(f"malformed array description {spec!r:.80}")
    try:
        dt = jnp.dtype(dtype) if isinstance(dtype, str) else None
    except TypeError:
        dt = None
    if dt is None or dt.hasobject or dt.kind in "OSUaMm":
        raise _Malformed(f"member {member!r} has dtype {dtype!r:.40}, which is no numeric dtype")
    return spec


def _read_member(zf: zipfile.ZipFile, member: str, where: str, check=None) -> np.ndarray:
    """The array in ``member``.npy; ``check(dtype, shape)`` vets its .npy header before the data
    is read (an edited shape allocates nothing)."""
    fmt = np.lib.format
    try:
        with zf.open(member + ".npy") as f:
            try:
                version = fmt.read_magic(f)
                if version not in ((1, 0), (2, 0)):
                    raise ValueError(f".npy format version {version} is not one np.savez writes")
                read_header = (
                    fmt.read_array_header_1_0 if version == (1, 0) else (fmt.read_array_header_2_0)
                )
                shape, fortran_order, dtype = read_header(f)
            except Exception as e:  # NumPy parses the header with Python's tokenizer
                raise ValueError(
                    f"{where}: its member {member!r} is not a valid .npy array ({e})"
                ) from None
            if dtype.hasobject:
                raise ValueError(
                    f"{where}: its member {member!r} holds Python objects, which only pickle "
                    "could load: the file was not written by preprocessing.save"
                )
            if check is not None:
                check(dtype, shape)
            size = math.prod(shape) * dtype.itemsize
            data = bytearray(f.read(size + 1))
    except _ZIP_ERRORS as e:
        raise ValueError(
            f"{where} is corrupted: its member {member!r} cannot be read ({e})"
        ) from None
    if len(data) != size:
        raise ValueError(
            f"{where} is corrupted: its member {member!r} holds {len(data)} bytes of data where "
            f"its .npy header describes {size}"
        )
    return np.frombuffer(data, dtype).reshape(shape, order="F" if fortran_order else "C")


def _read_leaf(zf: zipfile.ZipFile, spec: dict, where: str, saved_as: dict) -> np.ndarray:
    member = spec["member"]
    dtype = jnp.dtype(spec["dtype"])
    stored = _storage_dtype(dtype)
    edited = "the file was edited or is corrupted (nothing is reinterpreted)"

    def check(file_dtype, shape):
        if file_dtype.name != stored.name or file_dtype.itemsize != stored.itemsize:
            as_stored = f" (stored as {stored.name})" if stored != dtype else ""
            raise ValueError(
                f"{where}: its member {member!r} holds {file_dtype.name} data, but the header "
                f"records {dtype.name}{as_stored}: {edited}"
            )
        if shape != tuple(spec["shape"]):
            raise ValueError(
                f"{where}: its member {member!r} has shape {shape}, but the header records "
                f"{tuple(spec['shape'])}: {edited}"
            )

    a = _read_member(zf, member, where, check)
    digest = _digest(a)
    if digest != spec["sha256"]:
        other = saved_as.get(digest)
        why = (
            f"it holds the data saved as {other!r}: members were renamed or swapped"
            if other
            else "the file was edited or is corrupted"
        )
        raise ValueError(
            f"{where}: its member {member!r} does not hold the data saved under that name (its "
            f"SHA-256 checksum differs from the header's); {why}"
        )
    if not a.dtype.isnative:
        a = a.astype(a.dtype.newbyteorder("="))
    return a.view(dtype) if stored != dtype else a


def _read_state(zf: zipfile.ZipFile, where: str):
    names = zf.namelist()
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"{where} is corrupted: member(s) {repeated} appear more than once")
    header_file = _HEADER + ".npy"
    if header_file not in names:
        raise ValueError(
            f"{where} was not written by preprocessing.save: it has no {_HEADER!r} header "
            f"(its members: {sorted(names)[:10]})"
        )
    raw = _read_member(zf, _HEADER, where)
    if raw.dtype.kind != "U" or raw.shape != ():
        raise ValueError(f"{where} has a malformed header: not a JSON string")
    try:
        header = json.loads(str(raw[()]))
    except json.JSONDecodeError as e:
        raise ValueError(f"{where} has a malformed header (not JSON: {e})") from None
    fmt = header.get("format") if isinstance(header, dict) else None
    prefix = _FORMAT + "/"
    if not (isinstance(fmt, str) and fmt.startswith(prefix) and fmt[len(prefix) :].isdigit()):
        raise ValueError(
            f"{where} was not written by preprocessing.save: its header's format is {fmt!r:.80}, "
            f"expected {prefix}{_VERSION}"
        )
    version = int(fmt[len(prefix) :])
    if version > _VERSION:
        raise ValueError(
            f"{where} was written by a newer jaxnorm, in file format version {version}; this "
            f"version reads version {_VERSION}: upgrade jaxnorm to load it"
        )
    if version < _VERSION:
        raise ValueError(
            f"{where} is in file format version {version}, from an earlier jaxnorm, which "
            "recorded no shapes or checksums, so its contents cannot be verified; load it with "
            "that version and save it again with this one"
        )
    specs: list = []
    try:
        _decode(header["state"], lambda spec: specs.append(_leaf_spec(spec)))
        members = [s["member"] for s in specs]
        if len(set(members)) != len(members):
            raise _Malformed("an array member is listed twice")
    except (_Malformed, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{where} has a malformed header ({e})") from None
    expected = {m + ".npy" for m in members}
    missing = sorted(expected - set(names))
    if missing:
        raise ValueError(
            f"{where} lacks the member(s) {missing} that its header lists: the file was edited, "
            "or is incomplete"
        )
    extra = sorted(set(names) - expected - {header_file})
    if extra:
        raise ValueError(
            f"{where} has member(s) {extra} that its header does not list: the file was edited "
            "(or was not written by preprocessing.save)"
        )
    saved_as = {s["sha256"]: s["member"] for s in specs}
    state = _decode(header["state"], lambda spec: _read_leaf(zf, spec, where, saved_as))
    _check_loaded(state, where)
    return state


def _check_loaded(state, where: str, path: tuple = ()) -> None:
    # The fields fit together (a header edited consistently with its members is caught here).
    if type(state) is tuple:
        for i, s in enumerate(state):
            _check_loaded(s, where, (*path, i))
        return
    try:
        _check_state(state, type(state), "load", _path_text(path))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None


def _feature_shape(state) -> tuple:
    if type(state) is tuple:
        return _feature_shape(state[0]) if state else ()
    return tuple(state.mean.shape)


def _check_fits(state, transform, where: str) -> None:
    """Raise a ValueError naming the file unless ``transform`` (or the state class) takes state."""
    if isinstance(transform, type) and transform in _MADE_BY:
        if type(state) is not transform:
            raise ValueError(
                f"{where} holds {_describe_saved(state)}, but a {transform.__name__} was expected"
            )
        return
    if not isinstance(transform, Transform):
        raise TypeError(
            "load expects transform as a Transform (such as preprocessing.normalize()) or a state "
            f"class (such as preprocessing.Moments), but got {_describe(transform)}"
        )
    if isinstance(state, Moments):
        raise ValueError(
            f"{where} holds Moments, not a fitted state; load it without transform= and pass it "
            "to transform.fit_moments"
        )
    # Tracing apply on zero rows runs every check of the state (its type, chain's length, the
    # fields' shapes) and computes nothing.
    x = jax.ShapeDtypeStruct((0, *_feature_shape(state)), jnp.float32)
    try:
        jax.eval_shape(transform.apply, state, x)
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"{where} holds {_describe_saved(state)}, which the given transform does not apply: {e}"
        ) from None


def save(path: str | os.PathLike, state) -> None:
    """Save a preprocessing state to an ``.npz`` file, without pickle.

    The arrays are stored as they are (bit for bit, bfloat16 included). A JSON header beside them
    records the file format's version and the state's structure: each NamedTuple's type, the
    transform that makes it and its field names, tuples for :func:`chain`, and for each array its
    dtype, shape and SHA-256 checksum, which :func:`load` verifies. The file is written under a
    temporary name and renamed, so an interrupted save leaves no partial file under ``path``.

    Args:
      path: file name; ``.npz`` is appended when it has no such suffix (as ``np.savez`` does).
      state: a state returned by a transform's fit (a tuple of them for :func:`chain`), or
        :class:`Moments`.

    Raises:
      TypeError: state holds something other than the preprocessing NamedTuples, tuples and
        arrays (None, a dict, a Python number, a traced value under ``jit``).
      ValueError: a NamedTuple's fields do not fit together (see each transform's ``apply``).

    Example:
      >>> import os, tempfile, jax.numpy as jnp
      >>> from jaxnorm import preprocessing
      >>> state = preprocessing.zero_center().fit(jnp.ones((4, 3)))
      >>> path = os.path.join(tempfile.mkdtemp(), "state.npz")
      >>> preprocessing.save(path, state)
      >>> preprocessing.load(path, preprocessing.zero_center())
      ZeroCenterState(mean=array([1., 1., 1.], dtype=float32))
    """
    arrays: dict = {}
    tree = _encode(state, arrays, ())
    header = json.dumps({"format": f"{_FORMAT}/{_VERSION}", "state": tree})
    target = os.fsdecode(path)
    if not target.endswith(".npz"):
        target += ".npz"
    tmp = f"{target}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            np.savez(f, allow_pickle=False, **{_HEADER: np.array(header)}, **arrays)
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def load(path: str | os.PathLike, transform: Transform | type | None = None):
    """Load a state written by :func:`save`, verified; nothing is reinterpreted, nothing unpickled.

    ``path`` is the name given to :func:`save`: when it has no ``.npz`` suffix and no such file
    exists, the ``.npz`` file that ``save`` wrote is read. Every array must have the dtype, the
    shape and the SHA-256 checksum that the header records, every member the header lists must
    be there and no other, and the fields of each state must fit together; anything else is a
    ``ValueError`` naming the file and what is wrong.

    Pass ``transform`` to also check that the state is that transform's: ``load(path,
    preprocessing.zero_center())`` refuses a file holding a NormalizeState (which zero_center's
    ``apply`` would read as a mean alone). Without it the state comes back with its own type, and
    each transform's ``apply`` refuses another transform's state (a ``TypeError``). ``pca`` and
    ``pca_whiten`` share :class:`PCAState` and one ``apply``, so either takes either's state.

    Args:
      path: the file name given to :func:`save`.
      transform: optional: the :class:`Transform` the state is for (a :func:`chain` for a chain's
        state), or a state class such as :class:`Moments`.

    Returns:
      The state with NumPy array leaves (bit-identical to what was saved); ``jax.device_put`` it
      to place it on a device, or pass it to ``apply`` as it is.

    Raises:
      FileNotFoundError: there is no such file.
      TypeError: path is not a str or os.PathLike; transform is neither a Transform nor a state
        class.
      ValueError: the file is empty, not an ``.npz`` archive, truncated or corrupted; was not
        written by :func:`save`, or by a newer jaxnorm (a newer file format version); an array's
        dtype, shape or checksum differs from the header's (an edited header, renamed or swapped
        members); members missing or extra; the state is not ``transform``'s.

    Example:
      >>> import os, tempfile, jax.numpy as jnp
      >>> from jaxnorm import preprocessing
      >>> path = os.path.join(tempfile.mkdtemp(), "scaler.npz")
      >>> preprocessing.save(path, preprocessing.normalize().fit(jnp.ones((4, 2))))
      >>> preprocessing.load(path, preprocessing.normalize()).scale
      array([1., 1.], dtype=float32)
      >>> preprocessing.load(path, preprocessing.zero_center())  # doctest: +IGNORE_EXCEPTION_DETAIL
      Traceback (most recent call last):
      ValueError: preprocessing.load: '...' holds a NormalizeState (the state of normalize), ...
    """
    if not isinstance(path, str | bytes | os.PathLike):
        raise TypeError(f"load expects path as a file name (str or os.PathLike), got {path!r}")
    name = os.fsdecode(path)
    if not os.path.exists(name) and os.path.exists(name + ".npz"):
        name += ".npz"  # save(path) appended the suffix, as np.savez does
    where = f"preprocessing.load: {name!r}"
    with open(name, "rb") as f:
        start = f.read(len(_ZIP_MAGIC))
        if not start:
            raise ValueError(
                f"{where} is empty (0 bytes): it is not a file written by preprocessing.save, or "
                "its writing was cut short"
            )
        if start != _ZIP_MAGIC:
            raise ValueError(
                f"{where} is not a file written by preprocessing.save: it is not an .npz (zip) "
                f"archive (it starts with {start!r})"
            )
        f.seek(0)
        try:
            with zipfile.ZipFile(f) as zf:
                state = _read_state(zf, where)
        except _ZIP_ERRORS as e:
            raise ValueError(
                f"{where} is truncated or corrupted (not a complete .npz archive: {e}); save the "
                "state again"
            ) from None
    if transform is not None:
        _check_fits(state, transform, where)
    return state
