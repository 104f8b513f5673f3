"""The C CPU attention kernel against the fp32 reference and torch SDPA."""
import itertools

import pytest
import torch
import torch.nn.functional as F
from helpers import element_mask, fa_check, rel_l1, torch_masked_attention

import sparge
from sparge import reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _qkv(B, Hq, Hkv, Lq, Lk, D, Dv, dtype, layout="bhsd"):
    q = torch.randn(B, Hq, Lq, D)
    k = torch.randn(B, Hkv, Lk, D)
    v = torch.randn(B, Hkv, Lk, Dv)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    if layout == "bshd":
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    return q, k, v


def _random_mask(B, H, nq, nk, density=0.5, empty_row=True):
    m = torch.rand(B, H, nq, nk) < density
    if empty_row and nq > 1:
        m[:, :, 1] = False  # a q-block with nothing kept must give zeros
    return m


def _check_against_reference(q, k, v, mask, bq, bk, causal, kpad=None, what=""):
    out, lse, stats = sparge.block_sparse_attn(q, k, v, mask, block_size=(bq, bk), is_causal=causal is not None,
                                               causal_alignment=causal or "top_left", key_padding_mask=kpad,
                                               enable_gqa=True, return_lse=True, return_stats=True)
    ref, ref_lse, ref_stats = reference.block_sparse_attn(q, k, v, mask, block_q=bq, block_k=bk, causal=causal,
                                                          key_padding_mask=kpad)
    emask = element_mask(mask.expand(q.shape[0], q.shape[1], -1, -1), q.shape[2], k.shape[2], bq, bk, causal, kpad)
    base = torch_masked_attention(q, k, v, emask)
    assert out.dtype == q.dtype and out.shape == (q.shape[0], q.shape[1], q.shape[2], v.shape[3])
    fa_check(out, ref, base, q.dtype, what)
    seen = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), seen), f"{what}: lse -inf pattern differs"
    assert torch.allclose(lse[seen], ref_lse[seen], atol=1e-3 if q.dtype == torch.float32 else 2e-2, rtol=1e-4), what
    for i, name in enumerate(("blocks_allowed", "blocks_kept", "pv_units", "pv_skipped")):
        assert torch.equal(stats[name], ref_stats[..., i]), f"{what}: stats {name} differ"
    # rows that see no key are exactly zero
    assert (out[~emask.any(-1)] == 0).all(), f"{what}: rows with no visible key must be 0"


