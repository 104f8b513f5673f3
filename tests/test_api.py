"""Python API contract: bad input, fallbacks, ABI status codes, torch.compile."""
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import sparge
from sparge import _C, _lib

ROOT = Path(__file__).resolve().parents[1]


def _qkv(B=1, Hq=2, Hkv=2, Lq=64, Lk=64, D=32, dtype=torch.float32):
    return torch.randn(B, Hq, Lq, D, dtype=dtype), torch.randn(B, Hkv, Lk, D, dtype=dtype), \
        torch.randn(B, Hkv, Lk, D, dtype=dtype)


Q, K, V = _qkv()
MASK = torch.ones(1, 2, 1, 1, dtype=torch.bool)

# (description, callable, exception type, text the message must contain)
BAD_INPUTS = [
    ("query rank 2", lambda: sparge.attn(Q[0, 0], K[0, 0], V[0, 0]), ValueError, "query"),
    ("query rank 3, key rank 4", lambda: sparge.attn(Q[0], K, V), ValueError, "key"),
    ("key rank 5", lambda: sparge.attn(Q, K[None], V), ValueError, "key"),
    ("value rank 5", lambda: sparge.attn(Q[None], K[None], V), ValueError, "value"),
    ("rank 5 leading dims differ", lambda: sparge.attn(Q[None].expand(2, -1, -1, -1, -1), K[None], V[None]),
     ValueError, "key"),
    ("bshd rank 3", lambda: sparge.attn(Q[0], K[0], V[0], layout="bshd"), ValueError, "layout"),
    ("value None", lambda: sparge.attn(Q, K, None), TypeError, "value"),
    ("block_sparse_attn value None", lambda: sparge.block_sparse_attn(Q, K, None, MASK), TypeError, "value"),
    ("enable_gqa string", lambda: sparge.attn(Q, K, V, enable_gqa="no"), TypeError, "enable_gqa"),
    ("enable_gqa string, GQA shapes", lambda: sparge.attn(*_qkv(Hq=4, Hkv=2), enable_gqa="no"),
     TypeError, "enable_gqa"),
    ("predict enable_gqa int", lambda: sparge.predict(Q, K, enable_gqa=1), TypeError, "enable_gqa"),
    ("config dict topk and cdf", lambda: sparge.attn(Q, K, V, config={"topk": 0.5, "cdf_threshold": 0.9}),
     ValueError, "topk or cdf_threshold"),
    ("int64 attn_mask", lambda: sparge.attn(Q, K, V, attn_mask=torch.ones(64, 64, dtype=torch.int64)),
     TypeError, "attn_mask"),
    ("float64 attn_mask", lambda: sparge.attn(Q, K, V, attn_mask=torch.zeros(64, 64, dtype=torch.float64)),
     TypeError, "attn_mask"),
    ("huge block_size", lambda: sparge.block_sparse_attn(Q, K, V, MASK, block_size=(2 ** 40, 64)),
     ValueError, "block_size"),
    ("predict huge block_size", lambda: sparge.predict(Q, K, block_size=(64, 2 ** 31)), ValueError, "block_size"),
    ("block_shape float head dim", lambda: sparge.block_shape("cpu", 64.9), TypeError, "head_dim"),
    ("block_shape string head dim", lambda: sparge.block_shape("cpu", "100"), TypeError, "head_dim"),
    ("block_shape bool head dim", lambda: sparge.block_shape("cpu", True), TypeError, "head_dim"),
    ("block_shape float head_dim_v", lambda: sparge.block_shape("cpu", 64, head_dim_v=64.0), TypeError,
     "head_dim_v"),
    ("block_shape huge head dim", lambda: sparge.block_shape("cpu", 2 ** 40), ValueError, "head_dim"),
    ("value not a tensor", lambda: sparge.attn(Q, K, [1, 2]), TypeError, "value"),
    ("int query", lambda: sparge.attn(Q.long(), K, V), TypeError, "query"),
    ("mixed dtypes", lambda: sparge.attn(Q, K.half(), V), TypeError, "key"),
    ("value dtype", lambda: sparge.attn(Q, K, V.bfloat16()), TypeError, "value"),
    ("meta device key", lambda: sparge.attn(Q, K.to("meta"), V), ValueError, "key"),
    ("heads not divisible", lambda: sparge.attn(*_qkv(Hq=3, Hkv=2), enable_gqa=True), ValueError, "key"),
    ("gqa without enable_gqa", lambda: sparge.attn(*_qkv(Hq=4, Hkv=2)), ValueError, "enable_gqa"),
    ("zero-size length", lambda: sparge.attn(*_qkv(Lq=0)), ValueError, "query"),
    ("zero-size batch", lambda: sparge.attn(*_qkv(B=0)), ValueError, "query"),
    ("head dim mismatch", lambda: sparge.attn(Q, K[..., :16], V), ValueError, "key"),
    ("value length mismatch", lambda: sparge.attn(Q, K, V[:, :, :10]), ValueError, "value"),
    ("batch mismatch", lambda: sparge.attn(Q, *_qkv(B=2)[1:]), ValueError, "key"),
    ("NaN sim_threshold", lambda: sparge.attn(Q, K, V, sim_threshold=math.nan), ValueError, "sim_threshold"),
    ("inf scale", lambda: sparge.attn(Q, K, V, scale=math.inf), ValueError, "scale"),
    ("topk zero", lambda: sparge.attn(Q, K, V, topk=0.0), ValueError, "topk"),
    ("topk above one", lambda: sparge.attn(Q, K, V, topk=1.5), ValueError, "topk"),
    ("topk NaN", lambda: sparge.attn(Q, K, V, topk=math.nan), ValueError, "topk"),
    ("topk and cdf", lambda: sparge.attn(Q, K, V, topk=0.3, cdf_threshold=0.9), ValueError, "topk"),
    ("cdf above one", lambda: sparge.attn(Q, K, V, cdf_threshold=1.01), ValueError, "cdf_threshold"),
    ("negative pv_threshold", lambda: sparge.attn(Q, K, V, pv_threshold=-1.0), ValueError, "pv_threshold"),
    ("NaN pv_threshold", lambda: sparge.attn(Q, K, V, pv_threshold=math.nan), ValueError, "pv_threshold"),
    ("per-head tensor wrong size", lambda: sparge.attn(Q, K, V, topk=torch.tensor([0.5, 0.5, 0.5])),
     ValueError, "topk"),
    ("per-head tensor NaN", lambda: sparge.attn(Q, K, V, sim_threshold=torch.tensor([0.1, math.nan])),
     ValueError, "sim_threshold"),
    ("string topk", lambda: sparge.attn(Q, K, V, topk="half"), TypeError, "topk"),
    ("unknown precision", lambda: sparge.attn(Q, K, V, precision="int4"), ValueError, "precision"),
    ("unknown layout", lambda: sparge.attn(Q, K, V, layout="sbhd"), ValueError, "layout"),
    ("unknown alignment", lambda: sparge.attn(Q, K, V, is_causal=True, causal_alignment="center"),
     ValueError, "causal_alignment"),
    ("is_causal not bool", lambda: sparge.attn(Q, K, V, is_causal=1), TypeError, "is_causal"),
    ("dropout_p one", lambda: sparge.attn(Q, K, V, dropout_p=1.0), ValueError, "dropout_p"),
    ("mask wrong shape", lambda: sparge.attn(Q, K, V, attn_mask=torch.ones(1, 1, 1, 63, dtype=torch.bool)),
     ValueError, "attn_mask"),
    ("mask with is_causal", lambda: sparge.attn(Q, K, V, is_causal=True, attn_mask=torch.ones(64, dtype=torch.bool)),
     ValueError, "attn_mask"),
    ("mask not a tensor", lambda: sparge.attn(Q, K, V, attn_mask=[True]), TypeError, "attn_mask"),
    ("block mask wrong shape", lambda: sparge.block_sparse_attn(Q, K, V, torch.ones(1, 2, 3, 3, dtype=torch.bool)),
     ValueError, "block_mask"),
    ("block mask not bool", lambda: sparge.block_sparse_attn(Q, K, V, MASK.float()), TypeError, "block_mask"),
    ("non-unit last stride", lambda: sparge.block_sparse_attn(Q.transpose(2, 3).contiguous().transpose(2, 3), K, V, MASK), ValueError, "query"),
    ("bad block_size", lambda: sparge.block_sparse_attn(Q, K, V, MASK, block_size=(0, 64)), ValueError, "block_size"),
    ("key padding wrong length", lambda: sparge.block_sparse_attn(Q, K, V, MASK,
                                                                   key_padding_mask=torch.ones(1, 5, dtype=torch.bool)),
     ValueError, "key_padding_mask"),
    ("predict topk and cdf", lambda: sparge.predict(Q, K, topk=0.2, cdf_threshold=0.5), ValueError, "topk"),
    ("block_shape bad precision", lambda: sparge.block_shape("cpu", 64, precision="fp64"), ValueError, "precision"),
    ("block_shape bad head dim", lambda: sparge.block_shape("cpu", 0), ValueError, "head_dim"),
]


