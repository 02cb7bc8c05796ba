"""Flax linen modules: thin shells over jaxnorm's functions (no math lives here).

- :class:`PReLU`: a learned leaky-ReLU slope, shared or per channel.
- :class:`BatchNorm`: a drop-in for ``flax.linen.BatchNorm``, over
  :func:`jaxnorm.batchnorm.batch_norm`.
- :class:`DropConnectDense`: ``flax.linen.Dense`` with DropConnect on its kernel (Wan et al. 2013).
- :func:`weight_decay_mask`: an optax mask that keeps slopes, biases and norm parameters out of
  weight decay (defined in :mod:`jaxnorm.regularization`, re-exported here).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxnorm import _checks, activations, batchnorm, regularization
from jaxnorm.regularization import DEFAULT_NO_DECAY as DEFAULT_NO_DECAY
from jaxnorm.regularization import weight_decay_mask

__all__ = ["BatchNorm", "DropConnectDense", "PReLU", "weight_decay_mask"]


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


class DropConnectDense(nn.Module):
    r"""A Dense layer with DropConnect on its kernel (Wan et al. 2013); ``nn.Dense`` otherwise.

    .. math:: y = x\,\frac{M \odot W}{1 - r} + b, \qquad M_{ij} \sim \mathrm{Bernoulli}(1 - r)

    Flax has no DropConnect. This module takes ``flax.linen.Dense``'s arguments and keeps its
    variables (``params/kernel`` ``[in, out]``, ``params/bias``, initialised alike), so with
    ``deterministic=True`` it *is* ``nn.Dense`` (same parameters, same output); in training it
    drops each weight with probability ``rate`` through
    :func:`jaxnorm.regularization.drop_connect` (inverted: kept weights are divided by ``1 -
    rate``), with a key from the ``'dropout'`` rng collection, as ``flax.linen.Dropout`` takes
    its key. Inference uses the mean weights W (see :func:`~jaxnorm.regularization.drop_connect`
    for how that differs from Wan et al.'s moment-matched inference). One mask per call, shared
    by the minibatch. The bias is not dropped (Wan et al. fold it into W).

    ``deterministic`` is merged as in ``flax.linen.Dropout``: give it as a field or as a call
    argument (not both).

    Differences from ``flax.linen.Dense``: the extra fields ``rate``, ``deterministic`` and
    ``rng_collection``; no ``promote_dtype``, ``dot_general`` or ``dot_general_cls`` fields
    (the computation dtype is ``dtype``, or the promotion of inputs and parameters as flax
    infers it).

    Attributes:
      features: the number of output features.
      use_bias: add a bias.
      dtype: the computation dtype (None: promote the inputs and the parameters, as nn.Dense).
      param_dtype: the parameters' dtype.
      precision: the matrix product's precision (``jax.lax.Precision``).
      kernel_init: the kernel's initializer (nn.Dense's default, LeCun normal).
      bias_init: the bias's initializer (zeros).
      rate: the probability of dropping a weight, in [0, 1] (Wan et al. keep half: 0.5).
      deterministic: True: no drop (inference); may be given at call time instead.
      rng_collection: the rng collection the mask's key comes from (``'dropout'``).

    References:
      Wan, Zeiler, Zhang, LeCun & Fergus 2013, "Regularization of neural networks using
      DropConnect", ICML.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxnorm import nn as jnn
      >>> layer = jnn.DropConnectDense(3, rate=0.5)
      >>> x = jnp.ones((2, 4))
      >>> variables = layer.init(jax.random.key(0), x, deterministic=True)
      >>> jax.tree.map(jnp.shape, variables["params"])
      {'bias': (3,), 'kernel': (4, 3)}
      >>> y = layer.apply(variables, x, deterministic=False, rngs={"dropout": jax.random.key(1)})
      >>> y.shape
      (2, 3)
    """

    features: int
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Callable = nn.linear.default_kernel_init
    bias_init: Callable = nn.initializers.zeros_init()
    rate: float = 0.5
    deterministic: bool | None = None
    rng_collection: str = "dropout"

    @nn.compact
    def __call__(
        self, inputs: ArrayLike, deterministic: bool | None = None, rng: jax.Array | None = None
    ) -> jax.Array:
        """Apply the layer (``deterministic`` here or as a field; ``rngs={'dropout': key}``)."""
        deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
        inputs = jnp.asarray(inputs)
        kernel = self.param(
            "kernel", self.kernel_init, (jnp.shape(inputs)[-1], self.features), self.param_dtype
        )
        bias = (
            self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias
            else None
        )
        if not deterministic:
            rate = regularization._check_rate(self.rate, "DropConnectDense")
            if not (isinstance(rate, float) and rate in (0.0, 1.0)) and rng is None:
                rng = self.make_rng(self.rng_collection)
            kernel = regularization.drop_connect(rng, kernel, rate)
        return _dense(inputs, kernel, bias, self.dtype, self.precision)


def _dense(inputs, kernel, bias, dtype, precision):
    """flax.linen.Dense's computation: promote, contract the last axis, add the bias."""
    arrays = [a for a in (inputs, kernel, bias) if a is not None]
    dtype = _flax_result_dtype(*(a.dtype for a in arrays)) if dtype is None else dtype
    inputs, kernel = jnp.asarray(inputs, dtype), jnp.asarray(kernel, dtype)
    y = jax.lax.dot_general(
        inputs, kernel, (((inputs.ndim - 1,), (0,)), ((), ())), precision=precision
    )
    if bias is not None:
        y += jnp.reshape(jnp.asarray(bias, dtype), (1,) * (y.ndim - 1) + (-1,))
    return y


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
    * Complex x is normalised as flax.linen does it (complex y and running mean, real
      variance :math:`E|x - E[x]|^2`), with an accurate variance for offset data.
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
        ``vmap``), exactly, and over groups of it. Under ``jax.jit`` with the batch sharded over
        a mesh, leave it None (docs/batchnorm_modules.md, "Data parallel"). Training with an
        axis_name that nothing binds raises a NameError naming it; ``init`` needs no bound axis.
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
      refuse_single_value: PyTorch's ValueError for a training batch with one value per feature
        (by default it is normalised as flax does: y is the bias).

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
    refuse_single_value: bool = False

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
            position of the non-feature axes. A feature with no valid position is normalised
            with the running statistics, which it leaves as they were (flax's output and
            statistics become NaN).

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
        refuse_single_value=module.refuse_single_value,
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
