// CUDA kernels of the mmtransnext sliding-window attention op.
//
// Same three loop nests as the CPU kernels, one thread per output element:
//   gather_dot   thread per (bt, n, j):  out[n, j] = <a[n], b[nbr_j(n)]> (+ bias[t, j])
//                consecutive threads share token n (a[n] is a broadcast read) and write
//                consecutive outputs.
//   gather_axpy  thread per (bt, n, c):  out[n, c] = sum_j w[n, j] * v[nbr_j(n), c]
//   gather_back  thread per (bt, m, c):  out[m, c] = sum_j w[m - off_j, j] * x[m - off_j, c]
//                consecutive threads read and write consecutive channels (coalesced).
// gather_back is the transposed gather, so no kernel uses atomics; the bias gradient is
// a two-stage reduction (block partial sums, then a sum over the partials).
// float32, float16, bfloat16 (and float64) inputs; accumulation in at::opmath_type.
#include "../sliding_window.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>

namespace mmtransnext {
namespace {

constexpr int kThreads = 256;

struct Geom {
  int64_t heads, height, width, ws, d;
};

__device__ __forceinline__ bool inside(int64_t r, int64_t c, const Geom& g) {
  return r >= 0 && r < g.height && c >= 0 && c < g.width;
}

int64_t blocks_for(int64_t total) {
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  return std::max<int64_t>(1, std::min<int64_t>(blocks, 1LL << 30));
}

template <typename scalar_t>
__global__ void gather_dot_kernel(const scalar_t* __restrict__ a,
                                  const scalar_t* __restrict__ b,
                                  const scalar_t* __restrict__ bias,
                                  scalar_t* __restrict__ out, int64_t total, Geom g,
                                  at::opmath_type<scalar_t> fill) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t L = g.ws * g.ws, N = g.height * g.width, p = g.ws / 2;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       idx < total; idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t j = idx % L;
    const int64_t token = idx / L;  // bt * N + n
    const int64_t n = token % N, bt = token / N;
    const int64_t r = n / g.width, c = n % g.width;
    const int64_t rr = r + j / g.ws - p, cc = c + j % g.ws - p;
    if (!inside(rr, cc, g)) {
      out[idx] = static_cast<scalar_t>(fill);
      continue;
    }
    const scalar_t* an = a + token * g.d;
    const scalar_t* bm = b + (bt * N + rr * g.width + cc) * g.d;
    acc_t s = 0;
    for (int64_t ch = 0; ch < g.d; ++ch) {
      s += static_cast<acc_t>(an[ch]) * static_cast<acc_t>(bm[ch]);
    }
    if (bias != nullptr) s += static_cast<acc_t>(bias[(bt % g.heads) * L + j]);
    out[idx] = static_cast<scalar_t>(s);
  }
}

template <typename scalar_t>
__global__ void gather_axpy_kernel(const scalar_t* __restrict__ w,
                                   const scalar_t* __restrict__ v,
                                   scalar_t* __restrict__ out, int64_t total, Geom g) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t L = g.ws * g.ws, N = g.height * g.width, p = g.ws / 2;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       idx < total; idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t ch = idx % g.d;
    const int64_t token = idx / g.d;
    const int64_t n = token % N, bt = token / N;
    const int64_t r = n / g.width, c = n % g.width;
    const scalar_t* wn = w + token * L;
    const scalar_t* v_bt = v + bt * N * g.d + ch;
    acc_t s = 0;
    for (int64_t ki = 0; ki < g.ws; ++ki) {
      const int64_t rr = r + ki - p;
      if (rr < 0 || rr >= g.height) continue;
      for (int64_t kj = 0; kj < g.ws; ++kj) {
        const int64_t cc = c + kj - p;
        if (cc < 0 || cc >= g.width) continue;
        s += static_cast<acc_t>(wn[ki * g.ws + kj]) *
             static_cast<acc_t>(v_bt[(rr * g.width + cc) * g.d]);
      }
    }
    out[idx] = static_cast<scalar_t>(s);
  }
}

