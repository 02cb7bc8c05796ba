"""Figures of the lab's experiments: each takes an experiment's result and returns a Figure.

Figures are built with ``matplotlib.figure.Figure`` on an Agg canvas, without ``pyplot``: no
global backend is set, no window opens, and nothing stays registered in pyplot's figure manager
(so a long run does not accumulate figures). matplotlib is the ``lab`` extra
(``pip install "jaxnorm[lab]"``); it is imported when a plot is made, never by ``import jaxnorm``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from jaxnorm.lab._util import INIT_LABELS, fmt_floor, init_label


def new_figure(width: float, height: float, *, layout: str | None = "constrained") -> Any:
    """A ``matplotlib.figure.Figure`` of ``width`` x ``height`` inches drawn by the Agg backend."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(
            'jaxnorm.lab needs matplotlib for its figures: pip install "jaxnorm[lab]"'
        ) from e
    fig = Figure(figsize=(width, height), layout=layout)
    FigureCanvasAgg(fig)
    return fig


# The report shows a figure at most this wide (its page: 1200 CSS px less padding, 96 px an
# inch) and saves it at REPORT_DPI; text must read at MIN_FONT_PT or more at that width.
PAGE_WIDTH_IN = 1168 / 96
REPORT_DPI = 150
MIN_FONT_PT = 9.0


def displayed_scale(fig: Any) -> float:
    """How much the report page scales the figure's text (1 = its nominal point sizes).

    The page shows the PNG (saved at :data:`REPORT_DPI`) at its natural size, or shrunk to the
    page's width when wider.
    """
    width_in = float(fig.get_figwidth())
    shown_px = min(width_in * REPORT_DPI, PAGE_WIDTH_IN * 96)
    return shown_px / (width_in * 96)


def min_font_size(fig: Any) -> float:
    """The smallest point size that reads as :data:`MIN_FONT_PT` once the page shows ``fig``."""
    return MIN_FONT_PT / min(1.0, displayed_scale(fig))


def finish(fig: Any) -> Any:
    """Raise every tick label and legend text of ``fig`` to :func:`min_font_size`; returns fig."""
    floor = min_font_size(fig)
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            for which in ("major", "minor"):
                ticks = axis.get_major_ticks() if which == "major" else axis.get_minor_ticks()
                size = min((t.label1.get_fontsize() for t in ticks), default=floor)
                if size < floor:
                    axis.set_tick_params(which=which, labelsize=floor)
        legend = ax.get_legend()
        if legend is not None:
            for t in legend.get_texts():
                t.set_fontsize(max(t.get_fontsize(), floor))
    return fig


def note_hidden_curves(
    ax: Any, curves: list, labels: list, *, rel_tol: float = 0.015, where: str = "inside"
) -> list:
    """Write on ``ax`` which curves lie under an earlier one (closer than ``rel_tol`` of the
    y-range at 90% of the points or more); returns the pairs ``(hidden, under)``.

    ``curves``: 1-D arrays on a shared x grid (NaN entries are ignored). ``where``:
    ``"inside"`` (a boxed note in the lower left corner) or ``"title"`` (a line under the
    panel's title). The note is wrapped to the panel's width.
    """
    arrays = [np.asarray(c, np.float64) for c in curves]
    finite = np.concatenate([a[np.isfinite(a)] for a in arrays]) if arrays else np.zeros(0)
    if finite.size == 0:
        return []
    lo, hi = ax.get_ylim() if ax.get_yscale() == "linear" else (finite.min(), finite.max())
    scale = max(abs(hi - lo), 1e-12)
    pairs = []
    for j in range(len(arrays)):
        for i in range(j):
            both = np.isfinite(arrays[i]) & np.isfinite(arrays[j])
            if not both.any() or (np.isfinite(arrays[i]) != np.isfinite(arrays[j])).any():
                continue
            a, b = arrays[i][both], arrays[j][both]
            if ax.get_yscale() == "log":
                a, b = np.log10(np.maximum(a, 1e-300)), np.log10(np.maximum(b, 1e-300))
                scale = max(np.log10(max(hi, 1e-300)) - np.log10(max(lo, 1e-300)), 1e-12)
            if np.mean(np.abs(a - b) <= rel_tol * scale) >= 0.9:
                pairs.append((labels[j], labels[i]))
                break
    if pairs:
        import textwrap

        text = "hidden: " + "; ".join(f"{h} lies under {u}" for h, u in pairs)
        # About 14 characters an inch at 9 pt.
        width_in = ax.get_position().width * ax.figure.get_figwidth()
        text = textwrap.fill(text, max(20, int(width_in * 14)))
        if where == "title":
            ax.set_title(f"{ax.get_title()}\n{text}", fontsize=MIN_FONT_PT)
            return pairs
        ax.text(
            0.01,
            0.01,
            text,
            transform=ax.transAxes,
            fontsize=MIN_FONT_PT,
            va="bottom",
            ha="left",
            wrap=True,
            bbox={"facecolor": "white", "alpha": 0.8, "lw": 0},
        )
    return pairs


