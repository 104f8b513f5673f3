// attn_sm90.cuh — block-sparse FlashAttention forward for Hopper (sm_90a):
// warp-specialized, TMA + mbarrier ring, wgmma from shared-memory
// descriptors. Kernel template first, then its launcher. Same semantics as
// attn_sm80.cuh (sparge.h sparge_block_sparse_attn; executable form
// sparge/reference.py block_sparse_attn).
//
// CTA = one q-block of BQ = 128 rows of one (batch, q-head), 3 warpgroups:
//  - WG0, producer: warp 0 walks the block-mask row (32 mask bytes per
//    ballot) and packs the kept, causally allowed k-blocks (BK = 64 keys, the
//    mask's resolution) two by two into the stages of a shared-memory ring:
//    stage s holds K and V of blocks (ja, jb), any two kept blocks, one after
//    the other, so a stage is a [128, D] key tile. The TMA copies complete on
//    the stage's mbarriers; the block indices and key-padding bits sit beside
//    the stage. Q is loaded once. A final stage with ja = -1 ends the row.
//    The producer gives most of its registers to the consumers (setmaxnreg).
//  - WG1, WG2, consumers: each owns 64 query rows. Per stage t:
//    S(t) = Q [K_ja; K_jb]^T as m64n128 wgmmas (both operands in shared
//    memory, K-major), exact masking where a block crosses the causal
//    boundary / the end of the sequence / padded keys (a missing jb is -inf),
//    online softmax in the log2 domain in registers, the PV-skip vote of each
//    block over the warpgroup, then O += P V (P from registers, V N-major).
//    Intra-warpgroup pipeline: S(t+1) is issued before P(t).V(t), and the
//    softmax of t+1 runs while P(t).V(t) is on the tensor cores; O is
//    rescaled once P(t).V(t) has completed. The two consumer warpgroups run
//    independently, so one's softmax also overlaps the other's matrix work.
// Pairing keeps the mask at 64-key resolution (the sparsity the prediction
// finds) while the tensor cores see 128-key tiles (half the barrier round
// trips and O rescales per key).
//
// PV-skip granularity: one warpgroup (64 query rows, pv_group 64) x one
// k-block, decided by a vote over the warpgroup (bar.red.and). A skipped
// block's exp2 and row-sum work is skipped and it enters P.V with P = 0: the
// P.V wgmmas themselves always run (see issue_pv for why).
// Within a pair, block jb's decision sees the running max after ja, exactly
// as if the blocks were processed one after the other.
//
// Shared memory tiles are written by the TMA with 128-byte swizzling, as
// chunks of 64 columns: [D/64][rows][64] 16-bit, each chunk 1024-aligned.
#ifndef SPARGE_CUDA_ATTN_SM90_CUH_
#define SPARGE_CUDA_ATTN_SM90_CUH_

#include <cuda.h>
#include <cuda_runtime.h>
#include <math_constants.h>
#include <stdint.h>

#include <type_traits>

#include "../geometry.h"
#include "../tile_config.h"
#include "attn_params.h"
#include "common.cuh"
#include "common_sm90.cuh"
#include "host.h"

