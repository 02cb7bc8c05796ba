"""Functional batch normalization: explicit running statistics, one fused op, exact across devices.

Batch norm (Ioffe & Szegedy 2015) normalises each feature with statistics of the batch,

.. math:: y = \\gamma \\, \\frac{x - \\mu_B}{\\sqrt{\\sigma_B^2 + \\epsilon}} + \\beta,

and keeps running averages of :math:`\\mu_B, \\sigma_B^2` for inference. Everything here is a pure
function of arrays: the running statistics are a :class:`BatchNormState` pytree passed in and
returned, as optax's optimizer states are.

What is different from ``flax.linen.BatchNorm`` (and why):

* The variance is a one-pass sum of squares *about a per-feature pivot* (the mean of 64 rows
  spread over the batch), so it stays accurate when ``|mean| >> std`` (flax's default fast
  variance returns 0 for float32 data with mean 1e4 and std 1) and costs one read of x, like the
  fast variance. The pass measures its own loss of precision, and a batch whose pivot was too
  far from the mean (or whose squares overflowed) gets a second pass about the mean, under a
  ``lax.cond`` that costs nothing otherwise: y's error stays within 4x a float32 two-pass
  computation's for every finite batch (docs/batchnorm.md).
* The gradient is the closed form of the paper, written as a JVP rule that is linear in the
  tangents (so ``jax.grad``, ``jax.jacrev`` *and* ``jax.jacfwd`` work) and recomputed from ``x`` and
  the per-feature statistics under ``jax.checkpoint``: the only residual the size of x is x itself.
  An ``activation`` is fused into the same rule, so BN+ReLU never stores the pre-activation.
* Across devices (``axis_name``) the per-device ``(count, mean, centred second moment)`` triples are
  gathered in one collective and merged exactly (Chan et al. 1979), so uneven or masked shards give
  the same statistics as one device with the whole batch (flax averages the per-device means).

References:
  Ioffe & Szegedy 2015, "Batch normalization: accelerating deep network training by reducing
  internal covariate shift"; Ioffe 2017, "Batch renormalization"; Hoffer, Hubara & Soudry 2017,
  "Train longer, generalize better" (ghost batch norm); Chan, Golub & LeVeque 1979, "Updating
  formulae and a pairwise algorithm for computing sample variances".
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxnorm import _checks, _rows

__all__ = [
    "BatchNormState",
    "batch_norm",
    "fold",
    "fold_into_conv",
    "fold_into_dense",
    "from_torch_state",
    "init_state",
    "momentum_from_torch",
    "momentum_to_torch",
    "to_torch_state",
]


class BatchNormState(NamedTuple):
    """Running statistics of a batch-norm layer (a pytree, float32 by default).

    Attributes:
      mean: running mean, shape = the feature shape (``x.shape`` at the feature axes).
      var: running variance (biased by default, as Flax keeps it), same shape as ``mean``.
      count: number of training updates seen so far (an int32 scalar), like PyTorch's
        ``num_batches_tracked``; the cumulative-average mode (``cumulative=True``) divides by it.
        A batch with no valid row (all masked, or empty) does not count.
    """

    mean: jax.Array
    var: jax.Array
    count: jax.Array


def init_state(num_features: int | Sequence[int], *, dtype=jnp.float32) -> BatchNormState:
    """The initial running statistics: mean 0, variance 1, count 0 (as Flax and PyTorch start).

    Args:
      num_features: the feature size, an int (one feature axis) or a tuple (several feature axes,
        e.g. ``(H, C)`` for ``axis=(-2, -1)``).
      dtype: dtype of the running mean and variance (float32 by default, whatever the
        activations' dtype). The count is an int32 whatever ``dtype`` is: a float count stops
        counting (at 256 in bfloat16, 2**24 in float32).

    Returns:
      A :class:`BatchNormState` with ``mean`` and ``var`` of shape ``num_features``.

    Raises:
      TypeError: if num_features is not an int or a tuple of ints, or dtype is not a floating
        dtype (a str that names none included).
      ValueError: if a feature size is not positive.

    Example:
      >>> from jaxnorm import batchnorm
      >>> s = batchnorm.init_state(3)
      >>> s.mean, s.var
      (Array([0., 0., 0.], dtype=float32), Array([1., 1., 1.], dtype=float32))
      >>> s.count
      Array(0, dtype=int32)
    """
    shape = _feature_shape_arg(num_features)
    dtype = _state_dtype(dtype, "init_state")
    return BatchNormState(
        mean=jnp.zeros(shape, dtype), var=jnp.ones(shape, dtype), count=jnp.zeros((), jnp.int32)
    )


def _state_dtype(dtype, fn):
    """The running statistics' dtype: a floating dtype (TypeError naming dtype otherwise)."""
    try:
        dt = jnp.dtype(dtype)
    except TypeError as e:
        raise TypeError(
            f"{fn}: dtype must be a floating dtype for the state (e.g. jnp.float32), got {dtype!r}"
        ) from e
    if not jnp.issubdtype(dt, jnp.floating):
        raise TypeError(f"{fn}: dtype must be a floating dtype for the state, got {dt}")
    return dt


def _feature_shape_arg(num_features) -> tuple[int, ...]:
    if isinstance(num_features, int | np.integer):
        sizes = (num_features,)
    elif isinstance(num_features, tuple | list):
        sizes = tuple(num_features)
    else:
        raise TypeError(f"num_features must be an int or a tuple of ints, got {num_features!r}")
    for s in sizes:
        if not isinstance(s, int | np.integer) or isinstance(s, bool):
            raise TypeError(f"num_features must be an int or a tuple of ints, got {num_features!r}")
        if s <= 0:
            raise ValueError(f"num_features must be positive, got {num_features!r}")
    return tuple(int(s) for s in sizes)


# --------------------------------------------------------------------------- PyTorch conventions


def momentum_from_torch(torch_momentum: float) -> float:
    """Flax-convention momentum from PyTorch's: ``1 - torch_momentum``.

    PyTorch weighs the *new* batch by ``momentum`` (default 0.1); Flax and jaxnorm weigh the *old*
    running value (default 0.99): ``new = momentum * old + (1 - momentum) * batch``.

    Args:
      torch_momentum: PyTorch's ``momentum`` in [0, 1].

    Returns:
      The momentum to pass to :func:`batch_norm`.

    Raises:
      ValueError: if torch_momentum is None (use ``cumulative=True``, PyTorch's momentum=None) or
        outside [0, 1].

    Example:
      >>> from jaxnorm import batchnorm
      >>> batchnorm.momentum_from_torch(0.1)
      0.9
    """
    if torch_momentum is None:
        raise ValueError(
            "torch momentum=None means a cumulative average: call batch_norm(..., cumulative=True)"
        )
    _check_momentum(torch_momentum, "torch_momentum")
    return round(1.0 - float(torch_momentum), 15)


def momentum_to_torch(momentum: float) -> float:
    """PyTorch-convention momentum from Flax's: ``1 - momentum`` (the inverse of
    :func:`momentum_from_torch`).

    Example:
      >>> from jaxnorm import batchnorm
      >>> batchnorm.momentum_to_torch(0.99)
      0.01
    """
    _check_momentum(momentum, "momentum")
    return round(1.0 - float(momentum), 15)


def from_torch_state(
    running_mean: ArrayLike,
    running_var: ArrayLike,
    num_batches_tracked: ArrayLike | None = None,
    *,
    dtype=jnp.float32,
) -> BatchNormState:
    """A :class:`BatchNormState` from a PyTorch BatchNorm's buffers.

    PyTorch's ``running_var`` is the *unbiased* batch variance averaged; to keep updating it the
    same way, pass ``unbiased_running_var=True`` to :func:`batch_norm` (and ``cumulative=True`` if
    the torch layer had ``momentum=None``).

    Args:
      running_mean, running_var: the buffers (torch tensors, NumPy or JAX arrays).
      num_batches_tracked: the torch counter (0 if not given).
      dtype: dtype of the running mean and variance (the count is int32).

    Returns:
      The state: a copy, so the torch layer may go on updating its buffers in place.

    Raises:
      TypeError: a buffer is not an array of numbers (a dict, a str, None, bools), the count
        is not an integer, or dtype is not floating.
      ValueError: the buffers are scalars or differ in shape, hold NaN or Inf, running_var is
        negative somewhere, or num_batches_tracked is not a scalar, is negative or is not a
        whole number.

    Example:
      >>> import numpy as np
      >>> from jaxnorm import batchnorm
      >>> s = batchnorm.from_torch_state(np.zeros(2), np.ones(2), 7)
      >>> s.count
      Array(7, dtype=int32)
    """
    dtype = _state_dtype(dtype, "from_torch_state")
    mean = _torch_buffer(running_mean, "running_mean")
    var = _torch_buffer(running_var, "running_var")
    if mean.shape != var.shape:
        raise ValueError(
            f"running_mean has shape {mean.shape} but running_var has shape {var.shape}"
        )
    if np.any(var < 0):
        raise ValueError(
            f"running_var must be >= 0 (a variance), but {int(np.sum(var < 0))} of its "
            f"{var.size} values are negative (smallest {var.min()})"
        )
    count = _torch_count(num_batches_tracked)
    return BatchNormState(
        jnp.array(mean, dtype), jnp.array(var, dtype), jnp.asarray(count, jnp.int32)
    )


def _torch_buffer(v, name):
    # np.array copies: torch updates its buffers in place, and jnp.asarray of a NumPy view of
    # them may share their memory on CPU.
    if v is None or isinstance(v, dict | str | bytes):
        raise TypeError(
            f"{name} must be an array (a torch tensor, NumPy or JAX array), got {type(v).__name__}"
        )
    try:
        a = np.array(np.asarray(v), copy=True)
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f"{name} must be an array of numbers, got {type(v).__name__}: {e}") from e
    if a.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be an array of numbers, got dtype {a.dtype}")
    if a.ndim == 0:
        raise ValueError(f"{name} must have the feature shape (PyTorch's [C]), got a scalar")
    bad = ~np.isfinite(a)
    if np.any(bad):
        raise ValueError(
            f"{name} must be finite, but {int(np.sum(bad))} of its {a.size} values are NaN or Inf"
        )
    return a


