#!/usr/bin/env bash
# The prepared GPU run: one command, <= 9 minutes on an H100/H200, results under OUT.
#
#   bash benchmarks/gpu/fetch_wheels.sh                 # here, first: the wheels the device lacks, into .whl/
#   bash benchmarks/gpu/run.sh OUT                      # on the device machine (carry .whl)
#   bash benchmarks/gpu/run.sh OUT --dry-run            # on any machine: tiny architectures on the CPU, same steps
#
# Steps, each logged to OUT/suite.log: (1) install the carried wheels with pip --no-index --no-deps --target and put
# them on PYTHONPATH (the dry run repacks the locally installed ones, offline); (2) OUT/env.json: device, driver,
# versions, a bitsandbytes check on the device (stops here if the environment cannot run the suite); (3)
# OUT/calibration.json: CUDA context and cuBLAS workspace bytes; (4) the adapter x quant matrices, one process per
# cell, each line of OUT/results.jsonl written as its cell or estimate finishes; (5) OUT/suite.md, OUT/suite.json
# and OUT/cells.tar.gz (logs and reports of every cell), written even when a step failed or ran out of time; (6) on
# the GPU, with time left, OUT/snapshot.pickle.gz: the CUDA memory history of the cell whose peak is furthest (> 5 %)
# from its estimate (open it at pytorch.org/memory_viz).
#
# Environment: PYTHON (python3), GPU_SUITE_WHEELS (.whl), GPU_SUITE_WORK (a fresh folder under /tmp; cell outputs,
# weights, the installed wheels), GPU_SUITE_BUDGET (seconds for the whole run: 510 on the GPU, 600 dry),
# GPU_SUITE_ALLOW_CPU (non-empty: run the GPU plan without a CUDA device, e.g. to try the real wheels' install).
set -uo pipefail
if [[ $# -lt 1 || "$1" == -* ]]; then
    echo "usage: $0 OUT [--dry-run]" >&2
    exit 2
fi
OUT=$1
shift
PLAN=gpu
for flag in "$@"; do
    case "$flag" in
        --dry-run) PLAN=dry ;;
        *) echo "run.sh: unknown flag $flag (the only one is --dry-run)" >&2; exit 2 ;;
    esac
done
STARTED=$(date +%s)
REPO=$(cd "$(dirname "$0")/../.." && pwd)
SUITE="$REPO/benchmarks/gpu/suite.py"
REQUIREMENTS="$REPO/benchmarks/gpu/requirements.txt"
PYTHON=${PYTHON:-python3}
if [[ $PLAN == dry ]]; then BUDGET=${GPU_SUITE_BUDGET:-600}; else BUDGET=${GPU_SUITE_BUDGET:-510}; fi
REPORT_RESERVE=20 # seconds kept for the report after the matrix
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=${GPU_SUITE_WORK:-$(mktemp -d /tmp/gpu-suite-work.XXXXXX)}
rm -rf "$WORK" && mkdir -p "$WORK"
rm -f "$OUT"/{results.jsonl,env.json,calibration.json,suite.json,suite.md,cells.tar.gz,suite.log}
exec > >(tee -a "$OUT/suite.log") 2>&1

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
step() { echo "[suite $(($(date +%s) - STARTED)) s] $*"; }
report() {
    step "report"
    "$PYTHON" "$SUITE" report --plan "$PLAN" --out "$OUT" --work "$WORK" --started "$STARTED" \
        --budget-seconds "$BUDGET" | tail -n 40
    step "done: $OUT/suite.md"
}

step "plan $PLAN, budget $BUDGET s, work $WORK, python $("$PYTHON" -c 'import sys; print(sys.version.split()[0])')"
# (1) The carried wheels.
SITE="$WORK/site"
if [[ $PLAN == dry ]]; then
    WHEELS="$WORK/wheels"
    step "repack the installed $(grep -cv '^\s*#\|^\s*$' "$REQUIREMENTS") requirements into $WHEELS (offline)"
    "$PYTHON" "$SUITE" repack --requirements "$REQUIREMENTS" --out "$WHEELS" || { report; exit 1; }
    # The local versions, whatever the pins say: the dry run proves the install, not the versions.
    mapfile -t TO_INSTALL < <(grep -v '^\s*#' "$REQUIREMENTS" | sed 's/\s*#.*//; s/==.*//' | grep -v '^\s*$')
else
    WHEELS=${GPU_SUITE_WHEELS:-$REPO/.whl}
    if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
        echo "run.sh: no wheels in $WHEELS: run benchmarks/gpu/fetch_wheels.sh first and carry .whl" >&2
        report
        exit 1
    fi
    TO_INSTALL=(-r "$REQUIREMENTS")
fi
step "install ${TO_INSTALL[*]} from $WHEELS into $SITE"
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
    --find-links "$WHEELS" --target "$SITE" "${TO_INSTALL[@]}" || { report; exit 1; }
export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"

# (2) The environment; stop when it cannot run the suite.
step "environment"
REQUIRE_CUDA=()
[[ $PLAN == gpu && -z "${GPU_SUITE_ALLOW_CPU:-}" ]] && REQUIRE_CUDA=(--require-cuda)
if ! "$PYTHON" "$SUITE" env --out "$OUT/env.json" "${REQUIRE_CUDA[@]}"; then
    step "the environment cannot run the suite (env.json: problems)"
    report
    exit 3
fi

# (3) Calibration, in a fresh process before any other touches the GPU.
step "calibration"
timeout 120 "$PYTHON" "$SUITE" calibrate --out "$OUT/calibration.json"

# (4) The matrices; the measured cells stop at the budget, less the report's reserve.
MATRIX_BUDGET=$((BUDGET - REPORT_RESERVE))
LEFT=$((STARTED + MATRIX_BUDGET - $(date +%s)))
step "matrix: $LEFT s left"
# The matrix's own deadline is 5 s inside the kill, so that it records what it stops.
timeout --kill-after=10 "$LEFT" "$PYTHON" "$SUITE" matrix --plan "$PLAN" --out "$OUT" --work "$WORK" \
    --started "$STARTED" --budget-seconds $((MATRIX_BUDGET - 5))
status=$?
[[ $status -ne 0 ]] && step "matrix exited with $status (124: the budget ran out); reporting what finished"

# (5) The report; then, with time left on the GPU, a memory snapshot of the cell the estimate misses most (> 5 %),
# and the report again with it.
report
if [[ $PLAN == gpu ]]; then
    LEFT=$((STARTED + BUDGET - 10 - $(date +%s)))
    if [[ $LEFT -gt 30 ]]; then
        step "snapshot: $LEFT s left"
        timeout --kill-after=5 "$LEFT" "$PYTHON" "$SUITE" snapshot --out "$OUT" --work "$WORK" --started "$STARTED" \
            --budget-seconds $((BUDGET - 10)) && grep -q '"kind": "snapshot"' "$OUT/results.jsonl" && report
    fi
fi
sleep 1 # lets tee write the last lines of suite.log
exit 0
