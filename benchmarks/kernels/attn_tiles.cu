// attn_tiles.cu — experiment (not part of the build): the sm80 attention kernel
// of csrc/cuda/attn_sm80.cuh instantiated with several tile configurations,
// exported through a tiny C entry point so that benchmarks/kernels/bench_tiles.py
// can time them with torch tensors next to torch's SDPA backends in one run.
//   nvcc -std=c++17 -O3 --expt-relaxed-constexpr -shared -Xcompiler -fPIC \
//        -gencode arch=compute_90a,code=sm_90a -Icsrc/include -Icsrc \
//        -DTILE_GROUP=0 benchmarks/kernels/attn_tiles.cu -o attn_tiles0.so   (and =1)
// Dense bhsd contiguous bf16 inputs, uint8 block mask [B, H, nq, nk].
#include "cuda/attn_sm80.cuh"

namespace sc = sparge_cuda;

#ifndef TILE_GROUP
#define TILE_GROUP 0
#endif

// (id, D, BQ, BK, warps, stages, Q in regs, min blocks). Measured on H100
// (2026-11-26, bench_tiles.py; see benchmarks/NOTES.md), D=64 dense at B=1,
// H=32, L=16k, FA2 7.02 ms: v0 = the old table's tile (128,64, Q in regs, 2/SM)
// 8.65-8.81; v1 (128,64, Q re-read, 3/SM) 7.63; (same, 2 stages) 7.98;
// (128,64, 8 warps x 16 rows) 10.37, 2 stages 10.37; v4 = the table's tile
// (128,128, 1 stage) 7.38-7.39; v5 (2 stages) 7.17-7.29 but slower at density
// 0.25; (128,128, 8 warps, Q regs, 1/SM) 11.51, 2/SM (spills) 8.56, no Q regs
// 8.29; (64,64, 4 warps x 16, 4/SM) 9.05. A split-softmax schedule (half the
// keys' exp2 before the other half's max) spilled at D=64 (9.24) and was 10%
// slower at D=128 without spills (6.90 vs 6.26); it is not in the kernel.
#if TILE_GROUP == 0
#define VARIANTS(X)                  \
  X(0, 64, 128, 64, 4, 1, true, 2)   \
  X(1, 64, 128, 64, 4, 1, false, 3)  \
  X(4, 64, 128, 128, 4, 1, false, 2) \
  X(5, 64, 128, 128, 4, 2, false, 2)
#else
#define VARIANTS(X) X(9, 128, 128, 64, 4, 1, false, 2)
#endif

extern "C" int tile_info(int v, int *d, int *bq, int *bk, int *pv_group, int *smem) {
#define INFO(ID, D, BQ, BK, W, S, QR, MB)                 \
  if (v == ID) {                                          \
    using C = sc::AttnCfg<D, BQ, BK, W, S, QR, MB>;      \
    *d = D; *bq = BQ; *bk = BK; *pv_group = C::kWM; *smem = C::kSmemBytes; \
    return 1;                                             \
  }
  VARIANTS(INFO)
#undef INFO
  return 0;
}

// Returns a cudaError_t (0 = launched), -1 for an unknown variant.
extern "C" int tile_run(int v, const void *q, const void *k, const void *vv, void *out, const unsigned char *mask,
                        int B, int H, int L, int causal, void *stream) {
#define RUN(ID, D, BQ, BK, W, S, QR, MB)                                                            \
  if (v == ID) {                                                                                     \
    using C = sc::AttnCfg<D, BQ, BK, W, S, QR, MB>;                                                 \
    sc::AttnParams p{};                                                                              \
    const int nq = (L + BQ - 1) / BQ, nk = (L + BK - 1) / BK;                                       \
    p.q = q; p.k = k; p.v = vv; p.out = out; p.mask = mask;                                          \
    p.q_sb = p.k_sb = p.v_sb = p.o_sb = (int64_t)H * L * D;                                        \
    p.q_sh = p.k_sh = p.v_sh = p.o_sh = (int64_t)L * D;                                            \
    p.q_sl = p.k_sl = p.v_sl = p.o_sl = D;                                                          \
    p.m_sb = (int64_t)H * nq * nk; p.m_sh = (int64_t)nq * nk; p.m_si = nk; p.m_sj = 1;             \
    p.B = B; p.Hq = H; p.rep = 1; p.Lq = L; p.Lk = L; p.causal_off = 0; p.nq = nq; p.nk = nk;       \
    p.causal = causal; p.scale_log2 = 1.4426950408889634f / sqrtf((float)D);                       \
    return (int)sc::launch_cfg<__nv_bfloat16, C>(p, (unsigned)(nq * B * H), (cudaStream_t)stream); \
  }
  VARIANTS(RUN)
#undef RUN
  return -1;
}
