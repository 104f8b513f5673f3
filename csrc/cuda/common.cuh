// common.cuh — device helpers shared by the CUDA kernels of sparge: warp
// reductions, and thin wrappers over the sm80+ PTX instructions the kernels
// are built from (cp.async, ldmatrix, mma.sync m16n8k16, ex2.approx).
//
// Fragment layouts of mma.sync.m16n8k16 (PTX ISA, "Matrix fragments"), with
// g = lane / 4 ("groupID") and t = lane % 4 ("threadID_in_group"):
//   A 16x16 (row-major), 4 x b32 = 8 x 16-bit:
//     a[0] = (row g,     cols 2t, 2t+1)     a[1] = (row g + 8, cols 2t, 2t+1)
//     a[2] = (row g,     cols 2t+8, 2t+9)   a[3] = (row g + 8, cols 2t+8, 2t+9)
//   B 16x8 (k x n, "col"), 2 x b32:
//     b[0] = (k 2t, 2t+1;   n g)            b[1] = (k 2t+8, 2t+9; n g)
//   C/D 16x8 fp32, 4 x f32:
//     c[0], c[1] = (row g,     cols 2t, 2t+1)
//     c[2], c[3] = (row g + 8, cols 2t, 2t+1)
// In every packed b32 the element with the lower column (or k) index sits in
// the low 16 bits.
//
// ldmatrix.m8n8.x4: lanes 8i..8i+7 give the addresses of the 8 rows (16 bytes
// each) of matrix i; register i of every lane receives matrix i's fragment:
// lane l gets row l/4, elements 2(l%4), 2(l%4)+1 — or with .trans the
// transposed fragment: elements (2(l%4), l/4) and (2(l%4)+1, l/4).
#ifndef SPARGE_CUDA_COMMON_CUH_
#define SPARGE_CUDA_COMMON_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace sparge_cuda {

constexpr unsigned kFullMask = 0xffffffffu;

// ---- warp reductions ------------------------------------------------------
// Max / sum over the 4 lanes of a quad (lanes 4g..4g+3), the lanes that hold
// one row of an mma C fragment.
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(kFullMask, x, 1));
  x = fmaxf(x, __shfl_xor_sync(kFullMask, x, 2));
  return x;
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(kFullMask, x, 1);
  x += __shfl_xor_sync(kFullMask, x, 2);
  return x;
}

// ---- math -----------------------------------------------------------------
// 2^x with the MUFU unit; ex2.approx(-inf) = +0, results below the smallest
// normal flush to 0 (ftz).
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// ---- shared-memory addresses ------------------------------------------------
__device__ __forceinline__ uint32_t smem_u32(const void *p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// ---- cp.async (sm80+) -------------------------------------------------------
// 16-byte global -> shared copy that bypasses L1 (.cg). When valid is false no
// byte is read (src-size 0) and the 16 destination bytes are zero-filled; src
// must still be a mapped address, callers pass a valid row.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void *src, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes)
               : "memory");
}
// Same without the zero fill (every byte read), for full tiles.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void *src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Waits until at most N of this thread's most recent commit groups are still
// pending (all older ones have landed in shared memory). Other threads' copies
// become visible only after a following __syncthreads().
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// ---- ldmatrix ---------------------------------------------------------------
// volatile + memory clobber: the same buffer is re-read after every
// __syncthreads with new contents, so these loads must never be merged,
// hoisted out of the k-block loop or moved across the barriers.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

// ---- 16-bit element types ---------------------------------------------------
// mma.sync m16n8k16 with fp32 accumulation (d = a * b + d) and packing of two
// floats into one b32 operand (lo -> low 16 bits), per element type.
template <typename T>
struct Elem;

template <>
struct Elem<__half> {
  __device__ __forceinline__ static void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  // d = a * b (accumulator starts at zero)
  __device__ __forceinline__ static void mma_zero(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                  uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%10, %10, %10, %10};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "f"(0.0f));
  }
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);  // .x = lo (low half), .y = hi
    return *reinterpret_cast<uint32_t *>(&h);
  }
};

template <>
struct Elem<__nv_bfloat16> {
  __device__ __forceinline__ static void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  // d = a * b (accumulator starts at zero)
  __device__ __forceinline__ static void mma_zero(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                  uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%10, %10, %10, %10};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "f"(0.0f));
  }
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);  // .x = lo (low half), .y = hi
    return *reinterpret_cast<uint32_t *>(&h);
  }
};

}  // namespace sparge_cuda

#endif  // SPARGE_CUDA_COMMON_CUH_
