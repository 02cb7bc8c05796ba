"""Flax models as a :class:`Model`: one adapter for linen modules, one for nnx modules.

Every tool of :mod:`jaxnorm.training` takes a :class:`Model`, two pure functions ``init(key) ->
(params, state)`` and ``apply(params, state, x, *, train, key=None) -> (logits, state)``. A Flax
model already is such a pair once its mode flag, its mutable collections and its random streams
are pinned down, which is all these adapters do:

- linen: ``params`` is ``variables["params"]``, ``state`` the other collections
  (``{"batch_stats": ...}``); ``apply`` is ``module.apply`` with the mode flag, ``rngs=`` for
  dropout and ``mutable=`` for the running statistics.
- nnx: ``params`` and ``state`` are the ``nnx.State`` of the ``nnx.Param`` and of the other
  variables (``nnx.BatchStat``), as ``nnx.split`` returns them; ``apply`` merges them into a copy
  of the model inside the traced function, sets its mode as ``model.train()`` / ``model.eval()``
  do, gives its random streams the step's key, calls it and splits the new statistics out. The
  random streams' own state is kept out of ``state``: it is reseeded every call.

Both are pure, so ``fit`` runs them in ``lax.scan``, and searches and ensembles ``vmap`` them.
flax is imported when an adapter is built (``import jaxnorm.training`` does not load it).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxnorm import _checks
from jaxnorm.training._model import Model

# Arguments of a model's __call__ that select the mode, recognised when mode_kwargs is not given:
# those that are True in training, and those that are True in inference.
_TRAIN_FLAGS = ("train", "training", "is_training")
_EVAL_FLAGS = ("deterministic", "use_running_average", "eval", "inference")


class FlaxModel(Model):
    """A :class:`Model` made from a Flax model by :func:`from_linen` or :func:`from_nnx`.

    It is a :class:`Model` (the same three fields, ``init``, ``apply`` and ``num_classes``), so
    every training tool takes it; in addition, :meth:`merge` puts trained parameters and state
    back into Flax's own form, and :attr:`flax_model` is the model it was made from.
    """

    # A NamedTuple subclass cannot add fields; the Flax side lives in the instance's __dict__,
    # and _replace, copy and pickle carry it along.
    def __new__(cls, init, apply, num_classes, merge=None, flax_model=None):
        self = super().__new__(cls, init, apply, num_classes)
        self._merge_fn = merge
        self.flax_model = flax_model
        return self

    def __getnewargs__(self):
        return (*self, self._merge_fn, self.flax_model)

    def _replace(self, **changes):
        fields = dict(zip(self._fields, self, strict=True))
        fields.update(changes)
        return type(self)(**fields, merge=self._merge_fn, flax_model=self.flax_model)

    def merge(self, params: Any, state: Any) -> Any:
        """Trained ``(params, state)`` back in Flax's form.

        linen: the variables dict ``{"params": params, **state}`` for ``module.apply``; nnx: a new
        model holding them (the model given to :func:`from_nnx`, or the factory's, in the mode it
        was built in: call ``.eval()`` for inference). To update an nnx model in place instead:
        ``nnx.update(model, params, state)``. For an ensemble's stacked members, take one first:
        ``jax.tree.map(lambda a: a[k], (params, state))``.
        """
        return self._merge_fn(params, state)


def _who_call(obj) -> str:
    return f"{type(obj).__name__}.__call__"


def _signature(call):
    try:
        return inspect.signature(call)
    except (TypeError, ValueError):  # nothing to read: accept what the user says
        return None


def _mode_kwargs(call, mode_kwargs, who, owner, *, required):
    """``train -> {name: value}``, the keyword arguments that put ``call`` in a mode."""
    sig = _signature(call)
    named = set()
    var_keyword = sig is None
    if sig is not None:
        for p in sig.parameters.values():
            if p.kind is inspect.Parameter.VAR_KEYWORD:
                var_keyword = True
            elif p.kind in (
                inspect.Parameter.KEYWORD_ONLY,
                inspect.Parameter.POSITIONAL_OR_KEYWORD,
            ):
                named.add(p.name)
    if mode_kwargs is not None:
        if not callable(mode_kwargs):
            raise TypeError(
                f"{who}: mode_kwargs must be a function train -> dict of keyword arguments for "
                f"{owner}, e.g. lambda train: {{'deterministic': not train}}; got {mode_kwargs!r}"
            )
        for train in (True, False):
            kw = mode_kwargs(train)
            if not isinstance(kw, Mapping) or not all(isinstance(k, str) for k in kw):
                raise TypeError(
                    f"{who}: mode_kwargs({train}) must return a dict of keyword arguments, got "
                    f"{kw!r}"
                )
            unknown = sorted(set(kw) - named)
            if unknown and not var_keyword:
                raise TypeError(
                    f"{who}: mode_kwargs gives {unknown}, but {owner} takes no such argument "
                    f"(its keyword arguments: {sorted(named) or 'none'})"
                )
        return lambda train: dict(mode_kwargs(train))
    flags = [n for n in _TRAIN_FLAGS if n in named]
    inverse = [n for n in _EVAL_FLAGS if n in named]
    if not flags and not inverse and required:
        raise ValueError(
            f"{who}: cannot tell how to switch {owner} between training and inference: it has "
            f"none of the arguments {', '.join(_TRAIN_FLAGS + _EVAL_FLAGS)}. Say which with "
            "mode_kwargs, e.g. mode_kwargs=lambda train: {'is_eval': not train}, or "
            "mode_kwargs=lambda train: {} for a model that has no mode"
        )
    return lambda train: {**{n: train for n in flags}, **{n: not train for n in inverse}}


def _sample_spec(sample_x, who) -> jax.ShapeDtypeStruct:
    if isinstance(sample_x, jax.ShapeDtypeStruct):
        spec = sample_x
    else:
        try:
            spec = jax.ShapeDtypeStruct(np.shape(sample_x), jnp.result_type(sample_x))
        except TypeError as e:
            raise TypeError(
                f"{who}: sample_x must be an array (a batch of inputs, e.g. x_train[:1]) or a "
                f"jax.ShapeDtypeStruct, got {type(sample_x).__name__}"
            ) from e
    if len(spec.shape) < 1:
        raise ValueError(
            f"{who}: sample_x must be a batch of inputs with a leading batch axis, e.g. "
            f"x_train[:1], got shape {spec.shape}"
        )
    return spec


def _typed_key(key):
    """A typed PRNG key (``jax.random.key``) from either form; raw ``PRNGKey`` data is wrapped."""
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key
    return jax.random.wrap_key_data(key)


def _check_num_classes(num_classes, logits, who, what):
    if len(logits.shape) != 2:
        raise ValueError(
            f"{who}: the model must return logits of shape [N, C] (one row of class scores per "
            f"example), but on {what} it returns shape {logits.shape}; flatten or pool before the "
            "last layer"
        )
    found = logits.shape[-1]
    if num_classes is None:
        return found
    if isinstance(num_classes, bool) or not isinstance(num_classes, int | np.integer):
        raise TypeError(f"{who}: num_classes must be an int, got {num_classes!r}")
    if num_classes != found:
        raise ValueError(
            f"{who}: num_classes={num_classes}, but the model returns {found} logits per example"
        )
    return int(found)


def _probe(who, name, spec, run, first):
    """The logits' shape from abstract runs of the model (no computation), in both modes.

    ``run(first, x, train) -> logits``. An error of the model is raised here, at the boundary,
    with a note saying where. Training mode runs on a batch of at least 2: batch norm has no
    batch statistics for a single example.
    """
    pair = jax.ShapeDtypeStruct((max(2, spec.shape[0]), *spec.shape[1:]), spec.dtype)
    try:
        logits = jax.eval_shape(lambda f, x: run(f, x, False), first, spec)
        jax.eval_shape(lambda f, x: run(f, x, True), first, pair)
    except Exception as e:
        e.add_note(f"({who}: raised while running {name} on sample_x of shape {spec.shape})")
        raise
    return logits


def from_linen(
    module: Any,
    sample_x: Any,
    *,
    num_classes: int | None = None,
    mode_kwargs: Callable[[bool], Mapping[str, Any]] | None = None,
    rng_collections: Sequence[str] = ("dropout",),
) -> FlaxModel:
    """A ``flax.linen`` classifier as a :class:`Model`, for every tool of ``jaxnorm.training``.

    - ``init(key)``: ``module.init({"params": k1, "dropout": k2, ...}, zeros like sample_x,
      **mode_kwargs(False))`` with ``k1, k2 = jax.random.split(key)``; ``params`` is
      ``variables["params"]``, ``state`` the dict of the other collections (``{"batch_stats":
      ...}``; ``{}`` without batch norm; a sown ``"intermediates"`` collection is dropped).
    - ``apply(params, state, x, *, train, key=None)``: ``module.apply({"params": params,
      **state}, x, **mode_kwargs(train), rngs=..., mutable=...)``: in training the collections
      of ``state`` are mutable and their new values returned; the random collections
      (``rng_collections``) get ``jax.random.fold_in(key, i)`` when a key is given (the training
      loop passes a fresh one every step).

    The mode: by default the argument of ``module.__call__`` named ``train``, ``training`` or
    ``is_training`` receives ``train``, and one named ``deterministic``, ``use_running_average``,
    ``eval`` or ``inference`` receives ``not train`` (every such argument it has). For any other
    convention say it with ``mode_kwargs``.

    Args:
      module: a ``flax.linen.Module`` whose ``__call__(x, ...)`` returns logits ``[N, C]``.
      sample_x: an input batch such as ``x_train[:1]`` (or a ``jax.ShapeDtypeStruct``): its shape
        and dtype set the parameters' shapes (``init`` runs on zeros of that shape).
      num_classes: C; default read from the output on ``sample_x`` (given, it is checked).
      mode_kwargs: ``mode_kwargs(train) -> dict`` of keyword arguments for ``__call__``, e.g.
        ``lambda train: {"deterministic": not train}``, or ``lambda train: {}`` for a module
        without a mode.
      rng_collections: the random collections the module draws from in training.

    Returns:
      A :class:`FlaxModel`: a :class:`Model` whose ``merge(params, state)`` gives the variables
      dict back (``{"params": params, **state}``) for ``module.apply`` and
      :func:`jaxnorm.diagnostics.capture_activations`.

    Raises:
      TypeError: ``module`` is not a linen Module; ``mode_kwargs`` is not a function returning
        a dict, or names an argument ``__call__`` does not take; a bad ``sample_x`` or
        ``num_classes``.
      ValueError: no recognised mode argument and no ``mode_kwargs``; the output on
        ``sample_x`` is not ``[N, C]`` logits or disagrees with ``num_classes``; a module without
        parameters. Errors of the module itself on ``sample_x`` propagate, with a note.

    Example:
      >>> import jax, jax.numpy as jnp, optax, flax.linen as nn
      >>> from jaxnorm import training
      >>> class MLP(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x, train: bool):
      ...         x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Dense(16)(x)))
      ...         return nn.Dense(3)(nn.Dropout(0.1, deterministic=not train)(x))
      >>> x = jax.random.normal(jax.random.key(0), (30, 4)); y = jnp.arange(30) % 3
      >>> model = training.from_linen(MLP(), x[:1])
      >>> params, state = model.init(jax.random.key(1))
      >>> params, hist = training.train(model, params, optax.adam(1e-2), (x, y), state=state,
      ...                               key=jax.random.key(2), num_steps=20, progress=False)
      >>> variables = model.merge(params, hist.state)  # {"params": ..., "batch_stats": ...}
      >>> MLP().apply(variables, x, train=False).shape
      (30, 3)
    """
    import flax.linen as linen

    who = "from_linen"
    if not isinstance(module, linen.Module):
        raise TypeError(
            f"{who}: module must be a flax.linen.Module, got {type(module).__name__}"
            + ("; for an nnx model use from_nnx" if _is_nnx(module) else "")
        )
    spec = _sample_spec(sample_x, who)
    mode = _mode_kwargs(module.__call__, mode_kwargs, who, _who_call(module), required=True)
    if isinstance(rng_collections, str) or not all(isinstance(c, str) for c in rng_collections):
        raise TypeError(
            f"{who}: rng_collections must be a sequence of collection names such as "
            f"('dropout',), got {rng_collections!r}"
        )
    rng_collections = tuple(rng_collections)

    def rngs(key):
        key = _typed_key(key)
        return {name: jax.random.fold_in(key, i) for i, name in enumerate(rng_collections)}

    def init(key):
        k_params, k_rest = jax.random.split(_typed_key(key))
        variables = module.init(
            {"params": k_params, **rngs(k_rest)}, jnp.zeros(spec.shape, spec.dtype), **mode(False)
        )
        state = {k: v for k, v in variables.items() if k not in ("params", "intermediates")}
        if "params" not in variables:
            raise ValueError(f"{who}: {type(module).__name__} has no parameters to train")
        return variables["params"], state

    def apply(params, state, x, *, train: bool, key: jax.Array | None = None):
        variables = {"params": params, **state}
        kw = mode(train)
        if key is not None:
            kw["rngs"] = rngs(key)
        if train and state:
            logits, updates = module.apply(variables, x, mutable=list(state), **kw)
            return logits, {c: updates.get(c, state[c]) for c in state}
        return module.apply(variables, x, **kw), state

    def merge(params, state):
        return {"params": params, **state}

    def run(key, x, train):
        return apply(*init(key), x, train=train, key=key if train else None)[0]

    logits = _probe(who, type(module).__name__, spec, run, jax.random.key(0))
    classes = _check_num_classes(num_classes, logits, who, f"sample_x of shape {spec.shape}")
    return FlaxModel(init, apply, classes, merge=merge, flax_model=module)


def _is_nnx(obj) -> bool:
    from flax import nnx

    return isinstance(obj, nnx.Module)


def _split(model):
    """``(graphdef, params, rng state, state)``: state is every variable but params, RNG state
    and sown intermediates."""
    from flax import nnx

    graphdef, params, rngs, _, state = nnx.split(
        model, nnx.Param, nnx.RngState, nnx.Intermediate, ...
    )
    return graphdef, params, rngs, state


def _state_filter():
    from flax import nnx

    return nnx.Not(nnx.Any(nnx.Param, nnx.RngState, nnx.Intermediate))


def _reseed(model, key) -> None:
    """Every random stream of ``model`` starts from ``fold_in(key, i)`` (count 0)."""
    from flax import nnx

    streams = [s for _, s in nnx.iter_graph(model) if isinstance(s, nnx.RngStream)]
    for i, stream in enumerate(streams):
        k = jax.random.fold_in(key, i)
        shape = tuple(stream.key.shape)
        if shape:  # a stream split for nnx.vmap: one key per slot
            k = jax.random.split(k, math.prod(shape)).reshape(shape)
        stream.key.set_value(k)
        stream.count.set_value(jnp.zeros(shape, jnp.uint32))


def _shapes(tree):
    return jax.tree.structure(tree), [tuple(a.shape) for a in jax.tree.leaves(tree)]


def from_nnx(
    model: Any,
    sample_x: Any,
    *,
    num_classes: int | None = None,
    mode_kwargs: Callable[[bool], Mapping[str, Any]] | None = None,
) -> FlaxModel:
    """A ``flax.nnx`` classifier as a :class:`Model`, for every tool of ``jaxnorm.training``.

    ``model`` is either a factory, ``lambda rngs: MyModel(..., rngs=rngs)``, or a constructed
    model:

    - a factory: ``init(key)`` builds ``factory(nnx.Rngs(key))`` and returns its parameters, so
      every key gives new weights, inside ``jit`` and ``vmap`` too. :func:`train_ensemble` and
      :func:`random_search` need this form (each member or trial initialises from its own key).
    - a constructed model: ``init(key)`` returns the model's own weights, whatever the key: right
      for :func:`fit`, :func:`train` and the babysitting checks, which start from given
      parameters. Under a transformation (a traced key, as in an ensemble or a search) it raises
      a ``ValueError`` that asks for a factory, since every member would start identical.

    ``params`` are the ``nnx.Param`` variables and ``state`` the other variables (``nnx.BatchStat``
    running statistics; empty without batch norm), each an ``nnx.State``, as ``nnx.split(model,
    nnx.Param, ...)`` gives them: optax and :func:`jaxnorm.nn.weight_decay_mask` take them as
    they are, and ``nnx.update(model, params, state)`` writes trained ones back into a model.

    ``apply(params, state, x, *, train, key=None)`` merges them into a copy of the model (inside
    the traced function: nothing outside is mutated), in training mode as ``model.train()`` sets it
    (``deterministic=False``, ``use_running_average=False`` on every submodule that has them) or
    in inference mode as ``model.eval()`` does, passes ``mode_kwargs(train)`` to ``__call__``
    (by default ``train``/``training``/``is_training`` = train and ``deterministic`` /
    ``use_running_average``/``eval``/``inference`` = not train, for each such argument
    ``__call__`` has; none is needed), reseeds every random stream (``nnx.Dropout``'s) from
    ``jax.random.fold_in(key, i)`` when a key is given, calls it and returns the logits and the
    new ``state``. The streams' own key and count are not part of ``state``: they restart from
    the step's key at every call, so a step is a pure function of its key.

    Args:
      model: an ``nnx.Module`` returning logits ``[N, C]``, or a factory ``rngs -> nnx.Module``.
      sample_x: an input batch such as ``x_train[:1]`` (or a ``jax.ShapeDtypeStruct``): the model
        is run on it abstractly (no computation) to find ``num_classes`` and to report errors here.
      num_classes: C; default read from the output on ``sample_x`` (given, it is checked).
      mode_kwargs: ``mode_kwargs(train) -> dict`` of keyword arguments for ``__call__``, for a
        model whose mode is an argument with another name.

    Returns:
      A :class:`FlaxModel`: a :class:`Model` whose ``merge(params, state)`` returns a new nnx
      model holding them (for inference, :func:`jaxnorm.diagnostics.capture_activations`, ...).

    Raises:
      TypeError: ``model`` is neither an nnx Module nor a factory returning one; a bad
        ``mode_kwargs``, ``sample_x`` or ``num_classes``.
      ValueError: the output is not ``[N, C]`` logits or disagrees with ``num_classes``; (from
        ``init``) a constructed model's ``init`` under a transformation, or a factory whose
        models differ in structure between keys; (from ``apply``) ``train=True`` without a key
        for a model with random streams.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from flax import nnx
      >>> from jaxnorm import training
      >>> class MLP(nnx.Module):
      ...     def __init__(self, rngs):
      ...         self.hidden = nnx.Linear(4, 16, rngs=rngs)
      ...         self.bn = nnx.BatchNorm(16, rngs=rngs)
      ...         self.drop = nnx.Dropout(0.1, rngs=rngs)
      ...         self.out = nnx.Linear(16, 3, rngs=rngs)
      ...     def __call__(self, x):
      ...         return self.out(self.drop(nnx.relu(self.bn(self.hidden(x)))))
      >>> x = jax.random.normal(jax.random.key(0), (30, 4)); y = jnp.arange(30) % 3
      >>> model = training.from_nnx(lambda rngs: MLP(rngs), x[:1])
      >>> params, state = model.init(jax.random.key(1))
      >>> params, hist = training.train(model, params, optax.adam(1e-2), (x, y), state=state,
      ...                               key=jax.random.key(2), num_steps=20, progress=False)
      >>> trained = model.merge(params, hist.state)
      >>> trained.eval()
      >>> trained(x).shape
      (30, 3)
    """
    from flax import nnx

    who = "from_nnx"
    if isinstance(model, nnx.Module):
        factory = None
        template = nnx.clone(model)  # the mode is switched below: never on the user's model
    elif callable(model) and not _is_linen(model):
        factory = model

        def build():
            built = factory(nnx.Rngs(0))
            if not isinstance(built, nnx.Module):
                raise TypeError(
                    f"{who}: model must be an nnx.Module or a factory rngs -> nnx.Module, but "
                    f"the factory returned {type(built).__name__}"
                )
            return built

        # Abstract (no computation): the structure, shapes and graph of the factory's models.
        template = nnx.eval_shape(build)
    else:
        raise TypeError(
            f"{who}: model must be an nnx.Module or a factory such as lambda rngs: "
            f"MyModel(..., rngs=rngs), got {model!r}"
            + ("; for a linen module use from_linen" if _is_linen(model) else "")
        )
    name = type(template).__name__
    spec = _sample_spec(sample_x, who)
    mode = _mode_kwargs(template.__call__, mode_kwargs, who, _who_call(template), required=False)

    nnx.pop(template, nnx.Intermediate)  # values sown by earlier calls are not the model's state
    graphdef, params0, rng0, state0 = _split(template)
    graphdefs = {}
    for train in (True, False):
        template.train() if train else template.eval()
        graphdefs[train] = _split(template)[0]
    # The random streams' key and count are not part of the state: every call reseeds them, so
    # only their shapes are kept, and placeholders fill them until then.
    rng_spec = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), rng0)
    has_streams = bool(jax.tree.leaves(rng_spec))

    def init(key):
        if factory is None:
            if _checks.is_tracer(key):
                raise ValueError(
                    f"{who}: this model was built from a constructed {name}, so init(key) "
                    "returns its one set of weights for every key, and the members of an "
                    "ensemble or the trials of a search (which call init with traced keys) "
                    "would all start identical. Pass a factory instead: "
                    f"from_nnx(lambda rngs: {name}(..., rngs=rngs), sample_x)"
                )
            return params0, state0
        built = factory(nnx.Rngs(_typed_key(key)))
        nnx.pop(built, nnx.Intermediate)
        _, params, _, state = _split(built)
        if _shapes((params, state)) != _shapes((params0, state0)):
            raise ValueError(
                f"{who}: the factory built models of different structures or shapes for "
                "different keys; it must build the same model every time, only with other "
                "random weights"
            )
        return params, state

    def apply(params, state, x, *, train: bool, key: jax.Array | None = None):
        if train and key is None and has_streams:
            raise TypeError(
                f"{who}: this {name} draws random numbers (dropout): apply(..., train=True) "
                "needs key=, a PRNG key (fit and train pass one every step)"
            )
        # nnx variables may be mutated only in the trace that made them: rebuild the trees
        # here (unflattening makes new Variable objects) rather than reuse the ones passed in.
        params, state = jax.tree.map(lambda a: a, (params, state))
        copy = nnx.merge(graphdefs[bool(train)], params, _placeholders(rng_spec), state)
        if key is not None and has_streams:
            _reseed(copy, _typed_key(key))
        logits = copy(x, **mode(train))
        return logits, nnx.state(copy, _state_filter()) if train else state

    def merge(params, state):
        return nnx.merge(graphdef, params, _placeholders(rng_spec), state)

    def run(variables, x, train):
        key = jax.random.key(0) if train else None
        return apply(*variables, x, train=train, key=key)[0]

    logits = _probe(who, name, spec, run, (params0, state0))
    classes = _check_num_classes(num_classes, logits, who, f"sample_x of shape {spec.shape}")
    return FlaxModel(init, apply, classes, merge=merge, flax_model=model)


def _placeholders(spec):
    """Concrete values for abstract RNG variables: keys from ``jax.random.key(0)``, counts 0."""

    def fill(s):
        if jax.dtypes.issubdtype(s.dtype, jax.dtypes.prng_key):
            key = jax.random.key(0)
            return jax.random.split(key, s.shape) if s.shape else key
        return jnp.zeros(s.shape, s.dtype)

    return jax.tree.map(fill, spec)


def _is_linen(obj) -> bool:
    import flax.linen as linen

    return isinstance(obj, linen.Module)