def _torch_count(count):
    if count is None:
        return 0
    if isinstance(count, bool | np.bool_):
        raise TypeError(f"num_batches_tracked must be an integer, got {count!r}")
    try:
        c = np.asarray(count)
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(
            f"num_batches_tracked must be an integer, got {type(count).__name__}"
        ) from e
    if c.dtype.kind not in "fiu":
        raise TypeError(f"num_batches_tracked must be an integer, got dtype {c.dtype}")
    if c.ndim != 0:
        raise ValueError(f"num_batches_tracked must be a scalar, got shape {c.shape}")
    v = c.item()
    if not (math.isfinite(v) and v == int(v)) or v < 0 or v > np.iinfo(np.int32).max:
        raise ValueError(
            "num_batches_tracked must be a whole number in [0, 2**31 - 1] (a count of "
            f"updates), got {v}"
        )
    return int(v)


def to_torch_state(state: BatchNormState) -> dict[str, np.ndarray]:
    """PyTorch BatchNorm buffers from a state: ``running_mean``, ``running_var`` (float32) and
    ``num_batches_tracked`` (int64), ready for ``torch.from_numpy`` / ``load_state_dict``. The
    arrays are writable copies, not views of the state's device buffers.

    Raises:
      TypeError: if state is not a :class:`BatchNormState` (None, a plain tuple, another
        transform's state), or its mean is complex (that of complex x).

    Example:
      >>> from jaxnorm import batchnorm
      >>> sorted(batchnorm.to_torch_state(batchnorm.init_state(2)))
      ['num_batches_tracked', 'running_mean', 'running_var']
    """
    _check_state_type(state)
    if jnp.issubdtype(jnp.result_type(state.mean), jnp.complexfloating):
        raise TypeError(
            "to_torch_state needs a real running mean (PyTorch's BatchNorm buffers are real), "
            f"but state.mean is {jnp.result_type(state.mean)} (the running mean of complex x)"
        )
    return {
        "running_mean": np.array(state.mean, np.float32, copy=True),
        "running_var": np.array(state.var, np.float32, copy=True),
        "num_batches_tracked": np.array(np.rint(np.asarray(state.count)), np.int64, copy=True),
    }


# --------------------------------------------------------------------------- folding for inference


def fold(
    scale: ArrayLike | None,
    bias: ArrayLike | None,
    state: BatchNormState,
    epsilon: float = 1e-5,
) -> tuple[jax.Array, jax.Array]:
    """Inference-mode batch norm as one affine map per feature: ``y = x * a + b``.

    .. math:: a = \\frac{\\gamma}{\\sqrt{\\sigma^2 + \\epsilon}}, \\qquad b = \\beta - \\mu a

    with the running statistics :math:`\\mu, \\sigma^2`.

    Args:
      scale: :math:`\\gamma`, shape = feature shape, or None (1).
      bias: :math:`\\beta`, shape = feature shape, or None (0).
      state: the running statistics.
      epsilon: the epsilon the layer was trained with.

    Returns:
      ``(a, b)``, each of the feature shape, in the promoted dtype of the state and parameters.

    Raises:
      TypeError: if state is not a :class:`BatchNormState`, or scale or bias is not a floating
        array.
      ValueError: if scale or bias does not have the state's shape, epsilon is not a
        positive, finite scalar (as in :func:`batch_norm`; a traced epsilon is not checked), or
        a concrete state.var is negative somewhere.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxnorm import batchnorm
      >>> s = batchnorm.BatchNormState(jnp.array([1.0]), jnp.array([4.0]), jnp.array(3))
      >>> a, b = batchnorm.fold(jnp.array([2.0]), jnp.array([0.5]), s)  # 2 / sqrt(4 + 1e-5)
      >>> a, b
      (Array([0.99999875], dtype=float32), Array([-0.49999875], dtype=float32))
    """
    _check_state_type(state)
    _check_epsilon(epsilon)
    mean = jnp.asarray(state.mean)
    var = jnp.asarray(state.var)
    _check_param_shape(scale, mean.shape, "scale", "state.mean")
    _check_param_shape(bias, mean.shape, "bias", "state.mean")
    dtype = _compute_dtype(mean, var, scale, bias)
    a = jax.lax.rsqrt(var.astype(dtype) + jnp.asarray(epsilon, dtype))
    if scale is not None:
        a = a * jnp.asarray(scale).astype(dtype)
    # A complex running mean (complex x) gives a complex b; a stays real.
    bdt = mean.dtype if jnp.issubdtype(mean.dtype, jnp.complexfloating) else dtype
    b = jnp.zeros((), bdt) if bias is None else jnp.asarray(bias).astype(dtype).astype(bdt)
    return a, b - mean.astype(bdt) * a.astype(bdt)


def fold_into_dense(
    kernel: ArrayLike,
    dense_bias: ArrayLike | None,
    scale: ArrayLike | None,
    bias: ArrayLike | None,
    state: BatchNormState,
    epsilon: float = 1e-5,
) -> tuple[jax.Array, jax.Array]:
    """Fold an inference-mode batch norm into the Dense layer before it.

    ``bn(x @ W + c)`` equals ``x @ W' + c'`` with ``W' = W * a`` (column-wise) and
    ``c' = (c - mu) * a + beta``, where ``a = gamma / sqrt(var + eps)`` (:func:`fold`).

    Args:
      kernel: ``W``, Flax layout ``[in, out]`` (or ``[..., *features]``: the trailing axes must be
        the batch norm's feature shape).
      dense_bias: ``c`` of shape = feature shape, or None (no bias).
      scale, bias, state, epsilon: the batch norm's parameters, statistics and epsilon.

    Returns:
      ``(W', c')`` in the promoted dtype.

    Raises:
      TypeError: if kernel is not a floating array or state is not a
        :class:`BatchNormState`.
      ValueError: if the kernel's trailing axes are not the feature shape, or epsilon is not
        a positive, finite scalar (as in :func:`fold`).

    References:
      PyTorch's ``torch.nn.utils.fusion.fuse_linear_bn_eval``.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxnorm import batchnorm
      >>> s = batchnorm.BatchNormState(jnp.array([1.0, 0.0]), jnp.array([4.0, 1.0]), jnp.array(1))
      >>> w, c = batchnorm.fold_into_dense(jnp.ones((3, 2)), None, None, None, s)
      >>> w[0]  # 1 / sqrt(var + 1e-5)
      Array([0.4999994..., 0.999995...], dtype=float32)
      >>> c
      Array([-0.4999994...,  0.        ], dtype=float32)
    """
    return _fold_into(kernel, dense_bias, scale, bias, state, epsilon, -1, "fold_into_dense")


def fold_into_conv(
    kernel: ArrayLike,
    conv_bias: ArrayLike | None,
    scale: ArrayLike | None,
    bias: ArrayLike | None,
    state: BatchNormState,
    epsilon: float = 1e-5,
    *,
    out_axis: int = -1,
) -> tuple[jax.Array, jax.Array]:
    """Fold an inference-mode batch norm into the convolution before it (PyTorch's
    ``fuse_conv_bn_eval``).

    ``bn(conv(x, K) + c) = conv(x, K') + c'`` with ``K' = K * a`` along the output-channel axis and
    ``c' = (c - mu) * a + beta``, ``a = gamma / sqrt(var + eps)``.

    Args:
      kernel: ``K``; Flax layout ``[*spatial, in, out]`` (``out_axis=-1``, the default) or
        PyTorch's ``[out, in, *spatial]`` (``out_axis=0``).
      conv_bias: ``c`` of shape ``[out]``, or None.
      scale, bias, state, epsilon: the batch norm's parameters, statistics and epsilon.
      out_axis: the kernel's output-channel axis.

    Returns:
      ``(K', c')`` in the promoted dtype.

    Raises:
      TypeError: if kernel is not a floating array or state is not a
        :class:`BatchNormState`.
      ValueError: if the kernel's output-channel size is not the batch norm's feature size,
        or epsilon is not a positive, finite scalar (as in :func:`fold`).

    References:
      PyTorch's ``torch.nn.utils.fusion.fuse_conv_bn_eval``.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxnorm import batchnorm
      >>> s = batchnorm.BatchNormState(jnp.zeros(4), jnp.full(4, 4.0), jnp.array(1))
      >>> k, c = batchnorm.fold_into_conv(jnp.ones((3, 3, 2, 4)), None, None, None, s, 1e-30)
      >>> k.shape, float(k[0, 0, 0, 0])
      ((3, 3, 2, 4), 0.5)
    """
    return _fold_into(kernel, conv_bias, scale, bias, state, epsilon, out_axis, "fold_into_conv")


def _fold_into(kernel, layer_bias, scale, bias, state, epsilon, out_axis, fn):
    _check_state_type(state)
    _checks.check_array(kernel, "kernel")
    kernel = jnp.asarray(kernel)
    _checks.check_floating(kernel, "kernel")
    fshape = tuple(jnp.shape(state.mean))
    a, b = fold(scale, bias, state, epsilon)
    if len(fshape) != 1 or out_axis == -1:
        # Trailing axes of the kernel are the features (Dense/DenseGeneral, Flax convs).
        if out_axis != -1:
            raise ValueError(f"{fn}: out_axis must be -1 for a multi-axis feature shape {fshape}")
        if kernel.shape[kernel.ndim - len(fshape) :] != fshape or kernel.ndim <= len(fshape):
            raise ValueError(
                f"{fn}: the kernel's trailing axes must be the batch norm's feature shape "
                f"{fshape}, but the kernel has shape {kernel.shape}"
            )
        a_b = a.reshape((1,) * (kernel.ndim - len(fshape)) + fshape)
    else:
        ax = _checks.normalize_axes(out_axis, kernel.ndim, "out_axis")[0]
        if kernel.shape[ax] != fshape[0]:
            raise ValueError(
                f"{fn}: the kernel has {kernel.shape[ax]} output channels on axis {out_axis} "
                f"but the batch norm has {fshape[0]} features"
            )
        a_b = a.reshape(tuple(fshape[0] if i == ax else 1 for i in range(kernel.ndim)))
    dtype = _compute_dtype(kernel, a)
    new_kernel = kernel.astype(dtype) * a_b.astype(dtype)
    if layer_bias is None:
        new_bias = b.astype(dtype)
    else:
        _check_param_shape(layer_bias, fshape, "the layer's bias", "the batch norm's features")
        new_bias = jnp.asarray(layer_bias).astype(dtype) * a.astype(dtype) + b.astype(dtype)
    return new_kernel, new_bias


