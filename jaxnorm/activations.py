"""Elementwise nonlinearities and the lecture's comparison of them.

Every function is pure and elementwise (``maxout`` reduces groups along one axis), runs under
``jit``, ``vmap`` and ``grad``, returns ``x``'s dtype for every floating dtype and rejects integer
inputs with a ``TypeError``. Low-precision inputs (bfloat16, float16) are computed in float32 and
rounded once at the end; parameters such as ``alpha`` are cast to the computation dtype, so they
never promote the result.

Numerics, fixed here once:

- Values and gradients are finite for every finite input: no ``exp`` is ever evaluated on the
  side of a ``jnp.where`` that is thrown away (the NaN-gradient trap of ``jnp.where``). At
  +-inf the values are the limits (relu(-inf) = 0, sigmoid(+-inf) = 1 / 0, gelu(-inf) =
  silu(-inf) = -0) and the derivatives finite (1 or 0 where the function saturates).
- NaN propagates: every function returns NaN where x is NaN, and so do its first and second
  derivatives (jvp and vjp) with respect to x and to its parameters (``negative_slope``,
  ``alpha``); a NaN in a maxout group makes the group's output and derivatives NaN.
  ``jax.nn.relu`` and ``torch.relu`` return NaN too, but their derivatives there are 0 or 1.
- Subnormal x are numbers: the piecewise functions take the positive side for a positive
  subnormal x (relu(1e-40) = 1e-40, relu'(1e-40) = 1, as in PyTorch), although XLA:CPU compares
  floats with denormals taken as 0. Arithmetic on a subnormal x still sees 0 on XLA:CPU (and a
  subnormal result is flushed to 0), so selu(1e-40) and leaky_relu(-1e-40) are 0 there, within
  the slope times the smallest normal number of the exact value.
- Gradients keep full relative accuracy in the tails. ``jax.nn`` forms sigmoid's derivative as
  ``y * (1 - y)`` and elu's as ``y + alpha``, which round to 0 long before the true value does
  (float64: sigmoid'(37.43) = 5.55e-17, elu'(-40) = 4.25e-18, both 0 in ``jax.nn``). Here the
  derivatives are written with ``jax.custom_jvp`` from ``e = exp(-|x|)``: sigmoid'(x) =
  sigmoid(x) * sigmoid(-x), tanh'(x) = 4 exp(-2|x|) / (1 + exp(-2|x|))**2, elu'(x) =
  alpha * exp(x) for x <= 0, softplus' = sigmoid, silu'(x) = sigmoid(x) * (1 + x * sigmoid(-x)).
  In silu's far negative tail, where e^x is below the normal range but x e^x is not (float32:
  -91.9 < x < -87.3; float64: -715 < x < -708.4), the value and the derivatives are formed from
  e^(x + 64) and keep full accuracy (jax.nn and torch flush them to 0 there).

Derivative at the kink x = 0. jaxnorm takes the derivative of the negative side, for every
piecewise function, so ``relu`` is exactly ``leaky_relu`` with slope 0, gradients included:

=================  ===============  ================  ===================
function           jaxnorm          jax.nn            PyTorch
=================  ===============  ================  ===================
relu               0                0                 0
leaky_relu(s)      s                1                 s
prelu(alpha)       alpha            (none)            alpha
elu(alpha)         alpha            alpha             alpha
selu               scale * alpha    scale * alpha     scale * alpha
=================  ===============  ================  ===================

(Checked with jax 0.10.2 and torch 2.13.0.) jaxnorm's first derivatives agree with PyTorch
everywhere and with ``jax.nn`` except for ``leaky_relu``, where ``jax.nn`` takes the positive
side. The derivative of ``prelu`` with respect to ``alpha`` at x = 0 is 0 (the value there does
not depend on alpha).
The second derivative at 0 follows the same rule: elu''(0) = alpha and selu''(0) = scale * alpha,
as in ``jax.nn`` (PyTorch gives 0 there, the positive side, though its first derivative takes the
negative one).

Other divergences from neighbours: ``gelu`` is exact (erf) by default, as in PyTorch, while
``jax.nn.gelu`` defaults to the tanh approximation; ``maxout`` groups consecutive entries.
"""

from __future__ import annotations

import difflib
import functools
import math
import operator
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxnorm import _checks

__all__ = [
    "NAMES",
    "Properties",
    "elu",
    "gelu",
    "get",
    "leaky_relu",
    "maxout",
    "names",
    "prelu",
    "properties",
    "relu",
    "selu",
    "sigmoid",
    "silu",
    "softplus",
    "tanh",
]


def _as_float(x: ArrayLike, fn: str) -> jax.Array:
    """x as an array, after checking that it is floating (TypeError otherwise)."""
    # A list, dict, None or str is refused here, as jax.nn refuses it, instead of being
    # converted (a list) or failing inside JAX with a message that names no argument.
    _checks.check_array(x, "x")
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"{fn} expects a floating x (float16, bfloat16, float32 or float64), but x has dtype "
            f"{x.dtype}; cast it first, e.g. x.astype(jnp.float32)"
        )
    return x


def _upcast(x: jax.Array) -> jax.Array:
    """x in float32 if it is narrower, else unchanged: low precision is computed in float32."""
    # Not jnp.promote_types: it raises for bfloat16 + float32 under strict dtype promotion.
    if jnp.finfo(x.dtype).bits < 32:
        return x.astype(jnp.float32)
    return x


def _param(value: ArrayLike, dtype, name: str, fn: str) -> jax.Array:
    """A parameter (alpha, slope) cast to the computation dtype, checked to be real-valued."""
    _checks.check_array(value, name)
    value = jnp.asarray(value)
    if not (jnp.issubdtype(value.dtype, jnp.floating) or jnp.issubdtype(value.dtype, jnp.integer)):
        raise TypeError(
            f"{fn}: {name} must be a real number or array, but it has dtype {value.dtype}"
        )
    return value.astype(dtype)


