"""Weight initializers: the lecture's naive init, the variance-scaling family, orthogonal, gains.

Every factory returns ``init(key, shape, dtype=jnp.float32, out_sharding=None) -> jax.Array``,
the call of a ``jax.nn.initializers`` initializer, so it plugs straight into Flax's ``kernel_init``
(linen and nnx). ``dtype=None`` (to the factory or to ``init``) means jax's default float dtype
(float32, float64 under ``jax_enable_x64``); ``out_sharding`` (a ``NamedSharding``, or a
``PartitionSpec`` under ``jax.set_mesh``) places the result, whose values are those drawn without
it. The options of the factories are keyword-only (``he_normal(in_axis=0)``, not
``he_normal(0)``), except ``orthogonal``'s ``scale``; jax.nn also takes them by position.

Fans follow Flax's kernel layout: a dense kernel is ``(in, out)``, a convolution kernel is
``(*spatial, in, out)`` such as ``(H, W, in, out)``, so ``fan_in = H * W * in`` and
``fan_out = H * W * out``. Axes that are neither ``in_axis``, ``out_axis`` nor ``batch_axis`` form
the receptive field, exactly as in ``jax.nn.initializers.variance_scaling``. PyTorch stores the
same kernels as ``(out, in)`` and ``(out, in, H, W)``; the fans are the same numbers.

Truncation, stated once here and in each docstring: jaxnorm's ``*_normal`` presets draw from a true
(untruncated) normal with exactly the stated standard deviation, as ``torch.nn.init``'s
``xavier_normal_`` and ``kaiming_normal_`` do. ``jax.nn.initializers``' ``lecun_normal``,
``he_normal`` and ``glorot_normal`` instead draw a normal truncated at +-2 of its own standard
deviations and enlarge that standard deviation by 1 / 0.87962566103423978 so that the truncated
samples have the stated one. ``truncated=True`` gives that distribution.

Same numbers as jax.nn: in float32, for the same key and shape, called eagerly, each preset returns
bit for bit the array of its ``jax.nn.initializers`` equivalent: ``small_normal(s)`` is
``normal(s)``; ``lecun_normal``, ``xavier_normal`` and ``he_normal`` with ``truncated=True`` are
``lecun_normal``, ``glorot_normal`` and ``he_normal``; ``lecun_uniform``, ``xavier_uniform`` and
``he_uniform`` are ``lecun_uniform``, ``glorot_uniform`` and ``he_uniform``;
``torch_linear_default`` is ``variance_scaling(1/3, "fan_in", "uniform")`` (default options);
``orthogonal(s, column_axis=a)`` is ``orthogonal(s, a)`` (any ``s`` and ``a``). This
holds because the scale is rounded exactly as jax.nn rounds it: ``variance = scale / fan`` in
float32, then ``sqrt(variance)``. A ``gain`` g enters as jax.nn's ``scale = g * g``. Inside a
caller's ``jit`` both are compiled with the caller's code and may differ from the eager result in
the last bit.

Samples are drawn in ``jnp.promote_types(dtype, jnp.float32)`` and cast to ``dtype`` once, so a
bfloat16 kernel is the float32 kernel rounded once (jax.nn draws in bfloat16 itself).

Complex dtypes (complex64, complex128) are drawn as ``jax.nn.initializers`` draws them, with the
variance read as ``E|w|^2``: a normal has real and imaginary parts ``N(0, sigma^2 / 2)``;
"uniform" is uniform on the disk with the same ``E|w|^2`` as the real law; ``truncated=True`` cuts
the modulus of the unit complex normal at 2 and widens it so the kept samples have exactly
``E|w|^2 = sigma^2`` (jax.nn's constant leaves 1.87% more); ``orthogonal`` gives a Haar-distributed
unitary matrix (``W^H W = scale^2 I``). The normal and uniform presets and ``orthogonal`` return
jax.nn's complex numbers bit for bit (same key, eager). Integer and bool dtypes raise ``TypeError``.

A zero-size shape (a dimension of size 0) draws nothing and returns an empty array of that shape
and dtype, as jax.nn's ``orthogonal`` does (jax.nn's variance-scaling initializers divide by a fan
of 0 and raise ``ZeroDivisionError`` instead).
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxnorm._checks import compute_dtype, is_tracer, normalize_axes
from jaxnorm.activations import _canonical_name

Initializer = Callable[..., jax.Array]
"""``init(key, shape, dtype=jnp.float32, out_sharding=None) -> jax.Array``, as jax.nn's."""

# Standard deviation of a standard normal truncated to (-2, 2): sqrt(1 - 4 phi(2) / (2 Phi(2) - 1)).
# The same constant jax.nn.initializers.variance_scaling divides by for "truncated_normal".
_TRUNCATED_STD = 0.87962566103423978
_TRUNCATION = 2.0
# Complex weights follow jax.nn.initializers: the variance is E|w|^2, half in the real part and half
# in the imaginary part, and "truncated" cuts the modulus of a unit complex normal (E|z|^2 = 1)
# at 2. Its |z|^2 is Exp(1), so the kept samples have E|z|^2 = E[X | X < 4] = 1 - 4e^-4 / (1 - e^-4)
# and the standard deviation below. jax.nn divides by 0.95311164 = sqrt(1 - 5 e^-4) instead, which
# leaves its complex truncated normals with 1.87% more variance than stated; jaxnorm's have the
# stated one.
_COMPLEX_TRUNCATED_STD = math.sqrt(1.0 - 4.0 * math.exp(-4.0) / (1.0 - math.exp(-4.0)))


# --------------------------------------------------------------------------------------------
# Validation (static: shapes, dtypes and Python numbers, so errors surface at trace time)
# --------------------------------------------------------------------------------------------


def _check_dtype(dtype: Any, who: str) -> np.dtype:
    if dtype is None:
        # jax.nn.initializers' default: float32, or float64 under jax_enable_x64.
        return np.dtype(jax.dtypes.canonicalize_dtype(np.float64))
    try:
        dt = jnp.dtype(dtype)
    except TypeError as e:
        raise TypeError(f"{who}: dtype {dtype!r} is not a dtype; pass e.g. jnp.float32") from e
    if not jnp.issubdtype(dt, jnp.inexact):
        raise TypeError(
            f"{who} draws floating-point weights, real (float16, bfloat16, float32, float64) or "
            f"complex (complex64, complex128), but dtype={dt} was requested; ask for a float "
            "dtype and cast afterwards if needed"
        )
    return dt


