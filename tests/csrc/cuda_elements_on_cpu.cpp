// The CUDA kernels' element functors and launchers (csrc/cuda/sliding_window_elements.h)
// built for the host and run as plain loops over CPU tensors, so that
// tests/test_ops_cuda_elements.py checks the CUDA path's arithmetic on machines without
// a GPU. Only the grid-stride loop of the device build is not exercised here.
#include <torch/extension.h>

#include <cuda/sliding_window_elements.h>

namespace {

using namespace mmtransnext::window;

// What for_each_element does on the GPU, one element after the other.
struct HostLoop {
  template <typename Element>
  void operator()(int64_t total, const Element& element) const {
    for (int64_t idx = 0; idx < total; ++idx) element(static_cast<int32_t>(idx));
  }
};

at::Tensor quotients(const at::Tensor& numerators, int64_t divisor) {
  const Divisor by(divisor);
  auto n = numerators.to(at::kLong).contiguous();
  auto out = at::empty_like(n);
  const int64_t* in = n.const_data_ptr<int64_t>();
  int64_t* q = out.mutable_data_ptr<int64_t>();
  for (int64_t i = 0; i < n.numel(); ++i) {
    TORCH_CHECK(in[i] >= 0 && in[i] <= kIndexLimit, "numerator out of range: ", in[i]);
    q[i] = by.quotient(static_cast<int32_t>(in[i]));
  }
  return out;
}

int64_t vector_width(const at::Tensor& t) {
  int64_t vec = 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, t.scalar_type(), "vector_width",
      [&] { vec = pick_vec<scalar_t>(t.size(-1), {t.const_data_ptr()}); });
  return vec;
}

// One 16-byte load of four floats, `offset` values into `t`: the host build's alignment
// check on its own.
double vector_load_sum(const at::Tensor& t, int64_t offset) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && offset >= 0 && offset + 4 <= t.numel(),
              "vector_load_sum: four floats from a float tensor");
  const Pack<float, 4> values = load<float, 4>(t.const_data_ptr<float>() + offset);
  return values.v[0] + values.v[1] + values.v[2] + values.v[3];
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("logits",
        [](const at::Tensor& q, const at::Tensor& k, const at::Tensor& bias, int64_t h,
           int64_t w, int64_t ws, int64_t limit) {
          return logits(q, k, bias, h, w, ws, HostLoop(), limit);
        });
  m.def("logits_backward",
        [](const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, int64_t h,
           int64_t w, int64_t ws, int64_t limit) {
          return logits_backward(grad, q, k, h, w, ws, HostLoop(), limit);
        });
  m.def("aggregate",
        [](const at::Tensor& weights, const at::Tensor& v, int64_t h, int64_t w, int64_t ws,
           int64_t limit) { return aggregate(weights, v, h, w, ws, HostLoop(), limit); });
  m.def("aggregate_backward",
        [](const at::Tensor& grad, const at::Tensor& weights, const at::Tensor& v, int64_t h,
           int64_t w, int64_t ws, int64_t limit) {
          return aggregate_backward(grad, weights, v, h, w, ws, HostLoop(), limit);
        });
  m.def("quotients", &quotients);
  m.def("vector_width", &vector_width);
  m.def("vector_load_sum", &vector_load_sum);
  m.attr("INDEX_LIMIT") = kIndexLimit;
}
