// registry.h — the CUDA attention kernel registry: one table of every
// compiled kernel, keyed by {arch, precision, dtype, head dim, head dim of v},
// giving its tile and its launcher. sparge_cuda_block_shape and
// sparge_cuda_attn (attn.cu) read only this; the rows are in registry.cu.
#ifndef SPARGE_CUDA_REGISTRY_H_
#define SPARGE_CUDA_REGISTRY_H_

#include <cuda_runtime.h>
#include <stdint.h>

#include "../internal.h"
#include "attn_params.h"

namespace sparge_cuda {

// Enqueues the kernel on stream (the tensors' device must be current);
// grid = nq * B * Hq CTAs. Returns the launch error, if any.
using AttnLaunch = cudaError_t (*)(const AttnParams &p, unsigned grid, cudaStream_t stream);

struct AttnKernel {
  // ---- key ----
  int arch;        // 80: runs on sm_80 and newer; 90: uses sm_90a features, runs on sm_90 only
  int precision;   // sparge_precision_t the kernel computes in (FP16/BF16: 16-bit MMA, fp32 accumulation)
  int dtype;       // sparge_dtype_t of q, k, v and out
  int head_dim;    // D
  int head_dim_v;  // Dv
  // ---- what callers must match ----
  int block_q, block_k;  // the mask's block shape (sparge_block_shape)
  int pv_group;          // query rows per PV-skip decision
  int smem_bytes;        // dynamic shared memory per CTA (must fit the device's opt-in limit)
  AttnLaunch launch;
};

// The kernel to run on device_id for these head dims, dtype (FLOAT16 or
// BFLOAT16: the dtype the kernel computes in) and requested precision. A
// 16-bit request (AUTO, FP16, BF16) runs in the dtype's own 16-bit precision.
// Among the rows the device can run, the highest arch whose shared memory
// fits wins (an sm90 row beats the sm80 row of the same key on sm90).
// NOT_SUPPORTED (detail text set) when no row fits; INVALID_VALUE for an
// unknown precision.
sparge_status_t find_attn_kernel(int32_t device_id, int64_t head_dim, int64_t head_dim_v, int32_t dtype,
                                 int32_t precision, const AttnKernel **out);

}  // namespace sparge_cuda

#endif  // SPARGE_CUDA_REGISTRY_H_