# --------------------------------------------------------------------------- batch norm


def batch_norm(
    x: ArrayLike,
    scale: ArrayLike | None,
    bias: ArrayLike | None,
    state: BatchNormState,
    *,
    train: bool,
    momentum: float = 0.99,
    epsilon: float = 1e-5,
    axis: int | Sequence[int] = -1,
    axis_name: Any = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    mask: ArrayLike | None = None,
    activation: str | Callable[[jax.Array], jax.Array] | None = None,
    unbiased_running_var: bool = False,
    cumulative: bool = False,
    virtual_batch_size: int | None = None,
    renorm: bool = False,
    r_max: ArrayLike = 3.0,
    d_max: ArrayLike = 5.0,
    dtype: Any = None,
    refuse_single_value: bool = False,
) -> tuple[jax.Array, BatchNormState]:
    """Batch normalization with explicit running statistics (and an optional fused activation).

    Training (``train=True``), with :math:`\\mu_B, \\sigma_B^2` the mean and biased variance of each
    feature over all non-feature axes of the batch (valid rows only, all devices of ``axis_name``):

    .. math::
        \\hat x = \\frac{x - \\mu_B}{\\sqrt{\\sigma_B^2 + \\epsilon}}, \\qquad
        y = f(\\gamma \\hat x + \\beta), \\qquad
        \\mu \\leftarrow m\\,\\mu + (1 - m)\\,\\mu_B, \\quad
        \\sigma^2 \\leftarrow m\\,\\sigma^2 + (1 - m)\\,\\sigma_B^2

    (Flax's momentum convention; PyTorch's is ``1 - m``, see :func:`momentum_from_torch`).
    Inference (``train=False``): :math:`y = f(\\gamma (x - \\mu)/\\sqrt{\\sigma^2 + \\epsilon} +
    \\beta)` with the running statistics; the state is returned unchanged.

    The gradient is the closed form :math:`dx = \\frac{\\gamma}{N\\sigma_B}(N\\,dy - \\sum dy -
    \\hat x \\sum dy\\,\\hat x)`, :math:`d\\gamma = \\sum dy\\,\\hat x`, :math:`d\\beta = \\sum dy`
    (dy taken after the activation's derivative), recomputed from x and per-feature statistics.
    The returned state carries no gradient.

    The batch variance is a one-pass sum about a pivot (the mean of 64 sampled rows), refined by
    a pass about the mean for the features (and batches) where that pass lost precision: y's
    error stays within 4x a float32 two-pass computation's (docs/batchnorm.md), and finite x
    whose variance is a finite float32 gives finite y, state and gradients.

    Args:
      x: input, any floating dtype; float16/bfloat16 reduce in float32 and y keeps x's dtype.
        Complex x (complex64, complex128) is normalised as flax.linen does it: the batch mean
        :math:`E[x]` is complex, the variance :math:`E|x - E[x]|^2` real, y complex (``scale``
        and ``bias`` real); the running mean becomes complex (the promotion of its dtype with
        x's) and the running variance stays real. Complex x takes no fused ``activation`` and
        no ``renorm``, and its gradient is JAX's own through a two-pass about the accurate mean.
        An empty x (no rows) gives an empty y and, in training, leaves the state as it is.
      scale: :math:`\\gamma` of the feature shape, or None (no scale, 1).
      bias: :math:`\\beta` of the feature shape, or None (no bias, 0).
      state: the running statistics (:func:`init_state`).
      train: batch statistics and a state update (True) or running statistics (False).
      momentum: weight of the old running value, in [0, 1] (Flax's convention). A traced
        momentum cannot be checked (it is used as it comes).
      epsilon: added to the variance: a positive, finite scalar, at least 1.18e-38 (float32's
        smallest normal). ``epsilon=0`` is refused, where flax and PyTorch accept it: a
        constant feature (variance 0) would divide by zero, giving NaN values and gradients. A
        traced epsilon cannot be checked.
      axis: the feature axis or axes, an int or a tuple of ints; statistics reduce over all
        others (``-1`` for NHWC and ``[N, D]`` data, ``1`` for NCHW).
      axis_name: a mapped axis (``shard_map``/``pmap``/``vmap``) over which the statistics are
        global: one all-gather of per-device (count, mean, centred second moment), merged exactly.
        Under ``jax.jit`` with x sharded over the batch, leave it None (XLA makes the reductions
        global). In training it must be bound where batch_norm is traced (a NameError naming it
        otherwise, flax's error type).
      axis_index_groups: groups of devices along ``axis_name`` that share statistics (needs
        ``axis_name``).
      mask: True for rows that count in the statistics (False: padding). Shape either the batch
        shape (x's shape without the feature axes) or broadcastable to x with the same rank.
        Booleans, or numbers that are all 0 or 1 (a concrete numeric mask with another value,
        such as 0.5, is refused; a traced numeric mask cannot be checked, and counts every
        nonzero value as True). Masked rows are still normalised (with the batch
        statistics); their dx is ``dy * gamma / sigma_B`` since they do not feed the
        statistics. A feature with no valid position (fully masked; real x) is normalised with
        the running statistics, as in evaluation, and they stay as they were (flax's output is
        NaN there).
      activation: None, a name from :mod:`jaxnorm.activations` (``"relu"``, ...) or a callable,
        applied inside the op so that the pre-activation is never stored. It must be
        elementwise: same shape out as in, a floating dtype (checked at trace time with
        ``jax.eval_shape``; a float dtype it changes to is cast to ``dtype`` at the end).
      unbiased_running_var: update the running variance with the unbiased batch variance
        :math:`\\sigma_B^2 N/(N-1)`, as PyTorch does (normalisation still uses the biased one).
      cumulative: running statistics are the plain average over all batches seen (PyTorch's
        ``momentum=None``), using ``state.count``; ``momentum`` is then ignored.
      virtual_batch_size: ghost batch norm: split axis 0 into consecutive groups of this size
        (rows 0..V-1, V..2V-1, ...), each normalised with its own statistics (local to the
        device); the running statistics are updated with the average of the groups' statistics,
        as Keras does. (Keras's own groups are strided: row j with j + N/V, j + 2N/V, ...)
      renorm: Batch Renormalization: :math:`y = \\gamma (\\hat x r + d) + \\beta` with
        :math:`r = \\mathrm{clip}(\\sigma_B/\\sigma, 1/r_{max}, r_{max})`,
        :math:`d = \\mathrm{clip}((\\mu_B - \\mu)/\\sigma, -d_{max}, d_{max})` from the running
        statistics, both treated as constants in the gradient.
      r_max, d_max: the renorm clipping bounds (scalars, may be traced for a schedule; a traced
        bound cannot be checked).
      dtype: the dtype of y (None: x's dtype). Flax's modules return the promotion of x with the
        parameters (bfloat16 x, float32 scale: float32 y); passing that here casts once, from the
        float32 computation, instead of rounding y to x's dtype first. dx keeps x's dtype.
      refuse_single_value: raise, as PyTorch does, when a training batch has a single value per
        feature. By default such a batch is normalised as flax does: its variance is 0, so y is
        the bias (``nnx.tabulate`` with a batch of one, batch-of-one ensemble members under
        ``vmap``, the one-example ``init`` of a model ending in 1x1 features); the running
        variance moves towards 0 (the unbiased one keeps the biased 0 where N = 1).

    Returns:
      ``(y, new_state)``: y of x's shape and dtype; the updated (train) or same (eval) state.

    Raises:
      TypeError: if x, scale or bias is not an array (a list, a dict, None for x) or not
        floating (x may be complex); complex x comes with an activation, renorm or a real
        dtype, or real x with a complex running mean; the state is not a
        :class:`BatchNormState`; axis is not an int or a tuple of ints; epsilon, momentum,
        r_max or d_max is not a number; a flag (train, renorm, cumulative,
        unbiased_running_var) is not a bool; the activation returns a non-floating array;
        dtype is not a floating dtype (complex for complex x).
      ValueError: if the feature sizes of x, scale, bias and state differ; momentum is outside
        [0, 1]; epsilon is not positive and finite; epsilon, momentum, r_max or d_max is not a
        scalar; r_max < 1 or d_max < 0 (with renorm); the activation changes the shape; the
        mask's shape does not fit or a numeric mask holds values other than 0 and 1;
        axis_index_groups is given without axis_name; a training batch has a single value per
        feature with ``refuse_single_value=True``; virtual_batch_size does not divide the
        batch; or a concrete state.var holds a negative value (a traced state, under jit,
        cannot be checked).
      NameError: in training, if axis_name is not bound (not inside a ``shard_map``, ``pmap``
        or ``vmap`` of that name); the message says how to bind it.

    References:
      Ioffe & Szegedy 2015, "Batch normalization"; Ioffe 2017, "Batch renormalization: towards
      reducing minibatch dependence in batch-normalized models"; Hoffer et al. 2017 (ghost batch
      norm); Chan, Golub & LeVeque 1979 (merging variances).

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxnorm import batchnorm
      >>> x = jnp.array([[1.0, 10.0], [3.0, 30.0]])
      >>> y, s = batchnorm.batch_norm(x, None, None, batchnorm.init_state(2), train=True,
      ...                             momentum=0.9)
      >>> y  # (x - mean) / sqrt(var + 1e-5), var = 1 and 100
      Array([[-0.999995..., -0.99999994],
             [ 0.999995...,  0.99999994]], dtype=float32)
      >>> s.mean, s.var
      (Array([0.2, 2. ], dtype=float32), Array([ 1. , 10.9], dtype=float32))
    """
    if not isinstance(train, bool | np.bool_):
        raise TypeError(
            f"train must be a Python bool (True: batch statistics and a state update; False: "
            f"running statistics), got {train!r}"
        )
    _checks.check_array(x, "x")
    x = jnp.asarray(x)
    is_complex = jnp.issubdtype(x.dtype, jnp.complexfloating)
    if not is_complex:
        _checks.check_floating(x, "x")
    faxes = _checks.normalize_axes(axis, x.ndim, "axis")
    fshape = tuple(x.shape[a] for a in faxes)
    where = f"x's feature shape on axis {_axis_str(axis)}"
    _check_state(state, fshape, where)
    if not is_complex and jnp.issubdtype(jnp.result_type(state.mean), jnp.complexfloating):
        raise TypeError(
            f"state.mean is complex ({jnp.result_type(state.mean)}), the running mean of complex "
            f"x, but x is real ({x.dtype})"
        )
    _check_param_shape(scale, fshape, "scale", where)
    _check_param_shape(bias, fshape, "bias", where)
    _check_momentum(momentum, "momentum")
    _check_epsilon(epsilon)
    for flag, name in (
        (unbiased_running_var, "unbiased_running_var"),
        (cumulative, "cumulative"),
        (renorm, "renorm"),
        (refuse_single_value, "refuse_single_value"),
    ):
        _check_flag(flag, name)
    _check_renorm_bounds(r_max, d_max, renorm)
    if axis_index_groups is not None and axis_name is None:
        raise ValueError(
            "axis_index_groups needs axis_name (the mapped axis whose devices it groups), "
            f"but axis_name is None and axis_index_groups={axis_index_groups!r}"
        )
    act = _resolve_activation(activation)
    if is_complex:
        _check_complex_options(act, renorm)
    out_dtype = _out_dtype(x, dtype)
    raxes = tuple(a for a in range(x.ndim) if a not in faxes)
    # cdt: the real dtype of the statistics (float32 at least); xdt: that of x's values
    # (complex64 or complex128 for complex x, whose running mean is complex, its variance real).
    cdt = _real_dtype(x.dtype) if is_complex else _compute_dtype(x)
    xdt = x.dtype if is_complex else cdt
    _check_activation(act, x.shape, cdt)
    pshape = tuple(x.shape[a] if a in faxes else 1 for a in range(x.ndim))
    mask_b = None if mask is None else _broadcast_mask(mask, x.shape, faxes, raxes)

    if not train:
        mean = jnp.asarray(state.mean).astype(xdt).reshape(pshape)
        a = jax.lax.rsqrt(jnp.asarray(state.var).astype(cdt).reshape(pshape) + _const(epsilon, cdt))
        if scale is not None:
            a = a * jnp.asarray(scale).astype(cdt).reshape(pshape)
        pre = (x.astype(xdt) - mean) * a.astype(xdt)
        if bias is not None:
            pre = pre + jnp.asarray(bias).astype(xdt).reshape(pshape)
        y = pre if act is None else act(pre)
        return y.astype(out_dtype), state

    if axis_name is not None:
        _check_axis_name_bound(axis_name)
    if x.size == 0:
        # No value to take statistics from: as a fully masked batch, the state stays as it is
        # (count included), and y is empty (flax's statistics would be NaN). Every member of a
        # mapped axis has the same shape, so all of them return here together.
        return x.astype(out_dtype), state
    # Ghost batch norm: axis 0 becomes (groups, virtual batch); groups are normalised separately.
    shape = x.shape
    if virtual_batch_size is not None:
        x, mask_b, faxes, raxes, pshape = _split_virtual(
            x, mask_b, faxes, raxes, pshape, virtual_batch_size
        )
    per_feature = math.prod(x.shape[a] for a in raxes)
    if refuse_single_value and per_feature <= 1 and axis_name is None:
        raise ValueError(
            "train-mode batch norm with refuse_single_value=True needs more than one value per "
            f"feature, but x of shape {shape} gives {per_feature} per feature (reducing over "
            f"axes {raxes}"
            + (f" of each virtual batch of {virtual_batch_size}" if virtual_batch_size else "")
            + "); use train=False, a larger batch, or axis_name to pool devices"
        )
    ghost = virtual_batch_size is not None
    groups = (
        None
        if axis_index_groups is None
        else tuple(tuple(int(i) for i in g) for g in axis_index_groups)
    )
    cfg = _Config(
        raxes=raxes,
        axis_name=None if ghost else axis_name,
        groups=groups,
        activation=act,
        renorm=bool(renorm),
        ghost=ghost,
        out_dtype=out_dtype,
    )
    static = _Static(
        cfg=cfg,
        is_complex=bool(is_complex),
        shape=shape,
        fshape=fshape,
        pshape=pshape,
        cdt=np.dtype(cdt),
        unbiased=bool(unbiased_running_var),
        cumulative=bool(cumulative),
        axis_name=axis_name,
    )
    scalars = {"epsilon": epsilon, "momentum": momentum}
    if renorm:
        scalars.update(r_max=r_max, d_max=d_max)
    return _run_train((x, scale, bias, state, mask_b), scalars, static)