@pytest.mark.parametrize("what,fn,exc,needle", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_raises_naming_argument(what, fn, exc, needle):
    with pytest.raises(exc) as info:
        fn()
    assert needle in str(info.value), f"{what}: message {str(info.value)!r} does not name {needle!r}"


def test_bad_input_table_is_large():
    assert len(BAD_INPUTS) >= 25


def test_attn_mask_dtypes_follow_sdpa():
    """SDPA takes a bool mask, a float32 one or one of the query's dtype: so does sparge."""
    q, k, v = (t.bfloat16() for t in (Q, K, V))
    for m in (torch.zeros(64, 64), torch.zeros(64, 64, dtype=torch.bfloat16), torch.ones(64, 64, dtype=torch.bool)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = sparge.attn(q, k, v, attn_mask=m, topk=1.0)
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
        assert (out.float() - ref.float()).abs().max().item() < 2e-2, m.dtype
    for dt in (torch.float16, torch.int64, torch.uint8):
        m = torch.zeros(64, 64, dtype=dt)
        with pytest.raises(RuntimeError):
            F.scaled_dot_product_attention(q, k, v, attn_mask=m)
        with pytest.raises(TypeError, match="attn_mask"):
            sparge.attn(q, k, v, attn_mask=m)


def test_size_check_comes_before_any_allocation(monkeypatch):
    """2^31 heads (an expanded view, no memory): refused naming the argument
    before the per-head vectors (8 GiB each) are built."""
    from sparge import _args

    def no_alloc(*a, **kw):
        raise AssertionError("a per-head vector was built before the size check")

    monkeypatch.setattr(_args, "_constant_vector", no_alloc)
    q = torch.randn(1, 1, 64, 32).expand(1, 2 ** 31, 64, 32)
    for fn in (lambda: sparge.predict(q, q), lambda: sparge.attn(q, q, q)):
        with pytest.raises(ValueError, match=r"query: dimension 1 .* 2147483648"):
            fn()
    assert _args.MAX_DIM_SIZE == 2 ** 31 - 1


def test_c_abi_refuses_2_to_the_31_heads():
    """The C layer's limit is the Python one (MAX_DIM_SIZE = 2^31 - 1)."""
    q = torch.randn(1, 1, 64, 32).expand(1, 2 ** 31, 64, 32)
    status, _ = _C.predict_workspace_size(_desc(q), _desc(q), scale=0.1, block_q=64, block_k=64)
    assert status == _lib.INVALID_VALUE and "2147483647" in _C.last_error()


def test_predict_copies_a_non_unit_last_stride_like_attn():
    qs = torch.randn(1, 2, 64, 64)[..., ::2]
    assert qs.stride(-1) != 1
    assert torch.equal(sparge.predict(qs, qs), sparge.predict(qs.contiguous(), qs.contiguous()))


# --------------------------------------------------------------------------
# The C ABI through the binding
# --------------------------------------------------------------------------
def _desc(t):
    return _lib.desc(t)


def _predict_status(q, k, sim, sel, mask, *, scale=0.1, causal=0, mode=0, bq=32, bk=32, ws=1 << 20):
    holder = torch.empty(ws + 64, dtype=torch.uint8)
    addr = (holder.data_ptr() + 63) & ~63
    return _C.predict(_desc(q), _desc(k), _desc(sim), _desc(sel), scale=scale, causal=causal, select_mode=mode,
                      block_q=bq, block_k=bk, out_mask=_desc(mask), workspace=addr, workspace_bytes=ws)


def test_abi_status_codes():
    q, k, v = _qkv(Lq=64, Lk=64)
    sim, sel = torch.zeros(2), torch.full((2,), 0.5)
    mask = torch.empty(1, 2, 2, 2, dtype=torch.bool)
    assert _C.abi_version() == _C.SPARGE_ABI_VERSION == _lib.ABI_VERSION
    assert _predict_status(q, k, sim, sel, mask) == _lib.SUCCESS
    # wrong mask shape -> INVALID_VALUE naming out_mask
    assert _predict_status(q, k, sim, sel, torch.empty(1, 2, 3, 2, dtype=torch.bool)) == _lib.INVALID_VALUE
    assert "out_mask" in _C.last_error()
    # unknown causal mode / select mode
    assert _predict_status(q, k, sim, sel, mask, causal=7) == _lib.INVALID_VALUE and "causal" in _C.last_error()
    assert _predict_status(q, k, sim, sel, mask, mode=9) == _lib.INVALID_VALUE and "select_mode" in _C.last_error()
    # per-head vector of the wrong length, wrong dtype
    assert _predict_status(q, k, torch.zeros(3), sel, mask) == _lib.INVALID_VALUE
    assert "sim_threshold" in _C.last_error()
    assert _predict_status(q, k, sim, sel.int(), mask) == _lib.INVALID_VALUE and "select_param" in _C.last_error()
    # workspace too small
    assert _predict_status(q, k, sim, sel, mask, ws=0) == _lib.WORKSPACE_TOO_SMALL
    # NaN scale
    assert _predict_status(q, k, sim, sel, mask, scale=math.nan) == _lib.INVALID_VALUE
    # a malformed descriptor (rank 5) is rejected, not read
    bad = (q.data_ptr(), 0, 1, 0, (1, 1, 1, 1, 1), (1, 1, 1, 1, 1))
    assert _C.predict(bad, _desc(k), _desc(sim), _desc(sel), scale=0.1, block_q=32, block_k=32,
                      out_mask=_desc(mask)) == _lib.INVALID_VALUE
    # a NULL data pointer
    null = (0,) + _desc(q)[1:]
    assert _C.predict(null, _desc(k), _desc(sim), _desc(sel), scale=0.1, block_q=32, block_k=32,
                      out_mask=_desc(mask)) == _lib.INVALID_VALUE and "data pointer" in _C.last_error()
    # block shape: int8 has no CPU kernel -> NOT_SUPPORTED; unsupported device type
    cpu, fp32 = _lib.DEVICE_CPU, _lib.dtype_code(torch.float32)
    assert _C.block_shape(cpu, 0, head_dim=64, head_dim_v=64, dtype=fp32,
                          precision=_lib.PRECISION_CODES["int8"])[0] == _lib.NOT_SUPPORTED
    assert _C.block_shape(cpu, 0, head_dim=2048, head_dim_v=64, dtype=fp32)[0] == _lib.NOT_SUPPORTED
    assert _C.device_supported(7, device_id=0) == _lib.NOT_SUPPORTED
    assert _C.status_string(_lib.WORKSPACE_TOO_SMALL) == "SPARGE_ERROR_WORKSPACE_TOO_SMALL"


def test_abi_attention_status_codes():
    q, k, v = _qkv(Lq=64, Lk=64)
    out = torch.empty_like(q)
    mask = torch.ones(1, 2, 1, 1, dtype=torch.bool)

    def call(**kw):
        a = dict(q=q, k=k, v=v, mask=mask, kpad=None, pv=None, scale=0.1, causal=0, precision=0, bq=128, bk=64,
                 group=16, out=out, lse=None, stats=None)
        a.update(kw)
        return _C.block_sparse_attn(_desc(a["q"]), _desc(a["k"]), _desc(a["v"]), _desc(a["mask"]),
                                    key_padding=_desc(a["kpad"]), pv_threshold=_desc(a["pv"]), scale=a["scale"],
                                    causal=a["causal"], precision=a["precision"], block_q=a["bq"], block_k=a["bk"],
                                    pv_group=a["group"], out=_desc(a["out"]), out_lse=_desc(a["lse"]),
                                    out_stats=_desc(a["stats"]))

    assert call() == _lib.SUCCESS
    assert call(group=0) == _lib.INVALID_VALUE and "pv_group" in _C.last_error()
    assert call(precision=3) == _lib.NOT_SUPPORTED and "int8" in _C.last_error()
    assert call(bq=4096) == _lib.NOT_SUPPORTED
    assert call(out=torch.empty(1, 2, 64, 32, dtype=torch.float16)) == _lib.INVALID_VALUE and "out" in _C.last_error()
    assert call(lse=torch.empty(1, 2, 64, dtype=torch.int32)) == _lib.INVALID_VALUE
    assert call(stats=torch.empty(1, 2, 3, dtype=torch.int64)) == _lib.INVALID_VALUE and "out_stats" in _C.last_error()
    assert call(kpad=torch.ones(1, 63, dtype=torch.bool)) == _lib.INVALID_VALUE and "key_padding" in _C.last_error()
    assert call(k=k.half()) == _lib.INVALID_VALUE and "k:" in _C.last_error()
    assert call(v=v[:, :1]) == _lib.INVALID_VALUE and "v:" in _C.last_error()
    assert call(q=q.transpose(2, 3).contiguous().transpose(2, 3)) == _lib.INVALID_VALUE
    assert "stride" in _C.last_error()


def test_bindings_take_keyword_arguments():
    q, k, v = (_desc(t) for t in _qkv(Lq=64, Lk=64))
    with pytest.raises(TypeError):  # the params-struct fields are keyword-only
        _C.attn_workspace_size(q, k, v, 0.1, 0, 0, 128, 64, 16)
    status, _ = _C.attn_workspace_size(q, k, v, scale=0.1, block_q=128, block_k=64, pv_group=16)
    assert status == _lib.SUCCESS
    assert _C.predict_workspace_size(q, k, scale=0.1, block_q=32, block_k=32)[0] == _lib.SUCCESS


# --------------------------------------------------------------------------
# Fallbacks
# --------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["float mask", "per-query mask", "dropout", "int8 on cpu", "huge head dim"])
def test_fallback_to_sdpa_warns_once_and_counts(case):
    q, k, v = _qkv(Lq=40, Lk=50, D=32)
    kwargs, ref_kwargs = {}, {}
    if case == "float mask":
        m = torch.randn(1, 1, 40, 50)
        kwargs = ref_kwargs = dict(attn_mask=m)
    elif case == "per-query mask":
        m = torch.rand(40, 50) > 0.3
        m[:, 0] = True
        kwargs = ref_kwargs = dict(attn_mask=m)
    elif case == "dropout":
        kwargs = dict(dropout_p=0.5)
    elif case == "int8 on cpu":
        kwargs = dict(precision="int8")
    else:
        q, k, v = _qkv(Lq=8, Lk=8, D=1100)
    sparge.reset_fallback_counts()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = sparge.attn(q, k, v, **kwargs)
        sparge.attn(q, k, v, **kwargs)
    assert len([x for x in w if "falling back" in str(x.message)]) == 1, [str(x.message) for x in w]
    assert sum(sparge.fallback_counts().values()) == 2
    if case != "dropout":
        assert torch.allclose(out, F.scaled_dot_product_attention(q, k, v, **ref_kwargs), atol=1e-5)


def test_key_padding_mask_runs_natively():
    q, k, v = _qkv(B=2, Lq=100, Lk=120)
    pad = torch.rand(2, 1, 1, 120) > 0.3
    sparge.reset_fallback_counts()
    out = sparge.attn(q, k, v, attn_mask=pad, topk=1.0)
    assert sparge.fallback_counts() == {}
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=pad)
    assert (out - ref).abs().max().item() < 1e-5


def test_return_lse_and_stats():
    q, k, v = _qkv(Lq=300, Lk=300)
    out, lse, stats = sparge.attn(q, k, v, topk=1.0, return_lse=True, return_stats=True)
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    assert torch.allclose(lse, torch.logsumexp(s, -1), atol=1e-4)
    assert torch.all(stats["density"] == 1.0)
    _, st = sparge.attn(q, k, v, topk=0.3, return_stats=True)
    assert (st["density"] < 1.0).all()


def test_config_overrides_keywords():
    q, k, v = _qkv(Lq=512, Lk=512)
    cfg = {"topk": 1.0, "sim_threshold": torch.tensor([-0.1, -0.1])}
    out = sparge.attn(q, k, v, topk=0.1, config=cfg)
    assert (out - F.scaled_dot_product_attention(q, k, v)).abs().max().item() < 1e-5


def test_non_contiguous_last_dim_is_copied_by_attn():
    q, k, v = _qkv(Lq=64, Lk=64)
    qt = q.transpose(2, 3).contiguous().transpose(2, 3)  # same values, last stride != 1
    assert torch.equal(sparge.attn(qt, k, v, topk=1.0), sparge.attn(q, k, v, topk=1.0))


def test_block_shape_from_c():
    assert sparge.block_shape("cpu", 128) == (128, 64)
    assert _C.block_shape(_lib.DEVICE_CPU, 0, head_dim=128, head_dim_v=128,
                          dtype=_lib.dtype_code(torch.float32))[1:3] == (128, 64)


# --------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------
def test_torch_compile_fullgraph_cpu():
    q, k, v = _qkv(Lq=200, Lk=200)

    def f(q, k, v):
        return sparge.attn(q, k, v, topk=0.5, is_causal=True) * 2

    compiled = torch.compile(f, fullgraph=True, backend="eager")
    assert torch.equal(compiled(q, k, v), f(q, k, v))
    compiled_aot = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled_aot(q, k, v), f(q, k, v))


