"""The lab's report: one self-contained HTML page and a JSON file of every number in it.

Both files are written atomically: the content goes to a temporary file in the output folder,
which is renamed over the target (``os.replace``) only when complete, so an interrupted or failed
run never leaves a half-written ``index.html`` (a previous report, if any, stays as it was).
Figures are embedded as base64 PNG (``data:image/png;base64,...``); the page loads nothing from
outside, so it reads from disk, an e-mail attachment or a CI artifact without a server.
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import json
import os
import platform
import tempfile
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import IO, Any

from jaxnorm.lab._util import to_jsonable

_STATUS_CLASS = {
    "agrees": "ok",
    "partly agrees": "partly",
    "disagrees": "bad",
    "inconclusive": "partly",
}

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1200px;
       margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { margin-bottom: 0.2em; }
h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.88em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.55em; text-align: left; }
th { background: #f3f3f3; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.82em; }
.verdict { padding: 0.5em 0.8em; border-radius: 4px; margin: 0.6em 0; }
.ok { background: #e5f5e0; border-left: 5px solid #31a354; }
.partly { background: #fff7d6; border-left: 5px solid #e6a700; }
.bad { background: #fde0dd; border-left: 5px solid #d7301f; }
.claim { font-style: italic; }
.meta { color: #666; font-size: 0.9em; }
ul.checks { margin: 0.3em 0; }
"""