def _default_dtype(dtype: Any, who: str) -> np.dtype | None:
    """A factory's ``dtype``: checked now; None (jax.nn's default) is resolved when init runs."""
    return None if dtype is None else _check_dtype(dtype, who)


def _is_complex(dtype: Any) -> bool:
    return jnp.issubdtype(dtype, jnp.complexfloating)


def _check_shape(shape: Any, who: str) -> tuple[int, ...]:
    if isinstance(shape, int | np.integer):
        shape = (shape,)
    try:
        dims = tuple(operator.index(d) for d in shape)
    except TypeError as e:
        raise TypeError(f"{who}: shape must be a sequence of ints, but got {shape!r}") from e
    if any(d < 0 for d in dims):
        raise ValueError(f"{who}: shape {dims} has a negative dimension")
    return dims


def _check_key(key: Any, who: str) -> None:
    """TypeError unless ``key`` is a PRNG key: typed (``jax.random.key``) or raw uint32."""
    dtype = getattr(key, "dtype", None)
    if dtype is not None and (
        jnp.issubdtype(dtype, jax.dtypes.prng_key) or np.dtype(dtype) == np.uint32
    ):
        return
    raise TypeError(
        f"{who}: key must be a PRNG key (jax.random.key(0) or jax.random.PRNGKey(0)), but got "
        f"{type(key).__name__}" + (f" of dtype {dtype}" if dtype is not None else "")
    )


def _check_kernel_shape(shape: Any, who: str) -> tuple[int, ...]:
    dims = _check_shape(shape, who)
    if len(dims) < 2:
        raise ValueError(
            f"{who} needs a kernel shape with at least 2 dimensions ((in, out) for a dense layer, "
            f"(H, W, in, out) for a 2-D convolution), but got shape {dims}. A 1-D parameter such "
            "as a bias has no fan-in: initialise it with jax.nn.initializers.zeros, "
            "small_normal(), or torch_linear_bias_default(fan_in)"
        )
    return dims


def _check_scalar(value: Any, name: str, who: str, *, positive: bool = True) -> Any:
    """A concrete real number as a Python float (validated), or a tracer passed through."""
    if is_tracer(value):
        # A traced hyperparameter (e.g. vmapped over an init scale) cannot be checked statically.
        return value
    if isinstance(value, bool) or not isinstance(value, int | float | np.number | jax.Array):
        raise TypeError(f"{who}: {name} must be a real number, but got {value!r}")
    if np.ndim(value) != 0 or not np.isrealobj(value):
        raise TypeError(f"{who}: {name} must be a real scalar, but got {value!r}")
    v = float(value)
    if not math.isfinite(v) or (positive and v <= 0):
        what = "a finite number > 0" if positive else "a finite number"
        raise ValueError(f"{who}: {name} must be {what}, but got {value!r}")
    return v


def _sqrt(v: Any) -> Any:
    return jnp.sqrt(v) if is_tracer(v) else math.sqrt(v)


def _fans(
    shape: tuple[int, ...],
    in_axis: int | Sequence[int],
    out_axis: int | Sequence[int],
    batch_axis: int | Sequence[int],
    who: str,
) -> tuple[int, int]:
    """(fan_in, fan_out): in/out sizes times the receptive field (the remaining axes)."""
    ndim = len(shape)
    ins = normalize_axes(in_axis, ndim, "in_axis")
    outs = normalize_axes(out_axis, ndim, "out_axis")
    batch = normalize_axes(batch_axis, ndim, "batch_axis")
    if not ins or not outs:
        raise ValueError(f"{who}: in_axis and out_axis must each name at least one axis")
    named = ins + outs + batch
    if len(set(named)) != len(named):
        raise ValueError(
            f"{who}: in_axis={in_axis!r}, out_axis={out_axis!r} and batch_axis={batch_axis!r} "
            f"must name different axes of shape {shape}"
        )
    receptive = math.prod(shape[i] for i in range(ndim) if i not in named)
    fan_in = math.prod(shape[i] for i in ins) * receptive
    fan_out = math.prod(shape[i] for i in outs) * receptive
    return fan_in, fan_out


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


# The scale is applied with jax.nn.initializers' own float32 arithmetic, so that the presets give
# jax.nn's numbers bit for bit (same key, eager): the variance scale / fan is rounded to the
# sampling dtype, its square root is taken in that dtype, and the samples are multiplied by it. A
# float64 standard deviation rounded once is marginally more accurate but differs from jax.nn's in
# the last bit for many fans, and then in most entries. Not jitted as one program either: XLA fuses
# the draw with the multiply and rounds about a quarter of the products differently from jax.nn's
# op-by-op eager result. The draw itself is one compiled program (jax.random jits it), made over the
# flat size: the same numbers as drawing `shape` (threefry fills the flat size either way) at a
# fraction of the compile time for 4-D conv kernels.


def _normal(key, shape: tuple[int, ...], dtype, std: jax.Array, truncated: bool) -> jax.Array:
    """N(0, 1) samples (cut at +-2 if truncated) times ``std``, drawn in the compute dtype."""
    flat = (math.prod(shape),)
    cdtype = std.dtype
    if truncated:
        z = jax.random.truncated_normal(key, -_TRUNCATION, _TRUNCATION, flat, cdtype)
    else:
        z = jax.random.normal(key, flat, cdtype)
    return (z * std).astype(dtype).reshape(shape)


def _uniform(key, shape: tuple[int, ...], dtype, limit: jax.Array) -> jax.Array:
    """U(-1, 1) samples times ``limit``, drawn in the compute dtype."""
    u = jax.random.uniform(key, (math.prod(shape),), limit.dtype, -1.0, 1.0)
    return (u * limit).astype(dtype).reshape(shape)