namespace sparge_cuda {

template <int D_, int STAGES_>
struct Sm90Cfg {
  static constexpr int kD = D_;
  static constexpr int kBQ = 128;  // 2 consumer warpgroups x 64 rows
  static constexpr int kBK = 64;   // keys per k-block (mask resolution)
  static constexpr int kTN = 2 * kBK;  // keys per stage: a pair of k-blocks
  static constexpr int kStages = STAGES_;
  static constexpr int kConsumers = 2;
  static constexpr int kThreads = 128 * (1 + kConsumers);
  static constexpr int kWM = 64;  // rows per consumer warpgroup = PV-skip row group
  static constexpr int kChunks = kD / 64;
  static constexpr int kQBytes = kBQ * kD * 2;
  static constexpr int kBlockBytes = kBK * kD * 2;     // K or V of one k-block
  static constexpr int kStageBytes = 2 * kBlockBytes;  // K or V of a pair: [D/64][128][64]
  static constexpr int kChunkRowBytes = kTN * 128;     // one 64-column chunk of a stage
  static constexpr int kQOff = 0;
  static constexpr int kKOff = kQBytes;
  static constexpr int kVOff = kKOff + kStages * kStageBytes;
  static constexpr int kBarOff = kVOff + kStages * kStageBytes;  // q_full, k_full[S], v_full[S], empty[S]
  static constexpr int kBlkOff = kBarOff + 8 * (1 + 3 * kStages);  // [S][2] k-block indices
  static constexpr int kBitsOff = kBlkOff + 8 * kStages;           // [S][2][BK/32] key-padding bits
  static constexpr int kUsed = kBitsOff + 4 * kStages * 2 * (kBK / 32);
  static constexpr int kSmemBytes = kUsed + 1024;  // + alignment of the base to 1024
  static constexpr int kProducerRegs = 40, kConsumerRegs = 232;
  static_assert(kD % 64 == 0 && kD <= 128, "head dim: 64 or 128 (N of the P.V wgmma)");
  static_assert(kProducerRegs * 128 + kConsumerRegs * 128 * kConsumers <= 65536, "register file");
  static_assert(kSmemBytes <= 232448, "shared memory per block (227 KB)");
};

namespace sm90 {
constexpr float kLn2 = 0.6931471805599453f;
}

template <typename T, class C>
__global__ void __launch_bounds__(C::kThreads, 1)
    attn_sm90_kernel(const __grid_constant__ AttnParams p, const __grid_constant__ CUtensorMap tmap_q,
                     const __grid_constant__ CUtensorMap tmap_k, const __grid_constant__ CUtensorMap tmap_v) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using namespace sm90;
  using E = Elem<T>;
  constexpr int D = C::kD, BK = C::kBK, TN = C::kTN, S = C::kStages, BQ = C::kBQ;
  constexpr int NS = TN / 2;  // score accumulators per thread [64, 128]
  constexpr int NO = D / 2;   // output accumulators per thread [64, D]
  constexpr int KW = BK / 32; // key-padding words per block
  const float kNegInf = -CUDART_INF_F;

  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const uint32_t raw = smem_u32(smem_raw);
  const uint32_t base = (raw + 1023u) & ~1023u;
  unsigned char *smem = smem_raw + (base - raw);
  const uint32_t sQ = base + C::kQOff;  // [D/64][BQ][64]       swizzled
  const uint32_t sK = base + C::kKOff;  // [S][D/64][2*BK][64]  swizzled
  const uint32_t sV = base + C::kVOff;  // [S][D/64][2*BK][64]  swizzled
  const uint32_t bar_q = base + C::kBarOff;
  auto bar_k = [&](int s) { return base + C::kBarOff + 8u * (1 + s); };
  auto bar_v = [&](int s) { return base + C::kBarOff + 8u * (1 + S + s); };
  auto bar_e = [&](int s) { return base + C::kBarOff + 8u * (1 + 2 * S + s); };
  volatile int *s_blk = reinterpret_cast<volatile int *>(smem + C::kBlkOff);
  volatile uint32_t *s_bits = reinterpret_cast<volatile uint32_t *>(smem + C::kBitsOff);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, wg = warp >> 2;

  // ---- tile coordinates (attn_cta_tile: the order of every family) ----
  int qi, bh;
  attn_cta_tile(p, (int)blockIdx.x, qi, bh);
  const int b = bh / p.Hq, h = bh - b * p.Hq;
  const int hk = h / p.rep;
  const int r0 = qi * BQ;
  const int nr = sparge_block_len(qi, BQ, p.Lq);  // valid rows of the tile, >= 1
  // causally allowed k-blocks [0, n_allowed) (geometry.h, as the CPU and sm80)
  const int n_allowed = sparge_allowed_blocks(sparge_last_visible_key(p.causal, r0 + nr - 1, p.causal_off, p.Lk), BK);

  if (tid == 0) {
    mbar_init(bar_q, 1);
    for (int s = 0; s < S; ++s) {
      mbar_init(bar_k(s), 1);
      mbar_init(bar_v(s), 1);
      mbar_init(bar_e(s), 4 * C::kConsumers);  // lane 0 of every consumer warp
    }
    mbar_init_fence();
  }
  __syncthreads();