_SQRT_HALF = math.sqrt(0.5)
_SQRT_2_OVER_PI = math.sqrt(2 / math.pi)


def _clamp(x, lo, hi):
    """min(max(x, lo), hi) as one op; NaN stays NaN, but its derivative there is 0 (a select).

    Only for arguments whose derivative does not carry the NaN of a NaN x.
    """
    return jax.lax.clamp(jnp.asarray(lo, x.dtype), x, jnp.asarray(hi, x.dtype))


# --- sign tests and NaN derivatives for the piecewise functions ----------------------------------

_SAME_WIDTH_INT = {2: jnp.int16, 4: jnp.int32, 8: jnp.int64}


def _sign_clear_nonzero(x: jax.Array) -> jax.Array:
    """True where x's sign bit is clear and x is not +0: x > 0, subnormals included, or +NaN.

    Decided on the bits, not with ``x > 0``: XLA:CPU compares floats with denormals taken as zero,
    so ``x > 0`` is False for a positive subnormal (1e-40 in float32, 5e-324 in float64) and the
    piecewise functions took their negative side there (PyTorch takes the positive one). Read as a
    signed integer of the same width, a float's bits are > 0 exactly when its sign bit is clear
    and it is not +0.
    """
    return jax.lax.bitcast_convert_type(x, _SAME_WIDTH_INT[x.dtype.itemsize]) > 0


def _is_positive(x: jax.Array) -> jax.Array:
    """x > 0 with subnormals counted as the numbers they are; False for NaN."""
    return _sign_clear_nonzero(x) & ~jnp.isnan(x)


def _is_positive_or_nan(x: jax.Array) -> jax.Array:
    """x > 0 (subnormals counted) or x is NaN (of either sign)."""
    return _sign_clear_nonzero(x) | jnp.isnan(x)


@jax.custom_jvp
def _nan_derivative_at_nan(x):
    """x itself, whose derivative is 1 where x is a number and NaN where x is NaN.

    ``jnp.where(x > 0, x, s * x)`` sends NaN to one branch, whose slope (1 or s) is a number,
    so its gradient at NaN would be finite. Written with this function in place of the branch's
    x, the slope is multiplied by NaN there; finite x keep their derivatives bit for bit.
    """
    return x


@_nan_derivative_at_nan.defjvp
def _nan_derivative_at_nan_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    # t times 1, or times NaN where x is NaN: linear in t, so the rule transposes (vjp) too, and
    # finite at x = +-inf (t * x there would be inf * 0 = NaN in the vjp). The NaN comes from
    # this function again, so the second derivative at NaN is NaN too.
    nan_or_one = jnp.where(jnp.isnan(x), _nan_derivative_at_nan(x), jnp.ones_like(x))
    return x, t * nan_or_one


# --- sigmoid family: everything from e = exp(-|x|), which never overflows -----------------------


def _sigmoid_parts(x: jax.Array, e: jax.Array | None = None):
    """sigmoid(x), sigmoid(-x) and e = exp(-|x|), each to full relative accuracy.

    ``e`` may be passed in where it is already computed.
    """
    if e is None:
        e = jnp.exp(-jnp.abs(x))
    r = 1 / (1 + e)  # sigmoid(|x|)
    q = e * r  # sigmoid(-|x|), accurate where 1 - sigmoid(|x|) would round to 0
    pos = x >= 0
    return jnp.where(pos, r, q), jnp.where(pos, q, r), e


@jax.custom_jvp
def _sigmoid(x):
    # 1 / (1 + exp(-x)): accurate in both tails (exp overflows to inf, giving exactly 0).
    return jax.lax.logistic(x)


@_sigmoid.defjvp
def _sigmoid_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    s, s_neg, _ = _sigmoid_parts(x)
    return s, t * (s * s_neg)


@jax.custom_jvp
def _softplus(x):
    return jnp.maximum(x, 0) + jnp.log1p(jnp.exp(-jnp.abs(x)))


@_softplus.defjvp
def _softplus_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    s, _, e = _sigmoid_parts(x)
    return jnp.maximum(x, 0) + jnp.log1p(e), t * s


# silu's far negative tail. There sigmoid(x) = e^x to the last bit, and x e^x (the value) and
# (1 + x) e^x (the derivative) are normal numbers down to x = -91.9 in float32 (-715 in
# float64), past the point where e^x itself stops being one (-87.3, -708.4): XLA:CPU flushes
# smaller results to 0, so x * sigmoid(x) gave 0 there. In the tail they are formed as
# (x e^(x + 64)) e^-64: x + 64 is exact there, e^(x + 64) a normal number, and only the last
# product leaves the normal range, where the true value does. Above the tail's start nothing
# changes.
_SILU_TAIL_START = {4: -87.0, 8: -708.0}  # by itemsize: float32 (and narrower, upcast), float64
_SILU_SHIFT = 64.0
_SILU_UNSHIFT = math.exp(-_SILU_SHIFT)


def _silu_tail(x):
    """(whether x is in the tail, x clamped to the tail).

    The clamp to [-1e4, start] keeps every branch finite for every x (x = -inf gives -0, not
    -inf * 0), so that no NaN reaches a gradient through the branch a select throws away.
    """
    start = _SILU_TAIL_START[x.dtype.itemsize]
    return x < start, _clamp(x, -1e4, start)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _silu_tail_term(x, e, k):
    """(x + k) e^x in silu's tail, given e = e^(x + 64): ((x + k) e) e^-64.

    k = 0 is the value, 1 the derivative, 2 the second derivative. The derivative of term k is
    term k + 1, formed whole: as a product it would be the sum of two terms, one of them e^x
    alone, which is below the normal range (flushed to 0) where the sum is not. The tangent is
    taken through x alone, which is right as long as e = e^(x + 64): the caller reads the
    result only where it is.
    """
    return (x + k if k else x) * e * _SILU_UNSHIFT


