"""Kernel vs fp32 reference on the call shapes of a chunked-prefill + decode
loop (bottom-right causal, left key padding, GQA), per head dim, with
FlashAttention's tolerance rule (tests/helpers.fa_check). A quick device check
for kernel tile changes beyond tests/test_cuda.py's shapes.

    python benchmarks/kernels/check_cases.py
"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests"))
from helpers import element_mask, fa_check, torch_masked_attention  # noqa: E402

import sparge  # noqa: E402
from sparge import reference  # noqa: E402


def main():
    dev = "cuda"
    worst = 0.0
    for D in (64, 128):
        for dtype in (torch.float16, torch.bfloat16):
            bq, bk = sparge.block_shape(dev, D, dtype=dtype)
            for Lq, Lk in [(200, 200), (80, 280), (1, 281), (1, 282), (18, 300), (333, 777)]:
                for align in ("bottom_right", "top_left"):
                    B, Hq, Hkv = 2, 4, 2
                    q = torch.randn(B, Hq, Lq, D, device=dev, dtype=dtype)
                    k = torch.randn(B, Hkv, Lk, D, device=dev, dtype=dtype)
                    v = torch.randn(B, Hkv, Lk, D, device=dev, dtype=dtype)
                    kpad = torch.ones(B, Lk, dtype=torch.bool, device=dev)
                    kpad[1, :37] = False  # left padding
                    mask = torch.ones(B, Hq, -(-Lq // bq), -(-Lk // bk), dtype=torch.bool, device=dev)
                    out = sparge.block_sparse_attn(q, k, v, mask, is_causal=True, causal_alignment=align,
                                                   key_padding_mask=kpad, enable_gqa=True)
                    ref, _, _ = reference.block_sparse_attn(q, k, v, mask, block_q=bq, block_k=bk, causal=align,
                                                            key_padding_mask=kpad)
                    em = element_mask(mask, Lq, Lk, bq, bk, align, kpad)
                    what = f"D={D} {dtype} ({Lq},{Lk}) {align} blocks {bq}x{bk}"
                    try:
                        used = fa_check(out, ref, torch_masked_attention(q, k, v, em), dtype, what)
                        worst = max(worst, used)
                    except AssertionError as e:
                        print("FAIL", e)
                        continue
                    assert (out[~em.any(-1)] == 0).all(), f"{what}: rows with no visible key must be 0"
                    # full API path (prediction + kernel) at top-k 1 equals the dense masked result
                    pm = sparge.predict(q, k, is_causal=True, causal_alignment=align, topk=1.0, enable_gqa=True)
                    sparge.block_sparse_attn(q, k, v, pm, is_causal=True, causal_alignment=align,
                                                    key_padding_mask=kpad, enable_gqa=True)
                    em2 = element_mask(pm, Lq, Lk, bq, bk, align, kpad)
                    if not torch.equal(em2, em):
                        print("MASK", what, "predicted top-k 1 mask drops visible keys:",
                              (em & ~em2).sum().item())
                    print(f"ok {what}: {100 * used:.0f}% of tolerance", flush=True)
    print(f"worst {100 * worst:.0f}% of tolerance")


if __name__ == "__main__":
    main()
