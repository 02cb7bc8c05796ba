"""The lab: the lecture's experiments as functions that return data, plots, and a report.

``jaxnorm lab`` (or ``python -m jaxnorm lab``) runs every experiment and writes
``lab-report/index.html`` (one self-contained page) and ``lab-report/results.json``. From Python::

    from jaxnorm import lab
    result = lab.init_statistics(0, quick=True)      # a NamedTuple of numbers and arrays
    print(lab.EXPERIMENTS["init"].verdict(result).status)
    fig = lab.plots.plot_init_statistics(result)     # a matplotlib Figure (Agg, no pyplot)

An experiment uses the key it is given; ``jaxnorm lab --seed N`` and :func:`run_experiment` give
experiment *i* ``fold_in(key(N), i)``, :func:`experiment_key`: pass
``lab.experiment_key(N, "init")`` to reproduce the command's numbers. The report writers are in
:mod:`jaxnorm.lab.report` (``from jaxnorm.lab import report``).

The experiments, in the lecture's order (the names are ``--only``'s):

=================  ==============================================================================
``activations``    :func:`activation_curves`: activations, derivatives, the properties table
``convergence``    :func:`relu_convergence`: ReLU vs tanh vs sigmoid, epochs and time to a target
``init``           :func:`init_statistics`: a 10-layer net's activation statistics per init
``preprocessing``  :func:`preprocessing_views`: a 2-D cloud through each step; ZCA on digits
``batchnorm``      :func:`batchnorm_grid`: with/without BN over learning rates x init scales
``regularization`` :func:`regularization`: L2, dropout, max-norm on a small split that overfits
``gradcheck``      :func:`gradient_check`: a BN+ReLU network's gradients vs finite differences
``babysitting``    :func:`babysitting`: initial loss, overfitting 20 examples, update ratios
``updates``        :func:`updates`: SGD, momentum, Nesterov, Adagrad, RMSProp, Adam; decay
``search``         :func:`hyperparameter_search`: coarse-to-fine random search on log axes
``ensembles``      :func:`ensembles`: a vmapped ensemble vs its members; Polyak averaging
=================  ==============================================================================

Each verdict is computed from the numbers by fixed rules written before the runs (see each
``*_verdict``); where the numbers disagree with the lecture, the report says so.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from typing import Any, NamedTuple

import jax

from jaxnorm.lab import plots
from jaxnorm.lab._util import TIE, Verdict, as_key
from jaxnorm.lab.regularization_experiments import (
    Regularization,
    Updates,
    regularization,
    regularization_table,
    regularization_verdict,
    updates,
    updates_table,
    updates_verdict,
)
from jaxnorm.lab.setup_experiments import (
    ActivationCurves,
    GradientCheck,
    InitStatistics,
    PreprocessingViews,
    activation_curves,
    activation_curves_table,
    activation_curves_verdict,
    gradient_check,
    gradient_check_table,
    gradient_check_verdict,
    init_statistics,
    init_statistics_table,
    init_statistics_verdict,
    preprocessing_views,
    preprocessing_views_table,
    preprocessing_views_verdict,
)
from jaxnorm.lab.training_experiments import (
    Babysitting,
    BatchNormGrid,
    Convergence,
    Ensembles,
    Search,
    babysitting,
    babysitting_table,
    babysitting_verdict,
    batchnorm_grid,
    batchnorm_grid_table,
    batchnorm_grid_verdict,
    ensembles,
    ensembles_table,
    ensembles_verdict,
    hyperparameter_search,
    hyperparameter_search_table,
    hyperparameter_search_verdict,
    relu_convergence,
    relu_convergence_table,
    relu_convergence_verdict,
)

__all__ = [
    "EXPERIMENTS",
    "TIE",
    "ActivationCurves",
    "Babysitting",
    "BatchNormGrid",
    "Convergence",
    "Ensembles",
    "Experiment",
    "GradientCheck",
    "InitStatistics",
    "Outcome",
    "PreprocessingViews",
    "Regularization",
    "Search",
    "Updates",
    "Verdict",
    "activation_curves",
    "babysitting",
    "batchnorm_grid",
    "ensembles",
    "experiment_key",
    "gradient_check",
    "hyperparameter_search",
    "init_statistics",
    "plots",
    "preprocessing_views",
    "regularization",
    "relu_convergence",
    "run_experiment",
    "updates",
]


class Experiment(NamedTuple):
    """One experiment of the lab.

    Attributes:
      name: its ``--only`` name.
      title: the section title.
      run: ``run(key, *, quick=False) -> result``.
      verdict: ``verdict(result) -> Verdict``.
      table: ``table(result) -> (columns, rows)``, strings for the report's table.
      plot: ``plot(result) -> matplotlib.figure.Figure``.
    """

    name: str
    title: str
    run: Callable[..., Any]
    verdict: Callable[[Any], Verdict]
    table: Callable[[Any], tuple]
    plot: Callable[[Any], Any]


EXPERIMENTS: dict[str, Experiment] = {
    e.name: e
    for e in (
        Experiment(
            "activations",
            "1. Activation functions and their derivatives",
            activation_curves,
            activation_curves_verdict,
            activation_curves_table,
            plots.plot_activation_curves,
        ),
        Experiment(
            "convergence",
            "2. ReLU vs tanh vs sigmoid: speed of convergence",
            relu_convergence,
            relu_convergence_verdict,
            relu_convergence_table,
            plots.plot_relu_convergence,
        ),
        Experiment(
            "init",
            "3. Weight initialisation: activations of a 10-layer net",
            init_statistics,
            init_statistics_verdict,
            init_statistics_table,
            plots.plot_init_statistics,
        ),
        Experiment(
            "preprocessing",
            "4. Data preprocessing: centring, normalising, PCA, whitening",
            preprocessing_views,
            preprocessing_views_verdict,
            preprocessing_views_table,
            plots.plot_preprocessing_views,
        ),
        Experiment(
            "batchnorm",
            "5. Batch norm: learning rates and init scales",
            batchnorm_grid,
            batchnorm_grid_verdict,
            batchnorm_grid_table,
            plots.plot_batchnorm_grid,
        ),
        Experiment(
            "regularization",
            "6. Regularization: L2, dropout, max-norm",
            regularization,
            regularization_verdict,
            regularization_table,
            plots.plot_regularization,
        ),
        Experiment(
            "gradcheck",
            "7. Gradient check of a BN + ReLU network",
            gradient_check,
            gradient_check_verdict,
            gradient_check_table,
            plots.plot_gradient_check,
        ),
        Experiment(
            "babysitting",
            "8. Babysitting the learning process",
            babysitting,
            babysitting_verdict,
            babysitting_table,
            plots.plot_babysitting,
        ),
        Experiment(
            "updates",
            "9. Parameter updates: SGD, momentum, Nesterov, Adagrad, RMSProp, Adam",
            updates,
            updates_verdict,
            updates_table,
            plots.plot_updates,
        ),
        Experiment(
            "search",
            "10. Hyperparameter search: coarse to fine",
            hyperparameter_search,
            hyperparameter_search_verdict,
            hyperparameter_search_table,
            plots.plot_hyperparameter_search,
        ),
        Experiment(
            "ensembles",
            "11. Model ensembles and Polyak averaging",
            ensembles,
            ensembles_verdict,
            ensembles_table,
            plots.plot_ensembles,
        ),
    )
}


class Outcome(NamedTuple):
    """What running one experiment gave.

    Attributes:
      name, title: the experiment's.
      result: its result (None when it raised).
      verdict: the :class:`Verdict` (None when it raised).
      table: ``(columns, rows)`` (empty when it raised).
      seconds: wall time of the run (compilation included).
      error: the traceback when the experiment raised, else None.
    """

    name: str
    title: str
    result: Any
    verdict: Verdict | None
    table: tuple
    seconds: float
    error: str | None


def experiment_key(seed: int, name: str) -> jax.Array:
    """The key experiment ``name`` gets from ``seed``: the same whether run alone or with others."""
    return jax.random.fold_in(as_key(seed), list(EXPERIMENTS).index(name))


def run_experiment(name: str, seed: int = 0, *, quick: bool = False) -> Outcome:
    """Run one experiment, its verdict and its table; an exception is caught into ``error``.

    ``KeyboardInterrupt`` is not caught (an interrupted run stops).

    Raises:
      ValueError: for an unknown name.
    """
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; known: {', '.join(EXPERIMENTS)}")
    e = EXPERIMENTS[name]
    start = time.perf_counter()
    try:
        result = e.run(experiment_key(seed, name), quick=quick)
        verdict = e.verdict(result)
        table = e.table(result)
    except Exception:
        return Outcome(
            name, e.title, None, None, ((), ()), time.perf_counter() - start, traceback.format_exc()
        )
    return Outcome(name, e.title, result, verdict, table, time.perf_counter() - start, None)