@_silu_tail_term.defjvp
def _silu_tail_term_jvp(k, primals, tangents):
    (x, e), (t, _) = primals, tangents
    return _silu_tail_term(x, e, k), t * _silu_tail_term(x, e, k + 1)


@jax.custom_jvp
def _silu(x):
    tail, xt = _silu_tail(x)
    # One exp for both branches: e^(x + 64) in the tail, e^-x elsewhere.
    e = jnp.exp(jnp.where(tail, xt + _SILU_SHIFT, -x))
    # Outside the tail: x * (1 / (1 + exp(-x))), lax.logistic's own expansion.
    return jnp.where(tail, _silu_tail_term(xt, e, 0), x * (1 / (1 + e)))


@_silu.defjvp
def _silu_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    tail, xt = _silu_tail(x)
    # One exp for both branches: e^(x + 64) in the tail, e^-|x| elsewhere.
    s, s_neg, e = _sigmoid_parts(x, jnp.exp(jnp.where(tail, xt + _SILU_SHIFT, -jnp.abs(x))))
    # x * s(-x) is 0 beyond 1e4 (and x * s(x) below the tail's start is unused): the clamp
    # keeps it finite at x = +-inf, not inf * 0, which a gradient through the select would read.
    xc = _clamp(x, -1e4, 1e4)
    value = jnp.where(tail, _silu_tail_term(xt, e, 0), x * s)
    # d/dx x*s(x) = s + x*s*(1-s), with 1-s taken as s(-x) so the tails keep their accuracy; in
    # the far tail it is (1 + x) e^x.
    slope = jnp.where(tail, _silu_tail_term(xt, e, 1), s * (1 + xc * s_neg))
    return value, t * slope


@jax.custom_jvp
def _tanh(x):
    return jnp.tanh(x)


@_tanh.defjvp
def _tanh_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    # 1 - tanh(x)**2 rounds to 0 once tanh(x) rounds to +-1; 4e/(1+e)**2 with e = exp(-2|x|)
    # does not.
    e = jnp.exp(-2 * jnp.abs(x))
    return jnp.tanh(x), t * (4 * e / jnp.square(1 + e))


def _nonpositive_part(x):
    # where(x > 0, 0, x), not jnp.minimum(x, 0): minimum's derivative at the tie x = 0 is 1/2, which
    # made elu''(0) = alpha / 2. With where, 0 takes the negative side, as in the first derivative.
    return jnp.where(x > 0, jnp.zeros_like(x), x)


@jax.custom_jvp
def _expm1_nonpositive(x):
    """expm1(min(x, 0)): the negative branch of elu, safe to evaluate for every x."""
    return jnp.expm1(_nonpositive_part(x))


@_expm1_nonpositive.defjvp
def _expm1_nonpositive_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    m = _nonpositive_part(x)
    # jax differentiates expm1 as (ans + 1), which rounds to 0 below about -37 in float64.
    # Differentiated again (hessians), this gives elu''(x) = alpha exp(x) for x <= 0, 0 for x > 0.
    return jnp.expm1(m), t * jnp.where(x > 0, 0, jnp.exp(m)).astype(x.dtype)


def _gelu_tanh_arg(x):
    """x clipped to +-1e5, z = 2 sqrt(2/pi) (x + 0.044715 x^3) of it, and z's derivative.

    Beyond |x| = 1e5 the sigmoid of z is exactly 0 or 1 in every dtype; clipping keeps x**3
    from overflowing (and the gradient from becoming inf * 0 = NaN).
    """
    inside = jnp.abs(x) <= 1e5
    xs = jnp.clip(x, -1e5, 1e5)
    z = 2 * _SQRT_2_OVER_PI * (xs + 0.044715 * xs * xs * xs)
    dz = jnp.where(inside, 2 * _SQRT_2_OVER_PI * (1 + 3 * 0.044715 * xs * xs), 0)
    return xs, z, dz.astype(x.dtype)


@jax.custom_jvp
def _gelu_tanh(x):
    # x/2 (1 + tanh(z/2)) = x sigmoid(z): no cancellation in the negative tail. Below -1e5,
    # sigmoid(z) is 0 and x * 0 is -0 for every finite x: max(x, -1e5) gives that -0 at
    # x = -inf too, instead of -inf * 0 = NaN.
    return jnp.maximum(x, -1e5) * jax.lax.logistic(_gelu_tanh_arg(x)[1])


@_gelu_tanh.defjvp
def _gelu_tanh_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    xs, z, dz = _gelu_tanh_arg(x)
    # One exp serves the value and the derivative s(z) + x s(z) s(-z) z'. The clipped xs (equal
    # to x where dz is not 0) keeps x * 0 finite at x = +-inf.
    s, s_neg, _ = _sigmoid_parts(z)
    return jnp.maximum(x, -1e5) * s, t * (s + xs * (s * s_neg) * dz)


# Beyond |x| = 40, Phi(x) is exactly 0 or 1 in float64 (and float32, where the computation of
# the narrower dtypes runs): the value is x there, or -0, and the derivative 1 or 0. Clipping
# keeps x * Phi(x) from being -inf * 0 at x = -inf, and x * phi(x) in the derivative from
# inf * 0 at x = +inf; between -40 and 40 nothing changes.
_GELU_CLIP = 40.0
_MINUS_2_OVER_SQRT_PI = -2 / math.sqrt(math.pi)  # erfc'(u) = -2/sqrt(pi) exp(-u^2)


@jax.custom_jvp
def _gelu_erf(x):
    # jnp.clip, not lax.clamp, wherever a derivative passes through: clamp's derivative is a
    # select, which would turn the NaN derivative of a NaN x into 0.
    xl = jnp.clip(x, -_GELU_CLIP, _GELU_CLIP)
    # NaN fails x >= 40 and takes the erfc side, whose value is NaN.
    return jnp.where(x >= _GELU_CLIP, x, 0.5 * xl * jax.lax.erfc(-_SQRT_HALF * xl))


