/*
 * predict.c — CPU backend of stage 1, block prediction (SPEC §1, sparge.h
 * sparge_predict). Plain C11, parallel with OpenMP when the compiler has it.
 *
 * Phases, one static function each, all inside one OpenMP parallel region
 * (each k-side phase is a work-sharing loop; its implicit barrier separates it
 * from the next):
 *   smooth K    predict_k_block_sums  per (b, kv-head g, k-block j): raw column
 *                                     sums of the block -> kpool (temporary)
 *               predict_k_mean        per (b, g, channel): km = (sum over j of
 *                                     the block sums) / Lk -> km[b,g,:]
 *   pool + sim  predict_k_pool        per (b, g, j): rows of K' = K - km:
 *                                     pooled k̄_j -> kpool, similarity -> ksim
 *   mask rows   predict_row           per (b, q-head h, q-block i), see below:
 *     predict_q_pool     pooled q̄_i and its similarity (Q is not smoothed)
 *     predict_scores     compressed scores against the shared k̄ of kv-head g,
 *                        softmax, sort keys
 *     predict_select_*   TopK / TopCdf over the sorted candidates
 *     predict_force      fix q-block / fix k-blocks, causal diagonal, sink
 * There is no SIMD split: the loops are written in 8-lane chunks (LANES8)
 * that the compiler vectorizes.
 * K is read twice (block sums, then pooling: smoothing needs km before rows
 * can be normalized), Q once. Everything of one (b, g) is computed once and
 * shared by the Hq/Hkv q-heads that read it (GQA). All results are
 * independent of the thread count: every sum has a fixed order.
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

/* ------------------------------------------------------------------------ */
/* Context and per-thread scratch                                           */
/* ------------------------------------------------------------------------ */
/* What every phase reads, resolved once per call. */
typedef struct predict_ctx {
  const sparge_tensor_t *q, *k, *sim_threshold, *select_param, *out_mask;
  int64_t B, Hq, Hkv, Lq, Lk, D, nq, nk, BQ, BK, group, coff;
  int causal, topk, sink;
  float scale;
  float *km;    /* [B,Hkv,D]      workspace */
  float *kpool; /* [B,Hkv,nk,D]   workspace: block sums, then pooled k̄ */
  float *ksim;  /* [B,Hkv,nk]     workspace */
} predict_ctx_t;

/* Per-thread scratch: xrow, s, u, xs (D floats each) | S / P (nk floats) |
 * sort keys + tmp (2*nk uint64) | mask row (nk bytes), one malloc. */
typedef struct predict_scratch {
  char *base;
  float *xrow, *s, *u, *xs;
  float *S;
  uint64_t *keys, *ktmp;
  uint8_t *mrow;
} predict_scratch_t;

static size_t predict_scratch_bytes(int64_t D, int64_t nk, size_t off[4]) {
  off[0] = align64((size_t)4 * (size_t)D * sizeof(float));          /* S */
  off[1] = off[0] + align64((size_t)nk * sizeof(float));             /* keys */
  off[2] = off[1] + align64((size_t)nk * sizeof(uint64_t));          /* ktmp */
  off[3] = off[2] + align64((size_t)nk * sizeof(uint64_t));          /* mrow */
  return off[3] + align64((size_t)nk);
}

/* 0 (base NULL) when malloc fails. */
static int predict_scratch_alloc(const predict_ctx_t *c, predict_scratch_t *t) {
  size_t off[4];
  const size_t bytes = predict_scratch_bytes(c->D, c->nk, off);
  memset(t, 0, sizeof(*t));
  t->base = (char *)malloc(bytes);
  if (!t->base) return 0;
  t->xrow = (float *)t->base;
  t->s = t->xrow + c->D;
  t->u = t->xrow + 2 * c->D;
  t->xs = t->xrow + 3 * c->D;
  t->S = (float *)(t->base + off[0]);
  t->keys = (uint64_t *)(t->base + off[1]);
  t->ktmp = (uint64_t *)(t->base + off[2]);
  t->mrow = (uint8_t *)(t->base + off[3]);
  return 1;
}

