/*
 * predict.c — CPU backend of stage 1, block prediction (SPEC §1, sparge.h
 * sparge_predict). Plain C11, parallel with OpenMP when the compiler has it.
 *
 * Phases (one OpenMP parallel region, separated by the implicit barriers of
 * the work-sharing loops):
 *   A. per (b, kv-head g, k-block j): raw column sums of the block of K
 *                                     -> kpool[b,g,j,:] (temporary)
 *   B. per (b, g, channel): km = (sum over j of the block sums) / Lk
 *                                     -> km[b,g,:]
 *   C. per (b, g, j): rows of K' = K - km: pooled mean k̄_j -> kpool[b,g,j,:],
 *                     self-similarity -> ksim[b,g,j]
 *   D. per (b, q-head h, q-block i): pooled q̄_i and its similarity (Q is not
 *      smoothed), compressed scores against the shared k̄ of kv-head g,
 *      softmax, TopK / TopCdf selection, forcing, and the mask row.
 * K is read twice (A and C: smoothing needs km before rows can be
 * normalized), Q once. Everything of one (b, g) is computed once and shared by
 * the Hq/Hkv q-heads that read it (GQA). All results are independent of the
 * thread count: every sum has a fixed order.
 *
 * Workspace: km [B,Hkv,D], kpool [B,Hkv,nk,D], ksim [B,Hkv,nk], all fp32,
 * each region 64-byte aligned. Per-thread row scratch (O(D + nk)) is
 * malloc'ed once per thread per call.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../geometry.h"
#include "cpu_common.h"

#define PREDICT_EPS 1e-6f

static size_t align64(size_t n) { return (n + 63u) & ~(size_t)63u; }

/* Byte offsets of the workspace regions. */
typedef struct ws_layout {
  size_t km, kpool, ksim, total;
} ws_layout_t;

static ws_layout_t predict_layout(const sparge_dims_t *d) {
  ws_layout_t l;
  const size_t bh = (size_t)d->B * (size_t)d->Hkv;
  l.km = 0;
  l.kpool = l.km + align64(bh * (size_t)d->D * sizeof(float));
  l.ksim = l.kpool + align64(bh * (size_t)d->nk * (size_t)d->D * sizeof(float));
  l.total = l.ksim + align64(bh * (size_t)d->nk * sizeof(float));
  return l;
}

size_t sparge_cpu_predict_workspace(const sparge_dims_t *d, int32_t block_q, int32_t block_k) {
  (void)block_q; /* nq/nk in d already reflect the block shape */
  (void)block_k;
  return predict_layout(d).total;
}

/* The loops below work in chunks of 8 lanes held in 8 named scalars: a fixed
 * summation order (results depend neither on the thread count nor on the
 * build), and a shape that the compiler's SLP vectorizer turns into vector
 * code with the partial sums kept in registers, even at -O2. */
#define LANES8(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7)
#define SUM8(a) (((a##0 + a##4) + (a##1 + a##5)) + ((a##2 + a##6) + (a##3 + a##7)))

/* dot(x, y) over n floats. */
static inline float dot_f32(const float *restrict x, const float *restrict y, int64_t n) {
  float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f, a4 = 0.f, a5 = 0.f, a6 = 0.f, a7 = 0.f;
  int64_t t = 0;
  for (; t + 8 <= n; t += 8) {
#define DOT_LANE(l) a##l += x[t + l] * y[t + l];
    LANES8(DOT_LANE)
#undef DOT_LANE
  }
  float tail = 0.f;
  for (; t < n; ++t) tail += x[t] * y[t];
  return SUM8(a) + tail;
}

/* s += x over n floats. */
static inline void add_f32(float *restrict s, const float *restrict x, int64_t n) {
  int64_t t = 0;
  for (; t + 8 <= n; t += 8) {
#define ADD_LANE(l) s[t + l] += x[t + l];
    LANES8(ADD_LANE)
#undef ADD_LANE
  }
  for (; t < n; ++t) s[t] += x[t];
}

/* Adds row x (fp32) to the running sum s and its unit-normalized version
 * x / max(|x|, eps) to u. A zero row adds 0 to both. If km is not NULL the
 * row is x - km (smoothed K). */
