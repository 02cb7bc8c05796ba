"""A battery of functions for gradient checkers: planted gradient errors and correct functions.

Shared by tests/test_gradcheck_power.py (jaxnorm must flag every planted error above its documented
tolerance and pass every correct function) and benchmarks/bench_gradcheck.py (the power table:
detection and false-alarm rates of jaxnorm.check_grad, jax.test_util.check_grads and
torch.autograd.gradcheck).

Errors are planted in the backward pass (a ``jax.custom_vjp`` or ``jax.custom_jvp`` rule, or a
``stop_gradient`` misuse), so every checker sees the same wrong gradient and the forward pass is the
true function: a finite difference of ``f`` is the reference. Each case builds ``(f, args)``; the
first argument is checked. ``x64`` cases build and check inside ``jax.enable_x64(True)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxnorm import batchnorm


@dataclasses.dataclass(frozen=True)
class Case:
    """One function for the checkers.

    ``planted`` is the size of the planted error in words ("" for a correct function);
    ``detectable`` is False for a planted error below jaxnorm's documented tolerance (it is
    reported, not required); ``low_precision`` names the dtype a correct function computes in
    internally, for which jaxnorm warns.
    """

    name: str
    build: Callable[[], tuple[Callable, tuple]]
    dtype: str
    planted: str = ""
    x64: bool = False
    detectable: bool = True
    low_precision: str | None = None

    @property
    def correct(self) -> bool:
        return not self.planted

    def make(self):
        """``(f, args)``; call inside ``jax.enable_x64(self.x64)``."""
        return self.build()


def _rng(seed):
    return np.random.default_rng(seed)


def _normal(seed, shape, dtype, scale=1.0):
    return jnp.asarray(scale * _rng(seed).standard_normal(shape), dtype)


def scaled_grad(fn, scale):
    """``fn`` with its input gradient multiplied by ``scale`` (a number or an array like x).

    The forward value is ``fn``'s own; only the backward pass is off, by ``scale - 1`` relative.
    """

    @jax.custom_vjp
    def g(x):
        return fn(x)

    def fwd(x):
        y, vjp = jax.vjp(fn, x)
        return y, vjp

    def bwd(vjp, ct):
        (gx,) = vjp(ct)
        return (gx * jnp.asarray(scale, gx.dtype),)

    g.defvjp(fwd, bwd)
    return g


# --------------------------------------------------------------------------------------------------
# Models


def _mlp_params(seed, dtype, d=4, hidden=6, out=3):
    return {
        "w1": _normal(seed, (d, hidden), dtype, 1 / np.sqrt(d)),
        "b1": _normal(seed + 1, (hidden,), dtype, 0.1),
        "w2": _normal(seed + 2, (hidden, out), dtype, 1 / np.sqrt(hidden)),
        "b2": _normal(seed + 3, (out,), dtype, 0.1),
    }


def _mlp_loss(params, x, t, wrap_b1=lambda b: b, wrap_w2=lambda w: w):
    h = jnp.tanh(x @ params["w1"] + wrap_b1(params["b1"])[None])
    y = h @ wrap_w2(params["w2"]) + params["b2"][None]
    return 0.5 * jnp.sum((y - t) ** 2)


def _mlp(dtype, seed=0, **wraps):
    params = _mlp_params(seed, dtype)
    x, t = _normal(seed + 10, (5, 4), dtype), _normal(seed + 11, (5, 3), dtype)
    return (lambda p, x, t: _mlp_loss(p, x, t, **wraps)), (params, x, t)


def _planted_mlp(dtype, rel):
    return lambda: _mlp(dtype, wrap_b1=scaled_grad(lambda b: b, 1 + rel))


def _float32_only_error(rel):
    # A backward pass that is off only when it runs in float32 (a dtype-specific code path).
    @jax.custom_vjp
    def g(x):
        return jnp.sin(x)

    def bwd(x, ct):
        scale = 1 + rel if x.dtype == jnp.float32 else 1.0
        return (ct * jnp.cos(x) * jnp.asarray(scale, x.dtype),)

    g.defvjp(lambda x: (jnp.sin(x), x), bwd)

    def build():
        return (lambda x: jnp.sum(g(x))), (_normal(86, (6,), jnp.float32),)

    return build


def _deep_tanh(dtype, depth=8, width=16):
    def build():
        ws = [_normal(20 + i, (width, width), dtype, 1 / np.sqrt(width)) for i in range(depth)]
        x = _normal(40, (4, width), dtype)

        def loss(ws, x):
            for w in ws:
                x = jnp.tanh(x @ w)
            return jnp.sum(x**2)

        return loss, (ws, x)

    return build


def _softmax_ce(dtype):
    def build():
        w = _normal(50, (6, 5), dtype, 0.5)
        x = _normal(51, (8, 6), dtype)
        y = jnp.asarray(_rng(52).integers(0, 5, 8))

        def loss(w, x, y):
            logp = jax.nn.log_softmax(x @ w)
            return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))

        return loss, (w, x, y)

    return build


def _batch_norm(dtype):
    def build():
        x = _normal(60, (8, 5), dtype, 2.0) + 3.0
        scale = 1.0 + _normal(61, (5,), dtype, 0.1)
        bias = _normal(62, (5,), dtype, 0.1)
        t = _normal(63, (8, 5), dtype)
        state = batchnorm.init_state(5, dtype=dtype)

        def loss(p, x, t):
            y, _ = batchnorm.batch_norm(x, p["scale"], p["bias"], state, train=True)
            return jnp.sum(jnp.tanh(y) * t)

        return loss, ({"scale": scale, "bias": bias}, x, t)

    return build


def _bn_wrong_backward():
    # Batch norm whose backward forgets the mean-of-gradient term: right only on average.
    def bn(x):
        mu = jnp.mean(x, 0, keepdims=True)
        var = jnp.mean((x - mu) ** 2, 0, keepdims=True)
        return (x - mu) / jnp.sqrt(var + 1e-5)

    @jax.custom_vjp
    def g(x):
        return bn(x)

    def fwd(x):
        y = bn(x)
        return y, (y, jnp.sqrt(jnp.var(x, 0, keepdims=True) + 1e-5))

    def bwd(res, ct):
        y, std = res
        return (
            (ct - y * jnp.mean(ct * y, 0, keepdims=True)) / std,
        )  # the - mean(ct) term is missing

    g.defvjp(fwd, bwd)

    def build():
        x = _normal(64, (8, 5), jnp.float32, 2.0)
        t = _normal(65, (8, 5), jnp.float32)
        return (lambda x, t: jnp.sum(jnp.tanh(g(x)) * t)), (x, t)

    return build


def _one_wrong_coordinate(n=10_000, at=4321, rel=1e-2):
    def build():
        scale = np.ones(n, np.float32)
        scale[at] += rel
        x = _normal(70, (n,), jnp.float32)
        return (lambda x: jnp.sum(scaled_grad(jnp.sin, scale)(x) * jnp.cos(0.5 * x))), (x,)

    return build


def _wrong_sign_leaf():
    return lambda: _mlp(jnp.float32, wrap_w2=scaled_grad(lambda w: w, -1.0))


def _transposed_grad():
    # A hand-written backward of x @ W that returns the gradient of W transposed (square W).
    @jax.custom_vjp
    def matmul(w, x):
        return x @ w

    matmul.defvjp(lambda w, x: (x @ w, (w, x)), lambda r, g: ((r[1].T @ g).T, g @ r[0].T))

    def build():
        w = _normal(80, (4, 4), jnp.float32)
        x = _normal(81, (6, 4), jnp.float32)
        return (lambda w, x: jnp.sum(jnp.tanh(matmul(w, x)) ** 2)), (w, x)

    return build


def _stop_gradient_bug():
    # x * stop_gradient(x) for x**2: the gradient is x, half of the true 2x.
    def build():
        x = _normal(82, (5,), jnp.float32)
        return (lambda x: jnp.sum(x * jax.lax.stop_gradient(x))), (x,)

    return build


def _mean_missing():
    # The softmax cross-entropy's gradient without the 1/N of the mean.
    def ce(z, y):
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(z), y[:, None], axis=1))

    @jax.custom_vjp
    def g(z, y):
        return ce(z, y)

    def fwd(z, y):
        return ce(z, y), (z, y)

    def bwd(r, ct):
        z, y = r
        grad = jax.nn.softmax(z) - jax.nn.one_hot(y, z.shape[1], dtype=z.dtype)
        return ct * grad, np.zeros(y.shape, jax.dtypes.float0)

    g.defvjp(fwd, bwd)

    def build():
        w = _normal(83, (6, 5), jnp.float32, 0.5)
        x = _normal(84, (8, 6), jnp.float32)
        y = jnp.asarray(_rng(85).integers(0, 5, 8))
        return (lambda w, x, y: g(x @ w, y)), (w, x, y)

    return build


# --------------------------------------------------------------------------------------------------
# Kinks


def _kink_points(dtype):
    # Coordinates exactly on the kink and on both sides of it.
    return jnp.asarray([0.0, 0.7, -0.4, 0.0, 1.3, -2.1, 0.0, 0.25], dtype)


def _relu_with_derivative_at_zero(value):
    @jax.custom_jvp
    def relu(x):
        return jnp.maximum(x, 0)

    @relu.defjvp
    def _(p, t):
        (x,), (tx,) = p, t
        d = jnp.where(x > 0, 1.0, jnp.where(x < 0, 0.0, value)).astype(x.dtype)
        return relu(x), d * tx

    return relu


def _kink_error(value):
    def build():
        w = jnp.asarray([1.5, -2.0, 0.5, 3.0, 1.0, -1.0, 0.7, 2.0], jnp.float32)
        return (lambda x: jnp.sum(_relu_with_derivative_at_zero(value)(x) * w)), (
            _kink_points(jnp.float32),
        )

    return build


def _leaky_wrong_side():
    # leaky_relu(x, 0.1) whose derivative at exactly 0 is -1: outside both one-sided slopes.
    @jax.custom_jvp
    def leaky(x):
        return jnp.where(x > 0, x, 0.1 * x)

    @leaky.defjvp
    def _(p, t):
        (x,), (tx,) = p, t
        d = jnp.where(x > 0, 1.0, jnp.where(x < 0, 0.1, -1.0)).astype(x.dtype)
        return leaky(x), d * tx

    def build():
        return (lambda x: jnp.sum(leaky(x) * jnp.arange(1.0, 9.0, dtype=x.dtype))), (
            _kink_points(jnp.float32),
        )

    return build


def _correct_kinks(fn, dtype):
    def build():
        w = jnp.asarray([1.5, -2.0, 0.5, 3.0, 1.0, -1.0, 0.7, 2.0], dtype)
        return (lambda x: jnp.sum(fn(x) * w)), (_kink_points(dtype),)

    return build


def _max_ties(dtype):
    def build():
        x = jnp.asarray([0.5, -1.0, 2.0, 0.3, 0.3, 1.0], dtype)
        y = jnp.asarray([0.5, 0.2, 2.0, -0.7, 0.3, 3.0], dtype)  # ties at 0, 2, 4
        return (lambda x, y: jnp.sum(jnp.maximum(x, y) * jnp.arange(1.0, 7.0, dtype=dtype))), (
            x,
            y,
        )

    return build


def _maxout_ties():
    def build():
        x = jnp.asarray([[1.0, 1.0, 0.5], [0.2, -0.3, 0.2], [2.0, 2.0, 2.0]], jnp.float32)
        return (lambda x: jnp.sum(jnp.max(x, axis=1) * jnp.arange(1.0, 4.0, dtype=x.dtype))), (x,)

    return build


def _huber_at_the_joint():
    def huber(x):
        return jnp.where(jnp.abs(x) <= 1.0, 0.5 * x**2, jnp.abs(x) - 0.5)

    def build():
        return (lambda x: jnp.sum(huber(x))), (
            jnp.asarray([1.0, -1.0, 0.3, 2.5, -0.8], jnp.float32),
        )

    return build


# --------------------------------------------------------------------------------------------------
# Fast-growing and ill-conditioned


def _exp20(dtype, rel=0.0):
    def build():
        x = jnp.asarray(np.linspace(-1.0, 1.5, 11), dtype)
        f = lambda x: jnp.sum(jnp.exp(20 * x))
        if rel:
            f = scaled_grad(f, 1 + rel)
        return f, (x,)

    return build


def _hilbert(dtype, n=8):
    def build():
        i = np.arange(n)
        h = jnp.asarray(1.0 / (i[:, None] + i[None, :] + 1), dtype)
        x = _normal(90, (n,), dtype)
        return (lambda x: 0.5 * x @ (h @ x)), (x,)

    return build


def _logsumexp_offset(dtype):
    def build():
        x = _normal(91, (12,), dtype, 3.0) + 50.0
        return (lambda x: jax.nn.logsumexp(x) + 1e-3 * jnp.sum(x**2)), (x,)

    return build


def _rosenbrock(dtype):
    def build():
        x = jnp.asarray([-1.2, 1.0, 0.8, 1.1, 0.95], dtype)
        return (lambda x: jnp.sum(100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2)), (x,)

    return build


def _stationary(dtype):
    def build():
        return (lambda x: jnp.sum(x**2 * (1 + x**2))), (
            jnp.asarray([0.0, 0.0, 1e-4, -1e-4], dtype),
        )

    return build


def _large_loss(dtype):
    def build():
        x = _normal(92, (6,), dtype)
        return (lambda x: 1e4 * jnp.sum(jnp.cosh(x))), (x,)

    return build


def _spd_logdet():
    def build():
        a = _normal(93, (5, 5), jnp.float64)
        return (lambda a: jnp.linalg.slogdet(a @ a.T + 5 * jnp.eye(5))[1]), (a,)

    return build


# --------------------------------------------------------------------------------------------------
# Low precision inside f


def _bf16_sin():
    def build():
        x = _normal(100, (16,), jnp.float32)
        return (lambda x: jnp.sum(jnp.sin(x.astype(jnp.bfloat16)).astype(jnp.float32))), (x,)

    return build


def _bf16_matmul():
    def build():
        w = _normal(101, (8, 4), jnp.float32, 0.5)
        x = _normal(102, (6, 8), jnp.float32)

        def loss(w, x):
            h = jnp.dot(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
            return jnp.sum(jnp.tanh(h.astype(jnp.float32)) ** 2)

        return loss, (w, x)

    return build


def _bf16_planted(rel):
    def build():
        w = _normal(103, (16,), jnp.float32)
        inner = scaled_grad(jnp.sin, jnp.asarray(1 + rel, jnp.bfloat16))
        return (lambda x: jnp.sum(inner(x.astype(jnp.bfloat16)).astype(jnp.float32))), (w,)

    return build


def _f16_mlp():
    def build():
        f, (p, x, t) = _mlp(jnp.float32)
        return (
            lambda p, x, t: f(
                jax.tree_util.tree_map(lambda a: a.astype(jnp.float16), p),
                x.astype(jnp.float16),
                t.astype(jnp.float16),
            ).astype(jnp.float32)
        ), (p, x, t)

    return build


def _flax_mlp():
    def build():
        import flax.linen as nn

        class MLP(nn.Module):
            @nn.compact
            def __call__(self, x):
                return nn.Dense(3)(nn.relu(nn.Dense(6)(x)))

        model = MLP()
        x = _normal(110, (5, 4), jnp.float32)
        variables = model.init(jax.random.key(0), x)
        return (lambda v, x: jnp.mean(model.apply(v, x) ** 2)), (variables, x)

    return build


def _dropout():
    def build():
        f, (p, x, t) = _mlp(jnp.float32)

        def loss(p, x, t, key):
            keep = jax.random.bernoulli(key, 0.8, x.shape)
            return f(p, jnp.where(keep, x / 0.8, 0.0), t)

        return loss, (p, x, t, jax.random.key(3))

    return build


# --------------------------------------------------------------------------------------------------
# The battery

PLANTED = [
    Case("mlp bias grad +1e-2 (float32)", _planted_mlp(jnp.float32, 1e-2), "float32", "1e-2 rel"),
    Case("mlp bias grad +1e-3 (float32)", _planted_mlp(jnp.float32, 1e-3), "float32", "1e-3 rel"),
    Case("mlp bias grad +1e-4 (float32)", _planted_mlp(jnp.float32, 1e-4), "float32", "1e-4 rel"),
    Case(
        "mlp bias grad +1e-6 (float64)",
        _planted_mlp(jnp.float64, 1e-6),
        "float64",
        "1e-6 rel",
        x64=True,
    ),
    Case(
        "1 wrong coordinate of 10,000 (+1e-2)",
        _one_wrong_coordinate(),
        "float32",
        "1e-2 rel, 1 coord",
    ),
    Case("wrong sign on one pytree leaf", _wrong_sign_leaf(), "float32", "sign"),
    Case("relu'(0) = 2 (error only at the kink)", _kink_error(2.0), "float32", "at kink"),
    Case("relu'(0) = -0.5 (error only at the kink)", _kink_error(-0.5), "float32", "at kink"),
    Case("leaky_relu'(0) = -1 (outside both sides)", _leaky_wrong_side(), "float32", "at kink"),
    Case("sin in bfloat16, backward +10%", _bf16_planted(0.1), "float32", "1e-1 rel, bf16"),
    Case(
        "exp(20x) grad +1e-4 (float64)", _exp20(jnp.float64, 1e-4), "float64", "1e-4 rel", x64=True
    ),
    Case("exp(20x) grad +1e-2 (float32)", _exp20(jnp.float32, 1e-2), "float32", "1e-2 rel"),
    Case("matmul backward transposed", _transposed_grad(), "float32", "transpose"),
    Case("x * stop_gradient(x) for x**2", _stop_gradient_bug(), "float32", "stop_gradient"),
    Case("softmax CE backward without 1/N", _mean_missing(), "float32", "scale 1/N"),
    Case("batch norm backward without mean(g)", _bn_wrong_backward(), "float32", "missing term"),
    Case("float32-only backward +2e-3", _float32_only_error(2e-3), "float32", "2e-3 rel, f32 only"),
    # Below the documented tolerances: reported in the power table, not required.
    Case(
        "mlp bias grad +3e-8 (float64, below rtol 1e-7)",
        _planted_mlp(jnp.float64, 3e-8),
        "float64",
        "3e-8 rel",
        x64=True,
        detectable=False,
    ),
    Case(
        "float32-only backward +2e-4 (below float32 rtol 1e-3)",
        _float32_only_error(2e-4),
        "float32",
        "2e-4 rel, f32 only",
        detectable=False,
    ),
    Case(
        "sin in bfloat16, backward +2% (below bfloat16 rtol 5e-2)",
        _bf16_planted(0.02),
        "float32",
        "2e-2 rel, bf16",
        detectable=False,
    ),
]

CORRECT = [
    Case("relu at 0 (float32)", _correct_kinks(jax.nn.relu, jnp.float32), "float32"),
    Case("relu at 0 (float64)", _correct_kinks(jax.nn.relu, jnp.float64), "float64", x64=True),
    Case("abs at 0 (float32)", _correct_kinks(jnp.abs, jnp.float32), "float32"),
    Case("abs at 0 (float64)", _correct_kinks(jnp.abs, jnp.float64), "float64", x64=True),
    Case(
        "leaky_relu at 0",
        _correct_kinks(lambda x: jax.nn.leaky_relu(x, 0.1), jnp.float32),
        "float32",
    ),
    Case("maximum with ties (float32)", _max_ties(jnp.float32), "float32"),
    Case("maximum with ties (float64)", _max_ties(jnp.float64), "float64", x64=True),
    Case("max over rows with ties", _maxout_ties(), "float32"),
    Case("huber at |x| = 1", _huber_at_the_joint(), "float32"),
    Case("exp(20x) (float32)", _exp20(jnp.float32), "float32"),
    Case("exp(20x) (float64)", _exp20(jnp.float64), "float64", x64=True),
    Case("Hilbert quadratic form (float32)", _hilbert(jnp.float32), "float32"),
    Case("Hilbert quadratic form (float64)", _hilbert(jnp.float64), "float64", x64=True),
    Case("logsumexp at offset 50 (float32)", _logsumexp_offset(jnp.float32), "float32"),
    Case("Rosenbrock (float32)", _rosenbrock(jnp.float32), "float32"),
    Case("Rosenbrock (float64)", _rosenbrock(jnp.float64), "float64", x64=True),
    Case("stationary point (float32)", _stationary(jnp.float32), "float32"),
    Case("loss of scale 1e4 (float32)", _large_loss(jnp.float32), "float32"),
    Case("logdet of an SPD matrix (float64)", _spd_logdet(), "float64", x64=True),
    Case("sin computed in bfloat16", _bf16_sin(), "float32", low_precision="bfloat16"),
    Case("matmul in bfloat16", _bf16_matmul(), "float32", low_precision="bfloat16"),
    Case("MLP computed in float16", _f16_mlp(), "float32", low_precision="float16"),
    Case("deep tanh net, 8 layers (float32)", _deep_tanh(jnp.float32), "float32"),
    Case("deep tanh net, 8 layers (float64)", _deep_tanh(jnp.float64), "float64", x64=True),
    Case("softmax cross-entropy (float32)", _softmax_ce(jnp.float32), "float32"),
    Case("jaxnorm batch norm (float32)", _batch_norm(jnp.float32), "float32"),
    Case("jaxnorm batch norm (float64)", _batch_norm(jnp.float64), "float64", x64=True),
    Case("flax MLP with relu", _flax_mlp(), "float32"),
    Case("MLP with dropout (key held fixed)", _dropout(), "float32"),
    Case("tanh MLP (float32)", lambda: _mlp(jnp.float32), "float32"),
]

CASES = PLANTED + CORRECT


def run_jaxnorm(case: Case, **kwargs):
    """jaxnorm.check_grad on the case; returns the report (warnings are left to the caller)."""
    from jaxnorm import gradcheck

    with jax.enable_x64(case.x64):
        f, args = case.make()
        return gradcheck.check_grad(f, *args, **kwargs)
