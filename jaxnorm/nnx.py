"""Flax nnx modules: thin shells over jaxnorm's functions (no math lives here).

- :class:`PReLU`: a learned leaky-ReLU slope, shared or per channel.
- :class:`BatchNorm`: a drop-in for ``flax.nnx.BatchNorm``, over
  :func:`jaxnorm.batchnorm.batch_norm`.
- :class:`DropConnectLinear`: ``flax.nnx.Linear`` with DropConnect on its kernel (Wan et al. 2013).

The optax weight-decay mask for nnx parameters is :func:`jaxnorm.nn.weight_decay_mask` (it works
on ``nnx.State`` as on linen dicts; also :func:`jaxnorm.regularization.weight_decay_mask`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import linear as _linear
from jax.typing import ArrayLike

from jaxnorm import _checks, activations, batchnorm, regularization
from jaxnorm.nn import _dense, _flax_result_dtype, _module_batch_norm, _prelu_slope_shape

__all__ = ["BatchNorm", "DropConnectLinear", "PReLU"]


class PReLU(nnx.Module):
    r"""Parametric ReLU with a learned slope, shared or one per channel (flax.nnx).

    .. math:: y = \begin{cases} x & x > 0 \\ \alpha_c\,x & x \le 0 \end{cases}

    The nnx twin of :class:`jaxnorm.nn.PReLU`: ``num_parameters`` is 1 for a shared slope (a
    scalar, as in ``flax.nnx.PReLU``) or the number of channels, found on ``channel_axis`` of x
    (default -1; use 1 for NCHW inputs ported from PyTorch's ``nn.PReLU``). The slope starts at
    0.25 (He et al. 2015) and is the ``nnx.Param`` attribute ``negative_slope``, the name
    ``flax.nnx.PReLU`` uses.

    Differences from ``flax.nnx.PReLU``:

    - the first positional argument is ``num_parameters`` (torch's order), flax's is
      ``negative_slope_init``: ``jnnx.PReLU(1)`` is one shared slope starting at 0.25, where
      ``nnx.PReLU(1)`` is a slope of 1.0. Pass the slope by keyword,
      ``PReLU(negative_slope_init=0.1)``; a float first argument raises a ``TypeError`` saying so;
    - the initial slope is 0.25, flax's is 0.01;
    - per-channel slopes (``num_parameters > 1``) are jaxnorm's only;
    - the derivative at x = 0 is the slope (the negative side, as PyTorch); flax's is 1;
    - there are no ``dtype``, ``promote_dtype`` or ``negative_slope_metadata`` arguments: the
      result has x's dtype, and bfloat16 or float16 inputs are computed in float32 (the slope
      included) and rounded once, where flax (default ``dtype=None``) casts the slope to x's
      dtype and computes there. ``param_dtype`` is as in flax.

    Args:
      num_parameters: 1 for a shared slope, else the number of channels (an int or NumPy int).
      negative_slope_init: the initial slope (the argument name flax.nnx.PReLU uses).
      channel_axis: the axis of x that holds the channels when num_parameters > 1.
      param_dtype: the slope's dtype.

    References:
      He, Zhang, Ren & Sun 2015, "Delving deep into rectifiers".

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxnorm import nnx as jnnx
      >>> layer = jnnx.PReLU(num_parameters=2)
      >>> layer(jnp.array([[-4.0, 4.0]]))
      Array([[-1.,  4.]], dtype=float32)
    """

    def __init__(
        self,
        num_parameters: int = 1,
        *,
        negative_slope_init: float = 0.25,
        channel_axis: int = -1,
        param_dtype: Any = jnp.float32,
    ):
        shape = _prelu_slope_shape(num_parameters)
        self.negative_slope = nnx.Param(jnp.full(shape, negative_slope_init, param_dtype))
        self.num_parameters = shape[0] if shape else 1  # a Python int, even for np.int64(3)
        self.channel_axis = channel_axis

    def __call__(self, x: ArrayLike) -> jax.Array:
        """Apply the activation; y has x's shape and dtype."""
        channel_axis = None if self.num_parameters == 1 else self.channel_axis
        return activations.prelu(x, self.negative_slope[...], channel_axis=channel_axis)


class DropConnectLinear(nnx.Module):
    r"""A Linear layer with DropConnect on its kernel (Wan et al. 2013); ``nnx.Linear`` otherwise.

    .. math:: y = x\,\frac{M \odot W}{1 - r} + b, \qquad M_{ij} \sim \mathrm{Bernoulli}(1 - r)

    The nnx twin of :class:`jaxnorm.nn.DropConnectDense`. It takes ``flax.nnx.Linear``'s
    arguments and keeps its variables (``kernel`` ``[in, out]`` and ``bias``, drawn from
    ``rngs.params()`` in the same order, so the same ``Rngs`` give the same parameters), plus
    ``nnx.Dropout``'s: ``rate``, ``deterministic`` (default False, set by ``model.eval()`` /
    ``model.train()`` and ``nnx.view``), ``rng_collection`` and the stream it forks from
    ``rngs`` after the parameters are drawn. In training each weight is dropped with
    probability ``rate`` through :func:`jaxnorm.regularization.drop_connect` (inverted: kept
    weights divided by ``1 - rate``); with ``deterministic=True`` it computes exactly what
    ``nnx.Linear`` computes (the mean weights; see
    :func:`~jaxnorm.regularization.drop_connect`). The bias is not dropped.

    Differences from ``flax.nnx.Linear``: no ``dot_general``, ``promote_dtype``,
    ``preferred_element_type`` or metadata arguments (the computation dtype is ``dtype``, or
    the promotion of inputs and parameters as flax infers it).

    Args:
      in_features: the input width.
      out_features: the output width.
      rate: the probability of dropping a weight, in [0, 1] (Wan et al. keep half: 0.5).
      use_bias: add a bias.
      dtype: the computation dtype (None: promote the inputs and the parameters).
      param_dtype: the parameters' dtype.
      precision: the matrix product's precision (``jax.lax.Precision``).
      kernel_init: the kernel's initializer (nnx.Linear's default, LeCun normal).
      bias_init: the bias's initializer (zeros).
      deterministic: True: no drop (inference).
      rng_collection: the rng stream the masks' keys come from (``'dropout'``).
      rngs: an ``nnx.Rngs`` (parameters, then the dropout stream).

    References:
      Wan, Zeiler, Zhang, LeCun & Fergus 2013, "Regularization of neural networks using
      DropConnect", ICML.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from jaxnorm import nnx as jnnx
      >>> layer = jnnx.DropConnectLinear(4, 3, rate=0.5, rngs=nnx.Rngs(0))
      >>> layer(jnp.ones((2, 4))).shape  # a new mask at each call
      (2, 3)
      >>> layer.eval()  # deterministic: nnx.Linear's output
      >>> layer.deterministic
      True
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        rate: float = 0.5,
        use_bias: bool = True,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: Any = None,
        kernel_init: Callable = _linear.default_kernel_init,
        bias_init: Callable = _linear.default_bias_init,
        deterministic: bool = False,
        rng_collection: str = "dropout",
        rngs: nnx.Rngs,
    ):
        regularization._check_rate(rate, "DropConnectLinear")
        shape = (in_features, out_features)
        self.kernel = nnx.Param(kernel_init(rngs.params(), shape, param_dtype))
        if use_bias:
            self.bias = nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype))
        else:
            self.bias = nnx.data(None)
        self.in_features = in_features
        self.out_features = out_features
        self.rate = rate
        self.use_bias = use_bias
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.precision = precision
        self.deterministic = deterministic
        self.rng_collection = rng_collection
        if isinstance(rngs, nnx.Rngs):
            self.rngs = rngs[rng_collection].fork()
        else:
            raise TypeError(f"DropConnectLinear: rngs must be an nnx.Rngs, got {type(rngs)}")

    def __call__(
        self,
        inputs: ArrayLike,
        *,
        deterministic: bool | None = None,
        rngs: nnx.Rngs | nnx.RngStream | jax.Array | None = None,
    ) -> jax.Array:
        """Apply the layer; ``deterministic`` and ``rngs`` here override the attributes."""
        deterministic = self.deterministic if deterministic is None else deterministic
        kernel = self.kernel[...]
        bias = self.bias[...] if self.bias is not None else None
        if not deterministic:
            rate = regularization._check_rate(self.rate, "DropConnectLinear")
            key = None
            if not (isinstance(rate, float) and rate in (0.0, 1.0)):
                key = _stream_key(self.rngs if rngs is None else rngs, self.rng_collection)
            kernel = regularization.drop_connect(key, kernel, rate)
        return _dense(jnp.asarray(inputs), kernel, bias, self.dtype, self.precision)

    def set_view(self, deterministic: bool | None = None):
        """Used by ``nnx.view``: set ``deterministic`` when given (as flax's Dropout).

        Args:
          deterministic: if True, disables the DropConnect masking.
        """
        if deterministic is not None:
            self.deterministic = deterministic


def _stream_key(rngs, collection: str) -> jax.Array:
    """A key from an Rngs (its ``collection`` stream), an RngStream or a key, as nnx.Dropout."""
    if isinstance(rngs, nnx.Rngs):
        return rngs[collection]()
    if isinstance(rngs, nnx.RngStream):
        return rngs()
    if isinstance(rngs, jax.Array):
        return rngs
    raise TypeError(
        f"DropConnectLinear: rngs must be an nnx.Rngs, nnx.RngStream or a key, got {type(rngs)}"
    )


class BatchNorm(nnx.Module):
    r"""Batch normalization, a drop-in for ``flax.nnx.BatchNorm`` (Ioffe & Szegedy 2015).

    .. math::
        y = \gamma \frac{x - \mu_B}{\sqrt{\sigma_B^2 + \epsilon}} + \beta, \qquad
        \mu \leftarrow m\,\mu + (1 - m)\,\mu_B, \quad
        \sigma^2 \leftarrow m\,\sigma^2 + (1 - m)\,\sigma_B^2

    The nnx twin of :class:`jaxnorm.nn.BatchNorm`, a shell over
    :func:`jaxnorm.batchnorm.batch_norm`. It takes flax.nnx.BatchNorm's constructor arguments and
    has the same attributes: ``mean``, ``var`` (``nnx.BatchStat``, float32) and ``scale``,
    ``bias`` (``nnx.Param``, or None when unused), so ``nnx.state`` trees and checkpoints match
    flax's and the outputs and updated statistics agree with flax's to float32 rounding (not bit
    for bit). ``nnx.view_info``, ``nnx.eval_shape``, ``nnx.tabulate``, ``nnx.EMA`` and
    ``nnx.bridge`` work on it as on flax's module. ``model.train()`` /
    ``model.eval()`` and ``nnx.view(model, use_running_average=...)`` switch modes as for flax's.

    Differences from flax, as for the linen module: the variance is always accurate
    (``use_fast_variance`` is accepted and ignored), statistics reduce in float32 whatever
    ``dtype`` is (flax.nnx first casts x, the statistics and the parameters to ``dtype``),
    ``axis_name`` merges statistics exactly, and the extra options ``activation``,
    ``unbiased_running_var``, ``cumulative`` (adds a ``count`` BatchStat), ``virtual_batch_size``
    and ``renorm``/``r_max``/``d_max`` pass through to the functional core. Complex x makes the
    running ``mean`` complex, as in flax.linen (flax.nnx casts it into its float32 BatchStat,
    dropping the imaginary part). ``promote_dtype`` is
    flax's hook; its default is None (no cast before the statistics) where flax's default casts x
    to ``dtype`` first.

    Under ``nnx.vmap`` over a stack of models (an ensemble, a hyperparameter sweep) each member
    keeps its own statistics. ``nnx.vmap`` of *one* model over a data axis (``in_axes=(None,
    ...)``) in training mode needs ``axis_name`` on both the vmap and the BatchNorm, so that the
    statistics are global over the mapped axis; without it each slice would give different running
    statistics for the one model, and nnx refuses the update, for flax's BatchNorm and this one
    alike (flax issue 4760).

    Train step::

        model = Model(rngs=nnx.Rngs(0))           # contains jaxnorm.nnx.BatchNorm layers
        optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)

        @nnx.jit
        def train_step(model, optimizer, x, labels):
            def loss_fn(model):
                return loss(model(x), labels)      # updates the BatchStats in place
            l, grads = nnx.value_and_grad(loss_fn)(model)
            optimizer.update(model, grads)
            return l

        model.train(); train_step(model, optimizer, x, labels)
        model.eval();  logits = model(x)           # running statistics, nothing updated

    The explicit functional form is :func:`jaxnorm.batchnorm.batch_norm`.

    Args:
      num_features: the feature size (the product of the sizes on the feature axes).
      use_running_average: use the running statistics (inference) instead of the batch's.
      axis: the feature axis or axes (``-1`` for NHWC and ``[N, D]``; ``1`` for NCHW).
      momentum: weight of the old running value (flax's convention; PyTorch's is ``1 - p``).
      epsilon: added to the variance.
      dtype: dtype of the output (default: flax's inference from x, the statistics and the
        parameters, so bfloat16 x gives float32 y).
      param_dtype: dtype of scale and bias.
      use_bias, use_scale: learn :math:`\beta` / :math:`\gamma`.
      bias_init, scale_init: their initializers (zeros, ones).
      axis_name, axis_index_groups: combine statistics over a mapped axis, exactly (under
        ``jax.jit`` with the batch sharded over a mesh, leave it None; a NameError names an
        axis_name that nothing binds).
      use_fast_variance: accepted for flax compatibility and ignored.
      promote_dtype: None (default): the statistics are computed from x as given (in float32
        or wider) and y takes flax's inferred dtype. Or flax's hook, called as flax calls it:
        ``promote_dtype((x, mean, var, scale, bias), dtype=dtype)`` returns the arrays the
        layer normalises with (pass ``flax.nnx.nn.dtypes.promote_dtype`` to cast x, the
        statistics and the parameters to ``dtype`` first, as ``flax.nnx.BatchNorm`` does by
        default; ``lambda args, **kw: args`` to cast nothing, as linen does).
      activation: None, a name from :mod:`jaxnorm.activations` or a callable, fused into the op.
      unbiased_running_var, cumulative: PyTorch's running-variance and ``momentum=None`` behaviour.
      virtual_batch_size: ghost batch norm over groups of this many rows of axis 0.
      renorm, r_max, d_max: Batch Renormalization (Ioffe 2017) and its clipping bounds.
      refuse_single_value: PyTorch's ValueError for a training batch with one value per feature
        (by default it is normalised as flax does: y is the bias).
      rngs: the ``nnx.Rngs`` for the initializers.
      bias_metadata, scale_metadata: metadata for the ``nnx.Param`` variables, as in flax.

    Raises:
      ValueError: if momentum is outside [0, 1] or activation names no activation.
      TypeError: if activation or promote_dtype is neither None nor a callable (or a name).

    References:
      Ioffe & Szegedy 2015, "Batch normalization"; Ioffe 2017, "Batch renormalization".

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from jaxnorm import nnx as jnnx
      >>> bn = jnnx.BatchNorm(2, momentum=0.9, rngs=nnx.Rngs(0))
      >>> bn(jnp.array([[1.0, 10.0], [3.0, 30.0]])).round(3)
      Array([[-1., -1.],
             [ 1.,  1.]], dtype=float32)
      >>> bn.mean[...]
      Array([0.2, 2. ], dtype=float32)
      >>> bn.eval()
      >>> bn(jnp.array([[0.2, 2.0]])).round(3)
      Array([[0., 0.]], dtype=float32)
    """

    def __init__(
        self,
        num_features: int,
        *,
        use_running_average: bool | None = False,
        axis: int | Sequence[int] = -1,
        momentum: float = 0.99,
        epsilon: float = 1e-5,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Callable = nnx.initializers.zeros,
        scale_init: Callable = nnx.initializers.ones,
        axis_name: Any = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        promote_dtype: Callable | None = None,
        activation: str | Callable | None = None,
        unbiased_running_var: bool = False,
        cumulative: bool = False,
        virtual_batch_size: int | None = None,
        renorm: bool = False,
        r_max: float = 3.0,
        d_max: float = 5.0,
        refuse_single_value: bool = False,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = MappingProxyType({}),
        scale_metadata: Mapping[str, Any] = MappingProxyType({}),
    ):
        # Checked here, where the model is built, not at its first call.
        batchnorm._check_momentum(momentum, "momentum")
        batchnorm._resolve_activation(activation)
        if promote_dtype is not None and (not callable(promote_dtype) or _is_dtype(promote_dtype)):
            raise TypeError(
                "promote_dtype must be None or a function like flax.nnx.nn.dtypes.promote_dtype "
                f"((x, mean, var, scale, bias), dtype=...) -> the same tuple, got "
                f"{type(promote_dtype).__name__}: {promote_dtype!r}"
                + ("; the output dtype is the dtype argument" if _is_dtype(promote_dtype) else "")
            )
        feature_shape = (num_features,)
        state = batchnorm.init_state(num_features)
        self.mean = nnx.BatchStat(state.mean)
        self.var = nnx.BatchStat(state.var)
        # Only the cumulative average needs the count; otherwise the state tree is flax's.
        self.count = nnx.BatchStat(state.count) if cumulative else nnx.data(None)
        self.scale: nnx.Param | None
        if use_scale:
            self.scale = nnx.Param(
                scale_init(rngs.params(), feature_shape, param_dtype), **scale_metadata
            )
        else:
            self.scale = nnx.data(None)
        self.bias: nnx.Param | None
        if use_bias:
            self.bias = nnx.Param(
                bias_init(rngs.params(), feature_shape, param_dtype), **bias_metadata
            )
        else:
            self.bias = nnx.data(None)
        self.num_features = num_features
        self.use_running_average = use_running_average
        self.axis = axis
        self.momentum = momentum
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_bias = use_bias
        self.use_scale = use_scale
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.use_fast_variance = use_fast_variance
        self.promote_dtype = promote_dtype
        self.activation = activation
        self.unbiased_running_var = unbiased_running_var
        self.cumulative = cumulative
        self.virtual_batch_size = virtual_batch_size
        self.renorm = renorm
        self.r_max = r_max
        self.d_max = d_max
        self.refuse_single_value = refuse_single_value

    def __call__(
        self,
        x: ArrayLike,
        use_running_average: bool | None = None,
        *,
        mask: ArrayLike | None = None,
    ) -> jax.Array:
        """Normalise x with the batch's statistics (updating ``mean``/``var``) or the running ones.

        Args:
          x: the input; the feature axes are ``self.axis``.
          use_running_average: overrides the attribute for this call.
          mask: True where a position counts in the statistics, read as flax reads it: any
            shape that broadcasts to x NumPy-style (aligned on the right: ``(H, W, 1)`` pads
            images shared by the batch, ``(D,)`` flags features, also on a square ``(N, N)``
            batch). A mask that does not broadcast to x may be the batch shape, one flag per
            position of the non-feature axes. A feature with no valid position is normalised
            with the running statistics, which it leaves as they were (flax's output and
            statistics become NaN).

        Returns:
          y of x's shape, in ``self.dtype`` (or flax's inferred dtype).

        Raises:
          ValueError: if use_running_average is None both here and on the module.
        """
        if use_running_average is None:
            use_running_average = self.use_running_average
        if use_running_average is None:
            raise ValueError(
                "BatchNorm needs use_running_average: pass it to the constructor, to the call, "
                "or set it with model.train() / model.eval() / nnx.view(model, "
                "use_running_average=...)"
            )
        x = jnp.asarray(x)
        feature_axes = _checks.normalize_axes(self.axis, x.ndim)
        feature_shape = tuple(x.shape[a] for a in feature_axes)
        if math.prod(feature_shape) != self.num_features:
            raise ValueError(
                f"BatchNorm was built with num_features={self.num_features} but x of shape "
                f"{x.shape} has feature shape {feature_shape} on axis {self.axis}"
            )
        # The variables are flat (num_features,) as in flax.nnx; several feature axes share them.
        as_features = lambda v: None if v is None else v[...].reshape(feature_shape)
        count = self.count[...] if self.count is not None else jnp.zeros((), jnp.int32)
        mean, var = as_features(self.mean), as_features(self.var)
        scale, bias = as_features(self.scale), as_features(self.bias)
        train = not use_running_average
        if self.promote_dtype is None:
            # flax.nnx's default promote_dtype: y's dtype is inferred from x, the statistics and
            # the parameters (but x is not rounded to ``dtype`` before the statistics).
            inferred = (x, mean, scale, bias)
        else:
            # As flax.nnx calls it; the promoted running statistics are what evaluation uses,
            # while training updates the stored ones (flax reads self.mean[...] again there).
            x, p_mean, p_var, scale, bias = self.promote_dtype(
                (x, mean, var, scale, bias), dtype=self.dtype
            )
            x = jnp.asarray(x)
            if not train:
                mean, var = p_mean, p_var
            inferred = (x, scale, bias)
        state = batchnorm.BatchNormState(mean, var, count)
        out_dtype = self.dtype or _flax_result_dtype(*(a.dtype for a in inferred if a is not None))
        y, new_state = _module_batch_norm(self, x, scale, bias, state, train, mask, out_dtype)
        if train:
            _store(self.mean, new_state.mean)
            _store(self.var, new_state.var)
            if self.count is not None:
                self.count[...] = new_state.count
        return y

    def set_view(self, use_running_average: bool | None = None):
        """Used by ``nnx.view``: set ``use_running_average`` when given (as flax's BatchNorm).

        ``nnx.view_info`` reads the Args section below (Google style, one entry per argument).

        Args:
          use_running_average: if True, the stored batch statistics will be
            used instead of computing the batch statistics on the input.
        """
        if use_running_average is not None:
            self.use_running_average = use_running_average


def _is_dtype(obj) -> bool:
    """True for a dtype or a scalar type such as ``jnp.float16`` (callable, but not the hook)."""
    try:
        jnp.dtype(obj)
    except TypeError:
        return False
    return True


def _store(variable: nnx.Variable, value: jax.Array) -> None:
    """Write an updated running statistic into its (flat) BatchStat.

    A statistic whose dtype changed (complex x makes the running mean complex, as in
    ``flax.linen.BatchNorm``) replaces the array: writing it in place would cast it to the old
    dtype, and flax.nnx's module drops the imaginary part that way, with a ComplexWarning.
    """
    old = variable[...]
    value = value.reshape(old.shape)
    if value.dtype == old.dtype:
        variable[...] = value
    else:
        variable.set_value(value)
