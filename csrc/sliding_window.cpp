// Dispatcher entry of the mmtransnext sliding-window attention op: operator schemas,
// argument checks shared by the CPU and CUDA kernels, and the Python module stub that
// lets `import mmtransnext._C` load this library (which runs the registrations).
#include "sliding_window.h"

#include <Python.h>

#include <c10/util/Exception.h>
#include <torch/library.h>

#include <string>

namespace mmtransnext {
namespace {

bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void check_geometry(int64_t height, int64_t width, int64_t window_size) {
  TORCH_CHECK(window_size > 0 && window_size % 2 == 1,
              "sliding_window: window_size must be odd and positive, got ", window_size);
  TORCH_CHECK(height > 0 && width > 0,
              "sliding_window: height and width must be positive, got height=", height,
              ", width=", width);
}

void check_4d(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4, "sliding_window: ", name,
              " must be 4-D (B, heads, N, C), got shape ", t.sizes());
}

void check_tokens(const at::Tensor& t, const char* name, int64_t height, int64_t width) {
  TORCH_CHECK(t.size(2) == height * width, "sliding_window: ", name, " has N=", t.size(2),
              " tokens but height*width = ", height, "*", width, " = ", height * width);
}

void check_same(const at::Tensor& ref, const char* ref_name, const at::Tensor& t,
                const char* name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "sliding_window: ", name,
              " has dtype ", t.scalar_type(), " but ", ref_name, " has dtype ",
              ref.scalar_type(), " (all inputs must share one dtype)");
  TORCH_CHECK(t.device() == ref.device(), "sliding_window: ", name, " is on ", t.device(),
              " but ", ref_name, " is on ", ref.device(),
              " (all inputs must be on one device)");
}

void check_dtype(const at::Tensor& t, const char* name) {
  TORCH_CHECK(supported_dtype(t.scalar_type()), "sliding_window: unsupported dtype ",
              t.scalar_type(), " for ", name,
              " (supported: float32, float64, float16, bfloat16)");
}

void check_shape(const at::Tensor& t, const char* name, at::IntArrayRef expected) {
  TORCH_CHECK(t.sizes() == expected, "sliding_window: ", name, " must have shape ",
              expected, ", got ", t.sizes());
}

