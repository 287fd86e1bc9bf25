// CUDA entry points of the mmtransnext sliding-window attention op.
//
// The kernels' work lives in sliding_window_elements.h, shared with a host build that
// tests it on machines without a GPU; this file checks the arguments, picks the device
// and stream, and launches each element functor as a grid-stride loop.
#include "../sliding_window.h"
#include "sliding_window_elements.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

namespace mmtransnext {
namespace {

constexpr int kThreads = 256;

template <typename Element>
__global__ void for_each_element(int32_t total, Element element) {
  // 64-bit stride arithmetic: idx + stride may pass 2^31 before the loop ends.
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    element(static_cast<int32_t>(idx));
  }
}

// Launches a functor over [0, total) on the current stream.
struct LaunchOnStream {
  template <typename Element>
  void operator()(int64_t total, const Element& element) const {
    if (total <= 0) return;
    const int64_t blocks = std::min<int64_t>((total + kThreads - 1) / kThreads, 1LL << 30);
    for_each_element<<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        static_cast<int32_t>(total), element);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

at::Tensor logits_cuda(const at::Tensor& query_in, const at::Tensor& key_in,
                       const at::Tensor& bias_in, int64_t height, int64_t width,
                       int64_t window_size) {
  at::Tensor query, key, bias;
  std::tie(query, key, bias) =
      check_logits_args(query_in, key_in, bias_in, height, width, window_size);
  const c10::cuda::CUDAGuard guard(query.device());
  return window::logits(query, key, bias, height, width, window_size, LaunchOnStream());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> logits_backward_cuda(
    const at::Tensor& grad_in, const at::Tensor& query_in, const at::Tensor& key_in,
    int64_t height, int64_t width, int64_t window_size) {
  at::Tensor grad, query, key;
  std::tie(grad, query, key) =
      check_logits_backward_args(grad_in, query_in, key_in, height, width, window_size);
  const c10::cuda::CUDAGuard guard(query.device());
  return window::logits_backward(grad, query, key, height, width, window_size,
                                 LaunchOnStream());
}

at::Tensor aggregate_cuda(const at::Tensor& weights_in, const at::Tensor& value_in,
                          int64_t height, int64_t width, int64_t window_size) {
  at::Tensor weights, value;
  std::tie(weights, value) =
      check_aggregate_args(weights_in, value_in, height, width, window_size);
  const c10::cuda::CUDAGuard guard(value.device());
  return window::aggregate(weights, value, height, width, window_size, LaunchOnStream());
}

std::tuple<at::Tensor, at::Tensor> aggregate_backward_cuda(
    const at::Tensor& grad_in, const at::Tensor& weights_in, const at::Tensor& value_in,
    int64_t height, int64_t width, int64_t window_size) {
  at::Tensor grad, weights, value;
  std::tie(grad, weights, value) = check_aggregate_backward_args(
      grad_in, weights_in, value_in, height, width, window_size);
  const c10::cuda::CUDAGuard guard(value.device());
  return window::aggregate_backward(grad, weights, value, height, width, window_size,
                                    LaunchOnStream());
}

}  // namespace

TORCH_LIBRARY_IMPL(mmtransnext, CUDA, m) {
  m.impl("sliding_window_logits", &logits_cuda);
  m.impl("sliding_window_logits_backward", &logits_backward_cuda);
  m.impl("sliding_window_aggregate", &aggregate_cuda);
  m.impl("sliding_window_aggregate_backward", &aggregate_backward_cuda);
}

}  // namespace mmtransnext
