"""Random hyperparameter search with every trial in one vmapped (and sharded) program."""

from __future__ import annotations

import ast
import csv
import dataclasses
import functools
import json
import math
import os
import re
import warnings
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxnorm.training import _parallel
from jaxnorm.training._loop import DivergenceWarning, History, _check_key


class SearchWarning(UserWarning):
    """Base class of the warnings a hyperparameter search gives."""


class BorderWarning(SearchWarning):
    """The best value of a hyperparameter lies near the border of its search range."""


class LogUniform(NamedTuple):
    """``exp(U(log lo, log hi))``: every decade of [lo, hi] is equally likely."""

    lo: float
    hi: float


class Uniform(NamedTuple):
    """``U(lo, hi)``."""

    lo: float
    hi: float


class Choice(NamedTuple):
    """One of ``options``, each equally likely.

    ``static``: the options reach ``train_fn`` as the Python values themselves, one compiled
    program per value (always so for options that are not numbers).
    """

    options: tuple
    static: bool = False


def _real(v, name, who):
    """A bound as a float: a Python or NumPy real, or a concrete 0-d NumPy/JAX array."""
    if isinstance(v, jax.core.Tracer):
        raise TypeError(
            f"{who}: {name} must be a concrete number, got a traced value {v!r}; build the "
            "search space outside jit/vmap"
        )
    if isinstance(v, np.ndarray | jax.Array) and v.shape == () and v.dtype != bool:
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, int | float | np.integer | np.floating):
        raise TypeError(f"{who}: {name} must be a real number, got {v!r}")
    if not math.isfinite(v):
        raise ValueError(f"{who}: {name} must be finite, got {v}")
    return float(v)


def _check_bounds(lo, hi, who):
    lo, hi = _real(lo, "lo", who), _real(hi, "hi", who)
    if lo >= hi:
        raise ValueError(f"{who}: needs lo < hi, got lo={lo}, hi={hi}")
    return lo, hi


def log_uniform(lo: float, hi: float) -> LogUniform:
    r"""A log-uniform range, for scale parameters such as the learning rate or weight decay.

    .. math:: \log v \sim U(\log lo, \log hi)

    The lecture's advice: sample learning rates and regularisation strengths in log space
    (``10 ** uniform(-6, -1)``), since their effect is multiplicative.

    Args:
      lo: the lower bound, > 0 (a Python, NumPy or concrete 0-d JAX number).
      hi: the upper bound, > lo.

    Raises:
      TypeError: if a bound is not a real number.
      ValueError: if lo <= 0 or lo >= hi (or a bound is not finite).

    References:
      Bergstra & Bengio 2012, "Random search for hyper-parameter optimization".

    Example:
      >>> from jaxnorm import training
      >>> training.log_uniform(1e-4, 1e-1)
      LogUniform(lo=0.0001, hi=0.1)
    """
    lo, hi = _check_bounds(lo, hi, "log_uniform")
    if lo <= 0:
        raise ValueError(
            f"log_uniform: lo must be > 0 (the range is sampled in log space), got lo={lo}; "
            "use uniform(lo, hi) for ranges that include 0 or negative values"
        )
    return LogUniform(lo, hi)


def uniform(lo: float, hi: float) -> Uniform:
    """A uniform range, for parameters such as dropout rates or momentum.

    Raises:
      TypeError: if a bound is not a real number.
      ValueError: if lo >= hi (or a bound is not finite).

    Example:
      >>> from jaxnorm import training
      >>> training.uniform(0.0, 0.5)
      Uniform(lo=0.0, hi=0.5)
    """
    return Uniform(*_check_bounds(lo, hi, "uniform"))


def choice(*options: Any, static: bool = False) -> Choice:
    """A categorical hyperparameter, one of ``options`` with equal probability.

    Numeric options (all ints, or ints and floats) reach ``train_fn`` as traced scalars, so every
    trial shares one vmapped program: right for values used in arithmetic (momentum, a weight
    decay). Values that fix a shape or a Python branch, such as layer widths or ``fit``'s
    ``batch_size``, must be Python values: mark them ``static=True``. Static options, and
    options that are not numbers (strings such as activation names, bools, None, functions),
    reach ``train_fn`` as the Python value itself; the trials are grouped by their static values
    and each group runs as its own vmapped program (one compile per combination of values).

    Whatever the kind, ``Trial.params`` and ``best_params`` hold the option object itself (a
    float option 0.1 is reported as 0.1, not as its float32 rounding).

    A single list or tuple argument is taken as the options: ``choice([16, 32])`` is
    ``choice(16, 32)``. (A choice with one option is no choice; for options that are tuples,
    give two or more: ``choice((1, 2), (3, 4))``.)

    Args:
      *options: the values to choose from.
      static: pass numeric options to ``train_fn`` as Python values (one program per value)
        instead of traced scalars.

    Raises:
      ValueError: if no option is given.
      TypeError: if static is not a bool.

    Example:
      >>> from jaxnorm import training
      >>> training.choice("relu", "tanh")
      Choice(options=('relu', 'tanh'), static=True)
      >>> training.choice([16, 32, 64], static=True)
      Choice(options=(16, 32, 64), static=True)
    """
    if len(options) == 1 and isinstance(options[0], list | tuple):
        options = tuple(options[0])
    return _make_choice(options, static, "choice")


def _make_choice(options, static, who):
    if not options:
        raise ValueError(
            f"{who} needs at least one option, e.g. choice(0.9, 0.99), choice('relu', 'tanh') "
            "or, for widths and batch sizes, choice(32, 64, 128, static=True)"
        )
    if not isinstance(static, bool | np.bool_):
        raise TypeError(f"{who}: static must be True or False, got {static!r}")
    dist = Choice(tuple(options), bool(static))
    # Options that are not numbers are always static; the flag is settled here, once.
    return dist._replace(static=dist.static or not _is_numeric(dist))


def _is_numeric(dist: Choice) -> bool:
    return all(
        isinstance(o, int | float | np.integer | np.floating) and not isinstance(o, bool)
        for o in dist.options
    )


def _check_dist(dist, name, who):
    """The distribution, validated as its factory validates (the classes can be built directly)."""
    where = f"{who}: space[{name!r}]"
    try:
        if isinstance(dist, LogUniform):
            return log_uniform(*dist)
        if isinstance(dist, Uniform):
            return uniform(*dist)
        if not isinstance(dist.options, tuple | list):
            raise TypeError(f"Choice: options must be a tuple, got {dist.options!r}")
        return _make_choice(dist.options, dist.static, "Choice")
    except (TypeError, ValueError) as e:
        raise type(e)(f"{where} = {dist!r}: {e}") from None


