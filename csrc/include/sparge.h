/*
 * sparge.h — the C ABI of sparge, training-free block-sparse attention.
 *
 * This is the only public header. Everything the Python package (or any other
 * host language) needs goes through the functions below; nothing here depends
 * on PyTorch, pybind11 or the CUDA headers.
 *
 * Conventions
 * -----------
 *  - Every function that can fail returns a sparge_status_t. Results come back
 *    through out_* pointers. On failure sparge_last_error() returns a
 *    thread-local, NUL-terminated text naming the offending argument.
 *  - Nothing throws, prints, aborts or exits. Invalid input is a status.
 *  - Tensors are described by sparge_tensor_t (DLPack meaning: data pointer,
 *    dtype, device, rank, shape and strides counted in elements, int64).
 *    The last dimension of every q/k/v/out tensor must have stride 1; other
 *    strides are free (bhsd and bshd views both work without copies), and a
 *    stride of 0 broadcasts (allowed for masks).
 *  - The caller allocates every output and every workspace. Functions that
 *    launch device work take the stream last (a cudaStream_t as void*; NULL
 *    is the legacy default stream); they are asynchronous with respect to the
 *    host, never synchronize and never allocate device memory. CPU functions
 *    ignore the stream and return when the result is written.
 *  - Parameter structs start with their own size (struct_size) so that fields
 *    can be appended without breaking older callers: set it to sizeof(...).
 *  - Status codes are explicitly numbered and append-only.
 *
 * Shapes (docs/spec.md terms)
 * ----------------------
 *   q    [B, Hq,  Lq, D ]      k [B, Hkv, Lk, D]     v [B, Hkv, Lk, Dv]
 *   out  [B, Hq,  Lq, Dv]      lse [B, Hq, Lq] float32 (natural log)
 *   mask [B, Hq,  nq, nk] bool/uint8, nq = ceil(Lq/BQ), nk = ceil(Lk/BK)
 *   key_padding [B, Lk] bool/uint8 (nonzero = the key takes part)
 *   stats [B, Hq, 4] int64 (see SPARGE_STAT_*)
 *   per-head hyperparameters: [Hq] float32 (a stride of 0 broadcasts one value)
 * Hq % Hkv == 0; q-head h reads kv-head h / (Hq / Hkv).
 *
 * Exact semantics of prediction and attention are stated in docs/spec.md and, in
 * executable form, in sparge/reference.py. The points the SPEC leaves open are
 * fixed here (see sparge_predict and sparge_block_sparse_attn).
 */
#ifndef SPARGE_H_
#define SPARGE_H_

#include <stddef.h>
#include <stdint.h>

#define SPARGE_VERSION_MAJOR 0
#define SPARGE_VERSION_MINOR 1
#define SPARGE_VERSION_PATCH 0
/* Bumped whenever a function signature, struct layout or enum meaning changes
 * incompatibly. The Python loader refuses a library with another value. */
#define SPARGE_ABI_VERSION 1

#if defined(_WIN32)
#define SPARGE_API __declspec(dllexport)
#else
#define SPARGE_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------------ */
/* Status codes (append-only)                                               */
/* ------------------------------------------------------------------------ */
typedef enum sparge_status {
  SPARGE_SUCCESS = 0,
  /* An argument is wrong (shape, dtype, stride, range). Python: ValueError. */
  SPARGE_ERROR_INVALID_VALUE = 1,
  /* Valid, but not on this build or device (head dim, precision, device).
   * Python falls back to torch SDPA with a warning. */
  SPARGE_ERROR_NOT_SUPPORTED = 2,
  /* A pointer or stride is not aligned as a kernel needs. */
  SPARGE_ERROR_MISALIGNED = 3,
  /* A CUDA runtime call or kernel launch failed; the text holds its message. */
  SPARGE_ERROR_CUDA = 4,
  /* A bug in sparge: please report it with the text. */
  SPARGE_ERROR_INTERNAL = 5,
  /* Host scratch memory could not be allocated (CPU backend). */
  SPARGE_ERROR_OUT_OF_MEMORY = 6,
  /* The caller's workspace is smaller than the matching *_workspace_size. */
  SPARGE_ERROR_WORKSPACE_TOO_SMALL = 7
} sparge_status_t;