def _complex(key, shape: tuple[int, ...], dtype, std: jax.Array, kind: str) -> jax.Array:
    """Complex samples with E|z|^2 = 1 times ``std`` (a complex scalar): jax.nn's draws, same key.

    ``kind`` is "normal" (real and imaginary parts N(0, 1/2)), "truncated_normal" (the modulus of
    that normal cut at 2) or "uniform" (uniform on the disk of radius sqrt(2)). The last two are
    drawn in polar form as jax.nn.initializers draws them: |z|^2 of a unit complex normal is Exp(1),
    so r = sqrt(-log(1 - t)) with t uniform on [0, 1 - e^-4); on the disk r = sqrt(2 u).
    """
    flat = (math.prod(shape),)
    cdtype = std.dtype
    if kind == "normal":
        z = jax.random.normal(key, flat, cdtype)
    else:
        key_r, key_theta = jax.random.split(key)
        real = np.finfo(cdtype).dtype
        if kind == "uniform":
            r = jnp.sqrt(2 * jax.random.uniform(key_r, flat, real)).astype(cdtype)
        else:
            t = (1 - jnp.exp(jnp.asarray(-(_TRUNCATION**2), cdtype))) * jax.random.uniform(
                key_r, flat, real
            ).astype(cdtype)
            r = jnp.sqrt(-jnp.log(1 - t))
        theta = 2 * np.pi * jax.random.uniform(key_theta, flat, real).astype(cdtype)
        z = r * jnp.exp(1j * theta)
    return (z * std).astype(dtype).reshape(shape)


def _sample_variance_scaling(key, shape, dtype, variance, distribution: str) -> jax.Array:
    """jax.nn.initializers.variance_scaling's sampling for a given ``variance = scale / fan``."""
    cdtype = compute_dtype(dtype)
    variance = jnp.asarray(variance, cdtype)
    if _is_complex(cdtype):
        # E|w|^2 = variance: the disk and the complex normals have E|z|^2 = 1 (see _complex).
        std = jnp.sqrt(variance)
        if distribution == "truncated_normal":
            std = std / jnp.asarray(_COMPLEX_TRUNCATED_STD, cdtype)
        return _complex(key, shape, dtype, std, distribution)
    if distribution == "uniform":
        # U(-a, a) has variance a^2 / 3.
        return _uniform(key, shape, dtype, jnp.sqrt(3 * variance))
    if distribution == "truncated_normal":
        # Cut at +-2 and widened so the kept samples have the standard deviation sqrt(variance).
        std = jnp.sqrt(variance) / jnp.asarray(_TRUNCATED_STD, cdtype)
        return _normal(key, shape, dtype, std, truncated=True)
    return _normal(key, shape, dtype, jnp.sqrt(variance), truncated=False)


def _check_variance(variance: Any, dtype, who: str) -> None:
    """ValueError when a concrete variance would draw inf: it must fit the compute dtype (times 3,
    uniform's limit squared), and 8 standard deviations must fit ``dtype``."""
    if is_tracer(variance):
        return
    v = float(variance)
    fits = v <= float(np.finfo(compute_dtype(dtype)).max) / 3
    if not (fits and 8 * math.sqrt(v) <= float(np.finfo(dtype).max)):
        raise ValueError(
            f"{who}: the weights' variance {v:.3g} (the gain squared over the fan) overflows "
            f"{np.dtype(dtype).name}, whose draws would be inf; use a smaller gain"
        )


def _empty(shape: tuple[int, ...], dtype, out_sharding) -> jax.Array:
    """A zero-size shape draws nothing, so it needs no scale (a fan may be 0): jax.nn's zeros."""
    return _place(jnp.zeros(shape, dtype), out_sharding)


def _place(w: jax.Array, out_sharding) -> jax.Array:
    """``out_sharding`` as jax.nn.initializers take it: a NamedSharding, or a PartitionSpec under
    ``jax.set_mesh``; the values are those drawn without it."""
    return w if out_sharding is None else jax.sharding.reshard(w, out_sharding)


def _variance_scaling(
    who: str,
    variance_of_fans: Callable[[float, float], Any],
    distribution: str,
    in_axis,
    out_axis,
    batch_axis,
    default_dtype,
) -> Initializer:
    """An init whose samples have variance ``variance_of_fans(fan_in, fan_out)``.

    ``variance_of_fans`` returns jax.nn's ``scale / denominator`` (a Python float, or a tracer for
    a traced hyperparameter), written in jax.nn's order of operations so the rounding agrees.
    """
    default_dtype = _default_dtype(default_dtype, who)

    def init(
        key: jax.Array, shape: Sequence[int], dtype: Any = default_dtype, out_sharding: Any = None
    ) -> jax.Array:
        _check_key(key, who)
        dt = _check_dtype(default_dtype if dtype is None else dtype, who)
        dims = _check_kernel_shape(shape, who)
        fan_in, fan_out = _fans(dims, in_axis, out_axis, batch_axis, who)
        if math.prod(dims) == 0:
            return _empty(dims, dt, out_sharding)
        variance = variance_of_fans(fan_in, fan_out)
        _check_variance(variance, dt, who)
        return _place(_sample_variance_scaling(key, dims, dt, variance, distribution), out_sharding)

    return init


def _normal_kind(truncated: bool, who: str) -> str:
    if not isinstance(truncated, bool):
        raise TypeError(f"{who}: truncated must be True or False, but got {truncated!r}")
    return "truncated_normal" if truncated else "normal"


# --------------------------------------------------------------------------------------------
# Public initializers
# --------------------------------------------------------------------------------------------


def small_normal(stddev: float = 0.01, *, dtype: Any = jnp.float32) -> Initializer:
    r"""The lecture's naive initialisation, ``W = stddev * randn(shape)``.

    .. math:: W_{ij} \sim \mathcal{N}(0, \sigma^2), \quad \sigma = \text{stddev} = 0.01

    An untruncated normal, bit for bit ``jax.nn.initializers.normal(stddev)`` in float32 (same
    key, eager). It needs no fans, so it accepts any shape (biases and empty shapes included).
    Fine for small networks; in deep ones the activations shrink layer by layer (each layer
    multiplies their scale by about ``stddev * sqrt(fan_in)``), and the gradients with them: the
    lecture's motivating failure for variance-scaling initializers.

    Args:
      stddev: the standard deviation (a positive number; may be traced, e.g. under ``vmap``).
      dtype: the default dtype of the weights.

    Returns:
      ``init(key, shape, dtype=dtype, out_sharding=None)``.

    Raises:
      TypeError: ``stddev`` is not a real number, ``init`` is given a non-key ``key`` or
        asked for an integer or bool dtype.
      ValueError: ``stddev`` is not finite and positive, or the shape has a negative dimension.

    References:
      Karpathy et al., CS231n "Training Neural Networks, Part 1" (2016): ``0.01 * np.random.randn``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxnorm import initializers
      >>> w = initializers.small_normal()(jax.random.key(0), (784, 100))
      >>> w.shape, w.dtype
      ((784, 100), dtype('float32'))
    """
    who = "small_normal"
    stddev = _check_scalar(stddev, "stddev", who)
    default_dtype = _default_dtype(dtype, who)

    def init(
        key: jax.Array, shape: Sequence[int], dtype: Any = default_dtype, out_sharding: Any = None
    ) -> jax.Array:
        _check_key(key, who)
        dt = _check_dtype(default_dtype if dtype is None else dtype, who)
        # As jax.nn.initializers.normal: the samples times stddev rounded to the sampling dtype
        # (complex: real and imaginary parts each N(0, stddev^2 / 2), so E|w|^2 = stddev^2).
        std = jnp.asarray(stddev, compute_dtype(dt))
        w = _normal(key, _check_shape(shape, who), dt, std, truncated=False)
        return _place(w, out_sharding)

    return init