_HIGHLIGHT = {"sigmoid": "C0", "tanh": "C1", "relu": "C3"}


def plot_activation_curves(r) -> Any:
    """The activations (left) and their derivatives (right); sigmoid, tanh, ReLU highlighted."""
    fig = new_figure(11, 4.2)
    ax_f, ax_d = fig.subplots(1, 2)
    others = 0
    for i, name in enumerate(r.names):
        if name in _HIGHLIGHT:
            style = {"lw": 2.2, "color": _HIGHLIGHT[name]}
        else:
            # The rest in colours the highlighted three do not use (C4..C9), dashed once reused.
            style = {
                "lw": 1.0,
                "alpha": 0.8,
                "color": f"C{4 + others % 6}",
                "ls": "-" if others < 6 else "--",
            }
            others += 1
        ax_f.plot(r.x, r.values[i], label=name, **style)
        ax_d.plot(r.x, r.derivatives[i], label=name, **style)
    ax_f.set(title="f(x)", xlabel="x", ylim=(-2, 5))
    ax_d.set(title="f'(x)  (jax.grad)", xlabel="x", ylim=(-0.3, 1.3))
    for ax in (ax_f, ax_d):
        ax.axhline(0, color="k", lw=0.5)
        ax.axvline(0, color="k", lw=0.5)
        ax.grid(alpha=0.3)
    ax_d.legend(fontsize=9, ncol=2, loc="upper left")
    ax_f.legend(fontsize=9, ncol=2, loc="upper left")
    names = list(r.names)
    note_hidden_curves(ax_f, list(r.values), names)
    note_hidden_curves(ax_d, list(r.derivatives), names)
    return finish(fig)


_ACT_COLORS = {"relu": "C3", "tanh": "C1", "sigmoid": "C0"}


def plot_relu_convergence(r) -> Any:
    """Training accuracy per epoch for each activation (each seed thin, the mean bold)."""
    fig = new_figure(12, 4.2)
    ax, ax_r, ax_d = fig.subplots(1, 3, width_ratios=[2, 1, 1.2])
    epochs = np.arange(1, r.epoch_accuracy.shape[-1] + 1)
    for name, init, acc in zip(r.activations, r.init, r.epoch_accuracy, strict=True):
        c = _ACT_COLORS.get(name)
        for seed in acc:
            ax.plot(epochs, seed, color=c, lw=0.6, alpha=0.4)
        ax.plot(epochs, acc.mean(axis=0), color=c, lw=2.2, label=f"{name}, {init_label(init)}")
    ax.axhline(r.target, color="k", ls="--", lw=0.8, label=f"target {r.target:.0%}")
    ax.set(xlabel="epoch", ylabel="training accuracy", title="same MLP on digits, SGD")
    ax.grid(alpha=0.3)
    ax.legend()
    ratios = [np.nan if v is None else v for v in r.epoch_ratio_to_tanh]
    times = [np.nan if v is None else v for v in r.time_ratio_to_tanh]
    pos = np.arange(len(r.activations))
    ax_r.bar(pos - 0.2, ratios, 0.4, label="epochs")
    ax_r.bar(pos + 0.2, times, 0.4, label="wall time")
    for p, v in zip(pos, ratios, strict=True):
        if not np.isfinite(v):
            ax_r.text(p, 0.02, "never", ha="center", rotation=90, fontsize=9)
    ax_r.axhline(1, color="k", lw=0.6)
    ax_r.set_xticks(pos, r.activations)
    ax_r.set(title="to target, ratio to tanh\n(wall time without compilation)")
    ax_r.legend(fontsize=9)
    cap = r.depth_epochs + 1
    if not r.depths:
        ax_d.text(
            0.5,
            0.5,
            "depth sweep not run\n(quick mode)",
            ha="center",
            va="center",
            transform=ax_d.transAxes,
            fontsize=MIN_FONT_PT,
        )
    for name, per_depth, marker in zip(
        ("relu", "tanh"), r.depth_epochs_to_target, "os", strict=True
    ):
        ys = [cap if v is None else v for v in per_depth]
        ax_d.plot(r.depths, ys, marker=marker, color=_ACT_COLORS[name], label=name)
    ax_d.axhline(cap, color="k", ls=":", lw=0.8, label="never (in the run)")
    ax_d.set_xticks(r.depths)
    ax_d.set(
        xlabel="hidden layers (no batch norm)",
        ylabel=f"epochs to {r.target:.0%}",
        title=f"depth sweep, {r.depth_width} units/layer",
    )
    ax_d.grid(alpha=0.3)
    ax_d.legend(fontsize=9)
    note_hidden_curves(
        ax_d,
        [np.asarray([cap if v is None else v for v in p], float) for p in r.depth_epochs_to_target],
        ["relu", "tanh"],
    )
    return finish(fig)


