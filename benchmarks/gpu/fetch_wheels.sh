#!/usr/bin/env bash
# Downloads the wheels the GPU suite carries to the device machine (benchmarks/gpu/requirements.txt) into an ignored
# folder, checks that they install for the device's Python on manylinux x86_64, and that the working tree plus the
# wheels stay under the 64 MiB a device call may carry.
#
#   bash benchmarks/gpu/fetch_wheels.sh [WHEEL_DIR]        # default: .whl (ignored by git)
#
# PYTHON_VERSIONS (default "3.12 3.11 3.13") lists the CPython versions to fetch for: only version-specific wheels
# (multiprocess) differ between them, a few hundred KiB each; the device's image was seen with 3.12, and diffusers
# 0.42 needs >= 3.11.
# PYTHON (default: .venv/bin/python if present, else python3) runs pip. Exit status 1 when over the limit.
set -euo pipefail
cd "$(dirname "$0")/../.."
WHEEL_DIR=${1:-.whl}
REQUIREMENTS=benchmarks/gpu/requirements.txt
PYTHON_VERSIONS=${PYTHON_VERSIONS:-"3.12 3.11 3.13"}
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
LIMIT_BYTES=$((64 * 1024 * 1024))
# pip matches manylinux_2_N exactly: name every N the wheels above use (bitsandbytes 0.50: 2_24).
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64
    manylinux2014_x86_64 manylinux1_x86_64)
platform_flags=()
for platform in "${PLATFORMS[@]}"; do platform_flags+=(--platform "$platform"); done

mkdir -p "$WHEEL_DIR"
for version in $PYTHON_VERSIONS; do
    echo "fetch_wheels: CPython $version"
    "$PYTHON" -m pip download -q --no-deps --only-binary :all: --implementation cp --python-version "$version" \
        "${platform_flags[@]}" -d "$WHEEL_DIR" -r "$REQUIREMENTS" 2>&1 | { grep -v "WARNING: Location" || true; }
done
# Wheels of other versions left by an earlier run would make two candidates for one name.
wanted=$(grep -v '^\s*#' "$REQUIREMENTS" | sed 's/\s*#.*//' | grep -v '^\s*$')
for wheel in "$WHEEL_DIR"/*.whl; do
    name_version=$(basename "$wheel" | cut -d- -f1-2 | tr '_' '-' | tr '[:upper:]' '[:lower:]')
    keep=no
    while read -r requirement; do
        pinned=$(echo "$requirement" | sed 's/==/-/' | tr '_' '-' | tr '[:upper:]' '[:lower:]')
        [[ "$name_version" == "$pinned" ]] && keep=yes
    done <<<"$wanted"
    if [[ $keep == no ]]; then echo "fetch_wheels: removing $wheel (not in $REQUIREMENTS)"; rm -f "$wheel"; fi
done

# Every requirement resolves from the folder alone, for each Python version, as run.sh will install it there.
for version in $PYTHON_VERSIONS; do
    "$PYTHON" -m pip install -q --dry-run --ignore-installed --no-index --no-deps --only-binary :all: \
        --implementation cp --python-version "$version" "${platform_flags[@]}" --target /tmp/fetch-wheels-check \
        --find-links "$WHEEL_DIR" -r "$REQUIREMENTS" 2>&1 | { grep -v "WARNING: Location" || true; }
    echo "fetch_wheels: every requirement installs for CPython $version from $WHEEL_DIR alone"
done

exec "$PYTHON" benchmarks/gpu/suite.py carry-size --wheel-dir "$WHEEL_DIR" --limit-bytes "$LIMIT_BYTES"