def figure_png(fig: Any, *, dpi: int = 150) -> bytes:
    """A matplotlib Figure as PNG bytes (150 dpi: the report's resolution)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def figure_png_base64(fig: Any, *, dpi: int = 150) -> str:
    """A matplotlib Figure as base64-encoded PNG text."""
    return base64.b64encode(figure_png(fig, dpi=dpi)).decode("ascii")


def results_dict(outcomes: Sequence[Any], meta: dict) -> dict:
    """Everything the page shows, as JSON-safe data (NaN and infinities as None).

    Layout: ``meta`` keys at the top level, then ``experiments: {name: {title, seconds, status,
    error, verdict: {status, claim, text, checks}, table: {columns, rows}, result}}``.
    """
    experiments = {}
    for o in outcomes:
        columns, rows = o.table
        experiments[o.name] = {
            "title": o.title,
            "seconds": o.seconds,
            "status": "error" if o.error else "ok",
            "error": o.error,
            "verdict": None if o.verdict is None else o.verdict._asdict(),
            "table": {"columns": list(columns), "rows": [list(r) for r in rows]},
            "result": o.result,
        }
    return to_jsonable({**meta, "experiments": experiments})


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, mode: str = "w") -> Iterator[IO[Any]]:
    """A text file that appears at ``path`` only if the ``with`` block completes.

    Writes to a temporary file in the same folder (so the rename stays on one filesystem), then
    ``os.replace`` moves it over ``path``. On any exception (``KeyboardInterrupt`` included) the
    temporary file is removed and ``path`` is left untouched.
    """
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates the file private (0600); give it the permissions of a normal new file.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike, data: dict) -> None:
    """Write ``data`` to ``path`` atomically, refusing NaN literals (``allow_nan=False``)."""
    text = json.dumps(data, indent=1, allow_nan=False)
    with atomic_writer(path) as f:
        f.write(text)


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _table_html(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    if not columns:
        return ""
    head = "".join(f"<th>{_esc(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_esc(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _verdict_html(verdict: Any) -> str:
    cls = _STATUS_CLASS.get(verdict.status, "partly")
    states = list(verdict.checks.values())
    if verdict.status == "agrees":
        lead = "Agrees with the lecture."
    elif verdict.status == "disagrees":
        lead = "Disagrees with the lecture: the numbers do not support the claim."
    elif verdict.status == "partly agrees":
        # A check that was not run is not a pass: say which kind of gap there is.
        gaps = []
        if any(v is False for v in states):
            gaps.append("some checks fail (marked ✗ below)")
        if any(v == "tie" for v in states):
            gaps.append("some comparisons are ties, which do not count as support (marked =)")
        if any(v is None for v in states):
            gaps.append("some checks could not be made (marked ? below)")
        lead = "Partly agrees with the lecture: " + "; ".join(gaps) + "."
    else:
        lead = "Inconclusive: the run could not decide."
    checks = "".join(_check_html(name, ok) for name, ok in verdict.checks.items())
    return (
        f'<p class="claim">Lecture: {_esc(verdict.claim)}</p>'
        f'<div class="verdict {cls}"><b>Verdict: {_esc(lead)}</b> {_esc(verdict.text)}'
        f'<ul class="checks">{checks}</ul></div>'
    )


def _check_html(name: str, ok: Any) -> str:
    if ok is None:
        return f"<li>? {_esc(name)} (not checked)</li>"
    if ok == "tie":
        return f"<li>= {_esc(name)} (tie: not support)</li>"
    return f"<li>✓ {_esc(name)}</li>" if ok else f"<li>✗ {_esc(name)}</li>"


def _figure_html(
    outcome: Any, plot: Callable[[Any], Any] | None, figures_dir: str | None = None
) -> str:
    if plot is None or outcome.result is None:
        return ""
    try:
        png = figure_png(plot(outcome.result))
        if figures_dir is not None:
            with atomic_writer(os.path.join(figures_dir, f"{outcome.name}.png"), "wb") as f:
                f.write(png)
        data = base64.b64encode(png).decode("ascii")
    except Exception:
        # A broken figure must not cost the rest of a long run's report.
        return f"<p><b>The figure failed:</b></p><pre>{_esc(traceback.format_exc())}</pre>"
    alt = f"figure of {outcome.title}"
    return f'<img alt="{_esc(alt)}" src="data:image/png;base64,{data}">'


def _render_section(
    outcome: Any, plot: Callable[[Any], Any] | None, figures_dir: str | None = None
) -> str:
    parts = [f'<section id="{_esc(outcome.name)}"><h2>{_esc(outcome.title)}</h2>']
    parts.append(f'<p class="meta">--only {_esc(outcome.name)} · {outcome.seconds:.1f} s</p>')
    if outcome.error:
        parts.append(
            '<div class="verdict bad"><b>The experiment failed</b> (no verdict):</div>'
            f"<pre>{_esc(outcome.error)}</pre>"
        )
        return "".join(parts) + "</section>"
    parts.append(_verdict_html(outcome.verdict))
    parts.append(_figure_html(outcome, plot, figures_dir))
    parts.append(_table_html(*outcome.table))
    report = getattr(outcome.result, "report", None)
    if isinstance(report, str):
        parts.append(f"<pre>{_esc(report)}</pre>")
    notes = getattr(outcome.result, "notes", ())
    if notes:
        parts.append(
            "<p>Warnings raised during the run:</p><ul>"
            + "".join(f"<li>{_esc(n)}</li>" for n in notes)
            + "</ul>"
        )
    return "".join(parts) + "</section>"


def _summary_html(outcomes: Sequence[Any]) -> str:
    rows = []
    for o in outcomes:
        status = "error" if o.error else o.verdict.status
        cls = "bad" if o.error else _STATUS_CLASS.get(status, "partly")
        rows.append(
            f'<tr><td><a href="#{_esc(o.name)}">{_esc(o.title)}</a></td>'
            f'<td class="{cls}">{_esc(status)}</td><td>{o.seconds:.1f} s</td></tr>'
        )
    return (
        "<table><thead><tr><th>experiment</th><th>verdict</th><th>time</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def write_html(
    path: str | os.PathLike,
    outcomes: Sequence[Any],
    meta: dict,
    plots: dict[str, Callable[[Any], Any]],
    figures_dir: str | os.PathLike | None = None,
) -> None:
    """Write the report page to ``path`` atomically, one section per outcome.

    Args:
      path: the page, e.g. ``lab-report/index.html``.
      outcomes: :class:`jaxnorm.lab.Outcome` objects, in page order.
      meta: run information shown in the header (seed, quick, versions, devices, ...).
      plots: ``{name: plot(result) -> Figure}``.
      figures_dir: also write each figure there as ``<name>.png`` (150 dpi), e.g. the
        README's ``docs/figures``.
    """
    figures_dir = None if figures_dir is None else os.fspath(figures_dir)
    with atomic_writer(path) as f:
        f.write(
            '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            "<title>jaxnorm lab</title>"
            f"<style>{_CSS}</style></head><body>"
            "<h1>jaxnorm lab</h1>"
            "<p>The experiments of <i>Training Neural Networks, Part 1</i> (CS231n), run with "
            "jaxnorm. Each section states the lecture's claim, a verdict computed from the "
            "numbers by fixed rules, the figure and the numbers (all of them are also in "
            "<code>results.json</code>).</p>"
        )
        f.write(
            '<p class="meta">'
            + " · ".join(f"{_esc(k)}: {_esc(v)}" for k, v in meta.items())
            + "</p>"
        )
        f.write(_summary_html(outcomes))
        for outcome in outcomes:
            if figures_dir is None:
                f.write(_render_section(outcome, plots.get(outcome.name)))
            else:
                f.write(_render_section(outcome, plots.get(outcome.name), figures_dir))
        f.write("</body></html>\n")


def run_metadata(*, seed: int, quick: bool, total_seconds: float | None = None) -> dict:
    """Versions, devices and options of a run, for the page header and results.json."""
    import jax

    from jaxnorm import __version__ as version

    meta = {
        "jaxnorm": version,
        "jax": jax.__version__,
        "python": platform.python_version(),
        "devices": ", ".join(str(d) for d in jax.devices()),
        "seed": seed,
        "quick": quick,
    }
    if total_seconds is not None:
        meta["total_seconds"] = round(total_seconds, 2)
    return meta
