"""A small MLP classifier as pure functions, and the classification loss built on any model."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxnorm import _checks, activations, batchnorm, initializers

_INITIALIZERS = (
    "small_normal",
    "xavier_normal",
    "xavier_uniform",
    "he_normal",
    "he_uniform",
    "lecun_normal",
    "lecun_uniform",
    "orthogonal",
)


class Model(NamedTuple):
    """A classifier as two pure functions, in the spirit of optax's ``GradientTransformation``.

    Attributes:
      init: ``init(key) -> (params, state)``; ``state`` holds batch-norm running statistics (an
        empty tuple when the model has none).
      apply: ``apply(params, state, x, *, train, key=None) -> (logits, new_state)``; ``x`` is
        ``[N, ...]`` (``[N, D]`` for :func:`mlp`), logits ``[N, C]``. With ``train=True`` batch
        norm uses batch statistics and updates the state, and dropout draws its masks from
        ``key`` (the training loop passes a fresh key every step); with ``train=False`` batch
        norm uses the running statistics and dropout is off. An ``apply`` without a ``key``
        parameter (a model with no randomness, written for an earlier jaxnorm) still works:
        the loop passes ``key`` only to an ``apply`` that takes it (a parameter named ``key``,
        or ``**kwargs``).
      num_classes: C, the width of the last layer.

    Flax models become a ``Model`` through :func:`from_linen` and :func:`from_nnx`.
    """

    init: Callable[[jax.Array], tuple[Any, Any]]
    apply: Callable[..., tuple[jax.Array, Any]]
    num_classes: int


def _initializer(name: str) -> Callable:
    if not isinstance(name, str):
        raise TypeError(f"mlp: init must be an initializer name (a str), got {name!r}")
    if name not in _INITIALIZERS:
        raise ValueError(f"mlp: unknown init {name!r}; known names: {', '.join(_INITIALIZERS)}")
    return getattr(initializers, name)()


def mlp(
    widths: Sequence[int],
    *,
    activation: str = "relu",
    init: str = "he_normal",
    batch_norm: bool = False,
    momentum: float = 0.9,
    dropout: float = 0.0,
    dtype: Any = jnp.float32,
) -> Model:
    r"""A fully connected classifier, ``widths = [D, H1, ..., C]``, as pure functions.

    Each hidden layer computes :math:`h = \mathrm{drop}(f(\mathrm{BN}(h W + b)))` (BN only with
    ``batch_norm=True``, placed before the nonlinearity as in Ioffe & Szegedy 2015; dropout only
    with ``dropout > 0`` and ``train=True``); the last layer is linear and returns logits.
    Dropout is inverted dropout (Srivastava et al. 2014), as flax computes it: each unit is kept
    with probability :math:`p = 1 - \text{rate}` and scaled by :math:`1/p`, so inference needs
    no rescaling; the masks come from ``apply``'s ``key`` (a fresh one every training step), one
    ``jax.random.fold_in(key, layer)`` per hidden layer.

    Weights are drawn with the named :mod:`jaxnorm.initializers` factory (called with its
    defaults), biases start at 0. Params are a list of per-layer dicts ``{"w": [in, out], "b":
    [out]}`` (plus ``"scale"``, ``"bias"`` with batch norm), a plain pytree that optax, ``vmap``
    and checkpointing handle directly.

    Args:
      widths: the layer sizes, input first and the number of classes last (at least 2 entries).
      activation: a name from :mod:`jaxnorm.activations` (``"relu"``, ``"tanh"``, ...).
      init: an initializer name: ``small_normal``, ``xavier_normal``, ``xavier_uniform``,
        ``he_normal``, ``he_uniform``, ``lecun_normal``, ``lecun_uniform`` or ``orthogonal``.
      batch_norm: insert batch norm before each hidden nonlinearity.
      momentum: batch norm's running-average momentum, Flax's convention
        (``new = momentum * old + (1 - momentum) * batch``). The default 0.9 differs on purpose
        from the 0.99 of :func:`jaxnorm.batchnorm.batch_norm` and the modules (Flax's default):
        this MLP is for short runs (the lab trains 40 to 800 steps), and the running
        statistics keep a share ``momentum ** steps`` of their initial (0, 1): 0.99 ** 40 = 67%,
        0.9 ** 40 = 1.5%, so with 0.99 inference mode would normalise with statistics the
        trained network never produced. 0.9 is also PyTorch's default (its momentum 0.1, see
        :func:`jaxnorm.batchnorm.momentum_from_torch`). Pass 0.99 for long runs.
      dropout: the probability of dropping a hidden unit in training, in [0, 1) (flax's
        ``rate``; 0 switches dropout off). May be a traced scalar, so that a
        :func:`random_search` can search it with ``uniform(0.0, 0.5)`` in one program; a traced
        rate cannot be checked here, and one outside [0, 1) gives NaN or meaningless units.
      dtype: the parameters' dtype.

    Returns:
      A :class:`Model`.

    Raises:
      TypeError: if widths are not a sequence of ints, init/activation are not names, dtype is
        not floating, or dropout is not a real number; (from ``apply``) a model with dropout
        called with ``train=True`` and no ``key``.
      ValueError: if fewer than 2 widths are given, a width is < 1, a name is unknown, a
        concrete dropout rate lies outside [0, 1), or a concrete momentum outside [0, 1].

    References:
      Ioffe & Szegedy 2015, "Batch normalization"; He et al. 2015 (he_normal); Srivastava et
      al. 2014, "Dropout: a simple way to prevent neural networks from overfitting".

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxnorm import training
      >>> model = training.mlp([4, 8, 3], activation="tanh", init="xavier_normal")
      >>> params, state = model.init(jax.random.key(0))
      >>> logits, _ = model.apply(params, state, jnp.ones((5, 4)), train=False)
      >>> logits.shape
      (5, 3)
      >>> drop = training.mlp([4, 8, 3], dropout=0.5)
      >>> p, s = drop.init(jax.random.key(0))
      >>> logits, _ = drop.apply(p, s, jnp.ones((5, 4)), train=True, key=jax.random.key(1))
    """
    try:
        widths = tuple(widths)
    except TypeError:
        raise TypeError(f"mlp: widths must be a sequence of ints, got {widths!r}") from None
    if len(widths) < 2:
        raise ValueError(f"mlp needs at least an input and an output width, got widths={widths}")
    for w in widths:
        if isinstance(w, jax.core.Tracer):
            raise TypeError(
                f"mlp: widths must be Python ints, known when the model is built, got a traced "
                f"value in {widths!r}; in a random_search, search widths with "
                "choice(16, 32, static=True)"
            )
        if isinstance(w, bool) or not isinstance(w, int):
            raise TypeError(f"mlp: widths must be ints, got {widths!r}")
        if w < 1:
            raise ValueError(f"mlp: every width must be at least 1, got widths={widths}")
    if isinstance(momentum, int | float | np.integer | np.floating) and not 0 <= momentum <= 1:
        raise ValueError(f"mlp: momentum must be in [0, 1], got {momentum!r}")
    if dtype is not None and not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"mlp: dtype must be a floating dtype (e.g. jnp.float32), got {dtype!r}")
    act = activations.get(activation)
    kernel_init = _initializer(init)
    num_hidden = len(widths) - 2
    rate = _check_rate(dropout)

    def init_fn(key):
        keys = jax.random.split(key, len(widths) - 1)
        params, state = [], []
        for i, (k, fan_in, fan_out) in enumerate(zip(keys, widths[:-1], widths[1:], strict=True)):
            layer = {"w": kernel_init(k, (fan_in, fan_out), dtype), "b": jnp.zeros(fan_out, dtype)}
            if batch_norm and i < num_hidden:
                layer["scale"] = jnp.ones(fan_out, dtype)
                layer["bias"] = jnp.zeros(fan_out, dtype)
                state.append(batchnorm.init_state(fan_out))
            params.append(layer)
        return params, tuple(state)

    def apply_fn(params, state, x, *, train: bool, key: jax.Array | None = None):
        drops = train and num_hidden > 0 and not _is_zero(rate)
        if drops and key is None:
            raise TypeError(
                f"this mlp has dropout (rate {rate}): apply(..., train=True) needs key=, a PRNG "
                "key for the masks (fit and train pass one every step)"
            )
        if x.ndim != 2 or x.shape[-1] != widths[0]:
            raise ValueError(f"mlp expects x of shape [N, {widths[0]}], got {x.shape}")
        if batch_norm and len(state) != num_hidden:
            raise ValueError(
                f"this mlp has batch norm: pass the state returned by model.init ({num_hidden} "
                f"BatchNormState), e.g. train(model, params, ..., state=state); got {state!r}"
            )
        h = x.astype(dtype)
        new_state = []
        for i, layer in enumerate(params):
            h = h @ layer["w"] + layer["b"][None, :]
            if i == len(params) - 1:
                break
            if batch_norm:
                h, s = batchnorm.batch_norm(
                    h, layer["scale"], layer["bias"], state[i], train=train, momentum=momentum
                )
                new_state.append(s)
            h = act(h)
            if drops:
                h = _dropout(jax.random.fold_in(key, i), h, rate)
        return h, tuple(new_state)

    return Model(init=init_fn, apply=apply_fn, num_classes=widths[-1])


def _check_rate(rate):
    if _checks.is_tracer(rate):
        return rate  # a searched rate: unknown until it runs (documented)
    if isinstance(rate, np.ndarray | jax.Array) and rate.shape == () and rate.dtype != bool:
        rate = rate.item()
    if isinstance(rate, bool) or not isinstance(rate, int | float | np.integer | np.floating):
        raise TypeError(f"mlp: dropout must be a rate in [0, 1) (a float), got {rate!r}")
    if not 0.0 <= rate < 1.0:
        raise ValueError(
            f"mlp: dropout is the probability of dropping a unit and must be in [0, 1), got {rate}"
        )
    return float(rate)


def _is_zero(rate) -> bool:
    """A concrete rate of 0: no dropout at all (no key needed, no random numbers drawn)."""
    return not _checks.is_tracer(rate) and rate == 0.0


def _dropout(key, x, rate):
    """Inverted dropout, flax.linen.Dropout's formula: keep with p = 1 - rate, scale by 1/p."""
    # TODO(lead): use jaxnorm.regularization.dropout once regularization.py lands.
    keep = 1.0 - rate  # a Python float, or a traced float32 rate
    mask = jax.random.bernoulli(key, keep, x.shape)
    return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros_like(x))


