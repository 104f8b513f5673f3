"""Shared test helpers: element masks, the FlashAttention-style tolerance rule."""
import torch
import torch.nn.functional as F

from sparge import reference


def element_mask(block_mask, Lq, Lk, bq, bk, causal=None, key_padding=None):
    """[B, H, Lq, Lk] bool: block mask expanded to elements, with causal and padding."""
    m = block_mask.repeat_interleave(bq, dim=2)[:, :, :Lq].repeat_interleave(bk, dim=3)[..., :Lk]
    e = reference.last_visible_key(Lq, Lk, causal, block_mask.device)
    m = m & (torch.arange(Lk, device=m.device)[None, :] <= e[:, None])
    if key_padding is not None:
        m = m & key_padding[:, None, None, :]
    return m


def torch_masked_attention(q, k, v, mask, scale=None):
    """torch's own attention in q's dtype with an element mask (bhsd, GQA by repeat);
    rows with no visible key give 0 (SDPA gives NaN there)."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return torch.where(mask.any(-1, keepdim=True), out, torch.zeros_like(out))


FLOORS = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def fa_check(out, ref, baseline, dtype, what=""):
    """FlashAttention's rule: max|out - ref| <= 2 * max|baseline - ref| + floor.

    ref is the fp32 oracle, baseline torch's own attention in ``dtype``. The
    message says how much of the tolerance was used; returns that fraction."""
    out, ref, baseline = out.float(), ref.float(), baseline.float()
    assert torch.isfinite(out).all(), f"{what}: non-finite output"
    err = (out - ref).abs().max().item()
    base = (baseline - ref).abs().max().item()
    tol = 2 * base + FLOORS[dtype]
    assert err <= tol, (f"{what}: max error {err:.3g} > tolerance {tol:.3g} "
                        f"({100 * err / tol:.0f}% used; torch {dtype} error {base:.3g})")
    return err / tol


def rel_l1(a, b):
    return ((a.float() - b.float()).abs().sum() / b.float().abs().sum().clamp(min=1e-30)).item()