def _check_space(space, who):
    if not isinstance(space, Mapping):
        raise TypeError(
            f"{who}: space must be a dict of name -> log_uniform/uniform/choice, got "
            f"{type(space).__name__}"
        )
    if not space:
        raise ValueError(
            f"{who}: the search space is empty; give at least one hyperparameter, e.g. "
            "{'learning_rate': log_uniform(1e-4, 1e-1)}"
        )
    checked = {}
    for name, dist in space.items():
        if not isinstance(name, str):
            raise TypeError(f"{who}: hyperparameter names must be str, got {name!r}")
        if not isinstance(dist, LogUniform | Uniform | Choice):
            raise TypeError(
                f"{who}: space[{name!r}] must be log_uniform(...), uniform(...) or choice(...), "
                f"got {dist!r}"
            )
        checked[name] = _check_dist(dist, name, who)
    return checked


def _check_border(border, who):
    if isinstance(border, bool) or not isinstance(border, int | float | np.integer | np.floating):
        raise TypeError(f"{who}: border must be a number in [0, 0.5), got {border!r}")
    if not 0.0 <= border < 0.5:
        raise ValueError(
            f"{who}: border must be in [0, 0.5) (a fraction of the range at each end; 0 switches "
            f"the check off), got {border}"
        )
    return float(border)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _draws(key, num_trials: int, streams: tuple, counts: tuple):
    """The random draws of a search, in one compiled program (not one per eager op).

    Returns the trial keys (``split(split(key)[1], num_trials)``) and, per stream, uniforms in
    [0, 1) (``count`` None) or integers in [0, count), drawn from ``fold_in(split(key)[0],
    stream)``.
    """
    sample_key, trial_key = jax.random.split(key)
    draws = []
    for stream, count in zip(streams, counts, strict=True):
        k = jax.random.fold_in(sample_key, stream)
        if count is None:
            draws.append(jax.random.uniform(k, (num_trials,), jnp.float32))
        else:
            draws.append(jax.random.randint(k, (num_trials,), 0, count))
    return jax.random.split(trial_key, num_trials), draws


def _sample(space, num_trials, key):
    """``(trial keys, draws per name)``: float32 values for ranges, option indices for choices."""
    # One stream per name (fixed by the name's CRC), so adding a hyperparameter leaves the
    # samples of the others unchanged.
    streams = tuple(zlib.crc32(name.encode()) & 0x7FFFFFFF for name in space)
    counts = tuple(len(d.options) if isinstance(d, Choice) else None for d in space.values())
    keys, draws = _draws(key, num_trials, streams, counts)
    out = {}
    for (name, dist), draw in zip(space.items(), draws, strict=True):
        if isinstance(dist, Choice):
            out[name] = np.asarray(draw)
            continue
        u = np.asarray(draw, np.float64)
        if isinstance(dist, LogUniform):
            v = np.exp(np.log(dist.lo) + u * (np.log(dist.hi) - np.log(dist.lo)))
        else:
            v = dist.lo + u * (dist.hi - dist.lo)
        out[name] = np.clip(v, dist.lo, dist.hi).astype(np.float32)
    return keys, out


def _traced_values(dist, draw):
    """What train_fn receives for a traced hyperparameter: float32, or int32 for int options."""
    if not isinstance(dist, Choice):
        return draw
    is_int = all(isinstance(o, int | np.integer) for o in dist.options)
    return np.asarray(dist.options, np.int32 if is_int else np.float32)[draw]


@dataclasses.dataclass(frozen=True)
class Trial:
    """One trial of a search.

    Attributes:
      index: the trial's number (its position in the sampling order).
      params: the hyperparameters it trained with (for a ``choice``, the option object itself).
      metrics: every scalar ``train_fn`` returned, as floats.
      status: ``"ok"``, or ``"diverged"`` when the History's loss or any returned metric was
        NaN/infinite.
      diverged_step: the first step at which the History returned by train_fn met a NaN/Inf
        (in the loss, the gradients, the parameters, ...: ``History.nan_step``), else None.
      round: the coarse-to-fine round (0 for a plain random search).
    """

    index: int
    params: dict
    metrics: dict
    status: str
    diverged_step: int | None = None
    round: int = 0


