// CPU kernels of the mmtransnext sliding-window attention op.
//
// Two loop nests cover the four operators (forward and backward):
//   gather_dot     out[n, j] = <a[n], b[nbr_j(n)]> (+ bias[t, j])       logits fwd, d(weights)
//   gather<false>  out[n, :] = sum_j w[n, j] * v[nbr_j(n), :]           aggregate fwd, d(query)
//   gather<true>   out[m, :] = sum_j w[m - off_j, j] * x[m - off_j, :]  d(key), d(value)
// gather<true> is the transpose of gather<false> written as a gather over the tokens
// whose window contains m, so every output element has exactly one writer: no atomics
// (the CUDA kernels' GatherElement, csrc/cuda/sliding_window_elements.h, likewise).
// Work is split over (batch * heads * rows) with at::parallel_for; the innermost loop
// runs over the contiguous head dimension and is vectorised (omp simd). Reduced
// precision inputs accumulate in float (at::opmath_type).
#include "../sliding_window.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

namespace mmtransnext {
namespace {

struct Geometry {
  int64_t bh;      // batch * heads
  int64_t heads;
  int64_t height;
  int64_t width;
  int64_t ws;      // window size (odd)
  int64_t d;       // channels per head
  int64_t n() const { return height * width; }
  int64_t l() const { return ws * ws; }
  int64_t half() const { return ws / 2; }
  // Rows per parallel chunk: aim at ~32k multiply-adds per chunk.
  int64_t grain() const {
    const int64_t row_cost = std::max<int64_t>(1, width * l() * std::max<int64_t>(d, 1));
    return std::max<int64_t>(1, 32768 / row_cost);
  }
};

Geometry make_geometry(const at::Tensor& x, int64_t height, int64_t width, int64_t ws,
                       int64_t d) {
  return Geometry{x.size(0) * x.size(1), x.size(1), height, width, ws, d};
}

// out[n, j] = sum_c a[n, c] * b[nbr_j(n), c] + bias[t, j]; `fill` where nbr_j(n) is
// outside the map.
template <typename scalar_t>
void gather_dot(const scalar_t* a, const scalar_t* b, const scalar_t* bias, scalar_t* out,
                const Geometry& g, at::opmath_type<scalar_t> fill) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = g.n(), L = g.l(), p = g.half(), d = g.d, W = g.width, H = g.height;
  const scalar_t fill_s = static_cast<scalar_t>(fill);
  at::parallel_for(0, g.bh * H, g.grain(), [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bt = task / H, r = task % H, t = bt % g.heads;
      const scalar_t* a_bt = a + bt * N * d;
      const scalar_t* b_bt = b + bt * N * d;
      const scalar_t* bias_t = bias ? bias + t * L : nullptr;
      for (int64_t c = 0; c < W; ++c) {
        const scalar_t* an = a_bt + (r * W + c) * d;
        scalar_t* on = out + (bt * N + r * W + c) * L;
        for (int64_t ki = 0; ki < g.ws; ++ki) {
          const int64_t rr = r + ki - p;
          if (rr < 0 || rr >= H) {
            for (int64_t kj = 0; kj < g.ws; ++kj) on[ki * g.ws + kj] = fill_s;
            continue;
          }
          for (int64_t kj = 0; kj < g.ws; ++kj) {
            const int64_t cc = c + kj - p, j = ki * g.ws + kj;
            if (cc < 0 || cc >= W) {
              on[j] = fill_s;
              continue;
            }
            const scalar_t* bm = b_bt + (rr * W + cc) * d;
            acc_t s = 0;
#pragma omp simd reduction(+ : s)
            for (int64_t ch = 0; ch < d; ++ch) {
              s += static_cast<acc_t>(an[ch]) * static_cast<acc_t>(bm[ch]);
            }
            if (bias_t) s += static_cast<acc_t>(bias_t[j]);
            on[j] = static_cast<scalar_t>(s);
          }
        }
      }
    }
  });
}

// out[m, :] = sum over the taps j inside the map of a weight times x[source, :]: the
// gather (source = nbr_j(m) = m + off_j, weight w[m, j]) or, transposed, what m receives
// as neighbour j of source = m - off_j (weight w[source, j]). If `row_sums` is given (the
// plain gather's: bh * height * L accumulators), it receives per (bt, row, j) the sum of
// w over the valid (m, j) pairs of that row: the bias gradient before the final
// reduction over batch and rows.
template <bool transposed, typename scalar_t>
void gather(const scalar_t* w, const scalar_t* x, scalar_t* out,
            at::opmath_type<scalar_t>* row_sums, const Geometry& g) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = g.n(), L = g.l(), p = g.half(), d = g.d, W = g.width, H = g.height;
  // Offset of the source row (column) from the output's for tap row ki (column kj).
  const auto offset = [p](int64_t k) { return transposed ? p - k : k - p; };
  at::parallel_for(0, g.bh * H, g.grain(), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(static_cast<size_t>(d));  // one buffer per chunk
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bt = task / H, r = task % H;
      const scalar_t* x_bt = x + bt * N * d;
      const scalar_t* w_bt = w + bt * N * L;
      // Null in the transposed gather, where `if (rs)` then compiles to nothing.
      acc_t* rs = !transposed && row_sums ? row_sums + task * L : nullptr;
      if (rs) std::fill(rs, rs + L, acc_t(0));
      for (int64_t c = 0; c < W; ++c) {
        const int64_t m = r * W + c;
        acc_t* ap = acc.data();
        std::fill(ap, ap + d, acc_t(0));
        for (int64_t ki = 0; ki < g.ws; ++ki) {
          const int64_t rr = r + offset(ki);
          if (rr < 0 || rr >= H) continue;
          for (int64_t kj = 0; kj < g.ws; ++kj) {
            const int64_t cc = c + offset(kj);
            if (cc < 0 || cc >= W) continue;
            const int64_t j = ki * g.ws + kj, source = rr * W + cc;
            const acc_t wj = static_cast<acc_t>(w_bt[(transposed ? source : m) * L + j]);
            if (rs) rs[j] += wj;
            const scalar_t* xs = x_bt + source * d;
#pragma omp simd
            for (int64_t ch = 0; ch < d; ++ch) ap[ch] += wj * static_cast<acc_t>(xs[ch]);
          }
        }
        scalar_t* om = out + (bt * N + m) * d;
#pragma omp simd
        for (int64_t ch = 0; ch < d; ++ch) om[ch] = static_cast<scalar_t>(ap[ch]);
      }
    }
  });
}

