"""Prediction quality yardstick (issue 16): error against density for sparge's
block predictor and for oracles that see the exact attention map.

    python benchmarks/bench_predict_quality.py                      # small CPU run (< 3 min on 2 cores)
    python benchmarks/bench_predict_quality.py --grids 8x24x24,4x32x32 --seeds 0,1,2 --llm-seq 8192 --plot curves.png

Datasets (one panel / one group of rows each):
  - ``video-raster-TxHxW-sS``: ``sparge.demo.make_video_qkv`` (smooth content,
    3-D RoPE) in raster order;
  - ``video-hilbert-TxHxW-sS``: the same q/k/v put in Hilbert order with
    ``sparge.hilbert.reorder`` (the error does not depend on the token order,
    the block grid does);
  - ``llm-causal-LN-sS``: causal, LLM-like: token content is an AR(1) random
    walk over positions (correlation ``--llm-ar`` between neighbours) plus
    noise, projected per head to q and k (k = q's projection plus a perturbation),
    scaled by a sharpness (``--llm-sharpness``, default 1) and rotated with 1-D RoPE (base 10000); token 0 gets
    a key aligned with every query's mean (an attention sink).

Selections, all on the block grid of ``sparge.block_shape`` for the device:
  - ``oracle_row``: for each q-block row keep the ``ceil(rho * allowed)``
    k-blocks of largest true attention mass (the exact softmax map, summed over
    the block), rho swept; for causal data the diagonal blocks are kept as
    well, as sparge.predict always keeps them;
  - ``oracle_global``: the same total number of blocks, allocated across rows
    and heads by mass (each row's row-normalized mass; every row keeps its
    largest block first, so no row is empty);
  - ``topk``, ``cdf``: ``sparge.predict(topk=...)`` / ``(cdf_threshold=...)``
    with the default sim_threshold; ``sim``: ``topk=--sim-topk`` with other
    sim_threshold values.

Every mask's output comes from ``sparge.reference.block_sparse_attn`` (fp32),
compared with dense fp32 attention: relative L1 ``sum|O-R| / sum|R|`` and
cosine (flattened over batch, heads, rows, channels). Density = computed /
causally allowed blocks, mean over batch and heads. ``ratio_vs_oracle``: a
sparge point's rel-L1 over the per-row oracle's at the same density
(oracle curve interpolated linearly in log error; NaN outside its range).
The CSV rows carry the provenance columns of common.provenance.
"""
import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import cpu_name, default_csv, device_name, git_commit, provenance, write_rows  # noqa: E402

import sparge  # noqa: E402
from sparge import reference  # noqa: E402
from sparge.demo import make_video_qkv  # noqa: E402

ORACLE_RHOS = (0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.75, 0.875, 0.95, 1.0)
TOPKS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.5)
CDFS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98)
SIMS = (0.0, 0.1, 0.2)
SPARGE_MODES = ("topk", "cdf", "sim")
ERROR_FLOOR = 1e-5  # oracle rel-L1 below this is rounding: no ratio


