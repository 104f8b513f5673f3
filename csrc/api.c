/* api.c — definitions of the C ABI: validation, dispatch, last-error text.
 *
 * Every public entry point validates its arguments completely before any
 * backend runs, so the backends can trust shapes, dtypes and strides. */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "internal.h"
#include "sparge.h"
#include "tile_config.h"

#define SPARGE_STR2(x) #x
#define SPARGE_STR(x) SPARGE_STR2(x)

/* Sizes the CPU backend accepts; past them the call is NOT_SUPPORTED. */
#define CPU_MAX_BLOCK SPARGE_CPU_MAX_BLOCK
#define CPU_MAX_HEAD_DIM SPARGE_CPU_MAX_HEAD_DIM
/* Every index fits comfortably in int64 and every count in int32 loops (sparge/_args.py MAX_DIM_SIZE
 * checks the same limit before anything is allocated). */
#define MAX_DIM_SIZE (((int64_t)1 << 31) - 1)

/* ------------------------------------------------------------------------ */
/* Errors                                                                   */
/* ------------------------------------------------------------------------ */
static _Thread_local char g_last_error[512];

sparge_status_t sparge_set_error(sparge_status_t status, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(g_last_error, sizeof g_last_error, fmt, ap);
  va_end(ap);
  return status;
}

void sparge_clear_error(void) { g_last_error[0] = '\0'; }

const char *sparge_last_error(void) { return g_last_error; }

const char *sparge_status_string(sparge_status_t status) {
  switch (status) {
    case SPARGE_SUCCESS: return "SPARGE_SUCCESS";
    case SPARGE_ERROR_INVALID_VALUE: return "SPARGE_ERROR_INVALID_VALUE";
    case SPARGE_ERROR_NOT_SUPPORTED: return "SPARGE_ERROR_NOT_SUPPORTED";
    case SPARGE_ERROR_MISALIGNED: return "SPARGE_ERROR_MISALIGNED";
    case SPARGE_ERROR_CUDA: return "SPARGE_ERROR_CUDA";
    case SPARGE_ERROR_INTERNAL: return "SPARGE_ERROR_INTERNAL";
    case SPARGE_ERROR_OUT_OF_MEMORY: return "SPARGE_ERROR_OUT_OF_MEMORY";
    case SPARGE_ERROR_WORKSPACE_TOO_SMALL: return "SPARGE_ERROR_WORKSPACE_TOO_SMALL";
  }
  return "SPARGE_ERROR_UNKNOWN";
}

/* ------------------------------------------------------------------------ */
/* Library information                                                      */
/* ------------------------------------------------------------------------ */
int32_t sparge_abi_version(void) { return SPARGE_ABI_VERSION; }

const char *sparge_version_string(void) {
  return SPARGE_STR(SPARGE_VERSION_MAJOR) "." SPARGE_STR(SPARGE_VERSION_MINOR) "." SPARGE_STR(
      SPARGE_VERSION_PATCH);
}

int32_t sparge_cuda_compiled(void) {
#ifdef SPARGE_WITH_CUDA
  return 1;
#else
  return 0;
#endif
}

sparge_status_t sparge_device_supported(int32_t device_type, int32_t device_id) {
  sparge_clear_error();
  if (device_type == SPARGE_DEVICE_CPU) return SPARGE_SUCCESS;
  if (device_type != SPARGE_DEVICE_CUDA)
    return sparge_set_error(SPARGE_ERROR_NOT_SUPPORTED, "device_type: %d is not CPU (1) or CUDA (2)",
                            (int)device_type);
  if (device_id < 0)
    return sparge_set_error(SPARGE_ERROR_INVALID_VALUE, "device_id: %d is negative", (int)device_id);
#ifdef SPARGE_WITH_CUDA
  return sparge_cuda_device_supported(device_id);
#else
  return sparge_set_error(SPARGE_ERROR_NOT_SUPPORTED,
                          "device: this sparge build has no CUDA backend (built without nvcc "
                          "or with SPARGE_CUDA=0)");
#endif
}

static int is_float_dtype(int32_t dt) {
  return dt == SPARGE_DTYPE_FLOAT32 || dt == SPARGE_DTYPE_FLOAT16 || dt == SPARGE_DTYPE_BFLOAT16;
}

