"""Calibration benchmark: a CogVideoX-like workload, wall time and the result.

    python benchmarks/bench_calibrate.py              # 30 layers x 30 heads, D=64, L=17550 (13x30x45), 2 samples
    python benchmarks/bench_calibrate.py --tiny       # a few seconds on a CPU (run by the tests)

The model is ``sparge.demo.VideoAttentionModel``: every layer runs torch SDPA
on structured video tokens with 3-D RoPE (projections fixed per layer, content
per sample; later layers attend more diffusely). ``sparge.calibrate`` captures
each call by module path and searches per head. Reported: calibration wall
time (data generation and the model's own dense attention included), then per
layer the merged config's density and relative-L1 error on the calibration
samples and on a held-out sample, and the sparse vs dense time of one layer.
CSV under benchmarks/results/<gpu or cpu>/bench_calibrate_<YYYYMMDD>_<commit>.csv,
every row with the provenance columns of common.provenance (commit, torch and
CUDA versions, GPU name or CPU model, date).
"""
import argparse
import time

import torch
import torch.nn.functional as F
from common import default_csv, provenance, time_ms, write_rows

import sparge
from sparge.demo import VideoAttentionModel, make_video_qkv


def _ms(fn, device) -> float:
    """Median ms of one call (common.time_ms: CUDA events with L2 flush on a GPU,
    perf_counter on the CPU), one warm-up call and 5 repeats."""
    return time_ms(fn, device, warmup=1, repeats=5)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="a small CPU-sized version")
    p.add_argument("--device", default=None)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--heads", type=int, default=30)
    p.add_argument("--grid", type=int, nargs=3, default=(13, 30, 45), metavar=("T", "H", "W"))
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--target", type=float, default=0.05)
    p.add_argument("--csv", default=None)
    p.add_argument("--config-out", default=None, help="also save the calibrated SpargeConfig JSON here")
    args = p.parse_args(argv)
    if args.tiny:
        args.layers, args.heads, args.grid = 2, 2, (2, 16, 16)
    device = torch.device(args.device or ("cuda" if sparge.cuda_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    T, Hs, Ws = args.grid
    L, D = T * Hs * Ws, 64
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    model = VideoAttentionModel(args.layers, T, Hs, Ws, args.heads, D, device=device, dtype=dtype)
    print(f"{gpu}: calibrating {args.layers} layers x {args.heads} heads, L={L} ({T}x{Hs}x{Ws}), D={D}, {dtype}, "
          f"{args.samples} samples, target rel L1 {args.target}")

    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    res = sparge.calibrate(model, list(range(args.samples)), target=args.target, progress=not args.tiny)
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    print(f"calibration wall time {wall:.1f} s ({len(res.records)} attention calls, "
          f"{wall / max(1, len(res.records)):.2f} s per call)")
    if args.config_out:
        res.save(args.config_out)

    rows = []
    for i, blk in enumerate(model.blocks):
        a = blk.attn
        path = f"blocks.{i}.attn"
        lc = res.config.layer(path)
        row = {"gpu": gpu, "layer": path, "heads": args.heads, "L": L, "D": D, "dtype": str(dtype).split(".")[-1],
               "target_rel_l1": args.target, "calib_seconds_total": round(wall, 2)}
        for tag, samples in (("calib", range(args.samples)), ("heldout", [args.samples])):
            dens, errs = [], []
            for s in samples:
                q, k, v = make_video_qkv(T, Hs, Ws, args.heads, D, device=device, dtype=dtype, seed=1000 * i + s,
                                         sharpness=a.sharpness, noise=a.noise, weight_seed=i)
                out, st = sparge.attn(q, k, v, config=lc, return_stats=True, auto_dense=False)
                ref = F.scaled_dot_product_attention(q, k, v).float()
                errs.append(((out.float() - ref).abs().sum() / ref.abs().sum()).item())
                dens.append(st["density"].float().mean().item())
            row[f"{tag}_density"] = round(sum(dens) / len(dens), 4)
            row[f"{tag}_rel_l1_max"] = round(max(errs), 4)
        row["pv_skip_frac"] = round(sum(r.pv_skip.mean().item() for r in res.records if r.path == path)
                                    / max(1, sum(r.path == path for r in res.records)), 4)
        if i in (0, args.layers // 2, args.layers - 1):  # time a few layers: sparse (config) vs dense SDPA
            row["sparge_ms"] = round(_ms(lambda: sparge.attn(q, k, v, config=lc), device), 3)
            row["sdpa_ms"] = round(_ms(lambda: F.scaled_dot_product_attention(q, k, v), device), 3)
        else:
            row["sparge_ms"] = row["sdpa_ms"] = ""
        rows.append(row)
        print(f"  {path:<14} density calib {row['calib_density']:.3f} held-out {row['heldout_density']:.3f}  "
              f"rel L1 calib {row['calib_rel_l1_max']:.4f} held-out {row['heldout_rel_l1_max']:.4f}  "
              f"pv skip {row['pv_skip_frac']:.2f}"
              + (f"  sparge {row['sparge_ms']} ms vs SDPA {row['sdpa_ms']} ms" if row["sparge_ms"] != "" else ""))
    md = sum(r["calib_density"] for r in rows) / len(rows)
    mh = sum(r["heldout_density"] for r in rows) / len(rows)
    print(f"mean density: calibration samples {md:.3f}, held-out {mh:.3f}; "
          f"max rel L1: calibration {max(r['calib_rel_l1_max'] for r in rows):.4f}, "
          f"held-out {max(r['heldout_rel_l1_max'] for r in rows):.4f}")
    if args.csv or not args.tiny:
        write_rows(args.csv or default_csv("bench_calibrate", device), rows, provenance(device))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