static inline void accumulate_row(const float *restrict x, const float *restrict km,
                                  float *restrict xs, float *restrict s, float *restrict u,
                                  int64_t D) {
  int64_t t = 0;
  if (km) {
    for (; t + 8 <= D; t += 8) {
#define SUB_LANE(l) xs[t + l] = x[t + l] - km[t + l];
      LANES8(SUB_LANE)
#undef SUB_LANE
    }
    for (; t < D; ++t) xs[t] = x[t] - km[t];
    x = xs;
  }
  float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f, a4 = 0.f, a5 = 0.f, a6 = 0.f, a7 = 0.f;
  t = 0;
  for (; t + 8 <= D; t += 8) {
#define ACC_LANE(l)         \
  {                         \
    const float v = x[t + l]; \
    s[t + l] += v;          \
    a##l += v * v;          \
  }
    LANES8(ACC_LANE)
#undef ACC_LANE
  }
  float tail = 0.f;
  for (; t < D; ++t) {
    s[t] += x[t];
    tail += x[t] * x[t];
  }
  const float nrm = sqrtf(SUM8(a) + tail);
  const float inv = 1.0f / (nrm > PREDICT_EPS ? nrm : PREDICT_EPS);
  for (t = 0; t + 8 <= D; t += 8) {
#define NRM_LANE(l) u[t + l] += x[t + l] * inv;
    LANES8(NRM_LANE)
#undef NRM_LANE
  }
  for (; t < D; ++t) u[t] += x[t] * inv;
}

/* Row r of a [B,H,L,D] tensor as fp32: the row itself for float32 (last
 * stride is 1), else converted into buf. */
static inline const float *row_f32(const sparge_tensor_t *t, int64_t b, int64_t h, int64_t r,
                                   int64_t D, float *buf) {
  const void *src = sparge_elem_ptr(t, b, h, r, 0);
  if (t->dtype == SPARGE_DTYPE_FLOAT32) return (const float *)src;
  sparge_load_row(buf, src, t->dtype, D, 1.0f);
  return buf;
}

/* sim = |u|^2 / n^2 for the sum u of n unit (or zero) rows. */
static inline float block_sim(const float *u, int64_t D, int64_t n) {
  float fn = (float)n;
  return dot_f32(u, u, D) / (fn * fn);
}

/* Sorts n uint64 keys ascending; tmp holds n keys. The input must already
 * be ascending in its low 32 bits among equal high halves (the caller builds
 * keys in ascending k-block order), so a stable LSD radix sort over the high
 * 32 bits (4 digits of 8 bits; digits shared by all keys are skipped) yields
 * the fully sorted order. Branch-free passes: far cheaper than a comparison
 * sort for rows of hundreds or thousands of k-blocks. Returns the buffer (a
 * or tmp) that holds the result. */
static uint64_t *sort_keys(uint64_t *a, uint64_t *tmp, int64_t n) {
  if (n <= 32) {
    for (int64_t x = 1; x < n; ++x) {
      const uint64_t v = a[x];
      int64_t y = x - 1;
      while (y >= 0 && a[y] > v) {
        a[y + 1] = a[y];
        --y;
      }
      a[y + 1] = v;
    }
    return a;
  }
  int64_t cnt[4][256];
  memset(cnt, 0, sizeof cnt);
  for (int64_t x = 0; x < n; ++x) {
    const uint32_t hi = (uint32_t)(a[x] >> 32);
    ++cnt[0][hi & 255u];
    ++cnt[1][(hi >> 8) & 255u];
    ++cnt[2][(hi >> 16) & 255u];
    ++cnt[3][hi >> 24];
  }
  uint64_t *src = a, *dst = tmp;
  for (int pass = 0; pass < 4; ++pass) {
    const int shift = 32 + 8 * pass;
    int64_t *c = cnt[pass];
    if (c[(src[0] >> shift) & 255u] == n) continue; /* one digit value: order unchanged */
    int64_t sum = 0;
    for (int v = 0; v < 256; ++v) {
      const int64_t t = c[v];
      c[v] = sum;
      sum += t;
    }
    for (int64_t x = 0; x < n; ++x) dst[c[(src[x] >> shift) & 255u]++] = src[x];
    uint64_t *t = src;
    src = dst;
    dst = t;
  }
  return src;
}

/* Sort key: P descending (P >= 0, so its bit pattern orders like the value),
 * then k-block index ascending. All keys are distinct (a total order). */
static inline uint64_t sel_key(float prob, int64_t j) {
  uint32_t bits;
  memcpy(&bits, &prob, 4);
  return ((uint64_t)(~bits) << 32) | (uint64_t)(uint32_t)j;
}

