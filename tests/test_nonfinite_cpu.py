"""Non-finite inputs and the PV-skip rule on the CPU (SPEC §2, "Non-finite
inputs" and "PV skip"): the C kernel and the reference against torch SDPA's
math path over the keys each row sees."""
import pytest
import torch
import torch.nn.functional as F
from helpers import element_mask
from torch.nn.attention import SDPBackend, sdpa_kernel

import sparge
from sparge import reference

NAN, INF = float("nan"), float("inf")
B, H, L, D = 1, 2, 70, 16
BQ = BK = 16
NB = -(-L // BQ)
ROW, KEY = 37, 45  # the poisoned query row / key; causal rows < KEY do not see KEY


def _sdpa_visible(q, k, v, emask, scale=None):
    """torch SDPA (math path, fp32) of each row over the keys it sees alone; 0 where none."""
    out = torch.zeros(q.shape[:3] + (v.shape[-1],))
    with sdpa_kernel(SDPBackend.MATH):
        for b in range(q.shape[0]):
            for h in range(q.shape[1]):
                for i in range(q.shape[2]):
                    keys = emask[b, h, i].nonzero()[:, 0]
                    if len(keys):
                        out[b, h, i] = F.scaled_dot_product_attention(
                            q[b, h, i:i + 1].float(), k[b, h, keys].float(), v[b, h, keys].float(), scale=scale)[0]
    return out


def _same(a, b, atol=1e-5):
    """Same NaN / +inf / -inf pattern and close finite values."""
    a, b = a.float(), b.float()
    for f in (torch.isnan, torch.isposinf, torch.isneginf):
        if not torch.equal(f(a), f(b)):
            return False
    fin = torch.isfinite(a)
    return torch.allclose(a[fin], b[fin], atol=atol, rtol=1e-5)


def _inputs(tensor, value):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, H, L, D, generator=g) for _ in range(3))
    if tensor == "q":
        q[0, 0, ROW, 3] = value
    elif tensor == "k":
        k[0, :, KEY, 3] = value
    else:
        v[0, :, KEY, 5] = value
    return q, k, v


SETTINGS = ["dense", "top_left", "bottom_right", "key_padding", "sparse"]


