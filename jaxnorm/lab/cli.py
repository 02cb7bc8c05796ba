"""The ``jaxnorm`` command line: ``jaxnorm lab`` runs the lecture's experiments into a report.

Usage::

    jaxnorm lab [--out DIR] [--quick] [--only NAME [NAME ...]] [--seed N] [--quiet]
                [--figures DIR]
    python -m jaxnorm lab ...

Writes ``DIR/index.html`` (default ``lab-report/``; one self-contained page) and
``DIR/results.json`` (every number of the page). Exit status: 0 when every experiment ran
(whatever its verdict), 1 when one raised (the report then shows the traceback) or the run was
interrupted, 2 for bad arguments (an unknown ``--only`` name, an unwritable ``--out``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Sequence


def _version() -> str:
    import jax

    import jaxnorm

    return f"jaxnorm {jaxnorm.__version__} (jax {jax.__version__}, backend {jax.default_backend()})"


def _parser(names: Sequence[str]) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    parser = argparse.ArgumentParser(
        prog="jaxnorm",
        description="jaxnorm: Training Neural Networks, Part 1, as a JAX library.",
    )
    parser.add_argument("--version", action="version", version=_version())
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    lab = commands.add_parser(
        "lab",
        help="run the lecture's experiments and write an HTML report",
        description=(
            "Run the lecture's experiments and write DIR/index.html (one self-contained page "
            "with figures, tables and a verdict per experiment) and DIR/results.json. "
            f"Experiments: {', '.join(names)}."
        ),
    )
    lab.add_argument(
        "--out",
        default="lab-report",
        metavar="DIR",
        help="output folder, created if needed (default: lab-report/)",
    )
    lab.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes and few steps (under a minute on 2 CPU cores; what the tests run)",
    )
    lab.add_argument(
        "--only",
        nargs="+",
        action="extend",
        metavar="NAME",
        help=f"run only these experiments (any of: {', '.join(names)})",
    )
    lab.add_argument("--seed", type=int, default=0, help="PRNG seed (default 0)")
    lab.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    lab.add_argument(
        "--figures",
        metavar="DIR",
        help="also write each figure as DIR/<name>.png (150 dpi), e.g. docs/figures",
    )
    return parser, lab


def _check_writable(parser: argparse.ArgumentParser, out: str, option: str = "--out") -> None:
    """Create ``out`` and write and remove a probe file there, or exit with a usage error."""
    try:
        os.makedirs(out, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".jaxnorm-probe-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        reason = e.strerror or str(e)
        parser.error(
            f"cannot write the report to {option} {out!r}: {reason}; choose a folder you can "
            f"write to, e.g. {option} ./lab-report"
        )


def _check_matplotlib(parser: argparse.ArgumentParser) -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        parser.exit(
            1,
            "jaxnorm lab: error: the lab needs matplotlib for its figures: pip install "
            '"jaxnorm[lab]"\n',
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``jaxnorm`` console script; returns the exit status.

    Args:
      argv: the arguments without the program name (default ``sys.argv[1:]``).

    Returns:
      0 when every experiment ran, 1 when one raised or the run was interrupted.

    Raises:
      SystemExit: with status 2 for bad arguments (argparse's convention).
    """
    from jaxnorm import lab

    names = list(lab.EXPERIMENTS)
    top, parser = _parser(names)
    args = top.parse_args(argv)
    only = list(dict.fromkeys(args.only)) if args.only else names
    unknown = [n for n in only if n not in lab.EXPERIMENTS]
    if unknown:
        parser.error(
            f"unknown experiment(s) for --only: {', '.join(unknown)}; known: {', '.join(names)}"
        )
    _check_writable(parser, args.out)
    if args.figures is not None:
        _check_writable(parser, args.figures, "--figures")
    _check_matplotlib(parser)
    # Keep the page's order whatever the order on the command line.
    selected = [n for n in names if n in only]

    def say(message: str) -> None:
        if not args.quiet:
            print(message, file=sys.stderr, flush=True)

    from jaxnorm.lab import report

    mode = "quick" if args.quick else "full"
    say(f"jaxnorm lab: {len(selected)} experiment(s), {mode} mode, seed {args.seed}")
    start = time.perf_counter()
    outcomes = []
    try:
        for i, name in enumerate(selected, 1):
            say(f"[{i}/{len(selected)}] {name} ...")
            outcome = lab.run_experiment(name, args.seed, quick=args.quick)
            status = "ERROR" if outcome.error else outcome.verdict.status
            say(f"[{i}/{len(selected)}] {name}: {status} ({outcome.seconds:.1f} s)")
            if outcome.error:
                say(outcome.error.rstrip())
            outcomes.append(outcome)
        meta = report.run_metadata(
            seed=args.seed, quick=args.quick, total_seconds=time.perf_counter() - start
        )
        json_path = os.path.join(args.out, "results.json")
        html_path = os.path.join(args.out, "index.html")
        say("writing the report ...")
        report.write_json(json_path, report.results_dict(outcomes, meta))
        plots = {n: e.plot for n, e in lab.EXPERIMENTS.items()}
        if args.figures is None:
            report.write_html(html_path, outcomes, meta, plots)
        else:
            report.write_html(html_path, outcomes, meta, plots, figures_dir=args.figures)
    except KeyboardInterrupt:
        say("jaxnorm lab: interrupted; index.html not written (an earlier one is left as it was)")
        return 1
    say(f"wrote {html_path} and {json_path} in {time.perf_counter() - start:.1f} s")
    return 1 if any(o.error for o in outcomes) else 0


if __name__ == "__main__":  # pragma: no cover
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
