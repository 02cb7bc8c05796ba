"""Gradient checking: centred finite differences in float64 against ``jax.grad``.

The lecture's recipe (CS231n, "Training Neural Networks, Part 1"): compare the analytic gradient
with the centred difference ``(f(x + h) - f(x - h)) / 2h`` using the relative error
``|a - n| / max(|a|, |n|)``, in double precision, watching out for kinks (ReLU at 0) and holding
randomness such as dropout fixed.

What jaxnorm adds over ``jax.test_util.check_grads``: it returns a report instead of raising on the
first mismatch, names the pytree leaf that is wrong (``params/Dense_0/bias``) with its worst
coordinates (analytic and numeric values side by side), uses a fixed tolerance instead of one that
grows with the array size (jax issue 3130), tells kinks from errors, samples coordinates from every
leaf of a large model, and evaluates all perturbed points in one compiled, vectorised pass.

Precision: the analytic gradient is ``jax.grad`` of ``f`` on the caller's arrays, in their own
dtypes, and again on float64 copies (held to float64's tolerance, so that a rule wrong by 1e-6
shows in a float32 model); the numerical one evaluates ``f`` on float64 copies of every floating
argument, with any lower-precision steps inside ``f`` widened to float64. Both
passes run under a local ``jax.enable_x64(True)`` context, which is restored on exit (the
caller's global setting never changes); running the analytic pass under it too makes random draws
from a fixed key (``jax.random.bernoulli(key, 0.9, shape)``, flax's ``Dropout``) identical in
both passes, since their default dtype follows the x64 flag.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import math
import warnings
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np

__all__ = [
    "Coordinate",
    "GradCheckReport",
    "LeafReport",
    "LowPrecisionWarning",
    "check_grad",
    "numerical_grad",
    "relative_error",
]

# cbrt(float64 eps): the step that balances the centred difference's O(h^2) truncation error against
# its O(eps/h) rounding error, for the float64 evaluation used here. A fixed absolute step (1e-4)
# rounds away on large values or in low precision (jax issue 7742); this one is relative.
DEFAULT_EPS = float(np.cbrt(np.finfo(np.float64).eps))

# Default (rtol, atol) by the dtype of the analytic gradient. float32 analytic gradients agree with
# a float64 centred difference to ~1e-6 relative; rtol=1e-3 leaves room for accumulated rounding
# in deep models while a gradient 1% wrong (relative error 1e-2) fails. atol covers coordinates
# whose true gradient is ~0 and whose float32 value is rounding noise.
# Half precisions cannot resolve 1%.
_DEFAULT_TOLERANCES = {
    np.dtype(np.float64): (1e-7, 1e-9),
    np.dtype(np.float32): (1e-3, 1e-5),
    np.dtype(jnp.float16): (1e-2, 1e-3),
    np.dtype(jnp.bfloat16): (5e-2, 5e-3),
}

# Elements of float64 workspace a vectorised chunk may hold (chunk_size * leaf size): 256 MiB.
_CHUNK_BUDGET = 2**25
_MAX_CHUNK = 256


def relative_error(a, b):
    """Elementwise relative error ``|a - b| / max(|a|, |b|)``, defined as 0 where both are 0.

    The lecture's measure for gradient checks: symmetric in ``a`` and ``b`` and scale free, so one
    threshold serves large and small gradients (below ~1e-7 is good in float64, above ~1e-2 is
    wrong).

    Args:
      a: an array or a pytree of arrays.
      b: an array or pytree with the same structure and shapes as ``a``.

    Returns:
      NumPy float64 arrays, one per leaf in ``a``'s structure, with values in ``[0, 2]`` (above 1
      only where the signs differ).

    Raises:
      ValueError: if the structures or shapes of ``a`` and ``b`` differ.

    References:
      Karpathy, CS231n notes "Neural Networks 3", gradient checks (2016).

    Example:
      >>> relative_error(np.array([1.0, 0.0, -2.0]), np.array([1.01, 0.0, 2.0]))
      array([0.00990099, 0.        , 2.        ])
    """

    def one(x, y):
        x, y = _to_f64(x), _to_f64(y)
        if x.shape != y.shape:
            raise ValueError(f"relative_error needs equal shapes, got {x.shape} and {y.shape}")
        denom = np.maximum(np.abs(x), np.abs(y))
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(denom == 0, 0.0, np.abs(x - y) / np.where(denom == 0, 1.0, denom))

    for name, tree in (("a", a), ("b", b)):
        leaves = jax.tree_util.tree_leaves(tree)
        if tree is None or any(
            isinstance(v, str | bytes)
            or not any(jnp.issubdtype(jnp.result_type(v), t) for t in (jnp.number, jnp.bool_))
            for v in leaves
        ):
            bad = type(tree).__name__ if tree is None else "a non-numeric leaf"
            raise TypeError(
                f"relative_error: {name} must be an array or a pytree of arrays, got {bad}"
            )
    sa, sb = jax.tree_util.tree_structure(a), jax.tree_util.tree_structure(b)
    if sa != sb:
        raise ValueError(f"relative_error needs pytrees of equal structure, got {sa} and {sb}")
    return jax.tree_util.tree_map(one, a, b)


# --------------------------------------------------------------------------------------------------
# Reports


@dataclasses.dataclass(frozen=True)
class Coordinate:
    """One checked coordinate (or random direction): which value is analytic and which numeric."""

    index: tuple[int, ...]
    analytic: float
    numeric: float
    relative_error: float
    failed: bool
    kink: bool
    analytic64: float | None = None  # jax.grad of f on float64 copies, where that was checked too


@dataclasses.dataclass(frozen=True)
class LeafReport:
    """The check of one pytree leaf.

    ``max_relative_error`` is over the checked coordinates that are not kinks. ``worst`` lists the
    coordinates with the largest relative error, failures first.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    num_checked: int
    num_failed: int
    num_kinks: int
    max_relative_error: float
    worst: tuple[Coordinate, ...]
    rtol: float
    atol: float
    precision: str = ""  # the dtype the gradient is computed in (lower than dtype if f casts down)
    rtol64: float | None = None  # tolerance of the float64 evaluation's check (None: not run)
    atol64: float | None = None

    @property
    def passed(self) -> bool:
        return self.num_failed == 0


@dataclasses.dataclass(frozen=True)
class GradCheckReport:
    """The result of :func:`check_grad`: one :class:`LeafReport` per floating leaf.

    ``bool(report)`` is ``report.passed``; ``str(report)`` is a table with the worst coordinates.
    """

    passed: bool
    leaves: tuple[LeafReport, ...]
    mode: str
    eps: float
    skipped: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return self.passed

    def __getitem__(self, name: str) -> LeafReport:
        for leaf in self.leaves:
            if leaf.name == name:
                return leaf
        raise KeyError(f"no leaf named {name!r}; leaves: {[x.name for x in self.leaves]}")

    @property
    def failed_leaves(self) -> tuple[str, ...]:
        return tuple(x.name for x in self.leaves if not x.passed)

    def __str__(self) -> str:
        unit = "directions" if self.mode == "directions" else "checked"
        header = ("leaf", "dtype", unit, "max rel err", "failures", "kinks", "status")
        rows = [
            (
                x.name,
                x.dtype,
                str(x.num_checked),
                f"{x.max_relative_error:.2e}",
                str(x.num_failed),
                str(x.num_kinks),
                "ok" if x.passed else "FAIL",
            )
            for x in self.leaves
        ]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        fmt = lambda r: " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        lines = [
            f"gradient check ({self.mode}, relative step {self.eps:.2g}): "
            + ("PASSED" if self.passed else f"FAILED in {', '.join(self.failed_leaves)}"),
            fmt(header),
            "-+-".join("-" * w for w in widths),
            *map(fmt, rows),
        ]
        tols = sorted({(x.precision or x.dtype, x.rtol, x.atol) for x in self.leaves})
        lines.append(
            "pass if |analytic - numeric| <= atol + rtol * max(|analytic|, |numeric|): "
            + "; ".join(f"{d} rtol={r:g} atol={a:g}" for d, r, a in tols)
        )
        tols64 = sorted({(x.rtol64, x.atol64) for x in self.leaves if x.rtol64 is not None})
        if tols64:
            lines.append(
                "and f evaluated in float64, with its own jax.grad: "
                + "; ".join(f"rtol={r:g} atol={a:g}" for r, a in tols64)
            )
        if self.skipped:
            lines.append("held fixed (not floating): " + ", ".join(self.skipped))
        for x in self.leaves:
            if not x.worst:
                continue
            lines.append(f"worst in {x.name}:")
            for c in x.worst:
                where = f"direction {c.index[0]}" if self.mode == "directions" else str(c.index)
                tag = " FAIL" if c.failed else (" kink" if c.kink else "")
                lines.append(
                    f"  {where}: analytic={c.analytic:.6e}, numeric={c.numeric:.6e}, "
                    f"rel err={c.relative_error:.2e}{tag}"
                )
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Argument handling


def _to_f64(x) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype == np.dtype(jnp.bfloat16):
        x = x.astype(np.float32)
    return x.astype(np.float64)


def _is_key(x) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _is_float(x) -> bool:
    if _is_key(x):
        return False
    if isinstance(x, float):
        return True
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)


def _path_name(path, prefix: str) -> str:
    parts = [prefix] if prefix else []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(k.name)
        elif isinstance(k, jax.tree_util.SequenceKey | jax.tree_util.FlattenedIndexKey):
            parts.append(str(k.idx))
        else:
            parts.append(str(k))
    return "/".join(parts) or "x"