template <typename scalar_t>
__global__ void gather_back_kernel(const scalar_t* __restrict__ w,
                                   const scalar_t* __restrict__ x,
                                   scalar_t* __restrict__ out, int64_t total, Geom g) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t L = g.ws * g.ws, N = g.height * g.width, p = g.ws / 2;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       idx < total; idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t ch = idx % g.d;
    const int64_t token = idx / g.d;
    const int64_t m = token % N, bt = token / N;
    const int64_t rm = m / g.width, cm = m % g.width;
    const scalar_t* w_bt = w + bt * N * L;
    const scalar_t* x_bt = x + bt * N * g.d + ch;
    acc_t s = 0;
    for (int64_t ki = 0; ki < g.ws; ++ki) {
      const int64_t rn = rm - ki + p;
      if (rn < 0 || rn >= g.height) continue;
      for (int64_t kj = 0; kj < g.ws; ++kj) {
        const int64_t cn = cm - kj + p;
        if (cn < 0 || cn >= g.width) continue;
        const int64_t n = rn * g.width + cn;
        s += static_cast<acc_t>(w_bt[n * L + ki * g.ws + kj]) *
             static_cast<acc_t>(x_bt[n * g.d]);
      }
    }
    out[idx] = static_cast<scalar_t>(s);
  }
}

// partial[tj, blockIdx.y] = sum over a slice of (b, n) of grad[b, t, n, j], valid pairs
// only. Grid (heads * L, slices); a shared-memory tree reduction per block.
template <typename scalar_t>
__global__ void bias_partial_kernel(const scalar_t* __restrict__ grad,
                                    at::opmath_type<scalar_t>* __restrict__ partial,
                                    int64_t batch, Geom g) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t shared[kThreads];
  const int64_t L = g.ws * g.ws, N = g.height * g.width, p = g.ws / 2;
  const int64_t tj = blockIdx.x, t = tj / L, j = tj % L;
  const int64_t di = j / g.ws - p, dj = j % g.ws - p;
  acc_t s = 0;
  for (int64_t idx = blockIdx.y * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       idx < batch * N; idx += static_cast<int64_t>(gridDim.y) * blockDim.x) {
    const int64_t b = idx / N, n = idx % N;
    const int64_t r = n / g.width, c = n % g.width;
    if (inside(r + di, c + dj, g)) {
      s += static_cast<acc_t>(grad[((b * g.heads + t) * N + n) * L + j]);
    }
  }
  shared[threadIdx.x] = s;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) shared[threadIdx.x] += shared[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) partial[tj * gridDim.y + blockIdx.y] = shared[0];
}

Geom make_geom(const at::Tensor& x, int64_t height, int64_t width, int64_t ws) {
  return Geom{x.size(1), height, width, ws, x.size(3)};
}

#define MMTRANSNEXT_LAUNCH(kernel, total, ...)                                        \
  do {                                                                               \
    if ((total) > 0) {                                                               \
      kernel<<<blocks_for(total), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>( \
          __VA_ARGS__);                                                              \
      C10_CUDA_KERNEL_LAUNCH_CHECK();                                                \
    }                                                                                \
  } while (0)