def xavier_normal(
    *,
    gain: float = 1.0,
    truncated: bool = False,
    in_axis: int | Sequence[int] = -2,
    out_axis: int | Sequence[int] = -1,
    batch_axis: int | Sequence[int] = (),
    dtype: Any = jnp.float32,
) -> Initializer:
    r"""Glorot / Xavier normal initialisation (fan_avg).

    .. math:: W \sim \mathcal{N}(0, \sigma^2), \quad
              \sigma = \text{gain} \cdot \sqrt{2 / (\text{fan\_in} + \text{fan\_out})}

    An **untruncated** normal by default, like ``torch.nn.init.xavier_normal_(w, gain)``.
    ``truncated=True`` gives ``jax.nn.initializers.glorot_normal`` (truncated at +-2 of the
    widened std, final std exactly sigma; with ``gain=1`` bit for bit the same float32 numbers for
    the same key, eager).
    Not the lecture's "Xavier" (``randn / sqrt(fan_in)``): that one is :func:`lecun_normal`.

    Args:
      gain: multiplies the standard deviation (``gain**2`` the variance), as torch's ``gain``;
        see :func:`gain`. Unlike ``jax.nn.initializers.variance_scaling``'s ``scale``, which
        multiplies the variance.
      truncated: draw jax.nn's truncated normal instead of a true normal.
      in_axis: the input axis or axes of the kernel (default -2).
      out_axis: the output axis or axes (default -1).
      batch_axis: axes left out of the fans (default none), as in jax.nn.
      dtype: the default dtype of the weights.

    Returns:
      ``init(key, shape, dtype=dtype, out_sharding=None)`` for kernels of at least 2
      dimensions; a zero-size shape gives an empty array.

    Raises:
      TypeError: a non-number option, ``init`` is given a non-key ``key`` or
        asked for an integer or bool dtype.
      ValueError: ``gain`` not finite and positive, or so large that ``init``'s draws
        overflow the dtype; a kernel shape with fewer than 2 dimensions;
        axes out of range or overlapping.

    References:
      Glorot & Bengio 2010, "Understanding the difficulty of training deep feedforward neural
      networks", AISTATS.

    Example:
      >>> import jax
      >>> from jaxnorm import initializers
      >>> w = initializers.xavier_normal()(jax.random.key(0), (300, 100))
      >>> w.shape
      (300, 100)
    """
    who = "xavier_normal"
    g = _check_scalar(gain, "gain", who)
    return _variance_scaling(
        who,
        # jax.nn's glorot: variance_scaling(scale=gain**2, "fan_avg"), fan_avg = (in + out) / 2.
        lambda fi, fo: g * g / ((fi + fo) / 2),
        _normal_kind(truncated, who),
        in_axis,
        out_axis,
        batch_axis,
        dtype,
    )


def xavier_uniform(
    *,
    gain: float = 1.0,
    in_axis: int | Sequence[int] = -2,
    out_axis: int | Sequence[int] = -1,
    batch_axis: int | Sequence[int] = (),
    dtype: Any = jnp.float32,
) -> Initializer:
    r"""Glorot / Xavier uniform initialisation (fan_avg).

    .. math:: W \sim U(-a, a), \quad
              a = \text{gain} \cdot \sqrt{6 / (\text{fan\_in} + \text{fan\_out})}

    so that the standard deviation is ``a / sqrt(3) = gain * sqrt(2 / (fan_in + fan_out))``. The
    same distribution as ``torch.nn.init.xavier_uniform_``; with ``gain=1`` bit for bit the float32
    numbers of ``jax.nn.initializers.glorot_uniform`` for the same key (eager).

    Args:
      gain: multiplies the standard deviation and the bound (see :func:`gain`).
      in_axis: the input axis or axes of the kernel (default -2).
      out_axis: the output axis or axes (default -1).
      batch_axis: axes left out of the fans (default none), as in jax.nn.
      dtype: the default dtype of the weights.

    Returns:
      ``init(key, shape, dtype=dtype, out_sharding=None)`` for kernels of at least 2
      dimensions; a zero-size shape gives an empty array.

    Raises:
      TypeError: a non-number option, ``init`` is given a non-key ``key`` or
        asked for an integer or bool dtype.
      ValueError: ``gain`` not finite and positive, or so large that ``init``'s draws
        overflow the dtype; a kernel shape with fewer than 2 dimensions;
        axes out of range or overlapping.

    References:
      Glorot & Bengio 2010, "Understanding the difficulty of training deep feedforward neural
      networks", AISTATS, eq. 16.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxnorm import initializers
      >>> w = initializers.xavier_uniform()(jax.random.key(0), (300, 100))
      >>> bool(jnp.abs(w).max() <= (6 / 400) ** 0.5)
      True
    """
    who = "xavier_uniform"
    g = _check_scalar(gain, "gain", who)
    return _variance_scaling(
        who,
        lambda fi, fo: g * g / ((fi + fo) / 2),
        "uniform",
        in_axis,
        out_axis,
        batch_axis,
        dtype,
    )


def _he_variance(negative_slope: Any, mode: str, who: str) -> Callable[[float, float], Any]:
    a = _check_scalar(negative_slope, "negative_slope", who, positive=False)
    if mode not in ("fan_in", "fan_out"):
        raise ValueError(f"{who}: mode must be 'fan_in' or 'fan_out', but got {mode!r}")
    # The squared gain 2 / (1 + a^2) is jax.nn's scale (2.0 for relu), not a rounded sqrt squared.
    scale = 2.0 / (1.0 + a * a)
    if mode == "fan_in":
        return lambda fi, fo: scale / fi
    return lambda fi, fo: scale / fo


