// CPU kernels of the band softmax of banded bias attention (mmtransnext/ops/banded_attention.py).
//
//   bias_softmax_       logits <- exp(logits + bias - shift) in place, returns (shift, row sums)
//   softmax_backward_   grad <- probs * (grad - shift - sum(probs * (grad - shift)) + grad_lse)
//   bias_rows_backward  adjoint of the bias expansion: d by_rows of one band from d bias
// Layouts and the bias formula are in sliding_window.h (BandGeometry). Every row of P
// logits (~1000 floats) is read and written in two passes while it sits in L1. The bias
// of a row is built once into a per-chunk buffer and added to the B rows that share it.
// The column taps are transposed to (W, 4, Wp) int32 / scalar so the inner loops over
// keys are unit-stride (and gathers from one Uw vector of by_rows).
//
// The hot loops are compiled twice (GCC target_clones: x86-64-v3, i.e. AVX2+FMA, and the baseline
// x86-64), the right one picked at load time, since the extension is otherwise built for
// the baseline ISA only. float32 uses a vectorisable exp (Cephes polynomial, ~1 ulp);
// float64 uses std::exp. Row sums accumulate in the op's dtype, residuals in double.
#include "../sliding_window.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define MMT_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define MMT_CLONES
#endif
#define MMT_INLINE inline __attribute__((always_inline))

