"""fp32 reference of SPEC §1–2: the oracle for tests, benchmarks and calibration.

Plain PyTorch, written for reading rather than speed. Every function takes
``[B, H, L, D]`` tensors, computes in float32 and follows the points that
``csrc/include/sparge.h`` fixes beyond the SPEC (tie order, CDF rounding,
causal-allowed blocks, PV-skip groups).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = ["compressed_probs", "predict", "block_sparse_attn", "attn", "allowed_blocks", "last_visible_key", "visible_keys", "block_similarity"]

SIM_EPS = 1e-6
LOG2E = math.log2(math.e)


def _per_head(x, H: int, device) -> torch.Tensor:
    """A float or [H]/scalar tensor as a float32 [H] tensor."""
    t = torch.as_tensor(x, dtype=torch.float32, device=device)
    return t.expand(H).clone() if t.dim() == 0 else t.reshape(H)


def last_visible_key(Lq: int, Lk: int, causal: Optional[str], device=None) -> torch.Tensor:
    """[Lq] int64: the last key index each query row sees (−1 or less: none)."""
    r = torch.arange(Lq, device=device)
    if causal is None:
        return torch.full((Lq,), Lk - 1, dtype=torch.long, device=device)
    offset = 0 if causal == "top_left" else Lk - Lq
    return (r + offset).clamp(max=Lk - 1)


def visible_keys(Lq: int, Lk: int, causal: Optional[str], device=None) -> torch.Tensor:
    """[Lq, Lk] bool: True where query i sees key j under the causal alignment."""
    e = last_visible_key(Lq, Lk, causal, device)
    return torch.arange(Lk, device=device)[None, :] <= e[:, None]


def allowed_blocks(Lq: int, Lk: int, bq: int, bk: int, causal: Optional[str], device=None) -> torch.Tensor:
    """[nq, nk] bool: some valid row of q-block i sees some key of k-block j."""
    nq, nk = -(-Lq // bq), -(-Lk // bk)
    e = last_visible_key(Lq, Lk, causal, device)
    e = torch.nn.functional.pad(e, (0, nq * bq - Lq), value=-1).view(nq, bq)
    max_e = e.max(dim=1).values  # [nq]
    j0 = torch.arange(nk, device=device) * bk
    return (j0[None, :] <= max_e[:, None]) & (max_e[:, None] >= 0)


def _diagonal_blocks(Lq: int, Lk: int, bq: int, bk: int, causal: str, device) -> torch.Tensor:
    """[nq, nk] bool: k-blocks holding the last visible key of some row of q-block i."""
    nq, nk = -(-Lq // bq), -(-Lk // bk)
    e = last_visible_key(Lq, Lk, causal, device)
    e = torch.nn.functional.pad(e, (0, nq * bq - Lq), value=-1).view(nq, bq)
    sees = e >= 0
    big = torch.iinfo(torch.long).max
    lo = torch.where(sees, e, big).min(dim=1).values // bk
    hi = torch.where(sees, e, -1).max(dim=1).values // bk
    j = torch.arange(nk, device=device)
    return (j[None, :] >= lo[:, None]) & (j[None, :] <= hi[:, None]) & sees.any(dim=1)[:, None]


def _blocks(x: torch.Tensor, block: int):
    """[B, H, L, D] -> ([B, H, n, block, D] zero-padded, [n, block] valid rows)."""
    B, H, L, D = x.shape
    n = -(-L // block)
    xp = torch.nn.functional.pad(x, (0, 0, 0, n * block - L)).view(B, H, n, block, D)
    valid = (torch.arange(n * block, device=x.device) < L).view(n, block)
    return xp, valid


def _pool(x: torch.Tensor, block: int) -> torch.Tensor:
    """Mean of the valid rows of each block: [B, H, n, D]."""
    xb, valid = _blocks(x, block)
    return xb.sum(dim=3) / valid.sum(dim=1).to(x.dtype)[:, None]


def block_similarity(x: torch.Tensor, block: int) -> torch.Tensor:
    """Mean pairwise cosine of each block's valid rows, ‖Σ x̂‖² / n²: [B, H, n]."""
    xb, valid = _blocks(x, block)
    xhat = xb / xb.norm(dim=-1, keepdim=True).clamp(min=SIM_EPS)  # padded rows stay 0
    n = valid.sum(dim=1).to(x.dtype)
    return xhat.sum(dim=3).pow(2).sum(dim=-1) / (n * n)