def _takes_key(apply: Callable) -> bool:
    """Whether ``apply`` accepts ``key=``: a parameter named ``key``, or ``**kwargs``.

    A Model written before ``apply`` had a key (``apply(params, state, x, *, train)``) is called
    without one, as before.
    """
    try:
        parameters = inspect.signature(apply).parameters.values()
    except (TypeError, ValueError):  # no signature to read (a builtin): call it as before
        return False
    return any(
        p.kind is inspect.Parameter.VAR_KEYWORD
        or (
            p.name == "key"
            and p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        )
        for p in parameters
    )


def _apply(model: Model, params, state, x, *, train: bool, key):
    """``model.apply`` with the step's key when the model takes one."""
    if key is not None and _takes_key(model.apply):
        return model.apply(params, state, x, train=train, key=key)
    return model.apply(params, state, x, train=train)


def _check_labels(logits, y, who):
    if y.ndim != 1 or y.shape[0] != logits.shape[0]:
        raise ValueError(
            f"{who}: expected integer labels of shape [{logits.shape[0]}], got shape {y.shape}"
        )
    if not jnp.issubdtype(y.dtype, jnp.integer):
        raise TypeError(f"{who}: labels must be integers (class indices), got dtype {y.dtype}")
    _check_label_values(y, logits.shape[-1], who)


