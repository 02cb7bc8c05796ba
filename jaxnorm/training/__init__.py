"""Training dynamics over optax: a training loop, babysitting checks, vmapped search, ensembles.

optax does every parameter update (sgd, momentum, nesterov, adagrad, rmsprop, adam, schedules);
jaxnorm batches the data, records a :class:`History` (loss, accuracy, update ratios, the first NaN
step), and trains many models at once with ``jax.vmap``:

- :func:`fit` (pure, one ``lax.scan``: runs under jit/vmap) and :func:`train` (interactive: jitted
  blocks, tqdm bar, stops on NaN); :func:`mlp` builds a small classifier as pure functions.
- :func:`check_initial_loss`, :func:`overfit_small_subset`, :func:`learning_rate_scan`: the
  lecture's babysitting checks.
- :func:`random_search` / :func:`coarse_to_fine` over :func:`log_uniform`, :func:`uniform`,
  :func:`choice`: every trial in one vmapped program, chunked, sharded over devices.
- :func:`train_ensemble`, :func:`ensemble_predict`, :func:`polyak_average`: ensembles and
  parameter averaging.

>>> import jax, optax
>>> from jaxnorm import training
>>> model = training.mlp([4, 8, 3])
>>> params, state = model.init(jax.random.key(0))
>>> x = jax.random.normal(jax.random.key(1), (30, 4)); y = jax.numpy.arange(30) % 3
>>> params, hist = training.train(model, params, optax.adam(1e-2), (x, y),
...                               key=jax.random.key(2), num_steps=20, progress=False)
>>> hist.loss.shape, hist.nan_step
((20,), -1)
"""

from jaxnorm.training._babysit import (
    LearningRateScan,
    OverfitResult,
    check_initial_loss,
    learning_rate_scan,
    overfit_small_subset,
)
from jaxnorm.training._batch_stats import update_batch_stats
from jaxnorm.training._ensemble import ensemble_predict, snapshot_ensemble, train_ensemble
from jaxnorm.training._flax import FlaxModel, from_linen, from_nnx
from jaxnorm.training._loop import (
    DivergenceWarning,
    History,
    PolyakState,
    fit,
    polyak_average,
    polyak_params,
    shuffled_indices,
    train,
)
from jaxnorm.training._model import Model, classification_loss, evaluate, mlp
from jaxnorm.training._search import (
    BorderWarning,
    Choice,
    LogUniform,
    SearchResult,
    SearchWarning,
    Trial,
    Uniform,
    choice,
    coarse_to_fine,
    log_uniform,
    random_search,
    uniform,
)
from jaxnorm.training._updates import (
    NotesAdagradState,
    NotesMomentumState,
    inverse_time_decay,
    notes_adagrad,
    notes_momentum,
    notes_nesterov,
    sutskever_momentum,
)

__all__ = [
    "BorderWarning",
    "Choice",
    "DivergenceWarning",
    "FlaxModel",
    "History",
    "LearningRateScan",
    "LogUniform",
    "Model",
    "NotesAdagradState",
    "NotesMomentumState",
    "OverfitResult",
    "PolyakState",
    "SearchResult",
    "SearchWarning",
    "Trial",
    "Uniform",
    "check_initial_loss",
    "choice",
    "classification_loss",
    "coarse_to_fine",
    "ensemble_predict",
    "evaluate",
    "fit",
    "from_linen",
    "from_nnx",
    "inverse_time_decay",
    "learning_rate_scan",
    "log_uniform",
    "mlp",
    "notes_adagrad",
    "notes_momentum",
    "notes_nesterov",
    "overfit_small_subset",
    "polyak_average",
    "polyak_params",
    "random_search",
    "shuffled_indices",
    "snapshot_ensemble",
    "sutskever_momentum",
    "train",
    "train_ensemble",
    "uniform",
    "update_batch_stats",
]
