// attn_sm80.cuh — block-sparse FlashAttention forward with mma.sync (sm80+,
// also the sm90 path until a wgmma kernel exists): kernel template, then its
// launcher template. Semantics: sparge.h sparge_block_sparse_attn, executable
// form sparge/reference.py block_sparse_attn, CPU twin csrc/cpu/attn.c.
//
// Tiles and why: csrc/tile_config.h (AttnTileSm80).
#ifndef SPARGE_CUDA_ATTN_SM80_CUH_
#define SPARGE_CUDA_ATTN_SM80_CUH_

#include <cuda_runtime.h>
#include <math_constants.h>
#include <stdint.h>


#include "../geometry.h"
#include "../tile_config.h"
#include "attn_params.h"
#include "common.cuh"
#include "host.h"

namespace sparge_cuda {

// ---------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------
template <int D_, int BQ_, int BK_, int NWARPS_, int STAGES_, bool Q_IN_REGS_, int MIN_BLOCKS_>
struct AttnCfg {
  static constexpr int kD = D_;             // head dim of q/k and of v (D == Dv)
  static constexpr int kBQ = BQ_;           // query rows per CTA (q-block)
  static constexpr int kBK = BK_;           // keys per k-block
  static constexpr int kWarps = NWARPS_;
  static constexpr int kThreads = NWARPS_ * 32;
  static constexpr int kStages = STAGES_;   // K/V buffers: 1 = FA2 schedule, 2 = double buffer
  static constexpr bool kQInRegs = Q_IN_REGS_;
  static constexpr int kMinBlocks = MIN_BLOCKS_;
  static constexpr int kWM = kBQ / kWarps;  // query rows per warp = PV-skip row group
  static constexpr int kMT = kWM / 16;      // m16 tiles per warp
  static constexpr int kCPR = kD / 8;       // 16-byte chunks per tile row
  static constexpr bool kSwizzle = kCPR % 8 == 0;
  static constexpr int kRowBytes = kSwizzle ? kCPR * 16 : (kCPR + 1) * 16;
  static constexpr int kQBytes = kBQ * kRowBytes;   // [BQ, D] Q tile
  static constexpr int kKVBytes = kBK * kRowBytes;  // [BK, D] one K or V tile
  static constexpr int kBitsOff = kQBytes + 2 * kStages * kKVBytes;  // key-padding bits of one k-block
  static constexpr int kWarpSlotOff = kBitsOff + 16;  // per warp: WarpSlot (cursor, parked state)
  static constexpr int kWarpSlotBytes = 112;          // sizeof(WarpSlot), checked in the kernel
  // running row max m and row sum l of each thread's 2 * MT rows: [2][MT][2][threads] fp32
  static constexpr int kRowStatOff = kWarpSlotOff + kWarpSlotBytes * kWarps;
  static constexpr int kSmemBytes = kRowStatOff + 2 * kMT * 2 * kThreads * 4;

  static_assert(kD % 16 == 0 && kD <= 256, "head dim");
  static_assert(kWM % 16 == 0 && kMT >= 1 && kMT <= 2, "rows per warp");
  static_assert(kBK == 32 || kBK == 64 || kBK == 128, "key-padding bits: one word per 32 keys, <= 4 words (16 bytes)");
  static_assert(kBK / 32 <= kWarps, "one warp per 32 keys builds the key-padding bits");
  static_assert(kThreads >= kCPR, "tile loads: one row per pass at least");
  static_assert(kStages == 1 || kStages == 2, "stages");