  if (wg == 0) {
    // ======================= producer =======================
    regs_dealloc<C::kProducerRegs>();
    if (warp == 0) {
      if (lane == 0) {
        tma_prefetch_map(&tmap_q);
        tma_prefetch_map(&tmap_k);
        tma_prefetch_map(&tmap_v);
        mbar_arrive_expect_tx(bar_q, C::kQBytes);
#pragma unroll
        for (int c = 0; c < C::kChunks; ++c) tma_load_4d(sQ + c * BQ * 128, &tmap_q, bar_q, c * 64, r0, h, b);
      }
      const uint8_t *mrow = p.mask + b * p.m_sb + h * p.m_sh + qi * p.m_si;
      const uint8_t *kprow = p.kpad != nullptr ? p.kpad + b * p.kp_sb : nullptr;
      // Fills stage `it % S` with blocks ja and jb (jb = -1: none); ja = -1 ends the row.
      auto fill = [&](int it, int ja, int jb) {
        const int s = it % S;
        mbar_wait(bar_e(s), ((uint32_t)(it / S) & 1u) ^ 1u);  // the consumers released stage s
        if (ja < 0) {
          if (lane == 0) {
            s_blk[2 * s] = -1;
            mbar_arrive(bar_k(s));
          }
          return;
        }
        if (kprow != nullptr) {
#pragma unroll
          for (int hb = 0; hb < 2; ++hb) {
            const int j = hb == 0 ? ja : jb;
            if (j < 0) continue;
#pragma unroll
            for (int w = 0; w < KW; ++w) {
              const int key = j * BK + 32 * w + lane;
              const uint32_t kb = __ballot_sync(0xffffffffu, key < p.Lk && __ldg(kprow + (int64_t)key * p.kp_sl) != 0);
              if (lane == 0) s_bits[(s * 2 + hb) * KW + w] = kb;
            }
          }
        }
        if (lane == 0) {
          s_blk[2 * s] = ja;
          s_blk[2 * s + 1] = jb;
          // A missing second block is loaded from past the end of the keys: the
          // TMA fills it with zeros (P.V always runs over both halves).
          const int jbl = jb >= 0 ? jb : p.nk;
          const uint32_t bytes = 2u * C::kBlockBytes;
          const uint32_t k0 = sK + s * C::kStageBytes, v0 = sV + s * C::kStageBytes;
          mbar_arrive_expect_tx(bar_k(s), bytes);
#pragma unroll
          for (int c = 0; c < C::kChunks; ++c) {
            tma_load_4d(k0 + c * C::kChunkRowBytes, &tmap_k, bar_k(s), c * 64, ja * BK, hk, b);
            tma_load_4d(k0 + c * C::kChunkRowBytes + BK * 128, &tmap_k, bar_k(s), c * 64, jbl * BK, hk, b);
          }
          mbar_arrive_expect_tx(bar_v(s), bytes);
#pragma unroll
          for (int c = 0; c < C::kChunks; ++c) {
            tma_load_4d(v0 + c * C::kChunkRowBytes, &tmap_v, bar_v(s), c * 64, ja * BK, hk, b);
            tma_load_4d(v0 + c * C::kChunkRowBytes + BK * 128, &tmap_v, bar_v(s), c * 64, jbl * BK, hk, b);
          }
        }
        __syncwarp();
      };
      int it = 0, pending = -1;
      for (int jw = 0; jw < n_allowed; jw += 32) {
        const int jj = jw + lane;
        uint32_t bits = __ballot_sync(0xffffffffu, jj < n_allowed && __ldg(mrow + (int64_t)jj * p.m_sj) != 0);
        while (bits != 0u) {
          const int j = jw + __ffs(bits) - 1;
          bits &= bits - 1u;
          if (pending < 0) {
            pending = j;
          } else {
            fill(it++, pending, j);
            pending = -1;
          }
        }
      }
      if (pending >= 0) fill(it++, pending, -1);
      fill(it, -1, -1);  // end of the row
    }
  } else {
    // ======================= consumers =======================
    regs_alloc<C::kConsumerRegs>();
    const int cw = wg - 1;        // consumer index
    const int wl = warp & 3;      // warp within the warpgroup
    const int g = lane >> 2, t4 = lane & 3;
    const int row_first = r0 + cw * 64;             // first query row of the warpgroup
    const int qrow0 = row_first + wl * 16 + g;      // rows qrow0 and qrow0 + 8
    const bool kpad_on = p.kpad != nullptr;
    const bool pv_on = p.pv != nullptr;
    const float lam = pv_on ? __ldg(p.pv + h * p.pv_s) : 0.0f;
    // log2 domain: raw dot products are kept when scale > 0 (as sm80); else scaled in place
    const float sc_in = p.scale_log2;
    const bool prescale = !(sc_in > 0.0f);
    const float sc = prescale ? 1.0f : sc_in;

    float o[NO];
#pragma unroll
    for (int i = 0; i < NO; ++i) o[i] = 0.0f;
    float m_run[2] = {kNegInf, kNegInf}, l_run[2] = {0.0f, 0.0f};
    int nskip = 0, kept = 0;

    // S = Q [K_ja; K_jb]^T of stage s: [64, 128] per warpgroup, fp32 (issued, not waited)
    auto issue_qk = [&](float (&acc)[NS], int s) {
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        const int c = kk / 4, w = kk % 4;
        const uint64_t da = make_desc(sQ + c * BQ * 128 + cw * 64 * 128 + w * 32, 16, 1024);
        const uint64_t db = make_desc(sK + s * C::kStageBytes + c * C::kChunkRowBytes + w * 32, 16, 1024);
        sm90::Wgmma<T, TN>::template ss<0>(acc, da, db, kk > 0 ? 1 : 0);
      }
      wgmma_commit();
    };
    // O += P V of stage s (issued, not waited). Always every k-step: a
    // branch around wgmmas whose group is waited for later makes ptxas
    // serialize all of them (C7514/C7520, measured 20 % slower), so skipped
    // blocks enter with P = 0 and a missing second block with V = 0.
    auto issue_pv = [&](const uint32_t (&pa)[TN / 16][4], int s) {
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < TN / 16; ++kk) {
        const uint64_t db = make_desc(sV + s * C::kStageBytes + kk * 16 * 128, C::kChunkRowBytes, 1024);
        sm90::Wgmma<T, D>::template rs<1>(o, pa[kk], db, 1);
      }
      wgmma_commit();
    };
    // Masking, online softmax and PV-skip votes of the pair (ja, jb) (scores
    // in acc, replaced by P in place); the rescale factor of O to alpha.
    // use[hb]: block hb contributes to P.V.
    auto softmax = [&](float (&acc)[NS], int ja, int jb, int s, bool first, bool (&use)[2], float (&alpha)[2]) {
      if (prescale) {
#pragma unroll
        for (int i = 0; i < NS; ++i) acc[i] *= sc_in;
      }
#pragma unroll
      for (int hb = 0; hb < 2; ++hb) {
        const int j = hb == 0 ? ja : jb;
        if (j < 0) {  // no second block: its columns take no part
#pragma unroll
          for (int i = 0; i < NS / 2; ++i) acc[hb * NS / 2 + i] = kNegInf;
          continue;
        }
        const int c0 = j * BK;
        if (kpad_on || c0 + BK > p.Lk ||
            (p.causal && sparge_causal_block_partial(row_first, p.causal_off, c0 + BK - 1))) {
          uint32_t kbits[KW];
#pragma unroll
          for (int w = 0; w < KW; ++w) kbits[w] = kpad_on ? s_bits[(s * 2 + hb) * KW + w] : ~0u;
#pragma unroll
          for (int hf = 0; hf < 2; ++hf) {
            const int lim = sparge_last_visible_key(p.causal, qrow0 + 8 * hf, p.causal_off, p.Lk);
            const int rel = max(lim, -1) - c0;
#pragma unroll
            for (int nt = 0; nt < BK / 8; ++nt)
#pragma unroll
              for (int e = 0; e < 2; ++e) {
                const int col = nt * 8 + 2 * t4 + e;
                if (col > rel || !((kbits[(nt * 8) / 32] >> (col & 31)) & 1u))
                  acc[4 * (hb * BK / 8 + nt) + 2 * hf + e] = kNegInf;
              }
          }
        }
      }
      // block maxima (per half when PV skip is on), new running max
      float bmax[2][2], m_new[2], m_mid[2];
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        float xa = kNegInf, xb = kNegInf;
#pragma unroll
        for (int nt = 0; nt < BK / 8; ++nt) {
          xa = fmaxf(xa, fmaxf(acc[4 * nt + 2 * hf], acc[4 * nt + 2 * hf + 1]));
          xb = fmaxf(xb, fmaxf(acc[4 * (BK / 8 + nt) + 2 * hf], acc[4 * (BK / 8 + nt) + 2 * hf + 1]));
        }
        if (pv_on) {
          xa = quad_max(xa) * sc;
          xb = quad_max(xb) * sc;
        } else {
          xa = quad_max(fmaxf(xa, xb)) * sc;
          xb = kNegInf;
        }
        bmax[0][hf] = xa;
        bmax[1][hf] = xb;
        m_mid[hf] = fmaxf(m_run[hf], xa);   // running max after ja
        m_new[hf] = fmaxf(m_mid[hf], xb);   // after jb
      }
      use[0] = true;
      use[1] = jb >= 0;
      if (pv_on) {
        // a block is skipped when every valid row of the warpgroup has
        // rowmax(block) <= running max before the block - lambda (ja: m_run,
        // jb: m_mid, the max after ja), so a block that raises it never is
        bool agree_a = true, agree_b = true;
#pragma unroll
        for (int hf = 0; hf < 2; ++hf)
          if (qrow0 + 8 * hf < p.Lq) {
            if (!(bmax[0][hf] <= m_run[hf] - lam)) agree_a = false;
            if (!(bmax[1][hf] <= m_mid[hf] - lam)) agree_b = false;
          }
        if (!first && bar_and(1 + cw, 128, agree_a)) use[0] = false;
        if (jb >= 0 && bar_and(1 + cw, 128, agree_b)) use[1] = false;
        if (lane == 0 && wl == 0 && row_first < p.Lq) nskip += (int)!use[0] + (int)(jb >= 0 && !use[1]);
      }
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        alpha[hf] = m_new[hf] == kNegInf ? 1.0f : fast_exp2(m_run[hf] - m_new[hf]);
        const float mu = m_new[hf] == kNegInf ? 0.0f : m_new[hf];
        float sum = 0.0f;