@_gelu_erf.defjvp
def _gelu_erf_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    xl = jnp.clip(x, -_GELU_CLIP, _GELU_CLIP)
    half_x = 0.5 * xl
    u = -_SQRT_HALF * xl
    e = jax.lax.erfc(u)
    h = jnp.exp(-jnp.square(u))  # the erfc derivative's exp, as jax writes it
    value = jnp.where(x >= _GELU_CLIP, x, half_x * e)
    # d/dx x Phi(x) = Phi(x) + x phi(x), as jax differentiates x/2 erfc(-x/sqrt 2), with the
    # products in the order its vjp takes them, so first derivatives keep their bits; xl in the
    # x phi(x) term keeps it 0, not inf * 0, at x = +-inf.
    slope_term = half_x * (_MINUS_2_OVER_SQRT_PI * (h * (-_SQRT_HALF * t)))
    return value, slope_term + (0.5 * t) * e


# --- public functions -----------------------------------------------------------------------------


# Each activation computes in one jitted program, as jax.nn's activations (themselves jitted) do:
# an eager call dispatches one executable instead of each operation on its own (compiled on first
# use), and under an outer jit it is inlined. Arguments are checked before, at the boundary.
def _jitted_in_compute_dtype(core):
    """``core`` applied to x in its compute dtype (:func:`_upcast`) and cast back, jitted."""
    return jax.jit(lambda x: core(_upcast(x)).astype(x.dtype))


_sigmoid_of = _jitted_in_compute_dtype(_sigmoid)
_tanh_of = _jitted_in_compute_dtype(_tanh)
_silu_of = _jitted_in_compute_dtype(_silu)
_softplus_of = _jitted_in_compute_dtype(_softplus)


def sigmoid(x: ArrayLike) -> jax.Array:
    r"""Logistic sigmoid.

    .. math:: \sigma(x) = \frac{1}{1 + e^{-x}}, \qquad \sigma'(x) = \sigma(x)\,\sigma(-x)

    The derivative is formed as :math:`\sigma(x)\sigma(-x)`, not :math:`\sigma(1-\sigma)`, so it
    keeps full relative accuracy for large :math:`|x|`.

    Args:
      x: input array of any floating dtype.

    Returns:
      An array of x's shape and dtype with values in (0, 1).

    Raises:
      TypeError: if x is not a floating array or number (a list, dict, str or None included).

    References:
      Rumelhart, Hinton & Williams 1986, "Learning representations by back-propagating errors".

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxnorm import activations
      >>> activations.sigmoid(jnp.array([-1.0, 0.0, 1.0]))
      Array([0.26894143, 0.5       , 0.7310586 ], dtype=float32)
    """
    return _sigmoid_of(_as_float(x, "sigmoid"))


def tanh(x: ArrayLike) -> jax.Array:
    r"""Hyperbolic tangent.

    .. math:: \tanh(x) = \frac{e^{x} - e^{-x}}{e^{x} + e^{-x}} = 2\sigma(2x) - 1, \qquad
              \tanh'(x) = \frac{4 e^{-2|x|}}{(1 + e^{-2|x|})^2}

    The derivative is formed from :math:`e^{-2|x|}`, not as :math:`1 - \tanh^2 x`, so it stays
    accurate where :math:`\tanh x` rounds to :math:`\pm 1`.

    Args:
      x: input array of any floating dtype.

    Returns:
      An array of x's shape and dtype with values in (-1, 1).

    Raises:
      TypeError: if x is not a floating array or number (a list, dict, str or None included).

    References:
      LeCun, Bottou, Orr & Müller 1998, "Efficient BackProp".

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxnorm import activations
      >>> activations.tanh(jnp.array([-1.0, 0.0, 1.0]))
      Array([-0.7615942,  0.       ,  0.7615942], dtype=float32)
    """
    return _tanh_of(_as_float(x, "tanh"))


def relu(x: ArrayLike) -> jax.Array:
    r"""Rectified linear unit.

    .. math:: \mathrm{relu}(x) = \max(x, 0), \qquad \mathrm{relu}'(0) = 0

    relu(NaN) is NaN, as in ``jax.nn`` and PyTorch, and so are its derivatives there. A positive
    subnormal x is positive: relu(1e-40) = 1e-40 with derivative 1, as in PyTorch.

    Args:
      x: input array of any floating dtype.

    Returns:
      An array of x's shape and dtype.

    Raises:
      TypeError: if x is not a floating array or number (a list, dict, str or None included).

    References:
      Nair & Hinton 2010, "Rectified linear units improve restricted Boltzmann machines";
      Glorot, Bordes & Bengio 2011, "Deep sparse rectifier neural networks".

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxnorm import activations
      >>> activations.relu(jnp.array([-1.0, 0.0, 2.0]))
      Array([0., 0., 2.], dtype=float32)
      >>> jax.grad(activations.relu)(0.0)
      Array(0., dtype=float32, weak_type=True)
    """
    return _relu_of(_as_float(x, "relu"))


@jax.jit
def _relu_of(x):
    # A select rather than maximum: maximum's derivative at a tie is 1/2 in jax. NaN takes the x
    # side, so that relu(NaN) and its derivative are NaN. Computed in float32 for bfloat16 and
    # float16 (exact either way): XLA:CPU would convert every intermediate of the derivative.
    xc = _upcast(x)
    y = jnp.where(_is_positive_or_nan(xc), _nan_derivative_at_nan(xc), jnp.zeros_like(xc))
    return y.astype(x.dtype)


