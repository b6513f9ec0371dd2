#!/usr/bin/env bash
# The GPU benchmarks for a lent GPU machine, in one go (under 8 minutes on one GPU); see bench/README.md,
# "On a GPU machine". Here: `make gpu-wheels` (needs a package registry). There: `bash bench/gpu.sh`.
#
#   (a) CLIP-L/14 extraction with random weights, views/s against the teacher's forward alone;
#   (b) fd-vit-base distilled from the CLIP-L-shaped store it wrote, against the same student fed from RAM;
#   (c) a batch of 224 px jpeg:90 stored student views decoded on the device (nvJPEG) against one CPU core.
#
# Numbers go to $OUT/gpu.json when $OUT is set (else bench/results/gpu.json) and are printed.
# No GPU: it says so and exits 0. FDPIPE_GPU_REHEARSE=1 runs the same steps on the CPU at tiny size.
#
# Environment: PYTHON (default python3), OUT, FDPIPE_GPU_REHEARSE, FDPIPE_GPU_WHEELS (default .whl),
# FDPIPE_GPU_DEPS (where missing wheels are installed; default .whl/site), FDPIPE_GPU_ARGS (more arguments
# for python -m bench.gpu, e.g. "--images 1024 --commit-workers 6"), FDPIPE_GPU_CEILINGS=1 (afterwards, also
# bench.ceilings at production shape on this idle machine, float16 only: a few minutes more).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
ROOT=$PWD
PY=${PYTHON:-python3}
if [ -z "${PYTHON:-}" ] && ! "$PY" -c "import torch" 2>/dev/null && [ -x "$ROOT/.venv/bin/python" ]; then
    PY=$ROOT/.venv/bin/python  # this project's own machine: its virtualenv
fi
REHEARSE=${FDPIPE_GPU_REHEARSE:-0}
WHEELS=${FDPIPE_GPU_WHEELS:-$ROOT/.whl}
DEPS=${FDPIPE_GPU_DEPS:-$ROOT/.whl/site}
RESULTS=${OUT:-$ROOT/bench/results}

if ! cuda=$("$PY" -c "import torch; print(torch.cuda.is_available())" 2>/dev/null); then
    echo "gpu.sh: torch does not import with $PY (set PYTHON=...); nothing to run here"
    exit 0
fi
if [ "$REHEARSE" = 1 ]; then
    echo "gpu.sh: rehearsal (FDPIPE_GPU_REHEARSE=1): the same steps on the CPU at tiny size"
    ARGS=(--device cpu --smoke)
elif [ "$cuda" != True ]; then
    echo "gpu.sh: no GPU here (torch.cuda.is_available() is $cuda); nothing to run. FDPIPE_GPU_REHEARSE=1 rehearses on the CPU."
    exit 0
else
    ARGS=(--device cuda)
    "$PY" -c "import torch; print('gpu.sh:', torch.cuda.get_device_name(0), '| torch', torch.__version__)"
fi

# fdpipe runs from this checkout (PYTHONPATH): an editable install would need setuptools from a registry for its
# isolated build. Its missing dependencies come from the wheels carried in .whl/ (`make gpu-wheels`).
PYTHONPATH="$DEPS${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m bench.gpu --install-deps "$DEPS" "$WHEELS" || exit 1  # sees earlier installs
export PYTHONPATH="$ROOT:$DEPS${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TQDM_DISABLE=1
if ! "$PY" -c "import fdpipe.store.layouts.zarr, fdpipe.store.layouts.wds, fdpipe.extract.loop, fdpipe.distill.train, webdataset, numcodecs" ; then
    echo "gpu.sh: fdpipe does not import with the wheels in $WHEELS; see the error above"
    exit 1
fi

mkdir -p "$RESULTS"
t0=$(date +%s)
# shellcheck disable=SC2086  # FDPIPE_GPU_ARGS is a list of words on purpose
"$PY" -m bench.gpu "${ARGS[@]}" --out "$RESULTS" ${FDPIPE_GPU_ARGS:-}
rc=$?
echo "gpu.sh: bench.gpu exited $rc after $(( $(date +%s) - t0 )) s; results in $RESULTS"

if [ "${FDPIPE_GPU_CEILINGS:-0}" = 1 ]; then
    SMOKE=(); [ "$REHEARSE" = 1 ] && SMOKE=(--smoke)
    "$PY" -m bench.ceilings "${SMOKE[@]}" --dtype float16 --out "$RESULTS" || rc=$?
fi
exit $rc