  // Byte offset of 16-byte chunk ch of tile row `row` (cp.async stores).
  __device__ __forceinline__ static uint32_t chunk_off(int row, int ch) {
    return kSwizzle ? (uint32_t)(row * kRowBytes + ((ch ^ (row & 7)) << 4))
                    : (uint32_t)(row * kRowBytes + (ch << 4));
  }
};

// The configuration of head dim D with the tile of csrc/tile_config.h.
template <int D, int STAGES = AttnTileSm80<D>::kStages>
using AttnCfgFor = AttnCfg<D, AttnTileSm80<D>::kBQ, AttnTileSm80<D>::kBK, AttnTileSm80<D>::kWarps, STAGES,
                           AttnTileSm80<D>::kQInRegs, AttnTileSm80<D>::kMinBlocks>;

// ---------------------------------------------------------------------------
// Per-warp slot in shared memory and the kept-block cursor
// ---------------------------------------------------------------------------
// State that is touched once per k-block or less lives in a per-warp slot of
// shared memory instead of registers (the accumulator and the score tile need
// nearly all 255). All accesses are volatile: the compiler can neither keep a
// copy in a register across the loop nor forward a stored value. Only lane 0
// writes, followed by __syncwarp() before any lane reads.
enum { kFlagKpad = 1, kFlagPv = 2, kFlagCausal = 4 };

struct WarpSlot {
  // kept-block cursor: walks the kept & causally allowed k-blocks of the mask
  // row in ascending order. Every warp of the CTA runs its own copy and gets
  // the same sequence, so no CTA barrier is involved. A refill reads
  // 32 * kWords mask bytes (one byte per lane and word, loads issued together)
  // into ballot words: a long row costs one memory round trip per 128 blocks.
  static constexpr int kWords = 4;
  int base;                   // block index of bit 0 of w[0]
  int n;                      // blocks [0, n) are causally allowed
  uint32_t w[kWords];         // kept bits of blocks base .. base + 127, consumed bits cleared
  int ring[4];                // ring[(t + s) & 3] = k-block of iteration t + s (-1: none)
  int nskip;                  // (warp, block) PV skips, counted when the warp owns a valid row
  float lam;                  // PV-skip threshold of the head
  int b, h, nr, r0;           // batch, q-head, valid rows and first row of the tile
  int flags;                  // kFlag*: runtime options, re-read where used (no predicate registers held)
  int pad[3];
  unsigned long long ptr[4];  // loop-invariant pointers: mask row, K, V, key-padding row
};

__device__ __forceinline__ void cursor_init(volatile WarpSlot *ws, int n_allowed, int lane) {
  if (lane == 0) {
    ws->base = -32 * WarpSlot::kWords;
    ws->n = n_allowed;
#pragma unroll
    for (int u = 0; u < WarpSlot::kWords; ++u) ws->w[u] = 0u;
    ws->nskip = 0;
  }
  __syncwarp();
}

// Next kept block of the mask row (consumed), or -1 when the row has no
// more. Called by all 32 lanes of a warp; returns the same value to all.
__device__ __forceinline__ int cursor_next(volatile WarpSlot *ws, int64_t stride, int lane) {
  constexpr int kW = WarpSlot::kWords;
  const uint8_t *row = reinterpret_cast<const uint8_t *>(ws->ptr[0]);
  const int n = ws->n;
  for (;;) {
    const int base = ws->base;
    uint32_t w[kW];
#pragma unroll
    for (int u = 0; u < kW; ++u) w[u] = ws->w[u];
    int found = -1;
#pragma unroll
    for (int u = 0; u < kW; ++u) {
      if (found < 0 && w[u] != 0u) {
        found = base + 32 * u + __ffs(w[u]) - 1;
        w[u] &= w[u] - 1u;
      }
    }
    int nb = base;
    if (found < 0) {
      if (base + 32 * kW >= n) return -1;  // nothing written: every lane read the same state
      nb = base + 32 * kW;
      uint32_t m[kW];
#pragma unroll
      for (int u = 0; u < kW; ++u) {
        const int jj = nb + 32 * u + lane;
        m[u] = jj < n ? (uint32_t)__ldg(row + (int64_t)jj * stride) : 0u;
      }
#pragma unroll
      for (int u = 0; u < kW; ++u) w[u] = __ballot_sync(kFullMask, m[u] != 0u);
    }
    __syncwarp();  // every lane has read the old state
    if (lane == 0) {
      ws->base = nb;
#pragma unroll
      for (int u = 0; u < kW; ++u) ws->w[u] = w[u];
    }
    __syncwarp();  // the new state is visible to the warp
    if (found >= 0) return found;
  }
}

// ---------------------------------------------------------------------------
// Tile loads: [ROWS, D] rows of a 16-bit tensor (row stride ld elements) into
// a swizzled/padded shared tile with 16-byte cp.async; rows >= rows_valid are
// zero-filled and never read. Thread tid copies chunk tid % CPR of rows
// tid / CPR + RP * pass (RP = threads / CPR rows per pass), so one running
// pointer per thread suffices (no per-chunk 64-bit offsets to keep live).
// ---------------------------------------------------------------------------
template <class C, int ROWS, typename T>
__device__ __forceinline__ void load_tile(uint32_t dst, const T *src, int64_t ld, int rows_valid,
                                          int tid) {
  constexpr int kRP = C::kThreads / C::kCPR;         // rows per pass
  constexpr int kPasses = (ROWS + kRP - 1) / kRP;
  constexpr bool kAllThreads = kRP * C::kCPR == C::kThreads;
  const int row0 = tid / C::kCPR, ch = tid % C::kCPR;
  if (!kAllThreads && row0 >= kRP) return;
  const uint32_t d0 = dst + C::chunk_off(row0, ch);
  const T *s = src + (int64_t)row0 * ld + ch * 8;
  const int64_t step = (int64_t)kRP * ld;
  if (rows_valid >= ROWS) {  // full tile (all but the last k-block): no predicates, no zero fill
#pragma unroll
    for (int i = 0; i < kPasses; ++i) {
      const int row = row0 + i * kRP;
      if (ROWS % kRP != 0 && row >= ROWS) break;
      const uint32_t d = C::kSwizzle && kRP % 8 == 0 ? d0 + (uint32_t)(i * kRP * C::kRowBytes)
                                                     : dst + C::chunk_off(row, ch);
      cp_async_16(d, s);
      s += step;
    }
    return;
  }
#pragma unroll
  for (int i = 0; i < kPasses; ++i) {
    const int row = row0 + i * kRP;
    if (ROWS % kRP != 0 && row >= ROWS) break;
    const bool valid = row < rows_valid;
    // swizzle: kRP % 8 == 0 keeps row & 7 fixed, so the chunk position only moves by whole rows
    const uint32_t d = C::kSwizzle && kRP % 8 == 0 ? d0 + (uint32_t)(i * kRP * C::kRowBytes)
                                                   : dst + C::chunk_off(row, ch);
    cp_async_16(d, valid ? s : src, valid);
    s += step;
  }
}

// Per-lane part of an ldmatrix address. The lane reads 16-byte chunk
// (2c + hi) of tile row (lrow + rc), with rc a multiple of 8 and
// lrow % 8 == lane % 8 (true for every operand below), so the swizzled chunk
// is (2c & ~7) + ((2c & 7) ^ (hi ^ lane % 8)).
// Swizzled rows are a multiple of 128 bytes, so lrow * row bytes has zero
// bits 4..6 and the lane's swizzle term (hi ^ lane % 8) << 4 can share the
// register with it: one register per operand.
template <class C>
struct FragAddr {
  uint32_t base;  // lrow * row bytes + ((hi ^ (lane & 7)) << 4)  (swizzled)
                  // lrow * row bytes + hi * 16                    (padded)
  __device__ __forceinline__ void init(int lrow, int hi, int lane) {
    static_assert(!C::kSwizzle || C::kRowBytes % 128 == 0, "swizzled rows: whole 128-byte lines");
    base = C::kSwizzle ? (uint32_t)(lrow * C::kRowBytes + ((hi ^ (lane & 7)) << 4))
                       : (uint32_t)(lrow * C::kRowBytes + hi * 16);
  }
  __device__ __forceinline__ uint32_t off(int rc, int c) const {
    if (C::kSwizzle)  // chunk (2c + hi) ^ (lane & 7) = (2c & ~7) + ((2c & 7) ^ hi ^ (lane & 7))
      return (base ^ (uint32_t)(((2 * c) & 7) << 4)) + (uint32_t)(rc * C::kRowBytes + (((2 * c) & ~7) << 4));
    return base + (uint32_t)(rc * C::kRowBytes + 2 * c * 16);
  }
};

// ---------------------------------------------------------------------------
// Kernel
// ---------------------------------------------------------------------------
template <typename T, class C>
__global__ void __launch_bounds__(C::kThreads, C::kMinBlocks) attn_fwd_kernel(const AttnParams p) {
  using E = Elem<T>;
  constexpr int D = C::kD, BK = C::kBK, MT = C::kMT, WM = C::kWM;
  constexpr int NT_S = BK / 8;  // n8 tiles of a score row block
  constexpr int NT_O = D / 8;   // n8 tiles of an output row block
  const float kNegInf = -CUDART_INF_F;

  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t sQ = smem_u32(smem);                 // [BQ, D]           swizzled/padded
  const uint32_t sK = sQ + C::kQBytes;                // [stages][BK, D]   swizzled/padded
  const uint32_t sV = sK + C::kStages * C::kKVBytes;  // [stages][BK, D]   swizzled/padded
  uint32_t *s_kbits = reinterpret_cast<uint32_t *>(smem + C::kBitsOff);  // [BK / 32]
  static_assert(sizeof(WarpSlot) == C::kWarpSlotBytes && alignof(WarpSlot) <= 16, "warp slot");

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t4 = lane & 3;
  const int wr0 = warp * WM;  // first tile row of this warp
  // This thread's rows of the tile are wr0 + 16 mt + g + 8 hf (mt < MT, hf < 2),
  // i.e. query rows qrow0 + 16 mt + 8 hf with qrow0 = r0 + wr0 + g.

  // ---- per-warp slot: tile coordinates, pointers, options, cursor ----
  volatile WarpSlot *ws = reinterpret_cast<volatile WarpSlot *>(smem + C::kWarpSlotOff) + warp;
  {
    int qi, bh;  // tile order: attn_cta_tile (attn_params.h)
    attn_cta_tile(p, (int)blockIdx.x, qi, bh);
    const int b = bh / p.Hq, h = bh - b * p.Hq;
    const int hk = h / p.rep;  // GQA: kv-head of q-head h
    const int r0 = qi * C::kBQ;
    const int nr = sparge_block_len(qi, C::kBQ, p.Lq);  // valid rows of the tile, >= 1
    // causally allowed k-blocks [0, n_allowed) (geometry.h, as the CPU)
    const int n_allowed = sparge_allowed_blocks(sparge_last_visible_key(p.causal, r0 + nr - 1, p.causal_off, p.Lk), BK);
    if (lane == 0) {
      ws->ptr[0] = (unsigned long long)(p.mask + b * p.m_sb + h * p.m_sh + qi * p.m_si);
      ws->ptr[1] = (unsigned long long)(static_cast<const T *>(p.k) + b * p.k_sb + hk * p.k_sh);
      ws->ptr[2] = (unsigned long long)(static_cast<const T *>(p.v) + b * p.v_sb + hk * p.v_sh);
      ws->ptr[3] = (unsigned long long)(p.kpad != nullptr ? p.kpad + b * p.kp_sb : nullptr);
      ws->lam = p.pv != nullptr ? __ldg(p.pv + h * p.pv_s) : 0.0f;
      ws->b = b;
      ws->h = h;
      ws->nr = nr;
      ws->r0 = r0;
      ws->flags = (p.kpad != nullptr ? kFlagKpad : 0) | (p.pv != nullptr ? kFlagPv : 0) |
                  (p.causal ? kFlagCausal : 0);
    }
    cursor_init(ws, n_allowed, lane);  // ends with __syncwarp: the slot is visible to the warp
  }

  // ---- running state ----
  float acc[MT][NT_O][4];  // O accumulator, C-fragment layout
  // Running max m (log2 domain) and running sum l (this thread's columns
  // only; the quad adds them up at the end) of the thread's rows, in shared
  // memory (touched once per block; registers go to acc and the score tile).
  volatile float *s_rowstat = reinterpret_cast<volatile float *>(smem + C::kRowStatOff);
  auto row_m = [&](int mt, int hf) -> volatile float & { return s_rowstat[(mt * 2 + hf) * C::kThreads + tid]; };
  auto row_l = [&](int mt, int hf) -> volatile float & {
    return s_rowstat[(2 * MT + mt * 2 + hf) * C::kThreads + tid];
  };
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int nt = 0; nt < NT_O; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.0f;
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      row_m(mt, hf) = kNegInf;
      row_l(mt, hf) = 0.0f;
    }
  }
  int kept = 0;  // computed blocks (kept & allowed) = loop iterations

  // ring[t & 3] = block of iteration t; ring[(t + s) & 3] the ones after (-1: none)
  const int j_first = cursor_next(ws, p.m_sj, lane);

  if (j_first >= 0) {
    {
      int ahead[C::kStages + 1];
      ahead[0] = j_first;
#pragma unroll
      for (int s = 1; s <= C::kStages; ++s) ahead[s] = ahead[s - 1] >= 0 ? cursor_next(ws, p.m_sj, lane) : -1;
      if (lane == 0) {
#pragma unroll
        for (int s = 0; s <= C::kStages; ++s) ws->ring[s] = ahead[s];
      }
      __syncwarp();
    }

    const T *qg = static_cast<const T *>(p.q) + ws->b * p.q_sb + ws->h * p.q_sh + (int64_t)ws->r0 * p.q_sl;
    auto load_k = [&](int j, int buf) {
      const int c0 = j * BK;
      const T *src = reinterpret_cast<const T *>(ws->ptr[1]) + (int64_t)c0 * p.k_sl;
      load_tile<C, BK>(sK + buf * C::kKVBytes, src, p.k_sl, min(BK, p.Lk - c0), tid);
    };
    auto load_v = [&](int j, int buf) {
      const int c0 = j * BK;
      const T *src = reinterpret_cast<const T *>(ws->ptr[2]) + (int64_t)c0 * p.v_sl;
      load_tile<C, BK>(sV + buf * C::kKVBytes, src, p.v_sl, min(BK, p.Lk - c0), tid);
    };
    // key-padding byte of key (j * BK + 32 * warp + lane), 0 past Lk; warps < BK/32
    auto load_kpad = [&](int j) -> uint32_t {
      if (j < 0) return 0u;
      const int key = j * BK + 32 * warp + lane;
      const uint8_t *kp_row = reinterpret_cast<const uint8_t *>(ws->ptr[3]);
      return key < p.Lk ? (uint32_t)__ldg(kp_row + (int64_t)key * p.kp_sl) : 0u;
    };

    // ---- prologue. Commit-group order, steady state: ... V(t), K(t+1), V(t+1),
    // K(t+2) ... (2 stages) or K(t), V(t), K(t+1) ... (1 stage); so before each
    // wait below exactly 2 * (stages - 1) younger groups may stay pending. ----
    load_tile<C, C::kBQ>(sQ, qg, p.q_sl, ws->nr, tid);
    load_k(j_first, 0);
    cp_async_commit();  // group: Q + K(0)
    if (C::kStages == 2) {
      load_v(j_first, 0);
      cp_async_commit();  // group: V(0)
      const int j1 = ws->ring[1];
      if (j1 >= 0) load_k(j1, 1);
      cp_async_commit();  // group: K(1) (maybe empty)
    }
    uint32_t kp_cur = (p.kpad != nullptr && warp < BK / 32) ? load_kpad(j_first) : 0u;

    // Q fragments kept in registers (D = 64)
    uint32_t qf[C::kQInRegs ? MT : 1][C::kQInRegs ? D / 16 : 1][4];

    FragAddr<C> fq, fk, fv;
    fq.init(wr0 + (lane & 15), lane >> 4, lane);                      // A: Q rows, d chunks
    fk.init(((lane >> 4) << 3) + (lane & 7), (lane >> 3) & 1, lane);  // B of Q.K^T: key rows, d chunks
    fv.init((((lane >> 3) & 1) << 3) + (lane & 7), lane >> 4, lane);  // B of P.V (trans): key rows, dv chunks

    for (int t = 0;; ++t) {
      const int j = ws->ring[t & 3];
      const int buf = C::kStages == 2 ? (t & 1) : 0;  // K(t) and V(t) live in buffer buf
      const uint32_t sKb = sK + buf * C::kKVBytes;
      const uint32_t sVb = sV + buf * C::kKVBytes;

      // ==== [A] K(t) (and Q) have landed; every warp is done with P.V(t-1) ====
      cp_async_wait<2 * (C::kStages - 1)>();
      __syncthreads();

      // key-padding bits of block t (its bytes were fetched one iteration ago)
      if ((ws->flags & kFlagKpad) && warp < BK / 32) {
        const uint32_t bits = __ballot_sync(kFullMask, kp_cur != 0u);
        if (lane == 0) s_kbits[warp] = bits;
        kp_cur = load_kpad(ws->ring[(t + 1) & 3]);
      }
      // V(t) into the single V buffer (freed by the barrier), or V(t+1) into
      // the other one (P.V(t-1) read it; freed by the barrier)
      if (C::kStages == 1) {
        load_v(j, 0);
      } else {
        const int j1 = ws->ring[(t + 1) & 3];
        if (j1 >= 0) load_v(j1, buf ^ 1);
      }
      cp_async_commit();

      if (C::kQInRegs && t == 0) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int kk = 0; kk < D / 16; ++kk) ldmatrix_x4(qf[mt][kk], sQ + fq.off(mt * 16, kk));
      }

      // ==== S = Q K^T: [WM, BK] per warp, fp32 ====
      float s[MT][NT_S][4];
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t a[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          if (C::kQInRegs) {
#pragma unroll
            for (int e = 0; e < 4; ++e) a[mt][e] = qf[C::kQInRegs ? mt : 0][C::kQInRegs ? kk : 0][e];
          } else {
            ldmatrix_x4(a[mt], sQ + fq.off(mt * 16, kk));
          }
        }