def leaky_relu(x: ArrayLike, negative_slope: ArrayLike = 0.01) -> jax.Array:
    r"""Leaky rectified linear unit.

    .. math:: \mathrm{leaky\_relu}(x) = \begin{cases} x & x > 0 \\ s\,x & x \le 0 \end{cases},
              \qquad \mathrm{leaky\_relu}'(0) = s

    The derivative at 0 is the slope ``s``, as in PyTorch; ``jax.nn.leaky_relu`` gives 1. At
    NaN the value and both derivatives (in x and in s) are NaN.

    Args:
      x: input array of any floating dtype.
      negative_slope: the slope ``s`` for x <= 0 (a scalar or an array broadcastable to x), cast
        to the computation dtype.

    Returns:
      An array of x's shape and dtype.

    Raises:
      TypeError: if x is not a floating array or number (a list, dict, str or None included),
        or negative_slope is not a real array or number.
      ValueError: if negative_slope does not broadcast to x's shape.

    References:
      Maas, Hannun & Ng 2013, "Rectifier nonlinearities improve neural network acoustic models".

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxnorm import activations
      >>> activations.leaky_relu(jnp.array([-2.0, 0.0, 2.0]), 0.1)
      Array([-0.2,  0. ,  2. ], dtype=float32)
    """
    x = _as_float(x, "leaky_relu")
    _checks.check_array(negative_slope, "negative_slope")  # before jit reads it as a pytree
    return _leaky_relu_of(x, negative_slope)


@jax.jit
def _leaky_relu_of(x, negative_slope):
    xc = _upcast(x)
    s = _broadcast_param(negative_slope, xc, "negative_slope", "leaky_relu")
    return jnp.where(_is_positive(xc), xc, s * _nan_derivative_at_nan(xc)).astype(x.dtype)


def _broadcast_param(value, xc, name, fn, channel_axis=None):
    """value cast to xc's dtype and broadcast to xc's shape explicitly."""
    value = _param(value, xc.dtype, name, fn)
    if channel_axis is not None:
        axis = _checks.normalize_axes(channel_axis, xc.ndim, "channel_axis")[0]
        if value.ndim > 1 or value.size not in (1, xc.shape[axis]):
            raise ValueError(
                f"{fn}: with channel_axis={channel_axis}, {name} must be a scalar or have one "
                f"entry per channel ({xc.shape[axis]}, the size of x's axis {axis}), but it "
                f"has shape {value.shape}"
            )
        shape = [1] * xc.ndim
        shape[axis] = value.size
        value = value.reshape(shape)
    try:
        shape = jnp.broadcast_shapes(value.shape, xc.shape)
    except ValueError:
        shape = None
    if shape != xc.shape:
        hint = ", or a 1-D array and channel_axis=" if fn == "prelu" else ""
        raise ValueError(
            f"{fn}: {name} of shape {value.shape} does not broadcast to x's shape {xc.shape}; "
            f"give a scalar or an array of x's trailing shape (e.g. one value per channel, shape "
            f"{xc.shape[-1:]}){hint}"
        )
    return jnp.broadcast_to(value, xc.shape)


def prelu(x: ArrayLike, alpha: ArrayLike, *, channel_axis: int | None = None) -> jax.Array:
    r"""Parametric rectified linear unit: leaky ReLU with a learned slope.

    .. math:: \mathrm{prelu}(x, \alpha) = \begin{cases} x & x > 0 \\ \alpha\,x & x \le 0
              \end{cases}, \qquad \frac{\partial}{\partial x}\Big|_0 = \alpha,\quad
              \frac{\partial}{\partial \alpha} = \min(x, 0)

    ``alpha`` is shared (a scalar) or per channel. By default it broadcasts against x by NumPy's
    rules, so a shape ``(C,)`` alpha applies along x's last axis (channels-last, as Flax lays out
    features). With ``channel_axis``, a ``(C,)`` alpha applies along that axis instead (PyTorch's
    ``nn.PReLU`` uses axis 1 of NCHW inputs). The result is differentiable in x and alpha.

    Args:
      x: input array of any floating dtype.
      alpha: the negative-side slope, a scalar or an array that broadcasts to x's shape (cast to
        the computation dtype; its gradient comes back in alpha's own dtype).
      channel_axis: if given (an int), alpha must be a scalar or 1-D with x.shape[channel_axis]
        entries, one per channel along that axis.

    Returns:
      An array of x's shape and dtype.

    Raises:
      TypeError: if x is not a floating array or number (a list, dict, str or None included),
        alpha is not a real array or number, or channel_axis is not an int or None.
      ValueError: if alpha does not broadcast to x's shape, does not match channel_axis, or
        channel_axis is out of range.

    References:
      He, Zhang, Ren & Sun 2015, "Delving deep into rectifiers: surpassing human-level
      performance on ImageNet classification".

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxnorm import activations
      >>> x = jnp.array([[-1.0, -1.0], [2.0, 2.0]])
      >>> activations.prelu(x, jnp.array([0.25, 0.5]))  # one slope per column
      Array([[-0.25, -0.5 ],
             [ 2.  ,  2.  ]], dtype=float32)
    """
    x = _as_float(x, "prelu")
    # bool is an int subclass: True would silently mean axis 1.
    if channel_axis is not None and (
        isinstance(channel_axis, bool) or not isinstance(channel_axis, int | np.integer)
    ):
        raise TypeError(
            f"prelu: channel_axis must be an int (the one axis of x that holds the channels) or "
            f"None, but got {channel_axis!r}; alpha has one slope per channel along that axis"
        )
    _checks.check_array(alpha, "alpha")
    return _prelu_of(x, alpha, channel_axis)


@functools.partial(jax.jit, static_argnums=2)
def _prelu_of(x, alpha, channel_axis):
    xc = _upcast(x)
    a = _broadcast_param(alpha, xc, "alpha", "prelu", channel_axis)
    return jnp.where(_is_positive(xc), xc, a * _nan_derivative_at_nan(xc)).astype(x.dtype)