def plot_init_statistics(r) -> Any:
    """Per-layer mean and std (top) and each layer's histogram (one row per configuration)."""
    import textwrap

    num_cfg, num_layers = r.layer_std.shape
    # Fixed grids: constrained layout over 50 small panels costs seconds per figure. Two grids,
    # so that the curves' x labels and the histograms' "layer k" titles get rows of their own.
    height = 2.6 + 1.2 * num_cfg
    fig = new_figure(12, height, layout=None)
    inch = 1.0 / height  # figure fraction of one inch, to place the grids in inches
    top = fig.add_gridspec(1, 2, left=0.12, right=0.99, top=1 - 0.6 * inch, bottom=1 - 2.2 * inch)
    grid = fig.add_gridspec(
        num_cfg,
        num_layers,
        left=0.12,
        right=0.99,
        top=1 - 2.85 * inch,
        bottom=0.3 * inch,
        hspace=0.45,
        wspace=0.12,
    )
    ax_m = fig.add_subplot(top[0, 0])
    ax_s = fig.add_subplot(top[0, 1])
    layers = np.arange(1, num_layers + 1)
    for label, m, s in zip(r.labels, r.layer_mean, r.layer_std, strict=True):
        ax_m.plot(layers, m, marker="o", ms=3, label=label)
        ax_s.semilogy(layers, np.maximum(s, 1e-30), marker="o", ms=3, label=label)
    ax_m.set(title="layer mean (colours as on the right)", xlabel="layer")
    ax_s.set(title="layer std (log)", xlabel="layer")
    ax_s.legend(fontsize=9, loc="lower left")
    short = {"small_normal(0.01)": "N(0, 0.01²)", "small_normal(1.0)": "N(0, 1)"}
    short.update({v: k for k, v in INIT_LABELS.items()})
    names = [f"{a} {short.get(i, i)}" for a, i in zip(r.activation, r.init, strict=True)]
    note_hidden_curves(ax_m, list(r.layer_mean), names, where="title")
    for ax in (ax_m, ax_s):
        ax.grid(alpha=0.3)
        ax.set_xticks(layers)
    for c in range(num_cfg):
        edges = r.hist_edges[c]
        lo, hi = float(edges[0]), float(edges[-1])
        for layer in range(num_layers):
            ax = fig.add_subplot(grid[c, layer])
            # One stairs artist per histogram: bars (one patch per bin) make 50 panels slow.
            ax.stairs(r.hist_counts[c, layer], edges, fill=True, color=f"C{c}")
            ax.set_xlim(lo, hi)
            # Three ticks, so that neighbouring panels' labels do not run into each other.
            ax.set_xticks([lo, (lo + hi) / 2, hi], [f"{v:g}" for v in (lo, (lo + hi) / 2, hi)])
            # The end labels inside their panel, so that neighbours' labels never touch.
            ends = ax.get_xticklabels()
            ends[0].set_horizontalalignment("left")
            ends[-1].set_horizontalalignment("right")
            ax.set_yticks([])
            ax.tick_params(labelsize=MIN_FONT_PT, pad=1)
            if c == 0:
                ax.set_title(f"layer {layer + 1}", fontsize=9)
            if layer == 0:
                act, init = r.activation[c], r.init[c]
                ax.set_ylabel("\n".join([act, *textwrap.wrap(init, 20)]), fontsize=6.5)
    return finish(fig)


