// The CUDA sliding-window kernels, written once for the device and the host.
//
// Each kernel is a grid-stride loop over an element functor (operator()(idx)); the
// launchers below split the work into launches, choose the vector width and build the
// functors, and hand every launch to a `run(total, functor)` callable. The CUDA file
// (sliding_window_cuda.cu) passes one that launches `for_each_element`; the host test
// build (tests/csrc/cuda_elements_on_cpu.cpp) passes a plain loop, so that the index
// arithmetic, the map borders, the vector loads and the launch split of the CUDA path
// are checked against the released op's reference on machines without a GPU.
//
// Functors (thread per output element or per vector of channels):
//   DotElement    (bt, n, j)     out[n, j] = <a[n], b[nbr_j(n)]> (+ bias[t, j])
//   AxpyElement   (bt, n, ch)    out[n, ch] = sum_j w[n, j] * v[nbr_j(n), ch]
//   BackElement   (bt, m, ch)    out[m, ch] = sum_j w[m - off_j, j] * x[m - off_j, ch]
//   BiasPartial   (t, j, slice)  a strided slice of sum_(b, n) grad[b, t, n, j], inside only
// AxpyElement and BackElement are one GatherElement, plain and transposed (so nothing
// uses atomics). Accumulation in at::opmath_type (float32 for float16/bfloat16).
//
// Indices are 32-bit: a launch covers whole images, as many as keep every index below
// 2^31, and every division by a size fixed per launch is a multiply-high and a shift
// (Divisor): a plain 64-bit `/` or `%` calls a division routine of 70-80 instructions,
// and each element needs several.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <tuple>
#include <type_traits>

namespace mmtransnext {
namespace window {

// Division of integers in [0, 2^31) by a divisor fixed per launch, in [1, 2^31): the
// round-up method of Granlund and Montgomery, "Division by invariant integers using
// multiplication" (1994). With shift = ceil(log2 d) and
// magic = floor(2^32 (2^shift - d) / d) + 1, the quotient is
// (umulhi(n, magic) + n) >> shift; the sum stays below 2^32 because n < 2^31.
struct Divisor {
  int32_t value = 1;
  uint32_t magic = 1;
  uint32_t shift = 0;

  Divisor() = default;
  explicit Divisor(int64_t d) : value(static_cast<int32_t>(d)) {
    TORCH_CHECK(d >= 1 && d <= std::numeric_limits<int32_t>::max(),
                "sliding_window: divisor ", d, " out of the 32-bit index range");
    while ((uint64_t{1} << shift) < static_cast<uint64_t>(d)) ++shift;
    const uint64_t excess = (uint64_t{1} << shift) - static_cast<uint64_t>(d);
    magic = static_cast<uint32_t>((excess << 32) / static_cast<uint64_t>(d) + 1);
  }

  C10_HOST_DEVICE int32_t quotient(int32_t n) const {
    const uint32_t u = static_cast<uint32_t>(n);
#if defined(__CUDA_ARCH__)
    const uint32_t high = __umulhi(u, magic);
#else
    const uint32_t high = static_cast<uint32_t>((static_cast<uint64_t>(u) * magic) >> 32);
#endif
    return static_cast<int32_t>((high + u) >> shift);
  }