def elu(x: ArrayLike, alpha: ArrayLike = 1.0) -> jax.Array:
    r"""Exponential linear unit.

    .. math:: \mathrm{elu}(x) = \begin{cases} x & x > 0 \\ \alpha\,(e^{x} - 1) & x \le 0
              \end{cases}, \qquad \mathrm{elu}'(x) = \mathrm{elu}''(x) = \alpha e^{x}
              \text{ for } x \le 0

    The negative branch is ``expm1`` of ``min(x, 0)`` (no overflow on the unused side, so no
    NaN gradient), and its derivative is ``alpha * exp(x)``, accurate far into the tail. At the
    kink x = 0 the first and second derivatives are the negative side's, both ``alpha``.

    Args:
      x: input array of any floating dtype.
      alpha: the negative saturation value (a scalar or an array broadcastable to x); the
        result is differentiable in alpha.

    Returns:
      An array of x's shape and dtype, with values in (-alpha, inf).

    Raises:
      TypeError: if x is not a floating array or number (a list, dict, str or None included),
        or alpha is not a real array or number.
      ValueError: if alpha does not broadcast to x's shape.

    References:
      Clevert, Unterthiner & Hochreiter 2015, "Fast and accurate deep network learning by
      exponential linear units (ELUs)".

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxnorm import activations
      >>> activations.elu(jnp.array([-1.0, 0.0, 1.0]))
      Array([-0.63212055,  0.        ,  1.        ], dtype=float32)
    """
    x = _as_float(x, "elu")
    _checks.check_array(alpha, "alpha")
    return _elu_of(x, alpha)


@jax.jit
def _elu_of(x, alpha):
    xc = _upcast(x)
    a = _broadcast_param(alpha, xc, "alpha", "elu")
    # NaN takes the exp side, whose derivatives (in x and alpha) are NaN there.
    return jnp.where(_is_positive(xc), xc, a * _expm1_nonpositive(xc)).astype(x.dtype)


# Klambauer et al. 2017, eq. 14: the fixed point (mean 0, variance 1) of the SELU network.
_SELU_ALPHA = 1.6732632423543772848170429916717
_SELU_SCALE = 1.0507009873554804934193349852946


def selu(x: ArrayLike) -> jax.Array:
    r"""Scaled exponential linear unit.

    .. math:: \mathrm{selu}(x) = \lambda \begin{cases} x & x > 0 \\ \alpha\,(e^{x} - 1) &
              x \le 0 \end{cases}, \quad \alpha \approx 1.6733,\ \lambda \approx 1.0507

    At the kink x = 0 the first and second derivatives are the negative side's, both
    :math:`\lambda\alpha \approx 1.7581`.

    Args:
      x: input array of any floating dtype.

    Returns:
      An array of x's shape and dtype, with values in (-lambda * alpha, inf).

    Raises:
      TypeError: if x is not a floating array or number (a list, dict, str or None included).

    References:
      Klambauer, Unterthiner, Mayr & Hochreiter 2017, "Self-normalizing neural networks".

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxnorm import activations
      >>> activations.selu(jnp.array([-1.0, 0.0, 1.0]))
      Array([-1.1113307,  0.       ,  1.050701 ], dtype=float32)
    """
    return _selu_of(_as_float(x, "selu"))


@jax.jit
def _selu_of(x):
    xc = _upcast(x)
    y = jnp.where(_is_positive(xc), xc, _SELU_ALPHA * _expm1_nonpositive(xc))
    return (_SELU_SCALE * y).astype(x.dtype)


def gelu(x: ArrayLike, approximate: bool = False) -> jax.Array:
    r"""Gaussian error linear unit.

    .. math:: \mathrm{gelu}(x) = x\,\Phi(x) = \tfrac{x}{2}\,\mathrm{erfc}(-x/\sqrt{2})

    and with ``approximate=True``

    .. math:: \tfrac{x}{2}\Big(1 + \tanh\big(\sqrt{2/\pi}\,(x + 0.044715\,x^3)\big)\Big)
              = x\,\sigma\big(2\sqrt{2/\pi}\,(x + 0.044715\,x^3)\big).

    Both are written in the second form (``erfc``, ``sigmoid``) so the negative tail keeps its
    relative accuracy instead of cancelling in ``1 + erf`` or ``1 + tanh``; the approximate
    form's derivative shares one ``exp`` with its value. gelu(-inf) = -0 and the derivatives at
    +-inf are 1 and 0 (``jax.nn.gelu`` and PyTorch give NaN there).

    The default is the exact form, as in PyTorch (``approximate='none'``). ``jax.nn.gelu``
    defaults to ``approximate=True``: pass ``approximate=True`` to match it.

    Args:
      x: input array of any floating dtype.
      approximate: use the tanh approximation instead of the exact erf form (a Python or NumPy
        bool).

    Returns:
      An array of x's shape and dtype.

    Raises:
      TypeError: if x is not a floating array or number (a list, dict, str or None included),
        or approximate is not a bool.

    References:
      Hendrycks & Gimpel 2016, "Gaussian error linear units (GELUs)".

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxnorm import activations
      >>> activations.gelu(jnp.array([-1.0, 0.0, 1.0]))
      Array([-0.15865527,  0.        ,  0.8413447 ], dtype=float32)
    """
    x = _as_float(x, "gelu")
    # A NumPy bool is accepted, as jax.nn.gelu accepts it; a string such as "tanh" (PyTorch's
    # spelling) is not, since it would be truthy.
    if not isinstance(approximate, bool | np.bool_):
        raise TypeError(f"gelu: approximate must be True or False, got {approximate!r}")
    return _gelu_of(x, bool(approximate))


@functools.partial(jax.jit, static_argnums=1)
def _gelu_of(x, approximate):
    xc = _upcast(x)
    y = _gelu_tanh(xc) if approximate else _gelu_erf(xc)
    return y.astype(x.dtype)


