"""Run named benchmarks and print (and optionally save) the ratio table.

    python -m benchmarks.run                       # every benchmark, small sizes
    python -m benchmarks.run activations --size large --save
    python -m benchmarks.run --list

``--save`` writes ``benchmarks/results/<platform>-<size>.md``: commit that file.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import pathlib
import platform
import sys

import jax

from benchmarks import harness

# Benchmark modules: each registers its benchmarks with @harness.benchmark on import.
MODULES = [
    "benchmarks.bench_activations",
    "benchmarks.bench_gradcheck",
    "benchmarks.bench_batchnorm",
    "benchmarks.bench_preprocessing",
    "benchmarks.bench_training",
]

RESULTS = pathlib.Path(__file__).parent / "results"


def _load():
    for m in MODULES:
        try:
            importlib.import_module(m)
        except ModuleNotFoundError as e:
            if e.name != m:
                raise


def main(argv=None) -> int:
    _load()
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    p.add_argument(
        "names", nargs="*", help=f"benchmarks to run (default: all of {sorted(harness.REGISTRY)})"
    )
    p.add_argument("--size", choices=["small", "large"], default="small")
    p.add_argument(
        "--save", action="store_true", help="write benchmarks/results/<platform>-<size>.md"
    )
    p.add_argument("--list", action="store_true", help="list the benchmark names and exit")
    args = p.parse_args(argv)
    if args.list:
        print("\n".join(sorted(harness.REGISTRY)))
        return 0
    unknown = [n for n in args.names if n not in harness.REGISTRY]
    if unknown:
        p.error(f"unknown benchmark(s) {unknown}; known: {sorted(harness.REGISTRY)}")
    names = args.names or sorted(harness.REGISTRY)
    rows = []
    for name in names:
        print(f"running {name} ({args.size}) ...", file=sys.stderr, flush=True)
        rows += harness.REGISTRY[name](args.size)
    header = (
        f"# jaxnorm benchmarks: {', '.join(names)} ({args.size})\n\n"
        f"- device: {harness.device_name()} ({jax.device_count()} device(s)), "
        f"jax {jax.__version__}, "
        f"python {platform.python_version()}, {platform.machine()}\n"
        f"- date: {datetime.date.today().isoformat()}\n"
        "- times are medians after warm-up; `x anchor` and `x floor` are jaxnorm time / other time "
        "(below 1 means jaxnorm is faster); on CPU only the ratios mean anything.\n"
    )
    text = header + "\n" + harness.table(rows) + "\n"
    print(text)
    if args.save:
        RESULTS.mkdir(exist_ok=True)
        suffix = "-".join(names) if args.names else "all"
        path = RESULTS / f"{jax.devices()[0].platform}-{args.size}-{suffix}.md"
        path.write_text(text)
        print(f"saved {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