#pragma unroll
        for (int hb = 0; hb < 2; ++hb) {
#pragma unroll
          for (int nt = 0; nt < BK / 8; ++nt)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              float &x = acc[4 * (hb * BK / 8 + nt) + 2 * hf + e];
              const float pe = use[hb] ? fast_exp2(fmaf(x, sc, -mu)) : 0.0f;
              x = pe;
              sum += pe;
            }
        }
        l_run[hf] = l_run[hf] * alpha[hf] + sum;
        m_run[hf] = m_new[hf];
      }
    };
    auto pack = [&](const float (&acc)[NS], uint32_t (&pa)[TN / 16][4]) {
#pragma unroll
      for (int kk = 0; kk < TN / 16; ++kk) {
        pa[kk][0] = E::pack(acc[8 * kk + 0], acc[8 * kk + 1]);  // row g,   keys 16kk+2t..
        pa[kk][1] = E::pack(acc[8 * kk + 2], acc[8 * kk + 3]);  // row g+8, keys 16kk+2t..
        pa[kk][2] = E::pack(acc[8 * kk + 4], acc[8 * kk + 5]);  // row g,   keys 16kk+8+2t..
        pa[kk][3] = E::pack(acc[8 * kk + 6], acc[8 * kk + 7]);  // row g+8, keys 16kk+8+2t..
      }
    };
    auto rescale = [&](const float (&alpha)[2]) {
      if (!__all_sync(0xffffffffu, alpha[0] == 1.0f && alpha[1] == 1.0f)) {
#pragma unroll
        for (int i = 0; i < NO; ++i) o[i] *= alpha[(i >> 1) & 1];
      }
    };
    auto release = [&](int s) {
      __syncwarp();
      if (lane == 0) mbar_arrive(bar_e(s));
    };

    mbar_wait(bar_q, 0);
    mbar_wait(bar_k(0), 0);
    int ja = s_blk[0];
    if (ja >= 0) {
      int jb = s_blk[1];
      uint32_t pa[TN / 16][4];
      bool use[2];
      {
        float acc[NS], alpha[2];
        issue_qk(acc, 0);
        wgmma_wait<0>();
        fence_regs(acc);
        softmax(acc, ja, jb, 0, true, use, alpha);  // alpha = 1: O is still zero
        pack(acc, pa);
      }
      int t = 0;  // pa/use belong to stage t (blocks ja, jb)
      for (;;) {
        kept += jb >= 0 ? 2 : 1;
        const int sp = t % S, sn = (t + 1) % S;
        mbar_wait(bar_k(sn), (uint32_t)((t + 1) / S) & 1u);
        const int ja_n = s_blk[2 * sn];
        if (ja_n < 0) {
          // last stage: O += P(t) V(t)
          mbar_wait(bar_v(sp), (uint32_t)(t / S) & 1u);
          issue_pv(pa, sp);
          wgmma_wait<0>();
          fence_regs(o);
          fence_regs(pa);
          release(sp);
          break;
        }
        const int jb_n = s_blk[2 * sn + 1];
        float acc[NS], alpha[2];
        bool use_n[2];
        issue_qk(acc, sn);                              // S(t+1) runs while ...
        mbar_wait(bar_v(sp), (uint32_t)(t / S) & 1u);
        issue_pv(pa, sp);               // ... P(t) V(t) is queued behind it
        wgmma_wait<1>();                                // S(t+1) done; P.V(t) may still run
        fence_regs(acc);
        softmax(acc, ja_n, jb_n, sn, false, use_n, alpha);
        wgmma_wait<0>();  // P.V(t) done: O may be rescaled, P(t) and stage t released
        fence_regs(o);
        fence_regs(pa);
        release(sp);
        rescale(alpha);
        pack(acc, pa);
        use[0] = use_n[0];
        use[1] = use_n[1];
        jb = jb_n;
        ++t;
      }
    }
    // ==== epilogue: out = O / l (0 for rows that saw no key), lse ====
    T *og = static_cast<T *>(p.out) + b * p.o_sb + h * p.o_sh;
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const float l = quad_sum(l_run[hf]);
      const int qrow = qrow0 + 8 * hf;
      if (qrow < p.Lq) {
        const float inv = l > 0.0f ? 1.0f / l : 0.0f;
        T *orow = og + (int64_t)qrow * p.o_sl + 2 * t4;
#pragma unroll
        for (int nt = 0; nt < D / 8; ++nt)
          *reinterpret_cast<uint32_t *>(orow + nt * 8) = E::pack(o[4 * nt + 2 * hf] * inv, o[4 * nt + 2 * hf + 1] * inv);
        if (p.lse != nullptr && t4 == 0)
          p.lse[b * p.lse_sb + h * p.lse_sh + (int64_t)qrow * p.lse_sl] =
              l > 0.0f ? (m_run[hf] + log2f(l)) * kLn2 : kNegInf;
      }
    }
    // ==== stats (zeroed by the launcher): allowed, kept, PV units, PV skipped ====
    if (p.stats != nullptr && lane == 0 && wl == 0) {
      unsigned long long *st = p.stats + b * p.st_sb + h * p.st_sh;
      if (cw == 0) {
        const int groups = (nr + C::kWM - 1) / C::kWM;
        if (n_allowed > 0) atomicAdd(st, (unsigned long long)n_allowed);
        if (kept > 0) {
          atomicAdd(st + p.st_si, (unsigned long long)kept);
          atomicAdd(st + 2 * p.st_si, (unsigned long long)kept * (unsigned long long)groups);
        }
      }
      if (nskip > 0) atomicAdd(st + 3 * p.st_si, (unsigned long long)nskip);
    }
  }
