/* tile_config.h — block shapes per backend, and why. Python reads them through
 * sparge_block_shape(); nothing else hard-codes them. */
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

#endif /* SPARGE_TILE_CONFIG_H_ */