  C10_HOST_DEVICE void divmod(int32_t n, int32_t& q, int32_t& r) const {
    q = quotient(n);
    r = n - q * value;
  }
};

// The sizes every functor of a launch shares: heads per image, the height x width map
// of `tokens` tokens, the window, and the head dim `d` read `vec` values at a time.
struct Geometry {
  int32_t heads, height, width, ws, pad, d, window, tokens;  // window = ws^2, tokens = H*W
  Divisor by_heads, by_width, by_ws, by_window, by_tokens, by_chunks;  // chunks = d / vec
};

// `vec` consecutive values, loaded and stored as one access (16 bytes at most).
template <typename T, int vec>
struct alignas(sizeof(T) * vec) Pack {
  T v[vec];
};

// A GPU faults on a vector access whose address is not a multiple of its size (and the
// fault ends the process's CUDA context). The host build checks every address instead,
// so that a launcher that picks a vector width its pointers do not allow fails the
// tests on the CPU, with this message.
template <typename T, int vec>
C10_HOST_DEVICE void check_aligned(const T* p) {
#if defined(__CUDA_ARCH__)
  (void)p;
#else
  TORCH_CHECK(reinterpret_cast<uintptr_t>(p) % sizeof(Pack<T, vec>) == 0,
              "sliding_window: a ", sizeof(Pack<T, vec>),
              "-byte vector access at a misaligned address");
#endif
}

template <typename T, int vec>
C10_HOST_DEVICE Pack<T, vec> load(const T* p) {
  check_aligned<T, vec>(p);
  return *reinterpret_cast<const Pack<T, vec>*>(p);
}

template <typename T, int vec>
C10_HOST_DEVICE void store(T* p, const Pack<T, vec>& value) {
  check_aligned<T, vec>(p);
  *reinterpret_cast<Pack<T, vec>*>(p) = value;
}

C10_HOST_DEVICE inline bool inside(int32_t r, int32_t c, const Geometry& g) {
  return r >= 0 && r < g.height && c >= 0 && c < g.width;
}

// Logits (a = query, b = key, with bias) and the aggregate's weight gradient (a = grad,
// b = value, no bias, zero outside). Element idx = (bt * N + n) * window + j.
template <typename scalar_t, int vec>
struct DotElement {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* a;
  const scalar_t* b;
  const scalar_t* bias;  // (heads, window) or nullptr
  scalar_t* out;
  Geometry g;
  acc_t fill;

  C10_HOST_DEVICE void operator()(int32_t idx) const {
    int32_t token, j, bt, n, r, c, ki, kj;
    g.by_window.divmod(idx, token, j);
    g.by_tokens.divmod(token, bt, n);
    g.by_width.divmod(n, r, c);
    g.by_ws.divmod(j, ki, kj);
    const int32_t dr = ki - g.pad, dc = kj - g.pad;
    if (!inside(r + dr, c + dc, g)) {
      out[idx] = static_cast<scalar_t>(fill);
      return;
    }
    const scalar_t* an = a + token * g.d;
    const scalar_t* bm = b + (token + dr * g.width + dc) * g.d;
    acc_t s = 0;
    for (int32_t ch = 0; ch < g.d; ch += vec) {
      const Pack<scalar_t, vec> x = load<scalar_t, vec>(an + ch);
      const Pack<scalar_t, vec> y = load<scalar_t, vec>(bm + ch);
#pragma unroll
      for (int i = 0; i < vec; ++i) {
        s += static_cast<acc_t>(x.v[i]) * static_cast<acc_t>(y.v[i]);
      }
    }
    if (bias != nullptr) {
      int32_t image, t;
      g.by_heads.divmod(bt, image, t);
      s += static_cast<acc_t>(bias[t * g.window + j]);
    }
    out[idx] = static_cast<scalar_t>(s);
  }
};

// out[token, ch..ch+vec) = sum over the window of w * x[source, ch..]: the gather
// (source = token + off_j, weight w[token, j]) or, transposed, what token m receives as
// neighbour j of token m - off_j (source = m - off_j, weight w[source, j]). Element
// idx = (bt * N + token) * chunks + chunk, channels chunk * vec + [0, vec).
template <bool transposed, typename scalar_t, int vec>
struct GatherElement {
  const scalar_t* w;
  const scalar_t* x;
  scalar_t* out;
  Geometry g;