at::Tensor logits_cuda(const at::Tensor& query_in, const at::Tensor& key_in,
                       const at::Tensor& bias_in, int64_t height, int64_t width,
                       int64_t window_size) {
  // std::tie, not structured bindings: the dispatch lambdas capture these (C++17).
  at::Tensor query, key, bias;
  std::tie(query, key, bias) =
      check_logits_args(query_in, key_in, bias_in, height, width, window_size);
  const c10::cuda::CUDAGuard guard(query.device());
  const int64_t L = window_size * window_size;
  auto out = at::empty({query.size(0), query.size(1), query.size(2), L}, query.options());
  const Geom g = make_geom(query, height, width, window_size);
  const int64_t total = out.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, query.scalar_type(), "sliding_window_logits_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        MMTRANSNEXT_LAUNCH(gather_dot_kernel<scalar_t>, total,
                           query.const_data_ptr<scalar_t>(), key.const_data_ptr<scalar_t>(),
                           bias.const_data_ptr<scalar_t>(),
                           out.mutable_data_ptr<scalar_t>(), total, g,
                           -std::numeric_limits<acc_t>::infinity());
      });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> logits_backward_cuda(
    const at::Tensor& grad_in, const at::Tensor& query_in, const at::Tensor& key_in,
    int64_t height, int64_t width, int64_t window_size) {
  at::Tensor grad, query, key;
  std::tie(grad, query, key) =
      check_logits_backward_args(grad_in, query_in, key_in, height, width, window_size);
  const c10::cuda::CUDAGuard guard(query.device());
  const int64_t L = window_size * window_size, N = height * width;
  const int64_t batch = query.size(0), heads = query.size(1);
  const Geom g = make_geom(query, height, width, window_size);
  auto grad_query = at::empty_like(query);
  auto grad_key = at::empty_like(key);
  const int64_t total = query.numel();
  // Enough slices to fill the GPU, each thread summing at least ~16 entries.
  const int64_t slices = std::max<int64_t>(
      1, std::min<int64_t>(256, (batch * N + 16 * kThreads - 1) / (16 * kThreads)));
  auto partial = at::empty({heads, L, slices},
                           query.options().dtype(at::toOpMathType(query.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, query.scalar_type(), "sliding_window_logits_backward_cuda",
      [&] {
        using acc_t = at::opmath_type<scalar_t>;
        MMTRANSNEXT_LAUNCH(gather_axpy_kernel<scalar_t>, total,
                           grad.const_data_ptr<scalar_t>(), key.const_data_ptr<scalar_t>(),
                           grad_query.mutable_data_ptr<scalar_t>(), total, g);
        MMTRANSNEXT_LAUNCH(gather_back_kernel<scalar_t>, total,
                           grad.const_data_ptr<scalar_t>(), query.const_data_ptr<scalar_t>(),
                           grad_key.mutable_data_ptr<scalar_t>(), total, g);
        if (batch > 0) {
          const dim3 grid(static_cast<unsigned>(heads * L), static_cast<unsigned>(slices));
          bias_partial_kernel<scalar_t>
              <<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
                  grad.const_data_ptr<scalar_t>(), partial.mutable_data_ptr<acc_t>(), batch,
                  g);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        } else {
          partial.zero_();
        }
      });
  auto grad_bias = partial.sum(-1).to(query.scalar_type());
  return {grad_query, grad_key, grad_bias};
}

at::Tensor aggregate_cuda(const at::Tensor& weights_in, const at::Tensor& value_in,
                          int64_t height, int64_t width, int64_t window_size) {
  at::Tensor weights, value;
  std::tie(weights, value) =
      check_aggregate_args(weights_in, value_in, height, width, window_size);
  const c10::cuda::CUDAGuard guard(value.device());
  auto out = at::empty_like(value);
  const Geom g = make_geom(value, height, width, window_size);
  const int64_t total = out.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, value.scalar_type(), "sliding_window_aggregate_cuda", [&] {
        MMTRANSNEXT_LAUNCH(gather_axpy_kernel<scalar_t>, total,
                           weights.const_data_ptr<scalar_t>(),
                           value.const_data_ptr<scalar_t>(),
                           out.mutable_data_ptr<scalar_t>(), total, g);
      });
  return out;
}

std::tuple<at::Tensor, at::Tensor> aggregate_backward_cuda(
    const at::Tensor& grad_in, const at::Tensor& weights_in, const at::Tensor& value_in,
    int64_t height, int64_t width, int64_t window_size) {
  at::Tensor grad, weights, value;
  std::tie(grad, weights, value) = check_aggregate_backward_args(
      grad_in, weights_in, value_in, height, width, window_size);
  const c10::cuda::CUDAGuard guard(value.device());
  const Geom g = make_geom(value, height, width, window_size);
  auto grad_weights = at::empty_like(weights);
  auto grad_value = at::empty_like(value);
  const int64_t total_w = weights.numel(), total_v = value.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, value.scalar_type(), "sliding_window_aggregate_backward_cuda",
      [&] {
        // Weights of neighbours outside the map get a zero gradient.
        MMTRANSNEXT_LAUNCH(gather_dot_kernel<scalar_t>, total_w,
                           grad.const_data_ptr<scalar_t>(), value.const_data_ptr<scalar_t>(),
                           static_cast<const scalar_t*>(nullptr),
                           grad_weights.mutable_data_ptr<scalar_t>(), total_w, g,
                           at::opmath_type<scalar_t>(0));
        MMTRANSNEXT_LAUNCH(gather_back_kernel<scalar_t>, total_v,
                           weights.const_data_ptr<scalar_t>(), grad.const_data_ptr<scalar_t>(),
                           grad_value.mutable_data_ptr<scalar_t>(), total_v, g);
      });
  return {grad_weights, grad_value};
}

}  // namespace

TORCH_LIBRARY_IMPL(mmtransnext, CUDA, m) {
  m.impl("sliding_window_logits", &logits_cuda);
  m.impl("sliding_window_logits_backward", &logits_backward_cuda);
  m.impl("sliding_window_aggregate", &aggregate_cuda);
  m.impl("sliding_window_aggregate_backward", &aggregate_backward_cuda);
}

}  // namespace mmtransnext
