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

#include <cstdint>
#include <tuple>

namespace mmtransnext {

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

}  // namespace mmtransnext
