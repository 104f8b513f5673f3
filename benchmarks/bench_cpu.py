"""CPU benchmark: sparge's C backend against torch's CPU SDPA, same run.

    python benchmarks/bench_cpu.py                  # L=4096, H=8, D=128, fp32
    python benchmarks/bench_cpu.py --seq 2048 --heads 4 --csv out.csv

Each row: density, kernel-only time (random block mask of that density),
full API time (prediction with topk=density + kernel), torch SDPA time, and
speedups. Dense-equivalent GFLOPS = 4*B*H*L^2*D / time, labelled as such.
"""
import argparse
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from common import write_rows

import sparge


def median_time(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--densities", default="1.0,0.5,0.25,0.1")
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--csv", default=None, help="write the rows here (default benchmarks/results/cpu/<host>.csv)")
    args = ap.parse_args()

    dtype = getattr(torch, args.dtype)
    B, H, L, D = args.batch, args.heads, args.seq, args.head_dim
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, generator=g).to(dtype) for _ in range(3))
    bq, bk = sparge.block_shape("cpu", D, dtype=dtype)
    nq, nk = -(-L // bq), -(-L // bk)
    flops = 4.0 * B * H * L * L * D * (0.5 if args.causal else 1.0)
    threads = torch.get_num_threads()

    t_sdpa = median_time(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=args.causal), args.repeats)
    rows = []
    for density in [float(x) for x in args.densities.split(",")]:
        mask = torch.rand(B, H, nq, nk, generator=g) < density
        if density >= 1.0:
            mask[:] = True
        t_kernel = median_time(lambda: sparge.block_sparse_attn(q, k, v, mask, is_causal=args.causal), args.repeats)
        t_pred = median_time(lambda: sparge.predict(q, k, topk=density, is_causal=args.causal), args.repeats)
        out, stats = sparge.attn(q, k, v, topk=density, is_causal=args.causal, return_stats=True)
        t_api = median_time(lambda: sparge.attn(q, k, v, topk=density, is_causal=args.causal), args.repeats)
        rows.append(dict(
            cpu=cpu_name(), threads=threads, B=B, H=H, L=L, D=D, dtype=args.dtype, causal=args.causal,
            density_target=density, density_achieved=round(stats["density"].mean().item(), 4),
            predict_ms=round(t_pred * 1e3, 2), kernel_ms=round(t_kernel * 1e3, 2), api_ms=round(t_api * 1e3, 2),
            sdpa_ms=round(t_sdpa * 1e3, 2), speedup_kernel=round(t_sdpa / t_kernel, 2),
            speedup_api=round(t_sdpa / t_api, 2), dense_equiv_gflops_api=round(flops / t_api / 1e9, 1),
            sdpa_gflops=round(flops / t_sdpa / 1e9, 1)))

    print(f"{cpu_name()}, {threads} threads, B={B} H={H} L={L} D={D} {args.dtype} causal={args.causal}, "
          f"block {bq}x{bk}, torch {torch.__version__}")
    hdr = f"{'density':>8} {'achieved':>8} {'pred ms':>8} {'kernel ms':>9} {'api ms':>8} {'sdpa ms':>8} " \
          f"{'x kernel':>8} {'x api':>6} {'dense-eq GFLOPS':>15}"
    print(hdr)
    for r in rows:
        print(f"{r['density_target']:>8.2f} {r['density_achieved']:>8.3f} {r['predict_ms']:>8.1f} "
              f"{r['kernel_ms']:>9.1f} {r['api_ms']:>8.1f} {r['sdpa_ms']:>8.1f} {r['speedup_kernel']:>8.2f} "
              f"{r['speedup_api']:>6.2f} {r['dense_equiv_gflops_api']:>15.1f}")

    path = args.csv or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "cpu",
                                    f"{platform.node() or 'host'}.csv")
    write_rows(path, rows)


if __name__ == "__main__":
    main()
