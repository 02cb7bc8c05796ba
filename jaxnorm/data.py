"""Small data sets for the lecture's experiments: real digits and synthetic 2-D sets.

Every set is a :class:`Dataset` ``(x, y)`` of JAX arrays, one example a row:

- ``x``: ``[N, D]`` floats (``[N, 8, 8, 1]`` for unflattened digits, NHWC as ``flax.linen.Conv``
  expects),
- ``y``: ``[N]`` int32 class labels in ``0 .. num_classes - 1``.

:func:`digits` is scikit-learn's bundled copy of the UCI handwritten digits (1797 images of 8x8
pixels, 10 classes, about 180 a class; no download), split into train/val/test sets
(:class:`Splits`) that depend only on ``seed``. scikit-learn is an optional dependency
(``pip install "jaxnorm[lab]"``), imported only when :func:`digits` is called.

:func:`gaussian_clouds` and :func:`spirals` draw synthetic sets from a PRNG key, for figures and
tests: clouds are linearly separable when far apart, the spirals (CS231n's toy set) are not.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["Dataset", "Splits", "digits", "gaussian_clouds", "spirals"]


class Dataset(NamedTuple):
    """Examples and labels: ``x`` is ``[N, D]`` (one example a row), ``y`` is ``[N]`` int32."""

    x: jax.Array
    y: jax.Array


class Splits(NamedTuple):
    """Disjoint train, validation and test sets."""

    train: Dataset
    val: Dataset
    test: Dataset


def _check_float_dtype(dtype: Any, who: str) -> np.dtype:
    try:
        dt = np.dtype(dtype)
    except TypeError as e:
        raise TypeError(f"{who}: dtype must be a floating dtype, but got {dtype!r}") from e
    if not jnp.issubdtype(dt, jnp.floating):
        raise TypeError(f"{who}: dtype must be a floating dtype (e.g. jnp.float32), not {dt}")
    return dt


def _compute_dtype(dt: np.dtype) -> np.dtype:
    # Sample in float32 (float64 for float64) and round once to a low-precision dtype.
    return np.dtype(np.float64) if dt == np.float64 else np.dtype(np.float32)


def _check_count(value: Any, name: str, who: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{who}: {name} must be a Python int, but got {value!r}")
    if value < minimum:
        raise ValueError(f"{who}: {name} must be at least {minimum}, but got {value}")
    return int(value)


def _check_key(key: Any, who: str) -> None:
    dtype = getattr(key, "dtype", None)
    if dtype is None or not (
        jnp.issubdtype(dtype, jax.dtypes.prng_key) or np.dtype(dtype) == np.uint32
    ):
        raise TypeError(
            f"{who}: key must be a PRNG key (jax.random.key(0)), but got {type(key).__name__}"
            + (f" of dtype {dtype}" if dtype is not None else "")
        )


def _check_real(value: Any, name: str, who: str) -> float:
    """A real Python/NumPy number as a float (TypeError otherwise: math.isfinite's names none)."""
    if isinstance(value, bool | np.bool_) or not isinstance(
        value, int | float | np.integer | np.floating
    ):
        raise TypeError(f"{who}: {name} must be a real number, but got {value!r}")
    return float(value)


def _check_fraction(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise TypeError(f"digits: {name} must be a number in [0, 1), but got {value!r}")
    v = float(value)
    if not 0.0 <= v < 1.0:
        raise ValueError(f"digits: {name} must be in [0, 1), but got {value}")
    return v


def _stratified_indices(
    labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # Written with NumPy's Generator rather than sklearn's train_test_split, so that the split
    # depends only on the seed and NumPy's PCG64 stream, not on the installed scikit-learn.
    rng = np.random.default_rng(seed)
    train, val, test = [], [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = round(len(idx) * test_fraction)
        n_val = round(len(idx) * val_fraction)
        if n_test + n_val >= len(idx):
            raise ValueError(
                f"digits: val_fraction + test_fraction leave no training example of class {c} "
                f"({len(idx)} examples); use smaller fractions"
            )
        test.append(idx[:n_test])
        val.append(idx[n_test : n_test + n_val])
        train.append(idx[n_test + n_val :])
    # Shuffle each split so that a minibatch taken in order is not a single class.
    return tuple(rng.permutation(np.concatenate(s)) for s in (train, val, test))


def digits(
    *,
    seed: int = 0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    flatten: bool = True,
    dtype: Any = jnp.float32,
) -> Splits:
    """scikit-learn's handwritten digits in stratified train/val/test splits.

    The raw pixels are integers 0..16 (a count of set pixels in 4x4 blocks of a 32x32 bitmap);
    they are scaled to [0, 1] by dividing by 16. Each class is split separately (stratified):
    ``round(n_c * test_fraction)`` of its ``n_c`` examples go to the test set,
    ``round(n_c * val_fraction)`` to the validation set and the rest to the training set, so the
    class proportions are the same in all three up to rounding. With the defaults the sizes are
    1259 / 269 / 269. The split depends only on ``seed``. No preprocessing beyond the scaling is
    applied: fit it on ``train`` (``jaxnorm.preprocessing``), as the lecture says.

    Args:
      seed: seeds the split (a non-negative int).
      val_fraction: share of each class in the validation set, in [0, 1).
      test_fraction: share of each class in the test set, in [0, 1).
      flatten: ``x`` as ``[N, 64]`` if True, else ``[N, 8, 8, 1]`` (NHWC).
      dtype: floating dtype of ``x``.

    Returns:
      ``Splits(train, val, test)`` of ``Dataset(x, y)``: ``x`` in [0, 1] with ``dtype``, ``y``
      int32 in 0..9.

    Raises:
      ImportError: scikit-learn is not installed.
      TypeError: a non-int seed, a non-number fraction, a non-float dtype, a non-bool flatten.
      ValueError: a negative seed, fractions outside [0, 1) or leaving no training example.

    References:
      Alpaydin & Kaynak 1998, "Optical Recognition of Handwritten Digits", UCI Machine Learning
      Repository; ``sklearn.datasets.load_digits``.

    Example:
      >>> from jaxnorm import data
      >>> train, val, test = data.digits(seed=0)
      >>> train.x.shape, val.x.shape, test.x.shape, train.y.dtype
      ((1259, 64), (269, 64), (269, 64), dtype('int32'))
    """
    seed = _check_count(seed, "seed", "digits", minimum=0)
    vf = _check_fraction(val_fraction, "val_fraction")
    tf = _check_fraction(test_fraction, "test_fraction")
    if vf + tf >= 1.0:
        raise ValueError(
            f"digits: val_fraction + test_fraction must be below 1 to leave a training set, "
            f"but they are {val_fraction} + {test_fraction}"
        )
    dt = _check_float_dtype(dtype, "digits")
    if not isinstance(flatten, bool | np.bool_):
        # A str such as "no" is truthy: it would flatten silently.
        raise TypeError(f"digits: flatten must be True or False, but got {flatten!r}")
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError(
            'jaxnorm.data.digits needs scikit-learn: pip install "jaxnorm[lab]" '
            "(or pip install scikit-learn)"
        ) from e
    raw = load_digits()
    x = np.asarray(raw.data, dtype=np.float64) / 16.0
    y = np.asarray(raw.target, dtype=np.int32)
    if not flatten:
        x = x.reshape(-1, 8, 8, 1)
    parts = _stratified_indices(y, vf, tf, seed)
    return Splits(*(Dataset(jnp.asarray(x[i], dtype=dt), jnp.asarray(y[i])) for i in parts))


def _class_labels(n: int, num_classes: int) -> np.ndarray:
    # Balanced: class c gets n // C examples, plus one for the first n % C classes.
    return np.arange(n, dtype=np.int32) % num_classes


def gaussian_clouds(
    key: jax.Array,
    n: int,
    *,
    num_classes: int = 3,
    dim: int = 2,
    separation: float = 3.0,
    stddev: float = 1.0,
    dtype: Any = jnp.float32,
) -> Dataset:
    r"""One isotropic Gaussian cloud per class, centres evenly spaced on a circle.

    Class ``c`` has centre :math:`\mu_c = r (\cos 2\pi c / C, \sin 2\pi c / C, 0, \dots, 0)` with
    ``r = separation`` (for ``dim = 1``: :math:`\mu_c = r (c - (C - 1) / 2)`), and
    :math:`x = \mu_c + \sigma z`, :math:`z \sim N(0, I_D)`. Classes are balanced (sizes differ by
    at most one) and the examples come in random order.

    Args:
      key: a PRNG key.
      n: total number of examples (a Python int >= num_classes).
      num_classes: number of classes C (>= 2).
      dim: dimension D of each example (>= 1).
      separation: radius r of the circle of centres.
      stddev: standard deviation :math:`\sigma` of each cloud (> 0).
      dtype: floating dtype of ``x``.

    Returns:
      ``Dataset(x [n, dim], y [n] int32)``.

    Raises:
      TypeError: non-int ``n``, ``num_classes`` or ``dim``; a non-float dtype; a non-number
        ``stddev`` or ``separation``; a ``key`` that is not a PRNG key.
      ValueError: ``num_classes < 2``, ``n < num_classes``, ``dim < 1``, ``stddev <= 0``.

    Example:
      >>> import jax
      >>> from jaxnorm import data
      >>> ds = data.gaussian_clouds(jax.random.key(0), 300, num_classes=3)
      >>> ds.x.shape, ds.y.shape
      ((300, 2), (300,))
    """
    who = "gaussian_clouds"
    _check_key(key, who)
    stddev = _check_real(stddev, "stddev", who)
    separation = _check_real(separation, "separation", who)
    num_classes = _check_count(num_classes, "num_classes", who, minimum=2)
    n = _check_count(n, "n", who, minimum=num_classes)
    dim = _check_count(dim, "dim", who, minimum=1)
    if not (math.isfinite(stddev) and stddev > 0):
        raise ValueError(f"{who}: stddev must be finite and positive, but got {stddev}")
    if not math.isfinite(separation):
        raise ValueError(f"{who}: separation must be finite, but got {separation}")
    dt = _check_float_dtype(dtype, who)
    c = np.arange(num_classes)
    centres = np.zeros((num_classes, dim))
    if dim == 1:
        centres[:, 0] = separation * (c - (num_classes - 1) / 2)
    else:
        angle = 2 * np.pi * c / num_classes
        centres[:, 0] = separation * np.cos(angle)
        centres[:, 1] = separation * np.sin(angle)
    k_perm, k_noise = jax.random.split(key)
    cdtype = _compute_dtype(dt)
    y = jax.random.permutation(k_perm, jnp.asarray(_class_labels(n, num_classes)))
    z = jax.random.normal(k_noise, (n, dim), cdtype)
    x = jnp.asarray(centres, cdtype)[y] + jnp.asarray(stddev, cdtype) * z
    return Dataset(x.astype(dt), y)


def spirals(
    key: jax.Array,
    n: int,
    *,
    num_classes: int = 3,
    noise: float = 0.2,
    dtype: Any = jnp.float32,
) -> Dataset:
    r"""CS231n's spiral set: ``num_classes`` interleaved arms in the plane, not linearly separable.

    Class ``c`` with ``m`` examples ``i = 0..m-1`` has radius :math:`r_i = i / (m - 1)` and angle
    :math:`t_i = 4 c + 4 i / (m - 1) + \text{noise} \cdot z_i`, :math:`z_i \sim N(0, 1)`, and
    :math:`x_i = (r_i \sin t_i, r_i \cos t_i)`, as in the CS231n notes (which draw
    ``N`` examples a class; here ``n`` is the total, split as evenly as possible). The examples
    come in random order.

    Args:
      key: a PRNG key.
      n: total number of examples (a Python int >= 2 * num_classes).
      num_classes: number of arms (>= 2).
      noise: standard deviation of the angle noise (>= 0).
      dtype: floating dtype of ``x``.

    Returns:
      ``Dataset(x [n, 2], y [n] int32)``, every ``|x| <= 1``.

    Raises:
      TypeError: non-int ``n`` or ``num_classes``; a non-float dtype; a non-number ``noise``;
        a ``key`` that is not a PRNG key.
      ValueError: ``num_classes < 2``, ``n < 2 * num_classes``, ``noise < 0``.

    References:
      CS231n, "Putting it together: minimal neural network case study",
      https://cs231n.github.io/neural-networks-case-study/.

    Example:
      >>> import jax
      >>> from jaxnorm import data
      >>> ds = data.spirals(jax.random.key(0), 300)
      >>> ds.x.shape, int(ds.y.max())
      ((300, 2), 2)
    """
    who = "spirals"
    _check_key(key, who)
    noise = _check_real(noise, "noise", who)
    num_classes = _check_count(num_classes, "num_classes", who, minimum=2)
    n = _check_count(n, "n", who, minimum=2 * num_classes)
    if not (math.isfinite(noise) and noise >= 0):
        raise ValueError(f"{who}: noise must be finite and non-negative, but got {noise}")
    dt = _check_float_dtype(dtype, who)
    # Position along its arm, in [0, 1], of every example: static, from the class sizes.
    labels = np.sort(_class_labels(n, num_classes))
    counts = np.bincount(labels, minlength=num_classes)
    pos = np.concatenate([np.linspace(0.0, 1.0, m) for m in counts])
    k_perm, k_noise = jax.random.split(key)
    cdtype = _compute_dtype(dt)
    r = jnp.asarray(pos, cdtype)
    t = jnp.asarray(4.0 * (labels + pos), cdtype)
    t = t + jnp.asarray(noise, cdtype) * jax.random.normal(k_noise, (n,), cdtype)
    x = jnp.stack([r * jnp.sin(t), r * jnp.cos(t)], axis=-1)
    order = jax.random.permutation(k_perm, n)
    return Dataset(x[order].astype(dt), jnp.asarray(labels)[order])
