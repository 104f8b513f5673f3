/* tile_config.h — block shapes per backend and kernel family, and why: the one
 * place to read every tile. Python reads them through sparge_block_shape()
 * (CPU: the macros below; CUDA: the kernel registry, csrc/cuda/registry.cu,
 * whose rows take their tiles from the C++ part below); nothing else
 * hard-codes them. */
#ifndef SPARGE_TILE_CONFIG_H_
#define SPARGE_TILE_CONFIG_H_

/* CPU backend.
 * BQ = 128: each K/V tile is converted to fp32 (and K transposed) once per
 *   q-block, so 128 query rows amortize that copy over 128x the FMAs.
 * BK = 64: the transposed K tile (D x 64 floats) and the 128 x 64 score tile
 *   stay in L1/L2 for D <= 256 while the micro-kernels stream over them.
 * PV group = 16: the rows of one GPU warp's MMA tile, so that CPU and GPU make
 *   the same PV-skip decisions for the same mask.
 * Limits: blocks up to 512 rows/keys, head dims up to 1024 (scratch sizes). */
#define SPARGE_CPU_BLOCK_Q 128
#define SPARGE_CPU_BLOCK_K 64
#define SPARGE_CPU_PV_GROUP 16
#define SPARGE_CPU_MAX_BLOCK 512
#define SPARGE_CPU_MAX_HEAD_DIM 1024

#ifdef __cplusplus
// ---------------------------------------------------------------------------
// CUDA, sm80 kernel family (csrc/cuda/attn_sm80.cuh: mma.sync, sm80 and newer)
// ---------------------------------------------------------------------------
//   D    BQ   BK  warps  rows/warp   K/V     Q in    smem     regs      CTAs/SM
//                        =pv_group  stages  regs    bytes    sm80/90a  (H100)
//   64   128  64    4       32        1      no      37,328   167/168   3
//   96   128  64    4       32        1      no      57,808   234/236   2
//   128  128  64    4       32        1      no      70,096   254/255   2
//   256  128  64    8       16        1      no     136,080   228/231   1
// (registers from ptxas, nvcc 13.0, no spills; smem incl. the 16-byte pad row
//  of D = 96, per-warp slots and row statistics)
// Why:
//  - One CTA per (q-block, q-head, batch). Each warp owns a contiguous run of
//    query rows (rows/warp = the PV-skip row group, reported as pv_group), so
//    the PV-skip decision is one __all_sync per warp and block.
//  - 32 rows per warp (two m16 tiles) use every K/V fragment read from shared
//    memory twice, halving shared-memory traffic per FLOP against 16 rows per
//    warp (FlashAttention-2 does the same). D = 256 cannot hold a 32 x 256 fp32
//    accumulator per warp in registers, so it uses 8 warps x 16 rows.
//  - D = 64: with BK = 64 a Q.K^T + P.V step is only 128 MMAs per warp between
//    two barriers, too little to hide the exp2/rescale work with 2 CTAs/SM
//    (1.23x FlashAttention-2). Re-reading Q from shared memory frees registers
//    (168) for a third CTA per SM, whose warps fill those gaps. Measured on
//    H100 at B=1, H=32, L=16k (FA2 7.02 ms, benchmarks/kernels/bench_tiles.py):
//    BK=64 with Q in registers 8.65 ms; BK=64, Q re-read, 3 CTAs/SM 7.63;
//    BK=128 7.38 (FA2's own D=64 tile); BK=128 with 2 stages 7.17-7.29; 8 warps
//    x 16 rows 8.3-11.5. BK = 128 is 3 % faster dense but halves the mask's
//    resolution along keys: on the built-in video demo (H100, same cdf/sim
//    thresholds) density rose from 0.225 to 0.357 and the end-to-end gain over
//    SDPA fell from 1.20x to 1.08x. Sparsity is the product, so D = 64 keeps
//    BK = 64 (SpargeAttn's granularity) with 3 CTAs/SM.
//  - BK = 64 keys per block (SpargeAttn's granularity) for every D. K/V stages = 1 is
//    FlashAttention-2's schedule: V(j) loads while Q.K(j) runs, K(j+1) while
//    P.V(j) runs, two barriers per block. The kernel also implements 2 stages
//    (K and V double-buffered, loads one block further ahead); on H100 it
//    measured the same speed (within +-2 %) for every D while needing 28-64 KB
//    more shared memory (A100 would drop to 1 CTA/SM, sm86/89 cannot fit
//    D = 128), so 1 stage is the table's choice.
//  - Q fragments are re-read from shared memory every block (as in FA2): the
//    255 registers go to the accumulator and the score tile. (kQInRegs keeps
//    them in registers; no tile of the table uses it now.)
//  - Shared tiles are XOR-swizzled in 16-byte chunks (chunk ^ (row & 7)) when
//    a row has a multiple of 8 chunks (D = 64, 128, 256) and padded by 16 bytes
//    per row otherwise (D = 96, 13 chunks per row); both make every ldmatrix
//    phase (8 rows x 16 bytes) hit 8 distinct bank groups.
//  - D = 256 needs 133 KB: sm80 and sm90 only (sm86/sm89 allow 99 KB per block;
//    the host reports NOT_SUPPORTED there).