def he_normal(
    *,
    negative_slope: float = 0.0,
    mode: str = "fan_in",
    truncated: bool = False,
    in_axis: int | Sequence[int] = -2,
    out_axis: int | Sequence[int] = -1,
    batch_axis: int | Sequence[int] = (),
    dtype: Any = jnp.float32,
) -> Initializer:
    r"""He / Kaiming normal initialisation for ReLU-family networks (fan_in, gain sqrt(2)).

    .. math:: W \sim \mathcal{N}(0, \sigma^2), \quad
              \sigma = \sqrt{2 / (1 + a^2)} \,/\, \sqrt{\text{fan\_in}}

    with ``a = negative_slope`` (0 for ReLU, the leaky/PReLU slope otherwise: He et al.'s eq. 15).
    An **untruncated** normal by default, the same distribution as
    ``torch.nn.init.kaiming_normal_(w, a, mode, nonlinearity="leaky_relu")`` (torch's default
    ``a=0`` makes it relu). ``truncated=True`` gives ``jax.nn.initializers.he_normal`` (bit for bit
    the same float32 numbers for the same key, eager, when ``negative_slope=0``).

    Args:
      negative_slope: the slope of the activation for x < 0 (0 for ReLU).
      mode: ``"fan_in"`` (preserves the forward variance, the default) or ``"fan_out"``
        (preserves the backward variance), as in torch.
      truncated: draw jax.nn's truncated normal instead of a true normal.
      in_axis: the input axis or axes of the kernel (default -2).
      out_axis: the output axis or axes (default -1).
      batch_axis: axes left out of the fans (default none), as in jax.nn.
      dtype: the default dtype of the weights.

    Returns:
      ``init(key, shape, dtype=dtype, out_sharding=None)`` for kernels of at least 2
      dimensions; a zero-size shape gives an empty array.

    Raises:
      TypeError: a non-number option, ``init`` is given a non-key ``key`` or
        asked for an integer or bool dtype.
      ValueError: a bad ``mode``; ``negative_slope`` not finite; a kernel shape with fewer than 2
        dimensions; axes out of range or overlapping.

    References:
      He, Zhang, Ren & Sun 2015, "Delving deep into rectifiers: surpassing human-level performance
      on ImageNet classification", ICCV.

    Example:
      >>> import jax
      >>> from jaxnorm import initializers
      >>> w = initializers.he_normal()(jax.random.key(0), (3, 3, 16, 32))  # fan_in = 3*3*16
      >>> w.shape
      (3, 3, 16, 32)
    """
    who = "he_normal"
    return _variance_scaling(
        who,
        _he_variance(negative_slope, mode, who),
        _normal_kind(truncated, who),
        in_axis,
        out_axis,
        batch_axis,
        dtype,
    )


def he_uniform(
    *,
    negative_slope: float = 0.0,
    mode: str = "fan_in",
    in_axis: int | Sequence[int] = -2,
    out_axis: int | Sequence[int] = -1,
    batch_axis: int | Sequence[int] = (),
    dtype: Any = jnp.float32,
) -> Initializer:
    r"""He / Kaiming uniform initialisation (fan_in, gain sqrt(2)).

    .. math:: W \sim U(-b, b), \quad
              b = \sqrt{3} \cdot \sqrt{2 / (1 + a^2)} \,/\, \sqrt{\text{fan\_in}}

    The same distribution as ``torch.nn.init.kaiming_uniform_(w, a, mode)`` and, for ``a = 0``,
    bit for bit the float32 numbers of ``jax.nn.initializers.he_uniform`` (same key, eager).
    (PyTorch's *layer default* is a different thing: see :func:`torch_linear_default`.)

    Args:
      negative_slope: the slope of the activation for x < 0 (0 for ReLU).
      mode: ``"fan_in"`` (default) or ``"fan_out"``.
      in_axis: the input axis or axes of the kernel (default -2).
      out_axis: the output axis or axes (default -1).
      batch_axis: axes left out of the fans (default none), as in jax.nn.
      dtype: the default dtype of the weights.

    Returns:
      ``init(key, shape, dtype=dtype, out_sharding=None)`` for kernels of at least 2
      dimensions; a zero-size shape gives an empty array.

    Raises:
      TypeError: a non-number option, ``init`` is given a non-key ``key`` or
        asked for an integer or bool dtype.
      ValueError: a bad ``mode``; ``negative_slope`` not finite; a kernel shape with fewer than 2
        dimensions; axes out of range or overlapping.

    References:
      He, Zhang, Ren & Sun 2015, "Delving deep into rectifiers", ICCV.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxnorm import initializers
      >>> w = initializers.he_uniform()(jax.random.key(0), (600, 10))
      >>> bool(jnp.abs(w).max() <= (6 / 600) ** 0.5)
      True
    """
    who = "he_uniform"
    return _variance_scaling(
        who,
        _he_variance(negative_slope, mode, who),
        "uniform",
        in_axis,
        out_axis,
        batch_axis,
        dtype,
    )


def lecun_normal(
    *,
    gain: float = 1.0,
    truncated: bool = False,
    in_axis: int | Sequence[int] = -2,
    out_axis: int | Sequence[int] = -1,
    batch_axis: int | Sequence[int] = (),
    dtype: Any = jnp.float32,
) -> Initializer:
    r"""LeCun normal initialisation (fan_in): the lecture's "Xavier", ``randn / sqrt(fan_in)``.

    .. math:: W \sim \mathcal{N}(0, \sigma^2), \quad \sigma = \text{gain} / \sqrt{\text{fan\_in}}

    An **untruncated** normal by default. ``truncated=True`` gives
    ``jax.nn.initializers.lecun_normal`` (bit for bit the same float32 numbers for the same key,
    eager, with ``gain=1``). With ``gain=gain("tanh")`` it is ``torch.nn.init.kaiming_normal_(w,
    nonlinearity="tanh")``; SELU networks use ``gain=1`` (Klambauer et al. 2017).

    Args:
      gain: multiplies the standard deviation (see :func:`gain`).
      truncated: draw jax.nn's truncated normal instead of a true normal.
      in_axis: the input axis or axes of the kernel (default -2).
      out_axis: the output axis or axes (default -1).
      batch_axis: axes left out of the fans (default none), as in jax.nn.
      dtype: the default dtype of the weights.

    Returns:
      ``init(key, shape, dtype=dtype, out_sharding=None)`` for kernels of at least 2
      dimensions; a zero-size shape gives an empty array.

    Raises:
      TypeError: a non-number option, ``init`` is given a non-key ``key`` or
        asked for an integer or bool dtype.
      ValueError: ``gain`` not finite and positive, or so large that ``init``'s draws
        overflow the dtype; a kernel shape with fewer than 2 dimensions;
        axes out of range or overlapping.

    References:
      LeCun, Bottou, Orr & Müller 1998, "Efficient BackProp"; Glorot & Bengio 2010 (the lecture's
      simplified "Xavier").

    Example:
      >>> import jax
      >>> from jaxnorm import initializers
      >>> w = initializers.lecun_normal()(jax.random.key(0), (100, 10))
      >>> w.shape
      (100, 10)
    """
    who = "lecun_normal"
    g = _check_scalar(gain, "gain", who)
    return _variance_scaling(
        who,
        lambda fi, fo: g * g / fi,
        _normal_kind(truncated, who),
        in_axis,
        out_axis,
        batch_axis,
        dtype,
    )


