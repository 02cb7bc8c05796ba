"""Model ensembles: K members initialised and trained at once with vmap over seeds."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxnorm.training._loop import History, fit
from jaxnorm.training._model import Model


def train_ensemble(
    loss_fn: Callable | Model,
    init_fn: Callable[[jax.Array], Any],
    optimizer: optax.GradientTransformation,
    data: Any,
    keys: jax.Array,
    *,
    num_steps: int | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    data_key: jax.Array | None = None,
    ema_decay: float | None = None,
) -> tuple[Any, History]:
    """Train K ensemble members at once: one :func:`fit` vmapped over K keys.

    Member ``k`` initialises from ``init_fn(k_init)`` and trains with its own minibatch order,
    where ``k_init, k_train = jax.random.split(keys[k])``. Members differ only through their keys,
    the lecture's "same model, different initialisations"; identical keys give identical members.
    With ``data_key`` every member sees the same minibatch order and they differ by their
    initialisation alone; on CPU that trains faster, as the members' first-layer matmuls merge.

    Args:
      loss_fn: as in :func:`fit` (a :class:`Model`, or a stateless ``loss_fn(params, batch, key)``).
      init_fn: ``init_fn(key) -> params``; for a :class:`Model`, ``model.init`` (returning
        ``(params, state)``).
      optimizer: any optax ``GradientTransformation``.
      data: a pytree of arrays with a common leading axis N, shared by every member.
      keys: ``[K]`` PRNG keys, e.g. ``jax.random.split(key, K)``.
      num_steps, epochs, batch_size, ema_decay: as in :func:`fit`.
      data_key: one PRNG key for the minibatch order of every member (default: each member's
        own, from its key).

    Returns:
      ``(params, history)`` stacked along a leading member axis of size K (``history.state``
      holds the members' batch-norm statistics).

    Raises:
      ValueError: if keys is not a 1-D array of keys (or anything :func:`fit` rejects).

    References:
      Dietterich 2000, "Ensemble methods in machine learning".

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from jaxnorm import training
      >>> model = training.mlp([2, 4, 2])
      >>> x = jnp.array([[0.0, 1.0], [1.0, 0.0]]); y = jnp.array([0, 1])
      >>> params, hist = training.train_ensemble(
      ...     model, model.init, optax.sgd(0.1), (x, y), jax.random.split(jax.random.key(0), 3),
      ...     num_steps=5)
      >>> params[0]["w"].shape, hist.loss.shape
      ((3, 2, 4), (3, 5))
    """
    keys = jnp.asarray(keys)
    typed = jax.dtypes.issubdtype(keys.dtype, jax.dtypes.prng_key)
    # Typed keys are [K]; raw uint32 keys (jax.random.PRNGKey) are [K, 2].
    if keys.ndim != (1 if typed else 2) or keys.shape[0] < 1:
        raise ValueError(
            "train_ensemble: keys must hold K >= 1 keys, e.g. jax.random.split(key, K), "
            f"got an array of shape {keys.shape}"
        )

    def member(key):
        k_init, k_train = jax.random.split(key)
        init = init_fn(k_init)
        params, state = init if isinstance(loss_fn, Model) else (init, None)
        return fit(
            loss_fn,
            params,
            optimizer,
            data,
            key=k_train,
            num_steps=num_steps,
            epochs=epochs,
            batch_size=batch_size,
            data_key=data_key,
            state=state,
            ema_decay=ema_decay,
        )

    return jax.vmap(member)(keys)


def ensemble_predict(
    apply_fn: Callable[[Any, jax.Array], jax.Array],
    stacked_params: Any,
    x: jax.Array,
    *,
    return_members: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    r"""The ensemble's class probabilities: the members' softmax outputs averaged.

    .. math:: p(y \mid x) = \frac{1}{K} \sum_{k=1}^{K} \mathrm{softmax}(f_k(x))

    Averaging probabilities (not logits) is the usual ensemble of classifiers; the members run
    with ``vmap`` over the leading axis of ``stacked_params``.

    Args:
      apply_fn: ``apply_fn(params, x) -> logits [N, C]`` for one member. For a :class:`Model`
        with batch norm, stack ``(params, state)`` and pass
        ``lambda ps, x: model.apply(ps[0], ps[1], x, train=False)[0]``.
      stacked_params: the members' parameters stacked on a leading axis K (as
        :func:`train_ensemble` returns them).
      x: ``[N, D]`` inputs.
      return_members: also return every member's probabilities.

    Returns:
      ``[N, C]`` averaged probabilities (float32 or wider), and ``[K, N, C]`` member
      probabilities when ``return_members``.

    Raises:
      ValueError: if the stacked parameters have no common leading axis.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxnorm import training
      >>> apply = lambda w, x: x @ w
      >>> ws = jnp.stack([jnp.eye(2), -jnp.eye(2)])  # two members that disagree
      >>> training.ensemble_predict(apply, ws, jnp.array([[5.0, 0.0]]))
      Array([[0.5, 0.5]], dtype=float32)
    """
    sizes = {jnp.shape(a)[0] if jnp.ndim(a) else None for a in jax.tree.leaves(stacked_params)}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            "ensemble_predict: stacked_params must have one leading member axis K on every leaf, "
            f"got leading sizes {sorted(map(str, sizes))}"
        )

    def member(params):
        logits = apply_fn(params, x)
        return jax.nn.softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), axis=-1)

    members = jax.vmap(member)(stacked_params)
    mean = jnp.mean(members, axis=0)
    return (mean, members) if return_members else mean
