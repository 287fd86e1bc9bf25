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

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> check_logits_args(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& bias,
    int64_t height, int64_t width, int64_t window_size) {
  check_geometry(height, width, window_size);
  check_4d(query, "query");
  check_4d(key, "key");
  check_dtype(query, "query");
  check_same(query, "query", key, "key");
  check_same(query, "query", bias, "bias");
  check_tokens(query, "query", height, width);
  check_shape(key, "key", query.sizes());
  const int64_t L = window_size * window_size;
  check_shape(bias, "bias", {query.size(1), L});
  return {query.contiguous(), key.contiguous(), bias.contiguous()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> check_logits_backward_args(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
    int64_t height, int64_t width, int64_t window_size) {
  check_geometry(height, width, window_size);
  check_4d(query, "query");
  check_4d(key, "key");
  check_dtype(query, "query");
  check_same(query, "query", key, "key");
  check_same(query, "query", grad_out, "grad_out");
  check_tokens(query, "query", height, width);
  check_shape(key, "key", query.sizes());
  const int64_t L = window_size * window_size;
  check_shape(grad_out, "grad_out", {query.size(0), query.size(1), query.size(2), L});
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

}  // namespace mmtransnext

TORCH_LIBRARY(mmtransnext, m) {
  m.def(
      "sliding_window_logits(Tensor query, Tensor key, Tensor bias, int height, "
      "int width, int window_size) -> Tensor");
  m.def(
      "sliding_window_logits_backward(Tensor grad_out, Tensor query, Tensor key, "
      "int height, int width, int window_size) -> (Tensor, Tensor, Tensor)");
  m.def(
      "sliding_window_aggregate(Tensor weights, Tensor value, int height, int width, "
      "int window_size) -> Tensor");
  m.def(
      "sliding_window_aggregate_backward(Tensor grad_out, Tensor weights, Tensor value, "
      "int height, int width, int window_size) -> (Tensor, Tensor)");
}

// `import mmtransnext._C` only needs the library loaded (the static registrations
// above run at load time); the module itself is empty.
static PyModuleDef mmtransnext_c_module = {PyModuleDef_HEAD_INIT, "_C",
                                           "mmtransnext compiled ops (torch.ops.mmtransnext)",
                                           -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&mmtransnext_c_module); }
