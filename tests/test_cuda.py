"""GPU tests (marked cuda; skipped without a GPU): the CUDA backend against the
fp32 reference, CPU/CUDA agreement, streams, graphs and torch.compile."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import compare_predict, element_mask, fa_check, torch_masked_attention

import sparge
from sparge import _lib, reference

pytestmark = pytest.mark.cuda

DEV = "cuda"
DTYPES = [torch.float16, torch.bfloat16]


def _kernels():
    return torch.cuda.is_available() and sparge.cuda_available()


needs_kernels = pytest.mark.skipif(not _kernels(), reason="no GPU, or no CUDA kernels for this GPU in this build")


def _qkv(B, Hq, Hkv, Lq, Lk, D, dtype, layout="bhsd", Dv=None):
    Dv = D if Dv is None else Dv
    q = torch.randn(B, Hq, Lq, D, device=DEV, dtype=dtype)
    k = torch.randn(B, Hkv, Lk, D, device=DEV, dtype=dtype)
    v = torch.randn(B, Hkv, Lk, Dv, device=DEV, dtype=dtype)
    if layout == "bshd":
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    return q, k, v


def _pv_group(D, dtype):
    return _lib.kernel_config(torch.device(DEV), D, D, dtype, "auto")[2]


def test_cuda_build_probes_device():
    assert _lib.cuda_compiled(), "nvcc was present at build time, the CUDA unit must be linked"
    reason = _lib.device_reason("cuda", torch.cuda.current_device())
    if reason is not None:  # no kernels for this GPU: the reason names the device and the image
        major, minor = torch.cuda.get_device_capability()
        assert f"sm_{major}{minor}" in reason and "cannot run" not in reason, reason


@pytest.mark.skipif(_kernels(), reason="the CUDA kernels run here; fallback not taken")
def test_attn_on_cuda_without_kernels_falls_back_to_sdpa():
    q, k, v = _qkv(1, 4, 4, 300, 300, 64, torch.bfloat16)
    sparge.reset_fallback_counts()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = sparge.attn(q, k, v, is_causal=True, topk=0.3)
    assert any("falling back" in str(x.message) for x in w)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))


def _check_kernel(q, k, v, mask, causal, kpad=None, pv=None, what=""):
    bq, bk = sparge.block_shape(DEV, q.shape[-1], dtype=q.dtype)
    out, lse, st = sparge.block_sparse_attn(q, k, v, mask, is_causal=causal is not None,
                                            causal_alignment=causal or "top_left", key_padding_mask=kpad,
                                            pv_threshold=pv, enable_gqa=True, return_lse=True, return_stats=True)
    ref, ref_lse, ref_st = reference.block_sparse_attn(q, k, v, mask, block_q=bq, block_k=bk, causal=causal,
                                                       key_padding_mask=kpad, pv_threshold=pv,
                                                       pv_group=_pv_group(q.shape[-1], q.dtype))
    if pv is None:
        em = element_mask(mask.expand(q.shape[0], q.shape[1], -1, -1), q.shape[2], k.shape[2], bq, bk, causal, kpad)
        fa_check(out, ref, torch_masked_attention(q, k, v, em), q.dtype, what)
        assert (out[~em.any(-1)] == 0).all(), f"{what}: rows with no visible key must be 0"
    seen = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), seen), what
    assert torch.allclose(lse[seen], ref_lse[seen], atol=2e-2, rtol=1e-3), what
    for i, name in enumerate(("blocks_allowed", "blocks_kept", "pv_units")):
        assert torch.equal(st[name], ref_st[..., i]), f"{what}: stats {name}"
    return out, ref, st, ref_st


@needs_kernels
@pytest.mark.parametrize("Lq,Lk", [(1, 1), (1, 4097), (97, 97), (1000, 97), (1025, 1025), (4097, 4097)])
@pytest.mark.parametrize("causal", [None, "top_left", "bottom_right"])
def test_kernel_lengths(Lq, Lk, causal):
    q, k, v = _qkv(1, 2, 2, Lq, Lk, 128, torch.bfloat16)
    bq, bk = sparge.block_shape(DEV, 128, dtype=torch.bfloat16)
    mask = torch.rand(1, 2, -(-Lq // bq), -(-Lk // bk), device=DEV) < 0.5
    _check_kernel(q, k, v, mask, causal, what=f"L=({Lq},{Lk}) {causal}")


@needs_kernels
@pytest.mark.parametrize("D", [64, 96, 128, 256])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ratio", [1, 4, 8])
def test_kernel_head_dims_dtypes_gqa(D, dtype, ratio):
    q, k, v = _qkv(2, 2 * ratio, 2, 333, 777, D, dtype, layout="bshd" if ratio == 4 else "bhsd")
    bq, bk = sparge.block_shape(DEV, D, dtype=dtype)
    mask = torch.rand(2, 2 * ratio, -(-333 // bq), -(-777 // bk), device=DEV) < 0.6
    kpad = torch.rand(2, 777, device=DEV) < 0.8 if ratio == 8 else None
    _check_kernel(q, k, v, mask, "top_left" if ratio == 1 else None, kpad, what=f"D={D} {dtype} gqa={ratio}")


@needs_kernels
def test_kernel_fuzz_vs_reference():
    """120 random configurations of the kernel the registry picks here (the sm90
    kernel for D in {64, 128} on sm90, the sm80 one otherwise) against the fp32
    reference: odd lengths, GQA, causal both ways, key padding, bshd strides,
    both dtypes, random masks (empty rows included)."""
    g = torch.Generator().manual_seed(1234)

    def pick(xs):
        return xs[int(torch.randint(len(xs), (1,), generator=g))]

    for i in range(120):
        D = pick([64, 128, 64, 128, 96])
        dtype = pick(DTYPES)
        ratio = pick([1, 2, 4])
        Hkv = pick([1, 2])
        B = pick([1, 2])
        Lq = int(torch.randint(1, 700, (1,), generator=g))
        Lk = int(torch.randint(1, 900, (1,), generator=g))
        causal = pick([None, "top_left", "bottom_right"])
        layout = pick(["bhsd", "bshd"])
        q, k, v = _qkv(B, Hkv * ratio, Hkv, Lq, Lk, D, dtype, layout=layout)
        bq, bk = sparge.block_shape(DEV, D, dtype=dtype)
        density = pick([0.1, 0.5, 0.9, 1.0])
        mask = torch.rand(B, Hkv * ratio, -(-Lq // bq), -(-Lk // bk), generator=g).to(DEV) < density
        kpad = (torch.rand(B, Lk, generator=g) < 0.8).to(DEV) if pick([False, True]) else None
        what = f"fuzz {i}: B={B} H={Hkv * ratio}/{Hkv} L=({Lq},{Lk}) D={D} {dtype} {causal} {layout} kpad={kpad is not None}"
        _check_kernel(q, k, v, mask, causal, kpad, what=what)


@needs_kernels
@pytest.mark.parametrize("lam", [0.0, 4.0, float("inf")])
def test_kernel_pv_skip(lam):
    from sparge.demo import make_video_qkv

    # local attention (video-like tokens): many blocks are negligible for a warp's rows
    q, k, v = make_video_qkv(T=4, Hs=16, Ws=16, heads=4, head_dim=128, device=DEV, dtype=torch.bfloat16)
    L = q.shape[2]
    bq, bk = sparge.block_shape(DEV, 128, dtype=torch.bfloat16)
    mask = torch.ones(1, 4, -(-L // bq), -(-L // bk), dtype=torch.bool, device=DEV)
    out, ref, st, ref_st = _check_kernel(q, k, v, mask, None, pv=lam, what=f"pv {lam}")
    skipped, ref_skipped = st["pv_skipped"].sum().item(), ref_st[..., 3].sum().item()
    assert abs(skipped - ref_skipped) <= max(4, 0.03 * ref_skipped), (skipped, ref_skipped)
    if lam == float("inf"):
        assert skipped == 0
    if lam == 4.0:
        assert ref_skipped > 0 and skipped > 0
        dense = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        assert ((out.float() - dense).abs().sum() / dense.abs().sum()).item() < 0.1


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_attn_dense_equals_sdpa(dtype, causal):
    for Lq, Lk in [(97, 97), (1000, 1025), (4097, 4097)]:
        q, k, v = _qkv(1, 8, 8, Lq, Lk, 128, dtype)
        out = sparge.attn(q, k, v, is_causal=causal, topk=1.0)
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal)
        fa_check(out, ref, F.scaled_dot_product_attention(q, k, v, is_causal=causal), dtype,
                 f"dense {dtype} causal={causal} L=({Lq},{Lk})")


@needs_kernels
def test_fp32_input_gives_fp32_output():
    q, k, v = _qkv(1, 2, 2, 300, 300, 64, torch.float32)
    ref = F.scaled_dot_product_attention(q, k, v)
    # default: fp32 accuracy (torch's fp32 SDPA); precision="bf16": the kernel, output cast back
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = sparge.attn(q, k, v, topk=1.0)
    assert out.dtype == torch.float32
    assert (out - ref).abs().max().item() < 1e-5
    out = sparge.attn(q, k, v, topk=1.0, precision="bf16", auto_dense=False)
    assert out.dtype == torch.float32
    assert (out - ref).abs().max().item() < 3e-2


@needs_kernels
@pytest.mark.parametrize("mode", ["topk", "cdf"])
@pytest.mark.parametrize("causal", [None, "top_left", "bottom_right"])
def test_predict_matches_reference(mode, causal):
    from sparge.demo import make_video_qkv

    bq, bk = sparge.block_shape(DEV, 64, dtype=torch.bfloat16)
    q, k, _ = make_video_qkv(T=4, Hs=16, Ws=16, heads=8, head_dim=64, device=DEV, dtype=torch.bfloat16)
    k = k[:, ::4].contiguous()
    sel = dict(topk=0.3) if mode == "topk" else dict(cdf=0.9)
    for sim in (-0.1, 0.15):
        compare_predict(q, k, bq=bq, bk=bk, causal=causal, sim=sim, sink=True, what=f"gpu {mode} {causal} {sim}", **sel)
    q, k = torch.randn(2, 4, 1025, 64, device=DEV), torch.randn(2, 4, 777, 64, device=DEV)
    compare_predict(q, k, bq=bq, bk=bk, causal=causal, what=f"gpu random {mode} {causal}", **sel)


@needs_kernels
def test_cpu_and_cuda_agree():
    q, k, v = (torch.randn(2, 4, 1000, 128, dtype=torch.bfloat16) for _ in range(3))
    g = _pv_group(128, torch.bfloat16)
    bq, bk = sparge.block_shape(DEV, 128, dtype=torch.bfloat16)
    mask_gpu = sparge.predict(q.cuda(), k.cuda(), topk=0.4, is_causal=True)
    mask_cpu = sparge.predict(q, k, topk=0.4, is_causal=True, block_size=(bq, bk))
    assert (mask_gpu.cpu() != mask_cpu).float().mean().item() < 0.01
    out_gpu = sparge.block_sparse_attn(q.cuda(), k.cuda(), v.cuda(), mask_cpu.cuda(), is_causal=True,
                                       pv_threshold=6.0)
    out_cpu = torch.ops.sparge.block_sparse_attn(q, k, v, mask_cpu, None, torch.full((4,), 6.0), 128 ** -0.5, 1, 0,
                                                 bq, bk, g, False, False, False)[0]
    assert (out_gpu.cpu().float() - out_cpu.float()).abs().max().item() < 3e-2


@needs_kernels
def test_stream_graph_and_compile_equal_eager():
    q, k, v = _qkv(1, 8, 8, 2048, 2048, 128, torch.bfloat16)

    def f(q, k, v):  # a small call: auto_dense off so the sparse kernels run
        return sparge.attn(q, k, v, is_causal=True, topk=0.3, pv_threshold=8.0, auto_dense=False)

    eager = f(q, k, v)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        on_stream = f(q, k, v)
    torch.cuda.current_stream().wait_stream(s)
    assert torch.equal(on_stream, eager)

    g = torch.cuda.CUDAGraph()
    with torch.cuda.stream(s):  # warm up on the side stream, then capture
        f(q, k, v)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        captured = f(q, k, v)
    q.copy_(torch.randn_like(q))
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, f(q, k, v))

    compiled = torch.compile(f, fullgraph=True)
    assert torch.equal(compiled(q, k, v), f(q, k, v))


@needs_kernels
def test_other_device_index():
    if torch.cuda.device_count() < 2:
        pytest.skip("one GPU")
    q, k, v = _qkv(1, 2, 2, 500, 500, 64, torch.float16)
    q1, k1, v1 = (t.to("cuda:1") for t in (q, k, v))
    assert torch.equal(sparge.attn(q1, k1, v1, topk=0.5).cpu(), sparge.attn(q, k, v, topk=0.5).cpu())


@needs_kernels
def test_auto_dense_policy():
    """Small calls and high top-k run torch SDPA exactly; a large sparse call does not."""
    q, k, v = _qkv(1, 4, 4, 1024, 1024, 64, torch.bfloat16)
    out, st = sparge.attn(q, k, v, topk=0.2, return_stats=True)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v))
    assert (st["density"] == 1.0).all()
    out = sparge.attn(q, k, v, topk=0.2, auto_dense=False)
    assert not torch.equal(out, F.scaled_dot_product_attention(q, k, v))
    q, k, v = _qkv(1, 16, 16, 8192, 8192, 128, torch.bfloat16)
    _, st = sparge.attn(q, k, v, topk=0.2, return_stats=True)
    assert (st["density"] < 0.5).all()
    _, st = sparge.attn(q, k, v, topk=0.95, return_stats=True)
    assert (st["density"] == 1.0).all()


@needs_kernels
@pytest.mark.parametrize("lam", [0.0, 1e-6])
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_pv_skip_keeps_the_block_that_raises_the_max(lam, dtype):
    """Issue 13's reproducer at a GPU head dim: scores 0 then 120; skipping the
    second block (it raises the max) gave 0."""
    q = torch.zeros(1, 1, 1, 64, device=DEV, dtype=dtype)
    q[..., 0] = 1
    k = torch.zeros(1, 1, 128, 64, device=DEV, dtype=dtype)
    k[:, :, 64:, 0] = 120
    v = torch.ones(1, 1, 128, 64, device=DEV, dtype=dtype)
    bq, bk = sparge.block_shape(DEV, 64, dtype=dtype)
    mask = torch.ones(1, 1, 1, -(-128 // bk), dtype=torch.bool, device=DEV)
    out, st = sparge.block_sparse_attn(q, k, v, mask, scale=1.0, pv_threshold=lam, return_stats=True)
    assert (out == 1).all() and st["pv_skipped"].item() == 0


# the GPU twins of tests/test_nonfinite_cpu.py; a non-finite V at a key hidden
# from a row inside a computed block, and the LSE of NaN rows, are not checked:
# docs/spec.md, "Not yet built", item 3
_NF_ROW, _NF_KEY = 137, 200


@needs_kernels
@pytest.mark.parametrize("setting", ["dense", "top_left", "key_padding", "sparse"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("tensor", ["q", "k", "v"])
def test_kernel_nonfinite_matches_reference(tensor, value, setting):
    if tensor == "v" and setting in ("top_left", "key_padding"):
        pytest.skip("a non-finite V hidden inside a computed block reaches the row on CUDA (spec: Not yet built 3)")
    dtype = torch.bfloat16
    L = 300
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, L, 64, generator=g) for _ in range(3))
    if tensor == "q":
        q[0, 0, _NF_ROW, 3] = value
    elif tensor == "k":
        k[0, :, _NF_KEY, 3] = value
    else:
        v[0, :, _NF_KEY, 5] = value
    q, k, v = (t.to(DEV, dtype) for t in (q, k, v))
    bq, bk = sparge.block_shape(DEV, 64, dtype=dtype)
    nq, nk = -(-L // bq), -(-L // bk)
    mask = torch.ones(1, 2, nq, nk, dtype=torch.bool, device=DEV)
    causal, kpad = None, None
    if setting == "top_left":
        causal = "top_left"
    elif setting == "key_padding":
        kpad = torch.rand(1, L, device=DEV) < 0.8
        kpad[:, _NF_KEY] = False
        kpad[:, 0] = True
    elif setting == "sparse":
        mask = torch.rand(1, 2, nq, nk, device=DEV) < 0.6
        mask[0, 0, _NF_ROW // bq, _NF_KEY // bk] = True
        mask[0, 1, :, _NF_KEY // bk] = False
    out = sparge.block_sparse_attn(q, k, v, mask, is_causal=causal is not None, key_padding_mask=kpad)
    ref, _, _ = reference.block_sparse_attn(q, k, v, mask, block_q=bq, block_k=bk, causal=causal,
                                            key_padding_mask=kpad)
    out, ref = out.float().cpu(), ref.cpu()
    what = f"{tensor}={value} {setting}"
    if not (tensor == "k" and setting == "key_padding"):  # a padded key is hidden from every row
        assert not torch.isfinite(ref).all(), what
    assert torch.equal(out.isnan(), ref.isnan()), what
    assert torch.equal(out.isinf(), ref.isinf()), what
    fin = torch.isfinite(ref)
    if fin.any():  # a NaN key seen by every row leaves no finite element
        assert (out[fin] - ref[fin]).abs().max().item() < 2e-2, what
    if tensor != "q":  # rows that do not see the key are untouched by it
        em = element_mask(mask.expand(1, 2, -1, -1), L, L, bq, bk, causal, kpad).cpu()
        assert torch.isfinite(out[~em[..., _NF_KEY]]).all(), what
