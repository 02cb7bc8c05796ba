"""Diagnostics that make training visible: activations, dead and saturated units, update ratios.

The lecture's babysitting habits as functions:

- :func:`capture_activations` runs a Flax model (linen or nnx) and returns the output of every
  submodule, in call order, without changing the model; :func:`activation_stats` turns those into
  per-layer mean, std, dead and saturated fractions and histograms (:func:`stats_table` prints
  them), the statistics behind the lecture's "all activations collapse to zero" and "all tanh
  units saturate" figures.
- :func:`update_ratio` is the ratio ``||update|| / ||param||`` per parameter (about 1e-3 is
  healthy); :func:`update_ratio_monitor` computes it inside an optax chain, under ``jit``, and
  keeps it in the optimizer state; :func:`check_update_ratios` flags leaves far from 1e-3.
- :func:`expected_initial_loss` and :func:`check_initial_loss`: with small weights the first loss
  of a softmax classifier is ``log(C)``.
- :func:`lsuv`: layer-sequential unit-variance initialisation (Mishkin & Matas 2015).

What counts as a layer activation: the output of each submodule's ``__call__`` (a ``Dense``'s
output is its pre-activation; add a module such as ``jaxnorm.nn.PReLU``, or ``sow`` the value, to
see a nonlinearity's output), plus anything the model ``sow``\\ s itself. A unit is a feature on the
last axis: for ``[N, D]`` a column, for NHWC convolution outputs a channel.

Layering: this module imports only jax and numpy at import time. Flax is imported inside
:func:`capture_activations` and :func:`lsuv`, optax inside :func:`update_ratio_monitor` (both are
jaxnorm dependencies; the lazy import keeps ``import jaxnorm.diagnostics`` light and the core free
of them).
"""

from __future__ import annotations

import collections
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxnorm import _checks

__all__ = [
    "InitialLossCheck",
    "LayerStats",
    "UpdateRatioCheck",
    "UpdateRatioState",
    "activation_stats",
    "capture_activations",
    "check_initial_loss",
    "check_update_ratios",
    "expected_initial_loss",
    "latest_update_ratios",
    "layer_stats",
    "lsuv",
    "stats_table",
    "update_ratio",
    "update_ratio_monitor",
]


# --------------------------------------------------------------------------------------------
# Capturing activations
# --------------------------------------------------------------------------------------------

_MISSING = object()