namespace mmtransnext {
namespace {

// __builtin_bit_cast (GCC >= 11, clang): unlike a memcpy it keeps the exp loop vectorisable.
MMT_INLINE int32_t bits_of(float x) { return __builtin_bit_cast(int32_t, x); }
MMT_INLINE float float_of(int32_t i) { return __builtin_bit_cast(float, i); }

// exp(x) = 2^n * exp(f), n = round(x / ln 2), |f| <= ln(2) / 2, exp(f) by the Cephes
// expf polynomial. Written without calls or branches so that `omp simd` loops vectorise.
MMT_INLINE float exp_f32(float x) {
  constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float xc = std::min(std::max(x, -87.0f), 88.0f);
  const float t = xc * 1.44269504088896341f + kMagic;
  const float n = t - kMagic;
  float f = xc - n * 0.693359375f;
  f = f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * f + 1.3981999507e-3f;
  p = p * f + 8.3334519073e-3f;
  p = p * f + 4.1665795894e-2f;
  p = p * f + 1.6666665459e-1f;
  p = p * f + 5.0000001201e-1f;
  // Inputs below -87 (-inf included) give exp(-87) ~ 1.6e-38 instead of 0 (and above 88
  // exp(88)): selects for those cases stop GCC from vectorising the loop. The softmax
  // only feeds it x - max <= 0, where an absolute error of 1.6e-38 is nothing. NaN
  // propagates through the arithmetic.
  return (p * f * f + f + 1.0f) * float_of((bits_of(t) - bits_of(kMagic) + 127) << 23);
}

MMT_INLINE float exp_any(float x) { return exp_f32(x); }
MMT_INLINE double exp_any(double x) { return std::exp(x); }

// Column taps of one call, transposed to (W, 4, Wp) with int32 indices.
template <typename scalar_t>
struct Taps {
  std::vector<int32_t> index;
  std::vector<scalar_t> weight;
  const int32_t* idx(int64_t c, int k, int64_t wp) const { return index.data() + (c * 4 + k) * wp; }
  const scalar_t* wt(int64_t c, int k, int64_t wp) const { return weight.data() + (c * 4 + k) * wp; }
};

template <typename scalar_t>
Taps<scalar_t> make_taps(const at::Tensor& col_index, const at::Tensor& col_weight,
                         const BandGeometry& g, const char* op) {
  const int64_t* ci = col_index.const_data_ptr<int64_t>();
  const scalar_t* cw = col_weight.const_data_ptr<scalar_t>();
  Taps<scalar_t> taps{std::vector<int32_t>(g.w * 4 * g.wp), std::vector<scalar_t>(g.w * 4 * g.wp)};
  for (int64_t c = 0; c < g.w; ++c) {
    for (int64_t bk = 0; bk < g.wp; ++bk) {
      for (int k = 0; k < 4; ++k) {
        const int64_t src = (c * g.wp + bk) * 4 + k, dst = (c * 4 + k) * g.wp + bk;
        TORCH_CHECK(ci[src] >= 0 && ci[src] < g.uw, op, ": col_index[", c, ", ", bk, ", ", k,
                    "] = ", ci[src], " is outside [0, Uw=", g.uw, ")");
        taps.index[dst] = static_cast<int32_t>(ci[src]);
        taps.weight[dst] = cw[src];
      }
    }
  }
  return taps;
}

// Strided (B, heads, M) view of a row statistic.
template <typename scalar_t>
struct RowStat {
  const scalar_t* data;
  int64_t s0, s1, s2;
  scalar_t at(int64_t b, int64_t t, int64_t m) const { return data[b * s0 + t * s1 + m * s2]; }
};

template <typename scalar_t>
RowStat<scalar_t> row_stat(const at::Tensor& x) {
  return {x.const_data_ptr<scalar_t>(), x.stride(0), x.stride(1), x.stride(2)};
}

// ---- bias_softmax_ ---------------------------------------------------------------------

struct SoftmaxArgs {
  const void* by_rows;  // (heads, H, Hp, Uw)
  const int32_t* index;
  const void* weight;
  void* logits;         // (B, heads, M, P)
  void* shift_out;      // (B, heads, M) contiguous
  void* sum_out;        // (B, heads, M) contiguous
  const void* shift_in; // optional strided row shift
  int64_t s0, s1, s2;
  int64_t row_start;
};

// Rows task in [begin, end) of (heads, M); `buf` holds P bias values.
template <typename scalar_t>
MMT_INLINE void bias_softmax_rows_impl(const SoftmaxArgs& a, const BandGeometry& g,
                                       int64_t begin, int64_t end, scalar_t* buf) {
  const scalar_t* by_rows = static_cast<const scalar_t*>(a.by_rows);
  const scalar_t* weight = static_cast<const scalar_t*>(a.weight);
  scalar_t* logits = static_cast<scalar_t*>(a.logits);
  scalar_t* shift_out = static_cast<scalar_t*>(a.shift_out);
  scalar_t* sum_out = static_cast<scalar_t*>(a.sum_out);
  const scalar_t* shift_in = static_cast<const scalar_t*>(a.shift_in);
  const int64_t P = g.p, Wp = g.wp, M = g.m;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t t = task / M, m = task % M, r = m / g.w, c = m % g.w;
    // The bias of row (t, m), one key row a at a time from one Uw vector of by_rows.
    const int32_t* i0 = a.index + (c * 4 + 0) * Wp;
    const int32_t* i1 = i0 + Wp;
    const int32_t* i2 = i1 + Wp;
    const int32_t* i3 = i2 + Wp;
    const scalar_t* w0 = weight + (c * 4 + 0) * Wp;
    const scalar_t* w1 = w0 + Wp;
    const scalar_t* w2 = w1 + Wp;
    const scalar_t* w3 = w2 + Wp;
    for (int64_t ka = 0; ka < g.hp; ++ka) {
      const scalar_t* y = by_rows + ((t * g.height + a.row_start + r) * g.hp + ka) * g.uw;
      scalar_t* out = buf + ka * Wp;
#pragma omp simd
      for (int64_t bk = 0; bk < Wp; ++bk) {
        out[bk] = w0[bk] * y[i0[bk]] + w1[bk] * y[i1[bk]] + w2[bk] * y[i2[bk]] +
                  w3[bk] * y[i3[bk]];
      }
    }
    for (int64_t b = 0; b < g.batch; ++b) {
      const int64_t row = (b * g.heads + t) * M + m;
      scalar_t* x = logits + row * P;
      scalar_t shift;
      if (shift_in) {
        shift = shift_in[b * a.s0 + t * a.s1 + m * a.s2];
#pragma omp simd
        for (int64_t p = 0; p < P; ++p) x[p] += buf[p];
      } else {
        scalar_t mx = -std::numeric_limits<scalar_t>::infinity();
#pragma omp simd reduction(max : mx)
        for (int64_t p = 0; p < P; ++p) {
          const scalar_t s = x[p] + buf[p];
          x[p] = s;
          mx = std::max(mx, s);
        }
        shift = mx;
      }
      // Lane-wise partial sums in the op's dtype: positive terms, ~1e-7 relative. (GCC
      // vectorises this loop with a float reduction, not with a double one.)
      scalar_t sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t p = 0; p < P; ++p) {
        const scalar_t e = exp_any(x[p] - shift);
        x[p] = e;
        sum += e;
      }
      shift_out[row] = shift;
      sum_out[row] = sum;
    }
  }
}

