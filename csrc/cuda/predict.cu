// predict.cu — CUDA backend of stage 1, block prediction (SPEC §1, sparge.h
// sparge_predict). Same semantics as csrc/cpu/predict.c; results may differ
// from it only by fp32 rounding (summation orders, expf).
//
// Four launches, all on the caller's stream, no host synchronization:
//   1. pool_kernel, phase 0 — one CTA (128 threads) per q-block (b, h, i) and
//      per k-block (b, g, j). Q CTAs: pooled q̄_i and the q-block similarity
//      -> ws.qbar, ws.qsim. K CTAs: raw column sums of the k-block -> ws.kbuf.
//   2. km_kernel — one CTA (512 threads) per (b, g) and 32 channels:
//      km = (sum of the block sums, fixed order) / Lk -> ws.km.
//   3. pool_kernel, phase 1 — one CTA per k-block (in reverse order, so that
//      the first CTAs find the K rows launch 1 read last still in L2): rows of
//      K' = K - km, pooled k̄_j -> ws.kbuf (over the sums, no longer needed)
//      and the k-block similarity -> ws.ksim.
//   4. select_kernel — one CTA (256 threads) per QT consecutive q-blocks of one
//      (b, h): the score tile S = scale * q̄ k̄^T (fp32 FMA, k̄ staged in
//      shared memory in 128 x 32 chunks and shared by the QT rows), then per
//      row: softmax, a bitonic sort of the P̂ keys, TopK / TopCdf cut,
//      forcing, and the mask row. Rows with nk <= 512 are handled by one warp
//      each (keys in registers, shuffles; a row sorts next_pow2 of its
//      allowed k-blocks, so short causal rows cost less); larger rows by the
//      whole CTA (registers, shuffles and shared memory), up to nk = 4096.
//      QT = 8 for nk <= 512 (enough CTAs to fill the GPU: 32 left 3/4 of the
//      SMs idle at H=16, L=16k), else the largest of 32/16/8/4 whose score tile
//      fits the device's shared memory.
// Q is read once and K twice from global memory.
//
// On sm90 launches 2-4 are programmatic dependent launches: every CTA of the
// previous launch allows the next one at its start, so the next launch's CTAs
// take the SMs the previous one's last wave leaves idle; they wait
// (griddepcontrol.wait: until the previous grid has completed and its writes
// are visible) before reading its results. Phase-1 CTAs issue the loads of
// their first K rows (inputs, not results) before waiting. Elsewhere these
// are plain launches and the two instructions are not compiled in.
//
// Pooling loads rows with 16-byte vectors when q and k allow it (D a multiple
// of the vector, aligned pointers and strides), else element by element. Each
// row is held by TPR = min(32, pow2ceil(D / VEC)) lanes, CH vectors per lane.
//
// Ties in the selection: the sort orders P̂ only; the kept set is the first T
// positions, i.e. every entry with P̂ > P̂_cut plus the lowest-index entries
// with P̂ == P̂_cut (a prefix count in k-block order). That is exactly the
// (P̂ descending, index ascending) order of sparge.h, and for TopCdf the sums
// in sorted order do not depend on how equal values are ordered.
//
// Every reduction has a fixed order: the results do not depend on timing.
// Divisions and square roots use the IEEE-rounded intrinsics, so that the
// results (and the agreement with the CPU backend) do not change if the file
// is ever compiled with --use_fast_math. TopCdf's running sum is a parallel
// prefix sum: at an exact boundary (equal P̂ summing to tau) it may keep one
// block fewer or more than the CPU's sequential sum.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <limits.h>
#include <stddef.h>
#include <stdint.h>

#include "../geometry.h"
#include "host.h"

namespace {

constexpr float kSimEps = 1e-6f;
constexpr unsigned kFull = 0xffffffffu;

constexpr int kPoolThreads = 128;
constexpr int kKmThreads = 512;  // 16 warps x 32 channels
constexpr int kSelThreads = 256; // 8 warps
constexpr int kSelWarps = kSelThreads / 32;
constexpr int kJC = 128;         // k-blocks per score chunk
constexpr int kDC = 32;          // channels per score chunk
constexpr int kLd = kDC + 4;     // smem row stride (floats): 144 B, conflict-free float4 reads
constexpr int kMaxNk = 4096;

enum { kF32 = 0, kF16 = 1, kBF16 = 2 };

// Programmatic dependent launch (sm90+): allow the next launch to start /
// wait for the previous launch's completion. No-ops for a plain launch.
__device__ __forceinline__ void pdl_allow_next() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_wait_prev() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ float neg_inf() { return __uint_as_float(0xff800000u); }
__device__ __forceinline__ bool finite_f(float x) {
  return (__float_as_uint(x) & 0x7f800000u) != 0x7f800000u;
}
__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }
__device__ __forceinline__ uint32_t umax32(uint32_t a, uint32_t b) { return a > b ? a : b; }
__device__ __forceinline__ uint32_t umin32(uint32_t a, uint32_t b) { return a < b ? a : b; }

// ---------------------------------------------------------------------------
// Loads: VEC elements of dtype DT as floats.
// ---------------------------------------------------------------------------
template <int DT, int VEC> struct Raw;
template <> struct Raw<kF32, 4> { using T = float4; };
template <> struct Raw<kF32, 1> { using T = float; };
template <> struct Raw<kF16, 8> { using T = uint4; };
template <> struct Raw<kF16, 1> { using T = uint32_t; };
template <> struct Raw<kBF16, 8> { using T = uint4; };
template <> struct Raw<kBF16, 1> { using T = uint32_t; };

template <int DT> __device__ __forceinline__ float lo16(uint32_t w) {
  if constexpr (DT == kF16) return __half2float(__ushort_as_half((unsigned short)(w & 0xffffu)));
  else return __uint_as_float(w << 16);
}
template <int DT> __device__ __forceinline__ float hi16(uint32_t w) {
  if constexpr (DT == kF16) return __half2float(__ushort_as_half((unsigned short)(w >> 16)));
  else return __uint_as_float(w & 0xffff0000u);
}

template <int DT, int VEC>
__device__ __forceinline__ typename Raw<DT, VEC>::T load_raw(const unsigned char *p) {
  using T = typename Raw<DT, VEC>::T;
  if constexpr (DT != kF32 && VEC == 1) return (uint32_t)(*reinterpret_cast<const unsigned short *>(p));
  else return *reinterpret_cast<const T *>(p);
}

template <int DT, int VEC>
__device__ __forceinline__ typename Raw<DT, VEC>::T zero_raw() {
  using T = typename Raw<DT, VEC>::T;
  if constexpr (DT == kF32 && VEC == 4) return make_float4(0.f, 0.f, 0.f, 0.f);
  else if constexpr (VEC == 8) return make_uint4(0u, 0u, 0u, 0u);
  else return T(0);
}