class _Static(NamedTuple):
    """What the training program is specialised on, besides its arrays' shapes and dtypes."""

    cfg: _Config
    is_complex: bool
    shape: tuple[int, ...]
    fshape: tuple[int, ...]
    pshape: tuple[int, ...]
    cdt: np.dtype
    unbiased: bool
    cumulative: bool
    axis_name: Any


def _run_train(arrays, scalars, static):
    """The training computation as one compiled program (cached per shape, dtype and options).

    Called eagerly, batch norm then dispatches one executable, as ``jax.nn``'s jitted functions
    do, instead of some hundred small ones (each compiled on first use, and a ``lax.cond``
    retraced on every call: 120 ms a call on a CPU, against about 1 ms); under an outer
    ``jax.jit`` the inner program is inlined. Python scalars (epsilon, momentum, r_max, d_max)
    are compile-time constants, as written; arrays (also traced ones) are arguments. An
    activation that cannot be hashed runs without the inner jit.
    """
    fixed = tuple((k, v) for k, v in scalars.items() if _is_static_scalar(v))
    dynamic = {k: v for k, v in scalars.items() if not _is_static_scalar(v)}
    try:
        hash((fixed, static))
    except TypeError:
        return _train(arrays, dynamic, fixed, static)
    return _train_jit(arrays, dynamic, fixed, static)


def _is_static_scalar(v) -> bool:
    return isinstance(v, int | float | np.generic)


def _train(arrays, dynamic, fixed, static):
    x, scale, bias, state, mask_b = arrays
    scalars = {**dict(fixed), **dynamic}
    epsilon, momentum = scalars["epsilon"], scalars["momentum"]
    cfg, cdt, fshape, pshape = static.cfg, static.cdt, static.fshape, static.pshape
    ghost = cfg.ghost
    ones = jnp.ones(fshape, cdt)
    scale_a = ones if scale is None else jnp.asarray(scale)
    bias_a = jnp.zeros(fshape, cdt) if bias is None else jnp.asarray(bias)
    masks = () if mask_b is None else (mask_b,)
    if static.is_complex:
        y, (bmean, bvar, bcount) = _complex_train(
            cfg, x, scale_a.reshape(pshape), bias_a.reshape(pshape), _const(epsilon, cdt), mask_b
        )
    else:
        ref_mean = jax.lax.stop_gradient(jnp.asarray(state.mean)).astype(cdt).reshape(pshape)
        ref_var = jax.lax.stop_gradient(jnp.asarray(state.var)).astype(cdt).reshape(pshape)
        # ref_var is always passed: a feature with no valid position takes the running statistics.
        extras = (
            (ref_var, jnp.asarray(scalars["r_max"], cdt), jnp.asarray(scalars["d_max"], cdt))
            if cfg.renorm
            else (ref_var,)
        )
        y, (bmean, bvar, bcount) = _train_op(
            cfg,
            x,
            scale_a.reshape(pshape),
            bias_a.reshape(pshape),
            _const(epsilon, cdt),
            ref_mean,
            masks,
            extras,
        )
    y = y.reshape(static.shape)
    new_state = _update_state(
        state,
        jax.lax.stop_gradient(bmean),
        jax.lax.stop_gradient(bvar),
        jax.lax.stop_gradient(bcount),
        fshape=fshape,
        momentum=momentum,
        unbiased=static.unbiased,
        cumulative=static.cumulative,
        ghost=ghost,
        axis_name=static.axis_name if ghost else None,
        groups=cfg.groups,
    )
    return y, new_state


_train_jit = jax.jit(_train, static_argnums=(2, 3))


class _Config(NamedTuple):
    raxes: tuple[int, ...]
    axis_name: Any
    groups: tuple[tuple[int, ...], ...] | None
    activation: Callable | None
    renorm: bool
    ghost: bool
    out_dtype: np.dtype


def _const(v, dtype):
    return jax.lax.stop_gradient(jnp.asarray(v).astype(dtype))


# The pivot is the mean of this many examples spread over the batch (see _pivot).
_PIVOT_SAMPLE = 64
# The one-pass variance about a pivot k is kept when (mean - k)^2 <= _MAX_SHIFT * var: its
# rounding error is then at most about 1 + c + 2 sqrt(c (1 + c)) <= 4.9 times that of the sums
# of a two-pass variance (c = (mean - k)^2 / var, see _moments). Otherwise a pass about the mean
# recomputes it.
_MAX_SHIFT = 1.0
# Passes about the mean at most. Each multiplies c by about (g eps)^2 ~ 1e-12 (g the sums'
# error growth): one is enough for any pivot within the data's range (c <= n), the second
# covers a pivot of 0 for a feature whose valid values an elementwise mask hides from the
# sample and the first valid example (c = mean^2 / var, up to ~1e24). Each level is one more
# branch to compile.
_MAX_REFINE = 2
# Squares of deviations that overflowed are summed scaled by this power of two (exact): the
# sum of n scaled squares is below n * var * 2**-64, finite for any float32 var and n < 2**64.
_OVERFLOW_SCALE = 2.0**-32