def lecun_uniform(
    *,
    gain: float = 1.0,
    in_axis: int | Sequence[int] = -2,
    out_axis: int | Sequence[int] = -1,
    batch_axis: int | Sequence[int] = (),
    dtype: Any = jnp.float32,
) -> Initializer:
    r"""LeCun uniform initialisation (fan_in).

    .. math:: W \sim U(-a, a), \quad a = \sqrt{3} \cdot \text{gain} / \sqrt{\text{fan\_in}}

    With ``gain=1``, bit for bit the float32 numbers of ``jax.nn.initializers.lecun_uniform`` for
    the same key (eager).

    Args:
      gain: multiplies the standard deviation and the bound (see :func:`gain`).
      in_axis: the input axis or axes of the kernel (default -2).
      out_axis: the output axis or axes (default -1).
      batch_axis: axes left out of the fans (default none), as in jax.nn.
      dtype: the default dtype of the weights.

    Returns:
      ``init(key, shape, dtype=dtype, out_sharding=None)`` for kernels of at least 2
      dimensions; a zero-size shape gives an empty array.

    Raises:
      TypeError: a non-number option, ``init`` is given a non-key ``key`` or
        asked for an integer or bool dtype.
      ValueError: ``gain`` not finite and positive, or so large that ``init``'s draws
        overflow the dtype; a kernel shape with fewer than 2 dimensions;
        axes out of range or overlapping.

    References:
      LeCun, Bottou, Orr & Müller 1998, "Efficient BackProp".

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxnorm import initializers
      >>> w = initializers.lecun_uniform()(jax.random.key(0), (300, 10))
      >>> bool(jnp.abs(w).max() <= 0.1)
      True
    """
    who = "lecun_uniform"
    g = _check_scalar(gain, "gain", who)
    return _variance_scaling(
        who,
        lambda fi, fo: g * g / fi,
        "uniform",
        in_axis,
        out_axis,
        batch_axis,
        dtype,
    )


def torch_linear_default(
    *,
    in_axis: int | Sequence[int] = -2,
    out_axis: int | Sequence[int] = -1,
    batch_axis: int | Sequence[int] = (),
    dtype: Any = jnp.float32,
) -> Initializer:
    r"""PyTorch's default weight initialisation of ``nn.Linear`` and ``nn.ConvNd``.

    .. math:: W \sim U(-b, b), \quad b = 1 / \sqrt{\text{fan\_in}}

    PyTorch writes it as ``kaiming_uniform_(w, a=math.sqrt(5))``: gain ``sqrt(2 / (1 + 5))``
    times ``sqrt(3 / fan_in)`` is ``1 / sqrt(fan_in)``. The standard deviation is therefore
    ``1 / sqrt(3 fan_in)``, a third of LeCun's variance: not a variance-preserving init. Use it to
    port a PyTorch model and reproduce its training from the same starting distribution. The bias
    of those layers is drawn from the same bound; see :func:`torch_linear_bias_default`.

    Fans use Flax's layout, ``(in, out)`` or ``(H, W, in, out)``; torch's ``(out, in)`` and
    ``(out, in, H, W)`` give the same ``fan_in``. In float32 it returns bit for bit the numbers of
    ``jax.nn.initializers.variance_scaling(1/3, "fan_in", "uniform")`` for the same key (eager).

    Args:
      in_axis: the input axis or axes of the kernel (default -2).
      out_axis: the output axis or axes (default -1).
      batch_axis: axes left out of the fans (default none), as in jax.nn.
      dtype: the default dtype of the weights.

    Returns:
      ``init(key, shape, dtype=dtype, out_sharding=None)`` for kernels of at least 2
      dimensions; a zero-size shape gives an empty array.

    Raises:
      TypeError: ``init`` is given a non-key ``key`` or asked for an integer or bool dtype.
      ValueError: a kernel shape with fewer than 2 dimensions; axes out of
        range or overlapping.

    References:
      PyTorch, ``torch/nn/modules/linear.py``, ``Linear.reset_parameters``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxnorm import initializers
      >>> w = initializers.torch_linear_default()(jax.random.key(0), (64, 10))
      >>> bool(jnp.abs(w).max() <= 1 / 8)
      True
    """
    return _variance_scaling(
        "torch_linear_default",
        # variance_scaling(1/3, "fan_in", "uniform"): bound sqrt(3 * variance) = 1 / sqrt(fan_in).
        lambda fi, fo: (1.0 / 3.0) / fi,
        "uniform",
        in_axis,
        out_axis,
        batch_axis,
        dtype,
    )