/* ------------------------------------------------------------------------ */
/* Tensor descriptor                                                        */
/* ------------------------------------------------------------------------ */
typedef enum sparge_dtype {
  SPARGE_DTYPE_FLOAT32 = 0,
  SPARGE_DTYPE_FLOAT16 = 1,
  SPARGE_DTYPE_BFLOAT16 = 2,
  SPARGE_DTYPE_BOOL = 3,  /* one byte, 0 or 1 */
  SPARGE_DTYPE_UINT8 = 4, /* one byte, nonzero = true when used as a mask */
  SPARGE_DTYPE_INT32 = 5,
  SPARGE_DTYPE_INT64 = 6
} sparge_dtype_t;

/* Same numbers as DLPack's DLDeviceType. */
typedef enum sparge_device_type {
  SPARGE_DEVICE_CPU = 1,
  SPARGE_DEVICE_CUDA = 2
} sparge_device_type_t;

#define SPARGE_MAX_NDIM 4

typedef struct sparge_tensor {
  void *data;            /* first element (offset already applied) */
  int32_t dtype;         /* sparge_dtype_t */
  int32_t device_type;   /* sparge_device_type_t */
  int32_t device_id;     /* CUDA ordinal; 0 for CPU */
  int32_t ndim;          /* 1..SPARGE_MAX_NDIM */
  int64_t shape[SPARGE_MAX_NDIM];
  int64_t strides[SPARGE_MAX_NDIM]; /* in elements, may be 0 (broadcast) */
} sparge_tensor_t;

/* ------------------------------------------------------------------------ */
/* Options                                                                  */
/* ------------------------------------------------------------------------ */
typedef enum sparge_causal {
  SPARGE_CAUSAL_NONE = 0,
  /* SDPA convention: query i sees keys j <= i. */
  SPARGE_CAUSAL_TOP_LEFT = 1,
  /* FlashAttention convention: query i sees keys j <= i + (Lk - Lq). */
  SPARGE_CAUSAL_BOTTOM_RIGHT = 2
} sparge_causal_t;

typedef enum sparge_select {
  SPARGE_SELECT_TOPK = 0, /* select_param = rho in (0, 1] */
  SPARGE_SELECT_CDF = 1   /* select_param = tau in (0, 1] */
} sparge_select_t;

typedef enum sparge_precision {
  SPARGE_PRECISION_AUTO = 0, /* fastest mode this device and build support */
  SPARGE_PRECISION_FP16 = 1, /* 16-bit operands, fp32 accumulation */
  SPARGE_PRECISION_BF16 = 2,
  SPARGE_PRECISION_INT8 = 3  /* INT8 QK, FP8 PV (SageAttention2-style) */
} sparge_precision_t;

/* Indices into the last dimension of the stats tensor [B, Hq, 4]. */
enum {
  SPARGE_STAT_BLOCKS_ALLOWED = 0, /* (q-block, k-block) pairs not fully causally masked */
  SPARGE_STAT_BLOCKS_KEPT = 1,    /* allowed pairs that the mask keeps (computed) */
  SPARGE_STAT_PV_UNITS = 2,       /* (row group, computed block) pairs */
  SPARGE_STAT_PV_SKIPPED = 3      /* of those, the ones whose exp2 and P.V were skipped */
};
#define SPARGE_NUM_STATS 4

