"""Quickstart: sparge.attn as a drop-in for torch's scaled_dot_product_attention."""
import torch
import torch.nn.functional as F

import sparge

device = "cuda" if sparge.cuda_available() else "cpu"
dtype = torch.bfloat16 if device == "cuda" else torch.float32
B, H, L, D = 1, 8, 2048, 64
q, k, v = (torch.randn(B, H, L, D, device=device, dtype=dtype) for _ in range(3))

# dense equivalent: topk=1.0 gives (up to precision) exactly SDPA's result
out_dense = sparge.attn(q, k, v, is_causal=True, topk=1.0)
ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
print(f"topk=1.0: max |sparge - sdpa| = {(out_dense.float() - ref.float()).abs().max().item():.2e}")

# sparse: keep the top 25% of blocks per query block, skip negligible P.V
out, stats = sparge.attn(q, k, v, is_causal=True, topk=0.25, pv_threshold=8.0, return_stats=True)
print(f"topk=0.25: density {stats['density'].mean().item():.3f}, "
      f"PV skipped {stats['pv_skip_fraction'].mean().item():.3f}, output shape {tuple(out.shape)}")

# the two stages separately: predict a block mask, then run the kernel on it
mask = sparge.predict(q, k, is_causal=True, cdf_threshold=0.9)
out2 = sparge.block_sparse_attn(q, k, v, mask, is_causal=True)
print(f"cdf_threshold=0.9: mask {tuple(mask.shape)}, kept {mask.float().mean().item():.3f} of all blocks")
