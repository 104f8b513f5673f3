"""A built-in structured example: video-like tokens on a T x H x W grid.

Smooth content (a few low-frequency waves over the grid plus a little noise)
is projected to per-head queries and keys, then rotated with 3-D rotary
position embeddings, so each token attends mostly to its space-time
neighbourhood — the structure sparse attention exploits in video models.
"""
from __future__ import annotations

import math
import time
from typing import Dict, Optional

import torch
import torch.nn.functional as F


def _rope_3d(x: torch.Tensor, pos: torch.Tensor, base: float = 100.0) -> torch.Tensor:
    """Rotary embedding over three axes: x [B, H, L, D], pos [L, 3] (t, h, w)."""
    D = x.shape[-1]
    parts = [D // 3 // 2 * 2, D // 3 // 2 * 2]
    parts.append(D - sum(parts))
    out, start = [], 0
    for axis, width in enumerate(parts):
        seg = x[..., start:start + width]
        half = width // 2
        freq = base ** (-torch.arange(half, dtype=torch.float32, device=x.device) / max(half, 1))
        ang = pos[:, axis, None].float() * freq[None, :]  # [L, half]
        cos, sin = ang.cos(), ang.sin()
        a, b = seg[..., :half], seg[..., half:2 * half]
        out += [a * cos - b * sin, a * sin + b * cos]
        start += width
    return torch.cat(out, dim=-1)


def make_video_qkv(T: int = 8, Hs: int = 24, Ws: int = 24, heads: int = 8, head_dim: int = 64, batch: int = 1,
                   device="cpu", dtype=torch.float32, seed: int = 0, sharpness: float = 3.0, noise: float = 0.1,
                   weight_seed: Optional[int] = None):
    """q, k, v [batch, heads, T*Hs*Ws, head_dim] with smooth content and 3-D RoPE.

    Keys are a noisy copy of the queries' projection, so a token's query
    matches the keys of tokens with similar content, which smoothness makes
    the nearby ones; RoPE makes the match fade with distance. ``sharpness``
    scales q and k (higher: more peaked attention), ``noise`` is the per-token
    noise of the content; ``weight_seed`` (default: ``seed``) seeds the
    per-head projections apart from the content, as a model's fixed weights
    see varying inputs. Random draws are made on the CPU (reproducible), the
    arithmetic on ``device``."""
    g = torch.Generator().manual_seed(seed)
    dev = torch.device(device)
    t, h, w = torch.meshgrid(torch.arange(T), torch.arange(Hs), torch.arange(Ws), indexing="ij")
    pos = torch.stack([t, h, w], dim=-1).reshape(-1, 3)  # raster order
    L, C = pos.shape[0], 64
    # smooth content: random low-frequency waves over (t, h, w)
    k_vec = torch.randn(C, 3, generator=g) * torch.tensor([0.4, 0.3, 0.3])
    phase = torch.rand(C, generator=g) * 2 * math.pi
    eps = torch.randn(L, C, generator=g)
    gw = g if weight_seed is None else torch.Generator().manual_seed(weight_seed)
    w_q = torch.randn(heads, C, head_dim, generator=gw) / math.sqrt(C)
    w_k = w_q + 0.2 * torch.randn(heads, C, head_dim, generator=gw) / math.sqrt(C)
    w_v = torch.randn(heads, C, head_dim, generator=gw) / math.sqrt(C)
    pos, k_vec, phase, eps, w_q, w_k, w_v = (x.to(dev) for x in (pos, k_vec, phase, eps, w_q, w_k, w_v))
    feat = torch.sin(pos.float() @ k_vec.T + phase) + noise * eps
    q, k, v = (torch.einsum("lc,hcd->hld", feat, w)[None].expand(batch, -1, -1, -1) for w in (w_q, w_k, w_v))
    q, k = _rope_3d(sharpness * q, pos), _rope_3d(sharpness * k, pos)
    return tuple(x.contiguous().to(dtype=dtype) for x in (q, k, v))


class VideoAttentionModel(torch.nn.Module):
    """A stack of attention layers over video-like tokens, for calibration
    demos and benchmarks: ``model(sample)`` runs every layer on its own
    structured Q/K/V (projections seeded by layer, content by layer and
    sample; layers differ in sharpness and noise, so they want different
    hyperparameters) through torch SDPA and
    returns the last output. Layer ``i`` is the module ``blocks.<i>.attn``."""

    def __init__(self, layers: int = 4, T: int = 4, Hs: int = 16, Ws: int = 16, heads: int = 4, head_dim: int = 64,
                 device="cpu", dtype=torch.float32):
        super().__init__()
        self.shape = (T, Hs, Ws, heads, head_dim)
        self.device_, self.dtype = torch.device(device), dtype
        self.blocks = torch.nn.ModuleList(_VideoBlock(i, layers) for i in range(layers))

    def forward(self, sample: int = 0) -> torch.Tensor:
        out = None
        for blk in self.blocks:
            out = blk(self, int(sample))
        return out


class _VideoBlock(torch.nn.Module):
    def __init__(self, index: int, layers: int):
        super().__init__()
        self.index = index
        self.attn = _VideoAttention(index, layers)

    def forward(self, model, sample: int):
        return self.attn(model, sample)


class _VideoAttention(torch.nn.Module):
    def __init__(self, index: int, layers: int):
        super().__init__()
        self.index = index
        frac = index / max(layers - 1, 1)
        self.sharpness = 3.5 - 2.0 * frac  # later layers attend more diffusely
        self.noise = 0.05 + 0.25 * frac

    def forward(self, model, sample: int):
        T, Hs, Ws, heads, D = model.shape
        q, k, v = make_video_qkv(T, Hs, Ws, heads, D, device=model.device_, dtype=model.dtype,
                                 seed=1000 * self.index + sample, sharpness=self.sharpness, noise=self.noise,
                                 weight_seed=self.index)
        return F.scaled_dot_product_attention(q, k, v)


def _time(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of fn() after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def run_demo(device: Optional[str] = None, plot: Optional[str] = None, T: Optional[int] = None,
             size: Optional[int] = None, heads: int = 8,
             head_dim: int = 64, cdf_threshold: float = 0.95, sim_threshold: float = 0.15, repeats: int = 5,
             print_fn=print) -> Dict[str, float]:
    import sparge
    from sparge import viz

    if plot:  # before the work, not after it
        missing = viz.matplotlib_missing("the demo's plot")
        if missing:
            raise ImportError(missing, name="matplotlib")
    if device is None:
        device = "cuda" if sparge.cuda_available() else "cpu"
    dev = torch.device(device)
    dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    # a GPU needs a long video for sparsity to pay; the CPU gets a short one
    T = T or (8 if dev.type == "cpu" else 32)
    size = size or 24
    q, k, v = make_video_qkv(T, size, size, heads, head_dim, device=dev, dtype=dtype)
    L = q.shape[2]
    opts = dict(cdf_threshold=cdf_threshold, sim_threshold=sim_threshold)
    out, stats = sparge.attn(q, k, v, return_stats=True, **opts)
    mask = sparge.predict(q, k, **opts)
    dense = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    rel_l1 = ((out.double() - dense.double()).abs().sum() / dense.double().abs().sum()).item()
    cos = F.cosine_similarity(out.double().flatten(), dense.double().flatten(), dim=0).item()
    density = stats["density"].float().mean().item()
    t_sparge = _time(lambda: sparge.attn(q, k, v, **opts), dev, repeats)
    t_sdpa = _time(lambda: F.scaled_dot_product_attention(q, k, v), dev, repeats)

    print_fn(f"sparge demo on {device} ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'CPU'}), "
             f"{dtype}: video tokens {T}x{size}x{size} = {L}, {heads} heads, head dim {head_dim}")
    print_fn(f"  hyperparameters  cdf_threshold={cdf_threshold}, sim_threshold={sim_threshold}, "
             f"block shape {tuple(sparge.block_shape(dev, head_dim, dtype=dtype))}")
    per_head = stats["density"][0].float().tolist()
    print_fn(f"  density          {density:.3f} of the blocks computed "
             f"(per head: {', '.join(f'{d:.2f}' for d in per_head)})")
    print_fn(f"  error vs dense   relative L1 {rel_l1:.4f}, cosine {cos:.5f}")
    print_fn(f"  time             sparge {t_sparge * 1e3:.1f} ms (prediction included) vs torch SDPA "
             f"{t_sdpa * 1e3:.1f} ms: {t_sdpa / t_sparge:.2f}x")
    if plot:
        save_plot(mask, stats["density"], plot)
        print_fn(f"  plot             {plot}")
    return dict(density=density, rel_l1=rel_l1, cosine=cos, ms_sparge=t_sparge * 1e3, ms_sdpa=t_sdpa * 1e3)


def save_plot(mask: torch.Tensor, density: torch.Tensor, path: str, head: int = 0) -> None:
    """One head's block mask and the density of every head, as a PNG."""
    from sparge import viz

    plt = viz._plt()

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.6), gridspec_kw={"width_ratios": [1.1, 1]})
    a.imshow(mask[0, head].cpu().numpy(), cmap="Greys", interpolation="nearest", aspect="auto")
    a.set_title(f"block mask, head {head} (black = computed)")
    a.set_xlabel("k-block")
    a.set_ylabel("q-block")
    d = density[0].float().cpu().numpy()
    b.bar(range(len(d)), d, color="tab:blue")
    b.set_ylim(0, 1)
    b.set_title("density per head")
    b.set_xlabel("head")
    b.set_ylabel("computed / allowed blocks")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_calibrate_demo(out_dir: str = "sparge_calibration", device: Optional[str] = None, layers: int = 4,
                       heads: int = 4, grid=(4, 16, 16), target: float = 0.05, metric: str = "l1",
                       samples: int = 2, print_fn=print) -> Dict[str, float]:
    """Calibrate ``VideoAttentionModel`` on ``samples`` inputs, check the merged
    config on a held-out sample, and write the config and three plots."""
    import os

    import sparge
    from sparge import viz

    missing = viz.matplotlib_missing("the calibration demo's plots")
    if missing:  # before the calibration, not after it
        raise ImportError(missing, name="matplotlib")
    if device is None:
        device = "cuda" if sparge.cuda_available() else "cpu"
    dev = torch.device(device)
    dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    T, Hs, Ws = grid
    model = VideoAttentionModel(layers, T, Hs, Ws, heads, 64, device=dev, dtype=dtype)
    t0 = time.perf_counter()
    result = sparge.calibrate(model, list(range(samples)), target=target, metric=metric)
    seconds = time.perf_counter() - t0
    os.makedirs(out_dir, exist_ok=True)
    cfg_path = os.path.join(out_dir, "sparge_config.json")
    result.save(cfg_path)
    print_fn(f"calibrated {len(result.config)} layers x {heads} heads ({T}x{Hs}x{Ws} = {T * Hs * Ws} tokens, "
             f"{samples} samples) on {device} in {seconds:.1f} s; config: {cfg_path}")
    # the merged config on a sample it did not see
    held_out = samples
    print_fn(f"  {'layer':<16} {'density':>8} {'rel L1':>8}  (held-out sample {held_out}, target {target})")
    dens, errs = [], []
    first_mask = None
    for blk in model.blocks:
        a = blk.attn
        q, k, v = make_video_qkv(T, Hs, Ws, heads, 64, device=dev, dtype=dtype, seed=1000 * a.index + held_out,
                                 sharpness=a.sharpness, noise=a.noise, weight_seed=a.index)
        lc = result.config.layer(f"blocks.{a.index}.attn")
        out, st = sparge.attn(q, k, v, config=lc, return_stats=True, auto_dense=False)
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        err = ((out.float() - ref).abs().sum() / ref.abs().sum()).item()
        d = st["density"].float().mean().item()
        dens.append(d)
        errs.append(err)
        print_fn(f"  blocks.{a.index}.attn{'':<5} {d:8.3f} {err:8.4f}")
        if first_mask is None:
            kw = lc.attn_kwargs(heads, dev)
            kw.pop("pv_threshold", None)
            first_mask = sparge.predict(q, k, **kw)
    viz.plot_block_mask(first_mask, head=0, path=os.path.join(out_dir, "mask_layer0_head0.png"),
                        title="blocks.0.attn, head 0, calibrated (black = computed)")
    viz.plot_density(result, path=os.path.join(out_dir, "density.png"))
    viz.plot_tradeoff(result, path=os.path.join(out_dir, "tradeoff.png"))
    print_fn(f"  plots: {out_dir}/mask_layer0_head0.png, density.png, tradeoff.png")
    return {"seconds": seconds, "density": sum(dens) / len(dens), "max_error": max(errs)}
