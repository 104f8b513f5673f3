// attn_params.h — the parameters every CUDA attention kernel family takes
// (attn_sm80.cuh today; attn_sm90.cuh next), filled once by the host
// (csrc/cuda/attn.cu) from the validated descriptors and passed to the kernel
// by value. A plain struct of pointers, int64 strides (in elements) and
// 32-bit sizes, so that it means the same in host and device code and a new
// family needs no translation layer.
#ifndef SPARGE_CUDA_ATTN_PARAMS_H_
#define SPARGE_CUDA_ATTN_PARAMS_H_

#include <stdint.h>

namespace sparge_cuda {

// Shapes in sparge.h's names (q heads Hq, kv heads Hkv; D == Dv for the
// 16-bit kernels). The q/k/v element type is the kernel's template argument.
struct AttnParams {
  const void *q;                  // [B, Hq, Lq, D]   16-bit
  const void *k;                  // [B, Hkv, Lk, D]  16-bit
  const void *v;                  // [B, Hkv, Lk, D]  16-bit
  void *out;                      // [B, Hq, Lq, D]   16-bit
  const uint8_t *mask;            // [B, Hq, nq, nk]  bool/uint8
  const uint8_t *kpad;            // [B, Lk] bool/uint8, or null
  const float *pv;                // [Hq] lambda, or null (PV skip off)
  float *lse;                     // [B, Hq, Lq], or null
  unsigned long long *stats;      // [B, Hq, 4] int64 (zeroed before the launch), or null
  int64_t q_sb, q_sh, q_sl;
  int64_t k_sb, k_sh, k_sl;
  int64_t v_sb, v_sh, v_sl;
  int64_t o_sb, o_sh, o_sl;
  int64_t m_sb, m_sh, m_si, m_sj;
  int64_t kp_sb, kp_sl;
  int64_t pv_s;
  int64_t lse_sb, lse_sh, lse_sl;
  int64_t st_sb, st_sh, st_si;
  // Sizes. The host guarantees nq * B * Hq <= INT_MAX and Lq, Lk <= INT_MAX - 1024,
  // so every row, key and block index below fits in 32 bits.
  int32_t B, Hq, rep;             // rep = Hq / Hkv
  int32_t Lq, Lk;
  int32_t causal_off;             // causal: row r sees keys c <= r + causal_off (0 or Lk - Lq)
  int32_t nq, nk;
  int32_t causal;                 // 0/1
  float scale_log2;               // scale * log2(e)
};

}  // namespace sparge_cuda

#endif  // SPARGE_CUDA_ATTN_PARAMS_H_