@dataclasses.dataclass
class SearchResult:
    """Every trial of a search, the best one, and the border check.

    Attributes:
      trials: every :class:`Trial`, in sampling order.
      metric: the metric the search ranks by.
      mode: ``"max"`` or ``"min"``.
      space: the search space (the first round's for :func:`coarse_to_fine`).
      at_border: ``{name: "low" | "high"}`` for each range whose best value lies within ``border``
        (a fraction of the range, in log space for log_uniform) of an end.
      spaces: the space of each round (coarse_to_fine), else ``[space]``.
    """

    trials: list
    metric: str
    mode: str
    space: dict | None = None
    at_border: dict = dataclasses.field(default_factory=dict)
    spaces: list = dataclasses.field(default_factory=list)

    def _key(self, t: Trial) -> float:
        v = t.metrics.get(self.metric, math.nan)
        return -v if self.mode == "max" else v

    def ranked(self) -> list:
        """Trials that did not diverge, best first, then the diverged ones."""
        ok = sorted((t for t in self.trials if t.status == "ok"), key=self._key)
        return ok + [t for t in self.trials if t.status != "ok"]

    @property
    def best(self) -> Trial | None:
        """The best trial that did not diverge (None when every trial diverged)."""
        ok = [t for t in self.trials if t.status == "ok"]
        return min(ok, key=self._key) if ok else None

    @property
    def best_params(self) -> dict | None:
        """The best configuration."""
        return None if self.best is None else dict(self.best.params)

    @property
    def diverged(self) -> list:
        """The trials that diverged."""
        return [t for t in self.trials if t.status != "ok"]

    def _columns(self):
        params = list(dict.fromkeys(k for t in self.trials for k in t.params))
        # The ranked metric first: to_csv marks it, with the mode, as the ranked column.
        metrics = list(dict.fromkeys([self.metric, *(k for t in self.trials for k in t.metrics)]))
        return params, metrics

    def table(self, *, limit: int | None = None) -> str:
        """A plain-text table of the trials, best first; diverged trials last with their step."""
        params, metrics = self._columns()
        header = ["trial", "round", "status", *params, *metrics]
        rows = []
        for t in self.ranked()[:limit]:
            status = t.status
            if t.status != "ok" and t.diverged_step is not None:
                status = f"diverged@{t.diverged_step}"
            rows.append(
                [str(t.index), str(t.round), status]
                + [_fmt(t.params.get(p)) for p in params]
                + [_fmt(t.metrics.get(m)) for m in metrics]
            )
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))]
        lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
        best = self.best
        summary = (
            f"best {self.metric} ({self.mode}): "
            + ("none (every trial diverged)" if best is None else _fmt(best.metrics[self.metric]))
            + f"; {len(self.diverged)} of {len(self.trials)} trials diverged"
        )
        if self.at_border:
            summary += "; best value near the border of its range: " + ", ".join(
                f"{k} ({v})" for k, v in self.at_border.items()
            )
        return "\n".join([summary, *lines])

    def __str__(self) -> str:
        return self.table()

    def to_csv(self, path: str | os.PathLike) -> None:
        """Write every trial to a CSV file that :meth:`from_csv` reads back exactly.

        Columns: ``trial, round, status, diverged_step``, then one ``param:<name>`` column per
        hyperparameter, then one per metric, the ranked one first as ``metric(max):<name>`` (or
        ``min``), the others as ``metric:<name>``. A cell holds the value's ``repr``, a Python
        literal (``0.1``, ``'relu'``, ``True``, ``None``, ``(16, 32)``, ``nan``), which reads
        back as the same type and value, floats bit for bit; an empty cell means the trial has no
        such entry. Values whose ``repr`` does not read back exactly (a function, an object) are
        refused rather than written as text: use :meth:`to_json` for the space too, and give
        such options names (``choice("relu", "tanh")``).

        Raises:
          TypeError: a hyperparameter value that a CSV cell cannot hold exactly.
        """
        params, metrics = self._columns()
        header = [*_FIXED_COLUMNS, *(f"param:{p}" for p in params)]
        header += [f"metric({self.mode}):{metrics[0]}", *(f"metric:{m}" for m in metrics[1:])]
        rows = []
        for t in self.trials:
            row = [t.index, t.round, t.status, "" if t.diverged_step is None else t.diverged_step]
            for kind, names, values in (
                ("param", params, t.params),
                ("metric", metrics, t.metrics),
            ):
                row += [_cell(values[n], t.index, kind, n) if n in values else "" for n in names]
            rows.append(row)
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(rows)

    @classmethod
    def from_csv(
        cls, path: str | os.PathLike, *, metric: str | None = None, mode: str | None = None
    ) -> SearchResult:
        """Read the trials written by :meth:`to_csv`, exactly as they were.

        The header says which columns are hyperparameters and which are metrics, and which
        metric the search ranked by and how (see :meth:`to_csv`); each cell reads back as the
        value written (type included: ``True`` stays a bool, ``None`` None, ``(16, 32)`` a
        tuple), so ``best_params`` is what it was. The space is not in the CSV (``space`` is
        None); :meth:`to_json` keeps it.

        Args:
          path: the file.
          metric: rank by this metric column (default: the one the search ranked by).
          mode: ``"max"`` or ``"min"`` (default: the search's, when ranking by its metric; needed
            for another metric).

        Raises:
          ValueError: ``metric`` is not one of the file's metric columns (the message names the
            file and its columns); another metric without ``mode``; the file was not written by
            :meth:`to_csv` (no column roles) or has a malformed row or cell.
        """
        where = f"from_csv: {os.fsdecode(path)!r}"
        with open(path, newline="") as f:
            try:
                lines = list(csv.reader(f))
            except csv.Error as e:
                raise ValueError(f"{where} is not a readable CSV file ({e})") from None
        if not lines:
            raise ValueError(f"{where} is empty; expected the header that to_csv writes")
        header, lines = lines[0], lines[1:]
        roles = _column_roles(header, where)
        params = [n for role, n, _ in roles if role == "param"]
        found = [n for role, n, _ in roles if role == "metric"]
        ranked = next((n, m) for role, n, m in roles if role == "metric" and m is not None)
        if metric is None:
            metric = ranked[0]
        if metric not in found:
            raise ValueError(
                f"{where} has no metric column {metric!r}; its columns are: hyperparameters "
                f"{params}, metrics {found} (the search ranked by {ranked[0]!r})"
            )
        if mode is None:
            if metric != ranked[0]:
                raise ValueError(
                    f"{where} was ranked by {ranked[0]!r} ({ranked[1]}); to rank by {metric!r}, "
                    "say whether it is maximised or minimised: mode='max' or mode='min'"
                )
            mode = ranked[1]
        mode = _check_mode(mode, "from_csv")
        trials = []
        for line_no, r in enumerate(lines, start=2):
            if len(r) != len(header):
                raise ValueError(
                    f"{where}, line {line_no}: {len(r)} cells where the header has {len(header)}"
                )
            fixed = _fixed_cells(r[:4], f"{where}, line {line_no}")
            values = {"param": {}, "metric": {}}
            for (role, name, _), text in zip(roles, r[4:], strict=True):
                if text != "":
                    values[role][name] = _read_cell(text, role, f"{where}, line {line_no}", name)
            trials.append(Trial(**fixed, params=values["param"], metrics=values["metric"]))
        return cls(trials=trials, metric=metric, mode=mode)

    def to_json(self, path: str | os.PathLike) -> None:
        """Write the whole result to a JSON file that :meth:`from_json` reads back exactly.

        The trials (hyperparameters and metrics with their types: a tuple stays a tuple, a
        NumPy scalar keeps its dtype, non-finite floats are tagged), the metric and mode, the
        space of every round and the border check. Finite floats are JSON numbers, written as
        Python's shortest round-tripping ``repr``, so they read back bit for bit.

        Raises:
          TypeError: a value JSON cannot hold exactly (a function, an object): give such
            options names (``choice("relu", "tanh")``).
        """
        doc = {
            "format": f"{_JSON_FORMAT}/{_JSON_VERSION}",
            "metric": self.metric,
            "mode": self.mode,
            "trials": [
                {
                    "index": t.index,
                    "round": t.round,
                    "status": t.status,
                    "diverged_step": t.diverged_step,
                    "params": {
                        n: _json_value(v, f"trial {t.index}'s {n!r}") for n, v in t.params.items()
                    },
                    "metrics": {
                        n: _json_value(v, f"trial {t.index}'s metric {n!r}")
                        for n, v in t.metrics.items()
                    },
                }
                for t in self.trials
            ],
            "space": None if self.space is None else _json_space(self.space),
            "spaces": [_json_space(s) for s in self.spaces],
            "at_border": dict(self.at_border),
        }
        text = json.dumps(doc, indent=1, allow_nan=False)
        with open(path, "w") as f:
            f.write(text + "\n")

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> SearchResult:
        """Read a result written by :meth:`to_json`: equal to the one written, types and all.

        Raises:
          ValueError: the file is not JSON, was not written by :meth:`to_json` (or by a newer
            jaxnorm), or is malformed (the message names the file).
        """
        where = f"from_json: {os.fsdecode(path)!r}"
        with open(path) as f:
            try:
                doc = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where} is not JSON ({e})") from None
        fmt = doc.get("format") if isinstance(doc, dict) else None
        prefix = _JSON_FORMAT + "/"
        if not (isinstance(fmt, str) and fmt.startswith(prefix) and fmt[len(prefix) :].isdigit()):
            raise ValueError(
                f"{where} was not written by SearchResult.to_json (format {fmt!r:.60}, expected "
                f"{prefix}{_JSON_VERSION})"
            )
        if int(fmt[len(prefix) :]) > _JSON_VERSION:
            raise ValueError(
                f"{where} was written by a newer jaxnorm (format {fmt}; this version reads "
                f"{prefix}{_JSON_VERSION}): upgrade jaxnorm to read it"
            )
        try:
            trials = [
                Trial(
                    index=_json_int(t["index"]),
                    round=_json_int(t["round"]),
                    status=_json_status(t["status"]),
                    diverged_step=None
                    if t["diverged_step"] is None
                    else _json_int(t["diverged_step"]),
                    params={_json_name(n): _from_json(v) for n, v in t["params"].items()},
                    metrics={_json_name(n): _json_metric(v) for n, v in t["metrics"].items()},
                )
                for t in doc["trials"]
            ]
            space = None if doc["space"] is None else _space_from_json(doc["space"])
            result = cls(
                trials=trials,
                metric=_json_name(doc["metric"]),
                mode=_check_mode(doc["mode"], "from_json"),
                space=space,
                at_border={_json_name(k): _json_side(v) for k, v in doc["at_border"].items()},
                spaces=[_space_from_json(s) for s in doc["spaces"]],
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"{where} is malformed ({type(e).__name__}: {e})") from None
        return result