static int is_mask_dtype(int32_t dt) { return dt == SPARGE_DTYPE_BOOL || dt == SPARGE_DTYPE_UINT8; }

static const char *dtype_name(int32_t dt) {
  switch (dt) {
    case SPARGE_DTYPE_FLOAT32: return "float32";
    case SPARGE_DTYPE_FLOAT16: return "float16";
    case SPARGE_DTYPE_BFLOAT16: return "bfloat16";
    case SPARGE_DTYPE_BOOL: return "bool";
    case SPARGE_DTYPE_UINT8: return "uint8";
    case SPARGE_DTYPE_INT32: return "int32";
    case SPARGE_DTYPE_INT64: return "int64";
  }
  return "unknown";
}

sparge_status_t sparge_block_shape(int32_t device_type, int32_t device_id, int64_t head_dim,
                                   int64_t head_dim_v, int32_t dtype, int32_t precision,
                                   int32_t *out_block_q, int32_t *out_block_k,
                                   int32_t *out_pv_group, int32_t *out_precision) {
  sparge_clear_error();
  if (!out_block_q || !out_block_k || !out_pv_group)
    return sparge_set_error(SPARGE_ERROR_INVALID_VALUE, "out_block_q/out_block_k/out_pv_group: NULL");
  if (head_dim < 1) return sparge_set_error(SPARGE_ERROR_INVALID_VALUE, "head_dim: %lld < 1", (long long)head_dim);
  if (head_dim_v < 1)
    return sparge_set_error(SPARGE_ERROR_INVALID_VALUE, "head_dim_v: %lld < 1", (long long)head_dim_v);
  if (!is_float_dtype(dtype))
    return sparge_set_error(SPARGE_ERROR_INVALID_VALUE, "dtype: %s is not float32/float16/bfloat16",
                            dtype_name(dtype));
  if (precision < SPARGE_PRECISION_AUTO || precision > SPARGE_PRECISION_INT8)
    return sparge_set_error(SPARGE_ERROR_INVALID_VALUE, "precision: unknown code %d", (int)precision);
  sparge_status_t st = sparge_device_supported(device_type, device_id);
  if (st != SPARGE_SUCCESS) return st;
  if (device_type == SPARGE_DEVICE_CPU) {
    if (precision == SPARGE_PRECISION_INT8)
      return sparge_set_error(SPARGE_ERROR_NOT_SUPPORTED,
                              "precision: int8 has no CPU kernel (use 'auto', 'fp16' or 'bf16')");
    if (head_dim > CPU_MAX_HEAD_DIM || head_dim_v > CPU_MAX_HEAD_DIM)
      return sparge_set_error(SPARGE_ERROR_NOT_SUPPORTED, "head_dim: %lld/%lld exceeds the CPU limit %d",
                              (long long)head_dim, (long long)head_dim_v, CPU_MAX_HEAD_DIM);
    *out_block_q = SPARGE_CPU_BLOCK_Q; /* reasons in tile_config.h */
    *out_block_k = SPARGE_CPU_BLOCK_K;
    *out_pv_group = SPARGE_CPU_PV_GROUP;
    if (out_precision)
      *out_precision = precision == SPARGE_PRECISION_AUTO
                           ? (dtype == SPARGE_DTYPE_BFLOAT16 ? SPARGE_PRECISION_BF16 : SPARGE_PRECISION_FP16)
                           : precision;
    return SPARGE_SUCCESS;
  }
#ifdef SPARGE_WITH_CUDA
  /* fp32 inputs are computed in bf16 (fp16 when asked): the caller casts. */
  int32_t compute = dtype;
  if (dtype == SPARGE_DTYPE_FLOAT32)
    compute = precision == SPARGE_PRECISION_FP16 ? SPARGE_DTYPE_FLOAT16 : SPARGE_DTYPE_BFLOAT16;
  return sparge_cuda_block_shape(device_id, head_dim, head_dim_v, compute, precision, out_block_q, out_block_k,
                                 out_pv_group, out_precision);
#else
  return sparge_set_error(SPARGE_ERROR_INTERNAL, "device_type: unhandled %d", (int)device_type);
#endif
}