#pragma unroll
        for (int np = 0; np < BK / 16; ++np) {
          uint32_t kb[4];  // b0, b1 of key tile 2np; b0, b1 of key tile 2np+1
          ldmatrix_x4(kb, sKb + fk.off(np * 16, kk));
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            if (kk == 0) {  // s starts at zero
              E::mma_zero(s[mt][2 * np], a[mt], kb[0], kb[1]);
              E::mma_zero(s[mt][2 * np + 1], a[mt], kb[2], kb[3]);
            } else {
              E::mma(s[mt][2 * np], a[mt], kb[0], kb[1]);
              E::mma(s[mt][2 * np + 1], a[mt], kb[2], kb[3]);
            }
          }
        }
      }

      // ==== [B] V(t) has landed; every warp is done reading K buffer buf ====
      cp_async_wait<2 * (C::kStages - 1)>();
      __syncthreads();
      {
        const int jk = ws->ring[(t + C::kStages) & 3];  // K(t+1) (1 stage) / K(t+2) (2 stages)
        if (jk >= 0) load_k(jk, buf);
      }
      cp_async_commit();

      // ==== log2 domain: s = sc * (q.k). With scale > 0 (the usual case) the
      // raw dot products stay in s: max commutes with the multiplication
      // (rounding is monotonic), so the row max is scaled once per row and the
      // exponent is one FFMA. Otherwise s is scaled here and sc = 1. ====
      float sc = p.scale_log2;
      if (!(sc > 0.0f)) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int nt = 0; nt < NT_S; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[mt][nt][e] *= sc;
        sc = 1.0f;
      }
      // ==== exact masking on boundary blocks (-inf stays -inf under sc > 0) ====
      const int c0 = j * BK;
      const int flags = ws->flags;
      const bool kpad_on = flags & kFlagKpad, causal = flags & kFlagCausal;
      const bool need_mask =
          kpad_on || c0 + BK > p.Lk || (causal && sparge_causal_block_partial(ws->r0 + wr0, p.causal_off, c0 + BK - 1));
      if (need_mask) {
        const int qrow0 = ws->r0 + wr0 + g;
        uint32_t kbits[BK / 32];  // bit c of word w: key c0 + 32 w + c takes part (key padding)
#pragma unroll
        for (int w = 0; w < BK / 32; ++w) kbits[w] = kpad_on ? s_kbits[w] : ~0u;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int hf = 0; hf < 2; ++hf) {
            // last visible key of the row (-1: none), relative to c0; may be < 0
            const int lim = sparge_last_visible_key((int)causal, qrow0 + mt * 16 + 8 * hf, p.causal_off, p.Lk);
            const int rel = max(lim, -1) - c0;
#pragma unroll
            for (int nt = 0; nt < NT_S; ++nt)
#pragma unroll
              for (int e = 0; e < 2; ++e) {
                const int col = nt * 8 + 2 * t4 + e;  // word (nt * 8) / 32 is a compile-time index
                if (col > rel || !((kbits[(nt * 8) / 32] >> (col & 31)) & 1u)) s[mt][nt][2 * hf + e] = kNegInf;
              }
          }
      }

      // ==== row max, new running max ====
      float bmax[MT][2], m_new[MT][2], m_old[MT][2];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          float x = kNegInf;