def _check_label_values(y, num_classes, who):
    """Concrete labels must lie in [0, num_classes); traced ones cannot be read (see the loss)."""
    if _checks.is_tracer(y):
        return
    if isinstance(y, jax.Array) and not y.is_fully_addressable:
        # Labels sharded over several processes (jax.distributed): each process checks the rows
        # it holds, at their global indices (no communication: this may run while tracing).
        local = np.zeros(y.shape, y.dtype)
        for shard in y.addressable_shards:
            local[shard.index] = np.asarray(shard.data)
        y = local
    y = np.asarray(y)
    if not np.issubdtype(y.dtype, np.integer):
        return  # reported by _check_labels with the logits' shape
    bad = (y < 0) | (y >= num_classes)
    if bad.any():
        values = np.unique(y[bad])
        shown = ", ".join(map(str, values[:8])) + (", ..." if values.size > 8 else "")
        raise ValueError(
            f"{who}: labels must be class indices in [0, {num_classes}) for {num_classes} "
            f"classes, but {int(bad.sum())} of {y.size} labels are outside it (values {shown}; "
            f"the first at index {int(np.flatnonzero(bad)[0])})"
        )


def _check_model(model: Any, who: str) -> None:
    if not (callable(getattr(model, "init", None)) and callable(getattr(model, "apply", None))):
        raise TypeError(
            f"{who}: model must be a Model (init and apply functions, e.g. from mlp or "
            f"from_linen), got {type(model).__name__}"
        )