template <int DT, int VEC>
__device__ __forceinline__ void to_float(const typename Raw<DT, VEC>::T &r, float (&x)[VEC]) {
  if constexpr (DT == kF32 && VEC == 4) {
    x[0] = r.x; x[1] = r.y; x[2] = r.z; x[3] = r.w;
  } else if constexpr (DT == kF32) {
    x[0] = r;
  } else if constexpr (VEC == 8) {
    x[0] = lo16<DT>(r.x); x[1] = hi16<DT>(r.x);
    x[2] = lo16<DT>(r.y); x[3] = hi16<DT>(r.y);
    x[4] = lo16<DT>(r.z); x[5] = hi16<DT>(r.z);
    x[6] = lo16<DT>(r.w); x[7] = hi16<DT>(r.w);
  } else {
    x[0] = lo16<DT>(r);
  }
}

// ---------------------------------------------------------------------------
// 1 + 3: pooling and block similarity
// ---------------------------------------------------------------------------
struct PoolParams {
  const unsigned char *q, *k;
  int64_t q_sb, q_sh, q_sr; // element strides of q (batch, head, row)
  int64_t k_sb, k_sh, k_sr;
  int64_t Hq, Hkv, Lq, Lk, nq, nk;
  int64_t n_qjobs; // B*Hq*nq (phase 0 only; Q CTAs come first)
  int64_t n_kjobs; // B*Hkv*nk
  int BQ, BK, D, Dp; // Dp: D rounded up to 4, the row stride of the fp32 workspace rows
  int tpr, log_tpr;  // lanes per row (power of two <= 32)
  float *qbar, *qsim, *kbuf, *ksim;
  const float *km;
};

template <int CH, int VEC> constexpr size_t pool_smem_bytes() {
  return (size_t)2 * kPoolThreads * CH * VEC * sizeof(float) + 4 * sizeof(float);
}

// mode 0: Q block -> q̄ (mean) and sim. mode 1: K block -> raw sum.
// mode 2: K block minus km -> k̄ (mean) and sim.
template <int DT, int VEC, int CH>
__global__ void __launch_bounds__(kPoolThreads) pool_kernel(const PoolParams p, const int phase) {
  extern __shared__ __align__(16) unsigned char smem[];
  constexpr int ES = DT == kF32 ? 4 : 2;
  constexpr int U = CH >= 4 ? 1 : 4 / CH; // rows in flight per thread and step
  using RawT = typename Raw<DT, VEC>::T;

  const int tid = threadIdx.x;
  const int tpr = p.tpr;
  const int lr = tid & (tpr - 1);
  const int rg = tid >> p.log_tpr;
  const int RG = kPoolThreads >> p.log_tpr;
  const int nv = p.D / VEC;
  pdl_allow_next();

  int mode;
  int64_t job = blockIdx.x;
  if (phase == 0) {
    if (job < p.n_qjobs) {
      mode = 0;
    } else {
      mode = 1;
      job -= p.n_qjobs;
    }
  } else {
    mode = 2;
    job = p.n_kjobs - 1 - job;
  }

  const unsigned char *base;
  int64_t rs, bg = 0;
  int n;
  if (mode == 0) { // job = (b*Hq + h)*nq + i
    const int64_t i = job % p.nq, bh = job / p.nq;
    const int64_t b = bh / p.Hq, h = bh % p.Hq;
    const int64_t r0 = i * p.BQ;
    n = (int)sparge_block_len<int64_t>(i, p.BQ, p.Lq);
    base = p.q + (b * p.q_sb + h * p.q_sh + r0 * p.q_sr) * ES;
    rs = p.q_sr;
  } else { // job = (b*Hkv + g)*nk + j
    const int64_t j = job % p.nk;
    bg = job / p.nk;
    const int64_t b = bg / p.Hkv, g = bg % p.Hkv;
    const int64_t r0 = j * p.BK;
    n = (int)sparge_block_len<int64_t>(j, p.BK, p.Lk);
    base = p.k + (b * p.k_sb + g * p.k_sh + r0 * p.k_sr) * ES;
    rs = p.k_sr;
  }

  float kmv[CH][VEC];
#pragma unroll
  for (int m = 0; m < CH; ++m)
#pragma unroll
    for (int e = 0; e < VEC; ++e) kmv[m][e] = 0.f;

  float s[CH][VEC], u[CH][VEC];
#pragma unroll
  for (int m = 0; m < CH; ++m)
#pragma unroll
    for (int e = 0; e < VEC; ++e) s[m][e] = u[m][e] = 0.f;

  // The trip count depends on n only: every lane runs every step (shuffles).
  for (int rb = 0; rb < n; rb += RG * U) {
    RawT raw[U][CH];
#pragma unroll
    for (int uu = 0; uu < U; ++uu) {
      const int r = rb + uu * RG + rg;
#pragma unroll
      for (int m = 0; m < CH; ++m) {
        const int v = lr + m * tpr;
        raw[uu][m] = (r < n && v < nv)
                         ? load_raw<DT, VEC>(base + ((int64_t)r * rs + (int64_t)v * VEC) * ES)
                         : zero_raw<DT, VEC>();
      }
    }
    if (mode == 2 && rb == 0) {
      // K rows are inputs: the first ones are in flight while phase 1 waits
      // for km, a result of phase 0.
      pdl_wait_prev();
#pragma unroll
      for (int m = 0; m < CH; ++m) {
        const int v = lr + m * tpr;
        const float *src = p.km + bg * p.Dp + v * VEC;
        if constexpr (VEC % 4 == 0) {
#pragma unroll
          for (int e = 0; e < VEC; e += 4) {
            const float4 t = v < nv ? *reinterpret_cast<const float4 *>(src + e) : make_float4(0.f, 0.f, 0.f, 0.f);
            kmv[m][e] = t.x; kmv[m][e + 1] = t.y; kmv[m][e + 2] = t.z; kmv[m][e + 3] = t.w;
          }
        } else {
#pragma unroll
          for (int e = 0; e < VEC; ++e) kmv[m][e] = v < nv ? src[e] : 0.f;
        }
      }
    }
#pragma unroll
    for (int uu = 0; uu < U; ++uu) {
      const bool row_ok = rb + uu * RG + rg < n;
      float x[CH][VEC];
#pragma unroll
      for (int m = 0; m < CH; ++m) to_float<DT, VEC>(raw[uu][m], x[m]);
      if (mode == 2 && row_ok) {
#pragma unroll
        for (int m = 0; m < CH; ++m)
#pragma unroll
          for (int e = 0; e < VEC; ++e) x[m][e] -= kmv[m][e];
      }
#pragma unroll
      for (int m = 0; m < CH; ++m)
#pragma unroll
        for (int e = 0; e < VEC; ++e) s[m][e] += x[m][e];
      if (mode != 1) {
        float ss = 0.f;
#pragma unroll
        for (int m = 0; m < CH; ++m)
#pragma unroll
          for (int e = 0; e < VEC; ++e) ss = fmaf(x[m][e], x[m][e], ss);
        for (int o = tpr >> 1; o > 0; o >>= 1) ss += __shfl_xor_sync(kFull, ss, o);
        const float inv = __fdiv_rn(1.0f, fmaxf(__fsqrt_rn(ss), kSimEps));
#pragma unroll
        for (int m = 0; m < CH; ++m)
#pragma unroll
          for (int e = 0; e < VEC; ++e) u[m][e] = fmaf(x[m][e], inv, u[m][e]);
      }
    }
  }

  // Sum the RG row groups in order, per channel.
  float *red_s = reinterpret_cast<float *>(smem);
  float *red_u = red_s + kPoolThreads * CH * VEC;
  float *red_w = red_u + kPoolThreads * CH * VEC;
  const int dpc = tpr * CH * VEC; // channels (padded) of one row group
#pragma unroll
  for (int m = 0; m < CH; ++m) {
    const int idx = rg * dpc + (lr + m * tpr) * VEC;
    if constexpr (VEC % 4 == 0) {
#pragma unroll
      for (int e = 0; e < VEC; e += 4) {
        *reinterpret_cast<float4 *>(red_s + idx + e) = make_float4(s[m][e], s[m][e + 1], s[m][e + 2], s[m][e + 3]);
        *reinterpret_cast<float4 *>(red_u + idx + e) = make_float4(u[m][e], u[m][e + 1], u[m][e + 2], u[m][e + 3]);
      }
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        red_s[idx + e] = s[m][e];
        red_u[idx + e] = u[m][e];
      }
    }
  }
  __syncthreads();

  const float fn = (float)n;
  float *out = mode == 0 ? p.qbar + job * p.Dp : p.kbuf + job * p.Dp;
  float part = 0.f;
  for (int c = tid; c < p.Dp; c += kPoolThreads) {
    float ts = 0.f, tu = 0.f;
    if (c < p.D) {
      for (int g = 0; g < RG; ++g) {
        ts += red_s[g * dpc + c];
        tu += red_u[g * dpc + c];
      }
    }
    out[c] = mode == 1 ? ts : __fdiv_rn(ts, fn);
    part = fmaf(tu, tu, part);
  }
  if (mode != 1) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) part += __shfl_xor_sync(kFull, part, o);
    if ((tid & 31) == 0) red_w[tid >> 5] = part;
    __syncthreads();
    if (tid == 0) {
      float tot = red_w[0];
      for (int w = 1; w < kPoolThreads / 32; ++w) tot += red_w[w];
      float *sim = mode == 0 ? p.qsim + job : p.ksim + job;
      *sim = __fdiv_rn(tot, fn * fn);
    }
  }
}

