"""Honest precision (issue 13, item 4): float32 inputs meet float32 tolerance
by default on every backend; the 16-bit CUDA path for float32 inputs is
opt-in by ``precision="bf16"``/``"fp16"``."""
import warnings

import pytest
import torch
import torch.nn.functional as F

import sparge
from sparge import _args


@pytest.mark.parametrize("device,dtype,precision,path", [
    ("cpu", torch.float32, "auto", _args.NATIVE),     # the CPU computes fp32 in fp32
    ("cpu", torch.float32, "bf16", _args.NATIVE),     # (16-bit names only checked there)
    ("cpu", torch.bfloat16, "auto", _args.NATIVE),
    ("cuda", torch.float16, "auto", _args.NATIVE),
    ("cuda", torch.bfloat16, "auto", _args.NATIVE),
    ("cuda", torch.bfloat16, "fp16", _args.NATIVE),
    ("cuda", torch.float32, "auto", _args.PRECISE),   # default: torch SDPA in fp32
    ("cuda", torch.float32, "bf16", _args.CAST_16),   # opt-in
    ("cuda", torch.float32, "fp16", _args.CAST_16),
    ("cuda", torch.float32, "int8", _args.PRECISE),   # no int8 kernel; never a silent 16-bit cast
    ("meta", torch.float32, "auto", _args.NATIVE),    # other devices: the device check decides
])
def test_compute_path_decision(device, dtype, precision, path):
    assert _args.compute_path(device, dtype, precision) == path


def test_precise_path_runs_fp32_sdpa_counted_and_warned_once(monkeypatch):
    """The wiring of the decision, on the CPU: a call the decision sends to the
    precise path runs torch SDPA in fp32 (equal to it), warns once, counts each call."""
    monkeypatch.setattr(_args, "compute_path", lambda device, dtype, precision: _args.PRECISE)
    sparge.reset_fallback_counts()
    q, k, v = (torch.randn(1, 2, 100, 32) for _ in range(3))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = sparge.attn(q, k, v, is_causal=True, topk=0.3)
        sparge.attn(q, k, v, is_causal=True, topk=0.3)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))
    assert sum("float32 inputs on CUDA" in str(x.message) for x in w) == 1
    assert sparge.fallback_counts() == {f"sparge.attn: {_args.FP32_CUDA_REASON}": 2}
    sparge.reset_fallback_counts()


def test_cpu_fp32_meets_fp32_tolerance_without_a_fallback():
    sparge.reset_fallback_counts()
    q, k, v = (torch.randn(1, 2, 300, 64) for _ in range(3))
    out = sparge.attn(q, k, v, topk=1.0)
    assert out.dtype == torch.float32
    assert (out - F.scaled_dot_product_attention(q, k, v)).abs().max().item() < 2e-5
    assert sparge.fallback_counts() == {}


def _rel_l1(a, b):
    return ((a.float() - b.float()).abs().sum() / b.float().abs().sum()).item()


@pytest.mark.cuda
def test_cuda_fp32_default_is_fp32_accurate_and_16_bit_is_opt_in():
    if not sparge.cuda_available():
        pytest.skip("no sparge CUDA kernels on this GPU")
    sparge.reset_fallback_counts()
    q, k, v = (torch.randn(1, 8, 2048, 128, device="cuda") for _ in range(3))
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double()).float()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = sparge.attn(q, k, v, topk=1.0, auto_dense=False)
    assert out.dtype == torch.float32
    assert _rel_l1(out, ref) < 1e-5, "fp32 inputs must meet fp32 tolerance by default"
    assert any("float32 inputs on CUDA" in str(x.message) for x in w)
    assert any("float32 inputs on CUDA" in key for key in sparge.fallback_counts())
    sparge.reset_fallback_counts()
    for prec in ("bf16", "fp16"):
        fast = sparge.attn(q, k, v, topk=1.0, auto_dense=False, precision=prec)
        assert fast.dtype == torch.float32
        assert 1e-5 < _rel_l1(fast, ref) < 2e-2, prec  # computed in 16 bits, as asked
    assert sparge.fallback_counts() == {}