// What the logits op and its backward both require of query and key.
void check_query_key(const at::Tensor& query, const at::Tensor& key, int64_t height,
                     int64_t width, int64_t window_size) {
  check_geometry(height, width, window_size);
  check_4d(query, "query");
  check_4d(key, "key");
  check_dtype(query, "query");
  check_same(query, "query", key, "key");
  check_tokens(query, "query", height, width);
  check_shape(key, "key", query.sizes());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> check_logits_args(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& bias,
    int64_t height, int64_t width, int64_t window_size) {
  check_query_key(query, key, height, width, window_size);
  check_same(query, "query", bias, "bias");
  check_shape(bias, "bias", {query.size(1), window_size * window_size});
  return {query.contiguous(), key.contiguous(), bias.contiguous()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> check_logits_backward_args(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
    int64_t height, int64_t width, int64_t window_size) {
  check_query_key(query, key, height, width, window_size);
  check_same(query, "query", grad_out, "grad_out");
  check_shape(grad_out, "grad_out",
              {query.size(0), query.size(1), query.size(2), window_size * window_size});
  return {grad_out.contiguous(), query.contiguous(), key.contiguous()};
}

std::tuple<at::Tensor, at::Tensor> check_aggregate_args(
    const at::Tensor& weights, const at::Tensor& value,
    int64_t height, int64_t width, int64_t window_size) {
  check_geometry(height, width, window_size);
  check_4d(weights, "weights");
  check_4d(value, "value");
  check_dtype(value, "value");
  check_same(value, "value", weights, "weights");
  check_tokens(value, "value", height, width);
  const int64_t L = window_size * window_size;
  check_shape(weights, "weights", {value.size(0), value.size(1), value.size(2), L});
  return {weights.contiguous(), value.contiguous()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> check_aggregate_backward_args(
    const at::Tensor& grad_out, const at::Tensor& weights, const at::Tensor& value,
    int64_t height, int64_t width, int64_t window_size) {
  auto [w, v] = check_aggregate_args(weights, value, height, width, window_size);
  check_same(value, "value", grad_out, "grad_out");
  check_shape(grad_out, "grad_out", value.sizes());
  return {grad_out.contiguous(), w, v};
}

// ---------------------------------------------------------------------------------------
// Band kernels.
namespace {

void check_float(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op,
              ": unsupported dtype ", t.scalar_type(), " for ", name,
              " (supported: float32, float64)");
}

void check_like(const at::Tensor& ref, const char* ref_name, const at::Tensor& t,
                const char* name, const char* op) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ",
              t.scalar_type(), " but ", ref_name, " has dtype ", ref.scalar_type(),
              " (they must match)");
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ",
              ref_name, " is on ", ref.device(), " (all inputs must be on one device)");
}

void check_dim(const at::Tensor& t, int64_t dim, const char* op, const char* name,
               const char* layout) {
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must be ", dim, "-D ", layout,
              ", got shape ", t.sizes());
}

// col_index (W, Wp, 4) int64 and col_weight of the same shape and of `dtype_ref`'s dtype.
void check_taps(const at::Tensor& col_index, const at::Tensor& col_weight,
                const at::Tensor& dtype_ref, const char* ref_name, const char* op) {
  check_dim(col_index, 3, op, "col_index", "(W, Wp, 4)");
  TORCH_CHECK(col_index.size(2) == 4, op, ": col_index must have 4 taps in its last dim, got shape ",
              col_index.sizes());
  TORCH_CHECK(col_index.scalar_type() == at::kLong, op, ": col_index must be int64, got ",
              col_index.scalar_type());
  TORCH_CHECK(col_index.device() == dtype_ref.device(), op, ": col_index is on ",
              col_index.device(), " but ", ref_name, " is on ", dtype_ref.device(),
              " (all inputs must be on one device)");
  TORCH_CHECK(col_weight.sizes() == col_index.sizes(), op, ": col_weight has shape ",
              col_weight.sizes(), " but col_index has shape ", col_index.sizes(),
              " (they must match)");
  check_like(dtype_ref, ref_name, col_weight, "col_weight", op);
  TORCH_CHECK(col_index.size(0) > 0 && col_index.size(1) > 0, op,
              ": col_index must have W > 0 and Wp > 0, got shape ", col_index.sizes());
}

void check_row_stats(const at::Tensor& t, const at::Tensor& logits, const char* name,
                     const char* logits_name, const char* op) {
  check_dim(t, 3, op, name, "(B, heads, M)");
  check_like(logits, logits_name, t, name, op);
  TORCH_CHECK(t.size(0) == logits.size(0) && t.size(1) == logits.size(1) &&
                  t.size(2) == logits.size(2),
              op, ": ", name, " must have shape (B, heads, M) = ",
              logits.sizes().slice(0, 3), " to match ", logits_name, ", got ", t.sizes());
}

}  // namespace

std::tuple<BandGeometry, at::Tensor, at::Tensor, at::Tensor> check_bias_softmax_args(
    const at::Tensor& logits, const at::Tensor& by_rows, const at::Tensor& col_index,
    const at::Tensor& col_weight, int64_t row_start,
    const OptionalTensor& row_shift) {
  const char* op = "bias_softmax_";
  check_dim(logits, 4, op, "logits", "(B, heads, M, P)");
  check_float(logits, op, "logits");
  TORCH_CHECK(logits.is_contiguous(), op,
              ": logits must be contiguous (it is written in place), got strides ",
              logits.strides());
  check_dim(by_rows, 4, op, "by_rows", "(heads, H, Hp, Uw)");
  check_like(logits, "logits", by_rows, "by_rows", op);
  check_taps(col_index, col_weight, logits, "logits", op);
  BandGeometry g{logits.size(0), logits.size(1), logits.size(2), logits.size(3),
                 by_rows.size(1), by_rows.size(2), by_rows.size(3),
                 col_index.size(0), col_index.size(1)};
  TORCH_CHECK(by_rows.size(0) == g.heads, op, ": by_rows has ", by_rows.size(0),
              " heads but logits has ", g.heads);
  TORCH_CHECK(g.uw > 0, op, ": by_rows must have Uw > 0, got shape ", by_rows.sizes());
  TORCH_CHECK(g.m % g.w == 0, op, ": logits has M=", g.m,
              " query rows, not a multiple of W=", g.w, " (col_index.size(0))");
  TORCH_CHECK(g.p == g.hp * g.wp, op, ": logits has P=", g.p, " keys but by_rows gives Hp=",
              g.hp, " and col_index Wp=", g.wp, " (Hp*Wp = ", g.hp * g.wp, ")");
  TORCH_CHECK(row_start >= 0 && row_start + g.rows() <= g.height, op, ": row_start=",
              row_start, " with ", g.rows(), " rows (M/W) runs past H=", g.height,
              " rows of by_rows");
  if (row_shift.has_value()) {
    check_row_stats(*row_shift, logits, "row_shift", "logits", op);
  }
  return {g, by_rows.contiguous(), col_index.contiguous(), col_weight.contiguous()};
}