typedef struct sparge_predict_params {
  size_t struct_size;     /* sizeof(sparge_predict_params_t) */
  float scale;            /* softmax scale (natural-log domain, e.g. D^-0.5) */
  int32_t causal;         /* sparge_causal_t */
  int32_t select_mode;    /* sparge_select_t */
  int32_t attention_sink; /* 0/1: keep k-block 0 in every row where allowed */
  int32_t block_q;        /* BQ, from sparge_block_shape (CPU accepts 1..512) */
  int32_t block_k;        /* BK, from sparge_block_shape (CPU accepts 1..512) */
} sparge_predict_params_t;

typedef struct sparge_attn_params {
  size_t struct_size;     /* sizeof(sparge_attn_params_t) */
  float scale;            /* softmax scale (natural-log domain) */
  int32_t causal;         /* sparge_causal_t */
  int32_t precision;      /* sparge_precision_t */
  int32_t block_q;        /* BQ the mask was made for */
  int32_t block_k;        /* BK the mask was made for */
  int32_t pv_group;       /* rows that share one PV-skip decision (a warp's
                             rows on the GPU); 1..block_q */
} sparge_attn_params_t;

/* ------------------------------------------------------------------------ */
/* Library information                                                      */
/* ------------------------------------------------------------------------ */

/* SPARGE_ABI_VERSION of the compiled library. */
SPARGE_API int32_t sparge_abi_version(void);

/* "MAJOR.MINOR.PATCH", static storage. */
SPARGE_API const char *sparge_version_string(void);

/* Detail text of the last failure on the calling thread ("" if none). Valid
 * until the next sparge call on this thread. */
SPARGE_API const char *sparge_last_error(void);

/* Constant name of a status code ("SPARGE_ERROR_INVALID_VALUE", ...). */
SPARGE_API const char *sparge_status_string(sparge_status_t status);

/* 1 if the library was built with the CUDA backend, else 0. */
SPARGE_API int32_t sparge_cuda_compiled(void);

/* SUCCESS if sparge kernels can run on this device, NOT_SUPPORTED otherwise
 * (with the reason in sparge_last_error). */
SPARGE_API sparge_status_t sparge_device_supported(int32_t device_type, int32_t device_id);

/* Block shape and PV-skip row-group size used on a device for a head dim,
 * input dtype and precision. NOT_SUPPORTED when this combination has no kernel
 * (the caller falls back); INVALID_VALUE for nonsense (head_dim < 1, ...).
 * precision AUTO is resolved to the mode the device would run
 * (*out_precision, may be NULL). */
SPARGE_API sparge_status_t sparge_block_shape(int32_t device_type, int32_t device_id,
                                              int64_t head_dim, int64_t head_dim_v,
                                              int32_t dtype, int32_t precision,
                                              int32_t *out_block_q, int32_t *out_block_k,
                                              int32_t *out_pv_group,
                                              int32_t *out_precision);

/* ------------------------------------------------------------------------ */
/* Stage 1 — block prediction                                               */
/* ------------------------------------------------------------------------ */

/* Bytes of workspace sparge_predict needs for these inputs (0 is possible). */
SPARGE_API sparge_status_t sparge_predict_workspace_size(const sparge_tensor_t *q,
                                                         const sparge_tensor_t *k,
                                                         const sparge_predict_params_t *params,
                                                         size_t *out_bytes);

/*
 * Predict the block mask (SPEC §1). Writes every element of out_mask
 * [B, Hq, nq, nk] (bool or uint8) with 1 = compute this block.
 *
 *   q, k           float32/float16/bfloat16, same dtype and device
 *   sim_threshold  [Hq] float32: theta; a block is selective iff sim > theta
 *   select_param   [Hq] float32: rho (TOPK) or tau (CDF), each in (0, 1]
 *
 * Points fixed here beyond SPEC §1:
 *  - All arithmetic in fp32. km, pooled means and similarities use valid rows
 *    only; a block's sim uses eps = 1e-6 in x / max(|x|, eps).
 *  - A k-block is causally invalid for q-block i when no valid row r of the
 *    q-block sees any key of it; such entries (and fix k-blocks) get
 *    S = -inf. A row whose entries are all -inf has P = 0 everywhere.
 *  - Selection only ever picks entries with finite S. Order is P descending,
 *    ties broken by lower k-block index. TOPK keeps the first
 *    min(max(1, ceil(rho * n_allowed)), n_finite) entries. CDF keeps the entry
 *    at sorted position t iff the sum of the entries before it (fp32,
 *    sequential in sorted order) is < tau.
 *  - Forcing is restricted to causally allowed entries. With causal, the
 *    "diagonal" blocks of q-block i are the k-blocks holding the last visible
 *    key of each valid row of the block (rows that see no key add none).
 *  - The key-padding mask is not an input: padded keys take part in the
 *    prediction; attention masks them exactly.
 */