def plot_preprocessing_views(r) -> Any:
    """The 2-D cloud after each step (top); digits raw, PCA-whitened and ZCA-whitened (bottom)."""
    k = r.digit_images.shape[0]
    fig = new_figure(12, 9.4)
    ncols = 3 * max(2, math.ceil(k / 3))  # three scatter panels a row, k digits a row
    grid = fig.add_gridspec(5, ncols, height_ratios=[3, 3, 1, 1, 1])
    for i, stage in enumerate(r.stages):
        row, col = divmod(i, 3)
        cols = ncols // 3
        ax = fig.add_subplot(grid[row, col * cols : (col + 1) * cols])
        p = r.points[i]
        ax.scatter(p[:, 0], p[:, 1], s=4, alpha=0.6, color=f"C{i}")
        lim = max(3.0, float(np.max(np.abs(p))) * 1.05)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.axhline(0, color="k", lw=0.5)
        ax.axvline(0, color="k", lw=0.5)
        ax.set_title(stage, fontsize=10)
        ax.tick_params(labelsize=7)
    for j in range(k):
        for row, images, name in (
            (2, r.digit_images, "digits"),
            (3, r.digit_pca, "PCA-\nwhitened"),
            (4, r.digit_zca, "ZCA-\nwhitened"),
        ):
            ax = fig.add_subplot(grid[row, j])
            ax.imshow(images[j], cmap="gray")
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(name, fontsize=9)
    return finish(fig)


def plot_batchnorm_grid(r) -> Any:
    """Final validation accuracy over learning rate x init std, without and with batch norm."""
    fig = new_figure(11, 4.2)
    axes = fig.subplots(1, 2)
    image = None
    for b, (ax, title) in enumerate(
        zip(axes, ("without batch norm", "with batch norm"), strict=True)
    ):
        acc = r.accuracy[b]
        shown = np.where(np.isfinite(acc), acc, 0.0)
        image = ax.imshow(shown, vmin=0, vmax=1, cmap="viridis", origin="lower", aspect="auto")
        for i in range(acc.shape[0]):
            for j in range(acc.shape[1]):
                # Truncated, not rounded: a cell reads 0.90 only when it reaches 90%.
                text = "diverged" if r.diverged[b, i, j] else fmt_floor(acc[i, j], 2)
                ax.text(
                    j,
                    i,
                    text,
                    ha="center",
                    va="center",
                    fontsize=9,
                    color="w" if shown[i, j] < 0.6 else "k",
                )
        ax.set_xticks(range(len(r.init_stds)), [f"{s:g}" for s in r.init_stds])
        ax.set_yticks(range(len(r.learning_rates)), [f"{v:g}" for v in r.learning_rates])
        ax.set(xlabel="initial weight std", ylabel="learning rate (SGD)", title=title)
    fig.colorbar(image, ax=axes, label="validation accuracy", shrink=0.9)
    return finish(fig)


def plot_gradient_check(r) -> Any:
    """The largest relative error of each parameter against its tolerance."""
    fig = new_figure(7, 3.2)
    ax = fig.subplots()
    names = [leaf["name"] for leaf in r.leaves]
    errs = [max(leaf["max_relative_error"], 1e-16) for leaf in r.leaves]
    ax.bar(names, errs, color=["C2" if leaf["num_failed"] == 0 else "C3" for leaf in r.leaves])
    rtol = max((leaf["rtol"] for leaf in r.leaves), default=1e-3)
    ax.axhline(rtol, color="k", ls="--", lw=0.8, label=f"rtol {rtol:g}")
    ax.set_yscale("log")
    ax.set(ylabel="max relative error", title="jax.grad vs centred differences (float64)")
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    return finish(fig)


