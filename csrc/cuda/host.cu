// host.cu — the out-of-line part of host.h: the CUDA error status and the
// per-device attribute cache.
#include "host.h"

#include <atomic>

namespace sparge_cuda {

sparge_status_t cuda_error(cudaError_t err, const char *what) {
  return sparge_set_error(SPARGE_ERROR_CUDA, "%s: %s (%s)", what, cudaGetErrorName(err), cudaGetErrorString(err));
}

namespace {

// One slot per device: the fields are written before `ready` (release) and
// read after it (acquire), so a reader sees either a complete entry or none.
struct InfoSlot {
  std::atomic<int> cc, sm_count, smem_optin;
  std::atomic<bool> ready;
};
InfoSlot g_info[kMaxDevices];

sparge_status_t query(int device_id, DeviceInfo *out) {
  int major = 0, minor = 0;
  cudaError_t err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device_id);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device_id);
  if (err != cudaSuccess) return cuda_error(err, "cudaDeviceGetAttribute(ComputeCapability)");
  err = cudaDeviceGetAttribute(&out->sm_count, cudaDevAttrMultiProcessorCount, device_id);
  if (err != cudaSuccess) return cuda_error(err, "cudaDeviceGetAttribute(MultiProcessorCount)");
  err = cudaDeviceGetAttribute(&out->smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device_id);
  if (err != cudaSuccess) return cuda_error(err, "cudaDeviceGetAttribute(MaxSharedMemoryPerBlockOptin)");
  out->cc = major * 10 + minor;
  return SPARGE_SUCCESS;
}

}  // namespace

sparge_status_t device_info(int device_id, DeviceInfo *out) {
  const bool cached = device_id >= 0 && device_id < kMaxDevices;
  if (cached && g_info[device_id].ready.load(std::memory_order_acquire)) {
    const InfoSlot &s = g_info[device_id];
    out->cc = s.cc.load(std::memory_order_relaxed);
    out->sm_count = s.sm_count.load(std::memory_order_relaxed);
    out->smem_optin = s.smem_optin.load(std::memory_order_relaxed);
    return SPARGE_SUCCESS;
  }
  const sparge_status_t st = query(device_id, out);
  if (st != SPARGE_SUCCESS || !cached) return st;
  InfoSlot &s = g_info[device_id];
  s.cc.store(out->cc, std::memory_order_relaxed);
  s.sm_count.store(out->sm_count, std::memory_order_relaxed);
  s.smem_optin.store(out->smem_optin, std::memory_order_relaxed);
  s.ready.store(true, std::memory_order_release);
  return SPARGE_SUCCESS;
}

}  // namespace sparge_cuda