def torch_linear_bias_default(fan_in: int, *, dtype: Any = jnp.float32) -> Initializer:
    r"""PyTorch's default bias initialisation of ``nn.Linear`` and ``nn.ConvNd``.

    .. math:: b \sim U(-1 / \sqrt{\text{fan\_in}},\ 1 / \sqrt{\text{fan\_in}})

    A bias initializer sees only the bias shape, so the layer's ``fan_in`` (``in_features``, or
    ``H * W * in`` for a convolution) must be given. Any shape is accepted.

    Args:
      fan_in: the fan-in of the layer's kernel (a positive int).
      dtype: the default dtype of the biases.

    Returns:
      ``init(key, shape, dtype=dtype, out_sharding=None)``, e.g. for
      ``flax.nnx.Linear(..., bias_init=...)``.

    Raises:
      TypeError: ``fan_in`` is not an int, ``init`` is given a non-key ``key`` or
        asked for an integer or bool dtype.
      ValueError: ``fan_in`` < 1, or the shape has a negative dimension.

    References:
      PyTorch, ``torch/nn/modules/linear.py``, ``Linear.reset_parameters``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxnorm import initializers
      >>> b = initializers.torch_linear_bias_default(64)(jax.random.key(0), (10,))
      >>> bool(jnp.abs(b).max() <= 1 / 8)
      True
    """
    who = "torch_linear_bias_default"
    if isinstance(fan_in, bool) or not isinstance(fan_in, int | np.integer):
        raise TypeError(f"{who}: fan_in must be an int (the layer's fan-in), but got {fan_in!r}")
    if fan_in < 1:
        raise ValueError(f"{who}: fan_in must be at least 1, but got {fan_in}")
    bound = 1.0 / math.sqrt(int(fan_in))
    default_dtype = _default_dtype(dtype, who)

    def init(
        key: jax.Array, shape: Sequence[int], dtype: Any = default_dtype, out_sharding: Any = None
    ) -> jax.Array:
        _check_key(key, who)
        dt = _check_dtype(default_dtype if dtype is None else dtype, who)
        dims, cdtype = _check_shape(shape, who), compute_dtype(dt)
        if _is_complex(dt):
            # The disk with the real law's variance bound^2 / 3 (as jax.nn's complex "uniform").
            std = jnp.asarray(bound / math.sqrt(3.0), cdtype)
            return _place(_complex(key, dims, dt, std, "uniform"), out_sharding)
        return _place(_uniform(key, dims, dt, jnp.asarray(bound, cdtype)), out_sharding)

    return init


def orthogonal(
    scale: float = 1.0, *, column_axis: int = -1, dtype: Any = jnp.float32
) -> Initializer:
    r"""A random orthogonal matrix (Haar distributed), times ``scale``.

    The kernel is viewed as a matrix with ``shape[column_axis]`` columns and the product of the
    other dimensions as rows: ``(in, out)`` as is, ``(H, W, in, out)`` as ``(H*W*in, out)``, as
    ``jax.nn.initializers.orthogonal`` does. If it is tall the columns are orthonormal
    (:math:`W^\top W = s^2 I`); if it is wide the rows are (:math:`W W^\top = s^2 I`).

    Sampling: ``A ~ N(0, 1)`` of the tall orientation, ``A = QR``, then
    :math:`Q \cdot \mathrm{sign}(\mathrm{diag}\,R)`; the sign correction makes ``Q`` Haar
    distributed rather than biased by the QR routine's sign convention (Mezzadri 2007). For a
    complex dtype ``A`` is a complex normal and the sign is the phase ``r / |r|`` of each diagonal
    entry: ``W`` is Haar-distributed unitary, :math:`W^H W = s^2 I` (tall) or
    :math:`W W^H = s^2 I` (wide). Real or complex, eager, the numbers are bit for bit those of
    ``jax.nn.initializers.orthogonal(scale, column_axis)`` for the same key.

    A shape with a dimension of size 0 holds no entries and gives an empty array of that shape and
    dtype, as jax.nn does.

    Args:
      scale: multiplies the matrix (a positive number; ``gain(...)`` is the usual choice).
      column_axis: the axis holding the columns (default -1, the output axis).
      dtype: the default dtype of the weights.

    Returns:
      ``init(key, shape, dtype=dtype, out_sharding=None)`` for shapes of at least 2
      dimensions; a zero-size shape gives an empty array.

    Raises:
      TypeError: ``scale`` is not a real number, ``column_axis`` not an int, or ``init`` is asked
        for an integer or bool dtype.
      ValueError: ``scale`` not finite and positive; a shape with fewer than 2 dimensions;
        ``column_axis`` out of range.

    References:
      Saxe, McClelland & Ganguli 2014, "Exact solutions to the nonlinear dynamics of learning in
      deep linear neural networks", ICLR; Mezzadri 2007, "How to generate random matrices from the
      classical compact groups", Notices of the AMS.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxnorm import initializers
      >>> w = initializers.orthogonal()(jax.random.key(0), (8, 4))
      >>> bool(jnp.allclose(w.T @ w, jnp.eye(4), atol=1e-5))
      True
      >>> initializers.orthogonal()(jax.random.key(0), (0, 4)).shape
      (0, 4)
    """
    who = "orthogonal"
    s = _check_scalar(scale, "scale", who)
    if isinstance(column_axis, bool) or not isinstance(column_axis, int | np.integer):
        raise TypeError(f"{who}: column_axis must be an int, but got {column_axis!r}")
    default_dtype = _default_dtype(dtype, who)

    def init(
        key: jax.Array, shape: Sequence[int], dtype: Any = default_dtype, out_sharding: Any = None
    ) -> jax.Array:
        _check_key(key, who)
        dt = _check_dtype(default_dtype if dtype is None else dtype, who)
        dims = _check_shape(shape, who)
        if len(dims) < 2:
            raise ValueError(
                f"{who} needs a shape with at least 2 dimensions (a matrix of shape[column_axis] "
                f"columns and as many rows as the other dimensions hold), but got shape {dims}"
            )
        (col,) = normalize_axes(int(column_axis), len(dims), "column_axis")
        if math.prod(dims) == 0:
            return _empty(dims, dt, out_sharding)
        return _place(_orthogonal(key, dims, dt, col, s), out_sharding)

    return init


@functools.partial(jax.jit, static_argnames=("shape", "dtype", "col"))
def _orthogonal(key, shape, dtype, col: int, scale) -> jax.Array:
    n_cols = shape[col]
    n_rows = math.prod(shape) // n_cols
    cdtype = compute_dtype(dtype)
    a = jax.random.normal(key, (max(n_rows, n_cols), min(n_rows, n_cols)), cdtype)
    q, r = jnp.linalg.qr(a)
    d = jnp.diagonal(r)
    if _is_complex(cdtype):
        # The phase of diag(R) (Mezzadri 2007 for the unitary group), 1 where it is 0.
        size = jnp.abs(d)
        phase = jnp.where(size > 0, d / jnp.where(size > 0, size, 1).astype(cdtype), 1)
    else:
        # where, not sign: sign(0) = 0 would zero a column (probability 0, but free to avoid).
        phase = jnp.where(d < 0, -1.0, 1.0).astype(cdtype)
    q = q * phase[None, :]
    if n_rows < n_cols:
        q = q.T
    rest = tuple(d for i, d in enumerate(shape) if i != col)
    q = jnp.moveaxis(q.reshape((*rest, n_cols)), -1, col)
    return (q * jnp.asarray(scale, cdtype)).astype(dtype)


