"""GPU checks (marked cuda; skipped without a GPU). Until the CUDA kernels land,
CUDA tensors take the documented fallbacks; these tests pin that behaviour and
that the CUDA part of the build matches the device."""
import warnings

import pytest
import torch
import torch.nn.functional as F

import sparge
from sparge import _lib

pytestmark = pytest.mark.cuda


def test_cuda_build_probes_device():
    assert _lib.cuda_compiled(), "nvcc was present at build time, the CUDA unit must be linked"
    reason = _lib.device_reason("cuda", torch.cuda.current_device())
    major, minor = torch.cuda.get_device_capability()
    # the probe names the device and the arch of the image the runtime picked
    assert reason is not None and f"sm_{major}{minor}" in reason, reason
    assert "cannot run" not in reason, reason


@pytest.mark.parametrize("causal", [False, True])
def test_attn_on_cuda_falls_back_to_sdpa(causal):
    q, k, v = (torch.randn(1, 4, 300, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    sparge.reset_fallback_counts()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = sparge.attn(q, k, v, is_causal=causal, topk=0.3)
    assert any("falling back" in str(x.message) for x in w)
    assert sum(sparge.fallback_counts().values()) == 1
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    assert torch.equal(out, ref)


def test_predict_and_kernel_on_cuda_match_cpu():
    q, k, v = (torch.randn(2, 4, 333, 64) for _ in range(3))
    mask_cpu = sparge.predict(q, k, topk=0.4, is_causal=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mask_gpu = sparge.predict(q.cuda(), k.cuda(), topk=0.4, is_causal=True)
        out_gpu = sparge.block_sparse_attn(q.cuda(), k.cuda(), v.cuda(), mask_cpu.cuda(), is_causal=True)
    assert (mask_gpu.cpu() != mask_cpu).float().mean().item() < 0.01
    out_cpu = sparge.block_sparse_attn(q, k, v, mask_cpu, is_causal=True)
    assert (out_gpu.cpu() - out_cpu).abs().max().item() < 1e-4
