// Explicit instantiation of the sm80 attention launcher for head dim 64, __half
// (one unit per head dim x dtype so that the build compiles them in parallel).
#include "../attn_sm80.cuh"

namespace sparge_cuda {
template cudaError_t launch_attn<__half, 64>(const AttnParams &, unsigned, cudaStream_t);
}  // namespace sparge_cuda