sparge_status_t sparge_cpu_predict(const sparge_dims_t *d, const sparge_tensor_t *q,
                                   const sparge_tensor_t *k, const sparge_tensor_t *sim_threshold,
                                   const sparge_tensor_t *select_param,
                                   const sparge_predict_params_t *p,
                                   const sparge_tensor_t *out_mask, void *workspace) {
  const int64_t B = d->B, Hq = d->Hq, Hkv = d->Hkv, Lq = d->Lq, Lk = d->Lk, D = d->D;
  const int64_t nq = d->nq, nk = d->nk;
  const int64_t BQ = p->block_q, BK = p->block_k;
  const int64_t group = Hq / Hkv;
  const int causal = p->causal != SPARGE_CAUSAL_NONE;
  const int64_t coff = sparge_causal_offset(p->causal, Lq, Lk);
  const float scale = p->scale;
  const int topk = p->select_mode == SPARGE_SELECT_TOPK;
  const int sink = p->attention_sink != 0;
  const int64_t mstride_j = out_mask->strides[3];

  const ws_layout_t lay = predict_layout(d);
  float *km_all = (float *)((char *)workspace + lay.km);       /* [B,Hkv,D] */
  float *kpool = (float *)((char *)workspace + lay.kpool);     /* [B,Hkv,nk,D] */
  float *ksim = (float *)((char *)workspace + lay.ksim);       /* [B,Hkv,nk] */

  /* Per-thread scratch: row, s, u, xs (4*D floats) | S / P (nk floats) |
   * sort keys + tmp (2*nk uint64) | mask row (nk bytes). */
  const size_t off_S = align64((size_t)4 * (size_t)D * sizeof(float));
  const size_t off_keys = off_S + align64((size_t)nk * sizeof(float));
  const size_t off_tmp = off_keys + align64((size_t)nk * sizeof(uint64_t));
  const size_t off_row = off_tmp + align64((size_t)nk * sizeof(uint64_t));
  const size_t scratch_bytes = off_row + align64((size_t)nk);

  int oom = 0;

#ifdef _OPENMP
#pragma omp parallel
#endif
  {
    char *scratch = (char *)malloc(scratch_bytes);
    if (!scratch) {
#ifdef _OPENMP
#pragma omp atomic write
#endif
      oom = 1;
    }
    float *xrow = scratch ? (float *)scratch : NULL;
    float *s = xrow ? xrow + D : NULL;
    float *u = xrow ? xrow + 2 * D : NULL;
    float *xs = xrow ? xrow + 3 * D : NULL;

    /* ---- A: raw block sums of K ---------------------------------------- */
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
    for (int64_t idx = 0; idx < B * Hkv * nk; ++idx) {
      if (!scratch) continue;
      const int64_t j = idx % nk, bg = idx / nk;
      const int64_t b = bg / Hkv, g = bg % Hkv;
      const int64_t c0 = j * BK, c1 = c0 + sparge_block_len(j, BK, Lk);
      float *sum = kpool + idx * D;
      for (int64_t c = 0; c < D; ++c) sum[c] = 0.f;
      for (int64_t r = c0; r < c1; ++r) add_f32(sum, row_f32(k, b, g, r, D, xrow), D);
    }

    /* ---- B: km = mean of K over the sequence --------------------------- */
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
    for (int64_t idx = 0; idx < B * Hkv * D; ++idx) {
      const int64_t c = idx % D, bg = idx / D;
      const float *blk = kpool + bg * nk * D + c;
      float acc = 0.f;
      for (int64_t j = 0; j < nk; ++j) acc += blk[j * D];
      km_all[idx] = acc / (float)Lk;
    }

    /* ---- C: pooled k̄_j of K' and k-block similarity -------------------- */
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
    for (int64_t idx = 0; idx < B * Hkv * nk; ++idx) {
      if (!scratch) continue;
      const int64_t j = idx % nk, bg = idx / nk;
      const int64_t b = bg / Hkv, g = bg % Hkv;
      const int64_t c0 = j * BK, c1 = c0 + sparge_block_len(j, BK, Lk);
      const float *km = km_all + bg * D;
      for (int64_t c = 0; c < D; ++c) s[c] = u[c] = 0.f;
      for (int64_t r = c0; r < c1; ++r)
        accumulate_row(row_f32(k, b, g, r, D, xrow), km, xs, s, u, D);
      const int64_t n = c1 - c0;
      float *pool = kpool + idx * D;
      for (int64_t c = 0; c < D; ++c) pool[c] = s[c] / (float)n;
      ksim[idx] = block_sim(u, D, n);
    }

    /* ---- D: one mask row per (b, h, i) --------------------------------- */
    float *S = scratch ? (float *)(scratch + off_S) : NULL;
    uint64_t *keys = scratch ? (uint64_t *)(scratch + off_keys) : NULL;
    uint64_t *ktmp = scratch ? (uint64_t *)(scratch + off_tmp) : NULL;
    uint8_t *mrow = scratch ? (uint8_t *)(scratch + off_row) : NULL;

    /* Causal rows differ in cost: hand them out in small dynamic chunks. */
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 4)
#endif
    for (int64_t idx = 0; idx < B * Hq * nq; ++idx) {
      if (!scratch) continue;
      const int64_t i = idx % nq, bh = idx / nq;
      const int64_t b = bh / Hq, h = bh % Hq;
      const int64_t g = h / group;
      const int64_t bg = b * Hkv + g;
      const float theta = sparge_head_param(sim_threshold, h);
      const float sel = sparge_head_param(select_param, h);
      const float *kp = kpool + bg * nk * D;
      const float *ks = ksim + bg * nk;

      /* Causal extent of q-block i (rows r0..r1): k-blocks 0..n_allowed-1
       * are allowed; the diagonal blocks are jd0..n_allowed-1 (causal only). */
      const int64_t r0 = i * BQ, r1 = r0 + sparge_block_len(i, BQ, Lq) - 1;
      const int64_t n_allowed = sparge_allowed_blocks(sparge_last_visible_key(causal, r1, coff, Lk), BK);
      const int64_t jd0 = sparge_diagonal_first(sparge_last_visible_key(causal, r0, coff, Lk), BK);

      memset(mrow, 0, (size_t)nk);
      if (n_allowed > 0) {
        /* Pooled q̄_i and the q-block's similarity. */
        for (int64_t c = 0; c < D; ++c) s[c] = u[c] = 0.f;
        for (int64_t r = r0; r <= r1; ++r)
          accumulate_row(row_f32(q, b, h, r, D, xrow), NULL, xs, s, u, D);
        const int64_t n = r1 - r0 + 1;
        const int q_fix = !(block_sim(u, D, n) > theta);

        if (q_fix) {
          /* A fix q-block keeps its whole allowed row; selection is moot. */
          memset(mrow, 1, (size_t)n_allowed);
        } else {
          float *qbar = s;
          for (int64_t c = 0; c < D; ++c) qbar[c] = s[c] / (float)n;

          /* Compressed scores; only finite ones are candidates. */
          float smax = -INFINITY;
          int64_t n_fin = 0;
          for (int64_t j = 0; j < n_allowed; ++j) {
            float sj = -INFINITY;
            if (ks[j] > theta) sj = scale * dot_f32(qbar, kp + j * D, D);
            if (isfinite(sj)) {
              ++n_fin;
              if (sj > smax) smax = sj;
            } else {
              sj = -INFINITY;
            }
            S[j] = sj;
          }

          if (n_fin > 0) {
            /* Softmax over the row. Non-candidates become -1 (P itself is
             * never negative, and may underflow to 0 for a candidate). */
            float sum = 0.f;
            for (int64_t j = 0; j < n_allowed; ++j) {
              if (S[j] == -INFINITY) {
                S[j] = -1.0f;
              } else {
                S[j] = expf(S[j] - smax);
                sum += S[j];
              }
            }
            int64_t m = 0;
            for (int64_t j = 0; j < n_allowed; ++j) {
              if (S[j] < 0.f) continue;
              S[j] = S[j] / sum;
              keys[m++] = sel_key(S[j], j);
            }
            const uint64_t *sorted = sort_keys(keys, ktmp, m);

            if (topk) {
              const float fk = ceilf(sel * (float)n_allowed);
              int64_t keep;
              if (!(fk >= 1.0f)) keep = 1;
              else if (fk >= (float)m) keep = m;
              else keep = (int64_t)fk;
              for (int64_t t = 0; t < keep; ++t) mrow[(uint32_t)sorted[t]] = 1;
            } else {
              float cum = 0.f;
              for (int64_t t = 0; t < m; ++t) {
                if (!(cum < sel)) break;
                const int64_t j = (int64_t)(uint32_t)sorted[t];
                mrow[j] = 1;
                cum += S[j];
              }
            }
          }

          /* Force: fix k-blocks (whole column, within the allowed range). */
          for (int64_t j = 0; j < n_allowed; ++j)
            if (!(ks[j] > theta)) mrow[j] = 1;
        }
        /* Force: causal diagonal blocks and the attention sink. */
        if (causal)
          for (int64_t j = jd0; j < n_allowed; ++j) mrow[j] = 1;
        if (sink) mrow[0] = 1;
      }

      uint8_t *dst = (uint8_t *)sparge_elem_ptr(out_mask, b, h, i, 0);
      if (mstride_j == 1) {
        memcpy(dst, mrow, (size_t)nk);
      } else {
        for (int64_t j = 0; j < nk; ++j) dst[j * mstride_j] = mrow[j];
      }
    }

    free(scratch);
  }

  if (oom)
    return sparge_set_error(SPARGE_ERROR_OUT_OF_MEMORY,
                            "predict: could not allocate %zu bytes of per-thread scratch",
                            scratch_bytes);
  return SPARGE_SUCCESS;
}
