"""CPU benchmark: sparge's C backend against torch's CPU SDPA, same run.

    python benchmarks/bench_cpu.py                  # L=4096, H=8, D=128, fp32
    python benchmarks/bench_cpu.py --seq 2048 --heads 4 --csv out.csv

Each row: density, kernel-only time (random block mask of that density),
full API time (prediction with topk=density + kernel), torch SDPA time, and
speedups. Dense-equivalent GFLOPS = 4*B*H*L^2*D / time, labelled as such.
Timing: common.time_ms (time.perf_counter, one warm-up call, median of
--repeats). Every row also carries the provenance columns of common.provenance
(commit, torch and CUDA versions, CPU model, date).
"""
import argparse

import torch
import torch.nn.functional as F
from common import cpu_name, default_csv, git_commit, provenance, time_ms, write_rows

import sparge


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
    ap.add_argument("--csv", default=None, help="write the rows here (default benchmarks/results/cpu/bench_cpu_<YYYYMMDD>_<commit>.csv)")
    args = ap.parse_args()

    dtype = getattr(torch, args.dtype)
    B, H, L, D = args.batch, args.heads, args.seq, args.head_dim
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, generator=g).to(dtype) for _ in range(3))
    bq, bk = sparge.block_shape("cpu", D, dtype=dtype)
    nq, nk = -(-L // bq), -(-L // bk)
    flops = 4.0 * B * H * L * L * D * (0.5 if args.causal else 1.0)
    threads = torch.get_num_threads()

    def median_ms(fn) -> float:
        return time_ms(fn, "cpu", warmup=1, repeats=args.repeats)

    t_sdpa = median_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=args.causal))
    rows = []
    for density in [float(x) for x in args.densities.split(",")]:
        mask = torch.rand(B, H, nq, nk, generator=g) < density
        if density >= 1.0:
            mask[:] = True
        t_kernel = median_ms(lambda: sparge.block_sparse_attn(q, k, v, mask, is_causal=args.causal))
        t_pred = median_ms(lambda: sparge.predict(q, k, topk=density, is_causal=args.causal))
        out, stats = sparge.attn(q, k, v, topk=density, is_causal=args.causal, return_stats=True)
        t_api = median_ms(lambda: sparge.attn(q, k, v, topk=density, is_causal=args.causal))
        rows.append(dict(
            cpu=cpu_name(), threads=threads, B=B, H=H, L=L, D=D, dtype=args.dtype, causal=args.causal,
            density_target=density, density_achieved=round(stats["density"].mean().item(), 4),
            predict_ms=round(t_pred, 2), kernel_ms=round(t_kernel, 2), api_ms=round(t_api, 2),
            sdpa_ms=round(t_sdpa, 2), speedup_kernel=round(t_sdpa / t_kernel, 2),
            speedup_api=round(t_sdpa / t_api, 2), dense_equiv_gflops_api=round(flops / t_api / 1e6, 1),
            sdpa_gflops=round(flops / t_sdpa / 1e6, 1)))

    print(f"{cpu_name()}, {threads} threads, B={B} H={H} L={L} D={D} {args.dtype} causal={args.causal}, "
          f"block {bq}x{bk}, torch {torch.__version__}, commit {git_commit()}")
    hdr = f"{'density':>8} {'achieved':>8} {'pred ms':>8} {'kernel ms':>9} {'api ms':>8} {'sdpa ms':>8} " \
          f"{'x kernel':>8} {'x api':>6} {'dense-eq GFLOPS':>15}"
    print(hdr)
    for r in rows:
        print(f"{r['density_target']:>8.2f} {r['density_achieved']:>8.3f} {r['predict_ms']:>8.1f} "
              f"{r['kernel_ms']:>9.1f} {r['api_ms']:>8.1f} {r['sdpa_ms']:>8.1f} {r['speedup_kernel']:>8.2f} "
              f"{r['speedup_api']:>6.2f} {r['dense_equiv_gflops_api']:>15.1f}")

    write_rows(args.csv or default_csv("bench_cpu", "cpu"), rows, provenance("cpu"))


if __name__ == "__main__":
    main()