void check_softmax_backward_args(const at::Tensor& grad, const at::Tensor& probs,
                                 const at::Tensor& shift, const at::Tensor& grad_lse) {
  const char* op = "softmax_backward_";
  check_dim(grad, 4, op, "grad", "(B, heads, M, P)");
  check_float(grad, op, "grad");
  TORCH_CHECK(grad.is_contiguous(), op,
              ": grad must be contiguous (it is written in place), got strides ",
              grad.strides());
  check_like(grad, "grad", probs, "probs", op);
  TORCH_CHECK(probs.sizes() == grad.sizes(), op, ": probs has shape ", probs.sizes(),
              " but grad has shape ", grad.sizes(), " (they must match)");
  TORCH_CHECK(probs.is_contiguous(), op, ": probs must be contiguous, got strides ",
              probs.strides());
  check_row_stats(shift, grad, "shift", "grad", op);
  check_row_stats(grad_lse, grad, "grad_lse", "grad", op);
}

std::tuple<BandGeometry, at::Tensor, at::Tensor, at::Tensor> check_bias_rows_backward_args(
    const at::Tensor& grad_bias, const at::Tensor& col_index, const at::Tensor& col_weight,
    int64_t uw) {
  const char* op = "bias_rows_backward";
  check_dim(grad_bias, 3, op, "grad_bias", "(heads, M, P)");
  check_float(grad_bias, op, "grad_bias");
  check_taps(col_index, col_weight, grad_bias, "grad_bias", op);
  TORCH_CHECK(uw > 0, op, ": uw must be positive, got ", uw);
  const int64_t m = grad_bias.size(1), p = grad_bias.size(2);
  const int64_t w = col_index.size(0), wp = col_index.size(1);
  TORCH_CHECK(m % w == 0, op, ": grad_bias has M=", m, " query rows, not a multiple of W=",
              w, " (col_index.size(0))");
  TORCH_CHECK(p % wp == 0, op, ": grad_bias has P=", p, " keys, not a multiple of Wp=", wp,
              " (col_index.size(1))");
  BandGeometry g{1, grad_bias.size(0), m, p, m / w, p / wp, uw, w, wp};
  return {g, grad_bias.contiguous(), col_index.contiguous(), col_weight.contiguous()};
}

}  // namespace mmtransnext

// height and width are SymInt so that torch.compile / torch.export keep a map's size
// symbolic (one graph for every input size); the kernels receive them as int64_t.
TORCH_LIBRARY(mmtransnext, m) {
  m.def(
      "sliding_window_logits(Tensor query, Tensor key, Tensor bias, SymInt height, "
      "SymInt width, int window_size) -> Tensor");
  m.def(
      "sliding_window_logits_backward(Tensor grad_out, Tensor query, Tensor key, "
      "SymInt height, SymInt width, int window_size) -> (Tensor, Tensor, Tensor)");
  m.def(
      "sliding_window_aggregate(Tensor weights, Tensor value, SymInt height, "
      "SymInt width, int window_size) -> Tensor");
  m.def(
      "sliding_window_aggregate_backward(Tensor grad_out, Tensor weights, Tensor value, "
      "SymInt height, SymInt width, int window_size) -> (Tensor, Tensor)");
  // Band kernels of banded bias attention (csrc/cpu/band_softmax_cpu.cpp).
  m.def(
      "bias_softmax_(Tensor(a!) logits, Tensor by_rows, Tensor col_index, Tensor col_weight, "
      "int row_start, Tensor? row_shift) -> (Tensor, Tensor)");
  m.def("softmax_backward_(Tensor(a!) grad, Tensor probs, Tensor shift, Tensor grad_lse) -> ()");
  m.def(
      "bias_rows_backward(Tensor grad_bias, Tensor col_index, Tensor col_weight, int uw) "
      "-> Tensor");
}

// `import mmtransnext._C` only needs the library loaded (the static registrations
// above run at load time); the module itself is empty.
static PyModuleDef mmtransnext_c_module = {PyModuleDef_HEAD_INIT, "_C",
                                           "mmtransnext compiled ops (torch.ops.mmtransnext)",
                                           -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&mmtransnext_c_module); }
