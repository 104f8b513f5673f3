/*
 * attn.c — CPU block-sparse attention forward (SPEC §2, sparge.h
 * sparge_block_sparse_attn).
 *
 * One task = one (batch, q-head, q-block). Tasks are spread over OpenMP
 * threads (dynamic schedule, heaviest causal q-blocks first); every thread owns
 * a 64-byte aligned scratch area allocated once inside the parallel region.
 *
 * Per task everything is fp32; attn_task runs these phases (one static
 * function each, force-inlined):
 *   attn_load_q        Q of the q-block, loaded once, multiplied by
 *                      scale*log2(e) and stored transposed and packed in
 *                      panels of 16 rows, qt[nrp/16][D][16] (nrp = rows
 *                      rounded up to 16, zero padded), so that the score tile
 *                      comes out transposed too: st[key][row]. With this
 *                      layout K and V are read row-wise.
 *   for each kept, causally allowed k-block j (ascending):
 *     attn_load_k        fp32 K in place (any row stride), fp16/bf16 K
 *                        converted into a per-block tile
 *     attn_scores        st = K_j . qt  (6 keys x 16 rows register tile, FMA),
 *                        prefetching V
 *     attn_mask          exact masking (causal boundary, key padding; the
 *                        sequence end is implicit: only the block's real keys
 *                        are computed)
 *     attn_softmax_max   rowmax, m_new, alpha = exp2(m - m_new)
 *     attn_pv_skip       PV-skip decision per row group of pv_group rows
 *     attn_softmax_exp   p = exp2(s - m_new), row sums (vectorized exp2,
 *                        -inf -> 0)
 *     attn_softmax_sums  l = l * alpha + row sum; skipped rows rescaled
 *     attn_load_v        V copied / converted into a per-block tile with a
 *                        padded row stride
 *     attn_pv            acc = acc * alpha + P.V (6 rows x 16 columns register
 *                        tile), prefetching the next kept K block
 *   attn_finalize      out = acc / l (0 for rows that see no key),
 *                      lse = (m + log2 l) ln 2; the task's stats.
 *
 * The AVX2+FMA path (GCC/Clang with -mavx2 -mfma, e.g. -march=native on x86)
 * uses intrinsics for the micro-kernels and the softmax phases; every other
 * build uses the portable C path of each phase, which follows the same
 * algorithm step by step.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "../geometry.h"
#include "cpu_common.h"

#if defined(__AVX2__) && defined(__FMA__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define ATTN_AVX2 1
#else
#define ATTN_AVX2 0
#endif

#if defined(__GNUC__) || defined(__clang__)
#define ATTN_INLINE static inline __attribute__((always_inline))
#define ATTN_RESTRICT __restrict__
#else
#define ATTN_INLINE static inline
#define ATTN_RESTRICT
#endif

#ifdef _OPENMP
#define ATTN_OMP(x) _Pragma(#x)
#else
#define ATTN_OMP(x)
#endif

/* Query rows per register tile column stripe, keys / rows per register tile. */
#define ATTN_NR 16
#define ATTN_MR 6
#define ATTN_ALIGN 64

static inline int64_t attn_round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
static inline int64_t attn_min64(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t attn_max64(int64_t a, int64_t b) { return a > b ? a : b; }
/* n (a multiple of 16 floats) rounded up to an odd number of 64-byte lines. */
static inline int64_t attn_odd_lines(int64_t n) { return (n / 16) % 2 ? n : n + 16; }

/* ------------------------------------------------------------------------ */
/* exp2                                                                     */
/* ------------------------------------------------------------------------ */
/* 2^x for x <= 0 in practice: round-to-nearest split x = n + f, |f| <= 1/2,
 * 2^f by the Cephes exp2f minimax polynomial (~1 ulp), 2^n through the
 * exponent bits. Results in the subnormal range are produced as subnormals
 * (2^(n+64) first, then one rounding by 2^-64), x < -151 (including -inf)
 * gives 0, NaN stays NaN, x is clamped to 127 from above. */
#define ATTN_EXP2_P0 1.535336188319500e-4f
#define ATTN_EXP2_P1 1.339887440266574e-3f
#define ATTN_EXP2_P2 9.618437357674640e-3f
#define ATTN_EXP2_P3 5.550332471162809e-2f
#define ATTN_EXP2_P4 2.402264791363012e-1f
#define ATTN_EXP2_P5 6.931472028550421e-1f
#define ATTN_TWO_M64 5.42101086242752217e-20f /* 2^-64 */

static inline float attn_exp2_scalar(float x) {
  if (x != x) return x;
  if (x < -151.0f) return 0.0f;
  if (x > 127.0f) x = 127.0f;
  /* round to nearest even without libm (valid for |x| < 2^22; needs no
   * -ffast-math, which would fold the two operations away) */
  const float magic = 12582912.0f; /* 1.5 * 2^23 */
  float n = (x + magic) - magic;
  float f = x - n;
  float p = ATTN_EXP2_P0;
  p = p * f + ATTN_EXP2_P1;
  p = p * f + ATTN_EXP2_P2;
  p = p * f + ATTN_EXP2_P3;
  p = p * f + ATTN_EXP2_P4;
  p = p * f + ATTN_EXP2_P5;
  p = p * f + 1.0f;
  const int small = n < -126.0f;
  int32_t e = (int32_t)n + 127 + (small ? 64 : 0);
  uint32_t bits = (uint32_t)e << 23;
  float sc;
  memcpy(&sc, &bits, 4);
  float r = p * sc;
  return small ? r * ATTN_TWO_M64 : r;
}

#if ATTN_AVX2
ATTN_INLINE __m256 attn_exp2_avx(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-151.0f);
  const __m256 hi = _mm256_set1_ps(127.0f);
  __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ); /* false for NaN */
  /* max/min return the second operand when one is NaN: keep x second */
  __m256 xc = _mm256_max_ps(lo, x);
  xc = _mm256_min_ps(hi, xc);
  __m256 n = _mm256_round_ps(xc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 f = _mm256_sub_ps(xc, n);
  __m256 p = _mm256_set1_ps(ATTN_EXP2_P0);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(ATTN_EXP2_P1));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(ATTN_EXP2_P2));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(ATTN_EXP2_P3));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(ATTN_EXP2_P4));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(ATTN_EXP2_P5));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
  __m256 small = _mm256_cmp_ps(n, _mm256_set1_ps(-126.0f), _CMP_LT_OQ);
  if (__builtin_expect(_mm256_movemask_ps(small) != 0, 0)) {
    n = _mm256_add_ps(n, _mm256_and_ps(small, _mm256_set1_ps(64.0f)));
    __m256i ni = _mm256_cvtps_epi32(n);
    __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(ni, _mm256_set1_epi32(127)), 23);
    __m256 r = _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
    r = _mm256_blendv_ps(r, _mm256_mul_ps(r, _mm256_set1_ps(ATTN_TWO_M64)), small);
    return _mm256_andnot_ps(under, r);
  }
  __m256i ni = _mm256_cvtps_epi32(n);
  __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(ni, _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}