/* ------------------------------------------------------------------------ */
/* Descriptor validation                                                    */
/* ------------------------------------------------------------------------ */
static sparge_status_t check_desc(const sparge_tensor_t *t, const char *name, int ndim) {
  if (!t) return sparge_set_error(SPARGE_ERROR_INVALID_VALUE, "%s: descriptor is NULL", name);
  if (t->ndim != ndim)
    return sparge_set_error(SPARGE_ERROR_INVALID_VALUE, "%s: expected %d dimensions, got %d", name, ndim,
                            (int)t->ndim);
  int64_t numel = 1;
  for (int i = 0; i < ndim; ++i) {
    if (t->shape[i] < 1)
      return sparge_set_error(SPARGE_ERROR_INVALID_VALUE, "%s: dimension %d has size %lld (must be >= 1)",
                              name, i, (long long)t->shape[i]);
    if (t->shape[i] > MAX_DIM_SIZE)
      return sparge_set_error(SPARGE_ERROR_INVALID_VALUE, "%s: dimension %d has size %lld (max %lld)", name,
                              i, (long long)t->shape[i], (long long)MAX_DIM_SIZE);
    if (t->strides[i] < 0)
      return sparge_set_error(SPARGE_ERROR_INVALID_VALUE, "%s: negative stride %lld in dimension %d", name,
                              (long long)t->strides[i], i);
    numel *= t->shape[i];
  }
  (void)numel;
  if (!t->data) return sparge_set_error(SPARGE_ERROR_INVALID_VALUE, "%s: data pointer is NULL", name);
  return SPARGE_SUCCESS;
}

static sparge_status_t check_same_device(const sparge_tensor_t *t, const sparge_tensor_t *ref,
                                         const char *name) {
  if (t->device_type != ref->device_type || t->device_id != ref->device_id)
    return sparge_set_error(SPARGE_ERROR_INVALID_VALUE, "%s: on device (%d, %d) but q is on (%d, %d)", name,
                            (int)t->device_type, (int)t->device_id, (int)ref->device_type,
                            (int)ref->device_id);
  return SPARGE_SUCCESS;
}

#define CHECK(expr)                        \
  do {                                     \
    sparge_status_t st_ = (expr);          \
    if (st_ != SPARGE_SUCCESS) return st_; \
  } while (0)

/* Shared checks of q, k (and v): ranks, dtypes, devices, head counts. */
static sparge_status_t check_qkv(const sparge_tensor_t *q, const sparge_tensor_t *k,
                                 const sparge_tensor_t *v, sparge_dims_t *d) {
  CHECK(check_desc(q, "q", 4));
  CHECK(check_desc(k, "k", 4));
  if (v) CHECK(check_desc(v, "v", 4));
  if (!is_float_dtype(q->dtype))
    return sparge_set_error(SPARGE_ERROR_INVALID_VALUE, "q: dtype %s is not float32/float16/bfloat16",
                            dtype_name(q->dtype));
  if (k->dtype != q->dtype)
    return sparge_set_error(SPARGE_ERROR_INVALID_VALUE, "k: dtype %s differs from q's %s", dtype_name(k->dtype),
                            dtype_name(q->dtype));
  if (v && v->dtype != q->dtype)
    return sparge_set_error(SPARGE_ERROR_INVALID_VALUE, "v: dtype %s differs from q's %s", dtype_name(v->dtype),
                            dtype_name(q->dtype));
  CHECK(check_same_device(k, q, "k"));
  if (v) CHECK(check_same_device(v, q, "v"));
  if (q->strides[3] != 1 || k->strides[3] != 1 || (v && v->strides[3] != 1))
    return sparge_set_error(SPARGE_ERROR_INVALID_VALUE, "%s: last dimension must have stride 1",
                            q->strides[3] != 1 ? "q" : (k->strides[3] != 1 ? "k" : "v"));
  d->B = q->shape[0];
  d->Hq = q->shape[1];
  d->Lq = q->shape[2];
  d->D = q->shape[3];
  d->Hkv = k->shape[1];
  d->Lk = k->shape[2];
  d->Dv = v ? v->shape[3] : d->D;
  if (k->shape[0] != d->B)
    return sparge_set_error(SPARGE_ERROR_INVALID_VALUE, "k: batch %lld differs from q's %lld",
                            (long long)k->shape[0], (long long)d->B);
  if (k->shape[3] != d->D)
    return sparge_set_error(SPARGE_ERROR_INVALID_VALUE, "k: head dim %lld differs from q's %lld",
                            (long long)k->shape[3], (long long)d->D);
  if (d->Hq % d->Hkv != 0)
    return sparge_set_error(SPARGE_ERROR_INVALID_VALUE, "k: %lld query heads are not a multiple of %lld kv heads",
                            (long long)d->Hq, (long long)d->Hkv);
  if (v) {
    if (v->shape[0] != d->B || v->shape[1] != d->Hkv || v->shape[2] != d->Lk)
      return sparge_set_error(SPARGE_ERROR_INVALID_VALUE,
                              "v: shape [%lld, %lld, %lld, _] differs from k's [%lld, %lld, %lld, _]",
                              (long long)v->shape[0], (long long)v->shape[1], (long long)v->shape[2],
                              (long long)d->B, (long long)d->Hkv, (long long)d->Lk);
  }
  return SPARGE_SUCCESS;
}

