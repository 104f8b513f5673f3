"""SDPA's input contract (issue 13, item 3): ``(N, ..., L, E)`` inputs of any
rank >= 3. Rank 3 is one head; the leading dimensions of rank > 4 flatten into
the batch by views (no copies where the strides allow); every path (the
kernel, the dense fallback, predict, block_sparse_attn, patch_sdpa) gives
SDPA's result in the caller's shape."""
import warnings

import pytest
import torch
import torch.nn.functional as F

import sparge
from sparge import _args

ATOL = 2e-5


@pytest.fixture(autouse=True)
def _fresh():
    sparge.reset_fallback_counts()
    yield


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


CASES = [
    # (query shape, key/value shape, SDPA keyword arguments)
    ((3, 70, 16), (3, 50, 16), {}),
    ((3, 70, 16), (3, 70, 16), {"is_causal": True}),
    ((2, 3, 2, 70, 16), (2, 3, 2, 50, 16), {}),
    ((2, 3, 4, 70, 16), (2, 3, 2, 70, 16), {"enable_gqa": True, "is_causal": True}),
    ((2, 1, 3, 2, 33, 8), (2, 1, 3, 2, 40, 8), {}),
]


@pytest.mark.parametrize("qshape,kshape,kw", CASES, ids=[str(c[0]) for c in CASES])
def test_kernel_path_equals_sdpa_in_the_callers_shape(qshape, kshape, kw):
    q, k, v = _rand(*qshape, seed=1), _rand(*kshape, seed=2), _rand(*kshape, seed=3)
    out = sparge.attn(q, k, v, topk=1.0, **kw)
    ref = F.scaled_dot_product_attention(q, k, v, **kw)
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() < ATOL
    assert sparge.fallback_counts() == {}


@pytest.mark.parametrize("qshape,mshape", [
    ((3, 70, 16), (3, 1, 70)),            # rank 3: per-batch key padding
    ((3, 70, 16), (70,)),                 # broadcast over everything
    ((2, 3, 2, 70, 16), (3, 1, 1, 70)),   # a middle batch dimension
    ((2, 3, 2, 70, 16), (2, 3, 1, 1, 70)),
])
def test_boolean_key_padding_runs_natively(qshape, mshape):
    q = _rand(*qshape, seed=4)
    mask = _rand(*mshape, seed=5) > -0.5
    mask[..., 0] = True  # every row sees a key
    out = sparge.attn(q, q, q, attn_mask=mask, topk=1.0)
    ref = F.scaled_dot_product_attention(q, q, q, attn_mask=mask)
    assert (out - ref).abs().max().item() < ATOL
    assert sparge.fallback_counts() == {}


@pytest.mark.parametrize("qshape,mshape", [((3, 70, 16), (70, 70)), ((2, 3, 2, 70, 16), (2, 3, 2, 70, 70)),
                                           ((2, 3, 2, 70, 16), (3, 1, 70, 70))])
def test_fallback_path_takes_the_callers_mask(qshape, mshape):
    q = _rand(*qshape, seed=6)
    mask = _rand(*mshape, seed=7)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        out = sparge.attn(q, q, q, attn_mask=mask)
    ref = F.scaled_dot_product_attention(q, q, q, attn_mask=mask)
    assert out.shape == ref.shape and (out - ref).abs().max().item() < ATOL
    assert any("float attn_mask" in key for key in sparge.fallback_counts())


def test_leading_dimensions_flatten_by_views():
    q = _rand(2, 3, 2, 70, 16)
    call = _args.resolve_call(q, q, q)
    assert call.q.shape == (6, 2, 70, 16) and call.lead == (2, 3, 2)
    assert call.q.data_ptr() == q.data_ptr() and call.q._base is q  # a view, not a copy
    q3 = _rand(3, 70, 16)
    call = _args.resolve_call(q3, q3, q3)
    assert call.q.shape == (3, 1, 70, 16) and call.q._base is q3
    # a transposed head dimension still flattens by a view when the batch strides allow it
    qt = _rand(2, 3, 70, 2, 16).transpose(-2, -3)
    call = _args.resolve_call(qt, qt, qt)
    assert call.q.data_ptr() == qt.data_ptr() and call.q._base is not None


