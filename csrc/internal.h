/* internal.h — shared by api.c and the backends; not installed, not public. */
#ifndef SPARGE_INTERNAL_H_
#define SPARGE_INTERNAL_H_

#include "sparge.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Problem sizes, filled by api.c after validation. Backends may rely on every
 * check api.c makes: shapes agree, dtypes are supported, last strides are 1,
 * block sizes are in range, optional tensors are NULL or well formed. */
typedef struct sparge_dims {
  int64_t B, Hq, Hkv, Lq, Lk, D, Dv;
  int64_t nq, nk; /* ceil(Lq / block_q), ceil(Lk / block_k) */
} sparge_dims_t;

/* Records the detail text for the calling thread and returns status, so that
 * `return sparge_set_error(SPARGE_ERROR_INVALID_VALUE, "q: ...", ...)` works. */
sparge_status_t sparge_set_error(sparge_status_t status, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;
void sparge_clear_error(void);

/* ---- CPU backend (csrc/cpu) ---- */
size_t sparge_cpu_predict_workspace(const sparge_dims_t *d, int32_t block_q, int32_t block_k);
sparge_status_t sparge_cpu_predict(const sparge_dims_t *d, const sparge_tensor_t *q,
                                   const sparge_tensor_t *k, const sparge_tensor_t *sim_threshold,
                                   const sparge_tensor_t *select_param,
                                   const sparge_predict_params_t *p,
                                   const sparge_tensor_t *out_mask, void *workspace);
sparge_status_t sparge_cpu_attn(const sparge_dims_t *d, const sparge_tensor_t *q,
                                const sparge_tensor_t *k, const sparge_tensor_t *v,
                                const sparge_tensor_t *block_mask,
                                const sparge_tensor_t *key_padding,
                                const sparge_tensor_t *pv_threshold,
                                const sparge_attn_params_t *p, const sparge_tensor_t *out,
                                const sparge_tensor_t *out_lse, const sparge_tensor_t *out_stats);

/* ---- CUDA backend (csrc/cuda), present when SPARGE_WITH_CUDA is defined ----
 * Same contracts as the CPU functions; q, k, v, masks, outputs and per-head
 * parameters are device pointers on device_id = q->device_type's device.
 * Everything is enqueued on `stream` (a cudaStream_t); no host
 * synchronization, no device allocation, no printing. */
#ifdef SPARGE_WITH_CUDA
sparge_status_t sparge_cuda_device_supported(int32_t device_id);
/* Block shape / PV row group / resolved precision for this device and head
 * dims; NOT_SUPPORTED when no kernel instantiation exists. dtype is the dtype
 * the kernel computes in (FLOAT16 or BFLOAT16). */
sparge_status_t sparge_cuda_block_shape(int32_t device_id, int64_t head_dim, int64_t head_dim_v,
                                        int32_t dtype, int32_t precision, int32_t *out_block_q,
                                        int32_t *out_block_k, int32_t *out_pv_group,
                                        int32_t *out_precision);
size_t sparge_cuda_predict_workspace(const sparge_dims_t *d, int32_t block_q, int32_t block_k);
sparge_status_t sparge_cuda_predict(const sparge_dims_t *d, const sparge_tensor_t *q,
                                    const sparge_tensor_t *k, const sparge_tensor_t *sim_threshold,
                                    const sparge_tensor_t *select_param,
                                    const sparge_predict_params_t *p,
                                    const sparge_tensor_t *out_mask, void *workspace, void *stream);
size_t sparge_cuda_attn_workspace(const sparge_dims_t *d, const sparge_attn_params_t *p);
sparge_status_t sparge_cuda_attn(const sparge_dims_t *d, const sparge_tensor_t *q,
                                 const sparge_tensor_t *k, const sparge_tensor_t *v,
                                 const sparge_tensor_t *block_mask,
                                 const sparge_tensor_t *key_padding,
                                 const sparge_tensor_t *pv_threshold,
                                 const sparge_attn_params_t *p, const sparge_tensor_t *out,
                                 const sparge_tensor_t *out_lse, const sparge_tensor_t *out_stats,
                                 void *workspace, void *stream);
#endif

#ifdef __cplusplus
}
#endif

#endif /* SPARGE_INTERNAL_H_ */
