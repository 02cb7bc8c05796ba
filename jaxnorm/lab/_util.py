"""Small helpers shared by the lab's experiments: keys, verdicts, JSON-safe conversion, timing."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import time
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import numpy as np

AGREES = "agrees"
PARTLY = "partly agrees"
DISAGREES = "disagrees"
INCONCLUSIVE = "inconclusive"


# A comparison that came out equal: neither support for a "beats" claim nor a defeat of it.
TIE = "tie"


class Verdict(NamedTuple):
    """Whether an experiment's numbers agree with the lecture's claim.

    Attributes:
      status: ``"agrees"``, ``"partly agrees"``, ``"disagrees"`` or ``"inconclusive"`` (the
        experiment could not decide, e.g. a run diverged where a number was needed).
      claim: the lecture's claim, in one sentence.
      text: what the numbers say, with the numbers.
      checks: ``{name: True | False | "tie" | None}`` the individual tests the status is
        computed from (``"tie"``: a "beats" comparison that came out equal; None: not checked).
    """

    status: str
    claim: str
    text: str
    checks: dict


def beats(a: Any, b: Any, *, higher_is_better: bool = True, tol: float = 0.0) -> bool | str | None:
    """Whether ``a`` beats ``b``: True, False, :data:`TIE` (within ``tol``) or None (unknown).

    A tie is never a win: "A beats B" needs ``a`` better than ``b`` by more than ``tol``.

    Example:
      >>> from jaxnorm.lab._util import beats
      >>> beats(0.989, 0.989), beats(0.99, 0.98), beats(0.1, 0.2, higher_is_better=False)
      ('tie', True, True)
    """
    if a is None or b is None:
        return None
    a, b = float(a), float(b)
    if not (math.isfinite(a) and math.isfinite(b)):
        return None
    diff = (a - b) if higher_is_better else (b - a)
    if abs(diff) <= tol:
        return TIE
    return diff > 0


def check_mark(value: Any) -> str:
    """How a check value reads in a text: ``yes``, ``no``, ``tie`` or ``not checked``."""
    if value is None:
        return "not checked"
    if value == TIE:
        return TIE
    return "yes" if value else "no"


def verdict_from_checks(claim: str, checks: Mapping[str, Any], text: str) -> Verdict:
    """The verdict from the checks: a check that was not run never counts as a pass.

    A check that is None could not be computed (e.g. skipped in quick mode, or a run diverged
    where a number was needed). A check that is :data:`TIE` (a "beats" comparison that came
    out equal) is not support: it counts as a check that does not pass. The status is
    ``agrees`` when every check was computed and passes, ``partly agrees`` when some pass and
    the others fail, tie or were not computed, ``disagrees`` when none passes and at least one
    fails or ties, ``inconclusive`` when none could be computed.
    """
    values = [v if v is None or v == TIE else bool(v) for v in checks.values()]
    passed = sum(v is True for v in values)
    failed = sum(v is False or v == TIE for v in values)
    if passed == failed == 0:
        status = INCONCLUSIVE
    elif passed == len(values):
        status = AGREES
    elif passed == 0:
        status = DISAGREES
    else:
        status = PARTLY
    return Verdict(status, claim, text, dict(zip(checks, values, strict=True)))


def as_key(key_or_seed: Any) -> jax.Array:
    """A typed PRNG key from an int seed, or the key itself."""
    if isinstance(key_or_seed, bool):
        raise TypeError(f"expected a PRNG key or an int seed, got {key_or_seed!r}")
    if isinstance(key_or_seed, int | np.integer):
        return jax.random.key(int(key_or_seed))
    key = jax.numpy.asarray(key_or_seed)
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key
    if key.dtype == np.uint32 and key.shape == (2,):
        return jax.random.wrap_key_data(key)
    raise TypeError(
        f"expected a PRNG key (jax.random.key(0)) or an int seed, got an array of dtype "
        f"{key.dtype} and shape {key.shape}"
    )


def to_host(tree: Any) -> Any:
    """Every JAX array of ``tree`` as a NumPy array (results stay plain data)."""
    return jax.tree.map(lambda a: np.asarray(a) if isinstance(a, jax.Array) else a, tree)


def fmt_number(value: Any, decimals: int = 4) -> str:
    """A number for a table or a verdict: ``decimals`` fixed decimals in [1e-3, 1e5), else
    compact scientific notation (``3.31e+27``, ``2e-05``); ``nan``, ``inf`` and ``0`` as such.

    Example:
      >>> from jaxnorm.lab._util import fmt_number
      >>> fmt_number(2.302585), fmt_number(3306257754291601991293468672.0), fmt_number(float("nan"))
      ('2.3026', '3.31e+27', 'nan')
    """
    v = float(value)
    if not math.isfinite(v) or v == 0:
        return f"{v:g}"
    if 1e-3 <= abs(v) < 1e5:
        return f"{v:.{decimals}f}"
    return f"{v:.3g}"


# How the lab names initializers in its tables, figures, verdicts and docs. "Xavier" means two
# initializers (docs/initializers.md): the lecture's randn(fan_in, fan_out) / sqrt(fan_in) is
# LeCun's scaling, jaxnorm's lecun_normal, while Glorot & Bengio's rule, xavier_normal (PyTorch's
# and jax.nn's "Xavier"/"glorot"), averages the fans. Every label names the function it uses.
INIT_LABELS = {
    "lecun_normal": "1/sqrt(fan_in) (lecture's 'Xavier', = lecun_normal)",
    "xavier_normal": "Glorot (xavier_normal)",
    "he_normal": "He (he_normal)",
}


def init_label(name: str) -> str:
    """The lab's label of the jaxnorm initializer ``name`` (itself when it has none)."""
    return INIT_LABELS.get(name, name)