def _moments(cfg: _Config, x, xc, mask):
    """Per-feature (mean, biased var, count) over cfg.raxes (keepdims), global over devices.

    One pass: sums of (x - k) and (x - k)^2 about a pivot k (:func:`_pivot`: the mean of a
    sample of the batch), so that E[(x-k)^2] - E[x-k]^2 has no catastrophic cancellation (the
    textbook E[x^2] - E[x]^2 loses everything when |mean| >> std). Its rounding error is that
    of the sums times at most 1 + c + 2 sqrt(c (1 + c)), c = (mean - k)^2 / var: for
    ``c <= _MAX_SHIFT`` it is within a small factor of a two-pass variance's. The statistics
    themselves measure c (when cancellation ruins the variance, c comes out large, not small),
    so a feature whose c is larger, or whose squares overflowed, is recomputed by
    :func:`_refine` about the mean, under a ``lax.cond`` that costs nothing when no feature of
    the batch (of any device, of any vmapped member) needs it.
    ``x`` is the input, ``xc`` the same values in the compute dtype.
    """
    cdt = xc.dtype
    xin = x
    # The pivot and each sum read x through their own _apart view of it (see there).
    if x.dtype != cdt:
        x = jax.lax.optimization_barrier(x)
        xc = None
    k = jax.lax.stop_gradient(_pivot(x, mask, cfg.raxes, cdt, cfg.ghost))
    if xc is None:
        xc, k = _apart(x, cdt, k)
    xs = xc - k
    if mask is None:
        n = jnp.asarray(float(math.prod(xc.shape[a] for a in cfg.raxes)), xc.dtype)
    else:
        xs = jnp.where(mask, xs, jnp.zeros((), xc.dtype))
        n = jnp.sum(mask.astype(xc.dtype), axis=cfg.raxes, keepdims=True)
    s1 = jnp.sum(xs, axis=cfg.raxes, keepdims=True)
    # x - k again, from values XLA cannot identify with the ones above: each sum then computes
    # x - k inside its own reduction, where a shared x - k would be materialised (one more write
    # and read of x-sized data; on CPU a reduction fuses its producer only when it is the sole
    # consumer).
    xc2, k2 = _apart(x, cdt, k)
    xs2 = xc2 - k2
    if mask is not None:
        xs2 = jnp.where(mask, xs2, jnp.zeros((), xc.dtype))
    s2 = jnp.sum(xs2 * xs2, axis=cfg.raxes, keepdims=True)
    one = jnp.ones((), xc.dtype)
    shift = s1 / jnp.maximum(n, one)
    mean = k + shift
    m2 = jnp.maximum(s2 - s1 * shift, jnp.zeros((), xc.dtype))
    lost = _lost(shift, m2, n)
    if cfg.axis_name is not None:
        # One collective: every device's (count, mean, M2) lands in its own slot of a psum (an
        # all-gather whose result is the same on every device), then the triples are merged
        # exactly (Chan et al.): M2 = sum M2_i + sum n_i (mean_i - mean)^2, no shared pivot needed.
        # Each device's precision flag rides along, so that all of them agree on a refinement.
        n = jnp.broadcast_to(n, mean.shape)
        g = _rows.gather_by_psum(
            jnp.stack([n, mean, m2, lost.astype(cdt)]), cfg.axis_name, cfg.groups
        )
        ns, means, m2s = g[:, 0], g[:, 1], g[:, 2]
        n = jnp.sum(ns, axis=0)
        mean = jnp.sum(ns * means, axis=0) / jnp.maximum(n, one)
        dev = means - mean[None]
        m2 = jnp.sum(m2s, axis=0) + jnp.sum(ns * dev * dev, axis=0)
        lost = jnp.any(g[:, 3] > 0, axis=0)
    var = m2 / jnp.maximum(n, one)
    mean, var = _refine(cfg, xin, mask, mean, var, n, lost, _MAX_REFINE)
    return mean, var, n


def _lost(shift, m2, n):
    """True where the variance about a pivot ``mean - shift`` may have lost precision.

    That is where ``shift^2 > _MAX_SHIFT * var`` (``m2 = n var``) or the squares overflowed
    (m2 infinite). A non-finite shift means non-finite data (finite data whose variance is a
    float has finite sums of x - k): nothing to refine, the NaN propagates.
    """
    bound = jnp.asarray(_MAX_SHIFT, m2.dtype) * m2
    precise = (shift * shift * n <= bound) & jnp.isfinite(m2)
    return jnp.isfinite(shift) & ~precise


def _refine(cfg, x, mask, mean, var, n, lost, passes):
    """(mean, var) recomputed about ``mean`` where ``lost``: a corrected two-pass.

    With d = x - mean (scaled by _OVERFLOW_SCALE where the squares overflowed), the sums of d
    and d^2 give mean + sum(d)/n and (sum(d^2) - sum(d)^2/n)/n (Chan, Golub & LeVeque 1983),
    the float32 two-pass variance with its first-order error removed. Features that are not
    ``lost`` keep their values. Runs only when some feature is lost (a ``lax.cond`` whose
    predicate is the same on every device and, through :func:`_any_unbatched`, unbatched under
    ``vmap``), and again (up to ``passes`` times) while some feature is still off.
    """
    cdt = mean.dtype

    def refine(operands):
        x, mask, mean, var, lost = operands
        one = jnp.ones((), cdt)
        s = jnp.where(jnp.isfinite(var), one, jnp.asarray(_OVERFLOW_SCALE, cdt))
        # Each sum reads x through its own _apart view, as in the first pass: a d shared by
        # both would be an x-sized temporary, allocated with the program even when this branch
        # is not taken (on CPU it pushed the step's temporaries past malloc's mmap threshold).
        t = []
        tag = (mean, s)
        for square in (False, True):
            # The second view's tag is the first's output: identical barriers would be merged.
            xs, tag = _apart(x, cdt, tag)
            m, sc = tag
            d = (xs - m) * sc
            if mask is not None:
                d = jnp.where(mask, d, jnp.zeros((), cdt))
            t.append(jnp.sum(d * d if square else d, axis=cfg.raxes, keepdims=True))
        t1, t2 = t
        if cfg.axis_name is not None:
            t1, t2 = jax.lax.psum(jnp.stack([t1, t2]), cfg.axis_name, axis_index_groups=cfg.groups)
        shift = t1 / jnp.maximum(n, one)
        m2 = jnp.maximum(t2 - t1 * shift, jnp.zeros((), cdt))
        new_mean = mean + shift / s
        new_var = m2 / jnp.maximum(n, one) / (s * s)
        mean = jnp.where(lost, new_mean, mean)
        var = jnp.where(lost, new_var, var)
        lost = lost & _lost(shift, m2, n)
        return _refine(cfg, x, mask, mean, var, n, lost, passes - 1)

    if passes == 0:
        return mean, var
    return jax.lax.cond(
        _any_unbatched(lost), refine, lambda ops: ops[2:4], (x, mask, mean, var, lost)
    )


@jax.custom_batching.custom_vmap
def _any_unbatched(flags):
    """``jnp.any(flags)``, which stays unbatched under ``vmap``: true if any member's is.

    A ``lax.cond`` whose predicate is batched becomes a ``select`` that runs both branches, so
    under ``vmap`` (an ensemble, a vmapped search) the refinement pass would always run.
    """
    return jnp.any(flags)


@_any_unbatched.def_vmap
def _any_unbatched_vmap(axis_size, in_batched, flags):
    del axis_size, in_batched
    return jnp.any(flags), False


def _apart(x, dtype, tag):
    """``(x.astype(dtype), tag)`` through an optimization barrier, so that XLA keeps them apart.

    Each reduction over x then reads x and converts it itself. A conversion of a low-precision x
    that the pivot or the elementwise passes also use is otherwise materialised as an x-sized
    float32 temporary, which on CPU costs more than the whole normalisation (a fresh buffer,
    converted on one thread).
    """
    if x.dtype == dtype:
        return x, jax.lax.optimization_barrier(tag)
    x, tag = jax.lax.optimization_barrier((x, tag))
    return x.astype(dtype), tag


def _pivot(x, mask, raxes, cdt, ghost=False):
    """Per-feature pivot (keepdims, compute dtype): the mean of a sample of valid examples.

    The sample is _PIVOT_SAMPLE examples spread over the batch (:func:`_rows.sample_rows`, one
    small gather), averaged about its first valid value r0: ``k = r0 + mean(x_s - r0)``, so a
    constant feature gets its constant exactly and the sum cannot overflow. For the one-pass
    variance what matters is c = (mean - k)^2 / var: at most n / m for a sample of m examples
    (Cauchy-Schwarz), about 1 / m for independent rows, where the first row's value (the pivot
    before) had c = z^2, ~1 on average and as large as n for an outlier. Ghost batches (an
    unreduced, non-feature axis 0) get one each. A feature with no valid example in the sample
    takes its first valid example (:func:`_first_valid`).
    """
    xs, sax = _rows.sample_rows(x, raxes, _PIVOT_SAMPLE)
    xs = xs.astype(cdt)
    keep = tuple(1 if a in raxes else d for a, d in enumerate(x.shape))
    zero = jnp.zeros((), cdt)
    if mask is None:
        r0 = jax.lax.index_in_dim(xs, 0, sax, keepdims=True)
        return (r0 + jnp.mean(xs - r0, axis=sax, keepdims=True)).reshape(keep)
    ms = jnp.broadcast_to(_rows.sample_rows(mask, raxes, _PIVOT_SAMPLE)[0], xs.shape)
    r0 = jnp.take_along_axis(xs, jnp.argmax(ms, axis=sax, keepdims=True), axis=sax)
    count = jnp.sum(ms, axis=sax, keepdims=True, dtype=cdt)
    # where, not a product: masked examples may hold NaN padding.
    total = jnp.sum(jnp.where(ms, xs - r0, zero), axis=sax, keepdims=True)
    k = (r0 + total / jnp.maximum(count, jnp.ones((), cdt))).reshape(keep)
    return jnp.where(count.reshape(keep) > 0, k, _first_valid(x, mask, raxes, ghost, cdt))


