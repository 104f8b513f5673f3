// predict_flows.cu — experiment (not part of the build): csrc/cuda/predict.cu
// compiled whole with a plain C entry point (bf16 q/k, per-head parameters),
// for benchmarks/kernels/bench_tiles.py --predict. Build one library per
// variant of predict.cu under test (e.g. the tree of commit a3ffdf4 with its
// benchmarks/kernels/predict_fused.patch applied, see NOTES.md, or with a -D
// knob added for the experiment) and pass each with
// --predict; the first is the baseline whose masks the others must equal.
//   nvcc -std=c++17 -O3 --expt-relaxed-constexpr -shared -Xcompiler -fPIC \
//        -gencode arch=compute_90a,code=sm_90a -Icsrc/include -Icsrc -DSPARGE_WITH_CUDA \
//        benchmarks/kernels/predict_flows.cu -o predict_base.so
#include <cstdarg>
#include <cstdio>

#include "cuda/predict.cu"

extern "C" sparge_status_t sparge_set_error(sparge_status_t status, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vfprintf(stderr, fmt, ap);
  va_end(ap);
  fputc('\n', stderr);
  return status;
}

static sparge_tensor_t tensor(void *data, int dtype, int ndim, const int64_t *shape) {
  sparge_tensor_t t{};
  t.data = data;
  t.dtype = dtype;
  t.device_type = SPARGE_DEVICE_CUDA;
  t.ndim = ndim;
  int64_t s = 1;
  for (int i = ndim - 1; i >= 0; --i) {
    t.shape[i] = shape[i];
    t.strides[i] = s;
    s *= shape[i];
  }
  return t;
}

static sparge_dims_t dims(int B, int Hq, int Hkv, int L, int D, int BQ, int BK) {
  sparge_dims_t d{};
  d.B = B; d.Hq = Hq; d.Hkv = Hkv; d.Lq = L; d.Lk = L; d.D = D; d.Dv = D;
  d.nq = (L + BQ - 1) / BQ;
  d.nk = (L + BK - 1) / BK;
  return d;
}

extern "C" size_t flow_workspace(int B, int Hq, int Hkv, int L, int D, int BQ, int BK) {
  const sparge_dims_t d = dims(B, Hq, Hkv, L, D, BQ, BK);
  return ws_layout(&d).total;
}

// q [B, Hq, L, D], k [B, Hkv, L, D] bf16 contiguous; theta, selp [Hq] fp32;
// mask [B, Hq, nq, nk] uint8. Returns a sparge status.
extern "C" int predict_flow(void *q, void *k, int B, int Hq, int Hkv, int L, int D, int BQ,
                            int BK, int causal, int topk, void *theta, void *selp, void *mask, void *ws,
                            void *stream) {
  const sparge_dims_t d = dims(B, Hq, Hkv, L, D, BQ, BK);
  const int64_t qs[4] = {B, Hq, L, D}, ks[4] = {B, Hkv, L, D}, hs[1] = {Hq}, ms[4] = {B, Hq, d.nq, d.nk};
  const sparge_tensor_t tq = tensor(q, SPARGE_DTYPE_BFLOAT16, 4, qs), tk = tensor(k, SPARGE_DTYPE_BFLOAT16, 4, ks);
  const sparge_tensor_t tt = tensor(theta, SPARGE_DTYPE_FLOAT32, 1, hs), tsel = tensor(selp, SPARGE_DTYPE_FLOAT32, 1, hs);
  const sparge_tensor_t tm = tensor(mask, SPARGE_DTYPE_BOOL, 4, ms);
  sparge_predict_params_t p{};
  p.struct_size = sizeof(p);
  p.scale = 1.0f / sqrtf((float)D);
  p.causal = causal;
  p.select_mode = topk ? SPARGE_SELECT_TOPK : SPARGE_SELECT_CDF;
  p.attention_sink = 0;
  p.block_q = BQ;
  p.block_k = BK;
  return (int)sparge_cuda_predict(&d, &tq, &tk, &tt, &tsel, &p, &tm, ws, stream);
}