  C10_HOST_DEVICE void operator()(int32_t idx) const {
    using acc_t = at::opmath_type<scalar_t>;
    int32_t token, chunk, bt, n, r, c;
    g.by_chunks.divmod(idx, token, chunk);
    g.by_tokens.divmod(token, bt, n);
    g.by_width.divmod(n, r, c);
    const int32_t ch = chunk * vec;
    const scalar_t* own_weights = w + token * g.window;  // the gather's, fixed per element
    acc_t s[vec];
#pragma unroll
    for (int i = 0; i < vec; ++i) s[i] = 0;
    for (int32_t ki = 0; ki < g.ws; ++ki) {
      const int32_t dr = transposed ? g.pad - ki : ki - g.pad;
      if (r + dr < 0 || r + dr >= g.height) continue;
      for (int32_t kj = 0; kj < g.ws; ++kj) {
        const int32_t dc = transposed ? g.pad - kj : kj - g.pad;
        if (c + dc < 0 || c + dc >= g.width) continue;
        const int32_t source = token + dr * g.width + dc;
        const scalar_t* weights = transposed ? w + source * g.window : own_weights;
        const acc_t weight = static_cast<acc_t>(weights[ki * g.ws + kj]);
        const Pack<scalar_t, vec> row = load<scalar_t, vec>(x + source * g.d + ch);
#pragma unroll
        for (int i = 0; i < vec; ++i) s[i] += weight * static_cast<acc_t>(row.v[i]);
      }
    }
    Pack<scalar_t, vec> o;
#pragma unroll
    for (int i = 0; i < vec; ++i) o.v[i] = static_cast<scalar_t>(s[i]);
    store<scalar_t, vec>(out + token * g.d + ch, o);
  }
};

// Named gathers, so that kernel names in machine code and profiles say which runs.
// The aggregate (w = weights, x = value) and the logits' query gradient (w = grad,
// x = key):
template <typename scalar_t, int vec>
struct AxpyElement : GatherElement<false, scalar_t, vec> {};
// the logits' key gradient (w = grad, x = query) and the aggregate's value gradient
// (w = weights, x = grad): the transposed gather, so nothing needs atomics.
template <typename scalar_t, int vec>
struct BackElement : GatherElement<true, scalar_t, vec> {};

// partial[tj, slice] = sum of grad[b, t, n, j] over the (b, n) = slice, slice + slices,
// ... of one launch's images whose neighbour j is inside the map. Element
// idx = tj * slices + slice: consecutive threads read consecutive tokens.
template <typename scalar_t>
struct BiasPartial {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* grad;
  acc_t* partial;
  Geometry g;
  int32_t images, slices;