// ---------------------------------------------------------------------------
// 2: km = mean of K over the sequence, from the block sums
// ---------------------------------------------------------------------------
__global__ void __launch_bounds__(kKmThreads)
    km_kernel(const float *__restrict__ ksum, float *__restrict__ km, const int64_t nk, const int Dp,
              const float fLk) {
  __shared__ float part[kKmThreads]; // [16][32]
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  const int64_t bg = blockIdx.x;
  const int c = blockIdx.y * 32 + lane;
  constexpr int NW = kKmThreads / 32;
  const int64_t j0 = nk * w / NW, j1 = nk * (w + 1) / NW;
  pdl_allow_next();
  pdl_wait_prev();
  float acc = 0.f;
  if (c < Dp) {
    const float *src = ksum + bg * nk * Dp + c;
#pragma unroll 16
    for (int64_t j = j0; j < j1; ++j) acc += src[j * Dp];
  }
  part[w * 32 + lane] = acc;
  __syncthreads();
  if (w == 0 && c < Dp) {
    float t = part[lane];
    for (int q = 1; q < NW; ++q) t += part[q * 32 + lane];
    km[bg * Dp + c] = __fdiv_rn(t, fLk);
  }
}

// ---------------------------------------------------------------------------
// 4: scores, selection, forcing, mask
// ---------------------------------------------------------------------------
struct SelParams {
  const float *qbar, *qsim, *kbar, *ksim;
  const float *theta, *selp;
  int64_t theta_stride, selp_stride;
  unsigned char *out;
  int64_t ms0, ms1, ms2, ms3;
  int64_t Hq, Hkv, group, nq, nk, Lq, Lk, coff, ntiles;
  int BQ, BK, Dp, causal, topk, sink;
  float scale;
};

// Shared memory of select_kernel: the score/key tile [QT][NPAD] (uint32,
// fp32 bits then sort keys), a union of the score-chunk staging (k̄ and q̄
// chunks) and the CTA sort exchange buffer, 8 floats + 8 ints for CTA-wide
// reductions, and the head's k-block and the tile's q-block similarities
// (read many times, loaded once).
template <int TM, int IPT, bool CTA> struct SelCfg {
  static constexpr int QT = 4 * TM;
  static constexpr int G = CTA ? kSelThreads : 32;
  static constexpr int NPAD = G * IPT;
  static constexpr size_t s_bytes = (size_t)QT * NPAD * 4;
  static constexpr size_t gemm_bytes = (size_t)(kJC + QT) * kLd * 4;
  static constexpr size_t sort_bytes = CTA ? (size_t)NPAD * 4 : 0;
  static constexpr size_t uni_bytes = gemm_bytes > sort_bytes ? gemm_bytes : sort_bytes;
  static constexpr size_t red_off = s_bytes + uni_bytes;
  static constexpr size_t sim_off = red_off + 64;
  static constexpr size_t smem = sim_off + (size_t)(NPAD + QT) * 4;
};

// Causal extent of q-block i (geometry.h, as predict.c): k-blocks 0..nal-1
// are allowed, jd0..jd1 are the diagonal blocks (jd1 = -1: none).
__device__ __forceinline__ void row_extent(const SelParams &p, int64_t i, int &nal, int &jd0, int &jd1) {
  const int causal = p.causal != SPARGE_CAUSAL_NONE;
  const int64_t r0 = i * p.BQ, r1 = r0 + sparge_block_len<int64_t>(i, p.BQ, p.Lq) - 1;
  nal = (int)sparge_allowed_blocks<int64_t>(sparge_last_visible_key(causal, r1, p.coff, p.Lk), p.BK);
  const bool diag = causal && nal > 0;
  jd0 = diag ? (int)sparge_diagonal_first<int64_t>(sparge_last_visible_key(causal, r0, p.coff, p.Lk), p.BK) : 0;
  jd1 = diag ? nal - 1 : -1;
}

// Group operations: a warp (CTA = false) or the whole CTA (CTA = true). Every
// thread of the group gets the same result; sums have a fixed order. The CTA
// versions contain __syncthreads: call them uniformly.
template <bool CTA> struct Grp;