#pragma unroll
          for (int nt = 0; nt < NT_S; ++nt) x = fmaxf(x, fmaxf(s[mt][nt][2 * hf], s[mt][nt][2 * hf + 1]));
          x = quad_max(x) * sc;  // -inf stays -inf
          bmax[mt][hf] = x;
          m_old[mt][hf] = row_m(mt, hf);
          m_new[mt][hf] = fmaxf(m_old[mt][hf], x);
        }

      // ==== PV skip: the warp skips when every valid row it owns agrees: block max
      // <= running max before the block - lambda (a block that raises it is never skipped) ====
      bool skip = false;
      if ((flags & kFlagPv) && t > 0) {  // uniform over the CTA
        const float lam = ws->lam;
        const int qrow0 = ws->r0 + wr0 + g;
        bool agree = true;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int hf = 0; hf < 2; ++hf)
            if (qrow0 + mt * 16 + 8 * hf < p.Lq && !(bmax[mt][hf] <= m_old[mt][hf] - lam)) agree = false;
        skip = __all_sync(kFullMask, agree);
      }

      // ==== rescale factors exp2(m_old - m_new) (1 while a row has seen nothing) ====
      float alpha[MT][2];
      bool alpha_one = true;
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          alpha[mt][hf] = m_new[mt][hf] == kNegInf ? 1.0f : fast_exp2(m_old[mt][hf] - m_new[mt][hf]);
          alpha_one = alpha_one && alpha[mt][hf] == 1.0f;
        }

      if (!skip) {
        // ==== P = exp2(s - m_new) (masked: exp2(-inf) = 0), row sums ====
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int hf = 0; hf < 2; ++hf) {
            const float mu = m_new[mt][hf] == kNegInf ? 0.0f : m_new[mt][hf];
            float sum = 0.0f;
#pragma unroll
            for (int nt = 0; nt < NT_S; ++nt)
#pragma unroll
              for (int e = 0; e < 2; ++e) {
                const float pe = fast_exp2(fmaf(s[mt][nt][2 * hf + e], sc, -mu));
                s[mt][nt][2 * hf + e] = pe;
                sum += pe;
              }
            row_l(mt, hf) = row_l(mt, hf) * alpha[mt][hf] + sum;
          }
      } else {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int hf = 0; hf < 2; ++hf) row_l(mt, hf) = row_l(mt, hf) * alpha[mt][hf];
        if (lane == 0 && wr0 < ws->nr) ws->nskip = ws->nskip + 1;  // only warps owning a valid row count
      }
      if (!__all_sync(kFullMask, alpha_one)) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int nt = 0; nt < NT_O; ++nt) {
            acc[mt][nt][0] *= alpha[mt][0];
            acc[mt][nt][1] *= alpha[mt][0];
            acc[mt][nt][2] *= alpha[mt][1];
            acc[mt][nt][3] *= alpha[mt][1];
          }
      }
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        row_m(mt, 0) = m_new[mt][0];
        row_m(mt, 1) = m_new[mt][1];
      }

      // ==== O += P V: P from registers (A operand), V^T fragments via ldmatrix.trans ====
      if (!skip) {
#pragma unroll
        for (int kk = 0; kk < BK / 16; ++kk) {
          uint32_t pa[MT][4];
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            pa[mt][0] = E::pack(s[mt][2 * kk][0], s[mt][2 * kk][1]);          // row g,   keys 16kk+2t..
            pa[mt][1] = E::pack(s[mt][2 * kk][2], s[mt][2 * kk][3]);          // row g+8, keys 16kk+2t..
            pa[mt][2] = E::pack(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);  // row g,   keys 16kk+8+2t..
            pa[mt][3] = E::pack(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);  // row g+8, keys 16kk+8+2t..
          }
#pragma unroll
          for (int np = 0; np < D / 16; ++np) {
            uint32_t vb[4];  // b0, b1 of dv tile 2np; b0, b1 of dv tile 2np+1
            ldmatrix_x4_trans(vb, sVb + fv.off(kk * 16, np));
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
              E::mma(acc[mt][2 * np], pa[mt], vb[0], vb[1]);
              E::mma(acc[mt][2 * np + 1], pa[mt], vb[2], vb[3]);
            }
          }
        }
      }

      // ==== advance: block of iteration t + stages + 1 into the ring slot of t - 1 (or t + 3) ====
      {
        const int last = ws->ring[(t + C::kStages) & 3];
        const int nxt = last >= 0 ? cursor_next(ws, p.m_sj, lane) : -1;
        if (lane == 0) ws->ring[(t + C::kStages + 1) & 3] = nxt;
        __syncwarp();
      }
      if (ws->ring[(t + 1) & 3] < 0) {
        kept = t + 1;
        break;
      }
    }
    // Every issued copy was waited for: the last iteration issued none.
  }

  // ==== epilogue: out = acc / l (0 for rows that saw no key), lse ====
  const int b = ws->b, h = ws->h;
  const int qrow0 = ws->r0 + wr0 + g;
  T *og = static_cast<T *>(p.out) + b * p.o_sb + h * p.o_sh;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const float l = quad_sum(row_l(mt, hf));
      const int qrow = qrow0 + mt * 16 + 8 * hf;
      if (qrow < p.Lq) {
        const float inv = l > 0.0f ? 1.0f / l : 0.0f;
        T *orow = og + (int64_t)qrow * p.o_sl + 2 * t4;
#pragma unroll
        for (int nt = 0; nt < NT_O; ++nt)
          *reinterpret_cast<uint32_t *>(orow + nt * 8) =
              E::pack(acc[mt][nt][2 * hf] * inv, acc[mt][nt][2 * hf + 1] * inv);
        if (p.lse != nullptr && t4 == 0)
          p.lse[b * p.lse_sb + h * p.lse_sh + (int64_t)qrow * p.lse_sl] =
              l > 0.0f ? (row_m(mt, hf) + log2f(l)) * 0.6931471805599453f : kNegInf;
      }
    }

  // ==== stats (zeroed by the launcher): allowed, kept, PV units, PV skipped ====
  if (p.stats != nullptr) {
    unsigned long long *st = p.stats + b * p.st_sb + h * p.st_sh;
    if (tid == 0) {
      const int groups = (ws->nr + WM - 1) / WM;  // warps owning >= 1 valid row
      const int n_allowed_ = ws->n;  // warp 0's copy; every warp has the same
      if (n_allowed_ > 0) atomicAdd(st, (unsigned long long)n_allowed_);
      if (kept > 0) {
        atomicAdd(st + p.st_si, (unsigned long long)kept);
        atomicAdd(st + 2 * p.st_si, (unsigned long long)kept * (unsigned long long)groups);
      }
    }
    const int nskip = ws->nskip;  // written by this lane (lane 0)
    if (lane == 0 && nskip > 0) atomicAdd(st + 3 * p.st_si, (unsigned long long)nskip);
  }
}

// ---------------------------------------------------------------------------
// Launcher
// ---------------------------------------------------------------------------
// Enqueues the kernel of configuration C on `stream` (the current device must
// be the tensors' device); grid = nq * B * Hq CTAs. Sets the dynamic shared
// memory limit once per device. Returns the launch error, if any.
template <typename T, class C>
cudaError_t launch_cfg(const AttnParams &p, unsigned grid, cudaStream_t stream) {
  const cudaError_t err = allow_dynamic_smem<attn_fwd_kernel<T, C>>(C::kSmemBytes);
  if (err != cudaSuccess) return err;
  attn_fwd_kernel<T, C><<<grid, C::kThreads, C::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

// Head dim D with the tile of csrc/tile_config.h. Instantiated once each in
// csrc/cuda/inst/attn_sm80_d<D>_<dtype>.cu (list: inst/generate.py), declared
// extern by the registry (cuda/registry.cu) that holds their addresses.
template <typename T, int D>
cudaError_t launch_attn_sm80(const AttnParams &p, unsigned grid, cudaStream_t stream) {
  return launch_cfg<T, AttnCfgFor<D>>(p, grid, stream);
}

}  // namespace sparge_cuda

#endif  // SPARGE_CUDA_ATTN_SM80_CUH_