def _sequential_exclusive_cumsum(x: torch.Tensor) -> torch.Tensor:
    """Sum of the entries before each position, accumulated in fp32 in order."""
    out = torch.empty_like(x)
    c = torch.zeros_like(x[..., 0])
    for t in range(x.shape[-1]):
        out[..., t] = c
        c = c + x[..., t]
    return out


def compressed_probs(q, k, *, block_q: int, block_k: int, scale: Optional[float] = None,
                     causal: Optional[str] = None, sim_threshold=-0.1):
    """Steps 1-4 of Stage 1: (P̂ [B, Hq, nq, nk], finite entries, q_fix [B, Hq, nq],
    k_fix [B, Hq, nk], allowed [nq, nk])."""
    q, k = q.float(), k.float()
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    dev = q.device

    # 1. smooth K (softmax is invariant to subtracting a per-channel mean)
    ks = k - k.mean(dim=2, keepdim=True)
    # 2-3. pool and measure self-similarity (q-blocks on Q, k-blocks on K')
    rep = Hq // Hkv
    qbar, kbar = _pool(q, block_q), _pool(ks, block_k).repeat_interleave(rep, dim=1)
    qsim, ksim = block_similarity(q, block_q), block_similarity(ks, block_k).repeat_interleave(rep, dim=1)
    theta = _per_head(sim_threshold, Hq, dev)[None, :, None]
    q_fix, k_fix = ~(qsim > theta), ~(ksim > theta)  # [B, Hq, nq], [B, Hq, nk]

    # 4. compressed scores over the selective, causally allowed blocks
    allowed = allowed_blocks(Lq, Lk, block_q, block_k, causal, dev)  # [nq, nk]
    s = scale * qbar @ kbar.transpose(-1, -2)
    s = s.masked_fill(k_fix[:, :, None, :] | ~allowed, float("-inf"))
    finite = torch.isfinite(s)
    p = torch.where(finite.any(-1, keepdim=True), torch.softmax(s, dim=-1), torch.zeros_like(s))
    p = torch.where(finite, p, torch.zeros_like(p))
    return p, finite, q_fix, k_fix, allowed


def predict(q, k, *, block_q: int, block_k: int, scale: Optional[float] = None, causal: Optional[str] = None,
            topk=None, cdf_threshold=None, sim_threshold=-0.1, attention_sink: bool = False) -> torch.Tensor:
    """Stage 1: the block mask [B, Hq, nq, nk] (bool). ``causal`` is None,
    "top_left" or "bottom_right"; exactly one of ``topk``/``cdf_threshold``."""
    if (topk is None) == (cdf_threshold is None):
        raise ValueError("give exactly one of topk and cdf_threshold")
    Hq, Lq, Lk, dev = q.shape[1], q.shape[2], k.shape[2], q.device
    p, finite, q_fix, k_fix, allowed = compressed_probs(q, k, block_q=block_q, block_k=block_k, scale=scale,
                                                        causal=causal, sim_threshold=sim_threshold)

    # 5. select among finite entries, P descending, ties by lower index
    order_key = torch.where(finite, p, torch.full_like(p, -1.0))
    sorted_key, idx = torch.sort(order_key, dim=-1, descending=True, stable=True)
    candidate = sorted_key >= 0
    if topk is not None:
        rho = _per_head(topk, Hq, dev)[None, :, None]
        n_allowed = allowed.sum(-1).float()[None, None, :]  # [1, 1, nq]
        count = torch.ceil(rho * n_allowed).clamp(min=1)
        keep_sorted = torch.arange(p.shape[-1], device=dev) < count[..., None]
    else:
        tau = _per_head(cdf_threshold, Hq, dev)[None, :, None, None]
        keep_sorted = _sequential_exclusive_cumsum(sorted_key.clamp(min=0)) < tau
    keep = torch.zeros_like(finite).scatter(-1, idx, keep_sorted & candidate)

    # 6. force fix columns, fix rows, diagonal blocks, sink — where allowed
    keep |= k_fix[:, :, None, :] | q_fix[..., None]
    if causal is not None:
        keep |= _diagonal_blocks(Lq, Lk, block_q, block_k, causal, dev)
    if attention_sink:
        keep[..., 0] = True
    return keep & allowed