#endif

/* ------------------------------------------------------------------------ */
/* Row conversion (fast paths for the helpers of cpu_common.h)              */
/* ------------------------------------------------------------------------ */
static void attn_load_row(float *ATTN_RESTRICT dst, const void *src, int32_t dtype, int64_t n,
                          float mul) {
  if (dtype == SPARGE_DTYPE_FLOAT32) {
    const float *s = (const float *)src;
    if (mul == 1.0f) {
      memcpy(dst, s, (size_t)n * sizeof(float));
    } else {
      for (int64_t i = 0; i < n; ++i) dst[i] = s[i] * mul;
    }
    return;
  }
  if (dtype == SPARGE_DTYPE_BFLOAT16) {
    const uint16_t *s = (const uint16_t *)src;
    for (int64_t i = 0; i < n; ++i) {
      uint32_t bits = (uint32_t)s[i] << 16;
      float f;
      memcpy(&f, &bits, 4);
      dst[i] = f * mul;
    }
    return;
  }
  /* float16 */
  int64_t i = 0;
#if ATTN_AVX2 && defined(__F16C__)
  {
    const __m256 vm = _mm256_set1_ps(mul);
    for (; i + 8 <= n; i += 8) {
      __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)src + i));
      _mm256_storeu_ps(dst + i, _mm256_mul_ps(_mm256_cvtph_ps(h), vm));
    }
  }
#endif
  if (i < n) sparge_load_row(dst + i, (const uint16_t *)src + i, dtype, n - i, mul);
}

/* Writes n floats as dtype (round to nearest even), like sparge_store_row;
 * float16 goes through F16C where the build has it (same rounding, overflow
 * to inf and subnormal results). */