template <> struct Grp<false> {
  static __device__ __forceinline__ int id() { return threadIdx.x & 31; }
  static __device__ __forceinline__ float sum_f(float x, float *, int *) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(kFull, x, o);
    return x;
  }
  static __device__ __forceinline__ float max_f(float x, float *, int *) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(kFull, x, o));
    return x;
  }
  static __device__ __forceinline__ int sum_i(int x, float *, int *) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(kFull, x, o);
    return x;
  }
  static __device__ __forceinline__ int min_i(int x, float *, int *) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x = imin(x, __shfl_xor_sync(kFull, x, o));
    return x;
  }
  static __device__ __forceinline__ uint32_t max_u(uint32_t x, float *, int *) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x = umax32(x, __shfl_xor_sync(kFull, x, o));
    return x;
  }
  // Exclusive prefix sum over the group in id order.
  static __device__ __forceinline__ float excl_scan(float x, float *, int *) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const float y = __shfl_up_sync(kFull, x, o);
      if (lane >= o) x = y + x;
    }
    const float ex = __shfl_up_sync(kFull, x, 1);
    return lane == 0 ? 0.f : ex;
  }
  // Number of earlier ids with f set; *total = number in the group.
  static __device__ __forceinline__ int excl_count(bool f, int *total, float *, int *) {
    const int lane = threadIdx.x & 31;
    const unsigned bal = __ballot_sync(kFull, f);
    *total = __popc(bal);
    return __popc(bal & ((1u << lane) - 1u));
  }
};

template <> struct Grp<true> {
  static __device__ __forceinline__ int id() { return threadIdx.x; }
  static __device__ __forceinline__ float sum_f(float x, float *rf, int *) {
    x = Grp<false>::sum_f(x, nullptr, nullptr);
    if ((threadIdx.x & 31) == 0) rf[threadIdx.x >> 5] = x;
    __syncthreads();
    float t = rf[0];
#pragma unroll
    for (int w = 1; w < kSelWarps; ++w) t += rf[w];
    __syncthreads();
    return t;
  }
  static __device__ __forceinline__ float max_f(float x, float *rf, int *) {
    x = Grp<false>::max_f(x, nullptr, nullptr);
    if ((threadIdx.x & 31) == 0) rf[threadIdx.x >> 5] = x;
    __syncthreads();
    float t = rf[0];
#pragma unroll
    for (int w = 1; w < kSelWarps; ++w) t = fmaxf(t, rf[w]);
    __syncthreads();
    return t;
  }
  static __device__ __forceinline__ int sum_i(int x, float *, int *ri) {
    x = Grp<false>::sum_i(x, nullptr, nullptr);
    if ((threadIdx.x & 31) == 0) ri[threadIdx.x >> 5] = x;
    __syncthreads();
    int t = ri[0];
#pragma unroll
    for (int w = 1; w < kSelWarps; ++w) t += ri[w];
    __syncthreads();
    return t;
  }
  static __device__ __forceinline__ int min_i(int x, float *, int *ri) {
    x = Grp<false>::min_i(x, nullptr, nullptr);
    if ((threadIdx.x & 31) == 0) ri[threadIdx.x >> 5] = x;
    __syncthreads();
    int t = ri[0];
#pragma unroll
    for (int w = 1; w < kSelWarps; ++w) t = imin(t, ri[w]);
    __syncthreads();
    return t;
  }
  static __device__ __forceinline__ uint32_t max_u(uint32_t x, float *, int *ri) {
    x = Grp<false>::max_u(x, nullptr, nullptr);
    if ((threadIdx.x & 31) == 0) ri[threadIdx.x >> 5] = (int)x;
    __syncthreads();
    uint32_t t = (uint32_t)ri[0];
#pragma unroll
    for (int w = 1; w < kSelWarps; ++w) t = umax32(t, (uint32_t)ri[w]);
    __syncthreads();
    return t;
  }
  static __device__ __forceinline__ float excl_scan(float x, float *rf, int *) {
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const float y = __shfl_up_sync(kFull, x, o);
      if (lane >= o) x = y + x;
    }
    if (lane == 31) rf[w] = x;
    __syncthreads();
    float pre = 0.f;
    for (int q = 0; q < w; ++q) pre += rf[q];
    __syncthreads();
    float ex = __shfl_up_sync(kFull, x, 1);
    if (lane == 0) ex = 0.f;
    return pre + ex;
  }
  static __device__ __forceinline__ int excl_count(bool f, int *total, float *, int *ri) {
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    const unsigned bal = __ballot_sync(kFull, f);
    if (lane == 0) ri[w] = __popc(bal);
    __syncthreads();
    int pre = 0, tot = 0;
#pragma unroll
    for (int q = 0; q < kSelWarps; ++q) {
      if (q < w) pre += ri[q];
      tot += ri[q];
    }
    __syncthreads();
    *total = tot;
    return pre + __popc(bal & ((1u << lane) - 1u));
  }
};

// Bitonic sort, descending, of the group's G*IPT keys; the thread with group
// id gid holds positions gid*IPT .. gid*IPT+IPT-1 (in and out). Partner
// distances below IPT are within a thread, below 32*IPT within a warp
// (shuffles), larger ones (CTA only) go through xbuf (G*IPT words).
template <int IPT, bool CTA>
__device__ __forceinline__ void bitonic_desc(uint32_t (&key)[IPT], uint32_t *xbuf) {
  constexpr int LOGIPT = IPT == 1 ? 0 : IPT == 2 ? 1 : IPT == 4 ? 2 : IPT == 8 ? 3 : 4;
  constexpr int LOGG = CTA ? 8 : 5;
  constexpr int LOGN = LOGIPT + LOGG;
  static_assert((1 << LOGIPT) == IPT, "IPT must be 1, 2, 4, 8 or 16");
  const int gid = Grp<CTA>::id();
#pragma unroll
  for (int lk = 1; lk <= LOGN; ++lk) {
#pragma unroll
    for (int lj = lk - 1; lj >= 0; --lj) {
      const int kk = 1 << lk, js = 1 << lj;
      if (lj < LOGIPT) {
#pragma unroll
        for (int r = 0; r < IPT; ++r) {
          if ((r & js) == 0) {
            const int rp = r | js;
            const bool dblk = ((gid * IPT + r) & kk) == 0; // descending half
            const uint32_t a = key[r], b = key[rp];
            const uint32_t hi = umax32(a, b), lo = umin32(a, b);
            key[r] = dblk ? hi : lo;
            key[rp] = dblk ? lo : hi;
          }
        }
      } else if (lj < LOGIPT + 5) {
        const int lx = js >> LOGIPT;
#pragma unroll
        for (int r = 0; r < IPT; ++r) {
          const int e = gid * IPT + r;
          const uint32_t pv = __shfl_xor_sync(kFull, key[r], lx);
          const bool keep_hi = ((e & js) == 0) == ((e & kk) == 0);
          key[r] = keep_hi ? umax32(key[r], pv) : umin32(key[r], pv);
        }
      } else {
        if constexpr (CTA) {
          __syncthreads(); // earlier readers of xbuf are done
#pragma unroll
          for (int r = 0; r < IPT; ++r) xbuf[gid * IPT + r] = key[r];
          __syncthreads();
#pragma unroll
          for (int r = 0; r < IPT; ++r) {
            const int e = gid * IPT + r;
            const uint32_t pv = xbuf[e ^ js];
            const bool keep_hi = ((e & js) == 0) == ((e & kk) == 0);
            key[r] = keep_hi ? umax32(key[r], pv) : umin32(key[r], pv);
          }
        }
      }
    }
  }
}