SPARGE_API sparge_status_t sparge_predict(const sparge_tensor_t *q, const sparge_tensor_t *k,
                                          const sparge_tensor_t *sim_threshold,
                                          const sparge_tensor_t *select_param,
                                          const sparge_predict_params_t *params,
                                          const sparge_tensor_t *out_mask,
                                          void *workspace, size_t workspace_bytes,
                                          void *stream);

/* ------------------------------------------------------------------------ */
/* Stage 2 — block-sparse attention forward                                 */
/* ------------------------------------------------------------------------ */

SPARGE_API sparge_status_t sparge_attn_workspace_size(const sparge_tensor_t *q,
                                                      const sparge_tensor_t *k,
                                                      const sparge_tensor_t *v,
                                                      const sparge_attn_params_t *params,
                                                      size_t *out_bytes);

/*
 * Sparse attention forward (SPEC §2): out = softmax(scale * q k^T) v over the
 * kept blocks only, with exact causal / sequence-end / key-padding masking.
 *
 *   q, k, v        float32/float16/bfloat16, one dtype; out the same dtype
 *   block_mask     [B, Hq, nq, nk] bool/uint8, any strides
 *   key_padding    [B, Lk] bool/uint8 or NULL (nonzero = key takes part)
 *   pv_threshold   [Hq] float32 or NULL (PV skip off); lambda >= 0, +inf
 *                  disables it for a head
 *   out            [B, Hq, Lq, Dv], last stride 1
 *   out_lse        [B, Hq, Lq] float32 or NULL; natural-log log-sum-exp of
 *                  the computed scores, -inf for a row that sees no key
 *   out_stats      [B, Hq, 4] int64 or NULL, written (not accumulated)
 *
 * Points fixed here beyond SPEC §2:
 *  - Kept blocks that are entirely causally invalid for the q-block are not
 *    computed and do not count as computed.
 *  - PV skip is decided per group of pv_group consecutive rows of a q-block
 *    (rows past Lq excluded). For each computed block j, with m_r the running
 *    max before the block, the group skips exp2, the row-sum update and P.V
 *    when rowmax_j(s_r) <= m_r - lambda for all its rows (a row with no
 *    visible key in the block has rowmax -inf and always agrees) and none of
 *    its rows has a NaN score in the block (CPU; see SPEC, Not yet built, for
 *    CUDA); m_r is then updated to max(m_r, rowmax_j). A block that raises
 *    the max is never skipped; the first computed block of the q-block never.
 *  - A row that sees no key (all masked or not kept: l == 0) gets out = 0 and
 *    lse -inf; NaN/Inf inputs propagate as SPEC §2 "Non-finite inputs" says.
 */
SPARGE_API sparge_status_t sparge_block_sparse_attn(
    const sparge_tensor_t *q, const sparge_tensor_t *k, const sparge_tensor_t *v,
    const sparge_tensor_t *block_mask, const sparge_tensor_t *key_padding,
    const sparge_tensor_t *pv_threshold, const sparge_attn_params_t *params,
    const sparge_tensor_t *out, const sparge_tensor_t *out_lse,
    const sparge_tensor_t *out_stats, void *workspace, size_t workspace_bytes,
    void *stream);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* SPARGE_H_ */
