#!/usr/bin/env bash
# One call on a GPU machine: build (CUDA included), then the steps named on the
# command line (default: cuda-tests tests demo bench-quick); logs go to $OUT.
#   bash benchmarks/device_check.sh [cuda-tests] [cuda-tests-sm80] [tests] [demo] [bench-quick] [bench-focus]
#                                   [bench-hopper] [bench] [sanitize] [lab-sm90]
# cuda-tests runs the kernels the registry picks on this GPU (the sm90 family on
# H100/H200); cuda-tests-sm80 the same tests with the sm80 family pinned
# (SPARGE_CUDA_MAX_ARCH=80), so every family the device offers is tested.
# bench-hopper: the Hopper-kernel issue's shapes (D=128 L=32k H=16, D=64 L=16k
# H=32, D=128 L=8k H=32; dense and top-k 0.5/0.25/0.1; plus causal L=32k).
# bench-focus: the issue-3 gap shapes (D=64 H=32 and D=128 H=16 at L=16k, non-causal,
# all densities) with their same-run baselines.
set -uo pipefail
OUT=${OUT:-device_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(cuda-tests tests demo bench-quick)
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
} 2>&1 | tee "$OUT/env.txt"
start=$(date +%s)
python3 -m pip install -q --no-build-isolation -e . > "$OUT/build.txt" 2>&1 || { tail -50 "$OUT/build.txt"; exit 1; }
echo "build: $(( $(date +%s) - start )) s" | tee -a "$OUT/env.txt"
python3 -m sparge info 2>&1 | tee -a "$OUT/env.txt"
for s in "${steps[@]}"; do
  case "$s" in
    cuda-tests) python3 -m pytest -q -ra -x --maxfail=5 tests/test_cuda.py 2>&1 | tee "$OUT/pytest_cuda.txt" | tail -40 ;;
    cuda-tests-sm80) SPARGE_CUDA_MAX_ARCH=80 python3 -m pytest -q -ra --maxfail=5 tests/test_cuda.py 2>&1 \
        | tee "$OUT/pytest_cuda_sm80.txt" | tail -15 ;;
    bench-hopper) python3 benchmarks/bench_attn.py --shape 1,16,32768,128 --shape 1,32,16384,64 --shape 1,32,8192,128 \
        --densities 1,0.5,0.25,0.1 --causal no --csv "$OUT/bench_hopper.csv" 2>&1 | tee "$OUT/bench_hopper.txt"
      python3 benchmarks/bench_attn.py --shape 1,16,32768,128 --densities 1,0.25 --causal yes --no-flex \
        --csv "$OUT/bench_hopper_causal.csv" 2>&1 | tee "$OUT/bench_hopper_causal.txt" ;;
    lab-sm90) bash benchmarks/kernels/run_sm90_lab.sh 2>&1 | tail -30 ;;
    tests) python3 -m pytest -q -ra tests/ 2>&1 | tee "$OUT/pytest.txt" | tail -15 ;;
    demo) python3 -m sparge demo --plot "$OUT/demo.png" 2>&1 | tee "$OUT/demo.txt" ;;
    bench-quick) python3 benchmarks/bench_attn.py --quick --csv "$OUT/bench_quick.csv" 2>&1 | tee "$OUT/bench_quick.txt" ;;
    bench-focus) python3 benchmarks/bench_attn.py --shape 1,32,16384,64 --shape 1,16,16384,128 --causal no \
        --csv "$OUT/bench_focus.csv" 2>&1 | tee "$OUT/bench_focus.txt" ;;
    bench) python3 benchmarks/bench_attn.py --csv "$OUT/bench_attn.csv" 2>&1 | tee "$OUT/bench_attn.txt" ;;
    sanitize)
      sel="(test_kernel_lengths and 97) or (test_predict_matches_reference and topk)"
      compute-sanitizer --tool synccheck --error-exitcode 9 python3 -m pytest -q -x tests/test_cuda.py -k "$sel" 2>&1 | tail -3 | tee "$OUT/synccheck.txt"
      compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m pytest -q -x tests/test_cuda.py -k "$sel" 2>&1 | tail -6 | tee "$OUT/memcheck.txt"
      # racecheck only sparge's kernels (torch's cuDNN attention, used by the tests as a
      # baseline, reports hazards of its own)
      for kern in attn_fwd_kernel attn_sm90_kernel pool_kernel km_kernel select_kernel; do
        echo "racecheck $kern"
        compute-sanitizer --tool racecheck --kernel-name kns=$kern --error-exitcode 9 \
          python3 -m pytest -q -x tests/test_cuda.py -k "$sel" 2>&1 | tail -3
      done 2>&1 | tee "$OUT/racecheck.txt" ;;
  esac
done