def _first_valid(x, mask, raxes, ghost, cdt):
    """x at the first example valid for some feature, 0 where it is not valid for that one."""
    if ghost:
        inner = tuple(a - 1 for a in raxes)
        return jax.vmap(lambda xg, mg: _first_valid(xg, mg, inner, False, cdt))(x, mask)
    feat = tuple(a for a in range(x.ndim) if a not in raxes)
    valid = jnp.any(mask, axis=feat, keepdims=True) if feat else mask
    row = _rows.first_row(x, valid, raxes)[0].astype(cdt)
    # An elementwise mask may leave this feature invalid (NaN padding) in that example.
    ok = _rows.first_row(mask, valid, raxes)[0]
    return jnp.where(ok, row, jnp.zeros((), cdt))


def _forward_parts(cfg, x, scale, bias, epsilon, ref_mean, masks, extras):
    cdt = _compute_dtype(x)
    xc = x.astype(cdt)
    mask = masks[0] if masks else None
    mean, var, n = _moments(cfg, x, xc, mask)
    if mask is not None:
        # A feature with no valid position (fully masked) has no batch statistics: it is
        # normalised with the running ones, as in evaluation (flax gives NaN). They are constants,
        # so the tangent below (whose batch sums are 0 for such a feature) stays exact.
        empty = n <= 0
        mean = jnp.where(empty, ref_mean, mean)
        var = jnp.where(empty, extras[0], var)
    inv_std = jax.lax.rsqrt(var + epsilon)
    gain = scale.astype(cdt)
    shift = bias.astype(cdt)
    rd = ()
    if cfg.renorm:
        ref_var, r_max, d_max = extras
        # r and d are constants for the gradient (Ioffe 2017, section 3).
        ref_inv_std = jax.lax.rsqrt(ref_var + epsilon)
        sigma_b = (var + epsilon) * inv_std
        r = jax.lax.stop_gradient(jnp.clip(sigma_b * ref_inv_std, 1 / r_max, r_max))
        d = jax.lax.stop_gradient(jnp.clip((mean - ref_mean) * ref_inv_std, -d_max, d_max))
        shift = shift + gain * d
        gain = gain * r
        rd = (r, d)
    return xc, mask, mean, var, n, inv_std, gain, shift, rd


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _train_op(cfg, x, scale, bias, epsilon, ref_mean, masks, extras):
    xc, _, mean, var, n, inv_std, gain, shift, _ = _forward_parts(
        cfg, x, scale, bias, epsilon, ref_mean, masks, extras
    )
    pre = (xc - mean) * (inv_std * gain) + shift
    y = pre if cfg.activation is None else cfg.activation(pre)
    return y.astype(cfg.out_dtype), (mean, var, n)


def _is_zero(t) -> bool:
    return isinstance(t, jax.custom_derivatives.SymbolicZero)


def _train_op_jvp(cfg, primals, tangents):
    x, scale, bias, epsilon, ref_mean, masks, extras = primals
    x_dot, scale_dot, bias_dot = tangents[:3]
    xc, _, mean, var, n, inv_std, gain, shift, rd = _forward_parts(
        cfg, x, scale, bias, epsilon, ref_mean, masks, extras
    )
    pre = (xc - mean) * (inv_std * gain) + shift
    y = pre if cfg.activation is None else cfg.activation(pre)
    # The tangent map is recomputed from x and the per-feature statistics under remat: its
    # residuals are x and a few [features] arrays, never x-hat or the pre-activation.
    y_dot = jax.checkpoint(functools.partial(_tangent, cfg, cfg.out_dtype))(
        x,
        masks,
        mean,
        inv_std,
        n,
        gain,
        shift,
        rd,
        None if _is_zero(x_dot) else x_dot,
        None if _is_zero(scale_dot) else scale_dot,
        None if _is_zero(bias_dot) else bias_dot,
    )
    stats = (mean, var, n)
    if y_dot is None:
        y_dot = jnp.zeros_like(y, dtype=cfg.out_dtype)
    return (y.astype(cfg.out_dtype), stats), (y_dot, jax.tree_util.tree_map(jnp.zeros_like, stats))


_train_op.defjvp(_train_op_jvp, symbolic_zeros=True)


def _tangent(
    cfg, out_dtype, x, masks, mean, inv_std, n, gain, shift, rd, x_dot, scale_dot, bias_dot
):
    """The JVP of y, linear in (x_dot, scale_dot, bias_dot), so JAX transposes it for the VJP.

    d xhat = inv_std * (t - mean_B(t) - xhat * mean_B(t * xhat)) is the derivative through the
    batch statistics (Ioffe & Szegedy 2015, section 3); masked rows feed no statistic.
    """
    cdt = mean.dtype
    xc = x.astype(cdt)
    xhat = (xc - mean) * inv_std
    mask = masks[0] if masks else None
    # d_pre = t * a + c0 + xhat * c1 with per-feature c0, c1 collecting every term. Combining
    # them before touching x-sized data makes the transposed (backward) map reduce exactly two
    # things, sum(dy) and sum(dy * xhat), shared by dx, dscale and dbias.
    d_pre = None
    c0 = c1 = None

    def add(c, v):
        return v if c is None else c + v

    if x_dot is not None:
        t = x_dot.astype(cdt)
        tm = t if mask is None else jnp.where(mask, t, jnp.zeros((), cdt))
        s1 = jnp.sum(tm, axis=cfg.raxes, keepdims=True)
        # As in _moments: x - mean computed inside this sum, not shared with d_pre below. The
        # sum is of t * xhat, not (sum of t * (x - mean)) * inv_std: its transpose then scales
        # the cotangent by a_n once, where the other order made a_n * inv_std ~ 1 / var, which
        # flushes to 0 for var near float32's largest (x ~ 1e19), and dx lost that term.
        xc2, (mean2, inv2) = _apart(x, cdt, (mean, inv_std))
        s2 = jnp.sum(tm * ((xc2 - mean2) * inv2), axis=cfg.raxes, keepdims=True)
        if cfg.axis_name is not None:
            # One collective for both sums (its transpose is again one collective).
            s1, s2 = jax.lax.psum(jnp.stack([s1, s2]), cfg.axis_name, axis_index_groups=cfg.groups)
        a = inv_std * gain
        a_n = a / jnp.maximum(n, jnp.ones((), cdt))
        # Every row's output moves with the statistics; only valid rows moved them (tm above).
        d_pre = t * a
        c0 = -s1 * a_n
        c1 = -s2 * a_n
    if scale_dot is not None:
        sd = scale_dot.astype(cdt)
        c1 = add(c1, sd * rd[0] if rd else sd)
        if rd:
            c0 = add(c0, sd * rd[1])
    if bias_dot is not None:
        c0 = add(c0, bias_dot.astype(cdt))
    if c1 is not None:
        d_pre = add(d_pre, xhat * c1)
    if c0 is not None:
        d_pre = add(d_pre, jnp.broadcast_to(c0, xc.shape))
    if d_pre is None:
        return None
    if cfg.activation is not None:
        # The same expression as the forward, so the activation's kinks fall on the same side.
        # The barrier keeps the per-feature terms separate small arrays that the fusions take
        # as operands (recomputed inside them, x - mean was written out as a temporary on CPU),
        # and this conversion of a low-precision x apart from xhat's (shared, it was written
        # out as an x-sized float32 array).
        xp, (mb, ab, sb) = jax.lax.optimization_barrier((x, (mean, inv_std * gain, shift)))
        pre = (xp.astype(cdt) - mb) * ab + sb
        d_pre = _activation_jvp(cfg.activation, pre, d_pre)
    return d_pre.astype(out_dtype)


def _rectifier_slope(activation) -> float | None:
    """The negative slope of a rectifier (relu: 0, leaky_relu: s), None for other activations."""
    from jaxnorm import activations

    if activation in (activations.relu, jax.nn.relu):
        return 0.0
    if activation is activations.leaky_relu:
        return 0.01
    if (
        isinstance(activation, functools.partial)
        and activation.func is activations.leaky_relu
        and not activation.args
        and set(activation.keywords) == {"negative_slope"}
        and isinstance(activation.keywords["negative_slope"], int | float)
    ):
        return float(activation.keywords["negative_slope"])
    return None


def _activation_jvp(activation, pre, t):
    """The activation's tangent at ``pre``: ``activation'(pre) * t``.

    For relu and leaky_relu the derivative (1 above 0, positive subnormals included; 0, or the
    slope s, at and below 0; NaN at NaN), is :func:`jaxnorm.activations.relu`'s, written without
    a select: XLA:CPU fuses the backward reductions (sum(dy), sum(dy * xhat)) into library
    kernels that take arithmetic but not select, so ``where(pre > 0, dy, 0)`` was a separate
    fusion, with x - mean written out for it. The step is read from pre's bits, as the
    activations read the sign: as a signed integer of the same width, a float is >= 1 exactly
    when its sign bit is clear and it is not +0, so ``clip(bits, 0, 1)`` is 1 for every pre > 0.
    Arithmetic cannot tell: XLA:CPU takes a subnormal operand as 0, so the former
    ``min(max(pre, 0) * 2**126, 1)`` gave 0 for a positive subnormal pre where relu's derivative
    is 1 (and a fraction of 1 where subnormals are kept, on GPU). ``min(max(pre, 0), 0)`` is 0,
    or NaN where pre is NaN (max and min propagate NaN): added, NaN reaches the gradient as
    through relu's own derivative.
    """
    slope = _rectifier_slope(activation)
    if slope is None:
        return jax.jvp(activation, (pre,), (t,))[1]
    ints = {2: jnp.int16, 4: jnp.int32, 8: jnp.int64}[pre.dtype.itemsize]
    bits = jax.lax.bitcast_convert_type(pre, ints)
    positive = jnp.clip(bits, 0, 1).astype(pre.dtype)
    zero = jnp.zeros((), pre.dtype)
    step = positive + jnp.minimum(jnp.maximum(pre, zero), zero)
    if slope == 0.0:
        return t * step
    # s * (1 - step) + step: exactly 1 above 0 and s below, with no rounding of s + (1 - s).
    s = jnp.asarray(slope, pre.dtype)
    return t * (s * (1 - step) + step)