  C10_HOST_DEVICE void operator()(int32_t idx) const {
    const int32_t tj = idx / slices, slice = idx - tj * slices;
    int32_t t, j, ki, kj;
    g.by_window.divmod(tj, t, j);
    g.by_ws.divmod(j, ki, kj);
    const int32_t dr = ki - g.pad, dc = kj - g.pad;
    acc_t s = 0;
    for (int32_t position = slice; position < images * g.tokens; position += slices) {
      int32_t image, n, r, c;
      g.by_tokens.divmod(position, image, n);
      g.by_width.divmod(n, r, c);
      if (inside(r + dr, c + dc, g)) {
        s += static_cast<acc_t>(grad[((image * g.heads + t) * g.tokens + n) * g.window + j]);
      }
    }
    partial[idx] = s;
  }
};

// ------------------------------------------------------------------------- launchers
// Every launcher takes contiguous, checked tensors (sliding_window.cpp) and an
// `index_limit` (2^31 - 1 on the GPU; the host tests pass small ones to exercise the
// split into launches).
constexpr int64_t kIndexLimit = std::numeric_limits<int32_t>::max();

// Images per launch so that every element count and offset of a launch stays below
// index_limit; `per_image` is the largest per-image element count the kernels index.
inline int64_t images_per_launch(int64_t batch, int64_t per_image, int64_t index_limit) {
  TORCH_CHECK(per_image <= index_limit, "sliding_window: one image needs ", per_image,
              " indexable elements, more than the 32-bit kernels handle (", index_limit,
              "); use smaller maps or fewer heads per call");
  const int64_t fit = index_limit / std::max<int64_t>(per_image, 1);
  return std::max<int64_t>(1, std::min<int64_t>(batch, fit));
}

inline Geometry make_geometry(int64_t heads, int64_t height, int64_t width, int64_t ws,
                              int64_t d, int64_t vec) {
  Geometry g;
  g.heads = static_cast<int32_t>(heads);
  g.height = static_cast<int32_t>(height);
  g.width = static_cast<int32_t>(width);
  g.ws = static_cast<int32_t>(ws);
  g.pad = static_cast<int32_t>(ws / 2);
  g.d = static_cast<int32_t>(d);
  g.window = static_cast<int32_t>(ws * ws);
  g.tokens = static_cast<int32_t>(height * width);
  // Divisors of zero-sized launches are never used (no element runs); 1 keeps them valid.
  auto divisor = [](int64_t value) { return Divisor(std::max<int64_t>(value, 1)); };
  g.by_heads = divisor(heads);
  g.by_width = divisor(width);
  g.by_ws = divisor(ws);
  g.by_window = divisor(ws * ws);
  g.by_tokens = divisor(height * width);
  g.by_chunks = divisor(d / vec);
  return g;
}

// 16-byte accesses where the channels and every base pointer allow them, else one value.
template <typename scalar_t>
constexpr int wide_vec() {
  return static_cast<int>(16 / sizeof(scalar_t));
}

template <typename scalar_t>
int pick_vec(int64_t d, std::initializer_list<const void*> pointers) {
  const int vec = wide_vec<scalar_t>();
  if (d % vec != 0) return 1;
  for (const void* p : pointers) {
    if (reinterpret_cast<uintptr_t>(p) % (vec * sizeof(scalar_t)) != 0) return 1;
  }
  return vec;
}

// Calls body(Vec) with Vec = std::integral_constant<int, vec> for the chosen width.
template <typename scalar_t, typename Body>
void with_vec(int vec, const Body& body) {
  if (vec == wide_vec<scalar_t>()) {
    body(std::integral_constant<int, wide_vec<scalar_t>()>());
  } else {
    body(std::integral_constant<int, 1>());
  }
}

// Per-launch element offsets of image `first` for a (B, heads, N, k) tensor.
inline int64_t image_offset(int64_t first, int64_t heads, int64_t tokens, int64_t k) {
  return first * heads * tokens * k;
}

// The launches of a (B, heads, H x W, d) computation: the dtype dispatched, the vector
// width chosen from d and the pointers read or written `vec` values at a time, the batch
// split into launches of whole images under index_limit. For each launch, calls
// body(type_tag, width_tag, geometry, first, images), where type_tag is a null
// scalar_t* and width_tag a std::integral_constant holding the vector width.
template <typename Body>
void for_each_launch(at::ScalarType dtype, int64_t batch, int64_t heads, int64_t height,
                     int64_t width, int64_t ws, int64_t d,
                     std::initializer_list<const void*> vector_pointers, int64_t index_limit,
                     const Body& body) {
  const int64_t step =
      images_per_launch(batch, heads * height * width * std::max(ws * ws, d), index_limit);
  // The dtype was checked with the arguments (sliding_window.cpp): the name never shows.
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "sliding_window_cuda", [&] {
    with_vec<scalar_t>(pick_vec<scalar_t>(d, vector_pointers), [&](auto width_tag) {
      const Geometry g = make_geometry(heads, height, width, ws, d, decltype(width_tag)::value);
      for (int64_t first = 0; first < batch; first += step) {
        body(static_cast<scalar_t*>(nullptr), width_tag, g, first, std::min(step, batch - first));
      }
    });
  });
}

template <typename Run>
at::Tensor logits(const at::Tensor& query, const at::Tensor& key, const at::Tensor& bias,
                  int64_t height, int64_t width, int64_t ws, const Run& run,
                  int64_t index_limit = kIndexLimit) {
  const int64_t batch = query.size(0), heads = query.size(1), d = query.size(3);
  const int64_t tokens = height * width, window = ws * ws;
  auto out = at::empty({batch, heads, tokens, window}, query.options());
  for_each_launch(
      query.scalar_type(), batch, heads, height, width, ws, d,
      {query.const_data_ptr(), key.const_data_ptr()}, index_limit,
      [&](auto type_tag, auto width_tag, const Geometry& g, int64_t first, int64_t images) {
        using scalar_t = std::remove_pointer_t<decltype(type_tag)>;
        using acc_t = at::opmath_type<scalar_t>;
        const int64_t qk = image_offset(first, heads, tokens, d);
        DotElement<scalar_t, decltype(width_tag)::value> f{
            query.const_data_ptr<scalar_t>() + qk, key.const_data_ptr<scalar_t>() + qk,
            bias.const_data_ptr<scalar_t>(),
            out.mutable_data_ptr<scalar_t>() + image_offset(first, heads, tokens, window), g,
            -std::numeric_limits<acc_t>::infinity()};
        run(images * heads * tokens * window, f);
      });
  return out;
}

// The bias gradient (heads, window): per launch, partial sums over slices of the
// tokens, then a sum over launches and slices.
template <typename Run>
at::Tensor bias_grad(const at::Tensor& grad, int64_t height, int64_t width, int64_t ws,
                     const Run& run, int64_t index_limit) {
  const int64_t batch = grad.size(0), heads = grad.size(1);
  const int64_t tokens = height * width, window = ws * ws;
  // Nothing to sum (no image, head or token): zeros, and no launch. Past this, every
  // size below is positive, so the divisions are defined.
  if (grad.numel() == 0) return at::zeros({heads, window}, grad.options());
  const int64_t step = images_per_launch(batch, heads * tokens * window, index_limit);
  const int64_t launches = (batch + step - 1) / step;
  // Enough slices to fill a GPU, each thread summing at least ~16 tokens.
  const int64_t slices = std::max<int64_t>(
      1, std::min<int64_t>({4096, (step * tokens + 15) / 16, index_limit / (heads * window)}));
  auto partial = at::zeros({launches, heads * window, slices},
                           grad.options().dtype(at::toOpMathType(grad.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad.scalar_type(), "sliding_window_bias_grad_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const Geometry g = make_geometry(heads, height, width, ws, 1, 1);
        for (int64_t launch = 0; launch < launches; ++launch) {
          const int64_t first = launch * step, images = std::min(step, batch - first);
          BiasPartial<scalar_t> f{
              grad.const_data_ptr<scalar_t>() + image_offset(first, heads, tokens, window),
              partial.mutable_data_ptr<acc_t>() + launch * heads * window * slices, g,
              static_cast<int32_t>(images), static_cast<int32_t>(slices)};
          run(heads * window * slices, f);
        }
      });
  const int64_t summed[] = {0, 2};  // launches and slices
  return partial.sum(at::IntArrayRef(summed)).view({heads, window}).to(grad.scalar_type());
}

template <typename Run>
std::tuple<at::Tensor, at::Tensor, at::Tensor> logits_backward(
    const at::Tensor& grad, const at::Tensor& query, const at::Tensor& key, int64_t height,
    int64_t width, int64_t ws, const Run& run, int64_t index_limit = kIndexLimit) {
  const int64_t batch = query.size(0), heads = query.size(1), d = query.size(3);
  const int64_t tokens = height * width, window = ws * ws;
  auto grad_query = at::empty_like(query);
  auto grad_key = at::empty_like(key);
  for_each_launch(
      query.scalar_type(), batch, heads, height, width, ws, d,
      {query.const_data_ptr(), key.const_data_ptr(), grad_query.const_data_ptr(),
       grad_key.const_data_ptr()},
      index_limit,
      [&](auto type_tag, auto width_tag, const Geometry& g, int64_t first, int64_t images) {
        using scalar_t = std::remove_pointer_t<decltype(type_tag)>;
        constexpr int kVec = decltype(width_tag)::value;
        const int64_t qk = image_offset(first, heads, tokens, d);
        const scalar_t* g_logits =
            grad.const_data_ptr<scalar_t>() + image_offset(first, heads, tokens, window);
        const int64_t total = images * heads * tokens * (d / kVec);
        // grad_query gathers grad x key over the window; grad_key receives the
        // transposed gather of grad x query.
        run(total, AxpyElement<scalar_t, kVec>{{g_logits, key.const_data_ptr<scalar_t>() + qk,
                                                grad_query.mutable_data_ptr<scalar_t>() + qk,
                                                g}});
        run(total, BackElement<scalar_t, kVec>{{g_logits, query.const_data_ptr<scalar_t>() + qk,
                                                grad_key.mutable_data_ptr<scalar_t>() + qk,
                                                g}});
      });
  return {grad_query, grad_key, bias_grad(grad, height, width, ws, run, index_limit)};
}

template <typename Run>
at::Tensor aggregate(const at::Tensor& weights, const at::Tensor& value, int64_t height,
                     int64_t width, int64_t ws, const Run& run,
                     int64_t index_limit = kIndexLimit) {
  const int64_t batch = value.size(0), heads = value.size(1), d = value.size(3);
  const int64_t tokens = height * width, window = ws * ws;
  auto out = at::empty_like(value);
  for_each_launch(
      value.scalar_type(), batch, heads, height, width, ws, d,
      {value.const_data_ptr(), out.const_data_ptr()}, index_limit,
      [&](auto type_tag, auto width_tag, const Geometry& g, int64_t first, int64_t images) {
        using scalar_t = std::remove_pointer_t<decltype(type_tag)>;
        constexpr int kVec = decltype(width_tag)::value;
        const int64_t vo = image_offset(first, heads, tokens, d);
        run(images * heads * tokens * (d / kVec),
            AxpyElement<scalar_t, kVec>{
                {weights.const_data_ptr<scalar_t>() + image_offset(first, heads, tokens, window),
                 value.const_data_ptr<scalar_t>() + vo, out.mutable_data_ptr<scalar_t>() + vo,
                 g}});
      });
  return out;
}

template <typename Run>
std::tuple<at::Tensor, at::Tensor> aggregate_backward(
    const at::Tensor& grad, const at::Tensor& weights, const at::Tensor& value,
    int64_t height, int64_t width, int64_t ws, const Run& run,
    int64_t index_limit = kIndexLimit) {
  const int64_t batch = value.size(0), heads = value.size(1), d = value.size(3);
  const int64_t tokens = height * width, window = ws * ws;
  auto grad_weights = at::empty_like(weights);
  auto grad_value = at::empty_like(value);
  for_each_launch(
      value.scalar_type(), batch, heads, height, width, ws, d,
      {grad.const_data_ptr(), value.const_data_ptr(), grad_value.const_data_ptr()},
      index_limit,
      [&](auto type_tag, auto width_tag, const Geometry& g, int64_t first, int64_t images) {
        using scalar_t = std::remove_pointer_t<decltype(type_tag)>;
        using acc_t = at::opmath_type<scalar_t>;
        constexpr int kVec = decltype(width_tag)::value;
        const int64_t vo = image_offset(first, heads, tokens, d);
        const int64_t wo = image_offset(first, heads, tokens, window);
        // Weights of neighbours outside the map get a zero gradient.
        run(images * heads * tokens * window,
            DotElement<scalar_t, kVec>{grad.const_data_ptr<scalar_t>() + vo,
                                       value.const_data_ptr<scalar_t>() + vo, nullptr,
                                       grad_weights.mutable_data_ptr<scalar_t>() + wo, g,
                                       acc_t(0)});
        run(images * heads * tokens * (d / kVec),
            BackElement<scalar_t, kVec>{{weights.const_data_ptr<scalar_t>() + wo,
                                         grad.const_data_ptr<scalar_t>() + vo,
                                         grad_value.mutable_data_ptr<scalar_t>() + vo, g}});
      });
  return {grad_weights, grad_value};
}

}  // namespace window
}  // namespace mmtransnext