def fmt_floor(value: Any, decimals: int = 3) -> str:
    """``value`` truncated (not rounded) to ``decimals`` decimals; ``nan`` as such.

    For accuracies compared with a threshold: a shown value reaches the threshold exactly when
    the value does (0.8996 shows as ``0.899``, never as ``0.900`` under a 90% threshold).

    Example:
      >>> from jaxnorm.lab._util import fmt_floor
      >>> fmt_floor(0.8996), fmt_floor(0.9), fmt_floor(0.8996, 2), fmt_floor(1.0)
      ('0.899', '0.900', '0.89', '1.000')
    """
    v = float(value)
    if not math.isfinite(v):
        return f"{v:g}"
    scale = 10**decimals
    # The tiny nudge keeps 0.9 (0.899999... in binary) at 0.900.
    floored = math.floor(v * scale + 1e-9) / scale
    return f"{floored:.{decimals}f}"


def finite_or_none(value: Any) -> float | None:
    """``float(value)``, or None when it is NaN or infinite (JSON has no NaN)."""
    if value is None:
        return None
    v = float(value)
    return v if math.isfinite(v) else None


def to_jsonable(obj: Any) -> Any:
    """``obj`` as JSON-safe Python data: NamedTuples and dataclasses become dicts, arrays lists.

    NaN and infinities become None (``null``), since JSON has no literal for them.
    """
    if obj is None or isinstance(obj, bool | str):
        return obj
    if isinstance(obj, int | np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        return finite_or_none(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return {k: to_jsonable(v) for k, v in zip(obj._fields, obj, strict=True)}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, jax.Array | np.ndarray):
        a = np.asarray(obj)
        if a.dtype.kind in "biu":
            return a.tolist()
        if a.dtype.kind == "f":
            a64 = a.astype(np.float64)
            out = np.where(np.isfinite(a64), a64, np.nan).astype(object)
            out[~np.isfinite(a64)] = None
            return out.tolist()
        return [to_jsonable(v) for v in a.tolist()]
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    return str(obj)


class Stopwatch:
    """Wall-clock seconds since creation (``time.perf_counter``)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.start


# XLA's backend optimisations cost more compile time than a quick run saves (tiny shapes, few
# steps): quick mode switches them off, per compiled function, never globally.
_QUICK_COMPILER_OPTIONS = {
    "xla_backend_optimization_level": 0,
    "xla_llvm_disable_expensive_passes": True,
}


def jit(fun: Any, *, quick: bool, **kwargs: Any) -> Any:
    """``jax.jit(fun, **kwargs)``, compiled for compile speed in quick mode."""
    if quick:
        kwargs["compiler_options"] = _QUICK_COMPILER_OPTIONS
    return jax.jit(fun, **kwargs)


def compile_all(lowered: list) -> list:
    """Compile several lowered programs at once, in threads (XLA releases the GIL).

    Compile time dominates the lab's small programs; the cores compile in parallel.
    """
    if len(lowered) < 2:
        return [lo.compile() for lo in lowered]
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(len(lowered), 4)) as pool:
        return list(pool.map(lambda lo: lo.compile(), lowered))


def block(tree: Any) -> Any:
    """Wait for every array of ``tree`` (so a timing covers the computation, not its dispatch)."""
    return jax.block_until_ready(tree)