/* ------------------------------------------------------------------------ */
/* Phases. Each k-side phase is an OpenMP work-sharing loop (orphaned: it    */
/* binds to the caller's parallel region, and every thread must call it);   */
/* its implicit barrier separates it from the next phase.                   */
/* ------------------------------------------------------------------------ */
/* Smooth K, part 1: raw column sums of each block of K -> kpool (temporary).
 * A thread without scratch (malloc failed) skips its items; the call fails. */
static void predict_k_block_sums(const predict_ctx_t *c, const predict_scratch_t *t) {
  const int64_t Hkv = c->Hkv, nk = c->nk, D = c->D, BK = c->BK;
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
  for (int64_t idx = 0; idx < c->B * Hkv * nk; ++idx) {
    if (!t->base) continue;
    const int64_t j = idx % nk, bg = idx / nk;
    const int64_t b = bg / Hkv, g = bg % Hkv;
    const int64_t c0 = j * BK, c1 = c0 + sparge_block_len(j, BK, c->Lk);
    float *sum = c->kpool + idx * D;
    for (int64_t x = 0; x < D; ++x) sum[x] = 0.f;
    for (int64_t r = c0; r < c1; ++r) add_f32(sum, row_f32(c->k, b, g, r, D, t->xrow), D);
  }
}

/* Smooth K, part 2: km = mean of K over the sequence, the sum of the block
 * sums in k-block order (softmax is invariant to subtracting it). */
static void predict_k_mean(const predict_ctx_t *c) {
  const int64_t nk = c->nk, D = c->D;
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
  for (int64_t idx = 0; idx < c->B * c->Hkv * D; ++idx) {
    const int64_t x = idx % D, bg = idx / D;
    const float *blk = c->kpool + bg * nk * D + x;
    float acc = 0.f;
    for (int64_t j = 0; j < nk; ++j) acc += blk[j * D];
    c->km[idx] = acc / (float)c->Lk;
  }
}

/* Pool + self-similarity of the k-blocks of K' = K - km: pooled mean k̄_j
 * -> kpool (over the block sums), similarity -> ksim. */
static void predict_k_pool(const predict_ctx_t *c, const predict_scratch_t *t) {
  const int64_t Hkv = c->Hkv, nk = c->nk, D = c->D, BK = c->BK;
  float *s = t->s, *u = t->u;
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
  for (int64_t idx = 0; idx < c->B * Hkv * nk; ++idx) {
    if (!t->base) continue;
    const int64_t j = idx % nk, bg = idx / nk;
    const int64_t b = bg / Hkv, g = bg % Hkv;
    const int64_t c0 = j * BK, c1 = c0 + sparge_block_len(j, BK, c->Lk);
    const float *km = c->km + bg * D;
    for (int64_t x = 0; x < D; ++x) s[x] = u[x] = 0.f;
    for (int64_t r = c0; r < c1; ++r)
      accumulate_row(row_f32(c->k, b, g, r, D, t->xrow), km, t->xs, s, u, D);
    const int64_t n = c1 - c0;
    float *pool = c->kpool + idx * D;
    for (int64_t x = 0; x < D; ++x) pool[x] = s[x] / (float)n;
    c->ksim[idx] = block_sim(u, D, n);
  }
}

/* Pool + self-similarity of q-block rows r0..r1 (Q is not smoothed): leaves
 * the pooled q̄ in t->s and returns whether the q-block is fix (its
 * similarity is not above theta). */
static int predict_q_pool(const predict_ctx_t *c, const predict_scratch_t *t, int64_t b, int64_t h,
                          int64_t r0, int64_t r1, float theta) {
  const int64_t D = c->D;
  float *s = t->s, *u = t->u;
  for (int64_t x = 0; x < D; ++x) s[x] = u[x] = 0.f;
  for (int64_t r = r0; r <= r1; ++r) accumulate_row(row_f32(c->q, b, h, r, D, t->xrow), NULL, t->xs, s, u, D);
  const int64_t n = r1 - r0 + 1;
  const int q_fix = !(block_sim(u, D, n) > theta);
  if (!q_fix)
    for (int64_t x = 0; x < D; ++x) s[x] = s[x] / (float)n;
  return q_fix;
}

/* Compressed scores + softmax over the allowed k-blocks 0..n_allowed-1:
 * S[j] = scale * q̄ . k̄_j for selective k-blocks (similarity above theta)
 * with a finite score, softmax over those candidates (P, may underflow to 0),
 * -1 for the others. Builds the candidates' sort keys (P descending, index
 * ascending) and returns how many there are (0: none, nothing to select). */
