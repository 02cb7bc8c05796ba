"""Flax linen modules: thin shells over jaxnorm's functions (no math lives here).

- :class:`PReLU`: a learned leaky-ReLU slope, shared or per channel.
- :class:`BatchNorm`: a drop-in for ``flax.linen.BatchNorm``, over
  :func:`jaxnorm.batchnorm.batch_norm`.
- :func:`weight_decay_mask`: an optax mask that keeps slopes, biases and norm parameters out of
  weight decay.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxnorm import _checks, activations, batchnorm

__all__ = ["BatchNorm", "PReLU", "weight_decay_mask"]


def _prelu_slope_shape(num_parameters: Any) -> tuple[int, ...]:
    """The slope's shape: () for a shared slope, (C,) for C channels (validated)."""
    if isinstance(num_parameters, float | np.floating):
        # flax's PReLU(0.1) is a slope; jaxnorm's first argument is torch's num_parameters.
        raise TypeError(
            f"PReLU: num_parameters must be an int (1 for a shared slope, or the number of "
            f"channels), got {num_parameters!r}. The first positional argument of jaxnorm's PReLU "
            f"is num_parameters, as in torch.nn.PReLU, not the initial slope as in "
            f"flax.nnx.PReLU; to set the slope pass it by keyword: "
            f"PReLU(negative_slope_init={num_parameters!s})"
        )
    if isinstance(num_parameters, bool) or not isinstance(num_parameters, int | np.integer):
        raise TypeError(
            f"PReLU: num_parameters must be an int (1 for a shared slope, or the number of "
            f"channels), got {num_parameters!r}"
        )
    n = int(num_parameters)
    if n < 1:
        raise ValueError(f"PReLU: num_parameters must be at least 1, got {n}")
    # A shared slope is a scalar, as in flax.linen.PReLU, so its checkpoints load unchanged.
    return () if n == 1 else (n,)


class PReLU(nn.Module):
    r"""Parametric ReLU with a learned slope, shared or one per channel.

    .. math:: y = \begin{cases} x & x > 0 \\ \alpha_c\,x & x \le 0 \end{cases}

    Like PyTorch's ``nn.PReLU``, ``num_parameters`` chooses a shared slope (1, the default) or
    one slope per channel (the number of channels); ``channel_axis`` says which axis of x holds
    the channels (default -1, channels-last as Flax lays out features; use 1 for NCHW inputs
    ported from PyTorch). flax.linen.PReLU has only the shared slope.

    The initial slope is 0.25, as in He et al. 2015 (flax's default is 0.01, PyTorch's 0.25).

    The parameter is named ``negative_slope``, as in ``flax.linen.PReLU``: a shared-slope
    jaxnorm PReLU has exactly flax's variables (a scalar ``params/negative_slope``), so flax
    checkpoints load unchanged. (PyTorch calls it ``weight``, with shape ``(num_parameters,)``.)

    He et al. exclude the slopes from weight decay; :func:`weight_decay_mask` builds that mask.

    Differences from ``flax.linen.PReLU``:

    - the initial slope is 0.25, flax's is 0.01;
    - the fields, in order, are ``(num_parameters, negative_slope_init, channel_axis,
      param_dtype)``, flax's ``(param_dtype, negative_slope_init)``: pass the slope by keyword,
      ``PReLU(negative_slope_init=0.1)`` (a float first argument raises a ``TypeError`` saying so,
      at ``init``);
    - per-channel slopes (``num_parameters > 1``) are jaxnorm's only;
    - the derivative at x = 0 is the slope (the negative side, as PyTorch); flax's is 1;
    - there is no ``dtype`` field: the result has x's dtype, and bfloat16 or float16 inputs are
      computed in float32 (the slope included) and rounded once, where flax casts the slope to
      x's dtype and computes there.

    Attributes:
      num_parameters: 1 for a shared slope, else the number of channels (an int or NumPy int).
      negative_slope_init: the initial slope (flax's name for it; ``init`` would shadow
        ``Module.init``).
      channel_axis: the axis of x that holds the channels when num_parameters > 1.
      param_dtype: the slope's dtype.

    References:
      He, Zhang, Ren & Sun 2015, "Delving deep into rectifiers".

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxnorm import nn as jnn
      >>> layer = jnn.PReLU(num_parameters=3)
      >>> variables = layer.init(jax.random.key(0), jnp.ones((2, 3)))
      >>> variables["params"]["negative_slope"]
      Array([0.25, 0.25, 0.25], dtype=float32)
      >>> layer.apply(variables, -jnp.ones((2, 3)))
      Array([[-0.25, -0.25, -0.25],
             [-0.25, -0.25, -0.25]], dtype=float32)
    """

    num_parameters: int = 1
    negative_slope_init: float = 0.25
    channel_axis: int = -1
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: ArrayLike) -> jax.Array:
        """Apply the activation; y has x's shape and dtype."""
        shape = _prelu_slope_shape(self.num_parameters)
        slope = self.param(
            "negative_slope",
            lambda _key: jnp.full(shape, self.negative_slope_init, self.param_dtype),
        )
        channel_axis = None if shape == () else self.channel_axis
        return activations.prelu(x, slope, channel_axis=channel_axis)


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
    nested dict; a callable ``mask=lambda p: weight_decay_mask(p)`` works too.

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
      >>> from jaxnorm import nn as jnn
      >>> params = {"Dense_0": {"kernel": jnp.ones((3, 4)), "bias": jnp.zeros(4)},
      ...           "PReLU_0": {"negative_slope": jnp.full((4,), 0.25)}}
      >>> jnn.weight_decay_mask(params)
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