at::Tensor logits_cpu(const at::Tensor& query_in, const at::Tensor& key_in,
                      const at::Tensor& bias_in, int64_t height, int64_t width,
                      int64_t window_size) {
  auto [query, key, bias] =
      check_logits_args(query_in, key_in, bias_in, height, width, window_size);
  const int64_t L = window_size * window_size;
  auto out = at::empty({query.size(0), query.size(1), query.size(2), L}, query.options());
  const Geometry g = make_geometry(query, height, width, window_size, query.size(3));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, query.scalar_type(), "sliding_window_logits_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        gather_dot<scalar_t>(query.const_data_ptr<scalar_t>(), key.const_data_ptr<scalar_t>(),
                             bias.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                             g, -std::numeric_limits<acc_t>::infinity());
      });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> logits_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& query_in, const at::Tensor& key_in,
    int64_t height, int64_t width, int64_t window_size) {
  auto [grad, query, key] =
      check_logits_backward_args(grad_in, query_in, key_in, height, width, window_size);
  const int64_t L = window_size * window_size;
  const Geometry g = make_geometry(query, height, width, window_size, query.size(3));
  auto grad_query = at::empty_like(query);
  auto grad_key = at::empty_like(key);
  const auto acc_type = at::toOpMathType(query.scalar_type());
  auto row_sums =
      at::empty({query.size(0), query.size(1), height, L}, query.options().dtype(acc_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, query.scalar_type(), "sliding_window_logits_backward_cpu",
      [&] {
        using acc_t = at::opmath_type<scalar_t>;
        gather<false, scalar_t>(grad.const_data_ptr<scalar_t>(), key.const_data_ptr<scalar_t>(),
                                grad_query.mutable_data_ptr<scalar_t>(),
                                row_sums.mutable_data_ptr<acc_t>(), g);
        gather<true, scalar_t>(grad.const_data_ptr<scalar_t>(), query.const_data_ptr<scalar_t>(),
                               grad_key.mutable_data_ptr<scalar_t>(), nullptr, g);
      });
  auto grad_bias = row_sums.sum(at::IntArrayRef{0, 2}).to(query.scalar_type());
  return {grad_query, grad_key, grad_bias};
}

at::Tensor aggregate_cpu(const at::Tensor& weights_in, const at::Tensor& value_in,
                         int64_t height, int64_t width, int64_t window_size) {
  auto [weights, value] = check_aggregate_args(weights_in, value_in, height, width, window_size);
  auto out = at::empty_like(value);
  const Geometry g = make_geometry(value, height, width, window_size, value.size(3));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, value.scalar_type(), "sliding_window_aggregate_cpu", [&] {
        gather<false, scalar_t>(weights.const_data_ptr<scalar_t>(),
                                value.const_data_ptr<scalar_t>(),
                                out.mutable_data_ptr<scalar_t>(), nullptr, g);
      });
  return out;
}

std::tuple<at::Tensor, at::Tensor> aggregate_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& weights_in, const at::Tensor& value_in,
    int64_t height, int64_t width, int64_t window_size) {
  auto [grad, weights, value] = check_aggregate_backward_args(
      grad_in, weights_in, value_in, height, width, window_size);
  const Geometry g = make_geometry(value, height, width, window_size, value.size(3));
  auto grad_weights = at::empty_like(weights);
  auto grad_value = at::empty_like(value);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, value.scalar_type(), "sliding_window_aggregate_backward_cpu",
      [&] {
        // Weights of neighbours outside the map get a zero gradient.
        gather_dot<scalar_t>(grad.const_data_ptr<scalar_t>(), value.const_data_ptr<scalar_t>(),
                             nullptr, grad_weights.mutable_data_ptr<scalar_t>(), g, 0);
        gather<true, scalar_t>(weights.const_data_ptr<scalar_t>(),
                               grad.const_data_ptr<scalar_t>(),
                               grad_value.mutable_data_ptr<scalar_t>(), nullptr, g);
      });
  return {grad_weights, grad_value};
}

}  // namespace

TORCH_LIBRARY_IMPL(mmtransnext, CPU, m) {
  m.impl("sliding_window_logits", &logits_cpu);
  m.impl("sliding_window_logits_backward", &logits_backward_cpu);
  m.impl("sliding_window_aggregate", &aggregate_cpu);
  m.impl("sliding_window_aggregate_backward", &aggregate_backward_cpu);
}

}  // namespace mmtransnext
