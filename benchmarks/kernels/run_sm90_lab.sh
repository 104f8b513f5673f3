#!/usr/bin/env bash
# One device call: build the sm90 lab, check it, time it beside SDPA (cuDNN, flash).
set -uo pipefail
OUT=${OUT:-lab_out}; mkdir -p "$OUT"
nvcc -O3 -std=c++17 --expt-relaxed-constexpr -gencode arch=compute_90a,code=sm_90a -lineinfo -Xptxas -v \
  -Icsrc/include -Icsrc benchmarks/kernels/attn_sm90_lab.cu -o /tmp/lab > "$OUT/build.txt" 2>&1 \
  || { tail -30 "$OUT/build.txt"; exit 1; }
cuobjdump -sass /tmp/lab | grep -o "HGMMA[^ ]*" | sort | uniq -c > "$OUT/sass_hgmma.txt"
timeout 240 /tmp/lab check 2>&1 | tee "$OUT/check.txt" | grep -v "^  ok" | tail -40
grep -c "^  ok" "$OUT/check.txt"
[ "${1:-}" = "check" ] && exit 0
timeout 200 /tmp/lab time 2>&1 | tee "$OUT/time.txt"
timeout 120 python3 benchmarks/kernels/sdpa_baseline.py 2>&1 | tee "$OUT/sdpa.txt"
