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

from jaxnorm.lab._util import init_label


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
    ax_d.legend(fontsize=8, ncol=2, loc="upper left")
    return fig


_ACT_COLORS = {"relu": "C3", "tanh": "C1", "sigmoid": "C0"}


def plot_relu_convergence(r) -> Any:
    """Training accuracy per epoch for each activation (each seed thin, the mean bold)."""
    fig = new_figure(11, 4.0)
    ax, ax_r = fig.subplots(1, 2, width_ratios=[2, 1])
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
            ax_r.text(p, 0.02, "never", ha="center", rotation=90, fontsize=8)
    ax_r.axhline(1, color="k", lw=0.6)
    ax_r.set_xticks(pos, r.activations)
    ax_r.set(title="to target, ratio to tanh\n(wall time without compilation)")
    ax_r.legend(fontsize=8)
    return fig


def plot_init_statistics(r) -> Any:
    """Per-layer mean and std (top) and each layer's histogram (one row per configuration)."""
    import textwrap

    num_cfg, num_layers = r.layer_std.shape
    # Fixed grids: constrained layout over 50 small panels costs seconds per figure. Two grids,
    # so that the curves' x labels and the histograms' "layer k" titles get rows of their own.
    height = 2.6 + 1.2 * num_cfg
    fig = new_figure(13, height, layout=None)
    inch = 1.0 / height  # figure fraction of one inch, to place the grids in inches
    top = fig.add_gridspec(1, 2, left=0.12, right=0.99, top=1 - 0.3 * inch, bottom=1 - 2.2 * inch)
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
    ax_m.set(title="layer mean", xlabel="layer")
    ax_s.set(title="layer std (log)", xlabel="layer")
    ax_s.legend(fontsize=7, loc="lower left")
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
            ax.set_yticks([])
            ax.tick_params(labelsize=6, pad=1)
            if c == 0:
                ax.set_title(f"layer {layer + 1}", fontsize=8)
            if layer == 0:
                act, init = r.activation[c], r.init[c]
                ax.set_ylabel("\n".join([act, *textwrap.wrap(init, 20)]), fontsize=6.5)
    return fig


def plot_preprocessing_views(r) -> Any:
    """The 2-D cloud after each step (top) and digits before and after ZCA whitening (bottom)."""
    k = r.digit_images.shape[0]
    fig = new_figure(12, 8.2)
    ncols = 3 * max(2, math.ceil(k / 3))  # three scatter panels a row, k digits a row
    grid = fig.add_gridspec(4, ncols, height_ratios=[3, 3, 1, 1])
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
        for row, images, name in ((2, r.digit_images, "digits"), (3, r.digit_zca, "ZCA")):
            ax = fig.add_subplot(grid[row, j])
            ax.imshow(images[j], cmap="gray")
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(name, fontsize=8)
    return fig


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
                text = "NaN" if r.diverged[b, i, j] else f"{acc[i, j]:.2f}"
                ax.text(
                    j,
                    i,
                    text,
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="w" if shown[i, j] < 0.6 else "k",
                )
        ax.set_xticks(range(len(r.init_stds)), [f"{s:g}" for s in r.init_stds])
        ax.set_yticks(range(len(r.learning_rates)), [f"{v:g}" for v in r.learning_rates])
        ax.set(xlabel="initial weight std", ylabel="learning rate (SGD)", title=title)
    fig.colorbar(image, ax=axes, label="validation accuracy", shrink=0.9)
    return fig


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
    return fig


def plot_babysitting(r) -> Any:
    """Initial loss vs log(10); the overfit-20 curves; update/weight ratios over training."""
    fig = new_figure(13, 3.8)
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
    for lr, ratio in zip(r.learning_rates, r.update_ratio, strict=True):
        ax_u.semilogy(
            np.arange(len(ratio)),
            np.where(np.isfinite(ratio), ratio, np.nan),
            label=f"lr {lr:g}",
            lw=1,
        )
    ax_u.axhspan(1e-4, 1e-2, color="C2", alpha=0.1)
    ax_u.axhline(1e-3, color="k", ls="--", lw=0.8, label="1e-3")
    ax_u.set(xlabel="step", title="||update|| / ||W|| (layer 1)")
    ax_u.legend(fontsize=7, ncol=2)
    return fig


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
    return fig


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
    k = r.num_members
    pos = np.arange(k)
    ax_a.bar(pos - 0.2, r.member_accuracy, 0.4, label="final parameters")
    ax_a.bar(pos + 0.2, r.polyak_accuracy, 0.4, label="Polyak average")
    ax_a.bar([k + 0.5], [r.ensemble_accuracy], 0.6, color="C3", label="ensemble")
    ax_a.set_xticks([*pos, k + 0.5], [f"m{i}" for i in pos] + ["ensemble"])
    lo = min(np.min(r.member_accuracy), np.min(r.polyak_accuracy), r.ensemble_accuracy)
    ax_a.set_ylim(max(0.0, math.floor((lo - 0.02) * 50) / 50), 1.0)
    ax_a.set(ylabel="test accuracy")
    ax_a.legend(fontsize=8)
    return fig