static sparge_status_t check_blocks(int32_t block_q, int32_t block_k, sparge_dims_t *d) {
  if (block_q < 1 || block_k < 1)
    return sparge_set_error(SPARGE_ERROR_INVALID_VALUE, "block_q/block_k: %d/%d must be >= 1", (int)block_q,
                            (int)block_k);
  d->nq = (d->Lq + block_q - 1) / block_q;
  d->nk = (d->Lk + block_k - 1) / block_k;
  return SPARGE_SUCCESS;
}

/* A per-head float32 hyperparameter vector [Hq] on q's device. */
static sparge_status_t check_head_param(const sparge_tensor_t *t, const char *name,
                                        const sparge_tensor_t *q, int64_t Hq) {
  CHECK(check_desc(t, name, 1));
  if (t->dtype != SPARGE_DTYPE_FLOAT32)
    return sparge_set_error(SPARGE_ERROR_INVALID_VALUE, "%s: dtype %s, expected float32", name,
                            dtype_name(t->dtype));
  if (t->shape[0] != Hq)
    return sparge_set_error(SPARGE_ERROR_INVALID_VALUE, "%s: %lld values for %lld query heads", name,
                            (long long)t->shape[0], (long long)Hq);
  return check_same_device(t, q, name);
}

static sparge_status_t check_shape(const sparge_tensor_t *t, const char *name, int ndim,
                                   const int64_t *want) {
  CHECK(check_desc(t, name, ndim));
  for (int i = 0; i < ndim; ++i)
    if (t->shape[i] != want[i]) {
      char buf[160];
      int n = 0;
      for (int j = 0; j < ndim && n < (int)sizeof buf - 24; ++j)
        n += snprintf(buf + n, sizeof buf - (size_t)n, "%s%lld", j ? ", " : "", (long long)want[j]);
      return sparge_set_error(SPARGE_ERROR_INVALID_VALUE, "%s: dimension %d is %lld, expected shape [%s]",
                              name, i, (long long)t->shape[i], buf);
    }
  return SPARGE_SUCCESS;
}

static sparge_status_t check_cpu_limits(const sparge_dims_t *d, int32_t block_q, int32_t block_k) {
  if (block_q > CPU_MAX_BLOCK || block_k > CPU_MAX_BLOCK)
    return sparge_set_error(SPARGE_ERROR_NOT_SUPPORTED, "block_q/block_k: %d/%d exceed the CPU limit %d",
                            (int)block_q, (int)block_k, CPU_MAX_BLOCK);
  if (d->D > CPU_MAX_HEAD_DIM || d->Dv > CPU_MAX_HEAD_DIM)
    return sparge_set_error(SPARGE_ERROR_NOT_SUPPORTED, "head_dim: %lld/%lld exceeds the CPU limit %d",
                            (long long)d->D, (long long)d->Dv, CPU_MAX_HEAD_DIM);
  return SPARGE_SUCCESS;
}

