// attn_params.h — the parameters every CUDA attention kernel family takes
// (attn_sm80.cuh, attn_sm90.cuh), filled once by the host
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

#ifdef __CUDACC__
// The q-block qi and the flat (batch, q-head) index bh of CTA `cta` (grid =
// nq * B * Hq), the same order for every kernel family. Causal: q-blocks in
// descending order, (batch, head) fastest, so the rows with the most blocks
// start first (load balance). Otherwise q-block fastest: the CTAs in flight
// share the K/V of few heads, which stay in L2.
__device__ __forceinline__ void attn_cta_tile(const AttnParams &p, int cta, int &qi, int &bh) {
  if (p.causal) {
    const int nbh = p.B * p.Hq;
    const int qrank = cta / nbh;
    bh = cta - qrank * nbh;
    qi = p.nq - 1 - qrank;
  } else {
    bh = cta / p.nq;
    qi = cta - bh * p.nq;
  }
}
#endif

}  // namespace sparge_cuda

#endif  // SPARGE_CUDA_ATTN_PARAMS_H_