def silu(x: ArrayLike) -> jax.Array:
    r"""Sigmoid-weighted linear unit (also called swish).

    .. math:: \mathrm{silu}(x) = x\,\sigma(x), \qquad
              \mathrm{silu}'(x) = \sigma(x)\,\big(1 + x\,\sigma(-x)\big)

    In the far negative tail (x < -87 in float32, -708 in float64) :math:`\sigma(x) = e^x` is
    below the normal range, but :math:`x e^x` is not until x = -91.86 (float32) or -714.97
    (float64): there the value and derivatives are formed as :math:`(x\,e^{x+64})\,e^{-64}`
    and keep full accuracy (``jax.nn.silu`` and PyTorch give 0). Below that the true value is
    subnormal; XLA:CPU flushes it to -0.

    Args:
      x: input array of any floating dtype.

    Returns:
      An array of x's shape and dtype, with values in [-0.2785, inf) (the minimum is reached at
      x = -1.2784).

    Raises:
      TypeError: if x is not a floating array or number (a list, dict, str or None included).

    References:
      Hendrycks & Gimpel 2016, "Gaussian error linear units (GELUs)"; Elfwing, Uchibe & Doya
      2018, "Sigmoid-weighted linear units for neural network function approximation";
      Ramachandran, Zoph & Le 2017, "Searching for activation functions".

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxnorm import activations
      >>> activations.silu(jnp.array([-1.0, 0.0, 1.0]))
      Array([-0.26894143,  0.        ,  0.7310586 ], dtype=float32)
    """
    return _silu_of(_as_float(x, "silu"))


def softplus(x: ArrayLike) -> jax.Array:
    r"""Softplus, a smooth ReLU.

    .. math:: \mathrm{softplus}(x) = \log(1 + e^{x}) = \max(x, 0) + \log(1 + e^{-|x|}),
              \qquad \mathrm{softplus}'(x) = \sigma(x)

    Args:
      x: input array of any floating dtype.

    Returns:
      An array of x's shape and dtype, with values in (0, inf).

    Raises:
      TypeError: if x is not a floating array or number (a list, dict, str or None included).

    References:
      Dugas, Bengio, Bélisle, Nadeau & Garcia 2001, "Incorporating second-order functional
      knowledge for better option pricing"; Glorot, Bordes & Bengio 2011.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxnorm import activations
      >>> activations.softplus(jnp.array([-1.0, 0.0, 1.0]))
      Array([0.3132617, 0.6931472, 1.3132617], dtype=float32)
    """
    return _softplus_of(_as_float(x, "softplus"))


