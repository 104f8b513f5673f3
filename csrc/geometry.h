/* geometry.h — the block and causal geometry of SPEC §1-2, one copy of each
 * rule for the C backend (csrc/cpu/) and the CUDA kernels (host and device
 * code). The executable form is sparge/reference.py: last_visible_key,
 * visible_keys, allowed_blocks and _diagonal_blocks; each helper below names
 * the function it mirrors.
 *
 * Vocabulary: a query row r (0 <= r < Lq) sees key c (0 <= c < Lk) iff
 * c <= last_visible_key(r). Without causal masking that is Lk - 1 for every
 * row; with it, min(r + off, Lk - 1), where the causal offset off is 0 for
 * top-left alignment and Lk - Lq for bottom-right. A value < 0 means the row
 * sees no key. Blocks: q-block i holds rows [i*BQ, min((i+1)*BQ, Lq)), k-block
 * j keys [j*BK, min((j+1)*BK, Lk)); nq = ceil(Lq/BQ), nk = ceil(Lk/BK).
 *
 * Integer width: in C every index is int64_t (the CPU backend and the
 * prediction kernels index with it). In C++ (the CUDA code) each helper is a
 * template on the index type, deduced from the arguments, so the attention
 * kernels keep their 32-bit arithmetic (the host guarantees their indices fit)
 * and inline to the instructions they had when the rules were written out in
 * place; mixed argument types do not deduce, so a caller states the width
 * (helper<int64_t>(...)) instead of getting a silent conversion.
 */
#ifndef SPARGE_GEOMETRY_H_
#define SPARGE_GEOMETRY_H_

#include <stdint.h>

#include "sparge.h"

#ifdef __CUDACC__
#define SPARGE_HD __host__ __device__
#else
#define SPARGE_HD
#endif

#ifdef __cplusplus
#define SPARGE_GEOM_FN(ret) template <typename sparge_index_t> SPARGE_HD static inline ret
#else
typedef int64_t sparge_index_t;
#define SPARGE_GEOM_FN(ret) static inline ret
#endif

/* The causal offset off (row r sees keys c <= r + off) of a causal mode
 * (sparge_causal_t): 0 for top-left alignment, Lk - Lq for bottom-right
 * (reference last_visible_key). 0 when causal masking is off (unused then). */
SPARGE_GEOM_FN(sparge_index_t)
sparge_causal_offset(int32_t causal, sparge_index_t Lq, sparge_index_t Lk) {
  return causal == SPARGE_CAUSAL_BOTTOM_RIGHT ? Lk - Lq : (sparge_index_t)0;
}

/* Rows (keys) of block i when a sequence of length L is cut into blocks of
 * `block`: `block`, except for the last block, which may be shorter. */
SPARGE_GEOM_FN(sparge_index_t)
sparge_block_len(sparge_index_t i, sparge_index_t block, sparge_index_t L) {
  const sparge_index_t rest = L - i * block;
  return rest < block ? rest : block;
}

/* The last key that query row `row` sees; < 0: none (reference
 * last_visible_key). `causal` is nonzero when causal masking is on. */
SPARGE_GEOM_FN(sparge_index_t)
sparge_last_visible_key(int causal, sparge_index_t row, sparge_index_t off, sparge_index_t Lk) {
  if (!causal) return Lk - 1;
  const sparge_index_t e = row + off;
  return e < Lk - 1 ? e : Lk - 1;
}

/* The first row that sees key `key` under causal masking: row r sees key c
 * iff r >= c - off (reference visible_keys). May be < 0 or >= Lq. */
SPARGE_GEOM_FN(sparge_index_t)
sparge_first_row_seeing(sparge_index_t key, sparge_index_t off) {
  return key - off;
}

/* Causally allowed k-blocks of a q-block: [0, n). e_last is the last visible
 * key of the q-block's last valid row (its largest one): block j is allowed
 * iff j*BK <= e_last (reference allowed_blocks). e_last <= Lk - 1, so n <= nk;
 * without causal masking e_last = Lk - 1 and n = nk. */
SPARGE_GEOM_FN(sparge_index_t)
sparge_allowed_blocks(sparge_index_t e_last, sparge_index_t bk) {
  return e_last < 0 ? (sparge_index_t)0 : e_last / bk + 1;
}

/* First k-block of a causal q-block's diagonal range, the blocks that hold
 * the last visible key of one of its rows and are always kept (reference
 * _diagonal_blocks). The range is [first, n_allowed - 1] and is empty when
 * n_allowed == 0 or causal masking is off. e_first is the last visible key
 * of the q-block's first row; when it is < 0 the first rows see nothing and
 * the first row that sees something has key 0 as its last. */
SPARGE_GEOM_FN(sparge_index_t)
sparge_diagonal_first(sparge_index_t e_first, sparge_index_t bk) {
  return (e_first < 0 ? (sparge_index_t)0 : e_first) / bk;
}

/* Whether a k-block whose last key is key_last crosses the causal boundary of
 * a tile of query rows starting at row_first, i.e. needs element masking:
 * the first row (it sees the fewest keys) does not see key_last. Otherwise
 * every row of the tile sees every key of the block (reference visible_keys).
 * key_last may lie past Lk - 1 (the end of the sequence is masked apart). */
SPARGE_GEOM_FN(int)
sparge_causal_block_partial(sparge_index_t row_first, sparge_index_t off, sparge_index_t key_last) {
  return row_first + off < key_last;
}

#undef SPARGE_GEOM_FN

#endif /* SPARGE_GEOMETRY_H_ */