// One mask row: q-block i of (b, h). Srow holds the row's scores (fp32 bits,
// entries j < nal valid); the group is a warp or the CTA.
template <int IPT, bool CTA>
__device__ __forceinline__ void select_row(const SelParams &p, uint32_t *Srow, uint32_t *xbuf, float *rf, int *ri,
                           const int64_t b, const int64_t h, const int64_t i, const float theta,
                           const float sel, const float *ksim, const float qsim) {
  using Gp = Grp<CTA>;
  constexpr int G = CTA ? kSelThreads : 32;
  const int gid = Gp::id();
  int nal, jd0, jd1;
  row_extent(p, i, nal, jd0, jd1);
  const bool qfix = !(qsim > theta);

  int T = 0, need_eq = 0; // kept: keys > pbk, and the first need_eq keys == pbk
  uint32_t pbk = 0;
  if (nal > 0 && !qfix) {
    float v[IPT];
    uint32_t cand = 0;
    float lmax = neg_inf();
    int lcnt = 0;
#pragma unroll
    for (int r = 0; r < IPT; ++r) {
      const int j = r * G + gid;
      float sv = neg_inf();
      if (j < nal) sv = __uint_as_float(Srow[j]);
      if (finite_f(sv)) {
        cand |= 1u << r;
        ++lcnt;
        lmax = fmaxf(lmax, sv);
      }
      v[r] = sv;
    }
    const float mx = Gp::max_f(lmax, rf, ri);
    const int nfin = Gp::sum_i(lcnt, rf, ri);
    if (nfin > 0) {
      float lsum = 0.f;
#pragma unroll
      for (int r = 0; r < IPT; ++r) {
        const float e = ((cand >> r) & 1u) ? expf(v[r] - mx) : 0.f;
        v[r] = e;
        lsum += e;
      }
      const float sum = Gp::sum_f(lsum, rf, ri);
      // Keys: P's bits + 1 for candidates (P >= 0, so the bits order like
      // the values), 0 for the rest; sorted descending.
      uint32_t key[IPT];
#pragma unroll
      for (int r = 0; r < IPT; ++r) {
        const int j = r * G + gid;
        key[r] = ((cand >> r) & 1u) ? __float_as_uint(__fdiv_rn(v[r], sum)) + 1u : 0u;
        if (j < nal) Srow[j] = key[r]; // same thread reads it back below
      }
      bitonic_desc<IPT, CTA>(key, xbuf);

      if (p.topk) {
        const float fk = ceilf(sel * (float)nal);
        int kcount;
        if (!(fk >= 1.0f)) kcount = 1;
        else if (fk >= (float)nfin) kcount = nfin;
        else kcount = (int)fk;
        T = kcount;
      } else {
        // Position t is kept iff the sum of the entries before it < tau;
        // T = the first position where that fails.
        float lex[IPT];
        float run = 0.f;
#pragma unroll
        for (int r = 0; r < IPT; ++r) {
          lex[r] = run;
          run += key[r] ? __uint_as_float(key[r] - 1u) : 0.f;
        }
        const float before = Gp::excl_scan(run, rf, ri);
        int first = INT_MAX;
#pragma unroll
        for (int r = 0; r < IPT; ++r) {
          const int e = gid * IPT + r;
          if (e < nfin && !(before + lex[r] < sel)) first = imin(first, e);
        }
        first = Gp::min_i(first, rf, ri);
        T = first < nfin ? first : nfin;
      }
      if (T > 0) {
        const int pos = T - 1, own = pos / IPT, rr = pos - own * IPT;
        uint32_t mine = 0;
#pragma unroll
        for (int r = 0; r < IPT; ++r)
          if (gid == own && r == rr) mine = key[r];
        pbk = Gp::max_u(mine, rf, ri);
        int lgt = 0;
#pragma unroll
        for (int r = 0; r < IPT; ++r) lgt += key[r] > pbk ? 1 : 0;
        need_eq = T - Gp::sum_i(lgt, rf, ri);
      }
    }
  }

  unsigned char *orow = p.out + b * p.ms0 + h * p.ms1 + i * p.ms2;
  int eq_seen = 0;
  for (int jb = 0; jb < (int)p.nk; jb += G) {
    const int j = jb + gid;
    bool keep = false, eq = false;
    if (j < nal) {
      if (qfix) {
        keep = true;
      } else {
        if (T > 0) {
          const uint32_t kj = Srow[j];
          keep = kj > pbk;
          eq = kj == pbk;
        }
        if (!(ksim[j] > theta)) keep = true; // fix k-block
      }
      if (j >= jd0 && j <= jd1) keep = true; // causal diagonal
      if (p.sink && j == 0) keep = true;
    }
    int tot;
    const int rank = Gp::excl_count(eq, &tot, rf, ri);
    if (eq && eq_seen + rank < need_eq) keep = true;
    eq_seen += tot;
    if (j < p.nk) orow[(int64_t)j * p.ms3] = keep ? 1 : 0;
  }
}

