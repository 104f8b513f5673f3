// Explicit instantiation of the sm80 attention launcher for head dim 256, __nv_bfloat16
// (one unit per head dim x dtype so that the build compiles them in parallel).
#include "../attn_sm80.cuh"

namespace sparge_cuda {
template cudaError_t launch_attn<__nv_bfloat16, 256>(const AttnParams &, unsigned, cudaStream_t);
}  // namespace sparge_cuda
