"""Extract a peer's test files and run them with and without jaxnorm's objects substituted.

    # 1. Extract the test files at the installed versions (never into the jaxnorm checkout):
    python tools/peer_suites/run.py extract jax --repo ~/src/jax --dest /tmp/peer/jax
    python tools/peer_suites/run.py extract flax --repo ~/src/flax --dest /tmp/peer/flax

    # 2. Run each test file twice (the peer's own objects, then jaxnorm's) and compare:
    python tools/peer_suites/run.py run --tree /tmp/peer/jax tests/nn_test.py
    python tools/peer_suites/run.py run --tree /tmp/peer/flax --groups linen,nnx \\
        tests/linen/linen_test.py -- -k BatchNorm

``--repo`` is a clone (or bare git directory) of the peer's repository; ``extract`` writes the
files listed in SUITES at the pinned revision. ``run`` loads the plugin ``jaxnorm_substitute``
(next to this file) with ``--substitute=none`` and then ``--substitute=jaxnorm``, writes both JSON
reports under ``--out`` and prints, per group: the tests counted (they called or read a
substituted object), how many pass with the peer's objects and with jaxnorm's, then each failing
test split into "fails with jaxnorm only" (a difference to explain or fix) and "fails with both"
(fails on this machine anyway). Arguments after ``--`` go to pytest.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

# The revisions jaxnorm is checked against: the versions installed with it.
SUITES = {
    "jax": {"rev": "jax-v0.10.2", "paths": ["tests/nn_test.py", "conftest.py", "pyproject.toml"]},
    "flax": {"rev": "3a491108", "paths": ["tests", "pyproject.toml"]},  # flax 0.12.8
}


def extract(suite: str, repo: str, dest: str) -> None:
    spec = SUITES[suite]
    dest_path = Path(dest)
    dest_path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile() as archive:
        subprocess.run(
            ["git", "-C", repo, "archive", spec["rev"], *spec["paths"]], stdout=archive, check=True
        )
        archive.seek(0)
        with tarfile.open(fileobj=archive) as tar:
            tar.extractall(dest_path, filter="data")
    print(f"extracted {suite} {spec['rev']}: {', '.join(spec['paths'])} -> {dest_path}")


def run_mode(tree: Path, mode: str, files: list[str], groups: str, out: Path, extra: list[str]):
    report = out / f"{mode}.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-p",
        "jaxnorm_substitute",
        f"--substitute={mode}",
        f"--substitute-groups={groups}",
        f"--peer-report={report}",
        *files,
        *extra,
    ]
    print(f"$ (cd {tree} && python {' '.join(cmd[1:])})", flush=True)
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    (out / f"{mode}.log").write_text(proc.stdout + proc.stderr)
    if not report.exists():
        sys.exit(f"pytest wrote no report (exit {proc.returncode}); see {out / f'{mode}.log'}")
    return json.loads(report.read_text())["tests"]


def compare(base: dict, ours: dict) -> dict:
    """Per group: counted, passed with the peer's objects and with jaxnorm's, and the failures."""
    counted = sorted(set(base) | set(ours))
    groups = sorted({g for t in counted for g in (base.get(t) or ours.get(t))["groups"]})
    result = {}
    for group in groups:
        tests = [t for t in counted if group in (base.get(t) or ours[t])["groups"]]

        def outcome(report, t):
            return report.get(t, {"outcome": "not run"})["outcome"]

        result[group] = {
            "counted": len(tests),
            "passed_peer": sum(outcome(base, t) == "passed" for t in tests),
            "passed_jaxnorm": sum(outcome(ours, t) == "passed" for t in tests),
            "skipped": sum(outcome(ours, t) == "skipped" for t in tests),
            "jaxnorm_only": {
                t: ours[t]["message"]
                for t in tests
                if outcome(ours, t) in ("failed", "error") and outcome(base, t) == "passed"
            },
            "both": {
                t: ours[t]["message"]
                for t in tests
                if outcome(ours, t) in ("failed", "error") and outcome(base, t) != "passed"
            },
            "peer_only": {
                t: base[t]["message"]
                for t in tests
                if outcome(base, t) in ("failed", "error") and outcome(ours, t) == "passed"
            },
        }
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_ext = sub.add_parser("extract", help="write a peer's test files at the pinned revision")
    p_ext.add_argument("suite", choices=sorted(SUITES))
    p_ext.add_argument("--repo", required=True, help="a clone or bare git dir of the peer")
    p_ext.add_argument("--dest", required=True)
    p_run = sub.add_parser("run", help="run test files with the peer's objects, then jaxnorm's")
    p_run.add_argument("--tree", required=True, help="the extracted tree (pytest's rootdir)")
    p_run.add_argument("--groups", default="activations,initializers,linen,nnx")
    p_run.add_argument("--out", default=None, help="where the reports go (default a temp dir)")
    p_run.add_argument("files", nargs="+", help="test files, relative to --tree")
    args, extra = parser.parse_known_args(argv)
    if args.command == "extract":
        extract(args.suite, args.repo, args.dest)
        return
    extra = [a for a in extra if a != "--"]
    tree = Path(args.tree).resolve()
    out = Path(args.out or tempfile.mkdtemp(prefix="peer-")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    base = run_mode(tree, "none", args.files, args.groups, out, extra)
    ours = run_mode(tree, "jaxnorm", args.files, args.groups, out, extra)
    result = compare(base, ours)
    (out / "summary.json").write_text(json.dumps(result, indent=1))
    print(f"\n{'group':<14}{'counted':>8}{'pass (peer)':>13}{'pass (jaxnorm)':>16}{'skipped':>9}")
    for group, r in result.items():
        print(
            f"{group:<14}{r['counted']:>8}{r['passed_peer']:>13}{r['passed_jaxnorm']:>16}"
            f"{r['skipped']:>9}"
        )
    for group, r in result.items():
        for title, key in (
            ("fails with jaxnorm only", "jaxnorm_only"),
            ("fails with both (this machine)", "both"),
            ("fails with the peer's objects only", "peer_only"),
        ):
            if r[key]:
                print(f"\n[{group}] {title}:")
                for test, message in r[key].items():
                    print(f"  {test}\n      {message.splitlines()[0] if message else ''}")
    print(f"\nreports and logs: {out}")


if __name__ == "__main__":
    main()
