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
dtypes; the numerical one evaluates ``f`` on float64 copies of every floating argument. Both
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
from typing import Any

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np

__all__ = [
    "Coordinate",
    "GradCheckReport",
    "LeafReport",
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
    np.dtype(np.float64): (1e-6, 1e-9),
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
        tols = sorted({(x.dtype, x.rtol, x.atol) for x in self.leaves})
        lines.append(
            "pass if |analytic - numeric| <= atol + rtol * max(|analytic|, |numeric|): "
            + "; ".join(f"{d} rtol={r:g} atol={a:g}" for d, r, a in tols)
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
    shape = getattr(aval, "shape", None)
    dtype = getattr(aval, "dtype", None)
    if shape is None or dtype is None:
        return repr(aval)
    return (tuple(str(d) for d in shape), str(dtype), bool(getattr(aval, "weak_type", False)))


_PLAIN = (type(None), bool, int, str, bytes, np.dtype, enum.Enum)


def _describe_value(v, memo):
    if isinstance(v, jax.extend.core.ClosedJaxpr):
        return ("closed", _describe_jaxpr(v.jaxpr, memo), tuple(_fingerprint(c) for c in v.consts))
    if isinstance(v, jax.extend.core.Jaxpr):
        return ("jaxpr", _describe_jaxpr(v, memo))
    if isinstance(v, float | complex):
        return (type(v).__name__, repr(v))  # repr tells -0.0 from 0.0 and keeps every digit
    if isinstance(v, _PLAIN):
        return (type(v).__name__, v)
    if isinstance(v, np.generic | np.ndarray | jax.Array):
        return ("array", _fingerprint(v))
    if isinstance(v, type):
        return ("type", v.__module__, v.__qualname__)
    if isinstance(v, tuple | list | frozenset | set):
        items = [_describe_value(x, memo) for x in v]
        if isinstance(v, frozenset | set):
            items = sorted(items, key=repr)
        return (type(v).__qualname__, tuple(items))
    if isinstance(v, dict):
        return ("dict", tuple(sorted(((repr(k), _describe_value(x, memo)) for k, x in v.items()))))
    module = type(v).__module__ or ""
    if module.split(".")[0] in ("jax", "jaxlib", "ml_dtypes"):
        # Shardings, meshes, layouts, avals: data whose repr says what they are. A callable among
        # them may wrap user code (a pure_callback's function) and is not described by its repr.
        if not callable(v) or isinstance(v, jax.sharding.Mesh | jax.sharding.AbstractMesh):
            return (module, type(v).__qualname__, repr(v))
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


def _analytic_grad(prob: _Problem, diff_leaves) -> list:
    """``jax.grad`` of f at the caller's arrays, compiled once per function.

    f is traced afresh on every call and the compiled gradient is looked up by a full description
    of the jaxpr it traces to (:func:`_program_key`), with its top-level array constants passed as
    arguments: checking the same model again reuses the compilation, while a closure whose captured
    values changed, at any depth (a Python scalar, an array, an array inside an inner ``jax.jit``
    or a custom rule), is differentiated as it is now. Keying by f itself would return a stale
    gradient after such a change, and fail for unhashable callables.
    """
    closed = jax.make_jaxpr(jax.grad(prob.call))(diff_leaves)
    run = _cached(
        _GRADS, _program_key(closed), lambda: jax.jit(partial(jax.core.eval_jaxpr, closed.jaxpr))
    )
    return run(closed.consts, *jax.tree_util.tree_leaves(diff_leaves))


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
        eqns.append((e.primitive, ins, keys, e.params))
        env.update(zip(e.outvars, keys, strict=True))
    return [ref(a) for a in jaxpr.outvars]


def _bind(prim, params, vals):
    # As jax's own eval_jaxpr does (get_bind_params turns jaxpr params into callables).
    out = prim.bind(*vals, **prim.get_bind_params(params))
    return out if prim.multiple_results else [out]


def _flat_index(multi, shape):
    if not shape:
        return jnp.zeros((), jnp.int32)
    return jnp.ravel_multi_index(tuple(multi), shape, mode="clip")


def _sparse_rule(prim, params, ins, vals, base_outs, k, idx, v):
    """Output of one equation whose input ``k`` equals its base value except element ``idx = v``.

    Returns ``("sparse", out_idx, out_v)``, ``("dense", value)`` or ``None`` (no cheap rule).
    """
    name = prim.name
    x = vals[k]
    shape = x.shape
    out = base_outs[0]
    if name in _ELEMENTWISE and len(base_outs) == 1 and out.shape == shape:
        if all(np.shape(a) in (shape, ()) for a in vals):
            scalars = [
                v if i == k else (jnp.asarray(a).reshape(-1)[idx] if np.shape(a) == shape else a)
                for i, a in enumerate(vals)
            ]
            return ("sparse", idx, _bind(prim, params, scalars)[0])
        return None
    if not shape:
        return None
    if name in ("reshape", "squeeze", "expand_dims") and params.get("dimensions") is None:
        return ("sparse", idx, v)
    if name == "transpose":
        multi = jnp.unravel_index(idx, shape)
        return ("sparse", _flat_index([multi[p] for p in params["permutation"]], out.shape), v)
    if name == "reduce_sum":
        multi = jnp.unravel_index(idx, shape)
        kept = [m for d, m in enumerate(multi) if d not in params["axes"]]
        oi = _flat_index(kept, out.shape)
        # The sum with one term changed: exact up to rounding of the order of the sum's own.
        return ("sparse", oi, out.reshape(-1)[oi] + (v - x.reshape(-1)[idx]).astype(out.dtype))
    if name == "dot_general":
        (lc, rc), (lb, rb) = params["dimension_numbers"]
        other = jnp.asarray(vals[1 - k])
        sc, sb, oc, ob = (lc, lb, rc, rb) if k == 0 else (rc, rb, lc, lb)
        multi = jnp.unravel_index(idx, shape)
        where = [slice(None)] * other.ndim
        for s_dim, o_dim in (*zip(sb, ob, strict=True), *zip(sc, oc, strict=True)):
            where[o_dim] = multi[s_dim]
        row = other[tuple(where)]  # the other operand's free dims, in order
        free = [multi[d] for d in range(len(shape)) if d not in (*sc, *sb)]
        rest = [slice(None)] * (row.ndim)
        place = [multi[d] for d in sb] + (free + rest if k == 0 else rest + free)
        # In the product's dtype: the operands may differ (a float32 constant times float64).
        dv = (v - x.reshape(-1)[idx]).astype(out.dtype)
        delta = row.astype(out.dtype) * jnp.broadcast_to(dv, row.shape)
        return ("dense", out.at[tuple(place)].add(delta))
    return None


# Compiled sparse evaluators, by the description of the jaxpr (_program_key; its top-level constants
# are passed as arguments): re-checking the same model reuses the executable, as jax.jit would.
_EVALUATORS: dict = {}


def _sparse_evaluator(closed, chunks):
    """A jitted ``run(leaves, consts, idx, values)`` for the (leaf, chunk size) pairs ``chunks``."""
    key = _program_key(closed)
    return _cached(
        _EVALUATORS,
        None if key is None else (key, chunks),
        lambda: _build_evaluator(closed, chunks),
    )


def _build_evaluator(closed, chunks):
    eqns = []
    counter = iter(range(1, 1 << 62))
    const_keys = [next(counter) for _ in closed.jaxpr.constvars]
    in_keys = [next(counter) for _ in closed.jaxpr.invars]
    outs = _inline(closed.jaxpr, in_keys, const_keys, eqns, counter)
    read = lambda env, r: r.val if isinstance(r, _Const) else env[r]

    def run(flat_leaves, consts, idx, values):
        base = dict(zip(in_keys, flat_leaves, strict=True))
        base.update(zip(const_keys, consts, strict=True))
        for prim, ins, keys, params in eqns:
            base.update(zip(keys, _bind(prim, params, [read(base, r) for r in ins]), strict=True))

        def perturbed(leaf_key, i, v):
            pert = {leaf_key: ("sparse", i, v)}

            def full(r):
                if isinstance(r, _Const) or r not in pert:
                    return read(base, r)
                p = pert[r]
                if p[0] == "dense":
                    return p[1]
                b = base[r]
                return b.reshape(-1).at[p[1]].set(p[2].astype(b.dtype)).reshape(b.shape)

            for prim, ins, keys, params in eqns:
                hit = [n for n, r in enumerate(ins) if not isinstance(r, _Const) and r in pert]
                if not hit:
                    continue
                rule = None
                if len(hit) == 1 and pert[ins[hit[0]]][0] == "sparse" and len(keys) == 1:
                    _, pi, pv = pert[ins[hit[0]]]
                    vals = [read(base, r) for r in ins]
                    rule = _sparse_rule(prim, params, ins, vals, [base[keys[0]]], hit[0], pi, pv)
                if rule is not None:
                    pert[keys[0]] = rule
                else:
                    outs_ = _bind(prim, params, [full(r) for r in ins])
                    pert.update((k, ("dense", o)) for k, o in zip(keys, outs_, strict=True))
            return full(outs[0])

        # The unperturbed intermediates above are loop invariants of these scans: computed once.
        results = []
        for (j, c), i, v in zip(chunks, idx, values, strict=True):
            one = lambda a, k=in_keys[j]: perturbed(k, *a)
            # One chunk needs no loop around it (a smaller program to compile).
            mapped = jax.vmap(one) if len(i) == c else partial(jax.lax.map, one, batch_size=c)
            results.append(mapped((i, v)))
        return read(base, outs[0]), results

    return jax.jit(run)


def _sparse_values(fn, leaves64, requests):
    """f with coordinate ``idx[k]`` of leaf ``j`` set to ``values[k]``, sharing unchanged work.

    ``requests`` holds ``(j, idx, values, chunk)`` per leaf. ``f`` is traced once; every
    intermediate the change does not reach is computed once, a single changed element is followed
    exactly through elementwise operations, reshapes, transposes, sums and matrix products (an
    outer-product update of the product), and anything else is evaluated on the full perturbed
    value. The perturbations are vectorised with ``vmap`` in chunks, all leaves in one program.
    Returns ``(f at the unperturbed point, [f at each perturbed point, per request])``.
    """
    closed = jax.make_jaxpr(fn)(leaves64)
    chunks, idxs, vals = [], [], []
    for j, idx, values, chunk in requests:
        # Padding repeats the last perturbation so that every chunk is full; dropped below.
        pad = (-len(idx)) % chunk
        idxs.append(jnp.asarray(np.concatenate([idx, np.repeat(idx[-1:], pad)])))
        vals.append(jnp.asarray(np.concatenate([values, np.repeat(values[-1:], pad)])))
        chunks.append((j, chunk))
    run = _sparse_evaluator(closed, tuple(chunks))
    f0, outs = run(list(leaves64), list(closed.consts), idxs, vals)
    return float(f0), [
        np.asarray(o, np.float64)[: len(r[1])] for o, r in zip(outs, requests, strict=True)
    ]


def _perturbed_values(fn, leaves64, points, chunk_size):
    """``f`` at coordinate ``idx[k]`` of leaf ``j`` set to ``xp[k]``, and to ``xm[k]`` (float64).

    ``points`` maps leaf position ``j`` to ``(idx, xp, xm)``; returns ``f(x)`` and
    ``{j: (f(xp), f(xm))}``.
    """
    requests = []
    for j, (idx, xp, xm) in points.items():
        count = len(idx)
        chunk = _auto_chunk(leaves64[j].size, 2 * count, chunk_size)
        # A power of two at least 2 * count: repeated checks of one model reuse the evaluator.
        chunk = min(1 << (2 * count - 1).bit_length(), chunk)
        requests.append((j, np.concatenate([idx, idx]), np.concatenate([xp, xm]), chunk))
    try:
        f0, outs = _sparse_values(fn, leaves64, requests)
    except Exception:  # an operation the sparse evaluator cannot follow: evaluate f densely
        return float(jax.jit(fn)(leaves64)), {
            j: _coordinate_values(
                fn, leaves64, j, idx, xp, xm, _auto_chunk(leaves64[j].size, len(idx), chunk_size)
            )
            for j, (idx, xp, xm) in points.items()
        }
    half = {r[0]: (o[: len(o) // 2], o[len(o) // 2 :]) for r, o in zip(requests, outs, strict=True)}
    return f0, half


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
    if not isinstance(eps, float | int | np.floating) or not 0 < eps < 1:
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
    ``f`` at ``x +- h e_i`` up to float64 rounding. The compiled program is reused when the same
    model is checked again.

    ``f`` must be traceable by JAX and compute in the dtypes of its inputs (an ``astype(float32)``
    inside ``f`` limits the accuracy to float32).

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
        fn = lambda d: prob.call(d, args64, leaves64_all)
        points = {}
        for j, leaf in enumerate(leaves64):
            x = np.asarray(leaf, np.float64).reshape(-1)
            points[j] = (np.arange(x.size), *_steps(x, eps))
        _, values = _perturbed_values(fn, leaves64, points, chunk_size)
        grads = []
        for j, leaf in enumerate(leaves64):
            (_, xp, xm), (fp, fm) = points[j], values[j]
            grads.append(((fp - fm) / (xp - xm)).reshape(leaf.shape))
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
    data = jax.random.key_data(key) if _is_key(key) else key
    return np.random.default_rng(np.asarray(data, np.uint32).ravel().tolist())


def _default_tolerance(dtype, rtol, atol):
    d_rtol, d_atol = _DEFAULT_TOLERANCES.get(np.dtype(dtype), _DEFAULT_TOLERANCES[np.dtype("f4")])
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

        |a - n| <= atol + rtol * max(|a|, |n|)

    with ``a`` the analytic value (``jax.grad`` of ``f`` on the caller's arrays, in their dtypes)
    and ``n`` the numeric one (:func:`numerical_grad`'s float64 centred difference). Defaults by
    the leaf's dtype: float64 ``rtol=1e-6, atol=1e-9``; float32 ``rtol=1e-3, atol=1e-5`` (a correct
    float32 model is ~1e-6 off, a gradient 1% wrong fails); float16 ``1e-2, 1e-3``; bfloat16
    ``5e-2, 5e-3``. ``atol`` is absolute: for losses far from unit scale, set it.

    Kinks: a coordinate that fails is reported as a kink (a ReLU crossing zero inside the step,
    say), not as a failure, when its one-sided differences ``(f(x+h) - f(x)) / h`` and
    ``(f(x) - f(x-h)) / h`` disagree by more than the same tolerance *and* the analytic value lies
    between them (within the tolerance), as a one-sided derivative at a kink does. For a smooth
    ``f`` the two differ by only ``h |f''|``, so a wrong gradient passes as a kink only if it is
    wrong by less than that.

    ``f`` is evaluated in float64 for the differences; if it casts its result to a lower
    precision (``loss.astype(jnp.float32)``), the differences lose that precision and a
    ``RuntimeWarning`` says so.

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
        if v is not None and (not isinstance(v, int | np.integer) or isinstance(v, bool) or v < 1):
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
        _check_output(prob, diff_leaves, prob.args, prob.leaves)
        analytic = [_to_f64(a).reshape(-1) for a in _analytic_grad(prob, diff_leaves)]

    # Standard promotion: float32 constants that f closes over meet the float64 arguments.
    with jax.enable_x64(True), jax.numpy_dtype_promotion("standard"):
        args64 = _upcast(prob.args)
        leaves64_all = jax.tree_util.tree_leaves(_upcast(tuple(prob.leaves)))
        leaves64 = [leaves64_all[p] for p in prob.diff]
        fn = lambda d: prob.call(d, args64, leaves64_all)
        out_dtype = jax.eval_shape(fn, leaves64).dtype
        if out_dtype != jnp.float64:
            warnings.warn(
                f"check_grad: f returns {out_dtype} even for float64 arguments (a cast such as "
                "loss.astype(jnp.float32) at its end?), so the finite differences are only as "
                f"precise as {out_dtype}: expect relative errors far above rtol on correct "
                "gradients. Remove the cast for the check, or loosen rtol/atol",
                RuntimeWarning,
                stacklevel=2,
            )
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
            f0, values = _perturbed_values(fn, leaves64, points, chunk_size)
        else:
            f0 = float(jax.jit(fn)(leaves64))

        reports = []
        for j, leaf in enumerate(leaves64):
            x = xs[j]
            if mode == "directions":
                v = rng.standard_normal((counts[j], x.size))
                v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-300)
                h = eps * max(1.0, float(np.max(np.abs(x), initial=0.0)))
                chunk = _auto_chunk(x.size, counts[j], chunk_size)
                fp, fm = _direction_values(fn, leaves64, j, v, h, chunk)
                num = (fp - fm) / (2 * h)
                up, down = (fp - f0) / h, (f0 - fm) / h
                ana = v @ analytic[j]
                index = [(k,) for k in range(counts[j])]
            else:
                (idx, xp, xm), (fp, fm) = points[j], values[j]
                xi = x[idx]
                num = (fp - fm) / (xp - xm)
                up, down = (fp - f0) / (xp - xi), (f0 - fm) / (xi - xm)
                ana = analytic[j][idx]
                index = [tuple(int(i) for i in np.unravel_index(k, leaf.shape)) for k in idx]
            dtype = np.dtype(jnp.result_type(prob.leaves[prob.diff[j]]))
            r, a = _default_tolerance(dtype, rtol, atol)
            reports.append(
                _leaf_report(
                    prob.names[j], leaf.shape, dtype, ana, num, up, down, index, r, a, num_worst
                )
            )
    return GradCheckReport(
        passed=all(x.passed for x in reports),
        leaves=tuple(reports),
        mode=mode,
        eps=eps,
        skipped=tuple(prob.skipped),
    )


def _leaf_report(
    name, shape, dtype, ana, num, up, down, index, rtol, atol, num_worst
) -> LeafReport:
    err = np.abs(ana - num)
    scale = np.maximum(np.abs(ana), np.abs(num))
    rel = np.where(scale == 0, 0.0, err / np.where(scale == 0, 1.0, scale))
    bad = ~(err <= atol + rtol * scale)  # NaN counts as bad
    # A kink: the one-sided differences disagree (a derivative jumps inside the step), and the
    # analytic value lies between them, as a one-sided derivative at the kink does. For a smooth
    # f the two differ by only h |f''|, so a wrong gradient is excused only if its error is below
    # that (the difference scheme's own truncation), not whenever f curves.
    side_tol = atol + rtol * np.maximum(np.abs(up), np.abs(down))
    between = (ana >= np.minimum(up, down) - side_tol) & (ana <= np.maximum(up, down) + side_tol)
    kink = bad & (np.abs(up - down) > side_tol) & between
    failed = bad & ~kink
    smooth_rel = np.where(kink, 0.0, np.where(np.isnan(rel), np.inf, rel))
    # Failures first, then by relative error.
    order = np.lexsort((-np.nan_to_num(rel, nan=np.inf), ~failed))[:num_worst]
    worst = tuple(
        Coordinate(
            index[k], float(ana[k]), float(num[k]), float(rel[k]), bool(failed[k]), bool(kink[k])
        )
        for k in order
    )
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
    )