def maxout(x: ArrayLike, num_pieces: int, axis: int = -1) -> jax.Array:
    r"""Maxout: the maximum over groups of ``num_pieces`` consecutive entries along ``axis``.

    .. math:: \mathrm{maxout}(x)_i = \max_{j < k} x_{i k + j}, \qquad k = \text{num\_pieces}

    x is usually the output of a linear layer with ``k`` times as many units as wanted. Unit
    ``i`` takes entries ``i*k, ..., i*k + k - 1`` (consecutive groups, as in pylearn2 and
    ``tf.contrib.layers.maxout``). The gradient goes to the maximum; a tie shares it equally
    among the tied entries, as ``jnp.max`` and ``torch.amax`` do. ``torch.max(x, dim)`` and max
    pooling instead send all of it to one tied entry (the first, in torch 2.13). A group that
    holds a NaN gives NaN, and NaN derivatives for all its entries (jitted or not; a jitted
    ``jnp.max`` gives them 0).

    Args:
      x: input array of any floating dtype.
      num_pieces: the number of linear pieces ``k`` per unit, a positive int dividing
        ``x.shape[axis]``.
      axis: the axis to group.

    Returns:
      An array of x's dtype and shape, except that ``axis`` has ``x.shape[axis] // num_pieces``
      entries.

    Raises:
      TypeError: if x is not a floating array or number (a list, dict, str or None included),
        or num_pieces is not an int (bools are refused).
      ValueError: if num_pieces is not positive, does not divide ``x.shape[axis]``, or axis is
        out of range.

    References:
      Goodfellow, Warde-Farley, Mirza, Courville & Bengio 2013, "Maxout networks".

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxnorm import activations
      >>> activations.maxout(jnp.array([1.0, 3.0, -2.0, -5.0]), 2)
      Array([ 3., -2.], dtype=float32)
    """
    x = _as_float(x, "maxout")
    try:
        k = operator.index(num_pieces)
    except TypeError:
        k = None
    # bool is an int subclass: True would silently mean 1 piece.
    if k is None or isinstance(num_pieces, bool):
        raise TypeError(
            f"maxout: num_pieces must be an int, got {num_pieces!r} of type "
            f"{type(num_pieces).__name__}"
        )
    if k < 1:
        raise ValueError(f"maxout: num_pieces must be at least 1, got {k}")
    if x.ndim == 0:
        raise ValueError("maxout needs an x with at least one axis, but x is a scalar")
    (ax,) = _checks.normalize_axes(axis, x.ndim, "axis")
    n = x.shape[ax]
    if n % k:
        raise ValueError(
            f"maxout: x has {n} entries on axis {ax}, which num_pieces={k} does not divide; "
            f"the axis must have num_pieces * num_units entries"
        )
    grouped = x.reshape((*x.shape[:ax], n // k, k, *x.shape[ax + 1 :]))
    return _group_max(grouped, ax + 1)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _group_max(grouped, axis):
    return jnp.max(grouped, axis=axis)


@_group_max.defjvp
def _group_max_jvp(axis, primals, tangents):
    (g,), (t,) = primals, tangents
    # The max through this function again: differentiated, the rule keeps NaN groups NaN.
    y = _group_max(g, axis)
    yb = jnp.expand_dims(y, axis)
    # jax's rule for max: the tangent is shared equally among the entries equal to the max. A
    # group holding a NaN has the max NaN and no entry equal to it; jax's rule then divides 0
    # by 0, but under jit XLA rewrites its t * (g == y) into a select and the derivative came
    # out 0. Weights that are NaN for every entry of such a group keep it NaN, eager or jitted.
    hit = (g == yb).astype(g.dtype)
    count = jnp.sum(hit, axis=axis)
    weight = jnp.where(jnp.isnan(yb), yb, hit)
    return y, jnp.sum(t * weight, axis=axis) / count


# --- lookup and the lecture's table ---------------------------------------------------------------


_FUNCTIONS: dict[str, Callable[..., jax.Array]] = {
    "sigmoid": sigmoid,
    "tanh": tanh,
    "relu": relu,
    "leaky_relu": leaky_relu,
    "prelu": prelu,
    "elu": elu,
    "selu": selu,
    "gelu": gelu,
    "silu": silu,
    "softplus": softplus,
    "maxout": maxout,
}

NAMES: tuple[str, ...] = tuple(_FUNCTIONS)
"""The names :func:`get` and :func:`properties` know, in the lecture's order."""


def names() -> tuple[str, ...]:
    """The known activation names (the same as :data:`NAMES`)."""
    return NAMES


# Other names accepted for an activation: alias -> the name in NAMES.
_ALIASES = {"swish": "silu"}


def _canonical_name(name: str) -> str:
    """name lower-cased, "-" as "_", aliases resolved ("Leaky-ReLU" -> "leaky_relu").

    Shared with :func:`jaxnorm.initializers.gain`, so both accept the same spellings.
    """
    key = name.lower().replace("-", "_")
    return _ALIASES.get(key, key)


def _lookup(name: str, fn: str):
    if not isinstance(name, str):
        raise TypeError(f"{fn} expects an activation name (a str), got {type(name).__name__}")
    key = _canonical_name(name)
    if key not in _FUNCTIONS:
        close = difflib.get_close_matches(key, (*NAMES, *_ALIASES), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        aliases = ", ".join(f"{a} (an alias of {n})" for a, n in _ALIASES.items())
        raise ValueError(
            f"unknown activation {name!r}; known names: {', '.join(NAMES)}, and {aliases}; "
            f"case and '-' / '_' do not matter.{hint}"
        )
    return key


def get(name: str) -> Callable[..., jax.Array]:
    """The activation function called ``name``.

    Names are those of :data:`NAMES` or the alias ``"swish"`` (for ``silu``), case-insensitive,
    with ``-`` or ``_`` between words (``"Leaky-ReLU"`` is ``leaky_relu``).

    Args:
      name: the activation's name.

    Returns:
      The function, e.g. :func:`relu`.

    Raises:
      TypeError: if name is not a str.
      ValueError: if the name is unknown; the message lists the known names and aliases.

    Example:
      >>> from jaxnorm import activations
      >>> activations.get("relu") is activations.relu
      True
    """
    return _FUNCTIONS[_lookup(name, "get")]


class Properties(NamedTuple):
    """One row of the lecture's comparison of activation functions.

    Attributes:
      name: the activation's name.
      output_range: (infimum, supremum) of the output (for the default parameters).
      zero_centred: whether outputs are centred on 0 (symmetric range, or designed mean 0).
      saturates: where the gradient vanishes for large |x|: ``"both"``, ``"negative"`` or
        ``"none"``. Saturated units pass back (almost) no gradient.
      needs_exp: whether evaluating it takes an exp (or erf): more compute than a comparison.
      monotone: whether the function is non-decreasing (for non-negative slopes).
      note: the lecture's remark in a sentence.
    """

    name: str
    output_range: tuple[float, float]
    zero_centred: bool
    saturates: str
    needs_exp: bool
    monotone: bool
    note: str


_INF = math.inf
_PROPERTIES = {
    p.name: p
    for p in [
        Properties("sigmoid", (0.0, 1.0), False, "both", True, True,
                   "Saturated units kill gradients; outputs are all positive, so the weight "
                   "gradients of the next layer all share one sign."),
        Properties("tanh", (-1.0, 1.0), True, "both", True, True,
                   "Zero-centred, but still kills gradients when saturated."),
        Properties("relu", (0.0, _INF), False, "negative", False, True,
                   "Does not saturate for x > 0, cheap, converges much faster than sigmoid/tanh "
                   "(about 6x in Krizhevsky et al. 2012); units can die (never activate)."),
        Properties("leaky_relu", (-_INF, _INF), False, "none", False, True,
                   "Like ReLU but never saturates and does not die."),
        Properties("prelu", (-_INF, _INF), False, "none", False, True,
                   "Leaky ReLU with the slope learned (per channel or shared)."),
        Properties("elu", (-1.0, _INF), False, "negative", True, True,
                   "All benefits of ReLU, outputs closer to zero mean; the negative "
                   "saturation adds some robustness to noise; needs exp."),
        Properties("selu", (-_SELU_SCALE * _SELU_ALPHA, _INF), True, "negative", True, True,
                   "Scaled ELU whose fixed point is mean 0, variance 1 (self-normalising)."),
        Properties("gelu", (-0.16997120747990369, _INF), False, "negative", True, False,
                   "Smooth ReLU weighting x by the Gaussian CDF; common in transformers."),
        Properties("silu", (-0.27846454276107379, _INF), False, "negative", True, False,
                   "x * sigmoid(x) (swish); smooth, non-monotone near its minimum."),
        Properties("softplus", (0.0, _INF), False, "negative", True, True,
                   "Smooth ReLU, log(1 + exp(x)); its derivative is the sigmoid."),
        Properties("maxout", (-_INF, _INF), False, "none", False, True,
                   "Generalises ReLU and leaky ReLU: linear regimes, no saturation, no dying, "
                   "but num_pieces times the parameters."),
    ]
}  # fmt: skip


def properties(name: str) -> Properties:
    """The lecture's comparison row for the activation called ``name``.

    Args:
      name: the activation's name (see :data:`NAMES`).

    Returns:
      A :class:`Properties` row (output range, zero-centred, saturates, needs exp, monotone).

    Raises:
      TypeError: if name is not a str.
      ValueError: if the name is unknown; the message lists the known names.

    Example:
      >>> from jaxnorm import activations
      >>> p = activations.properties("sigmoid")
      >>> p.output_range, p.zero_centred, p.saturates, p.needs_exp
      ((0.0, 1.0), False, 'both', True)
    """
    return _PROPERTIES[_lookup(name, "properties")]