MMT_CLONES void bias_softmax_rows(const SoftmaxArgs& a, const BandGeometry& g, int64_t begin,
                                  int64_t end, float* buf) {
  bias_softmax_rows_impl<float>(a, g, begin, end, buf);
}

MMT_CLONES void bias_softmax_rows(const SoftmaxArgs& a, const BandGeometry& g, int64_t begin,
                                  int64_t end, double* buf) {
  bias_softmax_rows_impl<double>(a, g, begin, end, buf);
}

std::tuple<at::Tensor, at::Tensor> bias_softmax_cpu(at::Tensor logits,
                                                    const at::Tensor& by_rows_in,
                                                    const at::Tensor& col_index_in,
                                                    const at::Tensor& col_weight_in,
                                                    int64_t row_start,
                                                    const OptionalTensor& row_shift) {
  auto [g, by_rows, col_index, col_weight] = check_bias_softmax_args(
      logits, by_rows_in, col_index_in, col_weight_in, row_start, row_shift);
  auto shift = at::empty({g.batch, g.heads, g.m}, logits.options());
  auto sums = at::empty({g.batch, g.heads, g.m}, logits.options());
  if (logits.numel() == 0) return {shift, sums};
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "bias_softmax_cpu", [&] {
    const Taps<scalar_t> taps = make_taps<scalar_t>(col_index, col_weight, g, "bias_softmax_");
    SoftmaxArgs a{by_rows.const_data_ptr<scalar_t>(), taps.index.data(), taps.weight.data(),
                  logits.mutable_data_ptr<scalar_t>(), shift.mutable_data_ptr<scalar_t>(),
                  sums.mutable_data_ptr<scalar_t>(), nullptr, 0, 0, 0, row_start};
    if (row_shift.has_value()) {
      a.shift_in = row_shift->const_data_ptr<scalar_t>();
      a.s0 = row_shift->stride(0);
      a.s1 = row_shift->stride(1);
      a.s2 = row_shift->stride(2);
    }
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, g.batch * g.p));
    at::parallel_for(0, g.heads * g.m, grain, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> buf(g.p);  // one bias row per chunk
      bias_softmax_rows(a, g, begin, end, buf.data());
    });
  });
  return {shift, sums};
}

// ---- softmax_backward_ -----------------------------------------------------------------

template <typename scalar_t>
MMT_INLINE void softmax_backward_rows_impl(scalar_t* grad, const scalar_t* probs,
                                           const RowStat<scalar_t>& shift,
                                           const RowStat<scalar_t>& grad_lse,
                                           const BandGeometry& g, int64_t begin, int64_t end) {
  const int64_t P = g.p;
  for (int64_t row = begin; row < end; ++row) {
    const int64_t m = row % g.m, bt = row / g.m, t = bt % g.heads, b = bt / g.heads;
    scalar_t* x = grad + row * P;
    const scalar_t* pr = probs + row * P;
    const scalar_t sh = shift.at(b, t, m);
    double residual = 0;
#pragma omp simd reduction(+ : residual)
    for (int64_t p = 0; p < P; ++p) {
      residual += static_cast<double>((x[p] - sh) * pr[p]);
    }
    const scalar_t c = static_cast<scalar_t>(residual) - grad_lse.at(b, t, m);
#pragma omp simd
    for (int64_t p = 0; p < P; ++p) x[p] = ((x[p] - sh) - c) * pr[p];
  }
}

