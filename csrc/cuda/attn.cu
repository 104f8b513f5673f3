// attn.cu — host side of the CUDA block-sparse attention forward: block shapes
// and the kernel to run, both from the registry (registry.cu), argument checks
// the kernels need beyond api.c's, and the launch.
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "../geometry.h"
#include "host.h"
#include "registry.h"

namespace {

using sparge_cuda::AttnKernel;
using sparge_cuda::AttnParams;
using sparge_cuda::cuda_error;
using sparge_cuda::DeviceGuard;
using sparge_cuda::find_attn_kernel;

bool multiple_of(uintptr_t x, uintptr_t m) { return x % m == 0; }

// 16-byte cp.async rows: base pointer and every non-last stride (in bytes)
// must be multiples of 16 (strides of size-1 dimensions are never used).
sparge_status_t check_rows16(const sparge_tensor_t *t, const char *name) {
  if (!multiple_of((uintptr_t)t->data, 16))
    return sparge_set_error(SPARGE_ERROR_MISALIGNED, "%s: data pointer is not 16-byte aligned", name);
  for (int i = 0; i < 3; ++i)
    if (t->shape[i] > 1 && (t->strides[i] * 2) % 16 != 0)
      return sparge_set_error(SPARGE_ERROR_MISALIGNED,
                              "%s: stride %lld of dimension %d is not a multiple of 8 elements (16 bytes)", name,
                              (long long)t->strides[i], i);
  return SPARGE_SUCCESS;
}

__global__ void zero_stats_kernel(unsigned long long *st, int64_t B, int64_t H, int64_t sb, int64_t sh,
                                  int64_t si) {
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= B * H * SPARGE_NUM_STATS) return;
  const int64_t s = i % SPARGE_NUM_STATS, bh = i / SPARGE_NUM_STATS;
  const int64_t b = bh / H, h = bh - b * H;
  st[b * sb + h * sh + s * si] = 0ull;
}

}  // namespace

extern "C" sparge_status_t sparge_cuda_block_shape(int32_t device_id, int64_t head_dim, int64_t head_dim_v,
                                                   int32_t dtype, int32_t precision, int32_t *out_block_q,
                                                   int32_t *out_block_k, int32_t *out_pv_group,
                                                   int32_t *out_precision) {
  const AttnKernel *kern = nullptr;
  const sparge_status_t st = find_attn_kernel(device_id, head_dim, head_dim_v, dtype, precision, &kern);
  if (st != SPARGE_SUCCESS) return st;
  if (out_block_q) *out_block_q = kern->block_q;
  if (out_block_k) *out_block_k = kern->block_k;
  if (out_pv_group) *out_pv_group = kern->pv_group;
  if (out_precision) *out_precision = kern->precision;
  return SPARGE_SUCCESS;
}

extern "C" size_t sparge_cuda_attn_workspace(const sparge_dims_t *d, const sparge_attn_params_t *p) {
  (void)d;
  (void)p;
  return 0;  // stats are zeroed in place and accumulated with atomics
}