def test_custom_ops_pass_opcheck():
    q, k, v = _qkv(Lq=70, Lk=90)
    sim, sel = torch.zeros(2), torch.full((2,), 0.5)
    torch.library.opcheck(torch.ops.sparge.predict.default, (q, k, sim, sel, 0.2, 1, 0, False, 32, 32))
    mask = torch.rand(1, 2, 3, 3) > 0.3
    torch.library.opcheck(torch.ops.sparge.block_sparse_attn.default,
                          (q, k, v, mask, None, None, 0.2, 0, 0, 32, 32, 16, False, True, True))


# --------------------------------------------------------------------------
# Demo and examples
# --------------------------------------------------------------------------
def test_demo_runs_and_is_accurate(tmp_path):
    from sparge.demo import run_demo

    lines = []
    png = tmp_path / "mask.png"
    res = run_demo(device="cpu", plot=str(png), T=4, size=16, heads=4, repeats=1, print_fn=lines.append)
    assert png.stat().st_size > 1000
    assert 0.0 < res["density"] < 0.9, res
    assert res["rel_l1"] < 0.05 and res["cosine"] > 0.995, res
    assert any("density" in line for line in lines)


def test_cli_demo_small():
    r = subprocess.run([sys.executable, "-m", "sparge", "demo", "--frames", "2", "--size", "8", "--heads", "2",
                        "--repeats", "1"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "relative L1" in r.stdout


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "examples").glob("*.py")))
def test_examples_run(script):
    # examples of an integration need that library (the test extra installs it)
    for lib in ("transformers", "diffusers"):
        if script.startswith(lib):
            pytest.importorskip(lib)
    r = subprocess.run([sys.executable, str(ROOT / "examples" / script)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.parametrize("alignment", ["top_left", "bottom_right"])
def test_key_padding_mask_with_causal(alignment):
    q, k, v = _qkv(B=2, Lq=150, Lk=200)
    pad = torch.ones(2, 200, dtype=torch.bool)
    pad[0, :30] = False  # left padding
    pad[1, 170:] = False
    e = sparge.reference.last_visible_key(150, 200, alignment)
    mask = pad[:, None, None, :] & (torch.arange(200)[None, :] <= e[:, None])
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    ref = torch.where(mask.any(-1, keepdim=True), ref, torch.zeros_like(ref))
    for topk in (1.0, 0.4):
        out = sparge.attn(q, k, v, is_causal=True, causal_alignment=alignment, key_padding_mask=pad, topk=topk)
        if topk == 1.0:
            assert (out - ref).abs().max() < 1e-5
        assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="key_padding_mask"):
        sparge.attn(q, k, v, attn_mask=pad[:, None, None], key_padding_mask=pad)
    with pytest.raises(TypeError, match="key_padding_mask"):
        sparge.attn(q, k, v, key_padding_mask=pad.float())
    # the SDPA fallback (dropout) honours it too
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        out = sparge.attn(q, k, v, is_causal=True, causal_alignment=alignment, key_padding_mask=pad, dropout_p=1e-9)
    assert (out - ref).abs().max() < 1e-4


def test_decompose_bool_mask():
    from sparge._args import decompose_mask as _decompose_bool_mask

    pad = torch.ones(2, 50, dtype=torch.bool)
    pad[1, :7] = False
    for alignment in (None, "top_left", "bottom_right"):
        m = pad[:, None, None, :].expand(2, 1, 40, 50)
        if alignment is not None:
            e = sparge.reference.last_visible_key(40, 50, alignment)
            m = m & (torch.arange(50)[None, :] <= e[:, None])
        got = _decompose_bool_mask(m, 40, 50)
        assert got is not None and got[0] == alignment
        # keys no query sees are padding too (top-left: keys past the last query)
        assert torch.equal(got[1], m[:, 0].any(1))
    band = torch.ones(40, 50, dtype=torch.bool).tril(10).triu(-5)  # sliding window: not causal AND padding
    assert _decompose_bool_mask(band, 40, 50) is None
    assert _decompose_bool_mask(torch.zeros(1, 1, 40, 50), 40, 50) is None  # float mask
    assert _decompose_bool_mask(torch.ones(2, 3, 40, 50, dtype=torch.bool), 40, 50) is None  # per-head mask