_FIXED_COLUMNS = ("trial", "round", "status", "diverged_step")
_ROLE = re.compile(r"(param|metric)(?:\((max|min)\))?:(.+)", re.DOTALL)
_JSON_FORMAT = "jaxnorm.SearchResult"
_JSON_VERSION = 1


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float | np.floating):
        return f"{v:.4g}"
    return str(v)


def _identical(a, b) -> bool:
    """Same type and value, recursively; floats bit for bit up to the NaN payload."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float | np.floating):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return bool(a == b) and math.copysign(1.0, a) == math.copysign(1.0, b)
    if isinstance(a, tuple | list):
        return len(a) == len(b) and all(map(_identical, a, b))
    if isinstance(a, dict):
        return len(a) == len(b) and all(
            _identical(ka, kb) and _identical(a[ka], b[kb]) for ka, kb in zip(a, b, strict=True)
        )
    try:
        return bool(a == b)
    except Exception:  # pragma: no cover - exotic values
        return False


# NumPy scalar types a repr may name (NumPy 2 writes np.float32(0.1), np.True_).
_NUMPY_SCALARS = {
    t.__name__: t
    for t in (
        np.float16,
        np.float32,
        np.float64,
        np.int8,
        np.int16,
        np.int32,
        np.int64,
        np.uint8,
        np.uint16,
        np.uint32,
        np.uint64,
        np.bool_,
    )
}


def _literal(text: str):
    """The value of a Python literal, as ``ast.literal_eval``, plus nan, inf and NumPy scalars."""

    def ev(node):
        if isinstance(node, ast.Constant) and type(node.value) in (int, float, str, bool, bytes):
            return node.value
        if isinstance(node, ast.Constant) and node.value is None:
            return None
        if isinstance(node, ast.Name) and node.id in ("nan", "inf"):
            return float(node.id)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
            v = ev(node.operand)
            if type(v) not in (int, float):
                raise ValueError("a sign before something that is not a number")
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.Tuple):
            return tuple(ev(e) for e in node.elts)
        if isinstance(node, ast.List):
            return [ev(e) for e in node.elts]
        if isinstance(node, ast.Dict) and None not in node.keys:
            return {ev(k): ev(v) for k, v in zip(node.keys, node.values, strict=True)}
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in ("np", "numpy")
            and node.attr in ("True_", "False_")
        ):
            return np.True_ if node.attr == "True_" else np.False_
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id in ("np", "numpy")
            and node.func.attr in _NUMPY_SCALARS
            and len(node.args) == 1
            and not node.keywords
        ):
            return _NUMPY_SCALARS[node.func.attr](ev(node.args[0]))
        raise ValueError(f"{ast.dump(node)[:60]} is not a literal")

    return ev(ast.parse(text.strip(), mode="eval").body)


def _cell(v, index, kind, name) -> str:
    """``repr(v)``, after checking that it reads back as v (type and value)."""
    text = "?"
    try:
        text = repr(v)
        ok = _identical(_literal(text), v)
    except (SyntaxError, ValueError, TypeError, RecursionError):
        ok = False
    if not ok:
        raise TypeError(
            f"to_csv: trial {index}'s {kind} {name!r} is {type(v).__name__} {text[:60]}, whose "
            "text does not read back as the same value; a CSV cell holds numbers, str, bool, "
            "None, NumPy scalars and tuples, lists and dicts of them. Give such options names, "
            "e.g. choice('relu', 'tanh') instead of functions"
        )
    return text


def _column_roles(header, where):
    if tuple(header[:4]) != _FIXED_COLUMNS:
        raise ValueError(
            f"{where} was not written by SearchResult.to_csv: its header begins {header[:4]}, "
            f"expected {list(_FIXED_COLUMNS)}"
        )
    roles, seen = [], set()
    for col in header[4:]:
        m = _ROLE.fullmatch(col)
        if m is None:
            raise ValueError(
                f"{where}: column {col!r} has no role (param:<name> or metric:<name>); the file "
                "was not written by this jaxnorm's SearchResult.to_csv, which records each "
                "column's role so that no metric is read as a hyperparameter"
            )
        role, ranked, name = m.groups()
        if ranked is not None and role != "metric":
            raise ValueError(f"{where}: column {col!r}: only a metric is ranked")
        if (role, name) in seen:
            raise ValueError(f"{where}: column {col!r} appears twice")
        seen.add((role, name))
        roles.append((role, name, ranked))
    if sum(r is not None for _, _, r in roles) != 1:
        raise ValueError(
            f"{where}: expected exactly one ranked metric column, metric(max):<name> or "
            f"metric(min):<name>; its columns: {header[4:]}"
        )
    return roles


def _fixed_cells(cells, where) -> dict:
    index, round_, status, step = cells
    try:
        out = {
            "index": int(index),
            "round": int(round_),
            "status": status,
            "diverged_step": None if step == "" else int(step),
        }
    except ValueError as e:
        raise ValueError(
            f"{where}: trial, round and diverged_step must be integers ({e})"
        ) from None
    if status not in ("ok", "diverged"):
        raise ValueError(f"{where}: status must be 'ok' or 'diverged', got {status!r}")
    return out


def _read_cell(text, role, where, name):
    try:
        v = _literal(text)
    except (SyntaxError, ValueError, TypeError, RecursionError) as e:
        raise ValueError(
            f"{where}: the {role} {name!r} cell {text[:60]!r} is no literal ({e})"
        ) from None
    if role == "metric":
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ValueError(f"{where}: the metric {name!r} cell {text[:60]!r} is not a number")
        v = float(v)
    return v


def _json_value(v, what: str):
    """v as JSON that :func:`_from_json` reads back identically (TypeError otherwise)."""

    def enc(v):
        if v is None or type(v) in (bool, str, int):
            return v
        if type(v) is float:
            return v if math.isfinite(v) else {"float": repr(v)}
        if type(v) is list:
            return [enc(e) for e in v]
        if type(v) is tuple:
            return {"tuple": [enc(e) for e in v]}
        if type(v) is dict:
            return {"dict": [[enc(k), enc(e)] for k, e in v.items()]}
        if type(v) in _NUMPY_SCALARS.values():
            return {"numpy": np.dtype(type(v)).name, "value": enc(v.item())}
        raise TypeError(
            f"to_json: {what} holds {type(v).__name__} {repr(v)[:60]}, which JSON cannot hold "
            "exactly (numbers, str, bool, None, NumPy scalars and lists, tuples and dicts of "
            "them); give such options names, e.g. choice('relu', 'tanh')"
        )

    out = enc(v)
    if not _identical(_from_json(out), v):  # pragma: no cover - a guard on enc itself
        raise TypeError(f"to_json: {what} ({repr(v)[:60]}) would not read back exactly")
    return out


def _from_json(j):
    if j is None or type(j) in (bool, str, int, float):
        return j
    if type(j) is list:
        return [_from_json(e) for e in j]
    if type(j) is dict and len(j) == 1:
        ((tag, body),) = j.items()
        if tag == "float" and body in ("nan", "inf", "-inf"):
            return float(body)
        if tag == "tuple" and type(body) is list:
            return tuple(_from_json(e) for e in body)
        if tag == "dict" and type(body) is list:
            return {_from_json(k): _from_json(e) for k, e in body}
    if (
        type(j) is dict
        and set(j) == {"numpy", "value"}
        and j["numpy"] in {np.dtype(t).name for t in _NUMPY_SCALARS.values()}
    ):
        return np.dtype(j["numpy"]).type(_from_json(j["value"]))
    raise ValueError(f"{json.dumps(j)[:60]} is no encoded value")


def _json_space(space):
    out = {}
    for name, d in space.items():
        if isinstance(d, LogUniform | Uniform):
            kind = "log_uniform" if isinstance(d, LogUniform) else "uniform"
            out[name] = {kind: [_json_value(d.lo, name), _json_value(d.hi, name)]}
        else:
            out[name] = {
                "choice": [_json_value(o, f"space[{name!r}]") for o in d.options],
                "static": bool(d.static),
            }
    return out


def _space_from_json(j):
    space = {}
    for name, d in j.items():
        if set(d) == {"log_uniform"}:
            space[name] = LogUniform(*map(_from_json, d["log_uniform"]))
        elif set(d) == {"uniform"}:
            space[name] = Uniform(*map(_from_json, d["uniform"]))
        elif set(d) == {"choice", "static"} and type(d["static"]) is bool:
            space[name] = Choice(tuple(_from_json(o) for o in d["choice"]), d["static"])
        else:
            raise ValueError(f"space[{name!r}] = {json.dumps(d)[:60]} is no distribution")
    return space


def _json_int(v):
    if type(v) is not int:
        raise ValueError(f"expected an integer, found {v!r:.40}")
    return v


def _json_name(v):
    if type(v) is not str:
        raise ValueError(f"expected a name, found {v!r:.40}")
    return v


def _json_status(v):
    if v not in ("ok", "diverged"):
        raise ValueError(f"status must be 'ok' or 'diverged', found {v!r:.40}")
    return v


def _json_side(v):
    if v not in ("low", "high"):
        raise ValueError(f"a border side must be 'low' or 'high', found {v!r:.40}")
    return v


def _json_metric(v):
    v = _from_json(v)
    if type(v) is not float:
        raise ValueError(f"a metric must be a float, found {v!r:.40}")
    return v


def _check_mode(mode, who):
    if mode not in ("max", "min"):
        raise ValueError(f"{who}: mode must be 'max' or 'min', got {mode!r}")
    return mode


_EXPECTED_OUTPUT = "train_fn must return a dict of scalar numbers, optionally with one History"


def _describe(v) -> str:
    if v is None:
        return "None"
    if isinstance(v, str | bytes | bool | int | float):
        return f"{type(v).__name__} {v!r}"
    dtype = getattr(v, "dtype", None)
    if dtype is not None:
        return f"an array of dtype {dtype} and shape {jnp.shape(v)}"
    return f"a {type(v).__name__}"


def _is_number(v) -> bool:
    if isinstance(v, str | bytes) or v is None:
        return False
    if isinstance(v, bool | int | float | np.integer | np.floating | np.bool_):
        return True
    dtype = getattr(v, "dtype", None)
    if not isinstance(v, jax.Array | np.ndarray) or dtype is None:
        return False
    return any(jnp.issubdtype(dtype, t) for t in (jnp.floating, jnp.integer, jnp.bool_))


def _scalar_outputs(out, metric, who):
    """train_fn's output as a flat dict of float32 scalars; '__nan_step__' from a History.

    Runs while train_fn is traced, so a wrong structure is reported before anything compiles.
    """
    if not isinstance(out, Mapping):
        raise TypeError(
            f"{who}: train_fn(hparams, key) must return a dict of scalar metrics containing "
            f"{metric!r} (and optionally a History under any key), got {type(out).__name__}"
        )
    if metric not in out:
        raise ValueError(
            f"{who}: train_fn's output has no metric {metric!r}; it returned keys "
            f"{sorted(map(str, out))}. Return it, or pass metric= one of those"
        )
    if isinstance(out[metric], History):
        raise TypeError(
            f"{who}: train_fn's output {metric!r}, the metric the search ranks by, is a History; "
            f"{_EXPECTED_OUTPUT}: return the metric as a scalar (e.g. "
            f"evaluate(model, params, val)['accuracy']) and the History under another key"
        )
    flat = {}
    histories = []
    for k, v in out.items():
        if not isinstance(k, str):
            raise TypeError(f"{who}: train_fn's output keys must be str, got {k!r}")
        if isinstance(v, History):
            histories.append(k)
            flat["__nan_step__"] = jnp.asarray(v.nan_step, jnp.int32)
            continue
        if isinstance(v, Mapping):
            raise TypeError(
                f"{who}: train_fn's output {k!r} is a dict; {_EXPECTED_OUTPUT}: flatten it "
                f"into the top level (e.g. {k + '/' + str(next(iter(v), 'name'))!r})"
            )
        if not _is_number(v):
            raise TypeError(
                f"{who}: train_fn's output {k!r} must be a scalar number, got {_describe(v)}; "
                f"{_EXPECTED_OUTPUT}"
            )
        shape = jnp.shape(v)
        if shape != ():
            raise ValueError(
                f"{who}: train_fn's output {k!r} must be a scalar per trial, got shape {shape}; "
                "reduce it (e.g. the last value) or return the History itself"
            )
        flat[k] = jnp.asarray(v, jnp.float32)
    if len(histories) > 1:
        raise ValueError(
            f"{who}: train_fn returned {len(histories)} Histories (keys {histories}); "
            f"{_EXPECTED_OUTPUT}: return the one whose NaN step marks a trial diverged"
        )
    return flat


def _devices(devices):
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("random_search: devices is empty")
    return devices


# On CPU the search program is compiled with XLA's backend optimisation level 1 instead of the
# default 3: a 64-trial MLP search compiled in 2.8-3.0 s instead of 4.2-5.1 s and ran as fast or
# faster (its time is in library matmuls and reductions, not in LLVM-optimised loops). For a
# search of short runs, the compile is most of the time. GPU and TPU keep their defaults.
_CPU_COMPILER_OPTIONS = {"xla_backend_optimization_level": 1}


def _make_programs(train_fn, static_items, metric, who, on_cpu=False):
    static = dict(static_items)

    def one(hp_traced, key):
        return _scalar_outputs(train_fn({**hp_traced, **static}, key), metric, who)

    options = dict(_CPU_COMPILER_OPTIONS) if on_cpu else None
    return one, jax.jit(jax.vmap(one), compiler_options=options)


# The same train_fn searched again (coarse_to_fine's rounds, repeated searches) reuses its
# compiled program: jit caches by function identity, so the vmapped function is kept per
# (train_fn, static values, metric).
_cached_programs = functools.lru_cache(maxsize=32)(_make_programs)


def _programs(train_fn, static_items, metric, who, on_cpu):
    try:
        return _cached_programs(train_fn, static_items, metric, who, on_cpu)
    except TypeError:  # unhashable static options: build afresh
        return _make_programs(train_fn, static_items, metric, who, on_cpu)


def _group_program(train_fn, hp, static, keys, chunk_size, devices, workers, metric, who):
    """The vmapped program of one group (same static values) and the arguments of its chunks.

    ``workers`` chunks run at once (one per core on a single CPU device, see _parallel).
    """
    n = len(keys)
    on_cpu = all(d.platform == "cpu" for d in devices)
    one, program = _programs(train_fn, tuple(static.items()), metric, who, on_cpu)
    nd = len(devices)
    chunk = n if chunk_size is None else min(chunk_size, n)
    # On one CPU device the chunk_size trials in flight are split over the cores.
    chunk = -(-chunk // workers)
    chunk = -(-chunk // nd) * nd  # a multiple of the device count, so the trial axis divides
    sharding = None
    if nd > 1:
        mesh = jax.sharding.Mesh(np.asarray(devices), ("trials",))
        sharding = NamedSharding(mesh, P("trials"))
    chunks = []
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        # Pad the last chunk by repeating its last trial, so one compiled program serves all.
        idx = np.minimum(np.arange(start, start + chunk), stop - 1)
        # Whole, in order, the keys go in as they are (indexing them compiles a gather).
        chunk_keys = keys if chunk == n else keys[idx]
        args = ({k: jnp.asarray(v[idx]) for k, v in hp.items()}, chunk_keys)
        if sharding is not None:
            args = _shard(args, sharding)
        chunks.append((args, stop - start))
    if sharding is not None and not sharding.is_fully_addressable:
        program, consts = _hoisted(one, chunks[0][0], on_cpu, sharding.mesh)
        chunks = [((consts, *args), size) for args, size in chunks]
    return program, chunks


def _hoisted(one, args, on_cpu, mesh):
    """``jit(vmap(one))`` with the arrays ``one`` closes over passed as arguments.

    A ``train_fn`` closes over its data; under ``jax.distributed`` that data is a global array
    (``jax.make_array_from_process_local_data``), and ``jit`` refuses to close over an array
    with devices in other processes. The vmapped function is traced once here, and its constants
    become the first argument of the compiled program: the same computation, the data sharded as
    the caller laid it out. A constant this process holds whole (data every process loaded
    alike, a NumPy array) is replicated over ``mesh`` from each process's copy. Returns the
    program and the constants.
    """
    from jax.extend import core

    closed, shapes = jax.make_jaxpr(jax.vmap(one), return_shape=True)(*args)
    out_tree = jax.tree.structure(shapes)

    def run(consts, *args):
        out = core.jaxpr_as_fun(core.ClosedJaxpr(closed.jaxpr, consts))(*jax.tree.leaves(args))
        return jax.tree.unflatten(out_tree, out)

    replicated = NamedSharding(mesh, P())
    consts = [
        c if isinstance(c, jax.Array) and not c.is_fully_addressable else _shard(c, replicated)
        for c in closed.consts
    ]
    options = dict(_CPU_COMPILER_OPTIONS) if on_cpu else None
    return jax.jit(run, compiler_options=options), consts


def _shard(tree, sharding):
    """``tree``'s arrays laid out by ``sharding``, which may span processes.

    Within one process this is ``jax.device_put``. Under ``jax.distributed`` the mesh has devices
    of other processes, which ``device_put`` refuses for a JAX array; every process holds the same
    values (they come from the same key), so each builds its own devices' shards of the global
    array from its copy.
    """
    if sharding.is_fully_addressable:
        return jax.device_put(tree, sharding)

    def one(a):
        return jax.make_array_from_callback(jnp.shape(a), sharding, lambda index: a[index])

    return jax.tree.map(one, tree)


def _to_host(tree):
    """NumPy copies of ``tree``'s arrays, whole in every process.

    An output sharded over the devices of several processes holds only this process's rows
    here; ``process_allgather`` assembles every process's rows, so each process gets what one
    process with as many devices would.
    """
    if all(a.is_fully_addressable for a in jax.tree.leaves(tree)):
        return jax.tree.map(np.asarray, tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def _run_chunks(program, chunks, workers):
    """Every chunk through the program, up to ``workers`` at once; the outputs as NumPy arrays,
    the padding dropped."""
    outs = _parallel.run(program, [args for args, _ in chunks], workers)
    sizes = [size for _, size in chunks]
    outs = [
        {k: v[:size] for k, v in _to_host(o).items()} for o, size in zip(outs, sizes, strict=True)
    ]
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


def _border_check(space, best, border):
    at = {}
    if best is None:
        return at
    for name, dist in space.items():
        if isinstance(dist, Choice) or name not in best.params:
            continue
        v = float(best.params[name])
        if isinstance(dist, LogUniform):
            pos = (math.log(v) - math.log(dist.lo)) / (math.log(dist.hi) - math.log(dist.lo))
        else:
            pos = (v - dist.lo) / (dist.hi - dist.lo)
        if pos < border:
            at[name] = "low"
        elif pos > 1 - border:
            at[name] = "high"
    return at


def _warn_border(result, border, stacklevel):
    for name, side in result.at_border.items():
        dist = result.space[name]
        scale = " (log scale)" if isinstance(dist, LogUniform) else ""
        warnings.warn(
            f"the best {result.metric} ({result.best.metrics[result.metric]:.4g}) has {name}="
            f"{result.best.params[name]:.4g}, within {border:.0%} of the {side} end of its range "
            f"[{dist.lo:.4g}, {dist.hi:.4g}]{scale}: the optimum may lie outside it; move the "
            "range and search again",
            BorderWarning,
            stacklevel=stacklevel + 1,  # the caller of random_search
        )


def _search(train_fn, space, num_trials, key, chunk_size, metric, mode, devices, round_, who):
    if isinstance(num_trials, bool) or not isinstance(num_trials, int | np.integer):
        raise TypeError(f"{who}: num_trials must be an int, got {num_trials!r}")
    if num_trials < 1:
        raise ValueError(f"{who}: num_trials must be at least 1, got {num_trials}")
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"{who}: chunk_size must be a positive int or None, got {chunk_size!r}")
    if not callable(train_fn):
        raise TypeError(f"{who}: train_fn must be callable, got {train_fn!r}")
    keys, draws = _sample(space, num_trials, key)
    # The space comes from _check_space, whose choices have their static flag settled.
    static_names = [n for n, d in space.items() if isinstance(d, Choice) and d.static]
    traced = {n: _traced_values(d, draws[n]) for n, d in space.items() if n not in static_names}
    # Group by option index, not value: options need not be hashable.
    groups: dict[tuple, list[int]] = {}
    for i in range(num_trials):
        groups.setdefault(tuple(int(draws[n][i]) for n in static_names), []).append(i)
    devices = _devices(devices)
    workers = _parallel.cpu_workers(devices)
    plans = []
    for combo, members in groups.items():
        idx = np.asarray(members)
        program, chunks = _group_program(
            train_fn,
            {n: v[idx] for n, v in traced.items()},
            {n: space[n].options[j] for n, j in zip(static_names, combo, strict=True)},
            keys if len(groups) == 1 else keys[idx],  # (indexing keys compiles a gather)
            chunk_size,
            devices,
            workers,
            metric,
            who,
        )
        plans.append((members, program, chunks))
    # Trace every group's program before any runs, so that an output of the wrong structure is
    # reported before the first group has trained; jit keeps the trace, so running does not
    # trace again.
    for _, program, chunks in plans:
        jax.eval_shape(program, *chunks[0][0])
    results: dict[int, dict] = {}
    for members, program, chunks in plans:
        out = _run_chunks(program, chunks, workers)
        for j, i in enumerate(members):
            results[i] = {k: v[j] for k, v in out.items()}
    trials = []
    for i in range(num_trials):
        out = results[i]
        nan_step = int(out.pop("__nan_step__", -1))
        metrics = {k: float(v) for k, v in out.items()}
        # Any non-finite metric marks the trial: NaN logits give a finite (chance) accuracy, so
        # the ranked metric alone would hide a diverged run.
        diverged = nan_step >= 0 or not all(math.isfinite(v) for v in metrics.values())
        params = {
            n: d.options[int(draws[n][i])] if isinstance(d, Choice) else float(draws[n][i])
            for n, d in space.items()
        }
        trials.append(
            Trial(
                index=i,
                params=params,
                metrics=metrics,
                status="diverged" if diverged else "ok",
                diverged_step=nan_step if nan_step >= 0 else None,
                round=round_,
            )
        )
    return trials


def _warn_diverged(trials, who, stacklevel, limit=5):
    bad = [t for t in trials if t.status != "ok"]
    if not bad:
        return
    parts = []
    for t in bad[:limit]:
        why = [f"{k}={v:.4g}" for k, v in t.metrics.items() if not math.isfinite(v)]
        if t.diverged_step is not None:
            why.insert(0, f"NaN/Inf from step {t.diverged_step}")
        parts.append(f"trial {t.index} ({', '.join(why)})")
    more = f" and {len(bad) - limit} more" if len(bad) > limit else ""
    warnings.warn(
        f"{who}: {len(bad)} of {len(trials)} trials diverged: {'; '.join(parts)}{more}. They are "
        "marked 'diverged' and ranked after every finite trial (see the table)",
        DivergenceWarning,
        stacklevel=stacklevel + 1,
    )


def random_search(
    train_fn: Callable[[dict, jax.Array], dict],
    space: Mapping[str, LogUniform | Uniform | Choice],
    num_trials: int,
    key: jax.Array,
    *,
    chunk_size: int | None = None,
    metric: str = "val_accuracy",
    mode: str = "max",
    devices: Sequence[jax.Device] | None = None,
    border: float = 0.1,
) -> SearchResult:
    """Random search, the trials trained in parallel: ``jax.vmap`` over hyperparameters and keys.

    ``num_trials`` configurations are drawn from ``space`` and each gets its own PRNG key; then
    ``jax.jit(jax.vmap(train_fn))`` trains ``chunk_size`` trials at once in one compiled program
    (chunks bound the memory; the last chunk is padded so one program serves all). With several
    devices the trial axis is sharded over them (a ``NamedSharding`` over a 1-D mesh), the same
    program partitioned by XLA; the chunk size is rounded up to a multiple of the device count.
    On one CPU device with several cores, the trials in flight are split into one chunk per core
    and the chunks run at once, calls of the one compiled program from as many threads (XLA:CPU
    runs a program's operations one after another, and small matmuls use one core).

    ``train_fn(hparams, key)`` receives a dict with one scalar per hyperparameter: a traced
    float32 for ``log_uniform``/``uniform``, a traced int32/float32 for numeric ``choice``, and
    the Python value itself for ``choice(..., static=True)`` and non-numeric options (widths,
    batch sizes, activation names: the trials are grouped by those values, one vmapped program
    per group). Pass traced values to optax as hyperparameters, e.g.
    ``optax.inject_hyperparams(optax.sgd)(learning_rate=hparams["learning_rate"])``, so that one
    program serves every learning rate. It returns a dict of scalar numbers containing
    ``metric``; a :class:`History` (from :func:`fit`) may be included under another key, and its
    ``nan_step`` then marks the trial diverged at that step. A trial whose History has a NaN
    step, or any of whose returned numbers is NaN/Inf, is marked ``"diverged"``, ranked after
    every finite trial, reported in the table (with its step when a History was returned) and in
    a :class:`DivergenceWarning` naming the trial, and never stops the search. The output's
    structure is checked when ``train_fn`` is traced, before any trial trains.

    The same ``key`` gives the same trials and results (each hyperparameter has its own stream,
    so adding one leaves the others' samples unchanged). Trial ``i`` trains with the key
    ``jax.random.split(jax.random.split(key)[1], num_trials)[i]``, whatever the chunking and the
    devices, so any trial can be rerun alone.

    Args:
      train_fn: ``train_fn(hparams, key) -> {metric: scalar, ...}``, pure and traceable.
      space: ``{name: log_uniform(lo, hi) | uniform(lo, hi) | choice(*options)}``.
      num_trials: number of configurations (>= 1).
      key: PRNG key (``jax.random.key(0)``).
      chunk_size: trials in flight at once (default all of a group): bounds the memory. On a
        multi-core CPU they are split into one vmapped call per core.
      metric: the output to rank by.
      mode: ``"max"`` or ``"min"``.
      devices: devices to shard the trials over (default ``jax.devices()``: under
        ``jax.distributed``, the devices of every process). Across processes, every process
        calls the search alike, ``train_fn`` may close over global arrays (data loaded with
        ``jax.make_array_from_process_local_data``), and each process gets the whole result,
        as one process with as many devices would (docs/multihost.md).
      border: fraction of a range (in log space for log_uniform) counted as its border, in
        [0, 0.5) (0 switches the check off).

    Returns:
      A :class:`SearchResult`: ``.trials``, ``.best``, ``.best_params``, ``.table()``,
      ``.to_csv(path)`` / ``SearchResult.from_csv(path)`` and ``.to_json(path)`` /
      ``SearchResult.from_json(path)`` (both exact), ``.at_border``.

    Raises:
      TypeError: a space that is not a dict of distributions, a key that is not a PRNG key, a
        train_fn output that is not a dict of scalar numbers (a string, None, a nested dict, a
        History under the metric's own key), a non-int num_trials.
      ValueError: an empty space or an invalid distribution in it, num_trials < 1, a bad
        chunk_size, mode or border, a train_fn output without ``metric``, with non-scalar
        entries or with more than one History.

    Warns:
      DivergenceWarning: when some trials diverged (their indices, steps and NaN metrics).
      BorderWarning: when the best value of a range lies within ``border`` of its ends (the
        lecture: the optimum may lie outside; move the range).

    References:
      Bergstra & Bengio 2012, "Random search for hyper-parameter optimization".

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxnorm import training
      >>> def train_fn(hp, key):  # a stand-in for training: best at x = 0.3
      ...     return {"score": -(hp["x"] - 0.3) ** 2}
      >>> result = training.random_search(
      ...     train_fn, {"x": training.uniform(0.0, 1.0)}, 16, jax.random.key(0), metric="score")
      >>> abs(result.best_params["x"] - 0.3) < 0.1
      True
    """
    who = "random_search"
    space = _check_space(space, who)
    mode = _check_mode(mode, who)
    border = _check_border(border, who)
    key = _check_key(key, "key", who)
    trials = _search(train_fn, space, num_trials, key, chunk_size, metric, mode, devices, 0, who)
    result = SearchResult(trials=trials, metric=metric, mode=mode, space=space, spaces=[space])
    result.at_border = _border_check(space, result.best, border)
    _warn_diverged(result.trials, who, stacklevel=2)
    _warn_border(result, border, stacklevel=2)
    return result


def _narrow(space, trials, result_key, top_k):
    top = sorted((t for t in trials if t.status == "ok"), key=result_key)[:top_k]
    if not top:
        return space
    new = {}
    for name, dist in space.items():
        vals = [t.params[name] for t in top]
        if isinstance(dist, Choice):
            kept = tuple(o for o in dist.options if any(_same(o, v) for v in vals))
            new[name] = dist._replace(options=kept or dist.options)
            continue
        f, inv = (math.log, math.exp) if isinstance(dist, LogUniform) else (float, float)
        lo, hi = f(dist.lo), f(dist.hi)
        a, b = min(map(f, vals)), max(map(f, vals))
        # Keep a margin around the best trials: a quarter of their spread, and at least 5% of the
        # current range, so one lucky trial does not collapse the range to a point.
        pad = max(0.25 * (b - a), 0.05 * (hi - lo))
        a, b = max(lo, a - pad), min(hi, b + pad)
        new[name] = type(dist)(inv(a), inv(b))
    return new


def _same(a, b):
    # Trial.params holds the option object itself, so identity finds it; == for equal copies.
    if a is b:
        return True
    try:
        return bool(a == b)
    except Exception:  # pragma: no cover - exotic options
        return False


def coarse_to_fine(
    train_fn: Callable[[dict, jax.Array], dict],
    space: Mapping[str, LogUniform | Uniform | Choice],
    num_trials: int,
    key: jax.Array,
    *,
    rounds: int = 2,
    top_k: int = 5,
    chunk_size: int | None = None,
    metric: str = "val_accuracy",
    mode: str = "max",
    devices: Sequence[jax.Device] | None = None,
    border: float = 0.1,
) -> SearchResult:
    """Coarse-to-fine random search: each round narrows the ranges around the best trials.

    Round 0 is ``random_search(train_fn, space, num_trials, key)``: the same trials. Round
    ``r > 0`` samples with ``jax.random.fold_in(key, r)`` and searches the ranges spanned by the
    ``top_k`` best trials so far (in log space for log_uniform), widened by a quarter of their
    spread (at least 5% of the range) and kept inside the previous range; a ``choice`` keeps the
    options the top trials used (float options included: ``Trial.params`` holds the option
    objects). ``num_trials`` trials run per round.

    Args:
      train_fn, space, num_trials, key, chunk_size, metric, mode, devices, border: as in
        :func:`random_search` (``num_trials`` per round).
      rounds: number of rounds (>= 1).
      top_k: trials that define the next round's ranges (>= 1).

    Returns:
      A :class:`SearchResult` with every round's trials (``Trial.round``), ``spaces`` (each
      round's space), and the border check against the original ``space``.

    Raises:
      As :func:`random_search`; ValueError if rounds or top_k < 1.

    Warns:
      DivergenceWarning: when some trials diverged (their indices, steps and NaN metrics).
      BorderWarning: the best value lies near the border of its original range.

    Example:
      >>> import jax
      >>> from jaxnorm import training
      >>> f = lambda hp, key: {"loss": (jax.numpy.log10(hp["lr"]) + 2.5) ** 2}
      >>> r = training.coarse_to_fine(f, {"lr": training.log_uniform(1e-5, 1.0)}, 16,
      ...                             jax.random.key(0), rounds=3, metric="loss", mode="min")
      >>> r.spaces[-1]["lr"].hi < 1.0 and 1e-3 < r.best_params["lr"] < 1e-2
      True
    """
    who = "coarse_to_fine"
    space = _check_space(space, who)
    mode = _check_mode(mode, who)
    border = _check_border(border, who)
    key = _check_key(key, "key", who)
    for name, v in (("rounds", rounds), ("top_k", top_k)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{who}: {name} must be an int >= 1, got {v!r}")
    result = SearchResult(trials=[], metric=metric, mode=mode, space=space)
    current = space
    for r in range(rounds):
        if r > 0:
            current = _narrow(current, result.trials, result._key, top_k)
        result.spaces.append(current)
        trials = _search(
            train_fn,
            current,
            num_trials,
            key if r == 0 else jax.random.fold_in(key, r),
            chunk_size,
            metric,
            mode,
            devices,
            r,
            who,
        )
        offset = len(result.trials)
        result.trials += [dataclasses.replace(t, index=t.index + offset) for t in trials]
    result.at_border = _border_check(space, result.best, border)
    _warn_diverged(result.trials, who, stacklevel=2)
    _warn_border(result, border, stacklevel=2)
    return result
