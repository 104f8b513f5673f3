"""Shared test helpers: element masks, the FlashAttention-style tolerance rule."""
import warnings

import torch
import torch.nn.functional as F

import sparge
from sparge import reference


def element_mask(block_mask, Lq, Lk, bq, bk, causal=None, key_padding=None):
    """[B, H, Lq, Lk] bool: block mask expanded to elements, with causal and padding."""
    m = block_mask.repeat_interleave(bq, dim=2)[:, :, :Lq].repeat_interleave(bk, dim=3)[..., :Lk]
    m = m & reference.visible_keys(Lq, Lk, causal, block_mask.device)
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


TIE = 1e-5


def _boundary_is_tie(p_row, finite_row, n_allowed, topk, cdf):
    """True when the selection cut of one row sits on a near-tie of P̂, where
    fp32 rounding may legitimately pick either side."""
    vals = torch.sort(p_row[finite_row].double(), descending=True).values
    if vals.numel() < 2:
        return False
    if topk is not None:
        count = int(torch.ceil(torch.tensor(topk, dtype=torch.float32) * n_allowed).clamp(min=1))
        if count >= vals.numel():
            return False
        return (vals[count - 1] - vals[count]).abs().item() <= TIE * max(vals[count - 1].item(), 1e-30) + 1e-12
    excl = torch.cumsum(vals, 0) - vals
    return bool(((excl - cdf).abs() <= TIE).any()) or bool(((vals[:-1] - vals[1:]).abs() <= 1e-9).any())


def compare_predict(q, k, *, bq, bk, causal=None, topk=None, cdf=None, sim=-0.1, sink=False, what=""):
    kwargs = dict(topk=topk) if topk is not None else dict(cdf_threshold=cdf)
    mask = sparge.predict(q, k, is_causal=causal is not None, causal_alignment=causal or "top_left",
                          sim_threshold=sim, attention_sink=sink, block_size=(bq, bk),
                          enable_gqa=q.shape[1] != k.shape[1], **kwargs)
    ref = reference.predict(q, k, block_q=bq, block_k=bk, causal=causal, topk=topk, cdf_threshold=cdf,
                            sim_threshold=sim, attention_sink=sink)
    assert mask.shape == ref.shape and mask.dtype == torch.bool
    if torch.equal(mask, ref):
        return mask
    p, finite, _, _, allowed = reference.compressed_probs(q, k, block_q=bq, block_k=bk, causal=causal,
                                                          sim_threshold=sim)
    bad_rows = (mask != ref).any(-1).nonzero().tolist()
    n_allowed = allowed.sum(-1).float()
    for b, h, i in bad_rows:
        assert _boundary_is_tie(p[b, h, i], finite[b, h, i], n_allowed[i], topk, cdf), (
            f"{what}: mask row (b={b}, h={h}, i={i}) differs away from a tie: "
            f"C {mask[b, h, i].int().tolist()} vs reference {ref[b, h, i].int().tolist()}")
    warnings.warn(f"{what}: {len(bad_rows)} mask rows differ at near-ties of P̂ (reported, allowed)", stacklevel=2)
    return mask