/* A bool/uint8 mask of an exact shape on q's device. */
static sparge_status_t check_mask(const sparge_tensor_t *t, const char *name, int ndim, const int64_t *shape,
                                  const sparge_tensor_t *q) {
  CHECK(check_shape(t, name, ndim, shape));
  if (!is_mask_dtype(t->dtype))
    return sparge_set_error(SPARGE_ERROR_INVALID_VALUE, "%s: dtype %s, expected bool or uint8", name,
                            dtype_name(t->dtype));
  return check_same_device(t, q, name);
}

/* The caller's workspace: large enough, present when needed, aligned. */
static sparge_status_t check_workspace(const void *workspace, size_t have, size_t need, uintptr_t align) {
  if (have < need)
    return sparge_set_error(SPARGE_ERROR_WORKSPACE_TOO_SMALL, "workspace: %zu bytes given, %zu needed", have, need);
  if (need && !workspace) return sparge_set_error(SPARGE_ERROR_INVALID_VALUE, "workspace: NULL");
  if (((uintptr_t)workspace & (align - 1u)) != 0)
    return sparge_set_error(SPARGE_ERROR_MISALIGNED, "workspace: must be %u-byte aligned", (unsigned)align);
  return SPARGE_SUCCESS;
}

static sparge_status_t check_struct_size(size_t got, size_t want, const char *name) {
  if (got < want)
    return sparge_set_error(SPARGE_ERROR_INVALID_VALUE, "%s: struct_size %zu is smaller than %zu (older header?)",
                            name, got, want);
  return SPARGE_SUCCESS;
}

static sparge_status_t check_causal(int32_t causal) {
  if (causal < SPARGE_CAUSAL_NONE || causal > SPARGE_CAUSAL_BOTTOM_RIGHT)
    return sparge_set_error(SPARGE_ERROR_INVALID_VALUE, "causal: unknown mode %d", (int)causal);
  return SPARGE_SUCCESS;
}

static sparge_status_t check_scale(float scale) {
  if (!isfinite(scale))
    return sparge_set_error(SPARGE_ERROR_INVALID_VALUE, "scale: %g is not finite", (double)scale);
  return SPARGE_SUCCESS;
}

/* ------------------------------------------------------------------------ */
/* Stage 1                                                                  */
/* ------------------------------------------------------------------------ */
static sparge_status_t validate_predict(const sparge_tensor_t *q, const sparge_tensor_t *k,
                                        const sparge_predict_params_t *p, sparge_dims_t *d) {
  if (!p) return sparge_set_error(SPARGE_ERROR_INVALID_VALUE, "params: NULL");
  CHECK(check_struct_size(p->struct_size, sizeof(sparge_predict_params_t), "params"));
  CHECK(check_qkv(q, k, NULL, d));
  CHECK(check_blocks(p->block_q, p->block_k, d));
  CHECK(check_causal(p->causal));
  CHECK(check_scale(p->scale));
  if (p->select_mode != SPARGE_SELECT_TOPK && p->select_mode != SPARGE_SELECT_CDF)
    return sparge_set_error(SPARGE_ERROR_INVALID_VALUE, "select_mode: unknown mode %d", (int)p->select_mode);
  if (q->device_type == SPARGE_DEVICE_CPU) CHECK(check_cpu_limits(d, p->block_q, p->block_k));
  return SPARGE_SUCCESS;
}

sparge_status_t sparge_predict_workspace_size(const sparge_tensor_t *q, const sparge_tensor_t *k,
                                              const sparge_predict_params_t *params, size_t *out_bytes) {
  sparge_clear_error();
  if (!out_bytes) return sparge_set_error(SPARGE_ERROR_INVALID_VALUE, "out_bytes: NULL");
  sparge_dims_t d;
  CHECK(validate_predict(q, k, params, &d));
  CHECK(sparge_device_supported(q->device_type, q->device_id));
  if (q->device_type == SPARGE_DEVICE_CPU) {
    *out_bytes = sparge_cpu_predict_workspace(&d, params->block_q, params->block_k);
    return SPARGE_SUCCESS;
  }
#ifdef SPARGE_WITH_CUDA
  *out_bytes = sparge_cuda_predict_workspace(&d, params->block_q, params->block_k);
  return SPARGE_SUCCESS;
#else
  return sparge_set_error(SPARGE_ERROR_INTERNAL, "device: unhandled");
#endif
}