def plot_babysitting(r) -> Any:
    """Initial loss vs log(10); the overfit-20 curves; update/weight ratios over training."""
    fig = new_figure(12, 4.2)
    ax_l, ax_o, ax_u = fig.subplots(1, 3, width_ratios=[1, 1.4, 1.6])
    ax_l.bar(["initial loss", "log(10)"], [r.initial_loss, r.expected_loss], color=["C0", "C7"])
    ax_l.set(title="initial loss, no regularisation")
    steps = np.arange(len(r.overfit_loss))
    ax_o.plot(steps, r.overfit_loss, color="C0", label="loss")
    ax_o.set(xlabel="step", ylabel="loss", title="overfit 20 examples")
    ax_acc = ax_o.twinx()
    ax_acc.plot(steps, r.overfit_accuracy, color="C2", label="accuracy")
    ax_acc.set(ylabel="training accuracy", ylim=(0, 1.05))
    ax_o.grid(alpha=0.3)
    lines = ax_o.get_lines() + ax_acc.get_lines()
    ax_acc.legend(lines, [ln.get_label() for ln in lines], loc="center right")
    for lr, ratio, trains, diverged in zip(
        r.learning_rates, r.update_ratio, r.trains, r.diverged, strict=True
    ):
        tag = "diverged" if diverged else ("trains" if trains else "does not train")
        ax_u.semilogy(
            np.arange(len(ratio)),
            np.where(np.isfinite(ratio), ratio, np.nan),
            label=f"lr {lr:g} ({tag})",
            lw=1,
            ls="-" if trains else "--",
        )
    ax_u.axhspan(1e-4, 1e-2, color="C2", alpha=0.1)
    ax_u.axhline(1e-3, color="k", ls="--", lw=0.8, label="1e-3")
    ax_u.set(xlabel="step", title="||update|| / ||W|| (layer 1)")
    ax_u.legend(fontsize=9, ncol=2)
    return finish(fig)


def plot_hyperparameter_search(r) -> Any:
    """Validation accuracy over learning rate x weight decay (log axes), one marker per round."""
    fig = new_figure(8, 5.0)
    ax = fig.subplots()
    markers = "os^Dv"
    acc = np.where(np.isfinite(r.val_accuracy), r.val_accuracy, 0.0)
    image = None
    for i, space in enumerate(r.spaces):
        sel = r.round == i
        image = ax.scatter(
            r.learning_rate[sel],
            r.weight_decay[sel],
            c=acc[sel],
            vmin=0,
            vmax=1,
            cmap="viridis",
            marker=markers[i % len(markers)],
            edgecolors="k",
            linewidths=0.4,
            label=f"round {i}",
        )
        (lo, hi), (wlo, whi) = space["learning_rate"], space["weight_decay"]
        ax.add_patch(_rectangle(lo, wlo, hi - lo, whi - wlo, i))
    if r.best:
        ax.scatter(
            [r.best["learning_rate"]],
            [r.best["weight_decay"]],
            marker="*",
            s=250,
            color="C3",
            edgecolors="k",
            label="best",
        )
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="learning rate",
        ylabel="weight decay",
        title="coarse-to-fine random search (colour: validation accuracy)",
    )
    ax.legend(fontsize=8)
    if image is not None:
        fig.colorbar(image, ax=ax, label="validation accuracy")
    return finish(fig)


def _rectangle(x, y, w, h, i):
    from matplotlib.patches import Rectangle

    return Rectangle((x, y), w, h, fill=False, ls="--", lw=0.8, color=f"C{i}")