#endif  // __CUDA_ARCH_FEAT_SM90_ALL
}

// ---------------------------------------------------------------------------
// Launcher
// ---------------------------------------------------------------------------
namespace sm90 {

using EncodeTiledFn = CUresult (*)(CUtensorMap *, CUtensorMapDataType, cuuint32_t, void *, const cuuint64_t *,
                                   const cuuint64_t *, const cuuint32_t *, const cuuint32_t *, CUtensorMapInterleave,
                                   CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

// cuTensorMapEncodeTiled through the runtime's driver entry point (no libcuda
// link); null when the driver does not provide it.
inline EncodeTiledFn encode_tiled() {
  static EncodeTiledFn fn = []() -> EncodeTiledFn {
    void *f = nullptr;
    cudaDriverEntryPointQueryResult q;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess)
      return nullptr;
    return reinterpret_cast<EncodeTiledFn>(f);
  }();
  return fn;
}

// Tensor map of a [B, H, L, D] 16-bit tensor (element strides sb, sh, sl;
// unit last stride), box = 64 columns x `rows` rows of one (b, h), 128-byte
// swizzle, zero fill past L. Strides of size-1 dimensions are never used and
// are replaced by a valid one. False when the TMA cannot describe it.
inline bool make_tensor_map(CUtensorMap *map, const void *ptr, bool bf16, int64_t B, int64_t H, int64_t L, int64_t D,
                            int64_t sb, int64_t sh, int64_t sl, int rows) {
  EncodeTiledFn fn = encode_tiled();
  if (fn == nullptr) return false;
  auto fix = [](int64_t n, int64_t stride_el) -> cuuint64_t {
    return n > 1 ? (cuuint64_t)(stride_el * 2) : (cuuint64_t)16;
  };
  const cuuint64_t dims[4] = {(cuuint64_t)D, (cuuint64_t)L, (cuuint64_t)H, (cuuint64_t)B};
  const cuuint64_t strides[3] = {fix(L, sl), fix(H, sh), fix(B, sb)};
  for (int i = 0; i < 3; ++i)
    if (strides[i] % 16 != 0 || strides[i] >= (1ull << 40)) return false;
  if (((uintptr_t)ptr) % 16 != 0) return false;
  const cuuint32_t box[4] = {64, (cuuint32_t)rows, 1, 1};
  const cuuint32_t estr[4] = {1, 1, 1, 1};
  return fn(map, bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 4, const_cast<void *>(ptr),
            dims, strides, box, estr, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
            CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

}  // namespace sm90

// Enqueues the kernel of configuration C (grid = nq * B * Hq CTAs; the
// current device must be the tensors'). cudaErrorNotSupported when the
// tensors' layout cannot be described by a tensor map (the caller falls back).
template <typename T, class C>
cudaError_t launch_sm90_cfg(const AttnParams &p, unsigned grid, cudaStream_t stream) {
  constexpr bool kBf16 = std::is_same<T, __nv_bfloat16>::value;
  const int64_t Hkv = p.Hq / p.rep;
  CUtensorMap tq, tk, tv;
  if (!sm90::make_tensor_map(&tq, p.q, kBf16, p.B, p.Hq, p.Lq, C::kD, p.q_sb, p.q_sh, p.q_sl, C::kBQ) ||
      !sm90::make_tensor_map(&tk, p.k, kBf16, p.B, Hkv, p.Lk, C::kD, p.k_sb, p.k_sh, p.k_sl, C::kBK) ||
      !sm90::make_tensor_map(&tv, p.v, kBf16, p.B, Hkv, p.Lk, C::kD, p.v_sb, p.v_sh, p.v_sl, C::kBK))
    return cudaErrorNotSupported;
  const cudaError_t err = allow_dynamic_smem<attn_sm90_kernel<T, C>>(C::kSmemBytes);
  if (err != cudaSuccess) return err;
  attn_sm90_kernel<T, C><<<grid, C::kThreads, C::kSmemBytes, stream>>>(p, tq, tk, tv);
  return cudaGetLastError();
}

template <int D>
using Sm90CfgFor = Sm90Cfg<D, AttnTileSm90<D>::kStages>;

// Head dim D with the tile of the table (csrc/tile_config.h).
template <typename T, int D>
cudaError_t launch_attn_sm90(const AttnParams &p, unsigned grid, cudaStream_t stream) {
  return launch_sm90_cfg<T, Sm90CfgFor<D>>(p, grid, stream);
}

}  // namespace sparge_cuda

#endif  // SPARGE_CUDA_ATTN_SM90_CUH_
