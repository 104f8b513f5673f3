// Lab shim: AttnParams from the sm80 header until csrc/cuda/attn_params.h exists.
#include "cuda/attn_sm80.cuh"