def _pv(p, v, visible):
    """p @ v where a non-finite value of v reaches only the rows that see its key
    (a hidden key has p = 0, and 0 * inf or 0 * NaN would be NaN)."""
    bad = ~torch.isfinite(v)
    if not bad.any():
        return p @ v
    out = p @ v.masked_fill(bad, 0.0)
    extra = p[..., None] * torch.where(bad, v, torch.zeros_like(v))[:, :, None]  # [B, H, Lq, bk, Dv]
    keep = visible[..., None] & bad[:, :, None]
    return out + torch.where(keep, extra, torch.zeros_like(extra)).sum(-2)


def block_sparse_attn(q, k, v, block_mask, *, block_q: int, block_k: int, scale: Optional[float] = None,
                      causal: Optional[str] = None, key_padding_mask=None, pv_threshold=None, pv_group: int = 16):
    """Stage 2 in fp32: returns (out [B, Hq, Lq, Dv], lse [B, Hq, Lq], stats [B, Hq, 4] int64).

    Walks the k-blocks in ascending order with an online softmax in the log2
    domain, exactly as the kernels do, so the PV-skip decisions match."""
    q, k, v = q.float(), k.float(), v.float()
    B, Hq, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    scale = D ** -0.5 if scale is None else scale
    dev = q.device
    rep = Hq // Hkv
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    nq, nk = -(-Lq // block_q), -(-Lk // block_k)
    block_mask = block_mask.expand(B, Hq, nq, nk).bool()

    allowed = allowed_blocks(Lq, Lk, block_q, block_k, causal, dev)
    computed = block_mask & allowed  # [B, Hq, nq, nk]
    e = last_visible_key(Lq, Lk, causal, dev)  # [Lq]
    qblock = torch.arange(Lq, device=dev) // block_q
    lam = None if pv_threshold is None else _per_head(pv_threshold, Hq, dev)[None, :, None]
    groups_per_block = -(-block_q // pv_group)
    # rows of the padded q-block grid that exist (for the "all rows of a group" test)
    row_valid = torch.nn.functional.pad(torch.ones(Lq, dtype=torch.bool, device=dev), (0, nq * block_q - Lq))
    group_exists = torch.nn.functional.pad(row_valid.view(nq, block_q), (0, groups_per_block * pv_group - block_q))
    group_exists = group_exists.view(nq, groups_per_block, pv_group).any(-1)  # [nq, G]

    qs = q * (scale * LOG2E)
    m = torch.full((B, Hq, Lq), float("-inf"), device=dev)
    l = torch.zeros(B, Hq, Lq, device=dev)
    acc = torch.zeros(B, Hq, Lq, Dv, device=dev)
    started = torch.zeros(B, Hq, nq, dtype=torch.bool, device=dev)
    pv_units = torch.zeros(B, Hq, dtype=torch.long, device=dev)
    pv_skipped = torch.zeros(B, Hq, dtype=torch.long, device=dev)

    for j in range(nk):
        c0, c1 = j * block_k, min((j + 1) * block_k, Lk)
        s = qs @ k[:, :, c0:c1].transpose(-1, -2)  # [B, Hq, Lq, bk]
        cols = torch.arange(c0, c1, device=dev)
        visible = (cols[None, :] <= e[:, None])[None, None]  # [1, 1, Lq, bk]
        if key_padding_mask is not None:
            visible = visible & key_padding_mask[:, None, None, c0:c1].bool()
        block_on = computed[:, :, :, j]  # [B, Hq, nq]
        row_on = block_on[:, :, qblock]  # [B, Hq, Lq]
        s = s.masked_fill(~visible, float("-inf"))
        # the running max is taken over the non-NaN scores (a NaN score still
        # makes its row NaN: exp2(NaN - m) enters the sums and P.V)
        nan = torch.isnan(s)
        rowmax = s.masked_fill(nan, float("-inf")).max(dim=-1).values
        m_new = torch.where(row_on, torch.maximum(m, rowmax), m)

        skip_row = torch.zeros_like(row_on)
        first = block_on & ~started
        if lam is not None:
            # compared with the running max *before* the block, so a block that
            # raises it is never skipped; a row with a NaN score never agrees
            agree = ((rowmax <= m - lam) & ~nan.any(-1)) | ~row_on
            agree = torch.nn.functional.pad(agree, (0, nq * block_q - Lq), value=True).view(B, Hq, nq, block_q)
            agree = torch.nn.functional.pad(agree, (0, groups_per_block * pv_group - block_q), value=True)
            skip_group = agree.view(B, Hq, nq, groups_per_block, pv_group).all(-1)
            skip_group &= (block_on & ~first)[..., None] & group_exists
            pv_skipped += skip_group.sum(dim=(2, 3))
            skip_row = skip_group.repeat_interleave(pv_group, dim=-1)[..., :block_q].reshape(B, Hq, -1)[..., :Lq]
        pv_units += (block_on.long() * group_exists.sum(-1)).sum(-1)
        started |= block_on

        # rescale by exp2(m_old - m_new); 1 while the row has seen nothing
        alpha = torch.where(m_new == float("-inf"), torch.ones_like(m), torch.exp2(m - m_new))
        alpha = torch.where(row_on, alpha, torch.ones_like(alpha))
        safe_m = torch.where(m_new == float("-inf"), torch.zeros_like(m_new), m_new)
        p = torch.exp2(s - safe_m[..., None])  # masked entries: exp2(-inf) = 0
        use = (row_on & ~skip_row)[..., None]
        p = torch.where(use, p, torch.zeros_like(p))
        l = l * alpha + p.sum(-1)
        acc = acc * alpha[..., None] + _pv(p, v[:, :, c0:c1], use & visible)
        m = m_new

    # l == 0: the row saw no key (out 0, lse -inf); NaN stays NaN
    seen = l != 0
    out = torch.where(seen[..., None], acc / torch.where(seen, l, torch.ones_like(l))[..., None], torch.zeros_like(acc))
    lse = torch.where(seen, (m + torch.log2(torch.where(seen, l, torch.ones_like(l)))) / LOG2E,
                      torch.full_like(l, float("-inf")))
    n_allowed = allowed.sum().expand(B, Hq)
    stats = torch.stack([n_allowed, computed.sum(dim=(2, 3)), pv_units, pv_skipped], dim=-1)
    return out, lse, stats


def attn(q, k, v, *, block_q: int, block_k: int, scale=None, causal=None, topk=None, cdf_threshold=None,
         sim_threshold=-0.1, pv_threshold=None, attention_sink=False, key_padding_mask=None, pv_group: int = 16):
    """Stage 1 then Stage 2: (out, lse, stats, block_mask)."""
    mask = predict(q, k, block_q=block_q, block_k=block_k, scale=scale, causal=causal, topk=topk,
                   cdf_threshold=cdf_threshold, sim_threshold=sim_threshold, attention_sink=attention_sink)
    out, lse, stats = block_sparse_attn(q, k, v, mask, block_q=block_q, block_k=block_k, scale=scale, causal=causal,
                                        key_padding_mask=key_padding_mask, pv_threshold=pv_threshold,
                                        pv_group=pv_group)
    return out, lse, stats, mask