# --------------------------------------------------------------------------------------------
# Gains
# --------------------------------------------------------------------------------------------

_UNIT_GAIN = (
    "linear",
    "identity",
    "conv1d",
    "conv2d",
    "conv3d",
    "conv_transpose1d",
    "conv_transpose2d",
    "conv_transpose3d",
    "sigmoid",
)
_GAIN_NAMES = (*_UNIT_GAIN, "tanh", "relu", "leaky_relu", "selu")
# Activations people ask for that have no agreed gain (PyTorch has none either).
_NO_STANDARD_GAIN = ("gelu", "silu", "swish", "elu", "softplus", "mish")


def gain(name: str, param: Any = None, **kw: Any) -> float:
    r"""The recommended gain (std multiplier) for an activation, as torch's ``calculate_gain``.

    ============================================  ===============================
    name                                          gain
    ============================================  ===============================
    linear, identity, conv{1,2,3}d,               1
    conv_transpose{1,2,3}d, sigmoid
    tanh                                          5/3
    relu                                          :math:`\sqrt{2}`
    leaky_relu (slope ``s``, default 0.01)        :math:`\sqrt{2 / (1 + s^2)}`
    selu                                          3/4
    ============================================  ===============================

    Use it as the ``gain`` of :func:`xavier_normal`, :func:`lecun_normal`, ... or the ``scale``
    of :func:`orthogonal`. The relu and leaky_relu values are He et al.'s (they make the second
    moment of activations constant with fan_in scaling); tanh 5/3 and selu 3/4 are PyTorch's
    conventions (for SELU, Klambauer et al. 2017 use gain 1: ``lecun_normal()``). GELU, SiLU and
    ELU have no agreed gain and raise; use ``he_normal`` (their positive half behaves like ReLU) or
    a data-driven init (LSUV).

    Names are read as :func:`jaxnorm.activations.get` reads them: case-insensitive, with ``-`` or
    ``_`` between words (``"ReLU"``, ``"leaky-relu"``). The slope of leaky_relu is torch's second
    positional ``param`` (``gain("leaky_relu", 0.2)``, as ``calculate_gain("leaky_relu", 0.2)``)
    or the keyword ``negative_slope``. Unlike torch, which ignores ``param`` for the other names,
    giving one to a name that takes none raises.

    Args:
      name: the activation's name.
      param: the activation's parameter, as torch's ``param``: the negative slope of
        ``"leaky_relu"`` (default 0.01). No other name takes one.
      **kw: ``negative_slope`` for ``"leaky_relu"``, the keyword form of ``param``.

    Returns:
      The gain as a Python float (a traced scalar if the slope is traced).

    Raises:
      ValueError: an unknown name (the message lists the known ones), or a non-finite slope.
      TypeError: a parameter or option the name does not take, the slope given twice, or a
        non-number slope.

    References:
      He et al. 2015 (ICCV), eq. 10 and 15; PyTorch ``torch.nn.init.calculate_gain``.

    Example:
      >>> from jaxnorm import initializers
      >>> initializers.gain("relu")
      1.414...
      >>> initializers.gain("leaky_relu", 0.2)  # torch's calculate_gain("leaky_relu", 0.2)
      1.386...
      >>> initializers.gain("Leaky-ReLU", negative_slope=0.2)
      1.386...
    """
    if not isinstance(name, str):
        raise TypeError(f"gain: name must be a string, but got {name!r}")
    key = _canonical_name(name)
    if key not in _GAIN_NAMES:
        hint = ""
        if key in _NO_STANDARD_GAIN:
            hint = (
                f" ({name} has no agreed gain; use he_normal() for ReLU-like activations or a "
                "data-driven init such as LSUV)"
            )
        elif key == "prelu":
            hint = " (for PReLU use gain('leaky_relu', slope) with its initial slope)"
        raise ValueError(
            f"gain: unknown activation {name!r}{hint}; known names: {', '.join(_GAIN_NAMES)} "
            "(case-insensitive, '-' or '_' between words)"
        )
    if key != "leaky_relu":
        if kw:
            raise TypeError(f"gain({name!r}) takes no options, but got {', '.join(sorted(kw))}")
        if param is not None:
            raise TypeError(
                f"gain({name!r}) takes no parameter, but got param={param!r}; only leaky_relu "
                "takes one (its negative slope)"
            )
    extra = sorted(set(kw) - {"negative_slope"})
    if extra:
        raise TypeError(f"gain({name!r}) takes only negative_slope, but got {', '.join(extra)}")
    if param is not None and "negative_slope" in kw:
        raise TypeError(
            f"gain({name!r}) got the slope twice, param={param!r} and "
            f"negative_slope={kw['negative_slope']!r}; pass one of them"
        )
    if key in _UNIT_GAIN:
        return 1.0
    if key == "tanh":
        return 5.0 / 3.0
    if key == "relu":
        return math.sqrt(2.0)
    if key == "selu":
        return 0.75
    slope = kw.get("negative_slope", 0.01) if param is None else param
    a = _check_scalar(slope, "negative_slope", "gain", positive=False)
    return _sqrt(2.0 / (1.0 + a * a))


def lsuv(model: Any, variables: Any, x: Any, **kwargs: Any) -> Any:
    """Layer-sequential unit-variance initialisation (Mishkin & Matas 2015) of a Flax model.

    Data-driven, so it runs the model: the implementation lives in
    :func:`jaxnorm.diagnostics.lsuv` (next to the activation capture it uses) and this name
    forwards to it with the same arguments (``key=``, ``tol=``, ``max_iter=``, ...).

    References:
      Mishkin & Matas 2015, "All you need is a good init".
    """
    # Imported here: the data-driven init runs a model, which diagnostics (a layer up) knows how.
    from jaxnorm import diagnostics

    return diagnostics.lsuv(model, variables, x, **kwargs)


__all__ = [
    "Initializer",
    "gain",
    "he_normal",
    "he_uniform",
    "lecun_normal",
    "lecun_uniform",
    "lsuv",
    "orthogonal",
    "small_normal",
    "torch_linear_bias_default",
    "torch_linear_default",
    "xavier_normal",
    "xavier_uniform",
]
