"""The C CPU prediction against the fp32 reference."""
import pytest
import torch
from helpers import compare_predict as _compare

import sparge
from sparge import reference
from sparge.demo import make_video_qkv


@pytest.mark.parametrize("Lq,Lk", [(1, 1), (1, 1000), (97, 97), (1000, 97), (1025, 1025), (1000, 1025)])
@pytest.mark.parametrize("causal", [None, "top_left", "bottom_right"])
@pytest.mark.parametrize("mode", ["topk", "cdf"])
def test_predict_matches_reference(Lq, Lk, causal, mode):
    q = torch.randn(2, 4, Lq, 64)
    k = torch.randn(2, 2, Lk, 64)
    sel = dict(topk=0.3) if mode == "topk" else dict(cdf=0.8)
    _compare(q, k, bq=64, bk=32, causal=causal, what=f"Lq={Lq} Lk={Lk} {causal} {mode}", **sel)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("ratio", [1, 4, 8])
def test_predict_dtypes_gqa_structured(dtype, ratio):
    q, k, _ = make_video_qkv(T=4, Hs=12, Ws=12, heads=8, head_dim=64, dtype=dtype)
    k = k[:, :: ratio].contiguous()
    for sim in (-0.1, 0.3, 0.6):  # from "all selective" to "many fix blocks"
        _compare(q, k, bq=64, bk=32, cdf=0.9, sim=sim, what=f"video {dtype} gqa={ratio} sim={sim}")
        _compare(q, k, bq=128, bk=64, topk=0.25, sim=sim, causal="top_left", sink=True,
                 what=f"video causal {dtype} gqa={ratio} sim={sim}")


def test_predict_bshd_strides_and_per_head_params():
    q = torch.randn(1, 300, 4, 32)  # bshd buffers, passed without copies
    k = torch.randn(1, 280, 4, 32)
    sim = torch.tensor([-0.1, 0.05, 0.2, 0.9])
    rho = torch.tensor([0.1, 0.5, 1.0, 0.3])
    mask = sparge.predict(q, k, layout="bshd", topk=rho, sim_threshold=sim, block_size=(32, 32))
    ref = reference.predict(q.transpose(1, 2), k.transpose(1, 2), block_q=32, block_k=32, topk=rho, sim_threshold=sim)
    assert torch.equal(mask, ref)


def test_predict_zero_rows_no_nan_and_forcing():
    q = torch.zeros(1, 2, 200, 64)  # zero rows: similarity 0, never NaN
    k = torch.randn(1, 2, 200, 64)
    k[:, :, 64:128] = 0
    mask = sparge.predict(q, k, topk=0.2, sim_threshold=0.5, block_size=(64, 64))
    ref = reference.predict(q, k, block_q=64, block_k=64, topk=0.2, sim_threshold=0.5)
    assert torch.equal(mask, ref)
    # q is all zero -> every q-block is fix -> every row fully kept
    assert mask.all()


def test_predict_rules():
    """Self-similar data with top-k: every row keeps >= 1 block and exactly the
    requested count (plus forced blocks), the diagonal is kept under causal, the
    sink column is kept, and nothing causally invalid is kept."""
    q, k, _ = make_video_qkv(T=4, Hs=16, Ws=16, heads=2, head_dim=64)
    L = q.shape[2]
    mask = sparge.predict(q, k, is_causal=True, topk=0.1, attention_sink=True, block_size=(64, 64))
    nq = mask.shape[2]
    allowed = reference.allowed_blocks(L, L, 64, 64, "top_left")
    assert not (mask & ~allowed).any()
    assert mask.diagonal(dim1=2, dim2=3).all()
    assert mask[..., 0].all()
    assert (mask.sum(-1) >= 1).all()
    dense = sparge.predict(q, k, topk=1.0, block_size=(64, 64))
    assert dense.all() and dense.shape[2] == nq


def test_predict_degenerate_all_fix():
    """All k-blocks fix (theta >= 1 can never be exceeded): every allowed block is kept."""
    q = torch.randn(1, 1, 130, 32)
    k = torch.randn(1, 1, 130, 32)
    mask = sparge.predict(q, k, topk=0.1, sim_threshold=1.5, is_causal=True, block_size=(32, 32))
    assert torch.equal(mask[0, 0], reference.allowed_blocks(130, 130, 32, 32, "top_left"))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("tensor", ["q", "k"])
@pytest.mark.parametrize("causal", [None, "top_left"])
def test_predict_keeps_blocks_with_nonfinite_inputs(tensor, value, causal):
    """A NaN/Inf in a q-block makes it a fix block (its similarity is NaN): its
    whole allowed row is kept; one in K reaches every k-block through the key
    mean: every allowed block is kept. So the value reaches the output."""
    q, k = torch.randn(1, 2, 300, 64), torch.randn(1, 2, 300, 64)
    (q if tensor == "q" else k)[0, 0, 150, 5] = value
    for sel in (dict(topk=0.2), dict(cdf_threshold=0.5)):
        mask = sparge.predict(q, k, block_size=(64, 32), is_causal=causal is not None, **sel)
        ref = reference.predict(q, k, block_q=64, block_k=32, causal=causal, **sel)
        assert torch.equal(mask, ref), (tensor, value, sel)
        allowed = reference.allowed_blocks(300, 300, 64, 32, causal)
        if tensor == "q":
            assert torch.equal(mask[0, 0, 150 // 64], allowed[150 // 64])
        else:
            assert torch.equal(mask[0, 0], allowed)
        assert not torch.equal(mask[0, 1], allowed)  # the clean head stays sparse