def _flax_result_dtype(*dtypes) -> jnp.dtype:
    """The dtype flax's ``canonicalize_dtype`` infers: the standard promotion of the arguments.

    Computed under standard promotion so that callers running with strict promotion (as jaxnorm's
    tests do) still get flax's answer (bfloat16 x with float32 parameters gives float32).
    """
    with jax.numpy_dtype_promotion("standard"):
        dt = jnp.result_type(*dtypes)
    if not jnp.issubdtype(dt, jnp.inexact):
        dt = jnp.dtype(jnp.float32)
    return jnp.dtype(dt)


class BatchNorm(nn.Module):
    r"""Batch normalization, a drop-in for ``flax.linen.BatchNorm`` (Ioffe & Szegedy 2015).

    .. math::
        y = \gamma \frac{x - \mu_B}{\sqrt{\sigma_B^2 + \epsilon}} + \beta, \qquad
        \mu \leftarrow m\,\mu + (1 - m)\,\mu_B, \quad
        \sigma^2 \leftarrow m\,\sigma^2 + (1 - m)\,\sigma_B^2

    A shell over :func:`jaxnorm.batchnorm.batch_norm`: it takes flax.linen.BatchNorm's arguments and
    keeps the same variables with the same shapes and dtypes (``params/scale``, ``params/bias``,
    ``batch_stats/mean``, ``batch_stats/var``), so swapping the class in a model loads existing
    checkpoints and gives flax's outputs and updated ``batch_stats`` to float32 rounding (not bit
    for bit: the batch statistics are summed in another order). Differences from flax:

    * The variance is always accurate (flax's default ``use_fast_variance=True`` computes
      :math:`E[x^2] - E[x]^2` and returns a running variance of 0 for float32 data with mean 1e4
      and std 1); ``use_fast_variance`` is accepted for compatibility and ignored. It costs no
      extra pass over x.
    * The backward pass is the closed form, with x as the only residual the size of x.
    * Statistics merged over ``axis_name`` are exact for uneven or masked shards (flax averages
      per-device means).
    * Statistics are always reduced in float32 (or float64 for float64 x), also when
      ``force_float32_reductions=False``; that flag only keeps the running statistics in
      ``param_dtype``, as flax stores them.
    * During ``init`` the running statistics are not updated (as in flax); if the init batch has a
      single value per feature (e.g. ``jnp.ones((1, D))``) the init output uses the running
      statistics instead of failing.
    * Extra options: ``activation`` (fused, e.g. ``"relu"``: BN+ReLU costs the memory traffic of
      BN alone), the PyTorch porting options ``unbiased_running_var`` and ``cumulative`` (torch's
      ``momentum=None``; only then is a ``batch_stats/count`` variable kept), ghost batch norm
      (``virtual_batch_size``) and Batch Renormalization (``renorm``, ``r_max``, ``d_max``).

    Train step (the running statistics live in the ``batch_stats`` collection, which ``apply``
    must be told is mutable and returns)::

        def loss_fn(params, batch_stats, x, labels):
            logits, updates = model.apply(
                {"params": params, "batch_stats": batch_stats}, x, train=True,
                mutable=["batch_stats"])
            return loss(logits, labels), updates["batch_stats"]

        @jax.jit
        def train_step(params, batch_stats, opt_state, x, labels):
            (l, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                params, batch_stats, x, labels)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), batch_stats, opt_state, l

        # evaluation: running statistics, nothing mutable
        logits = model.apply({"params": params, "batch_stats": batch_stats}, x, train=False)

    (the model passes ``use_running_average=not train`` to its BatchNorm layers). The explicit
    functional alternative, with no hidden collection, is
    :func:`jaxnorm.batchnorm.batch_norm`: ``y, state = batch_norm(x, scale, bias, state,
    train=True)``.

    Attributes:
      use_running_average: use the running statistics (inference) instead of the batch's; may be
        given here or to ``__call__``, exactly once.
      axis: the feature axis or axes (``-1`` for NHWC and ``[N, D]``; ``1`` for NCHW).
      momentum: weight of the old running value (flax's convention; PyTorch's momentum ``p`` is
        ``1 - p`` here, see :func:`jaxnorm.batchnorm.momentum_from_torch`).
      epsilon: added to the variance.
      dtype: dtype of the output (default: flax's inference, the promotion of x's dtype with the
        parameters' dtypes, so bfloat16 x with float32 parameters gives float32 as in flax).
      param_dtype: dtype of scale and bias.
      use_bias, use_scale: learn :math:`\beta` / :math:`\gamma`.
      bias_init, scale_init: their initializers (zeros, ones).
      axis_name, axis_index_groups: combine statistics over a mapped axis (``shard_map``, ``pmap``,
        ``vmap``), exactly, and over groups of it.
      use_fast_variance: accepted for flax compatibility and ignored (jaxnorm is always accurate).
      force_float32_reductions: True keeps the running statistics in float32 (flax's default);
        False keeps them in ``param_dtype``.
      activation: None, a name from :mod:`jaxnorm.activations` or a callable, fused into the op.
      unbiased_running_var: update the running variance with the unbiased batch variance, as
        PyTorch does (normalisation still uses the biased one).
      cumulative: running statistics are the plain average of all batches (PyTorch's
        ``momentum=None``); adds ``batch_stats/count``.
      virtual_batch_size: ghost batch norm: normalise groups of this many rows of axis 0 separately.
      renorm, r_max, d_max: Batch Renormalization (Ioffe 2017) and its clipping bounds.

    References:
      Ioffe & Szegedy 2015, "Batch normalization"; Ioffe 2017, "Batch renormalization";
      Hoffer, Hubara & Soudry 2017 (ghost batch norm).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxnorm import nn as jnn
      >>> bn = jnn.BatchNorm(momentum=0.9)
      >>> x = jnp.array([[1.0, 10.0], [3.0, 30.0]])
      >>> variables = bn.init(jax.random.key(0), x, use_running_average=True)
      >>> jax.tree.map(jnp.shape, variables)
      {'batch_stats': {'mean': (2,), 'var': (2,)}, 'params': {'bias': (2,), 'scale': (2,)}}
      >>> y, updates = bn.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
      >>> y.round(3)
      Array([[-1., -1.],
             [ 1.,  1.]], dtype=float32)
      >>> updates["batch_stats"]["mean"]
      Array([0.2, 2. ], dtype=float32)
    """

    use_running_average: bool | None = None
    axis: int | Sequence[int] = -1
    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Callable = nn.initializers.zeros
    scale_init: Callable = nn.initializers.ones
    axis_name: Any = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True
    activation: str | Callable | None = None
    unbiased_running_var: bool = False
    cumulative: bool = False
    virtual_batch_size: int | None = None
    renorm: bool = False
    r_max: float = 3.0
    d_max: float = 5.0

    @nn.compact
    def __call__(
        self,
        x: ArrayLike,
        use_running_average: bool | None = None,
        *,
        mask: ArrayLike | None = None,
    ) -> jax.Array:
        """Normalise x with the batch's statistics (and update the running ones) or the running
        statistics.

        Args:
          x: the input; the feature axes are ``self.axis``.
          use_running_average: as the attribute; exactly one of the two must be given.
          mask: True where a position counts in the statistics, read as flax reads it: any
            shape that broadcasts to x NumPy-style (aligned on the right: ``(H, W, 1)`` pads
            images shared by the batch, ``(D,)`` flags features, also on a square ``(N, N)``
            batch). A mask that does not broadcast to x may be the batch shape, one flag per
            position of the non-feature axes. A feature with no valid position leaves its
            running statistics as they were (flax's become NaN).

        Returns:
          y of x's shape, in ``self.dtype`` (or flax's inferred dtype).
        """
        use_running_average = nn.merge_param(
            "use_running_average", self.use_running_average, use_running_average
        )
        x = jnp.asarray(x)
        feature_axes = _checks.normalize_axes(self.axis, x.ndim)
        feature_shape = tuple(x.shape[a] for a in feature_axes)
        stats_dtype = jnp.float32 if self.force_float32_reductions else self.param_dtype
        ra_mean = self.variable(
            "batch_stats", "mean", lambda s: jnp.zeros(s, stats_dtype), feature_shape
        )
        ra_var = self.variable(
            "batch_stats", "var", lambda s: jnp.ones(s, stats_dtype), feature_shape
        )
        # The count is only needed by the cumulative average; other configurations keep flax's
        # exact variable set so that checkpoints load both ways.
        ra_count = (
            self.variable("batch_stats", "count", lambda: jnp.zeros((), jnp.int32))
            if self.cumulative
            else None
        )
        scale = (
            self.param("scale", self.scale_init, feature_shape, self.param_dtype)
            if self.use_scale
            else None
        )
        bias = (
            self.param("bias", self.bias_init, feature_shape, self.param_dtype)
            if self.use_bias
            else None
        )
        count = ra_count.value if ra_count is not None else jnp.zeros((), jnp.int32)
        state = batchnorm.BatchNormState(ra_mean.value, ra_var.value, count)
        initializing = self.is_initializing()
        train = not use_running_average
        out_dtype = self.dtype or _flax_result_dtype(
            x.dtype, *(p.dtype for p in (scale, bias) if p is not None)
        )
        if initializing and train and _values_per_feature(x.shape, feature_axes) <= 1:
            train = False
        # As in flax, the named axis need not exist while initialising.
        y, new_state = _module_batch_norm(
            self, x, scale, bias, state, train, mask, out_dtype, collective=not initializing
        )
        if train and not initializing:
            ra_mean.value = new_state.mean
            ra_var.value = new_state.var
            if ra_count is not None:
                ra_count.value = new_state.count
        return y