def _setting(name):
    """(block mask, causal, key padding) of a test setting."""
    mask = torch.ones(B, H, NB, NB, dtype=torch.bool)
    causal, kpad = None, None
    if name in ("top_left", "bottom_right"):
        causal = name
    elif name == "key_padding":
        kpad = torch.rand(B, L, generator=torch.Generator().manual_seed(5)) < 0.8
        kpad[:, KEY] = False  # the poisoned key is padded: no row may see it
        kpad[:, 0] = True
    elif name == "sparse":
        mask = torch.rand(B, H, NB, NB, generator=torch.Generator().manual_seed(6)) < 0.6
        mask[0, 0, ROW // BQ, KEY // BK] = True   # head 0: the q-block of ROW computes KEY's block
        mask[0, 1, :, KEY // BK] = False          # head 1: no q-block computes it
    return mask, causal, kpad


def _run(q, k, v, mask, causal, kpad, pv=None):
    out, lse, st = sparge.block_sparse_attn(q, k, v, mask, block_size=(BQ, BK), is_causal=causal is not None,
                                            causal_alignment=causal or "top_left", key_padding_mask=kpad,
                                            pv_threshold=pv, return_lse=True, return_stats=True)
    ref, ref_lse, ref_st = reference.block_sparse_attn(q, k, v, mask, block_q=BQ, block_k=BK, causal=causal,
                                                       key_padding_mask=kpad, pv_threshold=pv)
    return out, lse, st, ref, ref_lse, ref_st


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("value", [NAN, INF, -INF])
@pytest.mark.parametrize("tensor", ["q", "k", "v"])
def test_nonfinite_matches_sdpa_over_visible_keys(tensor, value, setting):
    q, k, v = _inputs(tensor, value)
    mask, causal, kpad = _setting(setting)
    out, lse, st, ref, ref_lse, ref_st = _run(q, k, v, mask, causal, kpad)
    emask = element_mask(mask, L, L, BQ, BK, causal, kpad)
    oracle = _sdpa_visible(q, k, v, emask)
    what = f"{tensor}={value} {setting}"
    if setting == "dense":
        assert not torch.isfinite(oracle).all(), what  # the value reaches some row
    assert _same(out, oracle), what
    assert _same(ref, oracle), what
    assert _same(lse, ref_lse, atol=1e-4), what
    for i, name in enumerate(("blocks_allowed", "blocks_kept", "pv_units", "pv_skipped")):
        assert torch.equal(st[name], ref_st[..., i]), (what, name)
    if setting == "dense":  # nothing hidden: exactly SDPA's math path on the whole input
        with sdpa_kernel(SDPBackend.MATH):
            assert _same(out, F.scaled_dot_product_attention(q, k, v)), what
    if tensor != "q":
        # a key a row does not see never reaches it
        hidden = ~emask[..., KEY]
        assert torch.isfinite(out[hidden]).all(), what
        assert torch.isfinite(lse[hidden & emask.any(-1)]).all(), what


@pytest.mark.parametrize("setting", ["dense", "top_left", "sparse"])
def test_nan_rows_and_lse(setting):
    """NaN in a query row: that row is NaN (out and LSE), the others are untouched;
    NaN in a seen key: every row that sees it is NaN, LSE NaN too."""
    mask, causal, kpad = _setting(setting)
    emask = element_mask(mask, L, L, BQ, BK, causal, kpad)
    clean = _run(*_inputs("q", 0.0), mask, causal, kpad)
    q, k, v = _inputs("q", NAN)
    out, lse, _, ref, ref_lse, _ = _run(q, k, v, mask, causal, kpad)
    sees = emask.any(-1)
    assert sees[0, 0, ROW] and out[0, 0, ROW].isnan().all() and lse[0, 0, ROW].isnan()
    others = torch.ones_like(sees)
    others[0, 0, ROW] = False
    assert torch.equal(out[others], clean[0][others]) and torch.equal(lse[others], clean[1][others])
    q, k, v = _inputs("k", NAN)
    out, lse, *_ = _run(q, k, v, mask, causal, kpad)
    seen = emask[..., KEY]
    assert out[seen].isnan().all() and lse[seen].isnan().all()
    assert torch.isfinite(out[~seen]).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_nonfinite_16bit_matches_reference(dtype):
    for tensor in ("q", "k", "v"):
        q, k, v = (t.to(dtype) for t in _inputs(tensor, NAN))
        mask, causal, kpad = _setting("top_left")
        out, lse, _, ref, ref_lse, _ = _run(q, k, v, mask, causal, kpad)
        assert _same(out, ref, atol=2e-2), tensor
        assert _same(lse, ref_lse, atol=2e-2), tensor


@pytest.mark.parametrize("tensor", ["q", "k"])
def test_attn_prediction_keeps_nonfinite_blocks(tensor):
    """Through prediction (topk 0.3): the blocks holding the NaN/Inf are kept, so
    the output has SDPA's NaN pattern."""
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(1, 2, 512, 32, generator=g) for _ in range(3))
    (q if tensor == "q" else k)[0, 0, 300, 7] = NAN
    out = sparge.attn(q, k, v, topk=0.3)
    with sdpa_kernel(SDPBackend.MATH):
        dense = F.scaled_dot_product_attention(q, k, v)
    assert dense.isnan().any()
    assert torch.equal(out.isnan(), dense.isnan())


@pytest.mark.parametrize("lam", [0.0, 1e-6])
def test_pv_skip_keeps_the_block_that_raises_the_max(lam):
    """Issue 13's reproducer: the second block holds the row max (scores 0 then
    120, 120 * log2(e) has an ulp of 1.5e-5): skipping it gave 0."""
    q = torch.ones(1, 1, 1, 1)
    k = torch.zeros(1, 1, 128, 1)
    k[..., 64:, :] = 120
    v = torch.ones(1, 1, 128, 1)
    mask = torch.ones(1, 1, 1, 2, dtype=torch.bool)
    out, st = sparge.block_sparse_attn(q, k, v, mask, scale=1.0, pv_threshold=lam, return_stats=True)
    ref, _, ref_st = reference.block_sparse_attn(q, k, v, mask, block_q=128, block_k=64, scale=1.0,
                                                 pv_threshold=lam)
    assert out.item() == 1.0 and ref.item() == 1.0
    assert st["pv_skipped"].item() == 0 and ref_st[..., 3].item() == 0


@pytest.mark.parametrize("causal", [None, "top_left"])
def test_pv_skip_zero_never_skips_rising_blocks(causal):
    """Every k-block raises every row's max: lambda = 0 skips nothing and equals SDPA."""
    g = torch.Generator().manual_seed(11)
    q = torch.rand(1, 2, 200, 8, generator=g) + 0.5  # positive: q . k grows with k
    k = torch.rand(1, 2, 256, 8, generator=g) * 0.1 + (torch.arange(256) // 64).float()[:, None] * 3
    v = torch.randn(1, 2, 256, 8, generator=g)
    mask = torch.ones(1, 2, 2, 4, dtype=torch.bool)
    out, st = sparge.block_sparse_attn(q, k, v, mask, pv_threshold=0.0, is_causal=causal is not None,
                                       return_stats=True)
    ref, _, ref_st = reference.block_sparse_attn(q, k, v, mask, block_q=128, block_k=64, causal=causal,
                                                 pv_threshold=0.0)
    assert torch.equal(st["pv_skipped"], ref_st[..., 3])
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=causal is not None)
    if causal is None:
        assert st["pv_skipped"].sum() == 0
    assert (out - dense).abs().max() < 1e-5 and (ref - dense).abs().max() < 1e-5


def test_pv_skip_never_skips_a_block_with_a_nan_score():
    """Block 1's finite scores are far below block 0's (it would be skipped at
    lambda = 4), but one of its keys is NaN: the rows that see it stay NaN."""
    q = torch.ones(1, 1, 16, 1)
    k = torch.zeros(1, 1, 128, 1)
    k[..., :64, :] = 10
    k[0, 0, 70, 0] = NAN
    v = torch.randn(1, 1, 128, 1)
    mask = torch.ones(1, 1, 1, 2, dtype=torch.bool)
    out, st = sparge.block_sparse_attn(q, k, v, mask, scale=1.0, pv_threshold=4.0, return_stats=True)
    ref, _, ref_st = reference.block_sparse_attn(q, k, v, mask, block_q=128, block_k=64, scale=1.0,
                                                 pv_threshold=4.0)
    assert out.isnan().all() and ref.isnan().all()
    assert st["pv_skipped"].item() == 0 and ref_st[..., 3].item() == 0
    k[0, 0, 70, 0] = 0.0  # the same block without the NaN is skipped
    out, st = sparge.block_sparse_attn(q, k, v, mask, scale=1.0, pv_threshold=4.0, return_stats=True)
    assert st["pv_skipped"].item() == 1 and torch.isfinite(out).all()