extern "C" sparge_status_t sparge_cuda_attn(const sparge_dims_t *d, const sparge_tensor_t *q,
                                            const sparge_tensor_t *k, const sparge_tensor_t *v,
                                            const sparge_tensor_t *block_mask, const sparge_tensor_t *key_padding,
                                            const sparge_tensor_t *pv_threshold, const sparge_attn_params_t *p,
                                            const sparge_tensor_t *out, const sparge_tensor_t *out_lse,
                                            const sparge_tensor_t *out_stats, void *workspace, void *stream) {
  (void)workspace;
  const AttnKernel *kern = nullptr;
  sparge_status_t st = find_attn_kernel(q->device_id, d->D, d->Dv, q->dtype, p->precision, &kern);
  if (st != SPARGE_SUCCESS) return st;
  if (p->block_q != kern->block_q || p->block_k != kern->block_k)
    return sparge_set_error(SPARGE_ERROR_INVALID_VALUE,
                            "block_q/block_k: %d/%d, but the CUDA kernel for head dim %lld uses %d/%d "
                            "(see sparge_block_shape)",
                            (int)p->block_q, (int)p->block_k, (long long)d->D, kern->block_q, kern->block_k);
  if (p->pv_group != kern->pv_group)
    return sparge_set_error(SPARGE_ERROR_INVALID_VALUE,
                            "pv_group: %d, but the CUDA kernel for head dim %lld decides PV skips per %d rows "
                            "(see sparge_block_shape)",
                            (int)p->pv_group, (long long)d->D, kern->pv_group);

  // ---- alignment the kernel relies on ----
  st = check_rows16(q, "q");
  if (st == SPARGE_SUCCESS) st = check_rows16(k, "k");
  if (st == SPARGE_SUCCESS) st = check_rows16(v, "v");
  if (st != SPARGE_SUCCESS) return st;
  bool out_ok = multiple_of((uintptr_t)out->data, 4);
  for (int i = 0; i < 3; ++i) out_ok = out_ok && (out->shape[i] == 1 || out->strides[i] % 2 == 0);
  if (!out_ok)
    return sparge_set_error(SPARGE_ERROR_MISALIGNED,
                            "out: data pointer must be 4-byte aligned and strides even (2-element stores)");
  if (out_lse && !multiple_of((uintptr_t)out_lse->data, 4))
    return sparge_set_error(SPARGE_ERROR_MISALIGNED, "out_lse: data pointer is not 4-byte aligned");
  if (out_stats && !multiple_of((uintptr_t)out_stats->data, 8))
    return sparge_set_error(SPARGE_ERROR_MISALIGNED, "out_stats: data pointer is not 8-byte aligned");
  if (pv_threshold && !multiple_of((uintptr_t)pv_threshold->data, 4))
    return sparge_set_error(SPARGE_ERROR_MISALIGNED, "pv_threshold: data pointer is not 4-byte aligned");

  // ---- grid: one CTA per (q-block, batch, q-head); 32-bit row/key indices ----
  const int64_t ctas = d->nq * d->B * d->Hq;
  if (ctas > (int64_t)INT_MAX)
    return sparge_set_error(SPARGE_ERROR_NOT_SUPPORTED, "attention: %lld q-blocks x batch x heads exceed %d CTAs",
                            (long long)ctas, INT_MAX);
  const int64_t kMaxLen = (int64_t)INT_MAX - 1024;
  if (d->Lq > kMaxLen || d->Lk > kMaxLen)
    return sparge_set_error(SPARGE_ERROR_NOT_SUPPORTED, "attention: sequence lengths %lld/%lld exceed the CUDA "
                            "kernel's limit %lld", (long long)d->Lq, (long long)d->Lk, (long long)kMaxLen);

  AttnParams a;
  a.q = q->data;
  a.k = k->data;
  a.v = v->data;
  a.out = out->data;
  a.mask = static_cast<const uint8_t *>(block_mask->data);
  a.kpad = key_padding ? static_cast<const uint8_t *>(key_padding->data) : nullptr;
  a.pv = pv_threshold ? static_cast<const float *>(pv_threshold->data) : nullptr;
  a.lse = out_lse ? static_cast<float *>(out_lse->data) : nullptr;
  a.stats = out_stats ? static_cast<unsigned long long *>(out_stats->data) : nullptr;
  a.q_sb = q->strides[0], a.q_sh = q->strides[1], a.q_sl = q->strides[2];
  a.k_sb = k->strides[0], a.k_sh = k->strides[1], a.k_sl = k->strides[2];
  a.v_sb = v->strides[0], a.v_sh = v->strides[1], a.v_sl = v->strides[2];
  a.o_sb = out->strides[0], a.o_sh = out->strides[1], a.o_sl = out->strides[2];
  a.m_sb = block_mask->strides[0], a.m_sh = block_mask->strides[1];
  a.m_si = block_mask->strides[2], a.m_sj = block_mask->strides[3];
  a.kp_sb = key_padding ? key_padding->strides[0] : 0;
  a.kp_sl = key_padding ? key_padding->strides[1] : 0;
  a.pv_s = pv_threshold ? pv_threshold->strides[0] : 0;
  a.lse_sb = out_lse ? out_lse->strides[0] : 0;
  a.lse_sh = out_lse ? out_lse->strides[1] : 0;
  a.lse_sl = out_lse ? out_lse->strides[2] : 0;
  a.st_sb = out_stats ? out_stats->strides[0] : 0;
  a.st_sh = out_stats ? out_stats->strides[1] : 0;
  a.st_si = out_stats ? out_stats->strides[2] : 0;
  a.B = (int32_t)d->B;
  a.Hq = (int32_t)d->Hq;
  a.rep = (int32_t)(d->Hq / d->Hkv);
  a.Lq = (int32_t)d->Lq;
  a.Lk = (int32_t)d->Lk;
  a.causal = p->causal != SPARGE_CAUSAL_NONE;
  a.causal_off = (int32_t)sparge_causal_offset<int64_t>(p->causal, d->Lq, d->Lk);
  a.nq = (int32_t)d->nq;
  a.nk = (int32_t)d->nk;
  a.scale_log2 = p->scale * 1.4426950408889634f;

  DeviceGuard guard;
  cudaError_t err = guard.enter(q->device_id);
  if (err != cudaSuccess) return cuda_error(err, "cudaSetDevice");

  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (a.stats) {
    const int64_t n = d->B * d->Hq * SPARGE_NUM_STATS;
    const int threads = 256;
    zero_stats_kernel<<<(unsigned)((n + threads - 1) / threads), threads, 0, s>>>(a.stats, d->B, d->Hq, a.st_sb,
                                                                                   a.st_sh, a.st_si);
    err = cudaGetLastError();
    if (err != cudaSuccess) return cuda_error(err, "attention: stats reset launch");
  }
  err = kern->launch(a, (unsigned)ctas, s);
  if (err != cudaSuccess) return cuda_error(err, "attention kernel launch");
  return SPARGE_SUCCESS;
}
