"""GPU benchmark: sparge against torch SDPA (cuDNN, flash) and FlexAttention, same run.

    python benchmarks/bench_attn.py                      # full grid, CSV under benchmarks/results/<gpu>/
    python benchmarks/bench_attn.py --quick              # a few rows
    python benchmarks/bench_attn.py --shape 1,32,16384,64 --densities 1,0.25 --causal no   # chosen rows

Rows: GPU, shape, dtype, causal, target and achieved density, prediction ms,
sparse kernel ms (given mask), full API ms (prediction + kernel), SDPA cuDNN
and flash ms, FlexAttention ms with the same block mask, the SpargeAttn
reference implementation when it is importable (`spas_sage_attn`, built
separately, see README.md), speedups, and dense-equivalent TOPS
(4*B*H*L^2*D / time, halved for causal) labelled as such.
Timing: common.time_ms (CUDA events, warm-up, median, L2 flushed before every
timed call). Every row also carries the provenance columns of common.provenance
(commit, torch and CUDA versions, GPU name, date); the default CSV is
results/<gpu>/bench_attn_<YYYYMMDD>_<commit>.csv.
"""
import argparse
import math

import torch
import torch.nn.functional as F
from common import default_csv, git_commit, provenance, time_ms, write_rows

import sparge


def bench(fn) -> float:
    """Median milliseconds of fn on the current stream (common.time_ms: CUDA
    events, warm-up, L2 flushed before every timed call)."""
    return time_ms(fn, "cuda")