def _name(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def _model_kind(model: Any) -> str:
    try:
        import flax.linen as linen
        from flax import nnx
    except ImportError as e:  # pragma: no cover - flax is a dependency of jaxnorm
        raise ImportError("capturing activations needs flax: pip install flax") from e
    if isinstance(model, linen.Module):
        return "linen"
    if isinstance(model, nnx.Module):
        return "nnx"
    raise TypeError(
        f"model must be a flax.linen.Module or a flax.nnx.Module, but got {type(model).__name__}; "
        "for a plain function, compute its intermediate values yourself and pass them to "
        "activation_stats"
    )


def _add_leaves(records: list, path: tuple, value: Any) -> None:
    # A module may return a pytree (an LSTM cell returns (carry, y)): one entry a leaf.
    leaves = jax.tree_util.tree_flatten_with_path(value)[0]
    for leaf_path, leaf in leaves:
        if not hasattr(leaf, "shape"):
            continue
        suffix = tuple(_key_str(k) for k in leaf_path)
        records.append(((*path, *suffix), leaf))


def _key_str(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _linen_records(model, variables, x, include, kwargs) -> list[tuple[tuple, jax.Array]]:
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise TypeError(
            "for a flax.linen model, variables must be the dict returned by model.init "
            f"(with a 'params' collection), but got {type(variables).__name__}"
        )
    variables = {k: v for k, v in variables.items() if k != "intermediates"}
    if include is None:
        capture = True
    else:

        def capture(module, method_name):
            return method_name == "__call__" and bool(include(module))

    # Collections other than params are mutable so that train-mode batch norm runs; its updated
    # statistics are dropped, so capturing has no side effect.
    mutable = ["intermediates", *(c for c in variables if c != "params")]
    _, state = model.apply(variables, x, capture_intermediates=capture, mutable=mutable, **kwargs)
    records: list = []

    def walk(tree, path):
        for key, value in tree.items():
            if isinstance(value, Mapping):
                walk(value, (*path, key))
                continue
            if key == "__call__":
                if not path:  # the model's own output, not a layer's
                    continue
                entry = path
            else:
                entry = (*path, key)  # a value the model sowed itself
            for i, v in enumerate(value):
                _add_leaves(records, entry if i == 0 else (*entry[:-1], f"{entry[-1]}:{i}"), v)

    walk(state.get("intermediates", {}), ())
    return records


def _nth(path: tuple, n: int) -> tuple:
    """The entry of a path's n-th call or sow: ``name``, then ``name:1``, ``name:2``, ..."""
    return path if n == 0 else (*path[:-1], f"{path[-1]}:{n}")


def _nnx_records(model, variables, x, include, kwargs) -> list[tuple[tuple, jax.Array]]:
    from flax import nnx

    # Work on a copy: calling an nnx model mutates it (batch statistics, RNG counters), and
    # capturing should not.
    model = nnx.clone(model)
    if variables is not None:
        nnx.update(model, variables)
    modules = list(nnx.iter_modules(model))
    all_paths = {id(m): tuple(path) for path, m in modules}
    paths = {
        id(m): tuple(path) for path, m in modules if path != () and (include is None or include(m))
    }
    # Events in call order: ("out", path, value) when a module returns, ("sow", path, n) when
    # the model sows the n-th value under path (filled in from nnx.capture's result after the
    # call, so that a sow with its own reduce_fn reports what it reduced to).
    events: list = []
    calls: collections.Counter = collections.Counter()
    sows: collections.Counter = collections.Counter()
    classes = {type(m) for _, m in modules}
    originals = {cls: cls.__dict__.get("__call__", _MISSING) for cls in classes}
    resolved = {cls: cls.__call__ for cls in classes}
    original_sow = nnx.Module.__dict__["sow"]

    def hooked(cls, call):
        @functools.wraps(call)
        def wrapper(self, *args, **kw):
            out = call(self, *args, **kw)
            # type(self) is cls: a subclass's __call__ calling super().__call__ records once.
            if type(self) is cls and id(self) in paths:
                path = paths[id(self)]
                events.append(("out", _nth(path, calls[path]), out))
                calls[path] += 1
            return out

        return wrapper

    @functools.wraps(original_sow)
    def sow(self, variable_type, name, value, *args, **kw):
        captured = original_sow(self, variable_type, name, value, *args, **kw)
        # True only when nnx.capture collects it, i.e. for nnx.Intermediate.
        if captured and id(self) in all_paths:
            path = (*all_paths[id(self)], name)
            events.append(("sow", path, sows[path]))
            sows[path] += 1
        return captured

    # A forward hook, nnx having none: __call__ of the model's own classes, and Module.sow, are
    # wrapped for the duration of one call and restored after (flax's
    # nnx.capture(method_outputs=...) records module outputs too, but returns them sorted by
    # path, and its sown values sorted by name, rather than in call order).
    try:
        for cls in classes:
            cls.__call__ = hooked(cls, resolved[cls])
        nnx.Module.sow = sow
        _, sown = nnx.capture(lambda m: m(x, **kwargs), nnx.Intermediate)(model)
    finally:
        nnx.Module.sow = original_sow
        for cls, original in originals.items():
            if original is _MISSING:
                delattr(cls, "__call__")
            else:
                cls.__call__ = original
    values = {}
    for path, var in nnx.to_flat_state(sown):
        value = var.get_value() if hasattr(var, "get_value") else var
        # The default reduce_fn collects a tuple, one element a sow; any other reduces to one.
        values[tuple(path)] = value if isinstance(value, tuple) else (value,)
    records: list = []
    for kind, path, v in events:
        if kind == "out":
            _add_leaves(records, path, v)
        elif v < len(values.get(path, ())):
            _add_leaves(records, _nth(path, v), values[path][v])
    for path, vs in values.items():  # sown where no hook saw it (a module made during the call)
        for n in range(sows[path], len(vs)):
            _add_leaves(records, _nth(path, n), vs[n])
    return records


def _records(model, variables, x, include, kwargs) -> list[tuple[tuple, jax.Array]]:
    if include is not None and not callable(include):
        raise TypeError(f"include must be a predicate on modules or None, but got {include!r}")
    if _model_kind(model) == "linen":
        return _linen_records(model, variables, x, include, kwargs)
    return _nnx_records(model, variables, x, include, kwargs)


def capture_activations(
    model: Any,
    variables: Any,
    x: Any,
    *,
    include: Callable[[Any], bool] | None = None,
    **kwargs: Any,
) -> collections.OrderedDict[str, jax.Array]:
    """The output of every submodule of a Flax model on ``x``, in call order.

    linen: ``model.apply(variables, x, capture_intermediates=..., **kwargs)``. Collections other
    than ``params`` are made mutable and their updates dropped, so train-mode batch norm runs
    without side effects. nnx: ``model(x, **kwargs)`` is run on a copy of the model (with
    ``variables``, an ``nnx.State``, applied to the copy if given), with ``__call__`` of the
    model's classes hooked for the duration of the call; the model itself is not changed.

    Names join the module path with ``/`` (``"Dense_0"``, ``"Block_0/Dense_0"`` in linen,
    ``"layers/0"`` in nnx). The model's own output is left out. A module called more than once
    gives ``name``, ``name:1``, ...; a module returning a pytree gives one entry a leaf. Values
    the model ``sow``\\ s (linen: into ``"intermediates"``; nnx: as ``nnx.Intermediate``) are
    included under the sow's name (the n-th sow of a name as ``name:n``). linen lists an entry at
    its module's first call (a module's sows before its own output); nnx lists every module
    output and sown value where it happened in the call.

    Args:
      model: a ``flax.linen.Module`` or a ``flax.nnx.Module``.
      variables: linen: the variables dict (``model.init``'s result); nnx: ``None`` (use the
        model's own state) or an ``nnx.State`` to run with instead.
      x: the model's input, e.g. a batch ``[N, D]``.
      include: keep only the submodules ``m`` with ``include(m)`` true (e.g.
        ``lambda m: isinstance(m, nn.Dense)``); default all.
      **kwargs: passed on to the model's call (``train=False``, ...).

    Returns:
      An ``OrderedDict`` ``name -> array`` in call order. (An ``OrderedDict`` rather than a
      ``dict``: JAX flattens a ``dict`` with sorted keys, so one returned from ``jit`` would come
      back sorted; an ``OrderedDict`` keeps its order through ``jit``.)

    Raises:
      TypeError: ``model`` is not a Flax module; linen ``variables`` without ``params``.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> from jaxnorm import diagnostics
      >>> model = nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(2)])
      >>> x = jnp.ones((3, 5))
      >>> variables = model.init(jax.random.key(0), x)
      >>> acts = diagnostics.capture_activations(model, variables, x)
      >>> {k: v.shape for k, v in acts.items()}
      {'layers_0': (3, 4), 'layers_2': (3, 2)}
    """
    return collections.OrderedDict(
        (_name(p), v) for p, v in _records(model, variables, x, include, kwargs)
    )


# --------------------------------------------------------------------------------------------
# Activation statistics
# --------------------------------------------------------------------------------------------


class LayerStats(NamedTuple):
    """Statistics of one layer's activations (every field an array, so it runs under ``jit``).

    Attributes:
      mean: mean over all entries.
      std: standard deviation over all entries (population, ``ddof=0``, as NumPy's default).
      dead_fraction: fraction of units (last-axis features) never > 0 over the batch.
      saturated_fraction: fraction of entries in the saturated range of ``kind`` (NaN when the
        kind has none, e.g. relu or unknown).
      hist_counts: ``[bins]`` int32 histogram counts.
      hist_edges: ``[bins + 1]`` bin edges.
    """

    mean: jax.Array
    std: jax.Array
    dead_fraction: jax.Array
    saturated_fraction: jax.Array
    hist_counts: jax.Array
    hist_edges: jax.Array


_SATURATING = ("tanh", "sigmoid")
_KINDS = (
    "sigmoid",
    "tanh",
    "relu",
    "leaky_relu",
    "prelu",
    "elu",
    "selu",
    "gelu",
    "silu",
    "softplus",
    "maxout",
    "linear",
    "identity",
)


def _check_kind(kind: Any, who: str) -> None:
    if kind is None:
        return
    if not isinstance(kind, str):
        raise TypeError(f"{who}: kind must be an activation name or None, but got {kind!r}")
    if kind not in _KINDS:
        raise ValueError(f"{who}: unknown kind {kind!r}; expected one of {', '.join(_KINDS)}")


def _check_threshold(value: Any, name: str, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise TypeError(f"{name} must be a number, but got {value!r}")
    if not lo < float(value) < hi:
        raise ValueError(f"{name} must be in ({lo}, {hi}), but got {value}")
    return float(value)


def layer_stats(
    y: ArrayLike,
    *,
    kind: str | None = None,
    bins: int = 20,
    hist_range: tuple[float, float] | None = None,
    tanh_threshold: float = 0.99,
    sigmoid_threshold: float = 0.01,
) -> LayerStats:
    r"""Mean, std, dead and saturated fractions and a histogram of one layer's activations.

    With ``y`` viewed as ``[M, U]`` (``U`` units on the last axis, ``M`` = batch and spatial
    positions):

    - dead fraction: :math:`\frac1U \#\{u : \max_m y_{mu} \le 0\}` (a ReLU unit that never fires;
      for a pre-activation, the ReLU after it),
    - saturated fraction: tanh :math:`\#\{|y| > t\} / (MU)` with ``t = tanh_threshold``; sigmoid
      :math:`\#\{y < s \lor y > 1 - s\} / (MU)` with ``s = sigmoid_threshold``; NaN otherwise.

    Reductions run in float32 (or float64 for float64 input).

    Args:
      y: activations, at least 1-D, floating.
      kind: the activation that produced ``y`` (``"tanh"``, ``"sigmoid"``, ``"relu"``, ...), for
        the saturated fraction; None for unknown.
      bins: number of histogram bins (a positive int).
      hist_range: ``(lo, hi)`` of the histogram; default the data's min and max. Give a fixed
        range (``(-1, 1)`` for tanh) to compare layers.
      tanh_threshold: ``t`` in (0, 1).
      sigmoid_threshold: ``s`` in (0, 0.5).

    Returns:
      A :class:`LayerStats`.

    Raises:
      TypeError: ``y`` not a floating array (a list, dict, str or None included), a non-int
        ``bins``, a non-str ``kind``, a ``hist_range`` that is not a pair of numbers.
      ValueError: a 0-d or empty ``y``, ``bins < 1``, an unknown ``kind``, thresholds out of range.

    References:
      Glorot & Bengio 2010, "Understanding the difficulty of training deep feedforward neural
      networks" (saturation of sigmoid and tanh layers); CS231n, "Neural Networks Part 2".

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxnorm import diagnostics
      >>> y = jnp.array([[0.0, 1.0], [0.0, -2.0]])
      >>> s = diagnostics.layer_stats(y, kind="relu")
      >>> float(s.dead_fraction), float(s.mean)
      (0.5, -0.25)
    """
    who = "layer_stats"
    _checks.check_array(y, "y")
    _checks.check_floating(y, "y")
    y = jnp.asarray(y)
    if y.ndim == 0 or y.size == 0:
        raise ValueError(
            f"{who}: y must have at least 1 dimension and 1 entry, got shape {y.shape}"
        )
    _check_kind(kind, who)
    if isinstance(bins, bool) or not isinstance(bins, int | np.integer):
        raise TypeError(f"{who}: bins must be an int, but got {bins!r}")
    if bins < 1:
        raise ValueError(f"{who}: bins must be at least 1, but got {bins}")
    t = _check_threshold(tanh_threshold, "tanh_threshold", 0.0, 1.0)
    s = _check_threshold(sigmoid_threshold, "sigmoid_threshold", 0.0, 0.5)
    if hist_range is not None:
        try:
            lo, hi = (float(v) for v in hist_range)
        except (TypeError, ValueError) as e:
            raise TypeError(
                f"{who}: hist_range must be a pair of numbers (lo, hi), got {hist_range!r}"
            ) from e
        if not lo < hi:
            raise ValueError(f"{who}: hist_range must be (lo, hi) with lo < hi, got {hist_range}")
        hist_range = (lo, hi)
    cdtype = _checks.compute_dtype(y.dtype)
    y = y.astype(cdtype)
    units = y.reshape(-1, y.shape[-1])
    dead = jnp.mean(jnp.logical_not(jnp.any(units > 0, axis=0)).astype(cdtype))
    if kind == "tanh":
        saturated = jnp.mean((jnp.abs(y) > t).astype(cdtype))
    elif kind == "sigmoid":
        saturated = jnp.mean(((y < s) | (y > 1.0 - s)).astype(cdtype))
    else:
        saturated = jnp.asarray(jnp.nan, cdtype)
    counts, edges = jnp.histogram(y.ravel(), bins=int(bins), range=hist_range)
    # Mean and std of y scaled by a power of two near 1 / max|y|: finite for every finite y
    # (a plain sum or square overflows float32 from about 1.8e19 on).
    _, e = _exponent(jnp.max(jnp.abs(y)))
    z = jnp.ldexp(y, -e)
    return LayerStats(
        mean=jnp.ldexp(jnp.mean(z), e),
        std=jnp.ldexp(jnp.std(z), e),
        dead_fraction=dead,
        saturated_fraction=saturated,
        hist_counts=counts.astype(jnp.int32),
        hist_edges=edges,
    )


def activation_stats(
    acts: Mapping[str, ArrayLike],
    *,
    kind: str | Mapping[str, str | None] | None = None,
    bins: int = 20,
    hist_range: tuple[float, float] | None = None,
    tanh_threshold: float = 0.99,
    sigmoid_threshold: float = 0.01,
) -> collections.OrderedDict[str, LayerStats]:
    """:func:`layer_stats` of every layer of ``acts`` (e.g. from :func:`capture_activations`).

    Args:
      acts: ``name -> activations`` (order kept).
      kind: one activation name for every layer, or ``name -> kind`` for some of them (the rest
        None), or None.
      bins, hist_range, tanh_threshold, sigmoid_threshold: as in :func:`layer_stats`.

    Returns:
      An ``OrderedDict`` ``name -> LayerStats`` in the order of ``acts`` (kept through ``jit``);
      :func:`stats_table` prints it.

    Raises:
      TypeError: ``acts`` not a mapping; as :func:`layer_stats`.
      ValueError: ``kind`` names a layer that ``acts`` does not have; as :func:`layer_stats`.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxnorm import diagnostics
      >>> stats = diagnostics.activation_stats({"h": jnp.array([[0.995, -0.2]])}, kind="tanh")
      >>> float(stats["h"].saturated_fraction)
      0.5
    """
    if not isinstance(acts, Mapping):
        raise TypeError(f"acts must be a mapping name -> array, but got {type(acts).__name__}")
    if isinstance(kind, Mapping):
        unknown = [k for k in kind if k not in acts]
        if unknown:
            raise ValueError(
                f"kind names layers {unknown} that acts does not have; its layers are {list(acts)}"
            )
        kinds = {name: kind.get(name) for name in acts}
    else:
        kinds = dict.fromkeys(acts, kind)
    return collections.OrderedDict(
        (
            name,
            layer_stats(
                y,
                kind=kinds[name],
                bins=bins,
                hist_range=hist_range,
                tanh_threshold=tanh_threshold,
                sigmoid_threshold=sigmoid_threshold,
            ),
        )
        for name, y in acts.items()
    )


_BLOCKS = " ▁▂▃▄▅▆▇█"


def _sparkline(counts: np.ndarray) -> str:
    top = counts.max()
    if top <= 0:
        return ""
    return "".join(_BLOCKS[math.ceil(c / top * (len(_BLOCKS) - 1))] for c in counts)


def stats_table(stats: Mapping[str, LayerStats]) -> str:
    """A readable table of :func:`activation_stats`' result, one row a layer.

    Columns: layer, mean, std, dead (percent of units), saturated (percent of entries, ``n/a``
    where the kind has no saturated range), and the histogram as a bar of block characters.

    Raises:
      TypeError: ``stats`` is not a mapping, or one of its values is not a :class:`LayerStats`.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxnorm import diagnostics
      >>> stats = diagnostics.activation_stats({"h": jnp.array([[0.0, 1.0], [0.0, 3.0]])}, bins=4)
      >>> print(diagnostics.stats_table(stats))
      layer     mean     std    dead  saturated  histogram
      h        1.000   1.225   50.0%        n/a  █▄ ▄
    """
    if not isinstance(stats, Mapping):
        raise TypeError(f"stats must be activation_stats' dict, but got {type(stats).__name__}")
    width = max([5, *(len(n) for n in stats)])
    lines = [f"{'layer':<{width}}  {'mean':>7} {'std':>7} {'dead':>7}  {'saturated':>9}  histogram"]
    for name, s in stats.items():
        if not isinstance(s, LayerStats):
            raise TypeError(
                f"stats[{name!r}] must be a LayerStats (from layer_stats or activation_stats), but "
                f"got {type(s).__name__}"
            )
        sat = float(s.saturated_fraction)
        sat_str = "n/a" if math.isnan(sat) else f"{100 * sat:.1f}%"
        lines.append(
            f"{name:<{width}}  {float(s.mean):>7.3f} {float(s.std):>7.3f} "
            f"{100 * float(s.dead_fraction):>6.1f}%  {sat_str:>9}  "
            f"{_sparkline(np.asarray(s.hist_counts))}"
        )
    return "\n".join(line.rstrip() for line in lines)


# --------------------------------------------------------------------------------------------
# Update / parameter ratio
# --------------------------------------------------------------------------------------------


def _exponent(m: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(m, e)`` with 2**e near ``m`` (a max |v|), e clipped to [-100, 100], 0 for m = 0.

    ``jnp.ldexp(v, -e)`` scales v to about 1 exactly; dividing by m instead is compiled as a
    multiplication by 1 / m, which is subnormal for m > 2**126 and flushed to 0 on XLA:CPU.
    """
    _, e = jnp.frexp(jnp.where(jnp.isfinite(m), m, jnp.zeros_like(m)))
    return m, jnp.clip(e, -100, 100)


def _leaf_ratio(p: jax.Array, u: jax.Array) -> jax.Array:
    # float64 only if a side is float64; never jnp.promote_types (strict promotion rejects
    # float32 with bfloat16, a legitimate mix of parameters and updates).
    wide = any(np.dtype(jnp.result_type(a)) == np.float64 for a in (p, u))
    cdtype = jnp.float64 if wide else jnp.float32
    p, u = jnp.ravel(jnp.asarray(p, cdtype)), jnp.ravel(jnp.asarray(u, cdtype))
    # Each norm of v scaled by a power of two near 1 / max|v|: a plain sum of squares
    # overflows to inf for entries above about 1.8e19 in float32 (and inf / inf is NaN).
    (ps, ep), (us, eu) = (_exponent(jnp.max(jnp.abs(v), initial=0.0)) for v in (p, u))
    pn, un = jnp.linalg.norm(jnp.ldexp(p, -ep)), jnp.linalg.norm(jnp.ldexp(u, -eu))
    # Safe inner where: 0 / 0 is 0 (nothing moved); u / 0 is inf (a zero parameter, such as a
    # bias at its initial 0, moved: the relative change is unbounded).
    safe = jnp.where(pn > 0, pn, jnp.ones_like(pn))
    ratio = jnp.ldexp(un / safe, eu - ep)
    return jnp.where(ps > 0, ratio, jnp.where(us > 0, jnp.inf, 0.0).astype(cdtype))


def _check_margin(margin: Any) -> float:
    if isinstance(margin, bool | np.bool_) or not isinstance(
        margin, int | float | np.integer | np.floating
    ):
        raise TypeError(f"margin must be a real number, but got {margin!r}")
    if not (math.isfinite(margin) and margin > 0):
        raise ValueError(f"margin must be finite and positive, but got {margin!r}")
    return float(margin)


def _check_same_structure(who: str, a: tuple[str, Any], b: tuple[str, Any]) -> None:
    (a_name, a_tree), (b_name, b_tree) = a, b
    a_def, b_def = jax.tree_util.tree_structure(a_tree), jax.tree_util.tree_structure(b_tree)
    if a_def != b_def:
        raise ValueError(
            f"{who}: {a_name} and {b_name} must have the same tree structure, but {a_name} is "
            f"{a_def} and {b_name} is {b_def}"
        )


def update_ratio(params: Any, updates: Any) -> Any:
    r"""Per-leaf ratio of the update's norm to the parameter's: :math:`\|u\|_2 / \|p\|_2`.

    The lecture's rule of thumb: about 1e-3 per step for weights; far below, the learning rate is
    too low; far above, too high. ``updates`` are what the optimizer adds to the parameters (for
    SGD ``-lr * grad``), as optax's ``update`` returns them. Norms are Frobenius norms over the
    whole leaf, computed in float32 at least. 0-safe: 0 when both norms are 0, ``inf`` when only
    the parameter is 0 (e.g. a zero-initialised bias on the first step).

    Args:
      params: a pytree of parameter arrays.
      updates: a pytree of the same structure and shapes.

    Returns:
      A pytree with ``params``' structure and one scalar a leaf.

    Raises:
      TypeError: a leaf that is not an array or a number (a str, None).
      ValueError: different tree structures or leaf shapes.

    References:
      CS231n, "Neural Networks Part 3: ratio of weights:updates".

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxnorm import diagnostics
      >>> params = {"w": jnp.array([3.0, 4.0])}
      >>> r = diagnostics.update_ratio(params, {"w": jnp.array([0.003, 0.004])})
      >>> round(float(r["w"]), 6)
      0.001
    """
    _check_same_structure("update_ratio", ("params", params), ("updates", updates))
    p_leaves = jax.tree_util.tree_leaves_with_path(params)
    u_leaves = jax.tree_util.tree_leaves(updates)
    for (path, p), u in zip(p_leaves, u_leaves, strict=True):
        where = jax.tree_util.keystr(path)
        _checks.check_array(p, f"params{where}")
        _checks.check_array(u, f"updates{where}")
        if jnp.shape(p) != jnp.shape(u):
            raise ValueError(
                f"update_ratio: the update at {jax.tree_util.keystr(path)} has shape "
                f"{jnp.shape(u)} but the parameter has shape {jnp.shape(p)}"
            )
    return jax.tree_util.tree_map(_leaf_ratio, params, updates)


class UpdateRatioState(NamedTuple):
    """State of :func:`update_ratio_monitor`: the latest per-leaf ratios (zeros before a step)."""

    ratios: Any


def update_ratio_monitor() -> Any:
    """An optax transformation that records :func:`update_ratio` and passes updates through.

    Put it last in the chain, so that it sees the final updates (after scaling by the learning
    rate): ``optax.chain(optax.adam(1e-3), update_ratio_monitor())``. Its ``update`` needs the
    parameters (``opt.update(grads, opt_state, params)``); it returns the updates unchanged and
    stores the ratios in its state, so it works under ``jit`` and ``vmap`` (optax's own monitors
    see only the updates). Read them with :func:`latest_update_ratios`.

    optax is imported when this factory is called (jaxnorm's core imports only jax and numpy).

    Returns:
      An ``optax.GradientTransformation`` with state :class:`UpdateRatioState`.

    Raises:
      ValueError (from ``update``): called without ``params``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from jaxnorm import diagnostics
      >>> params = {"w": jnp.array([3.0, 4.0])}
      >>> opt = optax.chain(optax.sgd(1e-3), diagnostics.update_ratio_monitor())
      >>> state = opt.init(params)
      >>> updates, state = opt.update({"w": jnp.array([3.0, 4.0])}, state, params)
      >>> round(float(diagnostics.latest_update_ratios(state)["w"]), 6)
      0.001
    """
    import optax

    def init(params):
        return UpdateRatioState(
            ratios=jax.tree_util.tree_map(
                lambda p: jnp.zeros((), _checks.compute_dtype(jnp.result_type(p))), params
            )
        )

    def update(updates, state, params=None):
        del state
        if params is None:
            raise ValueError(
                "update_ratio_monitor needs the parameters: call opt.update(updates, opt_state, "
                "params)"
            )
        return updates, UpdateRatioState(ratios=update_ratio(params, updates))

    return optax.GradientTransformation(init, update)


def latest_update_ratios(opt_state: Any) -> Any:
    """The ratios kept by the first :func:`update_ratio_monitor` found in an optimizer state.

    Args:
      opt_state: an optax state containing an :class:`UpdateRatioState` (a chain's tuple,
        ``inject_hyperparams``' state, ...).

    Returns:
      The per-leaf ratios pytree.

    Raises:
      ValueError: no :class:`UpdateRatioState` in ``opt_state``.
    """
    found = [
        s
        for s in jax.tree_util.tree_leaves(
            opt_state, is_leaf=lambda s: isinstance(s, UpdateRatioState)
        )
        if isinstance(s, UpdateRatioState)
    ]
    if not found:
        raise ValueError(
            "opt_state holds no UpdateRatioState: chain update_ratio_monitor() into the optimizer, "
            "e.g. optax.chain(optax.adam(1e-3), update_ratio_monitor())"
        )
    return found[0].ratios


class UpdateRatioCheck(NamedTuple):
    """:func:`check_update_ratios`' verdict.

    Attributes:
      ok: no judged leaf outside ``[low, high]`` and no NaN ratio.
      flagged: leaf name -> ratio, for the judged leaves outside ``[low, high]`` (and any leaf
        whose ratio is NaN).
      skipped: names of the judged leaves whose parameter is all zeros (ratio ``inf``, e.g. a
        bias at its initial 0): the ratio says nothing about the learning rate there.
      message: a readable summary.
      not_judged: leaf name -> ratio, for the leaves with fewer than ``min_ndim`` dimensions
        (biases, batch-norm scales): the rule of thumb is about weight matrices, so these are
        reported, not judged.
    """

    ok: bool
    flagged: dict[str, float]
    skipped: tuple[str, ...]
    message: str
    not_judged: dict[str, float]

    def __str__(self) -> str:
        return self.message


def _path_name(path: tuple) -> str:
    # An nnx Variable (in an nnx.State) flattens to its array under the attribute "value": name
    # the variable ("conv/kernel", as linen's dicts read), not its attribute.
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
        path = path[:-1]
    return "/".join(_key_str(k) for k in path) or "<root>"


def check_update_ratios(
    ratios: Any,
    params: Any = None,
    *,
    low: float = 1e-4,
    high: float = 1e-2,
    min_ndim: int = 2,
) -> UpdateRatioCheck:
    """Flag the weight leaves whose update ratio lies outside ``[low, high]`` (the lecture: ~1e-3).

    The lecture's rule of thumb (an update of about 1e-3 of the weights' norm per step) is about
    weight matrices. A bias or a batch-norm scale is small, starts at 0 or 1, and moves
    relatively more: judged by the same rule it reads "too high" at every learning rate. So only
    the leaves whose **parameter** has at least ``min_ndim`` dimensions (2: kernels, conv
    filters) are judged; the others are listed in ``not_judged`` with their ratios. That takes
    the parameters, since a ratio is one number a leaf; ``min_ndim=0`` judges every leaf and
    needs no parameters. A NaN ratio is flagged on any leaf (the loss or the gradients broke,
    whatever the leaf). Judged leaves with ratio ``inf`` (the parameter is all zeros) are
    skipped, not flagged. Host-side (it reads the values): call it outside ``jit``.

    Args:
      ratios: :func:`update_ratio`'s pytree (or :func:`latest_update_ratios`'), one scalar a
        leaf.
      params: the parameters the ratios belong to (same tree structure); their ``ndim`` tells
        the weight matrices from the rest. Required unless ``min_ndim=0``.
      low: smallest healthy ratio (below: learning rate probably too low).
      high: largest healthy ratio (above: learning rate probably too high).
      min_ndim: judge the leaves whose parameter has at least this many dimensions (default 2;
        0 judges every leaf).

    Returns:
      An :class:`UpdateRatioCheck`.

    Raises:
      TypeError: ``params`` is None while ``min_ndim > 0``; ``min_ndim`` is not an int.
      ValueError: ``not 0 <= low < high``; ``min_ndim < 0``; ``params`` has another tree
        structure than ``ratios``.

    References:
      CS231n, "Neural Networks Part 3: ratio of weights:updates".

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxnorm import diagnostics
      >>> params = {"w": jnp.ones((3, 3)), "b": jnp.ones(3)}
      >>> print(diagnostics.check_update_ratios({"w": 0.5, "b": 1e-3}, params))
      1 of 1 update ratios outside [0.0001, 0.01]: w=0.5 (too high: lower the learning rate);
      not judged (fewer than 2 dimensions): b=0.001
      >>> print(diagnostics.check_update_ratios({"w": 1e-3, "b": 0.5}, params))
      all 1 update ratios within [0.0001, 0.01]; not judged (fewer than 2 dimensions): b=0.5
      >>> diagnostics.check_update_ratios({"w": 1e-3, "b": 0.5}, min_ndim=0).flagged
      {'b': 0.5}
    """
    if not 0 <= low < high:
        raise ValueError(
            f"check_update_ratios needs 0 <= low < high, but got low={low}, high={high}"
        )
    if isinstance(min_ndim, bool) or not isinstance(min_ndim, int | np.integer):
        raise TypeError(f"check_update_ratios: min_ndim must be an int, but got {min_ndim!r}")
    if min_ndim < 0:
        raise ValueError(f"check_update_ratios: min_ndim must be >= 0, but got {min_ndim}")
    leaves = jax.tree_util.tree_leaves_with_path(ratios)
    if params is None:
        if min_ndim > 0:
            raise TypeError(
                "check_update_ratios judges only weight matrices (leaves with at least "
                f"min_ndim={min_ndim} dimensions) and needs the parameters to tell them apart: "
                "check_update_ratios(ratios, params); or pass min_ndim=0 to judge every leaf"
            )
        ndims = [min_ndim] * len(leaves)
    else:
        _check_same_structure("check_update_ratios", ("ratios", ratios), ("params", params))
        ndims = [len(getattr(p, "shape", np.shape(p))) for p in jax.tree_util.tree_leaves(params)]
    flagged: dict[str, float] = {}
    not_judged: dict[str, float] = {}
    skipped: list[str] = []
    notes = []
    checked = 0
    for (path, r), ndim in zip(leaves, ndims, strict=True):
        value = float(r)
        name = _path_name(path)
        judged = ndim >= min_ndim
        if not judged and not math.isnan(value):
            not_judged[name] = value
            continue
        if judged and value == math.inf:
            skipped.append(name)
            continue
        checked += 1
        if low <= value <= high:
            continue
        flagged[name] = value
        if math.isnan(value):
            why = "NaN: check the loss and gradients"
        elif value > high:
            why = "too high: lower the learning rate"
        else:
            why = "too low: raise the learning rate"
        notes.append(f"{name}={value:.3g} ({why})")
    span = f"[{low:g}, {high:g}]"
    if not flagged:
        message = f"all {checked} update ratios within {span}"
    else:
        message = f"{len(flagged)} of {checked} update ratios outside {span}: " + "; ".join(notes)
    if skipped:
        message += f" (skipped {', '.join(skipped)}: parameter all zeros)"
    if not_judged:
        message += f"; not judged (fewer than {min_ndim} dimensions): " + ", ".join(
            f"{k}={v:.3g}" for k, v in not_judged.items()
        )
    return UpdateRatioCheck(
        ok=not flagged,
        flagged=flagged,
        skipped=tuple(skipped),
        message=message,
        not_judged=not_judged,
    )


# --------------------------------------------------------------------------------------------
# Initial loss
# --------------------------------------------------------------------------------------------

_LOSS_KINDS = ("softmax_cross_entropy", "multiclass_svm", "sigmoid_binary_cross_entropy")


def _check_num_classes(num_classes: Any, who: str) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int | np.integer):
        raise TypeError(f"{who}: num_classes must be an int, but got {num_classes!r}")
    if num_classes < 2:
        raise ValueError(f"{who}: num_classes must be at least 2, but got {num_classes}")
    return int(num_classes)


def expected_initial_loss(
    num_classes: int, *, kind: str = "softmax_cross_entropy", margin: float = 1.0
) -> float:
    r"""The loss a classifier should start at when its scores are all about 0 (small weights).

    - ``"softmax_cross_entropy"``: every class has probability ``1/C``, so :math:`\log C`
      (2.303 for 10 classes).
    - ``"multiclass_svm"`` (the CS231n/Weston-Watkins hinge
      :math:`\sum_{j \ne y} \max(0, s_j - s_y + \Delta)`): :math:`(C - 1)\Delta`.
    - ``"sigmoid_binary_cross_entropy"`` (mean over ``C`` independent outputs): :math:`\log 2`.

    Args:
      num_classes: the number of classes C (>= 2).
      kind: the loss, one of the above.
      margin: :math:`\Delta` of the hinge loss.

    Returns:
      The expected loss per example, a Python float (no regularisation term).

    Raises:
      TypeError: non-int ``num_classes``; a ``margin`` that is not a real number.
      ValueError: ``num_classes < 2``; an unknown ``kind``; a ``margin`` that is not finite and
        positive (for ``multiclass_svm``).

    References:
      CS231n, "Neural Networks Part 3: look for correct loss at chance performance".

    Example:
      >>> from jaxnorm import diagnostics
      >>> round(diagnostics.expected_initial_loss(10), 4)
      2.3026
    """
    c = _check_num_classes(num_classes, "expected_initial_loss")
    if kind == "softmax_cross_entropy":
        return math.log(c)
    if kind == "multiclass_svm":
        return (c - 1) * _check_margin(margin)
    if kind == "sigmoid_binary_cross_entropy":
        return math.log(2.0)
    raise ValueError(f"expected_initial_loss: unknown kind {kind!r}; expected one of {_LOSS_KINDS}")


class InitialLossCheck(NamedTuple):
    """:func:`check_initial_loss`' verdict: ``ok``, ``loss``, ``expected`` and ``message``."""

    ok: bool
    loss: float
    expected: float
    message: str

    def __str__(self) -> str:
        return self.message


def check_initial_loss(
    loss: ArrayLike,
    num_classes: int,
    *,
    rtol: float = 0.1,
    kind: str = "softmax_cross_entropy",
    margin: float = 1.0,
) -> InitialLossCheck:
    """Compare a model's first loss (no regularisation) with :func:`expected_initial_loss`.

    ``ok`` when ``|loss - expected| <= rtol * expected``. Too high usually means the initial
    weights (the last layer's above all) are too large, so the scores are far from 0; too low, that
    the loss is averaged or summed differently than assumed, or the labels leak into the input.
    Host-side: call it outside ``jit``.

    Use this one when you already have the loss value (a flax model, your own training loop),
    or for the hinge and binary losses (``kind``). To have the loss computed from a model and a
    batch, use :func:`jaxnorm.training.check_initial_loss` ``(loss_fn, params, batch, *,
    num_classes)`` (a :class:`jaxnorm.training.Model` or a loss function; softmax
    cross-entropy only), which calls this one: the two share a name but not a signature.

    Args:
      loss: the mean loss on a batch at initialisation (a scalar).
      num_classes: the number of classes C (>= 2).
      rtol: allowed relative deviation (>= 0).
      kind, margin: as in :func:`expected_initial_loss`.

    Returns:
      An :class:`InitialLossCheck`.

    Raises:
      TypeError: ``loss`` is a traced value (inside ``jit``), or not a number or floating array
        (a str, a bool, a list); non-int ``num_classes``; a non-number ``margin``.
      ValueError: ``loss`` not a scalar; ``num_classes < 2``; ``rtol < 0``; an unknown ``kind``.

    Example:
      >>> from jaxnorm import diagnostics
      >>> print(diagnostics.check_initial_loss(2.31, 10))
      ok: initial loss 2.31 is close to log(10) = 2.303 for softmax_cross_entropy
    """
    expected = expected_initial_loss(num_classes, kind=kind, margin=margin)
    if _checks.is_tracer(loss):
        raise TypeError("check_initial_loss reads the loss's value: call it outside jax.jit")
    # A str such as "2.3" would convert silently below; a bool or an integer array is no loss.
    _checks.check_array(loss, "loss")
    if isinstance(loss, bool | np.bool_) or not (
        jnp.issubdtype(jnp.result_type(loss), jnp.inexact) or isinstance(loss, int | np.integer)
    ):
        raise TypeError(
            f"check_initial_loss: loss must be a real number or a floating scalar array, but "
            f"got {loss!r} of dtype {jnp.result_type(loss)}"
        )
    if np.ndim(loss) != 0:
        raise ValueError(
            f"check_initial_loss: loss must be a scalar, but has shape {np.shape(loss)}"
        )
    if not rtol >= 0:
        raise ValueError(f"check_initial_loss: rtol must be >= 0, but got {rtol}")
    value = float(np.asarray(loss, dtype=np.float64))
    name = {"softmax_cross_entropy": f"log({num_classes})", "multiclass_svm": f"(C - 1) * {margin}"}
    what = f"{name.get(kind, 'log(2)')} = {expected:.4g} for {kind}"
    if not math.isfinite(value):
        return InitialLossCheck(
            False,
            value,
            expected,
            f"initial loss is {value}: the forward pass already overflows; check the inputs for "
            "NaN/Inf and the initial weights' scale",
        )
    if abs(value - expected) <= rtol * expected:
        return InitialLossCheck(
            True, value, expected, f"ok: initial loss {value:.4g} is close to {what}"
        )
    if value > expected:
        msg = (
            f"initial loss {value:.4g} is too high, expected {what}: the scores are not near 0, "
            "so the weights (especially the last layer's) are too large; use a smaller init or "
            "scale the last layer down. (Is a regularisation term included in this loss?)"
        )
    else:
        msg = (
            f"initial loss {value:.4g} is too low, expected {what}: check that the loss is the "
            "mean over examples of the right loss, and that the labels do not leak into the inputs"
        )
    return InitialLossCheck(False, value, expected, msg)


# --------------------------------------------------------------------------------------------
# LSUV
# --------------------------------------------------------------------------------------------


def _get_path(tree: Mapping, path: tuple) -> Any:
    for p in path:
        tree = tree[p]
    return tree


def _set_path(tree: Mapping, path: tuple, value: Any) -> dict:
    if not path:
        return value
    out = dict(tree)
    out[path[0]] = _set_path(tree[path[0]], path[1:], value)
    return out


def _check_lsuv_options(tol: Any, max_iter: Any) -> None:
    if not (isinstance(tol, int | float) and 0 < tol < 1):
        raise ValueError(f"lsuv: tol must be a number in (0, 1), but got {tol!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"lsuv: max_iter must be a positive int, but got {max_iter!r}")


def lsuv(
    model: Any,
    variables: Any,
    x: Any,
    *,
    key: jax.Array | None = None,
    tol: float = 0.1,
    max_iter: int = 10,
    **kwargs: Any,
) -> Any:
    r"""Layer-sequential unit-variance initialisation (Mishkin & Matas 2015).

    1. If ``key`` is given, every kernel is replaced by a random orthogonal matrix (the paper's
       pre-initialisation; the distribution of ``jaxnorm.initializers.orthogonal()``).
    2. For each layer with a ``kernel`` (Dense, Conv, ...) in call order: compute its output
       ``B`` on the batch ``x`` and set :math:`W \leftarrow W / \sqrt{\mathrm{Var}(B)}`, until
       :math:`|\mathrm{Var}(B) - 1| < \text{tol}` or ``max_iter`` rescalings.

    The variance is over all entries of the layer's output (batch, positions and units), which
    includes the bias; biases are left as they are (0 at a usual init, where one rescaling is
    exact). Each step runs a jitted forward pass (compiled once). Not jittable itself.

    Args:
      model: a ``flax.linen.Module`` or a ``flax.nnx.Module``.
      variables: linen: the variables dict; nnx: ``None`` or an ``nnx.State`` to start from.
      x: a data batch (the paper uses a minibatch of real data).
      key: PRNG key for the orthogonal pre-initialisation; None keeps the current kernels.
      tol: tolerance on the variance (the paper's ``Tol_var``, 0.1).
      max_iter: most rescalings per layer (the paper's ``T_max``, 10).
      **kwargs: passed on to the model's call.

    Returns:
      linen: new variables (same structure); nnx: the new ``nnx.State`` of the whole model (apply
      it with ``nnx.update(model, state)``). The model itself is not changed.

    Raises:
      TypeError: ``model`` is not a Flax module.
      ValueError: the model has no layer with a kernel; a layer's output has zero variance
        (dead inputs: it cannot be scaled to 1); bad ``tol``/``max_iter``.

    References:
      Mishkin & Matas 2016, "All you need is a good init", ICLR (arXiv:1511.06422).

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> from jaxnorm import diagnostics
      >>> model = nn.Sequential([nn.Dense(16), nn.tanh, nn.Dense(16)])
      >>> x = jax.random.normal(jax.random.key(0), (64, 8))
      >>> v = diagnostics.lsuv(model, model.init(jax.random.key(1), x), x, key=jax.random.key(2))
      >>> acts = diagnostics.capture_activations(model, v, x)
      >>> [round(float(jnp.var(a)), 1) for a in acts.values()]
      [1.0, 1.0]
    """
    _check_lsuv_options(tol, max_iter)
    kind = _model_kind(model)
    if kind == "linen":
        return _lsuv_linen(model, variables, x, key, tol, max_iter, kwargs)
    return _lsuv_nnx(model, variables, x, key, tol, max_iter, kwargs)


def _key_seed(key: jax.Array) -> list[int]:
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return np.asarray(key, dtype=np.uint32).ravel().tolist()


def _orthogonal_all(key: jax.Array, kernels: list) -> list:
    """Haar-random orthogonal kernels (the distribution of ``initializers.orthogonal()``).

    Drawn on the host with NumPy, seeded from ``key``: XLA takes seconds to compile a sampler and
    a QR per kernel shape on CPU, and LSUV needs each once.
    """
    rng = np.random.default_rng(_key_seed(key))
    out = []
    for w in kernels:
        if w.ndim < 2:
            out.append(w)
            continue
        cols = w.shape[-1]
        rows = math.prod(w.shape) // cols
        q, r = np.linalg.qr(rng.standard_normal((max(rows, cols), min(rows, cols))))
        q = q * np.where(np.diagonal(r) < 0, -1.0, 1.0)[None, :]  # Mezzadri's sign fix
        if rows < cols:
            q = q.T
        out.append(jnp.asarray(q.reshape(w.shape).astype(np.asarray(w).dtype)))
    return out


def _variances(records, names) -> dict[str, jax.Array]:
    out = {}
    for p, a in records:
        if _name(p) in names and _name(p) not in out:
            out[_name(p)] = jnp.var(a.astype(_checks.compute_dtype(a.dtype)))
    return out


def _traced_paths(fn, *args) -> list[tuple]:
    # The layer order from an abstract trace (jax.eval_shape): no computation, no compilation.
    paths: list = []

    def run(*a):
        paths.extend(p for p, _ in fn(*a))
        return 0

    jax.eval_shape(run, *args)
    return paths


def _rescaled(w: jax.Array, var: float) -> jax.Array:
    # On the host: one division a step, not worth a compilation per kernel shape.
    host = np.asarray(w)
    wide = np.float64 if host.dtype == np.float64 else np.float32
    return jnp.asarray((host.astype(wide) / math.sqrt(var)).astype(host.dtype))


def _rescale_loop(layers, variances, get_kernel, set_kernel, tol, max_iter) -> None:
    for path in layers:
        for _ in range(max_iter):
            var = float(variances()[_name(path)])
            if not (math.isfinite(var) and var > 0):
                raise ValueError(
                    f"lsuv: the output of layer {_name(path)} has variance {var} on the batch, "
                    "so it cannot be scaled to 1; check the data and the layers before it"
                )
            if abs(var - 1.0) < tol:
                break
            set_kernel(path, _rescaled(get_kernel(path), var))


def _lsuv_linen(model, variables, x, key, tol, max_iter, kwargs):
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise TypeError(
            "lsuv: for a flax.linen model, variables must be model.init's dict with 'params', "
            f"but got {type(variables).__name__}"
        )
    state = {"v": {k: v for k, v in variables.items() if k != "intermediates"}}
    params = state["v"]["params"]

    def has_kernel(path):
        try:
            node = _get_path(params, path)
        except (KeyError, TypeError):
            return False
        return isinstance(node, Mapping) and "kernel" in node

    def records(v):
        return _linen_records(model, v, x, None, kwargs)

    layers = list(dict.fromkeys(p for p in _traced_paths(records, state["v"]) if has_kernel(p)))
    if not layers:
        raise ValueError("lsuv: the model has no submodule with a 'kernel' parameter to scale")
    names = {_name(p) for p in layers}
    variances = jax.jit(lambda v: _variances(records(v), names))

    def get_kernel(path):
        return _get_path(state["v"]["params"], path)["kernel"]

    def set_kernel(path, w):
        v = dict(state["v"])
        v["params"] = _set_path(v["params"], (*path, "kernel"), w)
        state["v"] = v

    if key is not None:
        fresh = _orthogonal_all(key, [get_kernel(p) for p in layers])
        for path, w in zip(layers, fresh, strict=True):
            set_kernel(path, w)
    _rescale_loop(layers, lambda: variances(state["v"]), get_kernel, set_kernel, tol, max_iter)
    return state["v"]


def _lsuv_nnx(model, variables, x, key, tol, max_iter, kwargs):
    from flax import nnx

    work = nnx.clone(model)
    if variables is not None:
        nnx.update(work, variables)

    def has_kernel(m):
        return isinstance(getattr(m, "kernel", None), nnx.Param)

    graphdef = nnx.graphdef(work)

    def records(state):
        return _nnx_records(nnx.merge(graphdef, state), None, x, has_kernel, kwargs)

    modules = {tuple(p): m for p, m in nnx.iter_modules(work)}
    # The first call of each layer (a second call is "name:1"; sown values are not layers).
    layers = [p for p in dict.fromkeys(_traced_paths(records, nnx.state(work))) if p in modules]
    if not layers:
        raise ValueError("lsuv: the model has no submodule with a 'kernel' nnx.Param to scale")
    names = {_name(p) for p in layers}
    variances = jax.jit(lambda state: _variances(records(state), names))

    def get_kernel(path):
        return modules[path].kernel.get_value()

    def set_kernel(path, w):
        modules[path].kernel.set_value(w)

    if key is not None:
        fresh = _orthogonal_all(key, [get_kernel(p) for p in layers])
        for path, w in zip(layers, fresh, strict=True):
            set_kernel(path, w)
    _rescale_loop(layers, lambda: variances(nnx.state(work)), get_kernel, set_kernel, tol, max_iter)
    return nnx.state(work)