static int64_t predict_scores(const predict_ctx_t *c, const predict_scratch_t *t, const float *qbar,
                              const float *kp, const float *ks, float theta, int64_t n_allowed) {
  const int64_t D = c->D;
  float *S = t->S;
  float smax = -INFINITY;
  int64_t n_fin = 0;
  for (int64_t j = 0; j < n_allowed; ++j) {
    float sj = -INFINITY;
    if (ks[j] > theta) sj = c->scale * dot_f32(qbar, kp + j * D, D);
    if (isfinite(sj)) {
      ++n_fin;
      if (sj > smax) smax = sj;
    } else {
      sj = -INFINITY;
    }
    S[j] = sj;
  }
  if (n_fin == 0) return 0;

  /* Non-candidates become -1 (P itself is never negative). */
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
    t->keys[m++] = sel_key(S[j], j);
  }
  return m;
}

/* Select, TopK: the ceil(rho * n_allowed) (at least 1, at most m) most
 * probable of the m sorted candidates. */
static void predict_select_topk(const uint64_t *sorted, int64_t m, int64_t n_allowed, float rho,
                                uint8_t *mrow) {
  const float fk = ceilf(rho * (float)n_allowed);
  int64_t keep;
  if (!(fk >= 1.0f)) keep = 1;
  else if (fk >= (float)m) keep = m;
  else keep = (int64_t)fk;
  for (int64_t x = 0; x < keep; ++x) mrow[(uint32_t)sorted[x]] = 1;
}

/* Select, TopCdf: sorted candidates while the sum of the probabilities
 * before them (accumulated in order) is below tau. */
static void predict_select_topcdf(const uint64_t *sorted, int64_t m, const float *P, float tau,
                                  uint8_t *mrow) {
  float cum = 0.f;
  for (int64_t x = 0; x < m; ++x) {
    if (!(cum < tau)) break;
    const int64_t j = (int64_t)(uint32_t)sorted[x];
    mrow[j] = 1;
    cum += P[j];
  }
}

/* Force, within the allowed k-blocks 0..n_allowed-1 (n_allowed > 0): a fix
 * q-block keeps its whole row, otherwise every fix k-block (whole column) is
 * kept; then the causal diagonal blocks jd0..n_allowed-1 and the attention
 * sink. */
static void predict_force(const predict_ctx_t *c, uint8_t *mrow, const float *ks, float theta,
                          int q_fix, int64_t n_allowed, int64_t jd0) {
  if (q_fix) {
    memset(mrow, 1, (size_t)n_allowed);
  } else {
    for (int64_t j = 0; j < n_allowed; ++j)
      if (!(ks[j] > theta)) mrow[j] = 1;
  }
  if (c->causal)
    for (int64_t j = jd0; j < n_allowed; ++j) mrow[j] = 1;
  if (c->sink) mrow[0] = 1;
}

/* One mask row: q-block i of (b, q-head h), against the k̄ / ksim of its
 * kv-head. */
