#!/bin/bash
# kgrad on a GPU machine: the jax and torch test suites and `kgrad compare`, in one call.
#
#   bash benchmarks/gpu_check.sh [OUTPUT_DIR]
#
# Runs from the repository root, with kgrad imported from the checkout (no install).
# The machine needs jax (CUDA), torch (CUDA), numpy, h5py, ml-dtypes, rich, absl-py,
# packaging, pytest, hypothesis, scikit-learn and matplotlib; keras, namex, optree,
# captum and folx can come as wheels in ./.whl (or $WHEELS; pure Python except
# optree), downloaded beforehand on any machine with pip, for the GPU machine's
# Python (here 3.12):
#
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
#     keras==3.15.1 namex optree captum==0.9.0 folx
#
# TensorFlow is not needed: its suite is not run, and `kgrad compare` runs the jax and
# torch workers only (the three quick demos; `--zoo` takes longer than one call
# allows). Both suites run at once, each with WORKERS pytest-xdist workers when
# pytest-xdist is installed, each within LIMIT seconds (SIGINT then, so pytest
# still prints its summary). The suite itself turns TF32 off on the GPU (conftest.py).
# Everything goes to OUTPUT_DIR (default gpu-check/): env.txt, jax.log, torch.log,
# compare.log; the summary is printed at the end. Seen on one H200 (16 cores), both suites
# at once with 8 workers each: jax's suite took 280 s; torch's was stopped at 400 s with
# about 26 tests left (the CLI's subprocess tests among them). With the defaults (LIMIT=420
# for the suites, COMPARE_LIMIT=120 for the demos' comparison) the whole script stays under
# ten minutes; a torch suite that does not finish in LIMIT lists what it ran, and the rest
# can be run with pytest's -k. The comparison has not been run on a GPU yet.
set -u
OUTDIR=${1:-${OUT:-gpu-check}}
PY=${PY:-python3}
LIMIT=${LIMIT:-420}
COMPARE_LIMIT=${COMPARE_LIMIT:-120}
WORKERS=${WORKERS:-8}
mkdir -p "$OUTDIR"
WHEELS=${WHEELS:-.whl}
if ls "$WHEELS"/*.whl > /dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/kgrad-site "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=/tmp/kgrad-site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# JAX takes 75% of the GPU's memory per process by default: several workers share it.
export XLA_PYTHON_CLIENT_PREALLOCATE=false TF_CPP_MIN_LOG_LEVEL=3 PYTHONHASHSEED=0 PYTHONUNBUFFERED=1
export KGRAD_HYPOTHESIS_EXAMPLES=${KGRAD_HYPOTHESIS_EXAMPLES:-10}

{
  nvidia-smi -L 2>&1
  KERAS_BACKEND=jax $PY -c "import jax, keras; print('jax', jax.__version__, jax.devices(), 'keras', keras.__version__)" 2>&1
  KERAS_BACKEND=torch $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" 2>&1
} > "$OUTDIR/env.txt"
cat "$OUTDIR/env.txt"

XDIST=()
if $PY -c "import xdist" 2> /dev/null; then XDIST=(-n "$WORKERS"); fi
for b in jax torch; do
  (
    KERAS_BACKEND=$b timeout -s INT "$LIMIT" $PY -m pytest -p no:cacheprovider "${XDIST[@]}" -v -rfE \
      --durations=15 tests kgrad --doctest-modules > "$OUTDIR/$b.log" 2>&1
    echo "rc=$?" >> "$OUTDIR/$b.log"
  ) &
done
wait
{
  KERAS_BACKEND=jax timeout -s INT "$COMPARE_LIMIT" $PY -m kgrad.tools.cli compare --quick \
    --backends jax,torch
  echo "rc=$?"
} > "$OUTDIR/compare.log" 2>&1
for b in jax torch; do
  echo "== $b suite"
  grep -E "^(FAILED|ERROR)|passed|failed|rc=" "$OUTDIR/$b.log" | tail -n 30
done
echo "== kgrad compare --quick --backends jax,torch (the three small demos)"
tail -n 40 "$OUTDIR/compare.log"