template <int TM, int IPT, bool CTA>
__global__ void __launch_bounds__(kSelThreads, 2) select_kernel(const SelParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  using C = SelCfg<TM, IPT, CTA>;
  constexpr int QT = C::QT, NPAD = C::NPAD;
  pdl_wait_prev(); // everything below reads launch 1 and 2 results
  uint32_t *S = reinterpret_cast<uint32_t *>(smem);
  float *Ks = reinterpret_cast<float *>(smem + C::s_bytes); // [kJC][kLd]
  float *Qs = Ks + kJC * kLd;                               // [QT][kLd]
  uint32_t *xbuf = reinterpret_cast<uint32_t *>(smem + C::s_bytes); // after the scores
  float *rf = reinterpret_cast<float *>(smem + C::red_off);
  int *ri = reinterpret_cast<int *>(smem + C::red_off + 32);

  const int tid = threadIdx.x, lane = tid & 31, w = tid >> 5;
  const int64_t blk = blockIdx.x;
  const int64_t bh = blk / p.ntiles;
  const int64_t tile = p.ntiles - 1 - blk % p.ntiles; // long causal rows first
  const int64_t b = bh / p.Hq, h = bh % p.Hq, g = h / p.group, bg = b * p.Hkv + g;
  const int64_t i0 = tile * QT;
  const float theta = p.theta[h * p.theta_stride];
  const float sel = p.selp[h * p.selp_stride];
  const float *kbar = p.kbar + bg * p.nk * p.Dp;
  float *ksim = reinterpret_cast<float *>(smem + C::sim_off); // [nk], then the tile's q-block sims
  float *qsim = ksim + NPAD;
  for (int j = tid; j < p.nk; j += kSelThreads) ksim[j] = p.ksim[bg * p.nk + j];
  if (tid < QT) qsim[tid] = i0 + tid < p.nq ? p.qsim[bh * p.nq + i0 + tid] : 0.f;
  __syncthreads();
  const float *qbar = p.qbar + bh * p.nq * p.Dp;

  // ---- scores S[t][j] = scale * q̄_{i0+t} . k̄_j for j < jlim -------------
  // Warp w: rows (w & 3)*TM .. +TM-1, k-blocks (w >> 2)*64 + lane + {0, 32}
  // of each 128-block chunk. Each dot product runs over the channels in
  // ascending order (one fp32 FMA chain).
  {
    const int64_t ilast = i0 + QT - 1 < p.nq - 1 ? i0 + QT - 1 : p.nq - 1;
    int jlim, unused0, unused1;
    row_extent(p, ilast, jlim, unused0, unused1); // the tile's longest row
    const int njc = (jlim + kJC - 1) / kJC;
    const int ndc = (p.Dp + kDC - 1) / kDC;
    const int nchunks = njc * ndc;
    const int rgp = w & 3, jh = w >> 2;

    float4 kreg[4];
    float4 qreg = make_float4(0.f, 0.f, 0.f, 0.f);
    // Thread tid stages rows (tid >> 3) + 32 kk of a chunk, channels
    // (tid & 7) * 4 .. +3 (and q̄ row tid >> 3 of the tile).
    const int jr0 = tid >> 3, c0 = (tid & 7) * 4, Dp = p.Dp, nk = (int)p.nk;
    const float *kthr = kbar + jr0 * Dp + c0;
    const bool qrow = tid < QT * 8 && i0 + jr0 < p.nq;
    const float *qthr = qbar + (i0 + jr0) * Dp + c0;
    auto fetch = [&](int jc, int dc) {
      const bool cok = dc * kDC + c0 < Dp;
      const float *src = kthr + jc * kJC * Dp + dc * kDC;
#pragma unroll
      for (int kk = 0; kk < 4; ++kk)
        kreg[kk] = cok && jc * kJC + jr0 + 32 * kk < nk ? *reinterpret_cast<const float4 *>(src + 32 * kk * Dp)
                                                         : make_float4(0.f, 0.f, 0.f, 0.f);
      if (qrow) qreg = cok ? *reinterpret_cast<const float4 *>(qthr + dc * kDC) : make_float4(0.f, 0.f, 0.f, 0.f);
    };

    float acc[TM][2];
    if (nchunks > 0) fetch(0, 0);
    for (int ch = 0, jc = 0, dc = 0; ch < nchunks; ++ch) {
      const int jn = dc + 1 == ndc ? jc + 1 : jc, dn = dc + 1 == ndc ? 0 : dc + 1; // next chunk
      if (dc == 0) {
#pragma unroll
        for (int m = 0; m < TM; ++m) acc[m][0] = acc[m][1] = 0.f;
      }
      __syncthreads(); // the previous chunk's readers are done
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        const int f = tid + kSelThreads * kk;
        *reinterpret_cast<float4 *>(Ks + (f >> 3) * kLd + (f & 7) * 4) = kreg[kk];
      }
      if (tid < QT * 8) *reinterpret_cast<float4 *>(Qs + (tid >> 3) * kLd + (tid & 7) * 4) = qreg;
      __syncthreads();
      if (ch + 1 < nchunks) fetch(jn, dn); // in flight during the FMAs
#pragma unroll
      for (int c4 = 0; c4 < kDC / 4; ++c4) {
        float4 kv[2];
#pragma unroll
        for (int n = 0; n < 2; ++n)
          kv[n] = *reinterpret_cast<const float4 *>(Ks + (jh * 64 + lane + 32 * n) * kLd + c4 * 4);
#pragma unroll
        for (int m = 0; m < TM; ++m) {
          const float4 qv = *reinterpret_cast<const float4 *>(Qs + (rgp * TM + m) * kLd + c4 * 4);
#pragma unroll
          for (int n = 0; n < 2; ++n) {
            float a = acc[m][n];
            a = fmaf(qv.x, kv[n].x, a);
            a = fmaf(qv.y, kv[n].y, a);
            a = fmaf(qv.z, kv[n].z, a);
            a = fmaf(qv.w, kv[n].w, a);
            acc[m][n] = a;
          }
        }
      }
      if (dc == ndc - 1) {
#pragma unroll
        for (int n = 0; n < 2; ++n) {
          const int j = jc * kJC + jh * 64 + lane + 32 * n;
          if (j < p.nk) {
            const bool selective = ksim[j] > theta;
#pragma unroll
            for (int m = 0; m < TM; ++m)
              S[(rgp * TM + m) * NPAD + j] = __float_as_uint(selective ? p.scale * acc[m][n] : neg_inf());
          }
        }
      }
      jc = jn;
      dc = dn;
    }
    __syncthreads(); // scores complete; the staging area is free
  }

  // ---- selection, one row per warp (or per CTA) -----------------------------
  if constexpr (CTA) {
    for (int t = 0; t < QT; ++t) {
      const int64_t i = i0 + t;
      if (i < p.nq) select_row<IPT, true>(p, S + t * NPAD, xbuf, rf, ri, b, h, i, theta, sel, ksim, qsim[t]);
    }
  } else {
    // A row sorts only next_pow2(its allowed k-blocks) keys (causal rows are
    // shorter); entries j >= nal are never candidates.
    for (int t = w; t < QT; t += kSelWarps) {
      const int64_t i = i0 + t;
      if (i >= p.nq) continue;
      int nal, unused0, unused1;
      row_extent(p, i, nal, unused0, unused1);
      uint32_t *Srow = S + t * NPAD;
      const float qs = qsim[t];
      if (IPT >= 16 && nal > 256) select_row<IPT, false>(p, Srow, xbuf, rf, ri, b, h, i, theta, sel, ksim, qs);
      else if (IPT >= 8 && nal > 128) select_row<(IPT < 8 ? IPT : 8), false>(p, Srow, xbuf, rf, ri, b, h, i, theta, sel, ksim, qs);
      else if (IPT >= 4 && nal > 64) select_row<(IPT < 4 ? IPT : 4), false>(p, Srow, xbuf, rf, ri, b, h, i, theta, sel, ksim, qs);
      else if (IPT >= 2 && nal > 32) select_row<(IPT < 2 ? IPT : 2), false>(p, Srow, xbuf, rf, ri, b, h, i, theta, sel, ksim, qs);
      else select_row<1, false>(p, Srow, xbuf, rf, ri, b, h, i, theta, sel, ksim, qs);
    }
  }
}

// ---------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------
using sparge_cuda::cuda_error;
using sparge_cuda::device_info;
using sparge_cuda::DeviceGuard;
using sparge_cuda::DeviceInfo;
using sparge_cuda::launch_kernel;

struct WsLayout {
  size_t qbar, qsim, kbuf, km, ksim, total;
};

size_t align256(size_t n) { return (n + 255u) & ~(size_t)255u; }