def _normalize_argnums(argnums, nargs: int) -> tuple[tuple[int, ...], bool]:
    single = isinstance(argnums, int | np.integer)
    nums = (argnums,) if single else argnums
    if not isinstance(nums, Sequence) or not nums:
        raise TypeError(f"argnums must be an int or a non-empty tuple of ints, got {argnums!r}")
    out = []
    for a in nums:
        if not isinstance(a, int | np.integer) or isinstance(a, bool):
            raise TypeError(f"argnums must be an int or a tuple of ints, got {argnums!r}")
        if not -nargs <= a < nargs:
            raise ValueError(
                f"argnums={argnums!r} is out of range: f was given {nargs} positional argument(s)"
            )
        out.append(int(a) % nargs)
    if len(set(out)) != len(out):
        raise ValueError(f"argnums={argnums!r} names the same argument twice")
    return tuple(out), bool(single)


@dataclasses.dataclass
class _Problem:
    """``f`` as a function of its floating leaves at ``argnums``, everything else held fixed."""

    f: Callable
    args: tuple
    argnums: tuple[int, ...]
    single: bool
    treedef: Any
    leaves: list  # every leaf of the selected arguments
    diff: list[int]  # positions in ``leaves`` that are differentiated
    names: list[str]  # names of the differentiated leaves
    skipped: list[str]

    def call(self, diff_leaves, args=None, leaves=None):
        args = self.args if args is None else args
        leaves = list(self.leaves if leaves is None else leaves)
        for p, v in zip(self.diff, diff_leaves, strict=True):
            leaves[p] = v
        selected = jax.tree_util.tree_unflatten(self.treedef, leaves)
        args = list(args)
        for n, v in zip(self.argnums, selected, strict=True):
            args[n] = v
        return self.f(*args)


def _problem(f, args, argnums) -> _Problem:
    if not callable(f):
        raise TypeError(f"f must be a callable returning a scalar, got {type(f).__name__}")
    if not args:
        raise ValueError("f needs at least one positional argument to differentiate")
    nums, single = _normalize_argnums(argnums, len(args))
    selected = tuple(args[n] for n in nums)
    with_path, treedef = jax.tree_util.tree_flatten_with_path(selected)
    leaves, diff, names, skipped = [], [], [], []
    for pos, (path, leaf) in enumerate(with_path):
        # path[0] indexes the tuple of selected arguments.
        prefix = "" if single else f"arg{nums[path[0].idx]}"
        name = _path_name(path[1:], prefix) if (path[1:] or prefix) else f"arg{nums[0]}"
        leaves.append(leaf)
        if _is_float(leaf):
            if jnp.issubdtype(jnp.result_type(leaf), jnp.complexfloating):
                raise TypeError(f"leaf {name} is complex; only real floating leaves are supported")
            diff.append(pos)
            names.append(name)
        elif hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.complexfloating):
            raise TypeError(f"leaf {name} is complex; only real floating leaves are supported")
        else:
            skipped.append(name)
    if not diff:
        raise TypeError(
            f"argument(s) {list(nums)} of f have no floating leaves to check (found "
            f"{[str(getattr(x, 'dtype', type(x).__name__)) for x in leaves]}); integer leaves and "
            "PRNG keys are held fixed, so pass the floating parameters in argnums"
        )
    return _Problem(f, tuple(args), nums, single, treedef, leaves, diff, names, skipped)


def _upcast(tree):
    """float64 JAX copies of every floating leaf; keys and integers unchanged (call under x64)."""

    def one(x):
        if _is_float(x):
            return jnp.asarray(_to_f64(x))
        return x

    return jax.tree_util.tree_map(one, tree)


# --------------------------------------------------------------------------------------------------
# Compiled programs, reused only for the same function
#
# A jaxpr's printed text is not the function it computes: it leaves out the arrays that an inner
# ``jax.jit`` closes over (constants of the inner program) and prints a custom rule by its name
# only. So compiled programs are keyed by a full description of the jaxpr instead: every equation
# with its primitive, inputs, outputs and parameters, every literal and every constant at any depth
# (by a SHA-256 digest of its bytes, with dtype and shape). A program holding an opaque callable
# (``pure_callback``, a user primitive's parameter) has no such description and is never cached.
# The rules of ``custom_jvp_call``/``custom_vjp_call`` are the one exception: the programs cached
# here evaluate jaxprs without differentiating them, so those rules are never called (a cached
# gradient program already holds the traced backward pass as ordinary equations).

_RULE_PARAMS = frozenset("jvp_jaxpr_fun jvp_jaxpr_thunk fwd_jaxpr_thunk fwd bwd out_trees".split())
_RULE_PRIMITIVES = frozenset(("custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"))
_MAX_PROGRAMS = 32


class _Uncacheable(Exception):
    """A program whose description would not determine the function it computes."""


def _fingerprint(x):
    if _is_key(x):
        return ("key", str(x.dtype), _fingerprint(jax.random.key_data(x)))
    a = np.asarray(x)
    if a.dtype == object:
        raise _Uncacheable
    digest = hashlib.sha256(np.ascontiguousarray(a).reshape(-1).view(np.uint8)).digest()
    return (a.dtype.str, a.dtype.name, a.shape, digest)


def _aval_key(aval):
    # Avals compare by shape, dtype, weak type and sharding, all of which decide the program.
    return aval


_SIMPLE = frozenset((type(None), bool, int, str, bytes))
_PLAIN = (np.dtype, enum.Enum)


def _describe_value(v, memo):
    t = type(v)
    if t in _SIMPLE:
        return (t, v)  # the type too: True == 1 == 1.0 as keys
    if t is tuple:
        return tuple(_describe_value(x, memo) for x in v)
    if isinstance(v, jax.extend.core.ClosedJaxpr):
        return ("closed", _describe_jaxpr(v.jaxpr, memo), tuple(_fingerprint(c) for c in v.consts))
    if isinstance(v, jax.extend.core.Jaxpr):
        return ("jaxpr", _describe_jaxpr(v, memo))
    if isinstance(v, float | complex):
        return (t, repr(v))  # repr tells -0.0 from 0.0 and keeps every digit
    if isinstance(v, _PLAIN):
        return (t, v)
    if isinstance(v, np.generic | np.ndarray | jax.Array):
        return ("array", _fingerprint(v))
    if isinstance(v, type):
        return ("type", v.__module__, v.__qualname__)
    if isinstance(v, tuple | list | frozenset | set):  # NamedTuples keep their type's name
        items = [_describe_value(x, memo) for x in v]
        if isinstance(v, frozenset | set):
            items = sorted(items, key=repr)
        return (t.__module__, t.__qualname__, tuple(items))
    if isinstance(v, dict):
        return ("dict", tuple(sorted(((repr(k), _describe_value(x, memo)) for k, x in v.items()))))
    module = t.__module__ or ""
    if module.split(".")[0] in ("jax", "jaxlib", "ml_dtypes"):
        # Shardings, meshes, layouts, avals: data whose repr says what they are. A callable among
        # them may wrap user code (a pure_callback's function) and is not described by its repr.
        if not callable(v) or isinstance(v, jax.sharding.Mesh | jax.sharding.AbstractMesh):
            return (module, t.__qualname__, repr(v))
    raise _Uncacheable


def _describe_jaxpr(jaxpr, memo):
    if id(jaxpr) in memo:
        return memo[id(jaxpr)][1]
    ids = {}

    def define(v):
        if isinstance(v, jax.extend.core.DropVar):
            return ("drop", _aval_key(v.aval))
        ids[v] = len(ids)
        return (ids[v], _aval_key(v.aval))

    def use(v):
        if isinstance(v, jax.extend.core.Literal):
            return ("literal", _aval_key(v.aval), _fingerprint(v.val))
        return ids[v]

    head = (tuple(map(define, jaxpr.constvars)), tuple(map(define, jaxpr.invars)))
    eqns = []
    for e in jaxpr.eqns:
        params = []
        for name in sorted(e.params):
            if e.primitive.name in _RULE_PRIMITIVES and name in _RULE_PARAMS:
                continue
            params.append((name, _describe_value(e.params[name], memo)))
        ins = tuple(map(use, e.invars))
        # The primitive itself, not its name: two primitives may share a name.
        eqns.append((e.primitive, ins, tuple(map(define, e.outvars)), tuple(params)))
    out = (head, tuple(eqns), tuple(map(use, jaxpr.outvars)), repr(jaxpr.effects))
    memo[id(jaxpr)] = (jaxpr, out)  # holds the jaxpr so that its id is not reused meanwhile
    return out


def _program_key(closed):
    """A hashable key equal only for jaxprs that compute the same function, or None.

    The top-level constants of ``closed`` are not part of the key: the cached programs take them as
    arguments. Everything else that decides the values is: constants of inner jaxprs, literals and
    parameters at any depth.
    """
    try:
        return _describe_jaxpr(closed.jaxpr, {})
    except _Uncacheable:
        return None


def _cached(cache: dict, key, build):
    """``cache[key]``, built by ``build()`` if absent; never stored when ``key`` is None."""
    if key is None:
        return build()
    run = cache.get(key)
    if run is None:
        run = build()
        if len(cache) >= _MAX_PROGRAMS:
            cache.pop(next(iter(cache)))
        cache[key] = run
    return run


# Compiled gradients, by the description of jax.grad(f)'s jaxpr (constants passed as arguments).
_GRADS: dict = {}