# --------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------
def _rope_1d(x: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    D, L = x.shape[-1], x.shape[-2]
    half = D // 2
    freq = base ** (-torch.arange(half, dtype=torch.float32) / half)
    ang = torch.arange(L, dtype=torch.float32)[:, None] * freq[None, :]
    a, b = x[..., :half], x[..., half:2 * half]
    return torch.cat([a * ang.cos() - b * ang.sin(), a * ang.sin() + b * ang.cos(), x[..., 2 * half:]], dim=-1)


def make_llm_qkv(L: int, heads: int, head_dim: int, seed: int, ar: float = 0.9, sharpness: float = 1.0):
    """Causal LLM-like q, k, v [1, heads, L, head_dim] (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    C = 64
    eps = torch.randn(L, C, generator=g)
    feat = torch.empty(L, C)
    feat[0] = eps[0]
    for t in range(1, L):  # AR(1): neighbours share content
        feat[t] = ar * feat[t - 1] + math.sqrt(1 - ar * ar) * eps[t]
    feat = feat + 0.3 * torch.randn(L, C, generator=g)
    w_q = torch.randn(heads, C, head_dim, generator=g) / math.sqrt(C)
    w_k = w_q + 0.3 * torch.randn(heads, C, head_dim, generator=g) / math.sqrt(C)
    w_v = torch.randn(heads, C, head_dim, generator=g) / math.sqrt(C)
    q, k, v = (torch.einsum("lc,hcd->hld", feat, w)[None] for w in (w_q, w_k, w_v))
    q, k = _rope_1d(sharpness * q), _rope_1d(sharpness * k)
    k[:, :, 0] = q.mean(dim=2) * 4.0  # attention sink at token 0
    return tuple(x.contiguous() for x in (q, k, v))


def _grid(s: str):
    return tuple(int(n) for n in s.lower().split("x"))


def datasets(grids, seeds, heads, head_dim, llm_seq, llm_seeds, device, llm_ar=0.9, llm_sharpness=1.0):
    """Yields (name, q, k, v, causal) on ``device``, fp32."""
    for grid in grids:
        for seed in seeds:
            q, k, v = make_video_qkv(*grid, heads=heads, head_dim=head_dim, seed=seed)
            tag = "x".join(map(str, grid))
            yield f"video-raster-{tag}-s{seed}", q.to(device), k.to(device), v.to(device), False
            qh, kh, vh = (sparge.hilbert.reorder(x, grid) for x in (q, k, v))
            yield f"video-hilbert-{tag}-s{seed}", qh.to(device), kh.to(device), vh.to(device), False
    if llm_seq:
        for seed in llm_seeds:
            q, k, v = make_llm_qkv(llm_seq, heads, head_dim, seed, ar=llm_ar, sharpness=llm_sharpness)
            yield f"llm-causal-L{llm_seq}-s{seed}", q.to(device), k.to(device), v.to(device), True


# --------------------------------------------------------------------------
# Core
# --------------------------------------------------------------------------
def errors(out: torch.Tensor, ref: torch.Tensor):
    """(relative L1, cosine), flattened."""
    o, r = out.double().flatten(), ref.double().flatten()
    return float((o - r).abs().sum() / r.abs().sum()), float(torch.nn.functional.cosine_similarity(o, r, dim=0))


def block_mass(q, k, v, bq: int, bk: int, causal: bool):
    """Exact attention (dense fp32): (out, mass [B, H, nq, nk] = probability summed
    over each block, divided by the q-block's row count, so each row sums to 1)."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    s = (q.float() @ k.float().transpose(-1, -2)) * D ** -0.5
    if causal:
        s = s.masked_fill(~reference.visible_keys(Lq, Lk, "top_left", q.device), float("-inf"))
    p = torch.softmax(s, dim=-1)
    out = p @ v.float()
    nq, nk = -(-Lq // bq), -(-Lk // bk)
    pp = torch.nn.functional.pad(p, (0, nk * bk - Lk, 0, nq * bq - Lq))
    mass = pp.view(B, H, nq, bq, nk, bk).sum(dim=(3, 5))
    rows = torch.clamp(Lq - torch.arange(nq, device=q.device) * bq, max=bq).float()
    return out, mass / rows[:, None]



def diagonal_blocks(Lq: int, Lk: int, bq: int, bk: int, causal: bool, device=None) -> torch.Tensor:
    """[nq, nk] bool: for causal, the k-blocks that hold some row's own key (the
    blocks sparge.predict always keeps); all False otherwise."""
    nq, nk = -(-Lq // bq), -(-Lk // bk)
    if not causal:
        return torch.zeros(nq, nk, dtype=torch.bool, device=device)
    i = torch.arange(nq, device=device)
    lo, hi = i * bq // bk, (torch.clamp((i + 1) * bq, max=Lq) - 1) // bk
    j = torch.arange(nk, device=device)
    return (j[None, :] >= lo[:, None]) & (j[None, :] <= hi[:, None])


def oracle_row_mask(mass, allowed, rho: float, forced=None):
    """Per row: the ceil(rho * allowed-in-row) k-blocks of largest mass (plus ``forced``)."""
    n_allowed = allowed.sum(-1).float()  # [nq]
    count = torch.ceil(rho * n_allowed).clamp(min=1)
    key = mass.masked_fill(~allowed, -1.0)
    _, idx = torch.sort(key, dim=-1, descending=True, stable=True)
    keep_sorted = (torch.arange(mass.shape[-1], device=mass.device) < count[:, None]).expand_as(mass)
    keep = torch.zeros_like(keep_sorted).scatter(-1, idx, keep_sorted)
    if forced is not None:
        keep = keep | forced
    return keep & allowed


def oracle_global_mask(mass, allowed, total: int, forced=None):
    """``total`` blocks over all rows and heads by mass; each row's largest block
    (and ``forced``) first, so no row is empty."""
    key = mass.masked_fill(~allowed, -1.0)
    first = torch.zeros_like(key, dtype=torch.bool).scatter(-1, key.argmax(-1, keepdim=True), True)
    if forced is not None:
        first = first | forced
    first = first & allowed
    rest = max(0, total - int(first.sum()))
    flat = key.masked_fill(first, -1.0).flatten()
    keep = first.flatten().clone()
    if rest:
        keep[torch.topk(flat, min(rest, int((flat >= 0).sum()))).indices] = True
    return keep.view_as(mass) & allowed


def interp_log(x: float, xs, ys) -> float:
    """ys (positive) at x, linear in log(y) between the nearest xs; NaN outside."""
    pts = sorted(zip(xs, ys))
    if not pts or x < pts[0][0] - 1e-9 or x > pts[-1][0] + 1e-9:
        return float("nan")
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 - 1e-9 <= x <= x1 + 1e-9:
            if x1 - x0 < 1e-12:
                return y0
            t = (x - x0) / (x1 - x0)
            return math.exp((1 - t) * math.log(max(y0, 1e-30)) + t * math.log(max(y1, 1e-30)))
    return pts[0][1]


def evaluate(name, q, k, v, causal, *, block=None, rhos=ORACLE_RHOS, topks=TOPKS, cdfs=CDFS, sims=SIMS,
             sim_topk: float = 0.15):
    """All rows of one dataset: dicts with dataset, method, param, density, rel_l1, cosine, ratio_vs_oracle."""
    D = q.shape[-1]
    bq, bk = block or sparge.block_shape(q.device, D, dtype=q.dtype)
    B, H, Lq, _ = q.shape
    Lk = k.shape[2]
    cz = "top_left" if causal else None
    allowed = reference.allowed_blocks(Lq, Lk, bq, bk, cz, q.device)
    forced = diagonal_blocks(Lq, Lk, bq, bk, causal, q.device)
    ref, mass = block_mass(q, k, v, bq, bk, causal)
    base = dict(dataset=name, B=B, H=H, L=Lq, D=D, causal=causal, block_q=bq, block_k=bk)

    def run(mask):
        out, _, _ = reference.block_sparse_attn(q, k, v, mask, block_q=bq, block_k=bk, causal=cz)
        dens = float(((mask & allowed).sum(dim=(2, 3)).float() / allowed.sum()).mean())
        return (dens, *errors(out, ref))

    rows = []
    seen = set()
    for rho in rhos:
        mask = oracle_row_mask(mass, allowed, rho, forced)
        total = int(mask.sum())
        if total in seen:
            continue
        seen.add(total)
        rows.append(dict(base, method="oracle_row", param=rho, **dict(zip(("density", "rel_l1", "cosine"), run(mask)))))
        if rho < 1.0:
            g = oracle_global_mask(mass, allowed, total, forced)
            rows.append(dict(base, method="oracle_global", param=rho, **dict(zip(("density", "rel_l1", "cosine"), run(g)))))
    points = [("topk", t, dict(topk=t)) for t in topks] + [("cdf", c, dict(cdf_threshold=c)) for c in cdfs]
    points += [("sim", s, dict(topk=sim_topk, sim_threshold=s)) for s in sims]
    for method, param, kw in points:
        mask = sparge.predict(q, k, is_causal=causal, block_size=(bq, bk), **kw)
        rows.append(dict(base, method=method, param=param, **dict(zip(("density", "rel_l1", "cosine"), run(mask)))))
    orc = [r for r in rows if r["method"] == "oracle_row"]
    for r in rows:
        o = interp_log(r["density"], [o["density"] for o in orc], [o["rel_l1"] for o in orc])
        r["ratio_vs_oracle"] = r["rel_l1"] / o if o >= ERROR_FLOOR else float("nan")
        for key in ("density", "rel_l1", "cosine", "ratio_vs_oracle"):
            r[key] = round(r[key], 6) if math.isfinite(r[key]) else r[key]
    return rows


def summary(rows, lo: float = 0.1, hi: float = 0.3):
    """{(dataset, method): (median ratio, max ratio, points)} over sparge points with density in [lo, hi]."""
    out = {}
    for ds in dict.fromkeys(r["dataset"] for r in rows):
        for m in SPARGE_MODES + ("oracle_global",):
            rs = sorted(r["ratio_vs_oracle"] for r in rows if r["dataset"] == ds and r["method"] == m
                        and lo <= r["density"] <= hi and math.isfinite(r["ratio_vs_oracle"]))
            out[ds, m] = (rs[len(rs) // 2] if rs else float("nan"), rs[-1] if rs else float("nan"), len(rs))
    return out


def _floats(s):
    return tuple(float(x) for x in s.split(",") if x)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grids", default="4x16x16,8x8x16", help="video grids TxHxW, comma-separated")
    ap.add_argument("--seeds", default="0,1", help="video content seeds")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--llm-seq", type=int, default=2048, help="length of the causal LLM-like case (0: none)")
    ap.add_argument("--llm-seeds", default="0,1")
    ap.add_argument("--llm-ar", type=float, default=0.9, help="AR(1) correlation of neighbouring tokens' content")
    ap.add_argument("--llm-sharpness", type=float, default=1.0, help="scale of the LLM-like q and k")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--block", default=None, help="BQxBK (default: sparge.block_shape of the device)")
    ap.add_argument("--topks", default=",".join(map(str, TOPKS)))
    ap.add_argument("--cdfs", default=",".join(map(str, CDFS)))
    ap.add_argument("--sims", default=",".join(map(str, SIMS)), help="sim_threshold values, at topk=--sim-topk")
    ap.add_argument("--sim-topk", type=float, default=0.15)
    ap.add_argument("--csv", default=None, help="default benchmarks/results/<dev>/bench_predict_quality_<date>_<commit>.csv")
    ap.add_argument("--plot", default=None, help="write the error-density curves here (PNG, needs matplotlib)")
    args = ap.parse_args(argv)

    dev = torch.device(args.device)
    block = _grid(args.block) if args.block else None
    t0 = time.perf_counter()
    rows = []
    for name, q, k, v, causal in datasets([_grid(g) for g in args.grids.split(",") if g], [int(s) for s in args.seeds.split(",")],
                                          args.heads, args.head_dim, args.llm_seq,
                                          [int(s) for s in args.llm_seeds.split(",")], dev, args.llm_ar, args.llm_sharpness):
        rows += evaluate(name, q, k, v, causal, block=block, topks=_floats(args.topks), cdfs=_floats(args.cdfs),
                         sims=_floats(args.sims), sim_topk=args.sim_topk)
    elapsed = time.perf_counter() - t0

    r0 = rows[0]
    print(f"{device_name(dev) if dev.type == 'cuda' else cpu_name()}, {torch.get_num_threads()} threads, H={args.heads} "
          f"D={args.head_dim} fp32, block {r0['block_q']}x{r0['block_k']}, torch {torch.__version__}, commit {git_commit()}, "
          f"{elapsed:.0f} s")
    print(f"{'dataset':<28} {'method':<14} {'param':>6} {'density':>8} {'rel_l1':>8} {'cosine':>9} {'x oracle':>8}")
    for r in rows:
        if r["method"].startswith("oracle") and r["param"] not in (0.1, 0.2, 0.3):
            continue
        print(f"{r['dataset']:<28} {r['method']:<14} {r['param']:>6} {r['density']:>8.3f} {r['rel_l1']:>8.4f} "
              f"{r['cosine']:>9.6f} {r['ratio_vs_oracle']:>8.2f}")
    print("\nerror / per-row oracle error at the same density, points with density in [0.1, 0.3]: median (max, n)")
    modes = SPARGE_MODES + ("oracle_global",)
    print(f"{'dataset':<28} " + " ".join(f"{m:>18}" for m in modes))
    s = summary(rows)
    for ds in dict.fromkeys(r["dataset"] for r in rows):
        print(f"{ds:<28} " + " ".join(f"{s[ds, m][0]:>6.2f} ({s[ds, m][1]:.2f}, {s[ds, m][2]})".rjust(18) for m in modes))

    write_rows(args.csv or default_csv("bench_predict_quality", dev), rows, provenance(dev))
    if args.plot:
        from sparge.viz import plot_error_density

        plot_error_density(rows, args.plot)
        print(f"plot written to {args.plot}")
    return rows


if __name__ == "__main__":
    main()