def _complex_train(cfg, x, scale, bias, epsilon, mask):
    """Batch norm of complex x, as flax.linen computes it: ``mean = E[x]`` (complex),
    ``var = E[|x - mean|^2]`` (real), ``y = (x - mean) * scale / sqrt(var + eps) + bias``.

    The statistics' values come from :func:`_moments` on x's (real, imaginary) pairs, a trailing
    axis of two that is not reduced: ``E|x - mean|^2`` is the sum of the two parts' variances.
    Their gradient comes from one corrected two-pass about that (constant) mean c:
    ``mean = c + E[d]`` and ``var = E[|d|^2] - |E[d]|^2`` with ``d = x - c``, an identity in x
    whose values equal the accurate ones to rounding, differentiated by JAX itself (a complex
    x takes none of the fused real path's custom rule). Returns ``(y, (mean, var, count))``.
    """
    rdt = epsilon.dtype
    xdt = x.dtype
    xr = jax.lax.stop_gradient(jnp.stack([jnp.real(x), jnp.imag(x)], axis=-1))
    mr = None if mask is None else jnp.broadcast_to(mask[..., None], xr.shape)
    mean_r, _, n = _moments(cfg, xr, xr, mr)
    n = n if n.ndim == 0 else n[..., 0]
    c = jax.lax.stop_gradient(jax.lax.complex(mean_r[..., 0], mean_r[..., 1]))
    d = x - c
    if mask is not None:
        d = jnp.where(mask, d, jnp.zeros((), xdt))
    s1 = jnp.sum(d, axis=cfg.raxes, keepdims=True)
    s2 = jnp.sum(_abs_sq(d), axis=cfg.raxes, keepdims=True)
    if cfg.axis_name is not None:
        s1, s2 = jax.lax.psum((s1, s2), cfg.axis_name, axis_index_groups=cfg.groups)
    count = jnp.maximum(n, jnp.ones((), rdt))
    shift = s1 / count.astype(xdt)
    mean = c + shift
    var = jnp.maximum(s2 / count - _abs_sq(shift), jnp.zeros((), rdt))
    gain = jax.lax.rsqrt(var + epsilon) * scale.astype(rdt)
    y = (x - mean) * gain.astype(xdt) + bias.astype(rdt).astype(xdt)
    stats = (jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var), n)
    return y.astype(cfg.out_dtype), stats


def _abs_sq(z):
    """|z|^2 of a complex array, without the square root of abs."""
    return jnp.real(z) * jnp.real(z) + jnp.imag(z) * jnp.imag(z)


def _real_dtype(dtype) -> np.dtype:
    """The real dtype of a complex one's parts (complex64: float32)."""
    return np.dtype(np.finfo(np.dtype(dtype)).dtype)


def _check_complex_options(act, renorm):
    if act is not None:
        raise TypeError(
            f"activation={act!r} cannot be fused into batch norm of complex x (a fused "
            "activation is real): apply it after batch_norm"
        )
    if renorm:
        raise TypeError(
            "renorm=True is not defined for complex x (its r and d clip real ratios): use "
            "renorm=False"
        )


def _update_state(
    state, bmean, bvar, bcount, *, fshape, momentum, unbiased, cumulative, ghost, axis_name, groups
):
    sdt = jnp.asarray(state.mean).dtype
    mdt = bmean.dtype
    if jnp.issubdtype(mdt, jnp.complexfloating):
        # Complex x makes the running mean complex, as flax.linen's does (the variance is real):
        # the promotion of the stored dtype with the batch mean's.
        wide = jnp.finfo(sdt).bits > 32 or jnp.finfo(mdt).bits > 32
        sdt = np.dtype(np.complex128 if wide else np.complex64)
    # Counts, weights and variances are real (bvar's dtype); only the mean may be complex.
    one = jnp.ones((), bvar.dtype)
    bcount = jnp.broadcast_to(bcount, bvar.shape)
    if unbiased:
        bvar = jnp.where(bcount > one, bvar * bcount / jnp.maximum(bcount - one, one), bvar)
    if ghost:
        # As Keras: the running statistics follow the average of the virtual batches' statistics.
        w = (bcount > 0).astype(bvar.dtype)
        total = jnp.maximum(jnp.sum(w, axis=0), one)
        bmean = jnp.sum(w.astype(mdt) * bmean, axis=0) / total.astype(mdt)
        bvar = jnp.sum(w * bvar, axis=0) / total
        bcount = jnp.sum(bcount, axis=0)
        if axis_name is not None:
            bmean, bvar = jax.lax.pmean((bmean, bvar), axis_name, axis_index_groups=groups)
            bcount = jax.lax.psum(bcount, axis_name, axis_index_groups=groups)
    bmean = bmean.reshape(fshape)
    bvar = bvar.reshape(fshape)
    valid = bcount.reshape(fshape) > 0
    old_mean = jnp.asarray(state.mean).astype(mdt)
    old_var = jnp.asarray(state.var).astype(bvar.dtype)
    count = jnp.asarray(state.count)
    if cumulative:
        w = one / (count.astype(bvar.dtype) + one)
        keep = one - w
    else:
        keep = jnp.asarray(momentum).astype(bvar.dtype)
        # 1 - momentum in Python for a Python momentum, as flax computes it: 1 - float32(0.9) is
        # 0.100000024, float32(1 - 0.9) is 0.1.
        w = jnp.asarray(1.0 - momentum if isinstance(momentum, int | float) else one - keep)
        w = w.astype(bvar.dtype)
    # keep * old + w * batch, as flax and torch write it: exact at the ends (momentum 0 or 1,
    # the first cumulative step), where old + w * (batch - old) would round old + (batch - old).
    new_mean = keep.astype(mdt) * old_mean + w.astype(mdt) * bmean
    new_var = keep * old_var + w * bvar
    # A batch with no valid row (all masked) leaves the statistics as they were, and is not
    # counted (the count is the cumulative average's denominator).
    new_mean = jnp.where(valid, new_mean, old_mean)
    new_var = jnp.where(valid, new_var, old_var)
    new_count = count + jnp.any(valid).astype(count.dtype)
    return BatchNormState(
        jax.lax.stop_gradient(new_mean.astype(sdt)),
        jax.lax.stop_gradient(new_var.astype(jnp.asarray(state.var).dtype)),
        jax.lax.stop_gradient(new_count),
    )


# --------------------------------------------------------------------------- validation helpers


def _out_dtype(x, dtype):
    if dtype is None:
        return x.dtype
    complex_x = jnp.issubdtype(x.dtype, jnp.complexfloating)
    kind = "complex" if complex_x else "floating"
    try:
        out = np.dtype(dtype)
    except TypeError as e:
        raise TypeError(f"dtype must be a {kind} dtype (the dtype of y), got {dtype!r}") from e
    if not jnp.issubdtype(out, jnp.complexfloating if complex_x else jnp.floating):
        raise TypeError(
            f"dtype must be a {kind} dtype (the dtype of y) for {x.dtype} x, got {out}"
            + ("; take jnp.real(y) or jnp.abs(y) after batch_norm" if complex_x else "")
        )
    return out


def _axis_str(axis) -> str:
    return str(axis) if isinstance(axis, int | np.integer) else str(tuple(axis))


def _compute_dtype(*arrays):
    """The widest floating dtype among the arrays, at least float32.

    Not jnp.promote_types: it raises for bfloat16 + float32 under strict dtype promotion.
    """
    dt = jnp.dtype(jnp.float32)
    for a in arrays:
        if a is not None:
            d = jnp.dtype(jnp.result_type(a))
            if jnp.issubdtype(d, jnp.floating) and jnp.finfo(d).bits > jnp.finfo(dt).bits:
                dt = d
    return dt


def _check_momentum(momentum, name):
    """A scalar in [0, 1], Python, NumPy or JAX (checked when concrete: a traced one is not)."""
    _check_scalar(momentum, name, "a number in [0, 1]")
    if _checks.is_tracer(momentum):
        return
    m = float(momentum)
    if not 0.0 <= m <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {m}")


def _check_scalar(v, name, what):
    """A real scalar (Python, NumPy or JAX, traced or not); TypeError/ValueError otherwise."""
    if isinstance(v, bool | np.bool_ | str | np.str_) or not (
        isinstance(v, int | float | np.integer | np.floating) or hasattr(v, "shape")
    ):
        raise TypeError(f"{name} must be {what}, got {type(v).__name__}")
    if np.ndim(v) != 0:
        raise ValueError(f"{name} must be a scalar, {what}, got an array of shape {np.shape(v)}")
    dtype = jnp.result_type(v)
    if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
        raise TypeError(f"{name} must be {what}, got an array of dtype {dtype}")


def _check_renorm_bounds(r_max, d_max, renorm):
    # Shapes always (a per-feature bound is not defined); values when renorm uses them and they
    # are concrete: a traced schedule (r_max rising from 1) is the caller's to keep sane.
    _check_scalar(r_max, "r_max", "a number >= 1")
    _check_scalar(d_max, "d_max", "a number >= 0")
    if not renorm:
        return
    if not _checks.is_tracer(r_max) and not float(r_max) >= 1.0:
        raise ValueError(f"r_max must be >= 1 (r is clipped to [1/r_max, r_max]), got {r_max}")
    if not _checks.is_tracer(d_max) and not float(d_max) >= 0.0:
        raise ValueError(f"d_max must be >= 0 (d is clipped to [-d_max, d_max]), got {d_max}")