static void predict_row(const predict_ctx_t *c, const predict_scratch_t *t, int64_t b, int64_t h,
                        int64_t i) {
  const int64_t nk = c->nk, BQ = c->BQ, BK = c->BK, Lk = c->Lk;
  const int64_t bg = b * c->Hkv + h / c->group;
  const float theta = sparge_head_param(c->sim_threshold, h);
  const float sel = sparge_head_param(c->select_param, h);
  const float *kp = c->kpool + bg * nk * c->D;
  const float *ks = c->ksim + bg * nk;
  uint8_t *mrow = t->mrow;

  /* Causal extent of q-block i (rows r0..r1): k-blocks 0..n_allowed-1 are
   * allowed; the diagonal blocks are jd0..n_allowed-1 (causal only). */
  const int64_t r0 = i * BQ, r1 = r0 + sparge_block_len(i, BQ, c->Lq) - 1;
  const int64_t n_allowed = sparge_allowed_blocks(sparge_last_visible_key(c->causal, r1, c->coff, Lk), BK);
  const int64_t jd0 = sparge_diagonal_first(sparge_last_visible_key(c->causal, r0, c->coff, Lk), BK);

  memset(mrow, 0, (size_t)nk);
  if (n_allowed > 0) {
    const int q_fix = predict_q_pool(c, t, b, h, r0, r1, theta);
    if (!q_fix) { /* a fix q-block keeps its whole allowed row: selection is moot */
      const int64_t m = predict_scores(c, t, t->s, kp, ks, theta, n_allowed);
      if (m > 0) {
        const uint64_t *sorted = sort_keys(t->keys, t->ktmp, m);
        if (c->topk) predict_select_topk(sorted, m, n_allowed, sel, mrow);
        else predict_select_topcdf(sorted, m, t->S, sel, mrow);
      }
    }
    predict_force(c, mrow, ks, theta, q_fix, n_allowed, jd0);
  }

  const int64_t mstride_j = c->out_mask->strides[3];
  uint8_t *dst = (uint8_t *)sparge_elem_ptr(c->out_mask, b, h, i, 0);
  if (mstride_j == 1) {
    memcpy(dst, mrow, (size_t)nk);
  } else {
    for (int64_t j = 0; j < nk; ++j) dst[j * mstride_j] = mrow[j];
  }
}

/* The mask rows. Causal rows differ in cost: handed out in small dynamic
 * chunks. */
static void predict_rows(const predict_ctx_t *c, const predict_scratch_t *t) {
  const int64_t nq = c->nq, Hq = c->Hq;
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 4)
#endif
  for (int64_t idx = 0; idx < c->B * Hq * nq; ++idx) {
    if (!t->base) continue;
    const int64_t i = idx % nq, bh = idx / nq;
    predict_row(c, t, bh / Hq, bh % Hq, i);
  }
}

/* ------------------------------------------------------------------------ */
/* Entry point                                                              */
/* ------------------------------------------------------------------------ */
sparge_status_t sparge_cpu_predict(const sparge_dims_t *d, const sparge_tensor_t *q,
                                   const sparge_tensor_t *k, const sparge_tensor_t *sim_threshold,
                                   const sparge_tensor_t *select_param,
                                   const sparge_predict_params_t *p,
                                   const sparge_tensor_t *out_mask, void *workspace) {
  const ws_layout_t lay = predict_layout(d);
  predict_ctx_t c;
  memset(&c, 0, sizeof(c));
  c.q = q;
  c.k = k;
  c.sim_threshold = sim_threshold;
  c.select_param = select_param;
  c.out_mask = out_mask;
  c.B = d->B;
  c.Hq = d->Hq;
  c.Hkv = d->Hkv;
  c.Lq = d->Lq;
  c.Lk = d->Lk;
  c.D = d->D;
  c.nq = d->nq;
  c.nk = d->nk;
  c.BQ = p->block_q;
  c.BK = p->block_k;
  c.group = d->Hq / d->Hkv;
  c.causal = p->causal != SPARGE_CAUSAL_NONE;
  c.coff = sparge_causal_offset(p->causal, d->Lq, d->Lk);
  c.topk = p->select_mode == SPARGE_SELECT_TOPK;
  c.sink = p->attention_sink != 0;
  c.scale = p->scale;
  c.km = (float *)((char *)workspace + lay.km);
  c.kpool = (float *)((char *)workspace + lay.kpool);
  c.ksim = (float *)((char *)workspace + lay.ksim);

  int oom = 0;
#ifdef _OPENMP
#pragma omp parallel
#endif
  {
    predict_scratch_t t;
    if (!predict_scratch_alloc(&c, &t)) {
#ifdef _OPENMP
#pragma omp atomic write
#endif
      oom = 1;
    }
    predict_k_block_sums(&c, &t); /* smooth K: block sums ... */
    predict_k_mean(&c);           /* ... and their mean */
    predict_k_pool(&c, &t);       /* pool + similarity of K' */
    predict_rows(&c, &t);         /* per q-block: pool Q, scores, select, force */
    free(t.base);
  }

  if (oom) {
    size_t off[4];
    return sparge_set_error(SPARGE_ERROR_OUT_OF_MEMORY,
                            "predict: could not allocate %zu bytes of per-thread scratch",
                            predict_scratch_bytes(d->D, d->nk, off));
  }
  return SPARGE_SUCCESS;
}