@pytest.mark.parametrize("Lq,Lk", [(1, 1), (1, 97), (97, 97), (97, 1000), (1000, 97), (1025, 1025)])
@pytest.mark.parametrize("causal", [None, "top_left", "bottom_right"])
def test_kernel_matches_reference_lengths(Lq, Lk, causal):
    q, k, v = _qkv(1, 2, 1, Lq, Lk, 64, 64, torch.float32)
    bq, bk = 128, 64
    mask = _random_mask(1, 2, -(-Lq // bq), -(-Lk // bk))
    _check_against_reference(q, k, v, mask, bq, bk, causal, what=f"Lq={Lq} Lk={Lk} causal={causal}")


@pytest.mark.parametrize("D,Dv", [(32, 32), (64, 64), (80, 80), (96, 96), (128, 128), (160, 160), (256, 256),
                                  (64, 128), (128, 40)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_head_dims_and_dtypes(D, Dv, dtype):
    q, k, v = _qkv(1, 2, 2, 200, 333, D, Dv, dtype)
    mask = _random_mask(1, 2, 2, 6)
    _check_against_reference(q, k, v, mask, 128, 64, None, what=f"D={D} Dv={Dv} {dtype}")


@pytest.mark.parametrize("bq,bk", [(16, 16), (32, 64), (64, 128), (128, 64), (7, 13)])
@pytest.mark.parametrize("causal", [None, "top_left", "bottom_right"])
def test_kernel_block_shapes(bq, bk, causal):
    q, k, v = _qkv(2, 4, 2, 150, 211, 32, 48, torch.float32)
    mask = _random_mask(2, 4, -(-150 // bq), -(-211 // bk), density=0.4)
    _check_against_reference(q, k, v, mask, bq, bk, causal, what=f"block ({bq},{bk}) causal={causal}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_key_padding(dtype):
    q, k, v = _qkv(3, 2, 2, 130, 257, 64, 64, dtype)
    kpad = torch.rand(3, 257) < 0.7
    kpad[1] = False  # a batch whose keys are all padded: all rows give 0
    mask = _random_mask(3, 2, 2, 5, density=0.7)
    _check_against_reference(q, k, v, mask, 128, 64, None, kpad, what=f"key padding {dtype}")


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_dense_mask_equals_sdpa(layout):
    q, k, v = _qkv(2, 4, 4, 300, 300, 64, 64, torch.float32)
    ones = torch.ones(2, 4, 3, 5, dtype=torch.bool)
    args = (q, k, v) if layout == "bhsd" else tuple(t.transpose(1, 2) for t in (q, k, v))
    out = sparge.block_sparse_attn(*args, ones, layout=layout)
    if layout == "bshd":
        out = out.transpose(1, 2)
    ref = F.scaled_dot_product_attention(q, k, v)
    assert (out - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("Lq,Lk", [(97, 97), (64, 1000), (1000, 97), (1025, 1025)])
def test_causal_all_ones_equals_sdpa_causal(Lq, Lk):
    q, k, v = _qkv(1, 2, 2, Lq, Lk, 64, 64, torch.float32)
    ones = torch.ones(1, 2, -(-Lq // 128), -(-Lk // 64), dtype=torch.bool)
    out = sparge.block_sparse_attn(q, k, v, ones, is_causal=True)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert (out - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("ratio", [1, 4, 8])
def test_gqa_equals_repeated_kv(ratio):
    Hkv = 2
    q, k, v = _qkv(1, Hkv * ratio, Hkv, 257, 300, 64, 64, torch.float32)
    mask = _random_mask(1, Hkv * ratio, 3, 5)
    out = sparge.block_sparse_attn(q, k, v, mask, enable_gqa=ratio > 1)
    rep = sparge.block_sparse_attn(q, k.repeat_interleave(ratio, 1), v.repeat_interleave(ratio, 1), mask)
    assert torch.equal(out, rep)


def test_bshd_equals_bhsd_and_keeps_layout():
    q, k, v = _qkv(2, 4, 4, 200, 200, 64, 64, torch.bfloat16)
    mask = _random_mask(2, 4, 2, 4)
    out = sparge.block_sparse_attn(q, k, v, mask)
    qs, ks, vs = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    out_s = sparge.block_sparse_attn(qs, ks, vs, mask, layout="bshd")
    assert out_s.shape == (2, 200, 4, 64) and out_s.is_contiguous()
    assert torch.equal(out_s.transpose(1, 2), out)


def test_empty_mask_gives_zero_and_neg_inf_lse():
    q, k, v = _qkv(1, 2, 2, 100, 100, 32, 32, torch.float32)
    mask = torch.zeros(1, 2, 1, 2, dtype=torch.bool)
    out, lse = sparge.block_sparse_attn(q, k, v, mask, return_lse=True)
    assert (out == 0).all() and torch.isneginf(lse).all()


def test_lse_merges_key_shards():
    """Attention over two halves of the keys, merged with LSE, equals attention over all."""
    q, k, v = _qkv(1, 2, 2, 300, 512, 64, 64, torch.float32)
    ones = lambda Lk: torch.ones(1, 2, 3, -(-Lk // 64), dtype=torch.bool)  # noqa: E731
    o1, l1 = sparge.block_sparse_attn(q, k[:, :, :256], v[:, :, :256], ones(256), return_lse=True)
    o2, l2 = sparge.block_sparse_attn(q, k[:, :, 256:], v[:, :, 256:], ones(256), return_lse=True)
    lse = torch.logaddexp(l1, l2)
    merged = o1 * (l1 - lse).exp()[..., None] + o2 * (l2 - lse).exp()[..., None]
    ref = F.scaled_dot_product_attention(q, k, v)
    assert (merged - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("lam", [0.0, 2.0, 6.0, float("inf")])
@pytest.mark.parametrize("causal", [None, "top_left"])
def test_pv_skip_matches_reference(lam, causal):
    # peaked attention (large scale) so that some blocks fall under the threshold
    q, k, v = _qkv(1, 2, 2, 300, 400, 64, 64, torch.float32)
    q = q * 3
    mask = torch.ones(1, 2, 3, 7, dtype=torch.bool)
    out, st = sparge.block_sparse_attn(q, k, v, mask, pv_threshold=lam, is_causal=causal is not None,
                                       return_stats=True)
    ref, _, ref_st = reference.block_sparse_attn(q, k, v, mask, block_q=128, block_k=64, causal=causal,
                                                 pv_threshold=lam)
    assert torch.equal(st["pv_units"], ref_st[..., 2])
    skipped, ref_skipped = st["pv_skipped"].sum().item(), ref_st[..., 3].sum().item()
    # decisions exactly at the threshold may flip with summation order
    assert abs(skipped - ref_skipped) <= max(2, 0.02 * ref_skipped), (skipped, ref_skipped)
    if lam == float("inf") and causal is None:
        assert skipped == 0  # with causal, groups that see no key of a block skip it at no cost
    if lam == 0.0:
        assert skipped > 0
    if skipped == ref_skipped:
        assert (out - ref).abs().max().item() < 1e-4
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=causal is not None)
    if lam == 6.0:  # dropped probabilities are below 2^-6 of the row max: a small error
        assert rel_l1(out, dense) < 0.05


def test_per_head_pv_threshold():
    q, k, v = _qkv(1, 2, 2, 256, 512, 64, 64, torch.float32)
    q = q * 3
    mask = torch.ones(1, 2, 2, 8, dtype=torch.bool)
    _, st = sparge.block_sparse_attn(q, k, v, mask, pv_threshold=torch.tensor([0.0, float("inf")]),
                                     return_stats=True)
    assert st["pv_skipped"][0, 0] > 0 and st["pv_skipped"][0, 1] == 0


def test_large_random_sweep():
    """Fresh random shapes, masks and options, all against the reference."""
    g = torch.Generator().manual_seed(7)
    for trial in range(12):
        r = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))  # noqa: E731
        Hkv = r(1, 2)
        Hq = Hkv * r(1, 3)
        Lq, Lk = r(1, 400), r(1, 400)
        D = 8 * r(1, 20)
        bq, bk = r(1, 130), r(1, 130)
        causal = [None, "top_left", "bottom_right"][r(0, 2)]
        dtype = DTYPES[r(0, 2)]
        q, k, v = _qkv(r(1, 2), Hq, Hkv, Lq, Lk, D, D, dtype, layout=["bhsd", "bshd"][r(0, 1)])
        mask = _random_mask(q.shape[0], Hq, -(-Lq // bq), -(-Lk // bk), density=0.6, empty_row=False)
        _check_against_reference(q, k, v, mask, bq, bk, causal,
                                 what=f"trial {trial}: Hq={Hq} Hkv={Hkv} Lq={Lq} Lk={Lk} D={D} b=({bq},{bk}) "
                                      f"{causal} {dtype}")


def test_fp32_output_for_fp32_input():
    q, k, v = _qkv(1, 1, 1, 64, 64, 32, 32, torch.float32)
    out = sparge.attn(q, k, v)
    assert out.dtype == torch.float32


@pytest.mark.parametrize("dtype", DTYPES)
def test_attn_topk_one_equals_sdpa(dtype):
    for causal, (Lq, Lk) in itertools.product([False, True], [(97, 97), (1000, 1025), (1, 1)]):
        q, k, v = _qkv(1, 4, 4, Lq, Lk, 64, 64, dtype)
        out = sparge.attn(q, k, v, is_causal=causal, topk=1.0)
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal)
        base = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        fa_check(out, ref, base, dtype, f"topk=1 causal={causal} L=({Lq},{Lk}) {dtype}")