WsLayout ws_layout(const sparge_dims_t *d) {
  const size_t Dp = (size_t)((d->D + 3) & ~(int64_t)3);
  const size_t bhq = (size_t)d->B * (size_t)d->Hq, bhk = (size_t)d->B * (size_t)d->Hkv;
  WsLayout l;
  l.qbar = 0;
  l.qsim = l.qbar + align256(bhq * (size_t)d->nq * Dp * sizeof(float));
  l.kbuf = l.qsim + align256(bhq * (size_t)d->nq * sizeof(float));
  l.km = l.kbuf + align256(bhk * (size_t)d->nk * Dp * sizeof(float));
  l.ksim = l.km + align256(bhk * Dp * sizeof(float));
  l.total = l.ksim + align256(bhk * (size_t)d->nk * sizeof(float));
  return l;
}

int pow2ceil(int x) {
  int p = 1;
  while (p < x) p <<= 1;
  return p;
}

int log2i(int x) {
  int l = 0;
  while ((1 << l) < x) ++l;
  return l;
}

template <int DT, int VEC, int CH>
sparge_status_t launch_pool(const PoolParams &pp, int phase, int64_t blocks, cudaStream_t st, bool pdl) {
  const size_t smem = pool_smem_bytes<CH, VEC>();
  const cudaError_t err = launch_kernel(pool_kernel<DT, VEC, CH>, (unsigned)blocks, kPoolThreads, smem, st,
                                        pdl && phase == 1, pp, phase);
  if (err != cudaSuccess)
    return cuda_error(err, phase == 0 ? "predict: pooling launch" : "predict: smoothed K pooling launch");
  return SPARGE_SUCCESS;
}

template <int DT>
sparge_status_t launch_pool_dt(int vec, int ch, const PoolParams &pp, int phase, int64_t blocks,
                               cudaStream_t st, bool pdl) {
  constexpr int VF = DT == kF32 ? 4 : 8;
  if (vec == VF) {
    switch (ch) {
      case 1: return launch_pool<DT, VF, 1>(pp, phase, blocks, st, pdl);
      case 2: return launch_pool<DT, VF, 2>(pp, phase, blocks, st, pdl);
      case 4: return launch_pool<DT, VF, 4>(pp, phase, blocks, st, pdl);
      default: break;
    }
  } else {
    switch (ch) {
      case 1: return launch_pool<DT, 1, 1>(pp, phase, blocks, st, pdl);
      case 2: return launch_pool<DT, 1, 2>(pp, phase, blocks, st, pdl);
      case 4: return launch_pool<DT, 1, 4>(pp, phase, blocks, st, pdl);
      case 8: return launch_pool<DT, 1, 8>(pp, phase, blocks, st, pdl);
      default: break;
    }
  }
  return sparge_set_error(SPARGE_ERROR_INTERNAL, "predict: no pooling kernel for vec=%d ch=%d", vec, ch);
}

sparge_status_t launch_pool_any(int dt, int vec, int ch, const PoolParams &pp, int phase, int64_t blocks,
                                cudaStream_t st, bool pdl) {
  if (dt == kF32) return launch_pool_dt<kF32>(vec, ch, pp, phase, blocks, st, pdl);
  if (dt == kF16) return launch_pool_dt<kF16>(vec, ch, pp, phase, blocks, st, pdl);
  return launch_pool_dt<kBF16>(vec, ch, pp, phase, blocks, st, pdl);
}

template <int TM, int IPT, bool CTA>
sparge_status_t launch_select(SelParams sp, int64_t BH, cudaStream_t st, size_t smem_max, bool pdl) {
  using C = SelCfg<TM, IPT, CTA>;
  if (C::smem > smem_max)
    return sparge_set_error(SPARGE_ERROR_NOT_SUPPORTED,
                            "predict: %lld k-blocks need %zu bytes of shared memory per block, the device has %zu",
                            (long long)sp.nk, C::smem, smem_max);
  sp.ntiles = (sp.nq + C::QT - 1) / C::QT;
  const int64_t blocks = BH * sp.ntiles;
  if (blocks > INT_MAX)
    return sparge_set_error(SPARGE_ERROR_NOT_SUPPORTED, "predict: %lld selection blocks exceed the grid limit",
                            (long long)blocks);
  auto kfn = select_kernel<TM, IPT, CTA>;
  if (C::smem > 48 * 1024) {
    const cudaError_t err =
        cudaFuncSetAttribute(kfn, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)C::smem);
    if (err != cudaSuccess) return cuda_error(err, "predict: cudaFuncSetAttribute (selection)");
  }
  const cudaError_t err = launch_kernel(kfn, (unsigned)blocks, kSelThreads, C::smem, st, pdl, sp);
  if (err != cudaSuccess) return cuda_error(err, "predict: selection launch");
  return SPARGE_SUCCESS;
}

// CTA-wide rows (nk > 512): the largest row tile whose scores fit.
template <int IPT>
sparge_status_t launch_select_cta(const SelParams &sp, int64_t BH, cudaStream_t st, size_t smem_max, bool pdl) {
  if (SelCfg<8, IPT, true>::smem <= smem_max) return launch_select<8, IPT, true>(sp, BH, st, smem_max, pdl);
  if (SelCfg<4, IPT, true>::smem <= smem_max) return launch_select<4, IPT, true>(sp, BH, st, smem_max, pdl);
  if (SelCfg<2, IPT, true>::smem <= smem_max) return launch_select<2, IPT, true>(sp, BH, st, smem_max, pdl);
  if (SelCfg<1, IPT, true>::smem <= smem_max) return launch_select<1, IPT, true>(sp, BH, st, smem_max, pdl);
  return sparge_set_error(SPARGE_ERROR_NOT_SUPPORTED,
                          "predict: %lld k-blocks need %zu bytes of shared memory per block, the device has %zu",
                          (long long)sp.nk, SelCfg<1, IPT, true>::smem, smem_max);
}

// 16-byte vector loads need 16-byte aligned row starts.
bool aligned_rows(const sparge_tensor_t *t, int vec) {
  if (((uintptr_t)t->data & 15u) != 0) return false;
  for (int a = 0; a < 3; ++a)
    if (t->strides[a] % vec != 0) return false;
  return true;
}

} // namespace

extern "C" size_t sparge_cuda_predict_workspace(const sparge_dims_t *d, int32_t block_q, int32_t block_k) {
  (void)block_q; /* nq/nk in d already reflect the block shape */
  (void)block_k;
  return ws_layout(d).total;
}

