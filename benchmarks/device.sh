#!/usr/bin/env bash
# jaxnorm's accelerator benchmarks in one command: every benchmark's GPU rows beside their anchors
# (flax two-pass and default, PyTorch CUDA where installed, jax.nn, a sequential loop, and the
# memory floor = a read+write copy of the same bytes), written as <platform>-*.md tables.
#
#   bash benchmarks/device.sh                           # on the accelerator machine (< 8 minutes
#                                                       # on an H100, compilation included)
#   bash benchmarks/device.sh --dry-run --out /tmp/dry  # check it anywhere: the same code paths
#                                                       # on tiny shapes on CPU (< 2 minutes)
#   bash benchmarks/device.sh --only batchnorm          # some sections (batchnorm activations
#                                                       # training preprocessing gradcheck)
#
# Options: --dry-run; --out DIR (default benchmarks/results/, commit gpu-*.md from there; a dry
# run's default is /tmp/jaxnorm-device-dry-run);
# --only SECTION...; --budget-scale F (multiply every time budget).
#
# What the machine needs (this script installs nothing: the GPU machine has no network): the
# repository's working tree (run from anywhere; it cds to the repository root and imports jaxnorm
# from there, no pip install needed) and a Python with jax and its accelerator plugin
# (`pip install 'jax[cuda12]'` for NVIDIA GPUs), flax, optax, numpy and scikit-learn; torch with
# CUDA is optional (its rows are skipped without it). The Python used is $PYTHON if set, else
# the active virtual environment's, else .venv/bin/python in the repository if it has jax, else
# python3. It checks jax.default_backend() and stops with a message when that is "cpu", unless
# --dry-run.
#
# Each section has a time budget and the whole run one (benchmarks/device.py: SECTIONS,
# TOTAL_S); a case not started in time, a missing package or a section that fails is recorded in
# the tables and the run goes on. Progress lines carry the seconds elapsed. A hard limit of
# 480 s (DEVICE_SH_LIMIT_S, scaled with --budget-scale) stops the whole thing; every finished
# section's table has been written by then.
set -u
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root" || exit 1

if [ -n "${PYTHON:-}" ]; then
  py="$PYTHON"
elif [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then
  py="$VIRTUAL_ENV/bin/python"
elif [ -x .venv/bin/python ] && .venv/bin/python -c "import jax" 2>/dev/null; then
  py=.venv/bin/python
else
  py=python3
fi
if ! "$py" -c "import jax" 2>/dev/null; then
  echo "benchmarks/device.sh: $py cannot import jax; install jax (with its GPU/TPU plugin, e.g." \
    "pip install 'jax[cuda12]'), flax, optax and scikit-learn, or set PYTHON=..." >&2
  exit 2
fi

limit="${DEVICE_SH_LIMIT_S:-480}"
scale=1
prev=""
for a in "$@"; do
  [ "$prev" = "--budget-scale" ] && scale="$a"
  prev="$a"
done
limit="$("$py" -c "print(int($limit * $scale))")"

start=$(date +%s)
echo "device.sh: $py, limit ${limit}s, in $root" >&2
# Tracebacks of a section are printed and recorded; PYTHONUNBUFFERED keeps progress live.
PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 \
  timeout --signal=INT --kill-after=10 "$limit" "$py" -m benchmarks.device "$@"
rc=$?
end=$(date +%s)
if [ "$rc" -eq 124 ] || [ "$rc" -eq 130 ] || [ "$rc" -eq 137 ]; then
  echo "device.sh: stopped at the ${limit}s limit; the sections that finished wrote their tables" >&2
fi
echo "device.sh: exit $rc after $((end - start))s" >&2
exit "$rc"