def _module_batch_norm(module, x, scale, bias, state, train, mask, out_dtype, *, collective=True):
    """:func:`batchnorm.batch_norm` with the options a BatchNorm module (linen or nnx) holds."""
    return batchnorm.batch_norm(
        x,
        scale,
        bias,
        state,
        train=train,
        momentum=module.momentum,
        epsilon=module.epsilon,
        axis=module.axis,
        axis_name=module.axis_name if collective else None,
        axis_index_groups=module.axis_index_groups if collective else None,
        mask=_flax_mask(mask, jnp.shape(x)),
        activation=module.activation,
        unbiased_running_var=module.unbiased_running_var,
        cumulative=module.cumulative,
        virtual_batch_size=module.virtual_batch_size,
        renorm=module.renorm,
        r_max=module.r_max,
        d_max=module.d_max,
        dtype=out_dtype,
    )


def _flax_mask(mask, x_shape):
    """A module's mask read as flax reads it: NumPy-broadcast to x, aligned on the right.

    flax's ``_compute_stats`` passes the mask to ``x.mean(axes, where=mask)``, so a lower-rank
    mask lines up with x's trailing axes: ``(H, W, 1)`` is a padding mask shared by a batch of
    NHWC images, ``(D,)`` flags features. It is given x's rank with leading ones, which the
    functional core reads the same way. Only a mask that does not broadcast to x is left for the
    core's own batch-shape form (one flag per position of x's non-feature axes); so a ``(N,)`` mask
    on a square ``(N, N)`` batch flags features, as in flax (write ``mask[:, None]`` for rows).
    """
    if mask is None or not hasattr(mask, "shape"):
        return mask
    shape = tuple(mask.shape)
    if len(shape) >= len(x_shape) or not all(
        m in (1, s) for m, s in zip(reversed(shape), reversed(x_shape), strict=False)
    ):
        return mask
    return jnp.reshape(mask, (1,) * (len(x_shape) - len(shape)) + shape)


def _values_per_feature(shape, feature_axes) -> int:
    return math.prod(s for a, s in enumerate(shape) if a not in feature_axes)