def _compiled_grad(fn, leaves) -> tuple[list, list]:
    """``jax.grad(fn)(leaves)`` compiled once per function, and each gradient's lowest precision.

    fn is traced afresh on every call and the compiled gradient is looked up by a full description
    of the jaxpr it traces to (:func:`_program_key`), with its top-level array constants passed as
    arguments: checking the same model again reuses the compilation, while a closure whose captured
    values changed, at any depth (a Python scalar, an array, an array inside an inner ``jax.jit``
    or a custom rule), is differentiated as it is now. Keying by fn itself would return a stale
    gradient after such a change, and fail for unhashable callables.

    The precisions are, per leaf, the lowest floating dtype a value passes through between the
    inputs and that gradient (forward and backward pass), or None.
    """
    closed = jax.make_jaxpr(jax.grad(fn))(leaves)
    run = _cached(
        _GRADS, _program_key(closed), lambda: jax.jit(partial(jax.core.eval_jaxpr, closed.jaxpr))
    )
    grads = run(closed.consts, *jax.tree_util.tree_leaves(leaves))
    return grads, _path_precision(closed.jaxpr, [True] * len(closed.jaxpr.invars))


def _float64_grad(prob: _Problem, numeric, leaves64):
    """``jax.grad`` of f on the float64 copies, or ``(None, None)`` if that is the caller's own.

    The same program as the finite differences evaluate, differentiated by f's own rules: its
    agreement with them is checked at float64's tolerance, so that a rule wrong by 1e-6 shows in a
    float32 model too. Not needed when every floating argument is float64 already.
    """
    floating = [x for x in jax.tree_util.tree_leaves(prob.args) if _is_float(x)]
    if all(np.dtype(jnp.result_type(x)) == _F64 for x in floating if not isinstance(x, float)):
        return None, None
    try:
        grads, low = _compiled_grad(numeric.f, leaves64)
    except Exception as e:  # f that jax.grad cannot take in float64
        warnings.warn(
            f"check_grad: jax.grad of f on float64 copies of the arguments failed ({e!r:.200}); "
            "only the check in the arguments' own dtypes ran",
            RuntimeWarning,
            stacklevel=3,
        )
        return None, None
    precisions = [_lower(_F64, lo) for lo in low]
    return [_to_f64(g).reshape(-1) for g in grads], precisions


class LowPrecisionWarning(RuntimeWarning):
    """f computes in a lower precision than its arguments: the check's tolerance follows it."""


def _warn_low_precision(names, dtypes, precisions, rtol, atol):
    lowered = {}
    for name, d, p in zip(names, dtypes, precisions, strict=True):
        if p is not None and _below(p, d):
            lowered.setdefault((str(p), str(d)), []).append(name)
    for (p, d), leaves in lowered.items():
        r, a = _default_tolerance(np.dtype(p), rtol, atol)
        warnings.warn(
            f"check_grad: the gradient of {', '.join(leaves)} ({d}) is computed through {p} "
            f"values (f converts to {p} inside), so it is held to {p}'s tolerance "
            f"(rtol={r:g}, atol={a:g}); the finite differences evaluate f with its {p} steps "
            "widened to float64",
            LowPrecisionWarning,
            stacklevel=3,
        )


def _warn_limited(numeric) -> None:
    if numeric.limited is not None:
        warnings.warn(
            f"check_grad: f computes in {numeric.limited} inside a scan, loop or branch (or "
            "reinterprets bits) on the way to its result, so the finite differences are only "
            f"as precise as {numeric.limited}: expect relative errors far above rtol on correct "
            "gradients. Compute in float64 for the check, or loosen rtol/atol",
            LowPrecisionWarning,
            stacklevel=3,
        )


def _check_output(prob: _Problem, diff_leaves, args, leaves) -> None:
    out = jax.eval_shape(lambda d: prob.call(d, args, leaves), diff_leaves)
    shape = getattr(out, "shape", None)
    if shape != ():
        raise ValueError(
            f"f must return a scalar (shape ()), but it returned "
            f"{'shape ' + str(shape) if shape is not None else type(out).__name__}; reduce it "
            "to one number first, e.g. with .sum() or .mean()"
        )
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise TypeError(f"f must return a real floating scalar, but it returned dtype {out.dtype}")


# --------------------------------------------------------------------------------------------------
# The vectorised float64 evaluations