def test_lse_stats_and_predict_take_the_callers_leading_shape():
    q = _rand(2, 3, 2, 70, 16)
    out, lse, stats = sparge.attn(q, q, q, topk=1.0, return_lse=True, return_stats=True)
    assert out.shape == q.shape and lse.shape == (2, 3, 2, 70) and stats["density"].shape == (2, 3, 2)
    s = (q @ q.transpose(-1, -2)) * 16 ** -0.5
    assert (lse - torch.logsumexp(s, -1)).abs().max().item() < 1e-4
    mask = sparge.predict(q, q)
    assert mask.shape[:3] == (2, 3, 2) and mask.dim() == 5
    assert torch.equal(mask.flatten(0, 1), sparge.predict(q.flatten(0, 1), q.flatten(0, 1)))
    q3 = q[0, 0]
    out3, lse3 = sparge.attn(q3, q3, q3, return_lse=True)
    assert out3.shape == q3.shape and lse3.shape == (2, 70)
    assert sparge.predict(q3, q3).dim() == 3


def test_block_sparse_attn_rank_5_with_a_broadcast_block_mask():
    q = _rand(2, 3, 2, 70, 16)
    bq, bk = sparge.block_shape("cpu", 16, dtype=torch.float32)
    nq, nk = -(-70 // bq), -(-70 // bk)
    full = torch.ones(1, 1, 1, nq, nk, dtype=torch.bool)
    out = sparge.block_sparse_attn(q, q, q, full)
    assert (out - F.scaled_dot_product_attention(q, q, q)).abs().max().item() < ATOL
    # one batch element's mask per middle index, as a 4-D [B*..., H, nq, nk] equivalent
    per = torch.rand(2, 3, 1, nq, nk, generator=torch.Generator().manual_seed(8)) > 0.5
    a = sparge.block_sparse_attn(q, q, q, per)
    b = sparge.block_sparse_attn(q.flatten(0, 1), q.flatten(0, 1), q.flatten(0, 1),
                                 per.expand(2, 3, 2, nq, nk).flatten(0, 1))
    assert torch.equal(a, b.unflatten(0, (2, 3)))


def test_patch_sdpa_routes_3d_and_5d_calls_natively():
    q3, q5 = _rand(3, 70, 16), _rand(2, 3, 2, 70, 16)
    pad = torch.ones(70, dtype=torch.bool)
    pad[60:] = False
    with sparge.patch_sdpa(topk=1.0, record_stats=True) as p:
        out3 = F.scaled_dot_product_attention(q3, q3, q3, is_causal=True)
        out5 = F.scaled_dot_product_attention(q5, q5, q5, attn_mask=pad)
    assert (out3 - F.scaled_dot_product_attention(q3, q3, q3, is_causal=True)).abs().max().item() < ATOL
    assert (out5 - F.scaled_dot_product_attention(q5, q5, q5, attn_mask=pad)).abs().max().item() < ATOL
    assert p.stats.summary()["total"]["calls"] == 2
    assert sparge.fallback_counts() == {}


def test_patch_sdpa_sends_rank_2_to_the_original():
    q = _rand(70, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with sparge.patch_sdpa(topk=1.0):
            out = F.scaled_dot_product_attention(q, q, q)
    assert torch.equal(out, F.scaled_dot_product_attention(q, q, q))
    assert any("rank >= 3" in key for key in sparge.fallback_counts())


def test_rank_5_under_torch_compile_fullgraph():
    torch._dynamo.reset()
    q = _rand(2, 3, 2, 70, 16)
    fn = torch.compile(lambda q: sparge.attn(q, q, q, topk=1.0), fullgraph=True)
    try:
        assert (fn(q) - F.scaled_dot_product_attention(q, q, q)).abs().max().item() < ATOL
    finally:
        torch._dynamo.reset()