sparge_status_t sparge_predict(const sparge_tensor_t *q, const sparge_tensor_t *k,
                               const sparge_tensor_t *sim_threshold, const sparge_tensor_t *select_param,
                               const sparge_predict_params_t *params, const sparge_tensor_t *out_mask,
                               void *workspace, size_t workspace_bytes, void *stream) {
#ifndef SPARGE_WITH_CUDA
  (void)stream;
#endif
  sparge_clear_error();
  sparge_dims_t d;
  CHECK(validate_predict(q, k, params, &d));
  CHECK(check_head_param(sim_threshold, "sim_threshold", q, d.Hq));
  CHECK(check_head_param(select_param, "select_param", q, d.Hq));
  const int64_t mshape[4] = {d.B, d.Hq, d.nq, d.nk};
  CHECK(check_mask(out_mask, "out_mask", 4, mshape, q));
  CHECK(sparge_device_supported(q->device_type, q->device_id));
  if (q->device_type == SPARGE_DEVICE_CPU) {
    CHECK(check_workspace(workspace, workspace_bytes,
                          sparge_cpu_predict_workspace(&d, params->block_q, params->block_k), 64));
    return sparge_cpu_predict(&d, q, k, sim_threshold, select_param, params, out_mask, workspace);
  }
#ifdef SPARGE_WITH_CUDA
  {
    CHECK(check_workspace(workspace, workspace_bytes,
                          sparge_cuda_predict_workspace(&d, params->block_q, params->block_k), 256));
    return sparge_cuda_predict(&d, q, k, sim_threshold, select_param, params, out_mask, workspace, stream);
  }
#else
  return sparge_set_error(SPARGE_ERROR_INTERNAL, "device: unhandled");
#endif
}

/* ------------------------------------------------------------------------ */
/* Stage 2                                                                  */
/* ------------------------------------------------------------------------ */
static sparge_status_t validate_attn(const sparge_tensor_t *q, const sparge_tensor_t *k,
                                     const sparge_tensor_t *v, const sparge_attn_params_t *p,
                                     sparge_dims_t *d) {
  if (!p) return sparge_set_error(SPARGE_ERROR_INVALID_VALUE, "params: NULL");
  CHECK(check_struct_size(p->struct_size, sizeof(sparge_attn_params_t), "params"));
  CHECK(check_qkv(q, k, v, d));
  CHECK(check_blocks(p->block_q, p->block_k, d));
  CHECK(check_causal(p->causal));
  CHECK(check_scale(p->scale));
  if (p->precision < SPARGE_PRECISION_AUTO || p->precision > SPARGE_PRECISION_INT8)
    return sparge_set_error(SPARGE_ERROR_INVALID_VALUE, "precision: unknown code %d", (int)p->precision);
  if (p->pv_group < 1 || p->pv_group > p->block_q)
    return sparge_set_error(SPARGE_ERROR_INVALID_VALUE, "pv_group: %d is outside 1..block_q (%d)",
                            (int)p->pv_group, (int)p->block_q);
  if (q->device_type == SPARGE_DEVICE_CPU) {
    CHECK(check_cpu_limits(d, p->block_q, p->block_k));
    if (p->precision == SPARGE_PRECISION_INT8)
      return sparge_set_error(SPARGE_ERROR_NOT_SUPPORTED, "precision: int8 has no CPU kernel");
  }
  return SPARGE_SUCCESS;
}

sparge_status_t sparge_attn_workspace_size(const sparge_tensor_t *q, const sparge_tensor_t *k,
                                           const sparge_tensor_t *v, const sparge_attn_params_t *params,
                                           size_t *out_bytes) {
  sparge_clear_error();
  if (!out_bytes) return sparge_set_error(SPARGE_ERROR_INVALID_VALUE, "out_bytes: NULL");
  sparge_dims_t d;
  CHECK(validate_attn(q, k, v, params, &d));
  CHECK(sparge_device_supported(q->device_type, q->device_id));
  if (q->device_type == SPARGE_DEVICE_CPU) {
    *out_bytes = 0; /* per-thread scratch lives on the host heap */
    return SPARGE_SUCCESS;
  }
#ifdef SPARGE_WITH_CUDA
  *out_bytes = sparge_cuda_attn_workspace(&d, params);
  return SPARGE_SUCCESS;
#else
  return sparge_set_error(SPARGE_ERROR_INTERNAL, "device: unhandled");
#endif
}