def _auto_chunk(size: int, count: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        if not isinstance(chunk_size, int | np.integer) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        return int(min(chunk_size, max(count, 1)))
    return int(max(1, min(_MAX_CHUNK, _CHUNK_BUDGET // max(size, 1), count)))


# Primitives applied element by element: one changed input element changes one output element.
_ELEMENTWISE = frozenset(
    "abs acos acosh add and asin asinh atan atan2 atanh cbrt ceil clamp convert_element_type copy "
    "copy_p cos cosh digamma div eq erf erf_inv erfc exp exp2 expm1 floor ge gt integer_pow "
    "is_finite le lgamma log log1p logistic lt max min mul ne neg nextafter not or pow "
    "reduce_precision rem round rsqrt select_n sign sin sinh sqrt square stop_gradient sub tan "
    "tanh xor".split()
)
# Primitives whose body is inlined: their value is the value of their jaxpr (custom rules only
# change derivatives, which a finite difference must not use).
_CALLS = frozenset(
    "jit pjit closed_call core_call custom_jvp_call custom_vjp_call remat remat2 checkpoint".split()
)


class _Const:
    def __init__(self, val):
        self.val = val  # a literal, or a constant of an inlined call (baked into the program)


class _Eqn(NamedTuple):
    """One equation of the inlined program: input refs, output keys, original dtypes."""

    prim: Any
    ins: list
    keys: list
    params: dict
    in_dtypes: tuple
    out_dtypes: tuple


def _inline(jaxpr, in_refs, const_refs, eqns, counter):
    """Append ``jaxpr``'s equations to ``eqns`` with calls inlined; return its output refs."""
    env = dict(zip(jaxpr.constvars, const_refs, strict=True))
    env.update(zip(jaxpr.invars, in_refs, strict=True))
    ref = lambda a: _Const(a.val) if isinstance(a, jax.extend.core.Literal) else env[a]
    for e in jaxpr.eqns:
        ins = [ref(a) for a in e.invars]
        sub = e.params.get("jaxpr", e.params.get("call_jaxpr"))
        if e.primitive.name in _CALLS and sub is not None:
            if isinstance(sub, jax.extend.core.ClosedJaxpr):
                sub, consts = sub.jaxpr, [_Const(c) for c in sub.consts]
            else:
                consts = []
            if len(sub.invars) == len(ins) and len(sub.outvars) == len(e.outvars):
                env.update(zip(e.outvars, _inline(sub, ins, consts, eqns, counter), strict=True))
                continue
        keys = [next(counter) for _ in e.outvars]
        dtypes = lambda vs: tuple(getattr(v.aval, "dtype", None) for v in vs)
        eqns.append(_Eqn(e.primitive, ins, keys, e.params, dtypes(e.invars), dtypes(e.outvars)))
        env.update(zip(e.outvars, keys, strict=True))
    return [ref(a) for a in jaxpr.outvars]


def _flatten(closed):
    """``(eqns, in_keys, const_keys, out_refs)`` of ``closed`` with its calls inlined."""
    eqns = []
    counter = iter(range(1, 1 << 62))
    const_keys = [next(counter) for _ in closed.jaxpr.constvars]
    in_keys = [next(counter) for _ in closed.jaxpr.invars]
    outs = _inline(closed.jaxpr, in_keys, const_keys, eqns, counter)
    return eqns, in_keys, const_keys, outs


def _read(env, r):
    return r.val if isinstance(r, _Const) else env[r]


def _bind(prim, params, vals):
    # As jax's own eval_jaxpr does (get_bind_params turns jaxpr params into callables).
    out = prim.bind(*vals, **prim.get_bind_params(params))
    return out if prim.multiple_results else [out]


# --------------------------------------------------------------------------------------------------
# Precision: the lowest floating precision a value passes through on its way from the inputs


def _is_floating_dtype(dtype) -> bool:
    return dtype is not None and jnp.issubdtype(dtype, jnp.floating)


def _lower(a, b):
    """The less precise of two floating dtypes (either may be None)."""
    if a is None or b is None:
        return b if a is None else a
    return a if jnp.finfo(a).eps >= jnp.finfo(b).eps else b


def _below(dtype, than) -> bool:
    """True if floating ``dtype`` is less precise than ``than``."""
    return dtype is not None and jnp.finfo(dtype).eps > jnp.finfo(than).eps


def _sub_jaxprs(params):
    for p in params.values():
        for q in p if isinstance(p, tuple | list) else (p,):
            if isinstance(q, jax.extend.core.ClosedJaxpr):
                yield q.jaxpr
            elif isinstance(q, jax.extend.core.Jaxpr):
                yield q


def _lowest_inside(jaxpr):
    low = None
    for e in jaxpr.eqns:
        for v in e.outvars:
            dtype = getattr(v.aval, "dtype", None)
            if _is_floating_dtype(dtype):
                low = _lower(low, np.dtype(dtype))
        for sub in _sub_jaxprs(e.params):
            low = _lower(low, _lowest_inside(sub))
    return low


def _path_precision(jaxpr, dependent) -> list:
    """Per output of ``jaxpr``: the lowest floating dtype of a value on a path from an input.

    ``dependent`` flags the inputs the paths start from. Calls are followed inside; any other
    program-holding equation (a scan, a loop, a branch) counts every dtype it holds. Values that do
    not depend on the inputs (constants converted once) do not count. ``None`` where no floating
    value lies on such a path.
    """
    low = {v: None for v, d in zip(jaxpr.invars, dependent, strict=True) if d}
    for e in jaxpr.eqns:
        ins = [v for v in e.invars if not isinstance(v, jax.extend.core.Literal) and v in low]
        if not ins:
            continue
        acc = None
        for v in ins:
            acc = _lower(acc, low[v])
        sub = e.params.get("jaxpr", e.params.get("call_jaxpr"))
        if e.primitive.name in _CALLS and sub is not None:
            sub = sub.jaxpr if isinstance(sub, jax.extend.core.ClosedJaxpr) else sub
            if len(sub.invars) == len(e.invars):
                dep = [not isinstance(v, jax.extend.core.Literal) and v in low for v in e.invars]
                for v, inner in zip(e.outvars, _path_precision(sub, dep), strict=True):
                    low[v] = _lower(acc, inner)
                continue
        for sub in _sub_jaxprs(e.params):
            acc = _lower(acc, _lowest_inside(sub))
        for v in e.outvars:
            dtype = getattr(v.aval, "dtype", None)
            low[v] = _lower(acc, np.dtype(dtype) if _is_floating_dtype(dtype) else None)
    return [
        None if isinstance(v, jax.extend.core.Literal) or v not in low else low[v]
        for v in jaxpr.outvars
    ]


# --------------------------------------------------------------------------------------------------
# Lifting: f evaluated with its low-precision steps widened to float64
#
# A function that computes in bfloat16 (or casts to float32) inside is a staircase at the scale of
# a float64 step: its finite differences are rounding noise. The numeric side therefore evaluates
# the program with every floating value widened to float64, the same operations in exact-enough
# arithmetic: the function the code denotes. A low-precision cast becomes the identity, a matrix
# product's preferred_element_type becomes float64. Equations that hold a program (scan, while,
# cond) or reinterpret bits run as they are, on values cast back to their traced dtypes.

_F64 = np.dtype(np.float64)
_DTYPE_PARAMS = ("new_dtype", "preferred_element_type", "out_dtype")
_NO_LIFT = frozenset("bitcast_convert_type random_bits random_wrap random_unwrap".split())


def _liftable(e: _Eqn) -> bool:
    return e.prim.name not in _NO_LIFT and not any(True for _ in _sub_jaxprs(e.params))


def _bind_eqn(e: _Eqn, vals, lift: bool):
    if not lift:
        return _bind(e.prim, e.params, vals)
    floating = [_is_floating_dtype(getattr(v, "dtype", None)) for v in vals]
    if _liftable(e):
        if e.prim.name == "reduce_precision":
            return [jnp.asarray(vals[0], _F64)]
        params = dict(e.params)
        for name in _DTYPE_PARAMS:
            if _is_floating_dtype(params.get(name)):
                params[name] = _F64
        try:
            wide = [
                jax.lax.convert_element_type(v, _F64) if f and v.dtype != _F64 else v
                for v, f in zip(vals, floating, strict=True)
            ]
            return _bind(e.prim, params, wide)
        except Exception:  # an equation that will not take float64: run as traced
            pass
    narrow = [
        jax.lax.convert_element_type(v, d) if f and d is not None and v.dtype != d else v
        for v, f, d in zip(vals, floating, e.in_dtypes, strict=True)
    ]
    return _bind(e.prim, e.params, narrow)


def _unlifted_precision(eqns, in_keys) -> Any:
    """The lowest floating dtype on a path from the inputs that lifting leaves as it is, or None."""
    dependent = set(in_keys)
    low = None
    for e in eqns:
        if not any(not isinstance(r, _Const) and r in dependent for r in e.ins):
            continue
        dependent.update(e.keys)
        if not _liftable(e):
            for d in e.out_dtypes:
                if _is_floating_dtype(d):
                    low = _lower(low, np.dtype(d))
            for sub in _sub_jaxprs(e.params):
                low = _lower(low, _lowest_inside(sub))
    return low if _below(low, _F64) else None


class _Numeric:
    """f of the float64 differentiated leaves, traced once, with its low-precision steps lifted.

    ``lifted`` is the dtype whose steps were widened (None: f computes in float64 throughout);
    ``limited`` the lowest precision lifting could not remove (None: the values are float64's).
    """

    def __init__(self, fn, leaves64):
        self.fn = self.f = fn  # f: as given, with its custom rules; fn: what is evaluated
        self.closed = jax.make_jaxpr(fn)(leaves64)
        (low,) = _path_precision(self.closed.jaxpr, [True] * len(self.closed.jaxpr.invars))
        self.lifted = low if _below(low, _F64) else None
        self.limited = None
        if self.lifted is not None:
            eqns, in_keys, const_keys, outs = _flatten(self.closed)
            self.limited = _unlifted_precision(eqns, in_keys)
            consts = self.closed.consts

            def lifted(leaves):
                env = dict(zip(in_keys, leaves, strict=True))
                env.update(zip(const_keys, consts, strict=True))
                for e in eqns:
                    out = _bind_eqn(e, [_read(env, r) for r in e.ins], True)
                    env.update(zip(e.keys, out, strict=True))
                return jnp.asarray(_read(env, outs[0]), _F64)

            self.fn = lifted

    def __call__(self, leaves):
        return self.fn(leaves)


# --------------------------------------------------------------------------------------------------
# The sparse evaluator


def _flat_index(multi, shape):
    if not shape:
        return jnp.zeros((), jnp.int32)
    return jnp.ravel_multi_index(tuple(multi), shape, mode="clip")


def _elementwise_delta(e: _Eqn, vals, k, idx, new, old, d):
    """``new - old`` for an elementwise equation, exactly where the operation allows."""
    if not _is_floating_dtype(new.dtype):
        return None  # a comparison's change is carried by its value alone
    if d is None or not _is_floating_dtype(d.dtype):
        return (new - old).astype(new.dtype)
    name = e.prim.name
    other = lambda: vals[1 - k] if np.shape(vals[1 - k]) == () else vals[1 - k].reshape(-1)[idx]
    if name in ("add", "add_any") and len(vals) == 2:
        return d.astype(new.dtype)
    if name == "sub" and len(vals) == 2:
        return (d if k == 0 else -d).astype(new.dtype)
    if name == "neg":
        return (-d).astype(new.dtype)
    if name == "mul" and len(vals) == 2:
        return (other() * d).astype(new.dtype)
    if name in ("convert_element_type", "copy", "copy_p") and not _below(new.dtype, d.dtype):
        return d.astype(new.dtype)
    return (new - old).astype(new.dtype)


def _sparse_rule(e: _Eqn, bind, vals, out, k, idx, v, d):
    """Output of one equation whose input ``k`` equals its base value except element ``idx = v``.

    ``d`` is ``v`` minus the base value, carried beside it so that a sum's change is exact.
    Returns ``("sparse", out_idx, out_v, out_d)``, ``("dense", value)`` or ``None`` (no rule).
    """
    name = e.prim.name
    params = e.params
    x = vals[k]
    shape = x.shape
    if name in _ELEMENTWISE and out.shape == shape:
        if all(np.shape(a) in (shape, ()) for a in vals):
            scalars = [
                v if i == k else (jnp.asarray(a).reshape(-1)[idx] if np.shape(a) == shape else a)
                for i, a in enumerate(vals)
            ]
            new = bind(scalars)[0]
            old = out.reshape(-1)[idx]
            return ("sparse", idx, new, _elementwise_delta(e, vals, k, idx, new, old, d))
        return None
    if not shape:
        return None
    if name in ("reshape", "squeeze", "expand_dims") and params.get("dimensions") is None:
        return ("sparse", idx, v, d)
    if name == "transpose":
        multi = jnp.unravel_index(idx, shape)
        oi = _flat_index([multi[p] for p in params["permutation"]], out.shape)
        return ("sparse", oi, v, d)
    if name == "reduce_sum":
        multi = jnp.unravel_index(idx, shape)
        kept = [m for dim, m in enumerate(multi) if dim not in params["axes"]]
        oi = _flat_index(kept, out.shape)
        d = (v - x.reshape(-1)[idx] if d is None else d).astype(out.dtype)
        # The sum with one term changed; its change is the term's, exactly.
        return ("sparse", oi, out.reshape(-1)[oi] + d, d)
    if name == "dot_general":
        (lc, rc), (lb, rb) = params["dimension_numbers"]
        other = jnp.asarray(vals[1 - k])
        sc, sb, oc, ob = (lc, lb, rc, rb) if k == 0 else (rc, rb, lc, lb)
        multi = jnp.unravel_index(idx, shape)
        where = [slice(None)] * other.ndim
        for s_dim, o_dim in (*zip(sb, ob, strict=True), *zip(sc, oc, strict=True)):
            where[o_dim] = multi[s_dim]
        row = other[tuple(where)]  # the other operand's free dims, in order
        free = [multi[dim] for dim in range(len(shape)) if dim not in (*sc, *sb)]
        rest = [slice(None)] * (row.ndim)
        place = [multi[dim] for dim in sb] + (free + rest if k == 0 else rest + free)
        # In the product's dtype: the operands may differ (a float32 constant times float64).
        d = (v - x.reshape(-1)[idx] if d is None else d).astype(out.dtype)
        delta = row.astype(out.dtype) * jnp.broadcast_to(d, row.shape)
        return ("dense", out.at[tuple(place)].add(delta))
    return None


# Compiled sparse evaluators, by the description of the jaxpr (_program_key; its top-level constants
# are passed as arguments): re-checking the same model reuses the executable, as jax.jit would.
_EVALUATORS: dict = {}


def _sparse_evaluator(numeric: _Numeric, chunks):
    """A jitted ``run(leaves, consts, idx, values)`` for the (leaf, chunk size) pairs ``chunks``.

    ``run`` returns ``(f0, [f(x + change) - f0 per request])`` and has an ``exact`` dict: for each
    leaf, whether the change reaches the output through sparse steps only (the difference is then
    free of the cancellation ``f(x + h) - f(x)`` suffers when ``|f|`` is large).
    """
    key = _program_key(numeric.closed)
    lift = numeric.lifted is not None
    return _cached(
        _EVALUATORS,
        None if key is None else (key, chunks, lift),
        lambda: _build_evaluator(numeric.closed, chunks, lift),
    )


def _build_evaluator(closed, chunks, lift):
    eqns, in_keys, const_keys, outs = _flatten(closed)
    exact = {}

    def run(flat_leaves, consts, idx, values):
        base = dict(zip(in_keys, flat_leaves, strict=True))
        base.update(zip(const_keys, consts, strict=True))
        for e in eqns:
            vals = [_read(base, r) for r in e.ins]
            base.update(zip(e.keys, _bind_eqn(e, vals, lift), strict=True))

        def perturbed(j, i, v):
            leaf_key = in_keys[j]
            pert = {leaf_key: ("sparse", i, v, v - base[leaf_key].reshape(-1)[i])}

            def full(r):
                if isinstance(r, _Const) or r not in pert:
                    return _read(base, r)
                p = pert[r]
                if p[0] == "dense":
                    return p[1]
                b = base[r]
                return b.reshape(-1).at[p[1]].set(p[2].astype(b.dtype)).reshape(b.shape)

            for e in eqns:
                hit = [n for n, r in enumerate(e.ins) if not isinstance(r, _Const) and r in pert]
                if not hit:
                    continue
                rule = None
                if len(hit) == 1 and pert[e.ins[hit[0]]][0] == "sparse" and len(e.keys) == 1:
                    _, pi, pv, pd = pert[e.ins[hit[0]]]
                    vals = [_read(base, r) for r in e.ins]
                    bind = lambda a, e=e: _bind_eqn(e, a, lift)
                    rule = _sparse_rule(e, bind, vals, base[e.keys[0]], hit[0], pi, pv, pd)
                if rule is not None:
                    pert[e.keys[0]] = rule
                else:
                    outs_ = _bind_eqn(e, [full(r) for r in e.ins], lift)
                    pert.update((k, ("dense", o)) for k, o in zip(e.keys, outs_, strict=True))
            out = outs[0]
            p = pert.get(out) if not isinstance(out, _Const) else None
            exact[j] = p is not None and p[0] == "sparse"
            if p is None:
                return jnp.zeros((), _F64)
            if p[0] == "sparse":
                return jnp.asarray(p[3], _F64).reshape(())
            return jnp.asarray(p[1], _F64) - jnp.asarray(base[out], _F64)

        # The unperturbed intermediates above are loop invariants of these scans: computed once.
        results = []
        for (j, c), i, v in zip(chunks, idx, values, strict=True):
            one = lambda a, j=j: perturbed(j, *a)
            # One chunk needs no loop around it (a smaller program to compile).
            mapped = jax.vmap(one) if len(i) == c else partial(jax.lax.map, one, batch_size=c)
            results.append(mapped((i, v)))
        return jnp.asarray(_read(base, outs[0]), _F64), results

    jitted = jax.jit(run)
    jitted.exact = exact  # filled when run is traced; the same on every later call
    return jitted


def _sparse_values(numeric: _Numeric, leaves64, requests):
    """f with coordinate ``idx[k]`` of leaf ``j`` set to ``values[k]``, sharing unchanged work.

    ``requests`` holds ``(j, idx, values, chunk)`` per leaf. ``f`` is traced once; every
    intermediate the change does not reach is computed once, a single changed element is followed
    exactly through elementwise operations, reshapes, transposes, sums and matrix products (an
    outer-product update of the product), and anything else is evaluated on the full perturbed
    value. The perturbations are vectorised with ``vmap`` in chunks, all leaves in one program.
    Returns ``(f at the unperturbed point, [f(changed) - f0 per request], {j: exact})``.
    """
    chunks, idxs, vals = [], [], []
    for j, idx, values, chunk in requests:
        # Padding repeats the last perturbation so that every chunk is full; dropped below.
        pad = (-len(idx)) % chunk
        idxs.append(jnp.asarray(np.concatenate([idx, np.repeat(idx[-1:], pad)])))
        vals.append(jnp.asarray(np.concatenate([values, np.repeat(values[-1:], pad)])))
        chunks.append((j, chunk))
    run = _sparse_evaluator(numeric, tuple(chunks))
    f0, outs = run(list(leaves64), list(numeric.closed.consts), idxs, vals)
    deltas = [np.asarray(o, np.float64)[: len(r[1])] for o, r in zip(outs, requests, strict=True)]
    return float(f0), deltas, {r[0]: bool(run.exact.get(r[0], False)) for r in requests}


def _perturbed_values(numeric: _Numeric, leaves64, points, chunk_size):
    """``f`` at coordinate ``idx[k]`` of leaf ``j`` set to ``xp[k]``, and to ``xm[k]`` (float64).

    ``points`` maps leaf position ``j`` to ``(idx, xp, xm)``; returns ``f(x)``,
    ``{j: (f(xp) - f(x), f(xm) - f(x))}`` and ``{j: exact}`` (see :func:`_sparse_evaluator`).
    """
    # A zero-size leaf has no coordinate to perturb (and a gather of one row from it is
    # undefined): it gets empty differences, and f is evaluated for the others only.
    empty = [j for j, (idx, _, _) in points.items() if len(idx) == 0]
    if empty:
        none = {j: (np.zeros(0), np.zeros(0)) for j in empty}
        rest = {j: p for j, p in points.items() if j not in none}
        if not rest:
            return float(jax.jit(numeric.fn)(leaves64)), none, dict.fromkeys(empty, True)
        f0, values, exact = _perturbed_values(numeric, leaves64, rest, chunk_size)
        return f0, {**values, **none}, {**exact, **dict.fromkeys(empty, True)}
    requests = []
    for j, (idx, xp, xm) in points.items():
        count = len(idx)
        chunk = _auto_chunk(leaves64[j].size, 2 * count, chunk_size)
        # A power of two at least 2 * count: repeated checks of one model reuse the evaluator.
        chunk = min(1 << (2 * count - 1).bit_length(), chunk)
        requests.append((j, np.concatenate([idx, idx]), np.concatenate([xp, xm]), chunk))
    try:
        f0, outs, exact = _sparse_values(numeric, leaves64, requests)
    except Exception:  # an operation the sparse evaluator cannot follow: go dense
        f0 = float(jax.jit(numeric.fn)(leaves64))
        values = {}
        for j, (idx, xp, xm) in points.items():
            chunk = _auto_chunk(leaves64[j].size, len(idx), chunk_size)
            fp, fm = _coordinate_values(numeric.fn, leaves64, j, idx, xp, xm, chunk)
            values[j] = (fp - f0, fm - f0)
        return f0, values, dict.fromkeys(points, False)
    half = {r[0]: (o[: len(o) // 2], o[len(o) // 2 :]) for r, o in zip(requests, outs, strict=True)}
    return f0, half, exact


def _coordinate_values(fn, leaves64, j, idx, xp, xm, chunk):
    """f at leaf ``j`` with coordinate ``idx[k]`` set to ``xp[k]`` and to ``xm[k]`` (float64).

    ``chunk`` copies of the leaf are held in a scan carry and updated in place, so a perturbed
    point costs one evaluation of f and no copy of the leaf (the lecture's loop writes a copy).
    """
    count = len(idx)
    pad = (-count) % chunk
    # Padding repeats the last coordinate; its results are dropped.
    idx, xp, xm = (
        np.concatenate([a, np.repeat(a[-1:], pad)]).reshape(-1, chunk) for a in (idx, xp, xm)
    )
    shape = leaves64[j].shape

    def run(leaves, idx, xp, xm):
        leaf = leaves[j]
        rows = jnp.arange(chunk)

        def at(flat):
            return fn([*leaves[:j], flat.reshape(shape), *leaves[j + 1 :]])

        evaluate = jax.vmap(at)

        def body(carry, inp):
            i, vp, vm = inp
            old = carry[rows, i]
            carry = carry.at[rows, i].set(vp)
            fp = evaluate(carry)
            carry = carry.at[rows, i].set(vm)
            fm = evaluate(carry)
            return carry.at[rows, i].set(old), (fp, fm)

        tiled = jnp.broadcast_to(leaf.reshape(1, -1), (chunk, leaf.size))
        _, (fp, fm) = jax.lax.scan(body, tiled, (idx, xp, xm))
        return fp.reshape(-1), fm.reshape(-1)

    fp, fm = jax.jit(run)(leaves64, jnp.asarray(idx), jnp.asarray(xp), jnp.asarray(xm))
    return np.asarray(fp, np.float64)[:count], np.asarray(fm, np.float64)[:count]


def _direction_values(fn, leaves64, j, directions, h, chunk):
    """f at leaf ``j`` moved by ``+h v`` and ``-h v`` for each row ``v`` of ``directions``."""

    def run(leaves, v):
        leaf = leaves[j]

        def at(delta):
            x = leaf + delta.reshape(leaf.shape)
            return fn([*leaves[:j], x, *leaves[j + 1 :]])

        def one(d):
            return at(h * d), at(-h * d)

        return jax.lax.map(one, v, batch_size=chunk)

    fp, fm = jax.jit(run)(leaves64, jnp.asarray(directions))
    return np.asarray(fp, np.float64), np.asarray(fm, np.float64)


def _steps(x: np.ndarray, eps: float):
    # Callers divide by the step actually taken (xp - xm, xp - x), not by 2h: x + h rounds.
    h = eps * np.maximum(np.abs(x), 1.0)
    return x + h, x - h


def _check_eps(eps):
    if eps is None:
        return DEFAULT_EPS
    if isinstance(eps, bool) or not isinstance(eps, float | int | np.floating | np.integer):
        raise TypeError(f"eps must be a number in (0, 1), got {eps!r} of type {type(eps).__name__}")
    if not 0 < eps < 1:
        raise ValueError(f"eps is a relative step and must be in (0, 1), got {eps!r}")
    return float(eps)


# --------------------------------------------------------------------------------------------------
# Public functions


def numerical_grad(
    f: Callable[..., jax.Array],
    *args,
    argnums: int | Sequence[int] = 0,
    eps: float | None = None,
    chunk_size: int | None = None,
):
    """Gradient of a scalar ``f`` by centred finite differences, evaluated in float64.

    For every floating coordinate ``x_i`` of the arguments at ``argnums``::

        df/dx_i ~ (f(x + h_i e_i) - f(x - h_i e_i)) / ((x_i + h_i) - (x_i - h_i)),
        h_i = eps * max(|x_i|, 1)

    The step is relative to the coordinate's magnitude, so it neither rounds away on large values
    nor for float16/bfloat16 inputs (jax issue 7742: a fixed 1e-4 step does both); the default
    ``eps = cbrt(float64 eps) ~ 6.06e-6`` balances truncation and rounding error in float64.
    ``f`` runs on float64 copies of every floating argument (the caller's arrays, of any float
    dtype, are upcast) inside a local ``jax.enable_x64(True)`` context; the caller's global x64
    setting is unchanged afterwards. Integer leaves and PRNG keys (typed or raw ``uint32``) are held
    fixed. The perturbed points are evaluated in one compiled program, ``chunk_size`` coordinates
    at a time under ``vmap``; no Python loop per coordinate. ``f`` is traced once and the work a
    perturbation does not reach is shared: intermediates it leaves unchanged are computed once, and
    a single changed element is followed exactly through elementwise operations, reshapes, sums and
    matrix products (other operations see the full perturbed value), so the values are those of
    ``f`` at ``x +- h e_i`` up to float64 rounding; the change of ``f`` is carried beside its value
    through elementwise steps and sums, so a small term's derivative is not lost in a large
    ``|f|``. Low-precision steps inside ``f`` (a cast to bfloat16 or float32, a float16 matrix
    product) are widened to float64, so the differences are those of the function the code
    denotes; a :class:`LowPrecisionWarning` says where that is impossible (inside a scan, loop or
    branch). The compiled program is reused when the same function is checked again.

    ``f`` must be traceable by JAX.

    Args:
      f: function returning a real scalar.
      *args: positional arguments of ``f`` (arrays or pytrees of arrays).
      argnums: which argument(s) to differentiate, an int or a tuple of ints as in ``jax.grad``.
      eps: relative step (default ``cbrt(finfo(float64).eps)``).
      chunk_size: coordinates evaluated together in one vectorised step; by default as many as
        fit in a 256 MiB float64 workspace (at most 256).

    Returns:
      The gradient in the structure of ``args[argnums]`` (a tuple for tuple ``argnums``), every
      floating leaf a NumPy float64 array of the leaf's shape; held-fixed leaves are ``float0``
      zeros, as ``jax.grad(..., allow_int=True)`` returns.

    Raises:
      TypeError: if ``f`` is not callable, does not return a real floating scalar, or the arguments
        have no floating leaf; if ``argnums`` is not an int or tuple of ints.
      ValueError: if ``f`` returns a non-scalar shape, ``argnums`` is out of range, or ``eps`` or
        ``chunk_size`` is out of range.

    Warns:
      LowPrecisionWarning: if ``f`` computes in a lower precision than float64 where it cannot be
        widened (inside a scan, loop or branch), which limits the differences to it.

    References:
      Karpathy, CS231n notes "Neural Networks 3", gradient checks (2016).

    Example:
      >>> g = numerical_grad(lambda x: (x ** 3).sum(), jnp.array([1.0, 2.0]))
      >>> np.round(g, 6)
      array([ 3., 12.])
    """
    eps = _check_eps(eps)
    prob = _problem(f, args, argnums)
    # Standard promotion: float32 constants that f closes over meet the float64 arguments.
    with jax.enable_x64(True), jax.numpy_dtype_promotion("standard"):
        args64 = _upcast(prob.args)
        leaves64_all = jax.tree_util.tree_leaves(_upcast(tuple(prob.leaves)))
        leaves64 = [leaves64_all[p] for p in prob.diff]
        _check_output(prob, leaves64, args64, leaves64_all)
        numeric = _Numeric(lambda d: prob.call(d, args64, leaves64_all), leaves64)
        _warn_limited(numeric)
        points = {}
        for j, leaf in enumerate(leaves64):
            x = np.asarray(leaf, np.float64).reshape(-1)
            points[j] = (np.arange(x.size), *_steps(x, eps))
        _, values, _ = _perturbed_values(numeric, leaves64, points, chunk_size)
        grads = []
        for j, leaf in enumerate(leaves64):
            (_, xp, xm), (dp, dm) = points[j], values[j]
            grads.append(((dp - dm) / (xp - xm)).reshape(leaf.shape))
    out = [np.zeros(np.shape(x), jax.dtypes.float0) for x in prob.leaves]
    for p, g in zip(prob.diff, grads, strict=True):
        out[p] = g
    selected = jax.tree_util.tree_unflatten(prob.treedef, out)
    return selected[0] if prob.single else selected


def _sample_counts(sizes: list[int], num_checks: int) -> list[int]:
    """At least one check per leaf, the rest proportional to size (largest remainders)."""
    total = sum(sizes)
    if num_checks >= total:
        return list(sizes)
    counts = [1] * len(sizes)
    rest = num_checks - len(sizes)
    if rest > 0:
        spare = np.array([s - 1 for s in sizes], np.float64)
        share = rest * spare / spare.sum()
        base = np.minimum(np.floor(share).astype(int), spare.astype(int))
        left = rest - int(base.sum())
        order = np.argsort(-(share - base), kind="stable")
        for k in order:
            if left == 0:
                break
            if base[k] < spare[k]:
                base[k] += 1
                left -= 1
        counts = [1 + int(b) for b in base]
    return counts


def _rng(key) -> np.random.Generator:
    if key is None:
        return np.random.default_rng(0)
    if isinstance(key, int | np.integer):
        return np.random.default_rng(int(key))
    dtype = getattr(key, "dtype", None)
    if not _is_key(key) and (dtype is None or np.dtype(dtype) != np.uint32):
        raise TypeError(
            "key must be None, an int seed or a PRNG key (jax.random.key(0)), got "
            f"{type(key).__name__}" + (f" of dtype {dtype}" if dtype is not None else "")
        )
    data = jax.random.key_data(key) if _is_key(key) else key
    return np.random.default_rng(np.asarray(data, np.uint32).ravel().tolist())


def _default_tolerance(dtype, rtol, atol):
    dtype = np.dtype(dtype) if dtype is not None else np.dtype("f4")
    if dtype in _DEFAULT_TOLERANCES:
        d_rtol, d_atol = _DEFAULT_TOLERANCES[dtype]
    elif _is_floating_dtype(dtype):  # float8 and other narrow types: a few of their ulps
        eps = float(jnp.finfo(dtype).eps)
        d_rtol, d_atol = max(5e-2, 8 * eps), eps
    else:
        d_rtol, d_atol = _DEFAULT_TOLERANCES[np.dtype("f4")]
    return (d_rtol if rtol is None else float(rtol)), (d_atol if atol is None else float(atol))


def _check_tolerance(value, name):
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise TypeError(f"{name} must be a number >= 0 or None, got {value!r}")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0 or None, got {value!r}")


def check_grad(
    f: Callable[..., jax.Array],
    *args,
    argnums: int | Sequence[int] = 0,
    num_checks: int | None = None,
    num_directions: int | None = None,
    key=None,
    rtol: float | None = None,
    atol: float | None = None,
    eps: float | None = None,
    chunk_size: int | None = None,
    num_worst: int = 3,
) -> GradCheckReport:
    """Compare ``jax.grad(f)`` with float64 centred differences, leaf by leaf.

    A checked value passes when::

        |a - n| <= atol + rtol * max(|a|, |n|) + noise

    with ``a`` the analytic value (``jax.grad`` of ``f`` on the caller's arrays, in their dtypes),
    ``n`` the numeric one (:func:`numerical_grad`'s float64 centred difference) and ``noise`` the
    difference's rounding floor, ``16 eps64 |f| / 2h`` (about zero where the change reaches the
    output through elementwise steps and sums only). Defaults by the leaf's dtype: float64
    ``rtol=1e-7, atol=1e-9``; float32 ``rtol=1e-3, atol=1e-5`` (a correct float32 model is up to
    ~4e-4 off in deep nets); float16 ``1e-2, 1e-3``; bfloat16 ``5e-2, 5e-3``. ``atol`` is
    absolute: for losses far from unit scale, set it.

    Two checks, both must pass. Where an argument is not float64, ``jax.grad`` of ``f`` on float64
    copies of the arguments (the same program the differences evaluate, with ``f``'s own rules) is
    held to float64's tolerance as well: a rule wrong by 1e-6 relative fails in a float32 model,
    while float32 rounding is judged only at float32's tolerance. Code that converts to float32
    itself is checked at float32's tolerance there too. Given ``rtol``/``atol`` hold for both.

    Low precision inside ``f``: where a gradient passes through values of a lower precision than
    its leaf (``x.astype(jnp.bfloat16)``, a float16 matrix product), it is held to that dtype's
    tolerance and a :class:`LowPrecisionWarning` (a ``RuntimeWarning``) names the dtype. The
    differences evaluate ``f`` with such steps widened to float64 (the function the code denotes,
    not a staircase of bfloat16 values); where that is impossible (low precision inside a scan,
    loop or branch) a ``LowPrecisionWarning`` says the differences are limited to it.

    Suspects: a value that disagrees with the centred difference is looked at again with the step
    halved and quartered.

    - Kinks: when the one-sided differences ``(f(x+h) - f(x)) / h`` and ``(f(x) - f(x-h)) / h``
      disagree about as much at ``h/4`` as at ``h`` (a derivative that jumps; for a smooth ``f``
      they differ by ``h |f''|``, which shrinks with the step), the value is a kink if it lies
      between the one-sided derivatives (within the tolerance): a one-sided derivative or a
      subgradient such as relu's 0 or abs's 0 at 0. A value outside them fails.
    - Otherwise the three centred differences are extrapolated (Richardson), which removes their
      O(h^2) truncation, and the value is compared with that, with only the extrapolation's own
      estimated error added. A fast-growing ``f`` such as ``exp(20 x)`` is then resolved to far
      below rtol, so a 1e-4 error in it fails rather than passing as truncation or a kink.

    Three modes:

    - all coordinates (default; for small models);
    - ``num_checks=k``: ``k`` coordinates sampled without replacement, at least one in every leaf
      (biases too) and the rest in proportion to the leaves' sizes (so the total may exceed ``k``
      when there are more leaves than checks);
    - ``num_directions=k``: for each leaf, ``k`` random unit directions ``v``; the analytic
      directional derivative ``<grad f, v>`` against ``(f(x + h v) - f(x - h v)) / 2h`` with
      ``h = eps * max(1, max|x|)``. Cheap for large leaves, sensitive to an error in a whole leaf
      but not to one wrong coordinate among millions.

    Randomness inside ``f`` must come from a PRNG key among its arguments: keys (typed, or raw
    ``uint32`` arrays) and other non-floating leaves are held fixed, so the same dropout mask is
    drawn for ``f(x + h)``, ``f(x - h)`` and the analytic pass (which also runs under the local x64
    context for that reason; see the module docstring).

    The compiled gradients and evaluators are reused when the same function is checked again:
    ``f`` is traced on every call and its programs are looked up by a full description of the
    traced jaxpr, every array it holds at any depth included (an array closed over inside an inner
    ``jax.jit`` or a custom rule's closure); a program holding an opaque callable
    (``pure_callback``) is never reused.

    Compared with ``jax.test_util.check_grads``: that raises on the first mismatch and returns
    nothing, scales its tolerance with the array size (jax issue 3130) and cannot say which leaf is
    wrong; this returns a report per leaf.

    Args:
      f: function returning a real scalar (a loss).
      *args: positional arguments of ``f``.
      argnums: argument(s) to check, an int or a tuple of ints as in ``jax.grad``.
      num_checks: number of coordinates to sample; ``None`` checks all of them.
      num_directions: number of random directions per leaf (instead of coordinates).
      key: PRNG key or int seed for the sampling (``None``: a fixed seed, so reruns agree).
      rtol, atol: tolerances (``None``: the defaults above, by the leaf's dtype).
      eps: relative finite-difference step (default ``cbrt(float64 eps) ~ 6.06e-6``).
      chunk_size: points evaluated together in one vectorised step (default: automatic).
      num_worst: worst coordinates kept per leaf in the report.

    Returns:
      A :class:`GradCheckReport`; ``bool(report)`` is ``report.passed`` and ``print(report)``
      shows the table.

    Raises:
      TypeError: as :func:`numerical_grad`.
      ValueError: as :func:`numerical_grad`, and if ``num_checks`` or ``num_directions`` is below
        1, or both are given, or a tolerance is negative.

    Warns:
      LowPrecisionWarning: where ``f`` computes in a lower precision than a leaf (see above).
      RuntimeWarning: if ``jax.grad`` of ``f`` on float64 copies fails (only the check in the
        arguments' own dtypes runs then).

    References:
      Karpathy, CS231n notes "Neural Networks 3", gradient checks (2016).

    Example:
      >>> w = {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}
      >>> x = jnp.arange(6.0).reshape(2, 3)
      >>> loss = lambda w, x: jnp.tanh(x @ w["kernel"] + w["bias"]).sum()
      >>> report = check_grad(loss, w, x)
      >>> report.passed, report["bias"].num_checked
      (True, 2)
    """
    eps = _check_eps(eps)
    if num_checks is not None and num_directions is not None:
        raise ValueError("give num_checks (sampled coordinates) or num_directions, not both")
    for name, v in (("num_checks", num_checks), ("num_directions", num_directions)):
        if v is not None and (not isinstance(v, int | np.integer) or isinstance(v, bool)):
            raise TypeError(f"{name} must be a positive integer or None, got {v!r}")
        if v is not None and v < 1:
            raise ValueError(f"{name} must be a positive integer or None, got {v!r}")
    if not isinstance(num_worst, int | np.integer) or num_worst < 0:
        raise ValueError(f"num_worst must be a non-negative integer, got {num_worst!r}")
    _check_tolerance(rtol, "rtol")
    _check_tolerance(atol, "atol")
    prob = _problem(f, args, argnums)
    rng = _rng(key)
    mode = "directions" if num_directions else ("sampled" if num_checks else "all")

    with jax.enable_x64(True):
        diff_leaves = [jnp.asarray(prob.leaves[p]) for p in prob.diff]
        try:
            grads, low = _compiled_grad(prob.call, diff_leaves)
        except Exception:
            _check_output(
                prob, diff_leaves, prob.args, prob.leaves
            )  # a clearer error, if it is f's
            raise
        analytic = [_to_f64(a).reshape(-1) for a in grads]
    dtypes = [np.dtype(jnp.result_type(prob.leaves[p])) for p in prob.diff]
    # The precision each gradient is computed in: its leaf's, or lower where f casts down inside.
    precisions = [
        _lower(d, lo) if _is_floating_dtype(d) else lo for d, lo in zip(dtypes, low, strict=True)
    ]
    _warn_low_precision(prob.names, dtypes, precisions, rtol, atol)

    # Standard promotion: float32 constants that f closes over meet the float64 arguments.
    with jax.enable_x64(True), jax.numpy_dtype_promotion("standard"):
        args64 = _upcast(prob.args)
        leaves64_all = jax.tree_util.tree_leaves(_upcast(tuple(prob.leaves)))
        leaves64 = [leaves64_all[p] for p in prob.diff]
        numeric = _Numeric(lambda d: prob.call(d, args64, leaves64_all), leaves64)
        _warn_limited(numeric)
        analytic64, precisions64 = _float64_grad(prob, numeric, leaves64)
        sizes = [int(x.size) for x in leaves64]
        if mode == "sampled":
            counts = _sample_counts(sizes, int(num_checks))
        elif mode == "directions":
            counts = [int(num_directions)] * len(sizes)
        else:
            counts = sizes

        xs = [np.asarray(leaf, np.float64).reshape(-1) for leaf in leaves64]
        if mode != "directions":
            points = {}
            for j, x in enumerate(xs):
                if counts[j] < x.size:
                    idx = np.sort(rng.choice(x.size, size=counts[j], replace=False))
                else:
                    idx = np.arange(x.size)
                points[j] = (idx, *_steps(x[idx], eps))
            f0, values, exact = _perturbed_values(numeric, leaves64, points, chunk_size)
        else:
            f0 = float(jax.jit(numeric.fn)(leaves64))
        directions = {}

        cases = []  # per leaf: (checks, tolerances, level-0 differences, index)
        for j, leaf in enumerate(leaves64):
            x = xs[j]
            if mode == "directions":
                v = rng.standard_normal((counts[j], x.size))
                v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-300)
                h = eps * max(1.0, float(np.max(np.abs(x), initial=0.0)))
                chunk = _auto_chunk(x.size, counts[j], chunk_size)
                directions[j] = (v, h, chunk)
                fp, fm = _direction_values(numeric.fn, leaves64, j, v, h, chunk)
                step = np.full(counts[j], h)
                level0 = _Differences.of(fp - f0, fm - f0, step, step, f0, False)
                checks = [v @ analytic[j]]
                if analytic64 is not None:
                    checks.append(v @ analytic64[j])
                index = [(k,) for k in range(counts[j])]
            else:
                (idx, xp, xm), (dp, dm) = points[j], values[j]
                xi = x[idx]
                level0 = _Differences.of(dp, dm, xp - xi, xi - xm, f0, exact[j])
                checks = [analytic[j][idx]]
                if analytic64 is not None:
                    checks.append(analytic64[j][idx])
                if leaf.ndim:
                    multi = [m.tolist() for m in np.unravel_index(idx, leaf.shape)]
                    index = list(zip(*multi, strict=True))
                else:
                    index = [()] * len(idx)
            tols = [_default_tolerance(precisions[j], rtol, atol)]
            if analytic64 is not None:
                tols.append(_default_tolerance(precisions64[j], rtol, atol))
            cases.append((list(zip(checks, tols, strict=True)), level0, index))

        # Values that disagree with the centred difference are looked at again with smaller steps.
        suspects = {j: _suspects(c[0], c[1]) for j, c in enumerate(cases)}
        if mode == "directions":
            refined = {
                j: _refine_directions(numeric, leaves64, j, *directions[j], sel, f0)
                for j, sel in suspects.items()
                if len(sel)
            }
        else:
            refined = _refine_coordinates(numeric, leaves64, points, suspects, eps, chunk_size)

        reports = []
        for j, leaf in enumerate(leaves64):
            checks, level0, index = cases[j]
            judged = _judge(checks, level0, suspects[j], refined.get(j))
            reports.append(
                _leaf_report(
                    prob.names[j],
                    leaf.shape,
                    dtypes[j],
                    [a for a, _ in checks],
                    [t for _, t in checks],
                    judged,
                    index,
                    num_worst,
                    precisions[j],
                )
            )
    return GradCheckReport(
        passed=all(x.passed for x in reports),
        leaves=tuple(reports),
        mode=mode,
        eps=eps,
        skipped=tuple(prob.skipped),
    )


# --------------------------------------------------------------------------------------------------
# Judging the differences


# Rounding floor of a difference of two float64 values of f: 16 ulps of |f| (a few roundings in
# f's last operations, each of them in both points), divided by the step.
_ROUNDING = 16 * float(np.finfo(np.float64).eps)


@dataclasses.dataclass
class _Differences:
    """Finite differences at one step size: centred, one-sided up and down, and their noise."""

    num: np.ndarray
    up: np.ndarray
    down: np.ndarray
    noise: np.ndarray  # rounding floor of ``num`` (absolute); twice that for ``up`` and ``down``

    @staticmethod
    def of(dp, dm, hp, hm, f0, exact):
        """From ``f(x + hp) - f(x)`` and ``f(x - hm) - f(x)`` (float64 arrays)."""
        dp, dm = np.asarray(dp, np.float64), np.asarray(dm, np.float64)
        # A change followed exactly to the output (sparse steps and sums) does not cancel |f|.
        scale = np.maximum(np.abs(dp), np.abs(dm)) if exact else abs(f0)
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            return _Differences(
                num=(dp - dm) / (hp + hm),
                up=dp / hp,
                down=-dm / hm,
                noise=_ROUNDING * scale / (hp + hm),
            )

    def take(self, sel):
        return _Differences(self.num[sel], self.up[sel], self.down[sel], self.noise[sel])


def _close(a, n, rtol, atol, slack):
    """``|a - n| <= atol + rtol * max(|a|, |n|) + slack``; NaN is not close."""
    with np.errstate(invalid="ignore", over="ignore"):
        return np.abs(a - n) <= atol + rtol * np.maximum(np.abs(a), np.abs(n)) + slack


def _suspects(checks, level0: _Differences) -> np.ndarray:
    """Positions where an analytic value disagrees with the centred difference at step h."""
    bad = np.zeros(len(level0.num), bool)
    for a, (r, t) in checks:
        bad |= ~_close(a, level0.num, r, t, level0.noise)
    return np.flatnonzero(bad)


def _refine_coordinates(numeric, leaves64, points, suspects, eps, chunk_size):
    """Differences at steps h/2 and h/4 of the suspect coordinates: ``{j: (level1, level2)}``.

    Evaluated by the compiled program of the first pass: every call asks for as many points per
    leaf as that pass did (padded, or that pass's own points for a leaf with nothing to refine), so
    a failing check compiles nothing more.
    """
    want = {}
    for j, sel in suspects.items():
        if len(sel):
            idx = points[j][0][sel]
            xi = np.asarray(leaves64[j], np.float64).reshape(-1)[idx]
            (p1, m1), (p2, m2) = _steps(xi, eps / 2), _steps(xi, eps / 4)
            want[j] = (
                np.concatenate([idx, idx]),
                np.concatenate([p1, p2]),
                np.concatenate([m1, m2]),
            )
    if not want:
        return {}
    got = {j: ([], []) for j in want}
    calls = max(-(-len(want[j][0]) // len(points[j][0])) for j in want)
    for c in range(calls):
        request = {}
        for j, (idx, xp, xm) in points.items():
            n = len(idx)
            part = [a[c * n : (c + 1) * n] for a in want[j]] if j in want else []
            if not part or not len(part[0]):
                request[j] = (idx, xp, xm)
                continue
            pad = n - len(part[0])
            request[j] = tuple(np.concatenate([a, np.repeat(a[-1:], pad)]) for a in part)
        f0, values, exact = _perturbed_values(numeric, leaves64, request, chunk_size)
        for j in want:
            m = len(want[j][0]) - c * len(points[j][0])
            if m > 0:
                got[j][0].append((values[j][0][:m], values[j][1][:m]))
                got[j][1].append(exact[j])
    out = {}
    for j, (idx, xp, xm) in want.items():
        dp = np.concatenate([v[0] for v in got[j][0]])
        dm = np.concatenate([v[1] for v in got[j][0]])
        xi = np.asarray(leaves64[j], np.float64).reshape(-1)[idx]
        level = _Differences.of(dp, dm, xp - xi, xi - xm, f0, all(got[j][1]))
        half = len(idx) // 2
        out[j] = (level.take(slice(0, half)), level.take(slice(half, None)))
    return out


def _refine_directions(numeric, leaves64, j, v, h, chunk, sel, f0):
    levels = []
    for scale in (0.5, 0.25):
        fp, fm = _direction_values(numeric.fn, leaves64, j, v[sel], h * scale, chunk)
        step = np.full(len(sel), h * scale)
        levels.append(_Differences.of(fp - f0, fm - f0, step, step, f0, False))
    return tuple(levels)


def _judge(checks, level0: _Differences, sel, refined):
    """Which checked values fail, which sit at a kink, and the numeric value to report.

    ``checks`` pairs each analytic array (the caller's dtype, and f's float64 evaluation) with its
    ``(rtol, atol)``; ``sel`` are the suspects (disagreeing with the centred difference at step h)
    and ``refined`` their differences at steps h/2 and h/4.

    A value that agrees with the centred difference passes. A suspect is judged again from the
    smaller steps, and only what the numerics cannot resolve is excused:

    - a kink: the one-sided differences disagree by about as much at h/4 as at h (for a smooth f
      they differ by ``h |f''|``, which shrinks with the step). The analytic value passes if it lies
      between the one-sided derivatives (a one-sided derivative or a subgradient), else it fails;
    - otherwise the centred differences at h, h/2, h/4 are extrapolated (Richardson: the O(h^2)
      truncation cancels) and the analytic value is compared with that, allowing only the
      extrapolation's own estimated error. So a fast-growing smooth f (exp(20 x)) gets a numeric
      value accurate to far below rtol, and a 1e-4 error in it is not mistaken for truncation.
    """
    num = level0.num.copy()
    failed = np.zeros(len(num), bool)
    kink = np.zeros(len(num), bool)
    if not len(sel):
        return num, failed, kink
    l0, (l1, l2) = level0.take(sel), refined
    r_min = min(r for _, (r, _) in checks)
    t_min = min(t for _, (_, t) in checks)
    with np.errstate(invalid="ignore", over="ignore"):
        d0, d2 = l0.up - l0.down, l2.up - l2.down
        side = np.maximum(np.abs(l2.up), np.abs(l2.down))
        at_kink = (np.abs(d2) > 0.5 * np.abs(d0)) & (
            np.abs(d2) > t_min + r_min * side + 2 * l2.noise
        )
        lo, hi = np.minimum(l2.up, l2.down), np.maximum(l2.up, l2.down)
        # The one-sided differences' own truncation (h f''/2), estimated from the h/2 ones.
        width = np.maximum(np.abs(l2.up - l1.up), np.abs(l2.down - l1.down)) + 2 * l2.noise
        rich1, rich2 = (4 * l1.num - l0.num) / 3, (4 * l2.num - l1.num) / 3
        spread = np.abs(rich2 - rich1)
        consistent = _close(rich2, rich1, r_min, t_min, 2 * l2.noise)
        best = np.where(consistent, rich2, l2.num)
        slack = np.where(consistent, spread + 2 * l2.noise, np.abs(d2) + l2.noise)
        ok = np.ones(len(sel), bool)
        for a, (r, t) in checks:
            a = a[sel]
            tol = t + r * np.maximum(np.abs(lo), np.abs(hi)) + width
            between = (a >= lo - tol) & (a <= hi + tol)
            ok &= np.where(at_kink, between, _close(a, best, r, t, slack))
    num[sel] = np.where(at_kink, l2.num, best)
    kink[sel] = at_kink & ok
    failed[sel] = ~ok
    return num, failed, kink


def _leaf_report(
    name, shape, dtype, checks, tols, judged, index, num_worst, precision
) -> LeafReport:
    num, failed, kink = judged
    ana = checks[0]
    scale = np.maximum(np.abs(ana), np.abs(num))
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = np.where(scale == 0, 0.0, np.abs(ana - num) / np.where(scale == 0, 1.0, scale))
    if len(checks) > 1:
        scale64 = np.maximum(np.abs(checks[1]), np.abs(num))
        with np.errstate(invalid="ignore", divide="ignore"):
            rel64 = np.where(
                scale64 == 0, 0.0, np.abs(checks[1] - num) / np.where(scale64 == 0, 1.0, scale64)
            )
        # Ordering by the larger of the two, so that a coordinate failing only in float64 shows.
        rank = np.fmax(rel, rel64)
    else:
        rank = rel
    smooth_rel = np.where(kink, 0.0, np.where(np.isnan(rel), np.inf, rel))
    # Failures first, then by relative error.
    order = np.lexsort((-np.nan_to_num(rank, nan=np.inf), ~failed))[:num_worst]
    worst = tuple(
        Coordinate(
            index[k],
            float(ana[k]),
            float(num[k]),
            float(rel[k]),
            bool(failed[k]),
            bool(kink[k]),
            float(checks[1][k]) if len(checks) > 1 else None,
        )
        for k in order
    )
    (rtol, atol), tol64 = tols[0], (tols[1] if len(tols) > 1 else (None, None))
    return LeafReport(
        name=name,
        shape=tuple(shape),
        dtype=str(dtype),
        num_checked=len(ana),
        num_failed=int(failed.sum()),
        num_kinks=int(kink.sum()),
        max_relative_error=float(smooth_rel.max(initial=0.0)),
        worst=worst,
        rtol=rtol,
        atol=atol,
        precision=str(precision) if precision is not None else str(dtype),
        rtol64=tol64[0],
        atol64=tol64[1],
    )