namespace sparge_cuda {

// The code of the table: the sm80 kernel's configuration (attn_sm80.cuh
// AttnCfgFor) and through it the registry rows (cuda/registry.cu) read these.
template <int D>
struct AttnTileSm80;
template <>
struct AttnTileSm80<64> {
  static constexpr int kBQ = 128, kBK = 64, kWarps = 4, kStages = 1, kMinBlocks = 3;
  static constexpr bool kQInRegs = false;
};
template <>
struct AttnTileSm80<96> {
  static constexpr int kBQ = 128, kBK = 64, kWarps = 4, kStages = 1, kMinBlocks = 2;
  static constexpr bool kQInRegs = false;
};
template <>
struct AttnTileSm80<128> {
  static constexpr int kBQ = 128, kBK = 64, kWarps = 4, kStages = 1, kMinBlocks = 2;
  static constexpr bool kQInRegs = false;
};
template <>
struct AttnTileSm80<256> {
  static constexpr int kBQ = 128, kBK = 64, kWarps = 8, kStages = 1, kMinBlocks = 1;
  static constexpr bool kQInRegs = false;
};

}  // namespace sparge_cuda

// ---------------------------------------------------------------------------
// CUDA, sm90 kernel family (csrc/cuda/attn_sm90.cuh: wgmma + TMA, sm90a only)
// ---------------------------------------------------------------------------
//   D    BQ   BK  tile N  warpgroups       stages  smem bytes  regs (entry /
//                 (pair)  (1 producer +     (pairs)             producer /
//                          2 consumers)                         consumer)
//   64   128  64   128         3              6       214,312   168 / 40 / 232
//   128  128  64   128         3              3       230,552   168 / 40 / 232
// Why (benchmarks/NOTES.md, "Hopper kernel", H200 lab runs):
//  - BQ x BK = 128 x 64, the sm80 shape: the mask keeps SpargeAttn's 64-key
//    resolution (BK = 128 raised the demo's density from 0.225 to 0.357 at
//    equal thresholds, see the sm80 notes), and prediction is shared with
//    the sm80 kernel unchanged.
//  - The tensor cores still see 128-key tiles: the producer packs any two
//    kept 64-key blocks into one stage (m64n128 Q.K^T, k = 128 P.V). BK = 64
//    tiles ran at 516 dense TFLOPS, pairs at 550 (D = 128, L = 32k).
//  - 2 consumer warpgroups x 64 rows, 1 CTA per SM (setmaxnreg 40 / 232):
//    the O accumulator (64 x D fp32), the score tile (64 x 128 fp32) and P
//    (64 x 128 16-bit) of a warpgroup take ~160 registers per thread.
//  - Stages: as many 128-key pairs as fit 227 KB; the intra-warpgroup
//    pipeline holds one stage while the next is computed, so 2 starve the
//    producer (measured 424 vs 554 TFLOPS at BK = 128). D = 64: 6 stages
//    were 6 % faster than 4.
//  - pv_group = 64: a PV-skip decision is one vote over a consumer
//    warpgroup; skipped blocks still enter the P.V wgmmas with P = 0 (no
//    branch around wgmmas: ptxas serializes them otherwise).
template <int D>
struct AttnTileSm90;
template <>
struct AttnTileSm90<64> {
  static constexpr int kStages = 6;
};
template <>
struct AttnTileSm90<128> {
  static constexpr int kStages = 3;
};
#endif /* __cplusplus */

#endif /* SPARGE_TILE_CONFIG_H_ */