extern "C" sparge_status_t sparge_cuda_predict(const sparge_dims_t *d, const sparge_tensor_t *q,
                                               const sparge_tensor_t *k, const sparge_tensor_t *sim_threshold,
                                               const sparge_tensor_t *select_param,
                                               const sparge_predict_params_t *p,
                                               const sparge_tensor_t *out_mask, void *workspace,
                                               void *stream) {
  const cudaStream_t st = (cudaStream_t)stream;
  const int64_t B = d->B, Hq = d->Hq, Hkv = d->Hkv, D = d->D, nq = d->nq, nk = d->nk;

  if (nk > kMaxNk)
    return sparge_set_error(SPARGE_ERROR_NOT_SUPPORTED,
                            "predict: %lld k-blocks per row (Lk = %lld, block_k = %d); the CUDA prediction "
                            "supports up to %d",
                            (long long)nk, (long long)d->Lk, (int)p->block_k, kMaxNk);
  if (((uintptr_t)workspace & 15u) != 0)
    return sparge_set_error(SPARGE_ERROR_MISALIGNED, "workspace: must be 16-byte aligned on CUDA");

  int dt;
  size_t esize;
  switch (q->dtype) {
    case SPARGE_DTYPE_FLOAT32: dt = kF32; esize = 4; break;
    case SPARGE_DTYPE_FLOAT16: dt = kF16; esize = 2; break;
    case SPARGE_DTYPE_BFLOAT16: dt = kBF16; esize = 2; break;
    default:
      return sparge_set_error(SPARGE_ERROR_INVALID_VALUE, "q: dtype %d is not float32/float16/bfloat16",
                              (int)q->dtype);
  }

  // Row layout of the pooling kernels.
  const int vf = (int)(16 / esize);
  const bool vec_ok = D % vf == 0 && aligned_rows(q, vf) && aligned_rows(k, vf);
  const int vec = vec_ok ? vf : 1;
  const int nv = (int)(D / vec);
  const int tpr = nv >= 32 ? 32 : pow2ceil(nv);
  const int ch = pow2ceil((nv + tpr - 1) / tpr);
  if ((vec > 1 && ch > 4) || (vec == 1 && ch > 8))
    return sparge_set_error(SPARGE_ERROR_NOT_SUPPORTED,
                            "predict: head dim %lld is too large for the CUDA prediction%s", (long long)D,
                            vec == 1 ? " with unaligned or odd-sized rows" : "");

  const int64_t n_qjobs = B * Hq * nq, n_kjobs = B * Hkv * nk;
  if (n_qjobs + n_kjobs > INT_MAX || B * Hkv > INT_MAX)
    return sparge_set_error(SPARGE_ERROR_NOT_SUPPORTED, "predict: %lld blocks exceed the grid limit",
                            (long long)(n_qjobs + n_kjobs));

  // Same device contract as sparge_cuda_attn: launch on the tensors' device.
  DeviceGuard guard;
  cudaError_t err = guard.enter(q->device_id);
  if (err != cudaSuccess) return cuda_error(err, "predict: cudaSetDevice");
  DeviceInfo info;
  sparge_status_t s = device_info(q->device_id, &info);
  if (s != SPARGE_SUCCESS) return s;
  const bool pdl = info.cc >= 90;

  const WsLayout lay = ws_layout(d);
  char *ws = (char *)workspace;
  float *qbar = (float *)(ws + lay.qbar), *qsim = (float *)(ws + lay.qsim);
  float *kbuf = (float *)(ws + lay.kbuf), *km = (float *)(ws + lay.km), *ksim = (float *)(ws + lay.ksim);
  const int Dp = (int)((D + 3) & ~(int64_t)3);

  PoolParams pp;
  pp.q = (const unsigned char *)q->data;
  pp.k = (const unsigned char *)k->data;
  pp.q_sb = q->strides[0]; pp.q_sh = q->strides[1]; pp.q_sr = q->strides[2];
  pp.k_sb = k->strides[0]; pp.k_sh = k->strides[1]; pp.k_sr = k->strides[2];
  pp.Hq = Hq; pp.Hkv = Hkv; pp.Lq = d->Lq; pp.Lk = d->Lk; pp.nq = nq; pp.nk = nk;
  pp.n_qjobs = n_qjobs; pp.n_kjobs = n_kjobs;

  pp.BQ = p->block_q; pp.BK = p->block_k; pp.D = (int)D; pp.Dp = Dp;
  pp.tpr = tpr; pp.log_tpr = log2i(tpr);
  pp.qbar = qbar; pp.qsim = qsim; pp.kbuf = kbuf; pp.ksim = ksim; pp.km = km;

  s = launch_pool_any(dt, vec, ch, pp, 0, n_qjobs + n_kjobs, st, pdl);
  if (s != SPARGE_SUCCESS) return s;
  err = launch_kernel(km_kernel, dim3((unsigned)(B * Hkv), (unsigned)((Dp + 31) / 32)), kKmThreads, 0, st, pdl,
                      (const float *)kbuf, km, nk, Dp, (float)d->Lk);
  if (err != cudaSuccess) return cuda_error(err, "predict: mean-of-K launch");
  s = launch_pool_any(dt, vec, ch, pp, 1, n_kjobs, st, pdl);
  if (s != SPARGE_SUCCESS) return s;

  SelParams sp;
  sp.qbar = qbar; sp.qsim = qsim; sp.kbar = kbuf; sp.ksim = ksim;
  sp.theta = (const float *)sim_threshold->data; sp.theta_stride = sim_threshold->strides[0];
  sp.selp = (const float *)select_param->data; sp.selp_stride = select_param->strides[0];
  sp.out = (unsigned char *)out_mask->data;
  sp.ms0 = out_mask->strides[0]; sp.ms1 = out_mask->strides[1];
  sp.ms2 = out_mask->strides[2]; sp.ms3 = out_mask->strides[3];
  sp.Hq = Hq; sp.Hkv = Hkv; sp.group = Hq / Hkv; sp.nq = nq; sp.nk = nk; sp.Lq = d->Lq; sp.Lk = d->Lk;
  sp.coff = sparge_causal_offset<int64_t>(p->causal, d->Lq, d->Lk);
  sp.ntiles = 0;
  sp.BQ = p->block_q; sp.BK = p->block_k; sp.Dp = Dp; sp.causal = p->causal;
  sp.topk = p->select_mode == SPARGE_SELECT_TOPK; sp.sink = p->attention_sink != 0;
  sp.scale = p->scale;

  const int64_t BH = B * Hq;
  const size_t smem_max = (size_t)info.smem_optin;
  const int npow = pow2ceil((int)nk);
  if (npow <= 32) return launch_select<2, 1, false>(sp, BH, st, smem_max, pdl);
  if (npow <= 64) return launch_select<2, 2, false>(sp, BH, st, smem_max, pdl);
  if (npow <= 128) return launch_select<2, 4, false>(sp, BH, st, smem_max, pdl);
  if (npow <= 256) return launch_select<2, 8, false>(sp, BH, st, smem_max, pdl);
  if (npow <= 512) return launch_select<2, 16, false>(sp, BH, st, smem_max, pdl);
  if (npow <= 1024) return launch_select_cta<4>(sp, BH, st, smem_max, pdl);
  if (npow <= 2048) return launch_select_cta<8>(sp, BH, st, smem_max, pdl);
  return launch_select_cta<16>(sp, BH, st, smem_max, pdl);
}