def sdpa_backend(name):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel({"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[name])


def time_sdpa(q, k, v, causal, backend) -> float:
    try:
        with sdpa_backend(backend):
            return bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
    except RuntimeError:
        return math.nan


_flex = None


def time_flex(q, k, v, mask, bq, bk, causal) -> float:
    """FlexAttention over the same block mask (built from the kept-block lists,
    never materialized per element), with a causal mask_mod when causal."""
    global _flex
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention

        if _flex is None:
            _flex = torch.compile(flex_attention)
        if causal:
            from sparge.reference import allowed_blocks

            mask = mask & allowed_blocks(q.shape[2], k.shape[2], bq, bk, "top_left", q.device)
        kv_num = mask.sum(-1, dtype=torch.int32)
        kv_idx = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        mask_mod = (lambda b, h, qi, kv: kv <= qi) if causal else None
        bm = BlockMask.from_kv_blocks(kv_num, kv_idx, BLOCK_SIZE=(bq, bk), mask_mod=mask_mod,
                                      seq_lengths=(q.shape[2], k.shape[2]))
        return bench(lambda: _flex(q, k, v, block_mask=bm))
    except Exception as e:  # noqa: BLE001 - a missing baseline is recorded, not fatal
        print(f"  flex attention unavailable: {type(e).__name__}: {str(e)[:160]}")
        return math.nan


_ref = None


def spargeattn_ref():
    """The SpargeAttn reference package if it is importable, else None (once)."""
    global _ref
    if _ref is None:
        try:
            import spas_sage_attn

            _ref = spas_sage_attn
        except Exception as e:  # noqa: BLE001 - an absent baseline is a NaN column
            print(f"  SpargeAttn reference not importable ({type(e).__name__}: {str(e)[:120]}); its columns are NaN")
            _ref = False
    return _ref or None


def ref_block_shape(dev) -> tuple:
    """Block shape of the reference's kernel: 64x128 on sm90, 128x64 elsewhere."""
    return (64, 128) if torch.cuda.get_device_capability(dev) == (9, 0) else (128, 64)


def time_spargeattn(q, k, v, density, causal, g):
    """(kernel ms, API ms) of the SpargeAttn reference, NaN when it is absent or the
    row is causal (its causal mode is wrong on sm90/sm89, see ANCHORS.md).
    Kernel: `block_sparse_sage2_attn_cuda` given a random block mask of this density
    at its own block shape (its quantization and mask-to-LUT steps included, as in
    its API). API: `spas_sage2_attn_meansim_topk_cuda(topk=density)`, prediction
    included. Both at the reference's defaults otherwise (PV threshold 50)."""
    ref = spargeattn_ref()
    if ref is None or causal:
        return math.nan, math.nan
    B, H, L, _ = q.shape
    rq, rk = ref_block_shape(q.device)
    mask = torch.rand(B, H, -(-L // rq), -(-k.shape[2] // rk), device=q.device, generator=g) < density
    if density >= 1.0:
        mask[:] = True
    mask = mask.to(torch.int8)  # its mask format, converted once outside the timed call
    out = []
    for fn in (lambda: ref.block_sparse_sage2_attn_cuda(q, k, v, mask_id=mask),
               lambda: ref.spas_sage2_attn_meansim_topk_cuda(q, k, v, topk=density, is_causal=False)):
        try:
            out.append(bench(fn))
        except Exception as e:  # noqa: BLE001 - recorded as NaN with the reason
            print(f"  SpargeAttn reference failed: {type(e).__name__}: {str(e)[:160]}")
            out.append(math.nan)
    return out[0], out[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--no-ref", action="store_true", help="skip the SpargeAttn reference even if importable")
    ap.add_argument("--csv", default=None, help="default results/<gpu>/bench_attn_<YYYYMMDD>_<commit>.csv")
    ap.add_argument("--shape", action="append", default=None, metavar="B,H,L,D",
                    help="only these shapes (repeatable); with --densities/--causal for a focused run")
    ap.add_argument("--densities", default=None, help="comma-separated, e.g. 1,0.5,0.25,0.1")
    ap.add_argument("--causal", choices=["no", "yes", "both"], default=None)
    args = ap.parse_args()
    dev = torch.device("cuda")
    gpu = torch.cuda.get_device_name(dev)
    dtype = torch.bfloat16
    if args.quick:
        shapes = [(1, 16, 16384, 128)]
        densities, causals = [1.0, 0.25], [False, True]
    else:
        shapes = [(1, 32, 4096, 128), (1, 32, 16384, 64), (1, 16, 16384, 128), (1, 16, 32768, 128),
                  (1, 32, 32768, 64)]
        densities, causals = [1.0, 0.5, 0.25, 0.1], [False, True]
    if args.shape:
        shapes = [tuple(int(x) for x in sh.split(",")) for sh in args.shape]
    if args.densities:
        densities = [float(x) for x in args.densities.split(",")]
    if args.causal:
        causals = {"no": [False], "yes": [True], "both": [False, True]}[args.causal]
    rows = []
    print(f"{gpu}, torch {torch.__version__}, CUDA {torch.version.cuda}, commit {git_commit()}, {dtype}; "
          "TOPS are dense-equivalent (4*B*H*L^2*D/t, /2 if causal)")
    print(f"{'shape':>22} {'causal':>6} {'dens':>5} {'got':>5} {'pred':>6} {'kernel':>7} {'api':>7} {'cudnn':>7} "
          f"{'flash':>7} {'flex':>7} {'ref_k':>7} {'ref_api':>7} {'xcudnn':>6} {'TOPS':>6}")
    for B, H, L, D in shapes:
        g = torch.Generator(device=dev).manual_seed(0)
        q, k, v = (torch.randn(B, H, L, D, device=dev, dtype=dtype, generator=g) for _ in range(3))
        bq, bk = sparge.block_shape(dev, D, dtype=dtype)
        nq, nk = -(-L // bq), -(-L // bk)
        for causal in causals:
            flops = 4.0 * B * H * L * L * D / (2 if causal else 1)
            t_cudnn = time_sdpa(q, k, v, causal, "cudnn")
            t_flash = time_sdpa(q, k, v, causal, "flash")
            for density in densities:
                mask = torch.rand(B, H, nq, nk, device=dev, generator=g) < density
                if density >= 1.0:
                    mask[:] = True
                t_kernel = bench(lambda: sparge.block_sparse_attn(q, k, v, mask, is_causal=causal))
                t_pred = bench(lambda: sparge.predict(q, k, topk=density, is_causal=causal))
                _, st = sparge.attn(q, k, v, topk=density, is_causal=causal, return_stats=True)
                t_api = bench(lambda: sparge.attn(q, k, v, topk=density, is_causal=causal))
                t_flex = math.nan if args.no_flex else time_flex(q, k, v, mask, bq, bk, causal)
                t_rk, t_ra = (math.nan, math.nan) if args.no_ref else time_spargeattn(q, k, v, density, causal, g)
                got = st["density"].float().mean().item()
                row = dict(gpu=gpu, B=B, H=H, L=L, D=D, dtype=str(dtype).split(".")[-1], causal=causal,
                           density_target=density, density_achieved=round(got, 4), predict_ms=round(t_pred, 4),
                           kernel_ms=round(t_kernel, 4), api_ms=round(t_api, 4), sdpa_cudnn_ms=round(t_cudnn, 4),
                           sdpa_flash_ms=round(t_flash, 4), flex_ms=round(t_flex, 4),
                           spargeattn_kernel_ms=round(t_rk, 4), spargeattn_api_ms=round(t_ra, 4),
                           speedup_api_vs_cudnn=round(t_cudnn / t_api, 3),
                           dense_equiv_tops_api=round(flops / t_api / 1e9, 1),
                           dense_equiv_tops_kernel=round(flops / t_kernel / 1e9, 1),
                           flash_tops=round(flops / t_flash / 1e9, 1))
                rows.append(row)
                print(f"{str((B, H, L, D)):>22} {str(causal):>6} {density:>5.2f} {got:>5.2f} {t_pred:>6.3f} "
                      f"{t_kernel:>7.3f} {t_api:>7.3f} {t_cudnn:>7.3f} {t_flash:>7.3f} {t_flex:>7.3f} {t_rk:>7.3f} {t_ra:>7.3f} "
                      f"{t_cudnn / t_api:>6.2f} {flops / t_api / 1e9:>6.0f}", flush=True)
    write_rows(args.csv or default_csv("bench_attn", dev), rows, provenance(dev))


if __name__ == "__main__":
    main()
