"""The lab's experiments on the one-time set-up of a network: activations, init, data, gradients.

Each experiment is ``f(key, *, quick=False) -> NamedTuple`` of host numbers and NumPy arrays
(``key`` a PRNG key or an int seed), and has a ``*_verdict(result) -> Verdict`` that compares the
numbers with the lecture's claim and a ``*_table(result) -> (columns, rows)`` for the report.
Plots live in :mod:`jaxnorm.lab.plots`.

References:
  CS231n, "Training Neural Networks, Part 1" (Stanford, 2016-2017) and the notes "Neural
  Networks Part 2" and "Part 3".
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxnorm import activations, batchnorm, gradcheck, initializers, preprocessing
from jaxnorm.lab._util import INIT_LABELS, Verdict, as_key, to_host, verdict_from_checks

# ---------------------------------------------------------------------------------------------
# 1. Activation functions and their derivatives


class ActivationCurves(NamedTuple):
    """Result of :func:`activation_curves`.

    Attributes:
      x: ``[P]`` the grid, -5 to 5.
      names: the activations plotted (every elementwise one; prelu with slope 0.25).
      values: ``[A, P]`` f(x) for each name.
      derivatives: ``[A, P]`` f'(x) from ``jax.grad``.
      properties: one dict per name, the lecture's table (:func:`jaxnorm.activations.properties`).
      measured: one dict per name, the same properties measured from the function: ``min`` and
        ``max`` on [-8, 8], ``gaussian_mean`` E[f(z)] for z ~ N(0, 1), ``slope_left`` and
        ``slope_right`` f'(-8) and f'(8), ``min_derivative`` on [-8, 8], and ``saturates``,
        ``zero_centred``, ``monotone`` derived from them; ``attains_min`` and ``attains_max``:
        whether the table's finite bound is a value of the function (ReLU's 0, GELU's minimum:
        the range is closed there) or only approached (sigmoid's 0 and 1, ELU's -1: open).
      agreement: one dict per name: ``{property: table value == measured value}``.
      max_sigmoid_derivative: max f'(x) of the sigmoid (1/4 in theory).
    """

    x: np.ndarray
    names: tuple
    values: np.ndarray
    derivatives: np.ndarray
    properties: tuple
    measured: tuple
    agreement: tuple
    max_sigmoid_derivative: float


# A unit "saturates" on a side when |f'| falls below this at |x| = 8; a mean within this of 0 on
# unit Gaussian input counts as zero-centred. Both fixed from the lecture's wording, not tuned.
_SATURATION_SLOPE = 5e-3
_ZERO_CENTRED_MEAN = 0.1
_PRELU_SLOPE = 0.25


def _elementwise(name):
    f = activations.get(name)
    if name == "prelu":
        return lambda x: f(x, jnp.asarray(_PRELU_SLOPE, x.dtype))
    return f


@functools.partial(jax.jit, static_argnums=0)
def _curves(names, x, wide, nodes):
    # One compiled program for every activation: op-by-op dispatch would compile each op anew.
    out = []
    for name in names:
        f = _elementwise(name)
        df = jax.vmap(jax.grad(f))
        out.append((f(x), df(x), f(wide), df(wide), f(nodes)))
    return tuple(jnp.stack(a) for a in zip(*out, strict=True))


def _attains(values: np.ndarray, slopes: np.ndarray, bound: float, extreme: int) -> bool:
    """Whether the function reaches its finite ``bound`` on the grid rather than approaching it.

    At a point where a differentiable function takes its infimum or supremum, its slope is 0.
    So the bound is reached where the function equals it with slope exactly 0 (ReLU on x < 0),
    or at a turning point inside the grid, where the slope changes sign, within 1e-3 of it
    (GELU's and SiLU's minima, which no grid point hits exactly). A value equal to the bound
    with a nonzero slope is float32 rounding (tanh(8) rounds to 1), not the function
    reaching it.
    """
    if not np.isfinite(bound):
        return False
    if np.any((values == bound) & (slopes == 0)):
        return True
    if not 0 < extreme < len(values) - 1:
        return False
    turning = slopes[extreme - 1] * slopes[extreme + 1] < 0
    return bool(turning and abs(values[extreme] - bound) <= 1e-3 * max(1.0, abs(bound)))


def _fmt_bound(v: float) -> str:
    if np.isinf(v):
        return "∞" if v > 0 else "-∞"
    return f"{v:.3g}"


def _range_text(lo: float, hi: float, attains_min: bool, attains_max: bool) -> str:
    """An interval with the right brackets: ``[0, ∞)``, ``(-1, 1)``, ``[-0.17, ∞)``."""
    return (
        f"{'[' if attains_min else '('}{_fmt_bound(lo)}, "
        f"{_fmt_bound(hi)}{']' if attains_max else ')'}"
    )


def activation_curves(key: Any = 0, *, quick: bool = False) -> ActivationCurves:
    r"""Every elementwise activation and its derivative on [-5, 5], with the properties table.

    The table's claims are measured, not copied: saturation is :math:`|f'(\pm 8)| < 5\cdot10^{-3}`,
    zero-centred is :math:`|E f(z)| < 0.1` for :math:`z \sim N(0, 1)` (a Gauss-Hermite sum),
    monotone is :math:`\min f' \ge 0` on [-8, 8], and the output range must contain every value.
    A finite bound of the range is *attained* (a closed end, ``[0, inf)``) when the function
    takes it on the grid with slope exactly 0 (ReLU's 0) or has a turning point at it inside
    [-8, 8] (GELU's and SiLU's minima); otherwise it is only approached (an open end: sigmoid's
    ``(0, 1)``, ELU's ``(-1, inf)``).

    Args:
      key: unused (the experiment is deterministic); accepted like every experiment's.
      quick: a coarser grid.

    Returns:
      An :class:`ActivationCurves`.

    Example:
      >>> from jaxnorm.lab import setup_experiments as s
      >>> r = s.activation_curves(quick=True)
      >>> round(r.max_sigmoid_derivative, 3)
      0.25
    """
    del key
    names = tuple(n for n in activations.NAMES if n != "maxout")  # maxout is not elementwise
    x = jnp.linspace(-5.0, 5.0, 201 if quick else 801)
    wide = jnp.linspace(-8.0, 8.0, 321 if quick else 1601)
    nodes, weights = np.polynomial.hermite_e.hermegauss(80)
    weights = weights / weights.sum()
    grid_values, grid_derivs, wide_values, wide_derivs, gauss = _curves(
        names, x, wide, jnp.asarray(nodes, jnp.float32)
    )
    values, derivs, props, measured, agreement = [], [], [], [], []
    for i, name in enumerate(names):
        values.append(np.asarray(grid_values[i]))
        derivs.append(np.asarray(grid_derivs[i]))
        fw = np.asarray(wide_values[i], np.float64)
        dfw = np.asarray(wide_derivs[i], np.float64)
        gmean = float(np.dot(weights, np.asarray(gauss[i], np.float64)))
        p = activations.properties(name)
        lo, hi = p.output_range
        left, right = float(dfw[0]), float(dfw[-1])
        sat_l, sat_r = abs(left) < _SATURATION_SLOPE, abs(right) < _SATURATION_SLOPE
        saturates = {(True, True): "both", (True, False): "negative", (False, True): "positive"}
        m = {
            "min": float(fw.min()),
            "max": float(fw.max()),
            "gaussian_mean": gmean,
            "slope_left": left,
            "slope_right": right,
            "min_derivative": float(dfw.min()),
            "saturates": saturates.get((sat_l, sat_r), "none"),
            "zero_centred": abs(gmean) < _ZERO_CENTRED_MEAN,
            "monotone": float(dfw.min()) >= -1e-6,
            "attains_min": _attains(fw, dfw, lo, int(np.argmin(fw))),
            "attains_max": _attains(fw, dfw, hi, int(np.argmax(fw))),
        }
        tol = 1e-5 * max(1.0, abs(m["min"]), abs(m["max"]))
        agreement.append(
            {
                "output_range": bool(lo - tol <= m["min"] and m["max"] <= hi + tol),
                "zero_centred": bool(p.zero_centred == m["zero_centred"]),
                "saturates": bool(p.saturates == m["saturates"]),
                "monotone": bool(p.monotone == m["monotone"]),
            }
        )
        props.append(
            {
                "output_range": [float(lo), float(hi)],
                "zero_centred": bool(p.zero_centred),
                "saturates": p.saturates,
                "needs_exp": bool(p.needs_exp),
                "monotone": bool(p.monotone),
                "note": p.note,
            }
        )
        measured.append(m)
    sig = derivs[names.index("sigmoid")]
    return ActivationCurves(
        x=np.asarray(x),
        names=names,
        values=np.stack(values),
        derivatives=np.stack(derivs),
        properties=tuple(props),
        measured=tuple(measured),
        agreement=tuple(agreement),
        max_sigmoid_derivative=float(sig.max()),
    )


def activation_curves_verdict(r: ActivationCurves) -> Verdict:
    """Sigmoid/tanh saturate, sigmoid is not zero-centred, ReLU does not saturate for x > 0."""
    m = dict(zip(r.names, r.measured, strict=True))
    mismatches = [
        f"{n}.{k}"
        for n, a in zip(r.names, r.agreement, strict=True)
        for k, ok in a.items()
        if not ok
    ]
    checks = {
        "sigmoid and tanh saturate on both sides": m["sigmoid"]["saturates"] == "both"
        and m["tanh"]["saturates"] == "both",
        "sigmoid is not zero-centred, tanh is": (not m["sigmoid"]["zero_centred"])
        and m["tanh"]["zero_centred"],
        "ReLU keeps slope 1 for x > 0": abs(m["relu"]["slope_right"] - 1.0) < 1e-6,
        "sigmoid's derivative is at most 1/4": r.max_sigmoid_derivative <= 0.25 + 1e-6,
        "the properties table matches the measured functions": not mismatches,
    }
    text = (
        f"sigmoid'(±8) = {m['sigmoid']['slope_left']:.2g}, tanh'(±8) = "
        f"{m['tanh']['slope_left']:.2g}; E[sigmoid(z)] = {m['sigmoid']['gaussian_mean']:.3f}, "
        f"E[tanh(z)] = {m['tanh']['gaussian_mean']:.3f}; max sigmoid' = "
        f"{r.max_sigmoid_derivative:.4f}. "
        + (
            "Every table entry matches the measurement."
            if not mismatches
            else "Table entries that disagree with the measurement: " + ", ".join(mismatches) + "."
        )
    )
    claim = (
        "Sigmoid and tanh saturate and kill gradients, sigmoid outputs are not zero-centred, "
        "ReLU does not saturate in the positive region."
    )
    return verdict_from_checks(claim, checks, text)


def activation_curves_table(r: ActivationCurves):
    columns = [
        "activation",
        "range (table's bounds; [ ] attained, ( ) approached)",
        "min..max measured",
        "zero-centred (table / E f(z))",
        "saturates (table / measured)",
        "monotone (table / measured)",
        "needs exp",
        "agrees",
    ]
    rows = []
    for n, p, m, a in zip(r.names, r.properties, r.measured, r.agreement, strict=True):
        rows.append(
            [
                n,
                _range_text(*p["output_range"], m["attains_min"], m["attains_max"]),
                f"{m['min']:.3g} .. {m['max']:.3g}",
                f"{p['zero_centred']} / {m['gaussian_mean']:.3f}",
                f"{p['saturates']} / {m['saturates']}",
                f"{p['monotone']} / {m['monotone']}",
                str(p["needs_exp"]),
                "yes" if all(a.values()) else "NO",
            ]
        )
    return columns, rows


# ---------------------------------------------------------------------------------------------
# 3. Initialisation: activation statistics of a deep net


class InitStatistics(NamedTuple):
    """Result of :func:`init_statistics`.

    Attributes:
      labels: one label per configuration, ``"<activation>, <init>"``, e.g.
        ``"tanh, small_normal(0.01)"``.
      activation: the activation of each configuration.
      init: the initializer of each configuration, named with the jaxnorm function it calls:
        ``"1/sqrt(fan_in) (lecture's 'Xavier', = lecun_normal)"`` is the lecture's "Xavier",
        which is LeCun's scaling, not Glorot's ``xavier_normal`` (see docs/initializers.md).
      layer_mean: ``[C, L]`` mean activation of each layer.
      layer_std: ``[C, L]`` standard deviation of each layer's activations.
      saturated_fraction: ``[C, L]`` share of tanh outputs with |y| > 0.99 (NaN for ReLU).
      dead_fraction: ``[C, L]`` share of units never active over the batch (ReLU; NaN for tanh).
      hist_counts: ``[C, L, B]`` histogram counts of each layer.
      hist_edges: ``[C, B + 1]`` the histogram edges, fixed per configuration ((-1, 1) for tanh,
        (0, 4) for ReLU) so that layers compare.
      std_ratio: ``[C]`` std of the last layer over std of the first.
      num_layers, width, num_examples: the network and batch sizes.
    """

    labels: tuple
    activation: tuple
    init: tuple
    layer_mean: np.ndarray
    layer_std: np.ndarray
    saturated_fraction: np.ndarray
    dead_fraction: np.ndarray
    hist_counts: np.ndarray
    hist_edges: np.ndarray
    std_ratio: np.ndarray
    num_layers: int
    width: int
    num_examples: int


# (activation, init label, initializer): the lecture's slides, in order. The lecture's "Xavier"
# is randn / sqrt(fan_in), lecun_normal, and the labels say so (INIT_LABELS); Glorot's
# xavier_normal would give the same weights here, since every layer is square.
_INIT_CONFIGS = (
    ("tanh", "small_normal(0.01)", initializers.small_normal(0.01)),
    ("tanh", "small_normal(1.0)", initializers.small_normal(1.0)),
    ("tanh", INIT_LABELS["lecun_normal"], initializers.lecun_normal()),
    ("relu", INIT_LABELS["lecun_normal"], initializers.lecun_normal()),
    ("relu", INIT_LABELS["he_normal"], initializers.he_normal()),
)
_HIST_RANGE = {"tanh": (-1.0, 1.0), "relu": (0.0, 4.0)}
_HIST_BINS = 30


@functools.partial(jax.jit, static_argnums=0)
def _forward_layers(act, x, weights):
    # A scan over the layers compiles one layer, not ten.
    f = activations.get(act)

    def layer(h, w):
        h = f(h @ w)
        return h, h

    return jax.lax.scan(layer, x, weights)[1]


def init_statistics(key: Any = 0, *, quick: bool = False) -> InitStatistics:
    """A 10-layer, 500-unit net on unit Gaussian data: per-layer activation statistics.

    ``h_l = f(h_{l-1} W_l)`` with no biases, ``x ~ N(0, 1)`` of shape ``[N, 500]``, for tanh with
    small_normal(0.01) (activations collapse to 0), small_normal(1.0) (tanh saturates), and
    the lecture's "Xavier" ``randn / sqrt(fan_in)``, which is ``lecun_normal`` (healthy), and
    ReLU with ``lecun_normal`` (halves the variance per layer) and He, ``he_normal`` (keeps it).

    Args:
      key: PRNG key or int seed (data and weights).
      quick: fewer examples (256 instead of 1000).

    Returns:
      An :class:`InitStatistics`.

    References:
      Glorot & Bengio 2010; He et al. 2015, "Delving deep into rectifiers".

    Example:
      >>> from jaxnorm.lab import setup_experiments as s
      >>> r = s.init_statistics(0, quick=True)
      >>> r.layer_std.shape
      (5, 10)
    """
    key = as_key(key)
    num_layers, width, n = 10, 500, 256 if quick else 1000
    kx, kw = jax.random.split(key)
    x = jax.random.normal(kx, (n, width))
    means, stds, sats, deads, counts, edges, ratios = [], [], [], [], [], [], []
    for i, (act, _, init) in enumerate(_INIT_CONFIGS):
        keys = jax.random.split(jax.random.fold_in(kw, i), num_layers)
        weights = jnp.stack([init(k, (width, width)) for k in keys])
        hs = np.asarray(_forward_layers(act, x, weights), np.float64)
        lo, hi = _HIST_RANGE[act]
        edge = np.linspace(lo, hi, _HIST_BINS + 1)
        m = hs.mean(axis=(1, 2))
        s = hs.std(axis=(1, 2))
        if act == "tanh":
            sat = (np.abs(hs) > 0.99).mean(axis=(1, 2))
            dead = np.full(num_layers, np.nan)
        else:
            sat = np.full(num_layers, np.nan)
            dead = (hs.max(axis=1) <= 0).mean(axis=-1)
        means.append(m)
        stds.append(s)
        sats.append(sat)
        deads.append(dead)
        counts.append(np.stack([np.histogram(np.clip(h, lo, hi), bins=edge)[0] for h in hs]))
        edges.append(edge)
        ratios.append(s[-1] / s[0] if s[0] > 0 else np.nan)
    return InitStatistics(
        labels=tuple(f"{act}, {name}" for act, name, _ in _INIT_CONFIGS),
        activation=tuple(act for act, _, _ in _INIT_CONFIGS),
        init=tuple(name for _, name, _ in _INIT_CONFIGS),
        layer_mean=np.stack(means),
        layer_std=np.stack(stds),
        saturated_fraction=np.stack(sats),
        dead_fraction=np.stack(deads),
        hist_counts=np.stack(counts),
        hist_edges=np.stack(edges),
        std_ratio=np.asarray(ratios),
        num_layers=num_layers,
        width=width,
        num_examples=n,
    )


def init_statistics_verdict(r: InitStatistics) -> Verdict:
    """Collapse for small weights and ReLU + lecun_normal, saturation for big ones, He keeps it."""
    ratio = dict(zip(r.labels, r.std_ratio.tolist(), strict=True))
    t_small, t_big, t_xav, r_xav, r_he = r.labels
    sat = {t_big: float(np.mean(r.saturated_fraction[r.labels.index(t_big)]))}
    # "Collapses" means the std shrinks by more than a decade over the 10 layers; "keeps its
    # scale" means within a factor 2 (He) or within a decade (tanh, Xavier: slow decay).
    checks = {
        "tanh + small_normal(0.01) collapses to zero": ratio[t_small] < 0.1,
        "tanh + small_normal(1.0) saturates (most |y| > 0.99)": sat[t_big] > 0.5,
        "tanh + 1/sqrt(fan_in) (lecun_normal) stays within a decade": ratio[t_xav] >= 0.1,
        "relu + 1/sqrt(fan_in) (lecun_normal) collapses": ratio[r_xav] < 0.1,
        "relu + He keeps the scale (within 2x)": 0.5 <= ratio[r_he] <= 2.0,
    }
    text = (
        "std(layer 10) / std(layer 1): "
        + "; ".join(f"{k}: {v:.3g}" for k, v in ratio.items())
        + f". Saturated fraction of tanh + small_normal(1.0): {sat[t_big]:.0%}."
    )
    claim = (
        "Small random weights make deep activations collapse to zero, large ones saturate tanh; "
        "the lecture's 'Xavier' init, randn / sqrt(fan_in) (lecun_normal), keeps tanh "
        "activations in range, ReLU needs He's factor 2."
    )
    return verdict_from_checks(claim, checks, text)


def init_statistics_table(r: InitStatistics):
    columns = (
        ["configuration"]
        + [f"std L{i + 1}" for i in range(r.num_layers)]
        + [
            "L10/L1",
            "saturated / dead (mean)",
        ]
    )
    rows = []
    for i, label in enumerate(r.labels):
        frac = r.saturated_fraction[i] if r.activation[i] == "tanh" else r.dead_fraction[i]
        rows.append(
            [label]
            + [f"{v:.3g}" for v in r.layer_std[i]]
            + [f"{r.std_ratio[i]:.3g}", f"{float(np.mean(frac)):.1%}"]
        )
    return columns, rows


# ---------------------------------------------------------------------------------------------
# 4. Preprocessing


class PreprocessingViews(NamedTuple):
    """Result of :func:`preprocessing_views`.

    Attributes:
      stages: ``("raw", "zero-centred", "normalised", "PCA (decorrelated)", "PCA-whitened",
        "ZCA-whitened")``.
      points: ``[S, N, 2]`` the 2-D cloud after each stage.
      mean: ``[S, 2]`` per-stage mean.
      cov: ``[S, 2, 2]`` per-stage sample covariance (denominator N - 1).
      var_population: ``[S, 2]`` per-stage variance with denominator N (normalize's convention).
      digit_images: ``[K, 8, 8]`` digits from the training split (pixels in [0, 1]).
      digit_zca: ``[K, 8, 8]`` the same digits ZCA-whitened (fitted on the training split).
      digit_pca: ``[K, 8, 8]`` the same digits PCA-whitened (same eps), shown beside the ZCA
        ones: PCA whitening rotates to the eigenbasis, so its images no longer look like digits.
      digit_offdiag_corr: ``(raw, zca)`` mean |off-diagonal correlation| between pixels.
      digit_distance: ``(zca, pca_whitened)`` mean squared distance of the whitened digits to the
        centred input (ZCA is the whitening closest to its input).
      zca_eps: the relative eps of the digits' whitening.
      notes: warnings raised while fitting (e.g. constant pixels left unscaled).
    """

    stages: tuple
    points: np.ndarray
    mean: np.ndarray
    cov: np.ndarray
    var_population: np.ndarray
    digit_images: np.ndarray
    digit_zca: np.ndarray
    digit_pca: np.ndarray
    digit_offdiag_corr: tuple
    digit_distance: tuple
    zca_eps: float
    notes: tuple


_STAGES = (
    ("raw", None),
    ("zero-centred", preprocessing.zero_center),
    ("normalised", preprocessing.normalize),
    ("PCA (decorrelated)", preprocessing.pca),
    ("PCA-whitened", preprocessing.pca_whiten),
    ("ZCA-whitened", preprocessing.zca_whiten),
)
_DIGITS_ZCA_EPS = 0.1


def _mean_abs_offdiag_corr(x):
    x = x[:, np.std(x, axis=0) > 1e-12]  # constant pixels (image corners) have no correlation
    c = np.corrcoef(x, rowvar=False)
    off = c[~np.eye(len(c), dtype=bool)]
    return float(np.mean(np.abs(off)))


def preprocessing_views(key: Any = 0, *, quick: bool = False) -> PreprocessingViews:
    """A correlated, offset 2-D Gaussian cloud through each preprocessing step; ZCA on digits.

    The cloud is ``x = z A + m`` with ``z ~ N(0, I)``, ``A = [[2, 1], [0, 0.4]]`` and
    ``m = (4, 2)``: offset, differently scaled and correlated. Every transform is fitted on the
    cloud itself. The digits (scikit-learn's, via :func:`jaxnorm.data.digits`) are ZCA-whitened
    with ``eps_mode="relative"``, ``eps=0.1``, fitted on the training split.

    Args:
      key: PRNG key or int seed for the cloud.
      quick: 200 points instead of 500.

    Returns:
      A :class:`PreprocessingViews`.

    Example:
      >>> from jaxnorm.lab import setup_experiments as s
      >>> r = s.preprocessing_views(0, quick=True)
      >>> r.points.shape
      (6, 200, 2)
    """
    from jaxnorm import data  # scikit-learn (the lab extra), imported when the digits are needed

    key = as_key(key)
    n = 200 if quick else 500
    z = jax.random.normal(key, (n, 2))
    x = z @ jnp.asarray([[2.0, 1.0], [0.0, 0.4]]) + jnp.asarray([4.0, 2.0])[None, :]
    notes = []
    points = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _, make in _STAGES:
            if make is None:
                points.append(np.asarray(x))
                continue
            t = make()
            points.append(np.asarray(t.apply(t.fit(x), x)))
        train = data.digits(seed=0).train
        xd = train.x
        zca = preprocessing.zca_whiten(_DIGITS_ZCA_EPS, eps_mode="relative")
        pw = preprocessing.pca_whiten(eps=_DIGITS_ZCA_EPS, eps_mode="relative")
        zd = np.asarray(zca.apply(zca.fit(xd), xd), np.float64)
        pd = np.asarray(pw.apply(pw.fit(xd), xd), np.float64)
    notes = tuple(dict.fromkeys(str(w.message) for w in caught))
    pts = np.stack(points).astype(np.float64)
    xc = np.asarray(xd, np.float64) - np.asarray(xd, np.float64).mean(axis=0)
    k = 6 if quick else 12
    return PreprocessingViews(
        stages=tuple(s for s, _ in _STAGES),
        points=pts,
        mean=pts.mean(axis=1),
        cov=np.stack([np.cov(p, rowvar=False) for p in pts]),
        var_population=pts.var(axis=1),
        digit_images=np.asarray(xd[:k]).reshape(k, 8, 8),
        digit_zca=zd[:k].reshape(k, 8, 8),
        digit_pca=pd[:k].reshape(k, 8, 8),
        digit_offdiag_corr=(_mean_abs_offdiag_corr(xc), _mean_abs_offdiag_corr(zd)),
        digit_distance=(
            float(np.mean(np.sum((zd - xc) ** 2, axis=1))),
            float(np.mean(np.sum((pd - xc) ** 2, axis=1))),
        ),
        zca_eps=_DIGITS_ZCA_EPS,
        notes=notes,
    )


def preprocessing_views_verdict(r: PreprocessingViews) -> Verdict:
    """Each step does what the lecture's figure shows, checked on the moments."""
    s = dict(zip(r.stages, range(len(r.stages)), strict=True))
    scale = float(np.max(np.abs(r.points[0])))
    eye = np.eye(2)
    tol = 1e-3
    pca_cov = r.cov[s["PCA (decorrelated)"]]
    checks = {
        "zero-centred mean is 0": bool(np.all(np.abs(r.mean[1:]) < 1e-5 * scale)),
        "normalised variances are 1": bool(
            np.allclose(r.var_population[s["normalised"]], 1.0, atol=tol)
        ),
        "PCA covariance is diagonal, variances decreasing": bool(
            abs(pca_cov[0, 1]) < tol * pca_cov[0, 0] and pca_cov[0, 0] >= pca_cov[1, 1]
        ),
        "PCA- and ZCA-whitened covariances are the identity": bool(
            np.allclose(r.cov[s["PCA-whitened"]], eye, atol=tol)
            and np.allclose(r.cov[s["ZCA-whitened"]], eye, atol=tol)
        ),
        "ZCA decorrelates digit pixels": r.digit_offdiag_corr[1] < r.digit_offdiag_corr[0],
        "ZCA-whitened digits stay closer to the input than PCA-whitened": r.digit_distance[0]
        < r.digit_distance[1],
    }
    text = (
        f"ZCA cov = {np.round(r.cov[s['ZCA-whitened']], 4).tolist()}; digits: mean |corr| "
        f"{r.digit_offdiag_corr[0]:.3f} raw -> {r.digit_offdiag_corr[1]:.3f} ZCA; squared "
        f"distance to input ZCA {r.digit_distance[0]:.1f} vs PCA-whitened "
        f"{r.digit_distance[1]:.1f}."
    )
    claim = (
        "Zero-centring removes the mean, normalising equalises the scales, PCA decorrelates, "
        "whitening gives identity covariance; ZCA whitening keeps images looking like images."
    )
    return verdict_from_checks(claim, checks, text)


def preprocessing_views_table(r: PreprocessingViews):
    columns = ["stage", "mean", "var (N-1)", "cov (N-1)", "corr"]
    rows = []
    for i, stage in enumerate(r.stages):
        c = r.cov[i]
        corr = c[0, 1] / np.sqrt(c[0, 0] * c[1, 1])
        rows.append(
            [
                stage,
                f"({r.mean[i, 0]:.3g}, {r.mean[i, 1]:.3g})",
                f"({c[0, 0]:.4g}, {c[1, 1]:.4g})",
                f"{c[0, 1]:.3g}",
                f"{corr:.3g}",
            ]
        )
    rows.append(
        [
            "digits, ZCA",
            "",
            "",
            "",
            f"mean |corr| {r.digit_offdiag_corr[0]:.3f} -> {r.digit_offdiag_corr[1]:.3f}",
        ]
    )
    return columns, rows


# ---------------------------------------------------------------------------------------------
# 6. Gradient check of a small BN + ReLU network


class GradientCheck(NamedTuple):
    """Result of :func:`gradient_check`.

    Attributes:
      passed: the check of the correct network passed.
      leaves: one dict per parameter: ``name, shape, num_checked, num_failed, num_kinks,
        max_relative_error, rtol``.
      report: ``str(report)``, the readable table of :func:`jaxnorm.gradcheck.check_grad`.
      control_passed: the same check on a deliberately wrong gradient (ReLU's slope halved in
        the backward pass); it must fail, or the check proves nothing. None in quick mode (not
        run).
      control_failed_leaves: the leaves the control flagged.
    """

    passed: bool
    leaves: tuple
    report: str
    control_passed: bool | None
    control_failed_leaves: tuple


@jax.custom_jvp
def _wrong_relu(x):
    return jnp.maximum(x, 0.0)


@_wrong_relu.defjvp
def _wrong_relu_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    # A planted bug: half the true slope, so the gradient check must catch it.
    return jnp.maximum(x, 0.0), jnp.where(x > 0, 0.5, 0.0).astype(t.dtype) * t


def _bn_relu_loss(relu):
    def loss(params, x, y):
        # No bias before batch norm: BN subtracts the mean, so its gradient would be exactly 0.
        h = x @ params["w1"]
        h, _ = batchnorm.batch_norm(
            h, params["scale"], params["bias"], batchnorm.init_state(h.shape[-1]), train=True
        )
        logits = relu(h) @ params["w2"] + params["b2"][None, :]
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=-1))

    return loss


def gradient_check(key: Any = 0, *, quick: bool = False) -> GradientCheck:
    """Check ``jax.grad`` of a Dense-BN-ReLU-Dense classifier against finite differences.

    The first Dense has no bias (batch norm's mean subtraction cancels it: its gradient is
    exactly zero, which checks nothing).

    Every coordinate of every parameter is checked (float64 centred differences, see
    :func:`jaxnorm.gradcheck.check_grad`), on 16 examples with 4 features, 8 hidden units and
    3 classes. A control network whose ReLU has a wrong derivative must fail the same check.

    Args:
      key: PRNG key or int seed.
      quick: skip the control (it costs as much as the check itself).

    Returns:
      A :class:`GradientCheck`.

    Example:
      >>> from jaxnorm.lab import setup_experiments as s
      >>> r = s.gradient_check(0, quick=True)
      >>> r.passed
      True
    """
    k1, k2, k3, k4 = jax.random.split(as_key(key), 4)
    x = jax.random.normal(k1, (16, 4))
    y = jax.random.randint(k2, (16,), 0, 3)
    params = {
        "w1": initializers.he_normal()(k3, (4, 8)),
        "scale": jnp.ones(8),
        "bias": jnp.zeros(8),
        "w2": initializers.xavier_normal()(k4, (8, 3)),
        "b2": jnp.zeros(3),
    }
    report = gradcheck.check_grad(_bn_relu_loss(activations.relu), params, x, y)
    control = None if quick else gradcheck.check_grad(_bn_relu_loss(_wrong_relu), params, x, y)
    leaves = tuple(
        {
            "name": leaf.name,
            "shape": list(leaf.shape),
            "num_checked": leaf.num_checked,
            "num_failed": leaf.num_failed,
            "num_kinks": leaf.num_kinks,
            "max_relative_error": leaf.max_relative_error,
            "rtol": leaf.rtol,
        }
        for leaf in report.leaves
    )
    return to_host(
        GradientCheck(
            passed=bool(report.passed),
            leaves=leaves,
            report=str(report),
            control_passed=None if control is None else bool(control.passed),
            control_failed_leaves=() if control is None else tuple(control.failed_leaves),
        )
    )


def gradient_check_verdict(r: GradientCheck) -> Verdict:
    """The analytic gradient of a BN+ReLU net matches finite differences; a planted bug fails."""
    worst = max((leaf["max_relative_error"] for leaf in r.leaves), default=float("nan"))
    checks = {
        "jax.grad matches centred differences on every leaf": r.passed,
        "the check catches a planted bug (wrong ReLU slope)": None
        if r.control_passed is None
        else not r.control_passed,
    }
    text = (
        f"largest relative error {worst:.2g} over "
        f"{sum(leaf['num_checked'] for leaf in r.leaves)} coordinates; the planted bug is "
        + (
            "not checked (quick mode)."
            if r.control_passed is None
            else f"flagged in {', '.join(r.control_failed_leaves)}."
            if not r.control_passed
            else "NOT flagged."
        )
    )
    claim = (
        "A correct analytic gradient agrees with the centred-difference numerical gradient to a "
        "small relative error (kinks aside)."
    )
    return verdict_from_checks(claim, checks, text)


def gradient_check_table(r: GradientCheck):
    columns = ["leaf", "shape", "checked", "failed", "kinks", "max rel. error", "rtol"]
    rows = [
        [
            leaf["name"],
            "x".join(map(str, leaf["shape"])) or "scalar",
            str(leaf["num_checked"]),
            str(leaf["num_failed"]),
            str(leaf["num_kinks"]),
            f"{leaf['max_relative_error']:.2g}",
            f"{leaf['rtol']:.0e}",
        ]
        for leaf in r.leaves
    ]
    return columns, rows
