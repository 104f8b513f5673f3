"""Experiment driver for benchmarks/kernels/attn_tiles.cu: times each tile
variant of the sm80 attention kernel (dense and random block masks) next to
torch SDPA's flash and cuDNN backends, in one process, after checking each
variant against an fp32 reference on two heads.

    python benchmarks/kernels/bench_tiles.py [--predict PRED.so ...] [--no-tiles] LIB.so [LIB.so ...]

With --predict (repeatable), also times builds of predict_flows.cu, eager and
as a CUDA graph replay, and checks that they give the first build's masks.
Timing: benchmarks/common.py time_ms (before it, triton's do_bench; both take
the median with L2 flushed between calls).
"""
import ctypes
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import git_commit, time_ms  # noqa: E402  (benchmarks/common.py)


def bench(fn):
    """Median ms (common.time_ms: CUDA events, warm-up, L2 flushed before every timed call)."""
    return time_ms(fn, "cuda")


def sdpa(q, k, v, backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[backend]
    with sdpa_kernel(b):
        return bench(lambda: F.scaled_dot_product_attention(q, k, v))


def predict_section(libs, cudnn_ms):
    """libs: [(name, CDLL)] builds of predict_flows.cu; the first is the baseline."""
    dev = torch.device("cuda")
    cases = [  # B, Hq, Hkv, L, D, BQ, BK, causal
        (1, 16, 16, 16384, 128, 128, 64, 0), (1, 32, 32, 16384, 64, 128, 128, 0),
        (1, 32, 32, 16384, 64, 128, 64, 0), (1, 16, 16, 32768, 128, 128, 64, 0),
        (1, 32, 8, 8192, 128, 128, 64, 1), (2, 4, 2, 1025, 64, 128, 128, 0), (1, 2, 2, 97, 128, 128, 64, 1),
        (3, 6, 3, 4097, 96, 128, 64, 2), (1, 4, 4, 3000, 256, 128, 64, 0)]
    for (B, Hq, Hkv, L, D, BQ, BK, causal) in cases:
        gen = torch.Generator(device=dev).manual_seed(1)
        q = torch.randn(B, Hq, L, D, device=dev, dtype=torch.bfloat16, generator=gen)
        k = torch.randn(B, Hkv, L, D, device=dev, dtype=torch.bfloat16, generator=gen) + 0.5
        nq, nk = -(-L // BQ), -(-L // BK)
        theta = torch.full((Hq,), -0.1, device=dev)
        selp = torch.full((Hq,), 0.5, device=dev)
        line = f"predict {(B, Hq, Hkv, L, D)} blocks {BQ}x{BK} causal {causal}:"
        m0 = None
        for name, lib in libs:
            lib.flow_workspace.restype = ctypes.c_size_t
            ws = torch.empty(lib.flow_workspace(B, Hq, Hkv, L, D, BQ, BK), dtype=torch.uint8, device=dev)

            def run(mask):
                st = lib.predict_flow(ctypes.c_void_p(q.data_ptr()), ctypes.c_void_p(k.data_ptr()),
                                      B, Hq, Hkv, L, D, BQ, BK, causal, 1, ctypes.c_void_p(theta.data_ptr()),
                                      ctypes.c_void_p(selp.data_ptr()), ctypes.c_void_p(mask.data_ptr()),
                                      ctypes.c_void_p(ws.data_ptr()),
                                      ctypes.c_void_p(torch.cuda.current_stream().cuda_stream))
                assert st == 0, f"predict_flow status {st}"

            m = torch.full((B, Hq, nq, nk), 7, dtype=torch.uint8, device=dev)
            run(m)
            torch.cuda.synchronize()
            if m0 is None:
                m0 = m.clone()
            diff = (m != m0).sum().item()
            t = bench(lambda: run(m))
            g = torch.cuda.CUDAGraph()
            s = torch.cuda.Stream()
            with torch.cuda.stream(s):
                run(m)
                torch.cuda.synchronize()
                with torch.cuda.graph(g, stream=s):
                    run(m)
            tg = bench(lambda: g.replay())
            pct = f" {100 * tg / cudnn_ms[(B, Hq, L, D)]:.2f}%cudnn" if (B, Hq, L, D) in cudnn_ms else ""
            line += f"\n   {name}: eager {t:.4f} ms, graph {tg:.4f} ms{pct}, mask diff {diff}"
        print(line, flush=True)


def main():
    args = sys.argv[1:]
    pred = []
    while "--predict" in args:
        i = args.index("--predict")
        pred.append((args[i + 1].split("/")[-1], ctypes.CDLL(args[i + 1])))
        del args[i:i + 2]
    tiles = "--no-tiles" not in args
    args = [a for a in args if a != "--no-tiles"]
    libs = [ctypes.CDLL(p) for p in args]
    variants = []
    for lib in libs:
        for v in range(64):
            d, bq, bk, g, sm = (ctypes.c_int() for _ in range(5))
            if lib.tile_info(v, *(ctypes.byref(x) for x in (d, bq, bk, g, sm))):
                variants.append((v, lib, d.value, bq.value, bk.value, g.value, sm.value))
    dev = torch.device("cuda")
    print(torch.cuda.get_device_name(dev), torch.__version__, f"CUDA {torch.version.cuda}", f"commit {git_commit()}")
    cudnn_ms = {}
    for (B, H, L, D) in [(1, 32, 16384, 64), (1, 16, 16384, 128), (1, 16, 32768, 128)]:
        gen = torch.Generator(device=dev).manual_seed(0)
        q, k, v = (torch.randn(B, H, L, D, device=dev, dtype=torch.bfloat16, generator=gen) for _ in range(3))
        flops = 4.0 * B * H * L * L * D
        t_fl, t_cd = sdpa(q, k, v, "flash"), sdpa(q, k, v, "cudnn")
        cudnn_ms[(B, H, L, D)] = t_cd
        if L > 16384 or not tiles:
            print(f"shape {(B, H, L, D)}: flash {t_fl:.3f} ms, cudnn {t_cd:.3f} ms")
            continue
        ref = F.scaled_dot_product_attention(q[:, :2].float(), k[:, :2].float(), v[:, :2].float())
        own = F.scaled_dot_product_attention(q[:, :2], k[:, :2], v[:, :2]).float()
        e_sdpa = (own - ref).abs().max().item()
        print(f"shape {(B, H, L, D)}: flash {t_fl:.3f} ms ({flops / t_fl / 1e9:.0f} TFLOPS), cudnn {t_cd:.3f} ms, "
              f"bf16 SDPA max err {e_sdpa:.2e}")
        for (vid, lib, d, bq, bk, g, sm) in variants:
            if d != D:
                continue
            nq, nk = -(-L // bq), -(-L // bk)
            out = torch.full_like(q, float("nan"))
            st = torch.cuda.current_stream().cuda_stream

            def run(mask):
                err = lib.tile_run(vid, ctypes.c_void_p(q.data_ptr()), ctypes.c_void_p(k.data_ptr()),
                                   ctypes.c_void_p(v.data_ptr()), ctypes.c_void_p(out.data_ptr()),
                                   ctypes.c_void_p(mask.data_ptr()), B, H, L, 0, ctypes.c_void_p(st))
                assert err == 0, f"variant {vid}: launch error {err}"

            ones = torch.ones(B, H, nq, nk, dtype=torch.uint8, device=dev)
            run(ones)
            torch.cuda.synchronize()
            e = (out[:, :2].float() - ref).abs().max().item()
            ok = torch.isfinite(out).all().item() and e <= 2 * e_sdpa + 1e-3
            t = bench(lambda: run(ones))
            line = (f"  v{vid:<2} BQ{bq} BK{bk} pv_group {g} smem {sm}: err {e:.2e} {'ok' if ok else 'FAIL'} "
                    f"dense {t:.3f} ms ({t / t_fl:.3f}x flash, {flops / t / 1e9:.0f} TFLOPS)")
            for dens in (0.5, 0.25, 0.1):
                m = (torch.rand(B, H, nq, nk, device=dev, generator=gen) < dens).to(torch.uint8)
                got = m.float().mean().item()
                ts = bench(lambda: run(m))
                line += f" | d{dens}: {ts:.3f} ({t * got / ts:.2f} of ideal)"
            print(line, flush=True)
    if pred:
        predict_section(pred, cudnn_ms)


if __name__ == "__main__":
    main()