# The smallest epsilon accepted: float32's smallest normal number. A subnormal one is flushed to
# 0 on CPU (and most accelerators), where var + epsilon = 0 for a constant feature.
_MIN_EPSILON = float(np.finfo(np.float32).tiny)


def _check_epsilon(epsilon, name="epsilon"):
    """epsilon: a positive, finite scalar (checked when concrete: a traced one is not)."""
    _check_scalar(epsilon, name, "a positive number")
    if _checks.is_tracer(epsilon):
        return
    e = float(epsilon)
    if not (math.isfinite(e) and e >= _MIN_EPSILON):
        raise ValueError(
            f"{name} must be a positive, finite number (at least {_MIN_EPSILON:.3g}, the smallest "
            f"normal float32), got {e}: it keeps 1 / sqrt(var + {name}) finite for a constant "
            f"feature (var = 0), which {name}=0 would divide by zero (flax's and PyTorch's "
            "default is 1e-5)"
        )


def _check_axis_name_bound(axis_name):
    """NameError, raised here and naming ``axis_name``, for a mapped axis that is not bound.

    Inside JAX the first collective would raise it, with a message about ``axis_index``, which
    the caller never called. The type stays NameError (flax's, for code that catches it).
    """
    names = axis_name if isinstance(axis_name, tuple | list) else (axis_name,)
    unbound = []
    for name in names:
        try:
            jax.lax.axis_size(name)
        except NameError:
            unbound.append(name)
    if unbound:
        listed = ", ".join(repr(n) for n in unbound)
        name = unbound[0]
        raise NameError(
            f"batch_norm's axis_name={axis_name!r} names a mapped axis whose devices share "
            f"the batch statistics, but no axis {listed} is bound here. Call batch_norm (or "
            f"the model) inside jax.shard_map over a mesh with an axis named {name!r}, with "
            f"the batch split along it (in_specs=P({name!r})), or inside "
            f"jax.vmap/jax.pmap(..., axis_name={name!r}); or, under jax.jit with x sharded "
            "over the batch, pass axis_name=None: XLA then makes the statistics global "
            "itself (docs/batchnorm_modules.md, 'Data parallel')."
        )


def _check_flag(v, name):
    if not isinstance(v, bool | np.bool_):
        raise TypeError(f"{name} must be a bool (True or False), got {v!r}")


def _check_param_shape(p, fshape, name, what, allow_complex=False):
    if p is None:
        return
    _checks.check_array(p, name)
    if not (allow_complex and jnp.issubdtype(jnp.result_type(p), jnp.complexfloating)):
        _checks.check_floating(p, name)
    pshape = tuple(jnp.shape(p))
    if pshape != tuple(fshape):
        if len(pshape) == 1 and len(fshape) == 1:
            raise ValueError(f"{name} has {pshape[0]} features but {what} has {fshape[0]}")
        raise ValueError(f"{name} has shape {pshape} but {what} is {tuple(fshape)}")


def _check_state_type(state, name="state"):
    if not isinstance(state, BatchNormState):
        got = type(state).__name__
        hint = (
            " (a plain tuple: wrap it, BatchNormState(mean, var, count))"
            if type(state) is tuple
            else ""
        )
        raise TypeError(
            f"{name} must be a BatchNormState(mean, var, count) (see init_state or "
            f"from_torch_state), got {got}{hint}"
        )
    for field in ("mean", "var", "count"):
        _checks.check_array(getattr(state, field), f"{name}.{field}")
    if not jnp.issubdtype(jnp.result_type(state.mean), jnp.complexfloating):
        # A complex running mean is that of complex x (the variance stays real).
        _checks.check_floating(state.mean, f"{name}.mean")
    _checks.check_floating(state.var, f"{name}.var")
    if np.ndim(state.count) != 0:
        raise ValueError(
            f"{name}.count must be a scalar (the number of updates), got shape "
            f"{np.shape(state.count)}"
        )
    if np.shape(state.mean) != np.shape(state.var):
        raise ValueError(
            f"{name}.mean has shape {np.shape(state.mean)} but {name}.var has shape "
            f"{np.shape(state.var)}"
        )
    if not _checks.is_tracer(state.var) and getattr(state.var, "is_fully_addressable", True):
        # A negative running variance would give NaN from finite x (rsqrt of var + epsilon).
        # A traced state (under jit) cannot be checked, nor one spread over other processes.
        var = np.asarray(state.var)
        if np.any(var < 0):
            raise ValueError(
                f"{name}.var must be >= 0 (a variance), but {int(np.sum(var < 0))} of its "
                f"{var.size} values are negative (smallest {var.min()})"
            )


def _check_state(state, fshape, where):
    _check_state_type(state)
    _check_param_shape(state.mean, fshape, "state.mean", where, allow_complex=True)
    _check_param_shape(state.var, fshape, "state.var", where)


def _check_activation(act, shape, dtype):
    """An activation must map an array to one of the same shape and a floating dtype."""
    if act is None:
        return
    try:
        out = jax.eval_shape(act, jax.ShapeDtypeStruct(shape, dtype))
    except Exception as e:
        raise TypeError(
            f"activation {act!r} could not be applied to a {dtype} array of shape {shape}: {e}"
        ) from e
    if not isinstance(out, jax.ShapeDtypeStruct) or out.shape != tuple(shape):
        got = out.shape if isinstance(out, jax.ShapeDtypeStruct) else type(out).__name__
        raise ValueError(
            f"activation must be elementwise (same shape in and out): {act!r} maps shape "
            f"{tuple(shape)} to {got}; apply it after batch_norm"
        )
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise TypeError(
            f"activation must return a floating array (its derivative is used in the "
            f"gradient), but {act!r} returns {out.dtype} for {dtype} input"
        )


# Named activations that are not one-argument elementwise maps: prelu needs its slope, maxout
# changes the feature size.
_NOT_FUSABLE = {
    "prelu": "it needs its slope: pass activation=functools.partial(jaxnorm.prelu, alpha=a)",
    "maxout": "it is not elementwise (it changes the feature size): apply it after batch_norm",
}


def _resolve_activation(activation):
    if activation is None or callable(activation):
        return activation
    if isinstance(activation, str):
        from jaxnorm import activations

        fn = activations.get(activation)
        if fn.__name__ in _NOT_FUSABLE:
            raise ValueError(
                f"activation={activation!r} cannot be fused into batch_norm: "
                f"{_NOT_FUSABLE[fn.__name__]}"
            )
        return fn
    raise TypeError(
        f"activation must be None, a name or a callable, got {type(activation).__name__}"
    )


def _broadcast_mask(mask, xshape, faxes, raxes):
    _checks.check_array(mask, "mask")
    # The values are read from the mask as given: under jit, jnp.asarray of a NumPy mask is a
    # tracer, whose values could not be checked.
    raw = mask
    mask = jnp.asarray(mask)
    batch_shape = tuple(xshape[a] for a in raxes)
    mshape = mask.shape
    if mask.ndim == len(raxes) and len(raxes) != len(xshape):
        full = [1] * len(xshape)
        for a, s in zip(raxes, mshape, strict=True):
            full[a] = s
        mshape_x = tuple(full)
    else:
        mshape_x = mshape
    ok = len(mshape_x) == len(xshape) and all(
        m in (1, s) for m, s in zip(mshape_x, xshape, strict=True)
    )
    if not ok:
        raise ValueError(
            f"mask has shape {mshape}; expected the batch shape {batch_shape} (x's shape "
            f"{tuple(xshape)} without the feature axes {faxes}) or a shape of rank {len(xshape)} "
            "broadcastable to x"
        )
    if not (jnp.issubdtype(mask.dtype, jnp.bool_) or jnp.issubdtype(mask.dtype, jnp.number)):
        raise TypeError(f"mask must be boolean (or 0/1 numbers), got dtype {mask.dtype}")
    if not jnp.issubdtype(mask.dtype, jnp.bool_):
        if _checks.is_tracer(raw) or not getattr(raw, "is_fully_addressable", True):
            # Unknown values (or held by other processes): nonzero counts as True (jnp.where's
            # reading), as documented.
            mask = mask != 0
        else:
            values = np.unique(np.asarray(raw))
            if not np.all((values == 0) | (values == 1)):
                bad = values[(values != 0) & (values != 1)][:3]
                raise ValueError(
                    f"mask must be boolean, or numbers that are all 0 or 1, but it holds "
                    f"{', '.join(str(v) for v in bad)}; pass a bool mask (e.g. weights > 0)"
                )
    mask = mask.reshape(mshape_x).astype(bool)
    target = tuple(xshape[a] if a in raxes else mshape_x[a] for a in range(len(xshape)))
    return jnp.broadcast_to(mask, target)


def _split_virtual(x, mask, faxes, raxes, pshape, vbs):
    if isinstance(vbs, bool) or not isinstance(vbs, int | np.integer) or vbs <= 0:
        raise ValueError(f"virtual_batch_size must be a positive int, got {vbs!r}")
    if 0 in faxes:
        raise ValueError("virtual_batch_size splits axis 0, which must not be a feature axis")
    n = x.shape[0]
    if n % vbs:
        raise ValueError(
            f"virtual_batch_size={vbs} must divide the batch size, but x has {n} rows on axis 0"
        )
    g = n // vbs
    x = x.reshape((g, vbs, *x.shape[1:]))
    if mask is not None:
        mask = mask.reshape((g, vbs, *mask.shape[1:]))
    faxes = tuple(a + 1 for a in faxes)
    raxes = (1, *(a + 1 for a in raxes if a != 0))
    pshape = (1, *pshape)
    return x, mask, faxes, raxes, pshape
