"""Preprocessing: PCA and whitening fits against scikit-learn, apply against a plain matmul,
and a streamed fit against the in-memory fit.

Fits are called the way users call them (eager ``t.fit(x)``, which jits its kernels inside);
scikit-learn gets the same float32 data as a NumPy array.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import harness
from jaxnorm import preprocessing as pp

SIZES = {"small": (20000, 128), "large": (100000, 512), "gpu": (50000, 512), "tiny": (2000, 16)}
# The data's mean (every feature's): an offset from zero, as real features have.
MEAN = 3.0


def _data(n, d):
    # Variances from 4 to 0.04 along random orthogonal axes: full rank, condition number 100.
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    scales = np.linspace(2.0, 0.2, d)
    return ((rng.normal(size=(n, d)) * scales) @ q + MEAN).astype(np.float32)


@jax.jit
def _matmul(x, w):
    return x @ w


CENTRED = "sklearn PCA(covariance_eigh) of X - X.mean(0)"
# Added to the data for the accuracy rows: nothing (its own MEAN), and 100 (pixel-like data).
OFFSETS = (0.0, 100.0)


def _worst_relative_error(explained_variance, x64):
    ref = np.linalg.eigvalsh(np.cov(x64, rowvar=False))[::-1]
    return float(np.max(np.abs(np.asarray(explained_variance, np.float64) - ref) / ref))


def _accuracy_rows(x_np, pca, t, shape):
    """The fit's accuracy next to its speed: the worst relative error of the explained variances
    against a float64 eigendecomposition, for jaxnorm and scikit-learn's covariance_eigh (both on
    the same float32 data), at the data's offset and with 100 added. The times are the fits' above.
    """
    from sklearn.decomposition import PCA

    rows = []
    for extra in OFFSETS:
        xs = x_np + np.float32(extra)
        x64 = xs.astype(np.float64)
        ours = _worst_relative_error(pca.fit(jnp.asarray(xs)).explained_variance, x64)
        sk = _worst_relative_error(
            PCA(svd_solver="covariance_eigh").fit(xs).explained_variance_, x64
        )
        offset = f"offset {MEAN + extra:g}"
        rows.append(
            harness.Row(
                "accuracy",
                f"pca.fit {shape}, {offset}",
                t["pca.fit"],
                "sklearn PCA(covariance_eigh)",
                t["sklearn PCA(covariance_eigh)"],
                None,
                f"worst relative error of the explained variances vs float64: jaxnorm {ours:.1e},"
                f" sklearn {sk:.1e}",
            )
        )
    return rows


@harness.benchmark("preprocessing")
def bench(size: str) -> list[harness.Row]:
    from sklearn.decomposition import PCA

    n, d = SIZES[size]
    reps = 7 if size == "small" else 5
    x_np = _data(n, d)
    x = jnp.asarray(x_np)
    shape = f"({n}, {d}) float32"
    rows = []

    pca, pw, zca = pp.pca(), pp.pca_whiten(), pp.zca_whiten()
    sk = {
        "sklearn PCA(covariance_eigh)": lambda: PCA(svd_solver="covariance_eigh").fit(x_np),
        # covariance_eigh forms the raw X^T X and subtracts n mean mean^T afterwards; centring X
        # first is how a user gets jaxnorm's accuracy out of it (see the accuracy rows).
        CENTRED: lambda: PCA(svd_solver="covariance_eigh").fit(x_np - x_np.mean(axis=0)),
        "sklearn PCA(covariance_eigh, whiten)": lambda: PCA(
            svd_solver="covariance_eigh", whiten=True
        ).fit(x_np),
    }
    ours = {
        "pca.fit": lambda: pca.fit(x),
        "pca_whiten.fit": lambda: pw.fit(x),
        "zca_whiten.fit": lambda: zca.fit(x),
    }
    t = harness.interleaved({**ours, **sk}, warmup=1, reps=reps)
    # The full SVD (seconds, with BLAS's threads busy to the end) is timed apart, so that it
    # does not precede the other fits in the rounds above.
    full = harness.interleaved(
        {"pca.fit": ours["pca.fit"], "full": lambda: PCA(svd_solver="full").fit(x_np)},
        warmup=1,
        reps=3,
    )
    rows.append(
        harness.Row(
            "fit", f"pca.fit {shape}", full["pca.fit"], "sklearn PCA(full)", full["full"], None, ""
        )
    )
    for case, anchor in [
        ("pca.fit", "sklearn PCA(covariance_eigh)"),
        ("pca.fit", CENTRED),
        ("pca_whiten.fit", "sklearn PCA(covariance_eigh, whiten)"),
        ("zca_whiten.fit", "sklearn PCA(covariance_eigh, whiten)"),
    ]:
        note = "sklearn has no ZCA; its whitening PCA fit is the nearest" if "zca" in case else ""
        rows.append(harness.Row("fit", f"{case} {shape}", t[case], anchor, t[anchor], None, note))
    rows += _accuracy_rows(x_np, pca, t, shape)

    # apply against a plain jitted matmul of the same shape; floor: one read+write of x.
    copy, _, ones = harness.floor_fns((n, d))
    w = jnp.asarray(np.random.default_rng(1).normal(size=(d, d)).astype(np.float32))
    s_pw, s_zca = pw.fit(x), zca.fit(x)
    apply_pw, apply_zca = jax.jit(pw.apply), jax.jit(zca.apply)
    t = harness.interleaved(
        {
            "pca_whiten.apply": lambda: apply_pw(s_pw, x),
            "zca_whiten.apply": lambda: apply_zca(s_zca, x),
            "matmul": lambda: _matmul(x, w),
            "copy": lambda: copy(ones),
        },
        reps=15,
    )
    for case in ("pca_whiten.apply", "zca_whiten.apply"):
        rows.append(
            harness.Row(
                "apply", f"{case} {shape}", t[case], "jit(x @ W)", t["matmul"], t["copy"], ""
            )
        )

    # Streamed fit over 100 batches (already on the device) against the in-memory fit.
    batches = [x[i : i + n // 100] for i in range(0, n, n // 100)]
    t = harness.interleaved(
        {
            "stream": lambda: pp.fit_stream(pw, batches, progress=False),
            "memory": lambda: pw.fit(x),
        },
        warmup=1,
        reps=reps + 2,
    )
    rows.append(
        harness.Row(
            "fit_stream",
            f"pca_whiten, 100 batches of {n // 100} {shape}",
            t["stream"],
            "pca_whiten.fit (in memory)",
            t["memory"],
            None,
            "",
        )
    )
    return rows
