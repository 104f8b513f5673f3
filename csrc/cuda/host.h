// host.h — host-side helpers shared by every CUDA unit of sparge: the error
// status of a failed CUDA call, a per-device cache of the attributes the
// launchers need, the guard that makes the tensors' device current, and the
// launch helper (plain or programmatic dependent launch). Host code only.
#ifndef SPARGE_CUDA_HOST_H_
#define SPARGE_CUDA_HOST_H_

#include <cuda_runtime.h>

#include <atomic>

#include "../internal.h"

namespace sparge_cuda {

// Devices whose per-device state is cached; ids beyond it are queried every
// time (correct, only slower).
constexpr int kMaxDevices = 64;

// Records "what: cudaErrorX (text)" as the CUDA_ERROR detail and returns it.
sparge_status_t cuda_error(cudaError_t err, const char *what);

// Raises kernel K's dynamic shared-memory limit to `bytes` on the current
// device, once per device and kernel (races between threads only repeat the
// attribute call). Every launcher of a > 48 KB kernel calls it.
template <auto K>
cudaError_t allow_dynamic_smem(int bytes) {
  static std::atomic<bool> done[kMaxDevices];
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  const bool cached = dev >= 0 && dev < kMaxDevices;
  if (cached && done[dev].load(std::memory_order_relaxed)) return cudaSuccess;
  err = cudaFuncSetAttribute(K, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err == cudaSuccess && cached) done[dev].store(true, std::memory_order_relaxed);
  return err;
}

// The attributes of a device the CUDA backend decides with.
struct DeviceInfo {
  int cc;          // compute capability, major * 10 + minor (90 = sm_90)
  int sm_count;    // streaming multiprocessors (grid sizing)
  int smem_optin;  // opt-in shared memory per block, bytes
};

// Fills *out for device_id, queried once per device and then cached (races
// between threads only repeat the query). Needs no current device.
sparge_status_t device_info(int device_id, DeviceInfo *out);

// Makes `device` current for the scope and restores the caller's device on
// exit; a no-op when it is current already.
struct DeviceGuard {
  int prev = -1;
  bool switched = false;
  cudaError_t enter(int device) {
    cudaError_t err = cudaGetDevice(&prev);
    if (err != cudaSuccess) return err;
    if (prev == device) return cudaSuccess;
    err = cudaSetDevice(device);
    switched = err == cudaSuccess;
    return err;
  }
  ~DeviceGuard() {
    if (switched) cudaSetDevice(prev);
  }
};

// Launches kfn on st; with pdl set (sm90+ only) as a programmatic dependent
// launch, which may start while the previous kernel on st is still running
// (the kernel waits with griddepcontrol.wait before it reads that kernel's
// results). Returns the launch error, if any.
template <typename... Args>
cudaError_t launch_kernel(void (*kfn)(Args...), dim3 grid, dim3 block, size_t smem, cudaStream_t st, bool pdl,
                          Args... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = st;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl ? 1 : 0;
  cudaError_t err = cudaLaunchKernelEx(&cfg, kfn, args...);
  if (err == cudaSuccess) err = cudaGetLastError();
  return err;
}

}  // namespace sparge_cuda

#endif  // SPARGE_CUDA_HOST_H_