def plot_ensembles(r) -> Any:
    """Members' training loss (left); test accuracy of members, Polyak averages, the ensemble."""
    fig = new_figure(11, 4.0)
    ax_l, ax_a = fig.subplots(1, 2)
    window = max(1, r.train_loss.shape[1] // 50)
    kernel = np.ones(window) / window
    for i, loss in enumerate(r.train_loss):
        ax_l.plot(np.convolve(loss, kernel, mode="valid"), lw=1, label=f"member {i}")
    ax_l.set(xlabel="step", ylabel="training loss (smoothed)", title="members trained with vmap")
    ax_l.set_yscale("log")
    ax_l.grid(alpha=0.3)
    ax_l.legend()
    note_hidden_curves(
        ax_l,
        [np.convolve(loss, kernel, mode="valid") for loss in r.train_loss],
        [f"member {i}" for i in range(len(r.train_loss))],
    )
    k = r.num_members
    pos = np.arange(k)
    ax_a.bar(pos - 0.2, r.member_accuracy, 0.4, label="final parameters")
    ax_a.bar(pos + 0.2, r.polyak_accuracy, 0.4, label="Polyak average")
    ax_a.bar([k + 0.5], [r.ensemble_accuracy], 0.6, color="C3", label="ensemble")
    ax_a.set_xticks([*pos, k + 0.5], [f"m{i}" for i in pos] + ["ensemble"])
    lo = min(np.min(r.member_accuracy), np.min(r.polyak_accuracy), r.ensemble_accuracy)
    ax_a.set_ylim(max(0.0, math.floor((lo - 0.02) * 50) / 50), 1.0)
    ax_a.set(ylabel="test accuracy")
    ax_a.legend(fontsize=9)
    return finish(fig)


def plot_regularization(r) -> Any:
    """Train and validation accuracy against L2 strength, dropout rate and max-norm radius;
    validation accuracy at high learning rates without and with max-norm."""
    fig = new_figure(12, 7.0)
    axes = fig.subplots(2, 2).ravel()
    sweeps = (
        ("L2 strength lambda", r.l2_strengths, r.l2_train, r.l2_val, "symlog"),
        (
            "dropout rate (flax's rate = 1 - keep p)",
            r.dropout_rates,
            r.dropout_train,
            r.dropout_val,
            "linear",
        ),
        (
            "max-norm radius c (smaller = stronger)",
            r.max_norms,
            r.max_norm_train,
            r.max_norm_val,
            "log",
        ),
    )
    for ax, (label, xs, tr, va, scale) in zip(axes, sweeps, strict=False):
        xs = np.asarray(xs, np.float64)
        t, v = np.median(tr, axis=1), np.median(va, axis=1)
        ax.plot(xs, t, marker="o", color="C0", label="train (median)")
        ax.plot(xs, v, marker="s", color="C3", label="validation (median)")
        ax.axhline(r.best_val["none"], color="k", ls=":", lw=1, label="validation, none")
        if scale == "symlog":
            ax.set_xscale("symlog", linthresh=float(np.min(xs[xs > 0])))
            ax.set_xlim(0, float(xs.max()) * 1.5)
        elif scale == "log":
            ax.set_xscale("log")
            ax.set_xticks(xs, [f"{v:g}" for v in xs])
            ax.minorticks_off()
            ax.invert_xaxis()
        ax.set(xlabel=label, ylabel="accuracy", ylim=(min(0.8, float(np.min(v)) - 0.02), 1.01))
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left")
        note_hidden_curves(ax, [t, v], ["validation", "train"])
    ax = axes[3]
    hs = np.asarray(r.high_learning_rates, np.float64)
    for k, (name, color) in enumerate(
        (("no constraint", "C7"), (f"max-norm c = {r.chosen_max_norm:g}", "C2"))
    ):
        vals = r.high_lr_val[k]
        med = np.median(np.where(np.isfinite(vals), vals, 1.0 / 10), axis=1)
        ax.plot(hs, med, marker="o", color=color, label=name)
        for h, m, d in zip(hs, med, r.high_lr_diverged[k].any(axis=1), strict=True):
            if d:
                ax.annotate("diverged", (h, m), textcoords="offset points", xytext=(0, 6))
    ax.axhline(0.1, color="k", ls=":", lw=1, label="chance")
    ax.set_xscale("log")
    ax.set(
        xlabel="learning rate (SGD, momentum 0.9)",
        ylabel="validation accuracy",
        ylim=(0, 1.02),
        title=f"too-high learning rates (base {r.learning_rate:g})",
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    fig.suptitle(
        f"{r.num_train} training examples of the digits, MLP {list(r.widths)}, "
        f"{r.num_seeds} seed(s)"
    )
    return finish(fig)


_METHOD_COLORS = {
    "sgd": "C7",
    "momentum": "C0",
    "nesterov": "C9",
    "adagrad": "C2",
    "rmsprop": "C1",
    "adam": "C3",
}


def _smooth(v, window):
    kernel = np.ones(window) / window
    return np.convolve(v, kernel, mode="valid")


def plot_updates(r) -> Any:
    """Digits loss per step per method; trajectories on the ravine and the saddle; schedules."""
    fig = new_figure(12, 8.0)
    axes = fig.subplots(2, 2).ravel()
    ax = axes[0]
    window = max(1, r.num_steps // 30)
    curves, labels = [], []
    for m, lr, loss in zip(r.methods, r.digits_learning_rates, r.loss, strict=True):
        c = _METHOD_COLORS.get(m)
        for seed in loss:
            ax.plot(_smooth(seed, window), color=c, lw=0.5, alpha=0.35)
        med = _smooth(np.median(loss, axis=0), window)
        ax.plot(med, color=c, lw=2, label=f"{m} (lr {lr:g})")
        curves.append(med)
        labels.append(m)
    ax.set_yscale("log")
    ax.set(
        xlabel="step",
        ylabel="training loss (smoothed)",
        title=f"digits: median of {r.num_seeds} seed(s), thin: each seed",
    )
    ax.grid(alpha=0.3)
    ax.legend(ncol=2, loc="upper right")
    note_hidden_curves(ax, curves, labels)
    for ax, path, title, f in (
        (axes[1], r.ravine_path, "ravine f = 0.5 (0.1 x² + 10 y²)", "ravine"),
        (axes[2], r.saddle_path, "saddle f = x² + y⁴/4 - y²/2", "saddle"),
    ):
        xs = np.linspace(-9, 3, 200) if f == "ravine" else np.linspace(-1.2, 1.2, 200)
        ys = np.linspace(-1.5, 1.5, 200)
        gx, gy = np.meshgrid(xs, ys)
        z = (
            0.5 * (0.1 * gx**2 + 10 * gy**2)
            if f == "ravine"
            else gx**2 + 0.25 * gy**4 - 0.5 * gy**2
        )
        ax.contour(gx, gy, z, levels=20, colors="0.8", linewidths=0.6)
        # Widest first: a path that runs under a later one still shows as a wider band.
        widths = np.linspace(4.5, 1.2, len(r.methods))
        for m, p, lw in zip(r.methods, path, widths, strict=True):
            color = _METHOD_COLORS.get(m)
            if m == "sgd":
                # The baseline on top, thin and dashed: the others' wide bands cannot hide it.
                style = {"color": "k", "lw": 1.4, "ls": "--", "zorder": 5}
            else:
                style = {"color": color, "lw": lw, "alpha": 0.85}
            ax.plot(p[:, 0], p[:, 1], label=m, **style)
            ax.plot(*p[-1], marker="o", color=style["color"], ms=6, mec="k", ls="none", zorder=6)
        ax.plot(*path[0, 0], marker="*", color="k", ms=10, ls="none", label="start")
        ax.set(
            xlim=(xs[0], xs[-1]),
            ylim=(ys[0], ys[-1]),
            xlabel="x",
            ylabel="y",
            title=f"{title}, lr {r.surface_learning_rate:g}, {r.surface_steps} steps",
        )
        ax.legend(ncol=2, loc="lower right" if f == "ravine" else "upper left")
        top = f == "ravine"
        ax.text(
            0.99,
            0.99 if top else 0.01,
            "paths widest first, sgd dashed on top; dots: last step",
            transform=ax.transAxes,
            ha="right",
            va="top" if top else "bottom",
            fontsize=MIN_FONT_PT,
            bbox={"facecolor": "white", "alpha": 0.8, "lw": 0},
        )
        note_hidden_curves(ax, [p.T.ravel() for p in path], list(r.methods))
    ax = axes[3]
    window = max(1, r.num_steps // 30)
    curves = []
    for k, (name, loss) in enumerate(zip(r.schedules, r.schedule_loss, strict=True)):
        med = _smooth(np.median(loss, axis=0), window)
        ax.plot(med, color=f"C{k}", lw=1.8, label=name)
        curves.append(med)
    ax.set_yscale("log")
    ax.set(
        xlabel="step",
        ylabel="training loss (smoothed)",
        title="learning-rate decay (SGD + momentum 0.9, from 0.1)",
    )
    ax.grid(alpha=0.3)
    ax.legend()
    note_hidden_curves(ax, curves, list(r.schedules))
    return finish(fig)
