// Shared declarations of the mmtransnext sliding-window attention op.
//
// Layout conventions (all tensors contiguous after the checks):
//   query, key, value : (B, heads, N, d), N = height * width, token n = r * width + c
//   logits, weights   : (B, heads, N, L), L = window_size * window_size
//   bias              : (heads, L)
// Neighbour j = ki * window_size + kj of token (r, c) is
//   (r + ki - window_size / 2, c + kj - window_size / 2)
// and may lie outside the map ("invalid"): logits are -inf there, aggregate ignores it.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <tuple>

namespace mmtransnext {

// The C++ type of a schema's `Tensor?` argument. torch's dispatcher expects
// c10::optional: a class of its own up to torch 2.3 (whose schema inference rejects
// std::optional), an alias of std::optional in later torches.
using OptionalTensor = c10::optional<at::Tensor>;

// Argument checks (TORCH_CHECK, RuntimeError on failure). Each returns the inputs
// made contiguous, in the order they were passed.
std::tuple<at::Tensor, at::Tensor, at::Tensor> check_logits_args(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& bias,
    int64_t height, int64_t width, int64_t window_size);

std::tuple<at::Tensor, at::Tensor, at::Tensor> check_logits_backward_args(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
    int64_t height, int64_t width, int64_t window_size);

std::tuple<at::Tensor, at::Tensor> check_aggregate_args(
    const at::Tensor& weights, const at::Tensor& value,
    int64_t height, int64_t width, int64_t window_size);

std::tuple<at::Tensor, at::Tensor, at::Tensor> check_aggregate_backward_args(
    const at::Tensor& grad_out, const at::Tensor& weights, const at::Tensor& value,
    int64_t height, int64_t width, int64_t window_size);

// ---------------------------------------------------------------------------------------
// Band kernels of banded bias attention (mmtransnext/ops/banded_attention.py).
//
//   logits, probs, grad : (B, heads, M, P), M = R * W query rows of one band,
//                         query m = r * W + c, key p = a * Wp + bk, P = Hp * Wp
//   by_rows             : (heads, H, Hp, Uw) row-resized bias
//   col_index           : (W, Wp, 4) int64 in [0, Uw), col_weight (W, Wp, 4)
//   bias(t, m, p) = sum_k col_weight[c, bk, k] * by_rows[t, row_start + r, a, col_index[c, bk, k]]
struct BandGeometry {
  int64_t batch, heads, m, p;   // logits (batch, heads, m, p)
  int64_t height, hp, uw;       // by_rows (heads, height, hp, uw)
  int64_t w, wp;                // taps (w, wp, 4)
  int64_t rows() const { return m / w; }
};

// Checks of bias_softmax_; returns the geometry and by_rows, col_index, col_weight made
// contiguous. `logits` must already be contiguous (it is written in place); row_shift
// may be strided.
std::tuple<BandGeometry, at::Tensor, at::Tensor, at::Tensor> check_bias_softmax_args(
    const at::Tensor& logits, const at::Tensor& by_rows, const at::Tensor& col_index,
    const at::Tensor& col_weight, int64_t row_start, const OptionalTensor& row_shift);

// Checks of softmax_backward_: grad (written in place) and probs contiguous, shift and
// grad_lse (B, heads, M), any strides.
void check_softmax_backward_args(const at::Tensor& grad, const at::Tensor& probs,
                                 const at::Tensor& shift, const at::Tensor& grad_lse);

// Checks of bias_rows_backward; returns the geometry (batch = 1, height = rows) and
// grad_bias, col_index, col_weight made contiguous.
std::tuple<BandGeometry, at::Tensor, at::Tensor, at::Tensor> check_bias_rows_backward_args(
    const at::Tensor& grad_bias, const at::Tensor& col_index, const at::Tensor& col_weight,
    int64_t uw);

}  // namespace mmtransnext
