// bindings.cpp — the pybind11 module sparge._C: marshalling only.
//
// Tensors arrive as plain tuples (data_ptr, dtype code, device type, device id,
// shape, strides) built by sparge/_lib.py, or None for an optional tensor; the
// module never sees torch objects, so it builds without torch and serves every
// torch version. Every call returns the C status code; sparge/_lib.py turns a
// non-zero status into a Python exception with sparge_last_error().
//
// Every parameter has a name (py::arg): tensors are positional, the scalars of
// the params structs, the workspace and the stream keyword-only, named after
// the C fields, with a default where the C side has a natural one (no causal
// mask, top-k selection, no sink, no workspace, the default stream).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "sparge.h"

namespace py = pybind11;

namespace {

using Desc = std::tuple<uintptr_t, int32_t, int32_t, int32_t, std::vector<int64_t>, std::vector<int64_t>>;
using OptDesc = std::optional<Desc>;

// A descriptor with more dimensions than SPARGE_MAX_NDIM keeps its rank so the
// C layer rejects it with a message naming the argument.
sparge_tensor_t to_tensor(const Desc &d) {
  sparge_tensor_t t{};
  t.data = reinterpret_cast<void *>(std::get<0>(d));
  t.dtype = std::get<1>(d);
  t.device_type = std::get<2>(d);
  t.device_id = std::get<3>(d);
  const auto &shape = std::get<4>(d);
  const auto &strides = std::get<5>(d);
  t.ndim = static_cast<int32_t>(shape.size());
  for (size_t i = 0; i < shape.size() && i < SPARGE_MAX_NDIM; ++i) t.shape[i] = shape[i];
  for (size_t i = 0; i < strides.size() && i < SPARGE_MAX_NDIM; ++i) t.strides[i] = strides[i];
  if (strides.size() != shape.size()) t.ndim = -1;  // malformed: C reports INVALID_VALUE
  return t;
}

// Holds an optional descriptor and hands out a pointer or NULL.
struct Opt {
  sparge_tensor_t t{};
  bool present = false;
  explicit Opt(const OptDesc &d) {
    if (d) {
      t = to_tensor(*d);
      present = true;
    }
  }
  const sparge_tensor_t *get() const { return present ? &t : nullptr; }
};

sparge_predict_params_t predict_params(float scale, int32_t causal, int32_t select_mode, int32_t sink,
                                       int32_t block_q, int32_t block_k) {
  sparge_predict_params_t p{};
  p.struct_size = sizeof(p);
  p.scale = scale;
  p.causal = causal;
  p.select_mode = select_mode;
  p.attention_sink = sink;
  p.block_q = block_q;
  p.block_k = block_k;
  return p;
}

sparge_attn_params_t attn_params(float scale, int32_t causal, int32_t precision, int32_t block_q,
                                 int32_t block_k, int32_t pv_group) {
  sparge_attn_params_t p{};
  p.struct_size = sizeof(p);
  p.scale = scale;
  p.causal = causal;
  p.precision = precision;
  p.block_q = block_q;
  p.block_k = block_k;
  p.pv_group = pv_group;
  return p;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "sparge C ABI bindings (marshalling only; see csrc/include/sparge.h)";

  m.def("abi_version", &sparge_abi_version);
  m.def("version", []() { return std::string(sparge_version_string()); });
  m.def("last_error", []() { return std::string(sparge_last_error()); });
  m.def(
      "status_string",
      [](int32_t s) { return std::string(sparge_status_string(static_cast<sparge_status_t>(s))); },
      py::arg("status"));
  m.def("cuda_compiled", &sparge_cuda_compiled);
  m.def(
      "device_supported",
      [](int32_t device_type, int32_t device_id) {
        return static_cast<int>(sparge_device_supported(device_type, device_id));
      },
      py::arg("device_type"), py::arg("device_id") = 0);

  m.def("block_shape", [](int32_t device_type, int32_t device_id, int64_t head_dim, int64_t head_dim_v,
                          int32_t dtype, int32_t precision) {
    int32_t bq = 0, bk = 0, group = 0, prec = 0;
    sparge_status_t s = sparge_block_shape(device_type, device_id, head_dim, head_dim_v, dtype, precision,
                                           &bq, &bk, &group, &prec);
    return std::make_tuple(static_cast<int>(s), bq, bk, group, prec);
  }, py::arg("device_type"), py::arg("device_id"), py::arg("head_dim"), py::arg("head_dim_v"), py::arg("dtype"),
     py::arg("precision") = 0);

  m.def("predict_workspace_size", [](const Desc &q, const Desc &k, float scale, int32_t causal,
                                     int32_t select_mode, int32_t sink, int32_t block_q, int32_t block_k) {
    sparge_tensor_t tq = to_tensor(q), tk = to_tensor(k);
    sparge_predict_params_t p = predict_params(scale, causal, select_mode, sink, block_q, block_k);
    size_t bytes = 0;
    sparge_status_t s = sparge_predict_workspace_size(&tq, &tk, &p, &bytes);
    return std::make_tuple(static_cast<int>(s), static_cast<uint64_t>(bytes));
  }, py::arg("q"), py::arg("k"), py::kw_only(), py::arg("scale"), py::arg("causal") = 0, py::arg("select_mode") = 0,
     py::arg("attention_sink") = 0, py::arg("block_q"), py::arg("block_k"));

  m.def("predict", [](const Desc &q, const Desc &k, const Desc &sim_threshold, const Desc &select_param,
                      float scale, int32_t causal, int32_t select_mode, int32_t sink, int32_t block_q,
                      int32_t block_k, const Desc &out_mask, uintptr_t workspace, uint64_t workspace_bytes,
                      uintptr_t stream) {
    sparge_tensor_t tq = to_tensor(q), tk = to_tensor(k), ts = to_tensor(sim_threshold),
                    tp = to_tensor(select_param), tm = to_tensor(out_mask);
    sparge_predict_params_t p = predict_params(scale, causal, select_mode, sink, block_q, block_k);
    py::gil_scoped_release release;
    return static_cast<int>(sparge_predict(&tq, &tk, &ts, &tp, &p, &tm, reinterpret_cast<void *>(workspace),
                                           static_cast<size_t>(workspace_bytes),
                                           reinterpret_cast<void *>(stream)));
  }, py::arg("q"), py::arg("k"), py::arg("sim_threshold"), py::arg("select_param"), py::kw_only(), py::arg("scale"),
     py::arg("causal") = 0, py::arg("select_mode") = 0, py::arg("attention_sink") = 0, py::arg("block_q"),
     py::arg("block_k"), py::arg("out_mask"), py::arg("workspace") = 0, py::arg("workspace_bytes") = 0,
     py::arg("stream") = 0);

  m.def("attn_workspace_size", [](const Desc &q, const Desc &k, const Desc &v, float scale, int32_t causal,
                                  int32_t precision, int32_t block_q, int32_t block_k, int32_t pv_group) {
    sparge_tensor_t tq = to_tensor(q), tk = to_tensor(k), tv = to_tensor(v);
    sparge_attn_params_t p = attn_params(scale, causal, precision, block_q, block_k, pv_group);
    size_t bytes = 0;
    sparge_status_t s = sparge_attn_workspace_size(&tq, &tk, &tv, &p, &bytes);
    return std::make_tuple(static_cast<int>(s), static_cast<uint64_t>(bytes));
  }, py::arg("q"), py::arg("k"), py::arg("v"), py::kw_only(), py::arg("scale"), py::arg("causal") = 0,
     py::arg("precision") = 0, py::arg("block_q"), py::arg("block_k"), py::arg("pv_group"));

  m.def("block_sparse_attn", [](const Desc &q, const Desc &k, const Desc &v, const Desc &block_mask,
                                const OptDesc &key_padding, const OptDesc &pv_threshold, float scale,
                                int32_t causal, int32_t precision, int32_t block_q, int32_t block_k,
                                int32_t pv_group, const Desc &out, const OptDesc &out_lse,
                                const OptDesc &out_stats, uintptr_t workspace, uint64_t workspace_bytes,
                                uintptr_t stream) {
    sparge_tensor_t tq = to_tensor(q), tk = to_tensor(k), tv = to_tensor(v), tm = to_tensor(block_mask),
                    to = to_tensor(out);
    Opt kp(key_padding), pv(pv_threshold), lse(out_lse), st(out_stats);
    sparge_attn_params_t p = attn_params(scale, causal, precision, block_q, block_k, pv_group);
    py::gil_scoped_release release;
    return static_cast<int>(sparge_block_sparse_attn(&tq, &tk, &tv, &tm, kp.get(), pv.get(), &p, &to, lse.get(),
                                                     st.get(), reinterpret_cast<void *>(workspace),
                                                     static_cast<size_t>(workspace_bytes),
                                                     reinterpret_cast<void *>(stream)));
  }, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("block_mask"), py::kw_only(),
     py::arg("key_padding") = py::none(), py::arg("pv_threshold") = py::none(), py::arg("scale"),
     py::arg("causal") = 0, py::arg("precision") = 0, py::arg("block_q"), py::arg("block_k"), py::arg("pv_group"),
     py::arg("out"), py::arg("out_lse") = py::none(), py::arg("out_stats") = py::none(), py::arg("workspace") = 0,
     py::arg("workspace_bytes") = 0, py::arg("stream") = 0);

  m.attr("SPARGE_ABI_VERSION") = SPARGE_ABI_VERSION;
  m.attr("NUM_STATS") = SPARGE_NUM_STATS;
}
