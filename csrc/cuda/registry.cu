// registry.cu — the rows of the CUDA attention kernel registry and the
// lookup (registry.h). The rows come from the lists that inst/generate.py
// writes beside the instantiation units (inst/attn_<family>.inc), so the
// kernels that exist, and their head dims, are listed once: in generate.py.
// Each family turns its list lines into rows here, with its tiles from
// csrc/tile_config.h.
#include "registry.h"

#include <stdio.h>
#include <stdlib.h>

#include "attn_sm80.cuh"
#include "host.h"
#ifdef SPARGE_CUDA_SM90
#include "attn_sm90.cuh"
#endif

namespace sparge_cuda {

// ---- sm80 family: attn_sm80.cuh (mma.sync), every device from sm_80 on ----
// The launchers are compiled in inst/attn_sm80_*.cu; extern here, so that
// taking their address does not instantiate the kernel in this unit.
#define SPARGE_ATTN_SM80(T, DTYPE, PRECISION, D, DV) \
  extern template cudaError_t launch_attn_sm80<T, D>(const AttnParams &, unsigned, cudaStream_t);
#include "inst/attn_sm80.inc"
#undef SPARGE_ATTN_SM80

template <typename T, int D, int DV>
constexpr AttnKernel sm80_row(int dtype, int precision) {
  static_assert(D == DV, "the sm80 kernel needs equal head dims");
  using C = AttnCfgFor<D>;
  return AttnKernel{/*arch=*/80, precision, dtype, D, D, C::kBQ, C::kBK, /*pv_group=*/C::kWM, C::kSmemBytes,
                    &launch_attn_sm80<T, D>};
}

// ---- sm90 family: attn_sm90.cuh (wgmma + TMA), sm_90a only ----
// Present when setup.py built the sm_90a units (SPARGE_CUDA_SM90); without
// them sm90 devices run the sm80 rows.
#ifdef SPARGE_CUDA_SM90
#define SPARGE_ATTN_SM90(T, DTYPE, PRECISION, D, DV) \
  extern template cudaError_t launch_attn_sm90<T, D>(const AttnParams &, unsigned, cudaStream_t);
#include "inst/attn_sm90.inc"
#undef SPARGE_ATTN_SM90

template <typename T, int D, int DV>
constexpr AttnKernel sm90_row(int dtype, int precision) {
  static_assert(D == DV, "the sm90 kernel needs equal head dims");
  using C = Sm90CfgFor<D>;
  return AttnKernel{/*arch=*/90, precision, dtype, D, D, C::kBQ, C::kBK, /*pv_group=*/C::kWM, C::kSmemBytes,
                    &launch_attn_sm90<T, D>};
}
#endif

namespace {

// The table. Row order is the order of the head dims listed in messages.
const AttnKernel kKernels[] = {
#define SPARGE_ATTN_SM80(T, DTYPE, PRECISION, D, DV) sm80_row<T, D, DV>(DTYPE, PRECISION),
#include "inst/attn_sm80.inc"
#undef SPARGE_ATTN_SM80
#ifdef SPARGE_CUDA_SM90
#define SPARGE_ATTN_SM90(T, DTYPE, PRECISION, D, DV) sm90_row<T, D, DV>(DTYPE, PRECISION),
#include "inst/attn_sm90.inc"
#undef SPARGE_ATTN_SM90
#endif
};
constexpr int kNumKernels = (int)(sizeof kKernels / sizeof kKernels[0]);

// SPARGE_CUDA_MAX_ARCH (environment, e.g. "80"): rows of a higher arch are
// not used, so the sm80 kernel can be pinned on an sm90 device (the test
// suite runs once per family this way). Read at every lookup; Python caches
// block shapes per process, so set it before the first call.
int max_arch_allowed() {
  const char *e = getenv("SPARGE_CUDA_MAX_ARCH");
  if (e == nullptr || *e == '\0') return 1 << 30;
  const int v = atoi(e);
  return v > 0 ? v : 1 << 30;
}

// Whether a device of compute capability cc (major * 10 + minor) can run k:
// plain sm_80 code runs on every later device (through the build's image for
// it); sm_90a code (wgmma, setmaxnreg) on sm_90 alone.
bool runs_on(const AttnKernel &k, int cc) {
  if (k.arch > max_arch_allowed()) return false;
  return k.arch == 90 ? cc == 90 : cc >= k.arch;
}

const char *precision_name(int32_t precision) {
  switch (precision) {
    case SPARGE_PRECISION_FP16: return "fp16";
    case SPARGE_PRECISION_BF16: return "bf16";
    case SPARGE_PRECISION_INT8: return "int8";
    default: return "?";
  }
}

}  // namespace

sparge_status_t find_attn_kernel(int32_t device_id, int64_t head_dim, int64_t head_dim_v, int32_t dtype,
                                 int32_t precision, const AttnKernel **out) {
  if (precision != SPARGE_PRECISION_AUTO && precision != SPARGE_PRECISION_FP16 &&
      precision != SPARGE_PRECISION_BF16 && precision != SPARGE_PRECISION_INT8)
    return sparge_set_error(SPARGE_ERROR_INVALID_VALUE, "precision: unknown code %d", (int)precision);
  // api.c has already picked the dtype of fp32 inputs from a 16-bit request.
  const int32_t want = precision == SPARGE_PRECISION_INT8 ? SPARGE_PRECISION_INT8
                       : dtype == SPARGE_DTYPE_BFLOAT16   ? SPARGE_PRECISION_BF16
                                                          : SPARGE_PRECISION_FP16;

  // Narrow the key one field at a time, so that the message names the first
  // field no kernel of this build has.
  bool any_precision = false, any_dtype = false, any_unequal = false;
  for (const AttnKernel &k : kKernels) {
    if (k.precision != want) continue;
    any_precision = true;
    if (k.dtype != dtype) continue;
    any_dtype = true;
    any_unequal = any_unequal || k.head_dim != k.head_dim_v;
  }
  if (!any_precision)
    return sparge_set_error(SPARGE_ERROR_NOT_SUPPORTED, "precision: %s has no CUDA kernel in this build yet",
                            precision_name(want));
  if (!any_dtype)
    return sparge_set_error(SPARGE_ERROR_NOT_SUPPORTED,
                            "dtype: the CUDA kernel computes in float16 or bfloat16 (dtype code %d)", (int)dtype);
  if (head_dim != head_dim_v && !any_unequal)
    return sparge_set_error(SPARGE_ERROR_NOT_SUPPORTED,
                            "head_dim_v: %lld differs from head_dim %lld; the CUDA kernel needs equal head dims",
                            (long long)head_dim_v, (long long)head_dim);

  DeviceInfo info;
  sparge_status_t st = device_info(device_id, &info);
  if (st != SPARGE_SUCCESS) return st;

  // The best row: runnable, fits the shared memory, highest arch; else the
  // best runnable one, for the message.
  const AttnKernel *best = nullptr, *best_any = nullptr;
  for (const AttnKernel &k : kKernels) {
    if (k.precision != want || k.dtype != dtype || k.head_dim != head_dim || k.head_dim_v != head_dim_v ||
        !runs_on(k, info.cc))
      continue;
    if (!best_any || k.arch > best_any->arch) best_any = &k;
    if (k.smem_bytes <= info.smem_optin && (!best || k.arch > best->arch)) best = &k;
  }
  if (!best_any) {
    // "supported: 64, 96, 128, 256": the head dims this device has rows for
    char list[256];
    int n = 0;
    list[0] = '\0';
    for (int i = 0; i < kNumKernels; ++i) {
      const AttnKernel &k = kKernels[i];
      if (k.precision != want || k.dtype != dtype || !runs_on(k, info.cc)) continue;
      bool seen = false;
      for (int j = 0; j < i && !seen; ++j) {
        const AttnKernel &e = kKernels[j];
        seen = e.precision == want && e.dtype == dtype && runs_on(e, info.cc) && e.head_dim == k.head_dim &&
               e.head_dim_v == k.head_dim_v;
      }
      if (seen || n >= (int)sizeof list) continue;
      if (k.head_dim == k.head_dim_v)
        n += snprintf(list + n, sizeof list - n, "%s%d", n ? ", " : "", k.head_dim);
      else
        n += snprintf(list + n, sizeof list - n, "%s%d/%d", n ? ", " : "", k.head_dim, k.head_dim_v);
    }
    if (head_dim == head_dim_v)
      return sparge_set_error(SPARGE_ERROR_NOT_SUPPORTED, "head_dim: %lld has no CUDA kernel (supported: %s)",
                              (long long)head_dim, n ? list : "none on this device");
    return sparge_set_error(SPARGE_ERROR_NOT_SUPPORTED,
                            "head_dim/head_dim_v: %lld/%lld has no CUDA kernel (supported: %s)", (long long)head_dim,
                            (long long)head_dim_v, n ? list : "none on this device");
  }
  if (!best)
    return sparge_set_error(SPARGE_ERROR_NOT_SUPPORTED,
                            "device: head dim %lld needs %d bytes of shared memory per block, device %d allows %d",
                            (long long)head_dim, best_any->smem_bytes, (int)device_id, info.smem_optin);
  *out = best;
  return SPARGE_SUCCESS;
}

}  // namespace sparge_cuda
