"""cuDNN / flash SDPA times on the lab's shapes (same run as attn_sm90_lab)."""
import torch
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel

for H, L, D, causal in [(16, 32768, 128, False), (32, 8192, 128, False), (32, 16384, 64, False), (16, 32768, 128, True)]:
    q, k, v = (torch.randn(1, H, L, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    row = []
    for name, be in [("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)]:
        with sdpa_kernel(be):
            t = triton.testing.do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal),
                                        return_mode="median")
        fl = 4 * H * L * L * D * (0.5 if causal else 1.0)
        row.append(f"{name} {t:7.3f} ms ({fl / t / 1e9:4.0f} TFLOPS)")
    print(f"sdpa H={H} L={L} D={D} causal={causal}: " + "  ".join(row), flush=True)
