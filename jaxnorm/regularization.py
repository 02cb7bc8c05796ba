"""Regularization: penalties over a parameter pytree, dropout, DropConnect and max-norm.

The lecture's regularizers as pure functions (they run under ``jit``, ``vmap`` and ``grad``):

- :func:`l2_penalty`, :func:`l1_penalty`, :func:`elastic_net_penalty`: terms to add to the data
  loss, summed over the parameters that :func:`weight_decay_mask` selects (kernels; not biases,
  batch-norm scales and offsets, or PReLU slopes) unless another mask is given.
- :func:`dropout`: inverted dropout, bit for bit ``flax.linen.Dropout`` / ``flax.nnx.Dropout``
  for the same key; :func:`drop_connect` drops weights instead of activations (the linen and nnx
  modules are :class:`jaxnorm.nn.DropConnectDense` and :class:`jaxnorm.nnx.DropConnectLinear`).
- :func:`max_norm`: an optax ``GradientTransformation`` that projects each unit's incoming
  weights onto the ball :math:`\\|w_j\\|_2 \\le c` after every update.

This module imports only jax and numpy; :func:`max_norm` imports optax when it is called, so that
``import jaxnorm`` stays free of optax.

>>> import jax.numpy as jnp
>>> from jaxnorm import regularization
>>> params = {"w": jnp.array([[1.0, 2.0], [3.0, 4.0]]), "b": jnp.array([5.0, 6.0])}
>>> regularization.l2_penalty(params, 0.1)  # 0.5 * 0.1 * (1 + 4 + 9 + 16); b is not penalised
Array(1.5, dtype=float32)
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxnorm import _checks

__all__ = [
    "DEFAULT_NO_DECAY",
    "drop_connect",
    "dropout",
    "elastic_net_penalty",
    "l1_penalty",
    "l2_penalty",
    "max_norm",
    "weight_decay_mask",
]

# --------------------------------------------------------------------------- the default mask

# Parameter names that hold biases, norm scales/offsets and activation slopes: decaying them toward
# 0 fights what they are for (He et al. 2015 leave PReLU slopes undecayed; so do most recipes for
# biases and batch-norm parameters).
DEFAULT_NO_DECAY = ("bias", "scale", "negative_slope")


def _leaf_name(path) -> str | None:
    """The innermost name in a pytree path, skipping the fields inside a Variable wrapper."""
    for entry in reversed(path):
        name = getattr(entry, "key", getattr(entry, "name", None))
        if isinstance(name, str) and name not in ("value", "raw_value", "_raw_value"):
            return name
    return None


def weight_decay_mask(
    params: Any, *, exclude: Collection[str] = DEFAULT_NO_DECAY, min_ndim: int = 2
) -> Any:
    """A pytree of bools: True for the parameters weight decay should shrink.

    A leaf is decayed when its name (the last key of its path) is not in ``exclude`` and it has
    at least ``min_ndim`` dimensions. The defaults decay kernels (dense, convolution, embedding
    tables) and leave out biases, batch-norm scales and biases, and PReLU slopes, as He et al.
    2015 advise for the slopes. The mask has the structure of ``params``, so it goes straight to
    ``optax.add_decayed_weights(..., mask=...)`` or ``optax.adamw(..., mask=...)``. It works on
    linen ``params`` dicts, on ``flax.nnx`` ``State`` (``nnx.state(model, nnx.Param)``) and on any
    nested dict; a callable ``mask=lambda p: weight_decay_mask(p)`` works too. It is the default
    mask of :func:`l2_penalty`, :func:`l1_penalty`, :func:`elastic_net_penalty` and
    :func:`max_norm`, and is also exported as ``jaxnorm.nn.weight_decay_mask``.

    Args:
      params: the parameter pytree.
      exclude: leaf names never decayed, a collection of str such as ``("bias",)``.
      min_ndim: leaves with fewer dimensions are never decayed (vectors and scalars); an int
        >= 0.

    Returns:
      A pytree of Python bools with the structure of ``params``.

    Raises:
      TypeError: if exclude is a single str (it would be read as its characters) or holds
        something other than str, or min_ndim is not an int.
      ValueError: if min_ndim is negative.

    References:
      He, Zhang, Ren & Sun 2015, "Delving deep into rectifiers", section 2.2; Loshchilov &
      Hutter 2019, "Decoupled weight decay regularization".

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxnorm import regularization
      >>> params = {"Dense_0": {"kernel": jnp.ones((3, 4)), "bias": jnp.zeros(4)},
      ...           "PReLU_0": {"negative_slope": jnp.full((4,), 0.25)}}
      >>> regularization.weight_decay_mask(params)
      {'Dense_0': {'bias': False, 'kernel': True}, 'PReLU_0': {'negative_slope': False}}
    """
    if isinstance(exclude, str | bytes):
        raise TypeError(
            f"weight_decay_mask: exclude must be a collection of leaf names such as "
            f"({exclude!r},), got the single {type(exclude).__name__} {exclude!r}, which would "
            f"be read as its characters; write exclude=({exclude!r},)"
        )
    try:
        excluded = frozenset(exclude)
    except TypeError:
        raise TypeError(
            f"weight_decay_mask: exclude must be a collection of leaf names (str) such as "
            f"('bias',), got {exclude!r} of type {type(exclude).__name__}"
        ) from None
    wrong = sorted(repr(n) for n in excluded if not isinstance(n, str))
    if wrong:
        raise TypeError(
            f"weight_decay_mask: exclude must hold leaf names (str) such as 'bias', but it holds "
            f"{', '.join(wrong)}"
        )
    if isinstance(min_ndim, bool) or not isinstance(min_ndim, int | np.integer):
        raise TypeError(
            f"weight_decay_mask: min_ndim must be an int (the fewest dimensions a decayed leaf "
            f"has, e.g. 2), got {min_ndim!r} of type {type(min_ndim).__name__}"
        )
    if min_ndim < 0:
        raise ValueError(f"weight_decay_mask: min_ndim must be >= 0, got {min_ndim}")

    def decide(path, leaf) -> bool:
        return _leaf_name(path) not in excluded and jnp.ndim(leaf) >= min_ndim

    return jax.tree_util.tree_map_with_path(decide, params)


# --------------------------------------------------------------------------- masks and checks


def _is_bool(m) -> bool:
    if isinstance(m, bool | np.bool_):
        return True
    return isinstance(m, np.ndarray | jax.Array) and m.shape == () and m.dtype == np.bool_


def _mask_flags(params: Any, mask: Any, who: str) -> tuple[list, list[bool], bool]:
    """Which leaves of ``params`` ``mask`` selects: ``(leaves with paths, flags, explicit)``.

    ``mask`` is None (:func:`weight_decay_mask`), True or False (every leaf or none), a pytree of
    bools with the structure of ``params`` (or a prefix of it, as optax's masks), or a callable
    ``params -> such a pytree``. ``explicit`` is False where the selection came from the default
    or from ``True``: non-floating leaves are then skipped rather than refused.
    """
    explicit = True
    if mask is None:
        mask, explicit = weight_decay_mask(params), False
    elif _is_bool(mask):
        mask, explicit = jax.tree.map(lambda _: bool(mask), params), False
    elif callable(mask):
        mask = mask(params)
    try:
        # A prefix mask (one bool for a whole sub-tree) spreads over the sub-tree, as optax reads
        # it; the paths come from params.
        full = jax.tree.map(
            lambda m, sub: jax.tree.map(lambda _: m, sub), mask, params, is_leaf=_is_bool
        )
    except (ValueError, TypeError) as err:
        raise ValueError(
            f"{who}: mask must have the structure of params (or of a prefix of it), with a bool "
            f"for each leaf; got a mask of structure {jax.tree.structure(mask, is_leaf=_is_bool)} "
            f"for params of structure {jax.tree.structure(params)} ({err})"
        ) from None
    flat_params = jax.tree_util.tree_flatten_with_path(params)[0]
    flat_mask = jax.tree.leaves(full, is_leaf=_is_bool)
    flags = []
    for (path, _), m in zip(flat_params, flat_mask, strict=True):
        if not _is_bool(m):
            raise TypeError(
                f"{who}: mask leaves must be bools (True: regularise this parameter), got "
                f"{m!r} for {jax.tree_util.keystr(path) or 'params'}; a mask must be concrete "
                f"(known when the function is traced)"
            )
        flags.append(bool(m))
    return flat_params, flags, explicit


def _selected(params: Any, mask: Any, who: str) -> list[jax.Array]:
    """The selected real floating leaves, as arrays (others skipped or refused, see above)."""
    flat, flags, explicit = _mask_flags(params, mask, who)
    out = []
    for (path, leaf), flag in zip(flat, flags, strict=True):
        if flag:
            a = _float_leaf(jax.tree_util.keystr(path) or "params", leaf, explicit, who)
            if a is not None:
                out.append(a)
    return out


def _float_leaf(where: str, leaf: Any, explicit: bool, who: str):
    """The leaf as an array when it is a real floating parameter; None when it is skipped."""
    # A str leaf would reach jnp.result_type, which reads it as a dtype name ("abc" -> an
    # error from NumPy that names no leaf); lists and dicts are subtrees, not leaves.
    _checks.check_array(leaf, where)
    dtype = jnp.result_type(leaf)
    if jnp.issubdtype(dtype, jnp.floating):
        return jnp.asarray(leaf)
    if explicit:
        raise TypeError(
            f"{who}: the mask selects {where}, of dtype {dtype}, but only real floating "
            f"parameters can be regularised; leave it out of the mask"
        )
    return None


def _check_strength(value: Any, name: str, who: str) -> None:
    """A regularization strength: a real, finite, non-negative scalar (checked when concrete)."""
    if isinstance(value, bool | np.bool_) or not (
        isinstance(value, int | float | np.integer | np.floating | np.ndarray | jax.Array)
    ):
        raise TypeError(
            f"{who}: {name} must be a non-negative real number such as 1e-4, got {value!r} of "
            f"type {type(value).__name__}"
        )
    if np.ndim(value) != 0:
        raise ValueError(f"{who}: {name} must be a scalar, got shape {np.shape(value)}")
    dtype = jnp.result_type(value)
    if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
        raise TypeError(f"{who}: {name} must be a real number, got dtype {dtype}")
    if _checks.is_tracer(value):
        return  # a traced strength (a searched hyperparameter) cannot be read
    v = float(value)
    if not np.isfinite(v) or v < 0:
        raise ValueError(f"{who}: {name} must be a finite number >= 0, got {v}")


def _common_dtype(arrays) -> np.dtype:
    """The dtype the penalty is reduced and returned in: float32, or float64 for float64 leaves."""
    dtypes = [_checks.compute_dtype(a.dtype) for a in arrays]
    return max(dtypes, key=lambda d: d.itemsize, default=np.dtype(np.float32))


def _power_of_two_scale(w: jax.Array, axis=None) -> jax.Array:
    """2**e with max|w| / 2**e in [0.5, 1): dividing by it is exact and keeps w**2 in range.

    A sum of squares of finite weights overflows float32 from |w| ~ 1.8e19 (float16 from 256
    before the float32 cast); scaled by a power of two it never does, and it loses no bits. The
    scale is a constant for ``grad``: the scaled expression equals the unscaled one for every
    scale, so the gradient is the unscaled gradient (``lam * w`` for the L2 term, exactly).
    """
    m = jnp.max(jnp.abs(w), axis=axis, keepdims=axis is not None, initial=0.0)
    _, e = jnp.frexp(m)
    s = jnp.ldexp(jnp.ones_like(m), e)
    s = jnp.where((m > 0) & jnp.isfinite(m), s, jnp.ones_like(m))
    return jax.lax.stop_gradient(s)


def _abs(w: jax.Array) -> jax.Array:
    # |w| whose derivative at 0 is 0 (the subgradient of least norm, PyTorch's abs'(0)); jax's
    # abs has derivative 1 there, which a gradient check reads as a one-sided derivative.
    return jnp.sign(w) * w


def _sums(params, mask, who, *, squares: bool, absolutes: bool):
    """Per-leaf (sum |w| / s, sum (w/s)**2, s) in the common dtype, for the selected leaves."""
    leaves = _selected(params, mask, who)
    cdt = _common_dtype(leaves)
    parts = []
    for a in leaves:
        w = a.astype(cdt)
        s = _power_of_two_scale(w)
        ws = w / s
        l1 = jnp.sum(_abs(ws)) if absolutes else None
        l2 = jnp.sum(ws * ws) if squares else None
        parts.append((l1, l2, s))
    return parts, cdt


# --------------------------------------------------------------------------- penalties


def l2_penalty(params: Any, lam: ArrayLike, mask: Any = None) -> jax.Array:
    r"""The L2 penalty :math:`\tfrac12\lambda\sum_i w_i^2` over the selected parameters.

    The lecture's convention: the factor 1/2 makes the gradient :math:`\lambda w`, so adding this
    term to the loss is the same as ``optax.add_decayed_weights(lam, mask)`` before the optimizer
    (both add :math:`\lambda w` to the gradient; the test suite checks it leaf by leaf). That is
    L2 regularization, which an adaptive optimizer rescales with the gradient; AdamW's decoupled
    decay (``optax.adamw``, Loshchilov & Hutter 2019) applies :math:`\lambda w` after the
    rescaling instead, and is not the same as this term under Adam. (Keras's
    ``regularizers.L2(l)`` is :math:`l\sum w^2`, without the 1/2: ``l = lam / 2``.)

    Which leaves count: by default (``mask=None``) those :func:`weight_decay_mask` selects,
    kernels of at least two dimensions, leaving out biases, batch-norm scales and offsets, and
    PReLU slopes. ``mask=True`` selects every floating leaf, ``mask=False`` none; a pytree of
    bools with the structure of ``params`` (or a prefix of it, as in optax) or a callable
    ``params -> mask`` chooses exactly. Integer and boolean leaves are not weights: the default
    and ``True`` skip them, an explicit mask that selects one raises.

    Low-precision leaves (bfloat16, float16) are reduced in float32; the sum is scaled by a power
    of two per leaf, so finite weights never overflow it where the penalty itself is finite.

    Args:
      params: a pytree of arrays (a linen ``params`` dict, an ``nnx.State``, a list of dicts).
      lam: :math:`\lambda`, a finite number >= 0 (may be traced, e.g. in a vmapped search; a
        traced value cannot be checked).
      mask: which leaves are penalised (see above).

    Returns:
      A scalar: float32, or float64 when a selected leaf is float64. 0 when no leaf is selected.

    Raises:
      TypeError: if lam is not a real number, a mask leaf is not a bool, or an explicit mask
        selects a non-floating leaf; a selected leaf that is not an array or a number (a str).
      ValueError: if lam is negative, NaN or infinite (when concrete) or not a scalar, or the
        mask's structure does not match params.

    References:
      Krogh & Hertz 1992, "A simple weight decay can improve generalization"; Loshchilov &
      Hutter 2019, "Decoupled weight decay regularization".

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxnorm import regularization
      >>> params = [{"w": jnp.array([[3.0, 4.0]]), "b": jnp.array([1.0])}]
      >>> regularization.l2_penalty(params, 2.0)  # 0.5 * 2 * 25; the bias is left out
      Array(25., dtype=float32)
      >>> jax.grad(regularization.l2_penalty)(params, 2.0)[0]["w"]  # lam * w
      Array([[6., 8.]], dtype=float32)
    """
    _check_strength(lam, "lam", "l2_penalty")
    parts, cdt = _sums(params, mask, "l2_penalty", squares=True, absolutes=False)
    half_lam = jnp.asarray(lam).astype(cdt) * jnp.asarray(0.5, cdt)
    total = jnp.zeros((), cdt)
    for _, sq, s in parts:
        # (lam s)(sq s): neither s * s nor, in the backward pass, lam s s overflows where the
        # penalty and its gradient lam w are finite.
        total = total + (half_lam * s) * (sq * s)
    return total


def l1_penalty(params: Any, lam: ArrayLike, mask: Any = None) -> jax.Array:
    r"""The L1 penalty :math:`\lambda\sum_i |w_i|` over the selected parameters.

    It drives weights to exactly zero (sparse weights), where L2 shrinks them in proportion. The
    gradient is :math:`\lambda\,\mathrm{sign}(w)`, with 0 at :math:`w = 0` (the subgradient of
    least norm, as PyTorch's ``abs``; ``jax.grad(jnp.abs)(0.)`` is 1). Leaves are selected as in
    :func:`l2_penalty` (kernels by default); low precision is reduced in float32.

    Args:
      params: a pytree of arrays.
      lam: :math:`\lambda`, a finite number >= 0 (may be traced; then it cannot be checked).
      mask: which leaves are penalised: None (:func:`weight_decay_mask`), True, False, a pytree
        of bools or a callable (see :func:`l2_penalty`).

    Returns:
      A scalar: float32, or float64 when a selected leaf is float64.

    Raises:
      TypeError, ValueError: as :func:`l2_penalty`.

    References:
      Tibshirani 1996, "Regression shrinkage and selection via the lasso".

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxnorm import regularization
      >>> params = {"kernel": jnp.array([[-3.0, 0.0, 4.0]])}
      >>> regularization.l1_penalty(params, 0.5)
      Array(3.5, dtype=float32)
      >>> jax.grad(regularization.l1_penalty)(params, 0.5)["kernel"]
      Array([[-0.5,  0. ,  0.5]], dtype=float32)
    """
    _check_strength(lam, "lam", "l1_penalty")
    parts, cdt = _sums(params, mask, "l1_penalty", squares=False, absolutes=True)
    lam_ = jnp.asarray(lam).astype(cdt)
    total = jnp.zeros((), cdt)
    for ab, _, s in parts:
        total = total + (lam_ * s) * ab
    return total


def elastic_net_penalty(params: Any, l1: ArrayLike, l2: ArrayLike, mask: Any = None) -> jax.Array:
    r"""The elastic net :math:`\sum_i \lambda_1 |w_i| + \tfrac12\lambda_2 w_i^2`.

    The notes' combination of L1 and L2: ``elastic_net_penalty(p, l1, l2)`` equals
    ``l1_penalty(p, l1) + l2_penalty(p, l2)``, with the lecture's 1/2 on the squared term (Zou &
    Hastie write :math:`\lambda_2 \|w\|^2`, scikit-learn's ``ElasticNet`` uses ``alpha`` and
    ``l1_ratio``: ``l1 = alpha * l1_ratio``, ``l2 = alpha * (1 - l1_ratio)`` per example). One
    pass over the selected leaves (kernels by default) computes both sums.

    Args:
      params: a pytree of arrays.
      l1: :math:`\lambda_1`, a finite number >= 0 (may be traced).
      l2: :math:`\lambda_2`, a finite number >= 0 (may be traced).
      mask: which leaves are penalised (see :func:`l2_penalty`).

    Returns:
      A scalar: float32, or float64 when a selected leaf is float64.

    Raises:
      TypeError, ValueError: as :func:`l2_penalty`, naming ``l1`` or ``l2``.

    References:
      Zou & Hastie 2005, "Regularization and variable selection via the elastic net".

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxnorm import regularization
      >>> params = {"kernel": jnp.array([[-3.0, 4.0]])}
      >>> regularization.elastic_net_penalty(params, 0.5, 2.0)  # 0.5 * 7 + 0.5 * 2 * 25
      Array(28.5, dtype=float32)
    """
    _check_strength(l1, "l1", "elastic_net_penalty")
    _check_strength(l2, "l2", "elastic_net_penalty")
    parts, cdt = _sums(params, mask, "elastic_net_penalty", squares=True, absolutes=True)
    lam1 = jnp.asarray(l1).astype(cdt)
    half_lam2 = jnp.asarray(l2).astype(cdt) * jnp.asarray(0.5, cdt)
    total = jnp.zeros((), cdt)
    for ab, sq, s in parts:
        total = total + ((lam1 * s) * ab + (half_lam2 * s) * (sq * s))
    return total


# --------------------------------------------------------------------------- dropout


def _check_key(key: Any, who: str) -> None:
    dtype = getattr(key, "dtype", None)
    ok = dtype is not None and (
        jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
        or (dtype == np.uint32 and np.shape(key) == (2,))
    )
    if not ok:
        raise TypeError(
            f"{who}: key must be a PRNG key such as jax.random.key(0) (or jax.random.PRNGKey(0)), "
            f"got {key!r}"
        )
    if np.shape(key) != () and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        raise ValueError(
            f"{who}: key must be a single key, got an array of keys of shape {np.shape(key)}; "
            f"split it and pass one, or jax.vmap over the keys"
        )


def _check_rate(rate: Any, who: str) -> float | jax.Array:
    """The drop probability: a Python float in [0, 1] when concrete, the tracer otherwise."""
    if isinstance(rate, bool | np.bool_) or not isinstance(
        rate, int | float | np.integer | np.floating | np.ndarray | jax.Array
    ):
        raise TypeError(
            f"{who}: rate must be the drop probability, a number in [0, 1] such as 0.5, got "
            f"{rate!r} of type {type(rate).__name__}"
        )
    if np.ndim(rate) != 0:
        raise ValueError(f"{who}: rate must be a scalar, got shape {np.shape(rate)}")
    if not jnp.issubdtype(jnp.result_type(rate), jnp.floating) and not jnp.issubdtype(
        jnp.result_type(rate), jnp.integer
    ):
        raise TypeError(f"{who}: rate must be a real number, got dtype {jnp.result_type(rate)}")
    if _checks.is_tracer(rate):
        return rate
    r = float(rate)
    if not 0.0 <= r <= 1.0:  # also refuses NaN
        raise ValueError(
            f"{who}: rate is the probability of dropping a value and must be in [0, 1], got {r}"
            + (" (the keep probability p of the notes is 1 - rate)" if r > 1 else "")
        )
    return r


def _inverted_drop(key, x, rate, broadcast_dims, who):
    """flax's dropout: bernoulli(key, 1 - rate, shape) keeps; kept values divided by 1 - rate."""
    if isinstance(rate, float):
        # flax's branches, with the same arithmetic (a Python keep probability), for the same bits.
        if rate == 0.0:
            return x
        if rate == 1.0:
            return jnp.zeros_like(x)
        _check_key(key, who)
        keep = 1.0 - rate
        shape = list(x.shape)
        for d in broadcast_dims:
            shape[d] = 1
        mask = jax.random.bernoulli(key, p=keep, shape=shape)
        mask = jnp.broadcast_to(mask, x.shape)
        return jax.lax.select(mask, x / keep, jnp.zeros_like(x))
    # A traced rate (a searched hyperparameter): the same draws (bernoulli compares uniforms with
    # keep either way); rate = 1 keeps nothing, and the division by a safe keep leaves no NaN in
    # the gradient of the unselected branch.
    _check_key(key, who)
    keep = (1.0 - jnp.asarray(rate, jnp.float32)).astype(x.dtype)
    shape = list(x.shape)
    for d in broadcast_dims:
        shape[d] = 1
    mask = jax.random.bernoulli(key, p=keep.astype(jnp.float32), shape=shape)
    mask = jnp.broadcast_to(mask, x.shape)
    safe_keep = jnp.where(keep > 0, keep, jnp.ones_like(keep))
    return jax.lax.select(mask, x / safe_keep, jnp.zeros_like(x))


def dropout(
    key: jax.Array | None,
    x: ArrayLike,
    rate: float,
    *,
    broadcast_dims: Sequence[int] = (),
    deterministic: bool = False,
) -> jax.Array:
    r"""Inverted dropout: drop each value with probability ``rate``, scale the kept by 1/(1 - rate).

    .. math:: y = \frac{m \odot x}{1 - r}, \qquad m_i \sim \mathrm{Bernoulli}(1 - r)

    ``rate`` :math:`r` is the probability of *dropping* a value, as in Flax, PyTorch and Keras.
    The notes (and Srivastava et al.) write the *keep* probability :math:`p = 1 - r`: their
    ``p = 0.5`` is ``rate=0.5``, their ``p = 0.8`` for inputs is ``rate=0.2``. Dividing the kept
    values by :math:`p` at training time ("inverted dropout") keeps :math:`E[y] = x`, so inference
    is the identity (``deterministic=True``) and needs no rescaling.

    For the same key this is ``flax.linen.Dropout(rate, broadcast_dims)`` and
    ``flax.nnx.Dropout`` bit for bit: the mask is ``jax.random.bernoulli(key, 1 - rate, shape)``
    (with size 1 on ``broadcast_dims``, so the mask is shared along them, e.g. the spatial axes
    for channel dropout), and kept values are ``x / (1 - rate)`` in x's dtype. As in flax,
    ``rate=0`` returns x unchanged and ``rate=1`` returns zeros without drawing. A rate that is
    traced (a searched hyperparameter) draws the same mask as the same concrete rate.

    Args:
      key: a PRNG key (``jax.random.key``); may be None when nothing is drawn
        (``deterministic=True``, or a concrete rate of 0 or 1). Use a new key each step.
      x: the activations, any floating dtype.
      rate: the drop probability in [0, 1] (may be traced; a traced rate cannot be checked).
      broadcast_dims: axes of x along which the mask is shared.
      deterministic: return x unchanged (inference).

    Returns:
      An array of x's shape and dtype.

    Raises:
      TypeError: if x is not a floating array, rate is not a number, key is not a PRNG key, or
        deterministic is not a bool.
      ValueError: if rate is outside [0, 1] or NaN (when concrete), or a broadcast dim is out
        of range.

    References:
      Srivastava, Hinton, Krizhevsky, Sutskever & Salakhutdinov 2014, "Dropout: a simple way to
      prevent neural networks from overfitting"; Hinton et al. 2012, "Improving neural networks
      by preventing co-adaptation of feature detectors".

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxnorm import regularization
      >>> x = jnp.ones((2, 4))
      >>> y = regularization.dropout(jax.random.key(0), x, 0.5)
      >>> sorted(set(y.ravel().tolist()))  # dropped, or kept and doubled
      [0.0, 2.0]
      >>> regularization.dropout(None, x, 0.5, deterministic=True) is x
      True
    """
    who = "dropout"
    if not isinstance(deterministic, bool | np.bool_):
        raise TypeError(f"{who}: deterministic must be a bool, got {deterministic!r}")
    _checks.check_array(x, "x")
    _checks.check_floating(x, "x")
    rate = _check_rate(rate, who)
    x = x if isinstance(x, jax.Array) else jnp.asarray(x)
    dims = _checks.normalize_axes(tuple(broadcast_dims), x.ndim, "broadcast_dims")
    if deterministic:
        return x
    return _inverted_drop(key, x, rate, dims, who)


def drop_connect(key: jax.Array, w: ArrayLike, rate: float) -> jax.Array:
    r"""DropConnect: drop each *weight* with probability ``rate`` (inverted scaling).

    .. math:: \tilde W = \frac{M \odot W}{1 - r}, \qquad M_{ij} \sim \mathrm{Bernoulli}(1 - r)

    Dropout zeroes activations (a whole row of the next layer's input); DropConnect (Wan et al.
    2013) zeroes individual connections. Kept weights are divided by the keep probability
    :math:`1 - r`, so :math:`E[\tilde W] = W` and inference uses W itself (the layer's mean
    weights). Wan et al. do not rescale at training time and, at inference, average over
    Gaussian approximations of the pre-activations (a moment match, then sampled); the mean
    weights are the usual simplification: exact for the pre-activation's mean, not for what a
    nonlinearity makes of its variance.

    One mask for the whole array (so for a minibatch, every example shares it). Wan et al. draw
    one mask per example; for that, ``jax.vmap`` this function over per-example keys, at the
    memory cost of one kernel per example.

    The mask is drawn as :func:`dropout` draws it, so ``drop_connect(key, w, rate) ==
    dropout(key, w, rate)``.

    Args:
      key: a PRNG key; may be None when nothing is drawn (a concrete rate of 0 or 1).
      w: the weights, any floating dtype (e.g. a Dense kernel ``[in, out]``).
      rate: the probability of dropping a weight, in [0, 1] (may be traced).

    Returns:
      An array of w's shape and dtype.

    Raises:
      TypeError: if w is not a floating array, rate is not a number, or key is not a PRNG key.
      ValueError: if rate is outside [0, 1] or NaN (when concrete).

    References:
      Wan, Zeiler, Zhang, LeCun & Fergus 2013, "Regularization of neural networks using
      DropConnect", ICML.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxnorm import regularization
      >>> w = jnp.ones((3, 2))
      >>> wd = regularization.drop_connect(jax.random.key(0), w, 0.5)
      >>> sorted(set(wd.ravel().tolist()))
      [0.0, 2.0]
    """
    who = "drop_connect"
    _checks.check_array(w, "w")
    _checks.check_floating(w, "w")
    rate = _check_rate(rate, who)
    w = w if isinstance(w, jax.Array) else jnp.asarray(w)
    return _inverted_drop(key, w, rate, (), who)


# --------------------------------------------------------------------------- max-norm


def _check_max_norm_axis(axis: Any) -> None:
    if axis is None:
        return
    axes = tuple(axis) if isinstance(axis, list | tuple) else (axis,)
    if not axes or any(
        isinstance(a, bool | np.bool_) or not isinstance(a, int | np.integer) for a in axes
    ):
        raise TypeError(
            f"max_norm: axis must be an int or a non-empty tuple of ints (the axes the norm is "
            f"taken over: 0 for a Dense kernel [in, out], (0, 1, 2) for a Conv kernel "
            f"[h, w, in, out]) or None (every axis but the last), got {axis!r}"
        )


def _unit_axes(axis: Any, ndim: int, where: str) -> tuple[int, ...]:
    if axis is None:
        return tuple(range(ndim - 1))
    axes = tuple(axis) if isinstance(axis, list | tuple) else (axis,)
    if any(not -ndim <= int(a) < ndim for a in axes):
        raise ValueError(
            f"max_norm: axis={axis!r} is out of range for {where}, which has {ndim} dimensions "
            f"(axis=None takes every axis but the last, whatever the rank; or leave it out of "
            f"the mask)"
        )
    try:
        return _checks.normalize_axes(axis, ndim, "axis")
    except ValueError as err:
        raise ValueError(f"max_norm: {err} (for {where})") from None


def max_norm(c: float, axis: int | Sequence[int] | None = 0, *, mask: Any = None):
    r"""Max-norm constraint: project each unit's incoming weights onto :math:`\|w_j\|_2 \le c`.

    .. math:: w_j \leftarrow w_j \cdot \min\!\Big(1, \frac{c}{\|w_j\|_2}\Big)

    applied to the parameters *after* the optimizer's update (Srivastava et al. 2014, section
    5.1; the notes: "enforce an absolute upper bound on the magnitude of the weight vector for
    every neuron and use projected gradient descent"). Updates stay bounded even with a learning
    rate too high to train without it.

    An optax ``GradientTransformation`` that composes with any optimizer; put it last::

        tx = optax.chain(optax.sgd(0.1, momentum=0.9), max_norm(3.0))

    ``update(updates, state, params)`` returns updates such that ``params + updates`` (what
    ``optax.apply_updates`` computes) is the projection of the optimizer's new parameters: units
    inside the ball keep their update unchanged, units outside get the update that lands on the
    sphere. It needs ``params``. (optax's own ``projections.projection_l2_ball`` acts on a whole
    pytree and ``optax.clip_by_global_norm`` on gradients; neither is per unit.)

    ``axis`` is the axis (or axes) the norm is taken over, as in Keras's ``MaxNorm``: 0 for a
    Dense kernel ``[in, out]`` (each output unit's incoming weights), ``(0, 1, 2)`` for a
    convolution kernel ``[h, w, in, out]``; ``None`` takes every axis but the last, which is
    right for both layouts at once. Keras computes ``w * clip(n, 0, c) / (n + 1e-7)``, which
    also shrinks the weights inside the ball by a factor :math:`n/(n + 10^{-7})`; this projection
    leaves them exactly as they are, and differs from Keras's by that factor only.

    The norms are computed in float32 for bfloat16/float16 weights, scaled by a power of two (no
    overflow for finite weights); a projected norm is ``c`` up to float rounding (a few ulps of
    the weights' dtype, since ``params + updates`` rounds once more). optax's updates are
    differences, so a weight shrunk by more than the dtype's precision (a factor 2**24 in
    float32) keeps only what ``params + updates`` can represent, down to 0.

    Args:
      c: the radius, a positive finite number (Srivastava et al. use 3 to 4).
      axis: the axes the norm is taken over (see above); default 0.
      mask: which leaves are constrained, as for :func:`l2_penalty`: None (default: the kernels
        that :func:`weight_decay_mask` selects, at least 2-D; not biases, batch-norm or PReLU
        parameters), True, a pytree of bools or a callable ``params -> mask``.

    Returns:
      An ``optax.GradientTransformation`` (its state is ``optax.EmptyState()``).

    Raises:
      TypeError: if c is not a number, or axis is not an int, a tuple of ints or None.
      ValueError: if c is not positive and finite (when concrete); at update time, if params is
        None, the mask does not match, or axis is out of range for a constrained leaf.

    References:
      Srivastava, Hinton, Krizhevsky, Sutskever & Salakhutdinov 2014, "Dropout", section 5.1;
      Hinton et al. 2012; Keras ``constraints.MaxNorm``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from jaxnorm import regularization
      >>> params = {"kernel": jnp.array([[3.0, 0.3], [4.0, 0.4]])}  # column norms 5 and 0.5
      >>> tx = regularization.max_norm(2.5)
      >>> updates, _ = tx.update({"kernel": jnp.zeros((2, 2))}, tx.init(params), params)
      >>> optax.apply_updates(params, updates)["kernel"]  # the first column halved
      Array([[1.5, 0.3],
             [2. , 0.4]], dtype=float32)
    """
    import optax  # only here: the core of jaxnorm does not import optax

    _check_strength(c, "c", "max_norm")
    if not _checks.is_tracer(c) and float(c) <= 0:
        raise ValueError(f"max_norm: c must be positive (the largest norm allowed), got {c}")
    _check_max_norm_axis(axis)

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError(
                "max_norm needs the parameters to project them: call "
                "tx.update(updates, state, params) (optax.chain passes params on to it)"
            )
        flat_p, flags, explicit = _mask_flags(params, mask, "max_norm")
        treedef = jax.tree.structure(params)
        try:
            flat_u = treedef.flatten_up_to(updates)
        except (ValueError, TypeError) as err:
            raise ValueError(
                f"max_norm: updates must have the structure of params ({err})"
            ) from None
        out = []
        for (path, p), u, flag in zip(flat_p, flat_u, flags, strict=True):
            where = jax.tree_util.keystr(path) or "params"
            p_arr = _float_leaf(where, p, explicit, "max_norm") if flag else None
            if u is None or p_arr is None:
                out.append(u)
                continue
            out.append(_project(p_arr, jnp.asarray(u), c, _unit_axes(axis, p_arr.ndim, where)))
        return jax.tree_util.tree_unflatten(treedef, out), state

    return optax.GradientTransformation(init_fn, update_fn)


def _project(p: jax.Array, u: jax.Array, c, axes: tuple[int, ...]) -> jax.Array:
    """The update that takes p to the projection of p + u (per unit), in u's dtype."""
    cdt = _checks.compute_dtype(jnp.promote_types(p.dtype, u.dtype))
    new = p.astype(cdt) + u.astype(cdt)
    s = _power_of_two_scale(new, axis=axes)
    ns = new / s
    norm = jnp.sqrt(jnp.sum(ns * ns, axis=axes, keepdims=True)) * s
    c_ = jnp.asarray(c).astype(cdt)
    outside = norm > c_
    factor = jnp.where(outside, c_ / jnp.where(outside, norm, jnp.ones_like(norm)), 1)
    projected = (new * factor - p.astype(cdt)).astype(u.dtype)
    # Units inside the ball keep the optimizer's update as it was (no rounding through p + u - p).
    return jnp.where(outside, projected, u)
