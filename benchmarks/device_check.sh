#!/usr/bin/env bash
# One call on a GPU machine: build (CUDA included), run every test (the `cuda`
# ones too), the demo and the CPU benchmark; logs go to $OUT (or ./device_out).
#   bash benchmarks/device_check.sh
set -uo pipefail
OUT=${OUT:-device_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
} 2>&1 | tee "$OUT/env.txt"
python3 -m pip install -q --no-build-isolation -e . 2>&1 | tail -5 | tee "$OUT/build.txt" || exit 1
python3 -m sparge info 2>&1 | tee -a "$OUT/build.txt"
python3 -m pytest -q -ra tests/ 2>&1 | tee "$OUT/pytest.txt"
python3 -m sparge demo --plot "$OUT/demo.png" 2>&1 | tee "$OUT/demo.txt"
python3 benchmarks/bench_cpu.py --csv "$OUT/bench_cpu.csv" 2>&1 | tee "$OUT/bench_cpu.txt"
