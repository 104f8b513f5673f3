// device.cu — CUDA device queries of the CUDA backend.
//
// Whether a device can run this build's kernels: sm_80 or newer, and an image
// of the device code for its architecture (static cudart, so importing sparge
// needs no CUDA libraries; the runtime is first touched here).
#include <cuda_runtime.h>

#include <cstdio>

#include "host.h"

namespace {

// Never launched: its attributes tell whether the build has an image for a
// device (cudaFuncGetAttributes fails when the device's arch is missing).
__global__ void probe_kernel(int *out_arch) {
#ifdef __CUDA_ARCH__
  if (threadIdx.x == 0) *out_arch = __CUDA_ARCH__;
#endif
}

using sparge_cuda::cuda_error;
using sparge_cuda::kMaxDevices;

// Per-device cache of the probe (0 = not probed, 1 = ok, 2 = failed). Races
// between threads only repeat the probe.
int g_probe_state[kMaxDevices];
char g_probe_error[kMaxDevices][256];

}  // namespace

extern "C" sparge_status_t sparge_cuda_device_supported(int32_t device_id) {
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error so later calls start clean
    return sparge_set_error(SPARGE_ERROR_NOT_SUPPORTED, "device: no usable CUDA driver or device (%s)",
                            cudaGetErrorString(err));
  }
  if (device_id >= count)
    return sparge_set_error(SPARGE_ERROR_INVALID_VALUE, "device_id: %d but only %d CUDA devices", (int)device_id,
                            count);
  cudaDeviceProp prop;
  err = cudaGetDeviceProperties(&prop, device_id);
  if (err != cudaSuccess) return cuda_error(err, "cudaGetDeviceProperties");
  if (prop.major < 8)
    return sparge_set_error(SPARGE_ERROR_NOT_SUPPORTED, "device: %s is sm_%d%d; sparge needs sm_80 or newer",
                            prop.name, prop.major, prop.minor);
  if (device_id < kMaxDevices && g_probe_state[device_id] == 0) {
    // Ask the runtime whether this build holds an image of probe_kernel that
    // the device can run: no allocation, no launch, no synchronization.
    cudaFuncAttributes attr;
    cudaError_t e;
    {
      sparge_cuda::DeviceGuard guard;
      err = guard.enter(device_id);
      if (err != cudaSuccess) return cuda_error(err, "cudaSetDevice");
      e = cudaFuncGetAttributes(&attr, probe_kernel);
    }
    if (e != cudaSuccess) {
      cudaGetLastError();
      snprintf(g_probe_error[device_id], sizeof g_probe_error[device_id],
               "device: %s (sm_%d%d) cannot run this build's device code: %s", prop.name, prop.major,
               prop.minor, cudaGetErrorString(e));
      g_probe_state[device_id] = 2;
    } else {
      g_probe_error[device_id][0] = '\0';
      g_probe_state[device_id] = 1;
    }
  }
  if (device_id < kMaxDevices && g_probe_state[device_id] == 2)
    return sparge_set_error(SPARGE_ERROR_NOT_SUPPORTED, "%s", g_probe_error[device_id]);
  return SPARGE_SUCCESS;
}