MMT_CLONES void softmax_backward_rows(float* grad, const float* probs,
                                      const RowStat<float>& shift,
                                      const RowStat<float>& grad_lse, const BandGeometry& g,
                                      int64_t begin, int64_t end) {
  softmax_backward_rows_impl<float>(grad, probs, shift, grad_lse, g, begin, end);
}

MMT_CLONES void softmax_backward_rows(double* grad, const double* probs,
                                      const RowStat<double>& shift,
                                      const RowStat<double>& grad_lse, const BandGeometry& g,
                                      int64_t begin, int64_t end) {
  softmax_backward_rows_impl<double>(grad, probs, shift, grad_lse, g, begin, end);
}

void softmax_backward_cpu(at::Tensor grad, const at::Tensor& probs, const at::Tensor& shift,
                          const at::Tensor& grad_lse) {
  check_softmax_backward_args(grad, probs, shift, grad_lse);
  if (grad.numel() == 0) return;
  BandGeometry g{grad.size(0), grad.size(1), grad.size(2), grad.size(3), 0, 0, 0, 1, 1};
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "softmax_backward_cpu", [&] {
    const auto sh = row_stat<scalar_t>(shift), gl = row_stat<scalar_t>(grad_lse);
    scalar_t* gp = grad.mutable_data_ptr<scalar_t>();
    const scalar_t* pp = probs.const_data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, g.p));
    at::parallel_for(0, g.batch * g.heads * g.m, grain, [&](int64_t begin, int64_t end) {
      softmax_backward_rows(gp, pp, sh, gl, g, begin, end);
    });
  });
}

// ---- bias_rows_backward ----------------------------------------------------------------

// Tasks (t, r, a) in [begin, end): out[t, r, a, :] (Uw values, accumulated in `acc`).
template <typename scalar_t>
MMT_INLINE void bias_rows_backward_impl(const scalar_t* grad, const Taps<scalar_t>& taps,
                                        scalar_t* out, const BandGeometry& g, int64_t begin,
                                        int64_t end, double* acc) {
  const int64_t R = g.height, Wp = g.wp;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t ka = task % g.hp, tr = task / g.hp, r = tr % R, t = tr / R;
    std::fill(acc, acc + g.uw, 0.0);
    for (int64_t c = 0; c < g.w; ++c) {
      const scalar_t* gr = grad + (t * g.m + r * g.w + c) * g.p + ka * Wp;
      for (int k = 0; k < 4; ++k) {
        const int32_t* ik = taps.idx(c, k, Wp);
        const scalar_t* wk = taps.wt(c, k, Wp);
        for (int64_t bk = 0; bk < Wp; ++bk) {
          acc[ik[bk]] += static_cast<double>(wk[bk]) * static_cast<double>(gr[bk]);
        }
      }
    }
    scalar_t* o = out + task * g.uw;
    for (int64_t u = 0; u < g.uw; ++u) o[u] = static_cast<scalar_t>(acc[u]);
  }
}

at::Tensor bias_rows_backward_cpu(const at::Tensor& grad_in, const at::Tensor& col_index_in,
                                  const at::Tensor& col_weight_in, int64_t uw) {
  auto [g, grad, col_index, col_weight] =
      check_bias_rows_backward_args(grad_in, col_index_in, col_weight_in, uw);
  // Here `height` is the band's rows R and `hp` the key rows P / Wp.
  auto out = at::empty({g.heads, g.height, g.hp, g.uw}, grad.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "bias_rows_backward_cpu", [&] {
    const Taps<scalar_t> taps =
        make_taps<scalar_t>(col_index, col_weight, g, "bias_rows_backward");
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, g.w * g.wp * 4));
    at::parallel_for(0, g.heads * g.height * g.hp, grain, [&](int64_t begin, int64_t end) {
      std::vector<double> acc(g.uw);  // one accumulator vector per chunk
      bias_rows_backward_impl<scalar_t>(gp, taps, op, g, begin, end, acc.data());
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mmtransnext, CPU, m) {
  m.impl("bias_softmax_", &bias_softmax_cpu);
  m.impl("softmax_backward_", &softmax_backward_cpu);
  m.impl("bias_rows_backward", &bias_rows_backward_cpu);
}

}  // namespace mmtransnext