def classification_loss(model: Model) -> Callable:
    r"""The mean softmax cross-entropy of ``model``, as a stateful loss for :func:`fit`.

    .. math:: L = -\frac{1}{N}\sum_i \log \mathrm{softmax}(z_i)_{y_i}

    Args:
      model: a :class:`Model`.

    The model runs in training mode (``train=True``: batch statistics, dropout on) and receives
    the loss's ``key`` (``model.apply(..., train=True, key=key)``), from which its dropout draws
    its masks; :func:`fit` passes a fresh key every step. An ``apply`` without a ``key``
    parameter is called without it.

    Returns:
      ``loss_fn(params, state, (x, y), key) -> (loss, (new_state, {"accuracy": acc}))``, with
      ``y`` integer class labels ``[N]`` in ``[0, C)``. Labels known when the loss is called
      are checked (ValueError); traced labels (inside ``jit``, ``scan``, ``vmap``, hence inside
      :func:`fit`, which checks ``data`` before it starts) cannot be, and a label outside
      ``[0, C)`` makes the loss NaN instead of a finite value (optax reads label -1 as the
      last class), so the run reports it.

    Raises:
      TypeError: ``model`` without ``init`` and ``apply`` functions.
      (from the returned loss) ValueError: labels of the wrong shape or, when concrete, outside
      ``[0, C)``; TypeError: labels that are not integers.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxnorm import training
      >>> model = training.mlp([2, 3])
      >>> params, state = model.init(jax.random.key(0))
      >>> zeros = jax.tree.map(jnp.zeros_like, params)
      >>> loss, _ = training.classification_loss(model)(
      ...     zeros, state, (jnp.ones((4, 2)), jnp.zeros(4, jnp.int32)), None)
      >>> round(float(loss), 4)  # log(3): uniform predictions
      1.0986
    """
    _check_model(model, "classification_loss")

    def loss_fn(params, state, batch, key):
        x, y = batch
        logits, new_state = _apply(model, params, state, x, train=True, key=key)
        _check_labels(logits, y, "classification_loss")
        return _cross_entropy_and_accuracy(logits, y, new_state)

    return loss_fn


def _cross_entropy_and_accuracy(logits, y, new_state):
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    per_example = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    # Traced labels cannot be checked: a label outside [0, C) makes the loss NaN, which fit and
    # train report. optax indexes with it, so -1 silently read the last class's logit.
    valid = (y >= 0) & (y < logits.shape[-1])
    loss = jnp.mean(jnp.where(valid, per_example, jnp.nan))
    accuracy = jnp.mean((jnp.argmax(logits, axis=-1) == y).astype(jnp.float32))
    return loss, (new_state, {"accuracy": accuracy})


def evaluate(model: Model, params: Any, data: tuple, *, state: Any = ()) -> dict[str, jax.Array]:
    """Loss and accuracy of ``model`` on ``data = (x, y)`` in inference mode (running statistics).

    Pure and traceable (it runs inside vmapped searches).

    Args:
      model: a :class:`Model`.
      params: its parameters.
      data: ``(x [N, D], y [N])``, integer labels.
      state: batch-norm state (empty tuple for a model without batch norm).

    Returns:
      ``{"loss": mean cross-entropy, "accuracy": fraction correct}`` (scalars). The loss is NaN
      when a traced label lies outside ``[0, C)`` (concrete ones raise).

    Raises:
      ValueError: labels of the wrong shape or, when concrete, outside ``[0, C)``, naming the
        offending values; TypeError: labels that are not integers, ``model`` without ``init``
        and ``apply``, ``data`` that is not a pair ``(x, y)``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxnorm import training
      >>> model = training.mlp([2, 2])
      >>> params, state = model.init(jax.random.key(0))
      >>> sorted(training.evaluate(model, params, (jnp.ones((3, 2)), jnp.zeros(3, jnp.int32))))
      ['accuracy', 'loss']
    """
    _check_model(model, "evaluate")
    if not isinstance(data, tuple | list) or len(data) != 2:
        raise TypeError(f"evaluate: data must be a pair (x, y), got {type(data).__name__}")
    x, y = data
    logits, _ = model.apply(params, state, jnp.asarray(x), train=False)
    y = jnp.asarray(y)
    _check_labels(logits, y, "evaluate")
    loss, (_, metrics) = _cross_entropy_and_accuracy(logits, y, state)
    return {"loss": loss, "accuracy": metrics["accuracy"]}