static void attn_store_row(void *dst, const float *src, int32_t dtype, int64_t n) {
#if ATTN_AVX2 && defined(__F16C__)
  if (dtype == SPARGE_DTYPE_FLOAT16) {
    int64_t i = 0;
    uint16_t *d16 = (uint16_t *)dst;
    for (; i + 8 <= n; i += 8) {
      __m256 x = _mm256_loadu_ps(src + i);
      /* NaN keeps the helper's encoding; the others convert in hardware */
      if (_mm256_movemask_ps(_mm256_cmp_ps(x, x, _CMP_UNORD_Q))) break;
      _mm_storeu_si128((__m128i *)(d16 + i),
                       _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
    if (i < n) sparge_store_row(d16 + i, src + i, dtype, n - i);
    return;
  }
#endif
  sparge_store_row(dst, src, dtype, n);
}

/* ------------------------------------------------------------------------ */
/* Software prefetch                                                        */
/* ------------------------------------------------------------------------ */
/* A cursor over the cache lines of a block of rows (the V block while Q.K
 * runs, the next K block while P.V runs). The micro-kernel loops issue a few
 * prefetches per register tile so that the misses overlap the FMAs instead of
 * piling up in one burst. A no-op where the builtin is missing. */
typedef struct attn_pf {
  const char *p;
  int64_t rows, row_bytes, stride;
  int64_t x, o;
} attn_pf_t;

static inline void attn_pf_init(attn_pf_t *pf, const char *p, int64_t rows, int64_t row_bytes,
                                int64_t stride) {
  pf->p = p;
  pf->rows = rows;
  pf->row_bytes = row_bytes;
  pf->stride = stride;
  pf->x = 0;
  pf->o = 0;
}

static inline void attn_pf_step(attn_pf_t *pf, int n) {
#if defined(__GNUC__) || defined(__clang__)
  for (; n > 0 && pf->x < pf->rows; --n) {
    __builtin_prefetch(pf->p + pf->x * pf->stride + pf->o, 0, 2);
    pf->o += 64;
    if (pf->o >= pf->row_bytes) {
      pf->o = 0;
      ++pf->x;
    }
  }
#else
  (void)n;
  pf->x = pf->rows;
#endif
}

static inline void attn_pf_finish(attn_pf_t *pf) { attn_pf_step(pf, 1 << 30); }

#define ATTN_PF_PER_TILE 6

/* ------------------------------------------------------------------------ */
/* Micro-kernels                                                            */
/* ------------------------------------------------------------------------ */
/* st[c][r] = sum_d K[c][d] * qt[r/16][d][r%16] for c < nkv, r < nrp (nrp % 16 == 0).
 * The tile works on one 16-row panel: qt[d][0..16) at qt + d * 16. */
#if ATTN_AVX2
ATTN_INLINE void attn_qk_tile_avx(const int mr, int64_t D, const float *ATTN_RESTRICT K,
                                  int64_t ldk, const float *ATTN_RESTRICT qt,
                                  float *ATTN_RESTRICT st, int64_t lds) {
  __m256 a0[ATTN_MR], a1[ATTN_MR];
  const float *kr[ATTN_MR];
#pragma GCC unroll 6
  for (int i = 0; i < mr; ++i) {
    a0[i] = _mm256_setzero_ps();
    a1[i] = _mm256_setzero_ps();
    kr[i] = K + (int64_t)i * ldk;
  }
  for (int64_t d = 0; d < D; ++d) {
    const float *qp = qt + d * ATTN_NR;
    __m256 q0 = _mm256_load_ps(qp);
    __m256 q1 = _mm256_load_ps(qp + 8);
#pragma GCC unroll 6
    for (int i = 0; i < mr; ++i) {
      __m256 kb = _mm256_broadcast_ss(kr[i] + d);
      a0[i] = _mm256_fmadd_ps(kb, q0, a0[i]);
      a1[i] = _mm256_fmadd_ps(kb, q1, a1[i]);
    }
  }
#pragma GCC unroll 6
  for (int i = 0; i < mr; ++i) {
    _mm256_store_ps(st + (int64_t)i * lds, a0[i]);
    _mm256_store_ps(st + (int64_t)i * lds + 8, a1[i]);
  }
}

static void attn_qk_avx(int64_t nkv, int64_t nrp, int64_t D, const float *K, int64_t ldk,
                        const float *qt, float *st, int64_t lds, attn_pf_t *pf) {
  for (int64_t r = 0; r < nrp; r += ATTN_NR) {
    const float *qp = qt + r * D; /* panel r / 16 */
    int64_t c = 0;
    for (; c + ATTN_MR <= nkv; c += ATTN_MR) {
      attn_qk_tile_avx(ATTN_MR, D, K + c * ldk, ldk, qp, st + c * lds + r, lds);
      attn_pf_step(pf, ATTN_PF_PER_TILE);
    }
    const float *kk = K + c * ldk;
    float *ss = st + c * lds + r;
    switch (nkv - c) {
      case 5: attn_qk_tile_avx(5, D, kk, ldk, qp, ss, lds); break;
      case 4: attn_qk_tile_avx(4, D, kk, ldk, qp, ss, lds); break;
      case 3: attn_qk_tile_avx(3, D, kk, ldk, qp, ss, lds); break;
      case 2: attn_qk_tile_avx(2, D, kk, ldk, qp, ss, lds); break;
      case 1: attn_qk_tile_avx(1, D, kk, ldk, qp, ss, lds); break;
      default: break;
    }
  }
}

/* acc[r][0..16) = acc[r][..] * alpha[r] + sum_c pt[c][r] * V[c][0..16), r < mr. */
ATTN_INLINE void attn_pv_tile_avx(const int mr, int64_t nkv, const float *ATTN_RESTRICT pt,
                                  int64_t lds, const float *ATTN_RESTRICT V, int64_t ldv,
                                  float *ATTN_RESTRICT acc, int64_t lda,
                                  const float *ATTN_RESTRICT alpha) {
  __m256 a0[ATTN_MR], a1[ATTN_MR];
#pragma GCC unroll 6
  for (int i = 0; i < mr; ++i) {
    __m256 al = _mm256_broadcast_ss(alpha + i);
    a0[i] = _mm256_mul_ps(_mm256_load_ps(acc + (int64_t)i * lda), al);
    a1[i] = _mm256_mul_ps(_mm256_load_ps(acc + (int64_t)i * lda + 8), al);
  }
  for (int64_t c = 0; c < nkv; ++c) {
    const float *vp = V + c * ldv;
    const float *pp = pt + c * lds;
    __m256 v0 = _mm256_loadu_ps(vp);
    __m256 v1 = _mm256_loadu_ps(vp + 8);
#pragma GCC unroll 6
    for (int i = 0; i < mr; ++i) {
      __m256 pb = _mm256_broadcast_ss(pp + i);
      a0[i] = _mm256_fmadd_ps(pb, v0, a0[i]);
      a1[i] = _mm256_fmadd_ps(pb, v1, a1[i]);
    }
  }
#pragma GCC unroll 6
  for (int i = 0; i < mr; ++i) {
    _mm256_store_ps(acc + (int64_t)i * lda, a0[i]);
    _mm256_store_ps(acc + (int64_t)i * lda + 8, a1[i]);
  }
}

/* Rows [ra, rb) of acc, all Dvp (multiple of 16) columns. */
static void attn_pv_avx(int64_t ra, int64_t rb, int64_t nkv, int64_t Dvp, const float *pt,
                        int64_t lds, const float *V, int64_t ldv, float *acc, int64_t lda,
                        const float *alpha, attn_pf_t *pf) {
  for (int64_t dv = 0; dv < Dvp; dv += 16) {
    int64_t r = ra;
    for (; r + ATTN_MR <= rb; r += ATTN_MR) {
      attn_pv_tile_avx(ATTN_MR, nkv, pt + r, lds, V + dv, ldv, acc + r * lda + dv, lda, alpha + r);
      attn_pf_step(pf, ATTN_PF_PER_TILE);
    }
    const float *p = pt + r;
    const float *vv = V + dv;
    float *a = acc + r * lda + dv;
    const float *al = alpha + r;
    switch (rb - r) {
      case 5: attn_pv_tile_avx(5, nkv, p, lds, vv, ldv, a, lda, al); break;
      case 4: attn_pv_tile_avx(4, nkv, p, lds, vv, ldv, a, lda, al); break;
      case 3: attn_pv_tile_avx(3, nkv, p, lds, vv, ldv, a, lda, al); break;
      case 2: attn_pv_tile_avx(2, nkv, p, lds, vv, ldv, a, lda, al); break;
      case 1: attn_pv_tile_avx(1, nkv, p, lds, vv, ldv, a, lda, al); break;
      default: break;
    }
  }
}
#else /* !ATTN_AVX2 */

/* Portable versions (same results up to fp32 rounding order). */
static void attn_qk_portable(int64_t nkv, int64_t nrp, int64_t D, const float *ATTN_RESTRICT K,
                             int64_t ldk, const float *ATTN_RESTRICT qt,
                             float *ATTN_RESTRICT st, int64_t lds) {
  for (int64_t c = 0; c < nkv; ++c) {
    const float *kr = K + c * ldk;
    for (int64_t r0 = 0; r0 < nrp; r0 += ATTN_NR) {
      float *ATTN_RESTRICT srow = st + c * lds + r0;
      const float *ATTN_RESTRICT qp = qt + r0 * D;
      float a[ATTN_NR];
      for (int i = 0; i < ATTN_NR; ++i) a[i] = 0.0f;
      for (int64_t d = 0; d < D; ++d) {
        const float kv = kr[d];
        for (int i = 0; i < ATTN_NR; ++i) a[i] += kv * qp[d * ATTN_NR + i];
      }
      for (int i = 0; i < ATTN_NR; ++i) srow[i] = a[i];
    }
  }
}

static void attn_pv_portable(int64_t ra, int64_t rb, int64_t nkv, int64_t Dvp,
                             const float *ATTN_RESTRICT pt, int64_t lds,
                             const float *ATTN_RESTRICT V, int64_t ldv,
                             float *ATTN_RESTRICT acc, int64_t lda,
                             const float *ATTN_RESTRICT alpha, int64_t Dv) {
  (void)Dvp;
  for (int64_t r = ra; r < rb; ++r) {
    float *ATTN_RESTRICT a = acc + r * lda;
    const float al = alpha[r];
    for (int64_t x = 0; x < Dv; ++x) a[x] *= al;
    for (int64_t c = 0; c < nkv; ++c) {
      const float p = pt[c * lds + r];
      const float *ATTN_RESTRICT vr = V + c * ldv;
      for (int64_t x = 0; x < Dv; ++x) a[x] += p * vr[x];
    }
  }
}
#endif /* ATTN_AVX2 */

/* ------------------------------------------------------------------------ */
/* Context and scratch                                                      */
/* ------------------------------------------------------------------------ */
typedef struct attn_ctx {
  const sparge_dims_t *d;
  const sparge_tensor_t *q, *k, *v, *mask, *kpad, *pv, *out, *lse;
  int32_t dtype;
  int32_t causal;
  int64_t BQ, BK, G, rep;
  int64_t BQp, Dvp, Dmax;
  float qmul;
  int k_direct;
} attn_ctx_t;

typedef struct attn_scratch {
  void *base;
  float *qt;    /* [BQp/16][D][16] */
  float *st;    /* [BK][lds] scores, then probabilities (transposed) */
  float *kc;    /* [BK][D] converted K (non-fp32) */
  float *vc;    /* [BK][lda] V of the block as fp32 */
  float *acc;   /* [BQp][lda] */
  float *m, *mnew, *rmax, *alpha, *muse, *rsum, *l; /* [BQp] */
  float *tmp;   /* [Dmax] */
  uint8_t *skip; /* [BQp] */
} attn_scratch_t;

static size_t attn_bytes(int64_t nfloats) {
  return (size_t)attn_round_up(nfloats * (int64_t)sizeof(float), ATTN_ALIGN);
}

static int attn_scratch_alloc(const attn_ctx_t *c, attn_scratch_t *w) {
  const sparge_dims_t *d = c->d;
  const int64_t BQp = c->BQp, BK = c->BK, Dvp = c->Dvp;
  const int64_t lds = attn_odd_lines(BQp), lda = attn_odd_lines(Dvp);
  size_t sz_qt = attn_bytes(d->D * BQp);
  size_t sz_st = attn_bytes(BK * lds);
  size_t sz_kc = c->k_direct ? 0 : attn_bytes(BK * d->D);
  size_t sz_vc = attn_bytes(BK * lda);
  size_t sz_acc = attn_bytes(BQp * lda);
  size_t sz_row = attn_bytes(BQp);
  size_t sz_tmp = attn_bytes(c->Dmax);
  size_t sz_skip = (size_t)attn_round_up(BQp, ATTN_ALIGN);
  size_t total = sz_qt + sz_st + sz_kc + sz_vc + sz_acc + 7 * sz_row + sz_tmp + sz_skip + ATTN_ALIGN;
  memset(w, 0, sizeof(*w));
  w->base = malloc(total);
  if (!w->base) return 0;
  char *p = (char *)(((uintptr_t)w->base + (ATTN_ALIGN - 1)) & ~(uintptr_t)(ATTN_ALIGN - 1));
  w->qt = (float *)p; p += sz_qt;
  w->st = (float *)p; p += sz_st;
  w->kc = sz_kc ? (float *)p : NULL; p += sz_kc;
  w->vc = (float *)p; p += sz_vc;
  w->acc = (float *)p; p += sz_acc;
  w->m = (float *)p; p += sz_row;
  w->mnew = (float *)p; p += sz_row;
  w->rmax = (float *)p; p += sz_row;
  w->alpha = (float *)p; p += sz_row;
  w->muse = (float *)p; p += sz_row;
  w->rsum = (float *)p; p += sz_row;
  w->l = (float *)p; p += sz_row;
  w->tmp = (float *)p; p += sz_tmp;
  w->skip = (uint8_t *)p;
  /* vc's padding columns [Dv, lda) stay zero for the whole call. */
  memset(w->vc, 0, sz_vc);
  return 1;
}

/* ------------------------------------------------------------------------ */
/* One (b, h, q-block) task, phase by phase                                 */
/* ------------------------------------------------------------------------ */
/* The geometry of one task, fixed for all its k-blocks. */
typedef struct attn_tile {
  int64_t b, h, qi;
  int64_t r0, nr, nrp; /* first query row, valid rows, rows rounded up to 16 */
  int64_t lds, lda;    /* row strides of st and acc / vc */
  int causal;
  int64_t off;         /* causal offset: row r sees keys c <= r + off */
  int64_t n_allowed;   /* causally allowed k-blocks [0, n_allowed) */
  int64_t ngroups;     /* PV-skip row groups */
  const char *kbase, *vbase; /* K / V rows of kv-head g */
  int64_t esz, ks, vs; /* element size, K / V row strides (elements) */
} attn_tile_t;

static void attn_tile_init(const attn_ctx_t *c, int64_t b, int64_t h, int64_t qi, attn_tile_t *t) {
  const sparge_dims_t *d = c->d;
  const int64_t Lq = d->Lq, Lk = d->Lk;
  const int64_t g = h / c->rep;
  t->b = b;
  t->h = h;
  t->qi = qi;
  t->r0 = qi * c->BQ;
  t->nr = sparge_block_len(qi, c->BQ, Lq);
  t->nrp = attn_round_up(t->nr, ATTN_NR);
  /* Row strides of the scratch tiles are an odd number of cache lines so that
   * walking a column does not keep hitting the same L1 sets. */
  t->lds = attn_odd_lines(t->nrp);
  t->lda = attn_odd_lines(c->Dvp);
  /* causal geometry: row r sees keys c <= min(r0 + r + off, Lk - 1) */
  t->causal = c->causal != SPARGE_CAUSAL_NONE;
  t->off = sparge_causal_offset(c->causal, Lq, Lk);
  t->n_allowed = sparge_allowed_blocks(sparge_last_visible_key(t->causal, t->r0 + t->nr - 1, t->off, Lk), c->BK);
  t->ngroups = (t->nr + c->G - 1) / c->G;
  t->kbase = sparge_elem_ptr(c->k, b, g, 0, 0);
  t->vbase = sparge_elem_ptr(c->v, b, g, 0, 0);
  t->esz = (int64_t)sparge_dtype_size(c->dtype);
  t->ks = c->k->strides[2];
  t->vs = c->v->strides[2];
}

/* Load: Q^T of the q-block, pre-scaled into the log2 domain, in 16-row
 * panels, rows nr..nrp-1 zero; then the running state (m = -inf, l = 0, no
 * skip, acc = 0). */
ATTN_INLINE void attn_load_q(const attn_ctx_t *c, attn_scratch_t *w, const attn_tile_t *t) {
  const int64_t D = c->d->D, nr = t->nr, nrp = t->nrp;
  float *ATTN_RESTRICT qt = w->qt;
  float *ATTN_RESTRICT tmp = w->tmp;
  for (int64_t r = 0; r < nr; ++r) {
    attn_load_row(tmp, sparge_elem_ptr(c->q, t->b, t->h, t->r0 + r, 0), c->dtype, D, c->qmul);
    float *qp = qt + (r / ATTN_NR) * ATTN_NR * D + r % ATTN_NR;
    for (int64_t x = 0; x < D; ++x) qp[x * ATTN_NR] = tmp[x];
  }
  for (int64_t r = nr; r < nrp; ++r) {
    float *qp = qt + (r / ATTN_NR) * ATTN_NR * D + r % ATTN_NR;
    for (int64_t x = 0; x < D; ++x) qp[x * ATTN_NR] = 0.0f;
  }

  for (int64_t r = 0; r < nrp; ++r) {
    w->m[r] = -INFINITY;
    w->l[r] = 0.0f;
    w->skip[r] = 0;
  }
  memset(w->acc, 0, (size_t)(nr * t->lda) * sizeof(float));
}

/* Load: K of the block (keys c0..c0+nkv-1) as fp32 rows: fp32 K in place
 * (any row stride), fp16/bf16 converted into kc. Sets *ldk. */
ATTN_INLINE const float *attn_load_k(const attn_ctx_t *c, attn_scratch_t *w, const attn_tile_t *t,
                                     int64_t c0, int64_t nkv, int64_t *ldk) {
  const int64_t D = c->d->D;
  if (c->k_direct) {
    *ldk = t->ks;
    return (const float *)(t->kbase + c0 * t->ks * t->esz);
  }
  for (int64_t x = 0; x < nkv; ++x)
    attn_load_row(w->kc + x * D, t->kbase + (c0 + x) * t->ks * t->esz, c->dtype, D, 1.0f);
  *ldk = D;
  return w->kc;
}

/* Load: V of the block into vc (padded row stride lda). V is always copied:
 * measured faster than reading it in place (a power-of-two row stride maps a
 * 16-column stripe onto few L1 sets). */
ATTN_INLINE void attn_load_v(const attn_ctx_t *c, attn_scratch_t *w, const attn_tile_t *t, int64_t c0,
                             int64_t nkv) {
  for (int64_t x = 0; x < nkv; ++x)
    attn_load_row(w->vc + x * t->lda, t->vbase + (c0 + x) * t->vs * t->esz, c->dtype, c->d->Dv, 1.0f);
}

/* Scores: S^T = K . Q^T (st[key][row]), prefetching the block's V a few lines
 * per register tile. */
ATTN_INLINE void attn_scores(const attn_ctx_t *c, attn_scratch_t *w, const attn_tile_t *t, const float *Kp,
                             int64_t ldk, int64_t c0, int64_t nkv) {
  attn_pf_t pf;
  attn_pf_init(&pf, t->vbase + c0 * t->vs * t->esz, nkv, c->d->Dv * t->esz, t->vs * t->esz);
#if ATTN_AVX2
  attn_qk_avx(nkv, t->nrp, c->d->D, Kp, ldk, w->qt, w->st, t->lds, &pf);
  attn_pf_finish(&pf);
#else
  attn_pf_finish(&pf);
  attn_qk_portable(nkv, t->nrp, c->d->D, Kp, ldk, w->qt, w->st, t->lds);
#endif
}

/* Masking: -inf where a row does not see a key: the causal boundary (only on
 * blocks that cross it) and key padding. The sequence end is implicit: only
 * the block's real keys are computed. Returns whether some row may not see
 * some key of the block. */
ATTN_INLINE int attn_mask(const attn_ctx_t *c, attn_scratch_t *w, const attn_tile_t *t, int64_t c0,
                          int64_t nkv) {
  const int64_t nr = t->nr, nrp = t->nrp, lds = t->lds;
  float *ATTN_RESTRICT st = w->st;
  int masked = 0;
  if (t->causal && sparge_causal_block_partial(t->r0, t->off, c0 + nkv - 1)) {
    masked = 1;
    /* rows before the first row that sees key c0+x (tile-relative) */
    for (int64_t x = 0; x < nkv; ++x) {
      int64_t rf = attn_max64(0, attn_min64(nr, sparge_first_row_seeing(c0 + x, t->off) - t->r0));
      float *srow = st + x * lds;
      for (int64_t r = 0; r < rf; ++r) srow[r] = -INFINITY;
    }
  }
  if (c->kpad) {
    for (int64_t x = 0; x < nkv; ++x) {
      if (!sparge_mask_at(c->kpad, t->b, c0 + x, 0, 0)) {
        float *srow = st + x * lds;
        for (int64_t r = 0; r < nrp; ++r) srow[r] = -INFINITY;
        masked = 1;
      }
    }
  }
  return masked;
}

/* Online softmax, step 1: the block's row max rmax, the new running max mnew,
 * the max used in the exponent muse (0 while a row has seen nothing) and the
 * rescale factor alpha = exp2(m - mnew) (1 while a row has seen nothing).
 * The maxima ignore NaN scores (the reference's rule); a NaN score still makes
 * its row NaN through exp2(NaN - muse) in the sums and P.V. */
ATTN_INLINE void attn_softmax_max(attn_scratch_t *w, const attn_tile_t *t, int64_t nkv) {
  const int64_t nrp = t->nrp, lds = t->lds;
  const float NEG_INF = -INFINITY;
  const float *ATTN_RESTRICT st = w->st;
  float *ATTN_RESTRICT m = w->m;
  float *ATTN_RESTRICT mnew = w->mnew;
  float *ATTN_RESTRICT rmax = w->rmax;
  float *ATTN_RESTRICT alpha = w->alpha;
  float *ATTN_RESTRICT muse = w->muse;
#if ATTN_AVX2
  for (int64_t r = 0; r < nrp; r += 8) {
    __m256 mx0 = _mm256_set1_ps(NEG_INF), mx1 = mx0;
    int64_t x = 0;
    /* max_ps returns its second operand when one is NaN: the running max goes
     * second, so a NaN score is ignored (never NaN: it starts at -inf) */
    for (; x + 2 <= nkv; x += 2) {
      mx0 = _mm256_max_ps(_mm256_load_ps(st + x * lds + r), mx0);
      mx1 = _mm256_max_ps(_mm256_load_ps(st + (x + 1) * lds + r), mx1);
    }
    if (x < nkv) mx0 = _mm256_max_ps(_mm256_load_ps(st + x * lds + r), mx0);
    mx0 = _mm256_max_ps(mx0, mx1);
    _mm256_store_ps(rmax + r, mx0);
  }
#else
  for (int64_t r = 0; r < nrp; ++r) rmax[r] = NEG_INF;
  for (int64_t x = 0; x < nkv; ++x) {
    const float *srow = st + x * lds;
    for (int64_t r = 0; r < nrp; ++r) rmax[r] = srow[r] > rmax[r] ? srow[r] : rmax[r];
  }
#endif
  for (int64_t r = 0; r < nrp; ++r) {
    const float mn = rmax[r] > m[r] ? rmax[r] : m[r];
    mnew[r] = mn;
    const int none = mn == NEG_INF;
    muse[r] = none ? 0.0f : mn;
    alpha[r] = none ? 1.0f : m[r] - mn; /* exponent; exp2 below */
  }
#if ATTN_AVX2
  for (int64_t r = 0; r < nrp; r += 8) {
    __m256 e = _mm256_load_ps(alpha + r);
    __m256 none = _mm256_cmp_ps(_mm256_load_ps(mnew + r), _mm256_set1_ps(NEG_INF), _CMP_EQ_OQ);
    _mm256_store_ps(alpha + r, _mm256_blendv_ps(attn_exp2_avx(e), _mm256_set1_ps(1.0f), none));
  }
#else
  for (int64_t r = 0; r < nrp; ++r)
    alpha[r] = mnew[r] == NEG_INF ? 1.0f : attn_exp2_scalar(alpha[r]);
#endif
}

/* True when one of the rows [r0, r1) has a NaN score among the block's nkv
 * keys. */
static int attn_rows_have_nan(const float *st, int64_t lds, int64_t nkv, int64_t r0, int64_t r1) {
  int nan = 0;
  for (int64_t x = 0; x < nkv; ++x) {
    const float *srow = st + x * lds;
    for (int64_t r = r0; r < r1; ++r) nan |= srow[r] != srow[r];
  }
  return nan;
}

/* PV-skip decision (not on a task's first kept block): a group of G rows
 * skips P.V when every row's block max is at least lam below its running max
 * before the block (m, not yet updated), so a block that raises the max is
 * never skipped, and no row of the group has a NaN score in the block.
 * Marks skip[] and returns the number of skipping groups. */
ATTN_INLINE int64_t attn_pv_skip(const attn_ctx_t *c, attn_scratch_t *w, const attn_tile_t *t, int64_t nkv,
                                 float lam) {
  const int64_t nr = t->nr, G = c->G;
  const float *ATTN_RESTRICT rmax = w->rmax;
  const float *ATTN_RESTRICT m = w->m;
  uint8_t *ATTN_RESTRICT skip = w->skip;
  int64_t nskip = 0;
  for (int64_t g0 = 0; g0 < nr; g0 += G) {
    const int64_t g1 = attn_min64(nr, g0 + G);
    int agree = 1;
    for (int64_t r = g0; r < g1; ++r)
      if (!(rmax[r] <= m[r] - lam)) { agree = 0; break; }
    /* rmax ignores NaN scores: checked here, on the (cheaper) skipping path only */
    if (agree && attn_rows_have_nan(w->st, t->lds, nkv, g0, g1)) agree = 0;
    for (int64_t r = g0; r < g1; ++r) skip[r] = (uint8_t)agree;
    if (agree) ++nskip;
  }
  return nskip;
}

/* Online softmax, step 2: P = exp2(S - muse) in place of the scores and the
 * block's row sums rsum, for rows that do not skip (the AVX2 path skips only
 * 8-row runs that skip entirely; the others' values are not read). */
ATTN_INLINE void attn_softmax_exp(attn_scratch_t *w, const attn_tile_t *t, int64_t nkv, int any_skip) {
  const int64_t nr = t->nr, lds = t->lds;
  float *ATTN_RESTRICT st = w->st;
  const float *ATTN_RESTRICT muse = w->muse;
  float *ATTN_RESTRICT rsum = w->rsum;
  const uint8_t *ATTN_RESTRICT skip = w->skip;
#if ATTN_AVX2
  for (int64_t r = 0; r < nr; r += 8) {
    if (any_skip) {
      int all = 1;
      for (int64_t x = r; x < attn_min64(nr, r + 8); ++x) all &= skip[x];
      if (all) continue;
    }
    const __m256 mu = _mm256_load_ps(muse + r);
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int64_t x = 0;
    for (; x + 2 <= nkv; x += 2) {
      float *p0 = st + x * lds + r, *p1 = p0 + lds;
      __m256 e0 = attn_exp2_avx(_mm256_sub_ps(_mm256_load_ps(p0), mu));
      __m256 e1 = attn_exp2_avx(_mm256_sub_ps(_mm256_load_ps(p1), mu));
      _mm256_store_ps(p0, e0);
      _mm256_store_ps(p1, e1);
      s0 = _mm256_add_ps(s0, e0);
      s1 = _mm256_add_ps(s1, e1);
    }
    if (x < nkv) {
      float *p0 = st + x * lds + r;
      __m256 e0 = attn_exp2_avx(_mm256_sub_ps(_mm256_load_ps(p0), mu));
      _mm256_store_ps(p0, e0);
      s0 = _mm256_add_ps(s0, e0);
    }
    _mm256_store_ps(rsum + r, _mm256_add_ps(s0, s1));
  }
#else
  (void)any_skip;
  for (int64_t r = 0; r < nr; ++r) rsum[r] = 0.0f;
  for (int64_t x = 0; x < nkv; ++x) {
    float *srow = st + x * lds;
    for (int64_t r = 0; r < nr; ++r) {
      if (skip[r]) continue;
      const float p = attn_exp2_scalar(srow[r] - muse[r]);
      srow[r] = p;
      rsum[r] += p;
    }
  }
#endif
}

/* Online softmax, step 3: running sums l = l * alpha + rsum and m = mnew;
 * skipped rows add nothing but are rescaled (l and acc by alpha). */
ATTN_INLINE void attn_softmax_sums(const attn_ctx_t *c, attn_scratch_t *w, const attn_tile_t *t) {
  const int64_t nr = t->nr, lda = t->lda, Dv = c->d->Dv;
  float *ATTN_RESTRICT acc = w->acc;
  float *ATTN_RESTRICT m = w->m;
  float *ATTN_RESTRICT l = w->l;
  const float *ATTN_RESTRICT mnew = w->mnew;
  const float *ATTN_RESTRICT alpha = w->alpha;
  const float *ATTN_RESTRICT rsum = w->rsum;
  const uint8_t *ATTN_RESTRICT skip = w->skip;
  for (int64_t r = 0; r < nr; ++r) {
    if (skip[r]) {
      const float al = alpha[r];
      l[r] *= al;
      if (al != 1.0f) {
        float *a = acc + r * lda;
        for (int64_t x = 0; x < Dv; ++x) a[x] *= al;
      }
    } else {
      l[r] = l[r] * alpha[r] + rsum[r];
    }
    m[r] = mnew[r];
  }
}

/* Non-finite V in a block that hides keys from some rows: P.V would give a
 * row that does not see key x p * v = 0 * inf or 0 * NaN = NaN. Sets the
 * non-finite entries of vc to 0 and returns whether there were any;
 * attn_pv_nonfinite then adds them to the rows that see their key. */
ATTN_INLINE int attn_v_clear_nonfinite(const attn_ctx_t *c, attn_scratch_t *w, const attn_tile_t *t,
                                       int64_t nkv) {
  const int64_t Dv = c->d->Dv, lda = t->lda;
  int any = 0;
  for (int64_t x = 0; x < nkv; ++x) {
    float *ATTN_RESTRICT vr = w->vc + x * lda;
    uint32_t bad = 0;
    for (int64_t i = 0; i < Dv; ++i) {
      uint32_t bits;
      memcpy(&bits, vr + i, 4);
      bad |= (bits & 0x7f800000u) == 0x7f800000u;
    }
    if (!bad) continue;
    any = 1;
    for (int64_t i = 0; i < Dv; ++i)
      if (!isfinite(vr[i])) vr[i] = 0.0f;
  }
  return any;
}

/* After P.V over the cleared V: acc += p * v for the non-finite entries of V,
 * in the rows that see the key and compute the block. */
ATTN_INLINE void attn_pv_nonfinite(const attn_ctx_t *c, attn_scratch_t *w, const attn_tile_t *t, int64_t c0,
                                   int64_t nkv) {
  const int64_t Dv = c->d->Dv, lda = t->lda, lds = t->lds, nr = t->nr;
  float *ATTN_RESTRICT tmp = w->tmp;
  for (int64_t x = 0; x < nkv; ++x) {
    if (c->kpad && !sparge_mask_at(c->kpad, t->b, c0 + x, 0, 0)) continue; /* no row sees it */
    attn_load_row(tmp, t->vbase + (c0 + x) * t->vs * t->esz, c->dtype, Dv, 1.0f);
    int bad = 0;
    for (int64_t i = 0; i < Dv; ++i) bad |= !isfinite(tmp[i]);
    if (!bad) continue;
    const int64_t rf = t->causal ? attn_max64(0, attn_min64(nr, sparge_first_row_seeing(c0 + x, t->off) - t->r0)) : 0;
    for (int64_t r = rf; r < nr; ++r) {
      if (w->skip[r]) continue;
      const float p = w->st[x * lds + r];
      float *ATTN_RESTRICT a = w->acc + r * lda;
      for (int64_t i = 0; i < Dv; ++i)
        if (!isfinite(tmp[i])) a[i] += p * tmp[i];
    }
  }
}

/* The next kept block's K (after j), prefetched a few lines per P.V
 * register tile; an empty cursor when there is none. */
ATTN_INLINE void attn_prefetch_next_k(const attn_ctx_t *c, const attn_tile_t *t, int64_t j, attn_pf_t *pf) {
  const int64_t BK = c->BK;
  int64_t jn = j + 1;
  while (jn < t->n_allowed && !sparge_mask_at(c->mask, t->b, t->h, t->qi, jn)) ++jn;
  if (jn < t->n_allowed)
    attn_pf_init(pf, t->kbase + jn * BK * t->ks * t->esz, sparge_block_len(jn, BK, c->d->Lk),
                 c->d->D * t->esz, t->ks * t->esz);
  else
    attn_pf_init(pf, NULL, 0, 0, 0);
}

/* P.V: acc = acc * alpha + P . V over the runs of rows that do not skip. */
ATTN_INLINE void attn_pv(const attn_ctx_t *c, attn_scratch_t *w, const attn_tile_t *t, int64_t nkv,
                         attn_pf_t *pf) {
  const int64_t nr = t->nr;
  const uint8_t *ATTN_RESTRICT skip = w->skip;
  for (int64_t ra = 0; ra < nr;) {
    if (skip[ra]) { ++ra; continue; }
    int64_t rb = ra + 1;
    while (rb < nr && !skip[rb]) ++rb;
#if ATTN_AVX2
    attn_pv_avx(ra, rb, nkv, c->Dvp, w->st, t->lds, w->vc, t->lda, w->acc, t->lda, w->alpha, pf);
#else
    attn_pf_finish(pf);
    attn_pv_portable(ra, rb, nkv, c->Dvp, w->st, t->lds, w->vc, t->lda, w->acc, t->lda, w->alpha, c->d->Dv);
#endif
    ra = rb;
  }
  attn_pf_finish(pf);
}

/* Finalize: out = acc / l (0 for rows that see no key, l == 0), lse =
 * (m + log2 l) ln 2 (-inf for those rows); a NaN l gives NaN. */
ATTN_INLINE void attn_finalize(const attn_ctx_t *c, attn_scratch_t *w, const attn_tile_t *t) {
  const int64_t Dv = c->d->Dv, lda = t->lda;
  float *ATTN_RESTRICT tmp = w->tmp;
  for (int64_t r = 0; r < t->nr; ++r) {
    const float lr = w->l[r];
    const float *a = w->acc + r * lda;
    if (lr != 0.0f) {
      for (int64_t x = 0; x < Dv; ++x) tmp[x] = a[x] / lr;
    } else {
      for (int64_t x = 0; x < Dv; ++x) tmp[x] = 0.0f;
    }
    attn_store_row(sparge_elem_ptr(c->out, t->b, t->h, t->r0 + r, 0), tmp, c->dtype, Dv);
    if (c->lse) {
      float v = lr != 0.0f ? (w->m[r] + log2f(lr)) * SPARGE_LN2 : -INFINITY;
      *(float *)sparge_elem_ptr(c->lse, t->b, t->h, t->r0 + r, 0) = v;
    }
  }
}

static void attn_task(const attn_ctx_t *c, attn_scratch_t *w, int64_t b, int64_t h, int64_t qi,
                      int64_t stats[SPARGE_NUM_STATS]) {
  attn_tile_t t;
  attn_tile_init(c, b, h, qi, &t);
  const int64_t BK = c->BK;
  const int pv_on = c->pv != NULL;
  const float lam = pv_on ? sparge_head_param(c->pv, h) : 0.0f;
  int64_t kept = 0, units = 0, skipped = 0;
  int first = 1;

  attn_load_q(c, w, &t);
  for (int64_t j = 0; j < t.n_allowed; ++j) {
    if (!sparge_mask_at(c->mask, b, h, qi, j)) continue;
    ++kept;
    units += t.ngroups;
    const int64_t c0 = j * BK;
    const int64_t nkv = sparge_block_len(j, BK, c->d->Lk);

    int64_t ldk;
    const float *Kp = attn_load_k(c, w, &t, c0, nkv, &ldk);
    attn_scores(c, w, &t, Kp, ldk, c0, nkv);
    const int masked = attn_mask(c, w, &t, c0, nkv);
    attn_softmax_max(w, &t, nkv);
    const int64_t nskip = pv_on && !first ? attn_pv_skip(c, w, &t, nkv, lam) : 0;
    const int any_skip = nskip > 0;
    skipped += nskip;
    attn_softmax_exp(w, &t, nkv, any_skip);
    attn_softmax_sums(c, w, &t);

    attn_pf_t pf;
    attn_prefetch_next_k(c, &t, j, &pf);
    int v_nonfinite = 0;
    if (nskip < t.ngroups) {
      attn_load_v(c, w, &t, c0, nkv);
      if (masked) v_nonfinite = attn_v_clear_nonfinite(c, w, &t, nkv);
    }
    attn_pv(c, w, &t, nkv, &pf);
    if (v_nonfinite) attn_pv_nonfinite(c, w, &t, c0, nkv);
    if (any_skip) memset(w->skip, 0, (size_t)t.nr);
    first = 0;
  }
  attn_finalize(c, w, &t);

  stats[SPARGE_STAT_BLOCKS_ALLOWED] = t.n_allowed;
  stats[SPARGE_STAT_BLOCKS_KEPT] = kept;
  stats[SPARGE_STAT_PV_UNITS] = units;
  stats[SPARGE_STAT_PV_SKIPPED] = skipped;
}

/* ------------------------------------------------------------------------ */
/* Entry point                                                              */
/* ------------------------------------------------------------------------ */
sparge_status_t sparge_cpu_attn(const sparge_dims_t *d, const sparge_tensor_t *q,
                                const sparge_tensor_t *k, const sparge_tensor_t *v,
                                const sparge_tensor_t *block_mask,
                                const sparge_tensor_t *key_padding,
                                const sparge_tensor_t *pv_threshold,
                                const sparge_attn_params_t *p, const sparge_tensor_t *out,
                                const sparge_tensor_t *out_lse, const sparge_tensor_t *out_stats) {
  attn_ctx_t c;
  memset(&c, 0, sizeof(c));
  c.d = d;
  c.q = q;
  c.k = k;
  c.v = v;
  c.mask = block_mask;
  c.kpad = key_padding;
  c.pv = pv_threshold;
  c.out = out;
  c.lse = out_lse;
  c.dtype = q->dtype;
  c.causal = p->causal;
  c.BQ = p->block_q;
  c.BK = p->block_k;
  c.G = p->pv_group;
  c.rep = d->Hq / d->Hkv;
  c.BQp = attn_round_up(c.BQ, ATTN_NR);
  c.Dvp = attn_round_up(d->Dv, 16);
  c.Dmax = d->D > d->Dv ? d->D : d->Dv;
  c.qmul = p->scale * SPARGE_LOG2E;
  c.k_direct = q->dtype == SPARGE_DTYPE_FLOAT32;

  const int64_t nbh = d->B * d->Hq;
  const int64_t ntasks = nbh * d->nq;
  int64_t *task_stats = NULL;
  if (out_stats) {
    task_stats = (int64_t *)calloc((size_t)ntasks, SPARGE_NUM_STATS * sizeof(int64_t));
    if (!task_stats)
      return sparge_set_error(SPARGE_ERROR_OUT_OF_MEMORY, "attention: cannot allocate %lld stats entries",
                              (long long)ntasks * SPARGE_NUM_STATS);
  }

  int failed = 0;
#ifdef _OPENMP
  /* No more threads (and per-thread scratch) than tasks. */
  int nthreads = omp_get_max_threads();
  if ((int64_t)nthreads > ntasks) nthreads = (int)ntasks;
  if (nthreads < 1) nthreads = 1;
#endif
  ATTN_OMP(omp parallel num_threads(nthreads))
  {
    attn_scratch_t w;
    const int ok = attn_scratch_alloc(&c, &w);
    if (!ok) {
      ATTN_OMP(omp atomic write)
      failed = 1;
    }
    /* Heaviest causal q-blocks (largest qi) first. */
    ATTN_OMP(omp for schedule(dynamic, 1))
    for (int64_t t = 0; t < ntasks; ++t) {
      if (!ok) continue;
      const int64_t qi = d->nq - 1 - t / nbh;
      const int64_t bh = t % nbh;
      const int64_t b = bh / d->Hq, h = bh % d->Hq;
      int64_t st[SPARGE_NUM_STATS];
      attn_task(&c, &w, b, h, qi, st);
      if (task_stats) {
        int64_t *dst = task_stats + ((b * d->Hq + h) * d->nq + qi) * SPARGE_NUM_STATS;
        for (int s = 0; s < SPARGE_NUM_STATS; ++s) dst[s] = st[s];
      }
    }
    free(w.base);
  }

  if (failed) {
    free(task_stats);
    return sparge_set_error(SPARGE_ERROR_OUT_OF_MEMORY,
                            "attention: cannot allocate per-thread scratch (block_q %d, block_k %d, "
                            "head dims %lld/%lld)",
                            (int)p->block_q, (int)p->block_k, (long long)d->D, (long long)d->Dv);
  }

  if (out_stats) {
    for (int64_t b = 0; b < d->B; ++b)
      for (int64_t h = 0; h < d->Hq; ++h) {
        int64_t sum[SPARGE_NUM_STATS] = {0, 0, 0, 0};
        const int64_t *src = task_stats + (b * d->Hq + h) * d->nq * SPARGE_NUM_STATS;
        for (int64_t i = 0; i < d->nq; ++i)
          for (int s = 0; s < SPARGE_NUM_STATS; ++s) sum[s] += src[i * SPARGE_NUM_STATS + s];
        for (int s = 0; s < SPARGE_NUM_STATS; ++s)
          *(int64_t *)sparge_elem_ptr(out_stats, b, h, s, 0) = sum[s];
      }
    free(task_stats);
  }
  return SPARGE_SUCCESS;
}