sparge_status_t sparge_block_sparse_attn(const sparge_tensor_t *q, const sparge_tensor_t *k,
                                         const sparge_tensor_t *v, const sparge_tensor_t *block_mask,
                                         const sparge_tensor_t *key_padding,
                                         const sparge_tensor_t *pv_threshold,
                                         const sparge_attn_params_t *params, const sparge_tensor_t *out,
                                         const sparge_tensor_t *out_lse, const sparge_tensor_t *out_stats,
                                         void *workspace, size_t workspace_bytes, void *stream) {
#ifndef SPARGE_WITH_CUDA
  (void)stream;
  (void)workspace;
  (void)workspace_bytes;
#endif
  sparge_clear_error();
  sparge_dims_t d;
  CHECK(validate_attn(q, k, v, params, &d));
  const int64_t mshape[4] = {d.B, d.Hq, d.nq, d.nk};
  CHECK(check_mask(block_mask, "block_mask", 4, mshape, q));
  if (key_padding) {
    const int64_t kshape[2] = {d.B, d.Lk};
    CHECK(check_mask(key_padding, "key_padding", 2, kshape, q));
  }
  if (pv_threshold) CHECK(check_head_param(pv_threshold, "pv_threshold", q, d.Hq));
  const int64_t oshape[4] = {d.B, d.Hq, d.Lq, d.Dv};
  CHECK(check_shape(out, "out", 4, oshape));
  if (out->dtype != q->dtype)
    return sparge_set_error(SPARGE_ERROR_INVALID_VALUE, "out: dtype %s differs from q's %s",
                            dtype_name(out->dtype), dtype_name(q->dtype));
  if (out->strides[3] != 1)
    return sparge_set_error(SPARGE_ERROR_INVALID_VALUE, "out: last dimension must have stride 1");
  CHECK(check_same_device(out, q, "out"));
  if (out_lse) {
    const int64_t lshape[3] = {d.B, d.Hq, d.Lq};
    CHECK(check_shape(out_lse, "out_lse", 3, lshape));
    if (out_lse->dtype != SPARGE_DTYPE_FLOAT32)
      return sparge_set_error(SPARGE_ERROR_INVALID_VALUE, "out_lse: dtype %s, expected float32",
                              dtype_name(out_lse->dtype));
    CHECK(check_same_device(out_lse, q, "out_lse"));
  }
  if (out_stats) {
    const int64_t sshape[3] = {d.B, d.Hq, SPARGE_NUM_STATS};
    CHECK(check_shape(out_stats, "out_stats", 3, sshape));
    if (out_stats->dtype != SPARGE_DTYPE_INT64)
      return sparge_set_error(SPARGE_ERROR_INVALID_VALUE, "out_stats: dtype %s, expected int64",
                              dtype_name(out_stats->dtype));
    CHECK(check_same_device(out_stats, q, "out_stats"));
  }
  CHECK(sparge_device_supported(q->device_type, q->device_id));
  if (q->device_type == SPARGE_DEVICE_CPU)
    return sparge_cpu_attn(&d, q, k, v, block_mask, key_padding, pv_threshold, params, out, out_lse,
                           out_stats);
#ifdef SPARGE_WITH_CUDA
  {
    CHECK(check_workspace(workspace, workspace_bytes, sparge_cuda_attn_workspace(&d, params), 256));
    if (q->dtype == SPARGE_DTYPE_FLOAT32)
      return sparge_set_error(SPARGE_ERROR_NOT_SUPPORTED,
                              "q: float32 has no CUDA attention kernel (cast to float16/bfloat16)");
    return sparge_cuda_attn(&d, q, k, v, block_mask, key_padding, pv_threshold, params, out, out_lse, out_stats,
                            workspace, stream);
  }
#else
  return sparge_set_error(SPARGE_ERROR_INTERNAL, "device: unhandled");
#endif
}
